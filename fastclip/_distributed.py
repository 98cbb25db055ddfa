"""Global norms across ranks: ``group=`` and DTensor grads, with one scalar all-reduce.

Every rank runs the fused read pass over the tensors it holds and gets a float64 sum of |x|**p
(max |x| for inf). The ranks then all-reduce that one scalar (SUM, or MAX for inf), and every
rank takes the root of the same value, so all of them apply the same coefficient. Nothing else
crosses the wire, and on CUDA the scalar stays a device tensor (no host sync).

What is summed over which ranks:

- A plain tensor stands for itself. With ``group=None`` it is counted on this rank only (right
  when the tensors are identical on every rank, as after DDP's all-reduce, or in one process).
  With ``group=G`` the plain tensors of all ranks of ``G`` are summed: they are shards.
- A DTensor stands for its whole global tensor. Its local shard goes to the kernel. ``Shard``
  mesh dims split it; ``Replicate`` dims hold copies, counted only at mesh coordinate 0 of those
  dims; ``Partial`` is rejected (local values are unreduced summands, so their norm is unknown).
  - ``group=None``: each device mesh is reduced over the mesh dims where some grad on it is
    sharded. One all-reduce per mesh (on a 1-D mesh, on a mesh spanning the world, or when
    only one dim is sharded); an N-D sub-mesh sharded on k dims costs k. No sharded dim: none.
  - ``group=G``: every DTensor's mesh must lie within ``G``; everything joins the one
    all-reduce over ``G`` (use this for pipeline stages: ``G`` = the world).

The host work per call is linear in the number of tensors: one pass reads each DTensor's spec
(one dict lookup per tensor); coordinates, groups and rank sets are worked out once per distinct
(mesh, placements) and cached across calls. No per-tensor collective, ever.

Every rank must make the same call (SPMD): the same ``norm_type``, the same ``group``, DTensors
on the same meshes in the same order. This is not checked (checking would cost a collective, and
a host sync on CUDA): a mismatch gives wrong, rank-dependent norms or a hang. So does an error
raised on one rank only, before the all-reduce (bad input there): the others wait in it.

For inf the scalar travels as its int64 bit pattern under MAX: gloo's float MAX loses a NaN from
any rank but the first (measured: it even returned 1.0 for the values 1, NaN, 3, 4).
"""

from __future__ import annotations

import math
import struct
import sys
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from fastclip._plan import exact_sum
from fastclip._validate import _describe

EXCLUDED = -1  # label of a replicated local shard that another rank counts
_CACHE_LIMIT = 256

# No cache holds a process group alive: destroy_process_group() must be able to free them. (A
# group that outlived it was destroyed at interpreter exit, where gloo aborted the process:
# "terminate called without an active exception".) Mesh groups are looked up at each call
# (DeviceMesh.get_group: a registry lookup, under 1 us); the membership check is cached per
# DeviceMesh (a weak key; hash and == compare the layout, so slicing a mesh again finds the
# entry) and per group, kept by weak reference so that an id() reused by a new object never
# matches a stale entry.
_within_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_index_cache: dict = {}


def _dist():
    import torch.distributed as dist

    return dist


def _dtensor_type():
    """The DTensor class when torch.distributed.tensor is imported; None otherwise.

    No DTensor can exist before that module is imported, so plain calls never pay for the import.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def check_group(group: object, fn: str) -> None:
    """Raise unless ``group`` is a ProcessGroup that this rank belongs to."""
    dist = _dist() if torch.distributed.is_available() else None
    if (dist is not None and isinstance(group, int) and not isinstance(group, bool)
            and group == dist.GroupMember.NON_GROUP_MEMBER):
        raise ValueError(
            f"{fn}: this rank is not a member of `group` (torch.distributed.new_group returns "
            "GroupMember.NON_GROUP_MEMBER on the ranks it does not include). Call it with "
            "`group=` only on the group's member ranks.")
    if dist is None or not isinstance(group, dist.ProcessGroup):
        hint = ""
        if type(group).__name__ == "DeviceMesh":
            hint = (" For DTensor grads leave `group=None`: the mesh is read from the DTensors; "
                    "for a mesh dimension's group pass mesh.get_group(dim).")
        raise TypeError(f"{fn}: `group` must be a torch.distributed.ProcessGroup or None, "
                        f"got {_describe(group)}.{hint}")
    if not dist.is_initialized():
        raise RuntimeError(f"{fn}: `group` was given but torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    try:
        rank = dist.get_rank(group)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"{fn}: this rank (global rank {dist.get_rank()}) is not a member of "
                         f"`group`: {err}") from None
    if rank < 0:
        raise ValueError(f"{fn}: this rank (global rank {dist.get_rank()}) is not a member of "
                         "`group`")


def _local(t: torch.Tensor) -> torch.Tensor:
    # `_local_tensor` is the shard itself (same storage); `to_local()` returns a view of it
    # through an autograd Function (~17 us per call).
    local = getattr(t, "_local_tensor", None)
    return local if local is not None else t.to_local()  # type: ignore[attr-defined]


def local_shards(tensors: list, fn: str, linear: bool = True) -> list:
    """DTensors replaced by their local shards, for element-wise passes (scale, clamp).

    Args:
        tensors: the grads.
        fn: the public function's name, for messages.
        linear: True for a pass that commutes with summation (scaling), which is right on
            ``Partial`` shards too; False (clamping) rejects ``Partial`` placements.
    """
    DTensor = _dtensor_type()
    if DTensor is None:
        return tensors
    out = []
    for i, t in enumerate(tensors):
        if isinstance(t, DTensor):
            if not linear and any(pl.is_partial() for pl in t.placements):
                raise ValueError(_partial_message(fn, i, t.placements, "clamped"))
            t = _local(t)
        out.append(t)
    return out


def _partial_message(fn: str, i: int, placements, what: str) -> str:
    return (f"{fn}: the DTensor grad at index {i} has a Partial placement {tuple(placements)}: "
            f"its local values are unreduced summands, so it cannot be {what} shard by shard. "
            "Reduce it first, e.g. grad.redistribute(placements=[Replicate() or Shard(d) for each "
            "Partial]).")


@dataclass
class Reduction:
    """How to turn per-tensor local sums into the global one (given to the plan as `group`).

    Attributes:
        labels: per local tensor, its bucket, or ``EXCLUDED`` (a replica counted elsewhere).
        bucket_groups: per bucket, the process groups to all-reduce over in turn; bucket 0
            holds the plain tensors and is not reduced on its own.
        group: the user's group, all-reduced over last (None: no final all-reduce).

    Every rank builds the same buckets and groups in the same order (they depend on the
    placements, never on the rank's coordinates), so the ranks' collectives always match;
    only the labels (which local shards count) differ between ranks.
    """

    labels: np.ndarray
    bucket_groups: list
    group: Optional[object]


def _world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist.is_initialized() else 1


def _mesh_groups(mesh, dims: tuple) -> list:
    """Process groups whose successive all-reduces sum over the mesh dims ``dims``."""
    if len(dims) == mesh.ndim and mesh.ndim > 1 and mesh.size() == _world_size():
        return [_dist().GroupMember.WORLD]  # the whole mesh is the world: one all-reduce
    return [mesh.get_group(d) for d in dims]


def _mesh_within(mesh, group, fn: str) -> None:
    """Raise unless every rank of ``mesh`` belongs to ``group`` (cached per pair)."""
    dist = _dist()
    if group is dist.GroupMember.WORLD:
        return
    per_group = _within_cache.get(mesh)
    if per_group is None:
        per_group = _within_cache[mesh] = {}
    entry = per_group.get(id(group))
    if entry is None or entry[0]() is not group:
        if len(per_group) >= _CACHE_LIMIT:
            per_group.clear()
        outside = sorted(set(mesh.mesh.flatten().tolist()) - set(dist.get_process_group_ranks(group)))
        entry = per_group[id(group)] = (weakref.ref(group), outside)
    if entry[1]:
        raise ValueError(
            f"{fn}: a DTensor grad lives on {mesh!r}, whose ranks {entry[1]} are not in `group`. "
            "With `group=`, every DTensor's mesh must lie within the group (pass the world, or a "
            "group spanning all the meshes); with `group=None` each mesh is reduced on its own.")


def resolve(tensors: list, group: object, fn: str) -> tuple[list, object]:
    """Check ``group`` and replace DTensors by their local shards.

    Returns:
        ``(local_tensors, group)``: the tensors the kernels read and scale (in the caller's
        order), and what ``Plan.total_norm`` reduces over: None (nothing), a ProcessGroup (the
        local total is all-reduced over it), or a ``Reduction`` (per-bucket sums, see above).
    """
    if group is not None:
        check_group(group, fn)
    DTensor = _dtensor_type()
    if DTensor is None:
        return tensors, group
    # One pass: local shards, and one key per distinct (mesh, placements). Meshes compare by
    # value (hash cached on the mesh), so equal meshes from repeated slicing share a bucket.
    local_tensors = []
    key_of = np.empty(len(tensors), dtype=np.int64)
    keys: dict = {}
    specs: list = []  # per key: (mesh, placements, first index)
    any_dtensor = False
    for i, t in enumerate(tensors):
        if not isinstance(t, DTensor):
            local_tensors.append(t)
            key_of[i] = -1
            continue
        any_dtensor = True
        spec = t._spec
        mesh, placements = spec.mesh, spec.placements
        k = keys.get((mesh, placements))
        if k is None:
            k = keys[(mesh, placements)] = len(specs)
            specs.append((mesh, placements, i))
        key_of[i] = k
        local_tensors.append(_local(t))
    if not any_dtensor:
        return tensors, group
    key_labels, bucket_groups = _label_keys(specs, group, fn)
    labels = np.where(key_of < 0, 0, key_labels[np.maximum(key_of, 0)]) if len(key_of) else key_of
    return local_tensors, _simplify(Reduction(labels, bucket_groups, group))


def _splits(placement) -> bool:
    """Shard, or _StridedShard (FSDP2 over tensor parallel), which is not a Shard subclass."""
    return placement.is_shard() or type(placement).__name__ == "_StridedShard"


def _label_keys(specs: list, group: object, fn: str) -> tuple[np.ndarray, list]:
    """Per distinct (mesh, placements): its bucket or EXCLUDED; and each bucket's groups."""
    sharded: dict = {}  # mesh -> set of mesh dims sharded by some grad (group=None)
    for mesh, placements, i in specs:
        if mesh.get_coordinate() is None:
            raise ValueError(f"{fn}: the DTensor grad at index {i} lives on {mesh!r}, which does "
                             "not include this rank")
        for d, pl in enumerate(placements):
            if pl.is_partial():
                raise ValueError(_partial_message(fn, i, placements, "measured"))
            if _splits(pl):
                sharded.setdefault(mesh, set()).add(d)
            elif not pl.is_replicate():
                raise ValueError(f"{fn}: the DTensor grad at index {i} has placement {pl!r}, "
                                 "which fastclip does not know how to count")
    bucket_groups: list = [[]]
    bucket_of_mesh: dict = {}
    labels = np.empty(len(specs), dtype=np.int64)
    counted_dims: Sequence[int]
    bucket: Optional[int]
    for k, (mesh, placements, _) in enumerate(specs):
        coord = mesh.get_coordinate()
        if group is not None:
            _mesh_within(mesh, group, fn)
            counted_dims = range(mesh.ndim)  # the group sums over every mesh coordinate
            bucket = 0
        else:
            dims = tuple(sorted(sharded.get(mesh, ())))
            counted_dims = dims  # dims outside `dims` are replicated by all: not reduced
            if not dims:
                bucket = 0  # fully replicated: every rank holds it all, nothing to reduce
            else:
                bucket = bucket_of_mesh.get((mesh, dims))
                if bucket is None:
                    bucket = bucket_of_mesh[(mesh, dims)] = len(bucket_groups)
                    bucket_groups.append(_mesh_groups(mesh, dims))
        replica = any(not _splits(placements[d]) and coord[d] != 0 for d in counted_dims)
        labels[k] = EXCLUDED if replica else bucket
    return labels, bucket_groups


def _simplify(r: Reduction) -> object:
    """A ProcessGroup (or None) when one plain all-reduce of the local total is the same thing."""
    if (r.labels == EXCLUDED).any():
        return r
    used = np.unique(r.labels)
    if r.group is not None:
        return r.group if len(r.bucket_groups) == 1 else r
    if len(used) == 0 or (len(used) == 1 and used[0] == 0):
        return None if len(r.bucket_groups) == 1 else r
    if len(used) == 1 and len(r.bucket_groups) == 2 and len(r.bucket_groups[1]) == 1:
        return r.bucket_groups[1][0]
    return r


# ---------------------------------------------------------------------------------------------
# The all-reduce.


def _supports_cpu(group) -> bool:
    try:
        return any(d.type == "cpu" for d in group._device_types)
    except AttributeError:  # older torch: ask for the backend's name
        return "nccl" not in str(_dist().get_backend(group)).lower() or "cpu" in str(
            _dist().get_backend(group)).lower()


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", math.fabs(value)))[0]


def _all_reduce(value: Union[float, torch.Tensor], p: float, group) -> Union[float, torch.Tensor]:
    """All-reduce one float64 (SUM, or MAX for inf) over ``group``; same kind out as in.

    For inf the value goes as its int64 bit pattern under MAX: for non-negative floats the
    integer order is the float order, and a NaN (bits above inf once the sign is cleared) always
    wins, whereas a float MAX may drop NaN depending on the backend and the rank order.
    """
    dist = _dist()
    is_max = p == math.inf
    op = dist.ReduceOp.MAX if is_max else dist.ReduceOp.SUM
    if isinstance(value, float):
        device = torch.device("cpu")
        if not _supports_cpu(group):
            device = torch.device("cuda", torch.cuda.current_device())
        if is_max:
            buf = torch.tensor(_float_bits(value), dtype=torch.int64, device=device)
            dist.all_reduce(buf, op=op, group=group)
            return float(buf.view(torch.float64).item())
        buf = torch.tensor(value, dtype=torch.float64, device=device)
        dist.all_reduce(buf, op=op, group=group)
        return float(buf.item())
    # A device tensor: stays there. abs() also makes a fresh buffer, so the in-place collective
    # never writes into a backend's own result.
    buf = value.reshape(()).to(torch.float64).abs()
    if is_max:
        bits = buf.view(torch.int64)
        dist.all_reduce(bits, op=op, group=group)
        return bits.view(torch.float64)
    dist.all_reduce(buf, op=op, group=group)
    return buf


def _device_index(sel: np.ndarray, device: torch.device) -> torch.Tensor:
    """``sel`` on ``device``, cached: a model's buckets are the same at every step."""
    if device.type == "cuda":
        from fastclip import _cuda

        if _cuda._capturing(device):
            # Never the cache while capturing: an index uploaded now holds its values only once
            # the graph replays (an eager call reading it from the cache would index with
            # garbage), and a cached one a graph reads must outlive the graph (the cache may
            # evict it). The arena's pinned memory is what the captured copy reads at replay.
            return _cuda.upload_int64(np.ascontiguousarray(sel, dtype=np.int64), device, capturing=True)
    key = (device, sel.tobytes())
    idx = _index_cache.get(key)
    if idx is None:
        if len(_index_cache) >= _CACHE_LIMIT:
            _index_cache.clear()
        host = torch.from_numpy(sel)
        if device.type == "cuda":  # pinned + non_blocking: no host sync, even the first time
            idx = host.pin_memory().to(device, non_blocking=True)
        else:
            idx = host.to(device)
        _index_cache[key] = idx
    return idx


def _bucket_totals(plan, results, labels: np.ndarray, n_buckets: int, p: float) -> list:
    """Each bucket's local total, from the plan's per-tensor float64 sums (no second read)."""
    is_max = p == math.inf
    parts: list = [[] for _ in range(n_buckets)]
    for s, r in zip(plan.sets, results):
        set_labels = labels[np.asarray(s.indices, dtype=np.int64)]
        per = r.per_tensor
        for b in range(n_buckets):
            sel = np.flatnonzero(set_labels == b)
            if len(sel) == 0:
                continue
            if isinstance(per, np.ndarray):
                host = per[sel]
                parts[b].append(float(host.max()) if is_max else exact_sum(host.tolist()))
            elif isinstance(per, torch.Tensor):
                vals = per.index_select(0, _device_index(sel, per.device))
                parts[b].append(vals.amax() if is_max else vals.sum())
            else:
                raise RuntimeError(f"fastclip: backend {s.backend.__name__} returned no "
                                   "per-tensor sums, which DTensor reductions need")
    return [plan.combine(b, p) if b else _zero(plan) for b in parts]


def _zero(plan) -> Union[float, torch.Tensor]:
    """An empty bucket's total: on a device plan a device zero, so no host round trip follows."""
    if plan.host_only:
        return 0.0
    return torch.zeros((), dtype=torch.float64, device=plan.first_device)


def all_reduce_power_sum(total: Union[float, torch.Tensor], p: float, group, device: torch.device,
                         plan=None, results=None) -> Union[float, torch.Tensor]:
    """The global float64 sum of |x|**p (max for inf) from this rank's share.

    Args:
        total: this rank's combined local total: a float for a host-only plan, else a 0-d
            float64 tensor on ``device``.
        p: the norm type.
        group: a ProcessGroup, or a ``Reduction`` from ``resolve``.
        device: the plan's first device (where a device result lives).
        plan, results: the plan and its per-device ``PowerSums``; a ``Reduction`` reads the
            per-tensor sums from them.

    Returns:
        The global total, of the same kind as ``total`` (a float stays on the host).
    """
    if not isinstance(group, Reduction):
        return _all_reduce(total, p, group)
    r = group
    n_buckets = len(r.bucket_groups)
    if len(r.labels) and (r.labels == r.labels[0]).all() and r.labels[0] != EXCLUDED:
        sums = [_zero(plan) for _ in range(n_buckets)]
        sums[int(r.labels[0])] = total  # one bucket holds every tensor: the plan's own total
    else:
        sums = _bucket_totals(plan, results, r.labels, n_buckets, p)
    for b in range(1, n_buckets):
        for g in r.bucket_groups[b]:
            sums[b] = _all_reduce(sums[b], p, g)
    combined = plan.combine(sums, p)
    return combined if r.group is None else _all_reduce(combined, p, r.group)


def require_kernel(group: object, fn: str) -> None:
    """Before torch's fallback (no fastclip kernel for these tensors): it knows no ``group``."""
    if group is not None:
        raise NotImplementedError(
            f"{fn}: a norm across ranks (`group=`, or sharded DTensor grads) needs grads fastclip "
            "has kernels for (float16, bfloat16, float32 or float64 on cpu, or on cuda with "
            "numba-cuda installed)")
