"""pytest-benchmark: fastclip vs torch's clip_grad_norm_ (and clip_grad_value_) on the core
issue's four CPU sets.

The cases come from ``fastclip.bench.cases`` (the table ``fastclip-bench`` runs): for each set,
the read and copy loops, the norm pass of fastclip and torch, and a clipping and a non-clipping
step of fastclip, torch foreach=True and torch foreach=False, for ``clip_grad_norm_`` and for
``clip_grad_value_`` (clamping, non-clamping). Grads are restored in pedantic's ``setup``,
outside the timing. Run:

    python -m pytest benchmarks --benchmark-enable
"""

from __future__ import annotations

import pytest

from fastclip.bench import cases as C
from fastclip.bench.runner import check_norm, check_values, operation


@pytest.mark.parametrize("case", C.all_cases(C.ISSUE_SETS, C.ALL_STEPS), ids=lambda c: c.id)
def test_case(benchmark, grad_sets, bench_rounds, bench_record, case):
    gs = grad_sets.get(case.grad_set)
    op = operation(case, gs)
    benchmark.group = f"{case.grad_set} {case.step or 'norm pass and yardsticks'}"
    benchmark.name = f"{case.id}"

    def setup():
        op.before()
        gs.sync()

    result = benchmark.pedantic(op.fn, setup=setup, rounds=bench_rounds, warmup_rounds=1, iterations=1)
    if case.step in C.VALUE_STEPS:
        value_check = check_values(case.method, case.step, gs)
        assert value_check.ok, f"{case.id}: {value_check.mismatched} values differ from torch's clamp"
    elif case.kind in ("step", "norm-pass"):
        check = check_norm(case.method, case.step or case.kind, float(result), gs)
        assert check.ok, (f"{case.id}: norm {check.norm!r} is {check.rel_error:.1e} from the exact "
                          f"{gs.reference_norm!r} (allowed {check.rtol:.1e})")
    gs.restore()
    bench_record(case, benchmark, op.bytes_counted)
