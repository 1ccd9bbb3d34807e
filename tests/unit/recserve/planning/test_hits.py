"""The Zipf hit-rate model against exact sums, and the budget split against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from recserve.planning.hits import CachedPart, expected_hit_rate, hit_rate, split


@pytest.mark.parametrize("s", [0.8, 1.0, 1.2])
def test_hit_rate_is_close_to_the_exact_sum(s: float) -> None:
    rows = 200_000
    w = np.arange(1, rows + 1, dtype=np.float64) ** -s
    for cached in (100, 5_000, 50_000):
        exact = w[:cached].sum() / w.sum()
        assert hit_rate(rows, cached, s) == pytest.approx(exact, abs=0.05)
    assert hit_rate(rows, rows, s) == pytest.approx(1.0)
    assert hit_rate(rows, 0, s) == 0.0


def test_split_fills_the_budget_and_beats_every_coarse_split() -> None:
    parts = [
        CachedPart(rows=100_000, zipf=1.1, traffic=20.0, row_cost=256),
        CachedPart(rows=1_000_000, zipf=0.9, traffic=5.0, row_cost=256),
        CachedPart(rows=50_000, zipf=1.2, traffic=1.0, row_cost=72),
    ]
    budget = 64 << 20
    rows = split(parts, budget)
    cost = sum(r * p.row_cost for r, p in zip(rows, parts, strict=True))
    assert budget - 256 <= cost <= budget
    best = expected_hit_rate(parts, budget)

    def value(alloc: list[float]) -> float:
        total = sum(p.traffic for p in parts)
        return (
            sum(
                p.traffic * hit_rate(p.rows, a / p.row_cost, p.zipf)
                for p, a in zip(parts, alloc, strict=True)
            )
            / total
        )

    for a, b in itertools.product(np.linspace(0, 1, 11), repeat=2):
        if a + b <= 1:
            alloc = [a * budget, b * budget, (1 - a - b) * budget]
            assert value(alloc) <= best + 1e-6


def test_everything_fits() -> None:
    parts = [CachedPart(rows=10, zipf=1.0, traffic=1.0, row_cost=100)]
    assert split(parts, 10_000) == [10]
    assert expected_hit_rate(parts, 10_000) == 1.0
