"""Hypothesis property tests: random gradient sets against the exact reference and torch.

Each example is a list of 1-6 tensors of random dtype, size (0 to just above the 64K chunk),
layout (contiguous, transposed, sliced) and magnitude; norm types are drawn from the fused ones
and from arbitrary p in [0.3, 8].

Tolerances (see ``reference.norm_tolerance``): the norm is compared to the exact float64 value
with a bound derived from the float64 accumulation over n terms, the root's sensitivity 1/p,
and one final rounding to the returned dtype; the inf norm must be exact. Magnitudes are kept
where neither float64 (|x|**p) nor the float32 result can overflow or underflow: 10**±20 for
float32/bfloat16 with p in [0.3, 8] stays within 1e-180..1e180 per term and 1e-20..1e36 for
the norm; fp16 stays within its own range (10**±3 of normals, below 65504).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastclip
from fastclip.kernels.layout import DEFAULT_CHUNK_SIZE
from reference import (
    ALL_DTYPES,
    assert_bitwise_equal,
    assert_norm_close,
    exact_norm,
    norm_tolerance,
    param_with_grad,
    reference_clip_,
    reference_coef,
)

CHUNK = DEFAULT_CHUNK_SIZE
EXPONENTS = {torch.float32: (-20, 20), torch.float64: (-30, 30), torch.float16: (-3, 3),
             torch.bfloat16: (-20, 20)}
# Relative error of one scaled element: the store's rounding, plus (32- and 16-bit grads) the
# coefficient's rounding to float32 when it is a float64; 16-bit stores round a float32 product.
UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -11 + 2.0 ** -23,
        torch.bfloat16: 2.0 ** -8 + 2.0 ** -23}
# Absolute error of one scaled element that underflows: half the dtype's smallest subnormal, plus
# half of float32's for the float32 product behind a 16-bit store.
HALF_TINY = {torch.float64: 2.0 ** -1075, torch.float32: 2.0 ** -150, torch.float16: 2.0 ** -25 + 2.0 ** -150,
             torch.bfloat16: 2.0 ** -134 + 2.0 ** -150}

SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def grad_sets(draw, max_tensors=6):
    tensors = []
    for _ in range(draw(st.integers(1, max_tensors))):
        dtype = draw(st.sampled_from(ALL_DTYPES))
        size = draw(st.one_of(st.integers(0, 40), st.integers(41, 3000),
                              st.sampled_from([CHUNK - 1, CHUNK, CHUNK + 1])))
        exponent = draw(st.integers(*EXPONENTS[dtype]))
        layout = draw(st.sampled_from(["flat", "transposed", "sliced"]))
        zeros = draw(st.booleans())
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 32 - 1)))

        def values(n):
            x = torch.randn(n, dtype=torch.float64, generator=gen) * 10.0 ** exponent
            if zeros:  # exact zeros and sign changes are edge cases for max and pow
                x[torch.rand(n, generator=gen) < 0.3] = 0.0
            return x.to(dtype)

        if layout == "transposed" and size >= 3:
            t = values(size // 3 * 3).reshape(size // 3, 3).t()
        elif layout == "sliced":
            t = values(2 * size)[::2]
        else:
            t = values(size)
        tensors.append(t)
    return tensors


norm_types = st.one_of(st.sampled_from([2.0, 1.0, math.inf, "inf", 3.0, 0.5]),
                       st.floats(0.3, 8.0, allow_nan=False))


def as_p(norm_type) -> float:
    return math.inf if norm_type == "inf" else float(norm_type)


@SETTINGS
@given(tensors=grad_sets(), norm_type=norm_types)
def test_total_norm_is_exact(tensors, norm_type):
    p = as_p(norm_type)
    norm = fastclip.get_total_norm(tensors, norm_type)
    any64 = any(t.dtype == torch.float64 for t in tensors)
    assert norm.dtype == (torch.float64 if any64 else torch.float32)
    assert_norm_close(norm, tensors, p)
    # The same set in another order: another summation order, the same bound.
    assert_norm_close(fastclip.get_total_norm(tensors[::-1], norm_type), tensors, p)
    # Deterministic: the same call gives the same bits.
    assert_bitwise_equal(fastclip.get_total_norm(tensors, norm_type), norm)


def clipped_norm_bounds(grads, coef: float, p: float):
    """Exact bounds on the p-norm of ``grads`` scaled by ``coef`` and stored in their dtypes:
    each store errs by at most UNIT relative or HALF_TINY absolute (underflow)."""
    lo, hi = [], []
    for g in grads:
        x = g.double().abs() * coef
        lo.append((x * (1 - UNIT[g.dtype]) - HALF_TINY[g.dtype]).clamp(min=0))
        hi.append(x * (1 + UNIT[g.dtype]) + HALF_TINY[g.dtype])
    return exact_norm(lo, p), exact_norm(hi, p)


@SETTINGS
@given(tensors=grad_sets(), norm_type=norm_types, ratio=st.floats(0.01, 2.0))
def test_clip_grad_norm_invariants(tensors, norm_type, ratio):
    p = as_p(norm_type)
    exact = exact_norm(tensors, p)
    max_norm = ratio * exact
    params = [param_with_grad(t.clone()) for t in tensors]
    norm = fastclip.clip_grad_norm_(params, max_norm, norm_type)
    assert_norm_close(norm, tensors, p)

    # Every element scaled by the same factor, exactly as torch's grad.mul_(coef) would.
    expected = [t.clone() for t in tensors]
    reference_clip_(expected, max_norm, norm)
    for q, e in zip(params, expected):
        assert_bitwise_equal(q.grad, e)

    coef = reference_coef(max_norm, norm).item()
    if coef == 1.0:  # small grads are unchanged
        for q, t in zip(params, tensors):
            assert_bitwise_equal(q.grad, t)
        return
    # After clipping the norm is max_norm, up to each element's rounding on store...
    lo, hi = clipped_norm_bounds(tensors, coef, p)
    after = exact_norm([q.grad for q in params], p)
    slack = 1e-12  # the float64 bound computations themselves
    assert lo * (1 - slack) <= after <= hi * (1 + slack)
    # ...and coef * exact norm is max_norm, up to the norm's tolerance, torch's 1e-6 in the
    # denominator, and the coefficient's float32 ops (max_norm, the sum and the quotient each
    # round once: 3 * 2**-24 < 2**-22).
    if exact > 0:
        n = sum(t.numel() for t in tensors)
        tol = norm_tolerance(p, n, norm.dtype) + 2.0 ** -22 + 1e-6 / exact
        assert coef * exact == pytest.approx(max_norm, rel=tol)


@SETTINGS
@given(tensors=grad_sets(max_tensors=4), norm_type=st.sampled_from([2.0, math.inf, 1.0]))
def test_single_tensor_same_as_list(tensors, norm_type):
    t = tensors[0]
    assert_bitwise_equal(fastclip.get_total_norm(t, norm_type), fastclip.get_total_norm([t], norm_type))
    a, b = param_with_grad(t.clone()), param_with_grad(t.clone())
    max_norm = 0.5 * exact_norm([t], as_p(norm_type))
    assert_bitwise_equal(fastclip.clip_grad_norm_(a, max_norm, norm_type),
                         fastclip.clip_grad_norm_([b], max_norm, norm_type))
    assert_bitwise_equal(a.grad, b.grad)


@SETTINGS
@given(tensors=grad_sets(), fraction=st.floats(0.0, 1.5))
def test_clip_grad_value_like_torch(tensors, fraction):
    # clip_value relative to the largest |x|: some elements clamped, some not. Below 60000 so
    # that torch accepts it for fp16 (it refuses values a dtype cannot hold).
    clip_value = min(fraction * exact_norm(tensors, math.inf), 60000.0)
    ours = [param_with_grad(t.clone()) for t in tensors]
    theirs = [param_with_grad(t.clone()) for t in tensors]
    fastclip.clip_grad_value_(ours, clip_value)
    torch.nn.utils.clip_grad_value_(theirs, clip_value, foreach=False)
    for a, b in zip(ours, theirs):
        assert_bitwise_equal(a.grad, b.grad)
