"""clip_and_step: parameters after N steps against clip-then-step, fused and not, with and without AMP."""

from __future__ import annotations

import math

import pytest
import torch

import fastclip
from fastclip import _cpu
from fastclip.step import reads_grad_scale
from device_style import device_style  # noqa: F401 (fixture)
from reference import param_with_grad

OPTIMIZERS = {
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd-fused": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
    "adagrad-fused": lambda ps: torch.optim.Adagrad(ps, lr=0.05, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
}
FUSED = [name for name in OPTIMIZERS if name.endswith("-fused")]


def _marked_amp_aware(name: str) -> bool:
    """Whether this torch marks the optimizer's step as reading ``grad_scale`` (torch 2.13's fused
    Adagrad is marked; 2.11's is not, and GradScaler unscales its grads itself)."""
    opt = OPTIMIZERS[name]([torch.nn.Parameter(torch.ones(2))])
    return bool(getattr(opt, "_step_supports_amp_scaling", False))


AMP_AWARE = [name for name in FUSED if _marked_amp_aware(name)]
STEPS = 8
INF_STEP = 3  # not the first: torch's fused SGD leaves its momentum buffer unset on a skipped first step
MAX_NORM = 0.5


def _model(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).to(device)


def _train(name, use_scaler, clip, steps=STEPS, device="cpu"):
    """Params after each step, and the norms, for ``clip(opt, model, scaler)`` doing clip + step."""
    model = _model(device)
    opt = OPTIMIZERS[name](model.parameters())
    scaler = torch.amp.GradScaler(device, growth_interval=3) if use_scaler else None
    g = torch.Generator().manual_seed(1)
    params, norms = [], []
    for step in range(steps):
        model.zero_grad()
        loss = model(torch.randn(5, 6, generator=g).to(device)).pow(2).sum()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler and step == INF_STEP:
            model[2].bias.grad[1] = math.inf
        norms.append(clip(opt, model, scaler))
        if scaler:
            scaler.update()
        params.append([q.detach().clone() for q in model.parameters()])
    return params, norms, opt, scaler


def _ours(opt, model, scaler):
    return fastclip.clip_and_step(opt, MAX_NORM, scaler=scaler)


def _sequence(clip_fn):
    def run(opt, model, scaler):
        if scaler:
            scaler.unscale_(opt)
        norm = clip_fn(model.parameters(), MAX_NORM)
        scaler.step(opt) if scaler else opt.step()
        return norm
    return run


def test_fused_optimizers_are_recognized():
    p = [torch.nn.Parameter(torch.ones(2))]
    assert {"adam-fused", "adamw-fused", "sgd-fused"} <= set(AMP_AWARE)
    assert [name for name in FUSED if reads_grad_scale(OPTIMIZERS[name](p))] == AMP_AWARE
    assert not any(reads_grad_scale(OPTIMIZERS[name](p)) for name in ("adam", "sgd"))
    mixed = torch.optim.Adam(p, lr=0.1, fused=True)
    mixed.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "fused": False})
    assert not reads_grad_scale(mixed)  # its step would refuse a grad_scale for that group


@pytest.mark.parametrize("use_scaler", [False, True], ids=["plain", "amp"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_params_match_torchs_clip_then_step(name, use_scaler):
    """Tolerance: fastclip's norm is float64-accumulated and torch's float32 (relative error up to
    ~1e-7 here), and the fused path divides by float32(1/coef) instead of multiplying by coef (about
    one float32 ulp per grad element). Both perturb each step by ~1e-7 of itself, over 8 steps."""
    ours, our_norms, opt, scaler = _train(name, use_scaler, _ours)
    ref, ref_norms, _, ref_scaler = _train(name, use_scaler, _sequence(torch.nn.utils.clip_grad_norm_))
    for step, (a, b) in enumerate(zip(ours, ref)):
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    clipped = sum(float(n) > MAX_NORM for n in our_norms if math.isfinite(float(n)))
    assert clipped >= STEPS // 2  # clipping really happens
    if use_scaler:
        assert torch.equal(scaler._scale, ref_scaler._scale)
        assert torch.equal(scaler._growth_tracker, ref_scaler._growth_tracker)
        assert float(our_norms[INF_STEP]) == math.inf
        for pa, pb in zip(ours[INF_STEP], ours[INF_STEP - 1]):
            assert torch.equal(pa, pb)  # the inf step was skipped
    for attr in ("grad_scale", "found_inf"):
        assert not hasattr(opt, attr)


@pytest.mark.parametrize("use_scaler", [False, True], ids=["plain", "amp"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_params_match_fastclip_clip_then_step(name, use_scaler):
    """Against clip_grad_norm_ with the same exact norm: non-fused optimizers are bit-identical.
    Fused ones divide by float32(1/coef) instead of multiplying by coef: each update differs by
    ~1e-7 of itself, far below a parameter's ulp, but where the sum p + update lands near a
    rounding boundary the parameter flips by one ulp; so at most one ulp per step."""
    ours, _, _, _ = _train(name, use_scaler, _ours)
    ref, _, _, _ = _train(name, use_scaler, _sequence(fastclip.clip_grad_norm_))
    for step, (a, b) in enumerate(zip(ours, ref)):
        for pa, pb in zip(a, b):
            if name in FUSED:
                ulp = torch.finfo(pb.dtype).eps * float(pb.abs().max())  # >= 1 ulp of any element
                torch.testing.assert_close(pa, pb, rtol=0, atol=(step + 1) * ulp)
            else:
                assert torch.equal(pa, pb)


@pytest.mark.parametrize("name", ["adamw-fused", "sgd"])
def test_device_style_backend_is_bitwise_equal(name, device_style, monkeypatch):
    """The tensor-only branch (a GPU backend's: no host read) gives the host branch's params."""
    device_run, _, _, device_scaler = _train(name, True, _ours)
    monkeypatch.undo()
    host_run, _, _, host_scaler = _train(name, True, _ours)
    for a, b in zip(device_run, host_run):
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb)
    assert torch.equal(device_scaler._scale, host_scaler._scale)


def test_unclipped_run_differs_beyond_tolerance():
    """Negative control for the tolerances above: not clipping changes the params far more."""
    def no_clip(opt, model, scaler):
        opt.step()
        return torch.tensor(0.0)

    ours, _, _, _ = _train("adam-fused", False, _ours)
    ref, _, _, _ = _train("adam-fused", False, no_clip)
    with pytest.raises(AssertionError):
        for pa, pb in zip(ours[-1], ref[-1]):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", AMP_AWARE)
def test_fused_path_never_rewrites_grads(name, monkeypatch):
    """The fused path reads the grads once and leaves the write to the optimizer's step."""
    def forbidden(*args, **kwargs):
        raise AssertionError("fastclip wrote the grads")

    monkeypatch.setattr(_cpu, "scale_", forbidden)
    monkeypatch.setattr(torch, "_foreach_mul_", forbidden)
    _train(name, False, _ours, steps=2)
    _train(name, True, _ours, steps=2)


@pytest.mark.parametrize("use_scaler", [False, True], ids=["plain", "amp"])
def test_a_fused_step_torch_does_not_mark_amp_aware_gets_clipped_grads(use_scaler, monkeypatch):
    """A fused optimizer whose step torch does not mark as reading ``grad_scale`` (fused Adagrad
    before torch 2.13, say) is not handed one: its grads are clipped (and unscaled) in place,
    then it steps, and the params are torch's clip-then-step params."""
    monkeypatch.setitem(OPTIMIZERS, "adagrad-unmarked", lambda ps: _unmarked(
        torch.optim.Adagrad(ps, lr=0.05, fused=True)))
    calls = []
    scale_ = _cpu.scale_
    monkeypatch.setattr(_cpu, "scale_", lambda *a: (calls.append(1), scale_(*a)))
    ours, _, opt, _ = _train("adagrad-unmarked", use_scaler, _ours)
    assert not reads_grad_scale(opt) and calls  # the grads were written by fastclip
    ref, _, _, _ = _train("adagrad-unmarked", use_scaler, _sequence(torch.nn.utils.clip_grad_norm_))
    for step, (a, b) in enumerate(zip(ours, ref)):
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=f"step {step}")


def _unmarked(opt):
    opt._step_supports_amp_scaling = False
    return opt


def test_non_fused_path_clips_then_steps(monkeypatch):
    """Negative control for the test above: the clip-then-step path does write the grads."""
    calls = []
    scale_ = _cpu.scale_
    monkeypatch.setattr(_cpu, "scale_", lambda *a: (calls.append(1), scale_(*a)))
    _train("adam", False, _ours, steps=2)
    assert calls


def test_grads_hold_the_clipped_grads_afterwards():
    """torch's fused kernels store the grad they used back into .grad: the clipped grads."""
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    fused, plain = ([param_with_grad(g.clone()) for g in grads] for _ in range(2))
    fastclip.clip_and_step(torch.optim.Adam(fused, lr=0.1, fused=True), 1.0)
    torch.nn.utils.clip_grad_norm_(plain, 1.0)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a.grad, b.grad, rtol=2.0 ** -23, atol=0)


def test_attributes_restored():
    w = param_with_grad(torch.tensor([3.0, 4.0]))
    opt = torch.optim.Adam([w], lr=0.1, fused=True)
    opt.grad_scale = None  # present but unset: kept as it was
    fastclip.clip_and_step(opt, 1.0)
    assert opt.grad_scale is None and not hasattr(opt, "found_inf")


def test_foreign_grad_scale_refused_untouched():
    w = param_with_grad(torch.tensor([3.0, 4.0]))
    opt = torch.optim.Adam([w], lr=0.1, fused=True)
    opt.grad_scale = torch.tensor(2.0)
    with pytest.raises(RuntimeError, match=r"clip_and_step: `optimizer` already has a `grad_scale`"):
        fastclip.clip_and_step(opt, 1.0)
    assert torch.equal(w.grad, torch.tensor([3.0, 4.0])) and torch.equal(w, torch.zeros(2))
    assert not opt.state


@pytest.mark.parametrize("name", ["adamw-fused", "sgd"])
def test_after_an_explicit_unscale(name):
    """scaler.unscale_ (e.g. to inspect grads) then clip_and_step: the grads are taken as unscaled."""
    def unscale_then_ours(opt, model, scaler):
        scaler.unscale_(opt)
        return fastclip.clip_and_step(opt, MAX_NORM, scaler=scaler)

    ours, _, _, scaler = _train(name, True, unscale_then_ours)
    ref, _, _, ref_scaler = _train(name, True, _sequence(torch.nn.utils.clip_grad_norm_))
    for a, b in zip(ours, ref):
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert torch.equal(scaler._scale, ref_scaler._scale)


@pytest.mark.parametrize("name", ["adam-fused", "sgd"])
def test_scaler_stage_errors(name):
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(RuntimeError, match=r"clip_and_step: `scaler` has no scale yet"):
        fastclip.clip_and_step(opt, 1.0, scaler=scaler)
    scaler.scale(model(torch.randn(2, 6)).sum()).backward()
    fastclip.clip_and_step(opt, 1.0, scaler=scaler)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called since the last update"):
        fastclip.clip_and_step(opt, 1.0, scaler=scaler)
    scaler.update()
    assert scaler._per_optimizer_states == {}


@pytest.mark.parametrize("args, exc, match", [
    (("nope", 1.0), TypeError, r"clip_and_step: `optimizer` must be a torch.optim.Optimizer, got 'nope'"),
    (("opt", "big"), TypeError, r"clip_and_step: `max_norm` must be a real number"),
    (("opt", 1.0, -2.0), ValueError, r"clip_and_step: `norm_type` must be a positive number"),
    (("opt", 1.0, 2.0, "scaler"), TypeError, r"clip_and_step: `scaler` must be a torch.amp.GradScaler"),
])
def test_bad_arguments_touch_nothing(args, exc, match):
    w = param_with_grad(torch.tensor([3.0, 4.0]))
    opt = torch.optim.Adam([w], lr=0.1, fused=True)
    args = [opt if a == "opt" else a for a in args]
    with pytest.raises(exc, match=match):
        fastclip.clip_and_step(*args)
    assert torch.equal(w.grad, torch.tensor([3.0, 4.0])) and torch.equal(w, torch.zeros(2))


def test_no_grads_still_steps():
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.1, fused=True)
    assert float(fastclip.clip_and_step(opt, 1.0)) == 0.0
    assert torch.equal(w, torch.zeros(2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("use_scaler", [False, True], ids=["plain", "amp"])
@pytest.mark.parametrize("name", ["adamw-fused", "sgd-fused", "adam"])
def test_cuda_matches_torch(name, use_scaler):
    ours, _, _, scaler = _train(name, use_scaler, _ours, device="cuda")
    ref, _, _, ref_scaler = _train(name, use_scaler, _sequence(torch.nn.utils.clip_grad_norm_), device="cuda")
    for a, b in zip(ours, ref):
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    if use_scaler:
        assert torch.equal(scaler._scale, ref_scaler._scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fused_path_never_syncs():
    model = _model("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    scaler.scale(model(torch.randn(5, 6, device="cuda")).sum()).backward()
    fastclip.clip_and_step(opt, 1.0, scaler=scaler)  # first step: lazy optimizer state
    scaler.update()
    scaler.scale(model(torch.randn(5, 6, device="cuda")).sum()).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastclip.clip_and_step(opt, 1.0, scaler=scaler)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_dtensor_grads(single_rank_mesh, monkeypatch):
    """FSDP2-style DTensor params and grads: the local shards are read, the power sum goes
    through the ranks' all-reduce, and the results equal those of plain tensors."""
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(6, 4, generator=g), torch.randn(5, generator=g)]
    grads = [torch.randn(6, 4, generator=g) * 2.0 ** 16, torch.randn(5, generator=g) * 2.0 ** 16]

    def run(as_dtensor, fused, bad=False):
        params = []
        for w, gr in zip(weights, grads):
            gr = gr.clone()
            if bad:
                gr[1] = math.inf
            if as_dtensor:
                w, gr = (distribute_tensor(t, single_rank_mesh, [Shard(0)]) for t in (w.clone(), gr))
            q = torch.nn.Parameter(w.clone())
            q.grad = gr
            params.append(q)
        opt = torch.optim.Adam(params, lr=0.1, fused=fused)
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(torch.zeros(()))
        norm = fastclip.clip_and_step(opt, 1.0, scaler=scaler)
        found = dict(scaler._per_optimizer_states[id(opt)]["found_inf_per_device"])
        scaler.update()
        full = [q.detach().full_tensor() if as_dtensor else q.detach() for q in params]
        return norm, full, found, scaler._scale

    dist = torch.distributed
    all_reduce, calls = dist.all_reduce, []
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: (calls.append(1), all_reduce(*a, **k))[1])
    for fused in (False, True):
        calls.clear()
        (n_dt, p_dt, _, s_dt) = run(True, fused)
        assert len(calls) == 1  # the power sum crossed the ranks, once
        (n_pl, p_pl, _, s_pl) = run(False, fused)
        assert len(calls) == 1  # plain tensors: no collective
        assert torch.equal(n_dt, n_pl) and torch.equal(s_dt, s_pl)
        for a, b in zip(p_dt, p_pl):
            assert torch.equal(a, b)
    norm, params, found, scale = run(True, True, bad=True)
    assert float(norm) == math.inf and float(found[torch.device("cpu")]) == 1.0
    assert float(scale) == 2.0 ** 15 and torch.equal(params[0], weights[0])  # skipped, backed off


@pytest.mark.parametrize("dtype, value, max_norm", [(torch.float32, 1e36, 1e-3), (torch.float64, 1e40, 1.0)])
@pytest.mark.parametrize("stage", ["plain", "amp", "unscaled"])
def test_a_coefficient_beyond_float32s_reciprocal_still_clips(dtype, value, max_norm, stage):
    """1/coef overflows float32 (norm / max_norm > 3.4e38): dividing by that grad_scale in the
    fused step would zero the grads, so they are scaled in place and the step divides by 1."""
    def run(ours: bool) -> torch.Tensor:
        p = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
        opt = torch.optim.SGD([p], lr=1.0, fused=True)
        p.grad = torch.full((4,), value, dtype=dtype)
        scaler = None
        if stage != "plain":
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
            scaler.scale(torch.ones(()))
            p.grad.mul_(2.0)
            if stage == "unscaled":
                scaler.unscale_(opt)
        if ours:
            fastclip.clip_and_step(opt, max_norm, scaler=scaler)
        else:
            if stage == "amp":
                scaler.unscale_(opt)
            fastclip.clip_grad_norm_([p], max_norm)
            opt.step() if scaler is None else scaler.step(opt)
        return p.detach()

    expected = run(False)
    assert (expected != 0).all()  # the clipped step moved every parameter
    torch.testing.assert_close(run(True), expected, rtol=2.0 ** -22, atol=0)


def test_the_amp_divisor_is_rounded_once():
    """With a scaler, the fused step divides by float32(1 / (inv_scale * coef)): the product is
    taken exactly and rounded to float32 once, so the divisor is within half an ulp of the exact
    value (a float32 product first would add a second rounding: up to one ulp). A scale that is
    not a power of two makes the product inexact in float32."""
    from fractions import Fraction

    from fastclip.clip_grad import clip_coefficient

    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for _ in range(200):
        p = torch.nn.Parameter(torch.zeros(6))
        opt = torch.optim.SGD([p], lr=0.1, fused=True)
        seen = []
        opt.step = lambda: seen.append(opt.grad_scale.clone())  # the step torch would run
        scaler = torch.amp.GradScaler("cpu", init_scale=1000.0)
        scaler.scale(torch.ones(()))
        p.grad = torch.randn(6, generator=g) * 1000.0
        norm = fastclip.clip_and_step(opt, 0.1, scaler=scaler)
        inv = scaler._scale.double().reciprocal().float()  # GradScaler's own 1/scale
        coef = clip_coefficient(0.1, norm)
        exact = 1 / (Fraction(float(inv)) * Fraction(float(coef)))
        (divisor,) = seen
        assert divisor.dtype == torch.float32 and 1.0 < float(divisor) < 2.0 ** 24
        ulp = float(torch.nextafter(divisor, torch.tensor(math.inf)) - divisor)  # float32's ulp
        worst = max(worst, float(abs(Fraction(float(divisor)) - exact) / Fraction(ulp)))
    assert worst <= 0.5 * (1 + 2.0 ** -20), worst


@pytest.mark.parametrize("name", ["adamw-fused", "sgd-fused", "sgd"])
def test_a_large_p_with_amp_steps_on_finite_grads(name):
    """At p = 60 and scale 2**16 the scaled grads' float64 power sum overflows (see test_amp):
    clip_and_step unscales first, so the finite grads are clipped and the step is taken."""
    runs = []
    for ours in (True, False):
        w = torch.nn.Parameter(torch.zeros(4))
        opt = OPTIMIZERS[name]([w])
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale((w * torch.tensor([3.0, 1.0, 0.5, 0.1])).sum()).backward()
        if ours:
            norm = fastclip.clip_and_step(opt, MAX_NORM, 60.0, scaler=scaler)
        else:
            scaler.unscale_(opt)
            norm = fastclip.clip_grad_norm_([w], MAX_NORM, 60.0)
            scaler.step(opt)
        scaler.update()
        runs.append((norm, w.detach().clone(), scaler.get_scale()))
    (norm, w, scale), (ref_norm, ref_w, ref_scale) = runs
    assert torch.equal(norm, ref_norm) and math.isfinite(float(norm))
    assert scale == ref_scale == 65536.0  # no backoff: nothing was taken for inf
    assert w.abs().sum() > 0  # the step was taken
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=0)


# --- memory listed twice, and optimizers whose step needs an argument ------------------------------

def _shared_grad_params(scale=1.0):
    """Three parameters: two share one grad tensor (tied weights written by hand), one has its own."""
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (2, 2, 1))
    shared = torch.tensor([3.0, 4.0]) * scale
    a.grad, b.grad, c.grad = shared, shared, torch.tensor([12.0]) * scale
    return [a, b, c]


@pytest.mark.parametrize("use_scaler", [False, True], ids=["plain", "amp"])
@pytest.mark.parametrize("name", AMP_AWARE)
def test_a_grad_shared_by_two_params_steps_as_torchs_sequence(name, use_scaler):
    """torch's clip scales memory listed twice once per listing (and its unscale_ divides it once
    per listing) before the step; a fused step would divide the shared grad in place once per
    parameter, so the first parameter would take another grad than the second. Bitwise equal to
    the sequence with fastclip's clip (the same exact norm)."""
    results = []
    for ours in (True, False):
        params = _shared_grad_params(4.0 if use_scaler else 1.0)
        opt = OPTIMIZERS[name](params)
        scaler = None
        if use_scaler:
            scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
            scaler.scale(torch.tensor(1.0))
        if ours:
            norm = fastclip.clip_and_step(opt, 1.0, scaler=scaler)
        else:
            if scaler:
                scaler.unscale_(opt)
            norm = fastclip.clip_grad_norm_(params, 1.0)
            scaler.step(opt) if scaler else opt.step()
        results.append((norm, [p.detach().clone() for p in params], [p.grad.clone() for p in params]))
    (norm, params, grads), (ref_norm, ref_params, ref_grads) = results
    assert torch.equal(norm, ref_norm)
    for x, y in zip(params + grads, ref_params + ref_grads):
        assert torch.equal(x, y)
    assert torch.equal(params[0], params[1])  # both took the same (twice-clipped) grad, as in torch


@pytest.mark.parametrize("use_scaler", [False, True], ids=["plain", "amp"])
def test_an_optimizer_whose_step_needs_a_closure_is_refused_before_any_write(use_scaler):
    """LBFGS.step(closure): clip_and_step calls step() with no argument, which would raise after
    the clip had written the grads (and the scaler recorded an unscale). Refused first."""
    w = param_with_grad(torch.tensor([768.0, 1024.0]))
    opt = torch.optim.LBFGS([w], lr=0.1)
    scaler = None
    if use_scaler:
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        scaler.scale(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"^clip_and_step: `optimizer` is a LBFGS whose step\(\) needs "
                                        r"arguments \(step\(closure\)\)"):
        fastclip.clip_and_step(opt, 1.0, scaler=scaler)
    assert torch.equal(w.grad, torch.tensor([768.0, 1024.0])) and torch.equal(w, torch.zeros(2))
    if use_scaler:
        scaler.unscale_(opt)  # the scaler recorded nothing: torch's own sequence still runs
        assert torch.equal(w.grad, torch.tensor([3.0, 4.0]))


def test_a_step_with_only_optional_arguments_is_accepted():
    class Custom(torch.optim.SGD):
        def step(self, closure=None, *, extra=1):
            return super().step(closure)

    w = param_with_grad(torch.tensor([3.0, 4.0]))
    assert float(fastclip.clip_and_step(Custom([w], lr=1.0), 1.0)) == 5.0
    assert torch.allclose(w.detach(), torch.tensor([-0.6, -0.8]))


@pytest.mark.parametrize("name", [n for n in AMP_AWARE if n != "sgd-fused"])
def test_a_sliced_grad_with_p_3_is_read_after_torchs_unscale(name):
    """p = 3 with a scaler unscales through torch before the norm pass; a sliced grad, read through
    a copy, must be copied after that unscale (the norm was the scaled one, 4x too large).
    (Not fused SGD: torch 2.13's fused CPU SGD reads a sliced grad as if it were contiguous, with
    or without fastclip.)"""
    results = []
    for ours in (True, False):
        w = torch.nn.Parameter(torch.zeros(3, 2))
        w.grad = (torch.arange(1.0, 13.0) * 4.0).reshape(3, 4)[:, 1:3]
        opt = OPTIMIZERS[name]([w])
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        scaler.scale(torch.tensor(1.0))
        if ours:
            norm = fastclip.clip_and_step(opt, 1.0, 3.0, scaler=scaler)
        else:
            scaler.unscale_(opt)
            norm = fastclip.clip_grad_norm_([w], 1.0, 3.0)
            scaler.step(opt)
        results.append((norm, w.detach().clone()))
    (norm, param), (ref_norm, ref_param) = results
    assert torch.equal(norm, ref_norm)
    torch.testing.assert_close(param, ref_param, rtol=0, atol=2 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("use_scaler", [False, True], ids=["plain", "amp"])
@pytest.mark.parametrize("name", FUSED)
def test_an_expanded_grad_is_refused_before_a_fused_step(name, use_scaler):
    """torch's fused CPU step reads and writes numel() elements from a grad's address: an expanded
    grad (one element, stride 0) would be read and written past its memory (here into the rest of
    the buffer it views; past a buffer of its own, the heap). torch's clip-then-step raises before
    its step; so does clip_and_step, before anything is written or stepped."""
    buffer = torch.arange(1.0, 65.0)
    w = torch.nn.Parameter(torch.zeros(64))
    w.grad = buffer[:1].expand(64)
    opt = OPTIMIZERS[name]([w])
    scaler = None
    if use_scaler:
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(torch.tensor(1.0))
    state = {k: v.clone() for k, v in opt.state[w].items()}  # Adagrad's starts filled
    with pytest.raises(RuntimeError, match="expanded view"):
        fastclip.clip_and_step(opt, 1e9, scaler=scaler)
    assert torch.equal(buffer, torch.arange(1.0, 65.0))
    assert torch.equal(w.detach(), torch.zeros(64))
    assert opt.state[w].keys() == state.keys()
    assert all(torch.equal(opt.state[w][k], v) for k, v in state.items())


@pytest.mark.parametrize("name", ["sgd-fused", "adam-fused", "sgd"])
def test_float64_grads_whose_scaled_power_sum_overflows_still_step(name):
    """Finite float64 grads beyond ~1.3e154 / scale: the scaled power sum overflows float64, but
    torch's unscale_ finds no inf and steps. So does clip_and_step (unscale first, then clip)."""
    results = []
    for ours in (True, False):
        w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        w.grad = torch.tensor([1e150, -2e150, 3.0], dtype=torch.float64) * 65536.0
        opt = OPTIMIZERS[name]([w])
        scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
        scaler.scale(torch.tensor(1.0))
        if ours:
            norm = fastclip.clip_and_step(opt, 1.0, scaler=scaler)
        else:
            scaler.unscale_(opt)
            norm = fastclip.clip_grad_norm_([w], 1.0)
            scaler.step(opt)
        scaler.update()
        results.append((norm, w.detach().clone(), float(scaler.get_scale())))
    (norm, param, scale), (ref_norm, ref_param, ref_scale) = results
    assert math.isfinite(float(ref_norm)) and (ref_param != 0).any()  # torch's sequence steps
    assert torch.equal(norm, ref_norm) and scale == ref_scale
    torch.testing.assert_close(param, ref_param, rtol=2 * torch.finfo(torch.float64).eps, atol=0)
