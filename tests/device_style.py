"""A CPU backend that answers like a device backend, to run the device code paths without a GPU.

A GPU backend returns its power sums as tensors on the device, so that nothing is read back to
the host; the callers then take their tensor-only branches. This wraps the CPU backend to return
0-d/1-d tensors instead of Python numbers and numpy arrays, and to take the coefficient as a
tensor, so those branches run (and are checked against the host ones) on any machine.
"""

from __future__ import annotations

import pytest
import torch

from fastclip import _cpu, _plan


class DeviceStyleBackend:
    RESULTS_ON_HOST = False  # like a GPU backend: the callers take their tensor-only branches

    @staticmethod
    def power_sums(table, p, count_nonfinite=False):
        r = _cpu.power_sums(table, p, count_nonfinite)
        return _cpu.PowerSums(torch.tensor(r.total, dtype=torch.float64),
                              torch.from_numpy(r.per_tensor.copy()),
                              torch.tensor(r.nonfinite, dtype=torch.int64))

    @staticmethod
    def scale_(table, coef, always=False):
        assert isinstance(coef, (float, torch.Tensor))
        if always and float(coef) >= 1.0:  # the CPU kernel skips factors >= 1
            torch._foreach_mul_(table.tensors, float(coef))
        else:
            _cpu.scale_(table, float(coef))

    clamp_ = staticmethod(_cpu.clamp_)


@pytest.fixture
def device_style(monkeypatch):
    """Every plan built in the test uses ``DeviceStyleBackend`` for CPU tensors."""
    monkeypatch.setattr(_plan, "_backend_for", lambda device: DeviceStyleBackend)
    return DeviceStyleBackend
