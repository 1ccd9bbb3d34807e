"""The table parts one shard serves, and the pooling of a lookup over them.

A part is a row range ``[row_start, row_end)`` of a table, kept as a zero-copy view of the
memory-mapped table file (or, with ``--hugepages``, a copy in huge-page memory), or with
``--cache-bytes`` as a row cache over the file (``shardd.cache``): its view is then the
cache's arena, and a lookup's ids of it are mapped to arena slots before pooling. Ids arrive
as global row ids; a part answers for ids in its range and pools with ids shifted to its
view. Parts with the same bag count and dim are pooled by one kernel call, whose
``[bags, parts, dim]`` output is the reply frame as is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import kernels
from kernels import Int8RowwiseTable, Table
from kernels.layout import MEAN
from kernels.overlay import apply_deltas
from recserve.contracts.errors import IdOutOfRange, TooLarge
from recserve.contracts.manifest import Manifest, TableSpec
from recserve.contracts.plan import ShardPlan
from recserve.model.artifact import file_size, hugepage_copies, open_table, touch
from recserve.rpc.wire import MAX_REPLY_FLOATS, Lookup
from shardd.cache import CacheTier, Fetched, PartCache
from shardd.updates import Overlay, Versions, unknown_part

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    spec: TableSpec
    row_start: int
    row_end: int
    view: Table  # rows [row_start, row_end) of the table, or the cache's arena
    cache: PartCache | None = None
    base: Table | None = None  # the file's rows (mapped, read only for updates)

    @property
    def nbytes(self) -> int:
        return (self.row_end - self.row_start) * self.spec.row_bytes


@dataclass(frozen=True)
class Group:
    parts: tuple[int, ...]
    pooled: np.ndarray  # float32 [bags, len(parts), dim]


class PartStore:
    def __init__(
        self,
        root: Path | str,
        manifest: Manifest,
        shard: ShardPlan,
        *,
        cache_bytes: int | None = None,
        io_threads: int = 32,
        state_dir: Path | None = None,
    ) -> None:
        self.parts: dict[tuple[str, int], Part] = {}
        self.tier: CacheTier | None = None
        tables: dict[str, Table] = {}
        for p in shard.parts:
            spec = manifest.table(p.table)
            if p.table not in tables:
                tables[p.table] = open_table(root, spec, file_size(manifest, spec))
            whole = tables[p.table]
            if isinstance(whole, Int8RowwiseTable):
                view: Table = Int8RowwiseTable(whole.data[p.row_start : p.row_end])
            else:
                view = whole[p.row_start : p.row_end]
            self.parts[(p.table, p.row_start)] = Part(spec, p.row_start, p.row_end, view, base=view)
        if cache_bytes is not None:
            # Only the files' row offsets are kept: the mappings go, so nothing is paged in.
            offsets = {name: _data_offset(t) for name, t in tables.items()}
            parts = [
                (p.spec, p.row_start, p.row_end, Path(root) / p.spec.file, offsets[p.spec.name])
                for p in self.parts.values()
            ]
            self.tier = CacheTier(parts, cache_bytes, io_threads)
            for key, pc in zip(list(self.parts), self.tier.parts, strict=True):
                base = self.parts[key].base  # mapped, never touched but by updates
                self.parts[key] = Part(pc.spec, pc.row_start, pc.row_end, pc.table(), pc, base)
        self._resolve()
        self.versions = Versions(self.by_slot, state_dir)

    def _resolve(self) -> None:
        """Resolve every part once for the kernel (see ``kernels.TableSet``)."""
        self.index = {key: i for i, key in enumerate(self.parts)}
        self.by_slot = list(self.parts.values())
        self.max_dim = max((p.spec.dim for p in self.by_slot), default=0)
        self.tableset = kernels.TableSet(
            [p.view for p in self.by_slot],
            first_ids=[0 if p.cache else p.row_start for p in self.by_slot],
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the parts' rows (on disk, with a cache)."""
        return sum(p.nbytes for p in self.parts.values())

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()

    def describe(self) -> list[dict[str, object]]:
        return [
            {
                "table": p.spec.name,
                "row_start": p.row_start,
                "row_end": p.row_end,
                "dim": p.spec.dim,
                "dtype": p.spec.dtype,
            }
            for p in sorted(self.parts.values(), key=lambda p: (p.spec.name, p.row_start))
        ]

    def preload(self, *, hugepages: bool = False) -> float:
        """Touch every page of every part so first lookups do not fault, or with
        ``hugepages`` serve each part from a copy in huge-page memory; returns seconds."""
        start = time.perf_counter()
        if hugepages:
            keys = list(self.parts)
            copies = hugepage_copies([self.parts[k].view for k in keys])
            for key, copy in zip(keys, copies, strict=True):
                self.parts[key] = replace(self.parts[key], view=copy)
            self._resolve()
        else:
            for part in self.parts.values():
                touch(part.view)
        return time.perf_counter() - start

    def pool(self, lookup: Lookup, threads: int | None = None) -> list[Group]:
        """Pool every part of ``lookup``; ids outside a part's rows are a typed error."""
        return self.prepare(lookup, threads).run()

    def prepare(
        self,
        lookup: Lookup,
        threads: int | None = None,
        max_floats: int = MAX_REPLY_FLOATS,
        version: int | None = None,
    ) -> Job:
        """Resolve ``lookup``'s parts and check and size its kernel calls without running
        them (the server does this on its loop; a worker then only runs ``Job.run``).

        Zero-copy: the kernel reads the request's ids (and weights) frame in place, with bag
        bounds as positions into it and each part's first row id as its id base.
        """
        overlays = self.versions.overlays(version)  # taken once: the lookup's version
        slots, resolved = [], []
        for i, req in enumerate(lookup.parts):
            slot = self.index.get((req.table, req.row_start))
            if slot is None:
                raise unknown_part(req.table, req.row_start, i)
            slots.append(slot)
            resolved.append(self.by_slot[slot])
        bags = [req.bags for req in lookup.parts]
        floats = sum(b * p.spec.dim for b, p in zip(bags, resolved, strict=True))
        if floats > max_floats:
            raise TooLarge(
                f"the lookup asks for {floats} pooled floats, more than {max_floats} (split it)",
                field="parts.bags",
            )
        first_bag = np.zeros(len(bags) + 1, np.int64)  # part i's bags: lengths[first_bag[i]:]
        np.cumsum(bags, out=first_bag[1:])
        bounds_all = np.zeros(lookup.lengths.size + 1, np.int64)
        np.cumsum(lookup.lengths, out=bounds_all[1:])
        groups: dict[tuple[int, int], list[int]] = {}
        for i, part in enumerate(resolved):
            groups.setdefault((bags[i], part.spec.dim), []).append(i)
        calls = []
        for (n_bags, _), members in groups.items():
            # Row j: part members[j]'s B + 1 bag bounds, positions into the ids frame.
            at = first_bag[members][:, None] + np.arange(n_bags + 1)
            try:
                call = self.tableset.prepare(
                    [slots[i] for i in members],
                    lookup.ids,
                    bounds_all[at],
                    weights=lookup.weights,
                    modes=[lookup.parts[i].mode for i in members],
                    threads=threads,
                )
            except kernels.IdOutOfRangeError as exc:  # found while checking an empty output
                raise _explain(exc, resolved, lookup.spans()) from None
            calls.append((tuple(members), call))
        updated = {i: overlays[s] for i, s in enumerate(slots) if s in overlays}
        return Job(calls, resolved, lookup, self.tier, updated)


class Job:
    """A prepared lookup: one kernel call per group of parts, and the rows of its cached
    parts fetched first."""

    __slots__ = ("bags", "calls", "fetched", "ids", "lookup", "resolved", "tier", "updated")

    def __init__(
        self,
        calls: list[tuple[tuple[int, ...], kernels.PoolCall]],
        resolved: list[Part],
        lookup: Lookup,
        tier: CacheTier | None = None,
        updated: dict[int, Overlay] | None = None,
    ) -> None:
        self.calls = calls
        self.updated = updated or {}
        self.resolved = resolved
        self.lookup = lookup
        self.ids = int(lookup.ids.size)
        self.bags = int(lookup.lengths.size)
        self.tier = tier if any(p.cache for p in resolved) else None
        self.fetched: Fetched | None = None

    def run(self) -> list[Group]:
        """Run the kernel calls; an id outside its part's rows raises ``IdOutOfRange``."""
        try:
            if self.tier is not None:
                return self._run_cached(self.tier)
            return [self._pooled(members, call, call.ids) for members, call in self.calls]
        except kernels.IdOutOfRangeError as exc:
            raise _explain(exc, self.resolved, self.lookup.spans()) from None

    def _run_cached(self, tier: CacheTier) -> list[Group]:
        if not self.calls:
            return []
        ids = self.calls[0][1].ids  # as the kernel takes them (every call shares them)
        spans = []
        for i, (_, _, first, n) in enumerate(self.lookup.spans()):
            pc = self.resolved[i].cache
            if pc is not None and n:  # the cache's map checks the ids against the part's rows
                spans.append((i, pc, first, n))
        mapped = ids.copy()
        self.fetched = got = tier.fetch(ids, mapped, spans)
        try:
            groups = []
            for members, call in self.calls:
                call.ids = mapped
                for j, i in enumerate(members):
                    if i in got.bypass:
                        call.retarget(j, got.bypass[i])
                groups.append(self._pooled(members, call, ids))
            return groups
        finally:
            tier.release(got)

    def _pooled(self, members: tuple[int, ...], call: kernels.PoolCall, ids: np.ndarray) -> Group:
        """Run one call, then add the updated rows of this lookup's version (``ids``: the
        global ids, as the request sent them)."""
        out = call.run()
        for j, i in enumerate(members):
            ov = self.updated.get(i)
            if ov is not None:
                apply_deltas(out, j, ids, call.bounds[j], call.weights, call.weighted,
                             bool(call.layout[j, MEAN]), ov.keys, ov.deltas)  # fmt: skip
        return Group(members, out)


def _data_offset(table: Table) -> int:
    """Where row 0 starts in a memory-mapped table's file."""
    data = table.data if isinstance(table, Int8RowwiseTable) else table
    assert isinstance(data, np.memmap), "tables are opened memory-mapped"
    return int(data.offset)


def _explain(
    exc: kernels.IdOutOfRangeError, resolved: list[Part], spans: list[tuple[int, int, int, int]]
) -> IdOutOfRange:
    for i, (_, _, first_id, n_ids) in enumerate(spans):
        if first_id <= exc.position < first_id + n_ids:
            part = resolved[i]
            return IdOutOfRange(
                f"id {exc.value} of table {part.spec.name} is outside the rows this part "
                f"serves, [{part.row_start}, {part.row_end})",
                field=f"parts[{i}]",
            )
    return IdOutOfRange(str(exc))
