"""ClipStats: telemetry filled from the norm pass, checked against exact float64 references."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import fastclip
from fastclip._plan import Plan
from fastclip.kernels.layout import DEFAULT_CHUNK_SIZE
from device_style import device_style  # noqa: F401 (fixture)
from reference import (assert_norm_close, exact_norm, param_with_grad, random_grad, reference_coef,
                       tensor_power_sum)

NORMS = [2.0, 1.0, math.inf, 3.0]


def _root(s: float, p: float) -> float:
    return s if p in (1.0, math.inf) else s ** (1.0 / p) if p != 2.0 else math.sqrt(s)


def _mixed_params(seed: int = 0):
    """Grads of four dtypes and uneven sizes (including an empty one), interleaved."""
    g = torch.Generator().manual_seed(seed)
    specs = [((7, 5), torch.float32), ((300,), torch.bfloat16), ((2, 3, 4), torch.float16),
             ((0,), torch.float32), ((1,), torch.float64), ((40, 9), torch.bfloat16),
             ((3000,), torch.float32), ((11,), torch.float16)]
    # Varied magnitudes make every per-tensor norm different, so a permutation cannot pass.
    return [param_with_grad(random_grad(shape, dtype, scale=0.5 * (i + 1), generator=g))
            for i, (shape, dtype) in enumerate(specs)]


def _expected_per_tensor(grads, p, dtype):
    return torch.tensor([_root(tensor_power_sum(t, p), p) for t in grads], dtype=torch.float64).to(dtype)


def test_fresh_stats_are_empty():
    stats = fastclip.ClipStats()
    assert all(v is None for v in stats.as_dict().values())
    assert "total_norm=None" in repr(stats)


@pytest.mark.parametrize("p", NORMS)
def test_values_match_exact_reference(p):
    params = _mixed_params()
    grads = [q.grad.clone() for q in params]
    stats = fastclip.ClipStats()
    norm = fastclip.clip_grad_norm_(params, max_norm=1.0, norm_type=p, stats=stats)

    assert stats.total_norm is norm
    assert_norm_close(stats.total_norm, grads, p)
    assert torch.equal(stats.clip_coef, reference_coef(1.0, norm))
    assert stats.clipped.dtype == torch.bool and bool(stats.clipped)
    assert stats.nonfinite_count.dtype == torch.int64 and int(stats.nonfinite_count) == 0

    per = stats.per_tensor_norms
    assert per.shape == (len(params),) and per.dtype == norm.dtype == torch.float64  # a float64 grad
    # Each per-tensor norm is a float64 root of a float64 sum, compared with exact sums: the sums'
    # order differs from math.fsum by far less than the float64 result's own precision needs.
    torch.testing.assert_close(per, _expected_per_tensor(grads, p, torch.float64), rtol=1e-12, atol=0)
    for t in (stats.total_norm, stats.clip_coef, stats.clipped, per, stats.nonfinite_count):
        assert t.device == grads[0].device


def test_per_tensor_norms_follow_the_callers_order():
    params = _mixed_params(seed=3)
    stats = fastclip.ClipStats()
    fastclip.clip_grad_norm_(params, max_norm=math.inf, stats=stats)
    expected = _expected_per_tensor([q.grad for q in params], 2.0, torch.float64)
    torch.testing.assert_close(stats.per_tensor_norms, expected, rtol=1e-12, atol=0)
    # Negative control: the same values in another order do not pass.
    with pytest.raises(AssertionError):
        torch.testing.assert_close(stats.per_tensor_norms.flip(0), expected, rtol=1e-12, atol=0)


def test_float32_norms_and_params_without_grad():
    g = torch.Generator().manual_seed(1)
    params = [param_with_grad(random_grad((50,), torch.float32, scale=s, generator=g)) for s in (1.0, 3.0)]
    no_grad = torch.zeros(4, requires_grad=True)
    stats = fastclip.ClipStats()
    fastclip.clip_grad_norm_([params[0], no_grad, params[1]], max_norm=1e9, stats=stats)
    assert stats.per_tensor_norms.dtype == torch.float32
    expected = _expected_per_tensor([q.grad for q in params], 2.0, torch.float32)
    # Rounding the same float64 value to float32 on both sides: identical but for a float64 sum
    # that lands on a float32 rounding boundary, at most 1 ulp.
    torch.testing.assert_close(stats.per_tensor_norms, expected, rtol=2.0 ** -23, atol=0)
    assert not bool(stats.clipped) and float(stats.clip_coef) == 1.0


def test_nonfinite_count():
    params = _mixed_params(seed=5)
    positions = {0: [(0, 0), (6, 4)], 1: [(17,)], 2: [(1, 2, 3)], 6: [(0,), (1,), (2999,)]}
    values = [math.inf, -math.inf, math.nan]
    k = 0
    for i, idx in positions.items():
        for j in idx:
            params[i].grad[j] = values[k % 3]
            k += 1
    stats = fastclip.ClipStats()
    norm = fastclip.clip_grad_norm_(params, max_norm=1.0, stats=stats)
    assert int(stats.nonfinite_count) == k == 7
    assert math.isnan(float(norm)) and bool(stats.clipped)  # NaN coefficient: grads were rescaled
    per = stats.per_tensor_norms
    assert [bool(x) for x in ~torch.isfinite(per)] == [i in positions for i in range(len(params))]


@pytest.mark.parametrize("p", NORMS)
def test_per_tensor_norms_of_grads_spanning_several_chunks(p):
    """A grad longer than one chunk has one partial per chunk: its norm folds all of them."""
    g = torch.Generator().manual_seed(13)
    specs = [((3 * DEFAULT_CHUNK_SIZE + 5,), torch.float32, 1.0), ((9,), torch.float64, 2.0),
             ((2 * DEFAULT_CHUNK_SIZE,), torch.bfloat16, 0.5)]
    params = [param_with_grad(random_grad(shape, dtype, scale=s, generator=g)) for shape, dtype, s in specs]
    # The largest |x| of each long grad lies in its first chunk, not its last.
    params[0].grad[10] = 100.0
    params[2].grad[DEFAULT_CHUNK_SIZE - 1] = -50.0
    grads = [q.grad.clone() for q in params]
    stats = fastclip.ClipStats()
    fastclip.clip_grad_norm_(params, max_norm=1.0, norm_type=p, stats=stats)
    torch.testing.assert_close(stats.per_tensor_norms, _expected_per_tensor(grads, p, torch.float64),
                               rtol=1e-12, atol=0)


def test_inf_norm_per_tensor_keeps_a_nan_from_an_early_chunk():
    """A NaN in a grad's first chunk makes its inf norm NaN (as torch.linalg.vector_norm), whatever
    its later chunks hold; the other grads keep their own norms."""
    grad = random_grad((2 * DEFAULT_CHUNK_SIZE + 7,), torch.float32)
    grad[3] = math.nan
    other = random_grad((50,), torch.float32)
    params = [param_with_grad(grad.clone()), param_with_grad(other.clone())]
    stats = fastclip.ClipStats()
    fastclip.clip_grad_norm_(params, max_norm=1.0, norm_type=math.inf, stats=stats)
    per = stats.per_tensor_norms
    assert math.isnan(float(torch.linalg.vector_norm(grad, math.inf)))  # torch's answer
    assert math.isnan(float(per[0]))
    assert float(per[1]) == float(other.abs().max())


def test_inf_only_counts():
    w = param_with_grad(torch.tensor([1.0, math.inf, -math.inf, 2.0]))
    stats = fastclip.ClipStats()
    fastclip.clip_grad_norm_([w], max_norm=1.0, stats=stats)
    assert int(stats.nonfinite_count) == 2
    assert float(stats.total_norm) == math.inf and float(stats.clip_coef) == 0.0


def test_each_call_overwrites():
    w = param_with_grad(torch.tensor([3.0, 4.0]))
    stats = fastclip.ClipStats()
    fastclip.clip_grad_norm_([w], max_norm=1.0, stats=stats)
    assert float(stats.total_norm) == 5.0 and bool(stats.clipped)
    fastclip.clip_grad_norm_([w], max_norm=10.0, stats=stats)  # w.grad now has norm ~1
    assert float(stats.total_norm) == pytest.approx(1.0, rel=1e-6) and not bool(stats.clipped)


def test_a_call_that_cannot_fill_stats_leaves_them_empty():
    """Every call overwrites: one with no grads, or one that torch does (a meta device), leaves
    nothing from the call before."""
    w = param_with_grad(torch.tensor([3.0, 4.0]))
    stats = fastclip.ClipStats()
    fastclip.clip_grad_norm_([w], max_norm=1.0, stats=stats)
    assert all(v is not None for v in stats.as_dict().values())  # filled
    fastclip.clip_grad_norm_([torch.zeros(2, requires_grad=True)], max_norm=1.0, stats=stats)
    assert all(v is None for v in stats.as_dict().values()), stats
    fastclip.clip_grad_norm_([w], max_norm=1.0, stats=stats)
    meta = param_with_grad(torch.ones(3, device="meta"))
    fastclip.clip_grad_norm_([meta], max_norm=1.0, stats=stats)
    assert all(v is None for v in stats.as_dict().values()), stats


def test_without_stats_the_api_is_torchs():
    w = param_with_grad(torch.tensor([3.0, 4.0]))
    assert float(fastclip.clip_grad_norm_([w], 1.0)) == 5.0


def _two_set_plan(grads) -> Plan:
    """A plan with two sets whose tensors interleave in the caller's list (as with two GPUs)."""
    a, b = [0, 2, 3, 6], [1, 4, 5, 7]
    plan_a = Plan.build([grads[i] for i in a], "test", "tensors")
    plan_b = Plan.build([grads[i] for i in b], "test", "tensors")
    sets = [dataclasses.replace(plan_a.sets[0], indices=a), dataclasses.replace(plan_b.sets[0], indices=b)]
    return Plan(sets, len(grads), grads[0].device, torch.float64)


def test_several_device_sets_are_put_back_in_order():
    params = _mixed_params(seed=7)
    grads = [q.grad for q in params]
    plan = _two_set_plan(grads)
    stats = fastclip.ClipStats()
    norm = plan.total_norm(2.0, stats=stats)
    assert float(norm) == pytest.approx(exact_norm(grads, 2.0), rel=1e-14)
    torch.testing.assert_close(stats.per_tensor_norms, _expected_per_tensor(grads, 2.0, torch.float64),
                               rtol=1e-12, atol=0)


def test_nonfinite_count_adds_up_over_device_sets():
    """Each set counts its own inf/NaN elements; the count is their sum."""
    params = _mixed_params(seed=7)
    params[0].grad[1, 1] = math.nan
    params[4].grad[0] = math.inf
    params[7].grad[2] = -math.inf
    grads = [q.grad for q in params]
    plan = _two_set_plan(grads)  # NaN in the first set, the infs in the second
    stats = fastclip.ClipStats()
    plan.total_norm(2.0, stats=stats)
    assert int(stats.nonfinite_count) == 3 and stats.nonfinite_count.dtype == torch.int64


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_device_style_results(p, device_style):
    """The branch for backends that answer with tensors (GPU), run on the CPU."""
    params = _mixed_params(seed=11)
    params[1].grad[3] = math.nan
    params[5].grad[0, 0] = -math.inf
    finite = [q.grad.clone() for i, q in enumerate(params) if i not in (1, 5)]
    stats = fastclip.ClipStats()
    fastclip.clip_grad_norm_(params, max_norm=1.0, norm_type=p, stats=stats)
    assert int(stats.nonfinite_count) == 2 and stats.nonfinite_count.dtype == torch.int64
    assert bool(stats.clipped) and math.isnan(float(stats.clip_coef))
    per = stats.per_tensor_norms
    assert math.isnan(float(per[1])) and float(per[5]) == math.inf
    keep = [i for i in range(len(params)) if i not in (1, 5)]
    torch.testing.assert_close(per[keep], _expected_per_tensor(finite, p, torch.float64), rtol=1e-12, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_stats_stay_on_device_without_sync():
    cpu = _mixed_params(seed=9)
    cpu[6].grad[5] = math.inf
    params = [param_with_grad(q.grad.cuda()) for q in cpu]
    stats = fastclip.ClipStats()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm = fastclip.clip_grad_norm_(params, max_norm=1.0, stats=stats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for t in stats.as_dict().values():
        assert t.device == params[0].grad.device
    assert float(norm) == math.inf and int(stats.nonfinite_count) == 1
    expected = _expected_per_tensor([q.grad for q in cpu], 2.0, torch.float64)
    torch.testing.assert_close(stats.per_tensor_norms.cpu(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("failure", ["expanded grad", "nonfinite with error_if_nonfinite", "sparse grad"])
def test_a_call_that_raises_leaves_the_stats_as_they_were(failure):
    """Like the grads: the fields of a call that raised are not the ones of a half-done call
    (an expanded grad is refused by the write pass, after the norm pass filled the stats)."""
    stats = fastclip.ClipStats()
    good = [param_with_grad(torch.tensor([3.0, 4.0]))]
    fastclip.clip_grad_norm_(good, 1.0, stats=stats)
    before = {k: v.clone() for k, v in stats.as_dict().items()}
    if failure == "expanded grad":
        bad = [param_with_grad(torch.tensor([3.0]).expand(4))]
        error, kwargs = RuntimeError, {}
    elif failure == "sparse grad":
        bad = [param_with_grad(torch.tensor([0.0, 5.0]).to_sparse())]
        error, kwargs = ValueError, {}
    else:
        bad = [param_with_grad(torch.tensor([math.nan, 1.0]))]
        error, kwargs = RuntimeError, {"error_if_nonfinite": True}
    with pytest.raises(error):
        fastclip.clip_grad_norm_(bad, 1.0, stats=stats, **kwargs)
    for k, v in stats.as_dict().items():
        assert v is not None and torch.equal(v, before[k]), k
