"""``--admin-port``: online updates taken by a process of their own, whose versions the
serving workers follow.

Taking an update costs the process that takes it: megabytes of body read on its event loop,
parsed and checked under its GIL. With that process also serving, requests queue behind it
(``bench_updates``: serving P99 1.41x its figure without updates with the intake in the
serving gateway, 1.24x with it in another process). With ``--admin-port`` the supervisor
(``gateway.workers``) forks one more worker, the admin: it takes ``POST /v1/updates`` and
``/v1/deploy`` on that port and orders the versions as a lone gateway does; the serving
workers answer those routes with 421 naming the port.

The admin publishes each version it commits in a cell of memory shared by the workers
(``VersionCell``): the version, and the newest version from which other dense weights (or
another artifact) apply. A serving worker reads the cell as it starts each batch and serves
a newer version of rows at once: every shard holds it. Weights it has not got it first
fetches from the shards (``Updater.sync``, as at start; polled every ``POLL_S`` and at each
batch) and acknowledges in its slot of the cell. The admin publishes such a version's weights
first and the version itself only once every worker acknowledged them (or ``ACK_S`` passed),
so a worker that sees the version already holds its weights, whatever order the two values
of the cell reach it in, and no worker falls behind the versions the shards keep.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from recserve.contracts.errors import RecserveError

log = logging.getLogger("gateway")
POLL_S = 0.05  # how often an idle serving worker looks for new weights
ACK_S = 30.0  # how long the admin waits for every worker to hold new weights


class VersionCell:
    """Shared by the processes forked after it is made (an anonymous shared mapping):
    ``[0]`` the version to serve, ``[1]`` the version the newest weights apply from,
    ``[2 + i]`` the weights version serving worker ``i`` holds; -1 until written. Every
    value is one aligned 8-byte word, written and read whole."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.buffer = mmap.mmap(-1, 8 * (2 + workers))
        self.values = np.frombuffer(self.buffer, np.int64)
        self.values[:] = -1

    def read(self) -> tuple[int, int]:
        """(version, weights version)."""
        return int(self.values[0]), int(self.values[1])

    def publish_weights(self, version: int) -> None:
        self.values[1] = version

    def publish(self, version: int) -> None:
        self.values[0] = version

    def ack(self, slot: int, weights: int) -> None:
        self.values[2 + slot] = weights

    def acked(self, weights: int) -> bool:
        return bool((self.values[2:] >= weights).all())


@dataclass(frozen=True)
class Role:
    """A worker's part under ``--admin-port``: the admin (``slot`` None) or serving worker
    ``slot``."""

    cell: VersionCell
    slot: int | None

    @property
    def admin(self) -> bool:
        return self.slot is None


async def publish(cell: VersionCell, version: int, weights: int) -> None:
    """The admin's side: ``version`` is committed on every shard and its dense weights
    apply from ``weights``; new weights reach every worker before the version does."""
    if weights > cell.read()[1]:
        cell.publish_weights(weights)
        deadline = time.monotonic() + ACK_S
        while not cell.acked(weights):
            if time.monotonic() > deadline:
                log.error(
                    "serving workers %s did not fetch the weights of version %d in %g s: they "
                    "stay at older versions until they do",
                    [i for i in range(cell.workers) if cell.values[2 + i] < weights],
                    weights,
                    ACK_S,
                )
                break
            await asyncio.sleep(0.005)
    cell.publish(version)


class Follower:
    """A serving worker's side: the version each batch reads."""

    def __init__(self, gw: Any, role: Role) -> None:
        assert role.slot is not None
        self.gw = gw
        self.cell = role.cell
        self.slot = role.slot
        self.syncing: asyncio.Task[None] | None = None

    @property
    def holds(self) -> int:
        """The version this worker's newest dense weights apply from."""
        newest: int = self.gw.updater.nets.newest
        return newest

    def version(self) -> int:
        """The newest version this worker can serve (the batcher calls it per batch)."""
        pooler = self.gw.pooler
        version, weights = self.cell.read()
        if weights > self.holds:
            self._fetch()
        elif version > pooler.version:
            pooler.version = version
        return int(pooler.version)

    def start(self) -> bool:
        """After ``Updater.sync`` at start: the weights this worker holds acknowledged, and
        whether the admin has published a version to serve (not before it is ready)."""
        self.synced()
        published = self.cell.read()[0]
        return published >= 0 and self.version() >= published

    def synced(self) -> None:
        self.cell.ack(self.slot, self.holds)

    async def run(self) -> None:
        """Fetch new weights while no batch comes to look for them."""
        while True:
            await asyncio.sleep(POLL_S)
            if self.gw.ready and self.cell.read()[1] > self.holds:
                self._fetch()

    def _fetch(self) -> None:
        if self.syncing is None or self.syncing.done():
            self.syncing = asyncio.get_running_loop().create_task(self._sync())

    async def _sync(self) -> None:
        try:
            await self.gw.updater.sync(settle=False)
        except RecserveError as exc:
            log.warning("could not fetch the newest weights from the shards: %s", exc)
            return
        self.synced()
