"""Every docstring example (the package's, the ``Example:`` sections of the public API, the kernels'
helpers and the benchmark tools) runs here as a test, so the examples in the docs cannot drift from
the code. Lines marked ``+SKIP`` (a GPU, a whole benchmark run) are shown, not run.

Modules are imported under their installed names (``fastclip.kernels.layout``, never a top-level
``kernels``: numba's cache records the module name), which is why this is a test module rather
than ``pytest --doctest-modules``.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import fastclip
import fastclip.kernels


def _modules() -> list[str]:
    names = ["fastclip"] + [m.name for m in pkgutil.walk_packages(fastclip.__path__, "fastclip.")]
    names += [m.name for m in pkgutil.walk_packages(fastclip.kernels.__path__, "fastclip.kernels.")]
    return sorted(n for n in set(names) if not n.endswith("__main__"))  # __main__ runs the CLI


MODULES = _modules()


# The CUDA modules import numba-cuda (the [cuda] extra).
NEEDS_NUMBA_CUDA = {"fastclip._cuda", "fastclip.kernels.cuda", "fastclip.kernels.agc_cuda"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name in NEEDS_NUMBA_CUDA:
        pytest.importorskip("numba_cuda")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_examples_are_found():
    # Negative control: the walk reaches the kernels' package and the public API's examples.
    assert "fastclip.kernels.layout" in MODULES and "fastclip.clip_grad" in MODULES
    found = sum(len(t.examples) for name in ("fastclip.clip_grad", "fastclip.kernels.layout")
                for t in doctest.DocTestFinder().find(importlib.import_module(name)))
    assert found >= 5
