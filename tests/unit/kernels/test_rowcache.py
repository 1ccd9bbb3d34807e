"""The compiled row-cache core against slow references: the map stays a map through
inserts and evictions, pins hold, W-TinyLFU beats LRU on Zipf traffic with scans."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from kernels import rowcache as rc
from recserve.model.workload import scatter, zipf_ranks


class Cache:
    """A test handle over a ``CacheState``: resolve a batch of ids, then release it."""

    def __init__(self, slots: int) -> None:
        self.st = rc.new_state(slots)
        self.epoch = 0

    def resolve(self, ids: np.ndarray, rows: int = 1 << 40):
        st = self.st
        self.epoch += 1
        n = ids.size
        out = np.empty(n, np.int64)
        misses, miss_slots, pinned = (np.empty(n, t) for t in (np.int64, np.int32, np.int32))
        counts = np.zeros(4, np.int64)
        status = rc.resolve(
            ids, 0, n, 0, rows, out, self.epoch, st.keys, st.vals, st.slot_id, st.ref,
            st.seg, st.pins, st.stamp, st.window, st.free, st.sketch, st.meta,
            misses, miss_slots, pinned, counts,
        )  # fmt: skip
        return status, out, misses[: counts[1]], pinned[: counts[2]], counts

    def release(self, pinned: np.ndarray) -> None:
        st = self.st
        rc.unpin(st.pins, pinned, pinned.size, st.keys, st.vals, st.slot_id, st.seg,
                 st.free, st.meta)  # fmt: skip

    def check(self) -> None:
        """The map, the slots and the regions agree."""
        st = self.st
        used = st.keys != rc.EMPTY
        mapped = dict(zip(st.keys[used].tolist(), st.vals[used].tolist(), strict=True))
        held = {int(k): s for s, k in enumerate(st.slot_id.tolist()) if k != rc.EMPTY}
        assert mapped == held
        for key in mapped:  # every key is reachable from its home by probing
            assert rc._find(st.keys, key) >= 0
        meta = st.meta
        assert (st.seg == rc.WINDOW).sum() == meta[rc.W_LEN] <= meta[rc.W_CAP]
        assert (st.seg == rc.MAIN).sum() == meta[rc.MAIN_LEN] <= meta[rc.MAIN_CAP]
        assert (st.seg == rc.DOOMED).sum() == meta[rc.DOOM] <= meta[rc.DOOM_CAP]
        assert (st.seg == rc.FREE).sum() == meta[rc.FREE_TOP]


def test_map_and_slots_stay_consistent_through_evictions() -> None:
    cache = Cache(300)
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, 5000, 50)
        status, out, misses, pinned, counts = cache.resolve(ids)
        assert status == rc.OK
        # Every id maps to the slot holding it; each distinct miss got a slot once.
        np.testing.assert_array_equal(cache.st.slot_id[out], ids)
        assert len(set(misses.tolist())) == misses.size
        assert counts[0] + counts[1] == ids.size
        assert (cache.st.pins[pinned] == 1).all()
        cache.release(pinned)
        cache.check()
    assert cache.st.meta[rc.EVICTIONS] > 0
    assert not cache.st.pins.any()


def test_pinned_rows_are_never_evicted_and_overflow_is_reported() -> None:
    cache = Cache(100)
    held = np.arange(60)
    _, out_a, _, pinned_a, _ = cache.resolve(held)
    # A second lookup (not yet released: both in flight) over many other rows.
    status, _, _, pinned_b, counts = cache.resolve(np.arange(1000, 1100))
    assert status == rc.OVERFLOW and 30 <= counts[3] <= 40, counts
    np.testing.assert_array_equal(cache.st.slot_id[out_a], held)  # still there
    cache.release(pinned_a)
    cache.release(pinned_b)
    status, _, _, pinned, _ = cache.resolve(np.arange(1000, 1100))
    assert status == rc.OK  # all 100 slots for one lookup once nothing else is pinned
    cache.release(pinned)
    status, _, _, pinned, _ = cache.resolve(np.arange(2000, 2101))
    assert status == rc.OVERFLOW  # 101 distinct rows never fit 100 slots
    cache.release(pinned)
    cache.check()


def test_out_of_range_id_changes_nothing() -> None:
    cache = Cache(10)
    status, *_ = cache.resolve(np.array([1, 2, 70]), rows=50)
    assert status == 2
    assert cache.st.meta[rc.FREE_TOP] == 10 and (cache.st.keys == rc.EMPTY).all()


def lru_hits(stream: list[np.ndarray], slots: int) -> float:
    lru: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for batch in stream:
        for key in batch.tolist():
            total += 1
            if key in lru:
                hits += 1
                lru.move_to_end(key)
            else:
                lru[key] = None
                if len(lru) > slots:
                    lru.popitem(last=False)
    return hits / total


def test_tinylfu_beats_lru_on_zipf_with_scans() -> None:
    """Zipf(0.9) lookups over 100k rows, every tenth lookup a scan of cold rows."""
    rng = np.random.default_rng(1)
    rows, slots = 100_000, 2_000
    stream = []
    for i in range(400):
        if i % 10 == 9:
            stream.append(rng.integers(0, rows, 500))
        else:
            stream.append(scatter(zipf_ranks(rng, 500, rows, 0.9), rows))
    cache = Cache(slots)
    hits = total = 0
    for batch in stream:
        _, _, _, pinned, counts = cache.resolve(batch)
        cache.release(pinned)
        hits += counts[0]
        total += batch.size
    ours, lru = hits / total, lru_hits(stream, slots)
    assert ours > lru * 1.05, (ours, lru)


def test_admit_fills_main_then_window_and_skips_known_rows() -> None:
    cache = Cache(50)
    st = cache.st
    slots = np.empty(50, np.int32)
    rows = np.concatenate([np.arange(40), np.arange(30, 80)])
    placed = rc.admit(rows, np.full(rows.size, 3), st.keys, st.vals, st.slot_id, st.ref,
                      st.seg, st.window, st.free, st.sketch, st.meta, slots)  # fmt: skip
    # 47 in the main region, 1 in the window; the 2 slots of the reserve stay free.
    assert placed == 48 == st.meta[rc.MAIN_CAP] + st.meta[rc.W_CAP]
    assert sorted(st.slot_id[slots[:placed]].tolist()) == list(range(48))
    cache.check()
    _, _, misses, pinned, counts = cache.resolve(np.arange(10))
    assert counts[0] == 10 and misses.size == 0
    cache.release(pinned)
