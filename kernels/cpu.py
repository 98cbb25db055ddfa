"""Fused multi-tensor kernels for the CPU.

Every kernel takes a tensor table (``addrs``, ``codes``) and a ``ChunkTable`` (see
``layout.py``), runs one parallel loop over the table's work groups, and touches each element
once. Kernels are plain loops over typed pointers built from raw addresses: nothing is copied
and nothing here knows about torch.

The kernel bodies and their helpers live in this one module on purpose: numba's on-disk cache
does not notice changes in jitted helpers imported from another module (numba #8359).
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .layout import FLOAT16, FLOAT32, FLOAT64, NORM_INF, NORM_L1, NORM_L2
from .startup import njit

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


# --- the caller's denormal mode on the worker threads --------------------------------------------
# torch.set_flush_denormal(True) sets flush-to-zero and denormals-are-zero (MXCSR bits 15 and 6)
# on the calling thread only; numba's worker threads keep their own. A parallel kernel reads the
# caller's bits before its parallel loop (code that runs on the calling thread) and runs each work
# group under them, so a result does not depend on which thread ran a chunk. Elsewhere than on
# x86 these compile to nothing.

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
_FLUSH_BITS = 0x8040  # MXCSR: FTZ | DAZ


def _mxcsr_call(builder, name, slot):
    fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    builder.call(fn, [builder.bitcast(slot, ir.IntType(8).as_pointer())])


@intrinsic
def flush_mode(typingctx):
    """The calling thread's flush-to-zero and denormals-are-zero bits (0 off x86)."""
    sig = types.uint32()

    def codegen(context, builder, signature, args):
        if not _X86:
            return ir.Constant(ir.IntType(32), 0)
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        _mxcsr_call(builder, "llvm.x86.sse.stmxcsr", slot)
        return builder.and_(builder.load(slot), ir.Constant(ir.IntType(32), _FLUSH_BITS))

    return sig, codegen


@intrinsic
def enter_flush_mode(typingctx, mode):
    """Set this thread's flush bits to ``mode`` (from ``flush_mode``); return its previous MXCSR
    for ``leave_flush_mode``."""
    sig = types.uint32(types.uint32)

    def codegen(context, builder, signature, args):
        if not _X86:
            return ir.Constant(ir.IntType(32), 0)
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        _mxcsr_call(builder, "llvm.x86.sse.stmxcsr", slot)
        old = builder.load(slot)
        cleared = builder.and_(old, ir.Constant(ir.IntType(32), ~_FLUSH_BITS & 0xFFFFFFFF))
        builder.store(builder.or_(cleared, args[0]), slot)
        _mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", slot)
        return old

    return sig, codegen


@intrinsic
def leave_flush_mode(typingctx, saved):
    """Restore the MXCSR ``enter_flush_mode`` returned."""
    sig = types.none(types.uint32)

    def codegen(context, builder, signature, args):
        if _X86:
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            builder.store(args[0], slot)
            _mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()

    return sig, codegen


# --- per-chunk bodies, read as interleaved streams ---------------------------------------------
# A chunk is walked as STREAMS equal sub-ranges advanced together (then a short tail): four
# hardware-prefetch streams in flight instead of one. On the 2-core CI machine this made the norm
# pass ~25% faster (it had run at 67-79% of a one-stream read loop) and the scale pass ~15-25%
# faster (benchmarks/README.md, "Interleaved streams"). Each stream keeps its own float64
# accumulator and they are combined as (a + b) + (c + d): the order depends on the chunk alone, so
# every result stays bitwise identical for any thread count.
#
# The loops are built by small factories from per-element helpers (load one element, square it,
# ...), one instance per dtype, so that every loop LLVM sees is a plain loop over one dtype and one
# operation, which it vectorizes. Sums of powers accumulate in float64. The inf norm is a max over
# the absolute values' bit patterns: for non-negative IEEE floats the integer order is the numeric
# order, with every NaN above inf, so one integer max finds the largest |x|, lets NaN win, and
# vectorizes.

STREAMS = 4  # the loops below are written out for exactly four


def _streamed_sum(load, op):
    """Chunk reducer: float64 sum of ``op(load(addr, j), p)`` over ``[start, stop)``."""

    @njit(**_JIT)
    def chunk_sum(addr, start, stop, p):
        q = (stop - start) // STREAMS
        a = 0.0
        b = 0.0
        c = 0.0
        d = 0.0
        for j in range(start, start + q):
            a += op(load(addr, j), p)
            b += op(load(addr, j + q), p)
            c += op(load(addr, j + 2 * q), p)
            d += op(load(addr, j + 3 * q), p)
        for j in range(start + STREAMS * q, stop):
            a += op(load(addr, j), p)
        return (a + b) + (c + d)

    return chunk_sum


def _streamed_max(abs_bits, from_bits, zero):
    """Chunk reducer: the largest |x| over ``[start, stop)`` (NaN wins), as float64."""

    @njit(**_JIT)
    def chunk_max(addr, start, stop):
        q = (stop - start) // STREAMS
        a = zero
        b = zero
        c = zero
        d = zero
        for j in range(start, start + q):
            a = max(a, abs_bits(addr, j))
            b = max(b, abs_bits(addr, j + q))
            c = max(c, abs_bits(addr, j + 2 * q))
            d = max(d, abs_bits(addr, j + 3 * q))
        for j in range(start + STREAMS * q, stop):
            a = max(a, abs_bits(addr, j))
        return from_bits(max(max(a, b), max(c, d)))

    return chunk_max


def _streamed_update(update):
    """Chunk writer: ``update(addr, j, arg)`` for every ``j`` of ``[start, stop)``, in place."""

    @njit(**_JIT)
    def chunk_update(addr, start, stop, arg):
        q = (stop - start) // STREAMS
        for j in range(start, start + q):
            update(addr, j, arg)
            update(addr, j + q, arg)
            update(addr, j + 2 * q, arg)
            update(addr, j + 3 * q, arg)
        for j in range(start + STREAMS * q, stop):
            update(addr, j, arg)

    return chunk_update


def _power_sum_kernel(load, abs_bits, from_bits, zero):
    """One dtype's chunk power sum: float64 sum of |x|**p over a chunk (max |x| for inf)."""
    l2 = _streamed_sum(load, _square)
    l1 = _streamed_sum(load, _magnitude)
    lp = _streamed_sum(load, _power)
    linf = _streamed_max(abs_bits, from_bits, zero)

    @njit(**_JIT)
    def chunk_power_sum(addr, start, stop, kind, p):
        if kind == NORM_L2:
            return l2(addr, start, stop, p)
        if kind == NORM_L1:
            return l1(addr, start, stop, p)
        if kind == NORM_INF:
            return linf(addr, start, stop)
        return lp(addr, start, stop, p)

    return chunk_power_sum


@njit(inline="always", **_JIT)
def _square(v, p):
    return v * v


@njit(inline="always", **_JIT)
def _magnitude(v, p):
    return abs(v)


@njit(inline="always", **_JIT)
def _power(v, p):
    return abs(v) ** p


# element j of the tensor at addr, as float64 (exact for every dtype) ...
@njit(inline="always", **_JIT)
def _load_f32(addr, j):
    return np.float64(f32_ptr(addr)[j])


@njit(inline="always", **_JIT)
def _load_f64(addr, j):
    return f64_ptr(addr)[j]


@njit(inline="always", **_JIT)
def _load_half(addr, j):
    return np.float64(half_to_f32(u16_ptr(addr)[j]))


@njit(inline="always", **_JIT)
def _load_bf16(addr, j):
    return np.float64(bf16_to_f32(u16_ptr(addr)[j]))


# ... and the bit pattern of its absolute value, and back
@njit(inline="always", **_JIT)
def _abs_bits_f32(addr, j):
    return f32_as_u32(f32_ptr(addr)[j]) & np.uint32(0x7FFFFFFF)


@njit(inline="always", **_JIT)
def _abs_bits_f64(addr, j):
    return f64_as_u64(f64_ptr(addr)[j]) & np.uint64(0x7FFFFFFFFFFFFFFF)


@njit(inline="always", **_JIT)
def _abs_bits_16(addr, j):
    return u16_ptr(addr)[j] & np.uint16(0x7FFF)


@njit(inline="always", **_JIT)
def _from_bits_f32(top):
    return np.float64(u32_as_f32(top))


@njit(inline="always", **_JIT)
def _from_bits_f64(top):
    return u64_as_f64(top)


@njit(inline="always", **_JIT)
def _from_bits_half(top):
    return np.float64(half_to_f32(top))


@njit(inline="always", **_JIT)
def _from_bits_bf16(top):
    return np.float64(bf16_to_f32(top))


_f32_power_sum = _power_sum_kernel(_load_f32, _abs_bits_f32, _from_bits_f32, np.uint32(0))
_f64_power_sum = _power_sum_kernel(_load_f64, _abs_bits_f64, _from_bits_f64, np.uint64(0))
_half_power_sum = _power_sum_kernel(_load_half, _abs_bits_16, _from_bits_half, np.uint16(0))
_bf16_power_sum = _power_sum_kernel(_load_bf16, _abs_bits_16, _from_bits_bf16, np.uint16(0))


@njit(**_JIT)
def _chunk_power_sum(addr, code, start, stop, kind, p):
    if code == FLOAT32:
        return _f32_power_sum(addr, start, stop, kind, p)
    if code == FLOAT64:
        return _f64_power_sum(addr, start, stop, kind, p)
    if code == FLOAT16:
        return _half_power_sum(addr, start, stop, kind, p)
    return _bf16_power_sum(addr, start, stop, kind, p)


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


# Scaling: 32- and 16-bit grads multiply in float32 by float32(coef), then round: the same
# arithmetic as torch's grad.mul_(coef), so results are bit-identical.
@njit(inline="always", **_JIT)
def _scale_f32(addr, j, coef):
    x = f32_ptr(addr)
    x[j] = x[j] * np.float32(coef)


@njit(inline="always", **_JIT)
def _scale_f64(addr, j, coef):
    y = f64_ptr(addr)
    y[j] = y[j] * coef


@njit(inline="always", **_JIT)
def _scale_half(addr, j, coef):
    h = u16_ptr(addr)
    h[j] = f32_to_half(half_to_f32(h[j]) * np.float32(coef))


@njit(inline="always", **_JIT)
def _scale_bf16(addr, j, coef):
    b = u16_ptr(addr)
    b[j] = f32_to_bf16(bf16_to_f32(b[j]) * np.float32(coef))


# Clamping stores only the elements that change: a set already inside the bound is never written.
@njit(inline="always", **_JIT)
def _clamp_f32(addr, j, bound):
    x = f32_ptr(addr)
    b32 = np.float32(bound)
    v = x[j]
    if v > b32:
        x[j] = b32
    elif v < -b32:
        x[j] = -b32


@njit(inline="always", **_JIT)
def _clamp_f64(addr, j, bound):
    y = f64_ptr(addr)
    w = y[j]
    if w > bound:
        y[j] = bound
    elif w < -bound:
        y[j] = -bound


def _clamp_16bit(decode, encode):
    """The clamp step for one 16-bit format (float16 or bfloat16 bits)."""

    @njit(inline="always", **_JIT)
    def clamp(addr, j, bound):
        h = u16_ptr(addr)
        b32 = np.float32(bound)
        v = decode(h[j])
        if v > b32:
            h[j] = encode(b32)
        elif v < -b32:
            h[j] = encode(b32) ^ np.uint16(0x8000)  # -bound encoded (bound -0.0 gives +0.0)

    return clamp


_clamp_half = _clamp_16bit(half_to_f32, f32_to_half)
_clamp_bf16 = _clamp_16bit(bf16_to_f32, f32_to_bf16)


_f32_scale = _streamed_update(_scale_f32)
_f64_scale = _streamed_update(_scale_f64)
_half_scale = _streamed_update(_scale_half)
_bf16_scale = _streamed_update(_scale_bf16)
_f32_clamp = _streamed_update(_clamp_f32)
_f64_clamp = _streamed_update(_clamp_f64)
_half_clamp = _streamed_update(_clamp_half)
_bf16_clamp = _streamed_update(_clamp_bf16)


@njit(**_JIT)
def _scale_chunk(addr, code, start, stop, coef):
    if code == FLOAT32:
        _f32_scale(addr, start, stop, coef)
    elif code == FLOAT64:
        _f64_scale(addr, start, stop, coef)
    elif code == FLOAT16:
        _half_scale(addr, start, stop, coef)
    else:
        _bf16_scale(addr, start, stop, coef)


@njit(**_JIT)
def _clamp_chunk(addr, code, start, stop, bound):
    if code == FLOAT32:
        _f32_clamp(addr, start, stop, bound)
    elif code == FLOAT64:
        _f64_clamp(addr, start, stop, bound)
    elif code == FLOAT16:
        _half_clamp(addr, start, stop, bound)
    else:
        _bf16_clamp(addr, start, stop, bound)


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
    mode = flush_mode()  # the caller's (this line runs on the calling thread)
    for g in prange(group_bounds.shape[0] - 1):
        saved = enter_flush_mode(mode)
        _power_sums_run(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds[g],
                        group_bounds[g + 1], kind, p, out)
        leave_flush_mode(saved)


@njit(**_JIT)
def scale_serial(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds, coef):
    """Multiply every chunk by ``coef`` in place."""
    _scale_run(addrs, codes, chunk_tensor, chunk_start, chunk_stop, 0, chunk_tensor.shape[0], coef)


@njit(parallel=True, **_JIT)
def scale_parallel(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds, coef):
    mode = flush_mode()
    for g in prange(group_bounds.shape[0] - 1):
        saved = enter_flush_mode(mode)
        _scale_run(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds[g],
                   group_bounds[g + 1], coef)
        leave_flush_mode(saved)


@njit(**_JIT)
def clamp_serial(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds, bound):
    """Clamp every chunk to ``[-bound, bound]`` in place."""
    _clamp_run(addrs, codes, chunk_tensor, chunk_start, chunk_stop, 0, chunk_tensor.shape[0], bound)


@njit(parallel=True, **_JIT)
def clamp_parallel(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds, bound):
    mode = flush_mode()
    for g in prange(group_bounds.shape[0] - 1):
        saved = enter_flush_mode(mode)
        _clamp_run(addrs, codes, chunk_tensor, chunk_start, chunk_stop, group_bounds[g],
                   group_bounds[g + 1], bound)
        leave_flush_mode(saved)


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
