"""fastclip's public calls inside ``torch.compile``: run eagerly, at a graph break.

Dynamo cannot trace into fastclip: it would try to trace numba's dispatcher (and crashed doing
so in torch 2.13: "exception table entry start instruction has no offset"). While Dynamo traces,
each public call therefore goes through ``torch.compiler.disable``: a graph break, then the
ordinary eager call, with the same results bit for bit. The graphs before and after it are still
compiled; only ``fullgraph=True`` is refused (the break is the reason given).

The disabled wrapper is made at the first compiled call (itself a graph break) and kept, never at
import: ``torch.compiler.disable`` imports ``torch._dynamo`` (~2 s here), which an eager user must
not pay. Outside compilation the cost is one flag read (``torch.compiler.is_compiling``, ~0.15 us).
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)

_DISABLED: dict = {}  # fn -> torch.compiler.disable(fn)

_REASON = ("fastclip runs its Numba kernels outside the graph: call {name} outside the compiled "
           "function, or compile without fullgraph=True")


def eager_under_compile(fn: F) -> F:
    """Make ``fn`` a graph break under ``torch.compile``, run eagerly; a plain call otherwise."""
    reason = _REASON.format(name=f"fastclip.{fn.__qualname__}")

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            disabled = _DISABLED.get(fn)
            if disabled is None:
                disabled = _DISABLED[fn] = torch.compiler.disable(fn, reason=reason)
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return call  # type: ignore[return-value]


__all__ = ["eager_under_compile"]
