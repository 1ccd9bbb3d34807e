"""``POST /v1/updates`` and ``POST /v1/deploy``: new rows and dense weights, or a new
artifact, for live shards, committed as one version on all of them.

Enabled by ``--admin-token-file``; a request needs ``Authorization: Bearer <token>`` (401
without, 403 with another). An update's body is an ``.npz`` (``<table>.ids`` int64,
``<table>.rows`` float32 ``[n, dim]`` per table, ``dense.<array>`` for new dense arrays;
``Content-Type: application/x-npz``) or msgpack ``{"tables": {t: {"ids": [...], "rows":
[[...], ...]}}, "dense": {array: [...]}}``. Everything is checked before any shard hears of
it (unknown table or array, id out of range or repeated, wrong dim or shape, NaN/Inf: a 4xx
naming the field, nothing applied anywhere). New dense weights score from their version on
(``gateway.dense``); the first shard's replicas keep them for gateways started later. A
deploy (``{"model": "/path"}``) is a version whose stage is every replica loading the new
artifact (``shardd.models``).

Two phases, one update at a time: the rows go to every replica of the shards owning them
under the plan (every shard stages the version, with or without rows, so all hold the same
versions), each acknowledging once its log is fsync'ed; if any replica fails to stage, the
version is aborted everywhere and the update fails. Then every replica commits, and the
gateway reads the new version from then on: each batch names the version it reads on every
shard, so no response mixes version N on one shard with N + 1 on another, and each response
says which version it was scored at. At start the gateway learns the newest committed version
from the shards and settles versions left staged by a coordinator that died between the
phases (committed where any replica committed it, else aborted).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from aiohttp import web

from gateway.dense import DenseVersions
from gateway.follow import VersionCell, publish
from kernels.dense import DenseNet
from recserve.contracts.errors import (
    BadRequest,
    ConfigError,
    Forbidden,
    IdOutOfRange,
    Misdirected,
    NotReady,
    RecserveError,
    ShardUnavailable,
    Unauthorized,
    UnknownTable,
)
from recserve.contracts.manifest import DENSE_FILE, Manifest, read_manifest
from recserve.contracts.plan import Plan
from recserve.model.artifact import dense_bytes, dense_net, read_dense
from recserve.rpc.deadline import Deadline
from recserve.rpc.wire import StagePart
from recserve.runtime.priority import lower_priority

log = logging.getLogger("gateway")
PHASE_MS = 30_000  # each phase's deadline
LOAD_MS = 600_000  # a deploy's first phase: every replica loads the new artifact
NPZ = "application/x-npz"
MSGPACK = "application/msgpack"


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--admin-token-file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise ConfigError(f"--admin-token-file {path}: the token must have 16 characters or more")
    return token


def check_auth(header: str | None, token: str) -> None:
    if not header or not header.startswith("Bearer "):
        raise Unauthorized("updates need Authorization: Bearer <token>", field="Authorization")
    if not hmac.compare_digest(header[7:].strip().encode(), token.encode()):
        raise Forbidden("this token may not update the model", field="Authorization")


@dataclass(frozen=True)
class Update:
    tables: dict[str, tuple[np.ndarray, np.ndarray]]  # per table (ids int64, rows [n, dim])
    dense: dict[str, np.ndarray]  # new dense arrays by their dense.npz name


def parse_update(
    body: bytes, content_type: str, manifest: Manifest, dense: Mapping[str, np.ndarray]
) -> Update:
    """The update's rows per table and its dense arrays (checked against ``dense``, the
    current ones), every value checked."""
    tables: dict[str, tuple[Any, Any]] = {}
    given: dict[str, Any] = {}
    if content_type == NPZ or content_type == "application/octet-stream":
        try:
            with np.load(io.BytesIO(body), allow_pickle=False) as npz:
                for key in npz.files:
                    if key.startswith("dense."):
                        given[key.removeprefix("dense.")] = npz[key]
                        continue
                    name, _, what = key.rpartition(".")
                    if what not in ("ids", "rows") or not name:
                        raise BadRequest(
                            f"{key}: entries are <table>.ids, <table>.rows and dense.<array>",
                            field=key,
                        )
                    ids, rows = tables.get(name, (None, None))
                    tables[name] = (npz[key], rows) if what == "ids" else (ids, npz[key])
        except (ValueError, OSError) as exc:
            raise BadRequest(f"not a readable .npz ({exc})", field="body") from None
    else:
        try:
            doc = msgpack.unpackb(body, raw=False)
            tables = {str(t): (v["ids"], v["rows"]) for t, v in doc.get("tables", {}).items()}
            given = {str(k): v for k, v in doc.get("dense", {}).items()}
        except Exception:
            raise BadRequest(
                'expected {"tables": {name: {"ids": [...], "rows": [[...]]}}, '
                '"dense": {array: [...]}}',
                field="tables",
            ) from None
    if not tables and not given:
        raise BadRequest("the update names no table and no dense array", field="tables")
    out = {}
    for name, (ids, rows) in tables.items():
        field = f"tables.{name}"
        spec = next((t for t in manifest.tables if t.name == name), None)
        if spec is None:
            raise UnknownTable(f"the model has no table {name!r}", field=field)
        try:
            ids = np.asarray(ids, dtype=np.int64)
            rows = np.asarray(rows, dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            raise BadRequest("ids must be integers and rows numbers", field=field) from None
        if ids.ndim != 1 or ids.size == 0:
            raise BadRequest("ids must be a non-empty list", field=f"{field}.ids")
        if rows.shape != (ids.size, spec.dim):
            raise BadRequest(
                f"rows must be [{ids.size}, {spec.dim}], got {list(rows.shape)}",
                field=f"{field}.rows",
            )
        bad = np.flatnonzero((ids < 0) | (ids >= spec.rows))
        if bad.size:
            i = int(bad[0])
            raise IdOutOfRange(
                f"id {int(ids[i])} is outside [0, {spec.rows})", field=f"{field}.ids[{i}]"
            )
        ordered = np.sort(ids)  # (a sort finds a repeat faster than np.unique's hashing)
        if (ordered[1:] == ordered[:-1]).any():
            raise BadRequest("an id appears twice", field=f"{field}.ids")
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            i = int(np.flatnonzero(~finite)[0])
            raise BadRequest("rows must be finite (NaN or Inf)", field=f"{field}.rows[{i}]")
        out[name] = (ids, rows)
    return Update(out, {key: _dense_array(key, value, dense) for key, value in given.items()})


def _dense_array(key: str, value: Any, current: Mapping[str, np.ndarray]) -> np.ndarray:
    field = f"dense.{key}"
    if key not in current:
        raise BadRequest(f"the model has no dense array {key!r}", field=field)
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest("a dense array must hold numbers", field=field) from None
    if array.shape != current[key].shape:
        raise BadRequest(
            f"must be {list(current[key].shape)}, got {list(array.shape)}", field=field
        )
    if not np.isfinite(array).all():
        raise BadRequest("must be finite (NaN or Inf)", field=field)
    return array


def split(update: dict[str, tuple], plan: Plan) -> dict[int, list[StagePart]]:
    """The rows each shard owns under the plan (every shard listed, maybe with none)."""
    out: dict[int, list[StagePart]] = {s.id: [] for s in plan.shards}
    for table, (ids, rows) in update.items():
        for shard, part in plan.parts_of(table):
            mine = (ids >= part.row_start) & (ids < part.row_end)
            if mine.any():
                out[shard.id].append(StagePart(table, part.row_start, ids[mine], rows[mine]))
    return out


class Updater:
    def __init__(self, gw: Any, plan: Plan, nets: DenseVersions) -> None:
        self.gw = gw  # the Gateway: its manifest changes with a deploy
        self.plan = plan
        self.pooler = gw.pooler  # a ShardedPooler: its replica sets and the version it reads
        self.nets = nets  # the dense weights by version, which the batcher scores with
        self.dense_shard = plan.shards[0].id  # its replicas keep the dense weights
        self.metrics = gw.metrics
        self.cell: VersionCell | None = None  # the admin under --admin-port publishes here
        self.lock = asyncio.Lock()
        # Parsing and splitting updates on a thread of their own at a lower priority: never
        # ahead of a batch in the serving executor, and yielding the CPU to it.
        self.executor = ThreadPoolExecutor(
            1, thread_name_prefix="gateway-update", initializer=lower_priority
        )

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    def _replicas(self, live: bool = False) -> list[tuple[int, Any]]:
        """(shard, client) of every replica, or with ``live`` of those in rotation (a replica
        its probe found down misses the version and catches up when it starts again)."""
        now = time.monotonic()
        return [
            (sid, r.client)
            for sid, rs in self.pooler.replicas.items()
            for r in rs.replicas
            if not live or r.in_rotation(now)
        ]

    async def sync(self, *, settle: bool = True) -> int:
        """Learn the newest committed version, the artifact it is of and its dense weights;
        with ``settle`` (the gateway that orders versions) settle versions left staged and
        serve the newest (a serving worker under ``--admin-port`` serves what the admin
        publishes: ``gateway.follow``)."""
        async with self.lock:
            replicas = self._replicas()
            deadline = Deadline.after(PHASE_MS)
            found = await asyncio.gather(
                *(c.simple("info", deadline) for _, c in replicas), return_exceptions=True
            )
            infos = [
                (c, i) for (_, c), i in zip(replicas, found, strict=True) if isinstance(i, dict)
            ]
            committed = max((i["versions"]["version"] for _, i in infos), default=0)
            for client, i in infos:
                staged = i["versions"].get("staged")
                if staged is None or not settle:
                    continue
                op = "commit" if staged <= committed else "abort"
                try:
                    await client.decide(op, staged, deadline=deadline)
                    log.info("settled version %d staged on %s: %s", staged, client.name, op)
                except RecserveError as exc:
                    log.warning("could not %s version %d on %s: %s", op, staged, client.name, exc)
            newest = max(infos, key=lambda ci: ci[1]["versions"]["version"], default=None)
            if newest is not None:
                await self._sync_model(newest[1]["model"])
            await self._sync_dense(committed, deadline)
            if settle:
                self.pooler.version = committed
                self.metrics.model_version.set(committed)
                await self._publish(committed)
            return committed

    async def _publish(self, version: int) -> None:
        if self.cell is not None:
            await publish(self.cell, version, self.nets.newest)

    async def _sync_model(self, model: dict[str, Any]) -> None:
        """Serve the artifact the shards serve (deployed after this gateway's ``--model``)."""
        if model.get("digest") == self.gw.manifest.digest():
            return
        path, since = Path(model["path"]), int(model["since"])
        loop = asyncio.get_running_loop()
        try:
            manifest, net, weights = await loop.run_in_executor(self.executor, self._model_at, path)
        except BadRequest as exc:
            msg = f"the shards serve an artifact this gateway cannot: {exc.message}"
            raise ConfigError(msg) from None
        self.nets.add(since, net, weights)
        self.gw.manifest = manifest
        log.info("the shards serve %s from version %d: serving it too", path, since)

    async def _sync_dense(self, committed: int, deadline: Deadline) -> None:
        """Take the newest dense weights the dense shard's replicas keep (pushed before this
        gateway started)."""
        replicas = [c for sid, c in self._replicas() if sid == self.dense_shard]
        found = await asyncio.gather(
            *(c.dense(deadline=deadline) for c in replicas), return_exceptions=True
        )
        kept = [f for f in found if isinstance(f, tuple) and f[0] is not None and f[0] <= committed]
        if not kept:
            return
        version, blob = max(kept, key=lambda f: f[0])
        if version <= self.nets.newest:
            return
        net, weights = await asyncio.get_running_loop().run_in_executor(
            self.executor, self._net_of_bytes, blob
        )
        self.nets.add(version, net, weights)
        log.info("dense weights of version %d from the shards", version)

    def _net_of_bytes(self, blob: bytes) -> tuple[DenseNet, dict[str, np.ndarray]]:
        weights = read_dense(blob, "the shards' dense weights")
        return dense_net(self.gw.manifest, weights, "the shards' dense weights"), weights

    def _net_of(
        self, dense: dict[str, np.ndarray]
    ) -> tuple[DenseNet, dict[str, np.ndarray], bytes]:
        weights = {**self.nets.weights, **dense}
        return dense_net(self.gw.manifest, weights), weights, dense_bytes(weights)

    async def apply(self, update: Update) -> dict[str, Any]:
        async with self.lock:
            version = self.pooler.version + 1
            loop = asyncio.get_running_loop()
            by_shard = await loop.run_in_executor(self.executor, split, update.tables, self.plan)
            net = None
            if update.dense:
                net, weights, blob = await loop.run_in_executor(
                    self.executor, self._net_of, update.dense
                )

            def stage(sid: int, client: Any, deadline: Deadline) -> Awaitable[Any]:
                dense = blob if net is not None and sid == self.dense_shard else None
                return client.stage(version, by_shard[sid], deadline=deadline, dense=dense)

            begin = time.perf_counter()
            staged_s = await self._two_phases(version, stage, PHASE_MS)
            if net is not None:
                self.nets.add(version, net, weights)  # before any batch reads the version
            self.pooler.version = version
            await self._publish(version)
            seconds = time.perf_counter() - begin
            rows = sum(ids.size for ids, _ in update.tables.values())
            self.metrics.updated(version, rows, seconds)
            return {
                "version": version,
                "rows": rows,
                "dense": sorted(update.dense),
                "stage_ms": round(staged_s * 1e3, 3),
                "commit_ms": round((seconds - staged_s) * 1e3, 3),
            }

    async def deploy(self, path: Path) -> dict[str, Any]:
        """Serve the artifact at ``path`` (on every host, as the shards see it) from the
        next version on: every replica loads it beside the one it serves, then all switch
        at once; requests under way finish on the old one."""
        loop = asyncio.get_running_loop()
        manifest, net, weights = await loop.run_in_executor(self.executor, self._model_at, path)
        async with self.lock:
            version = self.pooler.version + 1
            begin = time.perf_counter()

            def load(sid: int, client: Any, deadline: Deadline) -> Awaitable[Any]:
                return client.load(version, str(path), deadline=deadline)

            loaded_s = await self._two_phases(version, load, LOAD_MS)
            self.nets.add(version, net, weights)
            self.gw.manifest = manifest
            self.pooler.version = version
            await self._publish(version)
            self.metrics.model_version.set(version)
            log.info("serving %s from version %d", path, version)
            m = manifest
            return {
                "version": version,
                "model": {"name": m.name, "version": m.version, "digest": m.digest()},
                "load_ms": round(loaded_s * 1e3, 3),
                "commit_ms": round((time.perf_counter() - begin - loaded_s) * 1e3, 3),
            }

    def _model_at(self, path: Path) -> tuple[Manifest, DenseNet, dict[str, np.ndarray]]:
        """A new artifact's manifest and dense weights, checked to serve the same requests
        over the same plan (else it needs a new plan: a restart)."""
        try:
            manifest = read_manifest(path)
            self.plan.check(manifest, same_model=False)
            weights = read_dense(path / DENSE_FILE)
            net = dense_net(manifest, weights, str(path / DENSE_FILE))
        except RecserveError as exc:
            raise BadRequest(f"{path}: {exc.message}", field="model") from None
        old = self.gw.manifest
        if manifest.digest() == old.digest():
            raise BadRequest(f"{path} is the artifact served now", field="model")
        if _shape(manifest) != _shape(old):
            raise BadRequest(
                f"{path} has other tables, features or dense layers than the model served; "
                "deploy it with a new plan (restart the cluster)",
                field="model",
            )
        return manifest, net, weights

    async def _two_phases(
        self,
        version: int,
        stage: Callable[[int, Any, Deadline], Awaitable[Any]],
        stage_ms: int,
    ) -> float:
        """Stage ``version`` on every replica in rotation, then commit it on all; aborted
        everywhere (and the error raised) if any replica fails to stage, or a shard has no
        replica that staged it. Returns the seconds the stage took."""
        replicas = self._replicas(live=True)
        begin = time.perf_counter()
        deadline = Deadline.after(stage_ms)
        staged = await asyncio.gather(
            *(stage(sid, c, deadline) for sid, c in replicas), return_exceptions=True
        )
        # A replica that is down misses the version (it fetches it from a peer when it
        # starts again); any other failure, or a shard with no replica staged, aborts.
        down = {"shard_unavailable", "not_ready"}
        ok = [
            (sid, c)
            for (sid, c), r in zip(replicas, staged, strict=True)
            if not isinstance(r, BaseException)
        ]
        failed = [r for r in staged if isinstance(r, BaseException)]
        fatal = [e for e in failed if getattr(e, "kind", None) not in down]
        if fatal or {sid for sid, _ in ok} != {s.id for s in self.plan.shards}:
            await self._decide(replicas, "abort", version)
            exc = (fatal or failed)[0]
            if isinstance(exc, RecserveError):
                raise exc
            raise ShardUnavailable(f"staging version {version} failed: {exc}")
        for (_, c), r in zip(replicas, staged, strict=True):
            if isinstance(r, BaseException):
                log.warning(
                    "%s is down: it catches up on version %d when it starts", c.name, version
                )
        staged_s = time.perf_counter() - begin
        done = await self._decide(ok, "commit", version)
        for (sid, c), r in zip(ok, done, strict=True):
            if isinstance(r, BaseException):  # decided: it commits when it is back (sync)
                log.warning("shard %d (%s) did not commit version %d: %s", sid, c.name, version, r)
        return staged_s

    @staticmethod
    async def _decide(replicas: list[tuple[int, Any]], op: str, version: int) -> list[Any]:
        deadline = Deadline.after(PHASE_MS)
        return await asyncio.gather(
            *(c.decide(op, version, deadline=deadline) for _, c in replicas),
            return_exceptions=True,
        )


async def admin_body(request: web.Request, gw: Any) -> bytes:
    """An admin request's body, once the endpoint is enabled (404), the caller holds the
    token (401/403) and the gateway is ready (it learns the shards' version as it becomes
    ready); read under the same size, time and encoding limits as any body."""
    if gw.admin_port is not None:
        raise Misdirected(
            f"this port serves predictions; send updates and deploys to the admin port "
            f"{gw.admin_port}",
            field="port",
        )
    if gw.updater is None or gw.admin_token is None:
        raise web.HTTPNotFound()
    check_auth(request.headers.get("Authorization"), gw.admin_token)
    if not gw.serving:
        raise NotReady("the gateway is not ready; retry when /v2/health/ready says so")
    body: bytes = await gw.read_body(request)
    return body


async def handle_deploy(request: web.Request, gw: Any) -> dict[str, Any]:
    """The ``POST /v1/deploy`` handler's work: ``{"model": "/path/to/artifact"}``."""
    body = await admin_body(request, gw)
    try:
        path = msgpack.unpackb(body) if request.content_type == MSGPACK else json.loads(body)
        path = path["model"]
    except Exception:
        raise BadRequest('expected {"model": "/path/to/artifact"}', field="model") from None
    if not isinstance(path, str) or not os.path.isabs(path):
        raise BadRequest("model must be an absolute path to an artifact directory", field="model")
    return await gw.updater.deploy(Path(path))


async def handle(request: web.Request, gw: Any) -> dict[str, Any]:
    """The ``POST /v1/updates`` handler's work (``gateway.app`` encodes the reply)."""
    body = await admin_body(request, gw)
    ctype = request.content_type
    update = await asyncio.get_running_loop().run_in_executor(
        gw.updater.executor, parse_update, body, ctype, gw.manifest, gw.updater.nets.weights
    )
    return await gw.updater.apply(update)


def _shape(m: Manifest) -> tuple[Any, ...]:
    """What requests, routing and the plan depend on: equal for a deployable artifact."""
    tables = tuple((t.name, t.rows, t.dim, t.features) for t in m.tables)
    return tables, tuple(m.features()), m.dense_width, m.embedding_dim, m.dense
