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
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from aiinfra.checkpoint.export import OUR_LAYER_TO_HF, OUR_TOP_TO_HF
from aiinfra.checkpoint.run_dir import load_run
from aiinfra.config import ConfigError
from aiinfra.data.tokenizer import END_OF_TEXT
from aiinfra.models.llama import Transformer, rotary_inv_freq, rotary_tables
from aiinfra.spec import ModelSpec

# One name map for both directions: export writes these names, loading reads them back.
HF_LAYER_NAMES = {hf: ours for ours, hf in OUR_LAYER_TO_HF.items()}
HF_TOP_NAMES = {hf: ours for ours, hf in OUR_TOP_TO_HF.items()}
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


def hf_name_to_ours(name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attention.wq.weight'; None for tensors we skip."""
    stem, _, kind = name.rpartition(".")
    if stem in HF_TOP_NAMES:
        return f"{HF_TOP_NAMES[stem]}.{kind}"
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if match and match.group(2) in HF_LAYER_NAMES:
        return f"layers.{match.group(1)}.{HF_LAYER_NAMES[match.group(2)]}.{kind}"
    if stem.endswith("rotary_emb"):  # old exports carry derived inv_freq buffers
        return None
    raise ConfigError(f"unexpected tensor {name!r} in the Hugging Face weights: not a Llama-format model?")


def rope_scaling_of(config: dict, source: str) -> dict | None:
    """The config's RoPE scaling (`rope_scaling`, or transformers 5's `rope_parameters`); None when plain."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}
    if kind not in needed:
        raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (supported: linear, llama3)")
    missing = [key for key in needed[kind] if not isinstance(scaling.get(key), (int, float))]
    if missing:
        raise ConfigError(f"{source}: rope_scaling of type {kind!r} needs numeric {', '.join(missing)}")
    return {"rope_type": kind, **{key: float(scaling[key]) for key in needed[kind]}}


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


def spec_from_hf_config(config: dict, source: str) -> ModelSpec:
    """Our ModelSpec from a Hugging Face LlamaConfig dict; unsupported features are refused by name."""
    if config.get("model_type", "llama") != "llama":
        raise ConfigError(f"{source}: model_type={config.get('model_type')!r}; only Llama-format models are served")
    rope_scaling_of(config, source)
    heads = config["num_attention_heads"]
    if config.get("head_dim") not in (None, config["hidden_size"] // heads):
        raise ConfigError(f"{source}: head_dim={config['head_dim']} must equal hidden_size / num_attention_heads")
    if config.get("hidden_act", "silu") != "silu" or config.get("attention_bias") or config.get("mlp_bias"):
        raise ConfigError(f"{source}: only SiLU-gated MLPs without biases are supported")
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelSpec(
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        ffn_dim=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_theta=rope_theta,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def hf_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shards model.safetensors.index.json lists, else every *.safetensors."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{index_path}: not a safetensors index (expected a 'weight_map' of tensor -> file)"
                              ) from None
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise ConfigError(f"{index_path}: lists shards that are not in the folder: {', '.join(missing)}")
        return [folder / name for name in names]
    weight_files = sorted(folder.glob("*.safetensors"))
    if not weight_files:
        raise ConfigError(f"{folder}: no *.safetensors weights (pickled .bin weights are not loaded)")
    return weight_files


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
    eos = config.get("eos_token_id")
    eos_ids = [token for token in (eos if isinstance(eos, list) else [eos]) if isinstance(token, int)]
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
