#!/usr/bin/env python3
"""The host side of a CUDA clip, measured on a machine without a GPU.

Issue 3's host target (<= 60 us per ``clip_grad_norm_`` call for 150 tensors, H100 host) is about
the Python that runs before and between the two kernel launches: argument checks, reading
``.grad``, the tensor table, the device-table cache, the result's allocation. That code does not
need a GPU to run. This script sends CPU tensors down the CUDA backend (``fastclip._cuda``, as the
simulator tests do) with its two launchers replaced by counters. Each call runs all of the CUDA
path's host work, including each launch's argument conversion and cuda.core's packing of the
arguments (its ``ParamHolder``), but not the driver's launch call (not measurable without a GPU)
nor the device guard's ``torch.cuda.current_device()``.

``clip_grads_with_norm_`` with a float32/float64 norm and a number as ``max_norm`` is one scale
launch (the kernel computes torch's coefficient from the norm). With a tensor ``max_norm`` or a
16-bit norm it first runs torch's four ops on the norm, which this stand-in overstates: here they
run on the CPU (~10 us each); on a GPU they are four small asynchronous launches.

On a GPU machine, ``bench_cuda.py`` measures the real thing; this is the stand-in that lets a
change to the host path be timed in any session. Figures are per call, best and median of
``--repeats`` timings of ``--calls`` calls each (the minimum is the least noisy on a shared VM).

Usage::

    python3 benchmarks/host_proxy.py                 # 150 tensors of 1000 float32
    python3 benchmarks/host_proxy.py --tensors 1     # the fixed part of a call
    python3 benchmarks/host_proxy.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import timeit

import torch

import fastclip
from fastclip import _cuda, _plan


def _cuda_core_packing():
    """What cuda.core's ``launch`` does with the arguments before its driver call (packs them
    into a ``ParamHolder``), or nothing where cuda.core is not installed."""
    try:
        from cuda.core._kernel_arg_handler import ParamHolder
    except ImportError:
        return lambda stream, config, kernel, *args: None
    return lambda stream, config, kernel, *args: ParamHolder(args)


class CountingLauncher:
    """Stands in for one of ``_cuda``'s kernel launchers: runs its fast launch path (argument
    conversion, cached launch configuration and stream, cuda.core's packing of the arguments),
    then counts the launch instead of making the driver call."""

    def __init__(self, launcher: "_cuda._Launcher"):
        self.launches = 0
        self.launcher = getattr(launcher, "launcher", launcher)  # the real one, when nested
        self.state = {"fast": _cuda_core_packing(), "kernel": None, "configs": {}, "streams": {},
                      "LaunchConfig": lambda grid, block: (grid, block),
                      "Stream": type("Stream", (), {"from_handle": staticmethod(lambda h: h)})}

    def __call__(self, entry, args) -> None:
        self.launcher._fast_launch(self.state, entry, args)
        self.launches += 1


@contextlib.contextmanager
def cuda_backend_without_launches():
    """Plans built inside put CPU tensors on the CUDA backend, whose launches only count.

    Yields the two launchers ``(power_sums, scale)``; everything is restored on exit.
    """
    saved = (_plan._backend_for, _cuda._power_sums, _cuda._scale)
    power_sums, scale = CountingLauncher(_cuda._power_sums), CountingLauncher(_cuda._scale)
    _plan._backend_for = lambda device: _cuda
    _cuda._power_sums, _cuda._scale = power_sums, scale
    try:
        yield power_sums, scale
    finally:
        _plan._backend_for, _cuda._power_sums, _cuda._scale = saved
        _cuda.clear_cache()


def _params(n_tensors: int, numel: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(n_tensors):
        p = torch.nn.Parameter(torch.zeros(numel))
        p.grad = torch.randn(numel, generator=gen)
        params.append(p)
    return params


def _time(fn, calls: int, repeats: int) -> dict:
    for _ in range(min(100, calls * repeats)):  # warm: kernels' device table cached, code hot
        fn()
    per_call = sorted(t / calls * 1e6 for t in timeit.repeat(fn, number=calls, repeat=repeats))
    return {"min_us": per_call[0], "median_us": per_call[len(per_call) // 2]}


def measure(n_tensors: int = 150, numel: int = 1000, calls: int = 50, repeats: int = 300) -> dict:
    """Host microseconds per call of the CUDA path with its launches stubbed out.

    Returns:
        ``{"tensors", "numel", "calls": {name: {"min_us", "median_us"}}, "launches_per_call":
        {name: (power-sum launches, scale launches)}}``. The launch counts show each call took
        the CUDA backend's path (a clip: one norm launch and one scale launch).
    """
    params = _params(n_tensors, numel)
    grads = [p.grad for p in params]
    total_norm = torch.tensor(5.0)  # made once: a training loop passes the norm it computed
    calls_by_name = {
        # max_norm 1e-2 clips: the CUDA path launches the scale kernel either way (it reads the
        # coefficient on the device), so clipping and non-clipping calls cost the host the same.
        "clip_grad_norm_": lambda: fastclip.clip_grad_norm_(params, 1e-2),
        "get_total_norm": lambda: fastclip.get_total_norm(grads),
        "clip_grads_with_norm_": lambda: fastclip.clip_grads_with_norm_(params, 1e-2, total_norm),
    }
    out: dict = {"tensors": n_tensors, "numel": numel, "calls": {}, "launches_per_call": {}}
    with cuda_backend_without_launches() as (power_sums, scale):
        for name, fn in calls_by_name.items():
            before = (power_sums.launches, scale.launches)
            fn()
            out["launches_per_call"][name] = (power_sums.launches - before[0],
                                              scale.launches - before[1])
            out["calls"][name] = _time(fn, calls, repeats)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=150)
    parser.add_argument("--numel", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=50, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=300, help="timings per call kind")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = measure(args.tensors, args.numel, args.calls, args.repeats)
    print(f"# CUDA path's host work, launches stubbed out: {result['tensors']} tensors of "
          f"{result['numel']} float32 on the CPU (torch {torch.__version__})")
    for name, t in result["calls"].items():
        print(f"{name:24s} min {t['min_us']:7.1f} us   median {t['median_us']:7.1f} us   "
              f"launches {result['launches_per_call'][name]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
