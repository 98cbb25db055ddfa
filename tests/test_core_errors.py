"""Bad input: a clear exception naming the argument, and no gradient changed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastclip
from reference import assert_bitwise_equal, assert_norm_close, param_with_grad, random_grad


def grad_params():
    """Params whose grads need clipping (so a call that got through would change them)."""
    grads = [random_grad((70_000,), torch.float32, 10.0), random_grad((33,), torch.float16, 10.0),
             random_grad((5, 7), torch.bfloat16, 10.0), random_grad((9,), torch.float64, 10.0)]
    return [param_with_grad(g.clone()) for g in grads], grads


def assert_unchanged(params, grads):
    for p, g in zip(params, grads):
        assert_bitwise_equal(p.grad, g)


# --- max_norm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("max_norm,error", [
    (-1.0, ValueError), (-1e-30, ValueError), (float("nan"), ValueError), (-math.inf, ValueError),
    (torch.tensor(-2.0), ValueError), (torch.tensor(float("nan")), ValueError),
    ("1.0", TypeError), (None, TypeError), (True, TypeError), ([1.0], TypeError),
    (torch.tensor([1.0, 2.0]), TypeError), (1 + 2j, TypeError),
], ids=repr)
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads_with_norm_"])
def test_bad_max_norm(fn, max_norm, error):
    params, grads = grad_params()
    with pytest.raises(error, match=rf"{fn}.*`max_norm`"):
        if fn == "clip_grad_norm_":
            fastclip.clip_grad_norm_(params, max_norm)
        else:
            fastclip.clip_grads_with_norm_(params, max_norm, torch.tensor(100.0))
    assert_unchanged(params, grads)


@pytest.mark.parametrize("call, arg", [
    (lambda ps, v: fastclip.clip_grad_norm_(ps, v), "max_norm"),
    (lambda ps, v: fastclip.clip_grad_norm_(ps, 1.0, v), "norm_type"),
    (lambda ps, v: fastclip.clip_grads_with_norm_(ps, v, torch.tensor(1.0)), "max_norm"),
    (lambda ps, v: fastclip.clip_grad_value_(ps, v), "clip_value"),
    (lambda ps, v: fastclip.GradClipper(ps, max_norm=v), "max_norm"),
    (lambda ps, v: fastclip.ZClip(z_thresh=v), "z_thresh"),
])
def test_an_integer_beyond_float64_is_named(call, arg):
    """torch's float() of such an int raises "int too large to convert to float"; fastclip's
    error names the argument, before any write."""
    params, grads = grad_params()
    with pytest.raises(OverflowError, match=rf"`{arg}` is too large for a float64"):
        call(params, 10 ** 400)
    assert_unchanged(params, grads)


@pytest.mark.parametrize("max_norm", [0, 1, 2.5, np.float32(0.5), np.float64(1.0), math.inf,
                                      torch.tensor(1.0), torch.tensor(3, dtype=torch.int64)], ids=repr)
def test_good_max_norm(max_norm):
    params, _ = grad_params()
    fastclip.clip_grad_norm_(params, max_norm)


# --- norm_type --------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [0, 0.0, -1.0, -math.inf, float("nan"), "nan", "-inf", "two",
                                       "", "0", "fro", "nuc"], ids=repr)
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "get_total_norm"])
def test_bad_norm_type(fn, norm_type):
    params, grads = grad_params()
    with pytest.raises(ValueError, match=rf"{fn}.*`norm_type`"):
        if fn == "clip_grad_norm_":
            fastclip.clip_grad_norm_(params, 1.0, norm_type)
        else:
            fastclip.get_total_norm(grads, norm_type)
    assert_unchanged(params, grads)


@pytest.mark.parametrize("norm_type", [None, True, [2.0], object()], ids=repr)
def test_norm_type_of_wrong_type(norm_type):
    params, grads = grad_params()
    with pytest.raises((TypeError, ValueError), match="`norm_type`"):
        fastclip.clip_grad_norm_(params, 1.0, norm_type)
    assert_unchanged(params, grads)


@pytest.mark.parametrize("norm_type", ["inf", "INF", " Inf ", math.inf, float("inf"), np.float64(2.0),
                                       2, 1, "2", 0.25, 7.5], ids=repr)
def test_good_norm_type(norm_type):
    _, grads = grad_params()
    norm = fastclip.get_total_norm(grads, norm_type)
    assert math.isfinite(norm.item()) and norm.item() > 0


# --- clip_value -------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_value,error", [
    (-1.0, ValueError), (-1e-30, ValueError), (float("nan"), ValueError),
    ("1", TypeError), (None, TypeError), (True, TypeError),
], ids=repr)
def test_bad_clip_value(clip_value, error):
    params, grads = grad_params()
    with pytest.raises(error, match=r"clip_grad_value_.*`clip_value`"):
        fastclip.clip_grad_value_(params, clip_value)
    assert_unchanged(params, grads)


# --- flags and total_norm ----------------------------------------------------------------------


@pytest.mark.parametrize("call,arg", [
    (lambda ps, gs: fastclip.clip_grad_norm_(ps, 1.0, error_if_nonfinite="yes"), "error_if_nonfinite"),
    (lambda ps, gs: fastclip.clip_grad_norm_(ps, 1.0, foreach=2), "foreach"),
    (lambda ps, gs: fastclip.get_total_norm(gs, error_if_nonfinite=None), "error_if_nonfinite"),
    (lambda ps, gs: fastclip.clip_grad_value_(ps, 1.0, foreach="no"), "foreach"),
    (lambda ps, gs: fastclip.clip_grads_with_norm_(ps, 1.0, 5.0), "total_norm"),
    (lambda ps, gs: fastclip.clip_grads_with_norm_(ps, 1.0, torch.tensor([5.0, 1.0])), "total_norm"),
    (lambda ps, gs: fastclip.clip_grads_with_norm_(ps, 1.0, torch.tensor(5)), "total_norm"),
])
def test_bad_flags_and_total_norm(call, arg):
    params, grads = grad_params()
    with pytest.raises(TypeError, match=f"`{arg}`"):
        call(params, grads)
    assert_unchanged(params, grads)


@pytest.mark.parametrize("kwargs", [
    {"norm_type": torch.tensor(3.0)}, {"norm_type": np.array(3.0)}, {"norm_type": np.int64(1)},
    {"norm_type": torch.tensor(1)}, {"max_norm": np.array(0.5)}, {"max_norm": np.float32(0.5)},
    {"error_if_nonfinite": 1}, {"error_if_nonfinite": np.bool_(False)}, {"foreach": 0},
], ids=repr)
def test_numbers_and_flags_torch_reads_with_float_or_truth(kwargs):
    """torch reads `norm_type` and `max_norm` with float() and the flags by their truth; fastclip
    takes the same one-element arrays and tensors, and 0/1 for the flags."""
    args = {"max_norm": 0.5, **kwargs}
    grads = [random_grad((300,), torch.float32, 10.0), random_grad((5, 7), torch.float64, 10.0)]
    ours = [param_with_grad(g.clone()) for g in grads]
    theirs = [param_with_grad(g.clone()) for g in grads]
    norm = fastclip.clip_grad_norm_(ours, **args)
    expected = torch.nn.utils.clip_grad_norm_(theirs, **args)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


# --- elements that are not tensors, or not dense float tensors ---------------------------------


@pytest.mark.parametrize("bad", [3.0, None, "w", np.ones(3, dtype=np.float32), [torch.ones(2)]], ids=repr)
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_"])
def test_non_tensor_parameter(fn, bad):
    params, grads = grad_params()
    with pytest.raises(TypeError, match=rf"{fn}.*`parameters`"):
        args = {"clip_grad_norm_": (1.0,), "clip_grads_with_norm_": (1.0, torch.tensor(99.0)),
                "clip_grad_value_": (0.1,)}[fn]
        getattr(fastclip, fn)(params[:2] + [bad] + params[2:], *args)
    assert_unchanged(params, grads)


@pytest.mark.parametrize("bad", [3.0, "w", np.ones(3, dtype=np.float32), torch.ones(3, dtype=torch.int64)],
                         ids=repr)
def test_non_tensor_or_integer_in_get_total_norm(bad):
    _, grads = grad_params()
    with pytest.raises(TypeError, match=r"get_total_norm.*`tensors`"):
        fastclip.get_total_norm(grads + [bad])


@pytest.mark.parametrize("parameters", [3.0, "abc", None, b"x"], ids=repr)
def test_parameters_not_iterable(parameters):
    with pytest.raises(TypeError, match="`parameters`"):
        fastclip.clip_grad_norm_(parameters, 1.0)


@pytest.mark.parametrize("fn,layout", [
    ("clip_grad_norm_", "coo"), ("get_total_norm", "coo"), ("clip_grads_with_norm_", "coo"),
    ("clip_grad_value_", "coo"), ("get_total_norm", "csr"),  # torch refuses a CSR .grad
])
def test_sparse_grads(fn, layout):
    params, grads = grad_params()
    dense = torch.tensor([[0.0, 30.0], [40.0, 0.0]])
    sparse = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    sp = torch.zeros(2, 2, requires_grad=True)
    if layout == "coo":
        sp.grad = sparse
    try:
        if fn == "get_total_norm":
            result = fastclip.get_total_norm(grads + [sparse])
        elif fn == "clip_grad_norm_":
            result = fastclip.clip_grad_norm_(params + [sp], 1e9)
        elif fn == "clip_grads_with_norm_":
            result = fastclip.clip_grads_with_norm_(params + [sp], 1.0, torch.tensor(1e9))
        else:
            result = fastclip.clip_grad_value_(params + [sp], 1e9)
    except Exception as exc:  # either a correct result or an error that says "sparse"
        assert "sparse" in str(exc).lower(), f"{type(exc).__name__}: {exc}"
        assert isinstance(exc, (ValueError, TypeError, RuntimeError, NotImplementedError))
        assert_unchanged(params, grads)
        return
    if fn in ("get_total_norm", "clip_grad_norm_"):
        assert_norm_close(result, grads + [dense], 2.0)
    assert_unchanged(params, grads)


# --- devices without a kernel: fall back to torch, never crash ---------------------------------


def test_meta_tensors_fall_back_to_torch():
    p = torch.zeros(5, 3, device="meta", requires_grad=True)
    p.grad = torch.ones(5, 3, device="meta")
    norm = fastclip.clip_grad_norm_([p], 1.0)
    assert norm.device.type == "meta" and norm.shape == ()
    assert fastclip.get_total_norm([p.grad], "inf").device.type == "meta"
    fastclip.clip_grads_with_norm_([p], 1.0, torch.tensor(2.0, device="meta"))
    fastclip.clip_grad_value_([p], 0.5)
    assert p.grad.device.type == "meta"


def test_meta_mixed_with_cpu_raises_cleanly():
    params, grads = grad_params()
    m = torch.zeros(4, device="meta", requires_grad=True)
    m.grad = torch.ones(4, device="meta")
    try:
        fastclip.clip_grad_norm_(params + [m], 1.0)
    except Exception:  # a Python exception is acceptable: the process must not crash...
        assert_unchanged(params, grads)  # ...and nothing may have been written


def test_complex_grads_fall_back_to_torch():
    tensors = [torch.randn(10, dtype=torch.complex64), torch.randn(3)]
    expected = torch.nn.utils.get_total_norm(tensors)
    assert_bitwise_equal(fastclip.get_total_norm(tensors), expected)
    ours = [param_with_grad(t.clone()) for t in tensors]
    theirs = [param_with_grad(t.clone()) for t in tensors]
    assert_bitwise_equal(fastclip.clip_grad_norm_(ours, 0.5), torch.nn.utils.clip_grad_norm_(theirs, 0.5))
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)


# --- error_if_nonfinite ------------------------------------------------------------------------


NONFINITE_CASES = [(bad, where, p) for bad in (float("nan"), float("inf"), -float("inf"))
                   for where in (0, 1, 2, 3) for p in (2.0, 1.0, "inf", 3.0)]
NONFINITE_CASES += [(bad, "big-strided", 2.0) for bad in (float("nan"), float("inf"))]


@pytest.mark.parametrize("bad,where,norm_type", NONFINITE_CASES, ids=str)
def test_error_if_nonfinite_raises_before_any_write(bad, where, norm_type):
    params, grads = grad_params()
    if where == "big-strided":
        base = random_grad((2400, 900), torch.float32, 10.0)  # strided view above the threaded size
        base[2399, 897] = bad
        params.append(param_with_grad(base[:, ::3]))
        grads.append(base[:, ::3].clone())
    else:
        params[where].grad.view(-1)[-1] = bad
        grads[where] = params[where].grad.clone()
    with pytest.raises(RuntimeError, match="non-finite"):
        fastclip.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True)
    assert_unchanged(params, grads)
    with pytest.raises(RuntimeError, match="non-finite"):
        fastclip.get_total_norm([p.grad for p in params], norm_type, error_if_nonfinite=True)
    assert_unchanged(params, grads)


def test_error_if_nonfinite_passes_for_finite_fp16_above_65504():
    # torch's fp16 norm overflows here and it raises; fastclip's norm is finite and correct.
    g = torch.full((100,), 60000.0, dtype=torch.float16)
    p = param_with_grad(g.clone())
    norm = fastclip.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert math.isfinite(norm.item())
    assert bool((p.grad != 0).all())


def test_error_message_names_function_and_value():
    params, _ = grad_params()
    with pytest.raises(ValueError) as info:
        fastclip.clip_grad_norm_(params, -3.5)
    text = str(info.value)
    assert "clip_grad_norm_" in text and "`max_norm`" in text and "-3.5" in text


def _complex_set(bad: str):
    """A set that goes, whole, to torch's implementation (it holds a complex grad), with a grad
    torch cannot write (``bad``) listed after a real grad that it would have written first."""
    real = torch.zeros(4, requires_grad=True)
    real.grad = torch.tensor([-3.0, -0.5, 0.5, 3.0]) * 10
    cplx = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    cplx.grad = torch.tensor([1 + 1j, 2 - 2j], dtype=torch.complex64) * 10
    other = torch.zeros(3, requires_grad=True)
    if bad == "inference":
        with torch.inference_mode():
            other.grad = torch.full((3,), 10.0)
    elif bad == "expanded":
        other.grad = torch.tensor([10.0]).expand(3)
    else:
        other.grad = torch.full((3,), 10.0)
    return [real, cplx, other]


@pytest.mark.parametrize("call, bad, error, words", [
    (lambda ps: fastclip.clip_grad_value_(ps, 1.0), "none", TypeError,
     r"clip_grad_value_: grad 1 of `parameters` .* is complex"),
    (lambda ps: fastclip.clip_grad_norm_(ps, 1.0), "inference", RuntimeError,
     r"clip_grad_norm_: grad 2 of `parameters` .* inference tensor"),
    (lambda ps: fastclip.clip_grad_norm_(ps, 1.0), "expanded", RuntimeError,
     r"clip_grad_norm_: grad 2 of `parameters` .* expanded view"),
    (lambda ps: fastclip.clip_grads_with_norm_(ps, 1.0, torch.tensor(50.0)), "inference", RuntimeError,
     r"clip_grads_with_norm_: grad 2 of `parameters` .* inference tensor"),
], ids=["value-complex", "norm-inference", "norm-expanded", "with-norm-inference"])
def test_a_set_torch_clips_is_refused_before_torch_writes_part_of_it(call, bad, error, words):
    """torch's own implementation (complex grads are left to it) writes the grads listed before
    one it cannot write, then raises: fastclip raises first, and no grad changes."""
    params = _complex_set(bad)
    before = [p.grad.clone() for p in params]
    with pytest.raises(error, match=words):
        call(params)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)
