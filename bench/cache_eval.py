"""The semantic cache's guard on the evaluation set: hits per kind of pair, guarded and by plain cosine.

Workload: tests/route/data/cache_pairs.tsv (kind, domain, two prompts), written for this project. The pairs are
split in two by a hash of their text: the calibration half fixes the cosine threshold for each target false-hit
rate (the one knob), and every figure printed is on the held-out half. Baseline: plain cosine at the threshold
that gives the same paraphrase recall on the held-out half. `--write` stores the calibration in the package.

    PYTHONPATH=src python bench/cache_eval.py [--target 0.01] [--write]

The last line is JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from aiinfra.route.cache.calibration import CALIBRATION_PATH, threshold_for
from aiinfra.route.cache.embed import Encoder
from aiinfra.route.cache.guard import mismatch

PAIRS = Path(__file__).resolve().parents[1] / "tests" / "route" / "data" / "cache_pairs.tsv"


def load_pairs(path: Path = PAIRS) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]


def held_out(pair: dict) -> bool:
    """Half of the pairs, fixed by their text (not by their kind or their score)."""
    return hashlib.sha256((pair["a"] + "\x00" + pair["b"]).encode()).digest()[0] % 2 == 1


def score(pairs: list[dict], encoder: Encoder) -> None:
    vectors_a = encoder.encode([p["a"] for p in pairs])
    vectors_b = encoder.encode([p["b"] for p in pairs])
    for pair, a, b in zip(pairs, vectors_a, vectors_b):
        pair["cosine"] = float(a @ b)
        pair["reason"] = mismatch(pair["a"], pair["b"]) or ""


def table(pairs: list[dict], threshold: float, cosine_threshold: float) -> list[dict]:
    rows = []
    kinds = sorted({p["kind"] for p in pairs}, key=lambda k: (k != "paraphrase", k))
    for kind in kinds:
        group = [p for p in pairs if p["kind"] == kind]
        guarded = sum(p["cosine"] >= threshold and not p["reason"] for p in group)
        plain = sum(p["cosine"] >= cosine_threshold for p in group)
        rows.append({"kind": kind, "pairs": len(group), "guarded_hit_rate": guarded / len(group),
                     "cosine_hit_rate": plain / len(group)})
    return rows


def precision(pairs: list[dict], hit: callable) -> float:
    hits = [p for p in pairs if hit(p)]
    return sum(p["kind"] == "paraphrase" for p in hits) / max(len(hits), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.01, help="target false-hit rate (the cache's knob)")
    parser.add_argument("--write", action="store_true", help="store the calibration half's scores in the package")
    args = parser.parse_args()
    pairs = load_pairs()
    score(pairs, Encoder())
    calibration = [p for p in pairs if not held_out(p)]
    test = [p for p in pairs if held_out(p)]
    if args.write:
        negatives = sorted(p["cosine"] for p in calibration if p["kind"] != "paraphrase" and not p["reason"])
        positives = sorted(p["cosine"] for p in calibration if p["kind"] == "paraphrase" and not p["reason"])
        CALIBRATION_PATH.write_text(json.dumps({
            "source": "bench/cache_eval.py --write: cosines of the calibration half that pass the guard",
            "negatives": len([p for p in calibration if p["kind"] != "paraphrase"]),
            "passing_negative_cosines": [round(x, 4) for x in negatives],
            "passing_paraphrase_cosines": [round(x, 4) for x in positives]}, indent=1) + "\n")
    threshold = threshold_for(args.target)
    paraphrases = [p for p in test if p["kind"] == "paraphrase"]
    recall = sum(p["cosine"] >= threshold and not p["reason"] for p in paraphrases) / len(paraphrases)
    # Plain cosine at the same recall: the threshold that lets the same share of held-out paraphrases through.
    ranked = sorted((p["cosine"] for p in paraphrases), reverse=True)
    cosine_threshold = ranked[max(0, round(recall * len(ranked)) - 1)]
    rows = table(test, threshold, cosine_threshold)
    print(f"held-out pairs: {len(test)} (calibration: {len(calibration)}); target false-hit rate {args.target}; "
          f"cosine threshold {threshold:.3f} with the guard, {cosine_threshold:.3f} for plain cosine")
    print(f"{'kind':12} {'pairs':>5} {'guarded':>8} {'cosine':>8}   (paraphrase: recall; others: false hits)")
    for row in rows:
        print(f"{row['kind']:12} {row['pairs']:5d} {row['guarded_hit_rate']:8.1%} {row['cosine_hit_rate']:8.1%}")
    guarded_precision = precision(test, lambda p: p["cosine"] >= threshold and not p["reason"])
    cosine_precision = precision(test, lambda p: p["cosine"] >= cosine_threshold)
    print(f"precision (every held-out pair): guarded {guarded_precision:.1%}, cosine {cosine_precision:.1%}")
    wrong = [p for p in test if p["kind"] != "paraphrase" and p["cosine"] >= threshold and not p["reason"]]
    missed = [p for p in paraphrases if p["reason"]]
    for p in wrong:
        print(f"  false hit ({p['kind']}, {p['cosine']:.2f}): {p['a']!r} / {p['b']!r}", file=sys.stderr)
    for p in missed:
        print(f"  guard rejected a paraphrase ({p['reason']}): {p['a']!r} / {p['b']!r}", file=sys.stderr)
    print(json.dumps({"target_false_hit_rate": args.target, "threshold": round(threshold, 4),
                      "cosine_threshold": round(cosine_threshold, 4), "recall": round(recall, 4),
                      "precision": round(guarded_precision, 4), "cosine_precision": round(cosine_precision, 4),
                      "kinds": rows}))


if __name__ == "__main__":
    main()
