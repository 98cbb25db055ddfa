"""The CUDA kernels' logic, run in numba's CUDA simulator on tiny inputs (no GPU needed).

numba reads ``NUMBA_ENABLE_CUDASIM`` once, at import, for the whole process. So in an ordinary
test run, ``test_simulator_suite`` starts a second pytest on this file with the variable set,
and every other test here is skipped; in that child run, the tests below run and the launcher
skips itself. To run them directly: ``NUMBA_ENABLE_CUDASIM=1 python3 -m pytest tests/test_cuda_sim.py``.

In the simulator, "device" memory is host memory: tensors are CPU tensors, and the kernels reach
them through their addresses exactly as on a GPU. Blocks have 32 threads (``THREADS``) and grids
at most 3 blocks, and chunks are made small so that every tensor spans several of them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastclip.kernels.layout import NORM_INF, NORM_L1, NORM_L2, NORM_POWER

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
needs_sim = pytest.mark.skipif(not SIM, reason="runs in the simulator child process "
                                               "(see test_simulator_suite)")


def test_simulator_suite():
    """Run this file in a child pytest with NUMBA_ENABLE_CUDASIM=1 (numba reads it at import)."""
    if SIM:
        pytest.skip("already in the simulator process")
    pytest.importorskip("numba_cuda")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__],
        env=env, capture_output=True, text=True, timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, f"simulator tests failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and " skipped" in proc.stdout, proc.stdout[-2000:]


if SIM:
    from reference import (assert_bitwise_equal, exact_power_sum, reference_clip_,
                           reference_coef, tensor_power_sum)

    import fastclip
    from fastclip import _cpu, _cuda, _plan
    from fastclip._table import TensorTable
    from fastclip.kernels import cuda as K

# Elements per chunk here: enough 16-byte words that threads read two words per round in every
# dtype, plus single words and partial ones; every big tensor below spans several chunks.
CHUNK = 300


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    if SIM:
        monkeypatch.setattr(_cuda, "CHUNK_SIZE", CHUNK)
        monkeypatch.setattr(_cuda, "MAX_BLOCKS", None)
        _cuda.clear_cache()
    yield


def _table(tensors):
    return TensorTable.from_tensors(tensors, [t.dtype for t in tensors])


def _misaligned(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``t`` that starts ``offset`` elements into a fresh buffer: dense, read in place,
    but not 16-byte aligned."""
    buf = torch.zeros(t.numel() + offset, dtype=t.dtype)
    view = buf[offset:]
    view.copy_(t)
    return view


def _mixed_set(many: bool = False):
    """Every dtype, an empty tensor, several chunks per tensor, sizes that are not multiples of
    THREADS, CHUNK or a word, and a misaligned twin of each big tensor (last). With ``many``,
    more tensors than THREADS and an empty one past index THREADS (the finalize's loop)."""
    g = torch.Generator().manual_seed(1)
    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
    spec = [(700, f32), (0, f32), (470, f64), (650, f16), (610, bf16)]
    spec += [(3, f32)] * 28 + [(0, f64), (5, f32)] if many else [(5, f32)]
    out = []
    for i, (n, dtype) in enumerate(spec):
        out.append((torch.randn(n, dtype=torch.float64, generator=g) * (i + 1)).to(dtype))
    return out + [_misaligned(out[i], k) for i, k in ((0, 1), (2, 1), (3, 3), (4, 5))]


TWINS = ((0, -4), (2, -3), (3, -2), (4, -1))  # (aligned index, misaligned index) in _mixed_set


def _partials(entry):
    start = K.SCRATCH_PARTIALS
    return entry.scratch_tensor[start:start + entry.nc].view(torch.float64).clone()


@needs_sim
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
def test_partials_per_tensor_and_total_are_exact(p):
    tensors = _mixed_set(many=p == 2.0)
    assert all(t.data_ptr() % 16 for t in tensors[-4:])  # the twins really are misaligned
    table = _table(tensors)
    assert not table.strided
    r = _cuda.power_sums(table, p)
    entry = _cuda.device_table(table)
    assert entry.nc > 2 * entry.grid  # blocks take several chunks each (grid-stride)
    # One partial per chunk, in chunk order.
    host, n, nc = _cuda.host_table(table, CHUNK)
    lay = K.table_layout(n, nc)
    partials = _partials(entry)
    for c in range(nc):
        t = int(host[lay["tensor"] + c])
        piece = tensors[t].reshape(-1)[int(host[lay["start"] + c]):int(host[lay["stop"] + c])]
        ref = tensor_power_sum(piece, p)
        assert math.isclose(float(partials[c]), ref, rel_tol=1e-14, abs_tol=0.0), (c, t)
    per_ref = [tensor_power_sum(t, p) for t in tensors]
    assert r.per_tensor.dtype == torch.float64 and r.per_tensor.shape == (len(tensors),)
    tol = 0.0 if p == math.inf else 1e-14
    for got, ref in zip(r.per_tensor.tolist(), per_ref):
        assert math.isclose(got, ref, rel_tol=tol, abs_tol=0.0)
    for a, m in TWINS:  # vector loads and element loads add the same values in the same order
        assert_bitwise_equal(r.per_tensor[a], r.per_tensor[m])
    assert r.total.dtype == torch.float64 and r.total.dim() == 0
    assert math.isclose(float(r.total), exact_power_sum(tensors, p), rel_tol=tol, abs_tol=0.0)
    assert int(r.nonfinite) == 0
    # Every ticket is back at zero for the next launch.
    assert not entry.scratch_tensor[K.SCRATCH_TICKET]
    assert not entry.scratch_tensor[K.SCRATCH_PARTIALS + 2 * nc:].any()


@needs_sim
def test_deterministic_for_any_grid():
    tensors = _mixed_set()
    results = []
    for blocks in (1, 3):
        _cuda.MAX_BLOCKS = blocks
        _cuda.clear_cache()
        table = _table(tensors)
        r = _cuda.power_sums(table, 2.0)
        assert _cuda.device_table(table).grid == blocks
        results.append((r.total.clone(), r.per_tensor.clone(), _partials(_cuda.device_table(table))))
    for total, per, partials in results[1:]:
        assert_bitwise_equal(total, results[0][0])
        assert_bitwise_equal(per, results[0][1])
        assert_bitwise_equal(partials, results[0][2])


@needs_sim
@pytest.mark.parametrize("kind", [NORM_L2, NORM_INF])
def test_strided_fold_takes_each_value_once_in_a_fixed_order(kind):
    """The finalize's per-thread fold (plain Python in the simulator), on more values than the
    small launches above produce, so its 8-way unrolled rounds run too."""
    vals = np.random.default_rng(0).standard_normal(1000) ** 2
    vals[777] = 50.0
    for first, stop in ((0, 1000), (3, 700), (5, 6), (9, 9)):
        folds = [K._strided_fold(vals.ctypes.data, first, stop, tid, kind) for tid in range(K.THREADS)]
        for tid, got in enumerate(folds):
            mine = vals[first + tid:stop:K.THREADS]
            if kind == NORM_INF:
                assert got == (mine.max() if len(mine) else 0.0)
            else:
                ref = 0.0
                for v in mine:  # the same left-to-right order
                    ref += v
                assert got == ref


@needs_sim
def test_nonfinite_count_rescans_only_bad_chunks():
    tensors = [torch.randn(100), torch.randn(60).half(), torch.randn(70, dtype=torch.float64),
               torch.randn(50).bfloat16()]
    tensors[0][[3, 99]] = torch.tensor([math.inf, math.nan])
    tensors[1][10] = -math.inf
    tensors[3][49] = math.nan
    r = _cuda.power_sums(_table(tensors), 2.0, count_nonfinite=True)
    assert int(r.nonfinite) == 4
    assert math.isnan(float(r.total))
    # Counting is opt-in: without it the count reads 0 (and the pass does no rescan).
    assert int(_cuda.power_sums(_table(tensors), 2.0, count_nonfinite=False).nonfinite) == 0
    # For inf the partial of a chunk holding NaN is NaN: NaN wins the max, like torch.amax.
    assert math.isnan(float(_cuda.power_sums(_table(tensors), math.inf).total))


@needs_sim
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's notes on inf * 0 (NaN, as intended)
@pytest.mark.parametrize("kind,p", [(NORM_L2, 2.0), (NORM_L1, 1.0), (NORM_INF, math.inf),
                                    (NORM_POWER, 3.0), (NORM_POWER, 0.5), (NORM_POWER, 1 / 3)])
def test_norm_and_coefficient_are_torchs(kind, p):
    """The last block's root and coefficient, evaluated directly (a device function is plain
    Python in the simulator), against torch's own ops on the same float64 totals."""
    g = torch.Generator().manual_seed(2)
    totals = (torch.rand(40, dtype=torch.float64, generator=g) * 10.0 ** torch.randint(-12, 12, (40,), generator=g)).tolist()
    totals += [0.0, 1e-12, math.inf, math.nan]
    buf = np.zeros(2, dtype=np.float64)
    for dtype, flags in ((torch.float32, 0), (torch.float64, K.RESULT_F64)):
        for total in totals:
            for max_norm in (0.0, 1e-3, 1.0, 7.5, math.inf):
                buf[:] = 0.0
                K._write_norm_coef(total, kind, p, flags, max_norm,
                                   buf.ctypes.data, buf.ctypes.data + 8)
                got = torch.from_numpy(buf.copy())
                got_norm, got_coef = (got[0], got[1]) if flags else (got[0:1].view(torch.float32)[0],
                                                                     got[1:2].view(torch.float32)[0])
                t64 = torch.tensor(total, dtype=torch.float64)
                ref_norm = (t64.sqrt() if p == 2.0 else t64 if p in (1.0, math.inf) else t64.pow(1.0 / p)).to(dtype)
                if math.isnan(total):
                    assert math.isnan(float(got_norm)) and math.isnan(float(got_coef))
                    continue
                if kind == NORM_POWER and 1.0 / p not in (0.5, 1.0, 2.0, 3.0):
                    # generic pow: libm here, CUDA's pow on a GPU (bitwise there: test_cuda_gpu)
                    assert math.isclose(float(got_norm), float(ref_norm), rel_tol=4e-16 if flags else 1.2e-7)
                    ref_norm = got_norm
                else:
                    assert_bitwise_equal(got_norm, ref_norm, nan_bits=False)
                assert_bitwise_equal(got_coef, reference_coef(max_norm, ref_norm), nan_bits=False)


@needs_sim
def test_scale_reads_coefficient_from_device_memory_and_skips_when_ge_1():
    tensors = [torch.randn(700), torch.randn(470, dtype=torch.float64), torch.randn(650).half(),
               torch.randn(610).bfloat16()]
    tensors += [_misaligned(t, 1) for t in tensors]
    before = [t.clone() for t in tensors]
    table = _table(tensors)
    # coef >= 1: every block returns at once. 1.5 would visibly change the grads if applied.
    for coef in (torch.tensor(1.5), torch.tensor(1.0, dtype=torch.float64)):
        _cuda.scale_(table, coef)
        for t, b in zip(tensors, before):
            assert_bitwise_equal(t, b)
    # coef < 1: applied, with torch's mul_ rounding (float32 multiply for 32- and 16-bit grads).
    coef = torch.tensor(0.3)
    _cuda.scale_(table, coef)
    for t, b in zip(tensors, before):
        assert_bitwise_equal(t, b.mul_(coef))
    # NaN is not >= 1: it is applied, as torch does.
    _cuda.scale_(table, torch.tensor(math.nan))
    assert all(bool(t.isnan().all()) for t in tensors)


@needs_sim
def test_16bit_scale_rounds_like_torch_and_the_cpu_kernels():
    """fp16 and bf16 bit patterns (a strided sample of all 65536, plus specials) times float32
    coefficients: equal bit for bit to torch's ``mul_`` and to the CPU kernels."""
    pats = torch.cat([torch.arange(0, 1 << 16, 61, dtype=torch.int32),
                      torch.tensor([0x0001, 0x03FF, 0x7BFF, 0x7C00, 0x8001, 0xFBFF, 0x7F7F,
                                    0x0080, 0x8080, 0x3C00, 0xBC00, 0x0000, 0x8000])])
    pats = pats.to(torch.int16)
    for coef in (torch.tensor(0.7), torch.tensor(1.0 / 3.0, dtype=torch.float64)):
        half = pats.clone().view(torch.float16)
        bf = pats.clone().view(torch.bfloat16)
        finite = half.isfinite() & bf.isfinite()
        half, bf = half[finite].contiguous(), bf[finite].contiguous()
        cpu_half, cpu_bf = half.clone(), bf.clone()
        ref_half, ref_bf = half.clone(), bf.clone()
        _cuda.scale_(_table([half, bf]), coef)
        _cpu.scale_(_table([cpu_half, cpu_bf]), float(coef))
        ref_half.mul_(coef.to(torch.float32))
        ref_bf.mul_(coef.to(torch.float32))
        assert_bitwise_equal(half, ref_half)
        assert_bitwise_equal(bf, ref_bf)
        assert_bitwise_equal(half, cpu_half)
        assert_bitwise_equal(bf, cpu_bf)


@needs_sim
def test_clamp_matches_cpu_kernel_and_torch():
    tensors = [torch.randn(100) * 3, torch.randn(70, dtype=torch.float64) * 3,
               (torch.randn(60) * 3).half(), (torch.randn(50) * 3).bfloat16()]
    cpu = [t.clone() for t in tensors]
    ref = [t.clone().clamp_(min=-1.3, max=1.3) for t in tensors]
    _cuda.clamp_(_table(tensors), 1.3)
    _cpu.clamp_(_table(cpu), 1.3)
    for t, c, r in zip(tensors, cpu, ref):
        assert_bitwise_equal(t, c)
        assert_bitwise_equal(t, r)


@needs_sim
def test_device_tables_are_cached_by_contents():
    a = [torch.randn(100), torch.randn(10)]
    t1, t2 = _table(a), _table(a)
    e1 = _cuda.device_table(t1)
    assert _cuda.device_table(t2) is e1  # same buffers: no new upload
    assert _cuda.device_table(t1) is e1
    b = [torch.randn(100), torch.randn(10)]  # other buffers: another table
    assert _cuda.device_table(_table(b)) is not e1
    keep = [[torch.randn(5)] for _ in range(_cuda.CACHE_SIZE + 1)]
    for k in keep:
        _cuda.device_table(_table(k))
    assert _cuda.device_table(_table(a)) is not e1  # evicted (least recently used)


@needs_sim
def test_host_table_layout():
    tensors = [torch.randn(100), torch.randn(0), torch.randn(5).half()[::2]]
    table = _table(tensors)
    host, n, nc = _cuda.host_table(table, 48)
    lay = K.table_layout(n, nc)
    assert (n, nc) == (3, 4) and host.shape[0] == lay["size"]
    assert host[lay["addrs"]:lay["codes"]].tolist() == table.addrs.tolist()
    assert host[lay["codes"]:lay["tensor"]].tolist() == [0, 0, 2 | K.READONLY]  # strided: read only
    assert host[lay["tensor"]:lay["start"]].tolist() == [0, 0, 0, 2]
    assert host[lay["start"]:lay["stop"]].tolist() == [0, 48, 96, 0]
    assert host[lay["stop"]:lay["first"]].tolist() == [48, 96, 100, 3]
    assert host[lay["first"]:].tolist() == [0, 3, 3, 4]


# --- the whole stack: fastclip's public functions on the CUDA backend, in the simulator ---------


@pytest.fixture
def cuda_backend(monkeypatch):
    """Plans built in the test put CPU tensors on the CUDA backend (which the simulator runs)."""
    monkeypatch.setattr(_plan, "_backend_for", lambda device: _cuda)


def _grads():
    g = torch.Generator().manual_seed(3)
    out = []
    for i, (n, dtype) in enumerate([(120, torch.float32), (40, torch.float16), (33, torch.bfloat16),
                                    (64, torch.float32), (9, torch.float32)]):
        out.append((torch.randn(n, dtype=torch.float64, generator=g) * 0.5).to(dtype))
    out[3] = out[3].reshape(8, 8).t()  # dense but transposed: read in place
    return out


def _params(grads):
    ps = []
    for gr in grads:
        p = torch.zeros(gr.shape, dtype=gr.dtype, requires_grad=True)
        p.grad = gr
        ps.append(p)
    return ps


@needs_sim
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
@pytest.mark.parametrize("error_if_nonfinite", [False, True])
def test_clip_grad_norm_on_the_cuda_backend(cuda_backend, max_norm, error_if_nonfinite):
    """The fused path (norm and coefficient in kernel 1, scale in kernel 2) and, with
    error_if_nonfinite, the general one (power sums, torch's ops, scale kernel)."""
    grads = _grads()
    strided_src = torch.randn(20, 4)
    # 16-bit and sliced: written after the kernel in float32 by float32(coef), like the kernel's
    # grads (on the CPU torch's mul_ rounds so too; the GPU tests tell it from CUDA's rounding).
    grads.append(strided_src[:, 2].bfloat16()[::2])
    grads.append(strided_src[:, 1])  # a sliced view: read through a copy, written by torch
    params = _params(grads)
    expected = [g.clone() for g in grads]
    norm = fastclip.clip_grad_norm_(params, max_norm, error_if_nonfinite=error_if_nonfinite)
    ref_norm = torch.tensor(math.sqrt(exact_power_sum(expected, 2.0)), dtype=torch.float32)
    assert_bitwise_equal(norm, ref_norm)  # exact here: the float64 sum rounds to the same float32
    reference_clip_(expected, max_norm, ref_norm)
    for p, e in zip(params, expected):
        assert_bitwise_equal(p.grad, e)
    assert_bitwise_equal(strided_src[:, 1], expected[-1])
    if max_norm < 1e6:
        assert not torch.equal(grads[0], _grads()[0])  # negative control: it did clip


@needs_sim
def test_get_total_norm_and_clip_grad_value_on_the_cuda_backend(cuda_backend):
    grads = _grads() + [torch.randn(7, dtype=torch.float64)]
    for p in (1.0, 3.0):
        norm = fastclip.get_total_norm(grads, p)
        assert norm.dtype == torch.float64  # a float64 grad makes the norm float64
        exact = exact_power_sum(grads, p)
        exact = math.sqrt(exact) if p == 2.0 else exact if p in (1.0, math.inf) else exact ** (1 / p)
        assert math.isclose(float(norm), exact, rel_tol=1e-14)
    expected = [g.clone().clamp_(min=-0.4, max=0.4) for g in grads]
    fastclip.clip_grad_value_(_params(grads), 0.4)
    for g, e in zip(grads, expected):
        assert_bitwise_equal(g, e)


@needs_sim
def test_memory_listed_twice_is_left_to_torch_after_the_kernel(cuda_backend):
    """Blocks write chunks concurrently, so a grad listed twice (or overlapping views) would race
    on a GPU (the simulator's blocks take turns and cannot show it). The later listing is marked
    read-only in the device table and scaled by torch after the kernel: c**2, like torch."""
    g = torch.randn(1000)
    base = torch.randn(900)
    grads = [g, torch.randn(50), g, base[:600], base[300:]]  # exact duplicate, partial overlap
    table = _table(grads)
    assert sorted(table.overlapping().tolist()) == [2, 4]
    entry = _cuda.device_table(table)
    assert entry.torch_written == (2, 4)
    host, n, nc = _cuda.host_table(table, readonly=table.overlapping())
    lay = K.table_layout(n, nc)
    assert [int(c) >= K.READONLY for c in host[lay["codes"]:lay["tensor"]]] == [False, False, True,
                                                                                False, True]
    ours = [t.clone() for t in (g, grads[1], base)]
    ours_list = [ours[0], ours[1], ours[0], ours[2][:600], ours[2][300:]]
    theirs = [t.clone() for t in (g, grads[1], base)]
    theirs_list = [theirs[0], theirs[1], theirs[0], theirs[2][:600], theirs[2][300:]]
    norm = fastclip.clip_grad_norm_(_params(ours_list), 1.0)
    torch.nn.utils.clip_grads_with_norm_(_params(theirs_list), 1.0, norm)
    for a, b in zip(ours, theirs):
        assert_bitwise_equal(a, b)
    assert not torch.equal(ours[0], g)  # negative control: it did clip


@needs_sim
def test_clip_grads_with_norm_reads_a_norm_inside_a_grad_before_writing(cuda_backend):
    """A ``total_norm`` that is an element of a grad: the one-launch path's blocks each read the
    norm, and those after the block that scaled it would read the scaled value. torch computes
    the coefficient first; so does fastclip here (the general path)."""
    grads = [torch.full((1000,), 2.0), torch.randn(50)]
    expected = [g.clone() for g in grads]
    torch.nn.utils.clip_grads_with_norm_(_params(expected), 1.0, expected[0][0])
    fastclip.clip_grads_with_norm_(_params(grads), 1.0, grads[0][0])
    for g, e in zip(grads, expected):
        assert_bitwise_equal(g, e)
    assert grads[0].unique().numel() == 1  # negative control: every element scaled alike


@needs_sim
@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_"])
def test_expanded_grad_is_refused_before_any_write(cuda_backend, call):
    """torch's _foreach_mul_ refuses an expanded grad; on the CUDA backend the refusal comes
    before the kernels run, whatever the norm (the host never reads it), so no grad changes."""
    grads = _grads() + [torch.randn(1).expand(30)]
    before = [g.clone() for g in grads]
    params = _params(grads)
    with pytest.raises(RuntimeError, match="expanded view"):
        if call == "clip_grad_norm_":
            fastclip.clip_grad_norm_(params, 1e-3)
        elif call == "clip_grads_with_norm_":
            fastclip.clip_grads_with_norm_(params, 1e-3, torch.tensor(5.0))
        else:
            fastclip.clip_grad_value_(params, 1e-3)
    for g, b in zip(grads, before):
        assert_bitwise_equal(g, b)


@pytest.fixture
def scale_modes(monkeypatch):
    """The ``mode`` of every scale launch, in order."""
    modes = []
    launch = _cuda._scale

    def spy(entry, args):
        modes.append(args[4])
        launch(entry, args)

    monkeypatch.setattr(_cuda, "_scale", spy)
    return modes


def _torch_clip_grads_with_norm(grads, max_norm, total_norm):
    """torch's own clip_grads_with_norm_ on copies of ``grads``; returns the copies."""
    theirs = [g.clone() for g in grads]
    torch.nn.utils.clip_grads_with_norm_(_params(theirs), max_norm, total_norm)
    return theirs


@needs_sim
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's notes on inf and NaN norms
@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float64], ids=str)
def test_clip_grads_with_norm_computes_the_coefficient_in_the_scale_kernel(
        cuda_backend, scale_modes, monkeypatch, norm_dtype):
    """One launch: the scale kernel computes torch's coefficient from the norm on the device, no
    torch op runs on the norm first, and every grad ends bit for bit as torch leaves it."""
    import fastclip.clip_grad as C

    def no_torch_ops(*args):
        raise AssertionError("the coefficient was computed by torch ops")

    monkeypatch.setattr(C, "clip_coefficient", no_torch_ops)
    base = _grads() + [torch.randn(50, dtype=torch.float64)]
    clipped_any = False
    for norm in (0.0, 1e-12, 0.3, 5.0, 1e30, math.inf, math.nan):
        for max_norm in (0.0, 1e-3, 1.0, 7.5, math.inf):
            if math.isnan(norm) and max_norm == 0.0:
                continue  # torch's reciprocal(NaN) * 0: NaN either way; covered by max_norm 1.0
            grads = [g.clone() for g in base]
            total = torch.tensor(norm, dtype=norm_dtype)
            scale_modes.clear()
            fastclip.clip_grads_with_norm_(_params(grads), max_norm, total)
            assert scale_modes == [K.SCALE_FROM_NORM | (K.SCALE_F64 if norm_dtype == torch.float64 else 0)]
            for ours, theirs in zip(grads, _torch_clip_grads_with_norm(base, max_norm, total)):
                # A NaN coefficient (a NaN norm, or inf with max_norm inf) makes NaN grads, and
                # torch's bf16 NaN payload varies by code path.
                nan_coef = math.isnan(float(reference_coef(max_norm, total)))
                assert_bitwise_equal(ours, theirs, nan_bits=not nan_coef)
            clipped_any |= not torch.equal(grads[0], base[0])
    assert clipped_any  # negative control: some of these do clip


@needs_sim
def test_clip_grads_with_norm_falls_back_to_torch_ops_where_the_kernel_path_does_not_apply(
        cuda_backend, scale_modes):
    """A 16-bit norm, or memory listed twice: the coefficient comes from torch's ops and the
    scale kernel reads it (no ``SCALE_FROM_NORM``); the grads still end as torch leaves them."""
    base = _grads()
    cases = [
        (base, 0.5, torch.tensor(3.0, dtype=torch.bfloat16)),  # a bf16 norm: torch's ops round in bf16
        ([base[0], base[1], base[0]], 0.5, torch.tensor(3.0)),  # the same grad listed twice
    ]
    for grads, max_norm, total in cases:
        ours = [g.clone() for g in base]
        listing = [next(o for o, b in zip(ours, base) if b is g) for g in grads]
        scale_modes.clear()
        fastclip.clip_grads_with_norm_(_params(listing), max_norm, total)
        assert scale_modes and all(not m & K.SCALE_FROM_NORM for m in scale_modes)
        theirs = [g.clone() for g in base]
        their_listing = [next(t for t, b in zip(theirs, base) if b is g) for g in grads]
        torch.nn.utils.clip_grads_with_norm_(_params(their_listing), max_norm, total)
        for a, b in zip(ours, theirs):
            assert_bitwise_equal(a, b)
        assert not torch.equal(ours[0], base[0])  # it did clip


# --- no host reads: the CUDA backend's calls never read a tensor value back ---------------------


@needs_sim
@pytest.mark.parametrize("init_scale, max_norm", [(2.0 ** 10, 0.05), (0.25, 2.0), (0.25, 1e4)])
def test_unscale_and_clip_on_the_cuda_backend_matches_the_host(monkeypatch, init_scale, max_norm):
    """AMP's one write pass on the CUDA backend is the scale kernel told to apply any factor
    (a scale below 1 makes it exceed 1: 4 here without clipping), with the kernel's float32
    multiply for bf16 grads; the grads and norm equal the host path's, and ``unscale_`` +
    ``clip_grad_norm_``'s."""
    def fresh():
        return [(torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
                for n, dtype in [(700, torch.float32), (333, torch.bfloat16), (64, torch.float32)]]

    def run(backend):
        grads = fresh()
        params = _params(grads)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        scaler.scale(torch.zeros(()))  # creates the scale tensor
        opt = torch.optim.SGD(params, lr=0.1)
        with monkeypatch.context() as m:
            if backend == "cuda":
                m.setattr(_plan, "_backend_for", lambda device: _cuda)
            if backend == "torch":
                scaler.unscale_(opt)
                norm = fastclip.clip_grad_norm_(params, max_norm)
            else:
                norm = fastclip.unscale_and_clip_(scaler, opt, max_norm)
        return norm, grads

    cuda_norm, cuda_grads = run("cuda")
    for other in ("host", "torch"):
        norm, grads = run(other)
        assert_bitwise_equal(cuda_norm, norm)
        for a, b in zip(cuda_grads, grads):
            assert_bitwise_equal(a, b)
    # Negative controls: every grad was written, and the cases clip or not as intended.
    assert not any(torch.equal(a, b) for a, b in zip(cuda_grads, fresh()))
    assert (float(cuda_norm) > max_norm) == (max_norm < 1e4)


def _odd_params():
    """Grads the CUDA backend leaves to torch after its kernels: a sliced bf16 view and 0-d
    grads next to a float64 one (a float64 coefficient)."""
    base = torch.arange(24, dtype=torch.bfloat16)
    return _params([base[::3], torch.tensor(7.0), torch.tensor(-3.0, dtype=torch.float16),
                    torch.tensor([5.0, 4.0], dtype=torch.float64)])


def _guarded_calls():
    """The fastclip calls whose CUDA path goes through ``Plan``'s backends, as (name,
    call(params)); each must read nothing. Not here: ``clip_and_step`` (torch's own CPU optimizer
    step reads values in the simulator), AGC and ``nonfinite="zero"`` (they pick their CUDA
    kernels by device type; the GPU tests check them under sync-debug "error")."""
    def stats_clip(params):
        fastclip.clip_grad_norm_(params, 0.5, stats=fastclip.ClipStats())

    def amp(params):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        scaler.scale(torch.zeros(()))  # creates the scale tensor
        params = [p for p in params if p.grad.dtype != torch.float16]  # GradScaler refuses fp16
        fastclip.unscale_and_clip_(scaler, torch.optim.SGD(params, lr=0.1), 0.5)

    def clipper(params):
        c = fastclip.GradClipper(params, max_norm=0.5, policy=fastclip.ZClip(warmup=2), nonfinite="skip")
        for _ in range(4):
            c.step()

    return [
        ("clip_grad_norm_", lambda ps: fastclip.clip_grad_norm_(ps, 0.5)),
        ("clip_grad_norm_ p=3", lambda ps: fastclip.clip_grad_norm_(ps, 0.5, norm_type=3.0)),
        ("clip_grad_norm_ stats", stats_clip),
        ("get_total_norm inf", lambda ps: fastclip.get_total_norm([p.grad for p in ps], "inf")),
        ("clip_grads_with_norm_",
         lambda ps: fastclip.clip_grads_with_norm_(ps, 0.5, torch.tensor(7.0))),
        ("clip_grad_value_", lambda ps: fastclip.clip_grad_value_(ps, 0.1)),
        ("clip_grad_value_ torch-written", lambda ps: fastclip.clip_grad_value_(ps + _odd_params(), 0.1)),
        ("clip_grad_norm_ torch-written", lambda ps: fastclip.clip_grad_norm_(ps + _odd_params(), 0.5)),
        ("unscale_and_clip_", amp),
        ("GradClipper.step", clipper),
    ]


@needs_sim
@pytest.mark.parametrize("name, call", _guarded_calls(), ids=[n for n, _ in _guarded_calls()])
def test_no_host_reads_on_the_cuda_backend(cuda_backend, name, call):
    """``set_sync_debug_mode("error")`` needs a GPU; this catches the same reads (``.item()``,
    ``bool(t)``, ``.cpu()``, ...) in CI, on the CUDA backend's real code path in the simulator.
    The backend is chosen per call, never by device type, so nothing here differs from a GPU run
    except the tensors' home."""
    from host_reads import NoHostReads

    params = _params(_grads())
    before = [p.grad.clone() for p in params]
    with NoHostReads():
        call(params)
    assert any(not torch.equal(p.grad, b) for p, b in zip(params, before)) or "norm" in name


@needs_sim
def test_the_host_read_guard_sees_the_one_allowed_sync(cuda_backend):
    """Negative control: ``error_if_nonfinite=True`` must read the norm (torch syncs there too),
    and the guard catches that read."""
    from host_reads import HostReadError, NoHostReads

    params = _params(_grads())
    with NoHostReads(), pytest.raises(HostReadError, match="__bool__"):
        fastclip.clip_grad_norm_(params, 0.5, error_if_nonfinite=True)


@needs_sim
@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grads_with_norm_"])
def test_scalar_grads_under_a_float64_coefficient_are_left_to_torch(cuda_backend, call):
    """A float64 grad makes the coefficient float64, and torch then multiplies a 0-d float32 or
    16-bit grad in float64 (two 0-d operands promote): those scalars are marked read-only in
    the device table and scaled by torch's mul_ after the kernel, bit for bit like torch."""
    g = torch.Generator().manual_seed(5)
    values = torch.randn(60, dtype=torch.float64, generator=g) * 30
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        grads = [v.to(dtype) for v in values] + [torch.randn(7, dtype=torch.float64, generator=g),
                                                  values[:5].to(dtype).clone()]
        ours, theirs = [t.clone() for t in grads], [t.clone() for t in grads]
        if call == "clip_grad_norm_":
            norm = fastclip.clip_grad_norm_(_params(ours), 1.0)
        else:
            norm = torch.tensor(123.456, dtype=torch.float64)
            fastclip.clip_grads_with_norm_(_params(ours), 1.0, norm)
        assert norm.dtype == torch.float64
        torch.nn.utils.clip_grads_with_norm_(_params(theirs), 1.0, norm)
        for a, b in zip(ours, theirs):
            assert_bitwise_equal(a, b)
        entry = _cuda.device_table(_table(ours))
        assert entry.torch_written == tuple(range(60))  # the 0-d grads, not the vectors


@needs_sim
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, 1e39
def test_clamp_of_torch_written_grads_never_raises_and_matches_the_kernel(cuda_backend):
    """torch's clamp_ refuses a bound beyond a 16-bit dtype's range; the sliced and 0-d grads
    it would clamp after the kernel are clamped in float64 instead, like the kernel's elements."""
    for dtype in (torch.float16, torch.bfloat16):
        values = torch.tensor([float("inf"), -float("inf"), 1.0, -65504.0, float("nan"), 0.25]).to(dtype)
        for bound in (0.5, 6e4, 7e4, 1e39):
            base = torch.zeros(12, dtype=dtype)
            base[::2] = values
            ours = [torch.tensor([1e6, -1e6]), base[::2], values[0].clone(), values[2].clone()]
            dense = [torch.tensor([1e6, -1e6]), values.clone(), values[0].clone(), values[2].clone()]
            fastclip.clip_grad_value_(_params(ours), bound)
            fastclip.clip_grad_value_(_params([dense[0], dense[1]]), bound)
            dense[2:] = [v.reshape(1).clone() for v in dense[2:]]
            fastclip.clip_grad_value_(_params(dense[2:]), bound)  # shape (1,): the kernel's path
            assert_bitwise_equal(ours[0], dense[0])
            assert_bitwise_equal(ours[1], dense[1])
            for a, b in zip(ours[2:], dense[2:]):
                assert_bitwise_equal(a.reshape(1), b)
            assert not base[1::2].any()


@needs_sim
def test_kernel_writes_bump_version_counters_on_the_cuda_backend(cuda_backend):
    grads = _grads()
    before = [t._version for t in grads]
    fastclip.clip_grad_norm_(_params(grads), 1e-3)
    assert all(t._version > b for t, b in zip(grads, before))
    before = [t._version for t in grads]
    fastclip.clip_grad_value_(_params(grads), 1e-3)
    assert all(t._version > b for t, b in zip(grads, before))


# --- the torch-facing glue of the AGC and zeroing kernels (device arrays, uploads, stream) -------


def _agc_params(seed: int) -> list:
    """Conv, linear, bias and 0-d parameters in three dtypes; a sliced grad (written back by
    the glue after the kernel) and units that clip and units that do not."""
    g = torch.Generator().manual_seed(seed)
    specs = [((4, 3, 2, 2), torch.float32), ((6, 5), torch.bfloat16), ((7,), torch.float16),
             ((), torch.float64), ((5, 9), torch.float32)]
    params = []
    for shape, dtype in specs:
        w = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.1).to(dtype))
        w.grad = (torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 0.05).to(dtype)
        params.append(w)
    wide = (torch.randn(5, 18, generator=g) * 0.05).to(torch.float32)
    params[-1].grad = wide[:, ::2]  # sliced: the kernel reads and writes a copy
    return params


@needs_sim
def test_agc_cuda_glue_matches_the_cpu_kernels(monkeypatch):
    """``agc._run_cuda`` (uploads, device arrays, the launch context) driving the CUDA kernels in
    the simulator leaves the grads as the CPU kernels do."""
    from fastclip import agc
    from fastclip.kernels import agc_cuda

    expected = _agc_params(1)
    fastclip.adaptive_grad_clip_(expected, clipping=0.05)
    ran = []

    def run_cuda(pairs, clipping, eps):
        ran.append(len(pairs))
        return agc._run_cuda(agc_cuda, pairs, torch.device("cpu"), clipping, eps)

    monkeypatch.setattr(agc, "_run_cpu", run_cuda)
    params = _agc_params(1)
    fastclip.adaptive_grad_clip_(params, clipping=0.05)
    assert ran
    for p, e in zip(params, expected):
        assert_bitwise_equal(p.grad, e.grad)
    assert not torch.equal(params[0].grad, _agc_params(1)[0].grad)  # negative control: it clipped


@needs_sim
@pytest.mark.parametrize("finite", [True, False])
def test_zeroing_glue_zeroes_every_grad_only_when_the_flag_is_set(finite):
    """``GradClipper(nonfinite="zero")``'s CUDA glue: the flag is read on the device by the
    kernel, dense grads through the table, sliced ones by torch under the same flag."""
    from fastclip import clipper
    from fastclip.kernels import agc_cuda

    base = torch.randn(40, 6)
    grads = [torch.randn(700), torch.randn(33).bfloat16(), torch.randn(5, 4).half(), base[:, 1::2],
             torch.randn(0)]
    before = [g.clone() for g in grads]
    base_before = base.clone()
    versions = [g._version for g in grads]
    clipper._zero_cuda(agc_cuda, grads, torch.device("cpu"), torch.tensor(finite))
    for g, b in zip(grads, before):
        assert_bitwise_equal(g, b if finite else torch.zeros_like(b))
    assert all(g._version > v for g, v in zip(grads[:3], versions))  # the kernel may have written
    assert_bitwise_equal(base[:, ::2], base_before[:, ::2])  # the slice's neighbours untouched
