"""Global norms across ranks (torch.distributed). Placeholder: see issue 6."""

from __future__ import annotations


def all_reduce_power_sum(total, p, group, device):
    raise NotImplementedError("fastclip: `group=` is not implemented yet")
