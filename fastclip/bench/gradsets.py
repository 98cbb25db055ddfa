"""Allocate a gradient set, fill it with seeded values, restore it, and compute its exact norm.

Presets have no real parameters: each "parameter" is a zero-storage placeholder (a 0-d tensor
expanded to the shape) that carries a real, separately allocated ``.grad``, as a model's grads
are. A user's model (``--model``) keeps its own parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from fastclip.bench.cases import Shape
from fastclip.bench.memloops import copy_loop

POOL_SIZE = 1 << 22  # seeded normals reused for every tensor: filling costs a copy, not an RNG
_REFERENCE_CHUNK = 1 << 20


@dataclass
class GradSet:
    """A gradient set in memory, with a saved copy to restore between timed calls.

    Attributes:
        name: preset name or ``model:<path>``.
        params: what ``clip_grad_norm_`` receives; each has ``.grad`` set.
        grads: the grads, in parameter order.
        saved: a copy of the original grads.
        reference_norm: the exact 2-norm of the original grads (float64 math, ``math.fsum``).
        max_abs: the largest magnitude among the original grads (``clip_grad_value_`` steps
            set their ``clip_value`` from it).
    """

    name: str
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    saved: list[torch.Tensor]
    reference_norm: float = field(default=math.nan)
    max_abs: float = field(default=math.nan)
    _copy: Optional[Callable[[], None]] = field(default=None, init=False, repr=False)
    _shares: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        return self.grads[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.grads[0].dtype

    @property
    def numel(self) -> int:
        return sum(g.numel() for g in self.grads)

    @property
    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.grads)

    def share_clamped(self, bound: float) -> float:
        """The share of the saved values that torch's ``clamp(-bound, bound)`` changes (counted
        once per bound). Not quite those with |x| > bound: in a 16-bit dtype a value equal to the
        bound rounded up to that dtype is beyond the bound, yet its clamp leaves it as it is."""
        if bound not in self._shares:
            self._shares[bound] = share_clamped(self.saved, bound)
        return self._shares[bound]

    def restore(self) -> None:
        """Copy the saved values back into the grads, in place (a ``memloops`` copy loop)."""
        if self._copy is None:
            self._copy = copy_loop(self.grads, self.saved)
        self._copy()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _pool(dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(POOL_SIZE, generator=gen).to(device=device, dtype=dtype)


def fill_(grads: Sequence[torch.Tensor], seed: int) -> None:
    """Fill ``grads`` with seeded normal values, each tensor at its own random scale and offset.

    Values are windows of one seeded pool of normals, so 124M values cost a memory copy. Scales
    range over 1e-3..1e-1 per tensor, as layers' grads do; 16-bit grads stay well inside range.
    Tensors that fit in the pool are filled with two foreach calls (2000 tensors, 2 dispatches).
    """
    if not grads:
        return
    pool = _pool(grads[0].dtype, grads[0].device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    starts = torch.rand(len(grads), generator=gen, dtype=torch.float64).tolist()
    scales = (10.0 ** torch.empty(len(grads), dtype=torch.float64).uniform_(-3, -1, generator=gen)).tolist()
    small_dst, small_src = [], []
    for g, start in zip(grads, starts):
        if g.dtype != pool.dtype or g.device != pool.device:
            pool = _pool(g.dtype, g.device, seed)
        flat, n = g.view(-1), g.numel()
        if n <= POOL_SIZE:
            offset = int(start * (POOL_SIZE - n))
            small_dst.append(flat)
            small_src.append(pool[offset:offset + n])
            continue
        offset, pos = int(start * POOL_SIZE), 0
        while pos < n:  # a tensor larger than the pool: consecutive windows, wrapping around
            k = min(n - pos, POOL_SIZE - offset)
            flat[pos:pos + k].copy_(pool[offset:offset + k])
            pos, offset = pos + k, 0
    if small_dst:
        torch._foreach_copy_(small_dst, small_src)
    torch._foreach_mul_(list(grads), scales)


def _batches(grads: Sequence[torch.Tensor], size: int):
    """Flat runs of about ``size`` values: large tensors split, small ones concatenated."""
    batch, count = [], 0
    for g in grads:
        for piece in g.reshape(-1).split(size):
            batch.append(piece)
            count += piece.numel()
            if count >= size:
                yield torch.cat(batch) if len(batch) > 1 else batch[0]
                batch, count = [], 0
    if batch:
        yield torch.cat(batch) if len(batch) > 1 else batch[0]


# numpy's long double where it is wider than float64 (x86's 80-bit format: a 64-bit significand).
_WIDE = np.longdouble if np.finfo(np.longdouble).nmant >= 63 else None


def reference_norm(grads: Sequence[torch.Tensor]) -> float:
    """The exact 2-norm: sums of squares over ~1M-value runs, combined with ``math.fsum``.

    Each float64 square of a float32 (or 16-bit) value is exact; only the float64 additions
    round, far below float32 precision. float64 grads' squares are not exact in float64: their
    runs are summed in long double where it is wider (2**-11 of float64's rounding per square).
    """
    parts = []
    for run in _batches(grads, _REFERENCE_CHUNK):
        if run.dtype == torch.float64 and _WIDE is not None:
            wide = run.cpu().numpy().astype(_WIDE)
            parts.append(float(np.dot(wide, wide)))
            continue
        d = run.to(torch.float64)
        parts.append(float(torch.dot(d, d)))
    return math.sqrt(math.fsum(parts))


def _finish(name: str, params: Sequence[torch.Tensor], seed: int) -> GradSet:
    grads = [p.grad for p in params if p.grad is not None]  # the callers gave each one a grad
    fill_(grads, seed)
    saved = [g.clone() for g in grads]
    gs = GradSet(name, list(params), grads, saved)
    gs.reference_norm = reference_norm(grads)
    gs.max_abs = max_abs(grads)
    return gs


def share_clamped(tensors: Sequence[torch.Tensor], bound: float) -> float:
    """The share of the values of ``tensors`` that torch's ``clamp(-bound, bound)`` changes."""
    changed = sum(int((t != t.clamp(-bound, bound)).sum()) for t in tensors)
    return changed / max(sum(t.numel() for t in tensors), 1)


def max_abs(grads: Sequence[torch.Tensor]) -> float:
    """The largest |value| of ``grads`` (exact: a magnitude is exact in any float dtype); 0 for
    no values."""
    tensors = [g for g in grads if g.numel()]
    if not tensors:
        return 0.0
    return float(torch.stack([m.double() for m in torch._foreach_norm(tensors, math.inf)]).max())


def materialize(name: str, shapes: Sequence[Shape], dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0) -> GradSet:
    """Allocate one grad per shape (each its own allocation, like a model's grads).

    Args:
        name: the set's name, for reports.
        shapes: one shape per tensor.
        dtype: the grads' dtype.
        device: where the grads live.
        seed: seeds the values.

    Returns:
        A filled ``GradSet`` with its saved copy and exact norm.

    Example:
        >>> gs = materialize("tiny", [(3, 4), (5,)])
        >>> gs.numel, round(gs.reference_norm, 6) > 0
        (17, True)
    """
    device = torch.device(device)
    params = []
    for shape in shapes:
        p = torch.zeros((), dtype=dtype, device=device).expand(shape)
        p.grad = torch.empty(shape, dtype=dtype, device=device)
        params.append(p)
    return _finish(name, params, seed)


def from_module(name: str, module: torch.nn.Module, dtype: torch.dtype, device: str | torch.device,
                seed: int = 0) -> GradSet:
    """Move ``module`` to ``device``/``dtype`` and give each trainable parameter a seeded grad."""
    module.to(device=device, dtype=dtype)
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
    return _finish(name, params, seed)
