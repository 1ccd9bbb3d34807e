"""The dense part of a DLRM: bottom MLP, feature interaction, top MLP, in float32.

Interactions follow the reference implementations exactly, because a served model must
reproduce the scores it was trained to give:

- ``dlrm_tril``: facebookresearch/dlrm. Pairwise dots of ``[x, e_0, ..., e_{T-1}]``, strictly
  lower triangle in row order (1,0), (2,0), (2,1), ...; with self-interaction the diagonal is
  included at the end of each row: (0,0), (1,0), (1,1), ...
- ``torchrec_triu``: torchrec's ``InteractionArch``, the strict upper triangle in row order
  (0,1), (0,2), ..., (1,2), ...
- ``cat``: ``[x, e_0, ..., e_{T-1}]`` concatenated.
- ``CrossNet``: torchrec's ``LowRankCrossNet`` (DCNv2, the interaction of MLPerf's DLRM-v2):
  ``x0 = [x, e_0, ..., e_{T-1}]`` concatenated; each layer ``l`` computes
  ``x_{l+1} = x0 * ((x_l @ V_l.T) @ W_l.T + b_l) + x_l``; the output is ``x_L``.

The dot interactions output ``[x, interactions]``; ``cat`` and ``CrossNet`` output vectors
as wide as the concatenation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from kernels.blas import matmul
from kernels.errors import KernelError
from kernels.interact import dot_pairs

Activation = Literal["relu", "sigmoid", "none"]
InteractionOrder = Literal["dlrm_tril", "torchrec_triu"]
ACTIVATIONS = ("relu", "sigmoid", "none")


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Float32 logistic function without overflow for large negative inputs."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


@dataclass(frozen=True)
class Linear:
    """``y = act(x @ weight.T + bias)``; ``weight`` is ``[out, in]`` as torch stores it."""

    weight: np.ndarray
    bias: np.ndarray
    activation: Activation

    def __post_init__(self) -> None:
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise KernelError(f"bad Linear shapes {self.weight.shape} / {self.bias.shape}")
        if self.activation not in ACTIVATIONS:
            raise KernelError(f"unknown activation {self.activation!r}")
        # Pre-transposed, contiguous copy so the forward is one GEMM per layer.
        object.__setattr__(self, "_weight_t", np.ascontiguousarray(self.weight.T, np.float32))

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = matmul(x, self._weight_t)  # type: ignore[attr-defined]
        y += self.bias
        if self.activation == "relu":
            np.maximum(y, 0.0, out=y)
        elif self.activation == "sigmoid":
            y = sigmoid(y)
        return y


def mlp(layers: Sequence[Linear], x: np.ndarray) -> np.ndarray:
    for layer in layers:
        x = layer(x)
    return x


@functools.lru_cache(maxsize=64)
def pair_indices(n: int, order: InteractionOrder, self_interaction: bool) -> tuple[np.ndarray, ...]:
    """Row/column indices of the pairwise dots kept by ``order`` for ``n`` stacked vectors,
    in row order; cached (read-only), as every batch of a model asks for the same ones."""
    if order == "dlrm_tril":
        rows, cols = np.tril_indices(n, k=0 if self_interaction else -1)
    elif order == "torchrec_triu":
        if self_interaction:
            raise KernelError("torchrec_triu interaction has no self-interaction variant")
        rows, cols = np.triu_indices(n, k=1)
    else:
        raise KernelError(f"unknown interaction order {order!r}")
    for a in (rows, cols):
        a.flags.writeable = False
    return rows, cols


@dataclass(frozen=True)
class Interaction:
    kind: Literal["dot", "cat"]
    order: InteractionOrder = "dlrm_tril"
    self_interaction: bool = False

    def output_width(self, dim: int, n_features: int) -> int:
        n = n_features + 1
        if self.kind == "cat":
            return dim * n
        pairs = n * (n + 1) // 2 if self.self_interaction else n * (n - 1) // 2
        return dim + pairs

    def __call__(self, x: np.ndarray, pooled: np.ndarray) -> np.ndarray:
        """``x`` ``[B, d]`` (bottom MLP output), ``pooled`` ``[B, T, d]`` -> ``[B, width]``."""
        batch = x.shape[0]
        if self.kind == "cat":
            return np.concatenate([x[:, None, :], pooled], axis=1).reshape(batch, -1)
        if pooled.ndim != 3 or pooled.shape[::2] != x.shape:
            raise KernelError(f"pooled shape {pooled.shape} does not fit {x.shape}")
        rows, cols = pair_indices(pooled.shape[1] + 1, self.order, self.self_interaction)
        out = np.empty((batch, x.shape[1] + rows.size), np.float32)
        dot_pairs(
            np.ascontiguousarray(x, np.float32),
            np.ascontiguousarray(pooled, np.float32),
            rows,
            cols,
            out,
        )
        return out


@dataclass(frozen=True)
class CrossLayer:
    """One low-rank cross layer: ``v`` ``[rank, width]``, ``w`` ``[width, rank]``, ``bias``
    ``[width]`` (torchrec's ``V_kernels``, ``W_kernels``, ``bias``)."""

    v: np.ndarray
    w: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        rank, width = self.v.shape if self.v.ndim == 2 else (0, 0)
        if self.w.shape != (width, rank) or self.bias.shape != (width,) or not rank:
            raise KernelError(
                f"cross layer shapes V {self.v.shape}, W {self.w.shape}, bias "
                f"{self.bias.shape} do not fit [rank, width], [width, rank], [width]"
            )
        # Pre-transposed, contiguous float32: two GEMMs per layer, no transposes per batch.
        object.__setattr__(self, "_vt", np.ascontiguousarray(self.v.T, np.float32))
        object.__setattr__(self, "_wt", np.ascontiguousarray(self.w.T, np.float32))
        object.__setattr__(self, "_b", np.ascontiguousarray(self.bias, np.float32))

    def __call__(self, x0: np.ndarray, xl: np.ndarray) -> np.ndarray:
        y = matmul(matmul(xl, self._vt), self._wt)  # type: ignore[attr-defined]
        y += self._b  # type: ignore[attr-defined]
        y *= x0
        y += xl
        return y


@dataclass(frozen=True)
class CrossNet:
    """DCNv2's low-rank cross network over ``[x, e_0, ..., e_{T-1}]`` concatenated."""

    layers: tuple[CrossLayer, ...]

    def __post_init__(self) -> None:
        if not self.layers or len({layer.v.shape[1] for layer in self.layers}) != 1:
            raise KernelError("a cross network needs layers of one width")

    def output_width(self, dim: int, n_features: int) -> int:
        return dim * (n_features + 1)

    def __call__(self, x: np.ndarray, pooled: np.ndarray) -> np.ndarray:
        batch = x.shape[0]
        x0 = np.concatenate([x, pooled.reshape(batch, -1)], axis=1)
        if x0.shape[1] != self.layers[0].v.shape[1]:
            raise KernelError(
                f"cross network of width {self.layers[0].v.shape[1]} given {x0.shape[1]}"
            )
        xl = x0
        for layer in self.layers:
            xl = layer(x0, xl)
        return xl


@dataclass(frozen=True)
class DenseNet:
    bottom: tuple[Linear, ...]
    interaction: Interaction | CrossNet
    top: tuple[Linear, ...]

    def forward(self, dense: np.ndarray, pooled: np.ndarray) -> np.ndarray:
        """Model output ``[B]`` for dense inputs ``[B, d_in]`` and pooled ``[B, T, dim]``.

        Finite but huge inputs may overflow to +-inf (IEEE semantics, no warning); a sample
        whose output is then NaN is the caller's to reject.
        """
        with np.errstate(over="ignore", invalid="ignore"):
            x = mlp(self.bottom, np.asarray(dense, dtype=np.float32))
            if pooled.shape[0] != x.shape[0] or (
                pooled.ndim == 3 and pooled.shape[2] != x.shape[1]
            ):
                raise KernelError(
                    f"pooled shape {pooled.shape} does not fit bottom output {x.shape}"
                )
            z = self.interaction(x, pooled)
            return mlp(self.top, z)[:, 0]
