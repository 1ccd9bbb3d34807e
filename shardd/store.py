"""The table parts one shard serves, and the pooling of a lookup over them.

A part is a row range ``[row_start, row_end)`` of a table, kept as a zero-copy view of the
memory-mapped table file (or, with ``--hugepages``, a copy in huge-page memory). Ids arrive
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
from recserve.contracts.errors import IdOutOfRange, TooLarge, UnknownTable
from recserve.contracts.manifest import Manifest, TableSpec
from recserve.contracts.plan import ShardPlan
from recserve.model.artifact import file_size, hugepage_copies, open_table, touch
from recserve.rpc.wire import MAX_REPLY_FLOATS, Lookup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    spec: TableSpec
    row_start: int
    row_end: int
    view: Table  # rows [row_start, row_end) of the table

    @property
    def nbytes(self) -> int:
        return (self.row_end - self.row_start) * self.spec.row_bytes


@dataclass(frozen=True)
class Group:
    parts: tuple[int, ...]
    pooled: np.ndarray  # float32 [bags, len(parts), dim]


class PartStore:
    def __init__(self, root: Path | str, manifest: Manifest, shard: ShardPlan) -> None:
        self.parts: dict[tuple[str, int], Part] = {}
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
            self.parts[(p.table, p.row_start)] = Part(spec, p.row_start, p.row_end, view)
        self._resolve()

    def _resolve(self) -> None:
        """Resolve every part once for the kernel (see ``kernels.TableSet``)."""
        self.index = {key: i for i, key in enumerate(self.parts)}
        self.by_slot = list(self.parts.values())
        self.max_dim = max((p.spec.dim for p in self.by_slot), default=0)
        self.tableset = kernels.TableSet(
            [p.view for p in self.by_slot], first_ids=[p.row_start for p in self.by_slot]
        )

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

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
        self, lookup: Lookup, threads: int | None = None, max_floats: int = MAX_REPLY_FLOATS
    ) -> Job:
        """Resolve ``lookup``'s parts and check and size its kernel calls without running
        them (the server does this on its loop; a worker then only runs ``Job.run``).

        Zero-copy: the kernel reads the request's ids (and weights) frame in place, with bag
        bounds as positions into it and each part's first row id as its id base.
        """
        slots, resolved = [], []
        for i, req in enumerate(lookup.parts):
            slot = self.index.get((req.table, req.row_start))
            if slot is None:
                raise UnknownTable(
                    f"this shard serves no part of table {req.table!r} starting "
                    f"at row {req.row_start}",
                    field=f"parts[{i}]",
                )
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
        return Job(calls, resolved, lookup)


class Job:
    """A prepared lookup: one kernel call per group of parts."""

    __slots__ = ("bags", "calls", "ids", "lookup", "resolved")

    def __init__(
        self,
        calls: list[tuple[tuple[int, ...], kernels.PoolCall]],
        resolved: list[Part],
        lookup: Lookup,
    ) -> None:
        self.calls = calls
        self.resolved = resolved
        self.lookup = lookup
        self.ids = int(lookup.ids.size)
        self.bags = int(lookup.lengths.size)

    def run(self) -> list[Group]:
        """Run the kernel calls; an id outside its part's rows raises ``IdOutOfRange``."""
        try:
            return [Group(members, call.run()) for members, call in self.calls]
        except kernels.IdOutOfRangeError as exc:
            raise _explain(exc, self.resolved, self.lookup.spans()) from None


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
