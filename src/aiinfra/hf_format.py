"""Hugging Face Llama-format folders, torch-free: tensor names, config.json to our ModelSpec, the weight files.

One name map for both directions (export writes these names; serving and fine-tuning read them back). HF Llama
uses the same rotate-half rotary layout as we do, so q/k weights need no permutation. Shared by the trainer
(`train.init_from`), the server (`aiinfra serve FOLDER`) and the exporter, and by the configuration, which takes
a fine-tuning run's model shape from the folder's config.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from aiinfra.config import ConfigError
from aiinfra.spec import ModelSpec

OUR_LAYER_TO_HF = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
OUR_TOP_TO_HF = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
HF_LAYER_NAMES = {hf: ours for ours, hf in OUR_LAYER_TO_HF.items()}
HF_TOP_NAMES = {hf: ours for ours, hf in OUR_TOP_TO_HF.items()}


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


def spec_from_hf_config(config: dict, source: str) -> ModelSpec:
    """Our ModelSpec from a Hugging Face LlamaConfig dict; unsupported features are refused by name."""
    if config.get("model_type", "llama") != "llama":
        raise ConfigError(f"{source}: model_type={config.get('model_type')!r}; only Llama-format models are served")
    rope_scaling_of(config, source)
    try:
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
    except KeyError as missing:
        raise ConfigError(f"{source}: no {missing.args[0]!r}: not a Llama config.json") from None


def read_hf_config(folder: Path) -> dict[str, Any]:
    """config.json of a Hugging Face folder; a ConfigError naming the folder when it is missing or unreadable."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no config.json (expected a Hugging Face Llama-format folder)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not JSON ({error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def hf_eos_token_ids(config: dict) -> list[int]:
    """The end-of-text ids config.json names (one id or a list, as Llama 3.1 ships)."""
    eos = config.get("eos_token_id")
    return [token for token in (eos if isinstance(eos, list) else [eos]) if isinstance(token, int)]


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


def hf_tokenizer(folder: str | None) -> tuple[Path | None, int | None]:
    """(tokenizer.json, end-of-text id) of a fine-tuning folder; (None, None) without one (a tokenizer is then
    trained on the corpus)."""
    if not folder:
        return None, None
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"train.init_from={folder!r}: no tokenizer.json")
    eos = hf_eos_token_ids(read_hf_config(Path(folder)))
    return path, eos[0] if eos else None
