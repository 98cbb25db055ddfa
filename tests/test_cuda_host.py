"""The CUDA backend's host-side fallbacks, without a GPU: what happens when numba-cuda cannot load
fastclip's kernels, or when cuda.core refuses a launch. The driver is replaced by stand-ins."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                                reason="the simulator never takes these paths")

_cuda = pytest.importorskip("fastclip._cuda")


@pytest.fixture
def fresh_availability(monkeypatch):
    monkeypatch.setattr(_cuda, "_available", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    from numba import cuda

    monkeypatch.setattr(cuda, "is_available", lambda: True)
    yield
    _cuda._available = None


def test_a_kernel_that_cannot_load_means_torch_with_a_warning(fresh_availability, monkeypatch):
    def fail(index):
        raise RuntimeError("CUDA_ERROR_UNSUPPORTED_PTX_VERSION")

    monkeypatch.setattr(_cuda._power_sums, "prepare", fail)
    with pytest.warns(RuntimeWarning, match="cannot load fastclip's kernels.*UNSUPPORTED_PTX"):
        assert _cuda.is_available() is False
    assert _cuda.is_available() is False  # decided once per process


def test_kernels_that_load_make_the_backend_available(fresh_availability, monkeypatch):
    loaded = []
    monkeypatch.setattr(_cuda._power_sums, "prepare", lambda index: loaded.append(index) or {})
    assert _cuda.is_available() is True and loaded == [0]


class _Dispatcher:
    def __init__(self):
        self.calls = []

    def __getitem__(self, config):
        return lambda *args: self.calls.append((config, args))


def _launcher(monkeypatch, fast):
    launcher = _cuda._Launcher("scale_kernel")
    dispatcher = _Dispatcher()
    launcher.dispatcher = dispatcher
    launcher.per_device[0] = {"fast": fast, "kernel": object(), "configs": {}, "streams": {},
                              "numba_streams": {}, "blocks_per_sm": 4,
                              "LaunchConfig": lambda grid, block: (grid, block),
                              "Stream": type("S", (), {"from_handle": staticmethod(lambda h: ("stream", h))})}
    monkeypatch.setattr(_cuda, "_device_guard", lambda index: contextlib.nullcontext())
    from numba import cuda

    monkeypatch.setattr(cuda, "external_stream", lambda handle: ("numba stream", handle))
    entry = _cuda._DeviceTable(torch.device("cpu"), 77, 1, 1, 5, torch.zeros(1, dtype=torch.int64),
                               torch.zeros(1, dtype=torch.int64))
    entry.index = 0  # as if on cuda:0
    return launcher, dispatcher, entry


def test_a_launch_cuda_core_refuses_falls_back_to_numbas_dispatcher(monkeypatch):
    def refuse(*args):
        raise TypeError("unsupported kernel argument type")

    launcher, dispatcher, entry = _launcher(monkeypatch, refuse)
    launcher(entry, (1, 2, 3, 4, 0, 0.0))
    assert dispatcher.calls == [((5, _cuda.K.THREADS, ("numba stream", 77)), (1, 2, 3, 4, 0, 0.0))]
    assert launcher.per_device[0]["fast"] is None  # decided for this device
    launcher(entry, (1, 2, 3, 4, 0, 0.0))
    assert len(dispatcher.calls) == 2


def test_fast_launches_convert_arguments_and_errors_after_success_propagate(monkeypatch):
    seen = []
    launcher, dispatcher, entry = _launcher(monkeypatch, lambda *a: seen.append(a))
    launcher(entry, (1, 2, 3, 4, 0, 0.0))
    stream, config, _, *args = seen[0]
    assert stream == ("stream", 77) and config == (5, _cuda.K.THREADS)
    assert [type(a).__name__ for a in args] == ["c_long"] * 5 + ["c_double"]  # max_norm
    assert [a.value for a in args] == [1, 2, 3, 4, 0, 0.0]
    assert dispatcher.calls == []

    def refuse(*args):
        raise TypeError("later failure")

    launcher.per_device[0]["fast"] = refuse
    with pytest.raises(TypeError, match="later failure"):  # a path that worked does not flip
        launcher(entry, (1, 2, 3, 4, 0, 0.0))


def test_the_fast_launch_paths_pieces_exist_in_the_installed_packages():
    """What ``_Launcher`` and ``_relaxed_capture`` reach for in numba-cuda, cuda-core and
    cuda-bindings. Where a release moves one, the GPU falls back to numba's dispatcher (slower
    launches) or to the caller's capture mode: CI says so here, without a GPU."""
    import inspect

    from numba.cuda import codegen
    from numba.cuda.cudadrv import devices, driver

    assert callable(getattr(codegen.CUDACodeLibrary, "get_cufunc", None))
    function_class = getattr(driver, "CudaPythonFunction", None) or driver.Function
    assert "kernel" in getattr(function_class, "__slots__", ()) or \
        "self.kernel =" in inspect.getsource(function_class)
    assert callable(getattr(devices, "get_context", None))
    assert callable(getattr(driver.Context, "get_active_blocks_per_multiprocessor", None))

    from cuda.core import LaunchConfig, Stream, launch

    assert callable(launch) and callable(Stream.from_handle)
    LaunchConfig(grid=3, block=_cuda.K.THREADS)  # the keywords _fast_launch passes

    from cuda.bindings import driver as cu

    assert callable(cu.cuThreadExchangeStreamCaptureMode)
    assert cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED is not None
