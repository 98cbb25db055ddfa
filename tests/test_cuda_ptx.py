"""The real CUDA kernels compile to PTX for compute capability 9.0, with no GPU needed.

numba-cuda compiles through libNVVM (from a CUDA toolkit; the nvidia-cuda-nvrtc wheel of the
``cuda`` extra does not hold it), so
a kernel that no longer compiles fails CI here rather than on the first GPU that runs it. The
PTX is also checked for the instructions the design relies on, and assembled with ``ptxas``
when the toolkit has it.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import types

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                                reason="the simulator has no PTX compiler")

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed")
from numba import cuda  # noqa: E402
CC = (9, 0)


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    """Every kernel of ``fastclip.kernels.cuda`` and ``fastclip.kernels.agc_cuda``, compiled
    once: {name: PTX text}."""
    from numba.cuda.cudadrv.error import NvvmSupportError

    import numba.cuda.dispatcher as dispatcher
    from fastclip.kernels import agc_cuda as A
    from fastclip.kernels import cuda as K

    sources = {name: (kernel.py_func, sig) for name, (kernel, sig) in K.KERNELS.items()}
    sources.update({name: (A.PY_FUNCS[name], sig) for name, sig in A.SIGNATURES.items()})
    original = dispatcher.get_current_device
    if not cuda.is_available():
        # numba-cuda types a kernel's device functions for "the current device", even when
        # compile_ptx is given a target: without a GPU, say it is a cc 9.0 one.
        dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=CC)
    try:
        out = {}
        for name, (function, sig) in sources.items():
            try:
                text, _ = cuda.compile_ptx(function, sig, cc=CC)
            except NvvmSupportError as e:
                pytest.skip(f"libNVVM is not available ({e}): install a CUDA toolkit, and "
                            "fastclip's `cuda` extra")
            out[name] = text
        return out
    finally:
        dispatcher.get_current_device = original


def test_every_kernel_compiles_for_sm_90(ptx):
    from fastclip.kernels import agc_cuda as A
    from fastclip.kernels import cuda as K

    assert set(ptx) == set(K.KERNELS) | set(A.SIGNATURES)
    for name, text in ptx.items():
        assert ".target sm_90" in text
        assert re.search(r"\.entry\s+\S*" + name, text), f"no entry point for {name}"


def test_power_sums_kernel_has_the_last_block_finalize(ptx):
    text = ptx["power_sums_kernel"]
    assert re.search(r"atom(\.global)?\.add\.u64", text)  # the tickets
    assert "membar.gl" in text or "fence.sc.gpu" in text or "fence.acq_rel.gpu" in text  # threadfence
    assert "bar.sync" in text  # block trees
    assert "sqrt.rn.f64" in text  # correctly rounded, like torch's sqrt
    assert "ld.global.cg.f64" in text  # the last block reads other blocks' partials past L1
    # The coefficient's reciprocal is correctly rounded (torch's 1 / x), never approximate.
    assert "rcp.rn.f32" in text or "div.rn.f32" in text
    assert "div.approx.f32" not in text and "rcp.approx.f32" not in text and ".ftz.f32" not in text


@pytest.mark.parametrize("name, instructions", [
    ("power_sums_kernel", ["ld.global.v4.f32", "ld.global.v4.u32", "ld.global.v2.f64"]),
    ("scale_kernel", ["ld.global.v4.f32", "ld.global.v4.u32", "ld.global.v2.f64",
                      "st.global.v4.f32", "st.global.v4.u32", "st.global.v2.f64"]),
    ("clamp_kernel", ["ld.global.v4.f32", "ld.global.v4.u32", "ld.global.v2.f64",
                      "st.global.v4.f32", "st.global.v4.u32", "st.global.v2.f64"]),
])
def test_bulk_passes_move_16_bytes_per_instruction(ptx, name, instructions):
    """The norm pass, the scale and the clamp read (and write) grads in 16-byte vector accesses for every
    dtype (v4 of float32, v4 of 32-bit words holding two 16-bit values, v2 of float64): issue 3's
    bandwidth target counts on it, and a scalar fallback would still pass every other test."""
    text = ptx[name]
    missing = [i for i in instructions if i not in text]
    assert not missing, f"{name} has no {missing}"


def test_clamp_kernel_keeps_nans(ptx):
    """PTX's float min and max return the other operand when one is NaN: a clamp built on them
    would turn a NaN grad into the bound, where torch's clamp (and the simulator, whose Python
    min/max keep the NaN) leave it NaN. The clamp compares and selects instead."""
    found = re.findall(r"\b(?:min|max)(?:\.\w+)*\.f(?:16|32|64)\b", ptx["clamp_kernel"])
    assert not found, found


def test_scale_kernel_rounds_16_bit_results_to_nearest_even(ptx):
    text = ptx["scale_kernel"]
    assert "cvt.rn.f16.f32" in text  # fp16 encode (bf16 is encoded with integer ops)
    assert "cvt.f32.f16" in text
    assert ".ftz" not in text  # subnormal grads are scaled, not flushed


def _ptxas():
    found = shutil.which("ptxas")
    if found:
        return found
    for path in sorted(glob.glob("/usr/local/cuda*/bin/ptxas"), reverse=True):
        return path
    return None


@pytest.fixture(scope="module")
def assembled(ptx, tmp_path_factory):
    """``ptxas -arch=sm_90 -v`` on every kernel: {name: (return code, stderr)}."""
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas (CUDA toolkit) not found; the PTX compile above still ran")
    tmp_path = tmp_path_factory.mktemp("ptxas")
    out = {}
    for name, text in ptx.items():
        src = tmp_path / f"{name}.ptx"
        src.write_text(text)
        proc = subprocess.run([ptxas, "-arch=sm_90", "-v", str(src), "-o", str(tmp_path / f"{name}.cubin")],
                              capture_output=True, text=True, timeout=300)
        out[name] = (proc.returncode, proc.stderr)
    return out


def test_ptx_assembles_for_sm_90(assembled):
    for name, (returncode, stderr) in assembled.items():
        assert returncode == 0, f"ptxas rejected {name}:\n{stderr[-3000:]}"


def kernel_resources(ptxas_log: str) -> dict:
    """Registers per thread, static shared bytes and spill bytes from ``ptxas -v``'s report."""
    registers = re.search(r"Used (\d+) registers", ptxas_log)
    smem = re.search(r"(\d+) bytes smem", ptxas_log)
    spills = [int(a) + int(b) for a, b in
              re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)]
    return {"registers": int(registers.group(1)) if registers else None,
            "smem": int(smem.group(1)) if smem else 0, "spill_bytes": sum(spills)}


def test_resource_report_parsing():
    log = ("ptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 70 registers, used 1 barriers, 4104 bytes smem, 380 bytes cmem[0]\n")
    assert kernel_resources(log) == {"registers": 70, "smem": 4104, "spill_bytes": 8}


def test_every_kernel_can_launch_its_block_on_sm_90_without_spilling(assembled):
    """A kernel that needs more registers than an SM gives one block fails every launch on the
    GPU ("too many resources requested for launch"); catch it here. Spills (local-memory traffic
    in the streaming loops) would cost bandwidth: none today, so any is a regression to look at."""
    from fastclip.kernels import agc_cuda as A
    from fastclip.kernels import cuda as K

    block = {name: K.THREADS for name in K.KERNELS}
    block.update({name: A.BLOCK for name in A.SIGNATURES})
    for name, (returncode, stderr) in assembled.items():
        assert returncode == 0, f"ptxas rejected {name}"
        used = kernel_resources(stderr)
        assert used["registers"] is not None, f"no register report for {name}:\n{stderr}"
        # sm_90: 64K 32-bit registers per block and per SM, allocated in units of 256 per warp.
        per_warp = -(-used["registers"] * 32 // 256) * 256
        assert per_warp * (block[name] // 32) <= 65536, f"{name}: {used} for {block[name]} threads"
        assert used["smem"] <= 48 * 1024, f"{name}: {used}"
        assert used["spill_bytes"] == 0, f"{name} spills: {used}"


_WITHOUT_ROW_STACK = """
import json, types
import numpy as np
if hasattr(np, "row_stack"):  # as in NumPy >= 2.5
    delattr(np, "row_stack")
    np.__all__ = [name for name in np.__all__ if name != "row_stack"]
from numba import cuda
import numba.cuda.dispatcher as dispatcher
from fastclip.kernels import cuda as K
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
kernel, sig = K.KERNELS["scale_kernel"]
text, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
print(json.dumps({"entry": ".entry" in text, "row_stack_left": hasattr(np, "row_stack")}))
"""


def test_kernels_compile_under_numpy_without_row_stack():
    """numba-cuda 0.30 overloads np.row_stack, which NumPy 2.5 removed (NVIDIA/numba-cuda#907,
    not to be fixed): without fastclip's stand-in, its registries fail to load and no kernel
    compiles. This NumPy still has row_stack, so the child removes it first."""
    import json
    import sys

    out = subprocess.run([sys.executable, "-c", _WITHOUT_ROW_STACK], capture_output=True,
                         text=True, timeout=300)
    if "libNVVM" in out.stderr or "NvvmSupportError" in out.stderr:
        pytest.skip("libNVVM is not available")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"entry": True, "row_stack_left": False}


def test_every_kernel_is_disk_cached_on_a_gpu():
    """numba-cuda caches a kernel on disk only when it is made with ``cache=True``: the AGC
    kernels once were not, so every process compiled them again (~2.4 s here) and ``warmup()``
    in an image could not spare it."""
    from fastclip.kernels import agc_cuda as A
    from fastclip.kernels import cuda as K

    if not K.CACHE:
        pytest.skip("numba cannot cache on this machine")
    kernels = {name: kernel for name, (kernel, _) in K.KERNELS.items()}
    kernels.update({name: getattr(A, name) for name in A.SIGNATURES})
    uncached = [name for name, kernel in kernels.items()
                if type(kernel._cache).__name__ == "NullCache"]
    assert uncached == []
