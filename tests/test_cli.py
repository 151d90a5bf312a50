"""The command line end to end, run as a user runs it: a subprocess, exit codes, stdout and stderr."""

import subprocess
import sys

import pytest
import tomli_w


def aiinfra(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aiinfra", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.mark.parametrize(
    "args",
    [
        ("train", "--set", "train.lr=abc"),
        ("train", "--set", "model.n_layers=0"),
        ("train", "missing.toml"),
        ("generate", "no-such-run"),
    ],
)
def test_user_mistakes_exit_2_without_traceback(args, tmp_path) -> None:
    result = aiinfra(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")


def test_train_then_generate_end_to_end(tiny_config, tmp_path) -> None:
    config_path = tmp_path / "tiny.toml"
    config_path.write_text(tomli_w.dumps(tiny_config.to_dict()))
    # One process: the torchrun path behind --nproc is tested in tests/distributed.
    trained = aiinfra("train", str(config_path), "--nproc", "1", "--set", "train.steps=20", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "validation loss" in trained.stdout and "sample:" in trained.stdout
    generated = aiinfra("generate", tiny_config.run.dir, "--prompt", "def ", "--max-tokens", "20", cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("def ") and len(generated.stdout) > len("def \n")


@pytest.mark.parametrize("args", [["train", "--set", "train.lr=abc"], ["generate", "no-such-run"]])
def test_a_mistake_is_named_before_torch_loads(args, tmp_path) -> None:
    """The config, its --set items and a run directory are checked first: a typo costs no torch import (seconds on
    a small machine)."""
    probe = ("import sys\nfrom typer.testing import CliRunner\nfrom aiinfra.cli import app\n"
             f"result = CliRunner().invoke(app, {args!r})\n"
             "print(result.exit_code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr
