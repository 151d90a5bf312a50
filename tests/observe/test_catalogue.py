"""The metric catalogue: Prometheus naming conventions, the registries built from it, the generated table in
docs/observability.md, and the Grafana dashboard and Prometheus config in deploy/ that may use nothing else."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aiinfra.observe.catalogue import CATALOGUE, SECTIONS, markdown_table, series_names
from aiinfra.observe.route_metrics import RouteMetrics
from aiinfra.observe.serve_metrics import ServeMetrics
from aiinfra.observe.train_metrics import TrainMetrics

from .conftest import require

ROOT = Path(__file__).resolve().parents[2]
UNIT_SUFFIX = {"seconds": "_seconds", "bytes": "_bytes", "ratio": "_ratio", "watts": "_watts", "joules": "_joules"}


def test_prometheus_catalogue_follows_the_naming_conventions() -> None:
    for section, specs in SECTIONS.items():
        for spec in specs:
            assert re.fullmatch(rf"aiinfra_{section}_[a-z0-9_]+", spec.name), spec.name
            assert not spec.name.endswith("_total"), f"{spec.name}: counters are named without _total"
            suffix = UNIT_SUFFIX.get(spec.unit)
            if suffix:
                assert spec.name.endswith(suffix), f"{spec.name}: a metric in {spec.unit} ends {suffix}"
            assert spec.help and not spec.help.endswith("."), spec.name
            if spec.kind == "histogram":  # of durations, or of ratios (the cascade's confidence scores)
                assert list(spec.buckets) == sorted(spec.buckets) and spec.unit in ("seconds", "ratio"), spec.name
                assert spec.unit != "ratio" or 0 < spec.buckets[0] and spec.buckets[-1] <= 1, spec.name


@pytest.mark.parametrize("metrics", [ServeMetrics, RouteMetrics, TrainMetrics])
def test_prometheus_registries_expose_exactly_the_catalogue(metrics) -> None:
    instance = metrics()
    section = {ServeMetrics: "serve", RouteMetrics: "route", TrainMetrics: "train"}[metrics]
    families = {f.name: f.type for f in text_string_to_metric_families(instance.render().decode())
                if not f.name.endswith("_created")}
    assert families == {spec.name: spec.kind for spec in SECTIONS[section]}


def test_prometheus_metric_table_in_the_docs_is_the_generated_one() -> None:
    docs = (ROOT / "docs" / "observability.md").read_text()
    table = re.search(r"<!-- metrics-table -->\n(.*?)<!-- /metrics-table -->", docs, re.S)
    assert table, "docs/observability.md has no <!-- metrics-table --> block"
    generated = subprocess.run([sys.executable, "-m", "aiinfra.observe.catalogue", "--markdown"], check=True,
                               capture_output=True, text=True).stdout
    assert generated == markdown_table()
    assert table.group(1) == generated, "regenerate: python -m aiinfra.observe.catalogue --markdown"
    assert generated.count("\n") == len(CATALOGUE) + 2


def test_prometheus_grafana_dashboard_queries_only_catalogued_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "aiinfra.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(expressions) >= 30
    queried = {name for expr in expressions for name in re.findall(r"\baiinfra_[a-z0-9_]+", expr)}
    assert queried - series_names() == set()
    assert {name.split("_")[1] for name in queried} == {"train", "serve", "route"}


def test_prometheus_scrape_config_is_valid() -> None:
    promtool = require("/usr/bin/promtool", "prometheus")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install -y prometheus); CI installs it")
    result = subprocess.run([promtool, "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
