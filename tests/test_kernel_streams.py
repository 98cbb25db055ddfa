"""The CPU kernels walk each chunk as ``STREAMS`` interleaved sub-ranges plus a tail
(kernels/cpu.py). These tests pin that walk down at the kernel level: every chunk length around
the stream boundaries, chunks that start inside a tensor, serial and threaded runs, every dtype.

The values make any misread visible: an element read twice, skipped, or read at the wrong offset
changes an exact sum of distinct powers of two, moves the position of the one largest value, or
leaves one element scaled twice or not at all.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from fastclip._table import DTYPE_CODES
from fastclip.kernels import cpu as K
from fastclip.kernels.layout import NORM_INF, NORM_L1, NORM_L2, NORM_POWER, build_chunk_table
from reference import ALL_DTYPES, assert_bitwise_equal

# Chunk lengths 1 .. 4 * STREAMS + 3 cover q = 0 (tail only) to q = 4 with every tail length.
LENGTHS = list(range(1, 4 * K.STREAMS + 4))
CHUNK_SIZES = [1 << 16, 7]  # one chunk per tensor; chunks of 7 that start inside a tensor
GROUPS = [1, 2]  # the serial kernel; the threaded one over two work groups


def powers_of_two(n: int, dtype: torch.dtype) -> torch.Tensor:
    """n distinct powers of two with alternating signs, exact in every dtype (2**-14 .. 2**14)."""
    exps = torch.arange(n, dtype=torch.float64) % 29 - 14
    signs = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).double()
    return (signs * torch.exp2(exps)).to(dtype)


def table(tensors):
    addrs = np.array([t.data_ptr() for t in tensors], dtype=np.int64)
    codes = np.array([DTYPE_CODES[t.dtype] for t in tensors], dtype=np.int64)
    return addrs, codes


def chunked(tensors, chunk_size, n_groups):
    return build_chunk_table(np.array([t.numel() for t in tensors], dtype=np.int64),
                             chunk_size=chunk_size, n_groups=n_groups)


def chunk_values(tensors, chunks):
    """Each chunk's elements as float64 (the reference's view)."""
    return [tensors[t][s:e].double() for t, s, e in zip(chunks.tensor, chunks.start, chunks.stop)]


def power_sums(tensors, chunks, kind, p=0.0):
    addrs, codes = table(tensors)
    out = np.full(chunks.n_chunks, np.nan)
    run = K.chunk_power_sums_serial if chunks.group_bounds.shape[0] == 2 else K.chunk_power_sums_parallel
    run(addrs, codes, chunks.tensor, chunks.start, chunks.stop, chunks.group_bounds, kind, p, out)
    return out


def test_many_lengths_make_many_chunk_shapes():
    # What the other tests rely on: with chunks of 7, the chunk lengths seen include every one
    # from 1 to 7, and chunks start inside tensors.
    tensors = [powers_of_two(n, torch.float32) for n in LENGTHS]
    chunks = chunked(tensors, 7, 1)
    assert set((chunks.stop - chunks.start).tolist()) == set(range(1, 8))
    assert (chunks.start > 0).any()


@pytest.mark.parametrize("n_groups", GROUPS)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_l1_sum_reads_every_element_once(dtype, chunk_size, n_groups):
    # Sums of distinct powers of two are exact in float64, so the kernel must match the exact sum
    # bit for bit: a missed or doubled element changes a binary digit.
    tensors = [powers_of_two(n, dtype) for n in LENGTHS]
    chunks = chunked(tensors, chunk_size, n_groups)
    got = power_sums(tensors, chunks, NORM_L1)
    want = [math.fsum(v.abs().tolist()) for v in chunk_values(tensors, chunks)]
    assert got.tolist() == want


@pytest.mark.parametrize("n_groups", GROUPS)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_l2_and_power_sums(dtype, chunk_size, n_groups):
    # 1 + j/64 are exact in every dtype and distinct; a misread changes a sum by >= 1.
    tensors = [(1 + torch.arange(n, dtype=torch.float64) / 64).to(dtype) for n in LENGTHS]
    chunks = chunked(tensors, chunk_size, n_groups)
    for kind, p in [(NORM_L2, 2.0), (NORM_POWER, 3.0)]:
        got = power_sums(tensors, chunks, kind, p)
        want = [math.fsum((v.abs() ** p).tolist()) for v in chunk_values(tensors, chunks)]
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("n_groups", GROUPS)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_inf_norm_finds_the_largest_value_in_every_position(dtype, chunk_size, n_groups):
    n = LENGTHS[-1]
    for pos in range(n):
        for special in (-8.0, math.nan):
            t = torch.full((n,), 0.5, dtype=dtype)
            t[pos] = special
            chunks = chunked([t], chunk_size, n_groups)
            got = power_sums([t], chunks, NORM_INF)
            holds = (chunks.start <= pos) & (pos < chunks.stop)
            for c in range(chunks.n_chunks):
                want = (math.nan if math.isnan(special) else 8.0) if holds[c] else 0.5
                assert got[c] == want or (math.isnan(want) and math.isnan(got[c])), (pos, c)


# write kernel -> (its argument, torch's op on one tensor)
WRITES = {
    "scale": (0.3, lambda t: t.mul_(0.3)),
    "clamp": (0.5, lambda t: t.clamp_(-0.5, 0.5)),
}


@pytest.mark.parametrize("n_groups", GROUPS)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("op", list(WRITES))
def test_writes_match_torch_in_every_position(op, dtype, chunk_size, n_groups):
    # Against torch's own op, bit for bit: an element written twice or skipped differs.
    arg, torch_op = WRITES[op]
    tensors = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype) for n in LENGTHS]
    want = [torch_op(t.clone()) for t in tensors]
    chunks = chunked(tensors, chunk_size, n_groups)
    addrs, codes = table(tensors)
    run = getattr(K, op + ("_serial" if n_groups == 1 else "_parallel"))
    run(addrs, codes, chunks.tensor, chunks.start, chunks.stop, chunks.group_bounds, arg)
    for got, w in zip(tensors, want):
        assert_bitwise_equal(got, w)


def test_negative_control_a_doubled_element_is_seen():
    # The L1 check above can fail: counting one element twice changes the exact sum.
    v = powers_of_two(LENGTHS[-1], torch.float32).double().abs().tolist()
    assert math.fsum(v) != math.fsum(v + v[-1:])


@pytest.mark.parametrize("nan_bits", [0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0x7FF8000000000000],
                         ids=["payload", "negative-payload", "quiet"])
@pytest.mark.parametrize("n_groups", GROUPS)
def test_bfloat16_scale_by_a_nan_of_any_payload_gives_nan(nan_bits, n_groups):
    # float -> bfloat16 rounds by adding a bias to the float32 bits; a NaN whose low bits are all
    # ones would carry into the exponent and sign (NaN -> -0.0 or +0.0). torch's conversion
    # guards NaN, and so must the kernel: a NaN coefficient (a NaN norm) makes every element NaN.
    coef = struct.unpack("<d", struct.pack("<Q", nan_bits))[0]
    assert math.isnan(coef)
    tensors = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
               for n in LENGTHS]
    want = [t.clone().mul_(torch.tensor(coef, dtype=torch.float32)) for t in tensors]
    chunks = chunked(tensors, 7, n_groups)
    addrs, codes = table(tensors)
    run = K.scale_serial if n_groups == 1 else K.scale_parallel
    run(addrs, codes, chunks.tensor, chunks.start, chunks.stop, chunks.group_bounds, coef)
    for got, w in zip(tensors, want):
        assert bool(w.isnan().all())  # torch's answer
        assert_bitwise_equal(got, w, nan_bits=False)
