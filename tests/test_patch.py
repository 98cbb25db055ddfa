"""fastclip.patch(), unpatch() and patched(): what they replace, what they restore, and that
torch's names then really run fastclip (and fastclip's torch fallback never runs fastclip)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.utils as tnu
import torch.nn.utils.clip_grad as tcg

import fastclip
from fastclip import _patch
from fastclip import clip_grad as fc

PUBLIC = [
    (tnu, "clip_grad_norm_", fastclip.clip_grad_norm_),
    (tnu, "clip_grad_value_", fastclip.clip_grad_value_),
    (tnu, "get_total_norm", fastclip.get_total_norm),
    (tnu, "clip_grads_with_norm_", fastclip.clip_grads_with_norm_),
    (tcg, "clip_grad_norm_", fastclip.clip_grad_norm_),
    (tcg, "clip_grad_value_", fastclip.clip_grad_value_),
]
# torch's private helpers: the only code that calls them is torch's clip_grad_norm_, i.e.
# fastclip's fallback once patched. They must stay torch's.
PRIVATE = [(tcg, "_get_total_norm"), (tcg, "_clip_grads_with_norm_")]


def snapshot():
    return {(m.__name__, n): getattr(m, n) for m, n, _ in PUBLIC} | {
        (m.__name__, n): getattr(m, n) for m, n in PRIVATE}


@pytest.fixture(autouse=True)
def _always_unpatched():
    """Each test starts and ends with torch's own functions in place."""
    before = snapshot()
    assert not _patch.is_patched()
    yield
    fastclip.unpatch()
    assert snapshot() == before




def grads(*shapes, scale=10.0, device="cpu"):
    ps = []
    for i, shape in enumerate(shapes):
        p = torch.zeros(shape, device=device, requires_grad=True)
        p.grad = torch.randn(shape, device=device) * scale + i
        ps.append(p)
    return ps


def exact_norm(ps) -> float:
    return math.sqrt(math.fsum(float((p.grad.double() ** 2).sum()) for p in ps))


def test_patch_replaces_public_names_in_both_modules_and_leaves_private_helpers():
    before = snapshot()
    fastclip.patch()
    assert _patch.is_patched()
    for module, name, ours in PUBLIC:
        assert getattr(module, name) is ours, f"{module.__name__}.{name}"
    for module, name in PRIVATE:
        assert getattr(module, name) is before[(module.__name__, name)]
    fastclip.unpatch()
    assert not _patch.is_patched()
    after = snapshot()
    for key, obj in before.items():
        assert after[key] is obj, key


def test_patching_twice_then_unpatching_once_restores_torch():
    original = tnu.clip_grad_norm_
    fastclip.patch()
    fastclip.patch()  # must not record fastclip's function as "the original"
    fastclip.unpatch()
    assert tnu.clip_grad_norm_ is original
    assert tcg.clip_grad_norm_ is original
    fastclip.unpatch()  # not patched: nothing to do
    assert tnu.clip_grad_norm_ is original


def test_patched_restores_on_exception():
    original = tnu.clip_grad_norm_
    with pytest.raises(ValueError, match="boom"):
        with fastclip.patched():
            assert tnu.clip_grad_norm_ is fastclip.clip_grad_norm_
            raise ValueError("boom")
    assert tnu.clip_grad_norm_ is original


def test_patched_nests_and_respects_an_outer_patch():
    original = tnu.clip_grad_norm_
    with fastclip.patched():
        with fastclip.patched():
            assert tnu.clip_grad_norm_ is fastclip.clip_grad_norm_
        # the inner block found torch patched, so it leaves it patched
        assert tnu.clip_grad_norm_ is fastclip.clip_grad_norm_
    assert tnu.clip_grad_norm_ is original

    fastclip.patch()
    with fastclip.patched():
        pass
    assert tnu.clip_grad_norm_ is fastclip.clip_grad_norm_  # patch() is still in effect
    fastclip.unpatch()
    assert tnu.clip_grad_norm_ is original


def test_overlapping_blocks_exited_out_of_order_keep_torch_patched():
    """Two blocks (two threads, or two context objects closed out of order): the first one out
    must not unpatch torch under the other, still open."""
    original = tnu.clip_grad_norm_
    a, b = fastclip.patched(), fastclip.patched()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert tnu.clip_grad_norm_ is fastclip.clip_grad_norm_ and _patch.is_patched()
    b.__exit__(None, None, None)
    assert tnu.clip_grad_norm_ is original and not _patch.is_patched()


def test_unpatch_leaves_a_name_replaced_after_patch_to_its_owner():
    original = tnu.clip_grad_norm_
    fastclip.patch()

    def logging_wrapper(*args, **kwargs):
        return fastclip.clip_grad_norm_(*args, **kwargs)

    tnu.clip_grad_norm_ = logging_wrapper
    try:
        with pytest.warns(RuntimeWarning, match=r"torch.nn.utils.clip_grad_norm_` was replaced"):
            fastclip.unpatch()
        assert tnu.clip_grad_norm_ is logging_wrapper  # theirs, not discarded
        assert tnu.clip_grad_value_ is not fastclip.clip_grad_value_  # the others restored
    finally:
        tnu.clip_grad_norm_ = original


def test_patched_works_as_a_decorator():
    @fastclip.patched()
    def inside():
        return tnu.clip_grad_value_ is fastclip.clip_grad_value_

    assert inside() and inside()
    assert tnu.clip_grad_value_ is not fastclip.clip_grad_value_


def test_torch_names_run_fastclip_when_patched(build_calls):
    ps = grads((300,), (7, 11))
    expected = exact_norm(ps)
    with fastclip.patched():
        norm = torch.nn.utils.clip_grad_norm_(ps, 1.0)
        assert build_calls == ["clip_grad_norm_"]
        total = torch.nn.utils.get_total_norm([p.grad for p in ps])
        torch.nn.utils.clip_grads_with_norm_(ps, 0.5, total)
        torch.nn.utils.clip_grad.clip_grad_value_(ps, 0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # torch's deprecated alias looks clip_grad_norm_ up in its module at call time
            torch.nn.utils.clip_grad_norm(ps, 1.0)
    assert build_calls == ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_",
                           "clip_grad_value_", "clip_grad_norm_"]
    assert float(norm) == pytest.approx(expected, rel=1e-6)
    assert all(float(p.grad.abs().max()) <= 0.01 for p in ps)

    # negative control: unpatched, torch's names do not reach fastclip
    build_calls.clear()
    torch.nn.utils.clip_grad_norm_(grads((5,)), 1.0)
    assert build_calls == []


def test_fallback_stays_torch_when_patched(build_calls):
    """Meta tensors have no kernel: fastclip defers to torch's clip_grad_norm_, which must not
    come back into fastclip through the patched names."""
    ps = grads((4, 4), device="meta")
    with fastclip.patched():
        norm = torch.nn.utils.clip_grad_norm_(ps, 1.0)
    assert norm.device.type == "meta"
    assert build_calls == ["clip_grad_norm_"]


def test_fallback_check_detects_reentry(build_calls, monkeypatch):
    """Negative control for the test above: had patch() replaced torch's private helpers, the
    fallback would call fastclip again, and the spy sees it."""
    ps = grads((4, 4), device="meta")
    monkeypatch.setattr(tcg, "_get_total_norm", fastclip.get_total_norm)
    fastclip.clip_grad_norm_(ps, 1.0)
    assert build_calls == ["clip_grad_norm_", "get_total_norm"]


def test_patch_refuses_when_the_fallback_is_fastclip(monkeypatch):
    original = tnu.clip_grad_norm_
    monkeypatch.setattr(fc, "TORCH_CLIP_GRAD_NORM", fastclip.clip_grad_norm_)
    with pytest.raises(RuntimeError, match=r"`fastclip.patch`.*`TORCH_CLIP_GRAD_NORM`"):
        fastclip.patch()
    assert not _patch.is_patched()
    assert tnu.clip_grad_norm_ is original


def test_exports():
    for name in ("patch", "unpatch", "patched"):
        assert name in fastclip.__all__
        assert getattr(fastclip, name) is getattr(_patch, name)
