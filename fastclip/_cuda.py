"""The CUDA backend: runs ``kernels/cuda.py`` on a ``TensorTable``, with no host synchronization.

Every call works on torch's current stream and passes the kernels scalars only: the address of
one int64 *device table* (addresses, dtype codes, chunk table) and of a small scratch buffer.
Building and uploading the table is the only per-set cost, so device tables are cached, keyed by
the table's contents (addresses, lengths, dtypes), the device and the stream: a training loop
whose grads keep their buffers uploads once. Uploads go through pinned memory with
``non_blocking=True``; nothing here ever waits for the GPU.

CUDA graphs: while a stream is being captured, a call never touches the eager cache. It builds a
table of its own whose upload (a captured memcpy from pinned host memory) and zeroed scratch are
part of the graph, so each replay re-reads the table and starts from zeroed tickets. The pinned
host memory comes from an arena reserved by the first eager call and is never reused (a graph
may be replayed at any time): a few KB per captured call, for the life of the process. Run one
call before capturing (torch's own advice: warm up on a side stream), so that the kernels are
compiled and loaded, and the arena reserved, outside the capture.
"""

from __future__ import annotations

import contextlib
import operator
import threading
import warnings
from collections import OrderedDict
from typing import Any, Optional

import numpy as np
import torch

from fastclip._cpu import PowerSums
from fastclip._table import ITEMSIZE, TensorTable, mark_written
from fastclip.kernels import cuda as K
from fastclip.kernels.layout import DEFAULT_CHUNK_SIZE, build_chunk_table, norm_kind

CHUNK_SIZE = DEFAULT_CHUNK_SIZE
CACHE_SIZE = 8  # device tables kept per process (eager calls)
MAX_BLOCKS: Optional[int] = None  # grid cap override (tests); default: the resident blocks
SIM_MAX_BLOCKS = 3  # the simulator's grid cap: small grids keep it fast

ARENA_WORDS = 1 << 17  # int64 words of pinned memory per arena block (1 MiB)
# Launch through cuda.core directly (the call numba-cuda itself ends with) rather than through
# numba's dispatcher; False selects the dispatcher (tests, or if a numba-cuda release breaks it).
FAST_LAUNCH = True

# Results stay on the device as tensors; coefficients are read by the kernels where they live.
RESULTS_ON_HOST = False

_lock = threading.Lock()
_cache: "OrderedDict[tuple, _DeviceTable]" = OrderedDict()
_available: Optional[bool] = None


def is_available(device: Optional[torch.device] = None) -> bool:
    """True when CUDA tensors can run on fastclip's kernels (a GPU, a driver, numba-cuda, and
    the two kernels of a clip compiling and loading), decided once, on ``device`` (the first
    grads' device; the current device when None)."""
    global _available
    if _available is None:
        ok = False
        if not K.SIMULATOR and torch.cuda.is_available():
            try:
                from numba import cuda

                ok = bool(cuda.is_available())
            except Exception:  # a broken driver or toolkit: torch does the work
                ok = False
            if ok:
                # Load a clip's two kernels now, so that a toolkit the driver cannot run (PTX
                # newer than the driver, say) means torch's implementation, not an error on the
                # first clip. On the grads' device: a DDP rank that never called set_device
                # would otherwise make a context on GPU 0.
                index = device.index if device is not None and device.index is not None \
                    else torch.cuda.current_device()
                try:
                    _power_sums.prepare(index)
                    _scale.prepare(index)
                except Exception as exc:
                    warnings.warn(f"fastclip: numba-cuda cannot load fastclip's kernels on this GPU "
                                  f"({exc!r}); CUDA gradients are clipped by torch's implementation",
                                  RuntimeWarning, stacklevel=2)
                    ok = False
        _available = ok
    return _available


class _DeviceTable:
    """A table on the device, its scratch, and the launch geometry."""

    __slots__ = ("device", "index", "stream", "n", "nc", "grid", "table", "scratch",
                 "_keep", "scratch_tensor", "torch_written")

    def __init__(self, device, stream, n, nc, grid, table_tensor, scratch_tensor, torch_written=()):
        self.device = device
        # Tensors the write kernels skip (READONLY) and torch writes after them, in this order:
        # strided views (the kernels read a copy) and later listings of overlapping memory.
        self.torch_written = tuple(torch_written)
        self.index = device.index if device.type == "cuda" else -1
        self.stream = stream
        self.n = n
        self.nc = nc
        self.grid = grid
        self.table = table_tensor.data_ptr()
        self.scratch = scratch_tensor.data_ptr()
        self.scratch_tensor = scratch_tensor
        self._keep = table_tensor


# --- streams, capture, launches -------------------------------------------------------------------

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_is_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)

# torch's default stream (handle 0) is the *legacy* default stream. cuda-bindings resolves a NULL
# stream to the per-thread default stream instead when CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM
# is set (it then loads the driver's _ptsz entry points), which would run the kernels unordered
# with torch's work. The explicit legacy handle means the same stream whatever that setting.
_CU_STREAM_LEGACY = 0x1


def _driver_stream(handle: int) -> int:
    return handle if handle else _CU_STREAM_LEGACY


def _stream_handle(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    if _raw_stream is not None:
        return _raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _capturing(device: torch.device) -> bool:
    """True while ``device``'s current stream (the one the kernels launch on) is being captured.

    torch's query asks the *current* device's current stream: for grads on another device (a
    capture on cuda:1 while cuda:0 is current) it would answer for the wrong stream, and the
    capture would record the eager cache's table, which a later call may evict and free.
    """
    if device.type != "cuda":
        return False
    if device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device.index):
            return _current_stream_capturing()
    return _current_stream_capturing()


def _current_stream_capturing() -> bool:
    if _is_capturing is not None:
        return bool(_is_capturing())
    return torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def _relaxed_capture():
    """Let this thread make calls that stream capture forbids in its global mode (pinned
    allocation, module loading), as torch does for its own allocations during capture."""
    cu: Any = None
    old = None
    try:
        from cuda.bindings import driver as cu  # type: ignore[no-redef]

        err, old = cu.cuThreadExchangeStreamCaptureMode(
            cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED)
        if err != cu.CUresult.CUDA_SUCCESS:
            old = None
    except Exception:  # no cuda.bindings: proceed in the caller's mode
        old = None
    try:
        yield
    finally:
        if old is not None:
            cu.cuThreadExchangeStreamCaptureMode(old)


class _PinnedArena:
    """Pinned host memory for the uploads of captured calls: handed out once, never reused,
    never freed (a captured memcpy reads it at every replay)."""

    def __init__(self):
        self.blocks: list = []
        self.used = 0

    def reserve(self) -> None:
        """Allocate the first block (called by eager uploads, so captures rarely allocate)."""
        if not self.blocks:
            self.blocks.append(torch.empty(ARENA_WORDS, dtype=torch.int64, pin_memory=True))

    def take(self, words: int) -> torch.Tensor:
        with _lock:
            block = self.blocks[-1] if self.blocks else None
            if block is None or self.used + words > block.shape[0]:
                with _relaxed_capture():
                    block = torch.empty(max(ARENA_WORDS, words), dtype=torch.int64, pin_memory=True)
                self.blocks.append(block)
                self.used = 0
            view = block[self.used:self.used + words]
            self.used += (words + 7) // 8 * 8  # 64-byte steps
        return view


_arena = _PinnedArena()


@contextlib.contextmanager
def _quiet_occupancy():
    """numba-cuda warns at every dispatcher launch of fewer than 128 blocks (a NumbaPerformance-
    Warning, on by default); fastclip's grids are sized to the work on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will likely result in GPU under-utilization")
        yield


def _device_guard(index: int):
    if index < 0 or torch.cuda.current_device() == index:
        return contextlib.nullcontext()
    return torch.cuda.device(index)


class _Launcher:
    """Launches one kernel with as little Python work as possible.

    The kernel is compiled once (or loaded from numba's disk cache) for the scalar signature
    in ``kernels.cuda``; launches go straight to ``cuda.core.launch`` with a cached launch
    configuration and stream wrapper. When numba-cuda's internals differ from what this expects,
    it falls back to the ordinary ``kernel[grid, block, stream](*args)``.
    """

    def __init__(self, name: str):
        self.dispatcher, sig = K.KERNELS[name]
        self.argtypes = [a.strip() for a in sig.split(",")]
        # cuda.core packs a Python float as a double and a Python int as a 64-bit intptr_t: the
        # kernels' float64 and int64 parameters, bit for bit. Converting and packing the norm
        # launch's 13 arguments so took 0.8 us, against 5.6 us through ctypes objects. Each
        # argument is made exactly its slot's Python type, so a number meant for a float64 slot
        # is never packed as an integer (and operator.index refuses a float for an int64 slot).
        self.convs = [float if a == "float64" else operator.index for a in self.argtypes]
        self.sig = "void(" + sig + ")"
        self.per_device: dict = {}

    def prepare(self, index: int) -> dict:
        """Compile (or load) the kernel for device ``index`` and set up its launch path."""
        state = self.per_device.get(index)
        if state is not None:
            return state
        state = {"fast": None, "configs": {}, "streams": {}, "numba_streams": {},
                 "blocks_per_sm": None}
        with _device_guard(index), _relaxed_capture():
            kernel = self.dispatcher.compile(self.sig)
            try:
                cufunc = kernel._codelibrary.get_cufunc()  # loads the module: driver errors raise
            except AttributeError:  # numba-cuda internals changed: the public launch path only
                cufunc = None
            if cufunc is not None and FAST_LAUNCH:
                try:
                    from cuda.core import LaunchConfig, Stream, launch

                    state.update(fast=launch, kernel=cufunc.kernel, LaunchConfig=LaunchConfig,
                                 Stream=Stream)
                except Exception:
                    state["fast"] = None
            if cufunc is not None:
                try:
                    from numba.cuda.cudadrv.devices import get_context

                    state["blocks_per_sm"] = int(get_context().get_active_blocks_per_multiprocessor(
                        cufunc, K.THREADS, 0))
                except Exception:
                    pass
        self.per_device[index] = state
        return state

    def __call__(self, entry: _DeviceTable, args: tuple) -> None:
        if K.SIMULATOR or entry.index < 0:
            self.dispatcher[entry.grid, K.THREADS](*args)
            return
        if len(args) != len(self.convs):  # cuda.core would pass the kernel a short parameter array
            raise RuntimeError(f"fastclip: {len(args)} arguments for a kernel of {len(self.convs)}")
        state = self.per_device.get(entry.index) or self.prepare(entry.index)
        with _device_guard(entry.index):
            if state["fast"] is not None:
                try:
                    self._fast_launch(state, entry, args)
                    return
                except (TypeError, ValueError, AttributeError):
                    # cuda.core refused the call before launching anything (its API changed):
                    # numba's dispatcher from now on. A path that has launched once stays.
                    if state.get("fast_ok"):
                        raise
                    state["fast"] = None
            stream = state["numba_streams"].get(entry.stream)
            if stream is None:
                from numba import cuda

                stream = state["numba_streams"][entry.stream] = cuda.external_stream(
                    _driver_stream(entry.stream))
            with _quiet_occupancy():
                self.dispatcher[entry.grid, K.THREADS, stream](*args)

    def _fast_launch(self, state: dict, entry: _DeviceTable, args: tuple) -> None:
        config = state["configs"].get(entry.grid)
        if config is None:
            config = state["configs"][entry.grid] = state["LaunchConfig"](grid=entry.grid, block=K.THREADS)
        stream = state["streams"].get(entry.stream)
        if stream is None:
            stream = state["streams"][entry.stream] = state["Stream"].from_handle(
                _driver_stream(entry.stream))
        state["fast"](stream, config, state["kernel"], *[conv(a) for conv, a in zip(self.convs, args)])
        state["fast_ok"] = True


_power_sums = _Launcher("power_sums_kernel")
_scale = _Launcher("scale_kernel")
_clamp = _Launcher("clamp_kernel")


def reset_launchers() -> None:
    """Forget every launcher's per-device state (after changing ``FAST_LAUNCH``)."""
    for launcher in (_power_sums, _scale, _clamp):
        launcher.per_device.clear()


def launch_path() -> str:
    """'cuda.core' or 'numba dispatcher': which launch path the kernels use (benchmarks)."""
    states = list(_power_sums.per_device.values())
    if not states:
        return "not launched yet"
    return "cuda.core" if states[0]["fast"] is not None else "numba dispatcher"


# --- device tables --------------------------------------------------------------------------------


def _max_blocks(device: torch.device) -> int:
    if MAX_BLOCKS is not None:
        return MAX_BLOCKS
    if K.SIMULATOR or device.type != "cuda":
        return SIM_MAX_BLOCKS
    props = torch.cuda.get_device_properties(device)
    per_sm = _power_sums.prepare(device.index)["blocks_per_sm"]
    if not per_sm:
        per_sm = max(1, props.max_threads_per_multi_processor // K.THREADS)
    return props.multi_processor_count * per_sm


def host_table(table: TensorTable, chunk_size: Optional[int] = None, readonly=()) -> tuple:
    """The device table's int64 contents for ``table`` (see ``kernels.cuda.table_layout``),
    and its tensor and chunk counts. ``chunk_size`` defaults to ``CHUNK_SIZE``; the write
    kernels skip the strided tensors and those listed in ``readonly``."""
    chunk_size = CHUNK_SIZE if chunk_size is None else chunk_size
    lengths = table.lengths
    chunks = build_chunk_table(lengths, chunk_size)
    per_tensor = (lengths + (chunk_size - 1)) // chunk_size
    first = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(per_tensor, out=first[1:])
    codes = table.codes.astype(np.int64, copy=True)
    if table.strided:
        codes[table.strided] |= K.READONLY
    if len(readonly):
        codes[np.asarray(readonly, dtype=np.int64)] |= K.READONLY
    host = np.concatenate([table.addrs, codes, chunks.tensor, chunks.start, chunks.stop, first])
    return host.astype(np.int64, copy=False), int(lengths.shape[0]), chunks.n_chunks


def upload_int64(host: np.ndarray, device: torch.device, capturing: Optional[bool] = None) -> torch.Tensor:
    """A new int64 tensor on the CUDA ``device`` holding ``host``, copied asynchronously on the
    current stream from pinned memory. While the stream is being captured the pinned memory comes
    from the arena and is never reused, so the captured copy reads the same bytes at every
    replay; otherwise torch's pinned allocator keeps the buffer until the copy has run."""
    if capturing is None:
        capturing = _capturing(device)
    n = host.shape[0]
    if capturing:
        pinned = _arena.take(n)
    else:
        _arena.reserve()
        pinned = torch.empty(n, dtype=torch.int64, pin_memory=True)
    pinned.numpy()[:] = host
    out = torch.empty(n, dtype=torch.int64, device=device)
    out.copy_(pinned, non_blocking=True)
    return out


# --- for kernels launched through numba's dispatcher (AGC, GradClipper's zeroing) ----------------


def numba_array(t: torch.Tensor):
    """numba's view of the torch tensor ``t``'s memory: a device array, or in the simulator
    (where device memory is host memory) a numpy array."""
    if K.SIMULATOR:
        return t.numpy()
    from numba import cuda

    return cuda.as_cuda_array(t, sync=False)


def numba_upload(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """``upload_int64`` (pinned memory: capturable in a CUDA graph), or a host copy in the
    simulator."""
    if K.SIMULATOR:
        return torch.from_numpy(host.astype(np.int64, copy=True))
    return upload_int64(host, device)


@contextlib.contextmanager
def numba_launch(device: torch.device):
    """numba's context for ``device``; yields torch's current stream there (0 in the simulator)."""
    if K.SIMULATOR:
        yield 0
        return
    from numba import cuda

    with cuda.gpus[device.index if device.index is not None else torch.cuda.current_device()], \
            _quiet_occupancy():
        yield cuda.external_stream(_driver_stream(torch.cuda.current_stream(device).cuda_stream))


def _upload(table: TensorTable, device: torch.device, stream: int, capturing: bool,
            scalars: tuple = ()) -> _DeviceTable:
    # A GPU faults on a load that is not aligned to its size ("misaligned address", which ends
    # the process's CUDA context); torch's tensors always are, but one imported with a byte
    # offset (DLPack, __cuda_array_interface__) may not be. Checked here, on a cache miss only.
    misaligned = np.flatnonzero(table.addrs % ITEMSIZE[table.codes & K.CODE_MASK])
    if misaligned.size:
        i = int(misaligned[0])
        raise TypeError(f"{table.fn}: grad {table._index(i)} of `{table.arg}` (counting only the "
                        f"tensors that have one) starts at an address that is not a multiple of its "
                        f"element size ({table.tensors[i].dtype}), which a GPU cannot read; give it "
                        "aligned memory first (p.grad = p.grad.clone())")
    # Blocks write their chunks concurrently: memory listed twice would race (torch scales it
    # twice, one multiply after the other), so its later listings are left to torch; so are
    # ``scalars`` (see ``device_table``).
    overlapping = table.overlapping()
    host, n, nc = host_table(table, readonly=sorted(set(overlapping.tolist()) | set(scalars)))
    slots = K.scratch_slots(n, nc)
    if device.type != "cuda":  # the simulator: "device" memory is host memory
        table_tensor = torch.from_numpy(host)
        scratch = torch.zeros(slots, dtype=torch.int64)
    else:
        table_tensor = upload_int64(host, device, capturing)
        scratch = torch.zeros(slots, dtype=torch.int64, device=device)
    grid = max(1, min(nc, _max_blocks(device)))
    torch_written = sorted(set(table.strided) | set(overlapping.tolist()) | set(scalars))
    return _DeviceTable(device, stream, n, nc, grid, table_tensor, scratch, torch_written)


def device_table(table: TensorTable, coef_dtype: Optional[torch.dtype] = None) -> _DeviceTable:
    """The device table of ``table`` on its tensors' device, uploaded or from the cache.

    ``coef_dtype``: the dtype of the coefficient a scale launch multiplies by (None for launches
    that read, or clamp). 0-d grads narrower than float64 are scaled by torch's mul_ only under a
    float64 coefficient: torch then multiplies two 0-d operands in float64 and rounds once,
    where the kernel multiplies in float32. Under a float32 coefficient (and in the clamp) the
    kernel writes them, as the CPU backend does (``TensorTable.promoted_scalars``)."""
    scalars = table.promoted_scalars(coef_dtype) if coef_dtype is not None else ()
    local_key = ("cuda", scalars)
    entry = table.chunk_cache.get(local_key)
    if entry is not None:
        return entry
    device = table.tensors[0].device
    stream = _stream_handle(device)
    if _capturing(device):
        entry = _upload(table, device, stream, capturing=True, scalars=scalars)
    else:
        key = (device.index, stream, table.addrs.tobytes(), table.lengths.tobytes(),
               table.codes.tobytes(), tuple(table.strided), scalars)
        with _lock:
            entry = _cache.get(key)
            if entry is not None:
                _cache.move_to_end(key)
        if entry is None:
            entry = _upload(table, device, stream, capturing=False, scalars=scalars)
            with _lock:
                _cache[key] = entry
                while len(_cache) > CACHE_SIZE:
                    _cache.popitem(last=False)
    table.chunk_cache[local_key] = entry
    return entry


def clear_cache() -> None:
    """Forget the cached device tables (eager ones; graphs keep what they captured)."""
    with _lock:
        _cache.clear()


# --- the backend interface ------------------------------------------------------------------------


def power_sums(table: TensorTable, p: float, count_nonfinite: bool = False,
               per_tensor: bool = True) -> PowerSums:
    """One read pass: float64 sums of |x|**p (max |x| for inf), all on the device.

    Args:
        table: tensors on one CUDA device.
        p: the norm type.
        count_nonfinite: also count the inf/NaN elements.
        per_tensor: also fold the chunk partials into one sum per tensor (telemetry, DTensor
            buckets); with False ``per_tensor`` is None and the folds are skipped.

    Returns:
        ``PowerSums`` of device tensors: ``total`` (0-d float64), ``per_tensor`` (float64, table
        order, or None), ``nonfinite`` (0-d int64; 0 unless counted).
    """
    entry = device_table(table)
    want = bool(per_tensor)
    n = entry.n
    out = torch.empty(2 + (n if want else 0), dtype=torch.float64, device=entry.device)
    base = out.data_ptr()
    _power_sums(entry, (entry.table, n, entry.nc, norm_kind(p), float(p), entry.scratch,
                        K.COUNT_NONFINITE if count_nonfinite else 0, 0.0,
                        base, 0, 0, base + 8, base + 16 if want else 0))
    return PowerSums(out[0], out[2:] if want else None, out[1:2].view(torch.int64)[0])


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def _scale_like_kernel_(t: torch.Tensor, coef: torch.Tensor) -> None:
    """Multiply a tensor the write kernels leave to torch (a strided view, memory listed twice, a
    0-d scalar) by the 0-d device ``coef`` with the scale kernel's rounding, so that one call
    scales every grad of a dtype alike.

    torch's CUDA ``mul_`` loads a 0-d CUDA operand in the grad's dtype: a 16-bit grad would be
    multiplied by the coefficient rounded to 16 bits (up to 0.4% off for bfloat16), where the
    kernel multiplies by float32(coef) in float32 and rounds once, as torch's CPU ``mul_`` does.
    0-d grads keep torch's ``mul_``: both operands are 0-d, so torch promotes, which is why they
    are left to torch (``TensorTable.promoted_scalars``).
    """
    if t.dim() > 0 and t.dtype in _SIXTEEN_BIT:
        # A one-element operand with a dimension takes part in type promotion (a 0-d one does
        # not): float32 arithmetic, one rounding to the grad's dtype, no float32 copy of it.
        t.mul_(coef.float().reshape(1))
    else:
        t.mul_(coef)


def scale_(table: TensorTable, coef: torch.Tensor, always: bool = False) -> None:
    """Multiply every tensor by the 0-d ``coef`` (on this device) in place, with torch's
    ``mul_`` rounding. The kernel reads coef on the device and does nothing when it is >= 1,
    unless ``always`` (a factor that may exceed 1: AMP's unscale)."""
    if isinstance(coef, torch.Tensor) and type(coef) is not torch.Tensor and coef.data_ptr() == 0:
        # A tensor subclass with no memory of its own: the kernel would read address 0 (an
        # illegal-address error that ends the process's CUDA context).
        raise TypeError(f"{table.fn}: the clipping coefficient is a {type(coef).__name__}, which has "
                        "no memory of its own; pass `max_norm` and `total_norm` as plain tensors")
    device = table.tensors[0].device
    if not isinstance(coef, torch.Tensor):  # a host number (the simulator's CPU "device")
        coef = torch.tensor(float(coef), dtype=torch.float64, device=device)
    if coef.dtype != torch.float32 and coef.dtype != torch.float64:
        coef = coef.to(torch.float32)
    if coef.device != device:
        coef = coef.to(device, non_blocking=True)
    entry = device_table(table, coef.dtype)
    table.check_writable(entry.torch_written)  # before the kernel: a failing call changes no grad
    mode = (K.SCALE_F64 if coef.dtype == torch.float64 else 0) | (K.SCALE_ALWAYS if always else 0)
    _scale(entry, (entry.table, entry.n, entry.nc, coef.data_ptr(), mode, 0.0))
    mark_written(table.tensors, skip=entry.torch_written)  # as torch's mul_, written or not
    for i in entry.torch_written:
        _scale_like_kernel_(table.tensors[i], coef)


def clamp_(table: TensorTable, bound: float) -> None:
    """Clamp every tensor to ``[-bound, bound]`` in place."""
    entry = device_table(table)
    if not _clamp_kernel_loads(entry):
        # is_available loads a norm clip's two kernels only (every CUDA user pays for those);
        # the clamp kernel loads at the first clip_grad_value_, and one that cannot load means
        # torch's ops for this call, as the other two would have meant for the whole backend.
        table.check_torch_writes_all()
        for t in table.tensors:
            _clamp_like_kernel_(t, bound)
        return
    table.check_writable(entry.torch_written)
    _clamp(entry, (entry.table, entry.n, entry.nc, float(bound)))
    mark_written(table.tensors, skip=entry.torch_written)
    for i in entry.torch_written:
        _clamp_like_kernel_(table.tensors[i], bound)


def _clamp_kernel_loads(entry: _DeviceTable) -> bool:
    if K.SIMULATOR or entry.index < 0:
        return True
    try:
        _clamp.prepare(entry.index)
        return True
    except Exception as exc:
        from fastclip._plan import _warn_once

        _warn_once("no_clamp_kernel", f"fastclip: numba-cuda cannot load fastclip's clamp kernel "
                                      f"on this GPU ({exc!r}); clip_grad_value_ runs torch's ops")
        return False


def _clamp_like_kernel_(t: torch.Tensor, bound: float) -> None:
    """Clamp ``t`` in place with torch's ops, with the clamp kernel's results."""
    if t.dtype == torch.float64:
        t.clamp_(min=-bound, max=bound)
        return
    # Like the kernel: compare in float64, store the bound rounded to the dtype, leave the
    # other elements (NaN payloads included) alone. torch's clamp_ in a narrower dtype refuses
    # a bound beyond its range (7e4 for float16, say), and the kernel may have written others.
    # torch.where with a 0-d device tensor never reads it on the host (masked_fill_ may).
    wide = t.double()
    limit = torch.full((), bound, dtype=torch.float64, device=t.device).to(t.dtype)
    t.copy_(torch.where(wide > bound, limit, torch.where(wide < -bound, -limit, t)))


def fused_norm(table: TensorTable, p: float, dtype: torch.dtype) -> torch.Tensor:
    """The norm, rooted and cast to ``dtype`` on the device by the kernel's last block: one
    launch, no torch op besides the result's allocation."""
    entry = device_table(table)
    norm = torch.empty((), dtype=dtype, device=entry.device)
    flags = K.RESULT_F64 if dtype == torch.float64 else 0
    _power_sums(entry, (entry.table, entry.n, entry.nc, norm_kind(p), float(p), entry.scratch,
                        flags, 0.0, 0, norm.data_ptr(), 0, 0, 0))
    return norm


def fused_clip_(table: TensorTable, p: float, max_norm: float, dtype: torch.dtype) -> torch.Tensor:
    """``clip_grad_norm_`` in two launches: kernel 1 writes the norm and torch's coefficient
    (to the table's scratch), kernel 2 reads the coefficient and scales, or returns at once
    when it is 1. Returns the norm (0-d, ``dtype``)."""
    entry = device_table(table, dtype)
    table.check_writable(entry.torch_written)  # torch's _foreach_mul_ refuses those whatever the norm
    norm = torch.empty((), dtype=dtype, device=entry.device)
    is_f64 = dtype == torch.float64
    coef_addr = entry.scratch + 8 * K.SCRATCH_COEF
    _power_sums(entry, (entry.table, entry.n, entry.nc, norm_kind(p), float(p), entry.scratch,
                        K.RESULT_F64 if is_f64 else 0, float(max_norm),
                        0, norm.data_ptr(), coef_addr, 0, 0))
    _scale(entry, (entry.table, entry.n, entry.nc, coef_addr, K.SCALE_F64 if is_f64 else 0, 0.0))
    mark_written(table.tensors, skip=entry.torch_written)
    if entry.torch_written:
        slot = entry.scratch_tensor[K.SCRATCH_COEF:K.SCRATCH_COEF + 1]
        coef = slot.view(torch.float64)[0] if is_f64 else slot.view(torch.float32)[0]
        for i in entry.torch_written:
            _scale_like_kernel_(table.tensors[i], coef)
    return norm


def _inside_a_tensor(table: TensorTable, t: torch.Tensor) -> bool:
    """True when the 0-d ``t``'s bytes overlap the memory of one of ``table``'s tensors."""
    start = t.data_ptr()
    stop = start + t.element_size()
    ends = table.addrs + table.lengths * ITEMSIZE[table.codes]
    return bool(((table.addrs < stop) & (start < ends)).any())


def fused_clip_with_norm_(table: TensorTable, max_norm: float, total_norm: torch.Tensor) -> bool:
    """``clip_grads_with_norm_`` in one launch: the scale kernel computes torch's coefficient
    from ``total_norm`` (read on the device, in its dtype) and ``max_norm``, where the general
    path would first launch torch's four ops on the norm. Returns False, having done nothing,
    when this path does not apply: a norm that is not float32/float64 or lives on another
    device, memory listed twice (torch scales the later listings by the coefficient tensor), or
    a norm inside a grad's memory (every block reads the norm, and the blocks that run after the
    one that scaled it would read the scaled value; torch computes the coefficient first).
    """
    if total_norm.dtype != torch.float32 and total_norm.dtype != torch.float64:
        return False
    entry = device_table(table, total_norm.dtype)
    table.check_writable(entry.torch_written)  # before the kernel: a failing call changes no grad
    if entry.torch_written or total_norm.device != entry.device or type(total_norm) is not torch.Tensor \
            or _inside_a_tensor(table, total_norm):
        return False
    mode = K.SCALE_FROM_NORM | (K.SCALE_F64 if total_norm.dtype == torch.float64 else 0)
    _scale(entry, (entry.table, entry.n, entry.nc, total_norm.data_ptr(), mode, float(max_norm)))
    mark_written(table.tensors)
    return True


__all__ = ["PowerSums", "is_available", "power_sums", "scale_", "clamp_", "fused_norm",
           "fused_clip_", "fused_clip_with_norm_", "device_table", "host_table", "clear_cache",
           "launch_path", "upload_int64"]
