"""Fused multi-tensor kernels for CUDA (numba-cuda), with simulator stand-ins.

The kernels never receive tensors. Every argument is a scalar: a gradient set reaches them as
the address of one int64 *device table* (see ``table_layout``), so a launch costs the same for
3 tensors or 3000, and the work of typing array arguments at each launch is avoided.

Kernel 1, ``power_sums_kernel``: each block takes chunks (grid-stride) and writes one float64
partial per chunk (sum of |x|**p, or max |x| for inf). Threads read 16-byte words (vector loads)
into fixed accumulators and a fixed-shape tree combines them, so a partial depends on the
chunk's values only: not on the grid size, nor on the tensor's alignment. Blocks then take a
ticket (threadfence + atomic); the last block combines the partials in a fixed order and writes
the total, the norm and the clipping coefficient, all on the device. With ``per_tensor_addr``,
the block that completes a tensor's chunks (a per-tensor ticket) also folds that tensor's
partials. Results are bitwise reproducible, run after run.

Kernel 2, ``scale_kernel``: every block reads the coefficient from device memory (or computes it
from a norm there, for ``clip_grads_with_norm_``) and returns at once when it is >= 1, so a step
that does not clip reads the grads once in all.

``clamp_kernel`` (``clip_grad_value_``) reads the same 16-byte words and stores a word only when
one of its values changes, so grads already within the bound are only read.

Under ``NUMBA_ENABLE_CUDASIM=1`` the same kernel bodies run in numba's simulator; the few device
primitives it cannot run (``@intrinsic``: address -> pointer, bit casts, 16-bit conversions,
atomics on raw addresses) are swapped for numpy equivalents at import.

This module imports numpy and numba only; all kernels and helpers live here (numba #8359).
"""

from __future__ import annotations

import ctypes
import math
import threading

import numpy as np

try:
    import numba_cuda  # noqa: F401  (the package; numba.cuda is redirected to it)
except ImportError as exc:
    # numba's own CUDA target (numba.cuda without the numba-cuda package; deprecated since numba
    # 0.61) has other modules (its numba.cuda.types lacks the scalar types these kernels use).
    raise ModuleNotFoundError("fastclip's CUDA kernels need the numba-cuda package (pip install "
                              "'fastclip[cuda]'); numba's built-in CUDA target is not supported",
                              name="numba_cuda") from exc

from numba import cuda  # noqa: E402

from .layout import FLOAT16, FLOAT32, FLOAT64, NORM_INF, NORM_L1, NORM_L2, NORM_POWER
from .startup import CACHE

SIMULATOR = bool(cuda.config.ENABLE_CUDASIM)

# Threads per block. Partials depend on it (the in-block tree has this shape), never on the
# grid size. The simulator runs one Python thread per CUDA thread, hence its small blocks.
THREADS = 32 if SIMULATOR else 256

# Tensor-table flag (or-ed into a dtype code): the table reads a contiguous copy of a sliced
# tensor, so the write kernels must skip it (the backend writes it through torch).
READONLY = 16
CODE_MASK = 15

# ``flags`` of ``power_sums_kernel``.
COUNT_NONFINITE = 1  # count inf/NaN elements (rescans only chunks with a non-finite partial)
RESULT_F64 = 2  # the norm and coefficient are float64 (any float64 grad), else float32

# ``mode`` of ``scale_kernel``.
SCALE_F64 = 1  # the value it reads is float64, else float32
SCALE_FROM_NORM = 2  # the value is a norm: the kernel computes torch's coefficient from it
SCALE_ALWAYS = 4  # apply a factor >= 1 too (AMP's unscale: a factor, not a clip coefficient)

# The kernels' argument types, for ahead-of-time compilation (PTX test, backend).
POWER_SUMS_ARGS = "int64, int64, int64, int64, float64, int64, int64, float64, " \
                  "int64, int64, int64, int64, int64"
SCALE_ARGS = "int64, int64, int64, int64, int64, float64"
CLAMP_ARGS = "int64, int64, int64, float64"


def table_layout(n_tensors: int, n_chunks: int) -> dict:
    """Offsets (in int64 slots) of the device table's sections.

    ``addrs[n] | codes[n] | chunk_tensor[nc] | chunk_start[nc] | chunk_stop[nc] | first_chunk[n+1]``
    where ``first_chunk[t]:first_chunk[t + 1]`` are the chunks of tensor ``t``.
    """
    n, nc = n_tensors, n_chunks
    return {"addrs": 0, "codes": n, "tensor": 2 * n, "start": 2 * n + nc,
            "stop": 2 * n + 2 * nc, "first": 2 * n + 3 * nc, "size": 3 * n + 3 * nc + 1}


def scratch_slots(n_tensors: int, n_chunks: int) -> int:
    """int64 slots of a table's scratch: ``ticket | total | coef | count | partials[nc] |
    counts[nc] | tensor_tickets[n]``. Zeroed once; the kernels leave the tickets at zero."""
    return 4 + 2 * n_chunks + n_tensors


SCRATCH_TICKET = 0
SCRATCH_TOTAL = 1
SCRATCH_COEF = 2
SCRATCH_COUNT = 3
SCRATCH_PARTIALS = 4


# --- device primitives: real CUDA (intrinsics) or simulator (numpy) ------------------------------

if SIMULATOR:
    _atomic_lock = threading.Lock()

    def _view(addr, n, ctype, dtype):
        n = max(int(n), 1)
        return np.ctypeslib.as_array((ctype * n).from_address(int(addr))).view(dtype)

    def as_f32(addr, n):
        return _view(addr, n, ctypes.c_float, np.float32)

    def as_f64(addr, n):
        return _view(addr, n, ctypes.c_double, np.float64)

    def as_u16(addr, n):
        return _view(addr, n, ctypes.c_uint16, np.uint16)

    def as_i64(addr, n):
        return _view(addr, n, ctypes.c_int64, np.int64)

    def atomic_inc(addr):
        with _atomic_lock:
            a = as_i64(addr, 1)
            old = a[0]
            a[0] = old + 1
        return old

    def half_to_f32(bits):
        return np.float32(np.uint16(bits).view(np.float16))

    def f32_to_half(value):
        return np.float16(np.float32(value)).view(np.uint16)

    def u32_as_f32(bits):
        return np.uint32(bits).view(np.float32)

    def f32_as_u32(value):
        return np.float32(value).view(np.uint32)

    def u64_as_f64(bits):
        return np.uint64(bits).view(np.float64)

    def f64_as_u64(value):
        return np.float64(value).view(np.uint64)

    def mul_rn(a, b):
        return a * b

    def add_rn(a, b):
        return a + b

    def ld_cg_f64(addr):
        return as_f64(addr, 1)[0]

    def ld_cg_i64(addr):
        return as_i64(addr, 1)[0]

    # 16-byte vector loads and stores (addr 16-byte aligned).
    def ld_v4_f32(addr):
        x = as_f32(addr, 4)
        return x[0], x[1], x[2], x[3]

    def ld_v4_u32(addr):
        x = _view(addr, 4, ctypes.c_uint32, np.uint32)
        return x[0], x[1], x[2], x[3]

    def ld_v2_f64(addr):
        x = as_f64(addr, 2)
        return x[0], x[1]

    def st_v4_f32(addr, a, b, c, d):
        x = as_f32(addr, 4)
        x[0], x[1], x[2], x[3] = a, b, c, d

    def st_v4_u32(addr, a, b, c, d):
        x = _view(addr, 4, ctypes.c_uint32, np.uint32)
        x[0], x[1], x[2], x[3] = a, b, c, d

    def st_v2_f64(addr, a, b):
        x = as_f64(addr, 2)
        x[0], x[1] = a, b

    _device = cuda.jit(device=True)
    _kernel = cuda.jit
else:
    from llvmlite import ir

    def _load_registries_without_row_stack() -> None:
        """Let numba-cuda load its NumPy overloads under NumPy >= 2.5.

        numba-cuda 0.30 (in maintenance; NVIDIA/numba-cuda#907 will not be fixed) registers an
        overload of ``np.row_stack``, which NumPy 2.5 removed: the registries then fail to load
        and no kernel compiles. They are loaded once here with a stand-in in its place (a
        function of its own, so no second overload of ``np.vstack``), which is then removed.
        """
        if hasattr(np, "row_stack"):
            return

        def row_stack(tup, **kwargs):  # NumPy < 2.5's alias of vstack
            return np.vstack(tup, **kwargs)

        setattr(np, "row_stack", row_stack)  # setattr: NumPy versions' stubs disagree on it
        try:
            import numba.cuda.np.arrayobj  # noqa: F401
        except ImportError:  # a numba-cuda laid out otherwise: nothing to load early
            pass
        finally:
            delattr(np, "row_stack")

    _load_registries_without_row_stack()

    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    # Grads, tables and scratch all live in global memory: pointers typed in address space 1.
    # The 16-byte vector paths are inline ld.global/st.global; for per-element accesses (tails,
    # misaligned views) NVVM still emits many generic ld/st (seen in the sm_90 PTX), which
    # reach the same memory; whether that costs anything is for a GPU run of the flat-views set.
    _GLOBAL = 1

    def _pointer_intrinsic(element):
        @intrinsic
        def as_pointer(typingctx, addr, n):
            # ``n`` (the element count) is for the simulator's views; a pointer needs none.
            sig = types.CPointer(element, addrspace=_GLOBAL)(types.int64, types.int64)

            def codegen(context, builder, signature, args):
                return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

            return sig, codegen

        return as_pointer

    as_f32 = _pointer_intrinsic(types.float32)
    as_f64 = _pointer_intrinsic(types.float64)
    as_u16 = _pointer_intrinsic(types.uint16)
    as_i64 = _pointer_intrinsic(types.int64)

    @intrinsic
    def atomic_inc(typingctx, addr):
        """Atomically add 1 to the int64 at ``addr``; return the old value."""
        sig = types.int64(types.int64)

        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(64), _GLOBAL))
            return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "monotonic")

        return sig, codegen

    def _cast_intrinsic(src, dst, convert):
        @intrinsic
        def cast(typingctx, value):
            sig = dst(src)

            def codegen(context, builder, signature, args):
                return convert(builder, args[0])

            return sig, codegen

        return cast

    # fp16 through its bits: bitcast to half, then an exact widening; the narrowing is
    # cvt.rn.f16.f32, round to nearest even like torch's float -> half.
    half_to_f32 = _cast_intrinsic(
        types.uint16, types.float32,
        lambda b, v: b.fpext(b.bitcast(v, ir.HalfType()), ir.FloatType()))
    f32_to_half = _cast_intrinsic(
        types.float32, types.uint16,
        lambda b, v: b.bitcast(b.fptrunc(v, ir.HalfType()), ir.IntType(16)))
    u32_as_f32 = _cast_intrinsic(types.uint32, types.float32,
                                 lambda b, v: b.bitcast(v, ir.FloatType()))
    f32_as_u32 = _cast_intrinsic(types.float32, types.uint32,
                                 lambda b, v: b.bitcast(v, ir.IntType(32)))
    u64_as_f64 = _cast_intrinsic(types.uint64, types.float64,
                                 lambda b, v: b.bitcast(v, ir.DoubleType()))
    f64_as_u64 = _cast_intrinsic(types.float64, types.uint64,
                                 lambda b, v: b.bitcast(v, ir.IntType(64)))

    # inline="always": inlined in numba IR, so compile_ptx needs no GPU to type the helpers.
    # Float64 multiply and add rounded on their own (mul.rn, add.rn): ptxas may otherwise fuse a
    # multiply with the add that follows into one FMA, where torch (separate kernels) rounds twice.
    from numba.cuda.libdevice import dadd_rn as add_rn  # type: ignore[no-redef]
    from numba.cuda.libdevice import dmul_rn as mul_rn  # type: ignore[no-redef]

    def _ld_cg(result, asm):
        @intrinsic
        def load(typingctx, addr):
            """A global load that skips the (non-coherent) L1 cache: the last block reads values
            other blocks wrote after this SM may have cached their neighbours."""
            sig = result(types.int64)

            def codegen(context, builder, signature, args):
                ty = context.get_value_type(signature.return_type)
                fn = ir.FunctionType(ty, [ir.IntType(64)])
                constraint = "=d,l" if ty == ir.DoubleType() else "=l,l"
                return builder.call(ir.InlineAsm(fn, asm, constraint, side_effect=True), [args[0]])

            return sig, codegen

        return load

    ld_cg_f64 = _ld_cg(types.float64, "ld.global.cg.f64 $0, [$1];")
    ld_cg_i64 = _ld_cg(types.int64, "ld.global.cg.s64 $0, [$1];")

    def _vector_load(element, lanes):
        @intrinsic
        def load(typingctx, addr):
            """One 16-byte load (ld.global.v4.b32 / v2.f64) from a 16-byte aligned address."""
            sig = types.UniTuple(element, lanes)(types.int64)

            def codegen(context, builder, signature, args):
                lane = context.get_value_type(element)
                ptr = builder.inttoptr(args[0], ir.PointerType(ir.VectorType(lane, lanes), _GLOBAL))
                vec = builder.load(ptr, align=16)
                items = [builder.extract_element(vec, ir.Constant(ir.IntType(32), i))
                         for i in range(lanes)]
                return context.make_tuple(builder, signature.return_type, items)

            return sig, codegen

        return load

    def _vector_store(element, lanes):
        def codegen(context, builder, signature, args):
            lane = context.get_value_type(element)
            vec = ir.Constant(ir.VectorType(lane, lanes), None)
            for i in range(lanes):
                vec = builder.insert_element(vec, args[1 + i], ir.Constant(ir.IntType(32), i))
            ptr = builder.inttoptr(args[0], ir.PointerType(ir.VectorType(lane, lanes), _GLOBAL))
            builder.store(vec, ptr, align=16)
            return context.get_dummy_value()

        if lanes == 4:
            @intrinsic
            def store4(typingctx, addr, a, b, c, d):
                """One 16-byte store (st.global.v4.b32) to a 16-byte aligned address."""
                return types.void(types.int64, element, element, element, element), codegen

            return store4

        @intrinsic
        def store2(typingctx, addr, a, b):
            """One 16-byte store (st.global.v2.f64) to a 16-byte aligned address."""
            return types.void(types.int64, element, element), codegen

        return store2

    ld_v4_f32 = _vector_load(types.float32, 4)
    ld_v4_u32 = _vector_load(types.uint32, 4)
    ld_v2_f64 = _vector_load(types.float64, 2)
    st_v4_f32 = _vector_store(types.float32, 4)
    st_v4_u32 = _vector_store(types.uint32, 4)
    st_v2_f64 = _vector_store(types.float64, 2)

    _device = cuda.jit(device=True, forceinline=True)

    def _kernel(fn):
        return cuda.jit(fn, cache=CACHE)


@_device
def bf16_to_f32(bits):
    return u32_as_f32(np.uint32(bits) << np.uint32(16))


@_device
def f32_to_bf16(value):
    # Round to nearest even with a NaN guard: bit-identical to torch's float -> bfloat16 on the
    # CPU (on a GPU torch may give another NaN payload; NaN either way).
    if value != value:
        return np.uint16(0x7FC0)
    u = f32_as_u32(value)
    bias = ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return np.uint16((u + bias) >> np.uint32(16))


# --- per-thread loops over one chunk --------------------------------------------------------------
# A chunk is read as 16-byte words: 4 float32, 2 float64 or 8 16-bit values. Thread ``tid`` takes
# words tid, tid + THREADS, ..., and each value of a word goes to a fixed one of four float64
# accumulators, in a fixed order: a partial depends on the chunk's values and THREADS only. An
# aligned chunk is read with one vector load per word, two words in flight per thread; a chunk at
# an odd offset (a view into a flat buffer) reads the same values one by one, in the same order,
# so it gives the same bits. The inf norm keeps a NaN-winning max of |x| in the accumulators.

_T = THREADS


@_device
def _acc(s, v, kind):
    """Accumulate the float64 value v: s + v*v (L2), s + |v| (L1), or max(s, |v|) letting NaN
    win (inf)."""
    if kind == NORM_L2:
        return s + v * v
    a = abs(v)
    if kind == NORM_L1:
        return s + a
    if a > s or a != a:
        return a
    return s


@_device
def _fold4(s0, s1, s2, s3, kind):
    return _combine(_combine(s0, s1, kind), _combine(s2, s3, kind), kind)


@_device
def _decode16(bits, is_half):
    if is_half:
        return half_to_f32(bits)
    return bf16_to_f32(bits)


@_device
def _encode16(value, is_half):
    if is_half:
        return f32_to_half(value)
    return f32_to_bf16(value)


@_device
def _pack16(lo, hi):
    return np.uint32(lo) | (np.uint32(hi) << np.uint32(16))


@_device
def _acc_pair(s, u, is_half, kind):
    """Accumulate the two 16-bit values packed in u (uint32), low half first."""
    s = _acc(s, np.float64(_decode16(np.uint16(u & np.uint32(0xFFFF)), is_half)), kind)
    return _acc(s, np.float64(_decode16(np.uint16(u >> np.uint32(16)), is_half)), kind)


@_device
def _f32_words(addr, start, stop, tid, kind):
    base = addr + 4 * start
    nw = (stop - start) >> 2
    aligned = (base & 15) == 0
    x = as_f32(base, stop - start)
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    w = tid
    while w + _T < nw:
        if aligned:
            a0, a1, a2, a3 = ld_v4_f32(base + 16 * w)
            b0, b1, b2, b3 = ld_v4_f32(base + 16 * (w + _T))
        else:
            i = 4 * w
            k = 4 * (w + _T)
            a0, a1, a2, a3 = x[i], x[i + 1], x[i + 2], x[i + 3]
            b0, b1, b2, b3 = x[k], x[k + 1], x[k + 2], x[k + 3]
        s0 = _acc(s0, np.float64(a0), kind)
        s1 = _acc(s1, np.float64(a1), kind)
        s2 = _acc(s2, np.float64(a2), kind)
        s3 = _acc(s3, np.float64(a3), kind)
        s0 = _acc(s0, np.float64(b0), kind)
        s1 = _acc(s1, np.float64(b1), kind)
        s2 = _acc(s2, np.float64(b2), kind)
        s3 = _acc(s3, np.float64(b3), kind)
        w += 2 * _T
    if w < nw:
        if aligned:
            a0, a1, a2, a3 = ld_v4_f32(base + 16 * w)
        else:
            i = 4 * w
            a0, a1, a2, a3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        s0 = _acc(s0, np.float64(a0), kind)
        s1 = _acc(s1, np.float64(a1), kind)
        s2 = _acc(s2, np.float64(a2), kind)
        s3 = _acc(s3, np.float64(a3), kind)
    rem = (stop - start) & 3
    if rem != 0 and tid == nw % _T:  # the last, partial word
        i = 4 * nw
        s0 = _acc(s0, np.float64(x[i]), kind)
        if rem > 1:
            s1 = _acc(s1, np.float64(x[i + 1]), kind)
        if rem > 2:
            s2 = _acc(s2, np.float64(x[i + 2]), kind)
    return _fold4(s0, s1, s2, s3, kind)


@_device
def _f64_words(addr, start, stop, tid, kind):
    # Words alternate between accumulator pairs: a thread's even words feed s0, s1, its odd
    # words s2, s3.
    base = addr + 8 * start
    nw = (stop - start) >> 1
    aligned = (base & 15) == 0
    x = as_f64(base, stop - start)
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    w = tid
    while w + _T < nw:
        if aligned:
            a0, a1 = ld_v2_f64(base + 16 * w)
            b0, b1 = ld_v2_f64(base + 16 * (w + _T))
        else:
            i = 2 * w
            k = 2 * (w + _T)
            a0, a1, b0, b1 = x[i], x[i + 1], x[k], x[k + 1]
        s0 = _acc(s0, a0, kind)
        s1 = _acc(s1, a1, kind)
        s2 = _acc(s2, b0, kind)
        s3 = _acc(s3, b1, kind)
        w += 2 * _T
    if w < nw:
        if aligned:
            a0, a1 = ld_v2_f64(base + 16 * w)
        else:
            a0, a1 = x[2 * w], x[2 * w + 1]
        s0 = _acc(s0, a0, kind)
        s1 = _acc(s1, a1, kind)
    if (stop - start) & 1 and tid == nw % _T:  # the last, half word
        if (nw // _T) & 1:
            s2 = _acc(s2, x[2 * nw], kind)
        else:
            s0 = _acc(s0, x[2 * nw], kind)
    return _fold4(s0, s1, s2, s3, kind)


@_device
def _h16_words(addr, is_half, start, stop, tid, kind):
    """fp16 (``is_half``) or bf16, read as bits; a word is four uint32 of two values each."""
    base = addr + 2 * start
    nw = (stop - start) >> 3
    aligned = (base & 15) == 0
    x = as_u16(base, stop - start)
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    w = tid
    while w + _T < nw:
        if aligned:
            a0, a1, a2, a3 = ld_v4_u32(base + 16 * w)
            b0, b1, b2, b3 = ld_v4_u32(base + 16 * (w + _T))
        else:
            i = 8 * w
            k = 8 * (w + _T)
            a0, a1 = _pack16(x[i], x[i + 1]), _pack16(x[i + 2], x[i + 3])
            a2, a3 = _pack16(x[i + 4], x[i + 5]), _pack16(x[i + 6], x[i + 7])
            b0, b1 = _pack16(x[k], x[k + 1]), _pack16(x[k + 2], x[k + 3])
            b2, b3 = _pack16(x[k + 4], x[k + 5]), _pack16(x[k + 6], x[k + 7])
        s0 = _acc_pair(s0, a0, is_half, kind)
        s1 = _acc_pair(s1, a1, is_half, kind)
        s2 = _acc_pair(s2, a2, is_half, kind)
        s3 = _acc_pair(s3, a3, is_half, kind)
        s0 = _acc_pair(s0, b0, is_half, kind)
        s1 = _acc_pair(s1, b1, is_half, kind)
        s2 = _acc_pair(s2, b2, is_half, kind)
        s3 = _acc_pair(s3, b3, is_half, kind)
        w += 2 * _T
    if w < nw:
        if aligned:
            a0, a1, a2, a3 = ld_v4_u32(base + 16 * w)
        else:
            i = 8 * w
            a0, a1 = _pack16(x[i], x[i + 1]), _pack16(x[i + 2], x[i + 3])
            a2, a3 = _pack16(x[i + 4], x[i + 5]), _pack16(x[i + 6], x[i + 7])
        s0 = _acc_pair(s0, a0, is_half, kind)
        s1 = _acc_pair(s1, a1, is_half, kind)
        s2 = _acc_pair(s2, a2, is_half, kind)
        s3 = _acc_pair(s3, a3, is_half, kind)
    rem = (stop - start) & 7
    if rem != 0 and tid == nw % _T:  # the last, partial word: value k goes where it would in a word
        i = 8 * nw
        for k in range(rem):
            v = np.float64(_decode16(x[i + k], is_half))
            if k < 2:
                s0 = _acc(s0, v, kind)
            elif k < 4:
                s1 = _acc(s1, v, kind)
            elif k < 6:
                s2 = _acc(s2, v, kind)
            else:
                s3 = _acc(s3, v, kind)
    return _fold4(s0, s1, s2, s3, kind)


@_device
def _load64(addr, code, j):
    """Element j of a tensor, as float64 (exact for every dtype)."""
    if code == FLOAT32:
        return np.float64(as_f32(addr, j + 1)[j])
    if code == FLOAT64:
        return as_f64(addr, j + 1)[j]
    return np.float64(_decode16(as_u16(addr, j + 1)[j], code == FLOAT16))


@_device
def _thread_sum(addr, code, start, stop, tid, kind, p):
    """This thread's share of one chunk's sum of |x|**p (max |x| for inf), in float64."""
    if kind == NORM_POWER:
        # General p: rare, and pow dominates; one plain loop (one call site keeps code small).
        s = 0.0
        j = start + tid
        while j < stop:
            s += abs(_load64(addr, code, j)) ** p
            j += _T
        return s
    if code == FLOAT32:
        return _f32_words(addr, start, stop, tid, kind)
    if code == FLOAT64:
        return _f64_words(addr, start, stop, tid, kind)
    return _h16_words(addr, code == FLOAT16, start, stop, tid, kind)


@_device
def _thread_nonfinite(addr, code, j, stop):
    """inf/NaN elements among j, j + THREADS, ... (exponent bits all ones)."""
    n = 0
    if code == FLOAT32:
        x = as_f32(addr, stop)
        e = np.uint32(0x7F800000)
        while j < stop:
            n += (f32_as_u32(x[j]) & e) == e
            j += _T
    elif code == FLOAT64:
        y = as_f64(addr, stop)
        e64 = np.uint64(0x7FF0000000000000)
        while j < stop:
            n += (f64_as_u64(y[j]) & e64) == e64
            j += _T
    else:
        h = as_u16(addr, stop)
        e16 = np.uint16(0x7C00) if code == FLOAT16 else np.uint16(0x7F80)
        while j < stop:
            n += (h[j] & e16) == e16
            j += _T
    return n


# --- fixed-shape block reductions -----------------------------------------------------------------
# The caller stores its value in sh[tid]; every thread gets the result. The shape (halving
# strides over THREADS slots) is fixed, so the result depends on THREADS only.


@_device
def _combine(a, b, kind):
    if kind == NORM_INF:
        # max that lets NaN win (like torch.amax)
        if a != a:
            return a
        if b != b or b > a:
            return b
        return a
    return a + b


@_device
def _block_reduce(sh, tid, kind):
    cuda.syncthreads()
    s = _T // 2
    while s > 0:
        if tid < s:
            sh[tid] = _combine(sh[tid], sh[tid + s], kind)
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()  # everyone has read sh[0] before it is written again
    return r


@_device
def _block_isum(shi, tid):
    cuda.syncthreads()
    s = _T // 2
    while s > 0:
        if tid < s:
            shi[tid] = shi[tid] + shi[tid + s]
        cuda.syncthreads()
        s //= 2
    r = shi[0]
    cuda.syncthreads()
    return r


@_device
def _strided_fold(base, first, stop, tid, kind):
    """This thread's fold of the float64 values at ``base`` indexed first + tid,
    first + tid + THREADS, ... (fixed order), read past L1 (``ld_cg_f64``).

    Eight independent loads per round: the sequential add would otherwise wait on memory for
    each element.
    """
    acc = 0.0
    i = first + tid
    while i + 7 * _T < stop:
        a0 = ld_cg_f64(base + 8 * i)
        a1 = ld_cg_f64(base + 8 * (i + _T))
        a2 = ld_cg_f64(base + 8 * (i + 2 * _T))
        a3 = ld_cg_f64(base + 8 * (i + 3 * _T))
        a4 = ld_cg_f64(base + 8 * (i + 4 * _T))
        a5 = ld_cg_f64(base + 8 * (i + 5 * _T))
        a6 = ld_cg_f64(base + 8 * (i + 6 * _T))
        a7 = ld_cg_f64(base + 8 * (i + 7 * _T))
        acc = _combine(acc, a0, kind)
        acc = _combine(acc, a1, kind)
        acc = _combine(acc, a2, kind)
        acc = _combine(acc, a3, kind)
        acc = _combine(acc, a4, kind)
        acc = _combine(acc, a5, kind)
        acc = _combine(acc, a6, kind)
        acc = _combine(acc, a7, kind)
        i += 8 * _T
    while i < stop:
        acc = _combine(acc, ld_cg_f64(base + 8 * i), kind)
        i += _T
    return acc


# --- the norm's root and torch's clipping coefficient, on the device ------------------------------


@_device
def _root(total, kind, p):
    """The p-norm from its float64 power sum, with the special cases of torch's
    ``total.pow(1 / p)`` (sqrt is correctly rounded on both sides)."""
    if kind == NORM_L2:
        return math.sqrt(total)
    if kind == NORM_L1 or kind == NORM_INF:
        return total
    e = 1.0 / p
    if e == 0.5:
        return math.sqrt(total)
    if e == 1.0:
        return total
    if e == 2.0:
        return mul_rn(total, total)
    if e == 3.0:
        return mul_rn(mul_rn(total, total), total)
    return total ** e


@_device
def _coef_f64(norm, max_norm):
    """``clamp(max_norm / (norm + 1e-6), max=1)`` exactly as torch evaluates it on a float64
    norm: ``reciprocal(norm + 1e-6) * max_norm`` (NaN stays NaN)."""
    c = (1.0 / add_rn(norm, 1e-6)) * max_norm
    if c > 1.0:
        c = 1.0
    return c


@_device
def _coef_f32(n32, max_norm):
    """The same on a float32 norm, in float32 (``max_norm`` rounded to float32, as torch does)."""
    c32 = (np.float32(1.0) / (n32 + np.float32(1e-6))) * np.float32(max_norm)
    if c32 > np.float32(1.0):
        c32 = np.float32(1.0)
    return c32


@_device
def _write_norm_coef(total, kind, p, flags, max_norm, norm_addr, coef_addr):
    """Norm in the result dtype, then torch's coefficient from it, in the same dtype."""
    norm = _root(total, kind, p)
    if flags & RESULT_F64:
        if norm_addr != 0:
            as_f64(norm_addr, 1)[0] = norm
        if coef_addr != 0:
            as_f64(coef_addr, 1)[0] = _coef_f64(norm, max_norm)
    else:
        n32 = np.float32(norm)
        if norm_addr != 0:
            as_f32(norm_addr, 1)[0] = n32
        if coef_addr != 0:
            as_f32(coef_addr, 1)[0] = _coef_f32(n32, max_norm)


# --- kernel 1: per-chunk partials, per-tensor folds, and the last-block finalize -----------------


@_kernel
def power_sums_kernel(table, n, nc, kind, p, scratch, flags, max_norm,
                      total_addr, norm_addr, coef_addr, count_addr, per_tensor_addr):
    """Sum of |x|**p (max |x| for inf) over every tensor of the table, in float64.

    Args:
        table: address of the int64 device table (``table_layout``).
        n, nc: tensors and chunks in the table.
        kind, p: the norm kind (``layout.NORM_*``) and p.
        scratch: address of the table's zeroed int64 scratch (``scratch_slots``).
        flags: ``COUNT_NONFINITE`` | ``RESULT_F64``.
        max_norm: for the coefficient.
        total_addr, norm_addr, coef_addr, count_addr, per_tensor_addr: where to write the
            float64 total, the norm and the coefficient (float32, or float64 with RESULT_F64),
            the int64 count of inf/NaN elements, and one float64 per tensor; 0 skips an output.
            The per-tensor folds run only when ``per_tensor_addr`` is set.
    """
    tid = cuda.threadIdx.x
    sh = cuda.shared.array(_T, np.float64)
    shi = cuda.shared.array(_T, np.int64)
    flag = cuda.shared.array(1, np.int64)
    tab = as_i64(table, 3 * n + 3 * nc + 1)
    partials = as_f64(scratch + 8 * SCRATCH_PARTIALS, nc)
    counts = as_i64(scratch + 8 * (SCRATCH_PARTIALS + nc), nc)
    partials_addr = scratch + 8 * SCRATCH_PARTIALS
    counts_addr = scratch + 8 * (SCRATCH_PARTIALS + nc)
    tickets = scratch + 8 * (SCRATCH_PARTIALS + 2 * nc)
    o_tensor = 2 * n
    o_start = 2 * n + nc
    o_stop = 2 * n + 2 * nc
    o_first = 2 * n + 3 * nc
    per_tensor = per_tensor_addr != 0

    c = cuda.blockIdx.x
    while c < nc:
        t = tab[o_tensor + c]
        addr = tab[t]
        code = tab[n + t] & CODE_MASK
        start = tab[o_start + c]
        stop = tab[o_stop + c]
        sh[tid] = _thread_sum(addr, code, start, stop, tid, kind, p)
        part = _block_reduce(sh, tid, kind)
        if tid == 0:
            partials[c] = part
        if flags & COUNT_NONFINITE:
            bad = 0
            if not math.isfinite(part):  # an inf or NaN partial: find the culprits
                bad = _thread_nonfinite(addr, code, start + tid, stop)
            shi[tid] = bad
            bad = _block_isum(shi, tid)
            if tid == 0:
                counts[c] = bad
        if per_tensor:
            # The block that writes a tensor's last partial folds that tensor.
            cuda.threadfence()
            if tid == 0:
                k = tab[o_first + t + 1] - tab[o_first + t]
                flag[0] = 1 if atomic_inc(tickets + 8 * t) == k - 1 else 0
            cuda.syncthreads()
            if flag[0] == 1:
                cuda.threadfence()
                sh[tid] = _strided_fold(partials_addr, tab[o_first + t], tab[o_first + t + 1], tid, kind)
                folded = _block_reduce(sh, tid, kind)
                if tid == 0:
                    as_f64(per_tensor_addr, n)[t] = folded
                    as_i64(tickets, n)[t] = 0
            cuda.syncthreads()
        c += cuda.gridDim.x

    # Last block done: it alone combines the partials, in a fixed order.
    cuda.threadfence()
    if tid == 0:
        flag[0] = 1 if atomic_inc(scratch + 8 * SCRATCH_TICKET) == cuda.gridDim.x - 1 else 0
    cuda.syncthreads()
    if flag[0] == 0:
        return
    cuda.threadfence()
    sh[tid] = _strided_fold(partials_addr, 0, nc, tid, kind)
    total = _block_reduce(sh, tid, kind)
    nonfinite = 0
    if flags & COUNT_NONFINITE:
        bad = 0
        i = tid
        while i < nc:
            bad += ld_cg_i64(counts_addr + 8 * i)
            i += _T
        shi[tid] = bad
        nonfinite = _block_isum(shi, tid)
    if per_tensor:
        out = as_f64(per_tensor_addr, n)
        t = tid
        while t < n:
            if tab[o_first + t + 1] == tab[o_first + t]:
                out[t] = 0.0  # an empty tensor has no chunk to fold
            t += _T
    if tid == 0:
        if total_addr != 0:
            as_f64(total_addr, 1)[0] = total
        if count_addr != 0:
            as_i64(count_addr, 1)[0] = nonfinite
        _write_norm_coef(total, kind, p, flags, max_norm, norm_addr, coef_addr)
        as_i64(scratch, 1)[0] = 0  # the next launch starts from ticket 0


# --- kernel 2: scale by a coefficient read from device memory ------------------------------------


@_kernel
def scale_kernel(table, n, nc, value_addr, mode, max_norm):
    """Multiply every writable tensor by a coefficient, with torch's ``mul_`` rounding: 32- and
    16-bit grads multiply in float32 by float32(coef), float64 grads in float64. Returns at once
    when coef >= 1 (NaN is applied, like torch), unless ``SCALE_ALWAYS`` is in ``mode``.

    The coefficient is the value at ``value_addr`` (float32, or float64 with ``SCALE_F64`` in
    ``mode``), or with ``SCALE_FROM_NORM`` torch's coefficient computed from the norm stored
    there and ``max_norm``, in the norm's dtype (``clip_grads_with_norm_`` in one launch).
    """
    if mode & SCALE_F64:
        v = as_f64(value_addr, 1)[0]
        c64 = _coef_f64(v, max_norm) if mode & SCALE_FROM_NORM else v
    else:
        v32 = as_f32(value_addr, 1)[0]
        c64 = np.float64(_coef_f32(v32, max_norm) if mode & SCALE_FROM_NORM else v32)
    if c64 >= 1.0 and not mode & SCALE_ALWAYS:
        return
    c32 = np.float32(c64)
    tid = cuda.threadIdx.x
    tab = as_i64(table, 3 * n + 3 * nc + 1)
    c = cuda.blockIdx.x
    while c < nc:
        t = tab[2 * n + c]
        code = tab[n + t]
        if code < READONLY:
            _scale_thread(tab[t], code, tab[2 * n + nc + c], tab[2 * n + 2 * nc + c], tid, c32, c64)
        c += cuda.gridDim.x


@_device
def _scale_pair(u, is_half, c32):
    lo = _encode16(_decode16(np.uint16(u & np.uint32(0xFFFF)), is_half) * c32, is_half)
    hi = _encode16(_decode16(np.uint16(u >> np.uint32(16)), is_half) * c32, is_half)
    return _pack16(lo, hi)


@_device
def _words(addr, code, start, stop):
    """A chunk's 16-byte words: the address of its first element, elements per word, and the
    number of whole words (the write kernels' shared geometry)."""
    if code == FLOAT32:
        esize = 4
    elif code == FLOAT64:
        esize = 8
    else:
        esize = 2
    per_word = 16 // esize
    return addr + esize * start, per_word, (stop - start) // per_word


@_device
def _scale_thread(addr, code, start, stop, tid, c32, c64):
    """Scale this thread's share of one chunk: 16-byte words when aligned, two in flight (the
    last partial word element by element), else every element one by one."""
    base, per_word, nw = _words(addr, code, start, stop)
    j = start + tid  # first element left to the scalar loop
    if (base & 15) == 0:
        w = tid
        if code == FLOAT32:
            while w + _T < nw:
                a0, a1, a2, a3 = ld_v4_f32(base + 16 * w)
                b0, b1, b2, b3 = ld_v4_f32(base + 16 * (w + _T))
                st_v4_f32(base + 16 * w, a0 * c32, a1 * c32, a2 * c32, a3 * c32)
                st_v4_f32(base + 16 * (w + _T), b0 * c32, b1 * c32, b2 * c32, b3 * c32)
                w += 2 * _T
            if w < nw:
                a0, a1, a2, a3 = ld_v4_f32(base + 16 * w)
                st_v4_f32(base + 16 * w, a0 * c32, a1 * c32, a2 * c32, a3 * c32)
        elif code == FLOAT64:
            while w + _T < nw:
                a0, a1 = ld_v2_f64(base + 16 * w)
                b0, b1 = ld_v2_f64(base + 16 * (w + _T))
                st_v2_f64(base + 16 * w, a0 * c64, a1 * c64)
                st_v2_f64(base + 16 * (w + _T), b0 * c64, b1 * c64)
                w += 2 * _T
            if w < nw:
                a0, a1 = ld_v2_f64(base + 16 * w)
                st_v2_f64(base + 16 * w, a0 * c64, a1 * c64)
        else:
            is_half = code == FLOAT16
            while w + _T < nw:
                a0, a1, a2, a3 = ld_v4_u32(base + 16 * w)
                b0, b1, b2, b3 = ld_v4_u32(base + 16 * (w + _T))
                st_v4_u32(base + 16 * w, _scale_pair(a0, is_half, c32), _scale_pair(a1, is_half, c32),
                          _scale_pair(a2, is_half, c32), _scale_pair(a3, is_half, c32))
                st_v4_u32(base + 16 * (w + _T), _scale_pair(b0, is_half, c32),
                          _scale_pair(b1, is_half, c32), _scale_pair(b2, is_half, c32),
                          _scale_pair(b3, is_half, c32))
                w += 2 * _T
            if w < nw:
                a0, a1, a2, a3 = ld_v4_u32(base + 16 * w)
                st_v4_u32(base + 16 * w, _scale_pair(a0, is_half, c32), _scale_pair(a1, is_half, c32),
                          _scale_pair(a2, is_half, c32), _scale_pair(a3, is_half, c32))
        j = start + per_word * nw + tid
    if code == FLOAT32:
        x = as_f32(addr, stop)
        while j < stop:
            x[j] = x[j] * c32
            j += _T
    elif code == FLOAT64:
        y = as_f64(addr, stop)
        while j < stop:
            y[j] = y[j] * c64
            j += _T
    else:
        h = as_u16(addr, stop)
        is_half = code == FLOAT16
        while j < stop:
            h[j] = _encode16(_decode16(h[j], is_half) * c32, is_half)
            j += _T


# --- clamp (clip_grad_value_) ----------------------------------------------------------------------


@_kernel
def clamp_kernel(table, n, nc, bound):
    """Clamp every writable tensor to [-bound, bound]; stores only what changes (the same
    comparisons as the CPU kernel, so the same results)."""
    tid = cuda.threadIdx.x
    tab = as_i64(table, 3 * n + 3 * nc + 1)
    c = cuda.blockIdx.x
    while c < nc:
        t = tab[2 * n + c]
        code = tab[n + t]
        if code < READONLY:
            _clamp_thread(tab[t], code, tab[2 * n + nc + c], tab[2 * n + 2 * nc + c], tid, bound)
        c += cuda.gridDim.x


@_device
def _beyond(v, b):
    return v > b or v < -b


@_device
def _clamped(v, b):
    """v clamped to [-b, b]; v itself (a NaN's payload, a zero's sign) when within."""
    if v > b:
        return b
    if v < -b:
        return -b
    return v


@_device
def _clamp_bits16(bits, is_half, b32, hi, lo):
    v = _decode16(bits, is_half)
    if v > b32:
        return hi
    if v < -b32:
        return lo
    return bits


@_device
def _clamp_pair(u, is_half, b32, hi, lo):
    return _pack16(_clamp_bits16(np.uint16(u & np.uint32(0xFFFF)), is_half, b32, hi, lo),
                   _clamp_bits16(np.uint16(u >> np.uint32(16)), is_half, b32, hi, lo))


@_device
def _store_clamped_f32(addr, a0, a1, a2, a3, b32):
    """Store the word loaded from ``addr`` clamped, if one of its values changes."""
    if _beyond(a0, b32) or _beyond(a1, b32) or _beyond(a2, b32) or _beyond(a3, b32):
        st_v4_f32(addr, _clamped(a0, b32), _clamped(a1, b32), _clamped(a2, b32), _clamped(a3, b32))


@_device
def _store_clamped_f64(addr, a0, a1, bound):
    if _beyond(a0, bound) or _beyond(a1, bound):
        st_v2_f64(addr, _clamped(a0, bound), _clamped(a1, bound))


@_device
def _store_clamped_16(addr, a0, a1, a2, a3, is_half, b32, hi, lo):
    c0 = _clamp_pair(a0, is_half, b32, hi, lo)
    c1 = _clamp_pair(a1, is_half, b32, hi, lo)
    c2 = _clamp_pair(a2, is_half, b32, hi, lo)
    c3 = _clamp_pair(a3, is_half, b32, hi, lo)
    if c0 != a0 or c1 != a1 or c2 != a2 or c3 != a3:
        st_v4_u32(addr, c0, c1, c2, c3)


@_device
def _clamp_thread(addr, code, start, stop, tid, bound):
    """Clamp this thread's share of one chunk: 16-byte words when aligned (a word is stored
    only when one of its values changes), the last partial word element by element, else every
    element one by one. float32 and 16-bit values compare with float32(bound), float64 values
    with bound; 16-bit values beyond it become the bound encoded in their dtype, with its sign."""
    b32 = np.float32(bound)
    is_half = code == FLOAT16
    hi = _encode16(b32, is_half)
    lo = hi ^ np.uint16(0x8000)  # -bound encoded: the sign flipped (bound -0.0 gives +0.0)
    base, per_word, nw = _words(addr, code, start, stop)
    j = start + tid  # first element left to the scalar loop
    if (base & 15) == 0:
        w = tid
        # Two words in flight per thread, as in the scale: both loads issue before either
        # store (a store between them would hold the second load back: the compiler cannot
        # tell that the two addresses differ).
        if code == FLOAT32:
            while w + _T < nw:
                a0, a1, a2, a3 = ld_v4_f32(base + 16 * w)
                b0, b1, b2, b3 = ld_v4_f32(base + 16 * (w + _T))
                _store_clamped_f32(base + 16 * w, a0, a1, a2, a3, b32)
                _store_clamped_f32(base + 16 * (w + _T), b0, b1, b2, b3, b32)
                w += 2 * _T
            if w < nw:
                a0, a1, a2, a3 = ld_v4_f32(base + 16 * w)
                _store_clamped_f32(base + 16 * w, a0, a1, a2, a3, b32)
        elif code == FLOAT64:
            while w + _T < nw:
                a0, a1 = ld_v2_f64(base + 16 * w)
                b0, b1 = ld_v2_f64(base + 16 * (w + _T))
                _store_clamped_f64(base + 16 * w, a0, a1, bound)
                _store_clamped_f64(base + 16 * (w + _T), b0, b1, bound)
                w += 2 * _T
            if w < nw:
                a0, a1 = ld_v2_f64(base + 16 * w)
                _store_clamped_f64(base + 16 * w, a0, a1, bound)
        else:
            while w + _T < nw:
                a0, a1, a2, a3 = ld_v4_u32(base + 16 * w)
                b0, b1, b2, b3 = ld_v4_u32(base + 16 * (w + _T))
                _store_clamped_16(base + 16 * w, a0, a1, a2, a3, is_half, b32, hi, lo)
                _store_clamped_16(base + 16 * (w + _T), b0, b1, b2, b3, is_half, b32, hi, lo)
                w += 2 * _T
            if w < nw:
                a0, a1, a2, a3 = ld_v4_u32(base + 16 * w)
                _store_clamped_16(base + 16 * w, a0, a1, a2, a3, is_half, b32, hi, lo)
        j = start + per_word * nw + tid
    if code == FLOAT32:
        x = as_f32(addr, stop)
        while j < stop:
            v = x[j]
            if _beyond(v, b32):
                x[j] = _clamped(v, b32)
            j += _T
    elif code == FLOAT64:
        y = as_f64(addr, stop)
        while j < stop:
            w64 = y[j]
            if _beyond(w64, bound):
                y[j] = _clamped(w64, bound)
            j += _T
    else:
        h = as_u16(addr, stop)
        while j < stop:
            bits = h[j]
            clamped = _clamp_bits16(bits, is_half, b32, hi, lo)
            if clamped != bits:
                h[j] = clamped
            j += _T


KERNELS = {
    "power_sums_kernel": (power_sums_kernel, POWER_SUMS_ARGS),
    "scale_kernel": (scale_kernel, SCALE_ARGS),
    "clamp_kernel": (clamp_kernel, CLAMP_ARGS),
}
