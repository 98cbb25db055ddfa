"""PyTorch's own unit tests of gradient clipping, run against fastclip.

Ported from ``test/test_nn.py`` of pytorch/pytorch at commit 74f2fa66 (class
``TestNNDeviceType``, instantiated for the CPU; PyTorch's BSD-3-Clause licence):
``test_clip_grad_value``, ``test_clip_grad_norm`` and ``test_clip_grad_norm_error_if_nonfinite``.
(``test_clip_grad_norm_multi_device`` needs two GPUs; FSDP's clip tests need several processes
and GPUs.) The bodies are torch's; ``self.`` became ``tc.``, whose ``assertEqual`` keeps torch's
dtype-based tolerances through ``torch.testing.assert_close``, and the four functions come from the
``api`` fixture: fastclip's own, torch's names under ``fastclip.patched()``, and torch's functions
as a control (a port that failed on torch would prove nothing).

One deliberate difference (README): torch's nonfinite test also clips by ``norm_type`` <= 0, which
fastclip refuses. Those cases are checked to raise a ``ValueError`` naming ``norm_type``, with no
grad changed; the rest of torch's table runs as it is.
"""

from __future__ import annotations

import warnings
from itertools import product

import pytest
import torch
import torch.nn as nn
import torch.nn.utils as tnu
from torch import inf, nan

import fastclip
from fastclip import clip_grad as fc

device = "cpu"
_NAMES = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")


def _torch_warns_on_an_empty_generator() -> bool:
    """Whether this torch's ``clip_grad_norm_`` warns on an exhausted generator (2.6.0's does not;
    2.13's does, and so does fastclip whatever the torch)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fc.TORCH_CLIP_GRAD_NORM((p for p in ()), 1.0)
    return len(w) == 1


TORCH_WARNS_ON_AN_EMPTY_GENERATOR = _torch_warns_on_an_empty_generator()


class _Checks:
    """The few ``unittest.TestCase`` assertions torch's tests use, with torch's tolerances."""

    def assertEqual(self, actual, expected, msg=None):
        if isinstance(actual, (int, str)) and isinstance(expected, (int, str)):
            assert actual == expected, msg
            return
        if isinstance(actual, torch.Tensor) and not isinstance(expected, torch.Tensor):
            expected = torch.as_tensor(expected, dtype=actual.dtype)
        torch.testing.assert_close(actual, expected, equal_nan=True, msg=msg)

    def assertLessEqual(self, a, b):
        assert a <= b, f"{a} > {b}"

    def assertGreaterEqual(self, a, b):
        assert a >= b, f"{a} < {b}"

    def assertRaisesRegex(self, exc, pattern, msg=None):
        return pytest.raises(exc, match=pattern)


class _Api:
    def __init__(self, kind, functions):
        self.kind = kind
        for name, fn in functions.items():
            setattr(self, name, fn)


@pytest.fixture
def tc():
    return _Checks()


@pytest.fixture(params=["fastclip", "patched", "torch"])
def api(request, monkeypatch):
    if request.param == "torch":
        yield _Api("torch", {"clip_grad_norm_": fc.TORCH_CLIP_GRAD_NORM,
                             "clip_grad_value_": fc.TORCH_CLIP_GRAD_VALUE,
                             "get_total_norm": fc.TORCH_GET_TOTAL_NORM,
                             "clip_grads_with_norm_": fc.TORCH_CLIP_GRADS_WITH_NORM})
        return

    # fastclip must run its own kernels on every case here: a fallback to torch fails the test.
    def no_fallback(*args, **kwargs):
        pytest.fail("fastclip fell back to torch's implementation")

    for attr in ("TORCH_CLIP_GRAD_NORM", "TORCH_CLIP_GRAD_VALUE", "TORCH_GET_TOTAL_NORM",
                 "TORCH_CLIP_GRADS_WITH_NORM"):
        monkeypatch.setattr(fc, attr, no_fallback)
    if request.param == "fastclip":
        yield _Api("fastclip", {name: getattr(fastclip, name) for name in _NAMES})
    else:
        with fastclip.patched():
            # torch's names, looked up at call time as trainers do
            yield _Api("patched", {name: (lambda *a, _n=name, **k: getattr(tnu, _n)(*a, **k))
                                   for name in _NAMES})
            assert tnu.clip_grad_norm_ is fastclip.clip_grad_norm_


# --- test_clip_grad_value --------------------------------------------------------------------------

@pytest.mark.parametrize("foreach", (False, True))
def test_clip_grad_value(tc, api, foreach):
    clip_grad_value_ = api.clip_grad_value_
    l = nn.Linear(10, 10).to(device)
    clip_value = 2.5

    grad_w, grad_b = torch.arange(-50., 50, device=device).view(10, 10).div_(5), torch.ones(10, device=device).mul_(2)
    for grad_list in [[grad_w, grad_b], [grad_w, None]]:
        for p, g in zip(l.parameters(), grad_list):
            p._grad = g.clone().view_as(p.data) if g is not None else g

        clip_grad_value_(l.parameters(), clip_value, foreach=foreach)
        for p in filter(lambda p: p.grad is not None, l.parameters()):
            tc.assertLessEqual(p.grad.data.max(), clip_value)
            tc.assertGreaterEqual(p.grad.data.min(), -clip_value)

    # Should accept a single Tensor as input
    p1, p2 = torch.randn(10, 10, device=device), torch.randn(10, 10, device=device)
    g = torch.arange(-50., 50, device=device).view(10, 10).div_(5)
    p1._grad = g.clone()
    p2._grad = g.clone()
    clip_grad_value_(p1, clip_value, foreach=foreach)
    clip_grad_value_([p2], clip_value, foreach=foreach)
    tc.assertEqual(p1.grad, p2.grad)


# --- test_clip_grad_norm ---------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", (0.5, 1.5, 2, 4, 'inf'))
@pytest.mark.parametrize("foreach", (False, True))
def test_clip_grad_norm(tc, api, norm_type, foreach):
    clip_grad_norm_ = api.clip_grad_norm_
    get_total_norm = api.get_total_norm
    clip_grads_with_norm_ = api.clip_grads_with_norm_

    l = nn.Linear(10, 10).to(device)
    max_norm = 2

    def compute_norm(norm_type):
        norm_type = float(norm_type)
        if norm_type != inf:
            total_norm = 0
            for p in l.parameters():
                total_norm += p.grad.data.abs().pow(norm_type).sum()
            return pow(total_norm, 1. / norm_type)
        else:
            return max(p.grad.data.abs().max() for p in l.parameters())

    def compare_scaling(grads):
        p_scale = [p.grad.data.div(g).view(-1) for p, g in zip(l.parameters(), grads)]
        scale = torch.cat(p_scale)
        tc.assertEqual(scale.std(), 0)
        return scale[0]

    grads = torch.arange(1., 101, device=device).view(10, 10), torch.ones(10, device=device).div(1000)
    for p, g in zip(l.parameters(), grads):
        p._grad = g.clone().view_as(p.data)
    norm_before = compute_norm(norm_type)
    norm = clip_grad_norm_(l.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    norm_after = compute_norm(norm_type)
    tc.assertEqual(norm, norm_before)
    tc.assertEqual(norm_after, max_norm)
    tc.assertLessEqual(norm_after, norm_before)
    compare_scaling(grads)

    # decomposed APIs should behave as expected
    grads = torch.arange(1., 101, device=device).view(10, 10), torch.ones(10, device=device).div(1000)
    for p, g in zip(l.parameters(), grads):
        p._grad = g.clone().view_as(p)
    norm_before = compute_norm(norm_type)
    grads = [p.grad for p in l.parameters()]
    total_norm = get_total_norm(grads, norm_type=norm_type, foreach=foreach)
    clip_grads_with_norm_(l.parameters(), max_norm, total_norm, foreach=foreach)
    norm_after = compute_norm(norm_type)
    tc.assertEqual(total_norm, norm_before)
    tc.assertEqual(norm_after, max_norm)
    tc.assertLessEqual(norm_after, norm_before)
    compare_scaling(grads)

    # Small gradients should be left unchanged
    grads = torch.rand(10, 10, device=device).div(10000), torch.ones(10, device=device).div(500)
    for p, g in zip(l.parameters(), grads):
        p.grad.data.copy_(g)
    norm_before = compute_norm(norm_type)
    norm = clip_grad_norm_(l.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    norm_after = compute_norm(norm_type)
    tc.assertEqual(norm, norm_before)
    tc.assertEqual(norm_before, norm_after)
    tc.assertLessEqual(norm_after, max_norm)
    scale = compare_scaling(grads)
    tc.assertEqual(scale, 1)

    # Should accept a single Tensor as input
    p1, p2 = torch.randn(10, 10, device=device), torch.randn(10, 10, device=device)
    g = torch.arange(1., 101, device=device).view(10, 10)
    p1._grad = g.clone()
    p2._grad = g.clone()
    clip_grad_norm_(p1, max_norm, norm_type=norm_type, foreach=foreach)
    clip_grad_norm_([p2], max_norm, norm_type=norm_type, foreach=foreach)
    tc.assertEqual(p1.grad, p2.grad)

    # Should warning when parameters generator exhausted
    if api.kind == "torch" and not TORCH_WARNS_ON_AN_EMPTY_GENERATOR:
        return
    params = l.parameters()
    for p in params:
        pass
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        clip_grad_norm_(params, max_norm, norm_type=norm_type, foreach=foreach)
        tc.assertEqual(len(w), 1)
        tc.assertEqual(str(w[0].message), "`parameters` is an empty generator, no gradient clipping will occur.")


# --- test_clip_grad_norm_error_if_nonfinite --------------------------------------------------------

def test_clip_grad_norm_error_if_nonfinite(tc, api):
    clip_grad_norm_ = api.clip_grad_norm_
    self = tc
    norms_pos = [0.1, 1, 2, 3.5, inf]
    norms_neg = [-0.1, -1, -2, -3.5]
    norms_except_0 = norms_pos + norms_neg
    norms_all = norms_except_0 + [0]

    test_cases = [
        # Test errors from an infinite grad
        (False, False, [inf, -inf], norms_except_0, [0]),
        (False, True, [inf, -inf], norms_pos, norms_neg + [0]),
        (True, False, [inf, -inf], norms_pos, norms_neg + [0]),
        (True, True, [inf, -inf], norms_pos, norms_neg + [0]),

        # Test errors from a NaN grad
        (False, False, [nan], norms_except_0, [0]),
        (False, True, [nan], norms_except_0, [0]),
        (True, False, [nan], norms_except_0, [0]),
        (True, True, [nan], norms_except_0, [0]),

        # Test a grad that should never error
        (False, False, [2e22, -2e22], [], norms_all),
        (False, True, [2e22, -2e22], [], norms_all),
        (True, False, [2e22, -2e22], [], norms_all),
        (True, True, [2e22, -2e22], [], norms_all),

        # Test a grad that will overflow to inf for only some norm orders
        (False, False, [2e200, -2e200], [3.5, 2, -2, -3.5], [inf, 1, 0.1, 0, -1, -0.1]),
        (False, True, [2e200, -2e200], [3.5, 2], norms_neg + [inf, 1, 0.1, 0]),
        (True, False, [2e200, -2e200], [3.5, 2], norms_neg + [inf, 1, 0.1, 0]),
        (True, True, [2e200, -2e200], [3.5, 2], norms_neg + [inf, 1, 0.1, 0]),
    ]

    def gen_parameters(scalar, grad_only_one_elem, prefix_finite_grad_param):
        param = torch.ones(10, dtype=torch.float64, device=device, requires_grad=True)

        if grad_only_one_elem:
            param[1].mul(scalar).sum().backward()
        else:
            param.mul(scalar).sum().backward()

        if prefix_finite_grad_param:
            prefix_param = torch.ones(1, dtype=torch.float64, device=device, requires_grad=True)
            prefix_param.mul(1).sum().backward()
            parameters = [prefix_param, param]
        else:
            parameters = [param]

        return parameters

    refused = []

    def run_test_case(norm_type, error_if_nonfinite, scalar, grad_only_one_elem, prefix_finite_grad_param, is_norm_nonfinite):
        msg = (
            f'norm_type: {norm_type}, ',
            f'error_if_nonfinite: {error_if_nonfinite}, '
            f'scalar: {scalar}, '
            f'grad_only_one_elem: {grad_only_one_elem}, '
            f'prefix_finite_grad_param: {prefix_finite_grad_param}, '
            f'is_norm_nonfinite: {is_norm_nonfinite}')

        parameters = gen_parameters(scalar, grad_only_one_elem, prefix_finite_grad_param)

        if api.kind != "torch" and norm_type <= 0:  # fastclip's deliberate difference
            grads_before = [p.grad.clone() for p in parameters]
            with pytest.raises(ValueError, match="`norm_type` must be a positive number"):
                clip_grad_norm_(parameters, 1, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)
            self.assertEqual(grads_before, [p.grad for p in parameters], msg=msg)
            refused.append(norm_type)
            return

        # Should only throw an error if the total norm is expected to be
        # nonfinite and `error_if_nonfinite=True`
        if is_norm_nonfinite and error_if_nonfinite:
            error_msg = f'The total norm of order {float(norm_type)} for gradients'

            grads_before = [p.grad.clone() for p in parameters]

            with self.assertRaisesRegex(RuntimeError, error_msg, msg=msg):
                clip_grad_norm_(parameters, 1, norm_type=norm_type, error_if_nonfinite=True)

            # Grad should not change if error is thrown
            grads_after = [p.grad for p in parameters]
            self.assertEqual(grads_before, grads_after, msg=msg)
        else:
            clip_grad_norm_(parameters, 1, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)

    for grad_only_one_elem, prefix_finite_grad_param, scalars, norms_nonfinite, norms_finite in test_cases:
        for error_if_nonfinite in [False, True]:
            for norm_type, scalar in product(norms_nonfinite, scalars):
                run_test_case(norm_type, error_if_nonfinite, scalar, grad_only_one_elem, prefix_finite_grad_param, True)

            for norm_type, scalar in product(norms_finite, scalars):
                run_test_case(norm_type, error_if_nonfinite, scalar, grad_only_one_elem, prefix_finite_grad_param, False)

    assert len(refused) == (0 if api.kind == "torch" else 280)
