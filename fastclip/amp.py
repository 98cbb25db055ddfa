"""Fused AMP unscale + clip: ``scaler.unscale_(optimizer); clip_grad_norm_(...)`` in two passes.

torch's sequence reads the grads three times and writes them twice (unscale, norm, clip). Here
one read pass gives the float64 power sum of the *scaled* grads, from which come both the
inf/NaN check (a non-finite sum) and the unscaled norm (root of the sum, times ``1/scale``);
one read+write pass then multiplies every grad by ``(1/scale) * coef``. That is for p = 1, 2 and
inf; other p unscale first, as torch does (see ``fuses_unscale``).

The found-inf flags go into the ``GradScaler`` exactly where ``scaler.unscale_`` puts them, so
``scaler.step`` and ``scaler.update`` behave as after torch's sequence. On a GPU nothing is read
back to the host: the scale, flags, norm and coefficient stay 0-d device tensors.
"""

from __future__ import annotations

import math
from typing import Optional, cast

import torch
from torch.amp.grad_scaler import GradScaler, OptState

from fastclip._compile import entry_point
from fastclip import _distributed
from fastclip import _validate as V
from fastclip._plan import Plan, root, tensor_root
from fastclip.clip_grad import clip_coefficient, clip_grad_norm_
from fastclip.kernels.layout import FLOAT16

_FN = "unscale_and_clip_"
GRADS_ARG = "optimizer.param_groups"


def check_optimizer(optimizer: object, fn: str) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{fn}: `optimizer` must be a torch.optim.Optimizer, got {V._describe(optimizer)}")


def check_scaler(scaler: object, fn: str) -> None:
    if not isinstance(scaler, GradScaler):
        raise TypeError(f"{fn}: `scaler` must be a torch.amp.GradScaler, got {V._describe(scaler)}")


def optimizer_params(optimizer: torch.optim.Optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


def scaler_state(scaler: GradScaler, optimizer: torch.optim.Optimizer, fn: str) -> dict:
    """The scaler's record for ``optimizer``, after the checks ``scaler.unscale_`` makes."""
    if scaler._scale is None:
        raise RuntimeError(f"{fn}: `scaler` has no scale yet: call `scaler.scale(loss).backward()` "
                           "in this iteration before unscaling the grads")
    stage = scaler._per_optimizer_states[id(optimizer)]["stage"]
    if stage is OptState.UNSCALED:
        raise RuntimeError(f"{fn}: unscale_() has already been called on this optimizer since the "
                           "last update() (by `scaler.unscale_` or fastclip); unscale once per step")
    if stage is OptState.STEPPED:
        raise RuntimeError(f"{fn}: unscale_() is being called after step(): call `scaler.update()` "
                           "to start the next iteration first")
    return scaler._per_optimizer_states[id(optimizer)]


def check_no_fp16(grads: list, fn: str, plan: Optional[Plan] = None) -> None:
    """GradScaler refuses to unscale float16 grads (fp16 master weights); so do we.

    With a plan, its tables' dtype codes answer without asking every tensor again.
    """
    if plan is not None and not any((s.table.codes == FLOAT16).any() for s in plan.sets):
        return
    for i, g in enumerate(grads):
        if g.dtype == torch.float16:
            raise ValueError(f"{fn}: `optimizer` holds a float16 gradient (grad {i} of its parameters "
                             "that have one); torch's GradScaler refuses to unscale float16 grads "
                             "('Attempting to unscale FP16 gradients.'). Keep float32 parameters and "
                             "run the forward pass under torch.autocast")


def scale_of(scaler: GradScaler) -> torch.Tensor:
    """The scaler's scale tensor, which the stage checks (``scaler_state``) found present."""
    return cast(torch.Tensor, scaler._scale)


def inv_scale_of(scaler: GradScaler) -> torch.Tensor:
    """``1/scale`` exactly as ``GradScaler.unscale_`` computes it (float64 reciprocal, float32)."""
    return scale_of(scaler).double().reciprocal().float()


def nonfinite_flag(total, device: torch.device) -> torch.Tensor:
    """torch's found-inf flag for a power sum: float32 0-d on ``device``, 1.0 when non-finite.

    A sum of |x|**p is non-finite exactly when an element is, unless it overflows float64
    (float64 grads above ~1e154, or a large p): that counts as an overflow here. Callers on the
    host tell the two apart first (``overflowed_on_finite_grads``); a device cannot without a sync.
    """
    if isinstance(total, float):
        return torch.full((), 0.0 if math.isfinite(total) else 1.0, dtype=torch.float32, device=device)
    total = torch.as_tensor(total).reshape(()).to(device, non_blocking=True)
    return torch.logical_not(torch.isfinite(total)).to(torch.float32)


def fuses_unscale(p: float) -> bool:
    """Whether the read pass may take the norm from the *scaled* grads' power sum.

    For p = 1, 2 and inf that sum overflows float64 only for grads beyond ~1e149 (float64 ones).
    For a larger p, |scale * g| ** p overflows far sooner (p = 60 at scale 2**16 and |g| = 3)
    and would pass for an inf/NaN grad, zeroing finite grads and skipping the step; and for any
    other p, libm's ``pow`` does not scale exactly. Those p unscale first, as torch does.
    """
    return p == 2.0 or p == 1.0 or p == math.inf


def plan_grads(params: list, fn: str):
    """The grads of ``params`` as the kernels see them: (local grads, group, plan or None).

    DTensor grads (FSDP2) become their local shards, and ``group`` says how the ranks' power sums
    combine into the global one (see ``_distributed.resolve``); None for plain tensors.
    """
    grads, group = _distributed.resolve(V.grads_of(params, fn, GRADS_ARG), None, fn)
    plan = Plan.build(grads, fn, GRADS_ARG) if grads else None
    return grads, group, plan


def scaled_pass(plan: Plan, p: float, inv_scale: torch.Tensor, group=None):
    """The read pass over scaled grads: (unscaled norm, found-inf flag per device).

    The norm of the unscaled grads is the scaled norm times ``inv_scale``, computed in float64 from
    the float64 power sum, then rounded once to the norm's dtype. With a power-of-two scale (the
    GradScaler's usual case) it equals the norm of the unscaled grads bit for bit.

    Each device's flag covers its own grads, as torch's; across ranks (``group``) the flag is
    the global sum's, so that every rank skips the same steps.
    """
    results = plan.power_sums(p)
    total = plan.combine([r.total for r in results], p)
    if group is None:
        found = {s.device: nonfinite_flag(r.total, s.device) for s, r in zip(plan.sets, results)}
    else:
        total = _distributed.all_reduce_power_sum(total, p, group, plan.first_device, plan, results)
        found = {s.device: nonfinite_flag(total, s.device) for s in plan.sets}
    if isinstance(total, float) and inv_scale.device.type == "cpu":
        norm = torch.tensor(root(total, p) * float(inv_scale), dtype=plan.dtype, device=plan.first_device)
    else:  # on a device: tensor ops only, so nothing is read back to the host
        total = torch.as_tensor(total, dtype=torch.float64).to(plan.first_device, non_blocking=True)
        inv = inv_scale.to(plan.first_device, non_blocking=True).double()
        norm = (tensor_root(total, p) * inv).to(plan.dtype)
    return norm, found


def overflowed_on_finite_grads(plan: Plan, p: float, norm: torch.Tensor, group=None) -> bool:
    """True when the power sum of the *scaled* grads overflowed float64 although every element is
    finite (float64 grads beyond ~1.3e154 / scale, p = 2): torch's ``unscale_`` finds no inf/NaN
    there and its clip may give a finite norm, so the caller must unscale first, as torch does.
    Decided on the host only (one more read pass, in that rare case); a device check would sync."""
    return (group is None and plan.host_only and plan.dtype == torch.float64
            and not math.isfinite(norm.item())
            and not any(r.nonfinite for r in plan.power_sums(p, count_nonfinite=True)))


def scale_grads_(plan: Plan, factor: torch.Tensor) -> None:
    """Multiply every grad by the 0-d ``factor`` in one read+write pass, whatever its value.

    The backends skip coefficients >= 1 (they are clip coefficients); here ``factor`` exceeds 1
    when a GradScaler's scale has fallen below 1, and must still be applied. On the host that is
    known for free; on a device it is not without a sync, so the device's scale kernel is told to
    apply any factor. (Not torch's ``_foreach_mul_``: on CUDA it would round a float32 factor to
    bfloat16 for bfloat16 grads, where ``unscale_`` and the clip multiply in float32.)
    """
    for s in plan.sets:
        if s.backend.RESULTS_ON_HOST:
            f = float(factor)  # the CPU kernels take a host float
            if f > 1.0:
                # torch writes every grad here: refuse first what its mul_ would refuse part-way
                s.table.check_torch_writes_all()
                torch._foreach_mul_(s.table.tensors, f)
            else:
                s.backend.scale_(s.table, f, factor.dtype)
        else:
            s.backend.scale_(s.table, factor.to(s.device, non_blocking=True), always=True)


@entry_point
def unscale_and_clip_(
    scaler: GradScaler,
    optimizer: torch.optim.Optimizer,
    max_norm: V.Scalar,
    norm_type: V.NormType = 2.0,
) -> torch.Tensor:
    """``scaler.unscale_(optimizer)`` then ``clip_grad_norm_`` of its params, in two fused passes.

    One read pass computes the norm of the unscaled grads (float64 accumulation) and detects
    inf/NaN; one read+write pass multiplies every grad by ``(1/scale) * coef``, with torch's
    coefficient ``min(max_norm / (norm + 1e-6), 1)``. The scaler records the found-inf flags and
    the ``UNSCALED`` stage exactly as ``scaler.unscale_`` does, so ``scaler.step(optimizer)``
    skips the step on inf/NaN, ``scaler.update()`` backs off, and a second unscale before
    ``update()`` raises. No host sync on a GPU.

    With a power-of-two scale (GradScaler's default growth and backoff) and p = 1, 2 or inf, the
    grads and the norm are bit-identical to ``scaler.unscale_(optimizer);
    fastclip.clip_grad_norm_(params, ...)`` (on the CPU also when the scale is below 1 or the
    product of the unscale factor and the coefficient below float32's smallest normal number,
    which take two write passes there). Other p take torch's
    sequence, ``scaler.unscale_`` then the clip (three passes): the power sum of the scaled
    grads would overflow float64 for a large p, where the unscaled grads' does not. So do grads
    whose memory overlaps (one grad under two parameters), which torch's ``unscale_`` divides once
    per listing. (An unscaled value below float32's smallest normal number is rounded once here and
    twice by torch: such values may differ by one subnormal step.)

    DTensor grads (FSDP2) are clipped by their global norm, like ``clip_grad_norm_``; their
    found-inf flag is then global too (one rank's inf skips the step on every rank), where
    torch's ``unscale_`` flags each rank's own grads.

    On inf/NaN the step will be skipped, and the grads get what torch's sequence gives them: the
    norm is inf or NaN, so the coefficient is 0 (finite elements become 0, non-finite ones NaN)
    or NaN (everything becomes NaN).

    Args:
        scaler: the ``torch.amp.GradScaler`` that scaled this iteration's loss. A disabled scaler
            makes this a plain ``clip_grad_norm_``.
        optimizer: its parameters' grads (all parameter groups) are unscaled and clipped.
        max_norm: the largest total norm allowed for the unscaled grads (>= 0).
        norm_type: p > 0 of the p-norm; ``inf`` or ``'inf'`` for the max norm.

    Returns:
        The total norm of the unscaled grads before clipping, a 0-d tensor on the first grad's
        device (float32, or float64 when a grad is float64); inf or NaN on overflow.

    Raises:
        RuntimeError: the scaler has no scale yet, or this optimizer was already unscaled (or
            stepped) since the last ``scaler.update()``.
        ValueError: a grad is float16 (GradScaler refuses to unscale those).

    Example:
        >>> import torch, fastclip
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scaler = torch.amp.GradScaler("cpu")
        >>> scaler.scale(model(torch.randn(8, 4)).sum()).backward()
        >>> norm = fastclip.unscale_and_clip_(scaler, opt, max_norm=1.0)
        >>> scaler.step(opt); scaler.update()
    """
    check_scaler(scaler, _FN)
    check_optimizer(optimizer, _FN)
    max_norm = V.check_max_norm(max_norm, _FN)
    p = V.check_norm_type(norm_type, _FN)
    params = optimizer_params(optimizer)
    if not scaler.is_enabled():
        return clip_grad_norm_(params, max_norm, p)
    state = scaler_state(scaler, optimizer, _FN)
    grads, group, plan = plan_grads(params, _FN)
    return unscale_and_clip_planned(scaler, optimizer, state, grads, group, plan, max_norm, p, _FN)


def unscale_and_clip_planned(scaler, optimizer, state, grads, group, plan, max_norm, p, fn):
    """``unscale_and_clip_`` once the arguments are checked and the plan built (see there)."""
    check_no_fp16(grads, fn, plan)
    if plan is None:  # no grads, or a device/dtype without a kernel: torch's own sequence
        scaler.unscale_(optimizer)
        return clip_grad_norm_(optimizer_params(optimizer), max_norm, p)
    if not fuses_unscale(p) or plan.shares_memory():
        # torch's unscale, then the clip on the same plan: for p other than 1, 2 and inf (see
        # fuses_unscale), and for memory listed twice, which torch's unscale_ divides once per
        # listing, so the unscaled norm is not the scaled norm times 1/scale.
        torch_unscale_(scaler, optimizer, plan)
        return clip_planned(plan, group, optimizer_params(optimizer), max_norm, p)
    inv_scale = inv_scale_of(scaler)
    norm, found = scaled_pass(plan, p, inv_scale, group)
    if overflowed_on_finite_grads(plan, p, norm, group):
        torch_unscale_(scaler, optimizer, plan)
        return clip_planned(plan, group, optimizer_params(optimizer), max_norm, p)
    unscale_clip_grads_(plan, inv_scale, clip_coefficient(max_norm, norm))
    state["found_inf_per_device"] = found
    state["stage"] = OptState.UNSCALED
    return norm


def torch_unscale_(scaler: GradScaler, optimizer: torch.optim.Optimizer, plan: Plan) -> None:
    """``scaler.unscale_(optimizer)`` on grads that ``plan`` was built for. The plan reads sliced
    grads through copies made when it was built: they are refreshed from the unscaled grads."""
    for s in plan.sets:  # torch's unscale_ writes every grad: refuse first what it refuses part-way
        s.table.check_torch_writes_all()
    scaler.unscale_(optimizer)
    plan.refresh_copies()


def clip_planned(plan: Optional[Plan], group, params: list, max_norm, p: float) -> torch.Tensor:
    """``clip_grad_norm_`` on an already built plan (torch's own when there is no plan)."""
    if plan is None:
        return clip_grad_norm_(params, max_norm, p)
    norm = plan.total_norm(p, group=group)
    plan.scale_(clip_coefficient(max_norm, norm))
    return norm



def unscale_clip_grads_(plan: Plan, inv_scale: torch.Tensor, coef: torch.Tensor) -> None:
    """Multiply the grads by ``inv_scale`` and then ``coef`` as torch's ``unscale_`` and clip do.

    One pass by their product gives the same bits whenever the product is exact and unscaling
    cannot overflow: a power-of-two scale >= 1 and a product above float32's smallest normal
    number. On the host the rare other cases (a scale below 1; a coefficient below ~1e-33)
    take torch's two roundings in two passes; on a device, deciding would need a host sync,
    so one pass runs whatever the values.
    """
    factor = inv_scale.to(coef.device, coef.dtype, non_blocking=True) * coef
    if plan.host_only:
        # The kernels apply the factor to 32- and 16-bit grads as a float32: decide on that value
        # (a float64 factor may be a float32 subnormal), and a factor that underflowed to 0 from a
        # coefficient that is not 0 needs the two passes as well.
        f = abs(float(factor.float()))
        if inv_scale.item() > 1.0 or (coef.item() != 0.0 and f < torch.finfo(torch.float32).tiny):
            scale_grads_(plan, inv_scale)
            plan.scale_(coef)
            return
    scale_grads_(plan, factor)


__all__ = ["unscale_and_clip_"]
