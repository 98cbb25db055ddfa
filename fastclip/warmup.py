"""``warmup()``: compile (or load) fastclip's kernels before the first clip needs them.

numba compiles each kernel at its first call and caches it on disk, next to the kernels
(``kernels/__pycache__`` in a checkout or editable install, ``fastclip/kernels/__pycache__`` in an
installed wheel) or under ``NUMBA_CACHE_DIR``. A job that starts from an image
whose cache is empty pays that compilation inside its first training steps: on the 2-core CI
machine ~7 s at the first clip of a small set, ~4 s more at the first large one, 20 s for every CPU
kernel. Running ``warmup()`` once where the cache persists (while building the image) takes it
out of every job, provided the job can write to that cache directory too: numba ignores a cache
it cannot write to (warm up as the job's user, into a ``NUMBA_CACHE_DIR`` writable at run time).
In a process whose cache is warm it loads every kernel (0.17–0.21 s there) ahead of the first
step instead of during it.

It works by calling fastclip's public functions on small scratch tensors of every dtype, on both
the calling-thread and the thread-pool paths, so exactly the kernels a training loop would reach
are compiled. It touches no user tensor and draws no random numbers.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch

from fastclip import _cpu
from fastclip.agc import adaptive_grad_clip_
from fastclip.clip_grad import (clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_,
                                 get_total_norm)
from fastclip.clipper import GradClipper
from fastclip.kernels.layout import DEFAULT_CHUNK_SIZE
from fastclip.stats import ClipStats

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _scratch(shape, dtype, device) -> torch.Tensor:
    """A parameter whose grad holds distinct non-zero values (no RNG draw)."""
    n = math.prod(shape)
    values = (torch.arange(n, dtype=torch.float32, device=device) % 7 + 1).reshape(shape)
    p = torch.nn.Parameter(values.to(dtype))
    p.grad = (values * 0.25).to(dtype)
    return p


def _exercise(device: torch.device) -> None:
    """Every kernel path of one device's backend: each dtype and norm kind, small sets (calling
    thread) and large ones (thread pool on the CPU), scale, clamp, the non-finite count, AGC
    (rows, and a unit longer than a chunk) and the clipper's non-finite zeroing."""
    # A unit longer than a chunk in both sets: AGC splits it into pieces (its second kernel).
    small = [_scratch((3, 40), dt, device) for dt in _DTYPES]
    small.append(_scratch((DEFAULT_CHUNK_SIZE + 3,), torch.float32, device))
    large = [_scratch((_cpu.PARALLEL_MIN_ELEMENTS // 512, 512), torch.float32, device),
             _scratch((DEFAULT_CHUNK_SIZE + 3,), torch.bfloat16, device)]
    for params in (small, large):
        grads = [p.grad for p in params if p.grad is not None]  # every one has a grad
        for p in (2.0, 1.0, math.inf, 3.0):
            get_total_norm(grads, p)
        clip_grads_with_norm_(params, 1e-3, get_total_norm(grads))
        clip_grad_norm_(params, 1e-3)
        clip_grad_value_(params, 1e-4)
        adaptive_grad_clip_(params, 1e-3)
        grads[0].view(-1)[0] = math.nan
        clip_grad_norm_(params, 1.0, stats=ClipStats())  # counts the non-finite elements
        GradClipper(params, max_norm=1.0, nonfinite="zero").step()


def warmup(cuda: Optional[bool] = None) -> dict:
    """Compile (or load from numba's disk cache) every kernel fastclip can run here.

    Args:
        cuda: also warm the CUDA kernels, on every visible GPU; ``None`` (the default) does so
            when torch sees a GPU and numba-cuda can launch on it.

    Returns:
        Seconds spent, by part: ``{"cpu": ..., "cuda": ...}`` (``"cuda"`` only when warmed).

    Raises:
        TypeError: ``cuda`` is not a bool or None.
        RuntimeError: ``cuda=True`` where fastclip cannot run CUDA kernels.

    Example:
        >>> import fastclip
        >>> sorted(fastclip.warmup(cuda=False))  # doctest: +SKIP
        ['cpu']

    While building a container image, so that no job compiles::

        python -c "import fastclip; fastclip.warmup()"
    """
    if cuda is not None and not isinstance(cuda, bool):
        raise TypeError("fastclip.warmup: `cuda` must be True, False or None, "
                        f"got {type(cuda).__name__}")
    if cuda is not False:
        available = _cuda_usable()
        if cuda and not available:
            raise RuntimeError("fastclip.warmup: `cuda=True`, but fastclip cannot run CUDA kernels here "
                               "(no GPU visible to torch, or numba-cuda missing or unable to launch)")
        cuda = available
    timings = {}
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if threads < 2:  # an image is often built on one core: still compile the thread-pool kernels
        torch.set_num_threads(2)
    try:
        _exercise(torch.device("cpu"))
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    timings["cpu"] = time.perf_counter() - t0
    if cuda:
        t0 = time.perf_counter()
        for index in range(torch.cuda.device_count()):
            _exercise(torch.device("cuda", index))
            torch.cuda.synchronize(index)
        timings["cuda"] = time.perf_counter() - t0
    return timings


def _cuda_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from fastclip import _cuda
    except Exception:  # numba-cuda missing or of another era: fastclip leaves CUDA to torch
        return False
    return _cuda.is_available()


__all__ = ["warmup"]
