"""fastclip: torch's gradient clipping on fused Numba kernels, exact and fast.

    >>> import torch, fastclip
    >>> model = torch.nn.Linear(4, 2)
    >>> model(torch.randn(8, 4)).sum().backward()
    >>> norm = fastclip.clip_grad_norm_(model.parameters(), max_norm=1.0)
"""

from fastclip.clip_grad import (
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
)
from fastclip._patch import patch, patched, unpatch
from fastclip.amp import unscale_and_clip_
from fastclip.stats import ClipStats
from fastclip.step import clip_and_step
from fastclip.agc import adaptive_grad_clip_
from fastclip.clipper import GradClipper
from fastclip.policies import AutoClip, ClipPolicy, ZClip
from fastclip.warmup import warmup

__version__ = "0.1.0"

__all__ = [
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "patch",
    "patched",
    "unpatch",
    "unscale_and_clip_",
    "clip_and_step",
    "ClipStats",
    "GradClipper",
    "AutoClip",
    "ZClip",
    "ClipPolicy",
    "adaptive_grad_clip_",
    "warmup",
]
