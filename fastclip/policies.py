"""Adaptive clipping thresholds for ``GradClipper``: ``AutoClip`` and ``ZClip``.

A policy is a small frozen configuration. Its running state lives in a dict of tensors on the
grads' device that ``GradClipper`` owns (so one policy object may serve several clippers), and
every update is a handful of tensor ops: no value is read back to the host, so a CUDA training
loop is never synchronized by the threshold.

Both policies see the total norm of each step as a float64 0-d tensor and a 0-d bool ``finite``;
a step whose norm is inf or NaN never enters a policy's history.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, is_dataclass

import torch

from fastclip import _validate as V

NAN = float("nan")


def _check_number(value: object, owner: str, arg: str, low: float, high: float,
                  low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: `{arg}` must be a real number, got {value!r} of type "
                        f"{type(value).__name__}")
    out = V.as_float(value, owner, arg)
    below = out <= low if low_open else out < low
    above = out >= high if high_open else out > high
    if math.isnan(out) or below or above:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{owner}: `{arg}` must be in {lo}{low}, {high}{hi}, got {out!r}")
    return out


# torch.quantile's (and nanquantile's) largest input: a longer history or window could never be
# read, and each step would raise torch's own message, which names no argument.
MAX_COUNT = 2**24


def _check_count(value: object, owner: str, arg: str) -> int:
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or not 1 <= int(value) <= MAX_COUNT):
        raise ValueError(f"{owner}: `{arg}` must be an integer in [1, {MAX_COUNT}], got {value!r}")
    return int(value)


class ClipPolicy:
    """Base class of adaptive thresholds (see ``AutoClip`` and ``ZClip``).

    A policy of your own implements ``init_state`` and ``threshold``. Make it a frozen dataclass
    (as ``AutoClip`` and ``ZClip`` are), or override ``config``, so that a checkpoint records its
    arguments and ``GradClipper.load_state_dict`` can tell a clipper with other arguments apart.

    Example:
        >>> import dataclasses, torch, fastclip
        >>> @dataclasses.dataclass(frozen=True)
        ... class HalfOfPeak(fastclip.ClipPolicy):  # half the largest finite norm so far
        ...     def init_state(self, device):
        ...         return {"peak": torch.zeros((), dtype=torch.float64, device=device)}
        ...     def threshold(self, state, step, norm, finite):
        ...         peak = torch.where(finite, torch.maximum(state["peak"], norm), state["peak"])
        ...         state["peak"].copy_(peak)
        ...         return peak / 2
        >>> w = torch.zeros(2, requires_grad=True)
        >>> clipper = fastclip.GradClipper([w], max_norm=None, policy=HalfOfPeak())
        >>> w.grad = torch.tensor([3.0, 4.0]); clipper.step(); w.grad  # threshold 2.5
        tensor(5.)
        tensor([1.5000, 2.0000])
    """

    def init_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Fresh running state, as tensors on ``device``."""
        raise NotImplementedError

    def threshold(self, state: dict[str, torch.Tensor], step: torch.Tensor, norm: torch.Tensor,
                  finite: torch.Tensor) -> torch.Tensor:
        """Update ``state`` with this step's ``norm``; return this step's float64 threshold.

        Args:
            state: the dict ``init_state`` made, on the grads' device (the clipper keeps it).
            step: the clipper's step counter (see below).
            norm: this step's total norm, a 0-d float64 tensor (inf or NaN when not finite).
            finite: 0-d bool tensor, whether ``norm`` is finite.

        Returns:
            A one-element floating-point tensor on the grads' device (anything else is refused
            before any grad is written).

        ``step`` counts the clipper's steps from 0: a 0-d int64 tensor on the device (comparing
        it in Python, ``if step < n``, reads it back: a sync on CUDA). Update ``state``'s tensors
        in place, and index them with ``step`` through ops such as ``index_copy_`` (torch reads a
        0-d tensor used in ``[...]`` back to the host), so that a step captured in a CUDA graph
        replays correctly. The threshold may be NaN (no
        history yet) or inf (no clipping); ``GradClipper`` then falls back to its ``max_norm``.
        """
        raise NotImplementedError

    def _upgrade_state(self, state: dict, step: torch.Tensor) -> dict:
        """``state`` as loaded from a checkpoint of an earlier fastclip, in today's layout
        (``step``: the clipper's saved step counter). The default keeps it as it is."""
        return state

    def config(self) -> dict:
        """The policy's class name and arguments (a dataclass's fields), for checkpoints."""
        fields: dict = asdict(self) if is_dataclass(self) else {}
        return {"name": type(self).__name__, **fields}


@dataclass(frozen=True)
class AutoClip(ClipPolicy):
    """Clip to a percentile of the norms seen so far (AutoClip).

    Each step's norm joins the history first, then the threshold is the ``percentile``-th
    percentile of the history (linear interpolation, as ``numpy.percentile``): with the default
    10, about 90% of steps are clipped, gently. The history is the last ``history`` finite norms
    (a ring buffer on the grads' device; the paper keeps every step). A step whose norm is inf or
    NaN leaves it as it was, so a burst of overflowing AMP steps does not empty it.

    Each step takes the percentile of the whole buffer on the device (a sort: about 30 ms per
    step on one CPU core for a history of 10**5), so keep ``history`` to the thousands.

    Args:
        percentile: in [0, 100].
        history: how many recent finite norms the percentile is taken over, in [1, 2**24].

    Raises:
        TypeError: ``percentile`` is not a real number.
        ValueError: ``percentile`` is outside [0, 100], or ``history`` is not an integer in
            [1, 2**24].

    Example:
        >>> import torch, fastclip
        >>> model = torch.nn.Linear(4, 2)
        >>> clipper = fastclip.GradClipper(model.parameters(), max_norm=None,
        ...                                policy=fastclip.AutoClip(percentile=10))

    References:
        P. Seetharaman, G. Wichern, B. Pardo, J. Le Roux. "AutoClip: Adaptive Gradient Clipping
        for Source Separation Networks", IEEE MLSP 2020 (arXiv:2007.14469).
    """

    percentile: float = 10.0
    history: int = 1000

    def __post_init__(self):
        object.__setattr__(self, "percentile",
                           _check_number(self.percentile, "AutoClip", "percentile", 0.0, 100.0))
        object.__setattr__(self, "history", _check_count(self.history, "AutoClip", "history"))

    def init_state(self, device):
        return {"norms": torch.full((self.history,), NAN, dtype=torch.float64, device=device),
                "count": torch.zeros((), dtype=torch.int64, device=device)}  # finite norms seen

    def threshold(self, state, step, norm, finite):
        norms, count = state["norms"], state["count"]
        # The next slot of the ring, rewritten with itself when the norm is not finite: no
        # branch on a device value, so a captured step replays as an eager one.
        slot = torch.remainder(count, self.history).reshape(1)
        norms.scatter_(0, slot, torch.where(finite, norm, norms.gather(0, slot)).reshape(1))
        count += finite
        return torch.nanquantile(norms, self.percentile / 100.0)

    def _upgrade_state(self, state: dict, step: torch.Tensor) -> dict:
        """A state saved before ``count`` existed: its ring was filled one slot per step."""
        if "count" in state:
            return state
        return {**state, "count": step.to(device=state["norms"].device, copy=True)}


@dataclass(frozen=True)
class ZClip(ClipPolicy):
    """Clip norm spikes by their z-score against an EMA of the norm (ZClip).

    The first ``warmup`` finite norms are collected and give the initial mean and (population)
    variance; no spike is clipped before. Then, for each norm ``g`` with ``std = sqrt(var)`` and
    ``z = (g - mean) / (std + 1e-6)``:

    - if ``z > z_thresh`` (a spike), the threshold is ``mean + z_thresh**2 * std / z`` (the
      paper's *adaptive scaling*: the larger the spike, the harder it is clipped), and the EMA is
      updated with that threshold instead of the spike;
    - otherwise the step is not clipped by ZClip, and the EMA is updated with ``g``.

    The EMA update is ``mean = alpha * mean + (1 - alpha) * v``, then
    ``var = alpha * var + (1 - alpha) * (v - mean)**2`` with the updated mean, as in the
    reference implementation. ``GradClipper``'s ``max_norm`` still caps the threshold (it is
    the only threshold during warmup), like the reference's ``max_grad_norm``.

    Args:
        alpha: EMA smoothing factor, in (0, 1).
        z_thresh: z-score above which a norm is a spike (> 0).
        warmup: finite steps collected before the EMA starts, in [1, 2**24]. With 1, or with
            equal norms throughout the warmup, the variance starts at 0: every larger norm is
            then a spike clipped to the mean, the EMA takes that mean, and the threshold never
            rises (as in the reference implementation). Keep the default's 25, or more.

    Raises:
        TypeError: ``alpha`` or ``z_thresh`` is not a real number.
        ValueError: ``alpha`` is outside (0, 1), ``z_thresh`` is not > 0 and finite, or
            ``warmup`` is not an integer in [1, 2**24].

    Example:
        >>> import torch, fastclip
        >>> model = torch.nn.Linear(4, 2)
        >>> clipper = fastclip.GradClipper(model.parameters(), max_norm=None,
        ...                                policy=fastclip.ZClip(alpha=0.97, z_thresh=2.5))

    References:
        A. Kumar, L. Owen, N. R. Chowdhury, F. Güra. "ZClip: Adaptive Spike Mitigation for LLM
        Pre-Training", 2025 (arXiv:2504.02507); reference code: github.com/bluorion-com/ZClip
        (``mode="zscore"``, ``clip_option="adaptive_scaling"``, ``clip_factor=1``).
    """

    alpha: float = 0.97
    z_thresh: float = 2.5
    warmup: int = 25

    EPS = 1e-6  # added to std in the z-score, as in the reference implementation

    def __post_init__(self):
        object.__setattr__(self, "alpha", _check_number(self.alpha, "ZClip", "alpha", 0.0, 1.0,
                                                        low_open=True, high_open=True))
        object.__setattr__(self, "z_thresh", _check_number(self.z_thresh, "ZClip", "z_thresh",
                                                           0.0, math.inf, low_open=True,
                                                           high_open=True))
        object.__setattr__(self, "warmup", _check_count(self.warmup, "ZClip", "warmup"))

    def init_state(self, device):
        f64 = dict(dtype=torch.float64, device=device)
        return {
            "count": torch.zeros((), dtype=torch.int64, device=device),  # finite norms seen
            "warm": torch.zeros((self.warmup,), **f64),
            "mean": torch.zeros((), **f64),
            "var": torch.zeros((), **f64),
        }

    def threshold(self, state, step, norm, finite):
        count, mean, var = state["count"], state["mean"], state["var"]
        ready = count >= self.warmup
        std = var.sqrt()
        z = (norm - mean) / (std + self.EPS)
        spike = ready & finite & (z > self.z_thresh)
        # The reference's order of operations: eta = z / z_thresh; mean + (z_thresh * std) / eta.
        adaptive = mean + (self.z_thresh * std) / (z / self.z_thresh)
        value = torch.where(spike, adaptive, norm)
        new_mean = self.alpha * mean + (1.0 - self.alpha) * value
        dev = value - new_mean
        new_var = self.alpha * var + (1.0 - self.alpha) * (dev * dev)
        update = ready & finite

        # Warmup: collect finite norms; the step that completes the set initializes the EMA.
        collect = ~ready & finite
        warm = state["warm"]
        slot = count.clamp(max=self.warmup - 1).reshape(1)
        warm.scatter_(0, slot, torch.where(collect, norm, warm.gather(0, slot)))
        count = count + collect.to(torch.int64)
        done = collect & (count == self.warmup)
        # Sequential sums (cumsum), so the initial moments are those of a plain Python loop.
        init_mean = warm.cumsum(0)[-1] / self.warmup
        init_dev = warm - init_mean
        init_var = (init_dev * init_dev).cumsum(0)[-1] / self.warmup

        # In place (after every read of the old values): a captured step replays correctly.
        new_mean = torch.where(done, init_mean, torch.where(update, new_mean, mean))
        new_var = torch.where(done, init_var, torch.where(update, new_var, var))
        state["count"].copy_(count)
        state["mean"].copy_(new_mean)
        state["var"].copy_(new_var)
        return torch.where(spike, adaptive, torch.inf)


BUILT_IN = {"AutoClip": AutoClip, "ZClip": ZClip}


def policy_from_config(config: dict) -> ClipPolicy:
    """Rebuild a built-in policy from ``ClipPolicy.config()``."""
    args = dict(config)
    kind = BUILT_IN.get(args.pop("name", None))
    if kind is None:
        raise ValueError(f"unknown clipping policy in checkpoint: {config!r}")
    return kind(**args)


__all__ = ["ClipPolicy", "AutoClip", "ZClip", "policy_from_config"]
