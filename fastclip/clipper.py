"""``GradClipper``: a stateful gradient clipper for a training loop.

One ``step()`` is one fused read pass (the total norm) and, when the grads are clipped, one fused
write pass -- the same two passes as ``fastclip.clip_grad_norm_``. The threshold (fixed, or from
an adaptive policy), the non-finite handling and the history for ``summary()`` are tensor ops on
the grads' device: on CUDA, a step never waits for the GPU (except ``nonfinite="error"``, which
must read the norm to raise).
"""

from __future__ import annotations

import math
import numbers
from collections import abc
from typing import Iterable, Optional, Sequence, Union, cast

import torch
import torch.nn.utils.clip_grad as _torch_clip

from fastclip._compile import entry_point
from fastclip import _distributed
from fastclip import _validate as V
from fastclip._plan import Plan
from fastclip._table import is_dense
from fastclip.clip_grad import clip_coefficient
from fastclip.policies import (BUILT_IN, AutoClip, ClipPolicy, ZClip, _check_count,
                               policy_from_config)

NONFINITE_MODES = ("propagate", "error", "skip", "zero")
_STATE_VERSION = 1
_TORCH_GET_TOTAL_NORM = _torch_clip._get_total_norm


class GradClipper:
    """Clip the grads of a fixed set of parameters, step after step, with a fixed or adaptive
    threshold.

    Each ``step()`` computes the total norm of the grads (float64 accumulation, as
    ``fastclip.clip_grad_norm_``), picks this step's threshold, and scales the grads exactly as
    ``torch.nn.utils.clip_grad_norm_(parameters, threshold)`` would: by
    ``min(threshold / (norm + 1e-6), 1)``, with no write at all when that is 1.

    Args:
        parameters: the parameters whose ``.grad`` are clipped (read once, like an optimizer's;
            not empty, unless ``group`` is given: a rank may hold none).
        max_norm: a number, or a one-element tensor or array (read once, here). The fixed
            threshold when ``policy`` is None (``inf`` never clips: the
            clipper then only records norms). With a policy it caps the policy's threshold (and
            is ZClip's threshold during its warmup, like the reference implementation's
            ``max_grad_norm``); ``None`` means no cap.
        norm_type: p of the p-norm (> 0, or ``inf``/``'inf'``).
        policy: None for a fixed threshold, ``fastclip.AutoClip(...)``, ``fastclip.ZClip(...)``,
            or a ``fastclip.ClipPolicy`` subclass of your own.
        nonfinite: what to do when the norm is inf or NaN:

            - ``"propagate"``: torch's behaviour (the grads are scaled by the non-finite
              coefficient, so they become NaN or 0);
            - ``"error"``: raise ``RuntimeError`` before any grad changes (reads the norm back
              to the host: one synchronization per step on CUDA);
            - ``"skip"``: leave the grads untouched, and set ``skipped`` so that the caller can
              skip the optimizer step;
            - ``"zero"``: set every grad to zero.

            A non-finite norm never enters a policy's history.
        window: how many recent steps ``summary()`` takes the norm's percentiles over
            (keyword-only).
        group: keyword-only ``torch.distributed`` process group over which the norm is global,
            as in ``clip_grad_norm_(..., group=)``; DTensor grads (FSDP2, tensor parallel) are
            recognized without it. Every rank then sees the same norm, so an adaptive policy
            keeps the same history and threshold on every rank.

    Attributes:
        skipped: 0-d bool tensor on the grads' device: True when the last step's norm was
            non-finite and ``nonfinite="skip"`` left the grads untouched. Reading it (``if
            clipper.skipped:``) synchronizes with the GPU.
        found_nonfinite: 0-d bool tensor: the last step's norm was inf or NaN (any mode).
        threshold: 0-d tensor: the threshold the last step used (before the first step,
            ``max_norm``: ``inf`` for a policy without a cap).
        steps: number of steps taken, CUDA graph replays included (a Python int read back from
            the device counter: a synchronization on CUDA).

    Raises:
        TypeError: an element of ``parameters`` is not a tensor, ``max_norm`` or ``norm_type``
            is not a number, ``policy`` is not a ``ClipPolicy``, or ``group`` is not a process
            group.
        ValueError: ``parameters`` is empty (without ``group``), ``max_norm`` is negative or NaN
            (or None without a policy), ``norm_type`` is not > 0, ``nonfinite`` is not one of
            its four words, or ``window`` is not an integer in [1, 2**24].

    Example:
        >>> import torch, fastclip
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> clipper = fastclip.GradClipper(model.parameters(), max_norm=1.0,
        ...                                policy=fastclip.ZClip(), nonfinite="skip")
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     model(torch.randn(8, 4)).pow(2).sum().backward()
        ...     norm = clipper.step()
        ...     if not clipper.skipped:
        ...         opt.step()
        >>> clipper.summary()["steps"]
        3
    """

    skipped: torch.Tensor  # these three: see Attributes, above
    found_nonfinite: torch.Tensor
    threshold: torch.Tensor
    window: int

    def __init__(
        self,
        parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
        max_norm: Optional[V.Scalar] = 1.0,
        norm_type: V.NormType = 2.0,
        policy: Optional[ClipPolicy] = None,
        nonfinite: str = "propagate",
        *,
        window: int = 1000,
        group=None,
    ) -> None:
        fn = "GradClipper"
        if group is not None:
            _distributed.check_group(group, fn)
        self.group = group
        params = V.as_list(parameters, fn, "parameters")
        if not params and group is None:
            # torch.optim refuses this too. The usual cause: `model.parameters()`, a generator,
            # was handed to the optimizer first, which used it up; the clipper would then clip
            # nothing, silently, at every step. (A rank with no local grads may join a `group`.)
            raise ValueError(f"{fn}: `parameters` is empty (a generator such as "
                             "`model.parameters()` that was already used, by an optimizer, say?); "
                             "pass `list(model.parameters())` to both")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{fn}: every element of `parameters` must be a torch.Tensor, "
                                f"got {V._describe(p)} at index {i}")
        self.params = params
        self.max_norm = _check_cap(max_norm)
        self.norm_type = V.check_norm_type(norm_type, fn)
        if policy is not None and not isinstance(policy, ClipPolicy):
            hint = " (pass a fixed threshold as `max_norm`)" if isinstance(policy, numbers.Real) \
                else ""
            raise TypeError(f"{fn}: `policy` must be None, fastclip.AutoClip(...), "
                            f"fastclip.ZClip(...) or a fastclip.ClipPolicy of your own, got "
                            f"{V._describe(policy)}{hint}")
        if policy is None and max_norm is None:
            raise ValueError(f"{fn}: `max_norm` is the fixed threshold when `policy` is None, "
                             "so it must be a number (inf: never clip), got None")
        self.policy = policy
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"{fn}: `nonfinite` must be one of {', '.join(map(repr, NONFINITE_MODES))}, "
                             f"got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.window = _check_count(window, fn, "window")
        self._state: Optional[dict[str, torch.Tensor]] = None
        self._policy_state: Optional[dict[str, torch.Tensor]] = None
        self.skipped = torch.tensor(False)
        self.found_nonfinite = torch.tensor(False)
        self.threshold = torch.tensor(self.max_norm)

    # --- the step ----------------------------------------------------------------------------

    @entry_point
    def step(self) -> torch.Tensor:
        """Clip the grads once; return their total norm before clipping (a 0-d tensor).

        Returns ``tensor(0.)`` and records nothing when no parameter has a grad.

        Raises:
            RuntimeError: the norm is inf or NaN and ``nonfinite="error"`` (no grad changed, and
                the clipper's state is as before the call).
            TypeError: a policy's ``threshold`` returned something other than a one-element
                floating-point tensor (raised before any grad is written).

            Bad grads raise as in ``fastclip.clip_grad_norm_``, before any write.
        """
        fn = "GradClipper.step"
        grads, group = _distributed.resolve(V.grads_of(self.params, fn), self.group, fn)
        if not grads and group is None:
            return torch.tensor(0.0)
        plan = Plan.build(grads, fn, "parameters")
        if plan is not None:
            norm = plan.total_norm(self.norm_type, group=group)
        else:
            _distributed.require_kernel(group, fn)
            norm = _TORCH_GET_TOTAL_NORM(grads, self.norm_type, False, None)
        finite = torch.isfinite(norm)
        if self.nonfinite == "error" and not bool(finite):
            raise RuntimeError(
                f"{fn}: the total norm of order {self.norm_type} of the gradients is {float(norm)}, "
                "so it cannot be clipped (nonfinite='error'); no gradient was changed")

        state = self._ensure_state(norm.device)
        max_norm, threshold = self._threshold(norm, finite, state)
        coef = clip_coefficient(max_norm, norm) if isinstance(max_norm, float) else \
            _coefficient(max_norm, norm)
        if self.nonfinite in ("skip", "zero"):
            coef = torch.where(finite, coef, torch.ones_like(coef))  # no write pass at all
        if plan is not None:
            plan.scale_(coef)
        else:
            _scale_with_torch(grads, coef, as_reals=self.nonfinite in ("skip", "zero"))
        if self.nonfinite == "zero":
            _zero_if_nonfinite(grads, finite)

        # A few small ops on the device, no read back (int64 += bool promotes in place). Every
        # update is in place and indexed by the device step counter, never by a Python int, so a
        # replay of a captured step updates the history as an eager step would.
        bad = ~finite
        slot = torch.remainder(state["step"], self.window).reshape(1)
        state["norms"].index_copy_(0, slot, torch.where(finite, norm, math.nan).to(torch.float64)
                                   .reshape(1))
        state["clipped"] += finite & (coef < 1.0)
        state["nonfinite"] += bad
        state["step"] += 1
        # Attributes are the caller's: fresh tensors, never the state (nor one another), which an
        # in-place change by the caller would then alter for later steps and checkpoints.
        self.found_nonfinite = bad
        self.skipped = bad.clone() if self.nonfinite == "skip" else torch.zeros_like(bad)
        self.threshold = threshold
        return norm

    def _threshold(self, norm: torch.Tensor, finite: torch.Tensor, state: dict[str, torch.Tensor]):
        """``(max_norm, threshold)``: what the coefficient is computed from, and it as a tensor.

        A fixed threshold stays a Python float, so the coefficient is bit for bit the one of
        ``clip_grad_norm_(parameters, max_norm)``; a policy's is a 0-d tensor in the norm's dtype.
        """
        cap = self.max_norm
        if self.policy is None:
            # The caller's copy (see ``step``), always converted from the float64 original
            # (a conversion of a conversion would report float32's rounding of max_norm in a
            # float64 step).
            return cap, state["fixed"].to(norm.dtype, copy=True)
        policy_state = cast(dict, self._policy_state)  # made with the state (_ensure_state)
        value = self.policy.threshold(policy_state, state["step"],
                                      norm.to(torch.float64), finite)
        if not (isinstance(value, torch.Tensor) and value.numel() == 1
                and value.is_floating_point()):
            # Checked before any grad is written (the write would broadcast it, then the
            # bookkeeping below would fail with torch's words).
            raise TypeError(f"{type(self.policy).__name__}.threshold must return a one-element "
                            f"floating-point tensor, got {V._describe(value)}")
        value = value.reshape(())
        value = torch.where(value.isnan(), cap, torch.clamp(value, max=cap)).to(norm.dtype)
        return value, value

    def _initial_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "step": torch.zeros((), dtype=torch.int64, device=device),  # steps taken
            "norms": torch.full((self.window,), math.nan, dtype=torch.float64, device=device),
            "clipped": torch.zeros((), dtype=torch.int64, device=device),
            "nonfinite": torch.zeros((), dtype=torch.int64, device=device),
            "fixed": torch.full((), self.max_norm, dtype=torch.float64, device=device),
            "false": torch.zeros((), dtype=torch.bool, device=device),  # kept for checkpoints
        }

    def _ensure_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._state is None:
            self._state = self._initial_state(device)
            if self.policy is not None:
                self._policy_state = self.policy.init_state(device)
        elif self._state["norms"].device != device:  # the model moved: the history follows it
            self._state = {k: v.to(device) for k, v in self._state.items()}
            if self._policy_state is not None:
                self._policy_state = {k: v.to(device) for k, v in self._policy_state.items()}
        return self._state

    # --- reporting ---------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Steps taken, replays of a captured step included (read back from the device: a
        synchronization on CUDA)."""
        return 0 if self._state is None else int(self._state["step"])

    def summary(self, percentiles: Sequence[float] = (0, 5, 25, 50, 75, 95, 100)) -> dict:
        """Statistics of the steps so far (reads them back to the host: not for every step).

        Args:
            percentiles: the percentiles of the norm to report: numbers in [0, 100].

        Returns:
            A dict: ``steps``; ``clipped_steps`` and ``clipped_fraction`` (steps whose grads
            were scaled down, over all steps); ``nonfinite_steps``; ``norm_percentiles``
            (percentile -> norm, over the finite norms of the last ``window`` steps; NaN when
            there are none); ``threshold`` (the last step's, or None before the first step).

        Raises:
            TypeError: ``percentiles`` is not an iterable of numbers.
            ValueError: a percentile is outside [0, 100].
        """
        qs = _check_percentiles(percentiles)
        if self._state is None:
            return {"steps": 0, "clipped_steps": 0, "clipped_fraction": 0.0, "nonfinite_steps": 0,
                    "norm_percentiles": {q: math.nan for q in qs}, "threshold": None}
        norms = self._state["norms"]
        values = torch.nanquantile(norms, torch.tensor([q / 100.0 for q in qs], dtype=torch.float64,
                                                       device=norms.device)) if qs else norms[:0]
        host = torch.cat([values, torch.stack([self._state["step"].double(),
                                               self._state["clipped"].double(),
                                               self._state["nonfinite"].double(),
                                               self.threshold.double().to(norms.device)])]).tolist()
        steps, clipped, nonfinite, threshold = int(host[-4]), int(host[-3]), int(host[-2]), host[-1]
        return {
            "steps": steps,
            "clipped_steps": clipped,
            "clipped_fraction": clipped / steps if steps else 0.0,
            "nonfinite_steps": nonfinite,
            "norm_percentiles": dict(zip(qs, host[:len(qs)])),
            # A state loaded from a checkpoint saved before the first step has taken none.
            "threshold": threshold if steps else None,
        }

    # --- checkpoints -------------------------------------------------------------------------

    def _config(self) -> dict:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type, "nonfinite": self.nonfinite,
                "window": self.window,
                "policy": None if self.policy is None else self.policy.config()}

    def state_dict(self) -> dict:
        """Everything a resumed run needs to clip exactly as an uninterrupted one.

        The tensors are copies, on the device they live on; ``torch.save`` them with the model's
        checkpoint.
        """
        clone = (lambda d: None if d is None else {k: v.clone() for k, v in d.items()})
        return {"version": _STATE_VERSION, "config": self._config(), "steps": self.steps,
                "state": clone(self._state), "policy_state": clone(self._policy_state),
                "threshold": self.threshold.clone()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``state_dict()``; the clipper must be configured as the one that saved it.

        A clipper that has stepped already receives the values in its own state tensors (copied in
        place, to their device), so a CUDA graph captured before the load stays valid.

        Raises:
            ValueError: the checkpoint comes from a clipper with other arguments (``max_norm``,
                ``norm_type``, ``nonfinite``, ``window`` or ``policy``), is not a
                ``GradClipper`` state, or lacks a part or holds a tensor of another shape or dtype
                than this clipper's. Every part is checked before anything is loaded.
        """
        state, policy_state, threshold = self._checked_checkpoint(state_dict)
        # Nothing is written before every part of the checkpoint has been checked.
        if state is None and self._state is not None:
            # Saved before its first step, loaded into a clipper that has stepped: its own
            # tensors go back to their initial values (a captured graph keeps pointing at them).
            device = self._state["norms"].device
            state = self._initial_state(device)
            if self.policy is not None:
                policy_state = self.policy.init_state(device)
        self._state = _load_into(self._state, state)
        self._policy_state = _load_into(self._policy_state, policy_state)
        self.threshold = threshold.clone()
        device = self.threshold.device
        self.skipped = torch.zeros((), dtype=torch.bool, device=device)
        self.found_nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def _checked_checkpoint(self, state_dict: object) -> tuple:
        """``(state, policy_state, threshold)`` of ``state_dict`` once every part is checked
        against this clipper's own layout (keys, shapes, dtypes), in today's layout."""
        fn = "GradClipper.load_state_dict"
        if not isinstance(state_dict, dict) or state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"{fn}: `state_dict` is not a GradClipper state (version "
                             f"{_STATE_VERSION}), got {V._describe(state_dict)}")
        missing = [k for k in ("config", "state", "policy_state", "threshold") if k not in state_dict]
        if missing or not isinstance(state_dict["config"], dict):
            raise ValueError(f"{fn}: `state_dict` is not a complete GradClipper state (missing "
                             f"{', '.join(map(repr, missing)) or 'a dict as config'})")
        saved = dict(state_dict["config"])
        if isinstance(saved.get("policy"), dict) and saved["policy"].get("name") in BUILT_IN:
            # Rebuilt, so that a checkpoint saved before a new argument gets its default.
            try:
                saved["policy"] = policy_from_config(saved["policy"]).config()
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{fn}: `state_dict` holds a policy that cannot be rebuilt "
                                 f"({exc})") from None
        mine = self._config()
        if saved != mine:
            diff = ", ".join(f"{k}: saved {saved.get(k)!r}, here {mine[k]!r}"
                             for k in mine if saved.get(k) != mine[k])
            raise ValueError(f"{fn}: `state_dict` comes from a clipper configured differently ({diff})")

        state, policy_state = state_dict["state"], state_dict["policy_state"]
        threshold = state_dict["threshold"]
        if not (isinstance(threshold, torch.Tensor) and threshold.dim() == 0
                and threshold.is_floating_point()):
            raise ValueError(f"{fn}: `state_dict['threshold']` must be a 0-d floating-point "
                             f"tensor, got {V._describe(threshold)}")
        if state is None:
            if policy_state is not None:
                raise ValueError(f"{fn}: `state_dict` has a policy state but no clipper state")
            return None, None, threshold
        state = _check_layout(state, self._initial_state(torch.device("meta")), fn, "state",
                              upgrade=lambda d: _with_step_counter(d, state_dict.get("steps", 0)))
        if self.policy is None:
            if policy_state is not None:
                raise ValueError(f"{fn}: `state_dict` has a policy state, and this clipper has "
                                 "no policy")
            return state, None, threshold
        policy = self.policy
        try:
            expected = policy.init_state(torch.device("meta"))
        except Exception:  # a policy of one's own whose ops have no meta kernel
            expected = policy.init_state(torch.device("cpu"))
        policy_state = _check_layout(policy_state, expected, fn, "policy_state",
                                     upgrade=lambda d: policy._upgrade_state(d, state["step"]))
        return state, policy_state, threshold

    def __repr__(self) -> str:
        policy = "fixed" if self.policy is None else repr(self.policy)
        return (f"GradClipper(max_norm={self.max_norm}, norm_type={self.norm_type}, policy={policy}, "
                f"nonfinite={self.nonfinite!r}, steps={self.steps})")


def _with_step_counter(state: dict, steps: object) -> dict:
    """A state saved before the device step counter existed, with it (from the saved count)."""
    if "step" in state or not isinstance(state.get("norms"), torch.Tensor):
        return state
    return {"step": torch.tensor(int(steps), dtype=torch.int64,  # type: ignore[call-overload]
                                 device=state["norms"].device), **state}


def _check_layout(saved: object, expected: dict, fn: str, key: str, upgrade) -> dict:
    """``saved`` after ``upgrade``, once it is checked to have ``expected``'s keys and tensors of
    its shapes and dtypes (ValueError otherwise)."""
    if not isinstance(saved, dict):
        raise ValueError(f"{fn}: `state_dict[{key!r}]` must be a dict of tensors, got "
                         f"{V._describe(saved)}")
    layout: dict = upgrade(saved)
    if layout.keys() != expected.keys():
        raise ValueError(f"{fn}: `state_dict[{key!r}]` has the keys {sorted(map(str, layout))}, "
                         f"expected {sorted(expected)}")
    for k, want in expected.items():
        got = layout[k]
        if not (isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype):
            raise ValueError(f"{fn}: `state_dict[{key!r}][{k!r}]` must be a {want.dtype} tensor of "
                             f"shape {tuple(want.shape)}, got {V._describe(got)}")
    return layout


def _load_into(current: Optional[dict], saved: Optional[dict]) -> Optional[dict]:
    """``saved``'s values in ``current``'s tensors, in place (the layouts were checked equal);
    copies of ``saved`` when there is no ``current`` yet."""
    if saved is None:
        return None
    if current is not None:
        for k, v in saved.items():
            current[k].copy_(v)
        return current
    return {k: v.clone() for k, v in saved.items()}


def _coefficient(threshold: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """torch's coefficient for a threshold held in a 0-d tensor, without reading it.

    torch's ``clip_grad_norm_`` turns ``max_norm`` into a Python float, and ``float / tensor``
    is ``tensor.reciprocal() * float``: written so here, the coefficient is bit for bit the one
    torch computes for ``max_norm=float(threshold)``, on any device.
    """
    return torch.clamp((norm + 1e-6).reciprocal() * threshold, max=1.0)


def _check_cap(max_norm: object) -> float:
    if max_norm is None:
        return math.inf
    if isinstance(max_norm, torch.Tensor):  # read once, here (a GPU tensor: one sync, not per step)
        if max_norm.numel() != 1 or max_norm.is_complex() or max_norm.dtype == torch.bool:
            raise TypeError(f"GradClipper: `max_norm` must be a real number, a one-element "
                            f"tensor or None, got {V._describe(max_norm)}")
        max_norm = max_norm.item()
    max_norm = V._one_number(max_norm)
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(f"GradClipper: `max_norm` must be a real number or None, "
                        f"got {V._describe(max_norm)}")
    value = V.as_float(max_norm, "GradClipper", "max_norm")
    if math.isnan(value) or value < 0:
        raise ValueError(f"GradClipper: `max_norm` must be a non-negative number, got {value!r}")
    return value


def _check_percentiles(percentiles: object) -> list[float]:
    fn = "GradClipper.summary"
    if isinstance(percentiles, (str, bytes)) or not isinstance(percentiles, abc.Iterable):
        raise TypeError(f"{fn}: `percentiles` must be a sequence of numbers in [0, 100], got "
                        f"{V._describe(percentiles)}")
    qs = []
    for q in percentiles:
        q = V._one_number(q.item() if isinstance(q, torch.Tensor) and q.numel() == 1 else q)
        if isinstance(q, bool) or not isinstance(q, numbers.Real):
            raise TypeError(f"{fn}: `percentiles` must hold numbers in [0, 100], got {V._describe(q)}")
        if not 0.0 <= float(q) <= 100.0:
            raise ValueError(f"{fn}: `percentiles` must be in [0, 100], got {float(q)!r}")
        qs.append(float(q))
    return qs


def _scale_with_torch(grads: list[torch.Tensor], coef: torch.Tensor, as_reals: bool) -> None:
    """Scale the grads no kernel takes (complex ones, devices without a backend) by torch's ops.

    On the CPU a coefficient of 1 writes nothing, as the kernels do. With ``as_reals`` a complex
    grad is scaled as its two real parts: a complex multiply by ``coef + 0j`` turns an inf part
    into NaN in the other one, which a skipped step must not do to the grads it leaves alone.
    """
    if coef.device.type == "cpu" and bool(coef == 1.0):  # reading a CPU tensor is free
        return
    for g in grads:
        (torch.view_as_real(g) if as_reals and g.is_complex() else g).mul_(coef.to(g.device))


def _zero_if_nonfinite(grads: list[torch.Tensor], finite: torch.Tensor) -> None:
    """Zero every grad when ``finite`` is False, without reading it back from a GPU.

    On the CPU the flag is read (free). On CUDA a kernel reads the flag on the device and returns
    at once when it is set (without numba-cuda, torch's ``masked_fill_`` under the flag: a pass
    per grad, still no read back); other devices read the flag back.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    host_flag: Optional[bool] = None
    for device, members in by_device.items():
        if device.type == "cuda":
            from fastclip.agc import _cuda_kernels

            kernels = _cuda_kernels()
            if kernels is not None:
                _zero_cuda(kernels, members, device, finite)
                continue
            # No kernels: torch zeroes them under a device-side mask (no read back).
            flag = (~finite).to(device).reshape(())
            for g in members:
                g.masked_fill_(flag, 0.0)
            continue
        if host_flag is None:
            host_flag = bool(finite)
        if not host_flag:
            for g in members:
                g.zero_()


def _zero_cuda(kernels, grads: list[torch.Tensor], device: torch.device, finite: torch.Tensor) -> None:
    import numpy as np

    from fastclip._cuda import numba_array, numba_launch, numba_upload
    from fastclip._table import DTYPE_CODES, mark_written

    flag_t = (~finite).to(device=device, dtype=torch.int32).reshape(1)
    dense = [g for g in grads if is_dense(g)]
    for g in grads:
        if not is_dense(g):  # a sliced view: torch writes it (a pass over that grad only)
            g.masked_fill_(flag_t.bool().reshape(()), 0.0)
    if not dense:
        return
    addrs = np.array([g.data_ptr() for g in dense], dtype=np.int64)
    codes = np.array([DTYPE_CODES[g.dtype] for g in dense], dtype=np.int64)
    lengths = np.array([g.numel() for g in dense], dtype=np.int64)
    keep = []

    def to_device(a):
        keep.append(numba_upload(a, device))
        return numba_array(keep[-1])

    with numba_launch(device) as stream:
        kernels.run_zero_if(numba_array(flag_t), addrs, codes, lengths, to_device, stream)
    mark_written(dense)


__all__ = ["GradClipper", "AutoClip", "ZClip", "NONFINITE_MODES"]
