"""numba-cuda kernels for unit-wise adaptive gradient clipping, and a flag-gated zeroing kernel.

The AGC kernels follow ``agc.py``'s design (same chunks, same per-unit formula, float64
accumulation), mapped to blocks:

- ``agc_rows``: one block per chunk. For a chunk of whole rows, the block splits into groups of
  ``lanes`` threads (a power of two picked from the row length); each group reduces one row's
  sums of squares in shared memory, computes the unit's factor, and scales the row at once.
  For a piece of a long row, the whole block reduces the piece into ``piece_w``/``piece_g``.
- ``agc_pieces``: one block per piece: adds its row's partials in a fixed order, then scales
  itself. Launched only when some row is longer than a chunk.

Reductions are fixed trees over shared memory (no atomics), so results are bitwise reproducible.

``zero_if_flag`` zeroes every element of a tensor table when a device flag is set, and returns at
once otherwise: ``GradClipper(nonfinite="zero")`` uses it to zero non-finite grads without reading
the flag back to the host.

Everything runs unchanged in numba's simulator (``NUMBA_ENABLE_CUDASIM=1``), where intrinsics do
not exist: the few device primitives (address -> pointer, 16-bit decode/encode) come from
``cuda.py``, which swaps them for numpy equivalents at import. The host-side drivers (``run_agc``, ``run_zero_if``) take the
device-array maker and the stream as arguments, so tests drive them with numpy arrays.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from .agc import GRAD_NORM_FLOOR, build_agc_chunks
# The device primitives (address -> global pointer, 16-bit decode/encode) and their simulator
# stand-ins are the sum-of-powers kernels' own: one swap at import serves both modules.
from .cuda import (
    SIMULATOR,
    _device,
    _kernel,
    as_f32,
    as_f64,
    as_u16,
    bf16_to_f32,
    f32_to_bf16,
    f32_to_half,
    half_to_f32,
)
from .layout import DEFAULT_CHUNK_SIZE, FLOAT16, FLOAT32, FLOAT64, build_chunk_table

# Threads per block (a power of two; every reduction tree assumes it). The simulator runs each
# thread as a Python thread, so it gets small blocks: the logic is the same for any power of two.
BLOCK = 32 if SIMULATOR else 256


@_device
def unit_coef(w_sq, g_sq, clipping, eps):
    """Same formula as ``agc.unit_coef``: 1.0 when the unit is not clipped."""
    w_norm = math.sqrt(w_sq)
    g_norm = math.sqrt(g_sq)
    floor = w_norm if (w_norm >= eps or w_norm != w_norm) else eps
    max_norm = clipping * floor
    if g_norm > max_norm:
        return max_norm / max(g_norm, GRAD_NORM_FLOOR)
    return 1.0


@_device
def pair_sums(waddr, gaddr, code, start, stop, step):
    """Float64 sums of squares of weight and grad elements ``start, start + step, ... < stop``."""
    ws = np.float64(0.0)  # not 0.0: NumPy 1.x stubs refuse numpy floats added to a float (same to numba)
    gs = np.float64(0.0)
    if code == FLOAT32:
        w = as_f32(waddr, stop)
        g = as_f32(gaddr, stop)
        for j in range(start, stop, step):
            a = np.float64(w[j])
            b = np.float64(g[j])
            ws += a * a
            gs += b * b
    elif code == FLOAT64:
        w64 = as_f64(waddr, stop)
        g64 = as_f64(gaddr, stop)
        for j in range(start, stop, step):
            ws += w64[j] * w64[j]
            gs += g64[j] * g64[j]
    elif code == FLOAT16:
        wh = as_u16(waddr, stop)
        gh = as_u16(gaddr, stop)
        for j in range(start, stop, step):
            a = np.float64(half_to_f32(wh[j]))
            b = np.float64(half_to_f32(gh[j]))
            ws += a * a
            gs += b * b
    else:
        wb = as_u16(waddr, stop)
        gb = as_u16(gaddr, stop)
        for j in range(start, stop, step):
            a = np.float64(bf16_to_f32(wb[j]))
            b = np.float64(bf16_to_f32(gb[j]))
            ws += a * a
            gs += b * b
    return ws, gs


@_device
def scale_strided(gaddr, code, start, stop, step, coef):
    # float32(coef) for 32- and 16-bit grads: the arithmetic of torch's grad.mul_(coef).
    c32 = np.float32(coef)
    if code == FLOAT32:
        x = as_f32(gaddr, stop)
        for j in range(start, stop, step):
            x[j] = x[j] * c32
    elif code == FLOAT64:
        y = as_f64(gaddr, stop)
        for j in range(start, stop, step):
            y[j] = y[j] * coef
    elif code == FLOAT16:
        h = as_u16(gaddr, stop)
        for j in range(start, stop, step):
            h[j] = f32_to_half(half_to_f32(h[j]) * c32)
    else:
        b = as_u16(gaddr, stop)
        for j in range(start, stop, step):
            b[j] = f32_to_bf16(bf16_to_f32(b[j]) * c32)


# --- kernels ---------------------------------------------------------------------------------
# Each launch gets two arrays: ``meta`` (int64: the table and the chunks, packed; see
# ``meta_layout``) and ``out`` (float64: the units' sums and the pieces' partials). Few array
# arguments keep the per-launch typing cost of numba-cuda small (numba-cuda #98).


def meta_layout(n: int, nc: int, n_pieces: int = 0) -> dict:
    """Offsets of the sections of an AGC ``meta`` array for ``n`` tensors and ``nc`` chunks."""
    names = ("waddr", "gaddr", "code", "len", "base", "lanes")
    chunk_names = ("tensor", "row0", "row1", "start", "stop", "first", "count")
    offsets = {name: i * n for i, name in enumerate(names)}
    offsets.update({name: 6 * n + i * nc for i, name in enumerate(chunk_names)})
    offsets["pieces"] = 6 * n + 7 * nc
    offsets["size"] = 6 * n + 7 * nc + n_pieces
    return offsets


def _agc_rows(meta, out, n, nc, rows, clipping, eps):
    c = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    sw = cuda.shared.array(BLOCK, types.float64)
    sg = cuda.shared.array(BLOCK, types.float64)
    sc = cuda.shared.array(BLOCK, types.float64)
    k0 = 6 * n  # chunk sections start here (see meta_layout)
    t = meta[k0 + c]
    waddr = meta[t]
    gaddr = meta[n + t]
    code = meta[2 * n + t]
    length = meta[3 * n + t]
    base = meta[4 * n + t]
    if meta[k0 + 6 * nc + c] == 1:  # count == 1: a chunk of whole rows
        width = meta[5 * n + t]
        groups = BLOCK // width
        group = tid // width
        lane = tid - group * width
        r0 = meta[k0 + nc + c]
        r1 = meta[k0 + 2 * nc + c]
        for k in range((r1 - r0 + groups - 1) // groups):
            r = r0 + k * groups + group
            s = r * length
            ws = 0.0
            gs = 0.0
            if r < r1:
                ws, gs = pair_sums(waddr, gaddr, code, s + lane, s + length, width)
            sw[tid] = ws
            sg[tid] = gs
            cuda.syncthreads()
            offset = width // 2
            while offset > 0:
                if lane < offset:
                    sw[tid] += sw[tid + offset]
                    sg[tid] += sg[tid + offset]
                cuda.syncthreads()
                offset //= 2
            if lane == 0 and r < r1:
                out[base + r] = sw[tid]
                out[rows + base + r] = sg[tid]
                sc[group] = unit_coef(sw[tid], sg[tid], clipping, eps)
            cuda.syncthreads()
            if r < r1 and sc[group] < 1.0:
                scale_strided(gaddr, code, s + lane, s + length, width, sc[group])
            cuda.syncthreads()
    else:  # a piece of a long row: the whole block reduces it
        s = meta[k0 + nc + c] * length
        start = s + meta[k0 + 3 * nc + c]
        stop = s + meta[k0 + 4 * nc + c]
        ws, gs = pair_sums(waddr, gaddr, code, start + tid, stop, BLOCK)
        sw[tid] = ws
        sg[tid] = gs
        cuda.syncthreads()
        offset = BLOCK // 2
        while offset > 0:
            if tid < offset:
                sw[tid] += sw[tid + offset]
                sg[tid] += sg[tid + offset]
            cuda.syncthreads()
            offset //= 2
        if tid == 0:
            out[2 * rows + c] = sw[0]
            out[2 * rows + nc + c] = sg[0]


def _agc_pieces(meta, out, n, nc, rows, clipping, eps):
    k0 = 6 * n
    c = meta[k0 + 7 * nc + cuda.blockIdx.x]
    tid = cuda.threadIdx.x
    sc = cuda.shared.array(1, types.float64)
    t = meta[k0 + c]
    row = meta[k0 + nc + c]
    if tid == 0:
        first = meta[k0 + 5 * nc + c]
        ws = 0.0
        gs = 0.0
        for k in range(first, first + meta[k0 + 6 * nc + c]):  # the row's partials, in order
            ws += out[2 * rows + k]
            gs += out[2 * rows + nc + k]
        if c == first:
            base = meta[4 * n + t]
            out[base + row] = ws
            out[rows + base + row] = gs
        sc[0] = unit_coef(ws, gs, clipping, eps)
    cuda.syncthreads()
    if sc[0] < 1.0:
        s = row * meta[3 * n + t]
        scale_strided(meta[n + t], meta[2 * n + t], s + meta[k0 + 3 * nc + c] + tid,
                      s + meta[k0 + 4 * nc + c], BLOCK, sc[0])


def _zero_if_flag(flag, meta, n, nc):
    # meta: addrs[n] | codes[n] | chunk tensor[nc] | chunk start[nc] | chunk stop[nc]
    if flag[0] == 0:  # the common case: one read of the flag, nothing else
        return
    c = cuda.blockIdx.x
    t = meta[2 * n + c]
    addr = meta[t]
    code = meta[n + t]
    start = meta[2 * n + nc + c] + cuda.threadIdx.x
    stop = meta[2 * n + 2 * nc + c]
    if code == FLOAT32:
        x = as_f32(addr, stop)
        for j in range(start, stop, BLOCK):
            x[j] = np.float32(0.0)
    elif code == FLOAT64:
        y = as_f64(addr, stop)
        for j in range(start, stop, BLOCK):
            y[j] = 0.0
    else:
        h = as_u16(addr, stop)
        for j in range(start, stop, BLOCK):
            h[j] = np.uint16(0)


# ``_kernel``: numba's disk cache on a GPU (as the norm kernels), so that ``warmup()`` in an image
# spares each process compiling these three (seconds); plain ``cuda.jit`` in the simulator.
agc_rows = _kernel(_agc_rows)
agc_pieces = _kernel(_agc_pieces)
zero_if_flag = _kernel(_zero_if_flag)

_AGC_ARGS = (types.int64[::1], types.float64[::1], types.int64, types.int64, types.int64,
             types.float64, types.float64)
# The kernels' argument types as ``run_agc`` / ``run_zero_if`` launch them (for compile_ptx).
SIGNATURES = {
    "agc_rows": _AGC_ARGS,
    "agc_pieces": _AGC_ARGS,
    "zero_if_flag": (types.int32[::1], types.int64[::1], types.int64, types.int64),
}
PY_FUNCS = {"agc_rows": _agc_rows, "agc_pieces": _agc_pieces, "zero_if_flag": _zero_if_flag}


# --- host-side drivers -----------------------------------------------------------------------


def lanes_for(row_len: np.ndarray) -> np.ndarray:
    """Threads per row: a power of two giving each thread about 8 elements, at most a block."""
    want = np.maximum(1, -(-np.asarray(row_len, dtype=np.int64) // 8))
    lanes = np.left_shift(1, np.ceil(np.log2(want)).astype(np.int64))
    return np.minimum(lanes, BLOCK).astype(np.int64)


def run_agc(waddrs, gaddrs, codes, n_rows, row_len, clipping, eps, to_device, zeros, stream=0,
            chunk_size=DEFAULT_CHUNK_SIZE):
    """Launch AGC over a table of device addresses.

    Args:
        waddrs, gaddrs, codes, n_rows, row_len: the table (int64 numpy arrays), as in
            ``agc.adaptive_clip``.
        clipping, eps: AGC's arguments.
        to_device: makes a device int64 array from a host one (the copy may be asynchronous on
            ``stream``; the host array is not reused).
        zeros: makes a zeroed float64 device array of a given length.
        stream: the stream to launch on.

    Returns:
        The device float64 array ``out``: ``out[:R]`` and ``out[R:2 * R]`` are the units' sums
        of squares of the weights and of the grads (before clipping), ``R = sum(n_rows)``.
    """
    n_rows = np.asarray(n_rows, dtype=np.int64)
    row_len = np.asarray(row_len, dtype=np.int64)
    chunks = build_agc_chunks(n_rows, row_len, chunk_size)
    n, nc, n_pieces = n_rows.shape[0], chunks.n_chunks, chunks.pieces.shape[0]
    rows = int(n_rows.sum())
    out = zeros(max(1, 2 * rows + 2 * nc))
    if nc == 0:
        return out
    meta = np.concatenate([
        np.asarray(waddrs, dtype=np.int64), np.asarray(gaddrs, dtype=np.int64),
        np.asarray(codes, dtype=np.int64), row_len, np.cumsum(n_rows) - n_rows, lanes_for(row_len),
        chunks.tensor, chunks.row0, chunks.row1, chunks.start, chunks.stop, chunks.first,
        chunks.n_pieces, chunks.pieces])
    d_meta = to_device(meta)
    args = (d_meta, out, n, nc, rows, float(clipping), float(eps))
    agc_rows[nc, BLOCK, stream](*args)
    if n_pieces:
        agc_pieces[n_pieces, BLOCK, stream](*args)
    return out


def run_zero_if(flag, addrs, codes, lengths, to_device, stream=0, chunk_size=DEFAULT_CHUNK_SIZE):
    """Zero every tensor of the table if the device int32 ``flag[0]`` is non-zero; no host read."""
    chunks = build_chunk_table(np.asarray(lengths, dtype=np.int64), chunk_size)
    if chunks.n_chunks == 0:
        return
    meta = np.concatenate([np.asarray(addrs, dtype=np.int64), np.asarray(codes, dtype=np.int64),
                           chunks.tensor, chunks.start, chunks.stop])
    zero_if_flag[chunks.n_chunks, BLOCK, stream](flag, to_device(meta), len(addrs),
                                                 chunks.n_chunks)
