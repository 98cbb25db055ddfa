"""Global norms across ranks (issue 6): ``group=`` and DTensor grads, on gloo over loopback.

One spawn of 4 CPU ranks runs every multi-rank check (process start-up dominates the cost), each
check catching its own failure; the tests below then report the checks one by one. Every norm is
compared with the exact float64 norm of the whole, unsharded model, and every scaled value with
the unsharded tensor times torch's coefficient, bit for bit.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist

import fastclip
from fastclip import _distributed
from reference import (assert_bitwise_equal, assert_norm_close, exact_norm, param_with_grad,
                       random_grad, reference_coef)

WORLD = 4
SPAWN_TIMEOUT_S = 240
P_VALUES = (2.0, 1.0, math.inf, 3.0)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")
# FSDP2 (fully_shard) on CPU tensors records events on CPU streams, which torch 2.6 lacks.
FSDP2_ON_CPU = hasattr(torch.cpu, "Stream") and hasattr(torch.cpu.Stream, "record_event")


# ---------------------------------------------------------------------------------------------
# Helpers that run inside the ranks.

SHAPES = [(13, 7), (5,), (3,), (64, 9), (1, 1), (2, 3, 4), (9, 2)]


def full_grads(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    """The whole model's grads: identical on every rank for the same seed; varied magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    return [random_grad(s, dtype, scale=10.0 ** (i % 4 - 2), generator=gen)
            for i, s in enumerate(SHAPES)]


def shard_of(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's piece of ``t`` flattened (uneven; empty when ``t`` has fewer elements)."""
    return torch.tensor_split(t.reshape(-1), world)[rank].clone()


def same_on_all_ranks(value: float, group=None) -> None:
    """Assert every rank of ``group`` got bit-identical ``value``."""
    bits = struct.unpack("<q", struct.pack("<d", value))[0]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, bits, group=group)
    assert len(set(gathered)) == 1, f"ranks disagree: {gathered}"


class CountCollectives:
    """Counts the all-reduces issued inside the block (fastclip calls torch.distributed.all_reduce)."""

    def __enter__(self):
        self.count = 0
        self._orig = dist.all_reduce

        def counting(*args, **kwargs):
            self.count += 1
            return self._orig(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def dparam(grad):
    """A parameter holding the DTensor ``grad`` as its ``.grad``."""
    p = torch.zeros_like(grad).requires_grad_()
    p.grad = grad
    return p


def check_clip(params, grads_full, p, max_norm, group=None, expect_collectives=None):
    """Clip; check the norm (exact, same on all ranks, a plain tensor), and return (norm, coef)."""
    with CountCollectives() as c:
        norm = fastclip.clip_grad_norm_(params, max_norm, p, group=group)
    assert type(norm) is torch.Tensor, f"norm is a {type(norm).__name__}, not a plain tensor"
    assert_norm_close(norm, grads_full, p)
    same_on_all_ranks(norm.item())
    if expect_collectives is not None:
        assert c.count == expect_collectives, f"{c.count} all-reduces, expected {expect_collectives}"
    return norm, reference_coef(max_norm, norm)


# ---------------------------------------------------------------------------------------------
# The checks (each runs on every rank, in the same order).

def check_sharded_plain(rank, world):
    """Each rank holds a different shard of every grad; group=WORLD gives the whole model's norm."""
    group = dist.group.WORLD
    for dtype in (torch.float32, torch.float64):
        full = full_grads(0, dtype)
        for p in P_VALUES:
            exact = exact_norm(full, p)
            for max_norm in (exact / 3, exact * 10):  # clips, and does not
                pieces = [shard_of(t, rank, world) for t in full]
                before = [x.clone() for x in pieces]
                norm, coef = check_clip([param_with_grad(x) for x in pieces], full, p, max_norm,
                                        group, expect_collectives=1)
                for b, x in zip(before, pieces):
                    assert_bitwise_equal(x, b * coef)
                # The unsharded model clipped in one process: the same values.
                whole = [t.clone() for t in full]
                fastclip.clip_grad_norm_([param_with_grad(t) for t in whole], max_norm, p)
                for t, x in zip(whole, pieces):
                    torch.testing.assert_close(x, shard_of(t, rank, world), rtol=4e-7, atol=0)
            total = fastclip.get_total_norm([shard_of(t, rank, world) for t in full], p, group=group)
            assert_norm_close(total, full, p)
            same_on_all_ranks(total.item())
    # Negative controls. Without `group` a rank sees only its own shard; and grads that are
    # identical on every rank (data parallel) must not be given a group: each would count
    # `world` times.
    full = full_grads(0, torch.float64)
    local = fastclip.get_total_norm([shard_of(t, rank, world) for t in full])
    assert float(local) < exact_norm(full, 2.0) * (1 - 1e-3)
    replicated = fastclip.get_total_norm(full, group=dist.group.WORLD)
    assert math.isclose(float(replicated), math.sqrt(world) * exact_norm(full, 2.0), rel_tol=1e-12)


def check_empty_rank(rank, world):
    """A rank with no grads joins the all-reduce with 0; NaN on one rank reaches every rank."""
    full = full_grads(1)
    last = world - 1
    for p in P_VALUES:
        pieces = [] if rank == last else [shard_of(t, rank, last) for t in full]
        params = [param_with_grad(x) for x in pieces]
        params.append(torch.zeros(3, requires_grad=True))  # no grad: skipped
        total = fastclip.get_total_norm(pieces, p, group=dist.group.WORLD)
        assert_norm_close(total, full, p)
        check_clip(params, full, p, exact_norm(full, p) / 2, dist.group.WORLD, 1)
    # A NaN (or inf) on rank 1 only: every rank's norm is non-finite, for every p; with
    # error_if_nonfinite every rank raises and no rank touches its grads.
    for bad in (math.nan, math.inf):
        for p in P_VALUES:
            x = torch.ones(4) * (rank + 1)
            if rank == 1:
                x[2] = bad
            norm = fastclip.get_total_norm([x], p, group=dist.group.WORLD)
            if math.isnan(bad):
                assert math.isnan(norm.item()), f"p={p}: {norm.item()} (NaN lost in the all-reduce)"
            else:
                assert norm.item() == math.inf, f"p={p}: {norm.item()}"
            before = x.clone()
            try:
                fastclip.clip_grad_norm_([param_with_grad(x)], 1.0, p, error_if_nonfinite=True,
                                         group=dist.group.WORLD)
            except RuntimeError as err:
                assert "non-finite" in str(err)
            else:
                raise AssertionError("error_if_nonfinite did not raise on this rank")
            assert_bitwise_equal(x, before)


def check_subgroup_and_membership(rank, world):
    """A group of 3 ranks: its members get their norm; the 4th rank gets a clear error."""
    members = list(range(world - 1))
    sub = dist.new_group(members)  # collective over the world: every rank calls it
    full = full_grads(2)
    if rank in members:
        pieces = [shard_of(t, rank, len(members)) for t in full]
        for p in P_VALUES:
            norm = fastclip.clip_grad_norm_([param_with_grad(x.clone()) for x in pieces],
                                            1e9, p, group=sub)
            assert_norm_close(norm, full, p)
            same_on_all_ranks(norm.item(), group=sub)
    else:
        x = torch.ones(3)
        for fn in (lambda: fastclip.clip_grad_norm_([param_with_grad(x)], 0.1, group=sub),
                   lambda: fastclip.get_total_norm([x], group=sub)):
            try:
                fn()
            except ValueError as err:
                assert "not a member of `group`" in str(err), str(err)
            else:
                raise AssertionError("a non-member rank passing the group got no error")
        assert torch.equal(x, torch.ones(3))
    # Grads fastclip has no kernel for go to torch, which knows no group: refused, not local.
    z = torch.ones(3, dtype=torch.complex64)
    try:
        fastclip.clip_grad_norm_([param_with_grad(z)], 0.1, group=dist.group.WORLD)
    except NotImplementedError as err:
        assert "group=" in str(err), str(err)
    else:
        raise AssertionError("complex grads with a group were clipped by the local norm")
    assert torch.equal(z, torch.ones(3, dtype=torch.complex64))
    # A DeviceMesh is not a group: a TypeError that says what to do.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    try:
        fastclip.get_total_norm([torch.ones(2)], group=mesh)
    except TypeError as err:
        assert "`group`" in str(err) and "group=None" in str(err), str(err)
    else:
        raise AssertionError("group=DeviceMesh was accepted")


def _dtensor_set(mesh, placements_list, seed):
    """DTensor grads (and their params) of a full model, one placement tuple per tensor."""
    from torch.distributed.tensor import distribute_tensor

    full = full_grads(seed)
    grads = [distribute_tensor(t.clone(), mesh, list(pl)) for t, pl in zip(full, placements_list)]
    return full, grads, [dparam(g) for g in grads]


def _check_dtensor_clip(full, grads, params, p, group=None, expect_collectives=None, ratio=3):
    max_norm = exact_norm(full, p) / ratio
    locals_before = [g.to_local() for g in grads]
    ptrs = [x.data_ptr() for x in locals_before]
    copies = [x.clone() for x in locals_before]
    norm, coef = check_clip(params, full, p, max_norm, group, expect_collectives)
    for g, t, ptr, x, c in zip(grads, full, ptrs, locals_before, copies):
        assert g.to_local().data_ptr() == ptr  # written in place, in the shard's own storage
        assert_bitwise_equal(x, c * coef)
        assert_bitwise_equal(g.full_tensor(), t * coef)
    return norm


def check_dtensor_1d(rank, world):
    """Shard(0), Shard(1) and Replicate() grads on a 1-D mesh: one all-reduce, exact norm."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh = init_device_mesh("cpu", (world,))
    cycle = [(Shard(0),), (Replicate(),), (Shard(0),), (Shard(1),), (Replicate(),), (Shard(2),),
             (Shard(0),)]
    for p in P_VALUES:
        full, grads, params = _dtensor_set(mesh, cycle, 3)
        _check_dtensor_clip(full, grads, params, p, expect_collectives=1)
    # All replicated: every rank already holds everything, so no collective at all.
    for p in (2.0, math.inf):
        full, grads, params = _dtensor_set(mesh, [(Replicate(),)] * len(SHAPES), 4)
        _check_dtensor_clip(full, grads, params, p, expect_collectives=0)
    # The other entry points act on the local shards.
    full, grads, params = _dtensor_set(mesh, cycle, 5)
    norm = fastclip.get_total_norm(grads)
    assert type(norm) is torch.Tensor
    assert_norm_close(norm, full, 2.0)
    fastclip.clip_grads_with_norm_(params, 1.0, norm)
    coef = reference_coef(1.0, norm)
    for g, t in zip(grads, full):
        assert_bitwise_equal(g.full_tensor(), t * coef)
    full, grads, params = _dtensor_set(mesh, cycle, 6)
    fastclip.clip_grad_value_(params, 0.01)
    for g, t in zip(grads, full):
        assert_bitwise_equal(g.full_tensor(), t.clamp(-0.01, 0.01))
    # Partial: rejected clearly by the norm and the clamp; nothing is written.
    local = torch.full((4,), float(rank + 1))
    partial = DTensor.from_local(local, mesh, [Partial()], run_check=False)
    for call in (lambda: fastclip.clip_grad_norm_([dparam(partial)], 0.1),
                 lambda: fastclip.get_total_norm([partial]),
                 lambda: fastclip.clip_grad_value_([dparam(partial)], 0.1)):
        try:
            call()
        except ValueError as err:
            assert "Partial" in str(err) and "redistribute" in str(err), str(err)
        else:
            raise AssertionError("a Partial DTensor grad was accepted")
    assert torch.equal(local, torch.full((4,), float(rank + 1)))


def check_dtensor_2d(rank, world):
    """A 2x2 (dp, tp) mesh with every mix of Shard/Replicate: one all-reduce (the mesh is the world)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    assert world == 4
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    # One placement pair per entry of SHAPES. _StridedShard over Shard is FSDP2 over tensor
    # parallel (it needs an evenly divisible dim: 64).
    mixed = [(Shard(0), Shard(1)), (Shard(0), Replicate()), (Replicate(), Shard(0)),
             (_StridedShard(0, split_factor=2), Shard(0)), (Replicate(), Replicate()),
             (Shard(1), Shard(2)), (Shard(1), Shard(0))]
    for p in P_VALUES:
        full, grads, params = _dtensor_set(mesh, mixed, 7)
        _check_dtensor_clip(full, grads, params, p, expect_collectives=1)
    # HSDP: replicated over dp, sharded over tp: reduced over tp only, no rank masked.
    hsdp = [(Replicate(), Shard(0))] * len(SHAPES)
    full, grads, params = _dtensor_set(mesh, hsdp, 8)
    _, group = _distributed.resolve(grads, None, "test")
    assert group is mesh.get_group("tp")
    for p in (2.0, math.inf):
        full, grads, params = _dtensor_set(mesh, hsdp, 8)
        _check_dtensor_clip(full, grads, params, p, expect_collectives=1)
    # Two meshes (FSDP+TP where some params are only on the dp sub-mesh, identical across tp):
    # one all-reduce per mesh.
    from torch.distributed.tensor import distribute_tensor

    placements_a = [(Shard(0), Shard(1)), (Shard(0), Replicate()), (Replicate(), Shard(0))]
    full_a, grads_a, params_a = _dtensor_set(mesh, placements_a, 9)  # the first 3 shapes
    full_a = full_a[:3]
    full_b = full_grads(10)[3:]
    grads_b = [distribute_tensor(t.clone(), mesh["dp"], [Shard(0)]) for t in full_b]
    for p in (2.0, 1.0, math.inf):
        for g, t, pl in zip(grads_a, full_a, placements_a):
            g.to_local().copy_(distribute_tensor(t, mesh, list(pl)).to_local())
        for g, t in zip(grads_b, full_b):
            g.to_local().copy_(distribute_tensor(t, mesh["dp"], [Shard(0)]).to_local())
        _check_dtensor_clip(full_a + full_b, grads_a + grads_b,
                            params_a + [dparam(g) for g in grads_b], p, expect_collectives=2)
    # Pipeline stages: stage = tp coordinate, each stage holds different params on its dp
    # sub-mesh; group=WORLD sums the stages in the one all-reduce.
    stage = mesh.get_coordinate()[1]
    stage_full = [full_grads(20), full_grads(21)]
    grads_s = [distribute_tensor(t.clone(), mesh["dp"], [Shard(0)]) for t in stage_full[stage]]
    norm = fastclip.get_total_norm(grads_s, 2.0, group=dist.group.WORLD)
    assert_norm_close(norm, stage_full[0] + stage_full[1], 2.0)
    for p in P_VALUES:
        for g, t in zip(grads_s, stage_full[stage]):
            g.to_local().copy_(distribute_tensor(t, mesh["dp"], [Shard(0)]).to_local())
        before = [g.to_local().clone() for g in grads_s]
        norm, coef = check_clip([dparam(g) for g in grads_s], stage_full[0] + stage_full[1], p,
                                exact_norm(stage_full[0] + stage_full[1], p) / 2,
                                dist.group.WORLD, expect_collectives=1)
        for g, b in zip(grads_s, before):
            assert_bitwise_equal(g.to_local(), b * coef)
    # A group that does not contain a DTensor's mesh: a clear error on every rank.
    full, grads, params = _dtensor_set(mesh, mixed, 11)
    try:
        fastclip.clip_grad_norm_(params, 0.1, group=mesh.get_group("dp"))
    except ValueError as err:
        assert "not in `group`" in str(err), str(err)
    else:
        raise AssertionError("a group smaller than the DTensors' mesh was accepted")
    for g, t in zip(grads, full):
        assert_bitwise_equal(g.full_tensor(), t)


def check_device_tensor_paths(rank, world):
    """The branches a CUDA plan takes (0-d float64 tensors, per-tensor sums as a tensor), on CPU."""
    from fastclip._plan import Plan

    for p in P_VALUES:
        for bad in (None, math.nan):
            local = float(rank + 1) if bad is None or rank != 2 else bad
            out = _distributed.all_reduce_power_sum(torch.tensor(local, dtype=torch.float64), p,
                                                    dist.group.WORLD, torch.device("cpu"))
            assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
            if bad is not None:
                assert math.isnan(out.item()), f"p={p}: NaN lost ({out.item()})"
            else:
                want = float(world) if p == math.inf else float(sum(range(1, world + 1)))
                assert out.item() == want, (p, out.item(), want)
    # Buckets from a per-tensor tensor give the same global total as from a numpy array.
    tensors = [torch.full((3,), float(rank + i + 1)) for i in range(5)]
    plan = Plan.build(tensors, "t", "tensors")
    labels = torch.tensor([1, _distributed.EXCLUDED, 0, 1, 2]).numpy()
    mesh_groups = [[], [dist.group.WORLD], [dist.group.WORLD]]
    r = _distributed.Reduction(labels, mesh_groups, None)
    for p in P_VALUES:
        results = plan.power_sums(p)
        as_tensor = [x._replace(per_tensor=torch.from_numpy(x.per_tensor)) for x in results]
        total = plan.combine([x.total for x in results], p)
        host = _distributed.all_reduce_power_sum(total, p, r, plan.first_device, plan, results)
        dev = _distributed.all_reduce_power_sum(total, p, r, plan.first_device, plan, as_tensor)
        assert isinstance(host, float) and isinstance(dev, torch.Tensor)
        assert dev.item() == host, (p, dev.item(), host)
        # Bucket 0 is local, buckets 1 and 2 are summed over the ranks; tensor 1 is excluded.
        per = [3 * (rank + i + 1) ** p if p != math.inf else rank + i + 1 for i in range(5)]
        if p == math.inf:
            want = max(per[2], world + 0.0, world + 3.0, world + 4.0)
        else:
            want = per[2] + sum(3 * (q + 1) ** p + 3 * (q + 4) ** p + 3 * (q + 5) ** p
                                for q in range(world))
        assert math.isclose(host, want, rel_tol=1e-15), (p, host, want)


def check_fsdp2(rank, world):
    """Real FSDP2 (fully_shard) grads on a CPU mesh: the whole model's norm, one all-reduce."""
    if not FSDP2_ON_CPU:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    gen = torch.Generator().manual_seed(rank)
    model(torch.randn(5, 9, generator=gen)).pow(2).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(type(g).__name__ == "DTensor" for g in grads)
    full = [g.full_tensor() for g in grads]
    before = [g.to_local().clone() for g in grads]
    for p in (2.0, math.inf):
        norm, coef = check_clip(list(model.parameters()), full, p, exact_norm(full, p) / 4,
                                expect_collectives=1)
        for g, b in zip(grads, before):
            assert_bitwise_equal(g.to_local(), b * coef)
        full = [g.full_tensor() for g in grads]
        before = [g.to_local().clone() for g in grads]


def check_fsdp1(rank, world):
    """FSDP v1 (FullyShardedDataParallel, FULL_SHARD) clips with its own method, which patching
    does not reach; ``fastclip.clip_grad_norm_(model.parameters(), max_norm,
    group=model.process_group)`` replaces it: the norm of the whole model (exact), one
    all-reduce, and the grads FSDP's own clip gives, with flat parameters and with
    ``use_orig_params=True`` (views of the local shard, some of them empty)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for use_orig_params in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(9, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
        model = FSDP(model, device_id=torch.device("cpu"), use_orig_params=use_orig_params)
        gen = torch.Generator().manual_seed(rank)
        (model(torch.randn(5, 9, generator=gen)) * 10).pow(2).sum().backward()
        params = [q for q in model.parameters() if q.grad is not None]
        local = [q.grad.detach().clone() for q in params]
        gathered = [None] * world
        dist.all_gather_object(gathered, [g.reshape(-1) for g in local])
        whole = [g for part in gathered for g in part]  # every element once (padding adds zeros)
        max_norm = exact_norm(whole, 2.0) / 3
        norm, coef = check_clip(list(model.parameters()), whole, 2.0, max_norm,
                                group=model.process_group, expect_collectives=1)
        ours = [q.grad.clone() for q in params]
        for q, g in zip(params, local):
            q.grad.copy_(g)
        theirs = model.clip_grad_norm_(max_norm)
        torch.testing.assert_close(norm, theirs.to(norm.dtype), rtol=1e-5, atol=0)
        for a, q in zip(ours, params):
            torch.testing.assert_close(a, q.grad, rtol=1e-5, atol=1e-8)
        for a, g in zip(ours, local):
            assert_bitwise_equal(a, g * coef)
        # Negative control: without `group` each rank sees only its shard's norm.
        for q, g in zip(params, local):
            q.grad.copy_(g)
        local_norms = [None] * world
        dist.all_gather_object(local_norms, float(fastclip.get_total_norm([q.grad for q in params])))
        assert len(set(local_norms)) > 1 and max(local_norms) < float(norm)


def check_scale(rank, world):
    """2000 DTensor grads cost about 4x 500 (linear), with one all-reduce and per-mesh lookups."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (2, world // 2))
    placements = [[Shard(0), Replicate()], [Replicate(), Shard(0)], [Shard(0), Shard(0)]]

    def make(n):
        grads = [DTensor.from_local(torch.full((2,), 1.0 + (i % 7)), mesh, placements[i % 3],
                                    run_check=False) for i in range(n)]
        return grads, [dparam(g) for g in grads]

    calls = {"coord": 0}
    orig_coord = DeviceMesh.get_coordinate

    def counting_coord(self):
        calls["coord"] += 1
        return orig_coord(self)

    times = {}
    for n in (500, 2000):
        grads, params = make(n)
        best = math.inf
        for _ in range(5):
            dist.barrier()
            calls["coord"] = 0
            DeviceMesh.get_coordinate = counting_coord
            try:
                with CountCollectives() as c:
                    t0 = time.perf_counter()
                    fastclip.clip_grad_norm_(params, 1e9)
                    best = min(best, time.perf_counter() - t0)
            finally:
                DeviceMesh.get_coordinate = orig_coord
            assert c.count == 1, f"{c.count} all-reduces for {n} tensors"
            assert calls["coord"] <= 2 * len(placements), \
                f"{calls['coord']} mesh lookups for {n} tensors"
        times[n] = best
    ratio = times[2000] / times[500]
    # Linear work gives ~4 (less with fixed costs); quadratic would give ~16.
    assert ratio < 10, f"2000 vs 500 DTensor grads: {ratio:.1f}x ({times})"
    return {"t500_ms": times[500] * 1e3, "t2000_ms": times[2000] * 1e3, "ratio": ratio}


def check_grad_clipper(rank, world):
    """GradClipper with `group=` (plain shards) and with DTensor grads: each step clips by the
    whole model's norm, bit for bit as clip_grad_norm_ does, and an adaptive policy keeps the
    same threshold on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    group = dist.group.WORLD
    full = full_grads(7)
    exact = exact_norm(full, 2.0)
    ours = [shard_of(t, rank, world) for t in full]
    theirs = [x.clone() for x in ours]
    norm = fastclip.GradClipper([param_with_grad(x) for x in ours], max_norm=exact / 3,
                                group=group).step()
    expected = fastclip.clip_grad_norm_([param_with_grad(x) for x in theirs], exact / 3, group=group)
    assert_bitwise_equal(norm, expected)
    assert_norm_close(norm, full, 2.0)
    for a, b in zip(ours, theirs):
        assert_bitwise_equal(a, b)
    # Negative control: without `group` each rank clips by its own shard's norm.
    local = fastclip.GradClipper([param_with_grad(shard_of(t, rank, world)) for t in full]).step()
    assert float(local) < exact * (1 - 1e-3)

    # An adaptive policy over several steps: the same history, hence threshold, on every rank.
    params = [param_with_grad(shard_of(t, rank, world)) for t in full]
    clipper = fastclip.GradClipper(params, max_norm=None, policy=fastclip.ZClip(warmup=2),
                                   group=group)
    for step in range(5):
        step_full = full_grads(20 + step)
        for prm, t in zip(params, step_full):
            prm.grad = shard_of(t, rank, world)
        norm = clipper.step()
        assert_norm_close(norm, step_full, 2.0)
        same_on_all_ranks(float(clipper.threshold))

    # DTensor grads: recognized without `group`.
    mesh = init_device_mesh("cpu", (world,))
    cycle = [(Shard(0),), (Replicate(),), (Shard(0),), (Shard(1),), (Replicate(),), (Shard(2),),
             (Shard(0),)]
    full, grads, dparams = _dtensor_set(mesh, cycle, 8)
    max_norm = exact_norm(full, 2.0) / 3
    norm = fastclip.GradClipper(dparams, max_norm=max_norm).step()
    assert type(norm) is torch.Tensor
    assert_norm_close(norm, full, 2.0)
    same_on_all_ranks(norm.item())
    coef = reference_coef(max_norm, norm)
    for g, t in zip(grads, full):
        assert_bitwise_equal(g.full_tensor(), t * coef)


def check_agc_dtensor(rank, world):
    """AGC on DTensor parameters equals AGC on the unsharded model: bit for bit where every unit
    lies whole in a shard (Shard(0) weights, Replicate), to float32 rounding of the factor where
    units are split across ranks (a row-parallel weight, FSDP2's sharded vectors, one with empty
    shards; on a 1-D and a 2x2 mesh); Partial grads are refused before anything is written."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh1 = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    gen = torch.Generator().manual_seed(11)
    specs = [((13, 7), mesh1, [Shard(0)], False), ((9, 4, 3), mesh1, [Shard(0)], False),
             ((6,), mesh1, [Replicate()], False), ((5, 5), mesh1, [Replicate()], False),
             ((8, 6), mesh1, [Shard(1)], True), ((12,), mesh1, [Shard(0)], True),
             ((3,), mesh1, [Shard(0)], True),  # fewer elements than ranks: an empty shard
             ((10, 8), mesh2, [Shard(0), Shard(1)], True), ((10,), mesh2, [Replicate(), Shard(0)], True),
             ((6, 4), mesh2, [Shard(0), Replicate()], False),
             # FSDP2 over tensor parallel: a column-parallel weight's rows stay whole
             ((8, 6), mesh2, [_StridedShard(0, split_factor=2), Shard(0)], False),
             ((7, 9), mesh1, [Shard(1)], True), ((11,), mesh1, [Shard(0)], True)]  # bf16 below
    dtypes = [torch.float32] * (len(specs) - 2) + [torch.bfloat16] * 2
    full_w = [torch.randn(s, generator=gen).to(dt) for (s, *_), dt in zip(specs, dtypes)]
    full_g = [(torch.randn(s, generator=gen) * torch.rand(s, generator=gen) * 0.3).to(dt)
              for (s, *_), dt in zip(specs, dtypes)]
    whole = [torch.nn.Parameter(w.clone()) for w in full_w]
    for prm, g in zip(whole, full_g):
        prm.grad = g.clone()
    fastclip.adaptive_grad_clip_(whole, clipping=0.05)
    params = []
    for (shape, mesh, pl, _), w, g in zip(specs, full_w, full_g):
        prm = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, pl))
        prm.grad = distribute_tensor(g.clone(), mesh, pl)
        params.append(prm)
    fastclip.adaptive_grad_clip_(params, clipping=0.05)
    for (shape, mesh, pl, split), prm, ref, g0 in zip(specs, params, whole, full_g):
        got = prm.grad.full_tensor()
        if split:
            torch.testing.assert_close(got, ref.grad, rtol=2.4e-7, atol=0)
            assert not torch.equal(got, g0), f"{shape} {pl} was not clipped"  # negative control
        else:
            assert_bitwise_equal(got, ref.grad)
    # A split grad listed twice is clipped twice, the second time from the first's result.
    w, g = full_w[5].clone(), full_g[5].clone()
    twice = torch.nn.Parameter(w.clone())
    twice.grad = g.clone()
    fastclip.adaptive_grad_clip_([twice, twice], clipping=0.05)
    prm = torch.nn.Parameter(distribute_tensor(w, mesh1, [Shard(0)]))
    prm.grad = distribute_tensor(g, mesh1, [Shard(0)])
    fastclip.adaptive_grad_clip_([prm, prm], clipping=0.05)
    torch.testing.assert_close(prm.grad.full_tensor(), twice.grad, rtol=2.4e-7, atol=0)

    # Negative control: the row-parallel weight's shards clipped alone, each by its own partial
    # row norms, are not AGC on the model.
    alone = []
    for w, g in zip(full_w[4].tensor_split(world, dim=1), full_g[4].tensor_split(world, dim=1)):
        q = torch.nn.Parameter(w.clone())
        q.grad = g.clone()
        fastclip.adaptive_grad_clip_([q], clipping=0.05)
        alone.append(q.grad)
    assert not torch.allclose(torch.cat(alone, dim=1), whole[4].grad, rtol=1e-4, atol=0)

    local = torch.full((4, 2), float(rank + 1))
    prm = torch.nn.Parameter(DTensor.from_local(local.clone(), mesh1, [Partial()], run_check=False))
    prm.grad = DTensor.from_local(local, mesh1, [Partial()], run_check=False)
    before = [q.grad.to_local().clone() for q in params[:2]]
    try:
        fastclip.adaptive_grad_clip_(params[:2] + [prm], clipping=1e-4)
    except ValueError as err:
        assert "Partial" in str(err), str(err)
    else:
        raise AssertionError("a Partial DTensor grad was accepted")
    assert torch.equal(local, torch.full((4, 2), float(rank + 1)))
    for q, b in zip(params[:2], before):
        assert_bitwise_equal(q.grad.to_local(), b)


def check_overflowing_sums(rank, world):
    """Finite float64 power sums whose sum exceeds float64: the norm is inf on every rank, as
    torch gives it. (math.fsum raises OverflowError there; a rank that raised it left the others
    waiting in the all-reduce.) Rank 0's shards alone hold the large values; the plain tensor
    sends the sums through the per-bucket path."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = [torch.ones(2 * world, dtype=torch.float64) for _ in range(2)]
    for t in full:
        t[0] = 1e154  # squared 1e308: finite, and twice that is not
    plain = torch.ones(3, dtype=torch.float64)
    assert torch.nn.utils.get_total_norm(full + [plain]).item() == math.inf

    def grads():
        return [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in full] + [plain.clone()]
    assert fastclip.get_total_norm(grads()).item() == math.inf
    params = [dparam(g) for g in grads()]
    try:
        fastclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    except RuntimeError as err:
        assert "non-finite" in str(err), str(err)
    else:
        raise AssertionError("an overflowing norm passed error_if_nonfinite")
    assert fastclip.clip_grad_norm_(params, 1.0).item() == math.inf
    assert not params[0].grad.to_local().any()  # scaled by 1 / inf, as torch would


CHECKS = [check_sharded_plain, check_empty_rank, check_subgroup_and_membership, check_dtensor_1d,
          check_dtensor_2d, check_device_tensor_paths, check_fsdp2, check_fsdp1, check_scale,
          check_grad_clipper, check_agc_dtensor, check_overflowing_sums]


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    out = {}
    for check in CHECKS:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        try:
            info = check(rank, world)
            out[check.__name__] = {"error": None, "info": info}
        except Exception:
            out[check.__name__] = {"error": traceback.format_exc(), "info": None}
        out[check.__name__]["seconds"] = time.perf_counter() - t0
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results():
    import torch.multiprocessing as mp

    # Compile (or load) the kernels once here, so the ranks load them from numba's cache.
    for p in P_VALUES:
        fastclip.clip_grad_norm_([param_with_grad(torch.ones(3, dtype=torch.float64))], 1.0, p)
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), outdir), nprocs=WORLD,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail(f"the {WORLD} ranks did not finish within {SPAWN_TIMEOUT_S} s (a hang?)")
        results = []
        for r in range(WORLD):
            with open(os.path.join(outdir, f"rank{r}.json")) as f:
                results.append(json.load(f))
    return results


def _assert_check(rank_results, check) -> list:
    errors = [(r, res[check.__name__]["error"]) for r, res in enumerate(rank_results)]
    failed = [f"--- rank {r} ---\n{e}" for r, e in errors if e]
    assert not failed, "\n".join(failed)
    return [res[check.__name__]["info"] for res in rank_results]


def test_sharded_plain_grads_p2_p1_inf(rank_results):
    _assert_check(rank_results, check_sharded_plain)


def test_rank_without_grads_and_nonfinite_on_one_rank(rank_results):
    _assert_check(rank_results, check_empty_rank)


def test_subgroup_and_non_member_rank(rank_results):
    _assert_check(rank_results, check_subgroup_and_membership)


def test_dtensor_1d_mesh(rank_results):
    _assert_check(rank_results, check_dtensor_1d)


def test_dtensor_2d_mesh(rank_results):
    _assert_check(rank_results, check_dtensor_2d)


def test_device_tensor_branches(rank_results):
    _assert_check(rank_results, check_device_tensor_paths)


@pytest.mark.skipif(not FSDP2_ON_CPU, reason="this torch's fully_shard does not run on CPU tensors")
def test_fsdp2_grads(rank_results):
    _assert_check(rank_results, check_fsdp2)


def test_fsdp1_grads_with_the_process_group(rank_results):
    _assert_check(rank_results, check_fsdp1)


def test_grad_clipper_across_ranks(rank_results):
    _assert_check(rank_results, check_grad_clipper)


def test_agc_on_dtensors(rank_results):
    _assert_check(rank_results, check_agc_dtensor)


def test_power_sums_that_overflow_give_inf_on_every_rank(rank_results):
    _assert_check(rank_results, check_overflowing_sums)


def test_dtensor_scale_is_linear(rank_results):
    infos = _assert_check(rank_results, check_scale)
    print("clip time, 500 vs 2000 DTensor grads, per rank:", infos)


# ---------------------------------------------------------------------------------------------
# In-process checks (no process group needed).

@pytest.mark.parametrize("bad", ["world", 3, 1.5, object()])
def test_group_of_wrong_type_is_a_type_error(bad):
    g = torch.ones(3)
    expected = r"clip_grad_norm_: `group` must be a torch\.distributed\.ProcessGroup or None"
    with pytest.raises(TypeError, match=expected):
        fastclip.clip_grad_norm_([param_with_grad(g)], 0.1, group=bad)
    with pytest.raises(TypeError, match=r"get_total_norm: `group`"):
        fastclip.get_total_norm([g], group=bad)
    with pytest.raises(TypeError, match=r"GradClipper: `group`"):
        fastclip.GradClipper([param_with_grad(g)], group=bad)
    assert torch.equal(g, torch.ones(3))


def test_non_member_sentinel_is_a_membership_error():
    g = torch.ones(3)
    with pytest.raises(ValueError, match="not a member of `group`"):
        fastclip.clip_grad_norm_([param_with_grad(g)], 0.1, group=dist.GroupMember.NON_GROUP_MEMBER)
    assert torch.equal(g, torch.ones(3))


def test_group_none_is_the_single_process_path():
    grads = full_grads(0)
    assert_norm_close(fastclip.get_total_norm(grads, group=None), grads, 2.0)
    assert _distributed.resolve(grads, None, "t") == (grads, None)


_GROUP_LIFETIME_CHILD = """
import gc, os, sys, weakref, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
import fastclip
mesh = init_device_mesh("cpu", (1,))
p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
p.grad = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
group = dist.new_group([0])
fastclip.clip_grad_norm_([p], 1.0)               # the mesh's own groups
fastclip.clip_grad_norm_([p], 1.0, group=group)  # a group of the caller's, checked against the mesh
fastclip.GradClipper([p], max_norm=1.0, group=group).step()
alive = weakref.ref(group)
del p, mesh, group
dist.destroy_process_group()
gc.collect()
print("freed" if alive() is None else "kept")
"""


def test_process_groups_are_freed_by_destroy_process_group():
    """fastclip keeps no process group alive: a group that outlives destroy_process_group() is
    destroyed at interpreter exit, where gloo aborted the process ("terminate called without an
    active exception", torch 2.11, about one run of the distributed example in two)."""
    out = subprocess.run([sys.executable, "-c", _GROUP_LIFETIME_CHILD, str(_free_port())],
                         capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "freed"
