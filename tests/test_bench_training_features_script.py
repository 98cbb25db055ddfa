"""benchmarks/bench_training_features.py: its AGC rows compare fastclip with a plain-torch AGC, so
that comparison must be of two implementations that do the same thing, on grads that clip."""

from __future__ import annotations

import importlib.util
import os

import torch

from test_agc import agc_reference_

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "bench_training_features.py")
SHAPES = [(64, 3, 7, 7), (64,), (128, 64, 1, 1), (10, 2048), (10,)]


def _load():
    spec = importlib.util.spec_from_file_location("bench_training_features", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_agc_matches_the_exact_reference_and_clips_some_units():
    bench = _load()
    params = bench.agc_params(SHAPES)
    originals = [p.grad.clone() for p in params]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for r, p in zip(ref, params):
        r.grad = p.grad.clone()
    bench.torch_agc_(params)
    agc_reference_(ref, clipping=bench.AGC_CLIPPING, eps=bench.AGC_EPS)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=0)
    changed = [not torch.equal(p.grad, g) for p, g in zip(params, originals)]
    assert any(changed) and not all(changed)  # the set straddles the threshold


def test_agc_rows_time_both_and_report_agreement():
    bench = _load()
    rows, diff = bench.bench_agc(bench.agc_params(SHAPES), repeats=1)
    assert [label for _, label, _, _ in rows] == ["torch, per tensor (timm-style)",
                                                  "fastclip.adaptive_grad_clip_"]
    assert all(t > 0 for _, _, t, _ in rows) and rows[1][3] > 0
    assert diff < 1e-5


def test_main_prints_the_agc_rows(capsys):
    bench = _load()
    bench.main(["--repeats", "1", "--sets", "small", "--agc-sets", "resnet50"])
    out = capsys.readouterr().out
    assert "== agc on resnet50: 161 tensors" in out
    assert "fastclip.adaptive_grad_clip_" in out and "results agree" in out
