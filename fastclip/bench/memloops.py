"""The bandwidth yardsticks: a plain read loop and a plain copy, over the benchmark's own grads.

The read loop sums every 8-byte word of every grad as uint64 in a parallel Numba loop (integer
adds vectorize without fast-math, and any dtype reads the same way): about the fastest a pass
that must read each grad byte once can go on this memory. The copy loop copies the saved grads
into the grads word by word the same way; it is also how the grads are restored between timed
calls on the CPU (one parallel call for 2000 tensors, where per-tensor ``copy_`` would time
torch's dispatch). On CUDA the read loop is ``torch.sum`` over a flat buffer of the same size
and the copy is ``torch._foreach_copy_``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from numba import njit, prange, types

from fastclip._cpu import _numba_threads
from fastclip.kernels.cpu import _pointer_intrinsic
from fastclip.kernels.startup import CACHE

WORDS_PER_CHUNK = 1 << 15  # 256 KiB of uint64 words per parallel work item


_u64_ptr = _pointer_intrinsic(types.uint64)
_u8_ptr = _pointer_intrinsic(types.uint8)


# Both loops walk each chunk as 4 interleaved streams, as fastclip's kernels do (kernels/cpu.py):
# on the CI machine that read faster than one stream, so a yardstick with one stream would flatter
# the kernels.
@njit(parallel=True, nogil=True, cache=CACHE, boundscheck=False)
def _read_words(addrs, chunk_tensor, chunk_start, chunk_stop, partials):
    for c in prange(chunk_tensor.shape[0]):
        p = _u64_ptr(addrs[chunk_tensor[c]])
        first, stop = chunk_start[c], chunk_stop[c]
        q = (stop - first) // 4
        a = np.uint64(0)
        b = np.uint64(0)
        for j in range(first, first + q):
            a += p[j] + p[j + q]
            b += p[j + 2 * q] + p[j + 3 * q]
        for j in range(first + 4 * q, stop):
            a += p[j]
        partials[c] = a + b


@njit(parallel=True, nogil=True, cache=CACHE, boundscheck=False)
def _copy_words(dst_addrs, src_addrs, chunk_tensor, chunk_start, chunk_stop):
    for c in prange(chunk_tensor.shape[0]):
        dst = _u64_ptr(dst_addrs[chunk_tensor[c]])
        src = _u64_ptr(src_addrs[chunk_tensor[c]])
        first, stop = chunk_start[c], chunk_stop[c]
        q = (stop - first) // 4
        for j in range(first, first + q):
            dst[j] = src[j]
            dst[j + q] = src[j + q]
            dst[j + 2 * q] = src[j + 2 * q]
            dst[j + 3 * q] = src[j + 3 * q]
        for j in range(first + 4 * q, stop):
            dst[j] = src[j]


@njit(nogil=True, cache=CACHE, boundscheck=False)
def _copy_tails(dst_addrs, src_addrs, tail_bytes):
    for i in range(dst_addrs.shape[0]):
        dst = _u8_ptr(dst_addrs[i])
        src = _u8_ptr(src_addrs[i])
        for k in range(tail_bytes[i]):
            dst[k] = src[k]


@njit(nogil=True, cache=CACHE, boundscheck=False)
def _read_tails(tail_addrs, tail_bytes):
    acc = np.uint64(0)
    for i in range(tail_addrs.shape[0]):
        p = _u8_ptr(tail_addrs[i])
        for k in range(tail_bytes[i]):
            acc += np.uint64(p[k])
    return acc


class _Words:
    """Dense CPU tensors as 8-byte words split into parallel chunks, plus each one's 0..7 tail bytes."""

    def __init__(self, tensors: list[torch.Tensor]):
        for t in tensors:
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError("memory loops need contiguous CPU tensors")
        self.addrs = np.array([t.data_ptr() for t in tensors], dtype=np.int64)
        nbytes = np.array([t.numel() * t.element_size() for t in tensors], dtype=np.int64)
        words = nbytes // 8
        self.nbytes = int(nbytes.sum())
        per_tensor = (words + WORDS_PER_CHUNK - 1) // WORDS_PER_CHUNK
        self.chunk_tensor = np.repeat(np.arange(len(tensors), dtype=np.int64), per_tensor)
        first = np.repeat(np.cumsum(per_tensor) - per_tensor, per_tensor)
        self.chunk_start = (np.arange(len(self.chunk_tensor), dtype=np.int64) - first) * WORDS_PER_CHUNK
        self.chunk_stop = np.minimum(self.chunk_start + WORDS_PER_CHUNK, words[self.chunk_tensor])
        self.words = words
        self.has_tail = nbytes % 8 != 0
        self.tail_addrs = (self.addrs + 8 * words)[self.has_tail]
        self.tail_bytes = (nbytes % 8)[self.has_tail]
        self._keep = tensors  # the addresses are only valid while the tensors live


class ReadLoop(_Words):
    """A reusable plain read of every byte of ``tensors`` (contiguous CPU tensors).

    Example:
        >>> import torch
        >>> loop = ReadLoop([torch.ones(1000), torch.ones(3)])
        >>> loop.nbytes
        4012
        >>> _ = loop()
    """

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__(tensors)
        self.partials = np.zeros(len(self.chunk_tensor), dtype=np.uint64)

    def __call__(self) -> int:
        with _numba_threads():
            _read_words(self.addrs, self.chunk_tensor, self.chunk_start, self.chunk_stop, self.partials)
        # Returning the sum keeps the loads observable, so they cannot be optimized away.
        return int(self.partials.sum(dtype=np.uint64)) + int(_read_tails(self.tail_addrs, self.tail_bytes))


class CopyLoop(_Words):
    """A reusable plain copy ``dst[i][:] = src[i][:]`` (contiguous CPU tensors of equal sizes).

    Example:
        >>> import torch
        >>> dst, src = [torch.zeros(5)], [torch.arange(5.0)]
        >>> CopyLoop(dst, src)()
        >>> dst[0].tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0]
    """

    def __init__(self, dst: list[torch.Tensor], src: list[torch.Tensor]):
        if [(t.numel() * t.element_size()) for t in dst] != [(t.numel() * t.element_size()) for t in src]:
            raise ValueError("CopyLoop: `dst` and `src` tensors must have the same sizes in bytes")
        super().__init__(dst)
        self.src_addrs = np.array([t.data_ptr() for t in src], dtype=np.int64)
        self.src_tail_addrs = (self.src_addrs + 8 * self.words)[self.has_tail]
        self._keep_src = src

    def __call__(self) -> None:
        with _numba_threads():
            _copy_words(self.addrs, self.src_addrs, self.chunk_tensor, self.chunk_start, self.chunk_stop)
        _copy_tails(self.tail_addrs, self.src_tail_addrs, self.tail_bytes)


def read_loop(tensors: list[torch.Tensor]):
    """A callable that reads ``nbytes`` of memory once, and that byte count.

    On the CPU it reads the tensors themselves; on CUDA it sums a flat float32 buffer of the same
    size (one launch of torch's reduction), since per-tensor launches would time the launches.
    """
    if tensors[0].device.type == "cpu":
        loop = ReadLoop(tensors)
        return loop, loop.nbytes
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    flat = torch.zeros((nbytes + 3) // 4, dtype=torch.float32, device=tensors[0].device)
    return (lambda: flat.sum()), nbytes


def copy_loop(dst: list[torch.Tensor], src: list[torch.Tensor]) -> Callable[[], None]:
    """A callable that copies ``src`` into ``dst`` tensor by tensor (same sizes, same device)."""
    if dst[0].device.type == "cpu":
        return CopyLoop(dst, src)
    return lambda: torch._foreach_copy_(dst, src)
