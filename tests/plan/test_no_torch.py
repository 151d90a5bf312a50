"""The planner is pure arithmetic: importing any of it must never import torch."""

import subprocess
import sys

MODULES = ["aiinfra.plan", "aiinfra.plan.step", "aiinfra.plan.memory", "aiinfra.plan.training",
           "aiinfra.plan.inference", "aiinfra.plan.validation", "aiinfra.plan.calibration",
           "aiinfra.plan.reliability", "aiinfra.plan.commands", "aiinfra.plan.plots"]


def test_importing_the_planner_never_imports_torch() -> None:
    code = f"import sys\nfor m in {MODULES!r}: __import__(m)\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
