"""Fixtures for the pytest-benchmark suite: one gradient set in memory at a time.

Run with ``python -m pytest benchmarks --benchmark-enable`` (the default test command collects
``tests/`` only and disables benchmarks). ``FASTCLIP_BENCH_ROUNDS`` sets the timed rounds per
case (default 10). At the end, a summary prints fastclip's speedups computed from the medians.
"""

from __future__ import annotations

import gc
import os

import pytest

from fastclip.bench import cases as C
from fastclip.bench.gradsets import GradSet, materialize

ROUNDS = int(os.environ.get("FASTCLIP_BENCH_ROUNDS", "10"))
_medians: dict[C.Case, float] = {}
_bytes: dict[C.Case, int] = {}


class _OneSet:
    """Builds gradient sets on demand, keeping only the last one (gpt2-124m alone is 1 GB with its copy)."""

    def __init__(self):
        self.current: GradSet | None = None

    def get(self, name: str) -> GradSet:
        if self.current is None or self.current.name != name:
            self.current = None
            gc.collect()
            self.current = materialize(name, C.GRAD_SETS[name].shapes())
        return self.current


@pytest.fixture(scope="session")
def grad_sets():
    sets = _OneSet()
    yield sets
    sets.current = None


@pytest.fixture(scope="session")
def bench_rounds() -> int:
    return ROUNDS


@pytest.fixture(scope="session")
def bench_record():
    return record


def record(case: C.Case, benchmark, nbytes: int) -> None:
    """Keep the median (when benchmarks ran) for the end-of-run summary, and report GB/s."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the case ran once, untimed
        return
    median = stats.stats.median
    _medians[case], _bytes[case] = median, nbytes
    benchmark.extra_info["gb_per_s"] = round(nbytes / median / 1e9, 2)
    benchmark.extra_info["bytes_counted"] = nbytes


def pytest_terminal_summary(terminalreporter):
    if not _medians:
        return
    tr = terminalreporter
    tr.section("fastclip speedups (torch median / fastclip median, same run)")
    for g in dict.fromkeys(c.grad_set for c in _medians):
        for step in C.ALL_STEPS:
            fast = _medians.get(C.Case(g, C.BASELINE, step))
            if fast is None:
                continue
            parts = [f"x{_medians[C.Case(g, m, step)] / fast:.2f} vs {C.METHODS[m].label}"
                     for m in C.TORCH_METHODS if C.Case(g, m, step) in _medians]
            tr.write_line(f"{g:<14}{step:<14}" + ", ".join(parts))
        norm, read = C.Case(g, C.BASELINE), C.Case(g, "read-loop")
        if norm in _medians and read in _medians:
            norm_gbps = _bytes[norm] / _medians[norm] / 1e9
            read_gbps = _bytes[read] / _medians[read] / 1e9
            tr.write_line(f"{g:<14}{'norm pass':<14}fastclip {norm_gbps:.1f} GB/s = "
                          f"{norm_gbps / read_gbps:.0%} of the read loop's {read_gbps:.1f} GB/s")
