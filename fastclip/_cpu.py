"""The CPU backend: runs the fused Numba kernels on a ``TensorTable``.

Everything that touches numba's thread pool goes through ``_numba_threads`` so a call never
changes torch's own thread count (numba's OpenMP layer shares torch's libgomp; numba #9387).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, NamedTuple

import numba
import numpy as np
import torch

from fastclip._table import TensorTable
from fastclip.kernels import cpu as K
from fastclip.kernels.layout import ChunkTable, build_chunk_table, norm_kind

# Below this many elements one thread finishes before the others would have woken up.
PARALLEL_MIN_ELEMENTS = 1 << 21

# numba's workqueue threading layer aborts when entered from two threads at once
# (numba #8563): serialize our parallel regions.
_pool_lock = threading.Lock()


class PowerSums(NamedTuple):
    """Result of one read pass: sum of |x|**p (max |x| for inf), accumulated in float64.

    Attributes:
        total: over all tensors.
        per_tensor: one value per tensor, in the table's order.
        nonfinite: number of inf/NaN elements.
    """

    total: float
    per_tensor: np.ndarray
    nonfinite: int


@contextlib.contextmanager
def _numba_threads() -> Iterator[None]:
    torch_threads = torch.get_num_threads()
    with _pool_lock:
        numba.set_num_threads(max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS)))
        try:
            yield
        finally:
            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)


def _chunks(table: TensorTable, writable: bool = False) -> ChunkTable:
    """The table's chunks, split into work groups; built once per table."""
    key = ("cpu", writable and bool(table.strided))
    cached = table.chunk_cache.get(key)
    if cached is None:
        lengths = table.writable_lengths() if key[1] else table.lengths
        # Small sets run as one group on the calling thread (see kernels/cpu.py).
        n_groups = torch.get_num_threads() if int(lengths.sum()) >= PARALLEL_MIN_ELEMENTS else 1
        cached = table.chunk_cache[key] = build_chunk_table(lengths, n_groups=n_groups)
    return cached


def _launch(serial, parallel, table: TensorTable, chunks: ChunkTable, *args) -> None:
    """Run one kernel over the table: on the thread pool when the chunks form several groups."""
    operands = (table.addrs, table.codes, chunks.tensor, chunks.start, chunks.stop,
                chunks.group_bounds, *args)
    if chunks.group_bounds.shape[0] > 2:
        with _numba_threads():
            parallel(*operands)
    else:
        serial(*operands)


def power_sums(table: TensorTable, p: float, count_nonfinite: bool = False) -> PowerSums:
    """One read pass over every tensor of ``table``: float64 sums of |x|**p, and their total."""
    kind = norm_kind(p)
    chunks = _chunks(table)
    partials = np.empty(chunks.n_chunks, dtype=np.float64)
    _launch(K.chunk_power_sums_serial, K.chunk_power_sums_parallel, table, chunks,
            kind, float(p), partials)
    n = len(table.tensors)
    per_tensor = np.empty(n, dtype=np.float64)
    total = K.combine_partials(chunks.tensor, partials, kind, n, per_tensor)
    nonfinite = 0
    if count_nonfinite and not np.isfinite(total):
        counts = np.empty(n, dtype=np.int64)
        nonfinite = int(K.count_nonfinite(table.addrs, table.codes, chunks.tensor, chunks.start,
                                          chunks.stop, partials, counts))
    return PowerSums(float(total), per_tensor, nonfinite)


_ITEMSIZE = np.array([4, 8, 2, 2], dtype=np.int64)  # by dtype code (kernels/layout.py)


def _aliased(table: TensorTable) -> bool:
    """True when two tensors written through the table share memory."""
    lengths = table.writable_lengths()
    live = lengths > 0
    starts = table.addrs[live]
    order = np.argsort(starts, kind="stable")
    starts = starts[order]
    ends = (starts + (lengths[live] * _ITEMSIZE[table.codes[live]])[order])
    return bool(np.any(starts[1:] < np.maximum.accumulate(ends)[:-1]))


def _check_strided_writable(table: TensorTable) -> None:
    """Raise before any write when torch would refuse to write a strided tensor in place (an
    expanded view: several elements at one address), so a failing call changes no grad."""
    for i in table.strided:
        t = table.tensors[i]
        if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
            raise RuntimeError(
                f"gradient {i} of this device is an expanded view (stride {tuple(t.stride())}): "
                "several of its elements share one memory location, so it cannot be written in "
                "place. Give it its own memory first (p.grad = p.grad.clone()).")


def scale_(table: TensorTable, coef: float) -> None:
    """Multiply every tensor of ``table`` by ``coef`` in place (torch's ``mul_`` rounding).

    A coefficient >= 1 means torch would multiply by exactly 1: nothing changes, so nothing is
    written. NaN (from a NaN norm) is not >= 1 and is applied, as torch does.
    """
    if coef >= 1.0:
        return
    _check_strided_writable(table)
    chunks = _chunks(table, writable=True)
    if chunks.group_bounds.shape[0] > 2 and _aliased(table):
        # The same memory listed twice (e.g. one grad passed twice) is scaled twice by torch, one
        # multiply after the other; threads would race on it. One group runs the chunks in order.
        chunks = chunks._replace(group_bounds=np.array([0, chunks.n_chunks], dtype=np.int64))
    _launch(K.scale_serial, K.scale_parallel, table, chunks, float(coef))
    for i in table.strided:
        table.tensors[i].mul_(coef)


def clamp_(table: TensorTable, bound: float) -> None:
    """Clamp every tensor of ``table`` to ``[-bound, bound]`` in place."""
    _check_strided_writable(table)
    _launch(K.clamp_serial, K.clamp_parallel, table, _chunks(table, writable=True), float(bound))
    for i in table.strided:
        table.tensors[i].clamp_(min=-bound, max=bound)


__all__ = ["PowerSums", "power_sums", "scale_", "clamp_"]
