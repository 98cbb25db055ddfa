"""fastclip-bench: its gradient sets, its yardsticks, and its command line (fast runs only).

Timing figures are never asserted here: the benchmarks measure, the tests check that the tool
builds the right sets, reports what it measured, and fails clearly on bad input.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fastclip.bench import cases as C
from fastclip.bench import coldstart, main
from fastclip.bench.gradsets import fill_, from_module, materialize, max_abs, reference_norm
from fastclip.bench.memloops import CopyLoop, ReadLoop
from fastclip.bench.runner import check_norm, check_values

TINY_MODULE = "fastclip_bench_tiny_models"


@pytest.fixture
def tiny_models(tmp_path, monkeypatch):
    """A module of model factories, importable as ``fastclip_bench_tiny_models``."""
    (tmp_path / f"{TINY_MODULE}.py").write_text(textwrap.dedent("""
        import torch

        def mlp():
            return torch.nn.Sequential(torch.nn.Linear(33, 64), torch.nn.ReLU(), torch.nn.Linear(64, 7))

        def not_a_module():
            return 42

        def broken():
            raise ValueError("factory exploded")

        def frozen():
            m = torch.nn.Linear(3, 3)
            m.requires_grad_(False)
            return m

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(TINY_MODULE, None)
    yield f"{TINY_MODULE}"
    sys.modules.pop(TINY_MODULE, None)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastclip.bench", *args], capture_output=True,
                          text=True, timeout=120)


# --- gradient sets --------------------------------------------------------------------------

EXPECTED = {  # tensors, values: the published counts of each model
    "gpt2-124m": (148, 124_439_808),
    "many-small": (2000, None),
    "one-large": (1, 1 << 26),
    "lstm-2x1024": (11, None),
    "resnet50": (161, 25_557_032),
    "gpt2-xl": (580, 1_557_611_200),
}


@pytest.mark.parametrize("name", list(C.GRAD_SETS))
def test_preset_counts(name):
    shapes = C.GRAD_SETS[name].shapes()
    n_tensors, n_values = EXPECTED[name]
    assert len(shapes) == n_tensors
    if n_values is not None:
        assert sum(math.prod(s) for s in shapes) == n_values


def test_gpt2_small_layout():
    shapes = C.gpt2_shapes()
    assert shapes[:2] == [(50257, 768), (1024, 768)]
    assert shapes[2:14] == [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,),
                            (768, 3072), (3072,), (3072, 768), (768,)]
    assert shapes[-2:] == [(768,), (768,)]


def test_lstm_matches_torch_modules():
    # Independent check: the same modules built by torch on the meta device (no memory).
    modules = [torch.nn.Embedding(32000, 512, device="meta"),
               torch.nn.LSTM(512, 1024, num_layers=2, device="meta"),
               torch.nn.Linear(1024, 32000, device="meta")]
    torch_shapes = [tuple(p.shape) for m in modules for p in m.parameters()]
    assert C.lstm_shapes() == torch_shapes
    assert C.GRAD_SETS["lstm-2x1024"].shapes() == torch_shapes


def test_many_small_is_seeded_log_uniform():
    sizes = np.array([s[0] for s in C.many_small_shapes()])
    assert C.many_small_shapes() == C.many_small_shapes()
    assert C.many_small_shapes(seed=1) != C.many_small_shapes()  # negative control: the seed matters
    assert sizes.min() >= 64 and sizes.max() <= 65536
    # log-uniform: each of the 10 octaves between 64 and 65536 holds about a tenth of the tensors
    counts = np.histogram(np.log2(sizes), bins=10, range=(6, 16))[0]
    assert counts.min() > 140 and counts.max() < 260


def test_spec_rejects_a_wrong_count():
    spec = C.GradSetSpec("bad", "", lambda: [(2, 3)], 1, 7)
    with pytest.raises(RuntimeError, match="expected 1 and 7"):
        spec.shapes()


def test_case_table_feeds_every_combination():
    cases = C.all_cases()
    steps = [c for c in cases if c.kind == "step"]
    assert len(steps) == len(C.ISSUE_SETS) * len(C.STEPS) * len(C.METHODS) == 24
    assert {c.grad_set for c in cases} == set(C.ISSUE_SETS)
    assert len({c.id for c in cases}) == len(cases)
    # set-major: a set's cases are contiguous, so one set is in memory at a time
    order = [c.grad_set for c in cases]
    assert order == sorted(order, key=C.ISSUE_SETS.index)


def test_clip_grad_value_cases_join_the_table():
    cases = C.all_cases(C.ISSUE_SETS, C.ALL_STEPS)
    value = [c for c in cases if c.step in C.VALUE_STEPS]
    assert len(value) == len(C.ISSUE_SETS) * len(C.VALUE_STEPS) * len(C.METHODS) == 24
    assert len({c.id for c in cases}) == len(cases)
    # Norm passes belong to clip_grad_norm_: a clip_grad_value_-only run has the yardsticks only.
    only_value = C.set_cases("s", tuple(C.VALUE_STEPS))
    assert [c.kind for c in only_value[:2]] == ["read-loop", "copy-loop"]
    assert not any(c.kind == "norm-pass" for c in only_value)
    assert {C.STEP_OF[f, k] for f in C.FUNCTIONS for k in ("clipping", "non-clipping")} == set(C.ALL_STEPS)


# --- values, reference, yardsticks ----------------------------------------------------------


def test_fill_is_seeded_and_reference_is_exact():
    shapes = [(3, 5), (1,), (70000,), (4_200_000,)]  # the last one wraps around the value pool
    a, b, c = (materialize("t", shapes, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.grads, b.grads))
    assert not torch.equal(a.grads[2], c.grads[2])  # negative control
    squares = [v * v for g in a.grads for v in g.double().flatten().tolist()]  # exact in float64
    assert reference_norm(a.grads) == pytest.approx(math.sqrt(math.fsum(squares)), rel=1e-13)
    assert a.reference_norm == reference_norm(a.grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_max_abs_and_the_share_a_clamp_changes(dtype):
    gs = materialize("t", [(3, 5), (0,), (70000,)], dtype=dtype)
    values = torch.cat([g.double().flatten() for g in gs.grads])
    assert gs.max_abs == max_abs(gs.grads) == float(values.abs().max()) > 0
    assert max_abs([torch.empty(0)]) == 0.0
    bound = C.VALUE_STEPS["clamping"].clip_value(gs.max_abs)
    share = gs.share_clamped(bound)
    assert 0.0 < share < 1.0
    if dtype == torch.float64:  # no rounding of the bound: the values beyond it
        assert share == float((values.abs() > bound).double().mean())
    assert gs.share_clamped(C.VALUE_STEPS["non-clamping"].clip_value(gs.max_abs)) == 0.0


def test_the_share_counts_values_a_clamp_changes_not_values_beyond_the_bound():
    # bfloat16 1.0078125 (the next value after 1) is beyond 1.006, but 1.006 rounds up to it in
    # bfloat16, so torch's clamp leaves it as it is; 1.015625 (two steps up) does change.
    gs = materialize("t", [(2,)], dtype=torch.bfloat16)
    gs.saved[0].copy_(torch.tensor([1.0078125, 1.015625]))
    assert gs.share_clamped(1.006) == 0.5


def test_value_check_counts_every_value_that_differs_from_torchs_clamp():
    gs = materialize("t", [(1000,), (7,)])
    bound = C.VALUE_STEPS["clamping"].clip_value(gs.max_abs)
    for g in gs.grads:
        g.clamp_(-bound, bound)
    assert check_values("fastclip", "clamping", gs).ok
    gs.grads[1][3] = gs.saved[1][3] * 0.5 if gs.saved[1][3].abs() <= bound else 0.0  # one wrong value
    assert check_values("fastclip", "clamping", gs).mismatched == 1
    gs.restore()  # nothing clamped at all
    assert check_values("fastclip", "clamping", gs).mismatched == round(gs.share_clamped(bound) * gs.numel) > 0


def test_restore_brings_back_every_value():
    gs = materialize("t", [(1000,), (7,), (3, 3)], dtype=torch.float16)
    before = [g.clone() for g in gs.grads]
    for g in gs.grads:
        g.mul_(0.5)
    assert not torch.equal(gs.grads[0], before[0])
    gs.restore()
    assert all(torch.equal(g, b) for g, b in zip(gs.grads, before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_memory_loops_cover_every_byte(dtype):
    src = [torch.randn(n).to(dtype) for n in (1, 3, 5, 4096, 300001)]
    dst = [torch.zeros_like(t) for t in src]
    CopyLoop(dst, src)()
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    raw = b"".join(t.view(torch.uint8).numpy().tobytes() for t in src)
    # ReadLoop sums each tensor's whole words as uint64 and its tail bytes as bytes (mod 2**64).
    expected = 0
    for t in src:
        b = t.view(torch.uint8).numpy().tobytes()
        n = len(b) // 8 * 8
        expected += int(np.frombuffer(b[:n], dtype=np.uint64).sum(dtype=np.uint64)) + sum(b[n:])
    assert ReadLoop(src)() % 2**64 == expected % 2**64
    assert ReadLoop(src).nbytes == len(raw)


def test_norm_check_tolerances():
    gs = materialize("t", [(1000,)])
    ref = gs.reference_norm
    assert check_norm("fastclip", "clipping", float(torch.tensor(ref, dtype=torch.float32)), gs).ok
    assert not check_norm("fastclip", "clipping", ref * (1 + 1e-6), gs).ok  # fastclip must be exact
    assert check_norm("torch-loop", "clipping", ref * (1 + 2e-7), gs).ok    # torch: float32 sums
    assert not check_norm("torch-loop", "clipping", ref * 1.01, gs).ok
    assert not check_norm("torch-loop", "clipping", math.inf, gs).ok


# --- the command line -----------------------------------------------------------------------


def test_model_run_writes_json_and_plot(tiny_models, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the `bench` extra)")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["--model", f"{tiny_models}:mlp", "--repeat", "2", "--warmup", "0", "--no-cold-start",
               "--json", str(out_json), "--plot", str(out_png)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "norms agree with the exact float64 reference" in captured.out
    assert "Every step scaled the grads" in captured.out
    assert "norms: every run agrees" in captured.out
    assert "model:" in captured.out and "median ms" in captured.out
    assert "[" in captured.err  # progress goes to stderr, never into the table

    data = json.loads(out_json.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert data["norms_agree"] is True and data["cold_start"] is None
    (s,) = data["sets"]
    assert s["name"] == f"model:{tiny_models}:mlp"
    assert (s["n_tensors"], s["numel"]) == (4, 33 * 64 + 64 + 64 * 7 + 7)
    kinds = [(r["kind"], r["method"], r["step"]) for r in s["rows"]]
    assert kinds == [(c.kind, c.method, c.step) for c in C.set_cases(s["name"])]
    for r in s["rows"]:
        assert len(r["times_s"]) == 2 and r["median_ms"] > 0 and r["gbps"] > 0
    fast = next(r for r in s["rows"] if r["method"] == "fastclip" and r["step"] == "clipping")
    assert set(fast["speedup"]) == {"torch-foreach", "torch-loop"}
    assert all(c["ok"] for c in s["checks"]) and len(s["checks"]) == 2 + 6
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clip_grad_value_run_writes_json(tiny_models, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    rc = main(["--model", f"{tiny_models}:mlp", "--function", "clip_grad_value_", "--repeat", "2",
               "--warmup", "0", "--no-cold-start", "--quiet", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "clip_grad_value_: every step left exactly torch's clamp" in out
    assert "clip_grad_value_: every run left torch's clamped values" in out
    assert "norms agree" not in out and "exact norm" not in out  # no clip_grad_norm_ step was timed
    assert "x max |g| (clamping, " in out and "(clamping, non-clamping: clip_grad_value_)" in out
    data = json.loads(out_json.read_text())
    (s,) = data["sets"]
    assert data["values_agree"] is True and s["checks"] == []
    assert [(r["kind"], r["method"], r["step"]) for r in s["rows"]] == \
        [(c.kind, c.method, c.step) for c in C.set_cases(s["name"], tuple(C.VALUE_STEPS))]
    assert len(s["value_checks"]) == 6 and all(c["ok"] and c["mismatched"] == 0 for c in s["value_checks"])
    assert 0.0 < s["clamped_share"] < 1.0
    fast = {r["step"]: r for r in s["rows"] if r["method"] == "fastclip"}
    assert set(fast["clamping"]["speedup"]) == {"torch-foreach", "torch-loop"}
    nbytes = s["nbytes"]
    assert fast["non-clamping"]["bytes_counted"] == nbytes
    assert fast["clamping"]["bytes_counted"] == round(nbytes * (1 + s["clamped_share"]))


def test_both_functions_in_one_run(capsys):
    rc = main(["--preset", "many-small", "--function", "both", "--step", "non-clipping", "--repeat", "1",
               "--warmup", "0", "--no-cold-start", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = out[out.index("summary:"):]
    assert "non-clipping" in summary and "non-clamping" in summary and "norm pass" in summary
    assert "\nmany-small            clipping" not in summary and " clamping " not in summary


@pytest.mark.parametrize("wrong, step, words", [
    (lambda real: lambda ps, cv: real(ps, cv * 1.01), "clamping", "values differ"),
    (lambda real: lambda ps, cv: None, "clamping", "values differ"),  # clamps nothing
])
def test_a_clamp_that_differs_from_torchs_fails_the_run(tiny_models, monkeypatch, capsys, wrong, step, words):
    # Negative controls: fastclip's clip_grad_value_ off by 1% in the bound, or not clamping at all.
    real = C.METHODS["fastclip"]
    monkeypatch.setitem(C.METHODS, "fastclip", C.Method(real.name, real.label, real.clip, real.norm,
                                                         wrong(real.clamp)))
    rc = main(["--model", f"{tiny_models}:mlp", "--function", "clip_grad_value_", "--step", "clipping",
               "--repeat", "1", "--warmup", "0", "--no-cold-start", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"DISAGREE with torch's clamp of the same grads: fastclip ({step})" in out and words in out
    assert "some runs DISAGREE with torch's clamp" in out


def test_preset_run_one_step(capsys):
    rc = main(["--preset", "many-small", "--step", "non-clipping", "--repeat", "1", "--warmup", "0",
               "--no-cold-start", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "many-small: 2,000 tensors, 18,985,190 float32 values" in out.out
    assert "non-clipping" in out.out and "\nclipping" not in out.out
    assert out.err == ""  # --quiet


def test_disagreeing_norm_fails_the_run(tiny_models, monkeypatch, capsys):
    # Negative control: a "torch" whose norm is 1% off must be caught, and the exit status says so.
    real = C.METHODS["torch-loop"]
    wrong = C.Method(real.name, real.label, lambda ps, mn: real.clip(ps, mn) * 1.01, real.norm)
    monkeypatch.setitem(C.METHODS, "torch-loop", wrong)
    rc = main(["--model", f"{tiny_models}:mlp", "--repeat", "1", "--warmup", "0", "--no-cold-start",
               "--quiet", "--step", "clipping"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "norms DISAGREE" in out and "torch foreach=False (clipping)" in out


@pytest.mark.parametrize("how", ["all but the first grad", "every other value of one grad"])
def test_partly_scaled_grads_fail_the_run(tiny_models, monkeypatch, capsys, how):
    # Negative control: the right norm, the first grad scaled right, the rest not (or a part of a
    # grad twice): the check looks at every grad, and at values spread over each.
    real = C.METHODS["torch-foreach"]

    def partly(ps, mn):
        grads = [p.grad for p in ps]
        norm = real.norm(grads)
        coef = min(mn / (float(norm) + 1e-6), 1.0)
        if how == "all but the first grad":
            grads[0].mul_(coef)
        else:
            for g in grads:
                g.mul_(coef)
            grads[-1].view(-1)[::2].mul_(coef)
        return norm

    monkeypatch.setitem(C.METHODS, "torch-foreach", C.Method(real.name, real.label, partly, real.norm))
    rc = main(["--model", f"{tiny_models}:mlp", "--repeat", "1", "--warmup", "0", "--no-cold-start",
               "--quiet", "--step", "clipping"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "torch foreach=True (clipping)" in out and "off torch's coefficient" in out


def test_the_exact_norm_gets_a_bound_no_looser_than_torchs():
    """float64 grads: fastclip's allowance is below torch's for any set (its sums are float64,
    chunked), and the reference, summed in long double, is far inside it."""
    from fastclip.bench.runner import EXACT_RTOL, torch_rtol

    assert EXACT_RTOL[torch.float64] <= torch_rtol(torch.float64, 1)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(5000, dtype=torch.float64, generator=gen) * 1e3 for _ in range(3)]
    from fractions import Fraction

    exact = math.sqrt(float(sum(Fraction(v) ** 2 for g in grads for v in g.tolist())))
    assert abs(reference_norm(grads) - exact) <= 2 * math.ulp(exact)
    gs = materialize("t", [(1000,)], dtype=torch.float64)
    assert not check_norm("fastclip", "clipping", gs.reference_norm * (1 + 5e-11), gs).ok
    assert not check_norm("torch-loop", "clipping", gs.reference_norm * (1 + 5e-11), gs).ok


def test_the_header_says_how_huge_pages_were_set(monkeypatch):
    from fastclip.bench import report

    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert "THP_MEM_ALLOC_ENABLE=1" in report.header()
    assert report.machine()["huge_pages"].startswith("THP ")


def test_unscaled_grads_fail_the_run(tiny_models, monkeypatch, capsys):
    # Negative control: the right norm but grads left unscaled must be caught too.
    real = C.METHODS["torch-foreach"]
    lazy = C.Method(real.name, real.label, lambda ps, mn: real.norm([p.grad for p in ps]), real.norm)
    monkeypatch.setitem(C.METHODS, "torch-foreach", lazy)
    rc = main(["--model", f"{tiny_models}:mlp", "--repeat", "1", "--warmup", "0", "--no-cold-start",
               "--quiet", "--step", "clipping"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "torch foreach=True (clipping)" in out and "off torch's coefficient" in out


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fastclip-bench: error: ") and "Traceback" not in err
    return lines[0]


def test_unknown_preset_is_one_line_exit_2():
    proc = _run_cli("--preset", "gpt5")
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "gpt5" in line and "gpt2-124m" in line
    assert proc.stdout == ""


@pytest.mark.parametrize("spec, words", [
    ("no_such_package_xyz.models:build", "cannot import module 'no_such_package_xyz.models'"),
    ("{m}", "expected PACKAGE.MODULE:FACTORY"),
    ("{m}:missing", "has no attribute 'missing'"),
    ("{m}:NOT_CALLABLE", "not a callable"),
    ("{m}:not_a_module", "returned a int, not a torch.nn.Module"),
    ("{m}:broken", "ValueError: factory exploded"),
    ("{m}:frozen", "no trainable parameters"),
])
def test_bad_model_is_one_line_exit_2(tiny_models, capsys, spec, words):
    rc = main(["--model", spec.format(m=tiny_models), "--no-cold-start"])
    captured = capsys.readouterr()
    assert rc == 2
    assert words in _one_error_line(captured.err)
    assert captured.out == ""


@pytest.mark.parametrize("args, words", [
    (["--preset", "gpt2-xl"], "--allow-large"),
    (["--repeat", "0"], "expected an integer >= 1"),
    (["--dtype", "int8"], "invalid choice"),
    (["--json", "/no/such/dir/r.json"], "does not exist"),
    # Refused before the run, not after it (the results would be lost to a traceback).
    (["--json", "/tmp"], "is a directory"),
    (["--plot", "/proc/fastclip-bench.png"], "cannot be written"),
])
def test_bad_arguments_are_one_line_exit_2(capsys, args, words):
    assert main(args) == 2
    assert words in _one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
def test_cuda_without_cuda_is_one_line_exit_2(capsys):
    assert main(["--device", "cuda"]) == 2
    assert "CUDA is not available" in _one_error_line(capsys.readouterr().err)


def test_cuda_where_fastclip_leaves_cuda_to_torch_is_one_line_exit_2(capsys, monkeypatch):
    from fastclip.bench import runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runner, "cuda_backend_usable", lambda: False)
    assert main(["--device", "cuda"]) == 2
    assert "fastclip's CUDA kernels cannot run here" in _one_error_line(capsys.readouterr().err)


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "gpt2-124m" in capsys.readouterr().out


def test_model_grads_are_seeded(tiny_models):
    import importlib

    factory = importlib.import_module(tiny_models).mlp
    a = from_module("a", factory(), torch.float32, "cpu", seed=3)
    b = from_module("b", factory(), torch.float32, "cpu", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.grads, b.grads))
    assert all(p.grad is g for p, g in zip(a.params, a.grads))
    fill_(b.grads, seed=4)
    assert not torch.equal(a.grads[0], b.grads[0])


def test_cold_start_measures_a_fresh_process():
    cs = coldstart.measure(runs=1)
    assert cs.import_torch_s > 0 and cs.fastclip_s > 0 and len(cs.runs) == 1
    assert cs.to_dict()["met"] == (cs.fastclip_s < coldstart.TARGET_S)
