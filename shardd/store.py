"""The table parts one shard serves, and the pooling of a lookup over them.

A part is a row range ``[row_start, row_end)`` of a table, kept as a zero-copy view of the
memory-mapped table file (or, with ``--hugepages``, a copy in huge-page memory), or with
``--cache-bytes`` as a row cache over the file (``shardd.cache``): its view is then the
cache's arena, and a lookup's ids of it are mapped to arena slots before pooling. Ids arrive
as global row ids; a part answers for ids in its range and pools with ids shifted to its
view. Parts with the same bag count and dim are pooled by one kernel call, whose
``[bags, parts, dim]`` output is the reply frame as is.

With a state directory the store takes online updates (``shardd.updates``) and compacts
them into new part files (``shardd.compaction``) once the newest version's corrections hold
``compact_at`` of the shard's rows. Only the parts with the most corrections for their rows
are rewritten, until what is left holds half of ``compact_at`` (a part's rewrite costs its
rows, so the most-updated parts free the most corrections per byte written); the rest are
carried in memory and in the log. The update thread writes the files, then swaps them in
as a new *generation* (the parts' views, the kernel's ``TableSet`` and the versions rebased
on them, published together), while lookups under way finish on the generation they took.
A cached part's arena is shared by the generations: the swap drops the rows the new files
changed from the cache (under its lock, so a fetch sees old or new rows, never a mix) and a
lookup that fetched after it takes its version's corrections from the new generation.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

import kernels
from kernels import Int8RowwiseTable, Table
from kernels.layout import MEAN, OUT
from kernels.overlay import apply_deltas
from recserve.contracts.errors import BadRequest, IdOutOfRange, TooLarge
from recserve.contracts.manifest import Manifest, TableSpec
from recserve.contracts.plan import ShardPlan
from recserve.model.artifact import file_size, hugepage_copies, open_table, touch
from recserve.rpc.shm import Region
from recserve.rpc.wire import MAX_REPLY_FLOATS, Lookup, PartRequest, StagePart, lengths_error
from shardd import compaction
from shardd.cache import CacheTier, Fetched, PartCache
from shardd.compaction import Base, PartFile, part_key
from shardd.disk import TableFile
from shardd.durable import sync_dir
from shardd.updates import (
    Overlay,
    Patch,
    Versions,
    base_rows,
    corrections,
    patches_at,
    set_bits,
    unknown_part,
)

log = logging.getLogger(__name__)
LOG_BYTES = 256 << 20  # an update log this long is compacted whatever its rows
LAYOUTS_KEPT = 64  # distinct parts lists whose layout a generation keeps


@dataclass(frozen=True)
class Part:
    spec: TableSpec
    row_start: int
    row_end: int
    view: Table  # rows [row_start, row_end) of the table, or the cache's arena
    source: PartFile  # the file the rows are read from
    cache: PartCache | None = None
    base: Table | None = None  # the file's rows (mapped, read only for updates)
    resident: int | None = None  # with a cache: read whole into its budget (the tier's index)

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def nbytes(self) -> int:
        return self.rows * self.spec.row_bytes


@dataclass(frozen=True)
class Group:
    parts: tuple[int, ...]
    pooled: np.ndarray  # float32 [bags, len(parts), dim], or the lookup's ``into`` array
    into: bool = False  # pooled into the ``into`` array, each part in its column


@dataclass(frozen=True)
class Step:
    """One kernel call of a layout: parts ``members``, pooled into ``shape`` ``[bags,
    members, dim]`` by ``plan`` (their tables, modes and, with ``into``, their columns of the
    lookup's ``into`` array); row ``j`` of ``at`` indexes the lookup's bag bounds for member
    ``j``."""

    members: tuple[int, ...]
    at: np.ndarray
    shape: tuple[int, int, int]
    plan: kernels.PoolPlan
    into: bool = False  # pooled into the lookup's ``into`` array


@dataclass(frozen=True)
class Layout:
    """How a lookup of one parts list runs on one generation: its parts resolved, its
    kernel calls grouped and their bag bounds indexed. A gateway asks each shard for the
    same few parts lists again and again, so a generation keeps the last ``LAYOUTS_KEPT``."""

    slots: list[int]
    resolved: list[Part]
    floats: int  # pooled floats the reply holds (not those pooled into ``into``)
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class View:
    """One generation of the parts, as lookups read them."""

    gen: int
    by_slot: list[Part]
    tableset: kernels.TableSet
    # By parts list and the columns of ``into`` (None without one).
    layouts: dict[tuple[tuple[PartRequest, ...], tuple[int, ...] | None], Layout] = field(
        default_factory=dict, compare=False
    )
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False)


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
        compact_at: float = 0.0,
        first_version: int = 0,
    ) -> None:
        self.parts: dict[tuple[str, int], Part] = {}
        self.tier: CacheTier | None = None
        self.state_dir = state_dir
        self.compact_at = compact_at
        self.digest = manifest.digest()
        self.base = compaction.read_base(state_dir, self.digest) if state_dir else None
        self.hugepages = False
        tables: dict[str, Table] = {}
        for p in shard.parts:
            spec = manifest.table(p.table)
            name = self.base.files.get(part_key(p.table, p.row_start)) if self.base else None
            if name is not None:
                assert state_dir is not None
                source = compaction.open_part(state_dir, name, spec, p.rows, p.row_start)
                view = _map(source.path, spec)
            else:
                if p.table not in tables:
                    tables[p.table] = open_table(root, spec, file_size(manifest, spec))
                whole = tables[p.table]
                source = PartFile(Path(root) / spec.file, _data_offset(whole))
                view = _rows(whole, p.row_start, p.row_end)
            self.parts[(p.table, p.row_start)] = Part(
                spec, p.row_start, p.row_end, view, source, base=view
            )
        if cache_bytes is not None:
            # Only the files' row offsets are kept: the mappings go, so nothing is paged in.
            parts = [
                (p.spec, p.row_start, p.row_end, p.source.path, p.source.origin)
                for p in self.parts.values()
            ]
            self.tier = tier = CacheTier(parts, cache_bytes, io_threads)
            for i, key in enumerate(list(self.parts)):
                pc = tier.by_index[i]
                self.parts[key] = replace(self.parts[key], view=tier.table(i), cache=pc,
                                          resident=None if pc else i)  # fmt: skip
        self.index = {key: i for i, key in enumerate(self.parts)}
        self.max_dim = max((p.spec.dim for p in self.parts.values()), default=0)
        self.swap = threading.Lock()  # a generation's view and versions, read as one
        self.view = self._resolve(0)
        dense = None
        if self.base is not None and self.base.dense is not None and state_dir is not None:
            version, name = self.base.dense
            dense = (version, (state_dir / compaction.TABLES / name).read_bytes())
        self.versions = Versions(
            self.view.by_slot,
            state_dir,
            base_version=max(first_version, self.base.version if self.base else 0),
            snapshot=self.snapshot,
            dense=dense,
        )

    def _resolve(self, gen: int) -> View:
        """Resolve every part once for the kernel (see ``kernels.TableSet``)."""
        by_slot = list(self.parts.values())
        tableset = kernels.TableSet(
            [p.view for p in by_slot],
            first_ids=[0 if p.cache else p.row_start for p in by_slot],
        )
        return View(gen, by_slot, tableset)

    @property
    def nbytes(self) -> int:
        """Bytes of the parts' rows (on disk, with a cache)."""
        return sum(p.nbytes for p in self.parts.values())

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()
        if self.versions.log is not None:
            self.versions.log.close()

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
        ``hugepages`` serve each part from a copy in huge-page memory; returns seconds
        (before serving: parts compacted later are loaded the same way)."""
        start = time.perf_counter()
        self.hugepages = hugepages
        if hugepages:
            keys = list(self.parts)
            copies = hugepage_copies([self.parts[k].view for k in keys])
            for key, copy in zip(keys, copies, strict=True):
                self.parts[key] = replace(self.parts[key], view=copy)
            self.view = self._resolve(self.view.gen)
            self.versions.parts = self.view.by_slot
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
        out: Region | None = None,
        into: tuple[np.ndarray, tuple[int, ...]] | None = None,
    ) -> Job:
        """Resolve ``lookup``'s parts and check and size its kernel calls without running
        them (the server does this on its loop; a worker then only runs ``Job.run``). With
        ``out`` the kernel pools into that shared memory, group by group; with ``into``
        (an array ``[rows, width, dim]`` and a column per part, -1 for none) the parts
        with a column are pooled straight into it.

        Zero-copy: the kernel reads the request's ids (and weights) frame in place, with bag
        bounds as positions into it and each part's first row id as its id base.
        """
        with self.swap:  # one generation's parts and versions
            view, (gen, committed) = self.view, self.versions.state
        assert gen == view.gen
        overlays = patches_at(committed, version)  # the lookup's version
        cols = None if into is None else into[1]
        key = (lookup.parts, cols)
        layout = view.layouts.get(key)
        if layout is None:
            layout = self._layout(view, lookup.parts, cols)
            with view.lock:
                while len(view.layouts) >= LAYOUTS_KEPT:
                    del view.layouts[next(iter(view.layouts))]
                view.layouts[key] = layout
        if layout.floats > max_floats:
            raise TooLarge(
                f"the lookup asks for {layout.floats} pooled floats, more than {max_floats} "
                "(split it)",
                field="parts.bags",
            )
        bounds_all = kernels.bag_positions(lookup.lengths, lookup.ids.size)  # into the ids
        if bounds_all is None:  # the server leaves the lengths' values to this pass
            raise lengths_error(lookup.lengths, lookup.ids.size) or BadRequest(
                "bag lengths are invalid", field="lengths"
            )
        calls = []
        for step in layout.steps:
            target: np.ndarray | None
            if step.into:
                assert into is not None
                target = into[0]
                if (target.shape[0], target.shape[2]) != (step.shape[0], step.shape[2]):
                    raise BadRequest(
                        f"into is {list(target.shape)}: parts {list(step.members)} have "
                        f"{step.shape[0]} bags of dim {step.shape[2]}",
                        field="into.shape",
                    )
            else:
                target = None if out is None else out.take(step.shape)
            try:
                call = step.plan.call(
                    lookup.ids, bounds_all[step.at], weights=lookup.weights, out=target,
                    threads=threads,
                )  # fmt: skip
            except kernels.IdOutOfRangeError as exc:  # found while checking an empty output
                raise _explain(exc, layout.resolved, lookup.spans()) from None
            calls.append((step.members, call, step.into))
        slots = layout.slots
        updated = {i: overlays[s] for i, s in enumerate(slots) if s in overlays} if overlays else {}
        return Job(calls, layout.resolved, lookup, self.tier, updated, (gen, version, slots))

    def _layout(
        self, view: View, parts: tuple[PartRequest, ...], cols: tuple[int, ...] | None = None
    ) -> Layout:
        """``parts`` resolved on ``view`` and grouped into kernel calls (parts of one bag
        count and width pool in one call; those with a column of ``cols`` apart from the
        others)."""
        slots, resolved = [], []
        for i, req in enumerate(parts):
            slot = self.index.get((req.table, req.row_start))
            if slot is None:
                raise unknown_part(req.table, req.row_start, i)
            slots.append(slot)
            resolved.append(view.by_slot[slot])
        bags = [req.bags for req in parts]
        placed = [cols is not None and cols[i] >= 0 for i in range(len(parts))]
        floats = sum(
            b * p.spec.dim for b, p, x in zip(bags, resolved, placed, strict=True) if not x
        )
        first_bag = np.zeros(len(bags) + 1, np.int64)  # part i's bags: lengths[first_bag[i]:]
        np.cumsum(bags, out=first_bag[1:])
        groups: dict[tuple[int, int, bool], list[int]] = {}
        for i, part in enumerate(resolved):
            groups.setdefault((bags[i], part.spec.dim, placed[i]), []).append(i)
        steps = []
        for (n_bags, dim, into), members in groups.items():
            at = np.array([cols[i] for i in members], np.int64) if into and cols else None
            step_slots, modes = [slots[i] for i in members], [parts[i].mode for i in members]
            steps.append(
                Step(
                    tuple(members),
                    # Row j: part members[j]'s B + 1 bag bounds, positions into the ids frame.
                    first_bag[members][:, None] + np.arange(n_bags + 1),
                    (n_bags, len(members), dim),
                    view.tableset.plan(step_slots, modes, at),
                    into,
                )
            )
        return Layout(slots, resolved, floats, tuple(steps))

    # --- compaction ---------------------------------------------------------------------------

    def wants_compaction(self) -> bool:
        """Whether the newest version's corrections hold ``compact_at`` of the rows, or the
        log ``LOG_BYTES`` (dense weights, rewritten rows)."""
        v = self.versions
        if not self.compact_at or v.log is None:
            return False
        total = sum(p.rows for p in self.parts.values())
        rows = v.rows_updated > 0 and v.rows_updated >= self.compact_at * total
        return rows or v.log.bytes >= LOG_BYTES

    def compact(self) -> int:
        """Fold the newest version into new part files and swap them in (on the update
        thread); returns the parts written."""
        v = self.versions
        assert self.state_dir is not None
        with v.lock:
            if v.staged is not None:
                return 0  # the next commit tries again
            version, view = v.current, self.view
            updated = {s: f for s in range(len(view.by_slot)) if (f := v.flat(s)).size}
            if not updated and not (v.log and v.log.bytes):
                return 0
            flats = self._chosen(view, updated)
            carried = {s: f for s, f in updated.items() if s not in flats}
            base = self.base or Base(0, {}, {})
            files, changed = dict(base.files), dict(base.changed)
            written: dict[int, PartFile] = {}
            for slot, flat in flats.items():
                part = view.by_slot[slot]
                key = part_key(part.spec.name, part.row_start)
                stem = f"{part.spec.name}.{part.row_start}.v{version}"
                tables = self.state_dir / compaction.TABLES
                values = base_rows(part, flat.keys) + flat.deltas
                written[slot] = compaction.write_part(
                    part.source, part.spec, part.row_start, part.rows,
                    flat.keys, values, tables / f"{stem}.npy",
                    keep_cached=part.cache is None and part.resident is None,
                )  # fmt: skip
                bits = compaction.changed_bits(
                    tables / changed[key] if key in changed else None, part.row_start, part.rows
                )
                set_bits(bits, flat.keys - part.row_start)
                compaction.write_changed(tables / f"{stem}.bits.npy", bits)
                files[key], changed[key] = f"{stem}.npy", f"{stem}.bits.npy"
            dense = base.dense
            if v.dense is not None and (dense is None or dense[0] != v.dense[0]):
                dense = (v.dense[0], f"dense.v{v.dense[0]}.npz")
                compaction.write_bytes(self.state_dir / compaction.TABLES / dense[1], v.dense[1],
                                       sync_parent=False)  # fmt: skip
            sync_dir(self.state_dir / compaction.TABLES)  # once for every file
            record = v.carry(version, carried)  # durable before base.json names the version
            new = Base(version, files, changed, dense)
            compaction.write_base(self.state_dir, new, self.digest)
            self._swap(view, flats, written)
            old, self.base = base, new
            if old.dense is not None and old.dense != dense:
                (self.state_dir / compaction.TABLES / old.dense[1]).unlink(missing_ok=True)
            for key in {part_key(view.by_slot[s].spec.name, view.by_slot[s].row_start)
                        for s in flats}:  # fmt: skip
                for name in (old.files.get(key), old.changed.get(key)):
                    if name is not None and name not in (files[key], changed[key]):
                        (self.state_dir / compaction.TABLES / name).unlink(missing_ok=True)
            # Last, so that once ``info`` reports the version compacted its old files are gone.
            v.compacted(version, carried, record, sum(view.by_slot[s].nbytes for s in flats))
            return len(flats)

    def _chosen(self, view: View, updated: dict[int, Overlay]) -> dict[int, Overlay]:
        """The parts to rewrite: every updated one when the log is long, else the most
        updated for their rows until the rest hold half of ``compact_at`` of the rows."""
        assert self.versions.log is not None
        if self.versions.log.bytes >= LOG_BYTES:
            return updated
        total = sum(p.rows for p in view.by_slot)
        keep = self.compact_at * total / 2
        left = sum(f.size for f in updated.values())
        out: dict[int, Overlay] = {}
        for slot in sorted(updated, key=lambda s: -updated[s].size / view.by_slot[s].rows):
            if left <= keep:
                break
            out[slot] = updated[slot]
            left -= updated[slot].size
        return out

    def _swap(self, view: View, flats: dict[int, Overlay], written: dict[int, PartFile]) -> None:
        """Publish the new files as the next generation (see the module's docstring)."""
        for slot, source in written.items():
            part = view.by_slot[slot]
            mapped = _map(source.path, part.spec)
            if part.cache is not None:
                new = replace(part, source=source, base=mapped)
            elif part.resident is not None:
                assert self.tier is not None
                rows = self.tier.reload(part.resident, source.path, source.origin)
                new = replace(part, view=rows, source=source, base=mapped)
            elif self.hugepages:
                new = replace(part, view=hugepage_copies([mapped])[0], source=source, base=mapped)
            else:
                touch(mapped)  # lookups on the new generation do not fault
                new = replace(part, view=mapped, source=source, base=mapped)
            self.parts[(part.spec.name, part.row_start)] = new
        nxt = self._resolve(view.gen + 1)
        v = self.versions
        state = (nxt.gen, v.rebased(flats))
        tier = self.tier
        if tier is not None:
            tier.lock.acquire()
        try:
            if tier is not None:
                for slot, source in written.items():
                    pc = nxt.by_slot[slot].cache
                    if pc is not None:
                        file = TableFile(source.path, source.origin, pc.spec.row_bytes)
                        tier.swap_file(pc, file, flats[slot].keys - pc.row_start)
                tier.published = state
                tier.gen = nxt.gen
            with self.swap:
                self.view = nxt
                v.parts = nxt.by_slot
                v.state = state
        finally:
            if tier is not None:
                tier.lock.release()

    def snapshot(self) -> list[StagePart]:
        """Every row changed up to the compacted version: the compacted files' rows plus the
        corrections carried over them (for a replica catching up; the versions lock is
        held)."""
        out: list[StagePart] = []
        if self.base is None or self.state_dir is None:
            return out
        carried = self.versions.carried
        for slot, part in enumerate(self.view.by_slot):
            table, row_start = part.spec.name, part.row_start
            name = self.base.changed.get(part_key(table, row_start))
            ids = (
                compaction.changed_ids(
                    self.state_dir / compaction.TABLES / name, row_start, part.rows
                )
                if name is not None
                else np.zeros(0, np.int64)
            )
            extra = carried.get(slot)
            if extra is not None:
                ids = np.union1d(ids, extra.keys)
            if not ids.size:
                continue
            rows = compaction.read_rows(part.source, part.spec, ids)
            if extra is not None:
                rows += corrections((extra,), ids, part.spec.dim)
            out.append(StagePart(table, row_start, ids, rows))
        return out


class Job:
    """A prepared lookup: one kernel call per group of parts, and the rows of its cached
    parts fetched first."""

    __slots__ = ("at", "bags", "calls", "fetched", "ids", "lookup", "resolved", "tier", "updated")

    def __init__(
        self,
        calls: list[tuple[tuple[int, ...], kernels.PoolCall, bool]],  # bool: into ``into``
        resolved: list[Part],
        lookup: Lookup,
        tier: CacheTier | None = None,
        updated: dict[int, Patch] | None = None,
        at: tuple[int, int | None, list[int]] = (0, None, []),
    ) -> None:
        self.calls = calls
        self.updated = updated or {}
        self.at = at  # generation, version asked (None: the newest), slot of each part
        self.resolved = resolved
        self.lookup = lookup
        self.ids = int(lookup.ids.size)
        self.bags = int(lookup.lengths.size)
        if tier is not None and not any(p.cache or p.resident is not None for p in resolved):
            tier = None
        self.tier = tier
        self.fetched: Fetched | None = None

    def run(self) -> list[Group]:
        """Run the kernel calls; an id outside its part's rows raises ``IdOutOfRange``."""
        try:
            if self.tier is not None:
                return self._run_cached(self.tier)
            return [self._pooled(*c, c[1].ids) for c in self.calls]
        except kernels.IdOutOfRangeError as exc:
            raise _explain(exc, self.resolved, self.lookup.spans()) from None

    def _run_cached(self, tier: CacheTier) -> list[Group]:
        if not self.calls:
            return []
        ids = self.calls[0][1].ids  # as the kernel takes them (every call shares them)
        spans, resident = [], 0
        for i, (_, _, first, n) in enumerate(self.lookup.spans()):
            pc = self.resolved[i].cache
            if pc is not None and n:  # the cache's map checks the ids against the part's rows
                spans.append((i, pc, first, n))
            elif self.resolved[i].resident is not None:
                resident += n  # hits (the kernel checks these ids)
        if not spans:
            self.fetched = Fetched(hits=resident)
            return [self._pooled(*c, c[1].ids) for c in self.calls]
        mapped = ids.copy()
        self.fetched = got = tier.fetch(ids, mapped, spans)
        got.hits += resident
        try:
            gen, version, slots = self.at
            if got.gen != gen:  # compacted since prepare: the cache holds the new files' rows
                overlays = patches_at(got.published[1], version)
                for i, _, _, _ in spans:
                    self.updated.pop(i, None)
                    if slots[i] in overlays:
                        self.updated[i] = overlays[slots[i]]
            groups = []
            for members, call, into in self.calls:
                call.ids = mapped
                for j, i in enumerate(members):
                    if i in got.bypass:
                        call.retarget(j, got.bypass[i])
                groups.append(self._pooled(members, call, into, ids))
            return groups
        finally:
            tier.release(got)

    def _pooled(
        self, members: tuple[int, ...], call: kernels.PoolCall, into: bool, ids: np.ndarray
    ) -> Group:
        """Run one call, then add the updated rows of this lookup's version (``ids``: the
        global ids, as the request sent them)."""
        out = call.run()
        if not self.updated:
            return Group(members, out, into)
        for j, i in enumerate(members):
            patch = self.updated.get(i)
            if patch is None:
                continue
            col = int(call.layout[j, OUT])  # the column the kernel pooled part i into
            for ov in patch.levels:
                apply_deltas(out, col, ids, call.bounds[j], call.weights, call.weighted,
                             bool(call.layout[j, MEAN]), patch.bits, self.resolved[i].row_start,
                             ov.keys, ov.deltas)  # fmt: skip
        return Group(members, out, into)


def _map(path: Path, spec: TableSpec) -> Table:
    """A compacted part file, mapped read only."""
    array = np.load(path, mmap_mode="r")
    return Int8RowwiseTable(array) if spec.dtype == "int8" else array


def _rows(whole: Table, start: int, end: int) -> Table:
    if isinstance(whole, Int8RowwiseTable):
        return Int8RowwiseTable(whole.data[start:end])
    return whole[start:end]


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
