"""The planner is pure arithmetic: importing any of it must never import torch."""

import subprocess
import sys

MODULES = ["aiinfra.plan", "aiinfra.plan.step", "aiinfra.plan.memory", "aiinfra.plan.training",
           "aiinfra.plan.inference", "aiinfra.plan.serve_rows", "aiinfra.plan.moe_routing", "aiinfra.plan.expert_load",
           "aiinfra.plan.eager", "aiinfra.plan.validation", "aiinfra.plan.calibration",
           "aiinfra.plan.reliability", "aiinfra.plan.commands", "aiinfra.plan.plots", "aiinfra.plan.runs",
           "aiinfra.plan.frameworks", "aiinfra.plan.fitting", "aiinfra.plan.calibrated", "aiinfra.plan.marks",
           "aiinfra.plan.from_config", "aiinfra.plan.validate_report"]


def test_importing_the_planner_never_imports_torch() -> None:
    # Running a prediction too: the fit and the marks import lazily.
    code = (f"import sys\nfor m in {MODULES!r}: __import__(m)\n"
            "from aiinfra.plan.marks import generation_mark\ngeneration_mark('h100-sxm-80gb')\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
