"""Drop-in patching: make torch's own clipping functions call fastclip.

Trainers look the clipping function up on ``torch.nn.utils`` at call time (Lightning's precision
plugins, ``accelerate.Accelerator.clip_grad_norm_``, and through it the Transformers ``Trainer``),
so replacing the module attributes is enough for them to use fastclip without code changes.

What is replaced, and what is not:

* ``torch.nn.utils``: ``clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm``,
  ``clip_grads_with_norm_`` (the public names).
* ``torch.nn.utils.clip_grad``: ``clip_grad_norm_`` and ``clip_grad_value_``. Its deprecated
  ``clip_grad_norm`` looks ``clip_grad_norm_`` up in that module at call time, so it follows.
* Not torch's private ``torch.nn.utils.clip_grad._get_total_norm`` / ``_clip_grads_with_norm_``
  (the objects that ``torch.nn.utils`` exports as ``get_total_norm`` / ``clip_grads_with_norm_``).
  Their only caller is torch's own ``clip_grad_norm_``, which after patching is reached only
  through fastclip's fallback for inputs it has no kernel for: patching them would make that
  fallback call back into fastclip.

Names bound before patching (``from torch.nn.utils import clip_grad_norm_`` at import time) keep
torch's function: call ``fastclip.patch()`` before importing such code.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from types import ModuleType
from typing import Dict, Iterator, Optional, Tuple

import torch.nn.utils as _utils
import torch.nn.utils.clip_grad as _clip_grad

from fastclip import clip_grad as _fc

# (module, attribute) -> fastclip's replacement.
_REPLACEMENTS: Tuple[Tuple[ModuleType, str, object], ...] = (
    (_utils, "clip_grad_norm_", _fc.clip_grad_norm_),
    (_utils, "clip_grad_value_", _fc.clip_grad_value_),
    (_utils, "get_total_norm", _fc.get_total_norm),
    (_utils, "clip_grads_with_norm_", _fc.clip_grads_with_norm_),
    (_clip_grad, "clip_grad_norm_", _fc.clip_grad_norm_),
    (_clip_grad, "clip_grad_value_", _fc.clip_grad_value_),
)

# fastclip's fallbacks, which must stay torch's own code (see the module docstring).
_FALLBACK_NAMES = (
    "TORCH_CLIP_GRAD_NORM",
    "TORCH_CLIP_GRAD_VALUE",
    "TORCH_GET_TOTAL_NORM",
    "TORCH_CLIP_GRADS_WITH_NORM",
)

_lock = threading.RLock()
# The objects replaced by ``patch()``, keyed by (module name, attribute); None when not patched.
_originals: Optional[Dict[Tuple[str, str], object]] = None
# Open ``patched()`` blocks (any thread), and whether the first of them made the patch.
_blocks = 0
_blocks_patched = False


def _check_fallbacks() -> None:
    ours = {id(f) for _, _, f in _REPLACEMENTS}
    for name in _FALLBACK_NAMES:
        fallback = getattr(_fc, name)
        if id(fallback) in ours or getattr(fallback, "__module__", "").startswith("fastclip"):
            raise RuntimeError(
                f"`fastclip.patch`: fastclip's fallback `{name}` is {fallback!r}, not torch's "
                "function (was `fastclip.clip_grad` reloaded while torch was patched?); patching "
                "now would make the fallback call fastclip. Restart the interpreter.")


def is_patched() -> bool:
    """Whether ``patch()`` is in effect.

    Returns:
        True between ``patch()`` and ``unpatch()`` (or inside ``patched()``).
    """
    return _originals is not None


def patch() -> None:
    """Replace torch's clipping functions with fastclip's, process-wide.

    Replaces ``clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm`` and
    ``clip_grads_with_norm_`` in ``torch.nn.utils`` and ``clip_grad_norm_`` and
    ``clip_grad_value_`` in ``torch.nn.utils.clip_grad``. Calling it again while patched does
    nothing; ``unpatch()`` restores the exact objects that were there before the first call.

    Raises:
        RuntimeError: fastclip's torch fallbacks are not torch's functions, so patching could
            make fastclip call itself.

    Example:
        >>> import torch, fastclip
        >>> fastclip.patch()
        >>> torch.nn.utils.clip_grad_norm_ is fastclip.clip_grad_norm_
        True
        >>> fastclip.unpatch()
    """
    global _originals
    with _lock:
        if _originals is not None:
            return
        _check_fallbacks()
        saved = {}
        for module, name, _ in _REPLACEMENTS:
            if not hasattr(module, name):
                raise RuntimeError(
                    f"`fastclip.patch`: `{module.__name__}.{name}` does not exist in this torch; "
                    "fastclip needs torch >= 2.6")
            saved[(module.__name__, name)] = getattr(module, name)
        for module, name, replacement in _REPLACEMENTS:
            setattr(module, name, replacement)
        _originals = saved


def unpatch() -> None:
    """Restore the objects that ``patch()`` replaced; does nothing when not patched.

    A name that no longer holds fastclip's function (someone wrapped or replaced it after
    ``patch()``) is left as it is, with a warning: restoring torch's would discard their object.

    Example:
        >>> import torch, fastclip
        >>> original = torch.nn.utils.clip_grad_norm_
        >>> fastclip.patch(); fastclip.unpatch()
        >>> torch.nn.utils.clip_grad_norm_ is original
        True
    """
    global _originals
    with _lock:
        if _originals is None:
            return
        for module, name, replacement in _REPLACEMENTS:
            if getattr(module, name) is replacement:
                setattr(module, name, _originals[(module.__name__, name)])
            else:
                warnings.warn(f"fastclip.unpatch: `{module.__name__}.{name}` was replaced after "
                              f"fastclip.patch() (it is {getattr(module, name)!r}); left as it is",
                              RuntimeWarning, stacklevel=2)
        _originals = None


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """Context manager (or decorator): torch's clipping functions are fastclip's inside it.

    torch stays patched while any block is open, in any thread, and when the last open block
    exits (even through an exception) the state found by the first is restored: blocks that
    overlap (nested, in other threads, or exited out of order) never unpatch one another, and a
    block entered while ``patch()`` is in effect leaves it in effect.

    Example:
        >>> import torch, fastclip
        >>> with fastclip.patched():
        ...     torch.nn.utils.clip_grad_norm_ is fastclip.clip_grad_norm_
        True
        >>> torch.nn.utils.clip_grad_norm_ is fastclip.clip_grad_norm_
        False
    """
    global _blocks, _blocks_patched
    with _lock:
        if _blocks == 0:
            _blocks_patched = not is_patched()
        patch()
        _blocks += 1
    try:
        yield
    finally:
        with _lock:
            _blocks -= 1
            if _blocks == 0 and _blocks_patched:
                unpatch()
