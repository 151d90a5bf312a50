"""The cascade's learned router: features of a run of token log-probabilities by hand; on synthetic prompts whose
gain is a known linear function of those features (and rises with the small model's confidence, as on our two
models), the fitted router recovers it and beats the threshold router; its calibration holds the target on held-out
prompts; its FLEET.toml keys are validated; and the gateway routes by it against two fake pools, also with the table
`aiinfra route calibrate --router learned` writes."""

from __future__ import annotations

import json
import math
import random
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tomllib
from typer.testing import CliRunner

from aiinfra.cli import app
from aiinfra.config import ConfigError
from aiinfra.route.calibrate import Sample, fit, snippet
from aiinfra.route.cascade import MODE_FEATURES, LearnedRouter, run_features, score_runs
from aiinfra.route.cascade_fit import apgr, choose_penalty, fit_gain_router, router_curve, split
from aiinfra.route.fleet import CascadeConfig, parse_fleet

from .conftest import gateway_in_thread
from .fake_backend import FakeBackend

# As in test_cascade_fit: 1,000 held-out prompts, three combined standard errors of the fit's and the held-out
# part's sampling.
HELD_OUT_TOLERANCE = 0.05
REFERENCE = "abcdefghij"  # quality k/10: an answer that reproduces its first k characters


def test_run_features_by_hand() -> None:
    logprobs = [math.log(0.5), math.log(0.25), None, math.log(1.0)]
    features = run_features(logprobs, "answer")
    assert features is not None and set(features) == set(MODE_FEATURES["generate"])
    mean = (math.log(0.5) + math.log(0.25)) / 3
    assert features["answer_mean_logprob"] == pytest.approx(mean)
    assert features["answer_std_logprob"] == pytest.approx(float(np.std([math.log(0.5), math.log(0.25), 0.0])))
    assert features["answer_min"] == pytest.approx(0.25)
    assert features["answer_p50"] == pytest.approx(0.5)
    assert features["answer_p10"] == pytest.approx(float(np.quantile([0.5, 0.25, 1.0], 0.1)))
    assert features["answer_p90"] == pytest.approx(float(np.quantile([0.5, 0.25, 1.0], 0.9)))
    assert features["answer_tokens"] == 3
    assert run_features([], "prompt") is None
    router = LearnedRouter({"answer_p50": 2.0}, 0.5, {"answer_p50": 0.25}, {"answer_p50": 0.5})
    assert router.predicted_gain(features) == pytest.approx(0.5 + 2.0 * (0.5 - 0.25) / 0.5)
    assert router.score(logprobs, "answer") == pytest.approx(1 / (1 + math.exp(1.5)))
    assert router.score([], "answer") == 0.0  # nothing vouches for the answer: it escalates
    assert score_runs([logprobs, []], "quantile", 0.1, router) == 0.0  # the least confident run decides


def _synthetic(count: int, seed: int) -> tuple[list[list[float]], list[float], list[float], list[float]]:
    """Runs of token log-probabilities, the small and the large model's quality, and the true (noiseless) gain:
    0.04 + 0.3 x median probability - 0.01 x token count. The small model is better where it is confident, and the
    large model gains most there too, so 'low confidence -> escalate' does worse than random."""
    rng = random.Random(seed)
    runs, small, large, gains = [], [], [], []
    for _ in range(count):
        level = rng.random()
        run = [math.log(min(0.999, max(0.001, level + rng.gauss(0, 0.1)))) for _ in range(rng.randrange(4, 20))]
        features = run_features(run, "answer")
        assert features is not None
        gain = 0.04 + 0.3 * features["answer_p50"] - 0.01 * features["answer_tokens"]
        quality = 0.2 + 0.4 * level + rng.gauss(0, 0.02)
        runs.append(run)
        small.append(quality)
        large.append(quality + gain + rng.gauss(0, 0.02))
        gains.append(gain)
    return runs, small, large, gains


def test_learned_router_recovers_a_known_linear_gain_and_beats_the_threshold_router() -> None:
    runs, small, large, gains = _synthetic(2000, seed=1)
    rows = [run_features(run, "answer") for run in runs]
    parts = split(len(runs), 0.5, seed=0)
    pick = lambda values, idx: [values[i] for i in idx]  # noqa: E731
    router, penalty = fit_gain_router(pick(rows, parts.fit), pick(small, parts.fit), pick(large, parts.fit),
                                      MODE_FEATURES["generate"])
    assert penalty in (0.01, 0.1, 1.0, 10.0)  # little noise: cross-validation keeps the penalty small

    # The predicted gain (in standard deviations of the fit gains) is a linear function of the true one.
    held_rows, held_gains = pick(rows, parts.held_out), pick(gains, parts.held_out)
    predicted = [router.predicted_gain(row) for row in held_rows]
    assert np.corrcoef(predicted, held_gains)[0, 1] > 0.97
    # ... in gain units, the true gain itself, with the true slope on the token count (a feature apart from the
    # probabilities; the quantiles are collinear and share the median's slope between them).
    fit_gains = np.array(pick(large, parts.fit)) - np.array(pick(small, parts.fit))
    in_units = np.array(predicted) * float(fit_gains.std()) + float(fit_gains.mean())
    assert float(np.abs(in_units - np.array(held_gains)).mean()) < 0.01
    tokens_slope = router.weights["answer_tokens"] / router.scales["answer_tokens"] * float(fit_gains.std())
    assert tokens_slope == pytest.approx(-0.01, abs=0.002)

    hs, hl = pick(small, parts.held_out), pick(large, parts.held_out)
    weak, strong = sum(hs) / len(hs), sum(hl) / len(hl)
    learned = apgr(router_curve([router.score_features(row) for row in held_rows], hs, hl), weak, strong)
    threshold = apgr(router_curve([math.exp(min(run)) for run in pick(runs, parts.held_out)], hs, hl), weak, strong)
    assert threshold < 0.5 < learned
    assert learned > threshold + 0.2


def test_choose_penalty_prefers_a_large_penalty_on_noise() -> None:
    rng = np.random.default_rng(0)
    features, target = rng.normal(size=(200, 6)), rng.normal(size=200)
    assert choose_penalty(features, target) >= 100.0
    informative = features @ np.array([1.0, -0.5, 0, 0, 0, 0]) + 0.01 * rng.normal(size=200)
    assert choose_penalty(features, informative) <= 1.0


def _sample(run: list[float], small: float, large: float) -> Sample:
    answer = lambda quality: REFERENCE[: round(10 * quality)] + "#"  # noqa: E731
    return Sample("p", REFERENCE, answer_logprobs=run, small_answer=answer(small), large_answer=answer(large))


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_learned_calibration_holds_its_target_on_held_out_prompts(target: float) -> None:
    runs, small, large, _ = _synthetic(2000, seed=2)
    samples = [_sample(run, min(1.0, max(0.0, s)), min(1.0, max(0.0, q))) for run, s, q in zip(runs, small, large)]
    cascade = CascadeConfig(model="auto", small="edge", large="cloud", threshold=0.5)
    by_cost = fit(samples, cascade, target, None, held_out_fraction=0.5, router="learned")
    assert by_cost.router is not None and by_cost.penalty is not None
    assert abs(by_cost.held_out_large_fraction - target) <= HELD_OUT_TOLERANCE
    by_quality = fit(samples, cascade, None, 0.9 + target / 10, held_out_fraction=0.5, router="learned")
    assert by_quality.held_out_quality_ratio >= 0.9 + target / 10 - HELD_OUT_TOLERANCE
    assert by_quality.held_out_large_fraction < 1.0

    # The table calibrate writes is a valid cascade that routes as the fitted router does.
    table = tomllib.loads(snippet(cascade, by_cost.threshold, by_cost.router))["cascade"][0]
    written = parse_fleet(_fleet(**table)).cascade[0]
    assert written.router == "learned" and written.threshold == pytest.approx(by_cost.threshold, abs=1e-6)
    restored = written.learned_router()
    assert restored is not None
    for run in runs[:50]:
        assert restored.score(run, "answer") == pytest.approx(by_cost.router.score(run, "answer"), rel=1e-6)


def _fleet(**cascade: object) -> dict:
    table = {"model": "auto", "small": "edge", "large": "cloud", "threshold": 0.5} | cascade
    return {"backend": [{"name": "e", "url": "http://127.0.0.1:1", "model": "edge"},
                        {"name": "c", "url": "http://127.0.0.1:2", "model": "cloud"}], "cascade": [table]}


LEARNED = {"router": "learned", "weights": {"answer_p50": 1.0}, "feature_means": {"answer_p50": 0.5},
           "feature_scales": {"answer_p50": 0.1}}


@pytest.mark.parametrize(("change", "message"), [
    ({"router": "learned"}, 'router = "learned" needs weights = {feature = weight, ...}'),
    (LEARNED | {"weights": {"answer_bogus": 1.0}}, "weights: unknown feature answer_bogus for mode generate; "
                                                    "expected some of answer_mean_logprob"),
    (LEARNED | {"mode": "prompt"}, "weights: unknown feature answer_p50 for mode prompt; expected some of "
                                   "prompt_mean_logprob"),
    (LEARNED | {"feature_scales": {}}, "feature_scales: missing answer_p50"),
    (LEARNED | {"feature_scales": {"answer_p50": 0.0}}, "feature_scales: answer_p50 must be > 0"),
    ({"weights": {"answer_p50": 1.0}}, 'weights: only for router = "learned"'),
    ({"router": "learnt"}, "router: Input should be 'threshold' or 'learned'"),
])
def test_fleet_rejects_a_bad_learned_router(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_fleet(_fleet(**change), "FLEET.toml")
    assert str(error.value).startswith("FLEET.toml: cascade[0] (auto)") and message in str(error.value)


@pytest.fixture
def pools() -> Iterator[tuple[FakeBackend, FakeBackend]]:
    small, large = FakeBackend().start(), FakeBackend().start()
    small.behaviour.word = "s"
    try:
        yield small, large
    finally:
        small.stop()
        large.stop()


def _gateway_fleet(small: FakeBackend, large: FakeBackend, *cascades: dict) -> dict:
    return {"gateway": {"health_interval_s": 60, "max_retries": 0},
            "backend": [{"name": "edge-0", "url": small.url, "model": "edge"},
                        {"name": "cloud-0", "url": large.url, "model": "cloud"}],
            "cascade": [{"small": "edge", "large": "cloud", "threshold": 0.5} | table for table in cascades]}


def test_gateway_routes_by_the_learned_router(pools: tuple[FakeBackend, FakeBackend]) -> None:
    small, large = pools
    small.behaviour.probability = lambda text: 0.9 if "easy" in text else 0.1
    # Generate mode: this router predicts the large model gains most where the small one is confident (the
    # threshold router would keep those); prompt mode: where the prompt is long.
    fleet = _gateway_fleet(small, large, {"model": "auto"} | LEARNED, {
        "model": "auto-prompt", "mode": "prompt", "router": "learned", "weights": {"prompt_tokens": 1.0},
        "feature_means": {"prompt_tokens": 3.0}, "feature_scales": {"prompt_tokens": 1.0}})
    with gateway_in_thread(parse_fleet(fleet)) as (url, _), httpx.Client() as client:
        def ask(model: str, prompt: str) -> httpx.Response:
            return client.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 3})

        easy, hard = ask("auto", "an easy one"), ask("auto", "a hard one")
        assert easy.headers["x-aiinfra-cascade"] == "large" and easy.headers["x-aiinfra-cascade-reason"] == \
            "unconfident"
        assert float(easy.headers["x-aiinfra-cascade-score"]) == pytest.approx(1 / (1 + math.exp(4)), abs=1e-6)
        assert easy.json()["choices"][0]["text"] == "w0 w1 w2 "
        assert hard.headers["x-aiinfra-cascade"] == "small" and hard.json()["choices"][0]["text"] == "s0 s1 s2 "
        assert float(hard.headers["x-aiinfra-cascade-score"]) == pytest.approx(1 / (1 + math.exp(-4)), abs=1e-6)

        short, long = ask("auto-prompt", "two words"), ask("auto-prompt", "a prompt of seven words in all")
        assert short.headers["x-aiinfra-cascade"] == "small"  # 1 scored token (the first has no logprob): gain -2
        assert long.headers["x-aiinfra-cascade"] == "large"  # 6 scored tokens: gain +3
        assert float(long.headers["x-aiinfra-cascade-score"]) == pytest.approx(1 / (1 + math.exp(3)), abs=1e-6)


def _level(text: str) -> float:
    return 0.02 + 0.96 * (zlib.crc32(text.encode()) % 10_000) / 10_000


def test_calibrate_command_fits_a_learned_router_the_gateway_then_uses(pools: tuple[FakeBackend, FakeBackend],
                                                                       tmp_path: Path) -> None:
    small, large = pools
    small.behaviour.probability = _level
    fleet = tmp_path / "FLEET.toml"
    tree = _gateway_fleet(small, large, {"model": "auto"})
    lines = ["[gateway]", "health_interval_s = 60"]
    for backend in tree["backend"]:
        lines += ["[[backend]]", *(f"{key} = {json.dumps(value)}" for key, value in backend.items())]
    lines += ["[[cascade]]", *(f"{key} = {json.dumps(value)}" for key, value in tree["cascade"][0].items())]
    fleet.write_text("\n".join(lines) + "\n")
    # The large model ("w0 w1") is right where the small one is confident, the small ("s0 s1") elsewhere.
    prompts = [f"calibration prompt {i}" for i in range(160)]
    records = [{"prompt": p, "reference": "w0 w1 " if _level(p) > 0.6 else "s0 s1 "} for p in prompts]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    output = tmp_path / "cascade.toml"
    result = CliRunner().invoke(app, ["route", "calibrate", str(fleet), "--prompts", str(tmp_path / "prompts.jsonl"),
                                      "--target-large-fraction", "0.4", "--router", "learned", "--max-tokens", "2",
                                      "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "learned router (ridge penalty" in result.output
    table = tomllib.loads(output.read_text())["cascade"][0]
    assert table["router"] == "learned" and table["weights"]["answer_p50"] > 0
    with gateway_in_thread(parse_fleet(_gateway_fleet(small, large, table))) as (url, _), httpx.Client() as client:
        new = [f"new prompt {i}" for i in range(60)]
        pools_used = [client.post(f"{url}/v1/completions", json={"model": "auto", "prompt": p, "max_tokens": 2})
                      .headers["x-aiinfra-cascade"] for p in new]
    right = sum((pool == "large") == (_level(p) > 0.6) for p, pool in zip(new, pools_used))
    assert right / len(new) >= 0.9

    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    missing = CliRunner().invoke(app, ["route", "calibrate", str(fleet), "--prompts", str(unlabelled),
                                       "--target-large-fraction", "0.4", "--router", "learned"])
    assert missing.exit_code == 2 and 'a learned router needs a "reference"' in missing.output
