"""Fused multi-tensor kernels for the CPU.

Every kernel takes a tensor table (``addrs``, ``codes``) and a ``ChunkTable`` (see
``layout.py``), runs one parallel loop over the table's work groups, and touches each element
once. Kernels are plain loops over typed pointers built from raw addresses: nothing is copied
and nothing here knows about torch.

The kernel bodies and their helpers live in this one module on purpose: numba's on-disk cache
does not notice changes in jitted helpers imported from another module (numba #8359).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .startup import defer_blas_check
from .layout import FLOAT16, FLOAT32, FLOAT64, NORM_INF, NORM_L1, NORM_L2

defer_blas_check()

# Reassociation lets LLVM split float64 reductions over vector lanes (a fixed order, so still
# deterministic); 'contract' allows FMA. No 'nnan'/'ninf': NaN and inf must survive.
_FAST = {"reassoc", "contract"}
_JIT = dict(nogil=True, cache=True, fastmath=_FAST, error_model="numpy", boundscheck=False)


# --- address -> typed pointer, and 16-bit float decoding ---------------------------------------


def _pointer_intrinsic(element):
    @intrinsic
    def as_pointer(typingctx, addr):
        sig = types.CPointer(element)(types.int64)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    return as_pointer


f32_ptr = _pointer_intrinsic(types.float32)
f64_ptr = _pointer_intrinsic(types.float64)
u16_ptr = _pointer_intrinsic(types.uint16)


@intrinsic
def half_to_f32(typingctx, bits):
    """float16 bits (uint16) -> float32, exactly."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def f32_to_half(typingctx, value):
    """float32 -> float16 bits (uint16), rounded to nearest even like torch's conversion."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@intrinsic
def u32_as_f32(typingctx, bits):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def f32_as_u32(typingctx, value):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def f64_as_u64(typingctx, value):
    sig = types.uint64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@intrinsic
def u64_as_f64(typingctx, bits):
    sig = types.float64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@njit(inline="always", **_JIT)
def bf16_to_f32(bits):
    return u32_as_f32(np.uint32(bits) << np.uint32(16))


@njit(inline="always", **_JIT)
def f32_to_bf16(value):
    # Round to nearest even with a NaN guard: bit-identical to torch's float -> bfloat16.
    if value != value:
        return np.uint16(0x7FC0)
    u = f32_as_u32(value)
    bias = ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return np.uint16((u + bias) >> np.uint32(16))


# --- per-chunk bodies: one small loop per (operation, dtype) -----------------------------------
# Sums of powers are accumulated in float64. The inf norm is a max over the absolute values'
# bit patterns: for non-negative IEEE floats the integer order is the numeric order, with every
# NaN above inf, so one integer max finds the largest |x| and lets NaN win, and it vectorizes.


@njit(**_JIT)
def _f32_chunk(addr, start, stop, kind, p):
    x = f32_ptr(addr)
    s = 0.0
    if kind == NORM_L2:
        for j in range(start, stop):
            v = np.float64(x[j])
            s += v * v
    elif kind == NORM_L1:
        for j in range(start, stop):
            s += abs(np.float64(x[j]))
    elif kind == NORM_INF:
        top = np.uint32(0)
        for j in range(start, stop):
            top = max(top, f32_as_u32(x[j]) & np.uint32(0x7FFFFFFF))
        s = np.float64(u32_as_f32(top))
    else:
        for j in range(start, stop):
            s += abs(np.float64(x[j])) ** p
    return s


@njit(**_JIT)
def _f64_chunk(addr, start, stop, kind, p):
    x = f64_ptr(addr)
    s = 0.0
    if kind == NORM_L2:
        for j in range(start, stop):
            s += x[j] * x[j]
    elif kind == NORM_L1:
        for j in range(start, stop):
            s += abs(x[j])
    elif kind == NORM_INF:
        top = np.uint64(0)
        for j in range(start, stop):
            top = max(top, f64_as_u64(x[j]) & np.uint64(0x7FFFFFFFFFFFFFFF))
        s = u64_as_f64(top)
    else:
        for j in range(start, stop):
            s += abs(x[j]) ** p
    return s


@njit(**_JIT)
def _half_chunk(addr, start, stop, kind, p):
    x = u16_ptr(addr)
    s = 0.0
    if kind == NORM_L2:
        for j in range(start, stop):
            v = np.float64(half_to_f32(x[j]))
            s += v * v
    elif kind == NORM_L1:
        for j in range(start, stop):
            s += abs(np.float64(half_to_f32(x[j])))
    elif kind == NORM_INF:
        top = np.uint16(0)
        for j in range(start, stop):
            top = max(top, x[j] & np.uint16(0x7FFF))
        s = np.float64(half_to_f32(top))
    else:
        for j in range(start, stop):
            s += abs(np.float64(half_to_f32(x[j]))) ** p
    return s


@njit(**_JIT)
def _bf16_chunk(addr, start, stop, kind, p):
    x = u16_ptr(addr)
    s = 0.0
    if kind == NORM_L2:
        for j in range(start, stop):
            v = np.float64(bf16_to_f32(x[j]))
            s += v * v
    elif kind == NORM_L1:
        for j in range(start, stop):
            s += abs(np.float64(bf16_to_f32(x[j])))
    elif kind == NORM_INF:
        top = np.uint16(0)
        for j in range(start, stop):
            top = max(top, x[j] & np.uint16(0x7FFF))
        s = np.float64(bf16_to_f32(top))
    else:
        for j in range(start, stop):
            s += abs(np.float64(bf16_to_f32(x[j]))) ** p
    return s


@njit(**_JIT)
def _chunk_power_sum(addr, code, start, stop, kind, p):
    if code == FLOAT32:
        return _f32_chunk(addr, start, stop, kind, p)
    if code == FLOAT64:
        return _f64_chunk(addr, start, stop, kind, p)
    if code == FLOAT16:
        return _half_chunk(addr, start, stop, kind, p)
    return _bf16_chunk(addr, start, stop, kind, p)


@njit(**_JIT)
def _chunk_nonfinite(addr, code, start, stop):
    """Count inf/NaN elements of one chunk (only run on chunks whose partial is not finite)."""
    n = 0
    if code == FLOAT32:
        x = f32_ptr(addr)
        for j in range(start, stop):
            n += not np.isfinite(x[j])
    elif code == FLOAT64:
        y = f64_ptr(addr)
        for j in range(start, stop):
            n += not np.isfinite(y[j])
    else:
        h = u16_ptr(addr)
        exponent = np.uint16(0x7C00) if code == FLOAT16 else np.uint16(0x7F80)
        for j in range(start, stop):
            n += (h[j] & exponent) == exponent
    return n


@njit(**_JIT)
def _scale_chunk(addr, code, start, stop, coef):
    # 32- and 16-bit grads multiply in float32 by float32(coef), then round: the same
    # arithmetic as torch's grad.mul_(coef), so results are bit-identical.
    c32 = np.float32(coef)
    if code == FLOAT32:
        x = f32_ptr(addr)
        for j in range(start, stop):
            x[j] = x[j] * c32
    elif code == FLOAT64:
        y = f64_ptr(addr)
        for j in range(start, stop):
            y[j] = y[j] * coef
    elif code == FLOAT16:
        h = u16_ptr(addr)
        for j in range(start, stop):
            h[j] = f32_to_half(half_to_f32(h[j]) * c32)
    else:
        b = u16_ptr(addr)
        for j in range(start, stop):
            b[j] = f32_to_bf16(bf16_to_f32(b[j]) * c32)


@njit(**_JIT)
def _clamp_chunk(addr, code, start, stop, bound):
    # Stores only the elements that change: a set already inside the bound is never written.
    b32 = np.float32(bound)
    if code == FLOAT32:
        x = f32_ptr(addr)
        for j in range(start, stop):
            v = x[j]
            if v > b32:
                x[j] = b32
            elif v < -b32:
                x[j] = -b32
    elif code == FLOAT64:
        y = f64_ptr(addr)
        for j in range(start, stop):
            w = y[j]
            if w > bound:
                y[j] = bound
            elif w < -bound:
                y[j] = -bound
    else:
        h = u16_ptr(addr)
        is_half = code == FLOAT16
        hi = f32_to_half(b32) if is_half else f32_to_bf16(b32)
        lo = hi | np.uint16(0x8000)
        for j in range(start, stop):
            v = half_to_f32(h[j]) if is_half else bf16_to_f32(h[j])
            if v > b32:
                h[j] = hi
            elif v < -b32:
                h[j] = lo


# --- the multi-tensor kernels: one parallel loop over balanced groups of chunks -----------------


@njit(**_JIT)
def _power_sums_run(addrs, codes, chunk_tensor, chunk_start, chunk_stop, first, last, kind, p, out):
    for c in range(first, last):
        t = chunk_tensor[c]
        out[c] = _chunk_power_sum(addrs[t], codes[t], chunk_start[c], chunk_stop[c], kind, p)


@njit(**_JIT)
def _scale_run(addrs, codes, chunk_tensor, chunk_start, chunk_stop, first, last, coef):
    for c in range(first, last):
        t = chunk_tensor[c]
        _scale_chunk(addrs[t], codes[t], chunk_start[c], chunk_stop[c], coef)


@njit(**_JIT)
def _clamp_run(addrs, codes, chunk_tensor, chunk_start, chunk_stop, first, last, bound):
    for c in range(first, last):
        t = chunk_tensor[c]
        _clamp_chunk(addrs[t], codes[t], chunk_start[c], chunk_stop[c], bound)


# Each operation runs either over all chunks on the calling thread (small sets: waking the
# thread pool costs more than the work, and a busy machine makes that wake-up slow), or as one
# parallel loop over the chunk table's balanced groups. Partials land in ``out[c]`` either way,
# so the two give bitwise-identical results.


@njit(**_JIT)
def chunk_power_sums_serial(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds, kind, p, out):
    """``out[c]`` = float64 sum of |x|**p (max |x| for inf) over chunk ``c``."""
    _power_sums_run(addrs, codes, chunk_tensor, chunk_start, chunk_stop, 0, chunk_tensor.shape[0],
                    kind, p, out)


@njit(parallel=True, **_JIT)
def chunk_power_sums_parallel(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds, kind, p, out):
    for g in prange(group_bounds.shape[0] - 1):
        _power_sums_run(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds[g],
                        group_bounds[g + 1], kind, p, out)


@njit(**_JIT)
def scale_serial(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds, coef):
    """Multiply every chunk by ``coef`` in place."""
    _scale_run(addrs, codes, chunk_tensor, chunk_start, chunk_stop, 0, chunk_tensor.shape[0], coef)


@njit(parallel=True, **_JIT)
def scale_parallel(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds, coef):
    for g in prange(group_bounds.shape[0] - 1):
        _scale_run(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds[g],
                   group_bounds[g + 1], coef)


@njit(**_JIT)
def clamp_serial(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds, bound):
    """Clamp every chunk to ``[-bound, bound]`` in place."""
    _clamp_run(addrs, codes, chunk_tensor, chunk_start, chunk_stop, 0, chunk_tensor.shape[0], bound)


@njit(parallel=True, **_JIT)
def clamp_parallel(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds, bound):
    for g in prange(group_bounds.shape[0] - 1):
        _clamp_run(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds[g],
                   group_bounds[g + 1], bound)


@njit(**_JIT)
def combine_partials(chunk_tensor, partials, kind, n_tensors, per_tensor):
    """Fold chunk partials into per-tensor sums (into ``per_tensor``) and return the total.

    A fixed, sequential order: the result is the same for any thread count.
    """
    for t in range(n_tensors):
        per_tensor[t] = 0.0
    if kind == NORM_INF:
        # A max that lets NaN win and keeps it.
        total = 0.0
        for c in range(partials.shape[0]):
            v = partials[c]
            t = chunk_tensor[c]
            if per_tensor[t] == per_tensor[t] and not v <= per_tensor[t]:
                per_tensor[t] = v
            if total == total and not v <= total:
                total = v
        return total
    for c in range(partials.shape[0]):
        per_tensor[chunk_tensor[c]] += partials[c]
    total = 0.0
    for c in range(partials.shape[0]):
        total += partials[c]
    return total


@njit(**_JIT)
def count_nonfinite(addrs, codes, chunk_tensor, chunk_start, chunk_stop, partials, per_tensor_counts):
    """Count inf/NaN elements, rescanning only the chunks whose partial is not finite.

    For p = 1, 2 and inf a finite partial proves its chunk finite, so the common case reads
    nothing. (For other p a partial may overflow on finite values; the rescan then counts 0.)
    """
    total = 0
    for t in range(per_tensor_counts.shape[0]):
        per_tensor_counts[t] = 0
    for c in range(partials.shape[0]):
        if not np.isfinite(partials[c]):
            t = chunk_tensor[c]
            n = _chunk_nonfinite(addrs[t], codes[t], chunk_start[c], chunk_stop[c])
            per_tensor_counts[t] += n
            total += n
    return total
