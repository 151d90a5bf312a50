"""The cascade's routing quality on text with a known answer: two models of ours served by `aiinfra serve`, a
labelled set from corpus files neither trained on, and each mode's quality-cost curve against random routing and
the oracle, with thresholds fitted on one half of the prompts and every figure reported on the other half.

Models: `aiinfra train` on the embedded stdlib corpus; large = the `tiny` preset (4.2M parameters, --large-steps),
small = `tiny` shrunk to 2 layers of width 128 (0.9M, --small-steps). The same corpus and vocabulary give both the
same cached tokenizer (checked: the two runs' tokenizer.json are identical). Trained runs are kept in --work-dir
and reused.

Labelled set: --prompts places in the validation documents of the corpus (whole files held out of training by a
hash of their name); each prompt is --context tokens of text, its truth the next --k tokens. Quality of an answer
(greedy, --k tokens) is `prefix_match`: the share of the truth's characters it reproduces exactly from the start.
Per prompt: small and large quality, mode (a) "generate" scores (quantiles / mean of the small answer's token
probabilities) and mode (b) "prompt" scores (the same statistics over the prompt's tokens, from one echo request).
Each mode's statistic is chosen by its APGR on the fit half; the figures are the held-out half's.

Two routers per mode: the threshold router (that statistic against a threshold: "low confidence -> escalate"), and
the learned router (route.cascade_fit.fit_gain_router: ridge regression of the large model's gain over the small
one on the mode's features of the small model's token log-probabilities, fitted on the fit half with its penalty
cross-validated there). The headline `apgr` is the router with the best APGR on the fit half (the learned router's
out of fold), reported on the held-out half; `cascade_beats_random` is whether that router's held-out 95% bootstrap
interval lies above 0.5.

Baselines in the same run: random routing at equal cost (the straight line from small to large quality; APGR 0.5)
and the oracle (the large model exactly where it gains most). APGR and the large fraction for 95% of the large
model's quality are RouteLLM's measures. Streaming: TTFT through `aiinfra route` of "auto" (mode a) against the
small model streamed directly through the same gateway, one request at a time.

    python bench/cascade.py [--prompts 400] [--k 12] [--large-steps 300] [--small-steps 150] [--extra-json F.json]

The last line is JSON; `--extra-json` files (JSON objects, e.g. from bench/distill.py and bench/edge.py) are merged
into it, and `run(args, extra)` does the same for a caller.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from aiinfra.data.corpus import is_validation, iter_documents
from aiinfra.data.tokenizer import decode, encode, load_tokenizer
from aiinfra.route.calibrate import Sample, collect
from aiinfra.route.cascade import MODE_FEATURES, LearnedRouter, confidence, decide, run_features
from aiinfra.route.cascade_fit import (
    apgr,
    fit_gain_router,
    fraction_for_quality,
    large_fraction,
    oracle_curve,
    out_of_fold_scores,
    quality_at,
    random_curve,
    routed_quality,
    router_curve,
    split,
    threshold_for_large_fraction,
    threshold_for_quality,
)
from aiinfra.route.fleet import load_fleet
from servers import free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent

STATISTICS = [("quantile", 0.0), ("quantile", 0.1), ("quantile", 0.25), ("quantile", 0.5), ("mean", 0.0)]
SMALL_SHAPE = ["model.n_layers=2", "model.dim=128", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=384"]


def train(run_dir: Path, steps: int, shape: list[str]) -> Path:
    """An `aiinfra train` run on the embedded corpus, reused when it has finished before."""
    if (run_dir / "model.safetensors").exists():
        return run_dir
    if run_dir.exists():
        raise SystemExit(f"{run_dir} holds an unfinished run: remove it or choose another --work-dir")
    sets = [f"run.dir={run_dir}", "run.progress=false", "checkpoint.every_steps=0", "train.eval_every=0",
            f"train.steps={steps}", *shape]
    print(f"training {run_dir.name} ({steps} steps) ...", flush=True)
    subprocess.run([sys.executable, "-m", "aiinfra", "train", "--nproc", "1", *(a for s in sets for a in ("--set", s))],
                   check=True, stdout=subprocess.DEVNULL)
    return run_dir


def labelled_set(tokenizer: Any, count: int, context: int, k: int, val_fraction: float, seed: int) -> list[dict]:
    """Prompts from the validation documents: `context` tokens of text, the truth the next `k` tokens."""
    rng = random.Random(seed)
    places = []
    for document in iter_documents("stdlib"):
        if not is_validation(document, val_fraction):
            continue
        ids = encode(tokenizer, document.text)
        if len(ids) < context + k + 1:
            continue
        span = context + k
        for start in range(rng.randrange(span), len(ids) - span, span * 2):  # windows apart, from a random offset
            places.append((ids[start: start + context], ids[start + context: start + span]))
    rng.shuffle(places)
    if len(places) < count:
        print(f"note: the validation documents give {len(places)} places, fewer than --prompts {count}")
    return [{"prompt": decode(tokenizer, prompt), "reference": decode(tokenizer, truth), "ids": prompt + truth}
            for prompt, truth in places[:count]]


async def teacher_forced(urls: dict[str, str], records: list[dict], k: int, concurrency: int = 4) -> dict[str, dict]:
    """Each model's quality on each prompt, given the true text so far (one echo request over prompt + truth):
    `match`, the share of the k truth tokens that are its top-1 prediction, and `likelihood`, the truth's geometric
    mean token probability."""
    gate = asyncio.Semaphore(concurrency)
    out: dict[str, dict[str, list[float]]] = {name: {"match": [], "likelihood": []} for name in urls}

    async def one(session: aiohttp.ClientSession, name: str, record: dict) -> tuple[float, float]:
        body = {"model": name, "prompt": record["ids"], "echo": True, "logprobs": 1, "max_tokens": 1,
                "temperature": 0.0}
        async with gate, session.post(f"{urls[name]}/v1/completions", json=body) as response:
            block = (await response.json())["choices"][0]["logprobs"]
        n = len(record["ids"])
        positions = range(n - k, n)  # the truth's tokens among the echoed ones (the last entry was generated)
        hits = [block["tokens"][i] == max(block["top_logprobs"][i], key=block["top_logprobs"][i].get)
                for i in positions]
        mean_logprob = sum(block["token_logprobs"][i] for i in positions) / k
        return sum(hits) / k, math.exp(mean_logprob)

    async with aiohttp.ClientSession() as session:
        for name in urls:
            results = await asyncio.gather(*(one(session, name, record) for record in records))
            out[name]["match"] = [match for match, _ in results]
            out[name]["likelihood"] = [likelihood for _, likelihood in results]
    return out


def start_server(run_dir: Path, name: str, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aiinfra", "serve", str(run_dir), "--port", str(port),
                             "--served-model-name", name, "--threads", "1", "--kv-cache-memory-mb", "64"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


CASCADES = {"generate": "auto", "prompt": "auto-prompt", "generate_learned": "auto-learned",
            "prompt_learned": "auto-prompt-learned"}  # each router's virtual model in the bench's FLEET.toml


def _inline(values: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name} = {value!r}" for name, value in values.items()) + "}"


def fleet_toml(small_url: str, large_url: str, thresholds: dict[str, float], statistic: dict[str, tuple],
               learned: dict[str, LearnedRouter] | None = None) -> str:
    """Two backends and a cascade per router: the threshold routers of each mode, and the learned ones if given."""
    lines = ["[gateway]", "health_interval_s = 5", "",
             "[[backend]]", 'name = "small-0"', f'url = "{small_url}"', 'model = "small"', "",
             "[[backend]]", 'name = "large-0"', f'url = "{large_url}"', 'model = "large"']
    for key, router in [("generate", None), ("prompt", None), *sorted((learned or {}).items())]:
        mode = key.removesuffix("_learned")
        lines += ["", "[[cascade]]", f'model = "{CASCADES[key]}"', 'small = "small"', 'large = "large"',
                  f'mode = "{mode}"', f"threshold = {thresholds[key]:.6f}"]
        if router is None:
            stat, q = statistic[mode]
            lines += [f'statistic = "{stat}"', f"quantile = {q}"]
        else:
            lines += ['router = "learned"', f"weights = {_inline(router.weights)}", f"bias = {router.bias!r}",
                      f"feature_means = {_inline(router.means)}", f"feature_scales = {_inline(router.scales)}"]
    return "\n".join(lines) + "\n"


def scores_of(samples: list[Sample], mode: str, stat: str, q: float) -> list[float]:
    return [confidence(s.answer_logprobs if mode == "generate" else s.prompt_logprobs, stat, q) for s in samples]


def _pick(values: list[float], idx: list[int]) -> list[float]:
    return [values[i] for i in idx]


def held_out_figures(scores: list[float], small: list[float], large: list[float], fit_idx: list[int],
                     held_idx: list[int]) -> dict[str, Any]:
    """A router's thresholds calibrated on the fit part (95% quality; a cost of 0.3), and its curve, APGR and what
    the thresholds give on the held-out part."""
    fs, fl, hs, hl = _pick(small, fit_idx), _pick(large, fit_idx), _pick(small, held_idx), _pick(large, held_idx)
    f_scores, h_scores = _pick(scores, fit_idx), _pick(scores, held_idx)
    weak, strong = sum(hs) / len(hs), sum(hl) / len(hl)
    curve = router_curve(h_scores, hs, hl)
    quality_threshold = threshold_for_quality(f_scores, fs, fl, 0.95)
    cost_threshold = threshold_for_large_fraction(f_scores, 0.3)
    return {
        "apgr": apgr(curve, weak, strong), "curve": curve, "scores": scores, "threshold_95": quality_threshold,
        "large_fraction_at_95pct_quality": large_fraction(h_scores, quality_threshold),
        "quality_ratio_at_95pct_target": routed_quality(h_scores, hs, hl, quality_threshold) / strong,
        "curve_large_fraction_at_95pct_quality": fraction_for_quality(curve, 0.95 * strong),
        "threshold_cost_0.3": cost_threshold,
        "large_fraction_at_cost_target_0.3": large_fraction(h_scores, cost_threshold),
    }


def evaluate(samples: list[Sample], small: list[float], large: list[float], fit_idx: list[int], held_idx: list[int],
             mode: str) -> dict[str, Any]:
    """The threshold router: the mode's statistic chosen on the fit part; its figures on the held-out."""
    fs, fl = _pick(small, fit_idx), _pick(large, fit_idx)
    weak_fit, strong_fit = sum(fs) / len(fs), sum(fl) / len(fl)
    by_stat = {}
    for stat, q in STATISTICS:
        scores = scores_of(samples, mode, stat, q)
        by_stat[(stat, q)] = (apgr(router_curve(_pick(scores, fit_idx), fs, fl), weak_fit, strong_fit), scores)
    (stat, q), (fit_apgr, scores) = max(by_stat.items(), key=lambda item: item[1][0])
    return {"router": "threshold", "statistic": stat, "quantile": q, "fit_apgr": fit_apgr,
            "apgr_by_statistic_fit": {f"{s}{'' if s == 'mean' else f'@{qq}'}": round(v[0], 4)
                                      for (s, qq), v in by_stat.items()},
            **held_out_figures(scores, small, large, fit_idx, held_idx)}


def evaluate_learned(samples: list[Sample], small: list[float], large: list[float], fit_idx: list[int],
                     held_idx: list[int], mode: str, seed: int) -> dict[str, Any]:
    """The learned router: fitted (ridge penalty by cross-validation) on the fit part only; its fit APGR is
    out-of-fold (each fit prompt scored by a router fitted on the other folds), comparable with the threshold
    routers' in-sample choice; its figures on the held-out."""
    prefix = "answer" if mode == "generate" else "prompt"
    rows = [run_features(s.answer_logprobs if mode == "generate" else s.prompt_logprobs, prefix) for s in samples]
    if any(row is None for row in rows):
        raise SystemExit(f"{mode}: a prompt has no tokens to describe")
    fit_rows, fs, fl = _pick(rows, fit_idx), _pick(small, fit_idx), _pick(large, fit_idx)
    router, penalty = fit_gain_router(fit_rows, fs, fl, MODE_FEATURES[mode], seed=seed)
    out_of_fold = out_of_fold_scores(fit_rows, fs, fl, MODE_FEATURES[mode], seed=seed)
    fit_apgr = apgr(router_curve(out_of_fold, fs, fl), sum(fs) / len(fs), sum(fl) / len(fl))
    scores = [router.score_features(row) for row in rows]
    return {"router": "learned", "learned": router, "penalty": penalty, "fit_apgr": fit_apgr,
            **held_out_figures(scores, small, large, fit_idx, held_idx)}


async def ttft_ms(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[float, str]:
    """Time to the first streamed text, and the pool that answered (x-aiinfra-cascade, or the model asked)."""
    started = time.perf_counter()
    async with session.post(f"{url}/v1/completions", json=body | {"stream": True}) as response:
        first = None
        async for line in response.content:
            if first is None and line.startswith(b"data: {") and b'"text":""' not in line.replace(b" ", b""):
                first = time.perf_counter()
        assert response.status == 200, response.status
        return 1000 * ((first or time.perf_counter()) - started), response.headers.get("x-aiinfra-cascade",
                                                                                         body["model"])


async def gateway_checks(url: str, held: list[Sample], k: int, decisions: dict[str, list[str]]) -> dict[str, Any]:
    """Through the gateway: whether its decisions equal the offline ones (every router), and streaming TTFT of each
    path (the threshold routers)."""
    async with aiohttp.ClientSession() as session:
        agree = {}
        for mode in decisions:
            model, same = CASCADES[mode], 0
            for sample, expected in zip(held, decisions[mode]):
                async with session.post(f"{url}/v1/completions", json={
                        "model": model, "prompt": sample.prompt, "max_tokens": k, "temperature": 0}) as response:
                    await response.read()
                    same += response.headers.get("x-aiinfra-cascade") == expected
            agree[mode] = same / len(held)
        times: dict[str, list[float]] = {"small": [], "large": [], "auto": [], "auto-prompt": []}
        auto_by_pool: dict[str, list[float]] = {"small": [], "large": []}
        for sample in held:
            for model in times:
                elapsed, pool = await ttft_ms(session, url, {"model": model, "prompt": sample.prompt,
                                                             "max_tokens": k, "temperature": 0})
                times[model].append(elapsed)
                if model == "auto":
                    auto_by_pool[pool].append(elapsed)
    median = {model: statistics.median(values) for model, values in times.items()}
    return {"agreement": agree, "ttft_ms": median,
            "auto_ttft_ms_by_pool": {pool: statistics.median(v) for pool, v in auto_by_pool.items() if v}}


def print_curves(results: dict[str, dict], held_small: list[float], held_large: list[float]) -> None:
    oracle, rand = oracle_curve(held_small, held_large), random_curve(held_small, held_large)
    print("\nquality against the large fraction, held-out prompts:")
    print(f"{'large fraction':>15} " + " ".join(f"{name:>17}" for name in (*results, "random", "oracle")))
    for step in range(11):
        f = step / 10
        print(f"{f:>15.1f} " + " ".join(f"{quality_at(curve, f):>17.4f}" for curve in (
            *(result["curve"] for result in results.values()), rand, oracle)))


def by_score_bins(scores: list[float], small: list[float], large: list[float], bins: int = 5) -> list[tuple]:
    """(mean score, small quality, large quality) per fifth of the prompts by score: a cascade beats random only
    where the large model's gain is largest on the prompts it sends there, the least confident."""
    order = sorted(range(len(scores)), key=scores.__getitem__)
    rows = []
    for b in range(bins):
        idx = order[b * len(order) // bins: (b + 1) * len(order) // bins]
        rows.append(tuple(statistics.mean(values[i] for i in idx) for values in (scores, small, large)))
    return rows


def bootstrap_apgr(scores: list[float], small: list[float], large: list[float], rounds: int,
                   seed: int) -> tuple[float, float, float]:
    """The 2.5th and 97.5th percentiles of APGR over prompts resampled with replacement, and the share of
    resamples in which the router beats random routing (APGR > 0.5)."""
    rng = random.Random(seed)
    values = []
    n = len(scores)
    for _ in range(rounds):
        idx = [rng.randrange(n) for _ in range(n)]
        rs, rl = [small[i] for i in idx], [large[i] for i in idx]
        weak, strong = sum(rs) / n, sum(rl) / n
        if strong > weak:
            values.append(apgr(router_curve([scores[i] for i in idx], rs, rl), weak, strong))
    values.sort()
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1], sum(v > 0.5 for v in values) / len(
        values)


def correlation(a: list[float], b: list[float]) -> float:
    mean_a, mean_b = statistics.mean(a), statistics.mean(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    norm = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return cov / norm if norm else 0.0


def trained_pair(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The large and the small run (trained now or reused), checked to share one tokenizer."""
    large_run = train(work / f"large-s{args.large_steps}", args.large_steps, [])
    shape = args.small_set or SMALL_SHAPE
    tag = "" if shape == SMALL_SHAPE else "-" + "-".join(item.split(".")[-1].replace("=", "") for item in shape)
    small_run = train(work / f"small-s{args.small_steps}{tag}", args.small_steps, shape)
    if (large_run / "tokenizer.json").read_bytes() != (small_run / "tokenizer.json").read_bytes():
        raise SystemExit("the two runs' tokenizers differ: the cascade's scores would not compare")
    return large_run, small_run


def save_samples(path: Path, samples: list[Sample], qualities: dict[str, tuple[list[float], list[float]]]) -> None:
    """Every prompt's logprobs, answers and qualities, for a look afterwards."""
    path.write_text(json.dumps([
        {"prompt": sample.prompt, "reference": sample.reference, "answer_logprobs": sample.answer_logprobs,
         "prompt_logprobs": sample.prompt_logprobs, "small_answer": sample.small_answer,
         "large_answer": sample.large_answer, **{f"{kind}_{pool}": values[j][i] for kind, values in
                                                qualities.items() for j, pool in enumerate(("small", "large"))}}
        for i, sample in enumerate(samples)]))


def analyse(args: argparse.Namespace, samples: list[Sample], qualities: dict, parts: Any) -> dict[str, Any]:
    """Both modes on the headline quality (with their intervals, correlations and score bins printed), and their
    APGR on the other qualities."""
    small_q, large_q = qualities[args.quality]
    results = {mode: evaluate(samples, small_q, large_q, parts.fit, parts.held_out, mode)
               for mode in ("generate", "prompt")}
    for mode in ("generate", "prompt"):
        results[f"{mode}_learned"] = evaluate_learned(samples, small_q, large_q, parts.fit, parts.held_out, mode,
                                                      args.seed)
    hs, hl = [small_q[i] for i in parts.held_out], [large_q[i] for i in parts.held_out]
    print_curves(results, hs, hl)
    gains = [lq - sq for sq, lq in zip(hs, hl)]
    for mode, result in results.items():
        held_scores = [result["scores"][i] for i in parts.held_out]
        result["corr_score_gain"] = correlation(held_scores, gains)
        result["apgr_ci"] = bootstrap_apgr(held_scores, hs, hl, args.bootstrap, args.seed)
        print(f"\n{mode} mode, held-out prompts in fifths by score (corr(score, large - small) "
              f"{result['corr_score_gain']:+.3f}; a cascade needs it negative):")
        print(f"{'mean score':>12} {'small':>8} {'large':>8} {'gain':>8}")
        for score, sq, lq in by_score_bins(held_scores, hs, hl):
            print(f"{score:>12.3g} {sq:>8.4f} {lq:>8.4f} {lq - sq:>+8.4f}")
    other = {f"apgr_{mode}_{kind}_quality": round(evaluate(samples, *qualities[kind], parts.fit, parts.held_out,
                                                            mode)["apgr"], 4)
             for kind in qualities if kind != args.quality for mode in ("generate", "prompt")}
    return {"modes": results, "held_small": hs, "held_large": hl, "other_apgr": other}


def measure(args: argparse.Namespace, work: Path, large_run: Path, small_run: Path,
            records: list[dict]) -> tuple[dict[str, Any], dict[str, Any], Any, float]:
    """Serve both models, collect every prompt's figures, analyse them, then check the gateway at the fitted
    thresholds; every process it starts is stopped on the way out."""
    ports = [free_port() for _ in range(3)]
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    processes = [start_server(small_run, "small", ports[0], logs / "small.log"),
                 start_server(large_run, "large", ports[1], logs / "large.log")]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports[:2]]
        for url, server in zip(urls, processes):
            wait_healthy(url, server)
        fleet_path = work / "FLEET.toml"
        fleet_path.write_text(fleet_toml(*urls, {"generate": 0.5, "prompt": 0.5},
                                         {"generate": ("quantile", 0.1), "prompt": ("mean", 0.0)}))
        fleet = load_fleet(fleet_path)
        started = time.perf_counter()
        samples = asyncio.run(collect(fleet, fleet.cascade[0], records, args.k, ["generate", "prompt"],
                                      with_quality=True, concurrency=4))
        forced = asyncio.run(teacher_forced({"small": urls[0], "large": urls[1]}, records, args.k))
        collect_s = time.perf_counter() - started
        qualities = {kind: (forced["small"][kind], forced["large"][kind]) for kind in ("match", "likelihood")}
        qualities["prefix"] = ([s.quality("small") for s in samples], [s.quality("large") for s in samples])
        save_samples(work / "samples.json", samples, qualities)
        parts = split(len(samples), 0.5, args.seed)
        analysis = analyse(args, samples, qualities, parts)
        results = analysis["modes"]

        # Through the gateway, each router at its 95%-quality threshold.
        thresholds = {key: results[key]["threshold_95"] for key in results}
        fleet_path.write_text(fleet_toml(*urls, thresholds, {mode: (results[mode]["statistic"],
                                                                    results[mode]["quantile"]) for mode in
                                                             ("generate", "prompt")},
                                         {key: result["learned"] for key, result in results.items()
                                          if result["router"] == "learned"}))
        gateway_url = f"http://127.0.0.1:{ports[2]}"
        processes.append(subprocess.Popen([sys.executable, "-m", "aiinfra", "route", str(fleet_path), "--port",
                                           str(ports[2])], stdout=(logs / "gateway.log").open("w"),
                                          stderr=subprocess.STDOUT, start_new_session=True))
        wait_healthy(gateway_url, processes[-1])
        checked = parts.held_out[: args.gateway_prompts]
        decisions = {mode: [decide(results[mode]["scores"][i], thresholds[mode]) for i in checked] for mode in results}
        through = asyncio.run(gateway_checks(gateway_url, [samples[i] for i in checked], args.k, decisions))
        through["checked"] = len(checked)
        analysis["counts"] = (len(samples), len(parts.fit), len(parts.held_out))
        return analysis, through, parts, collect_s
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def report(analysis: dict[str, Any], through: dict[str, Any], collect_s: float) -> tuple[str, float, float | None]:
    """Print each router's held-out figures beside random's and the oracle's; the best router (by its fit APGR:
    chosen on the fit half, never on the held-out one)."""
    results, hs, hl = analysis["modes"], analysis["held_small"], analysis["held_large"]
    weak, strong = sum(hs) / len(hs), sum(hl) / len(hl)
    oracle_apgr = apgr(oracle_curve(hs, hl), weak, strong)
    random_fraction = fraction_for_quality(random_curve(hs, hl), 0.95 * strong)
    total, fit_count, held_count = analysis["counts"]
    print(f"\n{total} prompts ({fit_count} fit, {held_count} held out), collected in {collect_s:.0f} s")
    print(f"held out: small quality {weak:.4f}, large {strong:.4f} (small/large {weak / strong:.3f})")
    for mode, result in results.items():
        if result["router"] == "learned":
            how = (f"learned router, ridge penalty {result['penalty']:g} (cross-validated on the fit half), weights "
                   + ", ".join(f"{n} {w:+.3f}" for n, w in result["learned"].weights.items())
                   + f"; fit APGR out of fold {result['fit_apgr']:.3f}")
        else:
            q = "" if result["statistic"] == "mean" else f" q={result['quantile']}"
            how = f"statistic {result['statistic']}{q} (fit APGR by statistic {result['apgr_by_statistic_fit']})"
        print(f"{mode:>16}: {how}; held-out APGR {result['apgr']:.3f} (95% bootstrap interval "
              f"{result['apgr_ci'][0]:.3f} to {result['apgr_ci'][1]:.3f}, above 0.5 in {result['apgr_ci'][2]:.0%} of "
              f"resamples); threshold for 95% (fit) {result['threshold_95']:.4f} gives a large fraction "
              f"{result['large_fraction_at_95pct_quality']:.3f} at {result['quality_ratio_at_95pct_target']:.3f} of "
              f"large quality; the held-out curve reaches 95% at {result['curve_large_fraction_at_95pct_quality']}; "
              f"cost target 0.3 -> held-out large fraction {result['large_fraction_at_cost_target_0.3']:.3f}")
    print(f"   random: APGR 0.500, large fraction for 95%: {random_fraction}; oracle APGR {oracle_apgr:.3f}")
    print(f"gateway decisions equal to the offline ones: {through['agreement']}")
    print(f"streaming TTFT (median ms, {through['checked']} prompts one at a time): {through['ttft_ms']}; auto by "
          f"pool {through['auto_ttft_ms_by_pool']}")
    return max(results, key=lambda mode: results[mode]["fit_apgr"]), oracle_apgr, random_fraction


def run(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole benchmark; the headline figures (with `extra` merged in) as one dict."""
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    large_run, small_run = trained_pair(args, work)
    records = labelled_set(load_tokenizer(large_run / "tokenizer.json"), args.prompts, args.context, args.k, 0.05,
                           args.seed)
    analysis, through, parts, collect_s = measure(args, work, large_run, small_run, records)
    best, oracle_apgr, random_fraction = report(analysis, through, collect_s)
    results, ttft = analysis["modes"], through["ttft_ms"]
    hs, hl = analysis["held_small"], analysis["held_large"]
    summary = {
        "apgr": round(results[best]["apgr"], 4), "apgr_mode": best.removesuffix("_learned"),
        "apgr_router": results[best]["router"], "apgr_chosen_on": "fit half",
        "apgr_ci95": [round(v, 4) for v in results[best]["apgr_ci"][:2]],
        "apgr_generate": round(results["generate"]["apgr"], 4), "apgr_prompt": round(results["prompt"]["apgr"], 4),
        "apgr_generate_learned": round(results["generate_learned"]["apgr"], 4),
        "apgr_prompt_learned": round(results["prompt_learned"]["apgr"], 4),
        "apgr_random": 0.5, "apgr_oracle": round(oracle_apgr, 4),
        "large_fraction_at_95pct_quality": round(results[best]["large_fraction_at_95pct_quality"], 4),
        "large_fraction_at_95pct_quality_generate": round(results["generate"]["large_fraction_at_95pct_quality"], 4),
        "large_fraction_at_95pct_quality_prompt": round(results["prompt"]["large_fraction_at_95pct_quality"], 4),
        **{f"large_fraction_at_95pct_quality_{key}": round(results[key]["large_fraction_at_95pct_quality"], 4)
           for key in ("generate_learned", "prompt_learned")},
        "quality_ratio_at_95pct_target": round(results[best]["quality_ratio_at_95pct_target"], 4),
        "random_large_fraction_at_95pct_quality": None if random_fraction is None else round(random_fraction, 4),
        "cost_target_0.3_held_out_large_fraction": round(results[best]["large_fraction_at_cost_target_0.3"], 4),
        "small_quality": round(sum(hs) / len(hs), 4), "large_quality": round(sum(hl) / len(hl), 4),
        "mode_a_stream_ttft_ms": round(ttft["auto"], 1), "small_stream_ttft_ms": round(ttft["small"], 1),
        "mode_a_stream_ttft_cost_ms": round(ttft["auto"] - ttft["small"], 1),
        "mode_b_stream_ttft_ms": round(ttft["auto-prompt"], 1), "large_stream_ttft_ms": round(ttft["large"], 1),
        "apgr_generate_ci95": [round(v, 4) for v in results["generate"]["apgr_ci"][:2]],
        "apgr_prompt_ci95": [round(v, 4) for v in results["prompt"]["apgr_ci"][:2]],
        "apgr_generate_learned_ci95": [round(v, 4) for v in results["generate_learned"]["apgr_ci"][:2]],
        "apgr_prompt_learned_ci95": [round(v, 4) for v in results["prompt_learned"]["apgr_ci"][:2]],
        "fit_apgr": {key: round(result["fit_apgr"], 4) for key, result in results.items()},
        "corr_score_gain_generate": round(results["generate"]["corr_score_gain"], 4),
        "corr_score_gain_prompt": round(results["prompt"]["corr_score_gain"], 4),
        "gateway_agreement_generate": through["agreement"]["generate"],
        "gateway_agreement_prompt": through["agreement"]["prompt"],
        "gateway_agreement_generate_learned": through["agreement"]["generate_learned"],
        "gateway_agreement_prompt_learned": through["agreement"]["prompt_learned"],
        "prompts_fit": len(parts.fit), "prompts_held_out": len(parts.held_out), "quality": args.quality,
        **analysis["other_apgr"],
    }
    verdict = {mode: "beats" if results[mode]["apgr_ci"][0] > 0.5 else "is worse than" if
               results[mode]["apgr_ci"][1] < 0.5 else "is not distinguishable from" for mode in results}
    summary["cascade_beats_random"] = verdict[best] == "beats"
    print(f"the cascade (router {best}, chosen by its fit APGR) " + ("beats" if summary["cascade_beats_random"] else
          "does NOT beat") + " random routing (judged by the 95% bootstrap interval of the held-out APGR); each "
          "router: " + ", ".join(f"{key} {v} random" for key, v in verdict.items()))
    return summary | (extra or {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "bench_cascade"), help="trained runs, logs")
    parser.add_argument("--large-steps", type=int, default=300)
    parser.add_argument("--small-steps", type=int, default=150)
    parser.add_argument("--small-set", action="append", default=[],
                        help=f"the small model's shape, key=value, repeatable (default: {' '.join(SMALL_SHAPE)})")
    parser.add_argument("--prompts", type=int, default=1200, help="labelled prompts (half fit, half held out)")
    parser.add_argument("--context", type=int, default=64, help="prompt tokens")
    parser.add_argument("--k", type=int, default=12, help="truth tokens; each model answers this many")
    parser.add_argument("--gateway-prompts", type=int, default=40, help="held-out prompts sent through the gateway")
    parser.add_argument("--quality", choices=["match", "likelihood", "prefix"], default="match",
                        help="per-prompt quality of the headline: match (top-1 = truth token, given the true text so "
                        "far), likelihood (the truth's mean token probability), prefix (the greedy answer's exact "
                        "prefix of the truth)")
    parser.add_argument("--bootstrap", type=int, default=300, help="resamples of the APGR interval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-json", action="append", default=[], help="JSON object files merged into the last line")
    args = parser.parse_args()
    extra: dict[str, Any] = {}
    for path in args.extra_json:
        extra |= json.loads(Path(path).read_text())
    print(json.dumps(run(args, extra)))


if __name__ == "__main__":
    main()
