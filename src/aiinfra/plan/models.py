"""The models a plan command can name: the trainer's presets, and every published configuration the validation
table uses and the other common open releases (`inference_models.csv`: Llama 2/3.x/4, Qwen3 and Qwen2.5, Mistral
and Mixtral, GPT-OSS, DeepSeek-V3/R1, PaLM), found by the names their checkpoints carry (`known_models.find_model`),
with the architecture facts its version carries, so that `plan train --model qwen3-235b-a22b` and `plan serve
--model deepseek-r1` price the same model `plan validate` checks against published runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from aiinfra.plan.errors import PlanError
from aiinfra.plan.runs import architecture_settings
from aiinfra.plan.serve_rows import ServeModel, find_model, models_begun, serve_models, unknown_model_message
from aiinfra.spec import PRESETS, ModelSpec, preset

# A published model's default sequence length for planning (its configurations allow 32K-128K; the presets of
# the same size train at 8192, as Llama 3 pre-trained).
PUBLISHED_SEQ_LEN = 8192


@dataclass(frozen=True)
class NamedModel:
    """A model by name: its shape, and for a published configuration what serving and training take from it."""

    spec: ModelSpec
    published: ServeModel | None = None  # None for a trainer preset
    train_settings: dict[str, Any] = field(default_factory=dict)  # TrainSettings fields its version sets


@lru_cache(maxsize=1)
def _published() -> dict[str, ServeModel]:
    return serve_models()


def known_model_names() -> list[str]:
    """The presets, then the published configurations."""
    return [*PRESETS, *(name for name in _published() if name not in PRESETS)]


def resolve_model(name: str, seq_len: int | None = None) -> NamedModel:
    """A model by name with max_seq_len at least `seq_len` (a preset keeps its own when larger; a published
    configuration takes `seq_len`, else PUBLISHED_SEQ_LEN), or PlanError listing the names."""
    if name in PRESETS:
        spec = preset(name)
        if seq_len and seq_len > spec.max_seq_len:
            spec = preset(name, max_seq_len=seq_len)
        return NamedModel(spec)
    catalog = _published()
    found = find_model(name, catalog)
    if found is None:
        if len(models_begun(name, catalog)) > 1:
            raise PlanError(unknown_model_message(name, catalog))
        raise PlanError(f"unknown model {name!r}; known: {', '.join(known_model_names())}")
    published = catalog[found]
    spec = ModelSpec(**{**published.spec.model_dump(), "max_seq_len": seq_len or PUBLISHED_SEQ_LEN})
    return NamedModel(spec, published, architecture_settings(published.version))


def published_serving(published: ServeModel | None) -> dict[str, Any]:
    """The ServeSettings fields a published configuration sets (MLA's latent cache, shared experts, the prefill
    head width, interleaved MoE layers), as `plan validate` sets them for its rows; none for a preset."""
    return published.settings_fields() if published else {}
