"""Make numba's first call cheaper.

Two costs of numba's first dispatch in a process, when the kernels are already in the on-disk
cache:

- **Registry set-up** (``njit``). Before numba loads any cached function it refreshes its CPU
  target: it imports ~25 implementation modules and builds thousands of typing and lowering
  templates (~0.2 s on the 2-core CI machine), all of which only compiling needs. fastclip's
  kernels load without it: the only set-up cached machine code links against is numba's
  runtime (NRT) and, for threaded kernels, the thread pool, which the cache entry starts
  itself. A kernel is loaded that way only when every external symbol it declares is already
  known to LLVM; otherwise, and on a cache miss or anything unexpected, numba's own path runs.
- **BLAS probe** (``defer_blas_check``). numba's ``numba.np.arraymath`` imports
  ``scipy.linalg`` at import time just to learn whether BLAS is there (0.6 s of a 0.8 s first
  call). None of fastclip's kernels use BLAS, so before numba's registry set-up runs on
  fastclip's behalf, ``arraymath`` is imported with that check answered "yes" without
  importing scipy. numba still calls ``ensure_blas()`` when it compiles a function that does
  use BLAS (np.dot, linalg), which imports scipy then: the import is deferred, not skipped.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
import warnings

import numba


def _numba_can_cache() -> bool:
    """Whether numba finds a directory to cache this installation's functions in: the package's
    own ``__pycache__``, ``NUMBA_CACHE_DIR`` or ``~/.cache/numba``, each only if writable.

    Where none is (a read-only install under a user without a writable home), numba raises at
    the decoration of every ``cache=True`` function, so the import itself would fail.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    pycache = os.path.join(here, "__pycache__")
    if "NUMBA_CACHE_LOCATOR_CLASSES" not in os.environ and os.access(
            pycache if os.path.isdir(pycache) else here, os.W_OK):
        return True  # numba's in-tree locator takes it: no probe (its first njit costs ~6 ms)

    def probe():  # never called: decorating it runs numba's search for a cache directory
        return 0

    try:
        numba.njit(cache=True)(probe)
    except RuntimeError:
        return False
    return True


# ``cache=`` for every kernel of this package (CPU and CUDA).
CACHE = _numba_can_cache()
if not CACHE:
    warnings.warn("fastclip: numba has no writable directory to cache the kernels in (this "
                  "installation is read-only, and so is ~/.cache); they compile in every process "
                  "(seconds). Set NUMBA_CACHE_DIR to a writable directory.", RuntimeWarning,
                  stacklevel=2)


def defer_blas_check() -> bool:
    """Import ``numba.np.arraymath`` without its eager scipy import; True if it did."""
    if "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        return False
    try:
        if importlib.util.find_spec("scipy") is None:
            return False  # numba's own check fails fast without scipy
        import numba.np.linalg as linalg
    except Exception:  # pragma: no cover - a numba without this layout
        return False
    ensure_blas = getattr(linalg, "ensure_blas", None)
    if ensure_blas is None:  # pragma: no cover
        return False
    linalg.ensure_blas = lambda: None
    try:
        import numba.np.arraymath  # noqa: F401
    except Exception:  # pragma: no cover
        return False
    finally:
        linalg.ensure_blas = ensure_blas
    return True


def njit(**options):
    """``numba.njit`` whose loads from the on-disk cache skip numba's registry set-up.

    Same options and result as ``numba.njit(**options)``: a numba dispatcher. With
    ``cache=True`` its cache loads first try ``_load_linked`` and fall back to numba's own
    ``load_overload`` (after ``defer_blas_check``) when that finds nothing.
    """
    if options.get("cache") and not CACHE:
        options = {**options, "cache": False}
    decorate = numba.njit(**options)

    def wrap(py_func):
        dispatcher = decorate(py_func)
        cache = getattr(dispatcher, "_cache", None)
        if options.get("cache") and cache is not None and all(
            hasattr(cache, name)
            for name in ("load_overload", "_enabled", "_index_key", "_cache_file", "_impl")
        ):
            cache.load_overload = _lean_load(cache, cache.load_overload)
        return dispatcher

    return wrap


def _lean_load(cache, numba_load):
    def load_overload(sig, target_context):
        try:
            cres = _load_linked(cache, sig, target_context)
        except Exception:
            cres = None  # numba's path below reports real errors
        if cres is None:
            defer_blas_check()
            cres = numba_load(sig, target_context)
        return cres

    return load_overload


def _load_linked(cache, sig, target_context):
    """Numba's ``Cache._load_overload`` minus the refresh, or None if it cannot be used."""
    if not cache._enabled:
        return None
    from numba.core.runtime import rtsys

    rtsys.initialize(target_context)  # registers NRT's symbols; idempotent
    data = cache._cache_file.load(cache._index_key(sig, target_context.codegen()))
    if data is None or not _externals_known(data[0]):
        return None
    return cache._impl.rebuild(target_context, data)


def _externals_known(library_state) -> bool:
    """True if every external symbol the cached library needs resolves already."""
    import llvmlite.binding as ll

    _name, kind, payload = library_state
    if kind != "object":
        return False
    object_code, shared_bitcode = payload
    names = _elf_undefined_symbols(object_code)
    if names is None:  # not ELF: ask LLVM (up to 6 ms per kernel)
        module = ll.parse_bitcode(shared_bitcode)
        names = [v.name for v in (*module.functions, *module.global_variables) if v.is_declaration]
    return all(
        name.startswith("llvm.") or ll.address_of_symbol(name) is not None for name in names
    )


def _elf_undefined_symbols(object_code: bytes):
    """Names of the undefined symbols in a little-endian ELF64 relocatable object, else None.

    Reading the symbol table directly costs under 0.1 ms per kernel, where parsing the
    library's bitcode with LLVM costs up to 6 ms.
    """
    if object_code[:6] != b"\x7fELF\x02\x01":  # ELF, 64-bit, little-endian
        return None
    section_offset, = struct.unpack_from("<Q", object_code, 0x28)
    entry_size, count = struct.unpack_from("<HH", object_code, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", object_code, section_offset + i * entry_size)
        for i in range(count)
    ]
    names = []
    for _, kind, _, _, offset, size, link, _, _, symbol_size in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strings_offset = sections[link][4]
        for at in range(offset + symbol_size, offset + size, symbol_size):  # entry 0 is null
            name_at, _, _, section_index, _, _ = struct.unpack_from("<IBBHQQ", object_code, at)
            if section_index == 0 and name_at:  # SHN_UNDEF
                end = object_code.index(b"\0", strings_offset + name_at)
                names.append(object_code[strings_offset + name_at:end].decode())
    return names
