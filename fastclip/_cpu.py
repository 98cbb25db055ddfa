"""The CPU backend: runs the fused Numba kernels on a ``TensorTable``.

Everything that touches numba's thread pool goes through ``_numba_threads`` so a call never
changes torch's own thread count (numba's OpenMP layer shares torch's libgomp; numba #9387).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, NamedTuple, Union

import numba
import numpy as np
import torch

from fastclip._table import TensorTable, mark_written
from fastclip.kernels import cpu as K
from fastclip.kernels.layout import ChunkTable, build_chunk_table, norm_kind

# Power sums come back as host floats, and coefficients are applied as host floats.
RESULTS_ON_HOST = True

# Below this many elements one thread finishes before the others would have woken up.
PARALLEL_MIN_ELEMENTS = 1 << 21

# numba's workqueue threading layer aborts when entered from two threads at once
# (numba #8563): serialize our parallel regions.
_pool_lock = threading.Lock()


class PowerSums(NamedTuple):
    """Result of one read pass: sum of |x|**p (max |x| for inf), accumulated in float64.

    Host values from this backend; 0-d and 1-d device tensors from backends whose results stay
    on the device (``RESULTS_ON_HOST = False``, the CUDA one).

    Attributes:
        total: over all tensors.
        per_tensor: one value per tensor, in the table's order (None when not asked for).
        nonfinite: number of inf/NaN elements.
    """

    total: Union[float, torch.Tensor]
    per_tensor: Union[np.ndarray, torch.Tensor, None]
    nonfinite: Union[int, torch.Tensor]


@contextlib.contextmanager
def _numba_threads() -> Iterator[None]:
    """Run numba's parallel kernels on torch's thread count, and leave both counts (numba's is
    per thread) as the caller had them: numba's OpenMP layer shares torch's libgomp."""
    torch_threads = torch.get_num_threads()
    with _pool_lock:
        numba_threads = numba.get_num_threads()
        numba.set_num_threads(max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS)))
        try:
            yield
        finally:
            numba.set_num_threads(numba_threads)
            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)


def _chunks(table: TensorTable, skip: tuple = ()) -> ChunkTable:
    """The table's chunks, split into work groups; built once per table and ``skip``.

    ``skip``: indices of tensors the kernel must leave alone (torch writes them instead).
    """
    key = ("cpu", skip)
    cached = table.chunk_cache.get(key)
    if cached is None:
        lengths = table.lengths_without(skip)
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


def scale_(table: TensorTable, coef: float, coef_dtype: torch.dtype = torch.float32) -> None:
    """Multiply every tensor of ``table`` by ``coef`` in place, as torch's ``g.mul_(c)`` does
    with ``c`` a 0-d ``coef_dtype`` tensor holding ``coef``.

    A coefficient >= 1 means torch would multiply by exactly 1: nothing changes, so nothing is
    written. NaN (from a NaN norm) is not >= 1 and is applied, as torch does.
    """
    by_torch = tuple(table.strided) + table.promoted_scalars(coef_dtype)
    table.check_writable(by_torch)  # torch's mul_ refuses those whatever the coefficient
    if coef >= 1.0:
        return
    chunks = _chunks(table, by_torch)
    if chunks.group_bounds.shape[0] > 2 and table.overlapping(by_torch).size:
        # The same memory listed twice (e.g. one grad passed twice) is scaled twice by torch, one
        # multiply after the other; threads would race on it. One group runs the chunks in order.
        chunks = chunks._replace(group_bounds=np.array([0, chunks.n_chunks], dtype=np.int64))
    _launch(K.scale_serial, K.scale_parallel, table, chunks, float(coef))
    mark_written(table.tensors, skip=by_torch)
    if by_torch:
        c = torch.tensor(coef, dtype=coef_dtype)
        for i in by_torch:
            table.tensors[i].mul_(c)


def clamp_(table: TensorTable, bound: float) -> None:
    """Clamp every tensor of ``table`` to ``[-bound, bound]`` in place."""
    table.check_writable()
    # Strided tensors are read through their contiguous copies (``table.copies``): clamp those
    # with the others, then copy them back, so every dtype gets the same clamp (torch's
    # ``clamp_`` would refuse a bound beyond float16's range, after the kernel had written).
    _launch(K.clamp_serial, K.clamp_parallel, table, _chunks(table), float(bound))
    mark_written(table.tensors, skip=table.strided)
    for i, copy in zip(table.strided, table.copies):
        table.tensors[i].copy_(copy)


__all__ = ["PowerSums", "power_sums", "scale_", "clamp_"]
