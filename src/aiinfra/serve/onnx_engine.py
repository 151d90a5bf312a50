"""Greedy generation with ONNX Runtime from an `aiinfra export --format onnx [--int8]` folder, with its KV cache.

The exported graph (checkpoint/export.py) takes `input_ids` and the past keys and values of every layer and returns
the logits and the present keys and values. `generate` prefills the prompt once, then feeds one token per step
with the cache the previous step returned: each new token costs one step of one token. With `use_cache=False` it
recomputes the whole sequence for every token instead (the baseline the cache is measured against).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from aiinfra.config import ConfigError
from aiinfra.data.tokenizer import END_OF_TEXT, decode, encode, load_tokenizer
from aiinfra.models.cached import cache_names


class OnnxEngine:
    """An ONNX Runtime session over model.onnx and the tokenizer beside it."""

    def __init__(self, folder: Path, threads: int = 0):
        try:
            import onnxruntime
        except ImportError:
            raise ConfigError("the ONNX engine needs onnxruntime: pip install onnxruntime") from None
        folder = Path(folder)
        missing = [name for name in ("model.onnx", "tokenizer.json") if not (folder / name).is_file()]
        if missing:
            raise ConfigError(f"{folder}: no {', '.join(missing)} (expected an `aiinfra export --format onnx` folder)")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # the optional past inputs draw a warning at every load
        self.session = onnxruntime.InferenceSession(
            str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        # The past inputs have defaults (an empty cache): ONNX Runtime lists them as overridable initializers.
        inputs = [*self.session.get_inputs(), *self.session.get_overridable_initializers()]
        names = [value.name for value in inputs]
        past = {name for name in names if name.startswith("past_key_values.")}
        self.past_names = cache_names(len(past) // 2)[0]  # layer by layer, key then value: the outputs' order
        if not past or set(self.past_names) != past:
            raise ConfigError(f"{folder / 'model.onnx'}: no past_key_values inputs (exported before the KV cache?)")
        self.output_names = [value.name for value in self.session.get_outputs()]
        self.tokenizer: Tokenizer = load_tokenizer(folder / "tokenizer.json")
        self.eos_token_id = self.tokenizer.token_to_id(END_OF_TEXT)

    def forward(
        self, input_ids: np.ndarray, past: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits (batch, seq, vocab), present cache) for `input_ids` (batch, seq) after `past` (None: empty)."""
        feed = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64)}
        if past is not None:
            feed |= dict(zip(self.past_names, past))
        logits, *present = self.session.run(self.output_names, feed)
        return logits, present

    def generate_ids(
        self, prompt_ids: list[int], max_new_tokens: int, use_cache: bool = True, stop_at_eos: bool = True
    ) -> list[int]:
        """Greedy continuation of `prompt_ids` (up to `max_new_tokens`, ending early at end-of-text if asked)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        tokens = list(prompt_ids)
        new: list[int] = []
        past: list[np.ndarray] | None = None
        step_input = np.asarray([tokens])
        for _ in range(max_new_tokens):
            logits, present = self.forward(step_input, past)
            token = int(logits[0, -1].argmax())
            new.append(token)
            tokens.append(token)
            if stop_at_eos and token == self.eos_token_id:
                break
            if use_cache:
                past, step_input = present, np.asarray([[token]])
            else:
                step_input = np.asarray([tokens])
        return new

    def generate(self, prompt: str, max_new_tokens: int, use_cache: bool = True) -> str:
        """`prompt` continued greedily."""
        return decode(self.tokenizer, self.generate_ids(encode(self.tokenizer, prompt), max_new_tokens, use_cache))
