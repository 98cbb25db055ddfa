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
from reference import ALL_DTYPES

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
    from reference import (INT_VIEW, NAN_PAYLOAD, assert_bitwise_equal, clamp_test_values,
                           exact_power_sum, reference_clip_, reference_coef, tensor_power_sum)

    import fastclip
    from fastclip import _cpu, _cuda, _plan
    from fastclip._table import DTYPE_CODES, TensorTable
    from fastclip.kernels import cuda as K

# Elements per chunk here: enough 16-byte words that threads read two words per round in every
# dtype, plus single words and partial ones; every big tensor below spans several chunks.
CHUNK = 300


@pytest.fixture(autouse=True, scope="module")
def _on_one_cpu():
    """The simulator runs a Python thread per CUDA thread, and they hand the GIL to each other
    at every barrier: far faster on one CPU than across two (one test here: 41 s on the 2-core
    CI machine, 11 s pinned to one CPU). Threads inherit the affinity of the thread that starts
    them (Linux), and the simulator starts its threads from this one."""
    if not SIM or not hasattr(os, "sched_setaffinity"):
        yield
        return
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


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


def _clip(call: str, params) -> None:
    """One of the three writing entry points, clipping hard (max_norm / clip_value 1e-3)."""
    if call == "clip_grad_norm_":
        fastclip.clip_grad_norm_(params, 1e-3)
    elif call == "clip_grads_with_norm_":
        fastclip.clip_grads_with_norm_(params, 1e-3, torch.tensor(5.0))
    else:
        fastclip.clip_grad_value_(params, 1e-3)


@needs_sim
@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_"])
def test_expanded_grad_is_refused_before_any_write(cuda_backend, call):
    """torch's _foreach_mul_ refuses an expanded grad; on the CUDA backend the refusal comes
    before the kernels run, whatever the norm (the host never reads it), so no grad changes."""
    grads = _grads() + [torch.randn(1).expand(30)]
    before = [g.clone() for g in grads]
    params = _params(grads)
    with pytest.raises(RuntimeError, match="expanded view"):
        _clip(call, params)
    for g, b in zip(grads, before):
        assert_bitwise_equal(g, b)


@needs_sim
@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_"])
@pytest.mark.parametrize("kind", ["sliced", "listed twice"])
def test_an_inference_grad_torch_must_write_is_refused_before_any_write(cuda_backend, call, kind):
    """Grads torch writes after the kernels (a sliced view; the second listing of one memory)
    that are inference tensors: torch would refuse to write them, so the call refuses before
    any kernel writes (checked against the device table's torch-written set)."""
    with torch.inference_mode():
        shared = torch.full((8,), 40.0)
    grads = _grads() + ([shared[::2]] if kind == "sliced" else [shared, shared])
    before = [g.clone() for g in grads]
    params = _params(grads)
    with pytest.raises(RuntimeError, match=rf"^{call}: grad \d+ of `parameters` .* inference tensor"):
        _clip(call, params)
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
        entry = _cuda.device_table(_table(ours), torch.float64)
        assert entry.torch_written == tuple(range(60))  # the 0-d grads, not the vectors


@needs_sim
@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_"])
def test_scalar_grads_under_a_float32_coefficient_are_written_by_the_kernel(cuda_backend, call,
                                                                             monkeypatch):
    """Without a float64 grad the coefficient is float32, and torch's mul_ of a 0-d grad rounds as
    the kernel does: the kernel writes it, as the CPU backend does (and the clamp has no
    coefficient at all). So a 0-d inference grad is clipped, not refused as one torch must write."""
    def grads():
        with torch.inference_mode():
            scalar = torch.tensor(40.0)
        return [torch.arange(1.0, 51.0), scalar, torch.tensor(-3.0, dtype=torch.bfloat16)]

    calls = {
        "clip_grad_norm_": lambda ps: fastclip.clip_grad_norm_(ps, 1.0),
        "clip_grads_with_norm_": lambda ps: fastclip.clip_grads_with_norm_(ps, 1.0, torch.tensor(50.0)),
        "clip_grad_value_": lambda ps: fastclip.clip_grad_value_(ps, 0.1),
    }
    ours = grads()
    calls[call](_params(ours))
    from fastclip import _cpu

    monkeypatch.setattr(_plan, "_backend_for", lambda device: _cpu)
    theirs = grads()
    calls[call](_params(theirs))
    for a, b in zip(ours, theirs):
        assert_bitwise_equal(a, b)
    assert float(ours[1]) != 40.0  # written
    assert _cuda.device_table(_table(ours), torch.float32).torch_written == ()
    assert _cuda.device_table(_table(ours), torch.float64).torch_written == (1, 2)  # control


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


# --- edges the launches above do not reach (found by a mutation sweep of the CUDA path): chunk
# shapes, the per-thread order, exponent masks, the finalize, exact-1 coefficients, zero bounds ---

# (per_word, chunk lengths): a word is 16 bytes. The lengths give a thread count of words nw with
# nw // THREADS odd (a thread's last word is a lone word after a two-word round) and even, and
# every kind of partial last word, for THREADS == 32.
_ORDER_CASES = {
    "float32": (4, (183, 132, 162, 257, 5)),  # nw 45 (3 left), 33, 40 (2 left), 64 (1 left), 1
    "float64": (2, (79, 66, 141, 1)),      # nw 39 (half word left), 33, 70 (half word), 0
    "float16": (8, (325, 264, 167, 7)),    # nw 40 (5 left), 33, 20 (7 left), 0
    "bfloat16": (8, (331, 3)),             # nw 41 (3 left), 0
}


def _slot(per_word: int, k: int, j: int) -> int:
    """The accumulator of value ``j`` of a thread's ``k``-th word (module comment of kernels.cuda):
    float32 value j -> s_j; float64 even words -> s0, s1, odd words -> s2, s3; 16-bit pairs -> s_{j//2}."""
    if per_word == 4:
        return j
    if per_word == 2:
        return j + (2 if k & 1 else 0)
    return j // 2


def _model_thread_sum(vals: list, per_word: int, tid: int, kind: int) -> float:
    """Thread ``tid``'s share of one chunk, as the kernels' comments define it, in plain Python."""
    T = K.THREADS
    nw = len(vals) // per_word
    s = [0.0, 0.0, 0.0, 0.0]

    def acc(i, v):
        s[i] = s[i] + v * v if kind == NORM_L2 else s[i] + abs(v)

    for k, w in enumerate(range(tid, nw, T)):
        for j in range(per_word):
            acc(_slot(per_word, k, j), vals[per_word * w + j])
    if len(vals) % per_word and tid == nw % T:  # the partial last word: the thread of word nw
        for j in range(len(vals) % per_word):
            acc(_slot(per_word, nw // T, j), vals[per_word * nw + j])
    return (s[0] + s[1]) + (s[2] + s[3])


@needs_sim
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_thread_sums_follow_the_documented_order_and_read_only_the_chunk(dtype):
    """Each thread's share of a chunk (a device function: plain Python in the simulator), bit for
    bit against the documented word-to-thread and value-to-accumulator assignment, aligned and at
    an odd element offset. Values of very different magnitudes make any other order (or a value
    added twice) change the bits; the elements just past the chunk are huge, so a loop bound that
    reads one word too many cannot go unseen."""
    per_word, lengths = _ORDER_CASES[dtype]
    code = DTYPE_CODES[getattr(torch, dtype)]
    # Exponents wide enough that sums of squares round (a 16-bit square has 22 significant
    # bits: over a narrow range every order would give the same exact sum).
    low, high = {"float16": (-7, 4), "bfloat16": (-20, 20)}.get(dtype, (-3, 4))
    g = torch.Generator().manual_seed(11)
    for length in lengths:
        for start in (0, 1):  # 1: a misaligned chunk, read element by element
            values = torch.randn(start + length + 16, dtype=torch.float64, generator=g)
            values *= 10.0 ** torch.randint(low, high, values.shape, generator=g)
            values[start + length:] = 1e4  # past the chunk
            t = values.to(getattr(torch, dtype))
            vals = t.double()[start:start + length].tolist()
            for kind in (NORM_L2, NORM_L1):
                for tid in range(K.THREADS):
                    got = K._thread_sum(t.data_ptr(), code, start, start + length, tid, kind, 2.0)
                    want = _model_thread_sum(vals, per_word, tid, kind)
                    assert got == want or (got != got and want != want), (length, start, kind, tid, got, want)
    if per_word == 8:
        # A partial word whose grouping shows in the bits: values 0, 1 go to s0 (4**2 + 4**2 = 32)
        # and 2, 3 to s1 (2 * (2**-24)**2 = 2**-47, one ulp of 32); 2**-48 added to 32 alone
        # rounds away (to even).
        t = torch.tensor([4.0, 4.0, 2.0 ** -24, 2.0 ** -24, 1e4], dtype=getattr(torch, dtype))
        assert K._thread_sum(t.data_ptr(), code, 0, 4, 0, NORM_L2, 2.0) == 32.0 + 2.0 ** -47


@needs_sim
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_scale_threads_write_each_element_of_the_chunk_once(dtype):
    """The scale kernel's per-thread loop (plain Python in the simulator) on the chunk shapes
    above, aligned and misaligned: every element of the chunk is multiplied exactly once, as
    torch's ``mul_`` by float32(coef) does, and the elements around the chunk are left alone."""
    code = DTYPE_CODES[getattr(torch, dtype)]
    coef = 0.3
    g = torch.Generator().manual_seed(12)
    for length in _ORDER_CASES[dtype][1]:
        for start in (0, 1):
            t = (torch.randn(start + length + 16, dtype=torch.float64, generator=g) * 4).to(getattr(torch, dtype))
            want = t.clone()
            want[start:start + length].mul_(coef if dtype == "float64" else torch.tensor(coef, dtype=torch.float32))
            for tid in range(K.THREADS):
                K._scale_thread(t.data_ptr(), code, start, start + length, tid,
                                np.float32(coef), np.float64(coef))
            assert_bitwise_equal(t, want)


@needs_sim
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's note on 1.7e308 ** 2 (inf, as intended)
def test_nonfinite_count_tells_huge_finite_values_from_inf_and_nan():
    """The rescan's exponent masks: finite values next to the largest of each dtype share most
    exponent bits with inf/NaN, and only the inf/NaN elements count. Each tensor holds a NaN or
    an inf, so its chunk's partial is not finite and the chunk is rescanned."""
    f32 = torch.tensor([2e38, -3.0e38, math.nan, 1.7e38, 1.0])
    f64 = torch.tensor([1e308, -1.7e308, math.inf, 2.0 ** 1023], dtype=torch.float64)
    f16 = torch.tensor([65504.0, -65504.0, 32768.0, -math.inf], dtype=torch.float16)
    bf16 = torch.tensor([1e38, -3.0e38, 2.0 ** 121, math.nan, 2.0 ** 127], dtype=torch.bfloat16)
    tensors = [f32, f64, f16, bf16]
    assert [int((~t.isfinite()).sum()) for t in tensors] == [1, 1, 1, 1]
    for i, t in enumerate(tensors):
        r = _cuda.power_sums(_table([t]), 2.0, count_nonfinite=True)
        assert int(r.nonfinite) == 1, (i, t)
    assert int(_cuda.power_sums(_table(tensors), 2.0, count_nonfinite=True).nonfinite) == 4


@needs_sim
def test_empty_tensors_per_tensor_sum_is_written_as_zero():
    """An empty tensor has no chunk to fold: the finalize writes its per-tensor slot itself (the
    output buffer comes from torch.empty). Launched on a NaN-filled buffer, so a slot left
    unwritten shows."""
    tensors = [torch.randn(40), torch.randn(0), torch.randn(7, dtype=torch.float64), torch.randn(0).half()]
    table = _table(tensors)
    entry = _cuda.device_table(table)
    out = torch.full((2 + len(tensors),), math.nan, dtype=torch.float64)
    base = out.data_ptr()
    K.power_sums_kernel[entry.grid, K.THREADS](
        entry.table, entry.n, entry.nc, NORM_L2, 2.0, entry.scratch, 0, 0.0,
        base, 0, 0, base + 8, base + 16)
    per = out[2:].tolist()
    assert per[1] == 0.0 and per[3] == 0.0
    assert math.isclose(per[0], tensor_power_sum(tensors[0], 2.0), rel_tol=1e-14)
    assert math.isclose(per[2], tensor_power_sum(tensors[2], 2.0), rel_tol=1e-14)


@needs_sim
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's note on NaN * 0.999 (the control)
def test_scale_leaves_grads_untouched_when_the_coefficient_is_exactly_1():
    """coef == 1 (a step that does not clip: the clamp's own value) returns before any access,
    as documented, rather than multiplying by 1: NaN payloads and signaling NaNs, which a
    multiply would rewrite, keep their bits."""
    bf = torch.tensor([0xFFC1, 0x7FFF, 0x7F81, 0x3F80], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    f32 = torch.tensor([0x7F800001, 0xFFC00001 - (1 << 32), 0x3F800000], dtype=torch.int32).view(torch.float32)
    tensors = [bf.repeat(20), f32.repeat(20)]
    before = [t.clone() for t in tensors]
    for coef in (torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64)):
        _cuda.scale_(_table(tensors), coef)
        for t, b in zip(tensors, before):
            assert_bitwise_equal(t, b)
    # Negative control: a coefficient just below 1 does rewrite the NaN payloads.
    _cuda.scale_(_table(tensors), torch.tensor(0.999))
    assert not torch.equal(tensors[0].view(torch.int16), before[0].view(torch.int16))


@needs_sim
def test_agc_kernels_match_the_cpu_kernels_on_edge_units():
    """``run_agc`` against the CPU kernels on units the glue test does not reach: a weight row
    holding NaN (never clipped: the NaN-propagating max), grad norms below the 1e-6 floor with an
    eps and clipping small enough to clip them, and rows long enough (300) that the lanes per
    row would exceed a block without the cap."""
    from fastclip.kernels import agc as KA
    from fastclip.kernels import agc_cuda as KC
    from fastclip.kernels.layout import FLOAT32

    rng = np.random.default_rng(7)
    cases = [  # (shape, weights, grads, clipping, eps, chunk size)
        ((3, 8), rng.standard_normal((3, 8)), rng.standard_normal((3, 8)), 0.01, 1e-3, 64),
        ((4, 4), np.zeros((4, 4)), np.full((4, 4), 5e-8), 1e-3, 1e-6, 64),
        ((2, 300), rng.standard_normal((2, 300)), rng.standard_normal((2, 300)), 0.01, 1e-3, 1024),
    ]
    cases[0][1][1, 3] = np.nan
    for shape, w, g, clipping, eps, chunk in cases:
        w32, g32 = w.astype(np.float32), g.astype(np.float32)
        g_cpu, g_sim = g32.copy(), g32.copy()
        args = (np.array([w32.ctypes.data]), None, np.array([FLOAT32]), [shape[0]], [shape[1]],
                clipping, eps)
        w_sq, g_sq = KA.adaptive_clip(args[0], np.array([g_cpu.ctypes.data]), *args[2:], chunk_size=chunk)
        out = KC.run_agc(args[0], np.array([g_sim.ctypes.data]), *args[2:], to_device=lambda a: a,
                         zeros=np.zeros, chunk_size=chunk)
        rows = shape[0]
        np.testing.assert_allclose(out[:rows], w_sq, rtol=2 * 300 * 2.0 ** -53)
        np.testing.assert_allclose(out[rows:2 * rows], g_sq, rtol=2 * 300 * 2.0 ** -53)
        assert np.array_equal(g_sim.view(np.uint32), g_cpu.view(np.uint32)), (shape, g_sim, g_cpu)
        clipped = [not np.array_equal(a, b) for a, b in zip(g_sim, g32)]
        if np.isnan(w).any():  # the NaN row is left as it was; the others are clipped
            assert clipped == [not np.isnan(r).any() for r in w], clipped
        else:
            assert all(clipped), clipped  # negative control: every unit was clipped


@needs_sim
def test_clip_grads_with_norm_reads_a_norm_at_a_grads_last_element_before_writing(cuda_backend):
    """As above, with the norm the last element of a grad (its last byte is the grad's last):
    the overlap check spans the grad's bytes, not its element count. The grad's one chunk is the
    first block's, whose writes the other blocks would otherwise read."""
    g = torch.Generator().manual_seed(9)
    grads = [torch.full((CHUNK,), 2.0), torch.randn(5 * CHUNK, generator=g)]
    expected = [t.clone() for t in grads]
    torch.nn.utils.clip_grads_with_norm_(_params(expected), 1.0, expected[0][-1])
    fastclip.clip_grads_with_norm_(_params(grads), 1.0, grads[0][-1])
    for a, e in zip(grads, expected):
        assert_bitwise_equal(a, e)
    assert not torch.equal(grads[0], torch.full((CHUNK,), 2.0))  # negative control: it clipped


@needs_sim
def test_a_set_with_no_elements_launches_and_writes_zeros():
    """A table with no chunk still launches one block, whose finalize writes total and norm 0,
    coefficient 1 and count 0 (into NaN-filled outputs, so a missing write shows)."""
    table = _table([torch.randn(0), torch.randn(0, dtype=torch.float64)])
    entry = _cuda.device_table(table)
    assert entry.nc == 0 and entry.grid == 1
    out = torch.full((6,), math.nan, dtype=torch.float64)
    base = out.data_ptr()
    K.power_sums_kernel[entry.grid, K.THREADS](
        entry.table, entry.n, entry.nc, NORM_L2, 2.0, entry.scratch,
        K.COUNT_NONFINITE | K.RESULT_F64, 1.0, base, base + 8, base + 16, base + 24, base + 32)
    assert out[:3].tolist() == [0.0, 0.0, 1.0] and out[3:4].view(torch.int64).item() == 0
    assert out[4:].tolist() == [0.0, 0.0]


@needs_sim
def test_only_the_last_block_finalizes(monkeypatch):
    """One block per launch writes the results: the one that takes the last ticket, after every
    partial is in. (The simulator runs blocks one after the other, so a finalize in an earlier
    block would be overwritten by a later one and the results alone could not show it; the
    finalizes are counted instead, with the total each saw.)"""
    seen = []
    finalize = K._write_norm_coef

    def spy(total, *args):
        seen.append(float(total))
        return finalize(total, *args)

    monkeypatch.setattr(K, "_write_norm_coef", spy)
    tensors = [torch.randn(700), torch.randn(470, dtype=torch.float64), torch.randn(5)]
    table = _table(tensors)
    entry = _cuda.device_table(table)
    assert entry.grid == 3 and entry.nc > entry.grid
    for _ in range(2):  # the ticket is back at zero: the second launch finalizes once too
        seen.clear()
        norm = _cuda.fused_norm(table, 2.0, torch.float64)
        assert len(seen) == 1
        assert math.isclose(seen[0], exact_power_sum(tensors, 2.0), rel_tol=1e-14)
        assert float(norm) == math.sqrt(seen[0])


@needs_sim
def test_strided_fold_reads_nothing_at_or_past_its_stop():
    """The fold's 8-way rounds end where a round would reach ``stop``: with values right after
    ``stop`` in the buffer (huge, so a read of one shows), ranges whose last full round ends
    exactly at ``stop`` for some thread (``stop - first - 7 * THREADS`` a multiple of
    ``8 * THREADS`` plus that thread's index)."""
    T = K.THREADS
    vals = np.random.default_rng(1).standard_normal(40 * T) ** 2
    for first, stop in ((0, 15 * T), (3, 15 * T + 3 + 5), (T, 31 * T + T)):
        buf = vals.copy()
        buf[stop:] = 1e300
        for kind in (NORM_L2, NORM_INF):
            for tid in range(T):
                got = K._strided_fold(buf.ctypes.data, first, stop, tid, kind)
                mine = buf[first + tid:stop:T]
                if kind == NORM_INF:
                    assert got == (mine.max() if len(mine) else 0.0), (first, stop, tid)
                else:
                    ref = 0.0
                    for v in mine:
                        ref += v
                    assert got == ref, (first, stop, tid)


@needs_sim
@pytest.mark.parametrize("bound", [0.0, -0.0])
def test_clamp_to_zero_keeps_the_sign_of_zeros_like_torch(bound):
    """Bound 0: torch's ``clamp_(min=-0.0, max=0.0)`` leaves +0.0 and -0.0 as they are and sends
    the rest to a zero of their sign. The kernel stores only the elements that compare beyond the
    bound, so +0.0 (not below -0.0) keeps its sign bit clear, in every dtype. Bound -0.0 (which
    ``clip_grad_value_`` takes): torch's ``clamp_(min=0.0, max=-0.0)`` sends positives to -0.0
    and negatives to +0.0, the bound and its negation, in 16-bit dtypes too."""
    values = [0.0, -0.0, 1.0, -1.0, 3e-5, -3e-5] * 6
    tensors = [torch.tensor(values, dtype=d) for d in (torch.float32, torch.float64, torch.float16,
                                                       torch.bfloat16)]
    expected = [t.clone().clamp_(min=-bound, max=bound) for t in tensors]
    _cuda.clamp_(_table(tensors), bound)
    for t, e in zip(tensors, expected):
        assert_bitwise_equal(t, e)
    signs = [False, True] if math.copysign(1.0, bound) > 0 else [False, True, True, False, True, False]
    assert torch.signbit(tensors[2]).tolist() == signs * (36 // len(signs))  # negative control


# --- the clamp's 16-byte words ---------------------------------------------------------------

@needs_sim
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_clamp_words_match_the_cpu_kernel_bit_for_bit(dtype):
    """Aligned chunks go through the 16-byte words (two per thread per round, then one), the rest
    element by element; misaligned twins take the element path throughout. Every path gives the
    CPU kernel's bits (NaN payloads and zero signs kept, values beyond the bound set to it) and
    torch's values."""
    bound = 1.3
    base = clamp_test_values(dtype, 1000, bound)  # chunks of 300: words in both loops, and a tail
    tensors = [base.clone(), _misaligned(base, 1), base[:7].clone()]
    cpu = [t.clone() for t in tensors]
    ref = [t.clone().clamp_(min=-bound, max=bound) for t in tensors]
    _cuda.clamp_(_table(tensors), bound)
    _cpu.clamp_(_table(cpu), bound)
    for t, c, r in zip(tensors, cpu, ref):
        assert_bitwise_equal(t, c)
        assert_bitwise_equal(t, r, nan_bits=False)
        # the NaN's own bits, though its word was stored
        assert (t.view(INT_VIEW[dtype])[0::11] == NAN_PAYLOAD[dtype]).all()
    assert torch.signbit(tensors[0][4::11]).all() and not torch.signbit(tensors[0][3::11]).any()
    assert not torch.equal(tensors[0], base)  # negative control: the clamp changed values


@needs_sim
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_clamp_stores_nothing_when_nothing_changes(monkeypatch, dtype):
    """A clamp whose bound no value exceeds writes no word and no element (grads that stay in
    range are only read). Every store the kernel can make is made to fail; then a bound that
    clamps one value must store (the negative control)."""
    def refuse(*args):
        raise AssertionError("a 16-byte store")

    def read_only(view):
        def make(addr, n):
            a = view(addr, n)
            a.flags.writeable = False
            return a
        return make

    for name in ("st_v4_f32", "st_v4_u32", "st_v2_f64"):
        monkeypatch.setattr(K, name, refuse)
    for name in ("as_f32", "as_f64", "as_u16"):
        monkeypatch.setattr(K, name, read_only(getattr(K, name)))
    base = (torch.rand(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) - 0.5).to(dtype)
    tensors = [base.clone(), _misaligned(base, 1)]
    _cuda.clamp_(_table(tensors), 0.5)  # |x| <= 0.5 everywhere (0.5 itself is within)
    for t in tensors:
        assert_bitwise_equal(t, base)
    for i in (200, 1):  # one value beyond the bound: in a 16-byte word, then on the element path
        tensors = [base.clone(), _misaligned(base, 1)]
        tensors[0 if i == 200 else 1][i] = 0.75
        with pytest.raises(Exception):
            _cuda.clamp_(_table(tensors), 0.5)
