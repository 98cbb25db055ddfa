"""The benchmark run behind ``fastclip-bench``: build each set, time it, report."""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Optional

import torch

from fastclip.bench import cases as C
from fastclip.bench import coldstart, report
from fastclip.bench.cli import DTYPES
from fastclip.bench.gradsets import GradSet, from_module, materialize
from fastclip.bench.progress import Progress
from fastclip.bench.runner import SetResult, calls_per_set, run_set


def _steps(args: argparse.Namespace) -> list[str]:
    """The STEPS / VALUE_STEPS keys that ``--function`` and ``--step`` ask for."""
    kinds = ["clipping", "non-clipping"] if args.step == "both" else [args.step]
    functions = C.FUNCTIONS if args.function == "both" else [args.function]
    return [C.STEP_OF[f, k] for f in functions for k in kinds]


def _build(name: str, args: argparse.Namespace, model: Optional[torch.nn.Module]) -> GradSet:
    dtype = DTYPES[args.dtype]
    if model is not None and name == f"model:{args.model}":
        return from_module(name, model, dtype, args.device, args.seed)
    return materialize(name, C.GRAD_SETS[name].shapes(), dtype, args.device, args.seed)


def run(args: argparse.Namespace, presets: list[str], model: Optional[torch.nn.Module]) -> int:
    """Time every set, print the tables, write JSON/PNG; 0 when every norm (and every
    clip_grad_value_ result) agrees, else 1."""
    steps, methods = _steps(args), list(C.METHODS)
    names = presets + ([f"model:{args.model}"] if model is not None else [])
    cold_runs = 0 if args.no_cold_start else args.cold_start_runs
    total = len(names) * calls_per_set(steps, methods, args.repeat, args.warmup) + cold_runs
    progress = Progress(total, enabled=not args.quiet)

    print(report.header(), flush=True)
    results: list[SetResult] = []
    for name in names:
        progress.phase(f"{name}: building")
        try:
            gs = _build(name, args, model)
        except (RuntimeError, MemoryError) as e:  # e.g. out of memory: say so in one line
            progress.clear()
            print(f"fastclip-bench: error: could not build gradient set {name}: {str(e).splitlines()[0]}",
                  file=sys.stderr)
            return 1
        res = run_set(gs, steps, methods, args.repeat, args.warmup, progress)
        del gs
        gc.collect()
        results.append(res)
        progress.clear()
        print("\n" + report.set_table(res, args.repeat, args.warmup), flush=True)

    cold = None
    if cold_runs:
        progress.phase("cold start: fresh processes")
        try:
            cold = coldstart.measure(cold_runs)
        except Exception as e:  # a measurement failed: report it, keep the timings
            progress.clear()
            print(f"\ncold start: not measured ({str(e).splitlines()[0]})", flush=True)
        progress.tick(cold_runs)
    progress.close()

    print("\n" + report.summary_table(results))
    if cold is not None:
        print(report.cold_start_line(cold))
    agree = all(r.all_agree for r in results)
    if any(r.checks for r in results):
        print("norms: every run agrees with the exact reference" if all(r.norms_agree for r in results)
              else "norms: some runs DISAGREE with the exact reference (see the tables above)")
    if any(r.value_checks for r in results):
        print("clip_grad_value_: every run left torch's clamped values"
              if all(r.values_agree for r in results)
              else "clip_grad_value_: some runs DISAGREE with torch's clamp (see the tables above)")
    if args.json:
        report.write_json(args.json, report.to_json(results, cold, vars(args)))
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot, results, title=report.plot_title(results))
        print(f"wrote {args.plot}")
    return 0 if agree else 1
