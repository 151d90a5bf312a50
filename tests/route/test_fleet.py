"""FLEET.toml validation: a bad file or value is one line naming the key, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aiinfra.route.fleet import load_fleet

GOOD_BACKEND = '[[backend]]\nname = "a"\nurl = "http://127.0.0.1:8001"\nmodel = "tiny"\n'


def test_a_good_fleet_loads_with_its_pools(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('[gateway]\npolicy = "prefix"\nweights = {prefix = 3, queue = 2}\n' + GOOD_BACKEND
                    + GOOD_BACKEND.replace('"a"', '"b"').replace("8001", "8002")
                    + '[[backend]]\nname = "edge"\nurl = "http://127.0.0.1:9000/"\nmodel = "small"\ntier = "edge"\n'
                      'cost_per_mtok_in = 0.1\nmax_concurrency = 4\n')
    fleet = load_fleet(path)
    assert {model: [b.name for b in pool] for model, pool in fleet.pools().items()} == {
        "tiny": ["a", "b"], "small": ["edge"]}
    assert fleet.backend[2].url == "http://127.0.0.1:9000" and fleet.gateway.weights == {"prefix": 3, "queue": 2}


@pytest.mark.parametrize(("text", "expected"), [
    ("", "backend: Field required"),
    ("[gateway]\npolicy = \"fastest\"\n" + GOOD_BACKEND, "gateway.policy: Input should be"),
    ("[gateway]\nhealth_interval_s = 0\n" + GOOD_BACKEND, "gateway.health_interval_s: Input should be greater"),
    ("[gateway]\npolcy = \"prefix\"\n" + GOOD_BACKEND, "gateway.polcy: unknown key"),
    ("[gateway]\nweights = {speed = 1}\n" + GOOD_BACKEND, "gateway.weights: unknown scorer(s) speed"),
    ('[[backend]]\nname = "a"\nmodel = "tiny"\n', "backend[0] (a).url: Field required"),
    (GOOD_BACKEND.replace("http://127.0.0.1:8001", "127.0.0.1:8001"), "backend[0] (a).url: '127.0.0.1:8001': expected"),
    (GOOD_BACKEND + GOOD_BACKEND, "backend names must be unique; repeated: a"),
    (GOOD_BACKEND.replace('model = "tiny"', 'model = "tiny"\ntier = "moon"'), "backend[0] (a).tier: Input should be"),
    (GOOD_BACKEND.replace('model = "tiny"', 'model = "tiny"\nmax_concurrency = 0'), "backend[0] (a).max_concurrency"),
    ("[gateway\n", "is not valid TOML"),
])
def test_a_bad_fleet_is_one_line_naming_the_key_and_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "aiinfra", "route", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_missing_fleet_file_is_named(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "aiinfra", "route", str(tmp_path / "nope.toml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_the_documented_fleet_example_is_valid(tmp_path: Path) -> None:
    """The example fleet in docs/gateway.md (after its marker) loads, so the docs cannot drift from the code."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "gateway.md").read_text()
    block = page.split("<!-- fleet-example -->", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "fleet.toml").write_text(block)
    fleet = load_fleet(tmp_path / "fleet.toml")
    assert fleet.gateway.policy == "prefix" and [b.name for b in fleet.backend] == ["eu-a", "us-a"]
