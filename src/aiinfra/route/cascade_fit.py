"""Fitting a cascade's threshold to a target, and measuring a router, as pure functions over per-prompt figures:
each prompt's score (higher: the small model is more likely right), and, where known, the small and the large
model's quality on it.

The measures are RouteLLM's (Ong et al. 2024): the quality-cost curve (mean quality against the fraction of
requests sent to the large model), PGR (the performance gap recovered, (quality - small) / (large - small)), APGR
(the area under PGR over the large fraction from 0 to 1: random routing scores 0.5) and the large fraction needed
for a quality target. Between two thresholds the curve is linear: a router that picks either at random gets any
point on the segment.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aiinfra.route.cascade import LearnedRouter

Point = tuple[float, float]  # (fraction of requests sent to the large model, mean quality)


def _check(scores: Sequence[float], *others: Sequence[float]) -> None:
    if not scores:
        raise ValueError("no prompts to fit on")
    for other in others:
        if len(other) != len(scores):
            raise ValueError(f"{len(scores)} scores but {len(other)} quality labels")


def large_fraction(scores: Sequence[float], threshold: float) -> float:
    """The share of prompts whose score is below the threshold (sent to the large model)."""
    _check(scores)
    return sum(score < threshold for score in scores) / len(scores)


def routed_quality(scores: Sequence[float], small: Sequence[float], large: Sequence[float], threshold: float) -> float:
    """Mean quality when each prompt is answered by the model the threshold picks."""
    _check(scores, small, large)
    return sum(lq if score < threshold else sq for score, sq, lq in zip(scores, small, large)) / len(scores)


def _thresholds(scores: Sequence[float]) -> list[float]:
    """Every threshold that routes differently, from 'all small' to 'all large' (a score keeps small when >= it)."""
    ordered = sorted(set(scores))
    return [ordered[0], *ordered[1:], math.inf]


def _between(ordered: list[float], index: int) -> float:
    """A threshold that routes as candidate `index` of `_thresholds` does, mid-way between neighbouring scores
    (new prompts near either side then split evenly): 0 for all-small, just above the highest score for all-large
    (1 when that score is 1)."""
    if index == 0:
        return 0.0
    if index >= len(ordered):
        return min(1.0, (ordered[-1] + 1.0) / 2) if ordered[-1] < 1.0 else 1.0
    return (ordered[index - 1] + ordered[index]) / 2


def threshold_for_large_fraction(scores: Sequence[float], target: float) -> float:
    """The threshold whose large fraction on these scores is closest to `target` (ties: the fewer large calls)."""
    _check(scores)
    if not 0 <= target <= 1:
        raise ValueError(f"target large fraction {target}: expected a value in [0, 1]")
    candidates = _thresholds(scores)
    best = min(range(len(candidates)), key=lambda i: (abs(large_fraction(scores, candidates[i]) - target), i))
    return _between(sorted(set(scores)), best)


def threshold_for_quality(scores: Sequence[float], small: Sequence[float], large: Sequence[float],
                          target_ratio: float) -> float:
    """The lowest threshold (the fewest large calls) whose routed quality reaches `target_ratio` x the large
    model's mean quality on these prompts; the all-large threshold when none does."""
    _check(scores, small, large)
    if not 0 < target_ratio <= 1:
        raise ValueError(f"target quality {target_ratio}: expected a fraction of the large model's quality in (0, 1]")
    goal = target_ratio * sum(large) / len(large)
    candidates = _thresholds(scores)
    index = next((i for i, candidate in enumerate(candidates)
                  if routed_quality(scores, small, large, candidate) >= goal - 1e-12), len(candidates) - 1)
    return _between(sorted(set(scores)), index)


def router_curve(scores: Sequence[float], small: Sequence[float], large: Sequence[float]) -> list[Point]:
    """(large fraction, mean quality) at every threshold, from all-small to all-large: the least confident prompts
    go to the large model first, prompts of equal score together."""
    _check(scores, small, large)
    n = len(scores)
    order = sorted(range(n), key=scores.__getitem__)
    total = float(sum(small))
    points = [(0.0, total / n)]
    start = 0
    while start < n:
        end = start
        while end < n and scores[order[end]] == scores[order[start]]:
            total += large[order[end]] - small[order[end]]
            end += 1
        points.append((end / n, total / n))
        start = end
    return points


def oracle_curve(small: Sequence[float], large: Sequence[float]) -> list[Point]:
    """The best any router could do: the large model for the prompts where it gains most first, never where it
    gains nothing (its quality then stays flat as more calls are allowed)."""
    _check(small, large)
    n = len(small)
    gains = sorted((lq - sq for sq, lq in zip(small, large)), reverse=True)
    quality, points = sum(small) / n, [(0.0, sum(small) / n)]
    for k, gain in enumerate(gains, start=1):
        quality += max(gain, 0.0) / n
        points.append((k / n, quality))
    return points


def random_curve(small: Sequence[float], large: Sequence[float]) -> list[Point]:
    """Random routing at every cost: a straight line from the small model's quality to the large model's."""
    _check(small, large)
    return [(0.0, sum(small) / len(small)), (1.0, sum(large) / len(large))]


def quality_at(curve: Sequence[Point], fraction: float) -> float:
    """The curve's quality at a large fraction (linear between its points; their upper envelope where one
    fraction has several)."""
    points = _envelope(curve)
    for (f0, q0), (f1, q1) in zip(points, points[1:]):
        if f0 <= fraction <= f1:
            return q0 if f1 == f0 else q0 + (q1 - q0) * (fraction - f0) / (f1 - f0)
    return points[-1][1] if fraction >= points[-1][0] else points[0][1]


def _envelope(curve: Sequence[Point]) -> list[Point]:
    best: dict[float, float] = {}
    for fraction, quality in curve:
        best[fraction] = max(quality, best.get(fraction, -math.inf))
    return sorted(best.items())


def apgr(curve: Sequence[Point], small_quality: float, large_quality: float) -> float:
    """The area under the performance gap recovered over the large fraction 0..1 (trapezoids between the curve's
    points): 0.5 for random routing, 1 for a router that recovers the whole gap with no large call."""
    gap = large_quality - small_quality
    if gap <= 0:
        raise ValueError(f"the large model ({large_quality:.4f}) is not better than the small ({small_quality:.4f}): "
                         "no gap to recover")
    points = _envelope(curve)
    if points[0][0] > 0 or points[-1][0] < 1:
        raise ValueError("the curve must span large fractions 0 to 1")
    area = 0.0
    for (f0, q0), (f1, q1) in zip(points, points[1:]):
        area += (f1 - f0) * ((q0 + q1) / 2 - small_quality) / gap
    return area


def fraction_for_quality(curve: Sequence[Point], goal: float) -> float | None:
    """The least large fraction at which the curve reaches `goal` (linear between points); None if it never does."""
    points = _envelope(curve)
    if points[0][1] >= goal:
        return points[0][0]
    for (f0, q0), (f1, q1) in zip(points, points[1:]):
        if q1 >= goal > q0:
            return f0 + (f1 - f0) * (goal - q0) / (q1 - q0)
    return None


@dataclass(frozen=True)
class Split:
    """Prompt indices to fit on and to report on."""

    fit: list[int]
    held_out: list[int]


def split(count: int, held_out_fraction: float = 0.5, seed: int = 0) -> Split:
    """A seeded random split of `count` prompts; both parts non-empty."""
    if count < 2:
        raise ValueError(f"{count} prompt(s): at least 2 are needed to fit on some and report on others")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    cut = min(count - 1, max(1, round(count * (1 - held_out_fraction))))
    return Split(sorted(order[:cut]), sorted(order[cut:]))


PENALTIES = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def fit_ridge(features: np.ndarray, target: np.ndarray, penalty: float) -> tuple[np.ndarray, float]:
    """Ridge regression of `target` on standardised `features` (rows = prompts) with an unpenalised intercept:
    (weights, bias)."""
    bias = float(target.mean())
    gram = features.T @ features + penalty * np.eye(features.shape[1])
    return np.linalg.solve(gram, features.T @ (target - bias)), bias


def choose_penalty(features: np.ndarray, target: np.ndarray, penalties: Sequence[float] = PENALTIES, folds: int = 5,
                   seed: int = 0) -> float:
    """The ridge penalty of least mean squared error over `folds`-fold cross-validation (ties: the larger)."""
    order = np.random.default_rng(seed).permutation(len(target))
    parts = [part for part in np.array_split(order, min(folds, len(target))) if len(part)]
    errors = {}
    for penalty in penalties:
        squared = 0.0
        for part in parts:
            train = np.setdiff1d(order, part)
            weights, bias = fit_ridge(features[train], target[train], penalty)
            squared += float(((features[part] @ weights + bias - target[part]) ** 2).sum())
        errors[penalty] = squared / len(target)
    return min(errors, key=lambda penalty: (errors[penalty], -penalty))


def standardise(rows: Sequence[dict[str, float]], names: Sequence[str]) -> tuple[np.ndarray, dict, dict]:
    """The rows' features as a matrix of z-scores, with each feature's mean and scale (a constant feature gets scale
    1: it then adds nothing)."""
    matrix = np.array([[row[name] for name in names] for row in rows], dtype=np.float64)
    means, scales = matrix.mean(axis=0), matrix.std(axis=0)
    scales = np.where(scales > 1e-12, scales, 1.0)
    return ((matrix - means) / scales, {n: float(m) for n, m in zip(names, means)},
            {n: float(s) for n, s in zip(names, scales)})


def fit_gain_router(rows: Sequence[dict[str, float]], small: Sequence[float], large: Sequence[float],
                    names: Sequence[str], penalty: float | None = None, seed: int = 0) -> tuple[LearnedRouter, float]:
    """A learned router fitted on labelled prompts: ridge regression of the standardised gain (large - small
    quality) on the standardised features `names` of each prompt's row; the penalty by cross-validation on these
    rows unless given. Returns the router and its penalty."""
    _check(rows, small, large)
    if len(rows) < 4:
        raise ValueError(f"{len(rows)} labelled prompts: a learned router needs at least 4")
    gains = np.array(large, dtype=np.float64) - np.array(small, dtype=np.float64)
    spread = float(gains.std())
    if spread <= 1e-12:
        raise ValueError("the large model's gain is the same on every prompt: there is nothing to learn")
    target = (gains - gains.mean()) / spread
    features, means, scales = standardise(rows, names)
    chosen = choose_penalty(features, target, seed=seed) if penalty is None else penalty
    weights, bias = fit_ridge(features, target, chosen)
    return LearnedRouter({n: float(w) for n, w in zip(names, weights)}, bias, means, scales), chosen


def out_of_fold_scores(rows: Sequence[dict[str, float]], small: Sequence[float], large: Sequence[float],
                       names: Sequence[str], folds: int = 5, seed: int = 0) -> list[float]:
    """Each row's learned score by a router fitted (its penalty chosen inside) on the other folds: an honest
    estimate, from the fit prompts alone, of how the learned router does on prompts it has not seen."""
    _check(rows, small, large)
    order = np.random.default_rng(seed + 1).permutation(len(rows))
    scores = [0.0] * len(rows)
    for part in np.array_split(order, min(folds, len(rows))):
        keep = [int(i) for i in np.setdiff1d(order, part)]
        router, _ = fit_gain_router([rows[i] for i in keep], [small[i] for i in keep], [large[i] for i in keep],
                                    names, seed=seed)
        for i in part:
            scores[int(i)] = router.score_features(rows[int(i)])
    return scores
