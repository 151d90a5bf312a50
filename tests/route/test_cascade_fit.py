"""Calibrating a cascade's threshold: fitted on some prompts, the target holds on held-out ones (within a stated
tolerance); and the router measures (curves, APGR, the fraction for a quality goal) against cases known by hand."""

from __future__ import annotations

import random

import pytest

from aiinfra.route.calibrate import Sample, fit, prefix_match
from aiinfra.route.cascade_fit import (
    apgr,
    fraction_for_quality,
    large_fraction,
    oracle_curve,
    quality_at,
    random_curve,
    routed_quality,
    router_curve,
    split,
    threshold_for_large_fraction,
    threshold_for_quality,
)
from aiinfra.route.fleet import CascadeConfig

# 1,000 held-out prompts: the large fraction of a fixed threshold has a standard error of at most 0.016 there,
# and the fit's own sampling error about as much again; 0.05 is three of those combined.
HELD_OUT_TOLERANCE = 0.05


def synthetic(count: int, seed: int) -> tuple[list[float], list[float], list[float]]:
    """Scores that predict the small model's quality (with noise); the large model is better on average."""
    rng = random.Random(seed)
    scores, small, large = [], [], []
    for _ in range(count):
        difficulty = rng.random()
        scores.append(min(1.0, max(0.0, 1 - difficulty + rng.gauss(0, 0.15))))
        small.append(1.0 if rng.random() > difficulty else 0.0)
        large.append(1.0 if rng.random() > difficulty * 0.4 else 0.0)
    return scores, small, large


@pytest.mark.parametrize("target", [0.05, 0.1, 0.3, 0.5, 0.7, 0.9])
def test_large_fraction_target_holds_on_held_out_prompts(target: float) -> None:
    scores, _, _ = synthetic(2000, seed=int(target * 100))
    parts = split(len(scores), 0.5, seed=1)
    threshold = threshold_for_large_fraction([scores[i] for i in parts.fit], target)
    assert large_fraction([scores[i] for i in parts.fit], threshold) == pytest.approx(target, abs=0.002)
    held_out = large_fraction([scores[i] for i in parts.held_out], threshold)
    assert abs(held_out - target) <= HELD_OUT_TOLERANCE, (target, held_out)


@pytest.mark.parametrize("target", [0.85, 0.9, 0.95])
def test_quality_target_holds_on_held_out_prompts(target: float) -> None:
    scores, small, large = synthetic(2000, seed=7)
    parts = split(len(scores), 0.5, seed=2)
    pick = lambda values, part: [values[i] for i in part]  # noqa: E731
    threshold = threshold_for_quality(pick(scores, parts.fit), pick(small, parts.fit), pick(large, parts.fit), target)
    held = [pick(values, parts.held_out) for values in (scores, small, large)]
    ratio = routed_quality(*held, threshold) / (sum(held[2]) / len(held[2]))
    assert ratio >= target - HELD_OUT_TOLERANCE, (target, ratio)
    # The cheapest such threshold: a little lower and the fit's quality falls short.
    fit_scores = sorted(set(pick(scores, parts.fit)))
    lower = max([s for s in fit_scores if s < threshold], default=None)
    if lower is not None:
        fit_ratio = routed_quality(pick(scores, parts.fit), pick(small, parts.fit), pick(large, parts.fit), lower) / (
            sum(pick(large, parts.fit)) / len(parts.fit))
        assert fit_ratio < target


def test_thresholds_at_the_ends() -> None:
    scores = [0.2, 0.4, 0.4, 0.8]
    assert threshold_for_large_fraction(scores, 0.0) == 0.0  # everything stays small
    assert large_fraction(scores, threshold_for_large_fraction(scores, 1.0)) == 1.0
    assert large_fraction(scores, threshold_for_large_fraction(scores, 0.5)) == 0.75 or \
        large_fraction(scores, threshold_for_large_fraction(scores, 0.5)) == 0.25  # ties: 0.5 is not reachable
    assert threshold_for_quality(scores, [1, 1, 1, 1], [1, 1, 1, 1], 0.95) == 0.0  # small suffices
    assert large_fraction(scores, threshold_for_quality(scores, [0, 0, 0, 0], [1, 1, 1, 1], 0.95)) == 1.0
    with pytest.raises(ValueError):
        threshold_for_large_fraction(scores, 1.5)
    with pytest.raises(ValueError):
        threshold_for_quality(scores, [0, 0, 0], [1, 1, 1, 1], 0.9)


def test_random_routing_has_apgr_one_half_and_the_oracle_bounds_a_router() -> None:
    scores, small, large = synthetic(500, seed=3)
    weak, strong = sum(small) / len(small), sum(large) / len(large)
    assert apgr(random_curve(small, large), weak, strong) == pytest.approx(0.5)
    router = apgr(router_curve(scores, small, large), weak, strong)
    oracle = apgr(oracle_curve(small, large), weak, strong)
    assert 0.5 < router < oracle  # scores that predict quality beat random; nothing beats the oracle
    # A router whose score orders prompts by the large model's gain is the oracle while there is gain to take.
    perfect = router_curve([sq - lq for sq, lq in zip(small, large)], small, large)
    gaining = sum(lq > sq for sq, lq in zip(small, large)) / len(small)
    for fraction in (0.0, gaining / 3, gaining):
        assert quality_at(perfect, fraction) == pytest.approx(quality_at(oracle_curve(small, large), fraction))


def test_curves_and_the_fraction_for_a_quality_goal_by_hand() -> None:
    small, large = [0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]
    assert oracle_curve(small, large) == [(0.0, 0.5), (0.25, 0.75), (0.5, 1.0), (0.75, 1.0), (1.0, 1.0)]
    curve = router_curve([0.1, 0.9, 0.2, 0.8], small, large)
    assert curve[0] == (0.0, 0.5) and curve[-1] == (1.0, 0.75)
    assert quality_at(curve, 0.5) == 1.0
    assert fraction_for_quality(curve, 0.75) == pytest.approx(0.25)
    assert fraction_for_quality(random_curve(small, large), 0.7) == pytest.approx(0.8)
    assert fraction_for_quality(random_curve(small, large), 0.9) is None
    with pytest.raises(ValueError, match="no gap"):
        apgr(curve, 0.75, 0.5)


def test_fit_reports_the_held_out_part() -> None:
    rng = random.Random(4)
    samples = []
    for index in range(400):
        p = rng.random()
        # Confident answers are right (they reproduce the reference); the large model always is.
        samples.append(Sample(f"p{index}", "abcd", answer_logprobs=[-0.01, -(1 - p) * 5],
                              small_answer="abcd" if p > 0.5 else "abxx", large_answer="abcd"))
    cascade = CascadeConfig(model="auto", small="s", large="l", threshold=0.5, quantile=0.0)
    by_cost = fit(samples, cascade, target_large_fraction=0.4, target_quality=None, held_out_fraction=0.5)
    assert by_cost.fit_count == by_cost.held_out_count == 200
    assert abs(by_cost.held_out_large_fraction - 0.4) <= 0.1
    by_quality = fit(samples, cascade, target_large_fraction=None, target_quality=0.95, held_out_fraction=0.5)
    assert by_quality.fit_quality_ratio >= 0.95 and by_quality.held_out_quality_ratio >= 0.95 - HELD_OUT_TOLERANCE
    assert 0.3 < by_quality.held_out_large_fraction < 0.7


def test_prefix_match() -> None:
    assert prefix_match("def foo(", "def bar(") == pytest.approx(4 / 8)
    assert prefix_match("x", "") == 1.0
    assert prefix_match("", "abc") == 0.0
    assert prefix_match("abcdef", "abc") == 1.0
