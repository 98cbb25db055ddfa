"""``fastclip.warmup()`` compiles every kernel a training loop can reach, so that a later process
with the same cache compiles nothing; it changes nothing the caller can see."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastclip

TESTS = os.path.dirname(os.path.abspath(__file__))

# A later process: every public path that reaches a CPU kernel (the runtime test's exercise, plus
# AGC, the non-finite count and the clipper's zeroing), then each kernel dispatcher's cache
# statistics and how often numba set up its registries (kernels/startup.py loads without it).
_LATER = textwrap.dedent("""
    import json, math, sys
    sys.path.insert(0, sys.argv[1])
    from numba.core.base import BaseContext
    refreshes, refresh = [], BaseContext.refresh
    BaseContext.refresh = lambda self: (refreshes.append(type(self).__name__), refresh(self))[1]
    import torch, fastclip
    from numba.core.dispatcher import Dispatcher
    from fastclip.kernels import agc, cpu, layout
    from test_core_runtime import _exercise
    from reference import param_with_grad
    _exercise()
    for n in (300, 1 << 21):
        params = [param_with_grad(torch.randn(n // 100, 100)), param_with_grad(torch.randn(70000))]
        fastclip.adaptive_grad_clip_(params)
        params[0].grad[0, 0] = math.nan
        fastclip.clip_grad_norm_(params, 1.0, stats=fastclip.ClipStats())
        fastclip.GradClipper(params, nonfinite="zero").step()
    stats = {}
    for module in (agc, cpu, layout):
        for name, obj in vars(module).items():
            if isinstance(obj, Dispatcher) and obj.signatures:
                stats[module.__name__ + "." + name] = [sum(obj.stats.cache_hits.values()),
                                                       sum(obj.stats.cache_misses.values())]
    print(json.dumps({"stats": stats, "refreshes": refreshes}))
""")


def _run(code, cache_dir, *args):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_a_process_after_warmup_compiles_nothing(tmp_path):
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    assert not any(cache.iterdir())  # so every cache hit below comes from warmup()
    # Warmed on one torch thread (a one-core build container), used on two: the thread-pool
    # kernels must be in the cache all the same.
    warm = json.loads(_run("import json, sys, torch, fastclip; torch.set_num_threads(1); "
                           "timings = fastclip.warmup(cuda=False); "
                           "print(json.dumps([timings, 'scipy.linalg' in sys.modules]))", cache))
    timings, imported_scipy_linalg = warm
    assert list(timings) == ["cpu"] and timings["cpu"] > 0
    # Compiling set numba's registries up, with its BLAS probe deferred (kernels/startup.py).
    assert not imported_scipy_linalg
    later = json.loads(_run("import torch; torch.set_num_threads(2)\n" + _LATER, cache, TESTS))
    stats = later["stats"]
    used = {name for name, (hits, misses) in stats.items() if hits or misses}
    # The norm, scale and clamp kernels on both paths, the chunk table, the non-finite count, AGC.
    for kernel in ("cpu.chunk_power_sums_serial", "cpu.chunk_power_sums_parallel", "cpu.scale_serial",
                   "cpu.scale_parallel", "cpu.clamp_serial", "cpu.clamp_parallel",
                   "cpu.count_nonfinite", "layout._chunk_arrays"):
        assert f"fastclip.kernels.{kernel}" in used, sorted(used)
    assert any(".agc." in name for name in used), sorted(used)
    compiled = {name: s for name, s in stats.items() if s[1]}
    assert not compiled, f"compiled after warmup(): {compiled}"
    # Every kernel came from the cache without numba's registry set-up (~0.2 s).
    assert later["refreshes"] == []


@pytest.mark.parametrize("threads", [1, 2])
def test_warmup_changes_nothing_the_caller_sees(threads):
    torch.set_num_threads(threads)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    with torch.enable_grad():
        timings = fastclip.warmup(cuda=False)
        assert torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), rng)  # no random numbers drawn
    assert torch.get_num_threads() == threads
    assert set(timings) == {"cpu"}


def test_warmup_argument_errors():
    with pytest.raises(TypeError, match="`cuda`"):
        fastclip.warmup(cuda="yes")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: cuda=True is valid here")
    with pytest.raises(RuntimeError, match="`cuda=True`"):
        fastclip.warmup(cuda=True)
