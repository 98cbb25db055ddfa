"""benchmarks/bench_cuda.py's logic, run on the CPU with a stand-in timer: device time is scarce,
so a GPU session must not find a crash or a mismeasured step in the script."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import fastclip

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "bench_cuda.py")


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_cuda", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(module.SETS, "tiny", (lambda: [(300, 7), (1000,), (5,)], torch.float32))
    return module


def test_every_timed_clip_starts_from_unclipped_grads(bench, monkeypatch):
    """Repeated clips converge to a norm whose coefficient is exactly 1 (no write for fastclip):
    the clipping step must restore the grads before each call, or it times a no-op."""
    coefs = []
    original = fastclip.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        norm = original(params, max_norm, *args, **kwargs)
        coefs.append(min(max_norm / (float(norm) + 1e-6), 1.0))
        return norm

    monkeypatch.setattr(bench.fastclip, "clip_grad_norm_", spy)
    clamps = []  # (clip_value, did the grads hold a value beyond it before the call)
    original_value = fastclip.clip_grad_value_

    def value_spy(params, clip_value, *args, **kwargs):
        beyond = any(bool((p.grad.abs() > clip_value).any()) for p in params)
        clamps.append((clip_value, beyond))
        return original_value(params, clip_value, *args, **kwargs)

    monkeypatch.setattr(bench.fastclip, "clip_grad_value_", value_spy)

    def gpu_ms(fn, reps, target_ms=40.0):
        for _ in range(5):
            fn()
        return 1.0 if fn.__name__ == "restore" else 3.0

    monkeypatch.setattr(bench, "gpu_ms", gpu_ms)
    monkeypatch.setattr(bench, "gpu_only_ms", lambda fn, reps: gpu_ms(fn, reps))
    params, grads = bench.make_set("tiny", torch.device("cpu"))
    before = [g.clone() for g in grads]
    monkeypatch.setattr(bench, "make_set", lambda name, dev: (params, grads))
    row = bench.measure_set("tiny", torch.device("cpu"), 1, 100.0)
    clip_coefs = [c for c in coefs if c != 1.0]
    # Every timed clip call clipped, from the same grads: the same coefficient each time (5 calls
    # timed with the host, 5 for device time alone, and the checked one).
    assert len(clip_coefs) == 11 and len(set(clip_coefs)) == 1 and clip_coefs[0] < 0.5
    assert coefs.count(1.0) == 11  # the non-clipping step's calls, likewise
    assert row["checks_passed"] is True and row["clip_norm_rel_err"] < 1e-6
    assert row["clip_fastclip_gpu_only_ms"] == 2.0 and row["no_clip_speedup_gpu_only"] == 1.0
    for g, b in zip(grads, before):
        assert torch.equal(g, b)  # restored after timing
    assert row["clip_fastclip_ms"] == 2.0 and row["clip_fastclip_ms_with_restore"] == 3.0
    assert row["norm_rel_err_fastclip"] < 1e-6
    # clip_grad_value_: 5 non-clamping calls (2 x max |g|: nothing beyond it), then 5 timed
    # clamping calls, each from restored grads (values beyond the bound every time), then the
    # one whose values are compared with torch's clamp.
    clamping = [beyond for v, beyond in clamps if v == row["clip_value"]]
    assert len(clamps) == 11 and clamping == [True] * 6
    assert not any(beyond for v, beyond in clamps if v != row["clip_value"])
    assert 0.0 < row["clamped_share"] < 1.0  # some values clamped, not all
    assert row["value_clamp_fastclip_ms"] == 2.0 and row["value_clamp_matches_torch"] is True


def test_without_fastclips_cuda_backend_the_script_stops(bench, capsys, monkeypatch):
    """A GPU where fastclip falls back to torch: the script must not time torch against itself."""
    _cuda = pytest.importorskip("fastclip._cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("the benchmark ran"))
    assert bench.main(["--sets", "tiny"]) == 3
    assert "fastclip's CUDA backend cannot run here" in capsys.readouterr().err


def test_without_a_gpu_the_script_says_so(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench.main(["--sets", "tiny"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_host_overhead_runs_every_measurement(bench, monkeypatch):
    """Each host figure's call runs once on the CPU (launches stubbed, a stand-in timer), so a
    GPU session does not meet a crash in this part of the script."""
    pytest.importorskip("numba_cuda")  # the CUDA backend's host path (the [cuda] extra)
    spec = importlib.util.spec_from_file_location(
        "host_proxy", os.path.join(os.path.dirname(_PATH), "host_proxy.py"))
    proxy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proxy)
    timed = []

    def host_us(fn, calls: int = 300) -> float:
        fn()
        timed.append(fn)
        return 1.0

    monkeypatch.setattr(bench, "host_us", host_us)
    with proxy.cuda_backend_without_launches() as (power_sums, scale):
        out = bench.host_overhead(torch.device("cpu"))
    assert set(out) == {"clip_fastclip_us", "no_clip_fastclip_us", "get_total_norm_fastclip_us",
                        "clip_torch_us", "plan_build_us", "backend_only_us",
                        "clip_launches_stubbed_us"}
    assert len(timed) == len(out)
    # clip, no-clip, backend-only: a norm and a scale launch each; get_total_norm: a norm launch.
    assert (power_sums.launches, scale.launches) == (4, 3)


def test_summary_prints_every_target_and_the_host_split(bench, capsys):
    host = {"clip_fastclip_us": 71.0, "no_clip_fastclip_us": 70.0, "clip_launches_stubbed_us": 52.5}
    row = {"set": "gpt2-124m", "no_clip_speedup": 3.0, "clip_speedup": 1.2, "norm_vs_copy": 0.9,
           "value_no_clamp_speedup": 4.25, "value_clamp_speedup": 2.75}
    bench.print_summary({"targets": bench.TARGETS, "sets": [row], "host": host})
    out = capsys.readouterr().out
    assert "gpt2-124m" in out and "3.00" in out and "90%" in out
    assert "clip_grad_value_" in out and "4.25" in out and "2.75" in out
    assert "host <= 60 us" in out and "71.0 us clip" in out and "52.5 us of the clip without" in out


def _timed_row(bench, monkeypatch):
    def gpu_ms(fn, reps, target_ms=40.0):
        fn()
        return 1.0 if fn.__name__ == "restore" else 3.0

    monkeypatch.setattr(bench, "gpu_ms", gpu_ms)
    monkeypatch.setattr(bench, "gpu_only_ms", lambda fn, reps: gpu_ms(fn, reps))
    params, grads = bench.make_set("tiny", torch.device("cpu"))
    monkeypatch.setattr(bench, "make_set", lambda name, dev: (params, grads))
    return bench.measure_set("tiny", torch.device("cpu"), 1, 100.0)


def test_a_clip_that_writes_nothing_fails_the_checks_and_the_run(bench, monkeypatch):
    """Negative control of the checks: a clip that returns the right norm but scales nothing
    would time fast; its row fails the checks, and the run's exit status says so."""
    def clip_without_writing(params, max_norm, *args, **kwargs):
        return fastclip.get_total_norm([p.grad for p in params])

    monkeypatch.setattr(bench.fastclip, "clip_grad_norm_", clip_without_writing)
    row = _timed_row(bench, monkeypatch)
    assert row["checks_passed"] is False and row["clip_grads_match"] is False
    assert row["no_clip_grads_unchanged"] is True
    failed = bench.failures({"sets": [row], "host": {}, "chunk_sweep": []})
    assert len(failed) == 1 and "tiny: results differ" in failed[0]


def test_a_stage_that_raises_is_recorded_and_the_others_run(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    out = bench._stage("gpt2-xl", lambda: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))
    assert out == {"error": "RuntimeError('CUDA out of memory')"}
    assert "gpt2-xl: FAILED" in capsys.readouterr().out
    assert bench._stage("host overhead", lambda: {"clip_fastclip_us": 1.0}) == {"clip_fastclip_us": 1.0}
    result = {"sets": [{"set": "gpt2-xl", **out}], "host": {"clip_fastclip_us": 1.0}, "chunk_sweep": []}
    assert bench.failures(result) == ["gpt2-xl: RuntimeError('CUDA out of memory')"]
    bench.print_summary({"targets": bench.TARGETS, **result, "host": {"error": "x"}})
    printed = capsys.readouterr().out
    assert "gpt2-xl" in printed and "FAILED" in printed and "host figures FAILED" in printed


def test_a_sets_line_prints_its_figures_and_checks(bench, monkeypatch):
    line = bench._row_text(_timed_row(bench, monkeypatch))
    assert "device time only: no-clip 1.00x" in line and "results checked" in line
