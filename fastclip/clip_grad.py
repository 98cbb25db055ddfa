"""The public, torch-compatible clipping functions.

Each function validates every argument first (so a failed call changes no gradient), builds a
``Plan`` once, and composes the plan's passes the way torch composes its own: norm, then
coefficient, then scale. Inputs that fastclip has no kernel for (meta or other devices,
complex dtypes) go to torch's own implementation, captured at import so that
``fastclip.patch()`` cannot make the fallback call itself.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.utils.clip_grad as _torch_clip

from fastclip._compile import entry_point
from fastclip import _distributed
from fastclip import _validate as V
from fastclip._plan import Plan
from fastclip.stats import ClipStats

# torch's own functions, captured at import (patch() cannot make them recurse). Typed loosely:
# torch's hints say `float` where its code takes what fastclip passes on (a tensor max_norm).
TORCH_GET_TOTAL_NORM: Callable[..., torch.Tensor] = _torch_clip._get_total_norm
TORCH_CLIP_GRADS_WITH_NORM: Callable[..., None] = _torch_clip._clip_grads_with_norm_
TORCH_CLIP_GRAD_NORM: Callable[..., torch.Tensor] = _torch_clip.clip_grad_norm_
TORCH_CLIP_GRAD_VALUE: Callable[..., None] = _torch_clip.clip_grad_value_


def _nonfinite_error(norm_type: float) -> RuntimeError:
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
        "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
        "anyway, set `error_if_nonfinite=False`")


def _check_finite(norm: torch.Tensor, norm_type: float) -> None:
    # The only host sync on a device: torch syncs here too, and only when asked to check.
    if not bool(torch.isfinite(norm)):
        raise _nonfinite_error(norm_type)


def clip_coefficient(max_norm: Union[float, torch.Tensor], total_norm: torch.Tensor) -> torch.Tensor:
    """torch's coefficient ``min(max_norm / (total_norm + 1e-6), 1)``, by torch's own ops.

    torch computes ``float(max_norm) / (total_norm + 1e-6)``, and Python's ``float / tensor`` is
    ``reciprocal() * float``: the same ops in the same order (in the norm's dtype, on its device)
    give the same bits, and a device-resident ``max_norm`` never syncs. The backends read the
    result where it lives.
    """
    inverse = (total_norm + 1e-6).reciprocal()
    if isinstance(max_norm, torch.Tensor):
        # torch multiplies by float(max_norm), a Python number, which a multiply applies in its
        # op math: float32 for a 16-bit norm, rounded once to the norm's dtype. A device tensor
        # is never read back: the same op math by tensor ops (rounding max_norm to 16 bits first
        # would round twice).
        op_math = _OP_MATH.get(inverse.dtype, inverse.dtype)
        max_norm = max_norm.to(device=inverse.device, dtype=op_math)
        return torch.clamp((inverse.to(op_math) * max_norm).to(inverse.dtype), max=1.0)
    return torch.clamp(inverse * max_norm, max=1.0)


_OP_MATH = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


_HOST_DTYPES: dict[torch.dtype, type[np.floating]] = {torch.float32: np.float32, torch.float64: np.float64}


def host_clip_coefficient(max_norm: float, total_norm: float, dtype: torch.dtype) -> float:
    """``clip_coefficient`` for a norm already on the host, in numpy scalars of ``dtype``.

    The same IEEE operations in the same order (add, reciprocal, multiply, clamp; NaN kept), so
    the same bits, without four torch dispatches on a CPU call's critical path.
    """
    f = _HOST_DTYPES[dtype]
    with np.errstate(all="ignore"):
        coef = (f(1.0) / (f(total_norm) + f(1e-6))) * f(max_norm)
    return 1.0 if coef > 1.0 else float(coef)


@entry_point
def get_total_norm(
    tensors: V.TensorOrTensors,
    norm_type: V.NormType = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    group=None,
) -> torch.Tensor:
    """The norm of all ``tensors``, as if they were concatenated into one vector.

    Same signature and semantics as ``torch.nn.utils.get_total_norm``, computed in one fused read
    pass with float64 accumulation.

    Args:
        tensors: a tensor, or an iterable of tensors.
        norm_type: p > 0 of the p-norm; ``inf`` or ``'inf'`` for the max norm.
        error_if_nonfinite: raise ``RuntimeError`` when the norm is NaN or inf.
        foreach: accepted for compatibility with torch; fastclip's kernels are always fused.
        group: keyword-only ``torch.distributed`` process group over which the norm is global.

    Returns:
        A 0-d tensor on the first tensor's device: float32 for 32- and 16-bit tensors, float64
        when any tensor is float64. ``tensor(0.)`` for no tensors.

    Raises:
        TypeError: an element of ``tensors`` is not a tensor, holds integers, or has no memory of
            its own (storage freed by ``resize_(0)``); or an argument is of the wrong type (a
            flag that is not a bool, a ``norm_type`` that is not a number, a ``group`` that is not a process group).
        ValueError: ``norm_type`` is not > 0 (nor ``inf``), or a tensor is sparse.
        RuntimeError: ``error_if_nonfinite`` is True and the norm is NaN or inf.

    Example:
        >>> import torch, fastclip
        >>> fastclip.get_total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    fn = "get_total_norm"
    tensors = V.as_list(tensors, fn, "tensors")
    p = V.check_norm_type(norm_type, fn)
    V.check_flag(error_if_nonfinite, fn, "error_if_nonfinite")
    V.check_flag(foreach, fn, "foreach", allow_none=True)
    tensors, group = _distributed.resolve(tensors, group, fn)
    if not tensors and group is None:
        return torch.tensor(0.0)
    plan = Plan.build(tensors, fn, "tensors")
    if plan is None:
        _distributed.require_kernel(group, fn)
        return TORCH_GET_TOTAL_NORM(tensors, p, error_if_nonfinite, foreach)
    norm = plan.fused_norm(p) if group is None else None  # one CUDA device: root in-kernel
    if norm is None:
        norm = plan.total_norm(p, group=group)
    if error_if_nonfinite:
        _check_finite(norm, p)
    return norm


@entry_point
def clip_grads_with_norm_(
    parameters: V.TensorOrTensors,
    max_norm: V.Scalar,
    total_norm: torch.Tensor,
    foreach: Optional[bool] = None,
) -> None:
    """Scale the grads of ``parameters`` by ``min(max_norm / (total_norm + 1e-6), 1)`` in place.

    Same signature and semantics as ``torch.nn.utils.clip_grads_with_norm_``. When the
    coefficient is 1 nothing is written.

    Args:
        parameters: a tensor, or an iterable of tensors, whose ``.grad`` are scaled.
        max_norm: the largest norm allowed.
        total_norm: the grads' total norm, e.g. from ``get_total_norm``.
        foreach: accepted for compatibility with torch.

    Raises:
        TypeError: an element of ``parameters`` is not a tensor, holds integers, or has no memory of
            its own (storage freed by ``resize_(0)``); or an argument is of the wrong type (a
            flag that is not a bool, a ``max_norm`` that is not a number, a ``total_norm`` that is not a one-element floating-point tensor).
        ValueError: ``max_norm`` is negative or NaN, or a grad is sparse.
        RuntimeError: a grad that torch must write is an expanded view, or an inference tensor
            outside inference mode. No grad is written when any of these is raised.

    Example:
        >>> import torch, fastclip
        >>> w = torch.zeros(2, requires_grad=True); w.grad = torch.tensor([3.0, 4.0])
        >>> fastclip.clip_grads_with_norm_([w], 1.0, torch.tensor(5.0))
        >>> w.grad
        tensor([0.6000, 0.8000])
    """
    fn = "clip_grads_with_norm_"
    parameters = V.as_list(parameters, fn, "parameters")
    max_norm = V.check_max_norm(max_norm, fn)
    total_norm = V.check_total_norm(total_norm, fn)
    V.check_flag(foreach, fn, "foreach", allow_none=True)
    grads = _distributed.local_shards(V.grads_of(parameters, fn), fn)
    if not grads:
        return
    plan = Plan.build(grads, fn, "parameters")
    if plan is None:
        V.check_torch_can_write(grads, fn)
        TORCH_CLIP_GRADS_WITH_NORM(parameters, max_norm, total_norm, foreach)
        return
    if not plan.fused_clip_with_norm_(max_norm, total_norm):
        plan.scale_(clip_coefficient(max_norm, total_norm))


@entry_point
def clip_grad_norm_(
    parameters: V.TensorOrTensors,
    max_norm: V.Scalar,
    norm_type: V.NormType = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    group=None,
    stats: Optional[ClipStats] = None,
) -> torch.Tensor:
    """Clip the grads of ``parameters`` in place so that their total norm is at most ``max_norm``.

    Same signature and semantics as ``torch.nn.utils.clip_grad_norm_``: one fused read pass for the
    norm (float64 accumulation, exact to float rounding), and one fused write pass, skipped
    entirely when nothing needs clipping.

    Args:
        parameters: a tensor, or an iterable of tensors, whose ``.grad`` are clipped; parameters
            without a grad are skipped.
        max_norm: the largest total norm allowed (>= 0).
        norm_type: p > 0 of the p-norm; ``inf`` or ``'inf'`` for the max norm.
        error_if_nonfinite: raise ``RuntimeError`` (before any grad is written) when the norm is
            NaN or inf.
        foreach: accepted for compatibility with torch; fastclip's kernels are always fused.
        group: keyword-only ``torch.distributed`` process group over which the norm is global
            (sharded or tensor-parallel grads); DTensor grads are recognized without it.
        stats: keyword-only ``ClipStats`` filled from the same pass (telemetry). Grads that
            torch's implementation clips (complex ones, devices without a kernel) leave it empty.

    Returns:
        The total norm of the grads before clipping, as a 0-d tensor (see ``get_total_norm``).

    Raises:
        TypeError: an element of ``parameters`` is not a tensor, has an integer grad, or a grad
            with no memory of its own (storage freed by ``resize_(0)``); or an argument is of the
            wrong type (a ``max_norm`` or ``norm_type`` that is not a number, a flag that is not a
            bool, ``stats`` that is not a ``ClipStats``, ``group`` that is not a process group).
        ValueError: ``max_norm`` is negative or NaN, ``norm_type`` is not > 0 (nor ``inf``), or
            a grad is sparse.
        RuntimeError: ``error_if_nonfinite`` is True and the norm is NaN or inf, or a grad that
            torch must write is an expanded view or an inference tensor outside inference mode.
            No grad is written when any of these is raised, and ``stats`` is left as it was.

    Example:
        >>> import torch, fastclip
        >>> w = torch.zeros(2, requires_grad=True); w.grad = torch.tensor([3.0, 4.0])
        >>> fastclip.clip_grad_norm_([w], max_norm=1.0)
        tensor(5.)
        >>> w.grad
        tensor([0.6000, 0.8000])
    """
    fn = "clip_grad_norm_"
    parameters = V.as_list(parameters, fn, "parameters", warn_if_empty_generator=True)
    max_norm = V.check_max_norm(max_norm, fn)
    p = V.check_norm_type(norm_type, fn)
    V.check_flag(error_if_nonfinite, fn, "error_if_nonfinite")
    V.check_flag(foreach, fn, "foreach", allow_none=True)
    # The call fills a fresh ClipStats, handed over to `stats` once the grads are written: a call
    # that raises leaves `stats` as it was, as it leaves the grads.
    staged = None
    if stats is not None:
        if not isinstance(stats, ClipStats):
            raise TypeError(f"{fn}: `stats` must be a fastclip.ClipStats or None, got {type(stats).__name__}")
        staged = ClipStats()
    grads = V.grads_of(parameters, fn)
    grads, group = _distributed.resolve(grads, group, fn)
    if not grads and group is None:
        if stats is not None:
            stats.reset()  # a call that has nothing to fill it with leaves it empty
        return torch.tensor(0.0)
    plan = Plan.build(grads, fn, "parameters")
    if plan is None:
        _distributed.require_kernel(group, fn)
        V.check_torch_can_write(grads, fn)
        result = TORCH_CLIP_GRAD_NORM(parameters, max_norm, p, error_if_nonfinite, foreach)
        if stats is not None:
            stats.reset()  # torch's implementation did the work: nothing to fill it with
        return result
    if group is None and stats is None and not error_if_nonfinite:
        norm = plan.fused_clip_(p, max_norm)  # one CUDA device: norm, coef and scale in-kernel
        if norm is not None:
            return norm
    norm = plan.total_norm(p, group=group, stats=staged)
    if error_if_nonfinite:
        _check_finite(norm, p)
    if stats is None and plan.host_only and isinstance(max_norm, float):
        plan.scale_(host_clip_coefficient(max_norm, norm.item(), norm.dtype))
        return norm
    coef = clip_coefficient(max_norm, norm)
    if staged is not None:
        staged._record_coef(coef)
    plan.scale_(coef)
    if stats is not None and staged is not None:
        stats._take(staged)
    return norm


@entry_point
def clip_grad_value_(
    parameters: V.TensorOrTensors,
    clip_value: V.Scalar,
    foreach: Optional[bool] = None,
) -> None:
    """Clamp the grads of ``parameters`` to ``[-clip_value, clip_value]`` in place.

    Same signature and semantics as ``torch.nn.utils.clip_grad_value_``, in one fused pass that
    stores only the elements that change.

    Args:
        parameters: a tensor, or an iterable of tensors, whose ``.grad`` are clamped.
        clip_value: the largest absolute value allowed (>= 0; torch also takes a negative one,
            and then sets every value to it).
        foreach: accepted for compatibility with torch.

    Raises:
        TypeError: an element of ``parameters`` is not a tensor, has an integer grad, or a grad
            with no memory of its own; or ``clip_value`` is not a number.
        ValueError: ``clip_value`` is negative or NaN, or a grad is sparse.
        RuntimeError: a grad that torch must write is an expanded view, or an inference tensor
            outside inference mode. No grad is written when any of these is raised.

    Example:
        >>> import torch, fastclip
        >>> w = torch.zeros(3, requires_grad=True); w.grad = torch.tensor([-2.0, 0.5, 3.0])
        >>> fastclip.clip_grad_value_([w], 1.0)
        >>> w.grad
        tensor([-1.0000,  0.5000,  1.0000])
    """
    fn = "clip_grad_value_"
    parameters = V.as_list(parameters, fn, "parameters")
    clip_value = V.check_clip_value(clip_value, fn)
    V.check_flag(foreach, fn, "foreach", allow_none=True)
    grads = _distributed.local_shards(V.grads_of(parameters, fn), fn, linear=False)
    if not grads:
        return
    plan = Plan.build(grads, fn, "parameters")
    if plan is None:
        V.check_torch_can_write(grads, fn, clamp=True)
        TORCH_CLIP_GRAD_VALUE(parameters, clip_value, foreach)
        return
    plan.clamp_(clip_value)
