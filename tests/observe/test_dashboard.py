"""`aiinfra dashboard` in headless Chromium (Debian's chromium and chromium-driver, driven by Selenium): the page
loads with no console errors, its plots hold data points after a short training run and a short load test, and a
screenshot is written. Also the dashboard's parsing of a gateway's /metrics, and its refusal of bad sources."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from aiinfra.observe.dashboard_data import ScrapeSource, histogram_quantile
from aiinfra.observe.route_metrics import RouteMetrics
from aiinfra.serve.loadgen import LoadSpec, run_load

from .conftest import Stack, missing, require, wait_for

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TRAINING_CHARTS = ("loss", "tps", "mfu", "step", "mem")
SERVING_CHARTS = ("rate", "ttft", "itl", "queue", "kv", "cache")


def start_dashboard(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "aiinfra", "dashboard", *args, "--port", "0",
                                "--interval", "0.5"], stderr=open(log, "w"), stdout=subprocess.DEVNULL)
    found: list[str] = []

    def listening() -> bool:
        found[:] = re.findall(r"dashboard at (http://\S+)", log.read_text())
        return bool(found) or process.poll() is not None

    wait_for(listening, 60, "the dashboard to listen")
    assert found, log.read_text()
    return process, found[0]


def browser():  # noqa: ANN201 - selenium's WebDriver
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,2200"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def points(driver, chart_id: str) -> int:
    """Non-null values the chart holds, over all its series."""
    return driver.execute_script(
        "const c = window.aiinfraCharts[arguments[0]]; if (!c) return 0;"
        "return c.data.slice(1).reduce((n, s) => n + s.filter(v => v !== null && v !== undefined).length, 0);",
        chart_id,
    )


def test_dashboard_in_headless_chromium_plots_training_and_serving(stack: Stack, tmp_path: Path) -> None:
    if not (require(CHROMIUM, "chromium") and require(CHROMEDRIVER, "chromium-driver")):
        pytest.skip(missing("chromium chromium-driver"))
    process, url = start_dashboard([str(stack.run_dir), "--scrape", f"{stack.server_url}/metrics"],
                                   tmp_path / "dashboard.log")
    driver = browser()
    try:
        driver.get(url)
        # A short load test while the dashboard polls the server (rates and latency quantiles are over a window).
        spec = LoadSpec(base_url=stack.server_url, num_prompts=16, max_concurrency=4, input_len=8, output_len=8)
        assert asyncio.run(run_load(spec))["completed"] == 16
        wait_for(lambda: all(points(driver, f"scrape0-{name}") for name in SERVING_CHARTS), 60,
                 "the serving charts to hold data")
        for name in TRAINING_CHARTS:
            assert points(driver, f"run0-{name}") >= 40, name  # 40 steps
        assert "straggler: rank 1" in driver.find_element("id", "run0").text
        heat = driver.execute_script("return window.aiinfraHeatmaps['run0-heat'];")
        assert heat == {"ranks": 2, "steps": 40}
        predicted = driver.execute_script("return window.aiinfraCharts['run0-step'].data[3].filter(v => v > 0).length")
        assert predicted == 40  # the planner's prediction beside every measured step
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors
        screenshot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
        if os.environ.get("AIINFRA_DASHBOARD_SCREENSHOT"):  # writes docs/img/dashboard.png by hand
            driver.save_screenshot(os.environ["AIINFRA_DASHBOARD_SCREENSHOT"])
    finally:
        driver.quit()
        process.terminate()
        process.wait(timeout=30)


def test_dashboard_reads_a_gateways_metrics() -> None:
    metrics = RouteMetrics()
    metrics.backend_up.labels("eu-a").set(1)
    metrics.backend_up.labels("us-b").set(0)
    metrics.cache_lookups.inc(4)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=metrics.render())

    source = ScrapeSource("http://gateway/metrics")
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        source.poll(client)
        metrics.client_requests.labels("tiny", "200").inc(6)
        metrics.cache_lookups.inc(4)
        metrics.cache_hits.labels("exact").inc(3)
        for seconds in (0.01, 0.02, 0.2):
            metrics.time_to_first_token_seconds.labels("eu-a").observe(seconds)
        time.sleep(0.05)
        source.poll(client)
    snapshot = source.snapshot()
    assert snapshot["kind"] == "route" and snapshot["backend_health"] == {"eu-a": 1.0, "us-b": 0.0}
    assert snapshot["backends_up"][-1] == 1 and snapshot["backends_total"][-1] == 2 and snapshot["request_rate"][-1] > 0
    assert snapshot["cache_hit_ratio"][-1] == pytest.approx(3 / 4)
    assert 0.01 <= snapshot["ttft_p50_s"][-1] <= 0.025


def test_dashboard_histogram_quantile_matches_prometheus() -> None:
    # Prometheus' histogram_quantile interpolates linearly inside the bucket that holds the rank.
    assert histogram_quantile(0.5, {0.1: 2, 0.5: 6, float("inf"): 8}) == pytest.approx(0.1 + 0.4 * (2 / 4))
    assert histogram_quantile(0.99, {0.1: 2, 0.5: 6, float("inf"): 8}) == 0.5
    assert histogram_quantile(0.5, {0.1: 0, float("inf"): 0}) is None


def test_dashboard_refuses_bad_sources(tmp_path: Path) -> None:
    for args, expected in (([str(tmp_path / "nope")], "is not a directory"),
                           (["--scrape", "localhost:9/metrics"], "expected an http:// or https:// URL"),
                           ([], "nothing to show")):
        result = subprocess.run([sys.executable, "-m", "aiinfra", "dashboard", *args], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr
