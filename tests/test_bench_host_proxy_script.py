"""benchmarks/host_proxy.py times the CUDA path's host work on the CPU: it must really take the
CUDA backend's path (launch counts), and leave fastclip as it found it."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import fastclip
from fastclip import _plan

_cuda = pytest.importorskip("fastclip._cuda")  # numba-cuda (the [cuda] extra)

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "host_proxy.py")


def _load():
    spec = importlib.util.spec_from_file_location("host_proxy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_proxy_takes_the_cuda_path_and_restores_everything(tmp_path, capsys):
    proxy = _load()
    saved = (_plan._backend_for, _cuda._power_sums, _cuda._scale)
    out = tmp_path / "r.json"
    assert proxy.main(["--tensors", "3", "--numel", "10", "--calls", "2", "--repeats", "3",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["launches_per_call"] == {"clip_grad_norm_": [1, 1], "get_total_norm": [1, 0],
                                           "clip_grads_with_norm_": [0, 1]}
    for t in result["calls"].values():
        assert 0 < t["min_us"] <= t["median_us"]
    assert "clip_grad_norm_" in capsys.readouterr().out
    assert (_plan._backend_for, _cuda._power_sums, _cuda._scale) == saved
    # After it, a CPU clip runs on the CPU backend's kernels again (it scales the grads).
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([3.0, 4.0])
    assert fastclip.clip_grad_norm_([w], 1.0).item() == 5.0
    assert torch.allclose(w.grad, torch.tensor([0.6, 0.8]))


def test_stubbed_launches_leave_the_grads_alone():
    """Negative control for the launch counts: with the launches stubbed nothing is scaled, so a
    count of 1 means the call went through the stub and not through some other path."""
    proxy = _load()
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([3.0, 4.0])
    with proxy.cuda_backend_without_launches() as (power_sums, scale):
        fastclip.clip_grad_norm_([w], 1.0)
    assert (power_sums.launches, scale.launches) == (1, 1)
    assert torch.equal(w.grad, torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize("n", [1, 150])
def test_host_proxy_measures(n):
    result = _load().measure(n_tensors=n, numel=4, calls=2, repeats=2)
    assert result["tensors"] == n and set(result["calls"]) == {
        "clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_"}
