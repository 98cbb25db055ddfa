"""fastclip's public calls inside ``torch.compile``: run eagerly, at a graph break.

Dynamo cannot trace into fastclip: it would try to trace numba's dispatcher (and crashed doing
so in torch 2.13: "exception table entry start instruction has no offset"). While Dynamo traces,
each public call therefore goes through ``torch.compiler.disable``: a graph break, then the
ordinary eager call, with the same results bit for bit. The graphs before and after it are still
compiled; only ``fullgraph=True`` is refused.

The disabled wrapper is made at the first compiled call (itself a graph break) and kept, never at
import: ``torch.compiler.disable`` imports ``torch._dynamo`` (~2 s here), which an eager user must
not pay. Outside compilation the cost is one flag read (``torch.compiler.is_compiling``, ~0.15 us).

Each public function gets a wrapper with a code object of its own. Dynamo keys its caches and
guards on code objects: with one shared wrapper code, and every wrapped function a
``torch.no_grad()`` wrapper (one shared code too), a graph compiled around one fastclip function
was reused for another (``clip_grad_value_`` ran ``clip_grad_norm_``), and all of them shared one
recompile budget.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)

_DISABLED: dict = {}  # fn -> torch.compiler.disable(fn)

# torch.compiler.disable takes `reason` from torch 2.8; fastclip supports 2.6.
_TAKES_REASON = "reason" in inspect.signature(torch.compiler.disable).parameters

_REASON = ("fastclip runs its Numba kernels outside the graph: call {name} outside the compiled "
           "function, or compile without fullgraph=True")


def _disabled(fn: Callable, reason: str) -> Callable:
    wrapper = _DISABLED.get(fn)
    if wrapper is None:
        kwargs = {"reason": reason} if _TAKES_REASON else {}
        wrapper = _DISABLED[fn] = torch.compiler.disable(fn, **kwargs)
    return wrapper


def _own_code(function: types.FunctionType, name: str, qualname: str) -> types.FunctionType:
    """A copy of ``function`` whose code object is its own (see the module docstring)."""
    changes = {"co_name": name}
    if hasattr(function.__code__, "co_qualname"):  # Python >= 3.11
        changes["co_qualname"] = qualname
    return types.FunctionType(function.__code__.replace(**changes), function.__globals__, name,
                              function.__defaults__, function.__closure__)


def eager_under_compile(fn: F) -> F:
    """Make ``fn`` a graph break under ``torch.compile``, run eagerly; a plain call otherwise."""
    reason = _REASON.format(name=f"fastclip.{fn.__qualname__}")

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return _disabled(fn, reason)(*args, **kwargs)
        return fn(*args, **kwargs)

    wrapper = _own_code(call, fn.__name__, fn.__qualname__)
    return functools.wraps(fn)(wrapper)  # type: ignore[return-value]


__all__ = ["eager_under_compile"]
