"""The version cell's protocol in one process: a version of rows is published at once; a
version of new weights only once every serving worker holds them (or the wait runs out);
a follower never serves a version whose weights it lacks, and fetches them."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace
from typing import Any

import pytest

from gateway import follow
from gateway.follow import Follower, Role, VersionCell, publish


def test_the_cell_is_shared_with_a_forked_process() -> None:
    cell = VersionCell(2)
    assert cell.read() == (-1, -1)
    pid = os.fork()
    if pid == 0:  # the child writes; the parent reads what it wrote
        cell.ack(1, 7)
        cell.publish_weights(5)
        cell.publish(9)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert cell.read() == (9, 5) and int(cell.values[3]) == 7


def test_rows_publish_at_once_and_weights_wait_for_every_worker() -> None:
    async def run() -> None:
        cell = VersionCell(2)
        await publish(cell, 3, -1)  # no new weights: no wait
        assert cell.read() == (3, -1)
        task = asyncio.create_task(publish(cell, 4, 4))
        await asyncio.sleep(0.05)
        assert cell.read() == (3, 4)  # the weights are out, the version not yet
        cell.ack(0, 4)
        await asyncio.sleep(0.05)
        assert not task.done()
        cell.ack(1, 4)
        await asyncio.wait_for(task, 1)
        assert cell.read() == (4, 4)

    asyncio.run(run())


def test_a_worker_that_never_acknowledges_holds_the_version_back_only_so_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(follow, "ACK_S", 0.1)

    async def run() -> None:
        cell = VersionCell(1)
        await asyncio.wait_for(publish(cell, 2, 2), 2)
        assert cell.read() == (2, 2)

    asyncio.run(run())


class FakeUpdater:
    def __init__(self, newest: int) -> None:
        self.nets = SimpleNamespace(newest=newest)
        self.synced_to: int | None = None  # what the next sync brings

    async def sync(self, *, settle: bool) -> int:
        assert not settle  # a follower never settles staged versions
        if self.synced_to is not None:
            self.nets.newest = self.synced_to
        return 0


def test_a_follower_serves_no_version_before_it_holds_its_weights() -> None:
    async def run() -> None:
        cell = VersionCell(1)
        gw: Any = SimpleNamespace(updater=FakeUpdater(0), pooler=SimpleNamespace(version=0))
        f = Follower(gw, Role(cell, 0))
        assert not f.start()  # the admin has published nothing yet
        assert int(cell.values[2]) == 0  # ... but it knows the weights this worker holds
        cell.publish(1)
        assert f.start() and f.version() == 1  # rows: served at once
        cell.publish_weights(2)
        cell.publish(2)
        gw.updater.synced_to = 2
        assert f.version() == 1  # new weights: not before they are here
        await asyncio.sleep(0.01)  # the fetch the call started
        assert int(cell.values[2]) == 2  # acknowledged
        assert f.version() == 2

    asyncio.run(run())
