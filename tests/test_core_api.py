"""Torch-compatible behaviour of the public API: argument forms, return values, in-place writes."""

from __future__ import annotations

import math

import numba
import pytest
import torch

import fastclip
from fastclip import _cpu
from fastclip.clip_grad import clip_coefficient
from fastclip.kernels import cpu as K
from fastclip.kernels.layout import DEFAULT_CHUNK_SIZE
from reference import (
    ALL_DTYPES,
    INT_VIEW,
    assert_bitwise_equal,
    assert_norm_close,
    bits,
    exact_norm,
    param_with_grad,
    random_grad,
    reference_clip_,
    reference_coef,
)

CHUNK = DEFAULT_CHUNK_SIZE


def grad_set(scale: float = 1.0):
    """A mixed set: every dtype, odd sizes, one tensor above the chunk size."""
    return [random_grad((CHUNK + 3,), torch.float32, scale), random_grad((17, 9), torch.float64, scale),
            random_grad((1001,), torch.float16, scale), random_grad((5, 3, 7), torch.bfloat16, scale),
            random_grad((1,), torch.float32, scale)]


def params_of(grads):
    return [param_with_grad(g.clone()) for g in grads]


def snapshot(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def assert_grads_bitwise(params, expected, nan_bits=True):
    for p, e in zip(params, expected):
        if e is None:
            assert p.grad is None
        else:
            assert_bitwise_equal(p.grad, e, nan_bits=nan_bits)


# --- argument forms ------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["tensor", "list", "tuple", "generator"])
def test_parameter_forms_agree(form):
    g = random_grad((3, CHUNK + 11), torch.float32, 10.0)
    p = param_with_grad(g.clone())
    arg = {"tensor": p, "list": [p], "tuple": (p,), "generator": (q for q in [p])}[form]
    norm = fastclip.clip_grad_norm_(arg, 1.0)
    q = param_with_grad(g.clone())
    assert_bitwise_equal(norm, fastclip.clip_grad_norm_([q], 1.0))
    assert_bitwise_equal(p.grad, q.grad)
    t = g.clone()
    targ = {"tensor": t, "list": [t], "tuple": (t,), "generator": (x for x in [t])}[form]
    assert_bitwise_equal(fastclip.get_total_norm(targ), fastclip.get_total_norm([g]))


def test_single_tensor_same_as_list_for_every_function():
    g = random_grad((2000,), torch.bfloat16, 5.0)
    a, b = param_with_grad(g.clone()), param_with_grad(g.clone())
    fastclip.clip_grad_value_(a, 0.5)
    fastclip.clip_grad_value_([b], 0.5)
    assert_bitwise_equal(a.grad, b.grad)
    fastclip.clip_grads_with_norm_(a, 1.0, torch.tensor(40.0))
    fastclip.clip_grads_with_norm_([b], 1.0, torch.tensor(40.0))
    assert_bitwise_equal(a.grad, b.grad)


def test_none_grads_are_skipped():
    grads = grad_set(3.0)
    params = params_of(grads)
    bare = [torch.zeros(4, requires_grad=True), torch.zeros(2, 2, requires_grad=True)]
    mixed = [bare[0]] + params[:2] + [bare[1]] + params[2:]
    norm = fastclip.clip_grad_norm_(mixed, 1.0)
    assert_norm_close(norm, grads, 2.0)
    assert all(b.grad is None for b in bare)
    expected = [g.clone() for g in grads]
    reference_clip_(expected, 1.0, norm)
    assert_grads_bitwise(params, expected)
    fastclip.clip_grad_value_(mixed, 0.01)
    fastclip.clip_grads_with_norm_(mixed, 1.0, torch.tensor(5.0))
    assert all(b.grad is None for b in bare)


def test_empty_input():
    for empty in ([], (), [torch.zeros(3, requires_grad=True)]):  # the last: no grads at all
        norm = fastclip.clip_grad_norm_(empty, 1.0)
        assert norm.dtype == torch.float32 and norm.shape == () and norm.item() == 0.0
        assert fastclip.clip_grad_value_(empty, 1.0) is None
        assert fastclip.clip_grads_with_norm_(empty, 1.0, torch.tensor(1.0)) is None
    norm = fastclip.get_total_norm([])
    assert norm.dtype == torch.float32 and norm.item() == 0.0


def test_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="empty generator"):
        assert fastclip.clip_grad_norm_((p for p in []), 1.0).item() == 0.0


@pytest.mark.parametrize("call, args", [("get_total_norm", ()), ("clip_grad_value_", (1.0,)),
                                        ("clip_grads_with_norm_", (1.0, torch.tensor(1.0)))])
def test_siblings_do_not_warn_of_an_empty_generator_as_torch_does_not(call, args):
    import warnings

    # (torch's clip_grad_value_ raises on an empty generator: its foreach grouping gets no list.)
    for module in (torch.nn.utils, fastclip) if call != "clip_grad_value_" else (fastclip,):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            getattr(module, call)((p for p in []), *args)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_is_accepted_and_changes_nothing(foreach):
    grads = grad_set(2.0)
    a, b = params_of(grads), params_of(grads)
    na = fastclip.clip_grad_norm_(a, 1.0, foreach=foreach)
    nb = fastclip.clip_grad_norm_(b, 1.0)
    assert_bitwise_equal(na, nb)
    assert_grads_bitwise(a, [p.grad for p in b])
    assert_bitwise_equal(fastclip.get_total_norm(grads, foreach=foreach), fastclip.get_total_norm(grads))
    fastclip.clip_grad_value_(a, 0.1, foreach=foreach)
    fastclip.clip_grads_with_norm_(a, 0.5, torch.tensor(3.0), foreach=foreach)


def test_module_parameters_like_torch():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    model(torch.randn(64, 20)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = fastclip.clip_grad_norm_(model.parameters(), 0.5)
    assert_norm_close(norm, grads, 2.0)
    expected = [g.clone() for g in grads]
    reference_clip_(expected, 0.5, norm)
    for p, e in zip(model.parameters(), expected):
        assert_bitwise_equal(p.grad, e)
    torch_norm = torch.nn.utils.get_total_norm(grads)
    assert norm.item() == pytest.approx(torch_norm.item(), rel=1e-5)


def test_get_total_norm_of_tensors_that_require_grad():
    params = [torch.randn(50, requires_grad=True), torch.randn(3, 4, requires_grad=True).double()]
    norm = fastclip.get_total_norm(params, 3.0)
    assert not norm.requires_grad
    assert_norm_close(norm, [t.detach() for t in params], 3.0)


# --- return value ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtypes,expected", [
    ((torch.float32,), torch.float32),
    ((torch.float16,), torch.float32),
    ((torch.bfloat16,), torch.float32),
    ((torch.float16, torch.bfloat16), torch.float32),
    ((torch.float32, torch.bfloat16), torch.float32),
    ((torch.float64,), torch.float64),
    ((torch.float16, torch.float64), torch.float64),
    ((torch.float32, torch.float64, torch.bfloat16), torch.float64),
])
@pytest.mark.parametrize("norm_type", [2.0, "inf", 0.5])
def test_return_dtype_and_device(dtypes, expected, norm_type):
    grads = [random_grad((100,), dt) for dt in dtypes]
    for norm in (fastclip.get_total_norm(grads, norm_type),
                 fastclip.clip_grad_norm_(params_of(grads), 1.0, norm_type)):
        assert norm.dtype == expected
        assert norm.device == torch.device("cpu") and norm.shape == ()


# --- coefficient and scaling, bit for bit against torch -------------------------------------------


@pytest.mark.parametrize("norm_dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("total", [0.37, 3.7, 12345.678, 1e5, 1e-3])
@pytest.mark.parametrize("max_norm", [1.0, 0.3, 7.77])
def test_clip_grads_with_norm_bitwise_like_torch(norm_dtype, total, max_norm):
    grads = grad_set(5.0)
    grads[2][:3] = torch.tensor([60000.0, -6e-8, 1e-5])  # fp16 extremes and subnormals
    grads[3].view(-1)[:3] = torch.tensor([1e38, -1e-40, 3e-39])  # bf16 extremes and subnormals
    ours, theirs = params_of(grads), params_of(grads)
    total_norm = torch.tensor(total, dtype=norm_dtype)
    fastclip.clip_grads_with_norm_(ours, max_norm, total_norm)
    torch.nn.utils.clip_grads_with_norm_(theirs, max_norm, total_norm)
    assert_grads_bitwise(ours, [p.grad for p in theirs])


@pytest.mark.parametrize("total", [float("nan"), float("inf"), 0.0])
def test_clip_grads_with_norm_nonfinite_total_like_torch(total):
    grads = grad_set()
    ours, theirs = params_of(grads), params_of(grads)
    fastclip.clip_grads_with_norm_(ours, 1.0, torch.tensor(total))
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, torch.tensor(total))
    assert_grads_bitwise(ours, [p.grad for p in theirs], nan_bits=False)


def test_coefficient_is_torchs():
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for total in (0.0, 1e-7, 0.999999, 1.0, 3.3, 1e30, float("inf"), float("nan")):
            t = torch.tensor(total, dtype=dtype)
            for max_norm in (0.0, 1.0, 2.5):
                assert_bitwise_equal(clip_coefficient(max_norm, t), reference_coef(max_norm, t))


def _random_max_norms_and_totals(norm_dtype, max_norm_dtype, n=300):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        total = torch.rand((), generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-3, 5, (), generator=g)
        max_norm = torch.rand((), generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-2, 4, (), generator=g)
        yield max_norm.to(max_norm_dtype), total.to(norm_dtype)


@pytest.mark.parametrize("max_norm_dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_coefficient_of_a_tensor_max_norm_is_torchs(norm_dtype, max_norm_dtype):
    """A device-resident ``max_norm`` stays a tensor (no sync); torch reads it as
    ``float(max_norm)``, which a 16-bit norm's multiply applies in float32."""
    for max_norm, total in _random_max_norms_and_totals(norm_dtype, max_norm_dtype):
        assert_bitwise_equal(clip_coefficient(max_norm, total), reference_coef(float(max_norm), total))


def test_negative_control_a_max_norm_rounded_to_16_bits_first_differs():
    """The test above is not vacuous: rounding ``max_norm`` to the norm's 16-bit dtype before
    the multiply (one rounding too many) changes some coefficients."""
    differs = 0
    for dtype in (torch.float16, torch.bfloat16):
        for max_norm, total in _random_max_norms_and_totals(dtype, torch.float64):
            rounded_first = torch.clamp((total + 1e-6).reciprocal() * max_norm.to(dtype), max=1.0)
            differs += not torch.equal(rounded_first, reference_coef(float(max_norm), total))
    assert differs > 20


@pytest.mark.parametrize("norm_type", [2.0, 1.0, "inf", 3.0, 0.5])
def test_clip_grad_norm_scales_like_torch_for_the_same_norm(norm_type):
    grads = grad_set(4.0)
    ours, theirs = params_of(grads), params_of(grads)
    norm = fastclip.clip_grad_norm_(ours, 0.25, norm_type)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.25, norm)
    assert_grads_bitwise(ours, [p.grad for p in theirs])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("coef_value", [0.1, 0.7, 1 / 3, 0.999, 1e-6])
def test_16bit_scaling_is_torch_mul_on_every_bit_pattern(dtype, coef_value):
    # All 65536 patterns, NaN and inf included; the scalar and vector paths of torch's mul_.
    g = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    total = torch.tensor(1.0)
    coef = reference_coef(coef_value, total)
    assert coef.dtype == torch.float32 and 0 < coef.item() < 1
    p = param_with_grad(g.clone())
    fastclip.clip_grads_with_norm_([p], coef_value, total)
    expected = g.clone().mul_(coef)
    # torch's bf16 mul_ writes NaN as 0xFFFF in its vector path and 0x7FC0 in its scalar tail:
    # NaN payloads of bf16 are not compared, every other pattern is.
    assert_bitwise_equal(p.grad, expected, nan_bits=dtype != torch.bfloat16)


def test_scaled_values_are_grad_mul_coef():
    grads = grad_set(10.0)
    params = params_of(grads)
    norm = fastclip.clip_grad_norm_(params, 1.0)
    coef = clip_coefficient(1.0, norm)
    assert coef.item() < 1
    for p, g in zip(params, grads):
        assert_bitwise_equal(p.grad, g.clone().mul_(coef))


def test_max_norm_as_tensor_and_zero():
    grads = grad_set(3.0)
    a, b = params_of(grads), params_of(grads)
    assert_bitwise_equal(fastclip.clip_grad_norm_(a, torch.tensor(0.5)), fastclip.clip_grad_norm_(b, 0.5))
    assert_grads_bitwise(a, [p.grad for p in b])
    ours, theirs = params_of(grads), params_of(grads)
    norm = fastclip.clip_grad_norm_(ours, 0.0)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.0, norm)
    assert_grads_bitwise(ours, [p.grad for p in theirs])  # zeros, with torch's signs
    assert all(bool((p.grad == 0).all()) for p in ours)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_grads_without_check_behave_like_torch(bad):
    grads = grad_set()
    grads[1][3, 4] = bad
    ours, theirs = params_of(grads), params_of(grads)
    norm = fastclip.clip_grad_norm_(ours, 1.0)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert (math.isnan(norm.item()) and math.isnan(torch_norm.item())) or norm.item() == torch_norm.item()
    assert_grads_bitwise(ours, [p.grad for p in theirs], nan_bits=False)


# --- no write pass when nothing is clipped --------------------------------------------------------

SNAN_BITS = {torch.float32: 0x7F800001, torch.float64: 0x7FF0000000000001,
             torch.float16: 0x7C01, torch.bfloat16: 0x7F81}


def with_signaling_nans(dtype, n=CHUNK + 100):
    """A grad holding signaling NaNs: any multiply, even by 1.0, quiets them and changes bits."""
    g = random_grad((n,), dtype)
    g.view(INT_VIEW[dtype])[::97] = SNAN_BITS[dtype]
    return g


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_signaling_nan_guard_detects_any_write(dtype):
    # Negative control for the guard: a multiply by exactly 1.0 changes the bits...
    g = with_signaling_nans(dtype)
    assert not torch.equal(bits(g.clone().mul_(1.0)), bits(g))
    # ...and so does fastclip's write pass when it runs.
    p = param_with_grad(g.clone())
    fastclip.clip_grads_with_norm_([p], 1.0, torch.tensor(2.0))
    assert not torch.equal(bits(p.grad), bits(g))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("total", [0.5, 1.0 - 1e-6, 0.0])
def test_no_write_when_coefficient_is_one(dtype, total):
    g = with_signaling_nans(dtype)
    sliced = with_signaling_nans(dtype, 3000)[::3]  # strided: written through torch
    params = [param_with_grad(g.clone()), param_with_grad(sliced.clone())]
    versions = [p.grad._version for p in params]
    fastclip.clip_grads_with_norm_(params, 1.0, torch.tensor(total))
    assert_bitwise_equal(params[0].grad, g)
    assert_bitwise_equal(params[1].grad, sliced)
    assert [p.grad._version for p in params] == versions  # no torch in-place op either


@pytest.fixture
def scale_calls(monkeypatch):
    """Counts calls of every scale kernel of the CPU backend (whatever their names)."""
    calls = []
    for name in dir(K):
        obj = getattr(K, name)
        if name.startswith("scale") and isinstance(obj, numba.core.dispatcher.Dispatcher):
            def counting(*args, _kernel=obj, _name=name):
                calls.append(_name)
                return _kernel(*args)
            monkeypatch.setattr(K, name, counting)
    assert calls == [] and any(n.startswith("scale") for n in dir(K))
    return calls


@pytest.mark.parametrize("big", [False, True])
def test_scale_kernel_not_called_when_not_clipping(scale_calls, big):
    n = _cpu.PARALLEL_MIN_ELEMENTS + 1 if big else 1000  # serial and threaded paths
    g = random_grad((n,), torch.float32)
    p = param_with_grad(g.clone())
    norm = fastclip.clip_grad_norm_([p], 1e6)
    assert scale_calls == []
    fastclip.clip_grad_norm_([p], math.inf)
    fastclip.clip_grad_norm_([p], norm.item() + 1e-6)  # coefficient clamps to exactly 1
    assert scale_calls == []
    assert_bitwise_equal(p.grad, g)
    # Control: the counter sees the kernel when it does run (on the thread pool for the big one).
    torch.set_num_threads(2)
    fastclip.clip_grad_norm_([p], 1e-3)
    assert scale_calls == ["scale_parallel" if big else "scale_serial"]


# --- non-contiguous grads: the caller's tensor is written, never a copy ---------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_transposed_grad_scaled_in_place(dtype):
    base = random_grad((CHUNK // 100 + 3, 101), dtype, 10.0)
    g = base.t()  # dense, non-contiguous
    p = param_with_grad(g)
    original = g.clone()
    norm = fastclip.clip_grad_norm_([p], 1.0)
    assert_norm_close(norm, [original], 2.0)
    assert p.grad is g and p.grad.data_ptr() == base.data_ptr()
    expected = original.clone()
    reference_clip_([expected], 1.0, norm)
    assert_bitwise_equal(p.grad, expected)
    assert_bitwise_equal(base, expected.t())


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sliced_grad_scaled_in_place_and_gaps_untouched(dtype):
    base = random_grad((257, 300), dtype, 10.0)  # above the chunk size
    g = base[:, 1::3]  # gaps: strided
    p = param_with_grad(g)
    base_before = base.clone()
    other = param_with_grad(random_grad((999,), torch.float32, 10.0))
    other_before = other.grad.clone()
    norm = fastclip.clip_grad_norm_([other, p], 1.0)
    assert_norm_close(norm, [other_before, base_before[:, 1::3]], 2.0)
    assert p.grad is g
    expected = base_before.clone()
    reference_clip_([expected[:, 1::3], other_before], 1.0, norm)
    assert_bitwise_equal(base, expected)  # the selected columns scaled, the gaps unchanged
    assert_bitwise_equal(other.grad, other_before)


def test_channels_last_grad():
    g = random_grad((4, 3, 9, 11), torch.float32, 10.0).contiguous(memory_format=torch.channels_last)
    p = param_with_grad(g)
    original = g.clone()
    norm = fastclip.clip_grad_norm_([p], 1.0)
    assert p.grad is g and p.grad.is_contiguous(memory_format=torch.channels_last)
    expected = original.clone()
    reference_clip_([expected], 1.0, norm)
    assert_bitwise_equal(p.grad, expected)


def test_same_grad_listed_twice_is_scaled_twice_like_torch():
    # torch multiplies it twice, in order. Above the threaded-kernel size, two threads writing
    # the same memory would race (seen: a few elements scaled once, about 1 run in 20).
    g = random_grad((1 << 21,), torch.float32)
    for _ in range(4):
        ours, theirs = param_with_grad(g.clone()), param_with_grad(g.clone())
        norm = fastclip.clip_grad_norm_([ours, ours], 1.0)
        torch.nn.utils.clip_grads_with_norm_([theirs, theirs], 1.0, norm)
        assert_bitwise_equal(ours.grad, theirs.grad)
    assert_norm_close(norm, [g, g], 2.0)


def test_same_grad_listed_twice_is_not_written_by_two_threads(scale_calls):
    # The race above is rare on a busy machine: check that its cause is gone. The aliased list
    # runs the write pass on one thread, in order; the same sizes unaliased use the thread pool.
    torch.set_num_threads(2)
    p = param_with_grad(random_grad((1 << 20,), torch.float32))
    fastclip.clip_grad_norm_([p, p], 1.0)
    assert len(scale_calls) == 1 and "parallel" not in scale_calls[0]
    q = param_with_grad(random_grad((1 << 20,), torch.float32))
    fastclip.clip_grad_norm_([p, q], 1e-3)
    assert len(scale_calls) == 2 and "parallel" in scale_calls[1]


def test_expanded_grad_norm_and_refused_write():
    g = torch.randn(300, 1).expand(300, 4)  # stride 0: four elements per address
    assert_norm_close(fastclip.get_total_norm([g]), [g.contiguous()], 2.0)
    other = param_with_grad(random_grad((1000,), torch.float32, 10.0))
    before = other.grad.clone()
    expanded = param_with_grad(g)
    # torch cannot write it in place either; fastclip refuses before writing any grad.
    with pytest.raises(RuntimeError, match="memory location"):
        fastclip.clip_grad_norm_([other, expanded], 1.0)
    assert_bitwise_equal(other.grad, before)
    with pytest.raises(RuntimeError, match="memory location"):
        fastclip.clip_grad_value_([other, expanded], 0.1)
    assert_bitwise_equal(other.grad, before)


@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_"])
def test_an_expanded_dim_of_two_is_refused_before_any_write(call):
    """Two elements at one address are already an expanded view: refused before the kernels write
    the other grads (torch's own in-place op would refuse it only after them)."""
    other = param_with_grad(random_grad((1000,), torch.float32, 10.0))
    before = other.grad.clone()
    expanded = param_with_grad(torch.randn(300, 1).expand(300, 2))
    args = {"clip_grad_norm_": (1e-3,), "clip_grads_with_norm_": (1e-3, torch.tensor(100.0)),
            "clip_grad_value_": (1e-3,)}[call]
    with pytest.raises(RuntimeError, match=rf"^{call}: grad 1 of `parameters` .* expanded view"):
        getattr(fastclip, call)([other, expanded], *args)
    assert_bitwise_equal(other.grad, before)


def _inference_grad(kind: str) -> torch.Tensor:
    """An inference tensor (made under ``torch.inference_mode()``) that torch must write: a
    sliced view (the kernels read a copy), or a 0-d grad under a float64 coefficient."""
    with torch.inference_mode():
        if kind == "sliced":
            return torch.full((8,), 40.0)[::2]
        return torch.tensor(40.0)


INFERENCE_CALLS = {"clip_grad_norm_": (1e-3,), "clip_grads_with_norm_": (1e-3, torch.tensor(100.0, dtype=torch.float64)),
                   "clip_grad_value_": (1e-3,)}


@pytest.mark.parametrize("call, kind", [(call, "sliced") for call in INFERENCE_CALLS] +
                         [("clip_grad_norm_", "0-d"), ("clip_grads_with_norm_", "0-d")])
def test_an_inference_grad_torch_must_write_is_refused_before_any_write(call, kind):
    """torch refuses in-place updates of inference tensors outside inference mode; the grads it
    writes after the kernels (sliced views; 0-d grads under a float64 coefficient, which
    clip_grad_value_ leaves to its kernel) are checked first, so the kernels write nothing."""
    other = param_with_grad(random_grad((1000,), torch.float64 if kind == "0-d" else torch.float32, 10.0))
    before = other.grad.clone()
    params = [other, param_with_grad(_inference_grad(kind))]
    with pytest.raises(RuntimeError, match=rf"^{call}: grad 1 of `parameters` .* inference tensor"):
        getattr(fastclip, call)(params, *INFERENCE_CALLS[call])
    assert_bitwise_equal(other.grad, before)
    with torch.inference_mode():  # where torch may write them, so may fastclip
        getattr(fastclip, call)(params, *INFERENCE_CALLS[call])
    assert not torch.equal(other.grad, before)


def test_negative_control_torch_refuses_an_inference_grad():
    """The refusal above is torch's: its own clip of a sliced inference grad raises."""
    with pytest.raises(RuntimeError, match="inference tensor"):
        torch.nn.utils.clip_grad_value_([param_with_grad(_inference_grad("sliced"))], 1e-3)


def test_a_size_one_dim_with_stride_zero_is_not_an_expanded_view():
    """A stride of 0 on a dimension of size 1 shares no memory: such a (sliced) grad is clipped
    in place like torch clips it."""
    base, dense = torch.randn(10, 3), random_grad((50,), torch.float32, 10.0)

    def params():
        view = torch.as_strided(base.clone(), (10, 1, 2), (3, 0, 1))  # gaps, and a stride-0 dim of 1
        return [param_with_grad(dense.clone()), param_with_grad(view)]
    ours, theirs = params(), params()
    norm = fastclip.clip_grad_norm_(ours, 1e-3)
    torch.nn.utils.clip_grads_with_norm_(theirs, 1e-3, norm)
    for a, b in zip(ours, theirs):
        assert_bitwise_equal(a.grad, b.grad)
    fastclip.clip_grad_value_(ours, 1e-5)
    torch.nn.utils.clip_grad_value_(theirs, 1e-5)
    for a, b in zip(ours, theirs):
        assert_bitwise_equal(a.grad, b.grad)


@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grads_with_norm_"])
def test_expanded_grad_is_refused_when_nothing_needs_clipping(call):
    """torch's multiply runs whatever the coefficient and refuses an expanded grad; so does
    fastclip, although it writes nothing when the coefficient is 1."""
    params = [param_with_grad(random_grad((100,), torch.float32)),
              param_with_grad(torch.randn(1).expand(30))]
    torch_call = getattr(torch.nn.utils, call)
    ours = getattr(fastclip, call)
    args = (1e9,) if call == "clip_grad_norm_" else (1e9, torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="memory location"):
        torch_call(params, *args)
    with pytest.raises(RuntimeError, match=rf"^{call}: grad 1 of `parameters` .* expanded view"):
        ours(params, *args)
    # The index counts the parameters that have a grad, in the caller's order across devices.
    without = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"grad 1 of `parameters`"):
        ours([without] + params, *args)
    mixed = [param_with_grad(random_grad((5,), torch.float64)), without, params[1]]  # per-device path
    with pytest.raises(RuntimeError, match=r"grad 1 of `parameters`"):
        ours(mixed, *args)


# --- clip_grad_value_ -----------------------------------------------------------------------------

SPECIALS = [-1.0, -0.0, 0.0, 1.0, float("nan"), -float("nan"), float("inf"), -float("inf"),
            1 + 2 ** -10, 1 + 2 ** -7, 0.1, -0.1, 65504.0, 1e-40, 6e-8, -3e38]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("clip_value", [0.0, -0.0, 0.1, 1.0, 1 + 2 ** -11 + 2 ** -40, 1e-30, 2.5, 60000.0])
@pytest.mark.parametrize("layout", ["small", "chunks", "sliced"])
def test_clip_grad_value_bitwise_like_torch(dtype, clip_value, layout):
    if layout == "small":
        g = torch.tensor(SPECIALS, dtype=dtype)
    else:
        g = random_grad((2 * CHUNK + 33,), dtype, 3.0)
        g[:len(SPECIALS)] = torch.tensor(SPECIALS, dtype=dtype)
        if layout == "sliced":
            g = g[1::2]
    ours, theirs = param_with_grad(g.clone()), param_with_grad(g.clone())
    fastclip.clip_grad_value_([ours], clip_value)
    torch.nn.utils.clip_grad_value_([theirs], clip_value, foreach=False)
    # NaN stays NaN. Its bits too, except bf16: torch's vectorized bf16 clamp writes NaN as 0xFFFF
    # where its scalar path (and fastclip, which never stores an unchanged element) keep them.
    assert_bitwise_equal(ours.grad, theirs.grad, nan_bits=dtype != torch.bfloat16 or layout == "small")
    assert bool(ours.grad.isnan().sum() == g.isnan().sum())


def test_clip_grad_value_mixed_dtypes_and_in_place():
    grads = grad_set(5.0)
    grads[4] = random_grad((40, 30), torch.float32, 5.0)[:, ::2]
    ours, theirs = params_of(grads), params_of(grads)
    ids = [p.grad for p in ours]
    fastclip.clip_grad_value_(ours, 1.5)
    torch.nn.utils.clip_grad_value_(theirs, 1.5)
    assert all(p.grad is i for p, i in zip(ours, ids))
    assert_grads_bitwise(ours, [p.grad for p in theirs])


def test_clip_grad_value_leaves_small_grads_unwritten():
    g = with_signaling_nans(torch.float32)  # NaN is never clamped, so the set is all in range
    g[~g.isnan()] = g[~g.isnan()].clamp(-1, 1)
    p = param_with_grad(g.clone())
    fastclip.clip_grad_value_([p], 1.0)
    assert_bitwise_equal(p.grad, g)


# --- invariants ------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [2.0, 1.0, "inf", 3.0, 0.5])
def test_after_clipping_norm_is_max_norm(norm_type):
    p_val = math.inf if norm_type == "inf" else norm_type
    grads = [random_grad((5000,), torch.float64, 3.0), random_grad((CHUNK + 1,), torch.float64)]
    params = params_of(grads)
    norm = fastclip.clip_grad_norm_(params, 2.0, norm_type)
    assert norm.item() > 2.0
    after = exact_norm([p.grad for p in params], p_val)
    # float64 grads: each element rounds once (1 ulp), so the norm lands within ~1e-15 of
    # max_norm * norm / (norm + 1e-6).
    assert after == pytest.approx(2.0 * norm.item() / (norm.item() + 1e-6), rel=1e-13)
    assert_norm_close(fastclip.get_total_norm([p.grad for p in params], norm_type),
                      [p.grad for p in params], p_val)


def test_every_element_scaled_by_the_same_factor():
    grads = [random_grad((3000,), torch.float64, 7.0), random_grad((CHUNK + 9,), torch.float64)]
    params = params_of(grads)
    norm = fastclip.clip_grad_norm_(params, 1.0)
    coef = 1.0 / (norm.item() + 1e-6)
    ratios = torch.cat([(p.grad / g).reshape(-1) for p, g in zip(params, grads)])
    ratios = ratios[~ratios.isnan()]
    # One correctly rounded multiply per element: each ratio is coef within 1 ulp of the result.
    assert float((ratios - coef).abs().max()) <= 2 * 2.0 ** -52 * coef


@pytest.mark.parametrize("norm_type", [2.0, 1.0, "inf", 0.5])
def test_small_grads_unchanged(norm_type):
    grads = grad_set(1e-3)
    params = params_of(grads)
    max_norm = 2 * fastclip.get_total_norm(grads, norm_type).item() + 1e-3  # coef = 1 despite the 1e-6
    norm = fastclip.clip_grad_norm_(params, max_norm, norm_type)
    assert norm.item() < max_norm
    assert_grads_bitwise(params, grads)


def test_host_coefficient_is_torchs():
    # The CPU fast path computes the coefficient in numpy scalars; it must equal torch's ops bit
    # for bit, NaN and inf included, for both norm dtypes.
    from fastclip.clip_grad import host_clip_coefficient

    totals = [0.0, 1e-7, 1e-6, 0.999999, 1.0, 1.0000001, 3.3, 12345.678, 1e30, 3.4e38, 1e300,
              float("inf"), float("nan")]
    totals += [float(x) for x in torch.rand(200, dtype=torch.float64) * 10]
    max_norms = [0.0, 1e-8, 0.25, 1.0, 2.5, 7.77, 1e6, float("inf")]
    for dtype in (torch.float32, torch.float64):
        for total in totals:
            t = torch.tensor(total, dtype=dtype)
            for max_norm in max_norms:
                expected = clip_coefficient(max_norm, t)
                got = torch.tensor(host_clip_coefficient(max_norm, t.item(), dtype), dtype=dtype)
                assert_bitwise_equal(got, expected)


def test_host_coefficient_negative_control():
    # A plain true division (not torch's reciprocal-then-multiply) differs somewhere: the test
    # above can fail.
    differs = 0
    for x in torch.rand(2000, dtype=torch.float64) * 10:
        t = torch.tensor(float(x), dtype=torch.float32)
        true_div = torch.tensor(0.3, dtype=torch.float32) / (t + 1e-6)
        differs += not torch.equal(true_div, clip_coefficient(0.3, t))
    assert differs > 0


# --- grad mode ------------------------------------------------------------------------------------


def _entry_point_calls():
    """One call of each public entry point on fresh grads, by name."""
    def params():
        ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    def scaler_call(fn):
        ps = params()
        opt = torch.optim.SGD(ps, lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        scaler.scale(torch.ones(()))  # gives the scaler its scale, as a backward would
        return fn(scaler, opt, 1.0)

    return {
        "clip_grad_norm_": lambda: fastclip.clip_grad_norm_(params(), 1.0),
        "get_total_norm": lambda: fastclip.get_total_norm([p.grad for p in params()]),
        "clip_grads_with_norm_": lambda: fastclip.clip_grads_with_norm_(params(), 1.0, torch.tensor(5.0)),
        "clip_grad_value_": lambda: fastclip.clip_grad_value_(params(), 0.5),
        "unscale_and_clip_": lambda: scaler_call(fastclip.unscale_and_clip_),
        "clip_and_step": lambda: fastclip.clip_and_step(torch.optim.SGD(params(), lr=0.1), 1.0),
        "GradClipper.step": lambda: fastclip.GradClipper(params(), max_norm=1.0).step(),
    }


@pytest.mark.parametrize("name", list(_entry_point_calls()))
def test_entry_points_run_with_grad_mode_off_and_restore_it(name, monkeypatch):
    # torch's functions run under torch.no_grad(); fastclip's entry points switch the mode
    # themselves (cheaper), and must leave the caller's mode as it was.
    from fastclip import _plan

    seen = []
    build = _plan.Plan.build.__func__

    def recording_build(cls, *args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(_plan.Plan, "build", classmethod(recording_build))
    call = _entry_point_calls()[name]
    assert torch.is_grad_enabled()
    call()
    assert seen and not any(seen)
    assert torch.is_grad_enabled()
    with torch.no_grad():
        call()
        assert not torch.is_grad_enabled()
    assert len(seen) == 2 and not any(seen)


def test_grad_mode_is_the_callers_after_user_code_switches_it():
    class GradOnSGD(torch.optim.SGD):
        def step(self, closure=None):
            torch.set_grad_enabled(True)  # and left on
            return super().step(closure)

    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    with torch.no_grad():
        fastclip.clip_and_step(GradOnSGD([p], lr=0.1), 1.0)
        assert not torch.is_grad_enabled()


def test_adaptive_grad_clip_runs_with_grad_mode_off():
    seen = []
    w = torch.nn.Parameter(torch.randn(4, 3))
    w.grad = torch.randn(4, 3)

    def parameters():
        seen.append(torch.is_grad_enabled())
        yield w

    fastclip.adaptive_grad_clip_(parameters(), 0.01)
    assert seen == [False] and torch.is_grad_enabled()


def test_grad_mode_restored_when_a_call_raises():
    w = torch.nn.Parameter(torch.randn(3))
    w.grad = torch.randn(3)
    with pytest.raises(ValueError, match="max_norm"):
        fastclip.clip_grad_norm_([w], -1.0)
    assert torch.is_grad_enabled()
    w.grad = torch.tensor([float("nan"), 1.0, 2.0])
    with pytest.raises(RuntimeError):
        fastclip.clip_grad_norm_([w], 1.0, error_if_nonfinite=True)
    assert torch.is_grad_enabled()
