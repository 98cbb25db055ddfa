"""Type hints: the package passes mypy (configured in pyproject.toml), and a user's code is
checked against the public API's hints (typical calls pass; wrong argument types are caught)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parents[1]


def _mypy(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mypy_cache")


def test_package_passes_mypy(cache):
    run = _mypy(cache=cache)  # `files` and the options come from pyproject.toml
    assert run.returncode == 0, run.stdout + run.stderr


USER_CODE = """
    import torch
    import fastclip

    model = torch.nn.Linear(3, 3)
    norm: torch.Tensor = fastclip.clip_grad_norm_(model.parameters(), max_norm=1.0)
    norm = fastclip.clip_grad_norm_(list(model.parameters()), torch.tensor(1.0), norm_type="inf",
                                    error_if_nonfinite=True, foreach=None)
    total: torch.Tensor = fastclip.get_total_norm([torch.ones(3)], 2.0)
    fastclip.clip_grads_with_norm_(model.parameters(), 1.0, total)
    fastclip.clip_grad_value_(model.parameters(), clip_value=0.5)
    # One-element tensors and arrays, and numpy scalars, are numbers too (README).
    import numpy as np
    fastclip.clip_grad_value_(model.parameters(), torch.tensor(0.5))
    fastclip.clip_grad_norm_(model.parameters(), np.array([1.0]), norm_type=np.float32(2.0))
    fastclip.GradClipper(model.parameters(), max_norm=torch.tensor([1.0]), norm_type=torch.tensor(2.0))
    stats = fastclip.ClipStats()
    fastclip.clip_grad_norm_(model.parameters(), 1.0, stats=stats)
    clipper = fastclip.GradClipper(model.parameters(), max_norm=1.0, policy=fastclip.ZClip())
    step_norm: torch.Tensor = clipper.step()
    skipped: torch.Tensor = clipper.skipped
    fastclip.adaptive_grad_clip_(model.parameters(), clipping=0.01, eps=1e-3)
    opt = torch.optim.AdamW(model.parameters())
    fastclip.clip_and_step(opt, max_norm=1.0)
    with fastclip.patched():
        pass
"""

# Each line is a mistake mypy must report, with the words of its message.
MISTAKES = {
    'fastclip.clip_grad_norm_(model.parameters(), max_norm="1.0")': 'Argument "max_norm"',
    'fastclip.clip_grad_norm_(model.parameters(), 1.0, stats=3)': 'Argument "stats"',
    'n: int = fastclip.get_total_norm([torch.ones(3)])': "Incompatible types in assignment",
    'fastclip.clip_grads_with_norm_(model.parameters(), 1.0, total_norm=2.0)': 'Argument "total_norm"',
    'fastclip.GradClipper(model.parameters(), policy="zclip")': 'Argument "policy"',
}


def test_user_code_is_checked_against_the_public_hints(cache, tmp_path):
    good = tmp_path / "good.py"
    good.write_text(textwrap.dedent(USER_CODE))
    run = _mypy("--config-file", str(ROOT / "pyproject.toml"), str(good), cache=cache)
    assert run.returncode == 0, run.stdout + run.stderr

    bad = tmp_path / "bad.py"
    lines = list(MISTAKES)
    bad.write_text(textwrap.dedent(USER_CODE) + "\n".join(lines) + "\n")
    run = _mypy("--config-file", str(ROOT / "pyproject.toml"), str(bad), cache=cache)
    first = len(textwrap.dedent(USER_CODE).splitlines()) + 1
    for k, (line, words) in enumerate(MISTAKES.items()):
        reported = [m for m in run.stdout.splitlines() if f"bad.py:{first + k}:" in m]
        assert reported and words in reported[0], f"{line!r} not reported: {run.stdout}"
