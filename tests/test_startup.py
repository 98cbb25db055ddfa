"""``kernels/startup.py``: cached kernels load without numba's registry set-up, only when every
external symbol they need is known, and numba's own path takes over otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import llvmlite.binding as ll
import pytest
import torch

import fastclip
from fastclip.kernels import cpu, layout, startup


def _cached_library(dispatcher):
    """The library state numba's cache holds for ``dispatcher``'s first signature."""
    cache = dispatcher._cache._cache_file
    data = cache.load(next(iter(cache._load_index())))
    assert data is not None, "the kernel is not in the cache"
    return data[0]


@pytest.fixture(scope="module")
def norm_library():
    params = [torch.nn.Parameter(torch.zeros(10)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn(10)
    fastclip.clip_grad_norm_(params, 1.0)  # loads (or compiles and saves) the serial kernels
    return _cached_library(cpu.chunk_power_sums_serial)


def test_elf_reader_finds_every_symbol_llvm_declares(norm_library):
    name, kind, (object_code, shared_bitcode) = norm_library
    assert kind == "object"
    found = startup._elf_undefined_symbols(object_code)
    if found is None:
        pytest.skip("the cached object code is not ELF64 little-endian on this platform")
    module = ll.parse_bitcode(shared_bitcode)
    declared = {f.name for f in module.functions
                if f.is_declaration and not f.name.startswith("llvm.")}
    assert declared and declared <= set(found)
    # Unboxing the table arrays needs numba's runtime; the kernel defines its own code.
    assert "NRT_adapt_ndarray_from_python" in found
    defined = {f.name for f in module.functions if not f.is_declaration}
    assert not defined & set(found)


def test_elf_reader_refuses_other_formats():
    assert startup._elf_undefined_symbols(b"\xcf\xfa\xed\xfe" + bytes(60)) is None  # Mach-O
    assert startup._elf_undefined_symbols(b"\x7fELF\x01\x01" + bytes(60)) is None  # ELF32
    assert startup._elf_undefined_symbols(b"") is None


def test_an_unknown_symbol_means_numba_loads_it(norm_library, monkeypatch):
    assert startup._externals_known(norm_library)
    name, kind, payload = norm_library
    assert not startup._externals_known((name, "bitcode", payload))
    real = ll.address_of_symbol
    monkeypatch.setattr(ll, "address_of_symbol",
                        lambda s: None if s == "NRT_adapt_ndarray_from_python" else real(s))
    assert not startup._externals_known(norm_library)


def test_only_cached_dispatchers_get_the_lean_load():
    def add_one(x):
        return x + 1

    plain = startup.njit()(add_one)
    assert plain(1) == 2 and "load_overload" not in vars(plain._cache)
    assert "load_overload" in vars(cpu.chunk_power_sums_serial._cache)
    assert "load_overload" in vars(layout._chunk_arrays._cache)


# A fresh process with a warm cache: a clip, then numba's registry set-ups and the result.
_CHILD = textwrap.dedent("""
    import json, sys
    from numba.core.base import BaseContext
    refreshes, refresh = [], BaseContext.refresh
    BaseContext.refresh = lambda self: (refreshes.append(1), refresh(self))[1]
    import torch, fastclip
    from fastclip.kernels import cpu, startup
    if sys.argv[1] == "unknown symbols":
        startup._externals_known = lambda state: False
    w = torch.zeros(3, requires_grad=True); w.grad = torch.tensor([3.0, 4.0, 0.0])
    norm = fastclip.clip_grad_norm_([w], 1.0)
    hits = sum(cpu.chunk_power_sums_serial.stats.cache_hits.values())
    misses = sum(cpu.chunk_power_sums_serial.stats.cache_misses.values())
    report = {"norm": norm.item(), "grad": w.grad.tolist(), "refreshes": len(refreshes),
              "hits": hits, "misses": misses, "registries": "numba.cpython.listobj" in sys.modules}
    # numba still compiles afterwards, registries and all (lists, sorting, numpy).
    import numba, numpy as np
    report["compiled"] = numba.njit(lambda a: sorted(list(a))[0] + np.sum(a))(np.arange(3.0))
    report["refreshes_after_compiling"] = len(refreshes)
    print(json.dumps(report))
""")


@pytest.mark.parametrize("case", ["known symbols", "unknown symbols"])
def test_a_fresh_process_loads_from_the_cache(case, norm_library):
    out = subprocess.run([sys.executable, "-c", _CHILD, case], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    w = torch.zeros(3, requires_grad=True)
    w.grad = torch.tensor([3.0, 4.0, 0.0])
    assert report["norm"] == torch.nn.utils.clip_grad_norm_([w], 1.0).item() == 5.0
    assert report["grad"] == w.grad.tolist()
    assert (report["hits"], report["misses"]) == (1, 0)  # from the cache either way
    assert report["compiled"] == 3.0 and report["refreshes_after_compiling"] > report["refreshes"]
    if case == "known symbols":
        assert report["refreshes"] == 0 and not report["registries"]
    else:  # numba's own load, registry set-up included
        assert report["refreshes"] >= 1 and report["registries"]


def test_without_a_writable_cache_directory_fastclip_imports_warns_and_clips(tmp_path):
    """A read-only install under a user with no writable home: numba finds no directory to cache
    in and raises at the decoration of every cache=True function, so ``import fastclip`` failed.
    Here numba is given one cache locator that never finds a directory (what numba sees there,
    through its NUMBA_CACHE_LOCATOR_CLASSES): fastclip compiles uncached, and says so."""
    (tmp_path / "no_cache_dir.py").write_text(textwrap.dedent("""
        class NoDirectory:
            @classmethod
            def from_function(cls, py_func, py_file):
                return None
    """))
    code = textwrap.dedent("""
        import json, warnings
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            import torch, fastclip
        from fastclip.kernels import startup
        p = torch.zeros(3, requires_grad=True); p.grad = torch.tensor([3.0, 4.0, 0.0])
        norm = fastclip.clip_grad_norm_([p], 1.0)
        print(json.dumps([startup.CACHE, float(norm), p.grad.tolist(),
                          any("NUMBA_CACHE_DIR" in str(w.message) for w in seen)]))
    """)
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "no_cache_dir.NoDirectory",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    cache, norm, grad, warned = json.loads(run.stdout.splitlines()[-1])
    assert cache is False and norm == 5.0 and warned
    expected = torch.nn.Parameter(torch.zeros(3))
    expected.grad = torch.tensor([3.0, 4.0, 0.0])
    torch.nn.utils.clip_grad_norm_([expected], 1.0)
    assert grad == expected.grad.tolist()
    assert startup.CACHE  # this process: numba caches here
