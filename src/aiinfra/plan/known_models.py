"""Published model configurations behind a run-table row: which version of a family a shape is, and the shape a
row leaves blank.

A row names a family word (`gemma`, `deepseek`, `llama`) and, usually, its shape; a row that names a published
checkpoint instead ("meta-llama/Llama-2-70b-hf") takes that checkpoint's family and shape (`named_model`), by the
name rules serving rows and `--model` share (`find_model`). Architecture facts that differ
between versions of one family (Gemma 2's 1:1 sliding windows against Gemma 3's 5:1; DeepSeek-V3's node-limited
router) follow from the version, and the version from the family and the published
(hidden, layers) of each released configuration. Where a row gives the family and the parameter count but no shape,
the shape comes from the published configuration with that count (`inference_models.csv`, each row naming its
config.json). Nothing here reads a row's `source` or `id`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

MODELS_CSV = Path(__file__).with_name("inference_models.csv")
SHAPE_COLUMNS = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab")


@dataclass(frozen=True)
class Version:
    """One released configuration of a family: the version key the architecture tables use, and its head width."""

    version: str
    head_width: int = 0  # config.json head_dim where it is not hidden / heads (0: hidden / heads)
    tied: bool = False  # this release ties its output head to the input embedding where its family does not


# (family word, hidden, layers) -> version, from each release's config.json (google/gemma-2b, gemma-7b, gemma-2-2b,
# gemma-2-9b, gemma-2-27b, gemma-3-1b-pt, gemma-3-4b-pt, gemma-3-12b-pt, gemma-3-27b-pt: hidden_size,
# num_hidden_layers, head_dim).
GEMMA_VERSIONS = {
    (2048, 18): Version("gemma", 256), (3072, 28): Version("gemma", 256),
    (2304, 26): Version("gemma2", 256), (3584, 42): Version("gemma2", 256), (4608, 46): Version("gemma2", 128),
    (1152, 26): Version("gemma3", 256), (2560, 34): Version("gemma3", 256), (3840, 48): Version("gemma3", 256),
    (5376, 62): Version("gemma3", 128),
}
# Every DeepSeek mixture-of-experts model (V2, V2-Lite, V3, R1) uses multi-head latent attention (arXiv 2405.04434
# 2.1; arXiv 2412.19437 2.1.1); V3's shape (hidden 7168) also carries its node-limited router. V2's device-limited
# routing (at most 3 devices a token, 2405.04434 2.2.2) is not modelled. The dense DeepSeek LLM 7B/67B are
# Llama-style.
DEEPSEEK_V3_HIDDEN = 7168


# Llama 3.2's small text models tie the output head to the embedding (config.json tie_word_embeddings true;
# meta-llama/Llama-3.2-1B: hidden 2048, 16 layers, head_dim 64; Llama-3.2-3B: hidden 3072, 28 layers); the other
# Llama releases do not.
LLAMA_TIED_SHAPES = {(2048, 16): Version("llama3.2", 64), (3072, 28): Version("llama3.2", 128)}


# Mistral NeMo 12B and Mistral Small 3 (24B) keep 32 query heads of head_dim 128 at hidden 5120
# (mistralai/Mistral-Nemo-Base-2407, Mistral-Small-24B-Base-2501 config.json: head_dim 128, 40 layers); Mistral 7B,
# Codestral 22B and Mistral Large 2 have hidden / heads = 128.
MISTRAL_VERSIONS = {(5120, 40): Version("mistral", 128)}


# Qwen's small releases tie the output head to the embedding (config.json tie_word_embeddings true), the larger
# ones do not: Qwen3-0.6B (hidden 1024, 28 layers), 1.7B (2048, 28), 4B (2560, 36), all with head_dim 128;
# Qwen2.5-0.5B (896, 24), 1.5B (1536, 28), 3B (2048, 36), with hidden / heads = 64 or 128.
QWEN3_VERSIONS = {(1024, 28): Version("qwen3", 128, tied=True), (2048, 28): Version("qwen3", 128, tied=True),
                  (2560, 36): Version("qwen3", 128, tied=True)}
QWEN2_VERSIONS = {(896, 24): Version("qwen2", tied=True), (1536, 28): Version("qwen2", tied=True),
                  (2048, 36): Version("qwen2", tied=True)}

# Each family's releases told apart by (hidden, layers); a shape not listed is the family's own architecture.
SHAPE_VERSIONS = {"gemma": GEMMA_VERSIONS, "llama": LLAMA_TIED_SHAPES, "mistral": MISTRAL_VERSIONS,
                  "qwen3": QWEN3_VERSIONS, "qwen2": QWEN2_VERSIONS}


def model_version(family: str, hidden: int | None, layers: int | None, moe: bool) -> Version:
    """The version key of a family and shape; the family itself where the family has one architecture."""
    released = SHAPE_VERSIONS.get(family, {}).get((hidden, layers))
    if released is not None:
        return released
    if family == "gemma" and hidden and layers:
        return Version("gemma", 256)  # an unlisted Gemma shape: Gemma 1's 256-wide heads
    if family == "deepseek" and moe:
        return Version("deepseek-v3" if hidden == DEEPSEEK_V3_HIDDEN else "deepseek-v2")
    return Version(family)


@lru_cache(maxsize=1)
def _published_shapes() -> tuple[dict[str, str], ...]:
    with MODELS_CSV.open(newline="") as handle:
        return tuple(csv.DictReader(handle))


@lru_cache(maxsize=256)
def sparse_in_catalog(family: str, params_b: float | None) -> bool:
    """Whether every published configuration of a family in the catalog with this parameter count (within 3%; any
    count where none is given) is a mixture of experts, and there is one: DeepSeek at 671B (V3, R1), not at 67B."""
    kinds = {bool((m.get("experts") or "").strip()) for m in _published_shapes() if m["family"] == family
             and (params_b is None or abs(float(m["params_b"]) - params_b) <= 0.03 * params_b)}
    return kinds == {True}


def published_shape(family: str, params_b: float | None, moe: bool,
                    stated: dict[str, str] | None = None) -> dict[str, str] | None:
    """The shape columns (and, for a mixture-of-experts model, `experts`, `experts_per_token` and the counts
    `params_b` and `active_params_b`, which its expert width comes from) of the published configuration of this
    family that agrees with every shape column the row states and, where the row gives one, its parameter count
    (within 3%); where several differ, the one whose count is clearly nearest (`_clearly_nearest`), else None. With
    nothing stated but the count, the count alone decides."""
    stated = {k: v.strip() for k, v in (stated or {}).items() if v and v.strip()}
    if moe:  # a sparse row's `ffn` may be its dense layers' width or an expert's: the schema does not say which
        stated.pop("ffn", None)
    if params_b is None and not stated:
        return None
    columns = SHAPE_COLUMNS + (("experts", "experts_per_token") if moe else ())

    # Each agreeing shape with how far its published count is from the row's (0 without a count), and its counts.
    distance: dict[tuple[str, ...], float] = {}
    counts: dict[tuple[str, ...], dict[str, str]] = {}
    for m in _published_shapes():
        if m["family"] != family or bool((m.get("experts") or "").strip()) != moe:
            continue
        gap = abs(float(m["params_b"]) - params_b) / params_b if params_b is not None else 0.0
        if gap > 0.03 or not all(_same(m.get(k, ""), v) for k, v in stated.items() if k in columns):
            continue
        shape = tuple(m.get(column, "") for column in columns)
        distance[shape] = min(gap, distance.get(shape, gap))
        counts.setdefault(shape, {k: (m.get(k) or "").strip() for k in ("params_b", "active_params_b")})
    ranked = sorted(distance, key=distance.get)
    if not ranked or (len(ranked) > 1 and not _clearly_nearest(distance[ranked[0]], distance[ranked[1]])):
        return None
    shape = dict(zip(columns, ranked[0], strict=True))
    return {**shape, **{k: v for k, v in counts[ranked[0]].items() if v}} if moe else shape


def _clearly_nearest(best: float, second: float) -> bool:
    """Whether a count `best` (relative distance) away names its shape over another `second` away: within 1% and
    less than half as far (Llama 2 70B's 69.0B for a row of 69, not Llama 3 70B's 70.6B; a row of 70 is 1.4% from
    one and 0.9% from the other, and names neither)."""
    return best <= 0.01 and best < second / 2


def _same(published: str, stated: str) -> bool:
    try:
        return float(published) == float(stated)
    except ValueError:
        return published.strip() == stated


# Words a published checkpoint's name carries that do not change its shape: the tuning (instruct, chat, base, pt, it,
# thinking), the checkpoint's quantization (FP8, FP4, NVFP4, MXFP4, AWQ, GPTQ, INT4/INT8, W8A8, W4A16, "-KV" for a
# quantized cache, "-Dynamic"), the Hugging Face format tag (hf), a context-length variant of one shape
# (Phi-3-mini-4k-instruct, -128k), a dated revision (Qwen3-235B-A22B-Instruct-2507,
# DeepSeek-R1-0528, Cohere's c4ai-command-r-08-2024) and a v0.x or v01 release (Mixtral-8x7B-v0.1,
# c4ai-command-r-v01). "-v3" and the like stay: they name a model.
_NAME_TAGS = re.compile(r"(-(instruct|chat|base|pt|it|thinking|hf|fp8|fp4|nvfp4|mxfp4|awq|gptq|int4|int8|w8a8|w4a16|"
                        r"kv|dynamic|\d+k|\d{2}-\d{4}|\d{4}|v0\.\d+|v01))+$")


@lru_cache(maxsize=4096)
def model_key(name: str) -> str:
    """A model name as the catalog spells it: lower case, hyphens for spaces and underscores, Meta's "Meta-Llama-3"
    and the run-together "llama3.1" as "llama-3", and the shape-neutral tags (`_NAME_TAGS`) dropped."""
    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    key = re.sub(r"^meta-llama-", "llama-", key)
    key = re.sub(r"^c4ai-", "", key)  # Cohere For AI's checkpoints: c4ai-command-r-plus
    key = re.sub(r"^llama(\d)", r"llama-\1", key)
    return _NAME_TAGS.sub("", key)


def find_model(name: str, models: Iterable[str], prefix: bool = True) -> str | None:
    """The catalog name a row's or a user's model name means, or None: the exact name; else the name, or what follows
    a Hugging Face organisation ("meta-llama/Llama-3.1-70B-Instruct"), by `model_key`; else the one catalog name it
    begins ("qwen3-235b" for qwen3-235b-a22b, "llama-4-scout" for llama-4-scout-17b-16e), unless `prefix` is off.
    Several: None."""
    names = list(models)
    if name in names:
        return name
    keys = {model_key(known): known for known in names}
    for candidate in dict.fromkeys((name, name.split("/", 1)[-1])):
        key = model_key(candidate)
        if key in keys:
            return keys[key]
        longer = [known for known_key, known in keys.items() if prefix and known_key.startswith(key + "-")]
        if len(longer) == 1:
            return longer[0]
    return None


def models_begun(name: str, models: Iterable[str]) -> list[str]:
    """The catalog names a model name (without its organisation) begins, by `model_key`."""
    key = model_key(name.split("/", 1)[-1])
    return [known for known in models if model_key(known).startswith(key + "-")]


NAMED_COLUMNS = SHAPE_COLUMNS + ("params_b", "active_params_b", "experts", "experts_per_token")


@lru_cache(maxsize=1024)
def named_model(name: str) -> dict[str, str] | None:
    """The catalog row of a training row whose `model` cell names a published checkpoint ("Llama-2-70b-hf",
    "Qwen/Qwen3-30B-A3B") rather than a family word, by its whole name (`find_model` without prefixes, so a family
    word such as "nemotron" never stands for the one catalog model it begins); None for a family word. The row is
    the catalog's own (cached): read it, do not change it."""
    shapes = _published_shapes()
    if name in {m["family"] for m in shapes}:
        return None
    found = find_model(name, [m["model"] for m in shapes], prefix=False)
    return next((m for m in shapes if m["model"] == found), None) if found else None
