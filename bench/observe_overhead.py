"""The cost of observing training: steps/s with rank 0's /metrics on against off, in the same process.

Workload: the embedded default model (preset tiny) on the stdlib corpus, micro-batch 4 x 64 tokens, AdamW, one
process on `--threads` torch threads (1 by default: on a shared machine a second thread mostly spins).
"On": every step's record also sets the catalogue's training gauges and histogram, and a thread scrapes /metrics
every `--scrape-interval` seconds (1 s, five to fifteen times more often than usual Prometheus setups) over HTTP
from the exporter's own thread. "Off": the same trainer with the exporter detached (`observe.metrics_port=-1` does
this for a whole run). The two alternate in short rounds (ABBA...) so that the noise of this shared machine hits
both alike; the headline is the median of the per-round ratios (each round runs both ways back to back). The
per-step cost of updating the gauges is also timed on its own (no noise from training).

    python bench/observe_overhead.py [--rounds 16] [--steps-per-round 4]

Prints the ratio (goal >= 0.99); ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from aiinfra.config import load_config
from aiinfra.distributed.runtime import SilentLogger
from aiinfra.train import Trainer


def scrape_while(url: str, active: threading.Event, stop: threading.Event, interval_s: float) -> None:
    """Scrape `url` every `interval_s` while `active` is set, until `stop`."""
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            if active.is_set():
                client.get(url).raise_for_status()
            stop.wait(interval_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    total = 2 + 2 * args.rounds * args.steps_per_round
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [
            "train.seq_len=64", "train.micro_batch=4", f"train.threads={args.threads}", f"train.steps={total + 1}",
            "train.eval_every=0",
            "train.eval_batches=1", "checkpoint.every_steps=0", "run.progress=false", "run.sample_tokens=0",
            f"run.dir={Path(tmp) / 'run'}", "observe.metrics_port=0",
        ])
        trainer = Trainer(config)
        observer = trainer.observer
        print(observer.start(0, 0, trainer.peak.flops_per_s))
        exporter = observer.metrics
        url = f"http://127.0.0.1:{exporter._server.server_address[1]}/metrics"
        active, stop = threading.Event(), threading.Event()
        scraper = threading.Thread(target=scrape_while, args=(url, active, stop, args.scrape_interval), daemon=True)
        scraper.start()
        logger = SilentLogger()
        records = [trainer.run_step(logger) for _ in range(2)]  # warm-up (allocations, first-step costs)
        rates: dict[bool, list[float]] = {True: [], False: []}
        try:
            for round_index in range(args.rounds):
                order = (True, False) if round_index % 2 == 0 else (False, True)
                for on in order:
                    observer.metrics = exporter if on else None
                    active.set() if on else active.clear()
                    start = time.perf_counter()
                    for _ in range(args.steps_per_round):
                        records.append(trainer.run_step(logger))
                    rates[on].append(args.steps_per_round / (time.perf_counter() - start))
        finally:
            stop.set()
            scraper.join(timeout=10)
            observer.metrics = exporter
            observer.close()
        # The gauge updates alone, on a real record, with no training noise around them.
        record, calls = records[-1], 20_000
        spare = type(exporter)()
        start = time.perf_counter()
        for _ in range(calls):
            spare.observe_step(record, trainer.tokens_per_step)
        update_us = (time.perf_counter() - start) / calls * 1e6
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    # Each round ran both ways back to back: its own ratio cancels the drift between rounds.
    paired = sorted(a / b for a, b in zip(rates[True], rates[False]))
    quartiles = statistics.quantiles(paired, n=4)
    step_s = statistics.median(r["step_time_s"] for r in records[2:])
    print(f"steps/s with metrics on {on:.3f}, off {off:.3f} (medians over rounds); per-round ratio on/off: median "
          f"{statistics.median(paired):.4f} (goal >= 0.99), quartiles {quartiles[0]:.4f}..{quartiles[2]:.4f}; "
          f"{args.rounds} rounds of {args.steps_per_round} steps each way")
    print(f"gauge updates per step {update_us:.1f} us = {update_us / 1e6 / step_s:.2e} of a "
          f"{step_s * 1000:.0f} ms step")
    print(json.dumps({
        "metrics_on_over_off_steps_per_s": round(statistics.median(paired), 4),
        "ratio_quartiles": [round(quartiles[0], 4), round(quartiles[2], 4)],
        "steps_per_s_metrics_on": round(on, 3),
        "steps_per_s_metrics_off": round(off, 3),
        "metrics_update_us_per_step": round(update_us, 1),
        "metrics_update_fraction_of_step": update_us / 1e6 / step_s,
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
    }))


if __name__ == "__main__":
    main()
