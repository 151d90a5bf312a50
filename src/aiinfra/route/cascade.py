"""The cascade's judgement, as pure functions: a confidence score from a model's own per-token log-probabilities,
and the decision it implies (the small model's answer, or the large model).

The score is a probability in [0, 1]. By default it is a low quantile of the per-token probabilities (Gupta et al.,
"Language Model Cascades: Token-level Uncertainty and Beyond", ICLR 2024): a summed log-probability falls with every
token and a mean one hides a single wild guess among confident ones, while the q-th quantile asks how likely the
least likely tokens were, whatever the length. `mean` (exp of the mean log-probability, one over the perplexity)
is the usual alternative, for the prompt mode's whole-prompt likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Decision = Literal["small", "large"]


def quantile(values: Sequence[float], q: float) -> float:
    """The q-th quantile of `values` with linear interpolation (numpy's default), q in [0, 1]."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def confidence(logprobs: Sequence[float], statistic: str = "quantile", q: float = 0.1) -> float:
    """The score of a run of tokens from their log-probabilities: the q-th quantile of the probabilities, or their
    geometric mean. No tokens score 0 (nothing vouches for the answer, so it escalates)."""
    finite = [lp for lp in logprobs if lp is not None and not math.isnan(lp)]
    if not finite:
        return 0.0
    if statistic == "mean":
        return math.exp(sum(finite) / len(finite))
    if statistic != "quantile":
        raise ValueError(f"statistic {statistic!r}: expected quantile or mean")
    return quantile([math.exp(lp) for lp in finite], q)


def decide(score: float | None, threshold: float) -> Decision:
    """small when the score clears the threshold; large otherwise (and when there is no score, or it is NaN)."""
    if score is None or math.isnan(score):
        return "large"
    return "small" if score >= threshold else "large"


def answer_logprobs(payload: dict[str, Any], chat: bool, echo: bool = False) -> list[list[float]]:
    """The generated tokens' log-probabilities of each choice of a non-streamed answer (OpenAI's two formats:
    completions' `logprobs.token_logprobs`, chat's `logprobs.content[].logprob`; with `echo`, the entries after the
    prompt's); ValueError if absent."""
    if echo and not chat:
        choices = payload.get("choices") or []
        generated = int((payload.get("usage") or {}).get("completion_tokens") or 0) // max(len(choices), 1)
        return [run[len(run) - generated:] if generated else [] for run in prompt_logprobs(payload, generated_too=True)]
    runs = []
    for choice in sorted(payload.get("choices") or [], key=lambda c: c.get("index", 0)):
        block = choice.get("logprobs")
        if not isinstance(block, dict):
            raise ValueError("the answer carries no logprobs (does the small pool's server support them?)")
        if chat:
            runs.append([float(entry["logprob"]) for entry in block.get("content") or []])
        else:
            runs.append([float(lp) for lp in block.get("token_logprobs") or [] if lp is not None])
    if not runs:
        raise ValueError("the answer has no choices")
    return runs


def prompt_logprobs(payload: dict[str, Any], generated_too: bool = False) -> list[list[float]]:
    """Each prompt's token log-probabilities from a completions answer with `echo` and `logprobs`: the echoed
    entries before the generated ones (the first is null, nothing predicts it), or every entry with
    `generated_too`; ValueError if absent."""
    choices = sorted(payload.get("choices") or [], key=lambda c: c.get("index", 0))
    if not choices:
        raise ValueError("the scoring answer has no choices")
    generated = int((payload.get("usage") or {}).get("completion_tokens") or 0)
    per_choice = generated // len(choices)  # usage counts every choice's tokens; each prompt generated as many
    runs = []
    for choice in choices:
        block = choice.get("logprobs")
        if not isinstance(block, dict) or not isinstance(block.get("token_logprobs"), list):
            raise ValueError("the scoring answer carries no logprobs (does the small pool's server support echo?)")
        entries = block["token_logprobs"]
        prompt = entries[: len(entries) - per_choice] if per_choice and not generated_too else entries
        runs.append([float(lp) for lp in prompt if lp is not None])
    return runs


def score_runs(runs: list[list[float]], statistic: str, q: float, router: LearnedRouter | None = None,
               prefix: str = "answer") -> float:
    """One score for a request of several choices or prompts: the least confident one's (one weak run escalates);
    with a learned `router`, its score from the runs' features named `prefix`_..."""
    if router is not None:
        return min(router.score(run, prefix) for run in runs)
    return min(confidence(run, statistic, q) for run in runs)


# The learned router (RouteLLM's learned routers, Hybrid LLM's query router): instead of assuming that low confidence
# means the large model will gain, a linear model fitted on labelled prompts predicts the gain of escalating from
# these features of the small model's token log-probabilities, and the prompts with the highest predicted gain go to
# the large model. Generate mode sees its answer's tokens, prompt mode the prompt's (one prefill-only request).
RUN_FEATURES = ("mean_logprob", "std_logprob", "min", "p10", "p50", "p90", "tokens")
MODE_FEATURES = {"generate": tuple(f"answer_{name}" for name in RUN_FEATURES),
                 "prompt": tuple(f"prompt_{name}" for name in RUN_FEATURES)}


def run_features(logprobs: Sequence[float], prefix: str) -> dict[str, float] | None:
    """The features of one run of tokens (`prefix` + a name of RUN_FEATURES): the mean and standard deviation of
    the log-probabilities, the least and the 0.1/0.5/0.9 quantiles of the probabilities, the token count; None for
    no tokens."""
    finite = [lp for lp in logprobs if lp is not None and not math.isnan(lp)]
    if not finite:
        return None
    mean = sum(finite) / len(finite)
    probabilities = [math.exp(lp) for lp in finite]
    values = {"mean_logprob": mean, "std_logprob": math.sqrt(sum((lp - mean) ** 2 for lp in finite) / len(finite)),
              "min": min(probabilities), "p10": quantile(probabilities, 0.1), "p50": quantile(probabilities, 0.5),
              "p90": quantile(probabilities, 0.9), "tokens": float(len(finite))}
    return {f"{prefix}_{name}": value for name, value in values.items()}


@dataclass(frozen=True)
class LearnedRouter:
    """A fitted linear model of the large model's gain over the small one, in standard deviations of the gains it
    was fitted on: bias + sum of weight x (feature - mean) / scale."""

    weights: dict[str, float]
    bias: float
    means: dict[str, float]
    scales: dict[str, float]

    def predicted_gain(self, features: dict[str, float]) -> float:
        """The predicted gain of escalating (standardised); KeyError if a feature is missing."""
        return self.bias + sum(weight * (features[name] - self.means[name]) / self.scales[name]
                               for name, weight in self.weights.items())

    def score(self, logprobs: Sequence[float], prefix: str) -> float:
        """The router's confidence that the small model will do, in (0, 1): a logistic function of minus the
        predicted gain, so the cascade's threshold and decision work as for a confidence score (no tokens: 0)."""
        features = run_features(logprobs, prefix)
        return 0.0 if features is None else self.score_features(features)

    def score_features(self, features: dict[str, float]) -> float:
        """The score of a run from its features (see `score`)."""
        return 1.0 / (1.0 + math.exp(min(max(self.predicted_gain(features), -500.0), 500.0)))
