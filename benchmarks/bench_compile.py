#!/usr/bin/env python3
"""fastclip against torch's ``clip_grad_norm_`` compiled by ``torch.compile`` (inductor).

A user who compiles the training step can let inductor compile torch's own clipping (fusing
its foreach ops), or call fastclip, which runs eagerly at a graph break. This times, in one run:
torch eager (foreach), torch compiled (inductor, default mode) and fastclip, in a clipping and a
non-clipping step (``max_norm`` = 0.1x and 10x the norm, grads restored before every call), and
reports inductor's compile time.

Usage::

    python3 benchmarks/bench_compile.py                       # gpt2-124m on the CPU
    python3 benchmarks/bench_compile.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

import fastclip
from fastclip.bench.cases import GRAD_SETS, STEPS
from fastclip.clip_grad import TORCH_CLIP_GRAD_NORM


def tiny_shapes() -> list:
    return [(33, 7), (5,), (130,)]  # for the script's own test


# How far each method's coefficient may be from the exact one: torch sums in float32 (relative
# error ~1e-3 to 5e-3 on 10^8 values on the CPU); fastclip's norm is exact to float32 rounding.
TOLERANCES = {"torch eager": 1e-2, "torch compiled": 1e-2, "fastclip": 1e-6}


def _expected_coef(max_norm: float, norm: float) -> float:
    return min(max_norm / (norm + 1e-6), 1.0)


def _scaled_by(clipped: list, saved: list, coef: float, tol: float) -> bool:
    """Every grad is its saved value times one factor, within ``tol`` of ``coef``."""
    num = sum(float((c.double() * s.double()).sum()) for c, s in zip(clipped, saved))
    den = sum(float((s.double() ** 2).sum()) for s in saved)
    factor = num / den
    uniform = all(torch.allclose(c.double(), s.double() * factor, rtol=1e-6, atol=1e-30)
                  for c, s in zip(clipped, saved))
    return uniform and abs(factor / coef - 1.0) <= tol


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(set_name: str, device: str, repeat: int) -> dict:
    shapes = tiny_shapes() if set_name == "tiny" else GRAD_SETS[set_name].shapes()
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
    saved = [(torch.randn(s, generator=gen) * 1e-3).to(device) for s in shapes]
    for p, g in zip(params, saved):
        p.grad = g.clone()
    norm = float(fastclip.get_total_norm(saved))

    def restore():
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    out = {"set": set_name, "device": device, "n_tensors": len(shapes),
           "n_values": sum(g.numel() for g in saved), "steps": {}}
    for step_name, step in STEPS.items():
        max_norm = step.max_norm(norm)
        methods = {
            "torch eager": lambda: TORCH_CLIP_GRAD_NORM(params, max_norm, foreach=True),
            "torch compiled": torch.compile(lambda: TORCH_CLIP_GRAD_NORM(params, max_norm)),
            "fastclip": lambda: fastclip.clip_grad_norm_(params, max_norm),
        }
        restore()
        _sync(device)
        t0 = time.perf_counter()
        methods["torch compiled"]()  # compiles
        _sync(device)
        compile_s = time.perf_counter() - t0
        times: dict = {name: [] for name in methods}
        for _ in range(repeat):
            for name, fn in methods.items():  # interleaved: drift hits every method alike
                restore()
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        results = {}
        for name, fn in methods.items():  # each method's clipped grads, for the agreement check
            restore()
            fn()
            results[name] = [p.grad.clone() for p in params]
        agree = all(_scaled_by(results[name], saved, _expected_coef(max_norm, norm), tol)
                    for name, tol in TOLERANCES.items())
        out["steps"][step_name] = {
            "median_ms": med, "compile_s": compile_s, "grads_agree": agree,
            "fastclip_speedup_vs_compiled": med["torch compiled"] / med["fastclip"],
            "fastclip_speedup_vs_eager": med["torch eager"] / med["fastclip"],
        }
        torch._dynamo.reset()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="gpt2-124m", choices=list(GRAD_SETS) + ["tiny"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_compile: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    result = run(args.set, args.device, args.repeat)
    result["meta"] = {"torch": torch.__version__, "python": platform.python_version(),
                      "machine": torch.cuda.get_device_name() if args.device == "cuda"
                      else platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads()}
    print(f"# {args.set} on {args.device} ({result['meta']['machine']}), torch {torch.__version__}, "
          f"median of {args.repeat}")
    for step_name, r in result["steps"].items():
        m = r["median_ms"]
        print(f"{step_name:13s} torch eager {m['torch eager']:8.2f} ms | torch compiled "
              f"{m['torch compiled']:8.2f} ms (compile {r['compile_s']:.1f} s) | fastclip "
              f"{m['fastclip']:8.2f} ms | fastclip x{r['fastclip_speedup_vs_compiled']:.2f} vs "
              f"compiled, x{r['fastclip_speedup_vs_eager']:.2f} vs eager"
              + ("" if r["grads_agree"] else " | CLIPPED GRADS DISAGREE"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if all(r["grads_agree"] for r in result["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
