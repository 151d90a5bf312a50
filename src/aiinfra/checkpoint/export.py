"""Export a finished run: a Hugging Face Llama folder (transformers' LlamaForCausalLM), or an ONNX graph.

Hugging Face (`export_hf`):

    <out>/config.json              LlamaConfig (architectures, sizes, rope, tie_word_embeddings)
    <out>/generation_config.json   bos/eos token ids
    <out>/model.safetensors        weights under Hugging Face names, fp32
    <out>/tokenizer.json           the run's tokenizer, unchanged
    <out>/tokenizer_config.json    PreTrainedTokenizerFast with <|endoftext|> as bos/eos
    <out>/special_tokens_map.json

Our names map one to one onto Hugging Face's, and both use the rotate-half rotary layout, so no tensor is permuted.
Only Llama-style specs (SwiGLU, RMSNorm, rotary positions, no biases, dense) have a Llama equivalent.

ONNX (`export_onnx`, needs the `onnx` and `onnxscript` packages): `model.onnx` mapping int64 `input_ids` (batch,
seq) and fp32 `past_key_values.{i}.key` / `.value` (batch, kv_heads, past_seq, head_dim) of every layer to fp32
`logits` (batch, seq, vocab) and `present.{i}.key` / `.value` (the past with the new tokens appended), every
dimension but the heads dynamic up to max_seq_len (models/cached.py): a prefill, then one call per new token. The
past inputs default to an empty cache, so a caller that feeds `input_ids` alone gets the logits of the whole
sequence as before. Exported from our own module by torch.onnx's dynamo exporter, so any spec exports; the tokenizer
files sit beside it. With `int8` (needs `onnxruntime`), ONNX Runtime's dynamic quantization stores every MatMul
weight as int8 per output channel.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from aiinfra.checkpoint.run_dir import atomic_write, load_run
from aiinfra.config import ConfigError
from aiinfra.data.tokenizer import END_OF_TEXT
from aiinfra.hf_format import OUR_LAYER_TO_HF, OUR_TOP_TO_HF
from aiinfra.models.cached import CachedTransformer, cache_names
from aiinfra.spec import ModelSpec

SCRATCH_PREFIX = ".export-"


def check_llama_exportable(spec: ModelSpec) -> None:
    """Raise ConfigError naming every spec field that has no Hugging Face Llama equivalent."""
    problems = []
    if spec.mlp != "swiglu":
        problems.append(f"model.mlp={spec.mlp!r} (Llama uses 'swiglu')")
    if spec.norm != "rmsnorm":
        problems.append(f"model.norm={spec.norm!r} (Llama uses 'rmsnorm')")
    if spec.position != "rope":
        problems.append(f"model.position={spec.position!r} (Llama uses 'rope')")
    if spec.bias:
        problems.append("model.bias=true (Llama has no biases)")
    if spec.is_moe:
        problems.append(f"model.n_experts={spec.n_experts} (Llama is dense)")
    if problems:
        raise ConfigError(f"cannot export as Hugging Face Llama: {'; '.join(problems)}")


def hf_name(ours: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    stem, _, kind = ours.rpartition(".")
    if stem in OUR_TOP_TO_HF:
        return f"{OUR_TOP_TO_HF[stem]}.{kind}"
    _, index, module = stem.split(".", 2)
    return f"model.layers.{index}.{OUR_LAYER_TO_HF[module]}.{kind}"


def hf_config(spec: ModelSpec, eos_token_id: int | None) -> dict[str, Any]:
    """The LlamaConfig dict of `spec` (rope given both ways, for transformers 4 and 5)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.dim,
        "intermediate_size": spec.ffn_dim,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_seq_len,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": spec.tie_embeddings,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _write_tokenizer_files(out_dir: Path, tokenizer: Tokenizer, max_seq_len: int) -> int | None:
    """tokenizer.json plus the PreTrainedTokenizerFast config; returns the end-of-text id (None if absent)."""
    eos_id = tokenizer.token_to_id(END_OF_TEXT)
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT} if eos_id is not None else {}
    atomic_write(out_dir / "tokenizer.json", lambda tmp: tokenizer.save(str(tmp)))
    # Our tokenizer adds no special tokens when encoding, so PreTrainedTokenizerFast needs no post-processor hints.
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_seq_len,
            "clean_up_tokenization_spaces": False,
            **special,
        },
    )
    _write_json(out_dir / "special_tokens_map.json", special)
    return eos_id


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def export_hf(run_dir: Path, out_dir: Path) -> Path:
    """Write a Hugging Face Llama folder for the finished run in `run_dir` to `out_dir`; returns `out_dir`."""
    run = load_run(Path(run_dir))
    return write_hf_folder(run.model, run.tokenizer, out_dir)


def write_hf_folder(model: torch.nn.Module, tokenizer: Tokenizer, out_dir: Path) -> Path:
    """Write a model of ours (`models.llama.Transformer`) and its tokenizer as a Hugging Face Llama folder."""
    spec = model.spec
    check_llama_exportable(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    weights = {}
    for name, tensor in model.state_dict().items():
        if spec.tie_embeddings and name == "output.weight":
            continue  # the same tensor as the embedding; transformers re-ties it from tie_word_embeddings
        weights[hf_name(name)] = tensor.detach().to(torch.float32).contiguous()
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))

    eos_id = _write_tokenizer_files(out_dir, tokenizer, spec.max_seq_len)
    _write_json(out_dir / "config.json", hf_config(spec, eos_id))
    _write_json(out_dir / "generation_config.json", {"bos_token_id": eos_id, "eos_token_id": eos_id})
    return out_dir


def export_onnx(run_dir: Path, out_dir: Path, int8: bool = False) -> Path:
    """Write `model.onnx` (input_ids -> logits, dynamic batch and sequence) and the tokenizer files to `out_dir`.

    `int8`: the weights of every MatMul quantized to int8 per output channel by ONNX Runtime's dynamic quantization
    (activations quantized on the fly, MatMulInteger), the usual form for CPU and edge runtimes: about a quarter of
    the bytes."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it; fail here with a clear message)
    except ImportError:
        raise ConfigError("--format onnx needs the onnx and onnxscript packages: pip install onnx onnxscript") from None
    if int8:
        try:
            import onnxruntime.quantization  # noqa: F401
        except ImportError:
            raise ConfigError("--int8 needs onnxruntime (its quantizer): pip install onnxruntime") from None
    run = load_run(Path(run_dir))
    spec = run.config.model
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    sequence = torch.export.Dim("sequence", min=1, max=max(2, spec.max_seq_len))
    past_sequence = torch.export.Dim("past_sequence", min=0, max=max(2, spec.max_seq_len))
    cached = CachedTransformer(run.model).eval()
    past_names, present_names = cache_names(spec.n_layers)
    # Example sizes other than 0 and 1, which torch.export would take for constants.
    example = torch.zeros(2, min(4, spec.max_seq_len), dtype=torch.long)
    example_past = tuple(torch.zeros(2, spec.n_kv_heads, 3, spec.head_dim) for _ in past_names)
    # The exporter logs a line per torchvision operator it cannot find and warns about its own deprecations:
    # noise for a user who exports a language model.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous_level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # The past inputs share the batch symbol with input_ids: the exporter says so once per input.
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            program = torch.onnx.export(
                cached, (example, *example_past), dynamo=True, input_names=["input_ids", *past_names],
                output_names=["logits", *present_names], optimize=True, verbose=False,
                dynamic_shapes=({0: batch, 1: sequence}, tuple({0: batch, 2: past_sequence} for _ in past_names)),
            )
    finally:
        registration_log.setLevel(previous_level)
    _default_empty_cache(program, past_names, spec)
    # Saved in place, not through a temporary name: a graph over 2 GB keeps its weights in an external file that
    # model.onnx refers to by name.
    if int8:
        for leftover in out_dir.glob(f"{SCRATCH_PREFIX}*"):  # from an export killed halfway
            shutil.rmtree(leftover, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=SCRATCH_PREFIX) as scratch:
            fp32_path, int8_path = Path(scratch) / "fp32" / "model.onnx", Path(scratch) / "int8" / "model.onnx"
            fp32_path.parent.mkdir()
            int8_path.parent.mkdir()
            program.save(str(fp32_path))
            _quantize_int8(fp32_path, int8_path, large=4 * spec.num_params() > 2**31)
            # A large model's weights sit in model.onnx.data beside the graph, which names it: the data moves first
            # and the graph last, so a model.onnx in `out_dir` always finds whole weights.
            for data in int8_path.parent.glob("*.data"):
                os.replace(data, out_dir / data.name)
            os.replace(int8_path, out_dir / "model.onnx")
    else:
        program.save(str(out_dir / "model.onnx"))
    _write_tokenizer_files(out_dir, run.tokenizer, spec.max_seq_len)
    return out_dir


def _default_empty_cache(program: Any, past_names: list[str], spec: ModelSpec) -> None:
    """Make every past input optional, defaulting to an empty cache: ONNX takes an initializer named as a graph input
    for that input's default. The default has batch 1, so each past input is first broadcast to the batch of
    `input_ids` (Expand; a no-op for a real cache): the exporter had taken the past's batch for the same symbol."""
    import numpy as np
    import onnx_ir as ir

    graph = program.model.graph
    input_ids = graph.inputs[0]
    nodes = [ir.node("Shape", [input_ids], {"start": 0, "end": 1}), ir.node("Constant", [], {
        "value": ir.tensor(np.ones(3, dtype=np.int64), name="ones3")})]
    nodes.append(ir.node("Concat", [nodes[0].outputs[0], nodes[1].outputs[0]], {"axis": 0}))
    batch_shape = nodes[2].outputs[0]
    for value in graph.inputs:
        if value.name not in past_names:
            continue
        expand = ir.node("Expand", [value, batch_shape])
        ir.convenience.replace_all_uses_with(value, expand.outputs[0])
        expand.replace_input_with(0, value)  # the line above also rewired the Expand's own input
        nodes.append(expand)
        empty = np.zeros((1, spec.n_kv_heads, 0, spec.head_dim), dtype=np.float32)
        value.const_value = ir.tensor(empty, name=value.name)
        graph.register_initializer(value)
    graph.insert_before(graph.node(0), nodes)


def _quantize_int8(fp32_path: Path, out_path: Path, large: bool) -> None:
    """ONNX Runtime's dynamic int8 quantization of `fp32_path` into `out_path` (a model of over 2 GB of fp32 weights
    keeps its int8 weights in `<out_path>.data`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def not_the_preprocessing_advice(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")

    root = logging.getLogger()  # the quantizer advises pre-processing on the root logger, every call: drop only that
    root.addFilter(not_the_preprocessing_advice)
    try:
        quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=large)
    finally:
        root.removeFilter(not_the_preprocessing_advice)
