"""`aiinfra route calibrate`: run prompts through a cascade's small (and large) pool, score them as the gateway
would, and pick the threshold that meets a target, checked on prompts held out of the fit.

The prompts file is JSONL: one object per line with a "prompt" (text), and a "reference" (its true continuation)
where a quality target needs labels. A model's quality on a prompt is `prefix_match`: the share of the reference
that its greedy answer reproduces exactly, from the start (tokenizer-free, so it works over any server).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from aiinfra.config import ConfigError
from aiinfra.route.cascade import (
    MODE_FEATURES,
    LearnedRouter,
    answer_logprobs,
    confidence,
    prompt_logprobs,
    run_features,
)
from aiinfra.route.cascade_fit import (
    fit_gain_router,
    large_fraction,
    routed_quality,
    split,
    threshold_for_large_fraction,
    threshold_for_quality,
)
from aiinfra.route.fleet import BackendConfig, CascadeConfig, FleetConfig


def prefix_match(answer: str, reference: str) -> float:
    """The share of `reference` that `answer` reproduces exactly from its start (1 when the reference is empty)."""
    if not reference:
        return 1.0
    matched = 0
    for got, want in zip(answer, reference):
        if got != want:
            break
        matched += 1
    return matched / len(reference)


@dataclass
class Sample:
    """What calibration learned about one prompt: the small model's token logprobs (of its answer, of the prompt),
    and each model's answer and quality where asked for."""

    prompt: str
    reference: str | None = None
    answer_logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    small_answer: str | None = None
    large_answer: str | None = None

    def score(self, cascade: CascadeConfig, mode: str | None = None, router: LearnedRouter | None = None) -> float:
        """The score the gateway would give this prompt in `mode` (default: the cascade's), by `router` if given,
        else by the cascade's own router."""
        mode = mode or cascade.mode
        logprobs = self.answer_logprobs if mode == "generate" else self.prompt_logprobs
        router = router or (cascade.learned_router() if mode == cascade.mode else None)
        if router is not None:
            return router.score(logprobs, "answer" if mode == "generate" else "prompt")
        return confidence(logprobs, cascade.statistic, cascade.quantile)

    def features(self, mode: str) -> dict[str, float] | None:
        """The learned router's features of this prompt in `mode` (None: no tokens to describe)."""
        if mode == "generate":
            return run_features(self.answer_logprobs, "answer")
        return run_features(self.prompt_logprobs, "prompt")

    def quality(self, pool: str) -> float:
        answer = self.small_answer if pool == "small" else self.large_answer
        if answer is None or self.reference is None:
            raise ValueError("quality needs a reference and the model's answer")
        return prefix_match(answer, self.reference)


def read_prompts(path: Path, need_reference: bool) -> list[dict[str, str]]:
    """The prompts file's records; ConfigError naming the line that is wrong."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"--prompts {path}: cannot read it: {error.strerror or error}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--prompts {path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise ConfigError(f'--prompts {path}:{number}: expected {{"prompt": "...", "reference": "..."}}')
        if need_reference and not isinstance(record.get("reference"), str):
            raise ConfigError(f'--prompts {path}:{number}: a quality target or a learned router needs a "reference" '
                              "(the true continuation) on every line")
        records.append(record)
    if len(records) < 4:
        raise ConfigError(f"--prompts {path}: {len(records)} prompt(s); calibration needs at least 4")
    return records


class PoolClient:
    """Requests to one pool's backends in turn (calibration needs no routing policy)."""

    def __init__(self, session: aiohttp.ClientSession, backends: Sequence[BackendConfig]):
        self.session, self.backends = session, itertools.cycle(backends)

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        backend = next(self.backends)
        headers = {"content-type": "application/json"}
        if backend.key():
            headers["authorization"] = f"Bearer {backend.key()}"
        async with self.session.post(f"{backend.url}/v1/completions", data=orjson.dumps(
                body | {"model": backend.backend_model}), headers=headers) as response:
            payload = await response.read()
            if response.status != 200:
                raise ConfigError(f"backend {backend.name} ({backend.url}) answered {response.status}: "
                                  f"{payload[:300].decode(errors='replace')}")
            return orjson.loads(payload)


async def _sample(record: dict[str, str], small: PoolClient, large: PoolClient | None, max_tokens: int,
                  want_answer: bool, want_prompt: bool) -> Sample:
    sample = Sample(record["prompt"], record.get("reference"))
    greedy = {"prompt": record["prompt"], "max_tokens": max_tokens, "temperature": 0.0}
    if want_answer:
        payload = await small.complete(greedy | {"logprobs": 0})
        sample.answer_logprobs = answer_logprobs(payload, chat=False)[0]
        sample.small_answer = payload["choices"][0]["text"]
    if want_prompt:
        payload = await small.complete({"prompt": record["prompt"], "echo": True, "logprobs": 0, "max_tokens": 1,
                                        "temperature": 0.0})
        sample.prompt_logprobs = prompt_logprobs(payload)[0]
    if large is not None:
        sample.large_answer = (await large.complete(greedy))["choices"][0]["text"]
    return sample


async def collect(fleet: FleetConfig, cascade: CascadeConfig, records: Sequence[dict[str, str]], max_tokens: int,
                  modes: Sequence[str], with_quality: bool, concurrency: int = 4,
                  timeout_s: float = 600.0) -> list[Sample]:
    """One `Sample` per prompt: the logprobs that score `modes`, and with `with_quality` both models' answers."""
    pools = fleet.pools()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        small = PoolClient(session, pools[cascade.small])
        large = PoolClient(session, pools[cascade.large]) if with_quality else None
        gate = asyncio.Semaphore(concurrency)

        async def one(record: dict[str, str]) -> Sample:
            async with gate:
                return await _sample(record, small, large, max_tokens,
                                     want_answer="generate" in modes or with_quality, want_prompt="prompt" in modes)

        try:
            return await asyncio.gather(*(one(record) for record in records))
        except aiohttp.ClientError as error:
            raise ConfigError(f"cascade {cascade.model!r}: a backend could not be reached: {error}") from None


@dataclass(frozen=True)
class Calibration:
    """The threshold picked on the fit prompts and what it gives there and on the held-out ones."""

    threshold: float
    fit_large_fraction: float
    held_out_large_fraction: float | None
    fit_quality_ratio: float | None  # routed quality / the large model's, where labels exist
    held_out_quality_ratio: float | None
    fit_count: int
    held_out_count: int
    router: LearnedRouter | None = None  # the learned router fitted on the fit prompts (with --router learned)
    penalty: float | None = None  # its ridge penalty, chosen by cross-validation on the fit prompts


def _ratio(samples: Sequence[Sample], scores: Sequence[float], threshold: float) -> float:
    small = [s.quality("small") for s in samples]
    large = [s.quality("large") for s in samples]
    mean_large = sum(large) / len(large)
    return routed_quality(scores, small, large, threshold) / mean_large if mean_large > 0 else 1.0


def learn(samples: Sequence[Sample], mode: str, seed: int = 0) -> tuple[LearnedRouter, float]:
    """A learned router (and its ridge penalty) fitted on labelled samples' features in `mode`."""
    rows = [s.features(mode) for s in samples]
    if any(row is None for row in rows):
        raise ConfigError(f"--router learned: a prompt has no {mode} tokens to describe (empty answers or prompts)")
    try:
        return fit_gain_router(rows, [s.quality("small") for s in samples], [s.quality("large") for s in samples],
                               MODE_FEATURES[mode], seed=seed)
    except ValueError as error:
        raise ConfigError(f"--router learned: {error}") from None


def fit(samples: Sequence[Sample], cascade: CascadeConfig, target_large_fraction: float | None,
        target_quality: float | None, held_out_fraction: float, seed: int = 0,
        router: str | None = None) -> Calibration:
    """Pick the threshold on a part of the samples and report it on the rest (all of them when `held_out_fraction`
    is 0): with `router` "learned", first fit a learned router there; "threshold", score by the statistic; None,
    by the cascade's own router."""
    if (target_large_fraction is None) == (target_quality is None):
        raise ConfigError("give exactly one of --target-large-fraction and --target-quality")
    if held_out_fraction > 0:
        parts = split(len(samples), held_out_fraction, seed)
        fit_part, held = [samples[i] for i in parts.fit], [samples[i] for i in parts.held_out]
    else:
        fit_part, held = list(samples), []
    labelled = all(s.reference is not None and s.large_answer is not None for s in samples)
    learned, penalty = learn(fit_part, cascade.mode, seed) if router == "learned" else (None, None)
    if router == "threshold" and cascade.router == "learned":
        cascade = cascade.model_copy(update={"router": "threshold"})
    fit_scores = [s.score(cascade, router=learned) for s in fit_part]
    if target_quality is not None:
        threshold = threshold_for_quality(fit_scores, [s.quality("small") for s in fit_part],
                                          [s.quality("large") for s in fit_part], target_quality)
    else:
        assert target_large_fraction is not None
        threshold = threshold_for_large_fraction(fit_scores, target_large_fraction)
    held_scores = [s.score(cascade, router=learned) for s in held]
    return Calibration(
        threshold=threshold,
        fit_large_fraction=large_fraction(fit_scores, threshold),
        held_out_large_fraction=large_fraction(held_scores, threshold) if held else None,
        fit_quality_ratio=_ratio(fit_part, fit_scores, threshold) if labelled else None,
        held_out_quality_ratio=_ratio(held, held_scores, threshold) if labelled and held else None,
        fit_count=len(fit_part), held_out_count=len(held), router=learned, penalty=penalty)


def find_cascade(fleet: FleetConfig, name: str | None) -> CascadeConfig:
    """The cascade named `name`, or the only one; ConfigError otherwise."""
    names = [cascade.model for cascade in fleet.cascade]
    if not names:
        raise ConfigError("the fleet file has no [[cascade]] table to calibrate")
    if name is None:
        if len(names) > 1:
            raise ConfigError(f"--cascade: the fleet has {len(names)} cascades ({', '.join(names)}); name one")
        return fleet.cascade[0]
    for cascade in fleet.cascade:
        if cascade.model == name:
            return cascade
    raise ConfigError(f"--cascade {name}: no such cascade; expected one of {', '.join(names)}")


def snippet(cascade: CascadeConfig, threshold: float, router: LearnedRouter | None = None) -> str:
    """The cascade's FLEET.toml table with the calibrated threshold (and the learned router's keys)."""
    table = cascade.model_dump() | {"threshold": threshold}
    if router is not None:
        table |= {"router": "learned", "weights": router.weights, "bias": router.bias,
                  "feature_means": router.means, "feature_scales": router.scales}
    if table["router"] == "threshold":
        table = {key: value for key, value in table.items()
                 if key not in ("weights", "bias", "feature_means", "feature_scales")}
    lines = ["[[cascade]]"]
    for key, value in table.items():
        lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{name} = {_toml(item)}" for name, item in value.items()) + "}"
    if isinstance(value, float):
        return repr(float(f"{value:.8g}"))
    return json.dumps(value)


def write_atomically(path: Path, text: str) -> None:
    """Write the whole file or nothing (a temporary file renamed over it)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def report(calibration: Calibration, target: str) -> str:
    """Lines saying what the threshold gives on the fit and held-out prompts."""
    def part(label: str, count: int, fraction: float | None, ratio: float | None) -> str:
        quality = f", quality {ratio:.3f} of the large model's" if ratio is not None else ""
        return f"{label} ({count} prompts): large fraction {fraction:.3f}{quality}"

    lines = [f"threshold {calibration.threshold:.6f} for {target}"]
    if calibration.router is not None:
        lines.append(f"learned router (ridge penalty {calibration.penalty:g}, by cross-validation on the fit prompts): "
                     + ", ".join(f"{name} {weight:+.4f}" for name, weight in calibration.router.weights.items()))
    lines.append(part("fit", calibration.fit_count, calibration.fit_large_fraction, calibration.fit_quality_ratio))
    if calibration.held_out_large_fraction is not None:
        lines.append(part("held out", calibration.held_out_count, calibration.held_out_large_fraction,
                          calibration.held_out_quality_ratio))
    return "\n".join(lines)
