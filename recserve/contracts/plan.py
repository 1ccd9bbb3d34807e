"""The sharding plan (``plan.json``): which shard serves which rows of which table.

A plan names its model by digest, so a daemon refuses a plan made for another model. Each
shard has one endpoint per replica and a list of parts ``{table, row_start, row_end}``
(``row_end`` exclusive); every row of every table belongs to exactly one shard. Ids on the
wire stay global: a shard serving rows ``[a, b)`` of a table answers for ids in that range.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from recserve.contracts.errors import PlanError
from recserve.contracts.manifest import Manifest
from recserve.contracts.schema import Doc

FORMAT = "recserve-plan"
FORMAT_VERSION = 1
ENDPOINT_RE = re.compile(r"^(tcp://[A-Za-z0-9.\-\[\]:]+:\d{1,5}|ipc://.+)$")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_BASE_PORT = 5600


@dataclass(frozen=True)
class Part:
    table: str
    row_start: int
    row_end: int

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "row_start": self.row_start, "row_end": self.row_end}


@dataclass(frozen=True)
class ShardPlan:
    id: int
    endpoints: tuple[str, ...]  # one per replica
    parts: tuple[Part, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "endpoints": list(self.endpoints),
            "parts": [p.to_dict() for p in self.parts],
        }


@dataclass(frozen=True)
class Plan:
    model_name: str
    model_version: str
    model_digest: str
    strategy: str
    shards: tuple[ShardPlan, ...]
    report: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def replicas(self) -> int:
        return len(self.shards[0].endpoints) if self.shards else 0

    def parts_of(self, table: str) -> Iterator[tuple[ShardPlan, Part]]:
        for shard in self.shards:
            for part in shard.parts:
                if part.table == table:
                    yield shard, part

    def shard(self, shard_id: int) -> ShardPlan:
        for shard in self.shards:
            if shard.id == shard_id:
                return shard
        raise PlanError(f"the plan has no shard {shard_id} (it has {len(self.shards)})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {
                "name": self.model_name,
                "version": self.model_version,
                "digest": self.model_digest,
            },
            "strategy": self.strategy,
            "shards": [s.to_dict() for s in self.shards],
            "report": self.report,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2)

    def check(self, manifest: Manifest, *, same_model: bool = True) -> None:
        """The plan is for this model and covers every row exactly once; without
        ``same_model``, for a model of the same tables (a deployed retraining of it)."""
        if same_model and self.model_digest != manifest.digest():
            raise PlanError(
                f"the plan was made for model {self.model_name} {self.model_version} "
                f"(digest {self.model_digest[:12]}), not for {manifest.name} "
                f"{manifest.version} ({manifest.digest()[:12]}); run `recserve plan` again"
            )
        tables = {t.name: t for t in manifest.tables}
        for shard in self.shards:
            for part in shard.parts:
                if part.table not in tables:
                    raise PlanError(f"shard {shard.id} serves unknown table {part.table!r}")
        for name, spec in tables.items():
            ranges = sorted((p.row_start, p.row_end) for _, p in self.parts_of(name))
            expected = 0
            for start, end in ranges:
                if start != expected or end <= start:
                    raise PlanError(
                        f"table {name}: rows {expected}.. are not covered exactly "
                        f"once (next part starts at {start})"
                    )
                expected = end
            if expected != spec.rows:
                raise PlanError(f"table {name}: parts cover {expected} of {spec.rows} rows")


def local_endpoints(
    n_shards: int, replicas: int, *, host: str = DEFAULT_HOST, base_port: int = DEFAULT_BASE_PORT
) -> list[tuple[str, ...]]:
    """Loopback tcp endpoints, shard-major: shard s replica r listens on base + s*R + r."""
    if base_port + n_shards * replicas > 65535:
        raise PlanError(f"ports {base_port}.. do not fit {n_shards * replicas} endpoints")
    return [
        tuple(f"tcp://{host}:{base_port + s * replicas + r}" for r in range(replicas))
        for s in range(n_shards)
    ]


def read_hosts(path: Path | str, n_shards: int, replicas: int) -> list[tuple[str, ...]]:
    """Endpoints from a hosts file (TOML)::

    [[shards]]
    endpoints = ["tcp://10.0.0.5:5600", "tcp://10.0.0.6:5600"]  # one per replica
    """
    try:
        value = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlanError(f"{path}: cannot read hosts file ({exc})") from exc
    doc = Doc(value, "", lambda msg, fld: PlanError(f"{path}: {msg}", field=fld))
    doc.only("shards")
    shards = doc.subs("shards")
    if len(shards) != n_shards:
        raise PlanError(f"{path}: lists {len(shards)} shards, the plan has {n_shards}")
    out = []
    for s in shards:
        s.only("endpoints")
        eps = s.items("endpoints")
        if len(eps) != replicas or not all(
            isinstance(e, str) and ENDPOINT_RE.match(e) for e in eps
        ):
            raise s.fail("endpoints", f"needs {replicas} endpoints like tcp://host:port")
        out.append(tuple(eps))
    flat = [e for eps in out for e in eps]
    if len(set(flat)) != len(flat):
        raise PlanError(f"{path}: an endpoint is listed twice")
    return out


def parse_plan(raw: bytes, path: str = "plan.json") -> Plan:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PlanError(f"{path}: not valid JSON ({exc})") from exc
    doc = Doc(value, "", lambda msg, fld: PlanError(f"{path}: {msg}", field=fld))
    if doc.get("format", str, None) != FORMAT:
        raise PlanError(f"{path}: not a {FORMAT} file")
    if doc.get("format_version", int) != FORMAT_VERSION:
        raise PlanError(
            f"{path}: format_version {value.get('format_version')} is not "
            f"supported (this recserve reads {FORMAT_VERSION})"
        )
    doc.only("format", "format_version", "model", "strategy", "shards", "report")
    model = doc.sub("model")
    model.only("name", "version", "digest")
    shards = []
    for i, s in enumerate(doc.subs("shards")):
        s.only("id", "endpoints", "parts")
        if s.int("id") != i:
            raise s.fail("id", f"shards must be numbered 0..N-1 in order; expected {i}")
        eps = s.items("endpoints")
        if not eps or not all(isinstance(e, str) and ENDPOINT_RE.match(e) for e in eps):
            raise s.fail("endpoints", "needs one or more endpoints like tcp://host:port")
        parts = []
        for p in s.subs("parts"):
            p.only("table", "row_start", "row_end")
            part = Part(
                p.get("table", str), p.int("row_start", minimum=0), p.int("row_end", minimum=1)
            )
            if part.row_end <= part.row_start:
                raise p.fail("row_end", "must be greater than row_start")
            parts.append(part)
        shards.append(ShardPlan(i, tuple(eps), tuple(parts)))
    if not shards or len({len(s.endpoints) for s in shards}) != 1:
        raise PlanError(f"{path}: needs shards with the same number of replicas each")
    return Plan(
        model.get("name", str),
        str(model.get("version", (str, int))),
        model.get("digest", str),
        doc.get("strategy", str),
        tuple(shards),
        doc.get("report", dict, {}),
    )


def read_plan(path: Path | str) -> Plan:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PlanError(f"{path}: cannot read plan ({exc.strerror})") from exc
    return parse_plan(raw, str(path))
