"""Device energy from NVML (nvidia-ml-py): joules per step, turned into joules per token by the trainer.

NVML's total-energy counter (millijoules since the driver loaded, Volta and newer) is read before and after a
step; its difference is the step's energy, free of sampling error. Where there is no CUDA device, or no NVML, the
meter is off and says why (`reason`), and the trainer reports no energy rather than a guess.
"""

from __future__ import annotations

import torch


class PowerMeter:
    """Energy of this rank's CUDA device between two `read()` calls; `available` False (with `reason`) elsewhere."""

    def __init__(self, device: torch.device):
        self.available, self.reason, self._handle, self._nvml = False, "", None, None
        if device.type != "cuda":
            self.reason = f"no energy figures: the device is {device.type}, NVML measures NVIDIA GPUs only"
            return
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            self.reason = "no energy figures: nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            uuid = torch.cuda.get_device_properties(index).uuid
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except pynvml.NVMLError as error:
            self.reason = f"no energy figures: NVML failed ({error})"
            return
        self.available, self._handle, self._nvml = True, handle, pynvml
        self._last_mj = self._energy_mj()

    def _energy_mj(self) -> int:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)

    def read(self) -> float:
        """Joules since the previous read (-1.0 when unavailable)."""
        if not self.available:
            return -1.0
        now = self._energy_mj()
        joules, self._last_mj = (now - self._last_mj) / 1000, now
        return joules

    def power_watts(self) -> float:
        """The device's power draw now (-1.0 when unavailable)."""
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000 if self.available else -1.0
