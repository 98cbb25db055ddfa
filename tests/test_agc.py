"""adaptive_grad_clip_ (AGC): fused kernels against a plain-torch reference of the paper's formula.

The reference computes each unit's norms exactly (``math.fsum`` of float64 squares), applies
``max_norm = clipping * max(||W||, eps)`` and, when ``||G|| > max_norm``, multiplies the unit by
``max_norm / max(||G||, 1e-6)`` with torch's own ``mul_``. The kernels accumulate in float64 in
another order, so their factors may differ from the reference's in the last bits of a float64:
after rounding to float32 (the factor 32- and 16-bit grads are multiplied by) that is invisible
on these inputs, and the results are compared bit for bit. float64 grads are compared within
``float64_rtol``: a sum of n non-negative terms errs by at most (n - 1) * 2**-53 relative in any
order, the square root halves that, and the factor's division and the multiply add an ulp each.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fastclip
from fastclip import agc as A
from fastclip.kernels import agc as K
from reference import ALL_DTYPES, assert_bitwise_equal

CLIPPING = 0.01
EPS = 1e-3


# --- the reference -----------------------------------------------------------------------------


def unit_sums(t: torch.Tensor) -> list[float]:
    """Exact float64 sums of squares of each unit of ``t`` (rows for >= 2-D, else the whole)."""
    rows = t.shape[0] if t.dim() >= 2 else 1
    flat = t.detach().double().reshape(rows, -1) if t.numel() else t.detach().double().reshape(rows, 0)
    return [math.fsum((r * r).tolist()) for r in flat]


def agc_reference_(params, clipping=CLIPPING, eps=EPS) -> None:
    """The paper's formula, one unit at a time, in plain torch (writes via ``mul_``)."""
    for p in params:
        g = p.grad
        if g is None or g.numel() == 0:
            continue
        rows = g.shape[0] if g.dim() >= 2 else 1
        units = g.view(rows, -1) if g.is_contiguous() else None
        for r, (w2, g2) in enumerate(zip(unit_sums(p), unit_sums(g))):
            w_norm, g_norm = math.sqrt(w2), math.sqrt(g2)
            max_norm = clipping * (w_norm if (w_norm >= eps or math.isnan(w_norm)) else eps)
            if g_norm > max_norm:
                factor = max_norm / max(g_norm, 1e-6)
                if units is not None:
                    units[r].mul_(factor)
                elif g.dim() >= 2:
                    g[r].mul_(factor)
                else:
                    g.mul_(factor)


def make_params(shapes, dtype, seed=0, grad_scales=(0.0, 0.003, 0.02, 0.2)):
    """Parameters (normal weights) with grads whose units straddle the clipping threshold."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        w = torch.randn(shape, dtype=torch.float64, generator=gen)
        p = torch.nn.Parameter(w.to(dtype))
        rows = shape[0] if len(shape) >= 2 else 1
        scale = torch.tensor(grad_scales, dtype=torch.float64)[
            torch.randint(len(grad_scales), (rows,), generator=gen)]
        g = torch.randn(shape, dtype=torch.float64, generator=gen)
        g = g * scale.reshape((rows,) + (1,) * (len(shape) - 1)) if len(shape) >= 2 else g * scale[0]
        p.grad = g.to(dtype)
        params.append(p)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def float64_rtol(unit_len: int) -> float:
    """The relative difference allowed between two float64 AGC results (module docstring)."""
    return (unit_len + 4) * 2.0 ** -53


def unit_len(t: torch.Tensor) -> int:
    return t.numel() // t.shape[0] if t.dim() >= 2 and t.shape[0] else t.numel()


def assert_grads_match(ours, ref):
    for a, b in zip(ours, ref):
        if a.grad is None:
            assert b.grad is None
        elif a.grad.dtype == torch.float64:
            torch.testing.assert_close(a.grad, b.grad, rtol=float64_rtol(unit_len(a.grad)), atol=0,
                                       equal_nan=True)
        else:
            assert_bitwise_equal(a.grad, b.grad, nan_bits=False)


SHAPES = [(), (7,), (5, 3), (1, 9), (4, 2, 5), (6, 3, 3, 3), (0, 3), (3, 0), (33, 64)]


# --- results -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_matches_reference_all_shapes(dtype):
    params = make_params(SHAPES, dtype, seed=1)
    ref = clone_params(params)
    originals = [p.grad.clone() for p in params]
    fastclip.adaptive_grad_clip_(params)
    agc_reference_(ref)
    assert_grads_match(params, ref)
    clipped = sum(not torch.equal(p.grad, g) for p, g in zip(params, originals))
    assert clipped >= 4  # negative control: the inputs do get clipped (and some do not)
    assert clipped < sum(g.numel() > 0 for g in originals)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_long_units_and_threads(dtype, cpu_kernel_calls):
    # Units longer than a chunk (64K) are split into pieces; 2 * numel >= PARALLEL_MIN_ELEMENTS
    # (weights and grads) runs threaded.
    torch.set_num_threads(2)
    shapes = [(150_000,), (2, 70_000), (1000, 800), (5,)]
    params = make_params(shapes, dtype, seed=2, grad_scales=(0.001, 0.05))
    ref = clone_params(params)
    fastclip.adaptive_grad_clip_(params, clipping=0.02, eps=1e-2)
    assert cpu_kernel_calls == ["agc_rows_parallel", "agc_pieces_parallel"]
    agc_reference_(ref, clipping=0.02, eps=1e-2)
    assert_grads_match(params, ref)


def _table(params):
    t = A._Table([(p.detach(), p.grad) for p in params])
    return t.waddrs, t.gaddrs, t.codes, t.n_rows, t.row_len


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_kernel_pieces_groups_and_unit_norms(dtype):
    """Tiny chunks force pieces everywhere; sums are exact to float64 rounding; results do not
    depend on the number of work groups (threads) or on serial vs parallel."""
    shapes = [(3, 11), (13,), (2, 2, 3), (1,), ()]
    results = []
    for n_groups, parallel in [(1, False), (3, True), (7, True)]:
        params = make_params(shapes, dtype, seed=3)
        w_sq, g_sq = K.adaptive_clip(*_table(params), CLIPPING, EPS, chunk_size=4,
                                     n_groups=n_groups, parallel=parallel)
        results.append((w_sq, g_sq, [p.grad.clone() for p in params]))
    fresh = make_params(shapes, dtype, seed=3)
    exact_w = [s for p in fresh for s in unit_sums(p)]
    exact_g = [s for p in fresh for s in unit_sums(p.grad)]
    ref = clone_params(fresh)
    agc_reference_(ref)
    w_sq, g_sq, grads = results[0]
    for value, exact in zip(list(w_sq) + list(g_sq), exact_w + exact_g):
        assert abs(value - exact) <= 13 * 2.0 ** -53 * exact  # units of at most 13 elements
    for got, want in zip(grads, ref):
        if dtype == torch.float64:
            torch.testing.assert_close(got, want.grad, rtol=float64_rtol(unit_len(got)), atol=0)
        else:
            assert_bitwise_equal(got, want.grad)
    for other in results[1:]:
        assert np.array_equal(other[0], w_sq) and np.array_equal(other[1], g_sq)
        for a, b in zip(other[2], grads):
            assert_bitwise_equal(a, b)


def test_chunk_table_covers_every_element_once():
    n_rows = np.array([5, 1, 0, 3, 2, 1])
    row_len = np.array([2, 9, 4, 0, 7, 4])
    c = K.build_agc_chunks(n_rows, row_len, chunk_size=4, n_groups=3)
    seen = {t: np.zeros(n_rows[t] * row_len[t], dtype=int) for t in range(len(n_rows))}
    for i in range(c.n_chunks):
        t = c.tensor[i]
        for r in range(c.row0[i], c.row1[i]):
            seen[t][r * row_len[t] + c.start[i]: r * row_len[t] + c.stop[i]] += 1
        if c.n_pieces[i] > 1:  # a piece: its siblings are the `n_pieces` chunks from `first`
            sib = range(c.first[i], c.first[i] + c.n_pieces[i])
            assert all(c.tensor[j] == t and c.row0[j] == c.row0[i] for j in sib)
    assert all((v == 1).all() for v in seen.values())
    assert c.group_bounds[0] == 0 and c.group_bounds[-1] == c.n_chunks
    assert sorted(c.pieces.tolist()) == [i for i in range(c.n_chunks) if c.n_pieces[i] > 1]


def test_eps_floor_nan_and_inf_units():
    w = torch.nn.Parameter(torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 4.0], [math.nan, 1.0]]))
    w.grad = torch.tensor([[1e-4, 0.0], [math.nan, 1.0], [math.inf, -2.0], [5.0, 5.0]])
    b = torch.nn.Parameter(torch.ones(3))
    b.grad = torch.tensor([math.inf, -1.0, 0.5])
    ref = clone_params([w, b])
    fastclip.adaptive_grad_clip_([w, b], clipping=0.1, eps=1e-3)
    agc_reference_(ref, clipping=0.1, eps=1e-3)
    assert_grads_match([w, b], ref)
    # Row 0: zero weight -> max_norm = 0.1 * 1e-3 < 1e-4? no: 1e-4 == ||G|| is not > 1e-4 -> kept.
    assert torch.equal(w.grad[0], torch.tensor([1e-4, 0.0]))
    assert w.grad[1].isnan()[0] and w.grad[1, 1] == 1.0  # NaN grad norm: unit left as it is
    assert w.grad[2, 0].isnan() and w.grad[2, 1] == 0.0 and w.grad[2, 1].signbit()  # factor 0
    assert torch.equal(w.grad[3], torch.tensor([5.0, 5.0]))  # NaN weight norm: never clipped
    assert b.grad[0].isnan() and torch.equal(b.grad[1:], torch.tensor([-0.0, 0.0]))


def test_layouts_transposed_channels_last_and_sliced():
    gen = torch.Generator().manual_seed(4)
    conv = torch.randn(8, 3, 3, 3, generator=gen)
    lin = torch.randn(6, 10, generator=gen)
    cases = [
        (conv.to(memory_format=torch.channels_last), (conv * 0.05).to(memory_format=torch.channels_last)),
        (conv.clone(), (conv * 0.05).to(memory_format=torch.channels_last)),  # mixed layouts
        (lin.t().contiguous().t(), (lin * 0.05).t().contiguous().t()),  # transposed: rows strided
        (lin, (torch.randn(6, 20, generator=gen) * 0.05)[:, ::2]),  # a sliced grad
        (lin[:, 1:7], (lin[:, 1:7] * 0.5)),  # a sliced (non-dense) weight
    ]
    params = []
    for w, g in cases:
        p = torch.nn.Parameter(w)
        p.grad = g
        params.append(p)
    expected = []
    for p in params:
        q = torch.nn.Parameter(p.detach().contiguous().clone())
        q.grad = p.grad.contiguous().clone()
        expected.append(q)
    agc_reference_(expected)
    strides = [p.grad.stride() for p in params]
    originals = [p.grad.clone() for p in params]
    fastclip.adaptive_grad_clip_(params)
    for p, q, s in zip(params, expected, strides):
        assert p.grad.stride() == s  # written in place, layout kept
        assert_bitwise_equal(p.grad.contiguous(), q.grad)
    assert all(not torch.equal(p.grad, o) for p, o in zip(params, originals))  # all were clipped


def test_skips_params_without_grads_and_accepts_generators():
    params = make_params([(4, 3), (5,)], torch.float32, seed=5)
    params[1].grad = None
    ref = clone_params(params)
    fastclip.adaptive_grad_clip_(p for p in params)
    agc_reference_(ref)
    assert_grads_match(params, ref)
    assert params[1].grad is None
    fastclip.adaptive_grad_clip_([])  # nothing to do
    single = make_params([(3, 3)], torch.float32, seed=6)[0]
    ref = clone_params([single])
    fastclip.adaptive_grad_clip_(single)  # a tensor alone is accepted, like torch's functions
    agc_reference_(ref)
    assert_grads_match([single], ref)


@pytest.mark.parametrize("shape", [(1024, 1024), (150_000,)], ids=["threaded-rows", "long-unit"])
def test_grads_sharing_memory_are_clipped_in_list_order(shape):
    """One grad under two parameters is clipped twice, the second time from the first's result,
    as the reference does. Before rounds, threads raced on it (seen: 10-77K of 1M elements off)
    and a unit longer than a chunk took both factors from the unclipped norm."""
    torch.set_num_threads(2)
    (p,) = make_params([shape], torch.float32, seed=3, grad_scales=(0.05,))
    g0 = p.grad.clone()
    for _ in range(3):
        p.grad = g0.clone()
        fastclip.adaptive_grad_clip_([p, p])
        ours = p.grad
        p.grad = g0.clone()
        agc_reference_([p, p])
        assert_bitwise_equal(ours, p.grad)
    assert not torch.equal(ours, g0)  # negative control: it clipped


def test_overlapping_views_are_clipped_in_list_order():
    torch.set_num_threads(2)
    base = torch.randn(6000, 200) * 0.05  # two views of 4000 rows: large enough to run threaded
    weights = [torch.nn.Parameter(torch.randn(4000, 200)) for _ in range(2)]
    views = (slice(0, 4000), slice(2000, 6000))
    ours_base, ref_base = base.clone(), base.clone()
    for w, rows in zip(weights, views):
        w.grad = ours_base[rows]
    fastclip.adaptive_grad_clip_(weights)
    for w, rows in zip(weights, views):
        w.grad = ref_base[rows]
    agc_reference_(weights)
    assert_bitwise_equal(ours_base, ref_base)
    assert not torch.equal(ours_base, base)  # negative control: it clipped


def test_rounds_keep_overlapping_pairs_in_list_order():
    w = torch.zeros(10)
    a, b = torch.zeros(10), torch.zeros(10)
    buf = torch.zeros(30)
    c, d = buf[:20], buf[10:]
    pairs = [(w, a), (w, b), (w, a), (w, c), (w, d), (w, a)]
    rounds = A._rounds(pairs)
    ids = [[next(i for i, q in enumerate(pairs) if q is pair) for pair in r] for r in rounds]
    assert ids == [[0, 1, 3], [2, 4], [5]]
    assert A._rounds(pairs[:2]) == [pairs[:2]]  # no shared memory: one round


def test_a_weight_sharing_memory_with_an_earlier_grad_is_read_after_that_grad_is_clipped():
    """``a.grad = b.detach()``: clipping a's grad rewrites b's weight, whose norm sets b's
    threshold. In list order b sees the clipped weight, as the formula applied parameter after
    parameter does; in one round, threads read it while it was written (seen: 0 to 1082 of 1100
    rows off, run to run)."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)

    def pair():
        b = torch.nn.Parameter(torch.randn(1100, 1000, generator=gen) * 1e-3)
        a = torch.nn.Parameter(torch.randn(1100, 1000, generator=gen) * 1e-4)
        a.grad = b.detach()
        b.grad = torch.randn(1100, 1000, generator=gen) * 1e-2
        return a, b

    for _ in range(3):
        a, b = pair()
        ref_a, ref_b = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
        ref_a.grad, ref_b.grad = ref_b.detach(), b.grad.clone()
        fastclip.adaptive_grad_clip_([a, b])
        agc_reference_([ref_a, ref_b])
        assert_bitwise_equal(b.grad, ref_b.grad)
        assert_bitwise_equal(b.detach(), ref_b.detach())
    pairs = [(a.detach(), a.grad), (b.detach(), b.grad)]
    assert [len(r) for r in A._rounds(pairs)] == [1, 1]
    assert [len(r) for r in A._rounds(pairs[::-1])] == [1, 1]  # the other order too


def test_torch_fallback_takes_float64_grads_on_any_device():
    """Devices without a kernel run torch's ops: float64 grads keep float64 norms there (a float32
    norm of a float64 tensor is refused by torch), in the same call as CPU grads."""
    cpu = make_params([(4, 3)], torch.float32, seed=2)
    meta = torch.nn.Parameter(torch.empty(5, 2, dtype=torch.float64, device="meta"))
    meta.grad = torch.empty(5, 2, dtype=torch.float64, device="meta")
    bias = torch.nn.Parameter(torch.empty(5, dtype=torch.float64, device="meta"))
    bias.grad = torch.empty(5, dtype=torch.float64, device="meta")
    expected = clone_params(cpu)
    fastclip.adaptive_grad_clip_(cpu + [meta, bias])
    agc_reference_(expected)
    assert_grads_match(cpu, expected)


def test_torch_fallback_matches_kernels():
    """The torch-ops path (devices without a kernel) gives the kernels' results."""
    for dtype in ALL_DTYPES:
        params = make_params(SHAPES, dtype, seed=7)
        other = clone_params(params)
        fastclip.adaptive_grad_clip_(params)
        A._run_torch(A._pairs(other)[0], CLIPPING, EPS)
        assert_grads_match(params, other)


# --- errors ------------------------------------------------------------------------------------


def _assert_unchanged(params, before):
    for p, g in zip(params, before):
        assert_bitwise_equal(p.grad, g)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(clipping=0.0), ValueError, "`clipping` must be a finite number > 0, got 0.0"),
    (dict(clipping=-1), ValueError, "`clipping`"),
    (dict(clipping=math.nan), ValueError, "`clipping`"),
    (dict(clipping=math.inf), ValueError, "`clipping`"),
    (dict(clipping="0.01"), TypeError, "`clipping` must be a real number, got '0.01'"),
    (dict(eps=-1e-3), ValueError, "`eps` must be a finite number >= 0"),
    (dict(eps=None), TypeError, "`eps`"),
    (dict(clipping=10 ** 400), OverflowError, "`clipping` is too large for a float64"),
    (dict(eps=10 ** 400), OverflowError, "`eps` is too large for a float64"),
])
def test_bad_arguments_raise_and_change_nothing(kwargs, error, words):
    params = make_params([(4, 3), (5,)], torch.float32, seed=8, grad_scales=(1.0,))
    before = [p.grad.clone() for p in params]
    with pytest.raises(error, match="adaptive_grad_clip_") as info:
        fastclip.adaptive_grad_clip_(params, **kwargs)
    assert words in str(info.value)
    _assert_unchanged(params, before)


def test_bad_parameters_raise_before_any_write():
    good = make_params([(4, 3)], torch.float32, seed=9, grad_scales=(1.0,))
    before = [good[0].grad.clone()]
    with pytest.raises(TypeError, match=r"`parameters`.*index 1"):
        fastclip.adaptive_grad_clip_([good[0], "weight"])
    with pytest.raises(TypeError, match="`parameters` must be a tensor or an iterable"):
        fastclip.adaptive_grad_clip_(3.0)
    z = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    z.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"complex64 at index 1"):
        fastclip.adaptive_grad_clip_([good[0], z])
    s = torch.nn.Parameter(torch.zeros(3, 3))
    s.grad = torch.eye(3).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        fastclip.adaptive_grad_clip_([good[0], s])
    e = torch.nn.Parameter(torch.zeros(3, 4))
    e.grad = torch.ones(1, 4).expand(3, 4)  # every row is the same memory
    with pytest.raises(ValueError, match="overlaps itself"):
        fastclip.adaptive_grad_clip_([good[0], e])
    _assert_unchanged(good, before)


# --- CUDA kernels: simulator and PTX ------------------------------------------------------------

_SIM_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    if hasattr(os, "sched_setaffinity"):  # one CPU: the simulator's threads (see test_cuda_sim.py)
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from fastclip.kernels import agc as K, agc_cuda as KC
    assert KC.SIMULATOR and KC.BLOCK == 32
    rng = np.random.default_rng(0)
    # Chunks of 64: (5, 3) one block of 32 one-lane groups; (4, 20) 4-lane groups over two
    # blocks; (1, 70) two pieces; 9 blocks in all per dtype (the simulator is slow).
    shapes = [(5, 3), (4, 20), (9,), (1, 70), ()]
    report = {}
    for name, np_dtype, code in [("float32", np.float32, 0), ("float64", np.float64, 1),
                                 ("float16", np.float16, 2), ("bfloat16", np.uint16, 3)]:
        ws, gs = [], []
        for s, scale in zip(shapes, [0.05, 0.002, 0.05, 0.05, 0.05]):  # 0.002: not clipped
            w = rng.standard_normal(s)
            g = rng.standard_normal(s) * scale
            if name == "bfloat16":  # bits of bf16 values (truncate float32; exact decode below)
                w = (np.asarray(w, np.float32).view(np.uint32) >> 16).astype(np.uint16)
                g = (np.asarray(g, np.float32).view(np.uint32) >> 16).astype(np.uint16)
            ws.append(np.ascontiguousarray(w, dtype=np_dtype))
            gs.append(np.ascontiguousarray(g, dtype=np_dtype))
        n_rows = [s[0] if len(s) >= 2 else 1 for s in shapes]
        row_len = [int(np.prod(s)) // n for s, n in zip(shapes, n_rows)]
        codes = np.full(len(shapes), code, dtype=np.int64)
        g_cpu = [g.copy() for g in gs]
        g_orig = [g.copy() for g in gs]
        w_sq, g_sq = K.adaptive_clip(np.array([w.ctypes.data for w in ws]),
                                     np.array([g.ctypes.data for g in g_cpu]), codes, n_rows,
                                     row_len, 0.01, 1e-3, chunk_size=64)
        out = KC.run_agc(np.array([w.ctypes.data for w in ws]), np.array([g.ctypes.data for g in gs]),
                         codes, n_rows, row_len, 0.01, 1e-3, to_device=lambda a: a,
                         zeros=np.zeros, chunk_size=64)
        rows = sum(n_rows)
        report[name] = {
            "sums_rel_err": float(np.max(np.abs(out[:2 * rows] - np.concatenate([w_sq, g_sq]))
                                         / np.maximum(np.concatenate([w_sq, g_sq]), 1e-300))),
            "grads_equal": all(np.array_equal(a, b) for a, b in zip(gs, g_cpu)),
            "grads_close": all(np.allclose(a, b, rtol=2 * 74 * 2.0 ** -53, atol=0)
                               for a, b in zip(gs, g_cpu))
                           if name == "float64" else None,
            "changed": int(sum(not np.array_equal(a, b) for a, b in zip(gs, g_orig))),
        }
    # The flag-gated zeroing kernel: flag 0 leaves the grads, flag 1 zeroes them.
    xs = [np.arange(1, 70, dtype=np.float32), np.full(3, np.nan), np.ones(5, np.uint16)]
    addrs = np.array([x.ctypes.data for x in xs]); codes = np.array([0, 1, 3])
    lengths = [x.size for x in xs]
    KC.run_zero_if(np.array([0], np.int32), addrs, codes, lengths, lambda a: a, chunk_size=16)
    report["zero_flag0_untouched"] = bool(xs[0][0] == 1 and np.isnan(xs[1]).all() and xs[2][0] == 1)
    KC.run_zero_if(np.array([1], np.int32), addrs, codes, lengths, lambda a: a, chunk_size=16)
    report["zero_flag1_zeroed"] = all(not x.any() for x in xs)
    print(json.dumps(report))
""")


def test_cuda_kernels_in_simulator_match_cpu_kernels():
    pytest.importorskip("numba_cuda")  # the [cuda] extra (numba's built-in target cannot build them)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", _SIM_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # Sums of at most 70 terms in two orders (sequential; strided plus a tree): 2 * 70 * 2**-53.
    sums_tol = 2 * 70 * 2.0 ** -53
    for name in ("float32", "float16", "bfloat16"):
        assert report[name]["grads_equal"], (name, report[name])
        assert report[name]["sums_rel_err"] <= sums_tol, (name, report[name])
        assert report[name]["changed"] >= 3, (name, report[name])  # units were clipped
    assert report["float64"]["grads_close"] and report["float64"]["sums_rel_err"] <= sums_tol
    assert report["zero_flag0_untouched"] and report["zero_flag1_zeroed"]


def test_cuda_kernels_compile_to_ptx_for_sm90():
    """The real (non-simulator) kernels compile for compute capability 9.0 without a GPU."""
    pytest.importorskip("numba_cuda")
    from numba import cuda
    from unittest import mock

    import numba.cuda.dispatcher as dispatcher

    try:
        from numba.cuda.cudadrv.nvvm import NVVM

        NVVM()
    except Exception as exc:  # no libNVVM here: nothing to compile with
        pytest.skip(f"libNVVM unavailable: {exc}")
    from fastclip.kernels import agc_cuda as KC

    class _SM90:
        compute_capability = (9, 0)

    # numba-cuda compiles a kernel's device functions for the *current* device; without a GPU
    # there is none, so name the target compute_capability for them too.
    with mock.patch.object(dispatcher, "get_current_device", lambda: _SM90()):
        for name, sig in KC.SIGNATURES.items():
            ptx, _ = cuda.compile_ptx(KC.PY_FUNCS[name], sig, cc=(9, 0))
            assert ".target sm_90" in ptx and name in ptx
            if name == "agc_rows":  # float -> half rounds to nearest even, like torch
                assert "cvt.rn.f16.f32" in ptx


# --- a real GPU --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_cuda_torch_fallback_matches_cpu_for_vectors_and_scalars(dtype, monkeypatch):
    """Without numba-cuda, CUDA grads run torch's ops. A 1-D or 0-d unit's factor must not be a
    0-d operand there: torch's CUDA mul_ would round it to a 16-bit grad's dtype first."""
    monkeypatch.setitem(A._cuda_state, "module", None)
    cpu = make_params([(7,), (), (3, 4)], dtype, seed=12, grad_scales=(0.2,))
    gpu = []
    for p in cpu:
        q = torch.nn.Parameter(p.detach().cuda())
        q.grad = p.grad.cuda()
        gpu.append(q)
    fastclip.adaptive_grad_clip_(gpu)
    fastclip.adaptive_grad_clip_(cpu)
    for p, q in zip(cpu, gpu):
        if dtype == torch.float64:
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=float64_rtol(unit_len(p.grad)), atol=0)
        else:
            assert_bitwise_equal(q.grad.cpu(), p.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_cuda_matches_cpu_and_never_syncs(dtype):
    shapes = SHAPES + [(150_000,), (2, 70_000)]
    cpu = make_params(shapes, dtype, seed=10)
    gpu = []
    for p in cpu:
        q = torch.nn.Parameter(p.detach().cuda())
        q.grad = p.grad.cuda()
        gpu.append(q)
    fastclip.adaptive_grad_clip_(gpu[:1])  # compile outside the sync check
    for p, q in zip(cpu, gpu):
        q.grad.copy_(p.grad)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastclip.adaptive_grad_clip_(gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    agc_reference_(cpu)
    for p, q in zip(cpu, gpu):
        if dtype == torch.float64:
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=float64_rtol(unit_len(p.grad)), atol=0)
        else:
            assert_bitwise_equal(q.grad.cpu(), p.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_with_new_values():
    """One eager call (compiles and loads the kernels), a capture, then replays with new grads
    copied into the same buffers: each replay clips as an eager call on the CPU does."""
    shapes = SHAPES + [(150_000,)]
    cpu = make_params(shapes, torch.float32, seed=11)
    gpu = []
    for p in cpu:
        q = torch.nn.Parameter(p.detach().cuda())
        q.grad = p.grad.cuda()
        gpu.append(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fastclip.adaptive_grad_clip_(gpu, 0.01)  # warm-up, as torch advises before capturing
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fastclip.adaptive_grad_clip_(gpu, 0.01)
    for seed in (12, 13):
        fresh = make_params(shapes, torch.float32, seed=seed)
        with torch.no_grad():
            for q, p in zip(gpu, fresh):  # AGC reads the weights too: both change
                q.copy_(p)
                q.grad.copy_(p.grad)
        graph.replay()
        agc_reference_(fresh, 0.01)
        for q, p in zip(gpu, fresh):
            assert_bitwise_equal(q.grad.cpu(), p.grad)


@pytest.mark.parametrize("view", ["sliced", "transposed"])
def test_an_inference_grad_torch_must_write_back_is_refused_before_any_write(view):
    """A grad whose units are not dense blocks is clipped in a copy that torch writes back; an
    inference tensor there would be refused by torch after the kernel had clipped the others."""
    good = make_params([(4, 3)], torch.float32, seed=9, grad_scales=(100.0,))
    before = [good[0].grad.clone()]
    with torch.inference_mode():
        base = torch.ones(2, 4)
        grad = base[:, ::2] if view == "sliced" else base.t()
    odd = torch.nn.Parameter(torch.ones(grad.shape))
    odd.grad = grad
    with pytest.raises(RuntimeError, match=r"^adaptive_grad_clip_: the grad at index 1 .* inference tensor"):
        fastclip.adaptive_grad_clip_([good[0], odd], 1e-3)
    _assert_unchanged(good, before)
    with torch.inference_mode():  # where torch may write it, so may fastclip
        fastclip.adaptive_grad_clip_([good[0], odd], 1e-3)
    assert not torch.equal(good[0].grad, before[0])


def test_tensors_without_memory_of_their_own_are_refused():
    """A wrapper subclass (here FakeTensor) reports address 0: refused before any kernel reads
    it (it used to crash the process)."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.nn.Parameter(torch.randn(4, 3))
        w.grad = torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about reading a FakeTensor's data pointer
        with pytest.raises(TypeError, match="no data address of its own"):
            fastclip.adaptive_grad_clip_([w], 0.01)
