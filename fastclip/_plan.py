"""Group tensors by device, pick each device's backend, and compose the per-device passes.

A ``Plan`` is built once per call and serves both passes (norm, then scale), so the tensor
tables are built once. Devices without a fastclip backend (meta, mps, xla, ...) and complex
dtypes are not handled here: ``Plan.build`` returns None and the caller defers to torch.
"""

from __future__ import annotations

import math
import operator
import sys
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Optional, Union, cast

import numpy as np
import torch

from fastclip import _cpu
from fastclip import _validate as V
from fastclip._table import DTYPE_CODES, NoDataAddress, TensorTable


_DEVICE = operator.attrgetter("device")
_DTYPE = operator.attrgetter("dtype")
# torch's own grouping (C++, used by its clip_grad_norm_): one call answers device and dtype for
# every tensor, ~0.06 us per tensor cheaper than reading the two attributes from Python.
_GROUP = getattr(torch._C, "_group_tensors_by_device_and_dtype", None)


def _backend_for(device: torch.device) -> Optional[ModuleType]:
    if device.type == "cpu":
        return _cpu
    if device.type == "cuda":
        try:
            from fastclip import _cuda
        except ImportError as exc:  # numba-cuda is not installed: torch does the work
            _warn_once("no_numba_cuda", f"fastclip: {exc}; CUDA gradients are clipped by torch's "
                                        "implementation")
            return None
        except Exception as exc:  # a numba-cuda whose modules differ from what the kernels use
            _warn_once("no_numba_cuda", f"fastclip: its CUDA kernels cannot be built with this "
                                        f"numba-cuda ({exc!r}); CUDA gradients are clipped by "
                                        "torch's implementation")
            return None
        return _cuda if _cuda.is_available(device) else None
    return None


_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _one_device_and_dtype(tensors: list) -> Optional[tuple[torch.device, torch.dtype]]:
    """``(device, dtype)`` when all ``tensors`` share them, else None."""
    if _GROUP is not None:
        groups = _GROUP([tensors], False)
        return next(iter(groups)) if len(groups) == 1 else None
    device, dtype = tensors[0].device, tensors[0].dtype
    if all(t.device == device and t.dtype == dtype for t in tensors):
        return device, dtype
    return None


_WORDS = {torch.float64: np.float64, torch.int64: np.int64}


def host_to_device(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A backend's result (numpy array, Python number, list, or tensor) as a ``dtype`` tensor
    (float64 or int64) on ``device``, never making the host wait.

    Host values go to a GPU from pinned memory (``_cuda.upload_int64``): a copy from pageable
    memory makes the host wait for the stream, and one made while the stream is being captured
    fails (the upload then takes memory that no later call reuses).
    """
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype, non_blocking=True)
    host = np.asarray(value, dtype=_WORDS[dtype])
    if device.type == "cuda" and "fastclip._cuda" in sys.modules:  # a plan with a CUDA set has it
        words = np.ascontiguousarray(host).reshape(-1).view(np.int64)
        return sys.modules["fastclip._cuda"].upload_int64(words, device).view(dtype).reshape(host.shape)
    return torch.from_numpy(host).to(device, non_blocking=True)


@dataclass
class DeviceSet:
    device: torch.device
    backend: ModuleType  # _cpu or _cuda: the functions of one backend, one module each
    table: TensorTable
    indices: list[int]  # positions of this set's tensors in the caller's list


def result_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """torch's promotion of the norms, except that 16-bit grads give a float32 norm."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def nan_max(values) -> float:
    """max() that lets NaN win, like torch.amax."""
    out = 0.0
    for v in values:
        if v != v:
            return v
        if v > out:
            out = v
    return out


def exact_sum(values) -> float:
    """``math.fsum``, except that a sum beyond float64's range is inf, as the kernels' float64
    adds (and torch's) give it: fsum raises OverflowError for finite values whose sum overflows."""
    try:
        return math.fsum(values)
    except OverflowError:
        return math.inf


def root(total: float, p: float) -> float:
    """The p-norm from a float64 sum of |x|**p (or max |x| for inf)."""
    if p == 2.0:
        return math.sqrt(total)
    if p == 1.0 or p == math.inf:
        return total
    try:
        return total ** (1.0 / p)
    except OverflowError:  # a small p: Python raises where torch's pow (and tensor_root) give inf
        return math.inf


def tensor_root(total: torch.Tensor, p: float) -> torch.Tensor:
    """``root`` on a float64 tensor (one total, or one sum per tensor), on its device."""
    if p == 2.0:
        return total.sqrt()
    if p == 1.0 or p == math.inf:
        return total
    return total.pow(1.0 / p)


@dataclass
class Plan:
    sets: list[DeviceSet]
    n_tensors: int
    first_device: torch.device
    dtype: torch.dtype

    @classmethod
    def build(cls, tensors: list[torch.Tensor], fn: str, arg: str) -> Optional["Plan"]:
        """Group ``tensors`` by device and build each device's table.

        Returns None when torch should do the work (a device or dtype without a kernel). The
        common case asks torch to group the tensors (one C++ call) and each tensor for three
        attributes; anything unexpected (a non-tensor, a sparse or integer tensor) drops to
        ``check_tensors``, which names the problem.
        """
        if not tensors:  # a rank with no local grads still joins the all-reduce (it adds 0)
            return cls([], 0, torch.device("cpu"), torch.float32)
        try:
            one = _one_device_and_dtype(tensors)
            if one is not None:  # the common case: one device, one dtype
                device, dtype = one
                if dtype not in DTYPE_CODES:
                    V.check_tensors(tensors, fn, arg)
                    return None  # complex: no kernel
                backend = _backend_for(device)
                if backend is None:
                    return None
                table = TensorTable.from_tensors(tensors, dtype)
                table.fn, table.arg = fn, arg
                return cls([DeviceSet(device, backend, table, list(range(len(tensors))))],
                           len(tensors), device, result_dtype([dtype]))
            devices = list(map(_DEVICE, tensors))
            dtypes = list(map(_DTYPE, tensors))
            if not set(dtypes) <= DTYPE_CODES.keys():
                V.check_tensors(tensors, fn, arg)
                return None  # complex: no kernel
            first = devices[0]
            groups: dict = {}
            for i, d in enumerate(devices):
                groups.setdefault(d, []).append(i)
            sets = []
            for device, indices in groups.items():
                backend = _backend_for(device)
                if backend is None:
                    return None
                table = TensorTable.from_tensors([tensors[i] for i in indices],
                                                 [dtypes[i] for i in indices])
                table.fn, table.arg, table.positions = fn, arg, indices
                sets.append(DeviceSet(device, backend, table, indices))
        except NoDataAddress as exc:
            if exc.is_wrapper:  # its own dispatch computes on tensors it holds: torch's path
                return None
            position = next((i for i, t in enumerate(tensors) if t is exc.tensor), exc.index)
            raise TypeError(
                f"{fn}: grad {position} of `{arg}` (counting only the tensors that have one) has "
                f"{exc.tensor.numel()} elements but no memory (data_ptr() is "
                f"{exc.tensor.data_ptr()}): was its storage freed (untyped_storage().resize_(0))?"
            ) from None
        except (AttributeError, RuntimeError, NotImplementedError, TypeError):
            V.check_tensors(tensors, fn, arg)  # raises the precise error
            raise
        return cls(sets, len(tensors), first, result_dtype(dtypes))

    @property
    def host_only(self) -> bool:
        """True when every backend returns host floats (the CPU's): the coefficient may then
        be computed on the host. Decided by the backend, never by the device, so that the CUDA
        backend takes its no-sync path in the simulator too, where its tensors are CPU tensors."""
        return all(s.backend.RESULTS_ON_HOST for s in self.sets)

    def power_sums(self, p: float, count_nonfinite: bool = False) -> list:
        """One read pass on each device; a list of each backend's ``PowerSums``."""
        return [s.backend.power_sums(s.table, p, count_nonfinite) for s in self.sets]

    def combine(self, totals: list, p: float) -> Union[float, torch.Tensor]:
        """Sum (max for inf) of the devices' float64 totals: a float on the host, else a 0-d
        float64 tensor on the first device (no host sync)."""
        if all(isinstance(t, float) for t in totals):
            return nan_max(totals) if p == math.inf else exact_sum(totals)
        if len(totals) == 1 and isinstance(totals[0], torch.Tensor) and \
                totals[0].device == self.first_device:
            # One device: its total as it is, no stack and sum to launch. It may be a view into
            # the backend's result buffer; nothing writes to it (all-reduces work on a copy).
            return totals[0]
        stacked = torch.stack([host_to_device(t, torch.float64, self.first_device).reshape(())
                               for t in totals])
        return stacked.amax() if p == math.inf else stacked.sum()

    def norm_from_total(self, total: Union[float, torch.Tensor], p: float) -> torch.Tensor:
        if isinstance(total, float):
            return torch.tensor(root(total, p), dtype=self.dtype, device=self.first_device)
        return tensor_root(total, p).to(self.dtype)

    def total_norm(self, p: float, group=None, stats=None) -> torch.Tensor:
        """The norm of every tensor of the plan, from one read pass on each device.

        Args:
            p: the validated norm type.
            group: a ``torch.distributed`` process group: the float64 sum of powers is
                all-reduced over it before the root is taken (see ``_distributed``).
            stats: a ``ClipStats`` to fill from the same pass (see ``stats``).
        """
        results = self.power_sums(p, count_nonfinite=stats is not None)
        total = self.combine([r.total for r in results], p)
        if group is not None:
            from fastclip._distributed import all_reduce_power_sum

            total = all_reduce_power_sum(total, p, group, self.first_device, self, results)
        norm = self.norm_from_total(total, p)
        if stats is not None:
            stats._record_pass(self, results, norm, p)
        return norm

    def scale_(self, coef: Union[float, torch.Tensor]) -> None:
        """Multiply every tensor by ``coef`` (a 0-d tensor, or a float for a host-only plan, then
        of the plan's norm dtype); the backends skip the pass when coef >= 1."""
        for s in self.sets:
            if s.backend.RESULTS_ON_HOST:
                if isinstance(coef, float):  # the host coefficient of this plan's norm
                    s.backend.scale_(s.table, coef, self.dtype)
                else:
                    s.backend.scale_(s.table, coef.item(), coef.dtype)
            else:  # a plan with a device backend is not host-only: its coefficient is a tensor
                coef = cast(torch.Tensor, coef)
                s.backend.scale_(s.table, coef.to(s.device, non_blocking=True))

    def refresh_copies(self) -> None:
        """Re-read the sliced grads the tables read through copies (see ``TensorTable``)."""
        for s in self.sets:
            s.table.refresh_copies()

    def shares_memory(self) -> bool:
        """True when grads of one device overlap in memory (see ``TensorTable.shares_memory``)."""
        return any(s.table.shares_memory() for s in self.sets)

    def clamp_(self, bound: float) -> None:
        for s in self.sets:
            s.backend.clamp_(s.table, bound)

    # --- Fused fast path (fastclip._cuda): one device whose backend roots the norm and computes
    # torch's coefficient inside its kernels, so no torch op runs between the two passes. -------

    def _fused(self, name: str):
        if len(self.sets) != 1:
            return None, None
        s = self.sets[0]
        return getattr(s.backend, name, None), s.table

    def fused_norm(self, p: float) -> Optional[torch.Tensor]:
        """The norm from one fused launch, or None when the plan's backend has no fused path."""
        fused, table = self._fused("fused_norm")
        return None if fused is None else fused(table, p, self.dtype)

    def fused_clip_(self, p: float, max_norm) -> Optional[torch.Tensor]:
        """Norm, coefficient and scale in the backend's kernels; returns the norm, or None when
        there is no fused path (several devices, a backend without one, a tensor ``max_norm``)."""
        if not isinstance(max_norm, float):
            return None
        fused, table = self._fused("fused_clip_")
        return None if fused is None else fused(table, p, max_norm, self.dtype)

    def fused_clip_with_norm_(self, max_norm, total_norm: torch.Tensor) -> bool:
        """Scale by torch's coefficient computed from ``total_norm`` inside the backend's scale
        kernel; False (nothing done) when there is no such path (several devices, a backend
        without one, a tensor ``max_norm``, a norm the backend's path does not take)."""
        if not isinstance(max_norm, float):
            return False
        fused, table = self._fused("fused_clip_with_norm_")
        return fused is not None and fused(table, max_norm, total_norm)
