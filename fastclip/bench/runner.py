"""Time every case of one gradient set and check that the norms agree.

Every timed call is preceded, outside its timing, by a restore of the original grads (and a
device sync on CUDA); each call is timed on its own with ``time.perf_counter`` and the median is
reported. The read loop and the copy loop are measured in the same run on the same grads, so the
bandwidth shares compare like with like.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence, cast

import torch

from fastclip.bench import cases as C
from fastclip.bench.gradsets import GradSet
from fastclip.bench.memloops import read_loop
from fastclip.bench.progress import Progress

# What "GB/s" counts: the grad bytes a step must move at the least, in units of the grads' size.
BYTES_PER_GRAD_BYTE = {"clipping": 3, "non-clipping": 1, "non-clamping": 1}
BYTES_NOTE = ("GB/s = grad bytes the operation must move / median time: non-clipping step, norm pass "
              "and read loop 1x the grads (one read); clipping step 3x (read for the norm, read + "
              "write to scale); copy loop 2x (read + write); clip_grad_value_: non-clamping 1x (one "
              "read: no value changes), clamping (1 + s)x (one read, and a write of the share s of "
              "the values that change)")

# fastclip's norm is exact to the rounding of its result: float64 sums, then one rounding. For
# float64 grads the float64 sums round too (chunks of at most 64K values: random-order rounding
# grows as sqrt(n) * 2**-53, about 3e-14; observed <= 2e-16 on the presets, where torch's CPU
# norm was 1e-13 off), against a reference summed in long double (gradsets.reference_norm).
# Never looser than torch's own allowance (torch_rtol).
EXACT_RTOL = {torch.float64: 1e-12, torch.float32: 2.0 ** -22}

# torch's CPU norm accumulates squares in float32 (in float64 for float64 grads), so its error
# grows with the longest tensor: observed 6e-3 on one 64M-value tensor, 7e-5 on gpt2-124m, 2e-7 on
# many-small (float32). 16-bit grads also get a 16-bit result (one more rounding), and torch's
# fp16 norm was worse still (4e-2 on 64M values). rtol = rounding + per-value growth * longest,
# where rounding allows a few float32 roundings (per-tensor norms, their combination, the root).
_TORCH_ROUNDING = {torch.float64: 1e-12, torch.float32: 2.0 ** -21, torch.bfloat16: 2.0 ** -8,
                   torch.float16: 2.0 ** -10}
_TORCH_GROWTH = {torch.float64: 1e-18, torch.float32: 2.4e-10, torch.bfloat16: 2.4e-10,
                 torch.float16: 1.5e-9}


def torch_rtol(dtype: torch.dtype, longest: int) -> float:
    """The relative error allowed for torch's norm of grads of ``dtype``, longest ``longest`` values."""
    return _TORCH_ROUNDING[dtype] + _TORCH_GROWTH[dtype] * longest


@dataclass
class Row:
    """One timed operation of a gradient set."""

    kind: str                 # "step", "norm-pass", "read-loop" or "copy-loop"
    method: str               # a METHODS or YARDSTICKS key
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


def scale_rtol(dtype: torch.dtype) -> float:
    """The relative gap allowed between a scaled value and its saved value times torch's
    coefficient: the product's rounding to ``dtype`` and the coefficient's own rounding (float32
    for 16-bit grads: one bf16 step apart from torch's at most, README)."""
    return 2.0 * torch.finfo(dtype).eps


@dataclass
class NormCheck:
    """A run's norm against the exact reference and, for a step, the scale its grads got.

    Attributes:
        scale_error: the largest relative gap, over values sampled from every grad, between a
            scaled value and its saved value times torch's ``min(max_norm / (norm + 1e-6), 1)``;
            NaN for a norm pass.
        scale_rtol: the gap allowed (``scale_rtol`` of the grads' dtype).
    """

    method: str
    step: str
    norm: float
    rel_error: float
    rtol: float
    scale_error: float = math.nan
    scale_rtol: float = math.inf

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.rtol and not self.scale_error > self.scale_rtol


@dataclass
class ValueCheck:
    """A ``clip_grad_value_`` step's grads against torch's ``clamp`` of the saved grads.

    Attributes:
        mismatched: values (over every grad) that differ from ``saved.clamp(-v, v)``.
    """

    method: str
    step: str
    clip_value: float
    mismatched: int

    @property
    def ok(self) -> bool:
        return self.mismatched == 0


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
    value_checks: list[ValueCheck] = field(default_factory=list)
    max_abs: float = math.nan
    clamped_share: Optional[float] = None  # values the clamping step changes (when timed)

    @property
    def norms_agree(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def values_agree(self) -> bool:
        return all(c.ok for c in self.value_checks)

    @property
    def all_agree(self) -> bool:
        return self.norms_agree and self.values_agree

    def row(self, method: str, step: Optional[str] = None) -> Optional[Row]:
        for r in self.rows:
            if r.method == method and r.step == step:
                return r
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        for r, rd in zip(self.rows, d["rows"]):
            rd.update(median_ms=r.median_s * 1e3, gbps=r.gbps)
        oks = [c.ok for c in self.checks] + [c.ok for c in self.value_checks]
        for ok, cd in zip(oks, d["checks"] + d["value_checks"]):
            cd["ok"] = ok
        d["norms_agree"] = self.norms_agree
        d["values_agree"] = self.values_agree
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
    return len(C.set_cases("", steps, methods)) * (warmup + repeat)


@dataclass
class Operation:
    """A case made runnable on a materialized set: ``before()`` (untimed) then ``fn()`` (timed)."""

    fn: Callable[[], object]
    before: Callable[[], None]
    bytes_counted: int
    label: str


def operation(case: C.Case, gs: GradSet) -> Operation:
    """The callable a case times on ``gs``; the CLI and the pytest-benchmark suite both use it."""
    n = gs.nbytes
    if case.kind == "read-loop":
        fn, nbytes = read_loop(gs.grads)
        return Operation(fn, gs.restore, nbytes, C.YARDSTICKS[case.method])
    if case.kind == "copy-loop":
        return Operation(gs.restore, lambda: None, 2 * n, C.YARDSTICKS[case.method])
    method = C.METHODS[case.method]
    if case.kind == "norm-pass":
        return Operation(lambda: method.norm(gs.grads), gs.restore, n, method.label)
    if case.step in C.VALUE_STEPS:
        if method.clamp is None:
            raise ValueError(f"method {case.method!r} has no clip_grad_value_ (its `clamp`)")
        clamp, clip_value = method.clamp, C.VALUE_STEPS[case.step].clip_value(gs.max_abs)
        nbytes = round(n * (1 + gs.share_clamped(clip_value))) if case.step == "clamping" \
            else BYTES_PER_GRAD_BYTE[case.step] * n
        return Operation(lambda: clamp(gs.params, clip_value), gs.restore, nbytes, method.label)
    step = cast(str, case.step)  # a "step" case names its step
    max_norm = C.STEPS[step].max_norm(gs.reference_norm)
    return Operation(lambda: method.clip(gs.params, max_norm), gs.restore,
                     BYTES_PER_GRAD_BYTE[step] * n, method.label)


def cuda_backend_usable() -> bool:
    """Whether fastclip's CUDA kernels run here (else fastclip leaves CUDA grads to torch)."""
    try:
        from fastclip import _cuda
        return bool(_cuda.is_available())
    except Exception:  # not installed, or numba-cuda cannot start here: fastclip uses torch
        return False


def _backend_name(device: torch.device) -> str:
    if device.type == "cpu":
        return "numba CPU kernels"
    return "numba CUDA kernels" if cuda_backend_usable() else \
        "none (fastclip falls back to torch on this device)"


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


def scale_error(gs: GradSet, max_norm: float, norm: float) -> float:
    """How far the grads (after a step, before a restore) are from their saved values times
    torch's coefficient for the ``norm`` that step returned (the norm itself is checked apart):
    the largest relative gap over up to ``_SCALE_SAMPLE`` values spread over each grad (at most
    1024 apart from 64M values on), so that a grad, or a chunk of one, left unscaled or scaled
    twice shows. Results below the smallest normal are compared to it."""
    coef = min(max_norm / (norm + 1e-6), 1.0)
    worst = 0.0
    for grad, saved in zip(gs.grads, gs.saved):
        stride = max(1, grad.numel() // _SCALE_SAMPLE)
        after = grad.reshape(-1)[::stride].to(torch.float64)
        expected = saved.reshape(-1)[::stride].to(torch.float64) * coef
        if not expected.numel():
            continue
        floor = torch.finfo(grad.dtype).smallest_normal
        gap = (after - expected).abs() / expected.abs().clamp(min=floor)
        largest = float(gap.max())
        if largest != largest:  # a NaN written where a number was due (NaN itself means "no step")
            return math.inf
        worst = max(worst, largest)
    return worst


_SCALE_SAMPLE = 1 << 16


def check_values(method: str, step: str, gs: GradSet) -> ValueCheck:
    """Compare every grad (after a ``clip_grad_value_`` step, before a restore) with torch's
    ``clamp`` of its saved values, value for value."""
    clip_value = C.VALUE_STEPS[step].clip_value(gs.max_abs)
    mismatched = 0
    for g, saved in zip(gs.grads, gs.saved):
        expected = saved.clamp(-clip_value, clip_value)
        mismatched += int((g.reshape(-1) != expected.reshape(-1)).sum())  # no NaN in the sets
    return ValueCheck(method, step, clip_value, mismatched)


def run_set(gs: GradSet, steps: Sequence[str], methods: Sequence[str], repeat: int, warmup: int,
            progress: Progress) -> SetResult:
    """Time every case of ``cases.set_cases`` on ``gs``, and check each method's norm (and,
    after a ``clip_grad_value_`` step, every grad against torch's clamp).

    Args:
        gs: a materialized gradient set.
        steps: ``STEPS`` and ``VALUE_STEPS`` keys.
        methods: ``METHODS`` keys.
        repeat: timed calls per operation (the median is reported).
        warmup: untimed calls first (compilation, caches, allocator).
        progress: ticked once per call.
    """
    rows: list[Row] = []
    checks: list[NormCheck] = []
    value_checks: list[ValueCheck] = []
    for case in C.set_cases(gs.name, steps, methods):
        op = operation(case, gs)
        what = case.step or ("norm pass" if case.kind == "norm-pass" else "yardstick")
        progress.phase(f"{gs.name}: {what}, {op.label}")
        times, result = time_calls(op.fn, op.before, gs.sync, repeat, warmup, progress)
        norm = None
        if case.step in C.VALUE_STEPS:  # the grads still hold the last call's output
            value_checks.append(check_values(case.method, case.step, gs))
        elif case.kind in ("step", "norm-pass"):
            norm = float(cast(torch.Tensor, result))
            check = check_norm(case.method, case.step or case.kind, norm, gs)
            if case.step is not None:  # a step: the grads still hold the last call's output
                check.scale_error = scale_error(gs, C.STEPS[case.step].max_norm(gs.reference_norm), norm)
                check.scale_rtol = scale_rtol(gs.dtype)
            checks.append(check)
        rows.append(Row(case.kind, case.method, op.label, case.step, times, op.bytes_counted, norm))
    gs.restore()
    _derive(rows)
    share = gs.share_clamped(C.VALUE_STEPS["clamping"].clip_value(gs.max_abs)) if "clamping" in steps else None
    return SetResult(gs.name, str(gs.device), str(gs.dtype).replace("torch.", ""), len(gs.grads),
                     gs.numel, gs.nbytes, gs.reference_norm, _backend_name(gs.device), rows, checks,
                     value_checks, gs.max_abs, share)


def _derive(rows: list[Row]) -> None:
    """Fill each row's speedups over the torch methods of the same step, and bandwidth shares."""
    read = next(r for r in rows if r.kind == "read-loop")
    copy = next(r for r in rows if r.kind == "copy-loop")
    for r in rows:
        r.share_read = r.gbps / read.gbps
        r.share_copy = r.gbps / copy.gbps
        if r.kind not in ("step", "norm-pass"):
            continue
        for other in rows:
            if other.kind == r.kind and other.step == r.step and other.method in C.TORCH_METHODS:
                r.speedup[other.method] = other.median_s / r.median_s
