"""examples/distributed_clip.py under torchrun on 2 CPU ranks (gloo): its three scenarios (DDP,
sharded grads with ``group=``, FSDP2 DTensor grads) each check fastclip's norm against the
whole model's norm gathered from every rank, and fail the run if a rank is wrong."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_clip.py"


def test_distributed_example_runs_on_two_ranks(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPUs wherever it runs
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(EXAMPLE)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    # The example writes each line in one write(), so lines of the two ranks never mix.
    said: dict = {0: [], 1: []}
    for rank, word, norm in re.findall(r"^\[rank (\d)\] (\S+)\s+(?:norm (\S+))?", run.stdout,
                                       flags=re.MULTILINE):
        said[int(rank)].append((word, norm))
    for rank in (0, 1):
        assert [word for word, _ in said[rank]] == ["2", "DDP:", "sharded:", "FSDP2:"], run.stdout
    # torch 2.6's fully_shard does not run on CPU tensors: the example says "skipped" there.
    fsdp2 = hasattr(torch.cpu.Stream, "record_event")
    norms = [[norm for _, norm in said[rank][1:4 if fsdp2 else 3]] for rank in (0, 1)]
    assert norms[0] == norms[1] and all(norms[0]), run.stdout  # every rank, the same norms
    assert ("FSDP2:   skipped" in run.stdout) != fsdp2
