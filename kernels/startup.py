"""Make numba's first call cheaper.

numba's first dispatch, even from the on-disk cache, imports ``numba.np.arraymath``, whose
module-level ``_check_blas()`` imports ``scipy.linalg`` just to learn whether BLAS is there
(0.6 s of a 0.8 s first call on a 2-core CI machine). None of fastclip's kernels use BLAS. So
when scipy is installed but not yet imported, ``defer_blas_check`` imports ``arraymath`` with
that check answered "yes" without importing scipy. numba still calls ``ensure_blas()`` when it
compiles a function that does use BLAS (np.dot, linalg), which imports scipy then: the import
is deferred, not skipped. Anything unexpected leaves numba alone.
"""

from __future__ import annotations

import importlib.util
import sys


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
