"""Unit-wise adaptive gradient clipping (AGC), in fused kernels over all tensors at once.

AGC (Brock et al., 2021) clips each *unit* of a gradient relative to the norm of the matching
unit of its weight. Units are the rows (slices along dim 0) of a weight of two or more dimensions
-- a Linear weight's output rows, a conv weight's output filters -- and the whole tensor for
vectors and scalars. For a unit with weight ``W`` and grad ``G``::

    max_norm = clipping * max(||W||, eps)
    if ||G|| > max_norm:  G *= max_norm / max(||G||, 1e-6)

which is the formula of the paper's reference code (``deepmind-research/nfnets/optim.py``,
``SGD_AGC``). The units are timm's (``unitwise_norm``: all dims but the first); DeepMind's and
optax's code squeeze size-1 dims first (a ``(3, 1)`` weight is one unit there, three here) and
reduce 3-D weights over their first axis (JAX's layouts), not the others. timm's
``adaptive_clip_grad``, optax's ``adaptive_grad_clip`` and DeepMind's ``agc_optax.py`` keep a unit
only when ``||G|| < max_norm``, so they differ at exact equality, which they treat as clipped (a
factor of exactly 1 unless ``||G|| < 1e-6``), and in a unit holding a NaN, which they turn to NaN
where this leaves the unit as it is (the comparison is false), as ``optim.py`` does. timm also
computes float16 units' norms in float16 (above 65504, inf: the unit is zeroed) where this clips
them (float64 norms).

On the CPU and on CUDA, one call runs one fused pass (two when a unit is longer than a chunk)
over a table of every parameter and grad: float64 norms, per-unit factors, and the scaling of
the clipped rows, with no host synchronization on CUDA. Grads that share memory (one grad under
two parameters, overlapping views) are clipped in list order, in successive calls, as the
formula applied parameter after parameter does. Other devices run the same formula in torch ops.
On CUDA each call uploads its table from pinned memory on torch's current stream, as
``clip_grad_norm_`` does, so that a call can be captured in a CUDA graph (after one eager call
has compiled and loaded the kernels). DTensor parameters are clipped on their local shards, with
all-reduces over the mesh dimensions that split units across ranks (``_agc_split``).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import torch

from fastclip._compile import entry_point
from fastclip import _cpu
from fastclip import _distributed
from fastclip import _validate as V
from fastclip._agc_split import clip_split_, splits_units, unit_factors
from fastclip._table import DTYPE_CODES, NO_MEMORY_BELOW, is_dense, is_expanded, mark_written
from fastclip.kernels import agc as K

_FN = "adaptive_grad_clip_"


def _check_positive(value: object, arg: str, allow_zero: bool) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type == "cpu":
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{_FN}: `{arg}` must be a real number, got {V._describe(value)}")
    out = V.as_float(value, _FN, arg)
    if not math.isfinite(out) or out < 0 or (out == 0 and not allow_zero):
        expected = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"{_FN}: `{arg}` must be {expected}, got {out!r}")
    return out


def _units(t: torch.Tensor) -> tuple[int, int]:
    """(number of units, elements per unit) of a parameter of ``t``'s shape."""
    if t.dim() < 2:
        return (1, t.numel()) if t.numel() else (0, 0)
    rows = t.shape[0]
    return rows, (t.numel() // rows if rows else 0)


def _units_are_blocks(t: torch.Tensor) -> bool:
    """True when unit ``r`` is the ``row_len`` elements from ``data_ptr() + r * row_len``.

    Contiguous tensors qualify; so do channels-last conv weights (each output filter is one
    dense block, in another order inside -- a unit's norm and scaling do not care).
    """
    if t.is_contiguous():
        return True
    if t.dim() < 2 or t.shape[0] <= 1:
        return is_dense(t)
    return t.stride(0) == t.numel() // t.shape[0] and is_dense(t[0])


def _check_dtensor_pair(p: torch.Tensor, g: torch.Tensor, i: int, dtensor) -> None:
    """A DTensor parameter and grad AGC can clip: both DTensors, placed alike, none Partial."""
    if not (isinstance(p, dtensor) and isinstance(g, dtensor)):
        raise TypeError(f"{_FN}: the parameter at index {i} of `parameters` and its grad must both be "
                        f"DTensors or both plain tensors, got {type(p).__name__} and {type(g).__name__}")
    if p.placements != g.placements or p.device_mesh != g.device_mesh:
        raise ValueError(f"{_FN}: the parameter at index {i} of `parameters` and its grad are placed "
                         f"differently ({tuple(p.placements)} vs {tuple(g.placements)})")
    if any(pl.is_partial() for pl in g.placements):
        raise ValueError(f"{_FN}: the grad at index {i} of `parameters` is a DTensor with a Partial "
                         f"placement {tuple(g.placements)}: its values are unreduced sums, whose "
                         "norms mean nothing. Redistribute it first.")
    for pl in g.placements:
        if not (pl.is_replicate() or _distributed._splits(pl)):
            raise ValueError(f"{_FN}: the grad at index {i} of `parameters` has placement {pl!r}, "
                             "which fastclip does not know how to clip")


def _pairs(parameters: list) -> tuple[list, list]:
    """(parameter, grad) pairs to clip, validated before anything is written: those the kernels
    clip (plain tensors, and the local shards of DTensors whose units lie whole in them), and
    the DTensor pairs whose units are split across ranks (``_agc_split``)."""
    pairs, split = [], []
    dtensor = _distributed._dtensor_type()
    for i, p in enumerate(parameters):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{_FN}: every element of `parameters` must be a torch.Tensor, "
                            f"got {V._describe(p)} at index {i}")
        g = p.grad
        if g is None:
            continue
        is_split = False
        if dtensor is not None and (isinstance(p, dtensor) or isinstance(g, dtensor)):
            _check_dtensor_pair(p, g, i, dtensor)
            is_split = any(splits_units(pl, g.dim()) for pl in g.placements)  # type: ignore[attr-defined]
            if is_split:
                split.append((p, g))  # every rank joins its all-reduce, empty shard or not
            p, g = _distributed._local(p), _distributed._local(g)
        if g.layout != torch.strided or p.layout != torch.strided:
            raise ValueError(f"{_FN}: `parameters` holds a sparse (or other non-strided) parameter "
                             f"or grad at index {i} (layout {g.layout}); AGC needs dense tensors")
        if g.dtype not in DTYPE_CODES:
            raise TypeError(f"{_FN}: `parameters` must hold float16, bfloat16, float32 or float64 "
                            f"grads, got dtype {g.dtype} at index {i}")
        if p.dtype != g.dtype or p.shape != g.shape or p.device != g.device:
            raise ValueError(f"{_FN}: the grad at index {i} of `parameters` does not match its "
                             f"parameter: {g.dtype} {tuple(g.shape)} on {g.device} vs "
                             f"{p.dtype} {tuple(p.shape)} on {p.device}")
        if is_expanded(g):
            raise ValueError(f"{_FN}: the grad at index {i} of `parameters` overlaps itself "
                             f"(an expanded tensor, strides {g.stride()}); it cannot be clipped "
                             "in place")
        if g.is_inference() and not torch.is_inference_mode_enabled() and not _units_are_blocks(g):
            raise RuntimeError(f"{_FN}: the grad at index {i} of `parameters` is an inference tensor "
                               "(made under torch.inference_mode()) whose units are not dense blocks, "
                               "so torch must write it back after the kernel, and torch refuses to "
                               "update inference tensors in place outside inference mode. Clone it "
                               "first (p.grad = p.grad.clone())")
        if g.numel() and not is_split:
            if (min(p.data_ptr(), g.data_ptr()) < NO_MEMORY_BELOW
                    and p.device.type in ("cpu", "cuda")):
                # A wrapper subclass (FakeTensor, a DTensor seen through another wrapper, ...),
                # or a view into freed storage: no memory of its own for a kernel to read.
                raise TypeError(f"{_FN}: the parameter or grad at index {i} of `parameters` "
                                f"({type(p).__name__}, {type(g).__name__}) has no data address of "
                                "its own; AGC takes plain tensors and DTensors")
            pairs.append((p.detach(), g))
    return pairs, split


def _extents(tensors: list) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)``: the byte range each tensor's elements lie in."""
    n = len(tensors)
    starts = np.fromiter((t.data_ptr() for t in tensors), dtype=np.int64, count=n)
    spans = np.fromiter((1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
                         for t in tensors), dtype=np.int64, count=n)
    return starts, starts + spans * np.fromiter((t.element_size() for t in tensors), dtype=np.int64,
                                                count=n)


def _rounds(pairs: list) -> list[list]:
    """``pairs`` split into rounds, run one after the other, in which no pair writes memory that
    another pair of its round reads or writes.

    A grad listed twice (or overlapping views) is clipped twice by the torch formula, the second
    time from the first's result; kernels that clip units concurrently would race on it, and a
    unit longer than a chunk would take both factors from the unclipped norm. Likewise a weight
    that shares memory with another parameter's grad (``a.grad = b.detach()``): its norm must be
    read before, or after, that grad is clipped, as in list order, never while. A pair goes one
    round after the latest earlier pair it conflicts with, so such pairs run in list order.
    """
    n = len(pairs)
    if n < 2:
        return [pairs]
    g_start, g_end = _extents([g for _, g in pairs])
    w_start, w_end = _extents([w for w, _ in pairs])
    # The usual case, no shared memory at all (weights with one another included): one round.
    starts, ends = np.concatenate([g_start, w_start]), np.concatenate([g_end, w_end])
    order = np.argsort(starts, kind="stable")
    if not (starts[order][1:] < np.maximum.accumulate(ends[order])[:-1]).any():
        return [pairs]
    round_of = np.zeros(n, dtype=np.int64)
    for j in range(1, n):
        grads_meet = (g_start[:j] < g_end[j]) & (g_start[j] < g_end[:j])
        # j's grad against the earlier weights, and j's weight against the earlier grads.
        conflict = (grads_meet | ((w_start[:j] < g_end[j]) & (g_start[j] < w_end[:j]))
                    | ((g_start[:j] < w_end[j]) & (w_start[j] < g_end[:j])))
        if conflict.any():
            round_of[j] = round_of[:j][conflict].max() + 1
    return [[pairs[i] for i in np.flatnonzero(round_of == r)] for r in range(int(np.max(round_of)) + 1)]


class _Table:
    """The kernels' view of (parameter, grad) pairs on one device.

    A parameter or grad whose units are not dense blocks is read through a contiguous copy;
    such a grad is written back through torch after the kernel (``finish``).
    """

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        self.keep: list[torch.Tensor] = []
        self.write_back: list[tuple[torch.Tensor, torch.Tensor]] = []
        waddrs, gaddrs, codes, n_rows, row_len = [], [], [], [], []
        for w, g in pairs:
            if not _units_are_blocks(w):
                w = w.contiguous()
                self.keep.append(w)
            if not _units_are_blocks(g):
                copy = g.contiguous()
                self.write_back.append((g, copy))
                g = copy
            rows, length = _units(g)
            waddrs.append(w.data_ptr())
            gaddrs.append(g.data_ptr())
            codes.append(DTYPE_CODES[g.dtype])
            n_rows.append(rows)
            row_len.append(length)
        self.waddrs = np.array(waddrs, dtype=np.int64)
        self.gaddrs = np.array(gaddrs, dtype=np.int64)
        self.codes = np.array(codes, dtype=np.int64)
        self.n_rows = np.array(n_rows, dtype=np.int64)
        self.row_len = np.array(row_len, dtype=np.int64)
        self.numel = int((self.n_rows * self.row_len).sum())

    def finish(self) -> None:
        for g, copy in self.write_back:
            g.copy_(copy)


def _run_cpu(pairs, clipping: float, eps: float) -> tuple[np.ndarray, np.ndarray]:
    table = _Table(pairs)
    # Each element is read twice (weight and grad): the same threshold as the norm kernels'.
    parallel = 2 * table.numel >= _cpu.PARALLEL_MIN_ELEMENTS
    n_groups = torch.get_num_threads() if parallel else 1
    args = (table.waddrs, table.gaddrs, table.codes, table.n_rows, table.row_len, clipping, eps)
    if parallel:
        with _cpu._numba_threads():
            sums = K.adaptive_clip(*args, n_groups=n_groups, parallel=True)
    else:
        sums = K.adaptive_clip(*args)
    table.finish()
    mark_written([g for _, g in pairs])
    return sums


_cuda_state: dict = {}


def _cuda_kernels():
    """``fastclip.kernels.agc_cuda`` when numba-cuda can launch here, else None (cached)."""
    if "module" not in _cuda_state:
        try:
            from fastclip import _cuda
            from fastclip.kernels import agc_cuda

            ok = _cuda.is_available() and not agc_cuda.SIMULATOR
        except Exception:  # numba-cuda missing or no driver: torch does the work
            ok = False
        _cuda_state["module"] = agc_cuda if ok else None
    return _cuda_state["module"]


def _run_cuda(kernels, pairs, device: torch.device, clipping: float, eps: float) -> torch.Tensor:
    from fastclip._cuda import numba_array, numba_launch, numba_upload

    table = _Table(pairs)
    keep = []

    def to_device(a: np.ndarray):
        keep.append(numba_upload(a, device))
        return numba_array(keep[-1])

    out = []

    def zeros(n: int):
        out.append(torch.zeros(n, dtype=torch.float64, device=device))
        return numba_array(out[-1])

    with numba_launch(device) as stream:
        kernels.run_agc(table.waddrs, table.gaddrs, table.codes, table.n_rows, table.row_len,
                        clipping, eps, to_device, zeros, stream)
    table.finish()
    mark_written([g for _, g in pairs])
    return out[0]


def _run_torch(pairs, clipping: float, eps: float) -> None:
    """The same formula in torch ops, for devices without a kernel (float64 norms where the
    device has float64; float32 at the least)."""
    for w, g in pairs:
        wide = g.dtype == torch.float64 or g.device.type in ("cpu", "cuda")
        acc = torch.float64 if wide else torch.float32
        dims = tuple(range(1, g.dim())) if g.dim() >= 2 else None
        w_norm = torch.linalg.vector_norm(w, dim=dims, keepdim=dims is not None, dtype=acc)
        g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=dims is not None, dtype=acc)
        coef = unit_factors(w_norm, g_norm, clipping, eps)
        coef = coef.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
        # Never a 0-d operand for a grad with dimensions: torch's CUDA mul_ would round a 0-d
        # float32 factor to a 16-bit grad's dtype first (see _agc_split); a (1, ...) factor is
        # float32 arithmetic and one rounding, as the kernels do.
        g.mul_(coef.reshape((1,) * g.dim()) if coef.dim() == 0 else coef)


@entry_point
def adaptive_grad_clip_(
    parameters: V.TensorOrTensors,
    clipping: float = 0.01,
    eps: float = 1e-3,
) -> None:
    """Clip every unit of every grad relative to its weight's unit norm (AGC), in place.

    For each unit (a row of a weight of two or more dimensions, the whole tensor for 1-D and 0-d
    parameters) with weight ``W`` and grad ``G``: ``max_norm = clipping * max(||W||, eps)``, and
    when ``||G|| > max_norm`` the unit's grad is multiplied by ``max_norm / max(||G||, 1e-6)``.
    Norms are accumulated in float64; the multiply rounds like torch's ``grad.mul_(factor)``.
    Units whose grad or weight norm is NaN are left as they are; a unit with an infinite grad
    norm gets the factor 0 (its inf elements become NaN), as in ``nfnets/optim.py``.

    One fused kernel call covers all tensors (on the CPU and on CUDA); every argument is
    checked first, so a call that raises changes no grad. DTensor parameters (FSDP2, tensor
    parallel) are clipped as the unsharded model would be: on their local shards, with
    all-reduces over the mesh dimensions that split units across ranks (every rank must then make
    the call, with the same parameters).

    Args:
        parameters: a tensor, or an iterable of tensors, whose ``.grad`` are clipped (weights
            whose ``.grad`` is None are skipped). Apply AGC to the weights you want clipped:
            the paper leaves the final classifier layer out.
        clipping: the clipping threshold λ (> 0): a unit's grad norm may reach ``clipping``
            times its weight norm. The paper uses 0.01 to 0.16 depending on batch size.
        eps: the floor under a weight's unit norm (>= 0), so that zero-initialized weights
            can still move.

    Raises:
        TypeError: an element of ``parameters`` is not a tensor, a grad is not a 16-, 32- or
            64-bit float, ``clipping``/``eps`` is not a number, a parameter and its grad are not
            both DTensors or both plain tensors, or one of them has no memory of its own (a
            wrapper subclass such as FakeTensor).
        ValueError: ``clipping`` or ``eps`` is out of range, or a grad is sparse, does not
            match its parameter, is expanded (overlaps itself), is a DTensor placed unlike its
            parameter or with a ``Partial`` (or unknown) placement.
        RuntimeError: a grad is an inference tensor whose units are not dense blocks (torch
            would have to write it back, and refuses to outside inference mode).

    Example:
        >>> import torch, fastclip
        >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        >>> w.grad = torch.tensor([[1.0, 0.0], [0.0, 0.001]])
        >>> fastclip.adaptive_grad_clip_([w], clipping=0.01)
        >>> w.grad  # row 0: ||G|| = 1 > 0.01 * 5, scaled to norm 0.05; row 1 is within 0.01 * 1
        tensor([[0.0500, 0.0000],
                [0.0000, 0.0010]])

    References:
        A. Brock, S. De, S. L. Smith, K. Simonyan. "High-Performance Large-Scale Image
        Recognition Without Normalization", ICML 2021 (arXiv:2102.06171), section 4.1.
    """
    parameters = V.as_list(parameters, _FN, "parameters")
    clipping = _check_positive(clipping, "clipping", allow_zero=False)
    eps = _check_positive(eps, "eps", allow_zero=True)
    pairs, split = _pairs(parameters)
    by_device: dict[torch.device, list] = {}
    for pair in pairs:
        by_device.setdefault(pair[1].device, []).append(pair)
    for device, members in by_device.items():
        kernels: Optional[object] = None
        if device.type == "cuda":
            kernels = _cuda_kernels()
        for round_ in _rounds(members):
            if device.type == "cpu":
                _run_cpu(round_, clipping, eps)
            elif kernels is not None:
                _run_cuda(kernels, round_, device, clipping, eps)
            else:
                _run_torch(round_, clipping, eps)
    if split:
        clip_split_(split, clipping, eps)


__all__ = ["adaptive_grad_clip_"]
