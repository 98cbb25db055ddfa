"""Exact float64 references and comparison helpers for the tests.

torch's own norms are not exact (float32 accumulation), so norms are checked against
``math.fsum`` of float64 per-tensor sums. Torch-compat behaviour (coefficient, in-place scaling,
clamping) is checked against plain per-tensor torch ops, bit for bit.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

# Per-tensor sums of at most this many terms are taken with math.fsum (correctly rounded);
# bigger tensors are summed in float64 blocks by torch (pairwise: relative error about
# log2(block) * 2**-53, ~2e-15 here), and the block sums are fsum-ed.
FSUM_MAX = 1 << 16
BLOCK = 1 << 20

INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _terms(flat64: torch.Tensor, p: float) -> torch.Tensor:
    a = flat64.abs()
    if p == 2.0:
        return a * a  # exact for inputs of 32 bits or fewer
    if p == 1.0:
        return a
    return a.pow(p)


def tensor_power_sum(t: torch.Tensor, p: float) -> float:
    """sum(|x|**p) of one tensor in float64 (max |x| for p = inf; NaN wins)."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return 0.0
    if p == math.inf:
        m = flat.abs().max().double().item()
        return math.nan if bool(flat.isnan().any()) else m
    if flat.numel() <= FSUM_MAX:
        return math.fsum(_terms(flat.double(), p).tolist())
    return math.fsum(_terms(flat[i:i + BLOCK].double(), p).sum().item()
                     for i in range(0, flat.numel(), BLOCK))


def exact_power_sum(tensors: Iterable[torch.Tensor], p: float) -> float:
    sums = [tensor_power_sum(t, p) for t in tensors]
    if not sums:
        return 0.0
    if p == math.inf:
        return math.nan if any(math.isnan(s) for s in sums) else max(sums)
    return math.fsum(sums)


def exact_norm(tensors: Iterable[torch.Tensor], p: float) -> float:
    """The p-norm of all ``tensors`` concatenated, as a float64 computed from exact sums."""
    total = exact_power_sum(tensors, p)
    if p == 2.0:
        return math.sqrt(total)
    if p in (1.0, math.inf):
        return total
    return total ** (1.0 / p)


def norm_tolerance(p: float, n: int, out_dtype: torch.dtype) -> float:
    """Relative error allowed between fastclip's norm and ``exact_norm``.

    - Accumulation: every term |x|**p is a non-negative float64 (exact for p = 1 and for p = 2 on
      inputs of 32 bits or fewer; within 1 ulp from pow otherwise, on both sides). Summing n
      non-negative terms in any order errs by at most (n - 1) * 2**-53 relative (recursive
      summation bound; chunked and pairwise orders are tighter). The reference errs by ~1 ulp.
    - Root: a relative error e in the sum becomes e / p in the norm, plus the root's own rounding.
    - Output: the float64 result is rounded once to the returned dtype (2**-24 for float32).
    The inf norm is a max of exactly representable values: it must be exact.
    """
    if p == math.inf:
        return 0.0
    u64 = 2.0 ** -53
    acc = (n + 4) * u64 / p + 4 * u64
    out = 2.0 ** -24 if out_dtype == torch.float32 else u64
    return acc + out


def rel_err(value: float, ref: float) -> float:
    if value == ref:
        return 0.0
    return abs(value - ref) / abs(ref) if ref != 0 else math.inf


def assert_norm_close(norm: torch.Tensor, tensors: Sequence[torch.Tensor], p: float) -> float:
    """Assert ``norm`` is the exact norm of ``tensors`` within ``norm_tolerance``; return the error."""
    ref = exact_norm(tensors, p)
    value = float(norm)
    if math.isnan(ref):
        assert math.isnan(value), f"expected NaN, got {value}"
        return 0.0
    n = sum(t.numel() for t in tensors)
    tol = norm_tolerance(p, n, norm.dtype)
    err = rel_err(value, ref)
    assert err <= tol, f"norm {value!r} vs exact {ref!r}: relative error {err:.3g} > {tol:.3g} (p={p}, n={n})"
    return err


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of ``t`` (as a signed integer tensor of the same width)."""
    return t.detach().contiguous().view(INT_VIEW[t.dtype])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, nan_bits: bool = True) -> None:
    """Bit-for-bit equality. ``nan_bits=False`` only asks NaN where the other has NaN (any
    payload): torch itself writes different bf16 NaN patterns in its vector and scalar paths."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{actual.dtype}{tuple(actual.shape)} vs {expected.dtype}{tuple(expected.shape)}"
    a, e = bits(actual), bits(expected)
    if not nan_bits:
        nan_a, nan_e = actual.isnan(), expected.isnan()
        assert torch.equal(nan_a, nan_e), "NaN positions differ"
        a, e = a[~nan_a], e[~nan_e]
    if not torch.equal(a, e):
        diff = (a != e).nonzero()
        i = tuple(diff[0].tolist())
        raise AssertionError(f"{diff.shape[0]} of {actual.numel()} elements differ; first at {i}: "
                             f"{actual.detach()[i].item()!r} vs {expected.detach()[i].item()!r}")


def reference_coef(max_norm: float, total_norm: torch.Tensor) -> torch.Tensor:
    """torch's clipping coefficient, written out: ``min(max_norm / (total_norm + 1e-6), 1)``."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def reference_clip_(grads: Iterable[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Plain-torch clip: one ``grad.mul_(coef)`` per tensor (no foreach), like torch's slow path."""
    coef = reference_coef(max_norm, total_norm)
    for g in grads:
        g.mul_(coef.to(g.device))


def param_with_grad(grad: torch.Tensor) -> torch.Tensor:
    """A leaf parameter shaped like ``grad`` whose ``.grad`` is ``grad`` itself (not a copy)."""
    p = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device, requires_grad=True)
    p.grad = grad
    return p


def random_grad(shape, dtype: torch.dtype, scale: float = 1.0, generator=None) -> torch.Tensor:
    """Normal values times ``scale``, drawn in float64 and rounded once to ``dtype``."""
    return (torch.randn(shape, dtype=torch.float64, generator=generator) * scale).to(dtype)


# A quiet NaN with a payload of its own, per dtype (positive: it fits the signed INT_VIEW).
NAN_PAYLOAD = {torch.float32: 0x7FC00123, torch.float64: 0x7FF8000000000123,
               torch.float16: 0x7E01, torch.bfloat16: 0x7FC1}


def clamp_test_values(dtype: torch.dtype, n: int, bound: float) -> torch.Tensor:
    """n values of ``dtype`` for clamp tests: normals spread around ``bound`` (seeded by n), and
    every 11th element from index 0 a NaN with ``NAN_PAYLOAD``, then +inf, -inf, +0.0, -0.0,
    +bound and -bound, so most 16-byte words hold a value that changes next to values that must
    keep their exact bits."""
    g = torch.Generator().manual_seed(n)
    t = (torch.randn(n, dtype=torch.float64, generator=g) * bound).to(dtype)
    specials = [math.inf, -math.inf, 0.0, -0.0, bound, -bound]
    for k, value in enumerate(specials):
        t[k + 1::11] = torch.tensor(value, dtype=torch.float64).to(dtype)
    t.view(INT_VIEW[dtype])[0::11] = NAN_PAYLOAD[dtype]
    return t
