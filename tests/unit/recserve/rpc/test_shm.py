"""The shared-memory arena: regions lent and returned, and what a shard agrees to map."""

from __future__ import annotations

import fcntl
import gc
import os
import subprocess
import sys

import numpy as np
import pytest

from recserve.contracts.errors import BadRequest, SharedMemoryUnavailable
from recserve.rpc.shm import ALIGN, KEY_BYTES, PREFIX, Arena, Maps, Region, remove_stale
from recserve.rpc.wire import ShmSpec


@pytest.fixture
def arena(tmp_path):
    a = Arena(1 << 16, directory=tmp_path)
    yield a
    a.close()


def test_regions_are_reused_and_merge_back_whatever_the_order(arena) -> None:
    whole = arena.size - ALIGN
    taken = [arena.alloc(1000) for _ in range(5)]
    assert None not in taken and len(set(taken)) == 5
    assert all(at % ALIGN == 0 for at in taken)
    for at in (taken[1], taken[3], taken[0], taken[4], taken[2]):
        arena.release(at)
    arena.release(taken[2])  # twice: a no-op
    assert arena.free == [(ALIGN, whole)] and arena.lent == 0
    assert arena.alloc(whole) == ALIGN
    assert arena.alloc(1) is None  # full: the caller goes by socket


def test_a_loan_is_returned_when_its_last_view_is_gone(arena) -> None:
    ids = np.arange(10, dtype=np.int64)
    lengths = np.array([4, 6], np.int32)
    loan = arena.lend(ids, lengths, None, out_bytes=2 * 8 * 4)
    assert loan is not None and arena.lent > 0
    at, n = loan.spec["ids"]
    assert np.array_equal(np.frombuffer(arena.map, np.int64, n // 8, at), ids)
    view = loan.floats(loan.out[0], 16)
    view[:] = 1.5
    del loan
    gc.collect()
    assert arena.lent > 0  # the reply's view still reads the region
    del view
    gc.collect()
    assert arena.lent == 0


def test_a_reply_offset_outside_the_loan_is_refused(arena) -> None:
    loan = arena.lend(np.zeros(4, np.int64), np.array([4], np.int32), None, out_bytes=64)
    for offset in (loan.out[0] - 4, loan.out[1], loan.out[0] + 2, "0", None):
        with pytest.raises(ValueError):
            loan.floats(offset, 4)


def test_a_shard_maps_only_arenas_under_its_directory_with_their_key(arena, tmp_path) -> None:
    maps = Maps(directory=tmp_path)
    key = arena.key.hex()
    assert maps.get(str(arena.path), key)[:KEY_BYTES] == arena.key
    for path in (
        "/etc/passwd",
        f"{tmp_path}/../{arena.path.name}",
        f"{tmp_path}/other",
        f"{tmp_path}//{arena.path.name}",
        f"{tmp_path}/{PREFIX}dir/{arena.path.name}",
        f"{tmp_path}x/{arena.path.name}",
    ):
        with pytest.raises(BadRequest):
            maps.get(path, key)
    with pytest.raises(BadRequest):
        maps.get(str(arena.path), "not hex")
    with pytest.raises(SharedMemoryUnavailable):
        maps.get(str(arena.path), "00" * KEY_BYTES)  # not its key
    with pytest.raises(SharedMemoryUnavailable):
        maps.get(f"{tmp_path}/{PREFIX}0-gone", key)  # no such file (another host)


def test_a_lookups_arrays_are_copied_and_its_reply_region_checked(arena, tmp_path) -> None:
    maps = Maps(directory=tmp_path)
    loan = arena.lend(np.arange(6, dtype=np.int32), np.array([6], np.int32), None, out_bytes=128)
    spec = ShmSpec(str(arena.path), arena.key.hex(), [loan.spec["ids"], loan.spec["lengths"]],
                   tuple(loan.spec["out"]))  # fmt: skip
    arrays, region = maps.resolve(spec)
    arena.map[loan.spec["ids"][0]] = 99  # the client writes again: the copy keeps what came
    assert np.array_equal(arrays[0].view(np.int32), np.arange(6))
    out = region.take((4, 1, 8))
    out[:] = 7.0
    assert region.offsets == [loan.out[0]]
    assert np.all(loan.floats(loan.out[0], 16) == 7.0)
    with pytest.raises(BadRequest) as err:
        region.take((1, 1, 1))  # 128 bytes are used up
    assert err.value.field == "shm.out"
    bad = spec._replace(out=(arena.size - 8, 64))
    with pytest.raises(BadRequest) as err:
        maps.resolve(bad)
    assert err.value.field == "shm.out"
    with pytest.raises(BadRequest) as err:
        maps.resolve(spec._replace(arrays=[(0, 8), loan.spec["lengths"]]))  # over the key
    assert err.value.field == "shm.ids"


def test_region_take_fits_exactly(tmp_path) -> None:
    a = Arena(1 << 12, directory=tmp_path)
    region = Region(a.map, ALIGN, 4 * 8)
    assert region.take((1, 1, 8)).shape == (1, 1, 8)
    a.close()


def test_stale_arenas_of_dead_processes_are_removed(tmp_path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (tmp_path / f"{PREFIX}{dead}-abc").write_bytes(b"x")
    live = tmp_path / f"{PREFIX}{os.getpid()}-abc"
    live.write_bytes(b"x")
    (tmp_path / "unrelated").write_bytes(b"x")
    assert remove_stale(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "unrelated"])


def test_an_arena_locked_by_a_live_process_is_kept_whatever_its_name_says(tmp_path) -> None:
    """A gateway in another PID namespace sharing /dev/shm: its pid means nothing here, but
    it holds its arena's lock, so the arena stays until that process is gone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    foreign = tmp_path / f"{PREFIX}{dead}-ns"
    foreign.write_bytes(b"x")
    hold = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
        "fcntl.flock(fd, fcntl.LOCK_SH); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(foreign)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert remove_stale(tmp_path) == 0 and foreign.exists()
    finally:
        holder.kill()
        holder.communicate()
    assert remove_stale(tmp_path) == 1 and not foreign.exists()
    own = Arena(1 << 12, directory=tmp_path)  # an arena locks its file from the start
    fd = os.open(own.path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        own.close()


def test_a_shard_refuses_files_with_holes_or_of_another_user(arena, tmp_path) -> None:
    """Writing a hole of a full /dev/shm is SIGBUS: a file with holes is refused, and so is
    one a user other than the shard's made."""
    maps = Maps(directory=tmp_path)
    sparse = tmp_path / f"{PREFIX}{os.getpid()}-sparse"
    with open(sparse, "wb") as f:
        f.write(arena.key)
        f.truncate(1 << 20)
    with pytest.raises(SharedMemoryUnavailable, match="shard can use"):
        maps.get(str(sparse), arena.key.hex())
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    os.chown(arena.path, 65534, 65534)
    with pytest.raises(SharedMemoryUnavailable, match="shard can use"):
        maps.get(str(arena.path), arena.key.hex())


def test_a_shard_lets_go_of_arenas_their_clients_unlinked(tmp_path) -> None:
    """A mapping keeps its file's pages in memory: each gateway restart leaves one behind
    unless the shard drops those whose file is gone when the next client comes."""
    maps = Maps(directory=tmp_path)
    old, new = Arena(1 << 12, directory=tmp_path), Arena(1 << 12, directory=tmp_path)
    maps.get(str(old.path), old.key.hex())
    old.close()  # its gateway stopped
    maps.get(str(new.path), new.key.hex())
    assert list(maps.maps) == [str(new.path)]
    new.close()
