"""Fused CPU kernels for unit-wise adaptive gradient clipping (AGC, Brock et al., 2021).

A *unit* is a row (a slice along dim 0) of a weight of two or more dimensions, and the whole
tensor for a vector or a scalar. Each tensor reaches the kernels as a pair of addresses (the
parameter's and its grad's), a dtype code, a row count and a row length: every unit is a block
of ``row_len`` consecutive elements starting at ``row * row_len``.

The work is cut into chunks of whole rows (about ``chunk_size`` elements each) so that threads
get balanced work. A chunk reads each of its rows' weight and grad once, computes both float64
norms, and scales the row at once while it is still in cache: a set of ordinary rows costs one
read of the weights and grads, and one write of the rows that are clipped. A row longer than
``chunk_size`` (e.g. a long bias vector) is split into *pieces*: a first pass writes each piece's
partial sums, and a second pass lets each piece add its row's partials in a fixed order, then
scale itself. Every row's sum is accumulated in one fixed order whatever the thread count, so
results are bitwise reproducible.

The address -> pointer and 16-bit float intrinsics come from ``cpu.py``. numba's on-disk cache
does not notice a change in code imported from another module (numba #8359): after editing an
intrinsic in ``cpu.py``, clear this module's cache (``kernels/__pycache__/agc.*``). The small
bfloat16 helpers are jitted here rather than imported for the same reason.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import prange

from .cpu import (enter_flush_mode, f32_as_u32, f32_ptr, f32_to_half, f64_ptr, flush_mode, half_to_f32,
                  leave_flush_mode, u16_ptr, u32_as_f32)
from .layout import DEFAULT_CHUNK_SIZE, FLOAT16, FLOAT32, FLOAT64, _balanced_bounds
from .startup import njit

_FAST = {"reassoc", "contract"}  # no 'nnan'/'ninf': NaN and inf must survive (see cpu.py)
_JIT = dict(nogil=True, cache=True, fastmath=_FAST, error_model="numpy", boundscheck=False)

# The floor under a unit's grad norm in the coefficient, as in the paper's reference code.
GRAD_NORM_FLOOR = 1e-6


class AgcChunks(NamedTuple):
    """Chunks of an AGC table: runs of whole rows, or pieces of one long row.

    Attributes:
        tensor: the tensor of each chunk.
        row0, row1: the chunk's rows are ``row0:row1`` (one row for a piece).
        start, stop: the elements ``start:stop`` of each of those rows (the whole row,
            ``0:row_len``, unless the chunk is a piece).
        first, n_pieces: a piece's row is made of chunks ``first:first + n_pieces``; a chunk of
            whole rows has ``first == itself`` and ``n_pieces == 1``.
        group_bounds: balanced groups of all chunks (the first pass).
        pieces: indices of the piece chunks (the second pass; empty when no row is split).
        piece_bounds: balanced groups of ``pieces``.
    """

    tensor: np.ndarray
    row0: np.ndarray
    row1: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    first: np.ndarray
    n_pieces: np.ndarray
    group_bounds: np.ndarray
    pieces: np.ndarray
    piece_bounds: np.ndarray

    @property
    def n_chunks(self) -> int:
        return int(self.tensor.shape[0])


def build_agc_chunks(
    n_rows: np.ndarray, row_len: np.ndarray, chunk_size: int = DEFAULT_CHUNK_SIZE, n_groups: int = 1
) -> AgcChunks:
    """Cut tensors of ``n_rows`` rows of ``row_len`` elements into AGC chunks.

    Chunk boundaries depend on the shapes and ``chunk_size`` only, never on ``n_groups``, so the
    results do not depend on the thread count.

    Example:
        >>> import numpy as np
        >>> c = build_agc_chunks(np.array([5, 1]), np.array([2, 9]), chunk_size=4)
        >>> c.tensor.tolist(), c.row0.tolist(), c.row1.tolist()
        ([0, 0, 0, 1, 1, 1], [0, 2, 4, 0, 0, 0], [2, 4, 5, 1, 1, 1])
        >>> c.start.tolist(), c.stop.tolist(), c.first.tolist(), c.pieces.tolist()
        ([0, 0, 0, 0, 4, 8], [2, 2, 2, 4, 8, 9], [0, 1, 2, 3, 3, 3], [3, 4, 5])
    """
    n_rows = np.asarray(n_rows, dtype=np.int64)
    row_len = np.asarray(row_len, dtype=np.int64)
    short = row_len <= chunk_size
    rows_per_chunk = np.where(short, np.maximum(1, chunk_size // np.maximum(row_len, 1)), 1)
    pieces_per_row = np.where(short, 1, -(-row_len // chunk_size))
    per_tensor = np.where(short, -(-n_rows // rows_per_chunk), n_rows * pieces_per_row)
    per_tensor = np.where(row_len > 0, per_tensor, 0)
    n_chunks = int(per_tensor.sum())
    tensor = np.repeat(np.arange(n_rows.shape[0], dtype=np.int64), per_tensor)
    index = np.arange(n_chunks, dtype=np.int64)
    in_tensor = index - np.repeat(np.cumsum(per_tensor) - per_tensor, per_tensor)
    t_short = short[tensor]
    count = pieces_per_row[tensor]
    piece = in_tensor % count  # 0 for chunks of whole rows
    length = row_len[tensor]
    row0 = np.where(t_short, in_tensor * rows_per_chunk[tensor], in_tensor // count)
    row1 = np.where(t_short, np.minimum(row0 + rows_per_chunk[tensor], n_rows[tensor]), row0 + 1)
    start = piece * chunk_size
    stop = np.where(t_short, length, np.minimum(start + chunk_size, length))
    elements = (row1 - row0) * (stop - start)
    pieces = np.flatnonzero(~t_short).astype(np.int64)
    return AgcChunks(tensor, row0, row1, start, stop, index - piece, count,
                     _balanced_bounds(elements, n_groups), pieces,
                     _balanced_bounds(elements[pieces], n_groups))


# --- helpers ---------------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _bf16_to_f32(bits):
    return u32_as_f32(np.uint32(bits) << np.uint32(16))


@njit(inline="always", **_JIT)
def _f32_to_bf16(value):
    # Round to nearest even with a NaN guard: bit-identical to torch's float -> bfloat16.
    if value != value:
        return np.uint16(0x7FC0)
    u = f32_as_u32(value)
    bias = ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return np.uint16((u + bias) >> np.uint32(16))


@njit(**_JIT)
def unit_coef(w_sq, g_sq, clipping, eps):
    """The factor for one unit from its float64 sums of squares; 1.0 when it is not clipped.

    ``max_norm = clipping * max(||W||, eps)``; the unit is clipped when ``||G|| > max_norm``,
    by ``max_norm / max(||G||, 1e-6)`` (always < 1 then). NaN in W or G never triggers a clip,
    as in ``nfnets/optim.py``; an inf grad norm gives 0 (so inf * 0 = NaN, like it).
    """
    w_norm = np.sqrt(w_sq)
    g_norm = np.sqrt(g_sq)
    floor = w_norm if (w_norm >= eps or w_norm != w_norm) else eps  # NaN-propagating max
    max_norm = clipping * floor
    if g_norm > max_norm:
        return max_norm / max(g_norm, GRAD_NORM_FLOOR)
    return 1.0


@njit(**_JIT)
def _pair_sums(waddr, gaddr, code, start, stop):
    """Float64 sums of squares of the weight and grad elements ``start:stop``."""
    ws = np.float64(0.0)  # not 0.0: NumPy 1.x stubs refuse numpy floats added to a float (same to numba)
    gs = np.float64(0.0)
    if code == FLOAT32:
        w = f32_ptr(waddr)
        g = f32_ptr(gaddr)
        for j in range(start, stop):
            a = np.float64(w[j])
            b = np.float64(g[j])
            ws += a * a
            gs += b * b
    elif code == FLOAT64:
        w64 = f64_ptr(waddr)
        g64 = f64_ptr(gaddr)
        for j in range(start, stop):
            ws += w64[j] * w64[j]
            gs += g64[j] * g64[j]
    elif code == FLOAT16:
        wh = u16_ptr(waddr)
        gh = u16_ptr(gaddr)
        for j in range(start, stop):
            a = np.float64(half_to_f32(wh[j]))
            b = np.float64(half_to_f32(gh[j]))
            ws += a * a
            gs += b * b
    else:
        wb = u16_ptr(waddr)
        gb = u16_ptr(gaddr)
        for j in range(start, stop):
            a = np.float64(_bf16_to_f32(wb[j]))
            b = np.float64(_bf16_to_f32(gb[j]))
            ws += a * a
            gs += b * b
    return ws, gs


@njit(**_JIT)
def _scale_range(gaddr, code, start, stop, coef):
    # 32- and 16-bit grads multiply in float32 by float32(coef), then round: the arithmetic of
    # torch's grad.mul_(coef), so results are bit-identical to it.
    c32 = np.float32(coef)
    if code == FLOAT32:
        x = f32_ptr(gaddr)
        for j in range(start, stop):
            x[j] = x[j] * c32
    elif code == FLOAT64:
        y = f64_ptr(gaddr)
        for j in range(start, stop):
            y[j] = y[j] * coef
    elif code == FLOAT16:
        h = u16_ptr(gaddr)
        for j in range(start, stop):
            h[j] = f32_to_half(half_to_f32(h[j]) * c32)
    else:
        b = u16_ptr(gaddr)
        for j in range(start, stop):
            b[j] = _f32_to_bf16(_bf16_to_f32(b[j]) * c32)


# --- the two passes --------------------------------------------------------------------------
# Each pass runs over chunks ``first:last``: all of them on the calling thread (small sets), or
# one run per balanced group in a parallel loop. Every unit is summed by one run in one order,
# so the two give bitwise-identical results.


@njit(**_JIT)
def _rows_run(waddrs, gaddrs, codes, row_len, row_base, c_tensor, c_row0, c_row1, c_start, c_stop,
              c_count, first, last, clipping, eps, w_sq, g_sq, piece_w, piece_g):
    for c in range(first, last):
        t = c_tensor[c]
        length = row_len[t]
        code = codes[t]
        if c_count[c] == 1:  # whole rows: sum, decide and scale each while it is in cache
            for r in range(c_row0[c], c_row1[c]):
                s = r * length
                ws, gs = _pair_sums(waddrs[t], gaddrs[t], code, s, s + length)
                w_sq[row_base[t] + r] = ws
                g_sq[row_base[t] + r] = gs
                coef = unit_coef(ws, gs, clipping, eps)
                if coef < 1.0:
                    _scale_range(gaddrs[t], code, s, s + length, coef)
        else:  # a piece of a long row: its partial sums only
            s = c_row0[c] * length
            ws, gs = _pair_sums(waddrs[t], gaddrs[t], code, s + c_start[c], s + c_stop[c])
            piece_w[c] = ws
            piece_g[c] = gs


@njit(**_JIT)
def _pieces_run(gaddrs, codes, row_len, row_base, c_tensor, c_row0, c_start, c_stop, c_first,
                c_count, pieces, first_piece, last_piece, clipping, eps, w_sq, g_sq, piece_w,
                piece_g):
    for i in range(first_piece, last_piece):
        c = pieces[i]
        first = c_first[c]
        ws = 0.0
        gs = 0.0
        for k in range(first, first + c_count[c]):  # the row's partials, in a fixed order
            ws += piece_w[k]
            gs += piece_g[k]
        t = c_tensor[c]
        if c == first:
            w_sq[row_base[t] + c_row0[c]] = ws
            g_sq[row_base[t] + c_row0[c]] = gs
        coef = unit_coef(ws, gs, clipping, eps)
        if coef < 1.0:
            s = c_row0[c] * row_len[t]
            _scale_range(gaddrs[t], codes[t], s + c_start[c], s + c_stop[c], coef)


@njit(**_JIT)
def agc_rows_serial(waddrs, gaddrs, codes, row_len, row_base, c_tensor, c_row0, c_row1, c_start,
                    c_stop, c_count, group_bounds, clipping, eps, w_sq, g_sq, piece_w, piece_g):
    """First pass: clip every unit of the chunks of whole rows; partial sums of the pieces."""
    _rows_run(waddrs, gaddrs, codes, row_len, row_base, c_tensor, c_row0, c_row1, c_start, c_stop,
              c_count, 0, c_tensor.shape[0], clipping, eps, w_sq, g_sq, piece_w, piece_g)


@njit(parallel=True, **_JIT)
def agc_rows_parallel(waddrs, gaddrs, codes, row_len, row_base, c_tensor, c_row0, c_row1, c_start,
                      c_stop, c_count, group_bounds, clipping, eps, w_sq, g_sq, piece_w, piece_g):
    mode = flush_mode()  # the caller's denormal mode, on every thread (see kernels/cpu.py)
    for grp in prange(group_bounds.shape[0] - 1):
        saved = enter_flush_mode(mode)
        _rows_run(waddrs, gaddrs, codes, row_len, row_base, c_tensor, c_row0, c_row1, c_start,
                  c_stop, c_count, group_bounds[grp], group_bounds[grp + 1], clipping, eps, w_sq,
                  g_sq, piece_w, piece_g)
        leave_flush_mode(saved)


@njit(**_JIT)
def agc_pieces_serial(gaddrs, codes, row_len, row_base, c_tensor, c_row0, c_start, c_stop, c_first,
                      c_count, pieces, piece_bounds, clipping, eps, w_sq, g_sq, piece_w, piece_g):
    """Second pass: each piece adds its row's partials, then scales itself if clipped."""
    _pieces_run(gaddrs, codes, row_len, row_base, c_tensor, c_row0, c_start, c_stop, c_first,
                c_count, pieces, 0, pieces.shape[0], clipping, eps, w_sq, g_sq, piece_w, piece_g)


@njit(parallel=True, **_JIT)
def agc_pieces_parallel(gaddrs, codes, row_len, row_base, c_tensor, c_row0, c_start, c_stop,
                        c_first, c_count, pieces, piece_bounds, clipping, eps, w_sq, g_sq, piece_w,
                        piece_g):
    mode = flush_mode()
    for grp in prange(piece_bounds.shape[0] - 1):
        saved = enter_flush_mode(mode)
        _pieces_run(gaddrs, codes, row_len, row_base, c_tensor, c_row0, c_start, c_stop, c_first,
                    c_count, pieces, piece_bounds[grp], piece_bounds[grp + 1], clipping, eps,
                    w_sq, g_sq, piece_w, piece_g)
        leave_flush_mode(saved)


def adaptive_clip(waddrs, gaddrs, codes, n_rows, row_len, clipping, eps,
                  chunk_size=DEFAULT_CHUNK_SIZE, n_groups=1, parallel=False):
    """Run AGC over a table in place; return the float64 sums of squares of every unit.

    Args:
        waddrs, gaddrs: int64 addresses of each parameter and of its grad.
        codes: dtype code of each tensor (parameter and grad share it).
        n_rows, row_len: units per tensor, and elements per unit.
        clipping, eps: AGC's ``clipping`` and ``eps``.
        chunk_size, n_groups, parallel: how the work is cut and run.

    Returns:
        ``(w_sq, g_sq)``: the units' sums of squares, tensor after tensor, row after row
        (``g_sq`` is taken before clipping).
    """
    n_rows = np.asarray(n_rows, dtype=np.int64)
    row_len = np.asarray(row_len, dtype=np.int64)
    chunks = build_agc_chunks(n_rows, row_len, chunk_size, n_groups)
    row_base = np.cumsum(n_rows) - n_rows
    total_rows = int(n_rows.sum())
    w_sq = np.zeros(total_rows, dtype=np.float64)
    g_sq = np.zeros(total_rows, dtype=np.float64)
    piece_w = np.zeros(chunks.n_chunks, dtype=np.float64)
    piece_g = np.zeros(chunks.n_chunks, dtype=np.float64)
    rows = agc_rows_parallel if parallel else agc_rows_serial
    rows(waddrs, gaddrs, codes, row_len, row_base, chunks.tensor, chunks.row0, chunks.row1,
         chunks.start, chunks.stop, chunks.n_pieces, chunks.group_bounds, float(clipping), float(eps),
         w_sq, g_sq, piece_w, piece_g)
    if chunks.pieces.shape[0]:
        finish = agc_pieces_parallel if parallel else agc_pieces_serial
        finish(gaddrs, codes, row_len, row_base, chunks.tensor, chunks.row0, chunks.start,
               chunks.stop, chunks.first, chunks.n_pieces, chunks.pieces, chunks.piece_bounds,
               float(clipping), float(eps), w_sq, g_sq, piece_w, piece_g)
    return w_sq, g_sq
