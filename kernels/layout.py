"""The shared vocabulary of every kernel: dtype codes, norm kinds and the chunk table.

A gradient set reaches a kernel as a *tensor table*: three parallel arrays holding, for tensor
``t``, its address ``addrs[t]``, its element count ``lengths[t]`` and its dtype code
``codes[t]``. The chunk table splits every tensor into chunks of at most ``chunk_size``
elements; a chunk never spans two tensors, so each one is a plain loop over one dtype.

Per-chunk partial results are always combined in chunk order, which is what makes every
result bitwise identical whatever the number of threads or CUDA blocks.

This module is numpy only: the CPU and CUDA kernels both import it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

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
    lengths = np.asarray(lengths, dtype=np.int64)
    per_tensor = (lengths + (chunk_size - 1)) // chunk_size
    n_chunks = int(per_tensor.sum())
    tensor = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), per_tensor)
    # Position of each chunk within its tensor: 0, 1, 2, ... restarting at every tensor.
    first_chunk = np.cumsum(per_tensor) - per_tensor
    index_in_tensor = np.arange(n_chunks, dtype=np.int64) - np.repeat(first_chunk, per_tensor)
    start = index_in_tensor * chunk_size
    stop = np.minimum(start + chunk_size, lengths[tensor])
    group_bounds = _balanced_bounds(stop - start, n_groups)
    return ChunkTable(tensor, start, stop, group_bounds)


def _balanced_bounds(chunk_lengths: np.ndarray, n_groups: int) -> np.ndarray:
    """Cut the chunk sequence into at most ``n_groups`` runs of about equal element counts."""
    n_chunks = chunk_lengths.shape[0]
    n_groups = max(1, min(n_groups, n_chunks))
    if n_groups == 1:
        return np.array([0, n_chunks], dtype=np.int64)
    ends = np.cumsum(chunk_lengths)
    targets = ends[-1] * np.arange(1, n_groups, dtype=np.float64) / n_groups
    cuts = np.searchsorted(ends, targets, side="left") + 1
    bounds = np.concatenate(([0], np.minimum(cuts, n_chunks), [n_chunks])).astype(np.int64)
    return np.maximum.accumulate(bounds)
