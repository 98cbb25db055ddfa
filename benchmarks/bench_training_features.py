"""Fused AMP unscale+clip and one-read clip_and_step against torch's sequences, on the CPU.

Each row times one training-loop operation (median of ``--repeats`` runs, after warm-up; the
variants compared take turns run by run). The grads are restored from a saved copy before every
run, outside the timed region, so that every run clips the same values (a clip that found nothing
to do would skip its write pass).

    python3 benchmarks/bench_training_features.py              # short: a few seconds per set
    python3 benchmarks/bench_training_features.py --repeats 50 --sets large --threads 1

Rows:
    amp      torch: scaler.unscale_(opt); torch.nn.utils.clip_grad_norm_(params, max_norm)
             fastclip: fastclip.unscale_and_clip_(scaler, opt, max_norm)
    step     fused AdamW. step only: opt.step(); torch: clip_grad_norm_ then opt.step();
             fastclip: fastclip.clip_and_step(opt, max_norm). "clip cost" is the time over the
             bare step; "one read" times the norm pass alone, for comparison.
    amp+step fused AdamW with a GradScaler. torch: unscale_, clip_grad_norm_, scaler.step;
             fastclip: fastclip.clip_and_step(opt, max_norm, scaler=scaler).
    agc      unit-wise adaptive clipping on a real model's shapes (``--agc-sets``, default
             resnet50: AGC's home is conv nets). torch: ``torch_agc_``, the per-tensor way
             plain-torch implementations write it (unit norms over every dim but the first,
             then one ``where``, as timm's ``adaptive_clip_grad`` does); fastclip:
             ``fastclip.adaptive_grad_clip_``. Both start from the same grads, and the script
             reports how far apart their results are.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastclip
from fastclip.bench.cases import GRAD_SETS

# name: (number of tensors, elements per tensor), float32
SETS = {
    "small": (200, 4096),     # many small tensors, ~3 MB of grads
    "large": (16, 1 << 19),   # 8M elements, 32 MB of grads
}
MAX_NORM = 1e-3  # below every set's norm: every run clips
AGC_CLIPPING, AGC_EPS = 0.01, 1e-3
# Per-tensor grad scales for AGC, cycled: with normal weights a unit's threshold is ~0.01 x its
# weight norm, so units of the first scale stay as they are and those of the second are clipped.
AGC_GRAD_SCALES = (0.003, 0.03)


def _params(n: int, size: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(size, generator=g)) for _ in range(n)]
    for q in params:
        q.grad = torch.randn(size, generator=g)
    return params


def _timings(variants: dict, reset, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each variant. The variants take turns, run by run, so that a change in
    the machine's load (these machines are shared) weighs on all of them alike."""
    times: dict = {name: [] for name in variants}
    for i in range(warmup + repeats):
        for name, run in variants.items():
            reset()
            t0 = time.perf_counter()
            run()
            t1 = time.perf_counter()
            if i >= warmup:
                times[name].append(t1 - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _grad_restorer(params, saved, scaler=None):
    grads = [q.grad for q in params]

    def reset():
        torch._foreach_copy_(grads, saved)
        if scaler is not None:
            scaler._per_optimizer_states.clear()  # back to READY, the scale unchanged
    return reset


def bench_amp(params, repeats):
    opt = torch.optim.SGD(params, lr=0.0)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.zeros(()))  # creates the scale (2**16)
    saved = [q.grad.clone() * 65536.0 for q in params]
    reset = _grad_restorer(params, saved, scaler)

    def torch_seq():
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)

    t = _timings({"torch": torch_seq,
                  "fast": lambda: fastclip.unscale_and_clip_(scaler, opt, MAX_NORM)}, reset, repeats)
    t_torch, t_fast = t["torch"], t["fast"]
    return [("amp", "torch unscale_ + clip_grad_norm_", t_torch, None),
            ("amp", "fastclip.unscale_and_clip_", t_fast, t_torch / t_fast)]


def bench_step(params, repeats):
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    saved = [q.grad.clone() for q in params]
    reset = _grad_restorer(params, saved)

    def torch_seq():
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()

    def fastclip_seq():
        fastclip.clip_grad_norm_(params, MAX_NORM)
        opt.step()

    grads = [q.grad for q in params]
    t = _timings({"step": opt.step, "read": lambda: fastclip.get_total_norm(grads), "torch": torch_seq,
                  "fseq": fastclip_seq, "fast": lambda: fastclip.clip_and_step(opt, MAX_NORM)},
                 reset, repeats)
    t_step, t_read, t_torch, t_fseq, t_fast = (t[k] for k in ("step", "read", "torch", "fseq", "fast"))
    clip = {name: t - t_step for name, t in (("torch", t_torch), ("fseq", t_fseq), ("fast", t_fast))}
    rows = [("step", "fused AdamW step only", t_step, None),
            ("step", "one read: fastclip.get_total_norm", t_read, None),
            ("step", "torch clip_grad_norm_ + step", t_torch, None),
            ("step", "fastclip.clip_grad_norm_ + step", t_fseq, t_torch / t_fseq),
            ("step", "fastclip.clip_and_step", t_fast, t_torch / t_fast)]
    return rows, clip


def bench_amp_step(params, repeats):
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.zeros(()))
    saved = [q.grad.clone() * 65536.0 for q in params]
    reset = _grad_restorer(params, saved, scaler)

    def torch_seq():
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        scaler.step(opt)

    t = _timings({"torch": torch_seq,
                  "fast": lambda: fastclip.clip_and_step(opt, MAX_NORM, scaler=scaler)}, reset, repeats)
    t_torch, t_fast = t["torch"], t["fast"]
    return [("amp+step", "torch unscale_ + clip + scaler.step", t_torch, None),
            ("amp+step", "fastclip.clip_and_step(scaler=)", t_fast, t_torch / t_fast)]


def torch_agc_(params, clipping: float = AGC_CLIPPING, eps: float = AGC_EPS) -> None:
    """AGC in plain torch, one tensor at a time: the way it is usually written (e.g. timm's
    ``adaptive_clip_grad``). Units are rows (every dim but the first) of tensors of two or more
    dims, the whole tensor otherwise; a unit is clipped when its grad norm exceeds the threshold."""
    for p in params:
        g = p.grad
        if g is None:
            continue
        dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
        w_norm = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True)
        g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
        max_norm = w_norm.clamp(min=eps).mul_(clipping)
        clipped = g * (max_norm / g_norm.clamp(min=1e-6))
        g.copy_(torch.where(g_norm > max_norm, clipped, g))


def agc_params(shapes, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        q = torch.nn.Parameter(torch.randn(shape, generator=gen))
        q.grad = torch.randn(shape, generator=gen) * AGC_GRAD_SCALES[i % len(AGC_GRAD_SCALES)]
        params.append(q)
    return params


def bench_agc(params, repeats):
    """Rows for AGC, and the largest relative difference between the two results."""
    saved = [q.grad.clone() for q in params]
    reset = _grad_restorer(params, saved)
    reset()
    torch_agc_(params)
    ref = [q.grad.clone() for q in params]
    reset()
    fastclip.adaptive_grad_clip_(params, AGC_CLIPPING, AGC_EPS)
    diff = max(float(((q.grad - r).abs() / r.abs().clamp(min=1e-30)).max()) if r.numel() else 0.0
               for q, r in zip(params, ref))
    t = _timings({"torch": lambda: torch_agc_(params),
                  "fast": lambda: fastclip.adaptive_grad_clip_(params, AGC_CLIPPING, AGC_EPS)},
                 reset, repeats)
    t_torch, t_fast = t["torch"], t["fast"]
    return [("agc", "torch, per tensor (timm-style)", t_torch, None),
            ("agc", "fastclip.adaptive_grad_clip_", t_fast, t_torch / t_fast)], diff


def _print_rows(rows) -> None:
    print(f"{'':9}{'operation':40}{'time':>12}{'torch / this':>14}")
    for group, label, t, ratio in rows:
        r = f"{ratio:13.2f}x" if ratio is not None else ""
        print(f"{group:9}{label:40}{t * 1e3:10.3f}ms{r:>14}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per row (median)")
    parser.add_argument("--sets", default="small,large", help=f"comma-separated, from {sorted(SETS)}")
    parser.add_argument("--agc-sets", default="resnet50",
                        help="comma-separated gradient-set presets for the AGC rows ('' skips them)")
    parser.add_argument("--threads", type=int, default=None, help="torch (and so fastclip) threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 grads, "
          f"median of {args.repeats} runs")
    for name in args.sets.split(","):
        n, size = SETS[name]
        params = _params(n, size)
        print(f"\n== {name}: {n} tensors x {size} elements ({n * size * 4 / 1e6:.1f} MB of grads)")
        rows = bench_amp(params, args.repeats)
        step_rows, clip = bench_step(params, args.repeats)
        rows += step_rows + bench_amp_step(params, args.repeats)
        _print_rows(rows)
        print(f"{'':9}clip cost over the bare step: torch {clip['torch'] * 1e3:.3f} ms, "
              f"fastclip clip_grad_norm_ {clip['fseq'] * 1e3:.3f} ms, "
              f"clip_and_step {clip['fast'] * 1e3:.3f} ms")
    for name in filter(None, args.agc_sets.split(",")):
        shapes = GRAD_SETS[name].shapes()
        params = agc_params(shapes)
        numel = sum(q.numel() for q in params)
        print(f"\n== agc on {name}: {len(params)} tensors, {numel:,} values (weights and grads "
              f"{2 * numel * 4 / 1e6:.1f} MB), clipping={AGC_CLIPPING}, eps={AGC_EPS}")
        rows, diff = bench_agc(params, args.repeats)
        _print_rows(rows)
        print(f"{'':9}results agree: largest relative difference {diff:.1e}")


if __name__ == "__main__":
    main()
