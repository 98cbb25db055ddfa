"""Turn a list of torch tensors on one device into the kernels' tensor table.

The table holds raw addresses, so it is only valid while the tensors are alive and unmoved;
it is rebuilt on every call because ``zero_grad(set_to_none=True)`` reallocates grads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fastclip.kernels.layout import BFLOAT16, FLOAT16, FLOAT32, FLOAT64

DTYPE_CODES = {
    torch.float32: FLOAT32,
    torch.float64: FLOAT64,
    torch.float16: FLOAT16,
    torch.bfloat16: BFLOAT16,
}


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements fill ``numel`` consecutive slots from ``data_ptr()``.

    Contiguous, channels-last and transposed tensors qualify: an element-wise kernel may treat
    them as one flat array. torch strides are never negative, so ``data_ptr()`` is the lowest
    address.
    """
    if t.is_contiguous():
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


@dataclass
class TensorTable:
    """Addresses, lengths and dtype codes of tensors on one device, in the caller's order.

    Attributes:
        tensors: the caller's tensors.
        addrs, lengths, codes: the kernel's view of each tensor (int64 numpy arrays).
        strided: indices of tensors whose memory has gaps (sliced views). The kernels read a
            contiguous copy of them (kept alive in ``copies``) and never write through the table;
            writes to them go through torch.
    """

    tensors: list[torch.Tensor]
    addrs: np.ndarray
    lengths: np.ndarray
    codes: np.ndarray
    strided: list[int] = field(default_factory=list)
    copies: list[torch.Tensor] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return int(self.lengths.sum())

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> "TensorTable":
        n = len(tensors)
        addrs = np.empty(n, dtype=np.int64)
        lengths = np.empty(n, dtype=np.int64)
        codes = np.empty(n, dtype=np.int64)
        strided: list[int] = []
        copies: list[torch.Tensor] = []
        for i, t in enumerate(tensors):
            if not is_dense(t):
                strided.append(i)
                t = t.contiguous()
                copies.append(t)
            addrs[i] = t.data_ptr()
            lengths[i] = t.numel()
            codes[i] = DTYPE_CODES[t.dtype]
        return cls(tensors, addrs, lengths, codes, strided, copies)

    def writable_lengths(self) -> np.ndarray:
        """Lengths with the strided tensors masked out, for the write kernels."""
        if not self.strided:
            return self.lengths
        lengths = self.lengths.copy()
        lengths[self.strided] = 0
        return lengths
