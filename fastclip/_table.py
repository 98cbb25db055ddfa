"""Turn a list of torch tensors on one device into the kernels' tensor table.

The table holds raw addresses, so it is only valid while the tensors are alive and unmoved;
it is rebuilt on every call because ``zero_grad(set_to_none=True)`` reallocates grads.
Building it is the only per-tensor Python work of a call, so it asks each tensor for as little
as it can, one attribute per list comprehension (~0.1 us per tensor and attribute).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch

from fastclip.kernels.layout import BFLOAT16, FLOAT16, FLOAT32, FLOAT64

_TB = torch._C.TensorBase

DTYPE_CODES = {
    torch.float32: FLOAT32,
    torch.float64: FLOAT64,
    torch.float16: FLOAT16,
    torch.bfloat16: BFLOAT16,
}
ITEMSIZE = np.array([4, 8, 2, 2], dtype=np.int64)  # bytes per element, by dtype code


def is_expanded(t: torch.Tensor) -> bool:
    """True when several of ``t``'s elements share one memory location (a zero stride)."""
    return any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape))


def expanded_view_error(fn: str, where: str, t: torch.Tensor) -> RuntimeError:
    """The error for an expanded ``t`` (``where`` names it) that would have to be written."""
    return RuntimeError(f"{fn}: {where} is an expanded view (stride {tuple(t.stride())}): several "
                        "of its elements share one memory location, so it cannot be written in "
                        "place. Give it its own memory first (p.grad = p.grad.clone()).")


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements fill ``numel`` consecutive slots from ``data_ptr()``.

    Contiguous, channels-last and transposed tensors qualify: an element-wise kernel may treat
    them as one flat array. torch strides are never negative, so ``data_ptr()`` is the lowest
    address.
    """
    if t.is_contiguous():
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


# Wrapper subclasses (FakeTensor, TwoTensor, ...) report the address 0, and a view into storage
# freed by ``resize_(0)`` reports its offset from 0. No memory is ever mapped in the first 64 KiB
# (Linux's vm.mmap_min_addr; CUDA's addresses are far above): below that, no kernel may read.
NO_MEMORY_BELOW = 1 << 16


class NoDataAddress(TypeError):
    """A tensor with elements but no memory of its own: a wrapper subclass (its
    ``__torch_dispatch__`` computes on other tensors), or storage freed by ``resize_(0)``."""

    def __init__(self, index: int, tensor: torch.Tensor):
        super().__init__(f"fastclip: tensor {index} ({type(tensor).__name__}) has no data address")
        self.index = index
        self.tensor = tensor

    @property
    def is_wrapper(self) -> bool:
        """True for a subclass that dispatches ops itself: torch's implementation can run it."""
        return type(self.tensor).__torch_dispatch__ is not torch._C._disabled_torch_dispatch_impl


@dataclass
class TensorTable:
    """Addresses, lengths and dtype codes of tensors on one device, in the caller's order.

    Attributes:
        tensors: the caller's tensors.
        addrs, lengths, codes: the kernel's view of each tensor (int64 numpy arrays).
        strided: indices of tensors whose memory has gaps (sliced views). The kernels read a
            contiguous copy of them (kept alive in ``copies``) and never write through the table;
            writes to them go through torch.
    """

    tensors: list[torch.Tensor]
    addrs: np.ndarray
    lengths: np.ndarray
    codes: np.ndarray
    strided: list[int] = field(default_factory=list)
    copies: list[torch.Tensor] = field(default_factory=list)
    # Chunk tables by backend key, so that the norm pass and the scale pass of one call
    # split the work once.
    chunk_cache: dict = field(default_factory=dict)
    # For messages: the public function, its argument, and each tensor's index in that argument.
    fn: str = "fastclip"
    arg: str = "parameters"
    positions: Optional[list] = None

    @property
    def numel(self) -> int:
        return int(self.lengths.sum())

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor],
                     dtypes: Union[torch.dtype, list[torch.dtype]]) -> "TensorTable":
        """Build the table. ``dtypes`` are the tensors' dtypes (or the one dtype of them all), all
        with a kernel (DTYPE_CODES)."""
        # map() over the unbound C methods: the cheapest way to ask 2000 tensors one question.
        # A non-tensor raises TypeError here, and the caller names the problem.
        if all(map(_TB.is_contiguous, tensors)):
            views = tensors
            strided: list[int] = []
            copies: list[torch.Tensor] = []
        else:
            views, strided, copies = [], [], []
            for i, t in enumerate(tensors):
                if not is_dense(t):
                    strided.append(i)
                    t = t.contiguous()
                    copies.append(t)
                views.append(t)
        n = len(views)
        addrs = np.fromiter(map(_TB.data_ptr, views), dtype=np.int64, count=n)
        lengths = np.fromiter(map(_TB.numel, views), dtype=np.int64, count=n)
        if np.count_nonzero(addrs < NO_MEMORY_BELOW):
            no_memory = np.flatnonzero((addrs < NO_MEMORY_BELOW) & (lengths > 0))
            if no_memory.size:
                i = int(no_memory[0])
                raise NoDataAddress(i, views[i])
        codes: np.ndarray
        if isinstance(dtypes, torch.dtype):
            codes = np.empty(n, dtype=np.int64)
            codes.fill(DTYPE_CODES[dtypes])
        else:
            codes = np.array([DTYPE_CODES[d] for d in dtypes], dtype=np.int64)
        return cls(tensors, addrs, lengths, codes, strided, copies)

    def lengths_without(self, skip=()) -> np.ndarray:
        """Lengths with the tensors at indices ``skip`` masked out (0), for kernels that must
        leave them to torch."""
        if not skip:
            return self.lengths
        lengths = self.lengths.copy()
        lengths[list(skip)] = 0
        return lengths

    def promoted_scalars(self, coef_dtype: torch.dtype) -> tuple:
        """Indices of the 0-d tensors that torch's ``g.mul_(c)``, with ``c`` a 0-d tensor of
        ``coef_dtype``, computes in float64 where the scale kernel computes in float32.

        Two 0-d operands promote (float32 grad times float64 coefficient: float64, then one
        rounding), while a grad with dimensions keeps its dtype (float32 arithmetic on the
        coefficient rounded to float32), which is what the kernel does for every grad.
        """
        if coef_dtype != torch.float64 or self.lengths.min(initial=2) > 1:
            return ()
        ones = np.flatnonzero((self.lengths == 1) & (self.codes != FLOAT64))
        return tuple(int(i) for i in ones if self.tensors[i].dim() == 0)

    def check_writable(self, by_torch=()) -> None:
        """Raise before any write when torch would refuse to write in place a tensor that it
        writes after the kernels (the strided ones, and ``by_torch``), so that a failing call
        changes no grad: an expanded view (several elements at one address), or an inference
        tensor outside inference mode. (The kernels write dense inference tensors, which torch's
        own in-place ops refuse; torch's clip_grad_norm_ writes them, then raises.)"""
        for i in self.strided:
            t = self.tensors[i]
            if is_expanded(t):
                raise expanded_view_error(self.fn, f"grad {self._index(i)} of `{self.arg}` "
                                          "(counting only the tensors that have one)", t)
        written = set(self.strided).union(by_torch)
        if written and not torch.is_inference_mode_enabled():
            for i in sorted(written):
                if self.tensors[i].is_inference():
                    raise RuntimeError(
                        f"{self.fn}: grad {self._index(i)} of `{self.arg}` (counting only the tensors "
                        "that have one) is an inference tensor (made under torch.inference_mode()) "
                        "that torch must write (a sliced view, a 0-d grad, or memory listed twice), "
                        "and torch refuses to update inference tensors in place outside inference "
                        "mode. Clone it first (p.grad = p.grad.clone()).")

    def check_torch_writes_all(self) -> None:
        """``check_writable`` for a write that torch's ops make to every tensor of the table
        (an unscale, a fallback clamp)."""
        self.check_writable(range(len(self.tensors)))

    def _index(self, i: int) -> int:
        return i if self.positions is None else self.positions[i]

    def overlapping(self, skip=()) -> np.ndarray:
        """Indices of the tensors written through the table (all but the strided ones and
        ``skip``) whose memory overlaps that of a tensor before them in address order (one
        grad listed twice, overlapping views).

        torch scales such memory once per listing, one multiply after the other; kernels that
        write tensors concurrently must leave these to be written after them, in order.
        """
        lengths = self.lengths_without(tuple(self.strided) + tuple(skip))
        live = np.flatnonzero(lengths > 0)
        return live[_overlaps_earlier(self.addrs[live], lengths[live] * ITEMSIZE[self.codes[live]])]

    def refresh_copies(self) -> None:
        """Copy the strided tensors into their copies again, after torch rewrote them (a
        ``GradScaler.unscale_`` between building the table and reading it). The copies keep their
        memory, so the addresses in the table stay valid."""
        for i, copy in zip(self.strided, self.copies):
            copy.copy_(self.tensors[i])

    def shares_memory(self) -> bool:
        """True when the memory of two of the tensors overlaps (one grad under two parameters,
        views of one buffer), sliced views included (by the span from their first to their
        last element, which may report an overlap where their elements interleave)."""
        starts = self.addrs.copy()
        ends = starts + self.lengths * ITEMSIZE[self.codes]
        for i in self.strided:  # the table holds a contiguous copy's address: the view's own span
            t = self.tensors[i]
            starts[i] = t.data_ptr()
            ends[i] = starts[i] + t.element_size() * (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())))
        live = self.lengths > 0
        return bool(_overlaps_earlier(starts[live], ends[live] - starts[live]).any())


def _overlaps_earlier(starts: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """For memory spans ``[starts, starts + nbytes)``: True for each span that overlaps one that
    comes before it in address order (ties: list order)."""
    order = np.argsort(starts, kind="stable")
    ends = starts[order] + nbytes[order]
    later = np.zeros(starts.shape[0], dtype=bool)
    later[order[1:]] = starts[order][1:] < np.maximum.accumulate(ends)[:-1]
    return later


def mark_written(tensors: list[torch.Tensor], skip=()) -> None:
    """Tell autograd that a kernel wrote ``tensors`` in place, as torch's in-place ops do.

    Their version counters go up, so a graph that saved one of them (a gradient penalty built
    with ``create_graph=True``, say) refuses to backward through it, as it would after torch's
    ``mul_``, instead of silently using the new values. The tensors at indices ``skip`` are
    written by torch's own ops after the kernel, which bump them: once, as torch does.
    """
    if skip:
        skipped = set(skip)
        tensors = [t for i, t in enumerate(tensors) if i not in skipped]
    try:
        torch.autograd.graph.increment_version(tensors)  # a whole list: one C++ loop
    except TypeError:  # torch before list support: one tensor per call
        for t in tensors:
            torch.autograd.graph.increment_version(t)
