"""fastclip on a real CUDA GPU: exactness, torch's bits, no host sync, CUDA graphs, devices.

Every test is marked ``gpu`` and skips where torch sees no CUDA device (or numba-cuda cannot
launch there). Run on a GPU machine with ``python3 -m pytest -q -m gpu tests/test_cuda_gpu.py``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from reference import (INT_VIEW, NAN_PAYLOAD, assert_bitwise_equal, assert_norm_close,
                       clamp_test_values, reference_coef)

import fastclip
from fastclip._table import TensorTable
from fastclip.clip_grad import clip_coefficient

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", reason="simulator run"),
]

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16


@pytest.fixture(scope="module")
def C():
    from fastclip import _cuda

    if not _cuda.is_available():
        pytest.skip("numba-cuda cannot launch kernels here (driver or toolkit missing)")
    return _cuda


def scale_like_fastclip_(grads, coef: torch.Tensor) -> None:
    """The scaling fastclip promises, written with plain torch ops: 32- and 16-bit grads times
    float32(coef) in float32, rounded to nearest even (torch's ``mul_`` on the CPU); float64
    grads in float64. (On CUDA, ``bf16_grad.mul_(f32_coef)`` may first round the coefficient to
    bf16, so it is not used as the reference.)"""
    for g in grads:
        c = coef.to(g.device)
        if g.dtype == F64:
            g.mul_(c.double())
        else:
            g.copy_((g.float() * c.float()).to(g.dtype))


def reference_clip_(grads, max_norm, norm) -> None:
    scale_like_fastclip_(grads, reference_coef(max_norm, norm))


def _grads(spec, device="cuda", seed=0, scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [(torch.randn(shape, dtype=torch.float64, generator=g) * scale).to(dtype).to(device)
            for shape, dtype in spec]


def _params(grads):
    out = []
    for gr in grads:
        p = torch.zeros(gr.shape, dtype=gr.dtype, device=gr.device, requires_grad=True)
        p.grad = gr
        out.append(p)
    return out


def _flat_views(n_views=40, seed=1):
    """Views into one flat buffer at odd offsets, like DDP's gradient buckets: dense, read in
    place, mostly not 16-byte aligned."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    sizes = torch.randint(1, 5000, (n_views,), generator=g).tolist()
    flat = torch.randn(sum(sizes) + 7, generator=g).to("cuda")
    out, o = [], 1
    for n in sizes:
        out.append(flat[o:o + n])
        o += n
    return out


SETS = {
    "mixed": [((300, 257), F32), ((0,), F32), ((131073,), BF16), ((4097,), F16),
              ((2 * 65536 + 5,), F64), ((1,), F32), ((65536,), F16)],
    "many-small": [((n,), F32) for n in range(1, 3000, 11)],
    "bf16-model": [((1000, 768), BF16), ((768,), BF16), ((3072, 768), BF16), ((768,), BF16)],
}
NORMS = [2.0, 1.0, math.inf, 3.0, 0.5]


@pytest.mark.parametrize("name", list(SETS) + ["flat-views"])
@pytest.mark.parametrize("p", NORMS)
def test_norm_is_exact_and_equals_the_torch_op_path(C, name, p):
    grads = _flat_views() if name == "flat-views" else _grads(SETS[name])
    fused = fastclip.get_total_norm(grads, p)  # root taken in the kernel's last block
    assert fused.device == grads[0].device
    assert_norm_close(fused, grads, p)
    # The general path (power sums, then torch's sqrt/pow and cast on the device) agrees bit for bit.
    table = TensorTable.from_tensors(grads, [t.dtype for t in grads])
    total = C.power_sums(table, p).total
    dtype = fused.dtype
    ref = (total.sqrt() if p == 2.0 else total if p in (1.0, math.inf) else total.pow(1.0 / p)).to(dtype)
    assert_bitwise_equal(fused, ref)


@pytest.mark.parametrize("name", list(SETS) + ["flat-views"])
@pytest.mark.parametrize("max_norm", [1e-3, 1e30])
def test_clip_equals_torch_ops_bit_for_bit(C, name, max_norm):
    grads = _flat_views() if name == "flat-views" else _grads(SETS[name])
    expected = [g.clone() for g in grads]
    norm = fastclip.clip_grad_norm_(_params(grads), max_norm)
    assert_norm_close(norm, expected, 2.0)
    reference_clip_(expected, max_norm, norm)
    for g, e in zip(grads, expected):
        assert_bitwise_equal(g, e, nan_bits=False)


@pytest.mark.parametrize("result_dtype", [F32, F64])
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0, 0.5, 1 / 3])
def test_in_kernel_coefficient_is_torchs(C, result_dtype, p):
    """Kernel 1's coefficient (read back from the scratch slot) equals torch's ops on the
    kernel's own norm, bit for bit, over norms from 1e-9 to 1e9 and several max_norm."""
    from fastclip.kernels import cuda as K

    dtype = F64 if result_dtype == F64 else F32
    for i, scale in enumerate(10.0 ** torch.arange(-9, 10, 1.5)):
        grads = _grads([((1000,), dtype), ((37,), dtype)], seed=i, scale=float(scale))
        for max_norm in (1e-4, 0.7, 1.0, 3e3):
            table = TensorTable.from_tensors(grads, [dtype, dtype])
            before = [g.clone() for g in grads]
            norm = C.fused_clip_(table, p, max_norm, result_dtype)
            slot = C.device_table(table, result_dtype).scratch_tensor[K.SCRATCH_COEF:K.SCRATCH_COEF + 1]
            coef = slot.view(F64)[0] if result_dtype == F64 else slot.view(F32)[0]
            assert_bitwise_equal(coef, clip_coefficient(max_norm, norm))
            reference_clip_(before, max_norm, norm)
            for g, b in zip(grads, before):
                assert_bitwise_equal(g, b)


@pytest.mark.parametrize("norm_dtype", [F32, F64])
def test_clip_grads_with_norm_is_one_launch_with_torchs_coefficient(C, monkeypatch, norm_dtype):
    """The scale kernel computes torch's coefficient from the norm on the device (CUDA's
    division and rounding, not the simulator's): every grad equals the reference scaling by
    torch's own coefficient ops, and no torch op ran on the norm first."""
    import fastclip.clip_grad as CG

    def no_torch_ops(*args):
        raise AssertionError("the coefficient was computed by torch ops")

    monkeypatch.setattr(CG, "clip_coefficient", no_torch_ops)
    base = _grads(SETS["mixed"])
    for value in (0.0, 1e-9, 0.37, 3.0, 123.456, 1e30, math.inf, math.nan):
        for max_norm in (1e-4, 0.7, 1.0, 3e3):
            norm = torch.tensor(value, dtype=norm_dtype, device="cuda")
            grads = [g.clone() for g in base]
            fastclip.clip_grads_with_norm_(_params(grads), max_norm, norm)
            expected = [g.clone() for g in base]
            scale_like_fastclip_(expected, reference_coef(max_norm, norm))
            for g, e in zip(grads, expected):
                assert_bitwise_equal(g, e, nan_bits=False)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_16bit_scaling_matches_torch_on_all_patterns(C, dtype):
    pats = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).cuda()
    pats = pats[pats.isfinite()]
    for coef in (0.7, 1.0 / 3.0, 1e-3, 0.999):
        for offset in (0, 3):  # aligned (vector words) and misaligned (element by element)
            ours = torch.zeros(pats.numel() + offset, dtype=dtype, device="cuda")[offset:]
            ours.copy_(pats)
            c = torch.tensor(coef, dtype=F32, device="cuda")
            C.scale_(TensorTable.from_tensors([ours], [dtype]), c)
            ref = (pats.float() * c).to(dtype)  # float32 multiply, round to nearest even
            assert_bitwise_equal(ours, ref, nan_bits=False)


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16])
def test_clamp_equals_the_cpu_kernel_bit_for_bit(C, dtype):
    """clip_grad_value_ on the GPU: 16-byte words where a chunk is aligned (two per thread per
    round), element by element elsewhere. The CPU kernel's bits (NaN payloads and zero signs
    kept, the bound in the grad's dtype), torch's values. Only a GPU shows whether a NaN next to
    a clamped value survives its word's store: the simulator's Python compares keep it either way."""
    bound = 1.3
    base = clamp_test_values(dtype, 300_001, bound)  # several 64K chunks, a partial word at the end
    misaligned = torch.zeros(base.numel() + 1, dtype=dtype, device="cuda")[1:]
    misaligned.copy_(base)
    on_gpu = [base.cuda(), misaligned]
    on_cpu = [base.clone(), base.clone()]
    expected = [t.clone().clamp_(min=-bound, max=bound) for t in on_gpu]
    fastclip.clip_grad_value_(_params(on_gpu), bound)
    fastclip.clip_grad_value_(_params(on_cpu), bound)
    for g, c, e in zip(on_gpu, on_cpu, expected):
        assert_bitwise_equal(g.cpu(), c)
        assert_bitwise_equal(g, e, nan_bits=False)
        assert (g.view(INT_VIEW[dtype])[0::11] == NAN_PAYLOAD[dtype]).all()
    assert not torch.equal(on_cpu[0], base)  # negative control: values were clamped


def test_bitwise_deterministic_for_any_grid(C, monkeypatch):
    grads = _grads(SETS["mixed"])
    table = lambda: TensorTable.from_tensors(grads, [t.dtype for t in grads])  # noqa: E731
    first = C.power_sums(table(), 2.0)
    for _ in range(3):
        again = C.power_sums(table(), 2.0)
        assert_bitwise_equal(again.total, first.total)
        assert_bitwise_equal(again.per_tensor, first.per_tensor)
    for blocks in (1, 7):
        monkeypatch.setattr(C, "MAX_BLOCKS", blocks)
        C.clear_cache()
        other = C.power_sums(table(), 2.0)
        assert C.device_table(table()).grid == min(blocks, C.device_table(table()).nc)
        assert_bitwise_equal(other.total, first.total)
        assert_bitwise_equal(other.per_tensor, first.per_tensor)
    C.clear_cache()


def test_nonfinite_grads(C):
    grads = _grads(SETS["mixed"])
    grads[0][3, 4] = math.nan
    grads[2][7] = math.inf
    table = TensorTable.from_tensors(grads, [t.dtype for t in grads])
    r = C.power_sums(table, 2.0, count_nonfinite=True)
    assert int(r.nonfinite) == 2 and math.isnan(float(r.total))
    with pytest.raises(RuntimeError, match="non-finite"):
        fastclip.clip_grad_norm_(_params(grads), 1.0, error_if_nonfinite=True)
    norm = fastclip.clip_grad_norm_(_params(grads), 1.0)
    assert math.isnan(float(norm))
    assert all(bool(g.isnan().all()) for g in grads if g.numel())  # NaN coef applied, like torch


def test_no_host_sync(C):
    """Nothing synchronizes with the GPU, on a first call (table upload) or a cached one."""
    warm = _grads([((10,), F32)])
    fastclip.clip_grad_norm_(_params(warm), 1.0)  # compile and load outside the check
    fastclip.clip_grad_value_(_params(warm), 1.0)
    torch.cuda.synchronize()
    grads = _grads(SETS["mixed"])
    params = _params(grads)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # first call uploads the table, the second finds it cached
            fastclip.clip_grad_norm_(params, 1e-3)
            fastclip.clip_grad_norm_(params, 1e30)
            norm = fastclip.get_total_norm(grads)
            fastclip.clip_grads_with_norm_(params, 1.0, norm)
            fastclip.clip_grad_value_(params, 0.5)
            fastclip.clip_grad_norm_(params, 1.0, norm_type=math.inf)
        # Negative control: error_if_nonfinite must read the norm, so the mode is really on.
        with pytest.raises(RuntimeError, match="synchroniz"):
            fastclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _warm_up(fn, n=3):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(s)


@pytest.mark.parametrize("max_norm", [1.0, 1e30])
def test_cuda_graph_replays_with_new_values_in_the_same_buffers(C, max_norm):
    grads = _grads(SETS["mixed"] + [((50, 3), F32)])
    params = _params(grads)
    _warm_up(lambda: fastclip.clip_grad_norm_(params, max_norm))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm = fastclip.clip_grad_norm_(params, max_norm)
    for seed, scale in ((10, 1.0), (11, 1e-4), (12, 30.0)):  # clipping and not, from replay to replay
        fresh = _grads(SETS["mixed"] + [((50, 3), F32)], seed=seed, scale=scale)
        for g, f in zip(grads, fresh):
            g.copy_(f)
        expected = [f.clone() for f in fresh]
        ref_norm = fastclip.get_total_norm(expected)
        reference_clip_(expected, max_norm, ref_norm)
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise_equal(norm, ref_norm)
        for g, e in zip(grads, expected):
            assert_bitwise_equal(g, e, nan_bits=False)


@pytest.mark.parametrize("call", ["get_total_norm", "clip_grads_with_norm_", "clip_grad_value_"])
def test_cuda_graph_replays_the_other_calls(C, call):
    """The other public calls take the same device-table path: captured once, replayed with new
    values in the same buffers, each replay equal to the eager call on those values."""
    spec = SETS["mixed"] + [((50, 3), F32)]
    grads = _grads(spec)
    params = _params(grads)
    total = torch.tensor(0.0, device="cuda")  # clip_grads_with_norm_'s norm: a buffer the replays read

    def run(ps, gs, norm):
        if call == "get_total_norm":
            return fastclip.get_total_norm(gs, 3.0)
        if call == "clip_grads_with_norm_":
            return fastclip.clip_grads_with_norm_(ps, 1.0, norm)
        return fastclip.clip_grad_value_(ps, 0.5)

    _warm_up(lambda: run(params, grads, total))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(params, grads, total)
    for seed, scale in ((20, 1.0), (21, 1e-3), (22, 30.0)):
        fresh = _grads(spec, seed=seed, scale=scale)
        for g, f in zip(grads, fresh):
            g.copy_(f)
        total.copy_(fastclip.get_total_norm(fresh))
        expected = [f.clone() for f in fresh]
        want = run(_params(expected), expected, total.clone())
        graph.replay()
        torch.cuda.synchronize()
        if call == "get_total_norm":
            assert_bitwise_equal(out, want)
        for g, e in zip(grads, expected):
            assert_bitwise_equal(g, e, nan_bits=False)


def test_cuda_graph_of_a_whole_training_step(C):
    """The grads are allocated inside the capture (zero_grad(set_to_none=True)), so the tables
    are built and uploaded by the capture itself, then re-read at every replay."""
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),
                                   torch.nn.Linear(128, 10)).cuda()

    model, twin = make(), make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    x = torch.randn(32, 64, device="cuda")
    norms = []

    def step(m, o, inp):
        o.zero_grad(set_to_none=True)
        m(inp).square().mean().backward()
        n = fastclip.clip_grad_norm_(m.parameters(), 0.05)
        o.step()
        return n

    _warm_up(lambda: step(model, opt, x))
    for _ in range(3):
        step(twin, twin_opt, x)  # the twin takes the same warm-up steps, eagerly
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_norm = step(model, opt, x)
    for i in range(4):
        x.copy_(torch.randn(32, 64, device="cuda") * (i + 1))
        graph.replay()
        norms.append((static_norm.clone(), step(twin, twin_opt, x)))
    torch.cuda.synchronize()
    for got, want in norms:
        assert torch.allclose(got, want, rtol=1e-5)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_runs_on_the_current_stream(C):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        grads = _grads(SETS["mixed"], scale=3.0)  # produced on s, consumed on s, no sync between
        expected = [g.clone() for g in grads]
        norm = fastclip.clip_grad_norm_(_params(grads), 1.0)
        reference_clip_(expected, 1.0, norm)
        table = TensorTable.from_tensors(grads, [t.dtype for t in grads])
        assert C.device_table(table).stream == s.cuda_stream
    s.synchronize()
    assert_norm_close(norm, [g.to("cuda") for g in _grads(SETS["mixed"], scale=3.0)], 2.0)
    for g, e in zip(grads, expected):
        assert_bitwise_equal(g, e, nan_bits=False)


def test_mixed_devices_are_grouped_like_torch(C):
    cpu = _grads([((500,), F32), ((70,), F64)], device="cpu")
    gpu = _grads([((600,), F32), ((80,), BF16)], seed=3)
    for grads in (cpu + gpu, gpu + cpu):
        expected = [g.clone() for g in grads]
        norm = fastclip.clip_grad_norm_(_params(grads), 0.5)
        assert norm.device == grads[0].device and norm.dtype == F64
        assert_norm_close(norm, expected, 2.0)
        reference_clip_(expected, 0.5, norm)
        for g, e in zip(grads, expected):
            assert_bitwise_equal(g, e, nan_bits=False)
        cpu = _grads([((500,), F32), ((70,), F64)], device="cpu")
        gpu = _grads([((600,), F32), ((80,), BF16)], seed=3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus(C):
    grads = _grads([((5000,), F32)]) + _grads([((7000,), BF16)], device="cuda:1", seed=5)
    expected = [g.clone() for g in grads]
    norm = fastclip.clip_grad_norm_(_params(grads), 0.1)
    assert norm.device == torch.device("cuda", 0)
    assert_norm_close(norm, expected, 2.0)
    reference_clip_(expected, 0.1, norm)
    for g, e in zip(grads, expected):
        assert_bitwise_equal(g, e, nan_bits=False)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_sliced_grads_are_read_through_a_copy_and_written_by_torch(C, dtype):
    base = torch.randn(64, 96, device="cuda").to(dtype)
    grads = [base[:, ::2], base[:, 1::2].t(), torch.randn(300, device="cuda").to(dtype)]
    expected = [g.clone() for g in grads]
    norm = fastclip.clip_grad_norm_(_params(grads), 0.3)
    reference_clip_(expected, 0.3, norm)
    for g, e in zip(grads, expected):
        assert_bitwise_equal(g, e)


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("entry", ["clip_grad_norm_", "GradClipper"])
def test_torch_written_16_bit_grads_get_the_kernels_coefficient(C, dtype, entry):
    """A sliced grad (written by torch after the kernel) and a dense copy of it, in one call, end
    up with the same bits: torch's CUDA mul_ would round the coefficient to 16 bits first."""
    values = (torch.rand(4096, device="cuda") + 0.5).to(dtype)  # wide enough to show the rounding
    holder = torch.empty(2 * 4096, device="cuda", dtype=dtype)
    holder[::2] = values
    sliced, dense = holder[::2], values.clone()
    params = _params([sliced, dense])
    max_norm = 1.234567  # its float32 coefficient is not a 16-bit value
    if entry == "clip_grad_norm_":
        fastclip.clip_grad_norm_(params, max_norm)
    else:
        fastclip.GradClipper(params, max_norm=max_norm).step()
    assert not torch.equal(dense, values)  # it clipped
    assert_bitwise_equal(sliced, dense)


def test_both_launch_paths_agree(C, monkeypatch):
    grads = _grads(SETS["mixed"])
    fastclip.get_total_norm(grads)
    assert C.launch_path() == "cuda.core"
    fast = [fastclip.get_total_norm(grads, p) for p in NORMS]
    monkeypatch.setattr(C, "FAST_LAUNCH", False)
    C.reset_launchers()
    try:
        slow = [fastclip.get_total_norm(grads, p) for p in NORMS]
        assert C.launch_path() == "numba dispatcher"
    finally:
        monkeypatch.setattr(C, "FAST_LAUNCH", True)
        C.reset_launchers()
    for a, b in zip(fast, slow):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_same_grad_listed_twice_is_scaled_twice_like_torch(C, dtype):
    """Blocks write chunks concurrently: memory listed twice would race (some elements scaled
    once). Its later listing is written by torch after the kernel, so every element is c**2."""
    g = torch.randn(1 << 23, device="cuda").to(dtype)
    base = torch.randn(3 << 20, device="cuda").to(dtype)
    for _ in range(5):
        ours = [g.clone(), base.clone()]
        theirs = [g.clone(), base.clone()]
        listed = [ours[0], ours[0], ours[1][:2 << 20], ours[1][1 << 20:]]  # twice; overlapping
        norm = fastclip.clip_grad_norm_(_params(listed), 1.0)
        for t in (theirs[0], theirs[0], theirs[1][:2 << 20], theirs[1][1 << 20:]):  # in order
            scale_like_fastclip_([t], reference_coef(1.0, norm))
        for a, b in zip(ours, theirs):
            assert_bitwise_equal(a, b)
    assert_norm_close(norm, [g, g, base[:2 << 20], base[1 << 20:]], 2.0)


def test_expanded_grad_is_refused_before_any_write(C):
    grads = _grads(SETS["mixed"]) + [torch.randn(1, device="cuda").expand(30)]
    before = [g.clone() for g in grads]
    with pytest.raises(RuntimeError, match="expanded view"):
        fastclip.clip_grad_norm_(_params(grads), 1e-3)
    for g, b in zip(grads, before):
        assert_bitwise_equal(g, b)


def test_inference_grad_listed_twice_is_refused_before_any_write(C):
    """torch writes the second listing after the kernels, and refuses to update an inference
    tensor in place: the call refuses first."""
    with torch.inference_mode():
        shared = torch.randn(64, device="cuda")
    grads = _grads(SETS["mixed"]) + [shared, shared]
    before = [g.clone() for g in grads]
    with pytest.raises(RuntimeError, match="inference tensor"):
        fastclip.clip_grad_norm_(_params(grads), 1e-3)
    for g, b in zip(grads, before):
        assert_bitwise_equal(g, b)


@pytest.mark.parametrize("blocks", [7, None])
def test_last_block_finalize_is_race_free_under_repetition(C, monkeypatch, blocks):
    """A missing fence or a stale read in the last-block finalize shows as a rare wrong total:
    repeat the one-launch passes many times and compare every result's bits with the first."""
    monkeypatch.setattr(C, "MAX_BLOCKS", blocks)
    C.clear_cache()
    grads = _grads(SETS["mixed"])
    grads[0][5, 6] = math.inf
    table = TensorTable.from_tensors(grads, [t.dtype for t in grads])
    runs = [C.power_sums(table, 2.0, count_nonfinite=True) for _ in range(1000)]
    finite = grads[1:]
    norms = torch.stack([fastclip.get_total_norm(finite) for _ in range(1000)])
    per_tensor = torch.stack([r.per_tensor for r in runs])
    counts = torch.stack([r.nonfinite for r in runs])
    assert int(counts[0]) == 1 and math.isinf(float(runs[0].total))
    assert_bitwise_equal(counts, counts[0].expand_as(counts))
    assert_bitwise_equal(per_tensor, per_tensor[0].expand_as(per_tensor))
    assert_bitwise_equal(norms, norms[0].expand_as(norms))
    assert_norm_close(norms[0], finite, 2.0)
    C.clear_cache()


def test_last_block_finalize_is_race_free_on_a_full_grid(C):
    """The test above runs 7 or 11 blocks, one wave. Here over a thousand chunks on the default
    grid (every resident block of the GPU, several waves of chunks each), with the per-tensor
    folds and the non-finite count on: 200 launches, every result's bits equal to the first."""
    C.clear_cache()
    grads = [torch.randn(1 << 26, device="cuda")] + _grads(SETS["many-small"])
    grads[0][12345] = math.nan
    table = TensorTable.from_tensors(grads, [t.dtype for t in grads])
    assert C.device_table(table).nc > 1000
    runs = [C.power_sums(table, 2.0, count_nonfinite=True) for _ in range(200)]
    per_tensor = torch.stack([r.per_tensor for r in runs])
    counts = torch.stack([r.nonfinite for r in runs])
    assert int(counts[0]) == 1 and math.isnan(float(runs[0].total))
    assert_bitwise_equal(counts, counts[0].expand_as(counts))
    assert_bitwise_equal(per_tensor, per_tensor[0].expand_as(per_tensor))
    finite = grads[1:]
    norms = torch.stack([fastclip.get_total_norm(finite) for _ in range(200)])
    assert_bitwise_equal(norms, norms[0].expand_as(norms))
    assert_norm_close(norms[0], finite, 2.0)
    C.clear_cache()


def test_kernels_wait_for_work_queued_on_the_current_stream(C):
    """A launch on the wrong stream (the legacy one, say) would not wait for the copy queued on
    torch's current stream behind a long sleep, and would read the old grads."""
    s = torch.cuda.Stream()
    grads = _grads(SETS["mixed"], scale=3.0)
    fresh = [g * 2 for g in grads]
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time on s before the copies
        for g, f in zip(grads, fresh):
            g.copy_(f)
        norm = fastclip.clip_grad_norm_(_params(grads), 1.0)
    s.synchronize()
    assert_norm_close(norm, fresh, 2.0)
    expected = [f.clone() for f in fresh]
    reference_clip_(expected, 1.0, norm)
    for g, e in zip(grads, expected):
        assert_bitwise_equal(g, e, nan_bits=False)


@pytest.mark.slow
def test_a_tensor_of_more_than_2_31_elements(C):
    """64-bit indexing end to end: a 4 GiB bfloat16 grad of 2**31 + 5 elements."""
    n = (1 << 31) + 5
    g = torch.empty(n, dtype=BF16, device="cuda")
    step = 1 << 28
    for i in range(0, n, step):
        g[i:i + step].normal_()
    exact = math.sqrt(math.fsum(float(g[i:i + step].double().square().sum()) for i in range(0, n, step)))
    ends = [g[:1000].clone(), g[-1000:].clone()]
    norm = fastclip.clip_grad_norm_(_params([g]), 1.0)
    assert math.isclose(float(norm), exact, rel_tol=1e-6)
    for ref in ends:
        scale_like_fastclip_([ref], reference_coef(1.0, norm))
    assert_bitwise_equal(g[:1000], ends[0])
    assert_bitwise_equal(g[-1000:], ends[1])  # elements past 2**31 were written

