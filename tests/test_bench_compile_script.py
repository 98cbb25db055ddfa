"""benchmarks/bench_compile.py runs end to end on a tiny set: every method is timed in both
steps, inductor compiled torch's clip, and the three methods clip the grads alike."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

pytest.importorskip("torch._dynamo")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "bench_compile.py")


def test_bench_compile_on_a_tiny_set(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_compile", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main(["--set", "tiny", "--repeat", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["steps"]) == {"clipping", "non-clipping"}
    for r in result["steps"].values():
        assert r["grads_agree"] is True
        assert set(r["median_ms"]) == {"torch eager", "torch compiled", "fastclip"}
        assert all(v > 0 for v in r["median_ms"].values()) and r["compile_s"] > 0
    assert "fastclip x" in capsys.readouterr().out


def test_a_method_that_does_not_clip_is_reported(tmp_path, monkeypatch, capsys):
    """Negative control: the agreement check fails (exit 1) when one method leaves the grads."""
    spec = importlib.util.spec_from_file_location("bench_compile", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench.fastclip, "clip_grad_norm_", lambda params, max_norm: None)
    assert bench.main(["--set", "tiny", "--repeat", "1"]) == 1
    assert "CLIPPED GRADS DISAGREE" in capsys.readouterr().out
