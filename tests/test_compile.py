"""fastclip inside ``torch.compile``: every public call runs eagerly at a graph break and gives
the eager call's results bit for bit; eager use never imports ``torch._dynamo``.

Without the graph break Dynamo traces into numba's dispatcher and fails (torch 2.13: "exception
table entry start instruction has no offset"), so each test below fails if a public call loses
its ``entry_point`` wrapper.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastclip
from fastclip import _compile
from reference import assert_bitwise_equal

pytest.importorskip("torch._dynamo")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (11,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3
    return params


def _twins():
    a, b = _params(), _params()
    for x, y in zip(a, b):
        assert_bitwise_equal(x.grad, y.grad)
    return a, b


def _adam(ps):
    return torch.optim.Adam(ps, lr=0.1)


def _scaled(ps):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler.scale(torch.zeros(()))
    return scaler, torch.optim.SGD(ps, lr=0.1)


CALLS = {
    "clip_grad_norm_": lambda ps: fastclip.clip_grad_norm_(ps, 0.5),
    "clip_grad_norm_ inf": lambda ps: fastclip.clip_grad_norm_(ps, 0.5, norm_type="inf"),
    "get_total_norm": lambda ps: fastclip.get_total_norm([p.grad for p in ps], 3.0),
    "clip_grads_with_norm_": lambda ps: fastclip.clip_grads_with_norm_(ps, 0.5, torch.tensor(9.0)),
    "clip_grad_value_": lambda ps: fastclip.clip_grad_value_(ps, 0.2),
    "unscale_and_clip_": lambda ps: fastclip.unscale_and_clip_(*_scaled(ps), 0.5),
    "clip_and_step": lambda ps: fastclip.clip_and_step(_adam(ps), 0.5),
    "adaptive_grad_clip_": lambda ps: fastclip.adaptive_grad_clip_(ps, 0.05),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_each_call_under_compile_equals_the_eager_call(name):
    ours, eager = _twins()
    compiled = torch.compile(CALLS[name], backend="eager")
    out_c, out_e = compiled(ours), CALLS[name](eager)
    if out_e is not None:
        assert_bitwise_equal(out_c, out_e)
    for a, b in zip(ours, eager):
        assert_bitwise_equal(a.grad, b.grad)
        assert_bitwise_equal(a.detach(), b.detach())  # clip_and_step also stepped
    if name != "get_total_norm":  # negative control: the call did change the grads
        assert any(not torch.equal(a.grad, b.grad) for a, b in zip(ours, _params()))


SAME_ARGUMENTS = {  # three fastclip functions called with arguments Dynamo cannot tell apart
    "clip_grad_norm_": lambda ps: fastclip.clip_grad_norm_(ps, 0.1),
    "clip_grad_value_": lambda ps: fastclip.clip_grad_value_(ps, 0.1),
    "adaptive_grad_clip_": lambda ps: fastclip.adaptive_grad_clip_(ps, 0.1),
}


@pytest.mark.parametrize("as_generator", [False, True], ids=["list", "generator"])
def test_fastclip_calls_compiled_side_by_side_stay_apart(as_generator):
    """Compiled functions calling different fastclip functions with the same arguments, in one
    process and alternating: each runs its own function. (Dynamo keys its caches on code objects;
    while the wrappers shared one, a graph made for one call was reused for the next:
    clip_grad_value_ ran clip_grad_norm_.)"""
    compiled = {name: torch.compile(call, backend="eager") for name, call in SAME_ARGUMENTS.items()}
    for _ in range(3):
        for name, call in SAME_ARGUMENTS.items():
            ours, eager = _twins()
            arg = (p for p in ours) if as_generator else ours
            out_c, out_e = compiled[name](arg), call(eager)
            if out_e is not None:
                assert_bitwise_equal(out_c, out_e)
            for a, b in zip(ours, eager):
                assert_bitwise_equal(a.grad, b.grad)


def test_torch_without_a_disable_reason(monkeypatch):
    """torch 2.6 and 2.7's ``torch.compiler.disable`` take no ``reason``: not passed there."""
    from fastclip import _compile

    monkeypatch.setattr(_compile, "_TAKES_REASON", False)
    monkeypatch.setattr(_compile, "_DISABLED", {})
    real = torch.compiler.disable
    monkeypatch.setattr(torch.compiler, "disable", lambda fn, recursive=True: real(fn, recursive))
    ours, eager = _twins()
    torch.compile(CALLS["clip_grad_value_"], backend="eager")(ours)
    CALLS["clip_grad_value_"](eager)
    for a, b in zip(ours, eager):
        assert_bitwise_equal(a.grad, b.grad)
    assert len(_compile._DISABLED) == 1


def test_grad_clipper_step_under_compile():
    ours, eager = _twins()
    clippers = [fastclip.GradClipper(ps, max_norm=0.5, policy=fastclip.ZClip(warmup=2))
                for ps in (ours, eager)]
    step = torch.compile(lambda c: c.step(), backend="eager")
    for _ in range(3):
        assert_bitwise_equal(step(clippers[0]), clippers[1].step())
    for a, b in zip(ours, eager):
        assert_bitwise_equal(a.grad, b.grad)
    assert clippers[0].summary() == clippers[1].summary()


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
])
def test_a_compiled_training_step_with_inductor(device):
    """The common case: forward, backward, clip and step in one compiled function (inductor);
    the clip sees the compiled backward's grads and clips them as an eager call would."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def step(x, y):
        opt.zero_grad()
        (((model(x) - y) ** 2).mean() * 100).backward()
        before = [p.grad.clone() for p in model.parameters()]
        norm = fastclip.clip_grad_norm_(model.parameters(), 0.5)
        after = [p.grad.clone() for p in model.parameters()]
        opt.step()
        return norm, before, after

    compiled = torch.compile(step)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)
        norm, before, after = compiled(x.to(device), y.to(device))
        params = [torch.nn.Parameter(torch.zeros_like(b)) for b in before]
        for p, b in zip(params, before):
            p.grad = b.clone()
        assert_bitwise_equal(norm, fastclip.clip_grad_norm_(params, 0.5))
        for p, a in zip(params, after):
            assert_bitwise_equal(p.grad, a)
        assert float(norm) > 0.5  # it clipped


def test_fullgraph_is_refused_with_the_reason():
    """The first compiled call makes the disabled wrapper (Dynamo's error then names the
    ``torch.compiler.disable`` call in fastclip); from then on the break gives fastclip's reason."""
    compiled = torch.compile(CALLS["clip_grad_norm_"], backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="fastclip"):
        compiled(_params())
    torch.compile(CALLS["clip_grad_norm_"], backend="eager")(_params())
    torch._dynamo.reset()
    # torch.compiler.disable takes a reason from torch 2.8; before, Dynamo names the function.
    words = "fastclip runs its Numba kernels outside the graph" if _compile._TAKES_REASON else \
        r"disable\(\) wrapped function <function clip_grad_norm_"
    with pytest.raises(Exception, match=words):
        compiled(_params())


def test_eager_use_never_imports_dynamo():
    """``torch.compiler.disable`` imports torch._dynamo (seconds): only a compiled call may."""
    code = ("import sys, torch, fastclip\n"
            "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
            "fastclip.clip_grad_norm_([p], 0.5); fastclip.clip_grad_value_([p], 0.1)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_a_compiled_step_passing_a_generator_runs_again_after_a_reset():
    """``clip_grad_norm_(model.parameters(), ...)`` in a compiled step, compiled twice: once the
    graph-break wrapper exists, torch 2.14's Dynamo gives up on fastclip's entry frame (it cannot
    rebuild the generator argument) and runs it eagerly with its frame hook still on, which traced
    fastclip's internals (a numba TypingError). A frame run under Dynamo's hook takes the disabled
    path too. (Fails on torch 2.14 without that; torch 2.13 never gives up on the frame.)"""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)

        def step(x, y):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            norm = fastclip.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            return norm

        return step

    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(32, 1)
    expected = make()(x, y)
    for _ in range(2):
        torch._dynamo.reset()
        assert torch.equal(torch.compile(make(), backend="eager")(x, y), expected)
