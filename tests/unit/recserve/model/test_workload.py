"""The traffic sampler against exact Zipf probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.model.workload import scatter, zipf_ranks


@pytest.mark.parametrize("s", [0.0, 0.8, 1.0, 1.2])
def test_zipf_ranks_follow_the_law(s: float) -> None:
    rows, n = 50, 200_000
    ranks = zipf_ranks(np.random.default_rng(0), n, rows, s)
    assert ranks.min() >= 0 and ranks.max() < rows
    # Exact probability of rank r under the continuous law sampled by the inverse CDF.
    edges = np.arange(1, rows + 2, dtype=np.float64)
    cdf = np.log(edges) if s == 1.0 else (edges ** (1 - s) - 1)
    probs = np.diff(cdf) / (cdf[-1] - cdf[0])
    observed = np.bincount(ranks, minlength=rows) / n
    np.testing.assert_allclose(observed, probs, atol=4 * np.sqrt(probs / n).max())
    if s >= 1.0:
        assert observed[0] > 5 * observed[-1]


@pytest.mark.parametrize("rows", [1, 7, 1000, 2**20 + 3])
def test_scatter_is_a_bijection(rows: int) -> None:
    ranks = np.arange(min(rows, 100_000), dtype=np.int64)
    ids = scatter(ranks, rows)
    assert ids.min() >= 0 and ids.max() < rows
    assert len(np.unique(ids)) == len(ids)
