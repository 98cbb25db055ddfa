"""The bandwidth yardsticks: a plain read loop and a copy, over the benchmark's own grads.

The read loop sums every 8-byte word of every grad as uint64 in a parallel Numba loop (integer
adds vectorize without fast-math, and any dtype reads the same way): the fastest a pass that
must read each grad byte once could go on this memory. The copy is torch's ``copy_`` from the
saved grads back into the grads, the same operation that restores them between timed calls.
On CUDA the read loop is ``torch.sum`` over a flat buffer of the same size.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic

from fastclip._cpu import _numba_threads

WORDS_PER_CHUNK = 1 << 15  # 256 KiB of uint64 words per parallel work item


def _pointer(element):
    @intrinsic
    def as_pointer(typingctx, addr):
        sig = types.CPointer(element)(types.int64)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    return as_pointer


_u64_ptr = _pointer(types.uint64)
_u8_ptr = _pointer(types.uint8)


@njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def _read_words(addrs, chunk_tensor, chunk_start, chunk_stop, partials):
    for c in prange(chunk_tensor.shape[0]):
        p = _u64_ptr(addrs[chunk_tensor[c]])
        acc = np.uint64(0)
        for j in range(chunk_start[c], chunk_stop[c]):
            acc += p[j]
        partials[c] = acc


@njit(nogil=True, cache=True, boundscheck=False)
def _read_tails(tail_addrs, tail_bytes):
    acc = np.uint64(0)
    for i in range(tail_addrs.shape[0]):
        p = _u8_ptr(tail_addrs[i])
        for k in range(tail_bytes[i]):
            acc += np.uint64(p[k])
    return acc


class ReadLoop:
    """A reusable plain read over every byte of ``tensors`` (dense CPU tensors).

    Example:
        >>> import torch
        >>> loop = ReadLoop([torch.ones(1000), torch.ones(3)])
        >>> loop.nbytes
        4012
        >>> _ = loop()
    """

    def __init__(self, tensors: list[torch.Tensor]):
        addrs = np.array([t.data_ptr() for t in tensors], dtype=np.int64)
        nbytes = np.array([t.numel() * t.element_size() for t in tensors], dtype=np.int64)
        words = nbytes // 8
        self.nbytes = int(nbytes.sum())
        per_tensor = (words + WORDS_PER_CHUNK - 1) // WORDS_PER_CHUNK
        self.chunk_tensor = np.repeat(np.arange(len(tensors), dtype=np.int64), per_tensor)
        first = np.repeat(np.cumsum(per_tensor) - per_tensor, per_tensor)
        self.chunk_start = (np.arange(len(self.chunk_tensor), dtype=np.int64) - first) * WORDS_PER_CHUNK
        self.chunk_stop = np.minimum(self.chunk_start + WORDS_PER_CHUNK, words[self.chunk_tensor])
        self.addrs = addrs
        self.partials = np.zeros(len(self.chunk_tensor), dtype=np.uint64)
        has_tail = nbytes % 8 != 0
        self.tail_addrs = (addrs + 8 * words)[has_tail]
        self.tail_bytes = (nbytes % 8)[has_tail]
        self._keep = tensors  # the addresses are only valid while the tensors live

    def __call__(self) -> int:
        with _numba_threads(True):
            _read_words(self.addrs, self.chunk_tensor, self.chunk_start, self.chunk_stop, self.partials)
        # Returning the sum keeps the loads observable, so they cannot be optimized away.
        return int(self.partials.sum(dtype=np.uint64)) + int(_read_tails(self.tail_addrs, self.tail_bytes))


def read_loop(tensors: list[torch.Tensor]):
    """A callable that reads ``nbytes`` of memory once, and that byte count.

    On the CPU it reads the tensors themselves; on CUDA it sums a flat float32 buffer of the same
    size (torch's reduction kernel, one launch), since per-tensor launches would time the launches.
    """
    if tensors[0].device.type == "cpu":
        loop = ReadLoop(tensors)
        return loop, loop.nbytes
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    flat = torch.zeros((nbytes + 3) // 4, dtype=torch.float32, device=tensors[0].device)
    return (lambda: flat.sum()), nbytes
