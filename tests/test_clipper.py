"""GradClipper and its policies: thresholds against transcriptions of the published algorithms,
grads against torch's clipping with the same threshold, non-finite modes, summary, and resuming
from a checkpoint bit for bit."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.utils.clip_grad as torch_clip
from torch.overrides import TorchFunctionMode

import fastclip
from fastclip import AutoClip, GradClipper, ZClip
from fastclip.policies import ClipPolicy
from device_style import DeviceStyleBackend
from host_reads import HostReadError, NoHostReads
from reference import ALL_DTYPES, assert_bitwise_equal

SHAPES = [(6, 5), (5,), (3, 2, 2), ()]


def grads_at(step: int, dtype=torch.float32, spikes=(), bad=None):
    """Deterministic grads of step ``step``: a slowly varying scale, x30 on ``spikes`` steps,
    and one element set to ``bad`` (inf/NaN) when given."""
    gen = torch.Generator().manual_seed(1000 + step)
    scale = 0.5 + 0.4 * math.sin(step / 3.0) + 0.2 * float(torch.rand((), generator=gen))
    if step in spikes:
        scale *= 30.0
    grads = [(torch.randn(s, dtype=torch.float64, generator=gen) * scale).to(dtype) for s in SHAPES]
    if bad is not None:
        grads[1][2] = bad
    return grads


def make_params(dtype=torch.float32):
    return [torch.zeros(s, dtype=dtype, requires_grad=True) for s in SHAPES]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def torch_clip_with(grads, threshold, norm):
    """torch's own clip of ``grads`` with ``threshold`` (a float or a 0-d tensor) and ``norm``."""
    params = make_params(grads[0].dtype)
    set_grads(params, grads)
    torch_clip._clip_grads_with_norm_(params, threshold, norm, foreach=False)
    return [p.grad for p in params]


# --- references: the published algorithms, transcribed in Python floats -----------------------


def percentile_linear(values, q):
    """The ``q``-th percentile of ``values`` by linear interpolation (numpy's default method), with
    the rounding steps of torch's quantile: rank ``q / 100 * (n - 1)``, then torch's lerp. numpy
    computes the rank another way (``n * q + (1 - q) - 1``), so its result can differ by an ulp."""
    xs = sorted(values)
    rank = q / 100.0 * (len(xs) - 1)
    below = math.floor(rank)
    lo, hi, w = xs[below], xs[min(below + 1, len(xs) - 1)], rank - below
    out = lo + w * (hi - lo) if w < 0.5 else hi - (hi - lo) * (1.0 - w)
    # The same definition as numpy's, to its last bit or one ulp away.
    assert abs(out - float(np.percentile(xs, q))) <= math.ulp(max(abs(lo), abs(hi)))
    return out


class AutoClipRef:
    """Seetharaman et al. (2020): append the norm, clip to the percentile of the history (the
    last ``history`` finite norms)."""

    def __init__(self, percentile, history):
        self.q, self.history, self.norms = percentile, history, []

    def threshold(self, norm, finite=True):
        if finite:
            self.norms.append(norm)
        window = self.norms[-self.history:]
        return percentile_linear(window, self.q) if window else math.nan


class ZClipRef:
    """Kumar et al. (2025), reference code's zscore / adaptive_scaling mode, clip_factor=1."""

    def __init__(self, alpha, z_thresh, warmup):
        self.alpha, self.z, self.warmup = alpha, z_thresh, warmup
        self.buffer, self.mean, self.var = [], None, None

    def threshold(self, norm, finite=True):
        if not finite:
            return math.inf
        if self.mean is None:
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) * (x - self.mean) for x in self.buffer) / len(self.buffer)
            return math.inf
        # torch's float64 sqrt, which the policy must use to stay on the device: on some CPU builds
        # it is not correctly rounded (1 ulp off for 140 of 20,000 random inputs on the CI VM),
        # where math.sqrt is, and which CPU the CI machine has varies.
        std = torch.tensor(self.var, dtype=torch.float64).sqrt().item()
        z = (norm - self.mean) / (std + 1e-6)
        clip = None
        if z > self.z:
            eta = z / self.z
            clip = self.mean + (self.z * std) / eta
        value = clip if clip is not None else norm
        self.mean = self.alpha * self.mean + (1 - self.alpha) * value
        d = value - self.mean
        self.var = self.alpha * self.var + (1 - self.alpha) * (d * d)
        return clip if clip is not None else math.inf


def run_against_reference(policy, ref, steps, dtype=torch.float32, spikes=(), bad_steps=(),
                          max_norm=None, nonfinite="propagate", bad=math.nan):
    params = make_params(dtype)
    clipper = GradClipper(params, max_norm=max_norm, policy=policy, nonfinite=nonfinite)
    cap = math.inf if max_norm is None else max_norm
    clipped = []
    for step in range(steps):
        grads = grads_at(step, dtype, spikes, bad if step in bad_steps else None)
        set_grads(params, grads)
        norm = clipper.step()
        finite = math.isfinite(float(norm))
        expected = ref.threshold(float(norm), finite)
        expected = cap if math.isnan(expected) else min(expected, cap)
        got = float(clipper.threshold)
        assert got == float(torch.tensor(expected, dtype=norm.dtype)), (step, got, expected)
        if not finite:
            continue
        want = torch_clip_with(grads, clipper.threshold, norm)
        for p, w in zip(params, want):
            assert_bitwise_equal(p.grad, w)
        if any(not torch.equal(p.grad, g) for p, g in zip(params, grads)):
            clipped.append(step)
    return clipper, clipped


# --- policies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_fixed_threshold_is_clip_grad_norm(dtype):
    ours, theirs = make_params(dtype), make_params(dtype)
    clipper = GradClipper(ours, max_norm=0.8)
    changed = 0
    for step in range(6):
        grads = grads_at(step, dtype)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        norm = clipper.step()
        expected = fastclip.clip_grad_norm_(theirs, max_norm=0.8)
        assert_bitwise_equal(norm, expected)
        for a, b in zip(ours, theirs):
            assert_bitwise_equal(a.grad, b.grad)
        # and torch's own scaling, given that norm:
        for a, w in zip(ours, torch_clip_with(grads, 0.8, norm)):
            assert_bitwise_equal(a.grad, w)
        changed += any(not torch.equal(a.grad, g) for a, g in zip(ours, grads))
    assert changed >= 3
    assert float(clipper.threshold) == float(torch.tensor(0.8, dtype=norm.dtype))


@pytest.mark.parametrize("norm_type", [1.0, 3.0, math.inf])
def test_fixed_threshold_other_norms(norm_type):
    ours, theirs = make_params(), make_params()
    clipper = GradClipper(ours, max_norm=1.5, norm_type=norm_type)
    for step in range(3):
        set_grads(ours, grads_at(step))
        set_grads(theirs, grads_at(step))
        assert_bitwise_equal(clipper.step(), fastclip.clip_grad_norm_(theirs, 1.5, norm_type))
        for a, b in zip(ours, theirs):
            assert_bitwise_equal(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_autoclip_matches_reference(dtype):
    clipper, clipped = run_against_reference(AutoClip(percentile=25, history=9),
                                             AutoClipRef(25, 9), steps=30, dtype=dtype)
    assert 15 <= len(clipped) <= 29  # about 75% of steps clip (the history's percentile is below them)


def test_autoclip_cap_and_first_step():
    # max_norm caps the percentile; the first step's threshold is its own norm (torch then scales
    # by norm / (norm + 1e-6), as the paper's code does through clip_grad_norm_).
    run_against_reference(AutoClip(percentile=90, history=50), AutoClipRef(90, 50), steps=12,
                          max_norm=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_zclip_matches_reference_and_clips_spikes(dtype):
    spikes = (14, 22, 23)
    clipper, clipped = run_against_reference(ZClip(alpha=0.9, z_thresh=2.5, warmup=8),
                                             ZClipRef(0.9, 2.5, 8), steps=30, dtype=dtype,
                                             spikes=spikes)
    # The spikes, and step 24: a natural peak (norm 8.7 against mean 4.3, std 1.4: z = 3.3).
    # Nothing during warmup, nor right after the spikes (the EMA took their clipped values).
    assert clipped == [14, 22, 23, 24]


def test_zclip_warmup_uses_max_norm_and_skips_nonfinite():
    # During warmup only max_norm clips; a NaN step neither clips by z nor enters the statistics.
    run_against_reference(ZClip(alpha=0.97, z_thresh=2.0, warmup=5), ZClipRef(0.97, 2.0, 5),
                          steps=20, spikes=(12,), bad_steps=(3, 9), max_norm=1.2, nonfinite="skip")


def test_autoclip_history_ignores_nonfinite_steps():
    run_against_reference(AutoClip(percentile=50, history=6), AutoClipRef(50, 6), steps=16,
                          bad_steps=(0, 4, 5), nonfinite="zero")


@pytest.mark.parametrize("bad", [math.inf, -math.inf], ids=["inf", "-inf"])
def test_autoclip_history_ignores_infinite_steps(bad):
    # An inf norm must not enter the history either (nanquantile would count it as the largest).
    run_against_reference(AutoClip(percentile=50, history=6), AutoClipRef(50, 6), steps=16,
                          bad_steps=(1, 4, 9), nonfinite="skip", bad=bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_zclip_statistics_skip_nonfinite_steps_after_warmup(bad):
    # No cap, so every threshold is ZClip's own: a non-finite step after the warmup must leave the
    # EMA's mean and variance as they were, and the spikes after it are still clipped.
    spikes = (14, 22, 23)
    clipper, clipped = run_against_reference(ZClip(alpha=0.9, z_thresh=2.5, warmup=8),
                                             ZClipRef(0.9, 2.5, 8), steps=30, spikes=spikes,
                                             bad_steps=(10, 18), nonfinite="skip", bad=bad)
    assert set(spikes) <= set(clipped)


# --- non-finite grads --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("policy", [None, AutoClip(history=4), ZClip(warmup=2)],
                         ids=["fixed", "autoclip", "zclip"])
def test_nonfinite_modes(bad, policy):
    def fresh(mode):
        params = make_params()
        clipper = GradClipper(params, max_norm=1.0, policy=policy, nonfinite=mode)
        for step in range(3):  # some history first
            set_grads(params, grads_at(step))
            clipper.step()
        set_grads(params, grads_at(3, bad=bad))
        return params, clipper

    grads = grads_at(3, bad=bad)

    params, clipper = fresh("propagate")  # torch's behaviour: scaled by a 0 or NaN coefficient
    norm = clipper.step()
    torch_params = make_params()
    set_grads(torch_params, grads)
    torch.nn.utils.clip_grad_norm_(torch_params, clipper.threshold)
    for p, q in zip(params, torch_params):
        assert_bitwise_equal(p.grad, q.grad, nan_bits=False)
    assert bool(clipper.found_nonfinite) and not bool(clipper.skipped)

    params, clipper = fresh("error")
    before = clipper.state_dict()
    with pytest.raises(RuntimeError, match="nonfinite='error'.*no gradient was changed"):
        clipper.step()
    for p, g in zip(params, grads):
        assert_bitwise_equal(p.grad, g, nan_bits=False)
    after = clipper.state_dict()
    assert after["steps"] == before["steps"] == 3
    for key in before["state"]:
        assert torch.equal(before["state"][key].nan_to_num(7.0), after["state"][key].nan_to_num(7.0))

    params, clipper = fresh("skip")
    norm = clipper.step()
    assert not math.isfinite(float(norm)) and bool(clipper.skipped) and bool(clipper.found_nonfinite)
    for p, g in zip(params, grads):
        assert_bitwise_equal(p.grad, g)  # untouched, bit for bit
    set_grads(params, grads_at(4))
    clipper.step()
    assert not bool(clipper.skipped)  # negative control: a finite step is not skipped

    params, clipper = fresh("zero")
    clipper.step()
    for p in params:
        assert_bitwise_equal(p.grad, torch.zeros_like(p.grad))
    assert bool(clipper.found_nonfinite) and not bool(clipper.skipped)
    assert clipper.summary()["nonfinite_steps"] == 1


def test_skip_and_zero_leave_finite_steps_as_propagate():
    runs = {}
    for mode in ("propagate", "skip", "zero"):
        params = make_params()
        clipper = GradClipper(params, max_norm=0.7, nonfinite=mode)
        out = []
        for step in range(5):
            set_grads(params, grads_at(step))
            out.append((clipper.step(), [p.grad.clone() for p in params]))
        runs[mode] = out
    for mode in ("skip", "zero"):
        for (n1, g1), (n2, g2) in zip(runs[mode], runs["propagate"]):
            assert_bitwise_equal(n1, n2)
            for a, b in zip(g1, g2):
                assert_bitwise_equal(a, b)


# --- no host reads in the step -----------------------------------------------------------------


_GUARD: list = []  # the active NoHostReads, for the stand-in backend's own reads


def _lenient(fn):
    def call(*args, **kwargs):
        with _GUARD[-1].paused() if _GUARD else contextlib.nullcontext():
            return fn(*args, **kwargs)
    return call


class _LenientBackend(DeviceStyleBackend):
    """The device-style backend; a real device backend reads nothing, so the CPU stand-in's own
    read of the coefficient is allowed."""

    scale_ = staticmethod(_lenient(DeviceStyleBackend.scale_))


@pytest.mark.parametrize("policy", [None, AutoClip(history=5), ZClip(warmup=3)],
                         ids=["fixed", "autoclip", "zclip"])
@pytest.mark.parametrize("mode", ["propagate", "skip"])
def test_step_never_reads_device_values(monkeypatch, policy, mode):
    """With a device-style backend, a step reads no tensor value back (a sync on a GPU)."""
    from fastclip import _plan

    monkeypatch.setattr(_plan, "_backend_for", lambda device: _LenientBackend)
    params = make_params()
    clipper = GradClipper(params, max_norm=2.0, policy=policy, nonfinite=mode)
    for step in range(8):
        set_grads(params, grads_at(step, spikes=(6,), bad=math.nan if step == 4 else None))
        with NoHostReads() as guard:
            _GUARD.append(guard)
            try:
                clipper.step()
            finally:
                _GUARD.pop()
    with NoHostReads():  # negative control: the guard does catch a read
        with pytest.raises(HostReadError, match="read a tensor value back"):
            float(clipper.threshold)
    assert clipper.summary()["steps"] == 8


# --- ready for CUDA graph capture: replays must do what eager steps do ---------------------------


class _OpTrace(TorchFunctionMode):
    """Records each torch call as (name, its non-tensor arguments, its tensors' shapes/dtypes),
    except those made inside a stand-in backend (a real one runs kernels, not torch ops)."""

    paused = 0

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _OpTrace.paused:
            return func(*args, **kwargs)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = args[1] if len(args) > 1 else None
            for i in index if isinstance(index, tuple) else (index,):
                if isinstance(i, torch.Tensor) and i.dim() == 0 and not i.is_floating_point() \
                        and i.dtype != torch.bool:
                    # torch reads such an index back to the host (a sync, illegal under capture)
                    raise AssertionError("a 0-d integer tensor used as an index")

        def describe(x):
            if isinstance(x, torch.Tensor):
                return ("tensor", tuple(x.shape), x.dtype)
            if isinstance(x, (list, tuple)):
                return tuple(describe(y) for y in x)
            return x if isinstance(x, (int, float, bool, str, type(None), torch.dtype)) else type(x)

        name = getattr(func, "__qualname__", repr(func))
        self.ops.append((name, describe(args), tuple(sorted((k, describe(v)) for k, v in kwargs.items()))))
        return func(*args, **kwargs)


def _untraced(fn):
    def call(*args, **kwargs):
        _OpTrace.paused += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _OpTrace.paused -= 1
    return call


class _UntracedBackend(DeviceStyleBackend):
    power_sums = staticmethod(_untraced(DeviceStyleBackend.power_sums))
    scale_ = staticmethod(_untraced(DeviceStyleBackend.scale_))


def _state_tensors(clipper):
    return {**clipper._state, **{f"policy.{k}": v for k, v in (clipper._policy_state or {}).items()}}


@pytest.mark.parametrize("policy", [None, AutoClip(history=5), ZClip(warmup=3)],
                         ids=["fixed", "autoclip", "zclip"])
@pytest.mark.parametrize("mode", ["propagate", "skip"])
def test_steps_are_replayable(monkeypatch, policy, mode):
    """A CUDA graph replays the tensor ops of the captured step on the same memory. So after the
    first step, (1) every step issues the same torch ops with the same Python constants (no
    Python counter in an index, no branch on a value) and (2) the clipper's state tensors are
    updated in place (a rebinding would leave a replay reading stale state). Checked here with
    the device-style backend, for finite, spiking and NaN steps."""
    from fastclip import _plan

    monkeypatch.setattr(_plan, "_backend_for", lambda device: _UntracedBackend)
    params = make_params()
    clipper = GradClipper(params, max_norm=2.0, policy=policy, nonfinite=mode, window=4)
    set_grads(params, grads_at(0))
    clipper.step()  # the warm-up step (allocates the state), as before a capture
    state = _state_tensors(clipper)
    pointers = {k: v.data_ptr() for k, v in state.items()}
    traces = []
    for step in range(1, 9):
        set_grads(params, grads_at(step, spikes=(6,), bad=math.nan if step == 4 else None))
        with _OpTrace() as trace:
            clipper.step()
        traces.append(trace.ops)
    assert all(t == traces[0] for t in traces[1:])
    assert _state_tensors(clipper).keys() == state.keys()
    for k, v in _state_tensors(clipper).items():
        assert v is state[k] and v.data_ptr() == pointers[k], k
    assert clipper.steps == 9


def test_the_op_trace_sees_a_python_index():
    """Negative controls for the test above: a Python int in an index shows in the trace, and a
    0-d integer tensor index (read back by torch) is refused."""
    buf = torch.zeros(4)
    traces = []
    for i in range(2):
        with _OpTrace() as trace:
            buf[i % 4] = 1.0
        traces.append(trace.ops)
    assert traces[0] != traces[1]
    with _OpTrace(), pytest.raises(AssertionError, match="0-d integer tensor"):
        buf[torch.tensor(1)] = 2.0


def test_load_state_dict_writes_into_the_existing_state():
    """Loading into a clipper that has stepped copies into its state tensors (a CUDA graph
    captured before the load keeps pointing at live, loaded state)."""
    params = make_params()
    saved = GradClipper(params, max_norm=1.0, policy=ZClip(warmup=2))
    for step in range(5):
        set_grads(params, grads_at(step))
        saved.step()
    target_params = make_params()
    target = GradClipper(target_params, max_norm=1.0, policy=ZClip(warmup=2))
    set_grads(target_params, grads_at(0))
    target.step()
    before = {k: (v, v.data_ptr()) for k, v in _state_tensors(target).items()}
    target.load_state_dict(saved.state_dict())
    for k, v in _state_tensors(target).items():
        assert v is before[k][0] and v.data_ptr() == before[k][1], k
    assert target.summary() == saved.summary() and target.steps == 5


def test_checkpoint_without_the_step_counter_loads():
    """A state saved before the device step counter existed resumes with its step count."""
    params = make_params()
    clipper = GradClipper(params, max_norm=1.0, policy=AutoClip(history=3))
    for step in range(4):
        set_grads(params, grads_at(step))
        clipper.step()
    state = clipper.state_dict()
    del state["state"]["step"]
    resumed = GradClipper(make_params(), max_norm=1.0, policy=AutoClip(history=3))
    resumed.load_state_dict(state)
    assert resumed.steps == 4 and resumed.summary() == clipper.summary()


# --- summary -----------------------------------------------------------------------------------


def test_summary_counts_and_percentiles():
    params = make_params()
    clipper = GradClipper(params, max_norm=1.5, nonfinite="skip", window=8)
    norms, clipped = [], 0
    for step in range(20):
        bad = math.inf if step in (5, 17) else None
        set_grads(params, grads_at(step, bad=bad))
        before = [p.grad.clone() for p in params]
        norm = float(clipper.step())
        norms.append(norm)
        clipped += math.isfinite(norm) and any(not torch.equal(p.grad, b) for p, b in zip(params, before))
    s = clipper.summary(percentiles=(0, 50, 90, 100))
    assert s["steps"] == 20 and s["nonfinite_steps"] == 2
    assert s["clipped_steps"] == clipped and 0 < clipped < 18
    assert s["clipped_fraction"] == clipped / 20
    window = [x for x in norms[-8:] if math.isfinite(x)]
    for q, value in s["norm_percentiles"].items():
        assert value == pytest.approx(float(np.percentile(window, q)), rel=1e-15, abs=0)
    assert s["threshold"] == pytest.approx(1.5, rel=1e-7)
    empty = GradClipper(make_params()).summary()
    assert empty["steps"] == 0 and math.isnan(empty["norm_percentiles"][50])
    with pytest.raises(ValueError, match="`percentiles` must be in"):
        clipper.summary(percentiles=(150,))


def test_summary_does_not_count_a_nonfinite_step_as_clipped():
    # With "propagate", an inf norm scales the grads by 0: a non-finite step, not a clipped one.
    params = make_params()
    clipper = GradClipper(params, max_norm=100.0, nonfinite="propagate")
    for step in range(4):
        set_grads(params, grads_at(step, bad=math.inf if step == 2 else None))
        clipper.step()
    s = clipper.summary()
    assert s["steps"] == 4 and s["nonfinite_steps"] == 1
    assert s["clipped_steps"] == 0 and s["clipped_fraction"] == 0.0


# --- checkpoints -------------------------------------------------------------------------------


def _run(clipper, params, steps, spikes, bad_steps):
    out = []
    for step in steps:
        set_grads(params, grads_at(step, spikes=spikes, bad=math.nan if step in bad_steps else None))
        norm = clipper.step()
        out.append((norm.clone(), [p.grad.clone() for p in params], clipper.threshold.clone()))
    return out


def _assert_same(run_a, run_b):
    for (na, ga, ta), (nb, gb, tb) in zip(run_a, run_b):
        assert_bitwise_equal(na, nb, nan_bits=False)
        assert_bitwise_equal(ta, tb)
        for a, b in zip(ga, gb):
            assert_bitwise_equal(a, b, nan_bits=False)


@pytest.mark.parametrize("policy", [None, AutoClip(percentile=20, history=7), ZClip(alpha=0.9, warmup=5)],
                         ids=["fixed", "autoclip", "zclip"])
def test_resume_from_checkpoint_is_bitwise_identical(policy):
    total, k, spikes, bad = 26, 11, (15, 19), (8,)
    # A cap high enough that the adaptive thresholds decide.
    kwargs = dict(max_norm=3.0 if policy is None else 50.0, policy=policy, nonfinite="skip", window=10)
    params = make_params()
    full = GradClipper(params, **kwargs)
    uninterrupted = _run(full, params, range(total), spikes, bad)

    params = make_params()
    first = GradClipper(params, **kwargs)
    _run(first, params, range(k), spikes, bad)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = make_params()
    resumed = GradClipper(resumed_params, **kwargs)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    tail = _run(resumed, resumed_params, range(k, total), spikes, bad)
    _assert_same(tail, uninterrupted[k:])
    assert resumed.steps == total and resumed.summary() == full.summary()

    if policy is not None:  # negative control: without the checkpoint the thresholds differ
        fresh_params = make_params()
        fresh = _run(GradClipper(fresh_params, **kwargs), fresh_params, range(k, total), spikes, bad)
        assert any(float(a[2]) != float(b[2]) for a, b in zip(fresh, uninterrupted[k:]))


def test_load_state_dict_rejects_other_configurations():
    params = make_params()
    clipper = GradClipper(params, max_norm=1.0, policy=ZClip(warmup=3))
    set_grads(params, grads_at(0))
    clipper.step()
    state = clipper.state_dict()
    with pytest.raises(ValueError, match=r"configured differently \(policy: saved"):
        GradClipper(make_params(), max_norm=1.0, policy=ZClip(warmup=4)).load_state_dict(state)
    with pytest.raises(ValueError, match="max_norm: saved 1.0, here 2.0"):
        GradClipper(make_params(), max_norm=2.0, policy=ZClip(warmup=3)).load_state_dict(state)
    with pytest.raises(ValueError, match="not a GradClipper state"):
        GradClipper(make_params()).load_state_dict({"steps": 3})
    same = GradClipper(make_params(), max_norm=1.0, policy=ZClip(warmup=3))
    same.load_state_dict(state)  # the same configuration loads
    assert same.steps == 1
    unstarted = GradClipper(make_params())
    GradClipper(make_params()).load_state_dict(unstarted.state_dict())  # before any step, too


@dataclasses.dataclass(frozen=True)
class _Fraction(ClipPolicy):
    """A policy of a user's own: a fraction of the running maximum of the norms."""

    fraction: float = 0.5

    def init_state(self, device):
        return {"peak": torch.zeros((), dtype=torch.float64, device=device)}

    def threshold(self, state, step, norm, finite):
        state["peak"].copy_(torch.where(finite, torch.maximum(state["peak"], norm), state["peak"]))
        return state["peak"] * self.fraction


class _PlainFraction(ClipPolicy):  # not a dataclass
    def init_state(self, device):
        return _Fraction().init_state(device)

    def threshold(self, state, step, norm, finite):
        return _Fraction().threshold(state, step, norm, finite)


@pytest.mark.parametrize("policy_class", [_Fraction, _PlainFraction], ids=["dataclass", "plain"])
def test_checkpoint_of_a_policy_of_ones_own(policy_class):
    params = make_params()
    clipper = GradClipper(params, max_norm=50.0, policy=policy_class())
    for step in range(4):
        set_grads(params, grads_at(step))
        clipper.step()
    state = clipper.state_dict()
    assert state["config"]["policy"]["name"] == policy_class.__name__
    resumed = GradClipper(make_params(), max_norm=50.0, policy=policy_class())
    resumed.load_state_dict(state)
    assert resumed.steps == 4
    assert_bitwise_equal(resumed._policy_state["peak"], clipper._policy_state["peak"])
    with pytest.raises(ValueError, match="configured differently"):  # another class
        GradClipper(make_params(), max_norm=50.0, policy=ZClip()).load_state_dict(state)
    if policy_class is _Fraction:  # a dataclass's fields are checked too
        assert state["config"]["policy"] == {"name": "_Fraction", "fraction": 0.5}
        with pytest.raises(ValueError, match="configured differently"):
            GradClipper(make_params(), max_norm=50.0,
                        policy=_Fraction(fraction=0.25)).load_state_dict(state)


# --- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(policy=0.5), TypeError, "`policy` must be None, fastclip.AutoClip(...), fastclip.ZClip(...) "
                                  "or a fastclip.ClipPolicy of your own, got 0.5 of type float (pass a "
                                  "fixed threshold as `max_norm`)"),
    (dict(policy="zclip"), TypeError, "`policy`"),
    (dict(nonfinite="ignore"), ValueError, "`nonfinite` must be one of 'propagate', 'error', 'skip', "
                                           "'zero', got 'ignore'"),
    (dict(max_norm=-1.0), ValueError, "`max_norm` must be a non-negative number, got -1.0"),
    (dict(max_norm=math.nan), ValueError, "`max_norm`"),
    (dict(max_norm="1"), TypeError, "`max_norm` must be a real number or None"),
    (dict(max_norm=None), ValueError, "`max_norm` is the fixed threshold when `policy` is None"),
    (dict(norm_type=0), ValueError, "`norm_type`"),
    (dict(window=0), ValueError, "`window` must be an integer in [1, 16777216], got 0"),
    # torch.nanquantile's limit: summary() could never read a longer window.
    (dict(window=2**24 + 1), ValueError, "`window` must be an integer in [1, 16777216]"),
    (dict(max_norm=torch.tensor([1.0, 2.0])), TypeError, "`max_norm` must be a real number, a "
                                                         "one-element tensor or None"),
])
def test_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match="GradClipper") as info:
        GradClipper(make_params(), **kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize("make, error, words", [
    (lambda: AutoClip(percentile=101), ValueError,
     "AutoClip: `percentile` must be in [0.0, 100.0], got 101.0"),
    (lambda: AutoClip(percentile="10"), TypeError, "AutoClip: `percentile` must be a real number"),
    (lambda: AutoClip(history=0), ValueError,
     "AutoClip: `history` must be an integer in [1, 16777216], got 0"),
    (lambda: AutoClip(history=2.5), ValueError, "`history`"),
    (lambda: AutoClip(history=2**24 + 1), ValueError, "AutoClip: `history` must be an integer in"),
    (lambda: ZClip(alpha=1.0), ValueError, "ZClip: `alpha` must be in (0.0, 1.0), got 1.0"),
    (lambda: ZClip(z_thresh=0), ValueError, "ZClip: `z_thresh` must be in (0.0, inf)"),
    (lambda: ZClip(warmup=0), ValueError, "ZClip: `warmup` must be an integer in [1, 16777216], got 0"),
    (lambda: ZClip(warmup=10**30), ValueError, "ZClip: `warmup` must be an integer in"),
])
def test_bad_policy_arguments(make, error, words):
    with pytest.raises(error) as info:
        make()
    assert words in str(info.value)


def test_infinite_max_norm_only_records():
    params = make_params()
    clipper = GradClipper(params, max_norm=math.inf)
    for step in range(4):
        grads = grads_at(step, spikes=(2,))
        set_grads(params, grads)
        clipper.step()
        for p, g in zip(params, grads):
            assert_bitwise_equal(p.grad, g)
    s = clipper.summary()
    assert s["steps"] == 4 and s["clipped_steps"] == 0 and s["norm_percentiles"][100] > 10


def test_parameters_without_grads_and_bad_elements():
    params = make_params()
    clipper = GradClipper(params)
    assert float(clipper.step()) == 0.0 and clipper.steps == 0  # no grads: nothing recorded
    with pytest.raises(TypeError, match=r"GradClipper: every element of `parameters`.*index 1"):
        GradClipper([params[0], 3.0])
    gen_clipper = GradClipper(p for p in params)  # a generator is read once, like an optimizer's
    set_grads(params, grads_at(0))
    assert math.isfinite(float(gen_clipper.step())) and gen_clipper.steps == 1


def test_mixed_dtypes_and_policy_objects_are_shareable():
    policy = ZClip(warmup=2)
    a, b = make_params(torch.bfloat16), make_params(torch.float64)
    ca, cb = GradClipper(a, policy=policy), GradClipper(b, policy=policy)
    for step in range(4):
        set_grads(a, grads_at(step, torch.bfloat16))
        set_grads(b, grads_at(step + 50, torch.float64))
        assert ca.step().dtype == torch.float32 and cb.step().dtype == torch.float64
    # Each clipper keeps its own state: the shared policy object holds none.
    assert ca._policy_state["mean"] != cb._policy_state["mean"]
    assert isinstance(policy, ClipPolicy) and "GradClipper(" in repr(ca)


# --- a real GPU --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy", [None, AutoClip(history=5), ZClip(warmup=3)],
                         ids=["fixed", "autoclip", "zclip"])
@pytest.mark.parametrize("mode", ["propagate", "skip", "zero"])
def test_cuda_matches_cpu_and_never_syncs(policy, mode):
    runs = {}
    for device in ("cpu", "cuda"):
        params = [p.to(device).detach().requires_grad_() for p in make_params()]
        clipper = GradClipper(params, max_norm=2.0, policy=policy, nonfinite=mode)
        out = []
        for step in range(10):
            grads = grads_at(step, spikes=(7,), bad=math.nan if step == 4 else None)
            for p, g in zip(params, grads):
                p.grad = g.to(device)
            if device == "cuda" and step >= 2:  # after the first steps (kernel compilation)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                norm = clipper.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            out.append((norm.cpu(), [p.grad.cpu() for p in params], clipper.threshold.cpu(),
                        clipper.skipped.cpu()))
        runs[device] = (out, clipper.summary())
    for (na, ga, ta, sa), (nb, gb, tb, sb) in zip(runs["cuda"][0], runs["cpu"][0]):
        # CUDA's norm sums in another order: thresholds and grads agree to float32 rounding.
        torch.testing.assert_close(na, nb, rtol=1e-6, atol=0, equal_nan=True)
        torch.testing.assert_close(ta, tb, rtol=1e-6, atol=0, equal_nan=True)
        assert bool(sa) == bool(sb)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=0, equal_nan=True)
    assert runs["cuda"][1]["clipped_steps"] == runs["cpu"][1]["clipped_steps"]
    assert runs["cuda"][1]["nonfinite_steps"] == runs["cpu"][1]["nonfinite_steps"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy", [None, AutoClip(history=5), ZClip(warmup=3)],
                         ids=["fixed", "autoclip", "zclip"])
@pytest.mark.parametrize("mode", ["propagate", "skip", "zero"])
def test_cuda_graph_replays_step_like_eager_steps(policy, mode):
    """Steps 0-1 eager (the second on a side stream, as torch advises before capturing), step 2
    captured, steps 3-9 replays with each step's grads copied into the same buffers: norms,
    grads, thresholds, flags and the summary match an eager CPU clipper's."""
    steps = 10
    cpu_params = make_params()
    cpu_clipper = GradClipper(cpu_params, max_norm=2.0, policy=policy, nonfinite=mode)
    expected = []
    for step in range(steps):
        set_grads(cpu_params, grads_at(step, spikes=(7,), bad=math.nan if step == 5 else None))
        norm = cpu_clipper.step()
        expected.append((norm, [p.grad.clone() for p in cpu_params], cpu_clipper.threshold.clone(),
                         cpu_clipper.skipped.clone()))

    params = [p.cuda().detach().requires_grad_() for p in make_params()]
    clipper = GradClipper(params, max_norm=2.0, policy=policy, nonfinite=mode)
    for p, g in zip(params, grads_at(0, spikes=(7,))):
        p.grad = g.cuda()

    def load(step):
        for p, g in zip(params, grads_at(step, spikes=(7,), bad=math.nan if step == 5 else None)):
            p.grad.copy_(g)

    got = []
    clipper.step()
    got.append(None)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        load(1)
        got.append(clipper.step())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    load(2)
    with torch.cuda.graph(graph):
        norm = clipper.step()
    for step in range(2, steps):
        if step > 2:
            load(step)
        graph.replay()  # the capture did not run the step: replay 2 is step 2
        torch.cuda.synchronize()
        e_norm, e_grads, e_threshold, e_skipped = expected[step]
        torch.testing.assert_close(norm.cpu(), e_norm, rtol=1e-6, atol=0, equal_nan=True)
        torch.testing.assert_close(clipper.threshold.cpu().to(e_threshold.dtype), e_threshold,
                                   rtol=1e-6, atol=0, equal_nan=True)
        assert bool(clipper.skipped) == bool(e_skipped)
        for p, e in zip(params, e_grads):
            torch.testing.assert_close(p.grad.cpu(), e, rtol=2e-6, atol=0, equal_nan=True)
    summary, e_summary = clipper.summary(), cpu_clipper.summary()
    assert summary["steps"] == e_summary["steps"] == steps
    assert summary["clipped_steps"] == e_summary["clipped_steps"]
    assert summary["nonfinite_steps"] == e_summary["nonfinite_steps"] == 1


def test_a_fixed_threshold_is_reported_exactly_after_a_dtype_change():
    """max_norm in a float64 step is max_norm itself, not float32's rounding of it from an
    earlier float32 step."""
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    clipper = fastclip.GradClipper([p], max_norm=0.1)
    clipper.step()
    assert clipper.threshold.dtype == torch.float32
    p.data = p.data.double()
    p.grad = torch.ones(3, dtype=torch.float64)
    clipper.step()
    assert clipper.threshold.dtype == torch.float64 and clipper.threshold.item() == 0.1
    assert clipper.summary()["threshold"] == 0.1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_threshold_attribute_is_not_the_clippers_state(dtype):
    """``threshold`` is the caller's to keep (or change); the fixed threshold the clipper saves in
    its state, and reports from it, stays max_norm."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
    p.grad = torch.ones(3, dtype=dtype)
    clipper = fastclip.GradClipper([p], max_norm=0.5)
    clipper.step()
    clipper.threshold.mul_(100)
    assert clipper.state_dict()["state"]["fixed"].item() == 0.5
    clipper.step()
    assert clipper.threshold.item() == 0.5 and clipper.summary()["threshold"] == 0.5


@pytest.mark.parametrize("nonfinite", ["propagate", "zero", "skip"])
def test_the_skipped_and_found_nonfinite_attributes_are_the_callers(nonfinite):
    """An in-place change to ``skipped`` (or-ing in a reason of the caller's own) changes neither
    the clipper's state, nor ``found_nonfinite``, nor later steps."""
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    clipper = fastclip.GradClipper([p], max_norm=1.0, nonfinite=nonfinite)
    clipper.step()
    clipper.skipped |= torch.tensor(True)
    assert not clipper.found_nonfinite
    assert not any(v.dtype == torch.bool and v.item() for v in clipper.state_dict()["state"].values())
    p.grad = torch.ones(3)
    clipper.step()
    assert not clipper.skipped


def test_a_checkpoint_from_before_the_first_step_resets_a_stepped_clippers_own_tensors():
    """load_state_dict keeps a stepped clipper's state tensors (a captured graph points at them),
    also for a checkpoint saved before any step: they go back to their initial values."""
    p = torch.nn.Parameter(torch.zeros(3))
    pre = fastclip.GradClipper([p], max_norm=None, policy=AutoClip(50, 4)).state_dict()
    clipper = fastclip.GradClipper([p], max_norm=None, policy=AutoClip(50, 4))
    fresh = fastclip.GradClipper([p], max_norm=None, policy=AutoClip(50, 4))
    for _ in range(3):
        p.grad = torch.ones(3)
        clipper.step()
    own = {k: v for k, v in clipper._state.items()}, {k: v for k, v in clipper._policy_state.items()}
    clipper.load_state_dict(pre)
    assert clipper.steps == 0
    for scale in (1.0, 5.0, 2.0):
        for c in (clipper, fresh):
            p.grad = torch.full((3,), scale)
            c.step()
        assert_bitwise_equal(clipper.threshold, fresh.threshold)
    assert all(clipper._state[k] is v for k, v in own[0].items())
    assert all(clipper._policy_state[k] is v for k, v in own[1].items())


# --- audit of session 14: empty sets, checkpoints, custom policies, complex grads -------------


def test_an_empty_parameter_list_is_refused():
    """The usual cause: ``model.parameters()`` handed to the optimizer first, which used it up;
    the clipper would then clip nothing at every step, silently. torch.optim refuses it too."""
    model = torch.nn.Linear(3, 2)
    params = model.parameters()
    torch.optim.SGD(params, lr=0.1)
    with pytest.raises(ValueError, match=r"GradClipper: `parameters` is empty .*list\(model"):
        GradClipper(params)
    with pytest.raises(ValueError, match="`parameters` is empty"):
        GradClipper([])


def test_autoclip_history_holds_finite_norms_only():
    """history=3, percentile 0: after the norms 1, 2, 3 and two non-finite steps the threshold
    is still the smallest of the last three finite norms (a ring of steps would hold only 3)."""
    p = torch.zeros(1, requires_grad=True)
    clipper = GradClipper([p], max_norm=None, policy=AutoClip(percentile=0, history=3),
                          nonfinite="skip")
    for value in (1.0, 2.0, 3.0, math.inf, math.inf):
        p.grad = torch.tensor([value])
        clipper.step()
    assert float(clipper.threshold) == 1.0
    p.grad = torch.tensor([5.0])
    clipper.step()  # the ring drops 1.0, the oldest finite norm
    assert float(clipper.threshold) == 2.0


def test_autoclip_checkpoint_without_the_finite_count_resumes_its_ring():
    """A checkpoint from before AutoClip counted finite norms (its ring advanced one slot per
    step) resumes at the slot after its last step."""
    params = make_params()
    clipper = GradClipper(params, max_norm=None, policy=AutoClip(percentile=50, history=4))
    for step in range(6):
        set_grads(params, grads_at(step))
        clipper.step()
    state = clipper.state_dict()
    del state["policy_state"]["count"]
    resumed = GradClipper(make_params(), max_norm=None, policy=AutoClip(percentile=50, history=4))
    resumed.load_state_dict(state)
    assert int(resumed._policy_state["count"]) == 6
    for step in range(6, 9):
        set_grads(params, grads_at(step))
        set_grads(resumed.params, grads_at(step))
        assert_bitwise_equal(resumed.step(), clipper.step())
        assert_bitwise_equal(resumed.threshold, clipper.threshold)


def _corrupt(state, how):
    state = {**state, "state": dict(state["state"]), "policy_state": dict(state["policy_state"])}
    if how == "no threshold":
        del state["threshold"]
    elif how == "no config":
        del state["config"]
    elif how == "state key missing":
        del state["state"]["clipped"]
    elif how == "history too long":
        state["state"]["norms"] = torch.zeros(9, dtype=torch.float64)
    elif how == "wrong dtype":
        state["policy_state"]["mean"] = state["policy_state"]["mean"].float()
    elif how == "policy state missing":
        state["policy_state"] = None
    elif how == "threshold not a tensor":
        state["threshold"] = 1.0
    return state


@pytest.mark.parametrize("how", ["no threshold", "no config", "state key missing", "history too long",
                                 "wrong dtype", "policy state missing", "threshold not a tensor"])
def test_a_malformed_checkpoint_is_refused_before_anything_loads(how):
    params = make_params()
    saved = GradClipper(params, max_norm=1.0, policy=ZClip(warmup=2), window=5)
    for step in range(4):
        set_grads(params, grads_at(step))
        saved.step()
    target = GradClipper(make_params(), max_norm=1.0, policy=ZClip(warmup=2), window=5)
    set_grads(target.params, grads_at(10))
    target.step()
    before = {k: v.clone() for k, v in _state_tensors(target).items()}
    threshold = target.threshold.clone()
    with pytest.raises(ValueError, match=r"GradClipper.load_state_dict: `state_dict"):
        target.load_state_dict(_corrupt(saved.state_dict(), how))
    for k, v in _state_tensors(target).items():
        assert torch.equal(v, before[k]) or (v.is_floating_point() and torch.equal(
            v.isnan(), before[k].isnan()) and torch.equal(v.nan_to_num(), before[k].nan_to_num())), k
    assert_bitwise_equal(target.threshold, threshold)


class _ShapedPolicy(ClipPolicy):
    def __init__(self, value):
        self.value = value

    def init_state(self, device):
        return {}

    def threshold(self, state, step, norm, finite):
        return self.value


@pytest.mark.parametrize("value", [torch.tensor([0.5], dtype=torch.float64), 0.5,
                                   torch.tensor(1, dtype=torch.int64)], ids=["shape-1", "float", "int"])
def test_a_policy_threshold_of_the_wrong_kind_is_refused_before_any_write(value):
    params = make_params()
    grads = grads_at(0)
    set_grads(params, grads)
    clipper = GradClipper(params, max_norm=None, policy=_ShapedPolicy(value))
    if isinstance(value, torch.Tensor) and value.is_floating_point():  # one element: accepted
        clipper.step()
        assert clipper.threshold.shape == () and clipper.steps == 1
        return
    with pytest.raises(TypeError, match="_ShapedPolicy.threshold must return a one-element "
                                        "floating-point tensor"):
        clipper.step()
    for p, g in zip(params, grads):
        assert_bitwise_equal(p.grad, g)
    assert clipper.steps == 0


@pytest.mark.parametrize("max_norm", [torch.tensor(0.5), np.array([0.5]), np.float32(0.5)],
                         ids=["tensor", "array", "numpy-scalar"])
def test_max_norm_takes_one_element_tensors_and_arrays(max_norm):
    ours, theirs = make_params(), make_params()
    set_grads(ours, grads_at(0))
    set_grads(theirs, grads_at(0))
    clipper = GradClipper(ours, max_norm=max_norm)
    assert clipper.max_norm == 0.5
    assert_bitwise_equal(clipper.step(), fastclip.clip_grad_norm_(theirs, 0.5))
    for a, b in zip(ours, theirs):
        assert_bitwise_equal(a.grad, b.grad)


def test_summary_arguments_and_a_reset_threshold():
    params = make_params()
    pre = GradClipper(params, max_norm=1.0).state_dict()
    clipper = GradClipper(params, max_norm=1.0)
    set_grads(params, grads_at(0))
    clipper.step()
    clipper.load_state_dict(pre)  # back to before the first step
    assert clipper.summary()["threshold"] is None and clipper.summary()["steps"] == 0
    for bad, error in [(50, TypeError), ("50", TypeError), (["50"], TypeError), ([True], TypeError),
                       ([101], ValueError)]:
        with pytest.raises(error, match="GradClipper.summary: `percentiles`"):
            clipper.summary(bad)
    assert list(clipper.summary([torch.tensor(50.0), np.float64(25)])["norm_percentiles"]) == [50.0, 25.0]


@pytest.mark.parametrize("nonfinite", ["skip", "zero"])
def test_complex_grads_of_a_skipped_step_keep_their_values(nonfinite):
    """Complex grads take torch's ops; a complex multiply by 1 + 0j would turn inf + 0j into
    inf + nanj, so a skipped step scales their real parts. A finite step that does not clip
    writes nothing on the CPU, as the kernels."""
    p = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    grad = torch.tensor([complex(math.inf, 0.0), 1 + 2j, -3j], dtype=torch.complex64)
    p.grad = grad.clone()
    clipper = GradClipper([p], max_norm=1.0, nonfinite=nonfinite)
    clipper.step()
    expected = torch.zeros_like(grad) if nonfinite == "zero" else grad
    assert torch.equal(torch.view_as_real(p.grad), torch.view_as_real(expected))
    p.grad = torch.tensor([0.1 + 0.2j, 0j, 0.3j], dtype=torch.complex64)
    version = p.grad._version
    clipper.step()
    assert p.grad._version == version
