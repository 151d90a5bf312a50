"""The load generator against our server: every request completes and the figures are consistent."""

import asyncio

from aiinfra.serve.loadgen import LoadSpec, arrival_gaps_s, format_report, make_workload, run_load

from .server import running_server, tiny_served_model


def test_workload_lengths_and_arrivals_are_reproducible() -> None:
    spec = LoadSpec(num_prompts=50, input_len=20, output_len=10, range_ratio=0.5, request_rate=100.0, seed=3)
    workload = make_workload(spec)
    assert workload == make_workload(spec)
    assert all(10 <= len(prompt.split()) <= 30 and 5 <= max_tokens <= 15 for prompt, max_tokens in workload)
    gaps = arrival_gaps_s(spec)
    assert len(gaps) == 50 and all(gap >= 0 for gap in gaps)
    assert 0.1 < sum(gaps) < 2.0  # about 50 arrivals at 100 per second
    assert arrival_gaps_s(LoadSpec(num_prompts=3)) == [0.0, 0.0, 0.0]


def test_load_against_our_server_reports_every_figure() -> None:
    with running_server(tiny_served_model()) as server:
        spec = LoadSpec(base_url=server.base_url, num_prompts=12, max_concurrency=4, input_len=8, output_len=6,
                        slo_ttft_ms=60_000, slo_tpot_ms=60_000)
        report = asyncio.run(run_load(spec))
    assert report["completed"] == 12 and report["failed"] == 0
    assert report["total_output_tokens"] == 12 * 6
    assert report["goodput_requests_per_s"] == report["request_throughput_per_s"] > 0
    for name in ("ttft", "tpot", "itl", "e2e"):
        assert 0 < report[f"p50_{name}_ms"] <= report[f"p99_{name}_ms"]
    assert "output token throughput" in format_report(report)
