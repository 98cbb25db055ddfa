"""AGC for DTensor parameters whose units are split across ranks.

AGC's unit is a row (dim 0) of a weight of two or more dimensions, or a whole vector. A placement
that shards a weight along dim 0 (FSDP2's weights, column-parallel layers) leaves every row whole
in one rank's shard, and replication leaves everything whole: the kernels clip those shards as
plain tensors. Any other ``Shard`` splits units: FSDP2's sharded biases and norm scales
(``Shard(0)`` of a vector), row-parallel weights (``Shard(1)``). Their norms are sums over the
ranks that share a unit, so here each rank computes its shard's float64 sums of squares per unit,
all-reduces over the mesh dimensions that split units add them up (one per such dimension, for
each mesh and set of dimensions), and every rank applies the same factors to its own shard, with
the kernels' formula and rounding.
"""

from __future__ import annotations

import torch

from fastclip import _distributed
from fastclip._table import mark_written
from fastclip.kernels.agc import GRAD_NORM_FLOOR


def splits_units(placement, ndim: int) -> bool:
    """True when ``placement`` (Replicate, Shard or _StridedShard) cuts AGC's units of a tensor
    of ``ndim`` dims: anything but replication and a split along dim 0 of a weight (FSDP2 over
    tensor parallel places a column-parallel weight ``(_StridedShard(0), Shard(0))``: rows whole)."""
    if placement.is_replicate():
        return False
    return not (ndim >= 2 and _distributed._splits(placement) and placement.dim == 0)


def _unit_sums(t: torch.Tensor) -> torch.Tensor:
    """Float64 sums of squares of ``t``'s units (its rows, or the whole of a vector), 1-d."""
    if t.dim() >= 2:
        dims = tuple(range(1, t.dim()))
        return torch.linalg.vector_norm(t, 2, dim=dims, dtype=torch.float64).square()
    return torch.linalg.vector_norm(t, 2, dtype=torch.float64).square().reshape(1)


def unit_factors(w_norm: torch.Tensor, g_norm: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    """``kernels.agc.unit_coef`` in torch ops, from the units' weight and grad norms."""
    max_norm = torch.maximum(w_norm, torch.full_like(w_norm, eps)) * clipping  # NaN wins
    return torch.where(g_norm > max_norm, max_norm / g_norm.clamp(min=GRAD_NORM_FLOOR),
                       torch.ones_like(g_norm))


def clip_split_(pairs: list, clipping: float, eps: float) -> None:
    """Clip ``(parameter, grad)`` DTensor pairs whose units are split across ranks, in place.

    Every rank of each mesh must call this with the same pairs in the same order (the
    all-reduces are matched by order), empty local shards included. One all-reduce per mesh
    dimension that splits units, for each mesh and set of such dimensions.
    """
    # A grad listed twice is clipped twice, the second time from the first's result (as the
    # kernels' rounds do): its later listings go to later rounds. Rounds follow the parameter
    # list, so every rank runs the same collectives.
    rounds: list[list] = []
    listed: dict[int, int] = {}
    for pair in pairs:
        r = listed[id(pair[1])] = listed.get(id(pair[1]), -1) + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(pair)
    for round_ in rounds:
        _clip_round_(round_, clipping, eps)


def _clip_round_(pairs: list, clipping: float, eps: float) -> None:
    import torch.distributed as dist

    buckets: dict = {}  # (mesh, mesh dims that split units) -> pairs; meshes compare by value
    for p, g in pairs:
        dims = tuple(k for k, pl in enumerate(g.placements) if splits_units(pl, g.dim()))
        buckets.setdefault((g.device_mesh, dims), []).append((p, g))
    for (mesh, dims), members in buckets.items():
        local = [(_distributed._local(p).detach(), _distributed._local(g)) for p, g in members]
        sums = [s for w, g in local for s in (_unit_sums(w), _unit_sums(g))]
        flat = torch.cat(sums)
        for k in dims:
            dist.all_reduce(flat, group=mesh.get_group(k))
        offset = 0
        for w, g in local:
            n = g.shape[0] if g.dim() >= 2 else 1
            w_sq, g_sq = flat[offset:offset + n], flat[offset + n:offset + 2 * n]
            offset += 2 * n
            coef = unit_factors(w_sq.sqrt(), g_sq.sqrt(), clipping, eps)
            coef = coef.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
            # One factor per row, broadcast; never a 0-d operand (torch's CUDA mul_ would round
            # a 0-d float32 factor to a 16-bit grad's dtype): float32 arithmetic, one rounding.
            g.mul_(coef.reshape((n,) + (1,) * (g.dim() - 1)) if g.dim() >= 2 else coef)
        mark_written([g for _, g in local])
