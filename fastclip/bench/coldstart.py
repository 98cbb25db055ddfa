"""Cold start: what ``import fastclip`` plus the first clip add to ``import torch``.

Each run is a fresh interpreter: it times ``import torch``, builds a small model's grads (1M
values in 4 tensors, below the 2M elements from which a call uses numba's thread pool, so the
pool's start is not in the figure; benchmarks/README.md gives a threaded first clip measured by
hand) outside the timing, then times
``import fastclip`` and a first clipping ``clip_grad_norm_``. The numba cache is warmed first,
in this process, so the figure is the warm-cache start a user sees on every launch after the
first.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass

TARGET_S = 0.3

_SHAPES = [(512, 1024), (1024, 256), (1024,), (262144,)]

_SCRIPT = f"""
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
params = [torch.nn.Parameter(torch.empty(s)) for s in {_SHAPES!r}]
for p in params:
    p.grad = torch.randn(p.shape)
t2 = time.perf_counter()
import fastclip
fastclip.clip_grad_norm_(params, 1e-3)
t3 = time.perf_counter()
print(json.dumps({{"import_torch_s": t1 - t0, "fastclip_s": t3 - t2}}))
"""


@dataclass
class ColdStart:
    """Medians over ``runs`` fresh processes.

    Attributes:
        import_torch_s: ``import torch``.
        fastclip_s: ``import fastclip`` + first ``clip_grad_norm_``: the cost over ``import torch``.
        runs: every run's pair of figures.
    """

    import_torch_s: float
    fastclip_s: float
    runs: list[dict]
    target_s: float = TARGET_S

    @property
    def met(self) -> bool:
        return self.fastclip_s < self.target_s

    def to_dict(self) -> dict:
        return {**asdict(self), "met": self.met}


def warm_cache() -> None:
    """Compile (or load) the kernels the cold-start run uses, so its cache is warm."""
    import torch

    import fastclip

    params = [torch.nn.Parameter(torch.empty(s)) for s in _SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape)
    fastclip.clip_grad_norm_(params, 1e-3)


def measure(runs: int = 3, timeout_s: float = 120.0) -> ColdStart:
    """Run the cold-start script ``runs`` times in fresh interpreters; medians of each figure.

    Raises:
        RuntimeError: a run failed (its stderr's last line is in the message).
    """
    warm_cache()
    results = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                              timeout=timeout_s)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"cold-start run failed (exit {proc.returncode}): {last}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return ColdStart(statistics.median(r["import_torch_s"] for r in results),
                     statistics.median(r["fastclip_s"] for r in results), results)
