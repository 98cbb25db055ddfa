"""Time every case of one gradient set and check that the norms agree.

Every timed call is preceded, outside its timing, by a restore of the original grads (and a
device sync on CUDA); each call is timed on its own with ``time.perf_counter`` and the median is
reported. The read loop and the copy are measured in the same run on the same grads, so the
bandwidth shares compare like with like.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from fastclip.bench import cases as C
from fastclip.bench.gradsets import GradSet
from fastclip.bench.progress import Progress
from fastclip.bench.readloop import read_loop

# What "GB/s" counts: the grad bytes a step must move at the least, in units of the grads' size.
BYTES_PER_GRAD_BYTE = {"clipping": 3, "non-clipping": 1, "norm-pass": 1, "read-loop": 1, "copy": 2}
BYTES_NOTE = ("GB/s = grad bytes the operation must move / median time: non-clipping step and norm "
              "pass 1x the grads (one read), clipping step 3x (read for the norm, read + write to "
              "scale), copy 2x (read + write)")

# fastclip's norm is exact to the rounding of its result: float64 sums, then one rounding.
EXACT_RTOL = {torch.float64: 1e-10, torch.float32: 2.0 ** -22}

# torch's CPU norm accumulates squares in float32 (in float64 for float64 grads), so its error
# grows with the longest tensor: observed 6e-3 on one 64M-value tensor, 7e-5 on gpt2-124m, 2e-7 on
# many-small (float32). 16-bit grads also get a 16-bit result (one more rounding), and torch's
# fp16 norm was worse still (4e-2 on 64M values). rtol = rounding + per-value growth * longest.
_TORCH_ROUNDING = {torch.float64: 1e-12, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8,
                   torch.float16: 2.0 ** -10}
_TORCH_GROWTH = {torch.float64: 1e-18, torch.float32: 2.4e-10, torch.bfloat16: 2.4e-10,
                 torch.float16: 1.5e-9}


def torch_rtol(dtype: torch.dtype, longest: int) -> float:
    """The relative error allowed for torch's norm of grads of ``dtype``, longest ``longest`` values."""
    return _TORCH_ROUNDING[dtype] + _TORCH_GROWTH[dtype] * longest


@dataclass
class Row:
    """One timed operation of a gradient set."""

    kind: str                 # "step", "norm-pass", "read-loop" or "copy"
    method: str               # a METHODS key, or "read-loop" / "copy"
    label: str
    step: Optional[str]       # "clipping" / "non-clipping" for steps
    times_s: list[float]
    bytes_counted: int
    norm: Optional[float] = None
    speedup: dict[str, float] = field(default_factory=dict)  # torch method -> its time / this time
    share_read: float = math.nan
    share_copy: float = math.nan

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def gbps(self) -> float:
        return self.bytes_counted / self.median_s / 1e9


@dataclass
class NormCheck:
    method: str
    step: str
    norm: float
    rel_error: float
    rtol: float

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.rtol


@dataclass
class SetResult:
    name: str
    device: str
    dtype: str
    n_tensors: int
    numel: int
    nbytes: int
    reference_norm: float
    fastclip_backend: str
    rows: list[Row]
    checks: list[NormCheck]

    @property
    def norms_agree(self) -> bool:
        return all(c.ok for c in self.checks)

    def row(self, method: str, step: Optional[str] = None) -> Optional[Row]:
        for r in self.rows:
            if r.method == method and r.step == step:
                return r
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        for r, rd in zip(self.rows, d["rows"]):
            rd.update(median_ms=r.median_s * 1e3, gbps=r.gbps)
        for c, cd in zip(self.checks, d["checks"]):
            cd["ok"] = c.ok
        d["norms_agree"] = self.norms_agree
        return d


def time_calls(fn: Callable[[], object], before: Callable[[], None], sync: Callable[[], None],
               repeat: int, warmup: int, progress: Progress) -> tuple[list[float], object]:
    """Run ``before(); fn()`` ``warmup + repeat`` times; time each ``fn()`` alone.

    Returns:
        The ``repeat`` timings in seconds, and the last call's result.
    """
    times, result = [], None
    for i in range(warmup + repeat):
        before()
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
        progress.tick()
    return times, result


def calls_per_set(steps: Sequence[str], methods: Sequence[str], repeat: int, warmup: int) -> int:
    """How many timed calls ``run_set`` makes, for the progress bar."""
    norm_methods = [m for m in C.NORM_PASS_METHODS if m in methods]
    return (2 + len(steps) * len(methods) + len(norm_methods)) * (warmup + repeat)


def _backend_name(grads: list[torch.Tensor]) -> str:
    from fastclip._plan import Plan

    plan = Plan.build(grads)
    if plan is None:
        return "torch (fastclip has no kernel for this device/dtype and falls back to torch)"
    return ", ".join(sorted({s.backend.__name__ for s in plan.sets}))


def rel_error(value: float, reference: float) -> float:
    if value == reference:
        return 0.0
    if not math.isfinite(value) or reference == 0.0:
        return math.inf
    return abs(value - reference) / abs(reference)


def check_norm(method: str, step: str, norm: float, gs: GradSet) -> NormCheck:
    """Compare one run's norm with the exact reference, within that implementation's error."""
    if method == C.BASELINE:
        rtol = EXACT_RTOL[torch.float64 if gs.dtype == torch.float64 else torch.float32]
    else:
        rtol = torch_rtol(gs.dtype, max(g.numel() for g in gs.grads))
    return NormCheck(method, step, norm, rel_error(norm, gs.reference_norm), rtol)


def run_set(gs: GradSet, steps: Sequence[str], methods: Sequence[str], repeat: int, warmup: int,
            progress: Progress) -> SetResult:
    """Time the read loop, the copy, each method's norm pass, and each (step, method) of ``gs``.

    Args:
        gs: a materialized gradient set.
        steps: ``STEPS`` keys.
        methods: ``METHODS`` keys.
        repeat: timed calls per operation (the median is reported).
        warmup: untimed calls first (compilation, caches, allocator).
        progress: ticked once per call.
    """
    sync, restore = gs.sync, gs.restore
    rows: list[Row] = []
    checks: list[NormCheck] = []
    n = gs.nbytes

    progress.phase(f"{gs.name}: read loop and copy")
    read, read_bytes = read_loop(gs.grads)
    times, _ = time_calls(read, restore, sync, repeat, warmup, progress)
    rows.append(Row("read-loop", "read-loop", "plain read loop", None, times, read_bytes))
    times, _ = time_calls(restore, lambda: None, sync, repeat, warmup, progress)
    rows.append(Row("copy", "copy", "copy (torch copy_)", None, times, 2 * n))

    for name in [m for m in C.NORM_PASS_METHODS if m in methods]:
        method = C.METHODS[name]
        progress.phase(f"{gs.name}: norm pass, {method.label}")
        times, norm = time_calls(lambda: method.norm(gs.grads), restore, sync, repeat, warmup, progress)
        rows.append(Row("norm-pass", name, f"{method.label} norm pass", None, times, n, float(norm)))
        checks.append(check_norm(name, "norm-pass", float(norm), gs))

    for step_name in steps:
        max_norm = C.STEPS[step_name].max_norm(gs.reference_norm)
        for name in methods:
            method = C.METHODS[name]
            progress.phase(f"{gs.name}: {step_name}, {method.label}")
            times, norm = time_calls(lambda: method.clip(gs.params, max_norm), restore, sync,
                                     repeat, warmup, progress)
            rows.append(Row("step", name, method.label, step_name, times,
                            BYTES_PER_GRAD_BYTE[step_name] * n, float(norm)))
            checks.append(check_norm(name, step_name, float(norm), gs))
    restore()

    _derive(rows)
    return SetResult(gs.name, str(gs.device), str(gs.dtype).replace("torch.", ""), len(gs.grads),
                     gs.numel, n, gs.reference_norm, _backend_name(gs.grads), rows, checks)


def _derive(rows: list[Row]) -> None:
    """Fill each row's speedups over the torch methods of the same step, and bandwidth shares."""
    read = next(r for r in rows if r.kind == "read-loop")
    copy = next(r for r in rows if r.kind == "copy")
    for r in rows:
        r.share_read = r.gbps / read.gbps
        r.share_copy = r.gbps / copy.gbps
        if r.kind not in ("step", "norm-pass"):
            continue
        for other in rows:
            if other.kind == r.kind and other.step == r.step and other.method in C.TORCH_METHODS:
                r.speedup[other.method] = other.median_s / r.median_s
