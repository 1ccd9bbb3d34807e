"""Row-wise int8 embedding tables in FBGEMM's fused layout.

Each row is ``dim`` uint8 codes followed by a float32 scale and a float32 bias, so one row is
fetched with one contiguous read; a value is ``code * scale + bias``. The layout matches
FBGEMM's ``fused 8-bit rowwise`` format so tables can be exchanged with it.
"""

from __future__ import annotations

import numpy as np

from kernels.errors import KernelError

TAIL_BYTES = 8  # float32 scale + float32 bias after the codes


class Int8RowwiseTable:
    """A view over a ``[rows, dim + 8]`` uint8 array (in memory or memory-mapped)."""

    __slots__ = ("data", "dim", "rows")

    def __init__(self, data: np.ndarray) -> None:
        if data.ndim != 2 or data.dtype != np.uint8 or data.shape[1] <= TAIL_BYTES:
            raise KernelError(
                f"int8 row-wise data must be uint8 [rows, dim + {TAIL_BYTES}], "
                f"got {data.dtype} {data.shape}"
            )
        self.data = data
        self.rows = int(data.shape[0])
        self.dim = int(data.shape[1]) - TAIL_BYTES

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.dim)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def codes(self) -> np.ndarray:
        return self.data[:, : self.dim]

    @property
    def scale(self) -> np.ndarray:
        return self.data[:, self.dim : self.dim + 4].view(np.float32)[:, 0]

    @property
    def bias(self) -> np.ndarray:
        return self.data[:, self.dim + 4 :].view(np.float32)[:, 0]

    def dequantize(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Float32 values of the selected rows (a copy)."""
        block = self.data[rows]
        codes = block[:, : self.dim].astype(np.float32)
        scale = block[:, self.dim : self.dim + 4].view(np.float32)
        bias = block[:, self.dim + 4 :].view(np.float32)
        return codes * scale + bias


def quantize_rows(values: np.ndarray) -> np.ndarray:
    """Quantize float rows ``[n, dim]`` to fused int8 row-wise data ``[n, dim + 8]``.

    Per row: ``bias = min``, ``scale = (max - min) / 255``; codes round to nearest. A constant
    row gets scale 0 and reproduces exactly. The error of one value is at most ``scale / 2``.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise KernelError(f"expected a 2-D array, got shape {values.shape}")
    n, dim = values.shape
    lo = values.min(axis=1, initial=np.inf) if dim else np.zeros(n, np.float32)
    hi = values.max(axis=1, initial=-np.inf) if dim else np.zeros(n, np.float32)
    scale = ((hi - lo) / np.float32(255.0)).astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    codes = np.rint((values - lo[:, None]) * inv[:, None])
    out = np.empty((n, dim + TAIL_BYTES), dtype=np.uint8)
    out[:, :dim] = np.clip(codes, 0, 255).astype(np.uint8)
    out[:, dim : dim + 4] = scale.reshape(n, 1).view(np.uint8)
    out[:, dim + 4 :] = lo.astype(np.float32).reshape(n, 1).view(np.uint8)
    return out
