# numba-compiled bodies: numpy scalar types and intrinsic calls are numba's, not mypy's.
# mypy: disable-error-code="assignment, call-arg, no-any-return"
"""The compiled core of a row cache: W-TinyLFU over slots of one arena, no Python per id.

A cache of ``S`` slots keeps rows of one table part by part-local row id. Its state is plain
numpy arrays (``CacheState``), so the compiled functions run without the GIL:

- an open-addressing hash map (linear probing, backward-shift deletion) from row id to slot,
  sized to at most 70 % load;
- a count-min sketch of 4-bit counters (4 rows), halved every ``10 * S`` accesses, which
  estimates how often a row was asked for recently (TinyLFU);
- a window of ``~1 %`` of the slots, a FIFO every miss enters, and a main region swept by a
  CLOCK with 2-bit reference counters. A row leaving the window replaces the main region's
  CLOCK victim only if the sketch says it is asked for more often (W-TinyLFU, Einziger et
  al. 2017, as Caffeine does): one-off rows of a scan pass through the window without
  evicting the hot set. Moving a row between regions relabels its slot; no bytes move.

Rows a lookup uses are pinned until it has pooled them, so a concurrent lookup never
evicts a slot being read. A lookup's own misses can outnumber the window, so a row can leave
the window while still pinned: if it loses the contest it is *doomed*, kept in a reserve of
``~5 %`` of the slots until unpinned, then freed (without the reserve it would have to enter
the main region and evict a hot row: measured, that made the policy no better than LRU
when lookups are large beside the window). With the reserve full a pinned loser enters the
main region after all. When every candidate is pinned the cache cannot take the row
(``OVERFLOW``) and the caller serves that part of the lookup around the cache.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

EMPTY = -1
FREE, WINDOW, MAIN, DOOMED = 0, 1, 2, 3
MAX_REF = 3
SAMPLE = 8  # main slots with a zero CLOCK counter compared for the victim
SKETCH_ROWS = 4
MAX_COUNT = 15
LOAD = 0.7
OVERFLOW = -2  # resolve's status when no slot could be freed
OK = -1
# meta columns
HAND, W_HEAD, W_LEN, MAIN_LEN, FREE_TOP, SAMPLES, W_CAP, MAIN_CAP, EVICTIONS, DOOM, DOOM_CAP = (
    range(11)
)
META = 11
_SEEDS = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93],
    dtype=np.uint64,
)


class CacheState(NamedTuple):
    keys: np.ndarray  # int64 [H]: row id or EMPTY
    vals: np.ndarray  # int32 [H]: slot
    slot_id: np.ndarray  # int64 [S]: row id in the slot or EMPTY
    ref: np.ndarray  # uint8 [S]: CLOCK counter
    seg: np.ndarray  # uint8 [S]: FREE, WINDOW or MAIN
    pins: np.ndarray  # int32 [S]: lookups using the slot
    stamp: np.ndarray  # int64 [S]: the last lookup (epoch) that pinned it
    window: np.ndarray  # int32 [W]: FIFO ring of window slots
    free: np.ndarray  # int32 [S]: stack of free slots
    sketch: np.ndarray  # uint8 [4, width]
    meta: np.ndarray  # int64 [META]


def _pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def table_size(slots: int) -> int:
    return max(8, _pow2(int(np.ceil(slots / LOAD)) + 1))


def sketch_width(slots: int) -> int:
    return max(64, _pow2(slots))


def window_size(slots: int) -> int:
    return max(1, slots // 100) if slots > 1 else slots


def reserve_size(slots: int) -> int:
    """Slots kept for pinned rows that lost admission (none below 40 slots)."""
    return min(slots // 20, 1 << 16)


def state_bytes(slots: int) -> int:
    """Bytes of a ``CacheState`` of ``slots`` slots (the arena's rows not included)."""
    if slots <= 0:
        return 0
    return (
        table_size(slots) * 12
        + slots * (8 + 1 + 1 + 4 + 8 + 4)
        + window_size(slots) * 4
        + SKETCH_ROWS * sketch_width(slots)
        + META * 8
    )


def new_state(slots: int) -> CacheState:
    h = table_size(slots)
    w = window_size(slots)
    meta = np.zeros(META, np.int64)
    r = reserve_size(slots)
    meta[W_CAP] = w
    meta[MAIN_CAP] = slots - w - r
    meta[DOOM_CAP] = r
    meta[FREE_TOP] = slots
    return CacheState(
        keys=np.full(h, EMPTY, np.int64),
        vals=np.zeros(h, np.int32),
        slot_id=np.full(slots, EMPTY, np.int64),
        ref=np.zeros(slots, np.uint8),
        seg=np.zeros(slots, np.uint8),
        pins=np.zeros(slots, np.int32),
        stamp=np.full(slots, -1, np.int64),
        window=np.zeros(max(w, 1), np.int32),
        free=np.arange(slots - 1, -1, -1, dtype=np.int32),  # slot 0 on top
        sketch=np.zeros((SKETCH_ROWS, sketch_width(slots)), np.uint8),
        meta=meta,
    )


@njit(nogil=True, cache=True)
def _mix(key: np.int64, seed: np.uint64) -> np.uint64:
    z = np.uint64(key) + seed
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(nogil=True, cache=True)
def _find(keys, key):
    mask = keys.size - 1
    i = np.int64(_mix(key, np.uint64(0)) & np.uint64(mask))
    while True:
        k = keys[i]
        if k == key:
            return i
        if k == EMPTY:
            return -1
        i = (i + 1) & mask


@njit(nogil=True, cache=True)
def _insert(keys, vals, key, slot):
    mask = keys.size - 1
    i = np.int64(_mix(key, np.uint64(0)) & np.uint64(mask))
    while keys[i] != EMPTY:
        i = (i + 1) & mask
    keys[i] = key
    vals[i] = slot


@njit(nogil=True, cache=True)
def _delete(keys, vals, key):
    """Remove ``key`` by shifting later entries of its run back (no tombstones)."""
    mask = keys.size - 1
    i = _find(keys, key)
    if i < 0:
        return
    j = i
    while True:
        j = (j + 1) & mask
        k = keys[j]
        if k == EMPTY:
            break
        home = np.int64(_mix(k, np.uint64(0)) & np.uint64(mask))
        # Leave k where it is if its home lies cyclically in (i, j].
        if (i <= j and i < home <= j) or (i > j and (home > i or home <= j)):
            continue
        keys[i] = k
        vals[i] = vals[j]
        i = j
    keys[i] = EMPTY


@njit(nogil=True, cache=True)
def _estimate(sketch, key):
    mask = np.uint64(sketch.shape[1] - 1)
    best = MAX_COUNT
    for r in range(SKETCH_ROWS):
        c = sketch[r, np.int64(_mix(key, _SEEDS[r]) & mask)]
        best = min(best, np.int64(c))
    return best


@njit(nogil=True, cache=True)
def _count(sketch, meta, key, slots):
    mask = np.uint64(sketch.shape[1] - 1)
    for r in range(SKETCH_ROWS):
        at = np.int64(_mix(key, _SEEDS[r]) & mask)
        if sketch[r, at] < MAX_COUNT:
            sketch[r, at] += 1
    meta[SAMPLES] += 1
    if meta[SAMPLES] >= 10 * slots:  # age: halve every counter
        for r in range(SKETCH_ROWS):
            for c in range(sketch.shape[1]):
                sketch[r, c] >>= 1
        meta[SAMPLES] //= 2


@njit(nogil=True, cache=True)
def _clock_victim(ref, seg, pins, meta, sketch, slot_id):
    """Of the next SAMPLE unpinned main slots the CLOCK hand passes, the one the sketch
    counts least (ties: the first); -1 if none is found in a full sweep."""
    n = seg.size
    hand = meta[HAND]
    best, best_est, seen = -1, 1 << 30, 0
    for _ in range(2 * n + 1):
        s = hand
        hand = hand + 1 if hand + 1 < n else 0
        if seg[s] != MAIN or pins[s] > 0:
            continue
        if ref[s] > 0:
            ref[s] -= 1
            continue
        e = _estimate(sketch, slot_id[s])
        if e < best_est:
            best, best_est = s, e
        seen += 1
        if seen >= SAMPLE or best_est == 0:
            break
    meta[HAND] = hand
    return best


@njit(nogil=True, cache=True)
def _release(st_keys, st_vals, slot_id, seg, free, meta, s):
    if slot_id[s] != EMPTY:
        _delete(st_keys, st_vals, slot_id[s])
    slot_id[s] = EMPTY
    seg[s] = FREE
    free[meta[FREE_TOP]] = s
    meta[FREE_TOP] += 1
    meta[EVICTIONS] += 1


@njit(nogil=True, cache=True)
def _take_slot(keys, vals, slot_id, ref, seg, pins, window, free, sketch, meta):
    """A free slot for a new row in the window, making room by W-TinyLFU; -1 if all
    candidates are pinned."""
    w_cap = meta[W_CAP]
    while meta[W_LEN] >= w_cap and meta[W_LEN] > 0:
        c = window[meta[W_HEAD]]
        if meta[MAIN_LEN] < meta[MAIN_CAP]:
            seg[c] = MAIN
            meta[MAIN_LEN] += 1
        else:
            v = _clock_victim(ref, seg, pins, meta, sketch, slot_id)
            wins = v >= 0 and _estimate(sketch, slot_id[c]) > _estimate(sketch, slot_id[v])
            if wins:
                _release(keys, vals, slot_id, seg, free, meta, v)
                seg[c] = MAIN
            elif pins[c] == 0:
                _release(keys, vals, slot_id, seg, free, meta, c)
            elif meta[DOOM] < meta[DOOM_CAP]:
                seg[c] = DOOMED  # freed when its last lookup unpins it
                meta[DOOM] += 1
            elif v >= 0:
                _release(keys, vals, slot_id, seg, free, meta, v)
                seg[c] = MAIN
            else:
                return -1
        meta[W_HEAD] = meta[W_HEAD] + 1 if meta[W_HEAD] + 1 < w_cap else 0
        meta[W_LEN] -= 1
    if meta[FREE_TOP] == 0:
        return -1
    meta[FREE_TOP] -= 1
    s = free[meta[FREE_TOP]]
    if w_cap > 0:
        tail = meta[W_HEAD] + meta[W_LEN]
        window[tail - w_cap if tail >= w_cap else tail] = s
        meta[W_LEN] += 1
        seg[s] = WINDOW
    else:
        seg[s] = MAIN
    return s


@njit(nogil=True, cache=True)
def resolve(
    ids,
    lo,
    hi,
    first,
    rows,
    out,
    epoch,
    keys,
    vals,
    slot_id,
    ref,
    seg,
    pins,
    stamp,
    window,
    free,
    sketch,
    meta,
    miss_rows,
    miss_slots,
    pinned,
    counts,
):
    """Map ``ids[lo:hi]`` (ids of rows ``[first, first + rows)``) to slots in ``out[lo:hi]``.

    Hits set their CLOCK counter; each miss gets a slot (its row id and slot appended to
    ``miss_rows``/``miss_slots``, for the caller to read before anyone pools). Every slot
    used is pinned once per ``epoch`` and listed in ``pinned``. ``counts`` [hits, misses,
    pinned] are running totals for the lookup. Returns ``OK``, ``OVERFLOW`` (every slot
    pinned; ids before the one returned in ``counts[3]`` are mapped) or the position of the
    first id out of range (nothing changed).
    """
    for j in range(lo, hi):
        if ids[j] < first or ids[j] >= first + rows:
            return j
    slots = seg.size
    for j in range(lo, hi):
        key = np.int64(ids[j]) - first
        _count(sketch, meta, key, slots)
        at = _find(keys, key)
        if at >= 0:
            s = vals[at]
            if ref[s] < MAX_REF:
                ref[s] += 1
            counts[0] += 1
        else:
            s = _take_slot(keys, vals, slot_id, ref, seg, pins, window, free, sketch, meta)
            if s < 0:
                counts[3] = j
                return OVERFLOW
            slot_id[s] = key
            ref[s] = 0
            _insert(keys, vals, key, s)
            miss_rows[counts[1]] = key
            miss_slots[counts[1]] = s
            counts[1] += 1
        if stamp[s] != epoch:
            stamp[s] = epoch
            pins[s] += 1
            pinned[counts[2]] = s
            counts[2] += 1
        out[j] = s
    return OK


@njit(nogil=True, cache=True)
def unpin(pins, pinned, n, keys, vals, slot_id, seg, free, meta):
    """Release a lookup's pins; doomed rows it was the last to use are freed."""
    for i in range(n):
        s = pinned[i]
        pins[s] -= 1
        if pins[s] == 0 and seg[s] == DOOMED:
            _release(keys, vals, slot_id, seg, free, meta, s)
            meta[EVICTIONS] -= 1  # never admitted: not an eviction
            meta[DOOM] -= 1


@njit(nogil=True, cache=True)
def admit(rows_in, counts_in, keys, vals, slot_id, ref, seg, window, free, sketch, meta, out_slots):
    """Warm-up: put rows straight into the main region (then the window) while they have
    room, seeding the sketch with their counts; returns how many were placed (their slots in
    ``out_slots``; rows already cached or past capacity are skipped)."""
    placed = 0
    mask = np.uint64(sketch.shape[1] - 1)
    for i in range(rows_in.size):
        key = rows_in[i]
        if meta[FREE_TOP] == 0:
            break
        if _find(keys, key) >= 0:
            continue
        meta[FREE_TOP] -= 1
        s = free[meta[FREE_TOP]]
        if meta[MAIN_LEN] < meta[MAIN_CAP]:
            seg[s] = MAIN
            meta[MAIN_LEN] += 1
        elif meta[W_LEN] >= meta[W_CAP]:
            meta[FREE_TOP] += 1  # the reserve stays free
            break
        else:
            tail = meta[W_HEAD] + meta[W_LEN]
            window[tail - meta[W_CAP] if tail >= meta[W_CAP] else tail] = s
            meta[W_LEN] += 1
            seg[s] = WINDOW
        slot_id[s] = key
        ref[s] = 1
        _insert(keys, vals, key, s)
        for r in range(SKETCH_ROWS):
            at = np.int64(_mix(key, _SEEDS[r]) & mask)
            sketch[r, at] = max(sketch[r, at], min(MAX_COUNT, counts_in[i]))
        out_slots[placed] = s
        placed += 1
    return placed


@njit(nogil=True, cache=True)
def estimates(sketch, slot_id, out):
    """The sketch's estimate for the row of every occupied slot (0 for free slots)."""
    for s in range(slot_id.size):
        out[s] = _estimate(sketch, slot_id[s]) if slot_id[s] != EMPTY else 0


@njit(nogil=True, cache=True)
def forget(keys, vals, slot_id, ref, rows):
    """Drop ``rows`` from the map (their reads failed): their slots hold no row and are the
    first the CLOCK or the window gives up."""
    for i in range(rows.size):
        at = _find(keys, rows[i])
        if at < 0:
            continue
        s = vals[at]
        _delete(keys, vals, rows[i])
        slot_id[s] = EMPTY
        ref[s] = 0
