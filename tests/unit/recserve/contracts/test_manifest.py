"""The manifest restates a few facts of the kernels (it must not import them): they agree."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

import kernels
from kernels.quant import TAIL_BYTES
from recserve.contracts import manifest
from recserve.contracts.manifest import InteractionSpec, row_bytes


def test_activations_are_the_kernels() -> None:
    assert manifest.ACTIVATIONS == kernels.ACTIVATIONS


def kernel_of(spec: InteractionSpec, dim: int, n: int) -> Any:
    if spec.kind != "dcn":
        return kernels.Interaction(spec.kind, spec.order, spec.self_interaction)  # type: ignore[arg-type]
    width = dim * (n + 1)
    zeros = (np.zeros((2, width)), np.zeros((width, 2)), np.zeros(width))
    return kernels.CrossNet((kernels.CrossLayer(*zeros),))


def test_interaction_width_is_the_kernels() -> None:
    for kind, order, itself in itertools.product(manifest.INTERACTIONS, manifest.ORDERS, (0, 1)):
        if (order == "torchrec_triu" or kind == "dcn") and itself:
            continue
        dcn = {"layers": 1, "rank": 2} if kind == "dcn" else {}
        spec = InteractionSpec(kind, order, bool(itself), **dcn)
        for dim, n in ((1, 1), (4, 3), (8, 26), (16, 64)):
            kernel = kernel_of(spec, dim, n)
            assert spec.output_width(dim, n) == kernel.output_width(dim, n)
            x = np.zeros((2, dim), np.float32)
            pooled = np.zeros((2, n, dim), np.float32)
            assert kernel(x, pooled).shape == (2, spec.output_width(dim, n))


def test_int8_rows_are_the_kernels_layout() -> None:
    assert manifest.INT8_TAIL == TAIL_BYTES
    codes = kernels.quantize_rows(np.zeros((3, 5), np.float32))
    assert codes.strides[0] == row_bytes("int8", 5)
