"""Load a model to serve: one of our run directories or a Hugging Face Llama-format folder.

A Hugging Face folder holds config.json, safetensors weights (one file, or shards listed by
model.safetensors.index.json) and tokenizer.json. Its names map one to one onto ours, and HF Llama uses the same
rotate-half rotary layout as we do, so q/k weights need no permutation. Scaled RoPE (`rope_scaling` of type
`llama3`, as Llama 3.1 and later ship, or `linear`) changes the rotary frequencies exactly as transformers does.
Weights load in the checkpoint's dtype (config.json's `torch_dtype`, else the stored tensors'), or in the one asked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from aiinfra.checkpoint.run_dir import load_run
from aiinfra.config import ConfigError
from aiinfra.data.tokenizer import END_OF_TEXT
from aiinfra.hf_format import (
    hf_eos_token_ids,
    hf_name_to_ours,
    hf_weight_files,
    rope_scaling_of,
    spec_from_hf_config,
)
from aiinfra.models.llama import Transformer, rotary_inv_freq, rotary_tables

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class ServedModel:
    """A model ready to serve with its tokenizer, end-of-text id and chat template."""

    name: str
    model: Transformer
    tokenizer: Tokenizer
    eos_token_id: int | None
    chat_template: str
    bos_token: str = ""
    other_eos_token_ids: tuple[int, ...] = ()
    """further ids that end a turn (Llama 3.1 lists <|end_of_text|>, <|eom_id|> and <|eot_id|>)"""


def scaled_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """Rotary frequencies under a RoPE scaling, as transformers' `_compute_linear_scaling_rope_parameters` and
    `_compute_llama3_parameters` compute them (Llama 3.1: long wavelengths slowed by `factor`, short ones kept,
    a smooth blend between)."""
    inv_freq = rotary_inv_freq(head_dim, theta)
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled)


def resolve_dtype(dtype: str, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """'auto' (the checkpoint's, fp32 when it says nothing), 'bf16', 'fp16' or 'fp32' (checked by `load_model`)."""
    if dtype == "auto":
        return checkpoint_dtype or torch.float32
    return DTYPES[dtype]


def load_hf_folder(folder: Path, device: str = "cpu", weights: bool = True, dtype: str = "auto") -> ServedModel:
    """Load config.json, the safetensors weights and tokenizer.json of a Hugging Face Llama-format folder.

    With `weights=False` the model stays on the meta device (its spec and shapes, no memory): what a server process
    needs when the engine runs in a process of its own."""
    config = json.loads((folder / "config.json").read_text())
    source = str(folder / "config.json")
    spec = spec_from_hf_config(config, source)
    scaling = rope_scaling_of(config, source)
    weight_files = hf_weight_files(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder}: no tokenizer.json")
    declared = config.get("torch_dtype") or config.get("dtype")
    with torch.device("meta"):
        model = Transformer(spec)
    if weights:
        state: dict[str, torch.Tensor] = {}
        for path in weight_files:
            for name, tensor in load_file(str(path), device=device).items():
                ours = hf_name_to_ours(name)
                if ours is not None:
                    state[ours] = tensor
        stored = next((tensor.dtype for tensor in state.values() if tensor.is_floating_point()), None)
        target = resolve_dtype(dtype, HF_DTYPES.get(declared) if isinstance(declared, str) else stored)
        state = {name: tensor.to(target) for name, tensor in state.items()}
        if spec.tie_embeddings:
            state.pop("output.weight", None)
        model.load_state_dict(state, strict=True, assign=True)
        if spec.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        # Rotary tables are derived buffers, never in the weights: rebuild them (init_weights would re-draw weights);
        # they stay in fp32 whatever the weights' dtype.
        inv_freq = scaled_inv_freq(spec.head_dim, spec.rope_theta, scaling) if scaling is not None else None
        model.rope_cos, model.rope_sin = rotary_tables(spec.head_dim, spec.max_seq_len, spec.rope_theta, inv_freq)
    else:
        device = "meta"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer_config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text()) if tokenizer_config_path.is_file() else {}
    eos_ids = hf_eos_token_ids(config)
    bos = tokenizer_config.get("bos_token") or ""
    return ServedModel(
        name=folder.name,
        model=model.to(device).eval(),
        tokenizer=tokenizer,
        eos_token_id=eos_ids[0] if eos_ids else None,
        other_eos_token_ids=tuple(eos_ids[1:]),
        chat_template=tokenizer_config.get("chat_template") or DEFAULT_CHAT_TEMPLATE,
        bos_token=bos if isinstance(bos, str) else bos.get("content", ""),
    )


def load_model(path: Path, device: str = "cpu", weights: bool = True, dtype: str = "auto") -> ServedModel:
    """Either kind of model folder; a folder that is neither gives a ConfigError naming what is missing.
    `weights=False`: everything but the weights (the model on the meta device). `dtype`: see `resolve_dtype`."""
    path = Path(path)
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    if not path.is_dir():
        raise ConfigError(f"model {str(path)!r} is not a directory (expected a run directory or a HF Llama folder)")
    if (path / "config.json").is_file():
        return load_hf_folder(path, device, weights, dtype)
    run = load_run(path, device, weights)
    if weights:
        stored = run.model.tok_embeddings.weight.dtype
        target = resolve_dtype(dtype, stored)
        for parameter in run.model.parameters():  # parameters only: the rotary tables stay in fp32
            parameter.data = parameter.data.to(target)
    return ServedModel(
        name=path.name,
        model=run.model,
        tokenizer=run.tokenizer,
        eos_token_id=run.tokenizer.token_to_id(END_OF_TEXT),
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )
