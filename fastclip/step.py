"""Clip and step: one read pass for clipping, folded into a fused optimizer's own step.

torch's fused optimizers (``Adam``, ``AdamW``, ``SGD``, ``Adagrad`` with ``fused=True``) divide
each grad by ``optimizer.grad_scale`` and skip the update when ``optimizer.found_inf`` is 1: the
mechanism ``GradScaler.step`` uses to unscale inside the step. Clipping by ``coef`` is a division
by ``1/coef``, so after the norm's read pass the coefficient (times the AMP scale) rides on that
mechanism, and fastclip never writes the grads. Other optimizers get clip, then step, and so
does a fused optimizer that torch does not mark as reading ``grad_scale``
(``_step_supports_amp_scaling``): fused Adagrad is marked in torch 2.13, not in 2.11.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional, cast

import torch
from torch.amp.grad_scaler import GradScaler, OptState

from fastclip._compile import entry_point
from fastclip import _validate as V
from fastclip._plan import Plan
from fastclip.amp import (check_no_fp16, check_optimizer, check_scaler, clip_planned, fuses_unscale,
                          inv_scale_of, optimizer_params, overflowed_on_finite_grads, plan_grads,
                          scale_of, scaled_pass, torch_unscale_, unscale_and_clip_planned,
                          unscale_clip_grads_)
from fastclip.clip_grad import clip_coefficient

_FN = "clip_and_step"
_STEP_ATTRS = ("grad_scale", "found_inf")

# Steps known to read `grad_scale`/`found_inf` when every group is fused. Compared unwrapped:
# torch wraps `step` with its profiling hook per class (AdamW inherits Adam's step from torch 2.7;
# before, it had a step of its own that reads them too).
_FUSED_STEPS = tuple(inspect.unwrap(cls.step) for cls in
                     (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad))


def reads_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """True for a torch fused optimizer whose step divides by ``grad_scale``: every group fused."""
    return (getattr(optimizer, "_step_supports_amp_scaling", False)
            and inspect.unwrap(type(optimizer).step) in _FUSED_STEPS
            and all(group.get("fused") for group in optimizer.param_groups))


def _reciprocal(x: torch.Tensor) -> torch.Tensor:
    """float32 ``1/x`` rounded once from float64: the fused kernels read a float32 grad_scale."""
    return x.double().reciprocal().float()


def _divisor(plan: Plan, factor: torch.Tensor, write_factor) -> torch.Tensor:
    """The fused step's float32 ``grad_scale`` = ``1/factor``.

    When that overflows although ``factor`` is not 0 (a norm above ~3.4e38 times max_norm), the
    fused step would zero the grads instead of clipping them: ``write_factor()`` then applies
    the factor to the grads in place and the step divides by 1. Checked on the host only (a
    device check would sync); on a device the fused step runs as it is."""
    grad_scale = _reciprocal(factor)
    if plan.host_only and math.isinf(grad_scale.item()) and factor.item() != 0.0:
        write_factor()
        return torch.ones((), dtype=torch.float32, device=factor.device)
    return grad_scale


def _fused_step(optimizer: torch.optim.Optimizer, grad_scale: torch.Tensor,
                found_inf: Optional[torch.Tensor]) -> None:
    """``optimizer.step()`` with ``grad_scale``/``found_inf`` set for it, restored afterwards."""
    saved = {name: optimizer.__dict__[name] for name in _STEP_ATTRS if name in optimizer.__dict__}
    try:
        optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]  # read by fused steps
        if found_inf is not None:
            optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        optimizer.step()
    finally:
        for name in _STEP_ATTRS:
            if name in saved:
                setattr(optimizer, name, saved[name])
            else:
                optimizer.__dict__.pop(name, None)


_NO_ARGUMENTS: dict = {}  # step function -> whether step() binds with no arguments


def _check_step_takes_no_arguments(optimizer: torch.optim.Optimizer) -> None:
    """Refuse, before anything is written, an optimizer whose ``step`` needs an argument (LBFGS's
    closure): clip_and_step calls ``optimizer.step()``, which would raise after the clip."""
    step = optimizer.step
    key = getattr(step, "__func__", step)
    ok = _NO_ARGUMENTS.get(key)
    if ok is None:
        try:
            inspect.signature(step).bind()
            ok = True
        except TypeError:
            ok = False
        except ValueError:  # no signature to read (a builtin): let the step itself decide
            ok = True
        _NO_ARGUMENTS[key] = ok
    if not ok:
        raise TypeError(f"{_FN}: `optimizer` is a {type(optimizer).__name__} whose step() needs "
                        f"arguments (step{inspect.signature(step)}), and clip_and_step calls "
                        "optimizer.step() without any; an optimizer that re-evaluates a closure "
                        "(LBFGS) clips inside it: call fastclip.clip_grad_norm_ in the closure")


def _check_free(optimizer: torch.optim.Optimizer) -> None:
    for name in _STEP_ATTRS:
        if getattr(optimizer, name, None) is not None:
            raise RuntimeError(f"{_FN}: `optimizer` already has a `{name}` attribute set (by a "
                               "GradScaler.step in progress, or by hand); clip_and_step sets it "
                               f"for the step itself: delete `optimizer.{name}` first")


@entry_point
def clip_and_step(
    optimizer: torch.optim.Optimizer,
    max_norm: V.Scalar,
    norm_type: V.NormType = 2.0,
    scaler: Optional[GradScaler] = None,
) -> torch.Tensor:
    """Clip the global norm of ``optimizer``'s grads to ``max_norm``, then ``optimizer.step()``.

    For a torch fused optimizer (``Adam``, ``AdamW``, ``SGD`` or ``Adagrad`` with ``fused=True``)
    clipping costs one read pass: the coefficient ``min(max_norm / (norm + 1e-6), 1)`` (divided
    into the AMP scale, with a scaler) goes to the step as ``optimizer.grad_scale``, which the fused
    kernel divides every grad by, and the found-inf flag as ``optimizer.found_inf``. fastclip does
    not write the grads; torch's fused CPU kernels store the grad they used (clipped, unscaled)
    back into ``.grad``, except on a skipped step (the grads are then left scaled; for p other
    than 1, 2 and inf, unscaled but not clipped). Both attributes are removed after the step. The
    parameters match torch's clip-then-step up to float rounding (a division by ``1/coef``
    instead of a multiplication by ``coef``: about one float32 ulp per grad element; 16-bit grads
    reach the step unrounded, where torch's sequence rounds the clipped grad to 16 bits). When
    ``1/coef`` overflows float32 (a norm over ~3.4e38 times ``max_norm``) the fused kernel would
    divide by inf and zero the grads: on the CPU the grads are then scaled in place first and
    the step divides by 1; on a GPU, where checking would need a host sync, the fused step runs
    as it is.

    Any other optimizer gets ``clip_grad_norm_`` (or, with a scaler, ``unscale_and_clip_``) and
    then its step, through ``scaler.step`` with a scaler; so do grads whose memory overlaps (a
    fused step divides a shared grad once per parameter, in place). A step pre-hook of a fused
    optimizer sees the grads before clipping, with ``grad_scale`` set. DTensor grads (FSDP2) are
    clipped by their global norm, as ``clip_grad_norm_`` does.

    With a scaler this replaces ``scaler.unscale_(optimizer); clip_grad_norm_(...);
    scaler.step(optimizer)``: call ``scaler.update()`` afterwards as usual. The step is skipped
    on inf/NaN and the scaler backs off. If ``scaler.unscale_(optimizer)`` was already called this
    iteration, the grads are taken as unscaled and its found-inf flags are used. (torch 2.13's
    fused SGD with momentum leaves its momentum buffer uninitialized when its very first step is
    skipped; torch's own ``scaler.step`` does the same.)

    Args:
        optimizer: the optimizer to step; the grads of all its parameter groups are clipped.
        max_norm: the largest total norm allowed (>= 0), of the unscaled grads with a scaler.
        norm_type: p > 0 of the p-norm; ``inf`` or ``'inf'`` for the max norm.
        scaler: the ``torch.amp.GradScaler`` that scaled the loss, or None.

    Returns:
        The total norm of the (unscaled) grads before clipping, a 0-d tensor on the first grad's
        device. The optimizer's step return value (closures are not supported) is dropped.

    Raises:
        RuntimeError: with a scaler, it has no scale yet or already stepped this optimizer since
            ``update()``; or ``optimizer`` already carries a ``grad_scale``/``found_inf``.
        TypeError: ``optimizer.step`` needs an argument (LBFGS's closure): clip in the closure.
        ValueError: with a scaler, a grad is float16 (GradScaler refuses to unscale those).

    Example:
        >>> import torch, fastclip
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> norm = fastclip.clip_and_step(opt, max_norm=1.0)
    """
    check_optimizer(optimizer, _FN)
    _check_step_takes_no_arguments(optimizer)
    max_norm = V.check_max_norm(max_norm, _FN)
    p = V.check_norm_type(norm_type, _FN)
    if scaler is not None:
        check_scaler(scaler, _FN)
        if not scaler.is_enabled():
            scaler = None
    fused = reads_grad_scale(optimizer)
    if fused:
        _check_free(optimizer)
    state = _scaler_stage_check(scaler, optimizer) if scaler is not None else {}
    params = optimizer_params(optimizer)
    grads, group, plan = plan_grads(params, _FN)

    # Memory listed twice (one grad under two parameters): torch's clip scales it once per
    # listing before the step, and a fused step divides it in place once per parameter, so the
    # first parameter would be updated with another grad than torch's. Clip, then step.
    if not fused or plan is None or plan.shares_memory():  # clip, then step
        if scaler is None:
            norm = clip_planned(plan, group, params, max_norm, p)
            optimizer.step()
        else:
            if state["stage"] is OptState.READY:
                norm = unscale_and_clip_planned(scaler, optimizer, state, grads, group, plan,
                                                max_norm, p, _FN)
            else:  # the caller already unscaled
                norm = clip_planned(plan, group, params, max_norm, p)
            scaler.step(optimizer)
        return norm

    # torch's fused step reads and writes numel() elements from each grad's data pointer: an
    # expanded grad would be read and written past its memory. torch's clip-then-step raises on it
    # before any write: so does this (before anything is written or stepped).
    if scaler is not None and state["stage"] is OptState.READY:
        check_no_fp16(grads, _FN, plan)  # first, as torch's unscale_ refuses them first
    for s in plan.sets:
        s.table.check_writable()
    if scaler is None:
        norm = plan.total_norm(p, group=group)
        coef = clip_coefficient(max_norm, norm)
        _fused_step(optimizer, _divisor(plan, coef, lambda: plan.scale_(coef)), None)
        return norm
    if state["stage"] is OptState.READY:
        if not fuses_unscale(p):
            torch_unscale_(scaler, optimizer, plan)  # see fuses_unscale: the stage is UNSCALED
    if state["stage"] is OptState.READY:
        inv_scale = inv_scale_of(scaler)
        norm, found = scaled_pass(plan, p, inv_scale, group)
        if overflowed_on_finite_grads(plan, p, norm, group):
            torch_unscale_(scaler, optimizer, plan)  # the stage is UNSCALED: the branch below
    if state["stage"] is OptState.READY:
        state["found_inf_per_device"] = found
        coef = clip_coefficient(max_norm, norm)
        # grads / grad_scale = grads * inv_scale * coef, with one float32 rounding of the divisor.
        factor = inv_scale.to(coef.device, non_blocking=True).double() * coef.double()
        grad_scale = _divisor(plan, factor, lambda: unscale_clip_grads_(plan, inv_scale, coef))
    else:  # UNSCALED: the flags were recorded by scaler.unscale_
        norm = plan.total_norm(p, group=group)
        coef = clip_coefficient(max_norm, norm)
        grad_scale = _divisor(plan, coef, lambda: plan.scale_(coef))
    device = scale_of(scaler).device
    # As GradScaler's own fused path adds them (never empty: plan holds grads).
    found_inf = cast(torch.Tensor, sum(f.to(device, non_blocking=True)
                                       for f in state["found_inf_per_device"].values()))
    _fused_step(optimizer, grad_scale.to(device, non_blocking=True), found_inf)
    state["stage"] = OptState.STEPPED
    return norm


def _scaler_stage_check(scaler: GradScaler, optimizer: torch.optim.Optimizer) -> dict:
    """The scaler's record for ``optimizer``, after the checks ``scaler.step`` makes."""
    if scaler._scale is None:
        raise RuntimeError(f"{_FN}: `scaler` has no scale yet: call `scaler.scale(loss).backward()` "
                           "in this iteration before stepping")
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError(f"{_FN}: step() has already been called since the last update(): call "
                           "`scaler.update()` to start the next iteration first")
    return state


__all__ = ["clip_and_step"]
