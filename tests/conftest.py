"""Shared pytest set-up: importable test helpers, a fixed seed, and torch's thread count restored."""

from __future__ import annotations

import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ``python -m pytest`` puts the working directory first on sys.path. From the repository root,
# ``kernels/`` (installed as ``fastclip.kernels``) would then be importable as a top-level
# ``kernels`` and shadow Hugging Face's ``kernels`` package, which transformers >= 5 imports.
# The tests import the installed fastclip, never the source tree: take the root off the path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != REPO_ROOT]

# ``tests/reference.py`` is imported as ``reference`` whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(__file__))

try:
    from hypothesis import settings

    # No example database: CI checkouts must not grow a .hypothesis/ folder, and a failure
    # prints its reproducing blob instead.
    settings.register_profile("fastclip", deadline=None, database=None, print_blob=True)
    settings.load_profile("fastclip")
except ImportError:  # hypothesis is only needed by test_core_properties.py
    pass


def pytest_sessionstart(session):
    """With FASTCLIP_REQUIRE_GPU=1 (set by benchmarks/gpu_check.sh), a machine where fastclip's
    CUDA kernels cannot run is an error, not a run whose GPU tests all skip and look green."""
    if os.environ.get("FASTCLIP_REQUIRE_GPU") != "1" or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return
    from fastclip import _cuda

    if not torch.cuda.is_available() or not _cuda.is_available():
        raise pytest.UsageError(
            "FASTCLIP_REQUIRE_GPU=1, but fastclip's CUDA backend cannot run here "
            f"(torch.cuda.is_available()={torch.cuda.is_available()}; see any fastclip warning above)")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same RNG state and leaves torch's thread count as it found it."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def build_calls(monkeypatch):
    """Records every ``Plan.build`` call (by function name): each fastclip entry point builds
    exactly one plan per call, and none runs when torch's own function does the work."""
    from fastclip._plan import Plan

    calls = []
    original = Plan.build.__func__

    def spy(cls, *args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("fn"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Plan, "build", classmethod(spy))
    return calls


@pytest.fixture
def cpu_kernel_calls(monkeypatch):
    """Records the name of every CPU kernel entry that runs (``chunk_power_sums_parallel``,
    ``scale_serial``, ``agc_rows_parallel``, ...), so a test can check that it really took the
    thread-pool path it is about (the size above which it does is ``_cpu.PARALLEL_MIN_ELEMENTS``)."""
    import numba
    from fastclip.kernels import agc, cpu

    calls = []
    for module in (cpu, agc):
        for name in dir(module):
            obj = getattr(module, name)
            if (name.endswith("_serial") or name.endswith("_parallel")) and \
                    isinstance(obj, numba.core.dispatcher.Dispatcher):
                def recording(*args, _kernel=obj, _name=name):
                    calls.append(_name)
                    return _kernel(*args)
                monkeypatch.setattr(module, name, recording)
    return calls


@pytest.fixture
def single_rank_mesh(tmp_path):
    """A one-rank gloo group and a 1-D CPU mesh, torn down afterwards."""
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()) or dist.is_initialized():
        pytest.skip("needs torch.distributed with gloo, not yet initialized")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
