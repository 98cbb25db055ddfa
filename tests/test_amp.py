"""unscale_and_clip_: grads, steps and GradScaler state against torch's unscale-then-clip sequence."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fastclip
from torch.amp.grad_scaler import OptState
from device_style import device_style  # noqa: F401 (fixture)
from reference import assert_bitwise_equal, assert_norm_close, param_with_grad, random_grad

# Every third step holds an inf or NaN grad: it must be skipped, and the scale must back off.
BAD = {2: math.inf, 5: math.nan}
STEPS = 7


def _model(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    return model.to(device=device, dtype=dtype)


def _backward(model, scaler, x, bad=None):
    model.zero_grad()
    out = model(x.to(next(model.parameters()).dtype))
    scaler.scale(out.float().pow(2).sum()).backward()
    if bad is not None:
        model[0].weight.grad[1, 2] = bad


def _run(reference, steps=STEPS, p=2.0, max_norm=0.5, dtype=torch.float32, device="cpu", **scaler_kw):
    """Train a small model; at each step, compare fastclip with ``reference(scaler, opt, model)``.

    Returns the per-step records of both runs: norms, grads after clipping, params after the step,
    scale and growth tracker after update.
    """
    runs = []
    for use_fastclip in (True, False):
        model = _model(dtype, device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler(device, growth_interval=2, **scaler_kw)
        g = torch.Generator().manual_seed(1)
        record = []
        for step in range(steps):
            _backward(model, scaler, torch.randn(5, 6, generator=g).to(device), BAD.get(step))
            if use_fastclip:
                norm = fastclip.unscale_and_clip_(scaler, opt, max_norm, p)
            else:
                norm = reference(scaler, opt, model, max_norm, p)
            grads = [q.grad.clone() for q in model.parameters()]
            scaler.step(opt)
            scaler.update()
            params = [q.detach().clone() for q in model.parameters()]
            record.append(dict(norm=norm, grads=grads, params=params, scale=scaler._scale.clone(),
                               tracker=scaler._growth_tracker.clone()))
        runs.append(record)
    return runs


def _fastclip_sequence(scaler, opt, model, max_norm, p):
    scaler.unscale_(opt)
    return fastclip.clip_grad_norm_(model.parameters(), max_norm, p)


def _torch_sequence(scaler, opt, model, max_norm, p):
    scaler.unscale_(opt)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, p)


def _assert_runs_bitwise_equal(run_a, run_b):
    """Norms, grads (NaN payloads aside on bad steps), params and scaler state, bit for bit."""
    for step, (a, b) in enumerate(zip(run_a, run_b)):
        assert_bitwise_equal(a["norm"], b["norm"])
        for ga, gb in zip(a["grads"], b["grads"]):
            assert_bitwise_equal(ga, gb, nan_bits=step not in BAD)
        for pa, pb in zip(a["params"], b["params"]):
            assert_bitwise_equal(pa, pb)
        assert torch.equal(a["scale"], b["scale"]) and torch.equal(a["tracker"], b["tracker"])


@pytest.mark.parametrize("p", [2.0, math.inf, 1.0])
def test_bitwise_equal_to_unscale_then_fastclip(p):
    """A power-of-two scale: the fused path changes no bit of the norm, grads, params or scale."""
    ours, ref = _run(_fastclip_sequence, p=p)
    _assert_runs_bitwise_equal(ours, ref)
    scales = [float(r["scale"]) for r in ours]
    # growth_interval=2: growth after two good steps, backoff after each bad one.
    assert scales == [65536.0, 131072.0, 65536.0, 65536.0, 131072.0, 65536.0, 65536.0]


def test_matches_torchs_sequence():
    """torch's own norm is float32-accumulated, so its coefficient differs in the last bits.

    The two sequences run in lockstep from the same state at each step (a copy of model, optimizer
    and scaler after the backward pass), so the comparison sees one clip, not two training runs
    that drift apart (a 1-ulp coefficient difference moves the params, and later grads then differ
    by far more than any clip does: 1e-5 relative within five steps, with torch 2.6).
    """
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", growth_interval=2)
    g = torch.Generator().manual_seed(1)
    clipped = 0
    for step in range(STEPS):
        _backward(model, scaler, torch.randn(5, 6, generator=g), BAD.get(step))
        t_model, t_opt = copy.deepcopy((model, opt))  # momentum buffers too
        for q, t_q in zip(model.parameters(), t_model.parameters()):
            t_q.grad = q.grad.clone()  # (a Parameter's deepcopy leaves its grad behind)
        t_scaler = torch.amp.GradScaler("cpu", growth_interval=2)  # (GradScaler drops its scale
        t_scaler._scale = scaler._scale.clone()                    # when copied mid-iteration)
        t_scaler._growth_tracker = scaler._growth_tracker.clone()
        norm = fastclip.unscale_and_clip_(scaler, opt, 0.5)
        t_norm = _torch_sequence(t_scaler, t_opt, t_model, 0.5, 2.0)
        if step in BAD:
            assert not math.isfinite(float(norm)) and not math.isfinite(float(t_norm))
        else:
            torch.testing.assert_close(norm, t_norm, rtol=1e-6, atol=0)
            clipped += float(norm) > 0.5
            # The same scaled grads, unscaled exactly (a power-of-two scale), times coefficients
            # a few float32 ulps apart, each product rounded once.
            for q, t_q in zip(model.parameters(), t_model.parameters()):
                torch.testing.assert_close(q.grad, t_q.grad, rtol=1e-6, atol=0)
        for sc, o in ((scaler, opt), (t_scaler, t_opt)):
            sc.step(o)
            sc.update()
        # Params: a coefficient 1e-6 off moves an SGD step by 1e-6 of itself (lr * |g| ~ 0.05).
        for q, t_q in zip(model.parameters(), t_model.parameters()):
            torch.testing.assert_close(q.detach(), t_q.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(scaler._scale, t_scaler._scale)
        assert torch.equal(scaler._growth_tracker, t_scaler._growth_tracker)
    assert clipped >= 3  # the test clips for real
    assert float(scaler._scale) == 65536.0  # two backoffs and two growths (negative control)


def test_skipped_steps_leave_params_and_grads_as_torch():
    ours, ref = _run(_torch_sequence)
    for step in BAD:
        for pa, pb in zip(ours[step]["params"], ours[step - 1]["params"]):
            assert torch.equal(pa, pb)  # skipped
        # The grads: what torch's sequence leaves (coefficient 0 for inf, NaN for NaN).
        for ga, gb in zip(ours[step]["grads"], ref[step]["grads"]):
            assert torch.equal(ga.isnan(), gb.isnan())
            assert torch.equal(ga.nan_to_num(0.0), gb.nan_to_num(0.0))


def test_norm_is_exact():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)
    _backward(model, scaler, torch.randn(5, 6))
    unscaled = [q.grad.double() / 2.0 ** 20 for q in model.parameters()]
    norm = fastclip.unscale_and_clip_(scaler, opt, max_norm=1e9)
    assert_norm_close(norm, unscaled, 2.0)


@pytest.mark.parametrize("init_scale", [1000.0, 0.25])
def test_any_scale(init_scale):
    """A scale that is not a power of two rounds once where torch rounds twice; a scale below 1
    makes the factor exceed 1, which must still be applied (the clip kernels skip factors >= 1)."""
    max_norm = 1e9 if init_scale < 1 else 0.5
    ours, ref = _run(_fastclip_sequence, steps=2, init_scale=init_scale, max_norm=max_norm)
    for a, b in zip(ours, ref):
        for ga, gb in zip(a["grads"], b["grads"]):
            # With u = 2**-24 (float32 unit roundoff): x * round(inv * c) is within 2u of the exact
            # x * inv * c, and so is round(round(x * inv) * c'). The two coefficients c, c' may
            # differ by one float32 rounding (2u): the norms come from differently rounded grads.
            torch.testing.assert_close(ga, gb, rtol=6 * 2.0 ** -24, atol=0)
    if init_scale < 1:  # the factor 4 was applied: the grads' norm is the unscaled norm
        after = torch.linalg.vector_norm(torch.cat([x.flatten() for x in ours[0]["grads"]]).double())
        assert float(after) == pytest.approx(float(ours[0]["norm"]), rel=1e-6)


def test_device_style_backend_is_bitwise_equal(device_style, monkeypatch):
    """The tensor-only branch (a GPU backend's: no host read) gives the host branch's bits."""
    device_run, _ = _run(_fastclip_sequence, steps=4)
    monkeypatch.undo()
    host_run, _ = _run(_fastclip_sequence, steps=4)
    _assert_runs_bitwise_equal(device_run, host_run)
    assert float(device_run[2]["scale"]) < float(device_run[1]["scale"])  # the inf step backed off


def test_mixed_dtypes_bitwise():
    """bf16, float32 and float64 grads together: still bit-identical to the unscale-then-clip path."""
    g = torch.Generator().manual_seed(2)
    grads = [random_grad((40, 3), torch.bfloat16, 3e4, g), random_grad((7,), torch.float32, 5e4, g),
             random_grad((9, 2), torch.float64, 1e4, g)]
    results = []
    for fused in (True, False):
        params = [param_with_grad(x.clone()) for x in grads]
        opt = torch.optim.SGD(params, lr=0.1)
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(torch.zeros(()))  # creates the scale (2**16)
        if fused:
            norm = fastclip.unscale_and_clip_(scaler, opt, 1.0)
        else:
            scaler.unscale_(opt)
            norm = fastclip.clip_grad_norm_(params, 1.0)
        results.append((norm, [q.grad for q in params]))
    assert results[0][0].dtype == torch.float64
    assert_bitwise_equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert_bitwise_equal(a, b)


def _scaled_setup(**scaler_kw):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", **scaler_kw)
    _backward(model, scaler, torch.randn(5, 6))
    return model, opt, scaler


def test_twice_raises_like_torch():
    model, opt, scaler = _scaled_setup()
    fastclip.unscale_and_clip_(scaler, opt, 1.0)
    with pytest.raises(RuntimeError, match="already been called"):
        fastclip.unscale_and_clip_(scaler, opt, 1.0)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)  # torch sees our record
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        fastclip.unscale_and_clip_(scaler, opt, 1.0)
    scaler.update()
    _backward(model, scaler, torch.randn(5, 6))
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        fastclip.unscale_and_clip_(scaler, opt, 1.0)


def test_no_scale_yet():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"unscale_and_clip_: `scaler` has no scale yet"):
        fastclip.unscale_and_clip_(torch.amp.GradScaler("cpu"), opt, 1.0)


def test_fp16_grads_refused_untouched():
    params = [param_with_grad(torch.full((3,), 2.0)),
              param_with_grad(torch.full((2,), 4.0, dtype=torch.float16))]
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.zeros(()))
    with pytest.raises(ValueError, match=r"unscale_and_clip_: `optimizer` holds a float16 gradient"):
        fastclip.unscale_and_clip_(scaler, opt, 1.0)
    assert torch.equal(params[0].grad, torch.full((3,), 2.0))
    assert scaler._per_optimizer_states[id(opt)]["stage"].name == "READY"
    with pytest.raises(ValueError, match="FP16"):  # torch refuses the same grads
        scaler.unscale_(opt)


@pytest.mark.parametrize("args, exc, match", [
    (("not a scaler", "opt", 1.0), TypeError, r"`scaler` must be a torch.amp.GradScaler, got 'not a scaler'"),
    (("scaler", [1, 2], 1.0), TypeError, r"`optimizer` must be a torch.optim.Optimizer"),
    (("scaler", "opt", -1.0), ValueError, r"`max_norm` must be a non-negative number, got -1.0"),
    (("scaler", "opt", 1.0, 0), ValueError, r"`norm_type` must be a positive number"),
])
def test_bad_arguments_touch_nothing(args, exc, match):
    model, opt, scaler = _scaled_setup()
    before = [q.grad.clone() for q in model.parameters()]
    args = [{"scaler": scaler, "opt": opt}.get(a, a) if isinstance(a, str) else a for a in args]
    with pytest.raises(exc, match=match):
        fastclip.unscale_and_clip_(*args)
    for q, b in zip(model.parameters(), before):
        assert torch.equal(q.grad, b)
    assert scaler._per_optimizer_states[id(opt)]["stage"].name == "READY"


def test_disabled_scaler_is_plain_clip():
    w = param_with_grad(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert float(fastclip.unscale_and_clip_(scaler, opt, 1.0)) == 5.0
    torch.testing.assert_close(w.grad, torch.tensor([0.6, 0.8]))


def test_no_grads_records_like_torch():
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.zeros(()))
    assert float(fastclip.unscale_and_clip_(scaler, opt, 1.0)) == 0.0
    state = scaler._per_optimizer_states[id(opt)]
    assert state["stage"].name == "UNSCALED" and state["found_inf_per_device"] == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_and_never_syncs():
    ours, ref = _run(_fastclip_sequence, device="cuda")
    for step, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a["norm"], b["norm"], rtol=0, atol=0, equal_nan=True)
        for pa, pb in zip(a["params"], b["params"]):
            torch.testing.assert_close(pa, pb, rtol=0, atol=0)
        assert torch.equal(a["scale"], b["scale"])
    model = _model(device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda")
    _backward(model, scaler, torch.randn(5, 6, device="cuda"), bad=math.inf)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastclip.unscale_and_clip_(scaler, opt, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    found = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
    assert float(found[torch.device("cuda", 0)]) == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("init_scale, max_norm", [(2.0 ** 10, 1e-3), (0.25, 1e4)])
def test_cuda_bf16_grads_match_unscale_then_clip(init_scale, max_norm):
    """bf16 grads on CUDA are multiplied by the float32 factor (the scale kernel), as unscale_
    and the clip multiply them; torch's CUDA _foreach_mul_ would round the factor to bf16."""
    runs = []
    for ours in (True, False):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype, device="cuda"))
                  for n, dtype in [(5000, torch.bfloat16), (3000, torch.float32)]]
        for p in params:
            p.grad = (torch.rand(p.shape, generator=gen) + 0.5).to(p.dtype).to("cuda")
        opt = torch.optim.SGD(params, lr=1.0)
        scaler = torch.amp.GradScaler("cuda", init_scale=init_scale)
        scaler.scale(torch.ones((), device="cuda"))
        if ours:
            norm = fastclip.unscale_and_clip_(scaler, opt, max_norm)
        else:
            scaler.unscale_(opt)
            norm = fastclip.clip_grad_norm_(params, max_norm)
        runs.append((norm, [p.grad.clone() for p in params]))
    (norm_a, grads_a), (norm_b, grads_b) = runs
    torch.testing.assert_close(norm_a, norm_b, rtol=0, atol=0)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grads, init_scale, max_norm", [
    ([1e30 * 65536.0] * 4, 65536.0, 1e-6),  # inv_scale * coef is below float32's normal range
    ([3e38, 1.0, 2.0], 2.0 ** -4, 1.0),  # unscaling overflows to inf (a scale below 1)
    ([3.0, 4.0], 2.0 ** -4, 1.0),  # a scale below 1, finite values
    ([3.0, 4.0], 0.5, 100.0),  # inv_scale 2: a factor in (1, 2], which the clip kernels would skip
    ([2.0 ** 24, -2.0 ** 25, 3 * 2.0 ** 24], 2.0 ** 24, 1e-40),  # inv_scale * coef underflows to 0
    ([4.6e31 * 65536.0, 6.1e31 * 65536.0], 65536.0, 1e-9),  # the same, and the clipped grads ~4e-10
], ids=["subnormal-factor", "unscale-overflow", "scale-below-1", "scale-one-half",
        "factor-underflows-to-0", "factor-0-normal-results"])
def test_extreme_factors_stay_bitwise_equal_to_unscale_then_clip(grads, init_scale, max_norm):
    """One pass by inv_scale * coef is exact only when that product is a normal float32 and
    unscaling cannot overflow; elsewhere the host path takes torch's two roundings."""
    runs = []
    for ours in (True, False):
        p = torch.nn.Parameter(torch.zeros(len(grads)))
        opt = torch.optim.SGD([p], lr=1.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        scaler.scale(torch.ones(()))
        p.grad = torch.tensor(grads)
        if ours:
            norm = fastclip.unscale_and_clip_(scaler, opt, max_norm)
        else:
            scaler.unscale_(opt)
            norm = fastclip.clip_grad_norm_([p], max_norm)
        found = sum(scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
        runs.append((norm, found, p.grad.clone()))
    (norm_a, found_a, grad_a), (norm_b, found_b, grad_b) = runs
    assert_bitwise_equal(norm_a, norm_b)
    assert float(found_a) == float(found_b)
    assert_bitwise_equal(grad_a, grad_b)
    if max_norm < 1e-8:  # negative control: torch's two roundings leave nonzero grads
        assert (grad_b != 0).all()


def test_a_float64_grad_beside_float32_ones_still_takes_two_passes_for_a_tiny_factor():
    """With a float64 grad in the set the coefficient is float64, and ``inv_scale * coef`` may lie
    below float32's normal range but not float64's. The kernel applies it to the float32 grads as
    a float32, a subnormal with few significant bits (clipped values ~1e-6 off by up to ~1%):
    that factor takes torch's two roundings too."""
    def grads():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(1000, generator=g) * 1e30 * 2.0 ** 24,
                torch.randn(3, generator=g, dtype=torch.float64) * 2.0 ** 24]

    results = []
    for ours in (True, False):
        params, opt, scaler = _amp_setup(grads(), scale=2.0 ** 24)
        if ours:
            norm = fastclip.unscale_and_clip_(scaler, opt, 1e-5, math.inf)
        else:
            scaler.unscale_(opt)
            norm = fastclip.clip_grad_norm_(params, 1e-5, math.inf)
        results.append((norm, [q.grad.clone() for q in params]))
    (norm, grads_a), (ref_norm, grads_b) = results
    assert_bitwise_equal(norm, ref_norm)
    for a, b in zip(grads_a, grads_b):
        assert_bitwise_equal(a, b)
    factor = (1.0 / 2.0 ** 24) * (1e-5 / (float(norm) + 1e-6))
    assert 0 < factor < torch.finfo(torch.float32).tiny  # the case this test is about


def test_float64_grads_whose_scaled_power_sum_overflows_are_not_taken_for_inf():
    """Finite float64 grads beyond ~1.3e154 / scale: the power sum of the *scaled* grads overflows
    float64, where torch's unscale_ finds no inf and its clip a finite norm. The step is not
    skipped: unscale first, then clip, as torch does (on the host; see README for CUDA)."""
    results = []
    for ours in (True, False):
        params, opt, scaler = _amp_setup([torch.tensor([1e150, -2e150, 3.0], dtype=torch.float64)
                                          * 65536.0], scale=65536.0)
        if ours:
            norm = fastclip.unscale_and_clip_(scaler, opt, 1.0)
        else:
            scaler.unscale_(opt)
            norm = fastclip.clip_grad_norm_(params, 1.0)
        state = scaler._per_optimizer_states[id(opt)]
        found = float(sum(state["found_inf_per_device"].values()))
        results.append((norm, params[0].grad.clone(), found, state["stage"]))
    (norm, grad, found, stage), (ref_norm, ref_grad, ref_found, ref_stage) = results
    assert math.isfinite(float(ref_norm)) and ref_found == 0.0  # torch's sequence steps
    assert_bitwise_equal(norm, ref_norm)
    assert_bitwise_equal(grad, ref_grad)
    assert found == ref_found and stage is ref_stage


@pytest.mark.parametrize("scale, p", [(0.25, 2.0), (4.0, 3.0)], ids=["scale-below-1", "p-3"])
def test_an_expanded_grad_fails_the_call_before_any_grad_is_unscaled(scale, p):
    """Routes where torch's ops write the grads (``_foreach_mul_`` for a scale below 1, torch's
    ``unscale_`` for p other than 1, 2 and inf) refuse an expanded grad before writing the grads
    listed before it, as the fused route does."""
    first = torch.tensor([3.0, 4.0]) * scale
    params, opt, scaler = _amp_setup([first, torch.tensor([5.0]).expand(3)], scale=scale)
    before = first.clone()
    with pytest.raises(RuntimeError, match="expanded view"):
        fastclip.unscale_and_clip_(scaler, opt, 1.0, p)
    assert_bitwise_equal(params[0].grad, before)
    assert scaler._per_optimizer_states[id(opt)]["stage"] is not OptState.UNSCALED


# --- other p: torch's unscale first (the scaled grads' power sum can overflow) -----------------------

def _amp_step(unscale_and_clip, p, values=(3.0, 1.0, 0.5, 0.1)):
    """One AMP step of one parameter whose unscaled grad is ``values``: (norm, found-inf sum,
    grad after the clip, param after the step, next scale)."""
    w = torch.zeros(len(values), requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")  # scale 2**16
    scaler.scale((w * torch.tensor(values)).sum()).backward()
    norm = unscale_and_clip(scaler, opt, 1.0, p)
    found = sum(float(f) for f in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
    grad = w.grad.clone()
    scaler.step(opt)
    scaler.update()
    return norm, found, grad, w.detach().clone(), scaler.get_scale()


@pytest.mark.parametrize("p", [60.0, 3.0, 0.5])
def test_other_p_is_unscale_then_clip_bit_for_bit(p):
    """At p = 60 and scale 2**16, |scale * 3| ** 60 overflows float64 while the unscaled grads'
    norm is 3: finite grads must not be taken for inf (zeroed, the step skipped, the scale
    halved). Every p other than 1, 2 and inf gives torch's sequence, bit for bit."""
    def unscale_then_clip(scaler, opt, max_norm, p):
        scaler.unscale_(opt)
        return fastclip.clip_grad_norm_(opt.param_groups[0]["params"], max_norm, p)

    ours = _amp_step(fastclip.unscale_and_clip_, p)
    ref = _amp_step(unscale_then_clip, p)
    assert ours[1] == ref[1] == 0.0 and ours[4] == ref[4] == 65536.0
    for a, b in zip(ours[:1] + ours[2:4], ref[:1] + ref[2:4]):
        assert_bitwise_equal(a, b)
    assert float(ours[0]) == pytest.approx(torch.linalg.vector_norm(torch.tensor([3.0, 1.0, 0.5, 0.1]), p).item())


def test_negative_control_the_scaled_power_sum_overflows_at_p_60():
    """The case above is not vacuous: the scaled grads' float64 power sum is inf at p = 60."""
    from fastclip._plan import Plan

    scaled = torch.tensor([3.0, 1.0, 0.5, 0.1]) * 2.0 ** 16
    total = Plan.build([scaled], "t", "tensors").power_sums(60.0)[0].total
    assert total == math.inf
    assert math.isfinite(fastclip.get_total_norm([scaled / 2.0 ** 16], 60.0).item())


@pytest.mark.parametrize("p", [3.0, 60.0])
def test_other_p_training_run_is_unscale_then_clip(p):
    ours, ref = _run(_fastclip_sequence, p=p)
    _assert_runs_bitwise_equal(ours, ref)


def _amp_setup(grads, scale=4.0):
    params = [torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale(torch.tensor(1.0))
    return params, opt, scaler


def _shared_layouts(scale):
    """Grad lists whose memory overlaps: one tensor under two parameters, overlapping views of one
    buffer, and a sliced (strided) view listed twice."""
    shared = torch.tensor([3.0, 4.0]) * scale
    buffer = torch.arange(1.0, 7.0) * scale
    strided = (torch.arange(1.0, 13.0) * scale).reshape(3, 4)[:, 1:3]
    return {
        "same tensor": [shared, shared, torch.tensor([12.0]) * scale],
        "overlapping views": [buffer[0:4], buffer[2:6]],
        "sliced view twice": [strided, strided, torch.tensor([5.0]) * scale],
        "sliced view once": [strided, torch.tensor([5.0]) * scale],
    }


@pytest.mark.parametrize("p", [2.0, 3.0])
@pytest.mark.parametrize("max_norm", [1.0, 100.0], ids=["clipping", "not clipping"])
@pytest.mark.parametrize("layout", ["same tensor", "overlapping views", "sliced view twice", "sliced view once"])
def test_memory_listed_twice_gives_torchs_unscale_then_clip(layout, max_norm, p):
    """torch's unscale_ divides memory listed twice once per listing, so the unscaled norm is not
    the scaled norm over the scale: such sets take torch's unscale, then the clip, as p other than
    1, 2 and inf do. Sliced grads are read through copies, which must be taken after that unscale.
    Bitwise equal to ``scaler.unscale_`` + ``fastclip.clip_grad_norm_`` (norm, grads, scaler
    state)."""
    results = []
    for ours in (True, False):
        grads = _shared_layouts(4.0)[layout]
        params, opt, scaler = _amp_setup(grads)
        if ours:
            norm = fastclip.unscale_and_clip_(scaler, opt, max_norm, p)
        else:
            scaler.unscale_(opt)
            norm = fastclip.clip_grad_norm_(params, max_norm, p)
        state = scaler._per_optimizer_states[id(opt)]
        results.append((norm, [p.grad.clone() for p in params], state["stage"], state["found_inf_per_device"]))
    (norm, grads, stage, found), (ref_norm, ref_grads, ref_stage, ref_found) = results
    assert torch.equal(norm, ref_norm)
    for x, y in zip(grads, ref_grads):
        assert_bitwise_equal(x, y)
    assert stage is ref_stage and found.keys() == ref_found.keys()
    assert all(torch.equal(found[d], ref_found[d]) for d in found)


def test_memory_listed_twice_is_not_normed_by_the_fused_formula():
    """The fused formula (the scaled norm over the scale) gives another norm on a shared grad
    than torch's sequence: the test above tells the two paths apart."""
    grads = _shared_layouts(4.0)["same tensor"]
    scaled_norm = fastclip.get_total_norm(grads)
    params, opt, scaler = _amp_setup(grads)
    norm = fastclip.unscale_and_clip_(scaler, opt, 1.0)
    assert float(norm) != pytest.approx(float(scaled_norm) / 4.0)
