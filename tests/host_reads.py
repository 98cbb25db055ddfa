"""A guard that fails a test when code reads a tensor's value back to the host.

On a GPU such a read (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ...) waits for the
device: a host sync. ``torch.cuda.set_sync_debug_mode("error")`` catches those on a GPU only;
this guard catches the value reads made through torch's Python API on any machine, so the
device code paths (the CUDA backend in numba's simulator, or a device-style stand-in) are checked
in CI. It cannot see a copy to the host (``.to("cpu")``: a no-op on the simulator's CPU tensors)
or memory read through a raw address.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods and torch functions that hand a tensor's values to the host.
READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
    torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.Tensor.__array__, torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.nonzero,
    torch.nonzero, torch.equal, torch.allclose, torch.Tensor.equal, torch.Tensor.allclose,
    torch.Tensor.is_nonzero, torch.is_nonzero,
}


class HostReadError(AssertionError):
    pass


class NoHostReads(TorchFunctionMode):
    """Raise ``HostReadError`` on every read of a tensor value while active (and not paused).

    Example::

        with NoHostReads() as guard:
            fastclip.clip_grad_norm_(params, 1.0)  # raises if the call reads a value
            with guard.paused():
                ...  # reads allowed here (a stand-in backend's own work)
    """

    def __init__(self):
        super().__init__()
        self.paused_depth = 0
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS and not self.paused_depth:
            name = getattr(func, "__qualname__", repr(func))
            self.reads.append(name)
            raise HostReadError(f"{name} read a tensor value back to the host (a sync on a GPU)")
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self):
        self.paused_depth += 1
        try:
            yield
        finally:
            self.paused_depth -= 1
