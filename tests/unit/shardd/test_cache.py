"""The cache budget's split: parts the split by expected hits gives all their rows are held
whole (resident), which leaves the others more slots; nothing is resident when the budget
is small, everything when it holds the shard."""

from __future__ import annotations

from kernels import rowcache as rc
from recserve.contracts.manifest import AccessStats, TableSpec
from shardd.cache import slots_for, split_budget

HOT = AccessStats(zipf=1.2, pooling_factor=20.0)
COLD = AccessStats(zipf=0.8, pooling_factor=2.0)


def parts() -> list[tuple[TableSpec, int, int]]:
    small = TableSpec("small", 500, 16, features=("s",), stats=HOT)
    big = TableSpec("big", 200_000, 16, features=("b",), stats=COLD)
    return [(small, 0, 500), (big, 0, 200_000)]


def cost(whole: list[bool], slots: list[int], ps: list[tuple[TableSpec, int, int]]) -> int:
    return sum(
        (end - start) * spec.row_bytes if w else n * spec.row_bytes + rc.state_bytes(n)
        for (spec, start, end), w, n in zip(ps, whole, slots, strict=True)
    )


def test_a_part_given_all_its_rows_is_resident_and_frees_room() -> None:
    ps = parts()
    budget = 1 << 20
    before = slots_for(ps, budget)
    assert before[0] == 500  # the split already gives the hot table every row ...
    whole, slots = split_budget(ps, budget)
    assert whole == [True, False] and slots[0] == 500
    assert slots[1] > before[1]  # ... and its bookkeeping now goes to the other part
    assert cost(whole, slots, ps) <= budget


def test_small_budgets_hold_nothing_whole_and_large_ones_everything() -> None:
    ps = parts()
    whole, slots = split_budget(ps, 4096)
    assert whole == [False, False] and cost(whole, slots, ps) <= 4096
    total = sum((end - start) * spec.row_bytes for spec, start, end in ps)
    whole, slots = split_budget(ps, total + (1 << 20))
    assert whole == [True, True] and slots == [500, 200_000]
