"""fastclip's public entry points: grad mode off, and a graph break under ``torch.compile``.

Every public call runs with autograd off, as under ``torch.no_grad()``. The wrapper here switches
the mode itself: the ``torch.no_grad()`` decorator costs ~5 us per call (a context object made and
entered each time), a tenth of the host budget of a CUDA clip.

Dynamo cannot trace into fastclip: it would try to trace numba's dispatcher (and crashed doing
so in torch 2.13: "exception table entry start instruction has no offset"). While Dynamo traces,
each public call therefore goes through ``torch.compiler.disable``: a graph break, then the
ordinary eager call, with the same results bit for bit. The graphs before and after it are still
compiled; only ``fullgraph=True`` is refused.

The disabled wrapper is made at the first compiled call (itself a graph break) and kept, never at
import: ``torch.compiler.disable`` imports ``torch._dynamo`` (~2 s here), which an eager user must
not pay. Outside compilation the cost is one flag read (``torch.compiler.is_compiling``, ~0.15 us).

Each public function gets a wrapper with a code object of its own. Dynamo keys its caches and
guards on code objects: with one shared wrapper code (and, at the time, every wrapped function a
``torch.no_grad()`` wrapper, one shared code too), a graph compiled around one fastclip function
was reused for another (``clip_grad_value_`` ran ``clip_grad_norm_``), and all of them shared one
recompile budget.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Optional, TypeVar, cast

import torch

F = TypeVar("F", bound=Callable)

_DISABLED: dict = {}  # fn -> torch.compiler.disable(fn)

# torch.compiler.disable takes `reason` from torch 2.8; fastclip supports 2.6.
_TAKES_REASON = "reason" in inspect.signature(torch.compiler.disable).parameters

# Dynamo's eval-frame callback: set while a compiled function runs (also in a frame Dynamo gave up
# on and runs eagerly), None or False outside one. Read only from torch 2.13: older getters return
# a borrowed reference (each read drops one; torch 2.6.0 aborts with "deallocating None"), and
# torch 2.14 is the first seen to give up on the wrapper below (a generator argument).
# (torch.__version__ is a TorchVersion: it compares as a version, not as a string.)
_dynamo_callback: Optional[Callable[[], object]] = None
if torch.__version__ >= "2.13":
    try:
        from torch._C._dynamo.eval_frame import get_eval_frame_callback as _dynamo_callback
    except ImportError:  # moved in a later torch: is_compiling() alone, as before torch 2.14
        pass

_REASON = ("fastclip runs its Numba kernels outside the graph: call {name} outside the compiled "
           "function, or compile without fullgraph=True")


def _disabled(fn: Callable, reason: str) -> Callable:
    wrapper = _DISABLED.get(fn)
    if wrapper is None:
        kwargs = {"reason": reason} if _TAKES_REASON else {}
        wrapper = _DISABLED[fn] = torch.compiler.disable(fn, **kwargs)
    return wrapper


def _own_code(function: Callable, name: str, qualname: str) -> types.FunctionType:
    """A copy of ``function`` (a plain function) whose code object is its own (see the module
    docstring)."""
    function = cast(types.FunctionType, function)
    changes: dict[str, Any] = {"co_name": name}
    if hasattr(function.__code__, "co_qualname"):  # Python >= 3.11
        changes["co_qualname"] = qualname
    return types.FunctionType(function.__code__.replace(**changes), function.__globals__, name,
                              function.__defaults__, function.__closure__)


def entry_point(fn: F) -> F:
    """Make ``fn`` a public entry point: it runs with grad mode off (restored afterwards, also
    on an exception), and under ``torch.compile`` at a graph break, eagerly."""
    reason = _REASON.format(name=f"fastclip.{fn.__qualname__}")
    # The graph-break path keeps torch's own no_grad wrapper, made once here rather than while
    # Dynamo traces.
    fn_no_grad = torch.no_grad()(fn)
    grad_enabled = torch.is_grad_enabled
    set_grad_enabled = torch._C._set_grad_enabled

    def call(*args, **kwargs):
        # Looked up at each call: bound once in the closure, Dynamo missed it on a resumed frame
        # (unscale_and_clip_ after a graph break) and traced into fastclip.
        # A callback while not tracing: Dynamo gave up on this frame (torch 2.14 does when an
        # argument is a generator it cannot rebuild at the graph break) and runs it eagerly, but
        # would still trace every frame the eager call makes, numba's arguments included.
        if torch.compiler.is_compiling() or (
                _dynamo_callback is not None and _dynamo_callback() not in (None, False)):
            return _disabled(fn_no_grad, reason)(*args, **kwargs)
        # Restored whatever it was: user code run by the call (an optimizer step, a generator)
        # may switch grad mode and leave it switched.
        previous = grad_enabled()
        set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        except SystemError as exc:
            # A signal handler's exception (Ctrl-C's KeyboardInterrupt) raised while numba turns a
            # compiled function's results into Python objects surfaces as "returned a result with
            # an exception set"; the caller's `except KeyboardInterrupt` must see it as it is.
            # It may come wrapped more than once.
            cause: BaseException = exc
            while isinstance(cause, SystemError) and cause.__cause__ is not None \
                    and "with an exception set" in str(cause):
                cause = cause.__cause__
            if cause is exc:
                raise
            raise cause
        finally:
            set_grad_enabled(previous)

    wrapper = _own_code(call, fn.__name__, fn.__qualname__)
    return functools.wraps(fn)(wrapper)  # type: ignore[return-value]


__all__ = ["entry_point"]
