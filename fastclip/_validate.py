"""Argument checks. Every check runs before any kernel, so a failed call changes no gradient.

Messages name the function, the argument in backticks, what was expected and what was received.
"""

from __future__ import annotations

import math
import numbers
import types
import warnings
from collections import abc
from typing import Iterable, Union

import numpy as np
import torch

from fastclip._table import expanded_view_error, is_expanded

TensorOrTensors = Union[torch.Tensor, Iterable[torch.Tensor]]
# A number argument as fastclip reads it (``float(value)``, as torch does): a Python number, a
# one-element tensor, a one-element numpy array, or a numpy scalar.
Scalar = Union[float, torch.Tensor, np.ndarray, np.number]
NormType = Union[float, str, torch.Tensor, np.ndarray, np.number]

_SUPPORTED_NORM_WORDS = ("inf", "+inf", "infinity", "+infinity")


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} of type {type(value).__name__}"


def _one_number(value: object) -> object:
    """A one-element real numpy array as the Python number torch's ``float(value)`` would
    read; anything else unchanged."""
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "fiu":
        return value.item()
    return value


def as_float(value: object, fn: str, arg: str) -> float:
    """``float(value)``, as torch reads the argument; an integer beyond float64's range raises an
    OverflowError that names the argument (Python's says only "int too large to convert")."""
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise OverflowError(f"{fn}: `{arg}` is too large for a float64, got {_describe(value)}") from None


def as_list(items: TensorOrTensors, fn: str, arg: str, warn_if_empty_generator: bool = False) -> list:
    """``items`` as a list: one tensor becomes ``[tensor]``; iterables and generators are read once.

    ``warn_if_empty_generator``: warn as torch's ``clip_grad_norm_`` does (its siblings do not).
    """
    if type(items) is list:  # the common case first: the checks below cost ~1 us each
        return items.copy()
    if isinstance(items, torch.Tensor):
        return [items]
    if isinstance(items, (str, bytes)) or not isinstance(items, abc.Iterable):
        raise TypeError(f"{fn}: `{arg}` must be a tensor or an iterable of tensors, got {_describe(items)}")
    is_generator = isinstance(items, types.GeneratorType)
    out = list(items)
    if warn_if_empty_generator and is_generator and not out:
        warnings.warn(f"`{arg}` is an empty generator, no gradient clipping will occur.", stacklevel=4)
    return out


def grads_of(parameters: list, fn: str, arg: str = "parameters") -> list[torch.Tensor]:
    """The non-None ``.grad`` of each parameter (validated when the plan is built)."""
    try:
        return [g for p in parameters if (g := p.grad) is not None]
    except AttributeError:
        for i, p in enumerate(parameters):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{fn}: every element of `{arg}` must be a torch.Tensor, "
                                f"got {_describe(p)} at index {i}") from None
        raise


def check_tensors(tensors: list, fn: str, arg: str) -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: every element of `{arg}` must be a torch.Tensor, "
                            f"got {_describe(t)} at index {i}")
        if t.layout != torch.strided:
            raise ValueError(f"{fn}: `{arg}` holds a sparse (or other non-strided) tensor at index {i} "
                             f"(layout {t.layout}); fastclip supports dense gradients only. "
                             "Convert it with .to_dense(), or use torch.nn.utils for sparse grads.")
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{fn}: `{arg}` must hold floating-point tensors, got dtype {t.dtype} at index {i}")


def check_torch_can_write(grads: list, fn: str, arg: str = "parameters", clamp: bool = False) -> None:
    """Before a set goes to torch's implementation (complex grads, devices without a kernel):
    refuse what torch would refuse part-way, after writing the grads listed before the one it
    cannot write, so that a failing call changes no grad there either."""
    outside_inference = not torch.is_inference_mode_enabled()
    for i, g in enumerate(grads):
        where = f"grad {i} of `{arg}` (counting only the tensors that have one)"
        if clamp and g.is_complex():
            raise TypeError(f"{fn}: {where} is complex ({g.dtype}); clamping complex values is not "
                            "defined (torch raises NotImplementedError, after clamping the grads "
                            "before it)")
        if outside_inference and g.is_inference():
            raise RuntimeError(f"{fn}: {where} is an inference tensor (made under "
                               "torch.inference_mode()), and torch's implementation, which takes this "
                               "set (complex grads, or a device without a fastclip kernel), refuses to "
                               "update it in place outside inference mode. Clone it first "
                               "(p.grad = p.grad.clone()).")
        if is_expanded(g):
            raise expanded_view_error(fn, where, g)


def check_max_norm(max_norm: object, fn: str, arg: str = "max_norm") -> Union[float, torch.Tensor]:
    """A non-negative, non-NaN real number (inf allowed: nothing is clipped).

    A 0-d tensor is kept as a tensor when it is not on the CPU, so that a threshold computed on
    the GPU never forces a host sync; its value is then the caller's responsibility.
    """
    if isinstance(max_norm, torch.Tensor):
        if max_norm.numel() != 1 or not (max_norm.is_floating_point() or max_norm.dtype in
                                         (torch.int32, torch.int64)):
            raise TypeError(f"{fn}: `{arg}` must be a real number or a one-element tensor, "
                            f"got a tensor of shape {tuple(max_norm.shape)} and dtype {max_norm.dtype}")
        if max_norm.device.type != "cpu":
            return plain_value(max_norm).reshape(())
        max_norm = max_norm.item()
    max_norm = _one_number(max_norm)
    if type(max_norm) is not float and (isinstance(max_norm, bool)  # ABC checks cost ~1 us
                                        or not isinstance(max_norm, numbers.Real)):
        raise TypeError(f"{fn}: `{arg}` must be a real number, got {_describe(max_norm)}")
    value = as_float(max_norm, fn, arg)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{fn}: `{arg}` must be a non-negative number, got {value!r}")
    return value


def check_norm_type(norm_type: object, fn: str) -> float:
    """p > 0 as a float: numbers (one-element tensors and arrays too, which torch reads with
    ``float()``), ``inf``, or the strings ``'inf'``/``'infinity'``."""
    if isinstance(norm_type, torch.Tensor) and norm_type.numel() == 1 and not (
            norm_type.is_complex() or norm_type.dtype == torch.bool):
        norm_type = norm_type.item()
    norm_type = _one_number(norm_type)
    if isinstance(norm_type, str):
        word = norm_type.strip().lower()
        if word in _SUPPORTED_NORM_WORDS:
            return math.inf
        try:
            value = float(word)
        except ValueError:
            raise ValueError(f"{fn}: `norm_type` must be a positive number or 'inf', "
                             f"got the unknown word {norm_type!r}") from None
    elif type(norm_type) is not float and (isinstance(norm_type, bool)
                                           or not isinstance(norm_type, numbers.Real)):
        raise TypeError(f"{fn}: `norm_type` must be a positive number or 'inf', got {_describe(norm_type)}")
    else:
        value = as_float(norm_type, fn, "norm_type")
    if math.isnan(value) or value <= 0:
        raise ValueError(f"{fn}: `norm_type` must be a positive number or 'inf', got {value!r}")
    return value


def check_clip_value(clip_value: object, fn: str) -> float:
    if isinstance(clip_value, torch.Tensor) and clip_value.numel() == 1:
        clip_value = clip_value.item()
    clip_value = _one_number(clip_value)
    if isinstance(clip_value, bool) or not isinstance(clip_value, numbers.Real):
        raise TypeError(f"{fn}: `clip_value` must be a real number, got {_describe(clip_value)}")
    value = as_float(clip_value, fn, "clip_value")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{fn}: `clip_value` must be a non-negative number, got {value!r}")
    return value


def check_flag(value: object, fn: str, arg: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # torch only tests these for truth; 0/1 (and numpy's bools) are accepted as flags, while
    # other values (a string such as "False" is truthy) are refused as the likely mistakes.
    if not (isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral)
                                                    and value in (0, 1))):
        expected = "True, False (or 0, 1) or None" if allow_none else "True, False (or 0, 1)"
        raise TypeError(f"{fn}: `{arg}` must be {expected}, got {_describe(value)}")


def plain_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor as the plain tensor of its value (torch's clip of DTensor grads returns a
    DTensor norm, whose own ``data_ptr()`` is 0: a kernel must never read it); others as they are.
    A replicated DTensor is its local tensor, with no communication."""
    if type(t) is torch.Tensor:
        return t
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


def check_total_norm(total_norm: object, fn: str) -> torch.Tensor:
    if not isinstance(total_norm, torch.Tensor) or total_norm.numel() != 1 or not total_norm.is_floating_point():
        raise TypeError(f"{fn}: `total_norm` must be a one-element floating-point tensor, got {_describe(total_norm)}")
    total_norm = plain_value(total_norm)
    return total_norm if total_norm.dim() == 0 else total_norm.reshape(())  # a view costs ~1 us
