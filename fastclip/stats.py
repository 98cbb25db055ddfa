"""Telemetry from the clipping pass: ``clip_grad_norm_(..., stats=ClipStats())``.

Everything is derived from what the norm pass already produced (the per-tensor float64 power
sums and the non-finite count), so telemetry costs no extra pass over the gradients. The values
stay tensors on the grads' device: filling a ``ClipStats`` never reads a value back to the host.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastclip._plan import host_to_device as _as_device_tensor, tensor_root


class ClipStats:
    """What one ``clip_grad_norm_`` call saw, filled from the same pass as the norm.

    Pass an instance as ``stats=`` to ``fastclip.clip_grad_norm_``; every call that returns
    overwrites it (a call that raises leaves it as it was, as it leaves the grads). A call with
    no grads, or whose grads torch's implementation clips (complex grads, devices without a
    kernel), leaves every attribute ``None``. The
    attributes are ``None`` until a call fills them, then 0-d or 1-d tensors on the device of the
    first grad. Reading them (``.item()``, ``print``) is the caller's choice, and on a GPU it is a
    host sync.

    Attributes:
        total_norm: the norm that was returned (global over ``group=`` when one is given).
        clip_coef: ``min(max_norm / (total_norm + 1e-6), 1)``, the factor the grads were scaled by.
        clipped: 0-d bool tensor, True when the grads were rescaled: the coefficient was below 1, or NaN
            (a NaN norm scales every grad by NaN, as torch does).
        per_tensor_norms: 1-d, one norm per grad, in the order of the grads of ``parameters``
            (parameters without a grad are skipped), in ``total_norm``'s dtype, computed from the
            per-tensor float64 sums of the norm pass. Across ranks (``group=``, DTensor grads)
            they are the norms of this rank's tensors (local shards).
        nonfinite_count: 0-d int64 tensor, the number of inf/NaN elements in this rank's grads.

    Example:
        >>> import torch, fastclip
        >>> w = torch.zeros(2, requires_grad=True); w.grad = torch.tensor([3.0, 4.0])
        >>> b = torch.zeros(1, requires_grad=True); b.grad = torch.tensor([0.0])
        >>> stats = fastclip.ClipStats()
        >>> _ = fastclip.clip_grad_norm_([w, b], max_norm=1.0, stats=stats)
        >>> stats.per_tensor_norms, stats.clipped
        (tensor([5., 0.]), tensor(True))
    """

    total_norm: Optional[torch.Tensor]
    clip_coef: Optional[torch.Tensor]
    clipped: Optional[torch.Tensor]
    per_tensor_norms: Optional[torch.Tensor]
    nonfinite_count: Optional[torch.Tensor]

    _FIELDS = ("total_norm", "clip_coef", "clipped", "per_tensor_norms", "nonfinite_count")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Set every attribute back to ``None``."""
        for name in self._FIELDS:
            setattr(self, name, None)

    def as_dict(self) -> dict:
        """The attributes as a dict of tensors (``None`` where not filled)."""
        return {name: getattr(self, name) for name in self._FIELDS}

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"ClipStats({fields})"

    # Called by Plan.total_norm, with one backend result per device set, in plan.sets order.
    def _record_pass(self, plan, results, norm: torch.Tensor, p: float) -> None:
        self.reset()
        device = norm.device
        self.total_norm = norm
        if len(plan.sets) == 1:
            sums = _as_device_tensor(results[0].per_tensor, torch.float64, device)
        else:
            sums = torch.empty(plan.n_tensors, dtype=torch.float64, device=device)
            for s, r in zip(plan.sets, results):
                index = _as_device_tensor(s.indices, torch.long, device)
                sums.index_copy_(0, index, _as_device_tensor(r.per_tensor, torch.float64, device))
        self.per_tensor_norms = tensor_root(sums, p).to(norm.dtype)
        counts = [r.nonfinite for r in results]
        if all(isinstance(c, int) for c in counts):  # host backends: a plain sum
            self.nonfinite_count = _as_device_tensor(sum(counts), torch.int64, device)
        else:
            self.nonfinite_count = torch.stack(
                [_as_device_tensor(c, torch.int64, device).reshape(()) for c in counts]).sum()

    # Called by clip_grad_norm_ once the grads are written, with the ClipStats it filled.
    def _take(self, other: "ClipStats") -> None:
        for name in self._FIELDS:
            setattr(self, name, getattr(other, name))

    # Called by clip_grad_norm_ with the 0-d coefficient it scales the grads by.
    def _record_coef(self, coef: torch.Tensor) -> None:
        self.clip_coef = coef
        # "not >= 1" rather than "< 1": the backends apply a NaN coefficient, so NaN counts.
        self.clipped = torch.logical_not(coef >= 1.0)


__all__ = ["ClipStats"]
