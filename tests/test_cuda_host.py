"""The CUDA backend's host-side fallbacks, without a GPU: what happens when numba-cuda cannot load
fastclip's kernels, or when cuda.core refuses a launch. The driver is replaced by stand-ins."""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import pytest
import torch

from fastclip._table import DTYPE_CODES, TensorTable

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
    monkeypatch.setattr(_cuda._power_sums, "prepare", lambda index: loaded.append(("norm", index)) or {})
    monkeypatch.setattr(_cuda._scale, "prepare", lambda index: loaded.append(("scale", index)) or {})
    assert _cuda.is_available() is True and loaded == [("norm", 0), ("scale", 0)]


def test_availability_is_decided_on_the_grads_device(fresh_availability, monkeypatch):
    """Not on the current device: a DDP rank that never called set_device would make a CUDA
    context (hundreds of MB) on GPU 0."""
    loaded = []
    monkeypatch.setattr(_cuda._power_sums, "prepare", lambda index: loaded.append(index) or {})
    monkeypatch.setattr(_cuda._scale, "prepare", lambda index: loaded.append(index) or {})
    assert _cuda.is_available(torch.device("cuda", 3)) is True and loaded == [3, 3]


def test_a_scale_kernel_that_cannot_load_means_torch_too(fresh_availability, monkeypatch):
    monkeypatch.setattr(_cuda._power_sums, "prepare", lambda index: {})

    def fail(index):
        raise RuntimeError("CUDA_ERROR_NO_BINARY_FOR_GPU")

    monkeypatch.setattr(_cuda._scale, "prepare", fail)
    with pytest.warns(RuntimeWarning, match="cannot load fastclip's kernels.*NO_BINARY"):
        assert _cuda.is_available() is False


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
    # cuda.core packs a Python int as int64 (intptr_t) and a float as a double: each argument
    # has exactly the type of its slot, whatever the caller passed (a numpy int, an int 0).
    assert [type(a) for a in args] == [int] * 5 + [float]  # the last: max_norm
    assert args == [1, 2, 3, 4, 0, 0.0]
    seen.clear()
    launcher(entry, (np.int64(1), 2, 3, 4, True, 0))
    assert [type(a) for a in seen[0][3:]] == [int] * 5 + [float] and seen[0][3:] == (1, 2, 3, 4, 1, 0.0)
    assert dispatcher.calls == []

    def refuse(*args):
        raise TypeError("later failure")

    launcher.per_device[0]["fast"] = refuse
    with pytest.raises(TypeError, match="later failure"):  # a path that worked does not flip
        launcher(entry, (1, 2, 3, 4, 0, 0.0))


@pytest.mark.parametrize("path", ["cuda.core", "numba dispatcher"])
def test_torchs_default_stream_is_launched_on_as_the_legacy_stream(monkeypatch, path):
    """torch's default stream has the handle 0, the legacy default stream. cuda-bindings reads a
    NULL stream as the per-thread default stream where CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM
    is set (numba-cuda suggests setting it): the kernels get CU_STREAM_LEGACY (1) instead, on
    both launch paths; another stream keeps its handle."""
    seen = []

    def refuse(*args):
        raise TypeError("unsupported kernel argument type")

    launcher, dispatcher, entry = _launcher(monkeypatch, (lambda *a: seen.append(a))
                                            if path == "cuda.core" else refuse)
    for handle, expected in ((0, 1), (77, 77)):
        entry.stream = handle
        launcher(entry, (1, 2, 3, 4, 0, 0.0))
        used = seen[-1][0] if path == "cuda.core" else dispatcher.calls[-1][0][2]
        assert used[1] == expected, (handle, used)


def test_a_launch_with_the_wrong_number_of_arguments_is_refused_before_any_launch(monkeypatch):
    """cuda.core hands the kernel whatever parameter array it is given: a short argument tuple
    would leave the kernel reading garbage for the missing parameters."""
    seen = []
    launcher, dispatcher, entry = _launcher(monkeypatch, lambda *a: seen.append(a))
    for args in ((1, 2, 3, 4, 0), (1, 2, 3, 4, 0, 0.0, 7)):
        with pytest.raises(RuntimeError, match="arguments for a kernel of 6"):
            launcher(entry, args)
    assert seen == [] and dispatcher.calls == []
    assert launcher.per_device[0]["fast"] is not None  # not mistaken for an API change


def test_dispatcher_launches_of_few_blocks_do_not_warn(monkeypatch):
    """numba-cuda warns at every dispatcher launch of fewer than 128 blocks; fastclip sizes its
    grids to the work on purpose, and a user running with warnings as errors must not fail."""
    from numba.core.errors import NumbaPerformanceWarning

    def refuse(*args):
        raise TypeError("unsupported kernel argument type")

    launcher, dispatcher, entry = _launcher(monkeypatch, refuse)

    def warn_then_record(config):
        def launch(*args):
            warnings.warn(f"Grid size {config[0]} will likely result in GPU under-utilization due "
                          "to low occupancy.", NumbaPerformanceWarning)
            dispatcher.calls.append((config, args))
        return launch

    dispatcher.__class__ = type("Warning", (_Dispatcher,), {"__getitem__": lambda self, c: warn_then_record(c)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        launcher(entry, (1, 2, 3, 4, 0, 0.0))
    assert len(dispatcher.calls) == 1
    with pytest.warns(NumbaPerformanceWarning):  # negative control: the stand-in does warn
        dispatcher[(5, 256)](1)


def test_a_bucket_index_uploaded_while_capturing_bypasses_the_cache(monkeypatch):
    """DTensor buckets index per-tensor sums with an index uploaded once and cached. While a
    stream is captured, the upload is only recorded (the tensor holds its values once the graph
    replays) and a cached index could be evicted under a live graph: capture uploads from the
    never-reused pinned arena and leaves the cache alone."""
    from fastclip import _distributed

    uploads = []

    def upload(host, device, capturing=None):
        uploads.append((host.tolist(), capturing))
        return torch.from_numpy(host.copy())

    monkeypatch.setattr(_cuda, "upload_int64", upload)
    monkeypatch.setattr(_distributed, "_index_cache", {})
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setattr(_cuda, "_capturing", lambda device: True)
    idx = _distributed._device_index(np.array([2, 0, 1], dtype=np.int64), cuda0)
    assert idx.tolist() == [2, 0, 1] and uploads == [([2, 0, 1], True)]
    assert _distributed._index_cache == {}
    monkeypatch.setattr(_cuda, "_capturing", lambda device: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)
    _distributed._device_index(np.array([2, 0, 1], dtype=np.int64), cuda0)
    assert len(_distributed._index_cache) == 1  # negative control: eager calls cache it


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


def _packed(holder, n: int) -> list[bytes]:
    """The 8 bytes behind each of the ``n`` parameter pointers of a cuda.core ``ParamHolder``."""
    import ctypes

    pointers = (ctypes.c_void_p * n).from_address(holder.ptr)
    return [ctypes.string_at(pointers[i], 8) for i in range(n)]


@pytest.mark.parametrize("name", ["power_sums_kernel", "scale_kernel", "clamp_kernel"])
def test_fast_launch_arguments_pack_to_the_bytes_of_the_kernels_signature(name):
    """What cuda.core's ``launch`` hands the driver (its ``ParamHolder`` of the arguments) is, for
    the Python ints and floats the launcher passes, the same bytes as ctypes int64 and double
    objects of each parameter of the kernel's signature: what numba's dispatcher would pack."""
    import ctypes

    kernel_arg_handler = pytest.importorskip("cuda.core._kernel_arg_handler")
    launcher = _cuda._Launcher(name)
    values = [-(2 ** 63), 2 ** 63 - 1, 0x7F12_3456_7890, -1, 0, 3]
    floats = [float("inf"), -0.0, 5e-324, float("nan"), 1.5, 0.1]
    args = [floats[i % len(floats)] if t == "float64" else values[i % len(values)]
            for i, t in enumerate(launcher.argtypes)]
    ours = [conv(a) for conv, a in zip(launcher.convs, args)]
    reference = [ctypes.c_double(a) if t == "float64" else ctypes.c_int64(a)
                 for t, a in zip(launcher.argtypes, args)]
    n = len(args)
    assert _packed(kernel_arg_handler.ParamHolder(ours), n) == \
        _packed(kernel_arg_handler.ParamHolder(reference), n)
    # The negative control: a float64 slot given a Python int is packed as an integer.
    if "float64" in launcher.argtypes:
        wrong = [1 if isinstance(a, float) else a for a in ours]
        assert _packed(kernel_arg_handler.ParamHolder(wrong), n) != \
            _packed(kernel_arg_handler.ParamHolder(reference), n)


def test_fast_launch_refuses_a_float_for_an_integer_parameter():
    launcher = _cuda._Launcher("scale_kernel")
    with pytest.raises(TypeError):
        [conv(a) for conv, a in zip(launcher.convs, (1, 2, 3, 4.0, 0, 0.0))]


# --- device-table geometry and the cache, on CPU tensors (host memory stands in for the device) --


def _cpu_table(tensors):
    return TensorTable.from_tensors(tensors, [t.dtype for t in tensors])


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(_cuda, "CHUNK_SIZE", 16)
    monkeypatch.setattr(_cuda, "MAX_BLOCKS", 3)
    _cuda.clear_cache()
    yield
    _cuda.clear_cache()


@pytest.mark.parametrize("lengths, grid", [([0], 1), ([0, 0], 1), ([5], 1), ([16, 1], 2), ([20, 40], 3)])
def test_grid_is_one_block_per_chunk_at_most_and_never_zero(small_chunks, lengths, grid):
    """A block per chunk up to the cap: no idle blocks on a small table, and one block for a table
    with no chunk at all (a launch needs one; it writes the zero norm)."""
    entry = _cuda.device_table(_cpu_table([torch.ones(n) for n in lengths]))
    assert entry.grid == grid


def test_the_cache_keeps_cache_size_tables(small_chunks):
    """The eager cache holds exactly ``CACHE_SIZE`` tables, least recently used out first."""
    keep = [[torch.randn(5)] for _ in range(_cuda.CACHE_SIZE + 1)]
    entries = [_cuda.device_table(_cpu_table(k)) for k in keep[:_cuda.CACHE_SIZE]]
    for k, e in zip(keep, entries):  # all still cached (and now used in this order)
        assert _cuda.device_table(_cpu_table(k)) is e
    _cuda.device_table(_cpu_table(keep[-1]))  # one more: the least recently used goes
    assert _cuda.device_table(_cpu_table(keep[0])) is not entries[0]
    assert _cuda.device_table(_cpu_table(keep[-2])) is entries[-1]


def test_the_cache_tells_dtypes_of_the_same_memory_apart(small_chunks):
    """float16 and bfloat16 views of one buffer: same addresses and lengths, other dtype codes,
    so another device table."""
    h = torch.randn(40).half()
    e_half = _cuda.device_table(_cpu_table([h]))
    e_bf16 = _cuda.device_table(_cpu_table([h.view(torch.bfloat16)]))
    assert e_bf16 is not e_half
    lay = _cuda.K.table_layout(1, e_bf16.nc)
    assert e_half._keep[lay["codes"]] == DTYPE_CODES[torch.float16]
    assert e_bf16._keep[lay["codes"]] == DTYPE_CODES[torch.bfloat16]


def test_a_grad_not_aligned_to_its_element_size_is_refused_before_any_launch(small_chunks):
    """A GPU faults on a misaligned load, and the fault ends the process's CUDA context. torch
    allocates aligned memory, but a tensor made from a buffer at a byte offset is not."""
    aligned = torch.ones(8)
    odd = torch.frombuffer(bytearray(64), dtype=torch.float32, offset=1, count=8)
    assert odd.data_ptr() % 4 == 1
    table = _cpu_table([aligned, odd])
    table.fn, table.arg = "clip_grad_norm_", "parameters"
    with pytest.raises(TypeError, match=r"clip_grad_norm_: grad 1 of `parameters` .* not a multiple "
                                        r"of its element size \(torch.float32\)"):
        _cuda.device_table(table)
    assert _cuda.device_table(_cpu_table([aligned])).n == 1  # aligned ones upload as before


def test_pinned_arena_hands_out_disjoint_64_byte_aligned_views():
    """Captured uploads each get pinned memory of their own, never reused: views that start on
    64-byte steps and never overlap (a plain tensor stands in for the pinned block)."""
    arena = _cuda._PinnedArena()
    arena.blocks.append(torch.zeros(_cuda.ARENA_WORDS, dtype=torch.int64))
    sizes = (3, 8, 1, 13, 9)
    views = [arena.take(n) for n in sizes]
    base = arena.blocks[0].data_ptr()
    spans = [(v.data_ptr() - base, v.data_ptr() - base + 8 * n) for v, n in zip(views, sizes)]
    assert [v.shape[0] for v in views] == list(sizes)
    assert all(start % 64 == 0 for start, _ in spans)
    assert all(stop <= nxt for (_, stop), (nxt, _) in zip(spans, spans[1:]))
    assert len(arena.blocks) == 1


def test_power_sums_launch_writes_per_tensor_sums_only_when_asked(small_chunks, monkeypatch):
    """The norm launch's output addresses: total, count and per-tensor sums in one float64
    buffer (2 + n slots), and no per-tensor address (no folds, no writes past a 2-slot buffer)
    when ``per_tensor=False``. The launch itself is recorded, not run."""
    launches = []
    monkeypatch.setattr(_cuda, "_power_sums", lambda entry, args: launches.append(args))
    table = _cpu_table([torch.randn(40), torch.randn(3)])
    r = _cuda.power_sums(table, 2.0, per_tensor=False)
    assert r.per_tensor is None and len(launches) == 1
    base = r.total.data_ptr()
    assert launches[0][8:] == (base, 0, 0, base + 8, 0) and launches[0][6] == 0
    r = _cuda.power_sums(table, 2.0, count_nonfinite=True)
    base = r.total.data_ptr()
    assert launches[1][8:] == (base, 0, 0, base + 8, base + 16) and launches[1][6] == _cuda.K.COUNT_NONFINITE
    assert r.per_tensor.data_ptr() == base + 16 and r.per_tensor.shape == (2,)
    assert r.nonfinite.data_ptr() == base + 8


def test_a_coefficient_without_memory_of_its_own_is_refused_before_any_launch(monkeypatch):
    """A tensor subclass whose data_ptr() is 0 would send address 0 to the scale kernel (an
    illegal address, which ends the CUDA context): refused before the table is even built."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    grad = torch.ones(5)
    table = TensorTable.from_tensors([grad], torch.float32)
    table.fn = "clip_grads_with_norm_"
    monkeypatch.setattr(_cuda, "device_table", lambda t: pytest.fail("a table was built"))
    coef = two_tensor.TwoTensor(torch.tensor(0.5), torch.tensor(0.5))
    with pytest.raises(TypeError, match="^clip_grads_with_norm_: the clipping coefficient is a TwoTensor"):
        _cuda.scale_(table, coef)
    assert torch.equal(grad, torch.ones(5))


def test_capture_is_asked_of_the_stream_the_kernels_launch_on(monkeypatch):
    """torch's query answers for the current device's current stream; grads on another device
    launch on that device's stream, so the question is asked there (and the current device
    restored). Stand-ins: devices 0 and 1, of which only 1 is capturing."""
    current = [0]
    capturing = {1}

    @contextlib.contextmanager
    def device(index):
        saved, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = saved

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(_cuda, "_is_capturing", lambda: current[0] in capturing)
    assert _cuda._capturing(torch.device("cuda", 1)) is True
    assert _cuda._capturing(torch.device("cuda", 0)) is False
    assert current == [0]
    capturing = {0}
    monkeypatch.setattr(_cuda, "_is_capturing", lambda: current[0] in capturing)
    assert _cuda._capturing(torch.device("cuda", 1)) is False
    assert _cuda._capturing(torch.device("cuda", 0)) is True
    assert _cuda._capturing(torch.device("cpu")) is False


class _UnloadableKernel:
    def prepare(self, index):
        raise RuntimeError("CUDA_ERROR_NO_BINARY_FOR_GPU")

    def __call__(self, entry, args):
        pytest.fail("a kernel that cannot load was launched")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_a_clamp_kernel_that_cannot_load_means_torchs_ops_for_that_call(small_chunks, monkeypatch, dtype):
    """``is_available`` loads the norm and scale kernels only; a clamp kernel that cannot load
    at the first ``clip_grad_value_`` means torch's ops (a warning, then torch's results), not
    an error. The CPU "device" table stands in for one on GPU 0."""
    from fastclip import _plan

    monkeypatch.setattr(_cuda, "_clamp", _UnloadableKernel())
    monkeypatch.setattr(_plan, "_warned", set())
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(40, generator=g).to(dtype) * 3, torch.randn(7, 6, generator=g).to(dtype).t()[1:],
             torch.tensor([float("nan"), -float("inf"), 0.5]).to(dtype)]
    expected = [t.clone() for t in grads]
    for t in expected:  # torch's clip_grad_value_: clamp_min_ then clamp_max_ on each grad
        t.clamp_(min=-1.0, max=1.0)
    table = _cpu_table(grads)
    entry = _cuda.device_table(table)
    entry.index = 0
    with pytest.warns(RuntimeWarning, match="cannot load fastclip's clamp kernel.*NO_BINARY"):
        _cuda.clamp_(table, 1.0)
    for ours, theirs in zip(grads, expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


def test_a_clamp_that_falls_back_refuses_inference_grads_before_any_write(small_chunks, monkeypatch):
    """torch's clamp_ refuses an inference tensor outside inference mode: checked for every grad
    first, so a refused call changes none."""
    monkeypatch.setattr(_cuda, "_clamp", _UnloadableKernel())
    first = torch.full((5,), 3.0)
    with torch.inference_mode():
        second = torch.full((5,), 3.0)
    table = _cpu_table([first, second])
    _cuda.device_table(table).index = 0
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="inference tensor"):
        _cuda.clamp_(table, 1.0)
    assert torch.equal(first, torch.full((5,), 3.0))


def test_host_values_reach_a_gpu_from_pinned_memory(monkeypatch):
    """Host results (the CPU backend's sums in a plan that also has CUDA grads, ``ClipStats``'s
    index lists) go to a GPU through ``upload_int64``: pinned memory, no host wait, and an arena
    view while capturing. A copy from pageable memory makes the host wait for the stream."""
    from fastclip._plan import host_to_device

    uploads = []

    def upload(host, device, capturing=None):
        assert host.dtype == np.int64 and device == torch.device("cuda", 0)
        uploads.append(host.copy())
        return torch.from_numpy(host.copy())

    monkeypatch.setattr(_cuda, "upload_int64", upload)
    gpu = torch.device("cuda", 0)
    index = host_to_device([0, 2, 5], torch.int64, gpu)
    sums = host_to_device(np.array([1.5, -2.0]), torch.float64, gpu)
    count = host_to_device(3, torch.int64, gpu)
    total = host_to_device(2.5, torch.float64, gpu)
    assert len(uploads) == 4
    assert index.dtype == torch.int64 and index.tolist() == [0, 2, 5]
    assert sums.dtype == torch.float64 and sums.tolist() == [1.5, -2.0]
    assert count.shape == () and count.item() == 3
    assert total.shape == () and total.dtype == torch.float64 and total.item() == 2.5
    cpu = host_to_device(np.array([1.0, 2.0]), torch.float64, torch.device("cpu"))
    assert len(uploads) == 4 and cpu.tolist() == [1.0, 2.0]
