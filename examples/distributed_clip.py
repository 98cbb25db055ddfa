"""Clip by the global norm across ranks: data parallel, sharded grads, and FSDP2 (DTensor) grads.

Run on CPUs (gloo) or on GPUs (NCCL, one per rank), e.g.::

    torchrun --nproc-per-node 2 examples/distributed_clip.py

Each scenario clips with fastclip and checks the norm against the whole model's norm, computed
here the slow way (gathering every grad), so the script fails loudly if a rank is ever wrong.

- Data parallel (DDP): after DDP's all-reduce every rank holds the same grads, so the local norm
  already is the global one: leave ``group=None`` (passing the group would count every grad once
  per rank).
- Sharded grads held as plain tensors (ZeRO-style, or hand-written tensor parallel): each rank
  holds a different piece, so pass ``group=`` (here the world): one all-reduce of one float64.
- FSDP2 (``fully_shard``) or tensor-parallel DTensor grads: nothing to pass; fastclip reads each
  DTensor's mesh and placements, clips the local shards in place, and returns a plain tensor.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import fastclip


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def backward(model: nn.Module, device: torch.device, rank: int) -> None:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(16, 32, generator=gen).to(device)
    model(x).pow(2).sum().mul(50.0).backward()  # large grads, so the clip bites


def reference_norm(local_grads: list[torch.Tensor], group=None) -> float:
    """The whole model's 2-norm from every rank's grads, gathered (the slow way)."""
    flat = torch.cat([g.detach().reshape(-1).double().cpu() for g in local_grads])
    pieces = [None] * dist.get_world_size(group)
    dist.all_gather_object(pieces, flat, group=group)
    return math.sqrt(math.fsum((p * p).sum().item() for p in pieces))


def say(rank: int, text: str) -> None:
    # One write per line: the ranks share the terminal, and print() writes the newline apart.
    sys.stdout.write(f"[rank {rank}] {text}\n")
    sys.stdout.flush()


def data_parallel(rank: int, device: torch.device) -> None:
    device_ids = [device.index] if device.type == "cuda" else None
    model = nn.parallel.DistributedDataParallel(make_model(0).to(device), device_ids=device_ids)
    backward(model, device, rank)  # different data per rank; DDP averages the grads
    grads = [p.grad for p in model.parameters()]
    expected = math.sqrt(math.fsum(g.double().pow(2).sum().item() for g in grads))
    norm = fastclip.clip_grad_norm_(model.parameters(), max_norm=1.0)  # group=None: grads agree
    assert math.isclose(norm.item(), expected, rel_tol=1e-6), (norm.item(), expected)
    say(rank, f"DDP:     norm {norm.item():.6g} (group=None; every rank holds the same grads)")


def sharded(rank: int, world: int, device: torch.device) -> None:
    model = make_model(1).to(device)
    backward(model, device, 0)  # same grads everywhere; each rank then keeps only its piece
    shards = [torch.tensor_split(p.grad.reshape(-1), world)[rank].clone() for p in model.parameters()]
    expected = reference_norm(shards)
    params = []
    for s in shards:
        p = torch.zeros_like(s, requires_grad=True)
        p.grad = s
        params.append(p)
    norm = fastclip.clip_grad_norm_(params, max_norm=1.0, group=dist.group.WORLD)
    assert math.isclose(norm.item(), expected, rel_tol=1e-6), (norm.item(), expected)
    say(rank, f"sharded: norm {norm.item():.6g} (group=WORLD: one scalar all-reduce)")


def fsdp2(rank: int, world: int, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cpu" and not hasattr(torch.cpu.Stream, "record_event"):
        say(rank, "FSDP2:   skipped (this torch's fully_shard does not run on CPU tensors)")
        return
    mesh = init_device_mesh(device.type, (world,))
    model = make_model(2).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    backward(model, device, rank)  # FSDP2 reduce-scatters: each rank holds Shard(0) DTensor grads
    local = [p.grad.to_local() for p in model.parameters()]
    expected = reference_norm(local)
    norm = fastclip.clip_grad_norm_(model.parameters(), max_norm=1.0)  # DTensors: no group needed
    assert type(norm) is torch.Tensor and math.isclose(norm.item(), expected, rel_tol=1e-6), \
        (norm, expected)
    coef = min(1.0 / (expected + 1e-6), 1.0)
    after = reference_norm([p.grad.to_local() for p in model.parameters()])
    assert math.isclose(after, expected * coef, rel_tol=1e-5), (after, expected * coef)
    say(rank, f"FSDP2:   norm {norm.item():.6g} (DTensor grads; local shards clipped in place, "
              f"now {after:.6g})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Run it under torchrun (it reads RANK and WORLD_SIZE from the environment): "
               "torchrun --nproc-per-node 2 examples/distributed_clip.py")
    parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("run it under torchrun, e.g. torchrun --nproc-per-node 2 "
                     "examples/distributed_clip.py (RANK is not set)")
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    say(rank, f"{world} ranks on {device.type} ({dist.get_backend()})")
    try:
        data_parallel(rank, device)
        sharded(rank, world, device)
        fsdp2(rank, world, device)
    finally:
        # FSDP2's modules sit in reference cycles: free them while their process groups still
        # exist (left to interpreter exit, torch 2.11's gloo aborted the process now and then).
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
