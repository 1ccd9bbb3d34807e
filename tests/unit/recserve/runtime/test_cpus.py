"""How processes split the CPUs they may use (``gateway --pin-workers``)."""

from __future__ import annotations

import pytest

from recserve.runtime.cpus import share


def test_processes_get_blocks_of_the_cpus_in_their_order() -> None:
    assert [share([0, 1], k, 2) for k in range(2)] == [{0}, {1}]
    assert [share([0, 1, 2, 3], k, 2) for k in range(2)] == [{0, 1}, {2, 3}]
    assert [share([4, 5, 6], k, 2) for k in range(2)] == [{4}, {5, 6}]
    assert share([3, 1], 0, 1) == {1, 3}  # one process: every CPU


def test_more_processes_than_cpus_take_one_each_round_robin() -> None:
    assert [share([0, 1], k, 4) for k in range(4)] == [{0}, {1}, {0}, {1}]
    assert [share([7], k, 3) for k in range(3)] == [{7}] * 3


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 6])
def test_the_shares_cover_the_cpus_once_and_evenly(n: int, count: int) -> None:
    cpus = list(range(10, 10 + n))
    shares = [share(cpus, k, count) for k in range(count)]
    if count >= n:
        assert all(len(s) == 1 for s in shares)
        assert set().union(*shares) == set(cpus[:count])
        return
    assert sum(len(s) for s in shares) == n and set().union(*shares) == set(cpus)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for s in shares:  # a block: consecutive in the given order
        at = sorted(cpus.index(c) for c in s)
        assert at == list(range(at[0], at[0] + len(at)))


@pytest.mark.parametrize(("cpus", "index", "count"), [([], 0, 1), ([0], 1, 1), ([0], 0, 0)])
def test_a_share_outside_the_split_is_refused(cpus: list[int], index: int, count: int) -> None:
    with pytest.raises(ValueError):
        share(cpus, index, count)
