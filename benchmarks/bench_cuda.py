#!/usr/bin/env python3
"""fastclip vs ``torch.nn.utils.clip_grad_norm_(foreach=True)`` on one CUDA GPU, in one call.

Measures, in the same run:

- GPU time per call (CUDA events, median of several repeats) of a clipping step (grads restored
  from a saved copy before each call, the restore's own time subtracted) and of a non-clipping
  step, on GPT-2 124M, a GPT-2 XL 1.5B set (d=1600, 48 layers, vocab 50257) in
  float32 and bfloat16, and 2000 small tensors; plus ``get_total_norm``;
- the bandwidth of a device copy (read + write bytes / time), and the read bandwidth of
  fastclip's norm pass (the non-clipping step reads every grad once and writes nothing);
- ``clip_grad_value_`` against torch's (foreach) on the same sets: a clamping step
  (``clip_value`` = 0.1 x max |g|, grads restored first, as for clipping) and a non-clamping one
  (2 x max |g|: fastclip only reads), and whether fastclip's clamp left torch's values;
- host-side time per call for 150 tensors (Python and launches; the GPU is idle meanwhile);
- each set's norm against an exact float64 reference, for fastclip and for torch.

Prints a table and writes everything to JSON (``--out``). The targets of issue 3 (H100) are
printed next to the figures: non-clipping step >= 2.5x faster than torch, clipping step >= 1.1x,
norm pass >= 85% of the copy bandwidth, host overhead <= 60 us for 150 tensors.

Usage::

    python3 benchmarks/bench_cuda.py --out benchmarks/results/cuda-$(date +%F).json
    python3 benchmarks/bench_cuda.py --sets gpt2-124m,many-small --reps 3   # quicker
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch

import fastclip
from fastclip.bench import gradsets
from fastclip.clip_grad import TORCH_CLIP_GRAD_NORM, TORCH_CLIP_GRAD_VALUE, TORCH_GET_TOTAL_NORM

TARGETS = {"no_clip_speedup": 2.5, "clip_speedup": 1.1, "norm_vs_copy": 0.85, "host_us": 60.0}


# --- gradient sets ------------------------------------------------------------------------------


def gpt2_shapes(d: int = 768, layers: int = 12, vocab: int = 50257, ctx: int = 1024) -> list:
    """GPT-2's parameter shapes in Hugging Face's order (LM head tied to wte)."""
    h = 4 * d
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, h), (h,), (h, d), (d,)]
    return shapes + [(d,), (d,)]


def many_small_shapes(n: int = 2000, low: int = 64, high: int = 65536, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    logs = torch.empty(n, dtype=torch.float64).uniform_(math.log(low), math.log(high), generator=g)
    return [(int(v),) for v in logs.exp().round().clamp(low, high).tolist()]


SETS = {
    "gpt2-124m": (gpt2_shapes, torch.float32),
    "gpt2-124m-bf16": (gpt2_shapes, torch.bfloat16),
    "gpt2-xl-1.5b": (lambda: gpt2_shapes(1600, 48), torch.float32),
    "gpt2-xl-1.5b-bf16": (lambda: gpt2_shapes(1600, 48), torch.bfloat16),
    "many-small": (many_small_shapes, torch.float32),
    # GPT-2 124M's grads as views into one flat buffer starting one element in, as a flat
    # bucket can lay them out: dense, read in place, none 16-byte aligned (the per-element path).
    "gpt2-124m-flat-odd": (gpt2_shapes, torch.float32),
}
FLAT_OFFSET = {"gpt2-124m-flat-odd": 1}
DEFAULT_SETS = "gpt2-124m,gpt2-xl-1.5b,gpt2-xl-1.5b-bf16,many-small,gpt2-124m-flat-odd"


def make_set(name: str, device) -> tuple:
    """(params, grads): each param is a zero-storage placeholder (a 0-d tensor expanded to the
    shape) carrying a real, separately allocated ``.grad``, as a model's parameters do."""
    shapes_fn, dtype = SETS[name]
    shapes = shapes_fn()
    flat, offset = None, FLAT_OFFSET.get(name)
    if offset is not None:
        flat = torch.empty(offset + sum(math.prod(s) for s in shapes), dtype=dtype, device=device)
    params, grads = [], []
    for i, shape in enumerate(shapes):
        g = torch.Generator(device=device).manual_seed(i)
        grad = (torch.randn(shape, device=device, generator=g) * 1e-3).to(dtype)
        if flat is not None:
            view = flat[offset:offset + grad.numel()].view(shape)
            view.copy_(grad)
            grad, offset = view, offset + grad.numel()
        p = torch.zeros((), dtype=dtype, device=device).expand(shape)
        p.grad = grad
        params.append(p)
        grads.append(grad)
    return params, grads


def _placeholders(grads: list) -> tuple:
    params = []
    for g in grads:
        p = torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape)
        p.grad = g
        params.append(p)
    return params, grads


def exact_norm(grads) -> float:
    """2-norm from float64 per-tensor sums (on the GPU, then math.fsum)."""
    return math.sqrt(math.fsum(float(g.double().square().sum()) for g in grads))


# --- timing ---------------------------------------------------------------------------------------


def _first_calls(fn) -> tuple:
    """A warm-up call, then one timed call: (its milliseconds, a start and an end event)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return max(start.elapsed_time(end), 1e-3), start, end


def gpu_ms(fn, reps: int, target_ms: float = 40.0) -> float:
    """Median GPU milliseconds per call, from CUDA events around a batch of calls."""
    one, start, end = _first_calls(fn)
    iters = max(1, min(200, int(target_ms / one)))
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


_cycles_per_ms: list = []


def _sleep_cycles_per_ms() -> float:
    """GPU clock cycles per millisecond of ``torch.cuda._sleep``, measured once."""
    if not _cycles_per_ms:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # warm
        start.record()
        torch.cuda._sleep(20_000_000)
        end.record()
        end.synchronize()
        _cycles_per_ms.append(20_000_000 / max(start.elapsed_time(end), 1e-3))
    return _cycles_per_ms[0]


def gpu_only_ms(fn, reps: int, target_ms: float = 40.0) -> float:
    """Median GPU milliseconds per call with the host out of the way: a sleep kernel queued
    before the start event keeps the GPU busy while the host queues ``iters`` calls, so the
    events time the calls' device work alone, not the Python that launches them (``gpu_ms``
    times whichever is slower: on many small tensors, the host). Sleeps for 1.5x the host's
    queueing time of the previous batch, plus 2 ms. Batches of about ``target_ms``, 3 to 20
    calls."""
    one, start, end = _first_calls(fn)
    iters = max(3, min(20, int(target_ms / one)))
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    host_ms = (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda._sleep(int((1.5 * host_ms + 2.0) * _sleep_cycles_per_ms()))
        t = time.perf_counter()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        host_ms = (time.perf_counter() - t) * 1e3
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def host_us(fn, calls: int = 300) -> float:
    """Median host microseconds per call (no synchronization inside the loop)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    laps = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        laps.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return statistics.median(laps) * 1e6


def copy_gbps(nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = gpu_ms(lambda: dst.copy_(src), reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# --- the run ----------------------------------------------------------------------------------------


def run(args, save=lambda result: None) -> dict:
    from fastclip import _cuda
    from fastclip.kernels import cuda as K

    dev = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(dev)
    import numba

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": props.name, "cc": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
        "cuda": torch.version.cuda, "numba": numba.__version__,
        "numba_cuda": getattr(sys.modules.get("numba_cuda"), "__version__", None) or _version("numba-cuda"),
        "python": platform.python_version(), "fastclip_cuda_available": _cuda.is_available(),
        "threads_per_block": K.THREADS, "chunk_size": _cuda.CHUNK_SIZE,
    }
    if not meta["fastclip_cuda_available"]:
        raise SystemExit("fastclip's CUDA backend is not available here (numba-cuda / driver)")

    # First call: compile (or load numba's disk cache) and load every kernel.
    tiny, _ = _placeholders([torch.randn(100, device=dev)])
    t = time.perf_counter()
    fastclip.clip_grad_norm_(tiny, 1e-3)
    fastclip.clip_grad_value_(tiny, 1.0)
    torch.cuda.synchronize()
    meta["first_call_s"] = round(time.perf_counter() - t, 2)
    meta["launch_path"] = _cuda.launch_path()
    meta["blocks_per_sm"] = _cuda._power_sums.prepare(dev.index)["blocks_per_sm"]
    print(f"# {meta['gpu']} (cc {meta['cc']}, {meta['sms']} SMs), torch {meta['torch']}, "
          f"numba-cuda {meta['numba_cuda']}, launch path {meta['launch_path']}, "
          f"first call {meta['first_call_s']} s", flush=True)

    copy = copy_gbps(1 << 30, args.reps)
    print(f"# device copy: {copy:.0f} GB/s (read + write)", flush=True)
    result = {"meta": meta, "copy_gbps": copy, "sets": [], "host": {}, "chunk_sweep": [],
              "targets": TARGETS}
    save(result)

    # Each stage on its own: an error in one (out of memory, a CUDA error) is recorded and the
    # others still run; the JSON is rewritten after every stage, so a timeout keeps what ran.
    result["host"] = _stage("host overhead", lambda: host_overhead(dev))
    save(result)
    for name in args.sets.split(","):
        row = _stage(name, lambda: measure_set(name, dev, args.reps, copy))
        row.setdefault("set", name)
        result["sets"].append(row)
        if "error" not in row:
            print(_row_text(row), flush=True)
        torch.cuda.empty_cache()
        save(result)
    if args.chunk_sweep:
        sweep = _stage("chunk sweep", lambda: chunk_sweep(args.chunk_sweep, dev, args.reps, copy))
        result["chunk_sweep"] = sweep if isinstance(sweep, list) else [sweep]
        save(result)
    return result


def _stage(name: str, work):
    """``work()``, or ``{"error": ...}`` when it raised (printed, with its traceback)."""
    try:
        out = work()
        torch.cuda.synchronize()  # an asynchronous error belongs to this stage
        return out
    except Exception as exc:  # noqa: BLE001 - recorded, and the exit status says so
        traceback.print_exc()
        print(f"# {name}: FAILED ({exc!r})", flush=True)
        return {"error": repr(exc)}


def chunk_sweep(spec: str, dev, reps: int, copy: float) -> list:
    """The norm pass (a non-clipping step) at several chunk sizes, on gpt2-124m and the 1.5B set.

    The grid holds the resident blocks; each walks its chunks in a grid-stride loop, so the
    chunk size sets how evenly the last round is filled against the cost per chunk (table
    reads, one partial). ``CHUNK_SIZE`` is the default, chosen without a GPU: this measures it.
    """
    from fastclip import _cuda

    default = _cuda.CHUNK_SIZE
    out = []
    try:
        for name in ("gpt2-124m", "gpt2-xl-1.5b"):
            params, grads = make_set(name, dev)
            nbytes = sum(g.numel() * g.element_size() for g in grads)
            for size in (int(v) for v in spec.split(",")):
                _cuda.CHUNK_SIZE = size
                _cuda.clear_cache()  # tables are cached by contents, not by chunk size
                ms = gpu_ms(lambda: fastclip.clip_grad_norm_(params, 1e30), reps)
                entry = _cuda.device_table(_table_of(grads))
                row = {"set": name, "chunk_size": size, "chunks": entry.nc, "grid": entry.grid,
                       "no_clip_ms": ms, "norm_vs_copy": nbytes / (ms * 1e-3) / 1e9 / copy}
                out.append(row)
                print(f"# chunk sweep {name:<14} chunk {size:>7} ({row['chunks']:>6} chunks, grid "
                      f"{row['grid']}): {ms:.3f} ms = {100 * row['norm_vs_copy']:.0f}% of copy", flush=True)
            params = grads = None
            torch.cuda.empty_cache()
    finally:
        _cuda.CHUNK_SIZE = default
        _cuda.clear_cache()
    return out


def _table_of(grads):
    from fastclip._table import TensorTable

    return TensorTable.from_tensors(grads, [g.dtype for g in grads])


def measure_set(name: str, dev, reps: int, copy: float) -> dict:
    params, grads = make_set(name, dev)
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    exact = exact_norm(grads)
    ours = float(fastclip.get_total_norm(grads))
    theirs = float(TORCH_GET_TOTAL_NORM(grads, 2.0, False, True))
    row = {"set": name, "tensors": len(grads), "numel": sum(g.numel() for g in grads),
           "dtype": str(grads[0].dtype).replace("torch.", ""), "bytes": nbytes,
           "norm_rel_err_fastclip": abs(ours - exact) / exact,
           "norm_rel_err_torch": abs(theirs - exact) / exact}
    # A clipping step must start from unclipped grads: repeated clips converge in two calls to a
    # norm whose coefficient rounds to exactly 1 (no write at all for fastclip, a multiply by 1
    # for torch). So each timed clip restores the grads first (a device copy), and the time of
    # the restore alone is subtracted.
    saved = [g.clone() for g in grads]

    def restore():
        torch._foreach_copy_(grads, saved)

    def restored(fn):
        return lambda: (restore(), fn())

    max_abs = gradsets.max_abs(grads)
    clip_value = 0.1 * max_abs
    row["clip_value"] = clip_value
    row["clamped_share"] = gradsets.share_clamped(grads, clip_value)

    timings = {
        "no_clip_fastclip_ms": lambda: fastclip.clip_grad_norm_(params, 1e30),
        "no_clip_torch_ms": lambda: TORCH_CLIP_GRAD_NORM(params, 1e30, 2.0, False, True),
        # max_norm 1e-2 against norms of ~1 to ~40: every timed call scales by ~1e-2 or less.
        "clip_fastclip_ms": restored(lambda: fastclip.clip_grad_norm_(params, 1e-2)),
        "clip_torch_ms": restored(lambda: TORCH_CLIP_GRAD_NORM(params, 1e-2, 2.0, False, True)),
        "get_total_norm_fastclip_ms": lambda: fastclip.get_total_norm(grads),
        "get_total_norm_torch_ms": lambda: TORCH_GET_TOTAL_NORM(grads, 2.0, False, True),
        # clip_grad_value_: a clamp is idempotent (a second one changes nothing, so fastclip
        # would write nothing), hence the restore before each clamping call, as for clipping.
        "value_no_clamp_fastclip_ms": lambda: fastclip.clip_grad_value_(params, 2 * max_abs),
        "value_no_clamp_torch_ms": lambda: TORCH_CLIP_GRAD_VALUE(params, 2 * max_abs, True),
        "value_clamp_fastclip_ms": restored(lambda: fastclip.clip_grad_value_(params, clip_value)),
        "value_clamp_torch_ms": restored(lambda: TORCH_CLIP_GRAD_VALUE(params, clip_value, True)),
    }
    row["restore_ms"] = gpu_ms(restore, reps)
    for key, fn in timings.items():
        row[key] = gpu_ms(fn, reps)
    for key in ("clip_fastclip_ms", "clip_torch_ms", "value_clamp_fastclip_ms", "value_clamp_torch_ms"):
        row[key + "_with_restore"] = row[key]
        row[key] -= row["restore_ms"]
    # Device time alone (the host queues ahead behind a sleep kernel): on many small tensors the
    # figures above time the Python that launches the kernels.
    for key in ("no_clip_fastclip_ms", "no_clip_torch_ms", "clip_fastclip_ms", "clip_torch_ms"):
        row[key.replace("_ms", "_gpu_only_ms")] = gpu_only_ms(timings[key], reps)
    row["restore_gpu_only_ms"] = gpu_only_ms(restore, reps)
    for key in ("clip_fastclip_gpu_only_ms", "clip_torch_gpu_only_ms"):
        row[key] -= row["restore_gpu_only_ms"]
    restore()
    fastclip.clip_grad_value_(params, clip_value)
    row["value_clamp_matches_torch"] = all(
        torch.equal(g, s.clamp(-clip_value, clip_value)) for g, s in zip(grads, saved))
    row.update(check_clip_steps(params, grads, saved, exact, restore))
    restore()
    row["no_clip_speedup"] = row["no_clip_torch_ms"] / row["no_clip_fastclip_ms"]
    row["clip_speedup"] = row["clip_torch_ms"] / row["clip_fastclip_ms"]
    row["value_no_clamp_speedup"] = row["value_no_clamp_torch_ms"] / row["value_no_clamp_fastclip_ms"]
    row["value_clamp_speedup"] = row["value_clamp_torch_ms"] / row["value_clamp_fastclip_ms"]
    row["norm_read_gbps"] = nbytes / (row["no_clip_fastclip_ms"] * 1e-3) / 1e9
    row["norm_vs_copy"] = row["norm_read_gbps"] / copy
    row["no_clip_speedup_gpu_only"] = row["no_clip_torch_gpu_only_ms"] / row["no_clip_fastclip_gpu_only_ms"]
    row["clip_speedup_gpu_only"] = row["clip_torch_gpu_only_ms"] / row["clip_fastclip_gpu_only_ms"]
    row["norm_vs_copy_gpu_only"] = nbytes / (row["no_clip_fastclip_gpu_only_ms"] * 1e-3) / 1e9 / copy
    return row


NORM_RTOL = 1e-6  # the returned norm is float32 (float64 sums, one rounding: ~6e-8 from exact)


def _scaled_like_fastclip(saved: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``saved`` times ``coef`` as fastclip promises: float64 grads in float64, the others in
    float32 by float32(coef), rounded once."""
    if saved.dtype == torch.float64:
        return saved * coef.double()
    return (saved.float() * coef.float()).to(saved.dtype)


def check_clip_steps(params, grads, saved, exact: float, restore) -> dict:
    """The timed calls' results, checked outside the timing: a clipping call's norm against the
    exact norm and its grads, bit for bit, against the saved grads scaled by torch's coefficient
    of that norm; a non-clipping call leaves every grad as it was. ``checks_passed`` is False if
    any differs (a scale kernel that wrote nothing, or part of the grads, would look fast)."""
    restore()
    norm = fastclip.clip_grad_norm_(params, 1e-2)
    coef = torch.clamp(1e-2 / (norm + 1e-6), max=1.0)
    clipped = all(torch.equal(g, _scaled_like_fastclip(s, coef)) for g, s in zip(grads, saved))
    norm_err = abs(float(norm) - exact) / exact
    restore()
    fastclip.clip_grad_norm_(params, 1e30)
    unchanged = all(torch.equal(g, s) for g, s in zip(grads, saved))
    return {"clip_norm_rel_err": norm_err, "clip_grads_match": clipped,
            "no_clip_grads_unchanged": unchanged,
            "checks_passed": clipped and unchanged and norm_err <= NORM_RTOL}


def host_overhead(dev) -> dict:
    """Host time per call for 150 tensors of 4096 float32 (GPU work is a few microseconds)."""
    from fastclip import _cuda, _plan
    from fastclip._table import TensorTable

    params, grads = _placeholders([torch.randn(4096, device=dev) * 1e-3 for _ in range(150)])
    table = TensorTable.from_tensors(grads, [g.dtype for g in grads])
    out = {
        "clip_fastclip_us": host_us(lambda: fastclip.clip_grad_norm_(params, 1e-2)),
        "no_clip_fastclip_us": host_us(lambda: fastclip.clip_grad_norm_(params, 1e30)),
        "get_total_norm_fastclip_us": host_us(lambda: fastclip.get_total_norm(grads)),
        "clip_torch_us": host_us(lambda: TORCH_CLIP_GRAD_NORM(params, 1e-2, 2.0, False, True)),
        # Parts of fastclip's call: building the plan (validation + table), and the backend
        # alone on a built table (cache lookup + two launches).
        "plan_build_us": host_us(lambda: _plan.Plan.build(grads, "clip_grad_norm_", "parameters")),
        # chunk_cache cleared: a real call looks its device table up in the cache every time.
        "backend_only_us": host_us(lambda: (table.chunk_cache.clear(),
                                            _cuda.fused_clip_(table, 2.0, 1e-2, torch.float32))),
    }
    # The same clip with the two launches stopped short of the driver (benchmarks/host_proxy.py:
    # the launcher's own work and cuda.core's argument packing still run), so clip_fastclip_us
    # minus this is what the driver's two launch calls and the device guard cost.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from host_proxy import cuda_backend_without_launches

    with cuda_backend_without_launches():
        out["clip_launches_stubbed_us"] = host_us(lambda: fastclip.clip_grad_norm_(params, 1e-2))
    print("# host time per call, 150 tensors: " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()),
          flush=True)
    return out


def _version(dist: str):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _row_text(r: dict) -> str:
    return (f"{r['set']:<18} {r['dtype']:<8} {r['tensors']:>5} {r['numel'] / 1e6:>8.1f}M | "
            f"no-clip {r['no_clip_fastclip_ms']:.3f} vs {r['no_clip_torch_ms']:.3f} ms "
            f"({r['no_clip_speedup']:.2f}x) | clip {r['clip_fastclip_ms']:.3f} vs "
            f"{r['clip_torch_ms']:.3f} ms ({r['clip_speedup']:.2f}x) | norm pass "
            f"{r['norm_read_gbps']:.0f} GB/s = {100 * r['norm_vs_copy']:.0f}% of copy | rel err "
            f"{r['norm_rel_err_fastclip']:.1e} (torch {r['norm_rel_err_torch']:.1e}) | "
            f"clip_grad_value_ no-clamp {r['value_no_clamp_speedup']:.2f}x, clamp "
            f"{r['value_clamp_speedup']:.2f}x ({100 * r['clamped_share']:.0f}% clamped, "
            f"{'same values as torch' if r['value_clamp_matches_torch'] else 'VALUES DIFFER FROM TORCH'}) | "
            f"device time only: no-clip {r['no_clip_speedup_gpu_only']:.2f}x, clip "
            f"{r['clip_speedup_gpu_only']:.2f}x, norm pass {100 * r['norm_vs_copy_gpu_only']:.0f}% of copy | "
            f"{'results checked' if r['checks_passed'] else 'RESULTS DIFFER'}")


def print_summary(result: dict) -> None:
    t = result["targets"]
    print("\n## Summary against issue 3's targets (set on an H100)")
    print(f"{'set':<18} {'no-clip x':>9} {'clip x':>7} {'norm/copy':>9}   clip_grad_value_: "
          f"{'no-clamp x':>10} {'clamp x':>7}")
    for r in result["sets"]:
        if "error" in r:
            print(f"{r['set']:<18} FAILED: {r['error']}")
            continue
        print(f"{r['set']:<18} {r['no_clip_speedup']:>9.2f} {r['clip_speedup']:>7.2f} "
              f"{100 * r['norm_vs_copy']:>8.0f}%   {'':>17}{r['value_no_clamp_speedup']:>10.2f} "
              f"{r['value_clamp_speedup']:>7.2f}")
        if "no_clip_speedup_gpu_only" in r:
            print(f"{'  device time only':<18} {r['no_clip_speedup_gpu_only']:>9.2f} "
                  f"{r['clip_speedup_gpu_only']:>7.2f} {100 * r['norm_vs_copy_gpu_only']:>8.0f}%"
                  f"   results {'checked' if r.get('checks_passed') else 'DIFFER (see the JSON)'}")
    h = result["host"]
    if "error" in h:
        print(f"targets: no-clip >= {t['no_clip_speedup']}x, clip >= {t['clip_speedup']}x, "
              f"norm >= {100 * t['norm_vs_copy']:.0f}% of copy, host <= {t['host_us']:.0f} us "
              f"(host figures FAILED: {h['error']})")
        return
    print(f"targets: no-clip >= {t['no_clip_speedup']}x, clip >= {t['clip_speedup']}x, "
          f"norm >= {100 * t['norm_vs_copy']:.0f}% of copy, host <= {t['host_us']:.0f} us "
          f"(measured {h['clip_fastclip_us']:.1f} us clip, {h['no_clip_fastclip_us']:.1f} us no-clip; "
          f"{h['clip_launches_stubbed_us']:.1f} us of the clip without its two launches)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default=DEFAULT_SETS, help=f"comma-separated, from {', '.join(SETS)}")
    ap.add_argument("--reps", type=int, default=5, help="timed repeats per figure (median)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--chunk-sweep", default="16384,32768,65536,131072,262144",
                    help="comma-separated chunk sizes for the norm-pass sweep ('' to skip)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    # Where fastclip leaves CUDA grads to torch (numba-cuda missing or unusable, a kernel the
    # driver cannot load), every "fastclip" figure would time torch: stop and say why.
    from fastclip.bench.runner import cuda_backend_usable

    if not cuda_backend_usable():
        print("bench_cuda: fastclip's CUDA backend cannot run here (numba-cuda missing or unusable, "
              "or a kernel the driver cannot load; see any fastclip warning above); nothing to "
              "compare", file=sys.stderr)
        return 3
    def save(result: dict) -> None:
        if args.out:  # whole or not at all: written beside, then renamed over the last one
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump(result, f, indent=2)
            os.replace(args.out + ".tmp", args.out)

    result = run(args, save)
    print_summary(result)
    if args.out:
        print(f"# wrote {args.out}")
    failed = failures(result)
    for line in failed:
        print(f"bench_cuda: FAILED: {line}", file=sys.stderr)
    return 4 if failed else 0


def failures(result: dict) -> list:
    """What went wrong: a stage that raised, or a set whose checked results differ."""
    out = []
    for r in result["sets"]:
        if "error" in r:
            out.append(f"{r['set']}: {r['error']}")
        elif not (r.get("checks_passed") and r.get("value_clamp_matches_torch")):
            out.append(f"{r['set']}: results differ (norm rel err {r.get('clip_norm_rel_err')}, "
                       f"clipped grads match {r.get('clip_grads_match')}, no-clip grads unchanged "
                       f"{r.get('no_clip_grads_unchanged')}, clamp matches torch "
                       f"{r.get('value_clamp_matches_torch')})")
    for stage in ("host",):
        if isinstance(result.get(stage), dict) and "error" in result[stage]:
            out.append(f"{stage}: {result[stage]['error']}")
    out += [f"chunk sweep: {s['error']}" for s in result.get("chunk_sweep", []) if "error" in s]
    return out


if __name__ == "__main__":
    sys.exit(main())
