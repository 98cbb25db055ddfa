"""examples/train_lstm.py in quick mode: without clipping the LSTM blows up, with
fastclip.clip_grad_norm_ it converges, from the same weights on the same batches."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lstm.py"
MODULE = "fastclip_example_train_lstm"


def load_example():
    spec = importlib.util.spec_from_file_location(MODULE, EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[MODULE]
        raise
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run (both trainings, ~6 s of CPU), shared by the tests below."""
    example = load_example()
    png = tmp_path_factory.mktemp("lstm") / "lstm.png"
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    try:
        result = example.main(["--quick", "--plot", str(png)])
        assert torch.get_num_threads() == threads, "the example must restore torch's threads"
        assert torch.equal(torch.get_rng_state(), rng), "the example must not consume global RNG"
    finally:
        sys.modules.pop(MODULE, None)
    return result


def test_both_runs_start_from_the_same_point(quick_run):
    """Same seed: same weights and batches, so the first loss and first grad norm are equal and
    clipping is the only difference between the runs."""
    u, c = quick_run["unclipped"], quick_run["clipped"]
    assert u.step_loss[0] == c.step_loss[0]
    assert u.step_norm[0] == c.step_norm[0]
    assert len(u.epochs) == len(c.epochs) == 8  # --quick, and neither run stopped on NaN
    assert len(u.step_loss) == len(c.step_loss)
    # the first loss of an untrained model is about ln(vocabulary size)
    assert u.step_loss[0] == pytest.approx(math.log(61), rel=0.05)


def test_unclipped_run_blows_up(quick_run):
    u = quick_run["unclipped"]
    assert u.diverged_at is not None or u.final_loss > 1.5 * u.initial_loss, u.verdict()
    # the blow-up comes with gradient spikes far above the clipping threshold
    assert max(u.step_norm) > 20 * quick_run["config"].max_norm
    assert u.verdict().startswith(("diverged", "blew up"))


def test_clipped_run_converges_smoothly(quick_run):
    c = quick_run["clipped"]
    cfg = quick_run["config"]
    assert c.diverged_at is None
    assert all(math.isfinite(v) for v in c.step_loss + c.step_norm)
    assert c.final_loss < 0.75 * c.initial_loss, c.verdict()
    assert c.verdict().startswith("converged")
    # smooth: after the first epoch no step's loss comes back up to the initial loss
    after_first = c.step_loss[len(c.step_loss) // len(c.epochs):]
    assert max(after_first) < c.initial_loss
    assert all(e.loss < c.epochs[0].loss for e in c.epochs[1:])
    # clipping was really at work: some steps were clipped, and the share agrees with the norms
    steps = len(c.step_norm) // len(c.epochs)
    for i, epoch in enumerate(c.epochs):
        norms = c.step_norm[i * steps:(i + 1) * steps]
        assert epoch.clipped == pytest.approx(sum(n > cfg.max_norm for n in norms) / steps)
        assert epoch.max_norm == max(norms)
    assert c.epochs[0].clipped > 0.2


def test_writes_the_plot(quick_run):
    png = quick_run["plot"]
    if png is None:
        pytest.importorskip("matplotlib")
        pytest.fail("matplotlib is installed but no plot was written")
    data = Path(png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_threshold_never_reached_means_identical_runs(quick_run, capsys):
    """Negative control: with a threshold no gradient reaches, the "clipped" run must follow the
    unclipped one step for step (so the quick run's difference is clipping's doing), and the
    unclipped run must repeat the quick run's first epoch exactly (determinism)."""
    example = load_example()
    try:
        result = example.main(["--epochs", "1", "--max-norm", "1e9", "--plot", ""])
    finally:
        sys.modules.pop(MODULE, None)
    u, c = result["unclipped"], result["clipped"]
    assert c.step_loss == u.step_loss and c.step_norm == u.step_norm
    assert c.epochs[0].clipped == 0.0
    steps = len(u.step_loss)
    assert u.step_loss == quick_run["unclipped"].step_loss[:steps]
    assert c.step_loss != quick_run["clipped"].step_loss[:steps]

    # the printed table: a header, then one line per epoch and run
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.split()[:2] == ["run", "epoch"])
    assert "median |g|" in out[header] and "clipped" in out[header]
    rows = [line.split() for line in out[header + 1:header + 3]]
    assert [r[0] + " " + r[1] for r in rows] == ["no clip", "fastclip 1"]
    assert rows[0][-1] == "-" and rows[1][-1] == "0.0%"


def test_bad_arguments_exit_with_one_line(capsys):
    example = load_example()
    try:
        for argv in (["--lr", "0"], ["--max-norm", "nan"], ["--epochs", "0"],
                     ["--data", "/no/such/file.txt"]):
            with pytest.raises(SystemExit) as exc:
                example.main(argv)
            assert exc.value.code == 2
            err = capsys.readouterr().err.strip().splitlines()
            # argparse's usage, then one line naming the option; no traceback
            assert err[0].startswith("usage: train_lstm.py")
            assert err[-1].startswith("train_lstm.py: error: --")
            assert sum("error" in line for line in err) == 1
    finally:
        sys.modules.pop(MODULE, None)
