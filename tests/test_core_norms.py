"""Norms against the exact float64 reference, and the cases where fastclip must beat torch."""

from __future__ import annotations

import math

import pytest
import torch

import fastclip
from fastclip import _cpu
from fastclip.kernels.layout import DEFAULT_CHUNK_SIZE
from reference import (
    ALL_DTYPES,
    assert_bitwise_equal,
    assert_norm_close,
    exact_norm,
    norm_tolerance,
    param_with_grad,
    random_grad,
    reference_clip_,
    rel_err,
)

NORM_TYPES = [2.0, 1.0, math.inf, "inf", 3.0, 0.5]
CHUNK = DEFAULT_CHUNK_SIZE


def as_p(norm_type) -> float:
    return math.inf if norm_type == "inf" else float(norm_type)


def _transposed(dtype):
    t = random_grad((300, 257), dtype).t()  # dense but not contiguous
    assert not t.is_contiguous()
    return t


def _sliced(dtype):
    t = random_grad((301, 40), dtype)[:, ::3]  # gaps between elements: strided
    assert not t.is_contiguous()
    return t


# name -> tensor factory. Sizes straddle the kernels' 64K chunk and the size above which the
# threaded kernels run (``_cpu.PARALLEL_MIN_ELEMENTS``).
SHAPES = {
    "empty": lambda dt: random_grad((0,), dt),
    "one": lambda dt: random_grad((1,), dt),
    "odd": lambda dt: random_grad((1023,), dt),
    "3d-odd": lambda dt: random_grad((3, 5, 7), dt),
    "chunk+1": lambda dt: random_grad((CHUNK + 1,), dt),
    "3chunks+odd": lambda dt: random_grad((3 * CHUNK + 5,), dt),
    "parallel": lambda dt: random_grad((_cpu.PARALLEL_MIN_ELEMENTS + 3,), dt),
    "transposed": _transposed,
    "sliced": _sliced,
}


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_norm_matches_exact_reference(shape, dtype, norm_type):
    t = SHAPES[shape](dtype)
    norm = fastclip.get_total_norm([t], norm_type)
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert norm.device == t.device and norm.shape == ()
    assert_norm_close(norm, [t], as_p(norm_type))


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
def test_mixed_dtypes_in_one_call(norm_type):
    p = as_p(norm_type)
    tensors = [random_grad((CHUNK + 7,), torch.float32), random_grad((1000,), torch.float16, 10.0),
               random_grad((3, 333), torch.bfloat16, 0.1), random_grad((0,), torch.float16),
               random_grad((77, 5), torch.float32).t(), random_grad((50, 20), torch.bfloat16)[::2, 1::3]]
    norm = fastclip.get_total_norm(tensors, norm_type)
    assert norm.dtype == torch.float32  # 16-bit and float32 grads: float32
    assert_norm_close(norm, tensors, p)

    with_f64 = tensors + [random_grad((513,), torch.float64, 3.0)]
    norm64 = fastclip.get_total_norm(with_f64, norm_type)
    assert norm64.dtype == torch.float64  # any float64 grad: float64
    assert_norm_close(norm64, with_f64, p)


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
def test_many_tensors_of_many_sizes(norm_type):
    # Many small tensors and a few above the chunk size: chunks of different tensors share groups.
    gen = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 5000, (200,), generator=gen).tolist() + [CHUNK * 2 + 1, 3, CHUNK]
    tensors = [random_grad((n,), ALL_DTYPES[i % 4], generator=gen) for i, n in enumerate(sizes)]
    assert_norm_close(fastclip.get_total_norm(tensors, norm_type), tensors, as_p(norm_type))


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
def test_clip_grad_norm_returns_the_same_norm(norm_type):
    grads = [random_grad((4000,), torch.float32), random_grad((300,), torch.bfloat16)]
    expected = fastclip.get_total_norm(grads, norm_type)
    params = [param_with_grad(g.clone()) for g in grads]
    norm = fastclip.clip_grad_norm_(params, 1e9, norm_type)
    assert_bitwise_equal(norm, expected)


def test_inf_norm_with_an_empty_tensor():
    tensors = [torch.empty(0), torch.tensor([-3.0, 2.0]), torch.empty(0, 4, dtype=torch.float16)]
    assert fastclip.get_total_norm(tensors, math.inf).item() == 3.0
    assert fastclip.get_total_norm([torch.empty(0)], "inf").item() == 0.0
    params = [param_with_grad(t.clone()) for t in tensors]
    assert fastclip.clip_grad_norm_(params, 1.0, "inf").item() == 3.0
    assert params[1].grad.tolist() == pytest.approx([-1.0, 2 / 3], rel=1e-6)


def test_inf_norm_nan_wins():
    t = torch.tensor([1.0, float("nan"), float("inf")])
    assert math.isnan(fastclip.get_total_norm([t], math.inf).item())
    assert math.isnan(fastclip.get_total_norm([torch.tensor([5.0]), t.half()], math.inf).item())


def test_nonfinite_norms_like_torch():
    inf_t = torch.tensor([1.0, -float("inf")])
    nan_t = torch.tensor([1.0, float("nan")])
    for p in (2.0, 1.0, 3.0, 0.5):
        assert fastclip.get_total_norm([inf_t], p).item() == math.inf
        assert math.isnan(fastclip.get_total_norm([nan_t], p).item())
        assert math.isnan(fastclip.get_total_norm([inf_t, nan_t], p).item())


# --- where fastclip must beat torch ------------------------------------------------------------


@pytest.mark.slow
def test_64m_float32_normals_exact(record_property):
    x = torch.randn(1 << 26)
    ref = exact_norm([x], 2.0)
    ours = rel_err(fastclip.get_total_norm([x]).item(), ref)
    theirs = rel_err(torch.nn.utils.get_total_norm([x]).item(), ref)
    # A recorded comparison, not a requirement on torch.
    record_property("fastclip_rel_err", ours)
    record_property("torch_rel_err", theirs)
    print(f"64M float32 normals: relative error fastclip {ours:.3g}, torch {theirs:.3g}")
    assert ours <= 1e-7


def test_bf16_set_exact(record_property):
    tensors = [torch.randn(10_000).bfloat16() for _ in range(100)]
    ref = exact_norm(tensors, 2.0)
    ours = rel_err(fastclip.get_total_norm(tensors).item(), ref)
    theirs = rel_err(torch.nn.utils.get_total_norm(tensors).float().item(), ref)
    record_property("fastclip_rel_err", ours)
    record_property("torch_rel_err", theirs)
    print(f"bf16 100 x 10k: relative error fastclip {ours:.3g}, torch {theirs:.3g}")
    assert ours <= 1e-6


def test_float32_near_1e30_finite_and_correct(record_property):
    x = torch.full((1000,), 1e30) * torch.linspace(0.5, 1.5, 1000)
    ref = exact_norm([x], 2.0)
    norm = fastclip.get_total_norm([x])
    assert math.isfinite(norm.item())
    assert rel_err(norm.item(), ref) <= norm_tolerance(2.0, x.numel(), torch.float32)
    record_property("torch_norm", torch.nn.utils.get_total_norm([x]).item())  # inf on torch 2.13

    # Clipping them works too: the result has the requested norm, not zeros.
    p = param_with_grad(x.clone())
    fastclip.clip_grad_norm_([p], 1.0)
    assert rel_err(exact_norm([p.grad], 2.0), 1.0) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_norm_above_65504_clips_correctly(dtype, record_property):
    g = torch.full((1000,), 60000.0, dtype=dtype)
    g[::2] = -30000.0
    p = param_with_grad(g.clone())
    norm = fastclip.clip_grad_norm_([p], 1.0)
    assert norm.dtype == torch.float32
    assert_norm_close(norm, [g], 2.0)
    assert norm.item() > 65504
    # Bit for bit what torch would write for this norm, and no longer zeros.
    expected = g.clone()
    reference_clip_([expected], 1.0, norm)
    assert_bitwise_equal(p.grad, expected)
    assert bool((p.grad != 0).all())
    assert abs(exact_norm([p.grad], 2.0) - 1.0) < 1e-2  # 16-bit rounding of each element

    q = param_with_grad(g.clone())
    record_property("torch_norm", torch.nn.utils.clip_grad_norm_([q], 1.0).item())  # inf for fp16
    record_property("torch_zeroed", bool((q.grad == 0).all()))


def test_float64_promotion_keeps_small_values():
    # Values whose squares underflow float32 still count in float64 accumulation.
    x = torch.full((100,), 1e-30)
    assert_norm_close(fastclip.get_total_norm([x]), [x], 2.0)
    assert fastclip.get_total_norm([x]).item() > 0


# --- negative controls: the comparisons above can fail -------------------------------------------


def test_negative_control_reference_detects_a_perturbed_norm():
    tensors = [random_grad((5000,), torch.float64), random_grad((700,), torch.float32)]
    norm = fastclip.get_total_norm(tensors)
    assert_norm_close(norm, tensors, 2.0)
    tol = norm_tolerance(2.0, 5700, torch.float64)
    with pytest.raises(AssertionError, match="relative error"):
        assert_norm_close(norm * (1 + 4 * tol), tensors, 2.0)
    # One element dropped changes the norm by far more than the tolerance.
    with pytest.raises(AssertionError, match="relative error"):
        assert_norm_close(norm, [tensors[0], tensors[1][1:]], 2.0)


def test_negative_control_reference_rejects_torch_float32_norm():
    # torch's float32 accumulation overflows where the exact reference does not.
    x = torch.full((1000,), 1e30)
    with pytest.raises(AssertionError):
        assert_norm_close(torch.nn.utils.get_total_norm([x]), [x], 2.0)


def test_negative_control_bitwise_check_detects_one_ulp():
    a = random_grad((100,), torch.bfloat16)
    b = a.clone()
    b.view(torch.int16)[37] += 1
    with pytest.raises(AssertionError, match="1 of 100 elements differ"):
        assert_bitwise_equal(a, b)
