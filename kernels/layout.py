"""The shared vocabulary of every kernel: dtype codes, norm kinds and the chunk table.

A gradient set reaches a kernel as a *tensor table*: three parallel arrays holding, for tensor
``t``, its address ``addrs[t]``, its element count ``lengths[t]`` and its dtype code
``codes[t]``. The chunk table splits every tensor into chunks of at most ``chunk_size``
elements; a chunk never spans two tensors, so each one is a plain loop over one dtype.

Per-chunk partial results are always combined in chunk order, which is what makes every
result bitwise identical whatever the number of threads or CUDA blocks.

The CPU and CUDA backends both build their chunk tables here.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .startup import njit

# Dtype codes. 16-bit floats are read through their bits (uint16): numba's CPU target cannot
# do float16 arithmetic and bfloat16 has no numpy dtype.
FLOAT32 = 0
FLOAT64 = 1
FLOAT16 = 2
BFLOAT16 = 3
DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")

# Norm kinds. ``POWER`` is any other finite p > 0 (sum of |x|**p).
NORM_L2 = 0
NORM_L1 = 1
NORM_INF = 2
NORM_POWER = 3

# 64K elements: large enough that a chunk's loop runs at memory speed, small enough that the
# CUDA path gets thousands of chunks to spread over blocks. On the 2-core CPU, chunk sizes from
# 16K to 1M gave norm passes within run-to-run noise of each other (benchmarks/README.md).
DEFAULT_CHUNK_SIZE = 1 << 16


class ChunkTable(NamedTuple):
    """Chunks of a tensor table, and their split into groups of about equal work.

    Attributes:
        tensor: index of the tensor each chunk belongs to (int64).
        start: first element of each chunk, within its tensor (int64).
        stop: one past the last element of each chunk (int64).
        group_bounds: chunks ``group_bounds[g]:group_bounds[g + 1]`` form work group ``g``;
            a parallel loop runs over groups, each holding about the same element count.
    """

    tensor: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    group_bounds: np.ndarray

    @property
    def n_chunks(self) -> int:
        return int(self.tensor.shape[0])


def norm_kind(p: float) -> int:
    """The kernel's norm kind for a validated ``p > 0``."""
    if p == 2.0:
        return NORM_L2
    if p == 1.0:
        return NORM_L1
    if p == float("inf"):
        return NORM_INF
    return NORM_POWER


def build_chunk_table(
    lengths: np.ndarray, chunk_size: int = DEFAULT_CHUNK_SIZE, n_groups: int = 1
) -> ChunkTable:
    """Split tensors of ``lengths`` elements into chunks and balanced work groups.

    Args:
        lengths: element count of each tensor (int64; zero-length tensors get no chunk).
        chunk_size: the most elements in one chunk.
        n_groups: how many work groups to form (at most one per chunk).

    Returns:
        The ``ChunkTable``. Chunk boundaries depend on ``lengths`` and ``chunk_size`` only, never
        on ``n_groups``, so per-chunk partials (and every result) do not depend on threads.

    Example:
        >>> import numpy as np
        >>> t = build_chunk_table(np.array([5, 0, 3]), chunk_size=4, n_groups=2)
        >>> t.tensor.tolist(), t.start.tolist(), t.stop.tolist()
        ([0, 0, 2], [0, 4, 0], [4, 5, 3])
        >>> t.group_bounds.tolist()
        [0, 1, 3]
    """
    tensor, start, stop, group_bounds = _chunk_arrays(
        np.asarray(lengths, dtype=np.int64), np.int64(chunk_size), np.int64(n_groups))
    return ChunkTable(tensor, start, stop, group_bounds)


# Compiled: the same few numpy steps cost ~75 us per call in small-array overhead.
@njit(cache=True, nogil=True)
def _chunk_arrays(lengths, chunk_size, n_groups):
    n_chunks = 0
    for t in range(lengths.shape[0]):
        n_chunks += (lengths[t] + chunk_size - 1) // chunk_size
    tensor = np.empty(n_chunks, dtype=np.int64)
    start = np.empty(n_chunks, dtype=np.int64)
    stop = np.empty(n_chunks, dtype=np.int64)
    c = 0
    for t in range(lengths.shape[0]):
        for first in range(0, lengths[t], chunk_size):
            tensor[c] = t
            start[c] = first
            stop[c] = min(first + chunk_size, lengths[t])
            c += 1
    return tensor, start, stop, _balanced_bounds(stop - start, n_groups)


@njit(cache=True, nogil=True)
def _balanced_bounds(chunk_lengths, n_groups):
    """Cut the chunk sequence into at most ``n_groups`` runs of about equal element counts.

    Run ``k`` ends after the first chunk whose running total reaches ``k / n_groups`` of all
    elements.
    """
    n_chunks = chunk_lengths.shape[0]
    n_groups = max(1, min(n_groups, n_chunks))
    bounds = np.empty(n_groups + 1, dtype=np.int64)
    bounds[0] = 0
    bounds[n_groups] = n_chunks
    total = 0
    for i in range(n_chunks):
        total += chunk_lengths[i]
    running = 0
    k = 1
    for i in range(n_chunks):
        running += chunk_lengths[i]
        while k < n_groups and running >= total * k / n_groups:
            bounds[k] = i + 1
            k += 1
    while k < n_groups:
        bounds[k] = n_chunks
        k += 1
    return bounds
