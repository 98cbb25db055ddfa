"""Edges of torch parity found by fuzzing against torch: 0-d grads under a float64 coefficient,
autograd's version counters after kernel writes, and clamping sliced 16-bit grads."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import fastclip
from fastclip import _cpu
from reference import ALL_DTYPES, assert_bitwise_equal, param_with_grad


# --- 0-d grads: torch's g.mul_(c) promotes two 0-d operands ----------------------------------------

def _scalar_values(n: int = 400) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-3, 4, (n,), generator=g)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_scalar_grads_under_a_float64_coefficient_match_torch(dtype):
    """A float64 grad in the set makes the coefficient float64: torch then multiplies a 0-d
    float32/16-bit grad in float64 and rounds once, and so must fastclip."""
    values = _scalar_values().to(dtype)
    for v in values:
        def params():
            return [param_with_grad(v.clone()), param_with_grad(torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64)),
                    param_with_grad(v.reshape(1).clone())]  # shape (1,): no promotion, kernel path
        ours, theirs = params(), params()
        # fastclip's norm is exact and torch's may differ by an ulp: scale both from fastclip's.
        norm = fastclip.clip_grad_norm_(ours, 1.0)
        assert norm.dtype == torch.float64
        torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, norm)
        for a, b in zip(ours, theirs):
            assert_bitwise_equal(a.grad, b.grad)


@pytest.mark.parametrize("norm_dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_grads_with_norm_scalar_grads_match_torch(dtype, norm_dtype):
    values = _scalar_values(200).to(dtype)
    for v, norm in zip(values, _scalar_values(200).abs() * 7 + 1):
        total = norm.to(norm_dtype)
        ours, theirs = [param_with_grad(v.clone())], [param_with_grad(v.clone())]
        fastclip.clip_grads_with_norm_(ours, 0.3, total)
        torch.nn.utils.clip_grads_with_norm_(theirs, 0.3, total)
        assert_bitwise_equal(ours[0].grad, theirs[0].grad)


def test_negative_control_float32_rounding_of_a_float64_coefficient_differs():
    """The 0-d case above is not vacuous: multiplying in float32 by the rounded coefficient
    (what the kernel does for every other grad) differs from torch's float64 product."""
    v = torch.tensor(-21.787893295288086)
    coef = torch.tensor(1.0 / (50.0 ** 0.5 + 1e-6), dtype=torch.float64)
    assert (v * coef.float()).item() != v.clone().mul_(coef).item()


def test_only_promoted_scalars_leave_the_kernel(cpu_kernel_calls):
    params = [param_with_grad(torch.tensor(2.0)), param_with_grad(torch.tensor(3.0, dtype=torch.float64)),
              param_with_grad(torch.ones(5))]
    table = fastclip._plan.Plan.build([p.grad for p in params], "t", "parameters").sets[0].table
    assert table.promoted_scalars(torch.float64) == (0,)
    assert table.promoted_scalars(torch.float32) == ()


# --- autograd's version counters --------------------------------------------------------------------

def _written_by(call):
    g = torch.Generator().manual_seed(1)
    params = [param_with_grad(torch.randn(50, generator=g) * 10), param_with_grad(torch.randn(7, 3, generator=g).t())]
    before = [p.grad._version for p in params]
    call(params)
    return [p.grad._version > b for p, b in zip(params, before)]


@pytest.mark.parametrize("name, call", [
    ("clip_grad_norm_", lambda ps: fastclip.clip_grad_norm_(ps, 0.1)),
    ("clip_grad_norm_ big", lambda ps: fastclip.clip_grad_norm_(
        ps + [param_with_grad(torch.ones(_cpu.PARALLEL_MIN_ELEMENTS))], 0.1)),
    ("clip_grads_with_norm_", lambda ps: fastclip.clip_grads_with_norm_(ps, 0.1, torch.tensor(50.0))),
    ("clip_grad_value_", lambda ps: fastclip.clip_grad_value_(ps, 0.5)),
    ("adaptive_grad_clip_", lambda ps: fastclip.adaptive_grad_clip_(ps, 1e-3)),
    ("GradClipper", lambda ps: fastclip.GradClipper(ps, max_norm=0.1).step()),
])
def test_kernel_writes_bump_version_counters(name, call):
    assert _written_by(call) == [True, True]


def _version_steps(call, grads):
    params = [param_with_grad(g) for g in grads]
    before = [p.grad._version for p in params]
    call(params)
    return [p.grad._version - b for p, b in zip(params, before)]


@pytest.mark.parametrize("name, arg", [("clip_grad_norm_", 0.1), ("clip_grad_value_", 0.5)])
def test_grads_torch_writes_after_the_kernel_are_bumped_once_as_torch_does(name, arg):
    """A sliced view, and a 0-d float32 grad under a float64 coefficient, are written by torch's
    own ops after the kernel (which bump them): the kernel's bump skips them, so each grad's
    counter moves by one, as one in-place op of torch moves it (it moved by two)."""
    def grads():
        g = torch.Generator().manual_seed(4)
        return [(torch.randn(40, generator=g) * 10)[::2], torch.tensor(3.0),
                torch.randn(6, dtype=torch.float64, generator=g) * 10, torch.randn(9, generator=g) * 10]

    ours = _version_steps(lambda ps: getattr(fastclip, name)(ps, arg), grads())
    theirs = _version_steps(lambda ps: getattr(torch.nn.utils, name)(ps, arg), grads())
    assert ours == [1, 1, 1, 1]
    # torch's clip_grad_norm_ makes one in-place op per grad; its clip_grad_value_ two (a clamp
    # from below, then from above): each counter moved, which is what autograd checks.
    assert theirs == ([1, 1, 1, 1] if name == "clip_grad_norm_" else [2, 2, 2, 2])


def test_a_step_that_does_not_clip_writes_nothing():
    # torch's mul_ by 1.0 bumps the counters anyway; fastclip writes nothing, so they stay.
    assert _written_by(lambda ps: fastclip.clip_grad_norm_(ps, 1e6)) == [False, False]


def _penalty_after_clip(clip) -> None:
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    g, = torch.autograd.grad((w ** 3).sum(), w, create_graph=True)
    penalty = (g * g).sum()
    p = torch.zeros(3)
    p.grad = g
    clip([p], 1.0)
    penalty.backward()


@pytest.mark.parametrize("clip", [torch.nn.utils.clip_grad_norm_, fastclip.clip_grad_norm_])
def test_backward_through_a_clipped_saved_grad_raises_like_torch(clip):
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _penalty_after_clip(clip)


# --- clip_grad_value_ on sliced 16-bit grads ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bound", [0.5, 6e4, 7e4, 1e39, float("inf")])
def test_sliced_16_bit_grads_clamp_like_contiguous_ones(dtype, bound):
    values = torch.tensor([float("inf"), -float("inf"), 1.0, -65504.0, 3e38, float("nan"), 0.25, -2.0])
    values = values.to(dtype)
    sliced = torch.zeros(16, dtype=dtype)
    sliced[::2] = values
    ps = [param_with_grad(torch.tensor([1e6, -1e6, 2.0])), param_with_grad(sliced[::2])]
    dense = [param_with_grad(torch.tensor([1e6, -1e6, 2.0])), param_with_grad(values.clone())]
    fastclip.clip_grad_value_(ps, bound)
    fastclip.clip_grad_value_(dense, bound)
    for a, b in zip(ps, dense):
        assert_bitwise_equal(a.grad, b.grad)
    assert not sliced[1::2].any()  # the gaps of the sliced view are untouched


def test_version_bumps_without_list_support(monkeypatch):
    """torch versions whose increment_version takes one tensor get one call per tensor."""
    from fastclip._table import mark_written

    real = torch.autograd.graph.increment_version

    def one_tensor_only(t):
        if not isinstance(t, torch.Tensor):
            raise TypeError("increment_version(): argument 'tensor' must be Tensor, not list")
        real(t)

    monkeypatch.setattr(torch.autograd.graph, "increment_version", one_tensor_only)
    ts = [torch.zeros(2), torch.zeros(3)]
    mark_written(ts)
    assert [t._version for t in ts] == [1, 1]


# --- a norm beyond float64's range ------------------------------------------------------------------

OVERFLOWING_NORMS = [
    (0.01, lambda: torch.ones(2000)),  # 2000 ** 100
    (1e-10, lambda: torch.ones(3)),
    (0.5, lambda: torch.full((4,), 1e308, dtype=torch.float64)),  # (4 * 1e154) ** 2
]


@pytest.mark.parametrize("p, values", OVERFLOWING_NORMS)
def test_a_norm_beyond_float64_is_inf_like_torch(p, values):
    """The root of a finite float64 power sum can exceed float64: torch's pow gives inf, where
    Python's ``**`` on floats raises OverflowError."""
    expected = torch.nn.utils.get_total_norm([values()], p)
    assert torch.isinf(expected)
    norm = fastclip.get_total_norm([values()], p)
    assert_bitwise_equal(norm, expected)
    ours, theirs = [param_with_grad(values())], [param_with_grad(values())]
    assert_bitwise_equal(fastclip.clip_grad_norm_(ours, 1.0, p), torch.nn.utils.clip_grad_norm_(theirs, 1.0, p))
    assert_bitwise_equal(ours[0].grad, theirs[0].grad)  # scaled by 1 / inf: zeros


def test_negative_control_the_overflowing_sums_themselves_are_finite():
    """The cases above overflow in the root, not in the sum: the sums are finite float64."""
    from reference import exact_power_sum

    for p, values in OVERFLOWING_NORMS:
        total = exact_power_sum([values()], p)
        assert total < float("inf")
        with pytest.raises(OverflowError):
            total ** (1.0 / p)


# --- grads with no memory of their own ----------------------------------------------------------------

def _two_tensor_params():
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    g = torch.Generator().manual_seed(4)
    plain = param_with_grad(torch.randn(50, generator=g) * 10)
    wrapped = torch.zeros(3, requires_grad=True)
    wrapped.grad = two_tensor.TwoTensor(torch.full((3,), 4.0), torch.full((3,), 4.0))
    return [torch.zeros(2, requires_grad=True), plain, wrapped]  # the first has no grad


@pytest.mark.parametrize("call, args", [
    ("clip_grad_norm_", (1.0,)), ("get_total_norm", ()), ("clip_grad_value_", (0.5,)),
    ("clip_grads_with_norm_", (1.0, torch.tensor(60.0))),
])
def test_a_wrapper_subclass_grad_goes_to_torch(call, args):
    """A wrapper subclass (here torch's TwoTensor) has no data address: its own dispatch computes
    on the tensors it holds, so the call goes to torch's implementation, as for meta tensors."""
    ours, theirs = _two_tensor_params(), _two_tensor_params()
    if call == "get_total_norm":
        ours, theirs = [p.grad for p in ours[1:]], [p.grad for p in theirs[1:]]
    out = getattr(fastclip, call)(ours, *args)
    expected = getattr(torch.nn.utils, call)(theirs, *args)
    if expected is not None:
        assert type(out) is type(expected) and torch.equal(out, expected)
    for a, b in zip(ours, theirs):
        a, b = (a.grad, b.grad) if call != "get_total_norm" else (a, b)
        assert (a is None and b is None) or (type(a) is type(b) and torch.equal(a, b))


def test_freed_grad_storage_is_refused_by_name_before_any_write():
    """Storage freed by resize_(0) also reports address 0, but there is nothing to dispatch to
    (torch's own clip crashes the process on it): refused, naming the grad, before any write."""
    plain = param_with_grad(torch.full((5,), 10.0))
    freed = param_with_grad(torch.ones(3))
    freed.grad.untyped_storage().resize_(0)
    without = torch.zeros(2, requires_grad=True)
    try:
        with pytest.raises(TypeError, match=r"^clip_grad_norm_: grad 1 of `parameters` .* no memory"):
            fastclip.clip_grad_norm_([without, plain, freed], 1.0)
    finally:  # memory again before any failure report prints the tensor (that read would crash)
        freed.grad.untyped_storage().resize_(3 * 4)
    assert torch.equal(plain.grad, torch.full((5,), 10.0))


def test_a_view_into_freed_storage_is_refused_too():
    """A view at an offset into storage freed by resize_(0) (FSDP1's flat-parameter views, once
    the flat storage is freed) reports its offset from address 0, not 0: still no memory. Run in
    a child process: a kernel that read it would crash the process."""
    code = textwrap.dedent("""
        import torch, fastclip
        base, other = torch.randn(200), torch.randn(200)
        p = torch.nn.Parameter(torch.randn(4, 10)); p.grad = base[40:80].view(4, 10)
        w = torch.nn.Parameter(other[40:80].view(4, 10)); w.grad = torch.randn(4, 10)
        base.untyped_storage().resize_(0)
        other.untyped_storage().resize_(0)
        assert p.grad.data_ptr() == 160 == w.data_ptr()
        for call in (lambda: fastclip.clip_grad_norm_([p], 1.0),
                     lambda: fastclip.adaptive_grad_clip_([p])):
            try:
                call()
            except TypeError as e:
                print("refused:", str(e)[:60])
        try:  # a weight without memory: AGC reads weights too
            fastclip.adaptive_grad_clip_([w])
        except TypeError as e:
            print("refused:", str(e)[:60])
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 3, run.stdout
    assert lines[0].startswith("refused: clip_grad_norm_: grad 0 of `parameters`")
    assert lines[1].startswith("refused: adaptive_grad_clip_:")
    assert lines[2].startswith("refused: adaptive_grad_clip_:")


def test_a_dtensor_norm_is_read_as_its_value(single_rank_mesh):
    """torch's clip_grad_norm_ of DTensor grads returns a DTensor norm (FSDP2 code may pass it on
    to clip_grads_with_norm_). Its own data_ptr() is 0, which a CUDA kernel must never read:
    validation takes its value as a plain tensor, and the grads are scaled as by the value."""
    from torch.distributed.tensor import DTensor, Replicate

    from fastclip import _validate as V

    value = torch.tensor(5.0)
    norm = DTensor.from_local(value.clone(), single_rank_mesh, [Replicate()])
    assert norm.data_ptr() == 0  # what the kernel would have read
    checked = V.check_total_norm(norm, "clip_grads_with_norm_")
    assert type(checked) is torch.Tensor and checked.data_ptr() != 0 and checked.item() == 5.0
    grads = [torch.tensor([3.0, 4.0, 12.0]), torch.tensor([1.5])]
    ours, theirs = [param_with_grad(g.clone()) for g in grads], [param_with_grad(g.clone()) for g in grads]
    fastclip.clip_grads_with_norm_(ours, 1.0, norm)
    fastclip.clip_grads_with_norm_(theirs, 1.0, value)
    for a, b in zip(ours, theirs):
        assert_bitwise_equal(a.grad, b.grad)
