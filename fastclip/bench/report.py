"""Turn results into the text table, the JSON file and the PNG chart."""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Optional, Sequence

import numba
import numpy as np
import torch

import fastclip
from fastclip.bench import cases as C
from fastclip.bench.coldstart import ColdStart
from fastclip.bench.runner import BYTES_NOTE, SetResult

_LABEL = {m.name: m.label for m in C.METHODS.values()}


def machine() -> dict:
    """What the figures were measured on."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "fastclip": fastclip.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    info["huge_pages"] = huge_pages()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def huge_pages() -> str:
    """The kernel's transparent huge page mode and torch's use of it: both move CPU timings
    against torch (README "Huge pages": torch's allocator asks for them only with
    ``THP_MEM_ALLOC_ENABLE=1``)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = next((w.strip("[]") for w in f.read().split() if w.startswith("[")), "unknown")
    except OSError:
        mode = "unknown"
    return f"THP {mode}, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"


def _fmt(x: Optional[float], spec: str, blank: str = "") -> str:
    return blank if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _row_name(r) -> str:
    if r.kind == "step":
        return f"{r.step:<13}{r.label}"
    if r.kind == "norm-pass":
        return f"{'norm pass':<13}{_LABEL[r.method]}"
    return f"{'yardstick':<13}{r.label}"


def set_table(res: SetResult, repeat: int, warmup: int) -> str:
    """The per-set table, with its header and the norm check."""
    steps = {r.step for r in res.rows}
    thresholds = []
    if steps & set(C.STEPS):
        thresholds.append(f"exact norm {res.reference_norm:.9g}; max_norm = {C.STEPS['clipping'].factor:g} "
                          f"x norm (clipping), {C.STEPS['non-clipping'].factor:g} x norm (non-clipping)")
    if steps & set(C.VALUE_STEPS):
        share = "" if res.clamped_share is None else f", {res.clamped_share:.1%} of the values"
        thresholds.append(f"max |g| {res.max_abs:.6g}; clip_value = {C.VALUE_STEPS['clamping'].factor:g} "
                          f"x max |g| (clamping{share}), {C.VALUE_STEPS['non-clamping'].factor:g} x max |g| "
                          "(non-clamping, none)")
    lines = [
        f"== {res.name}: {res.n_tensors:,} tensors, {res.numel:,} {res.dtype} values "
        f"({res.nbytes / 1e6:,.1f} MB) on {res.device}; fastclip backend: {res.fastclip_backend}",
        *(f"   {t}" for t in thresholds),
        f"   median of {repeat} calls after {warmup} warm-up",
        f"{'operation':<34}{'median ms':>10}{'x foreach':>11}{'x loop':>9}{'GB/s':>8}{'% read':>8}{'% copy':>8}",
    ]
    for r in res.rows:
        lines.append(
            f"{_row_name(r):<34}{r.median_s * 1e3:>10.3f}"
            f"{_fmt(r.speedup.get('torch-foreach'), '.2f'):>11}{_fmt(r.speedup.get('torch-loop'), '.2f'):>9}"
            f"{r.gbps:>8.1f}{r.share_read:>8.0%}{r.share_copy:>8.0%}")
    if res.checks:
        lines.append(norm_line(res))
    if res.value_checks:
        lines.append(value_line(res))
    return "\n".join(lines)


def value_line(res: SetResult) -> str:
    """One line saying whether every ``clip_grad_value_`` step left torch's clamped values."""
    bad = [c for c in res.value_checks if not c.ok]
    if bad:
        detail = "; ".join(f"{_LABEL[c.method]} ({c.step}): {c.mismatched:,} values differ" for c in bad)
        return f"   clip_grad_value_ results DISAGREE with torch's clamp of the same grads: {detail}"
    return ("   clip_grad_value_: every step left exactly torch's clamp(-clip_value, clip_value) "
            "of the grads, value for value.")


def norm_line(res: SetResult) -> str:
    """One line saying whether every run's norm matches the exact reference."""
    bad = [c for c in res.checks if not c.ok]
    if bad:
        detail = "; ".join(
            f"{_LABEL[c.method]} ({c.step}): norm {c.norm:.9g}, rel error {c.rel_error:.1e} (allowed "
            f"{c.rtol:.1e})" + (f", grads scaled {c.scale_error:.1e} off torch's coefficient"
                                if c.scale_error > c.scale_rtol else "")
            for c in bad)
        return f"   norms DISAGREE with the exact reference {res.reference_norm:.9g}: {detail}"
    parts = []
    for method in dict.fromkeys(c.method for c in res.checks):
        mine = [c for c in res.checks if c.method == method]
        worst = max(c.rel_error for c in mine)
        parts.append(f"{_LABEL[method]} {worst:.1e} (allowed {mine[0].rtol:.1e})")
    scaled = " Every step scaled the grads by min(max_norm / (norm + 1e-6), 1)." \
        if any(c.step in C.STEPS for c in res.checks) else ""
    return ("   norms agree with the exact float64 reference, largest relative error: " + ", ".join(parts)
            + "." + scaled)


def summary_table(results: Sequence[SetResult]) -> str:
    """fastclip's speedups, one line per (set, step), and its norm pass against the read loop."""
    timed = {r.step for res in results for r in res.rows}
    value_note = " (clamping, non-clamping: clip_grad_value_)" if timed & set(C.VALUE_STEPS) else ""
    lines = ["summary: fastclip speedup = torch median / fastclip median (same run)" + value_note,
             f"{'set':<22}{'step':<14}{'x foreach':>10}{'x loop':>8}{'fastclip GB/s':>15}"]
    for res in results:
        for step in C.ALL_STEPS:
            r = res.row(C.BASELINE, step)
            if r is None:
                continue
            lines.append(f"{res.name:<22}{step:<14}{_fmt(r.speedup.get('torch-foreach'), '.2f'):>10}"
                         f"{_fmt(r.speedup.get('torch-loop'), '.2f'):>8}{r.gbps:>15.1f}")
        norm = res.row(C.BASELINE)
        read = next(r for r in res.rows if r.kind == "read-loop")
        if norm is not None:
            lines.append(f"{res.name:<22}{'norm pass':<14}{'':>18}{norm.gbps:>15.1f}"
                         f"   = {norm.share_read:.0%} of the read loop's {read.gbps:.1f} GB/s")
    return "\n".join(lines)


def cold_start_line(cs: ColdStart) -> str:
    verdict = "met" if cs.met else "NOT met"
    return (f"cold start (fresh process, warm numba cache, median of {len(cs.runs)}): import torch "
            f"{cs.import_torch_s:.2f} s; import fastclip + first clip adds {cs.fastclip_s:.3f} s "
            f"(target < {cs.target_s:g} s: {verdict})")


def header() -> str:
    m = machine()
    cpu = m.get("cpu_model", m["processor"])
    return (f"fastclip-bench {fastclip.__version__}: torch {m['torch']}, numba {m['numba']}, {cpu}, "
            f"{m['cpu_count']} CPUs, {m['torch_threads']} torch threads, {m['huge_pages']}"
            + (f", {m['gpu']}" if "gpu" in m else "") + f"\n{BYTES_NOTE}\n"
            "yardsticks, on the same grads in the same run: read loop = every grad byte summed as uint64 "
            "words, copy loop = the saved grads copied into the grads the same way (numba, parallel; "
            "on CUDA torch.sum over a buffer of the same size, and torch._foreach_copy_)")


def to_json(results: Sequence[SetResult], cold: Optional[ColdStart], config: dict) -> dict:
    return {
        "fastclip_bench": 1,
        "machine": machine(),
        "config": config,
        "bytes_note": BYTES_NOTE,
        "sets": [r.to_dict() for r in results],
        "norms_agree": all(r.norms_agree for r in results),
        "values_agree": all(r.values_agree for r in results),
        "cold_start": cold.to_dict() if cold is not None else None,
    }


def _strict(value):
    """NaN and inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as strict JSON (non-finite numbers become null)."""
    with open(path, "w") as f:
        json.dump(_strict(data), f, indent=2, allow_nan=False)
        f.write("\n")


def plot_title(results: Sequence[SetResult]) -> str:
    m = machine()
    dtypes = ", ".join(dict.fromkeys(r.dtype for r in results))
    devices = ", ".join(dict.fromkeys(r.device for r in results))
    if "cuda" in devices:
        where = m.get("gpu", "cuda")
    else:
        where = f"{m.get('cpu_model', m['processor'])}, {m['torch_threads']} threads"
    return f"fastclip {m['fastclip']} vs torch {m['torch']} ({where}; {dtypes} grads)"


def plot(path: str, results: Sequence[SetResult], title: str = "") -> None:
    """A PNG bar chart: speedup over torch foreach=True per set, one panel per step.

    Draws on a bare ``Figure`` (Agg canvas), so pyplot's global backend is never touched.
    """
    from matplotlib.figure import Figure

    steps = [s for s in C.ALL_STEPS if any(r.row(C.BASELINE, s) or r.row("torch-foreach", s) for r in results)]
    methods = [m for m in C.METHODS if any(r.row(m, s) for r in results for s in steps)]
    fig = Figure(figsize=(max(6.0, 1.5 + 1.6 * len(results)), 0.6 + 3.0 * len(steps)))
    axes = fig.subplots(len(steps), 1, squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, step in zip(axes[:, 0], steps):
        x = np.arange(len(results))
        for i, m in enumerate(methods):
            values = []
            for res in results:
                r = res.row(m, step)
                ref = res.row("torch-foreach", step)
                values.append(ref.median_s / r.median_s if r is not None and ref is not None else 0.0)
            bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, values, width, label=_LABEL[m])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(x, [r.name for r in results])
        function = "clip_grad_value_" if step in C.VALUE_STEPS else "clip_grad_norm_"
        ax.set_title(f"{function}: {step} step", fontsize=10)
        ax.set_ylabel("speedup vs torch foreach=True", fontsize=8)
        ax.margins(y=0.15)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
