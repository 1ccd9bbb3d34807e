"""The dense forward against slow loop references of each interaction."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import CrossLayer, CrossNet, DenseNet, Interaction, Linear, sigmoid
from kernels.errors import KernelError


def slow_dot(x: np.ndarray, pooled: np.ndarray, order: str, self_int: bool) -> np.ndarray:
    rows = []
    for b in range(x.shape[0]):
        vecs = [x[b], *list(pooled[b])]
        n = len(vecs)
        if order == "dlrm_tril":
            pairs = [(i, j) for i in range(n) for j in range(n) if j < i or (self_int and j == i)]
        else:
            pairs = [(i, j) for i in range(n) for j in range(n) if j > i]
        rows.append(np.concatenate([x[b], [float(vecs[i] @ vecs[j]) for i, j in pairs]]))
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize(
    "order, self_int", [("dlrm_tril", False), ("dlrm_tril", True), ("torchrec_triu", False)]
)
def test_dot_interaction_order(order, self_int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    pooled = rng.standard_normal((5, 4, 3)).astype(np.float32)
    inter = Interaction("dot", order, self_int)  # type: ignore[arg-type]
    got = inter(x, pooled)
    assert got.shape[1] == inter.output_width(3, 4)
    np.testing.assert_allclose(got, slow_dot(x, pooled, order, self_int), rtol=1e-5, atol=1e-5)


def test_cat_interaction() -> None:
    x = np.ones((2, 2), np.float32)
    pooled = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    got = Interaction("cat")(x, pooled)
    np.testing.assert_array_equal(got, [[1, 1, 0, 1, 2, 3], [1, 1, 4, 5, 6, 7]])


def test_sigmoid_is_stable_and_exact() -> None:
    x = np.array([-1000, -20, 0, 3, 1000], np.float32)
    want = [0.0, 2.0611536e-09, 0.5, 0.95257413, 1.0]  # math.exp-based values
    np.testing.assert_allclose(sigmoid(x), want, rtol=1e-6, atol=1e-30)


def test_forward_rejects_mismatched_pooled() -> None:
    layer = Linear(np.eye(2, dtype=np.float32), np.zeros(2, np.float32), "relu")
    top = Linear(np.ones((1, 2 + 1), np.float32), np.zeros(1, np.float32), "sigmoid")
    net = DenseNet((layer,), Interaction("dot"), (top,))
    assert net.forward(np.ones((3, 2)), np.ones((3, 1, 2), np.float32)).shape == (3,)
    with pytest.raises(KernelError):
        net.forward(np.ones((3, 2)), np.ones((3, 1, 5), np.float32))


def test_linear_rejects_bad_shapes() -> None:
    with pytest.raises(KernelError):
        Linear(np.zeros((2, 3), np.float32), np.zeros(3, np.float32), "relu")
    with pytest.raises(KernelError):
        Linear(np.zeros((2, 3), np.float32), np.zeros(2, np.float32), "tanh")  # type: ignore[arg-type]


def test_cross_network_matches_a_loop_over_samples() -> None:
    """DCNv2's low-rank cross layers against the formula, one sample at a time."""
    rng = np.random.default_rng(5)
    batch, dim, features, rank, n_layers = 7, 4, 3, 2, 3
    width = dim * (features + 1)
    layers = tuple(
        CrossLayer(
            rng.standard_normal((rank, width)).astype(np.float32),
            rng.standard_normal((width, rank)).astype(np.float32),
            rng.standard_normal(width).astype(np.float32),
        )
        for _ in range(n_layers)
    )
    net = CrossNet(layers)
    x = rng.standard_normal((batch, dim)).astype(np.float32)
    pooled = rng.standard_normal((batch, features, dim)).astype(np.float32)
    got = net(x, pooled)
    assert got.shape == (batch, net.output_width(dim, features))
    for b in range(batch):
        x0 = np.concatenate([x[b], pooled[b].reshape(-1)]).astype(np.float64)
        xl = x0.copy()
        for layer in layers:
            xl = x0 * (layer.w @ (layer.v @ xl) + layer.bias) + xl
        np.testing.assert_allclose(got[b], xl, rtol=1e-4, atol=1e-4)


def test_cross_layer_rejects_shapes_that_do_not_fit() -> None:
    with pytest.raises(KernelError, match="do not fit"):
        CrossLayer(np.zeros((2, 6)), np.zeros((5, 2)), np.zeros(6))


def test_dot_interaction_keeps_nan_and_infinity() -> None:
    # The compiled dots may reorder a sum, never assume its terms finite: the gateway
    # answers 400 for a sample whose score is not a number.
    x = np.ones((2, 4), np.float32)
    pooled = np.ones((2, 3, 4), np.float32)
    pooled[0, 1, 2], pooled[1, 0, 0] = np.inf, np.nan
    out = Interaction("dot")(x, pooled)
    assert np.isinf(out[0]).any() and not np.isnan(out[0, :4]).any()
    assert np.isnan(out[1]).any()
    np.testing.assert_array_equal(out[:, :4], x)
