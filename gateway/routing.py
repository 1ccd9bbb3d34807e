"""Batches to shard lookups and shard replies back to pooled vectors: no I/O, no state.

The ``Router`` splits a batch's ids by the plan: one ``ShardRequest`` per contacted shard,
each feature's bags in one part per table part (a table split by rows has its ids masked per
part, asked for sums, and its partial pools summed back by the ``Merger``; ``mean`` tables
split across shards are divided by the true bag length after merging).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recserve.contracts.batch import Batch, concat_weights
from recserve.contracts.errors import ShardUnavailable
from recserve.contracts.manifest import Manifest, TableSpec
from recserve.contracts.plan import Part, Plan
from recserve.rpc.client import PooledGroup
from recserve.rpc.shm import Loan
from recserve.rpc.wire import PartRequest

INT32_ROWS = 2**31  # tables with at most this many rows have ids that fit int32


@dataclass
class ShardRequest:
    parts: list[PartRequest] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray | None] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # feature index of each part
    # Per part, the column of the batch's pooled array the shard may pool it straight into
    # (its feature's, when its bags are that column as they are: the table whole, one bag a
    # sample, in order), or -1.
    cols: list[int] = field(default_factory=list)
    packed: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None  # set by prepare
    lent: Loan | None = None  # the arena region ``packed`` was written into, if it was
    narrow: bool = True  # every part's table has <= 2**31 rows: ids travel as int32

    def add(
        self,
        part: PartRequest,
        spec: TableSpec,
        target: int,
        arrays: tuple[np.ndarray, np.ndarray, np.ndarray | None],
        placeable: bool = False,
    ) -> None:
        """Part ``part`` of feature ``target``: its (ids, bag lengths, weights)."""
        self.narrow &= spec.rows <= INT32_ROWS
        self.cols.append(target if placeable else -1)
        self.parts.append(part)
        self.ids.append(arrays[0])
        self.lengths.append(arrays[1])
        self.weights.append(arrays[2])
        self.targets.append(target)

    def wire_arrays(self) -> list[tuple[np.dtype, int]]:
        """The dtype and size of each array the lookup sends: ids (int32 when every table
        fits: half the request bytes and the ids the shard reads), bag lengths and, when a
        part is weighted, weights."""
        n_ids = sum(ids.size for ids in self.ids)
        out: list[tuple[np.dtype, int]] = [
            (np.dtype("<i4") if self.narrow else np.dtype("<i8"), n_ids),
            (np.dtype("<i4"), sum(lengths.size for lengths in self.lengths)),
        ]
        if any(w is not None for w in self.weights):
            out.append((np.dtype("<f4"), n_ids))
        return out

    def frames(
        self, views: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The lookup's wire arrays, written into ``views`` (as ``wire_arrays`` describes
        them: a replica's arena) or into new arrays."""
        if views is None:
            views = [np.empty(n, dtype) for dtype, n in self.wire_arrays()]
        # Ids were checked against their table's rows when the request was parsed: exact.
        np.concatenate(self.ids, out=views[0], casting="unsafe")
        np.concatenate(self.lengths, out=views[1], casting="unsafe")
        if len(views) < 3:
            return views[0], views[1], None
        views[2][:] = concat_weights(self.weights, [i.size for i in self.ids])
        return views[0], views[1], views[2]


class Router:
    def __init__(self, manifest: Manifest, plan: Plan) -> None:
        self.features = list(manifest.features())
        self.parts: dict[str, list[tuple[int, Part]]] = {}
        for s in plan.shards:
            for p in s.parts:
                self.parts.setdefault(p.table, []).append((s.id, p))
        # Features whose table is split by rows: their parts are summed by the Merger.
        self.split = frozenset(
            k for k, (_, spec) in enumerate(self.features) if len(self.parts[spec.name]) > 1
        )

    def route(self, batch: Batch) -> dict[int, ShardRequest]:
        """One request per contacted shard (``ShardedPooler.prepare`` packs them)."""
        out: dict[int, ShardRequest] = {}
        size = batch.size
        for k, (feature, spec) in enumerate(self.features):
            bags = batch.bags[feature]
            split = k in self.split
            n_bags = bags.n_bags
            for shard_id, part in self.parts[spec.name]:
                if split:
                    mask = (bags.ids >= part.row_start) & (bags.ids < part.row_end)
                    seen = np.zeros(bags.ids.size + 1, np.int64)
                    np.cumsum(mask, out=seen[1:])
                    arrays: tuple[np.ndarray, np.ndarray, np.ndarray | None] = (
                        bags.ids[mask],
                        seen[bags.bounds[1:]] - seen[bags.bounds[:-1]],
                        None if bags.weights is None else bags.weights[mask],
                    )
                else:
                    arrays = (bags.ids, bags.lengths(), bags.weights)
                mode = "sum" if split else spec.pooling
                part_req = PartRequest(spec.name, part.row_start, n_bags, mode)
                whole = not split and bags.index is None and n_bags == size
                req = out.get(shard_id)
                if req is None:  # not setdefault: it would build a request every time
                    req = out[shard_id] = ShardRequest()
                req.add(part_req, spec, k, arrays, whole)
        return out


class Merger:
    def __init__(self, manifest: Manifest, router: Router) -> None:
        self.features = router.features
        self.split = router.split
        self.dim = manifest.embedding_dim

    def merge(
        self,
        batch: Batch,
        routes: dict[int, ShardRequest],
        replies: dict[int, list[PooledGroup]],
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """The shards' pooled groups as ``[B, features, dim]``: a table served whole is
        written straight from its group (a group of such tables in one assignment), row
        splits are summed first. With ``out`` (the batch's array the shards pooled some
        features straight into, which answer in no group) the rest are written into it."""
        if out is None:
            out = np.empty((batch.size, len(self.features), self.dim), np.float32)
        acc: dict[int, np.ndarray] = {}  # split features' partial sums
        for shard_id, groups in replies.items():
            targets = routes[shard_id].targets
            for g in groups:
                if g.pooled.shape[2] != self.dim:
                    raise ShardUnavailable(
                        f"shard {shard_id} answered dim {g.pooled.shape[2]}, not {self.dim}"
                    )
                ks = [targets[i] for i in g.parts]
                if not self.split.intersection(ks):
                    rows = g.pooled.shape[0]
                    if rows == 1 or (  # one bag each: every sample uses it
                        rows == batch.size
                        and all(batch.bags[self.features[k][0]].index is None for k in ks)
                    ):
                        out[:, ks, :] = g.pooled
                        continue
                for j, k in enumerate(ks):
                    if k not in self.split:
                        self._put(out, batch, k, g.pooled[:, j, :])
                    elif k in acc:
                        acc[k] += g.pooled[:, j, :]
                    else:
                        acc[k] = g.pooled[:, j, :].copy()
        for k in self.split:
            bags = batch.bags[self.features[k][0]]
            total = acc.get(k)
            if total is None:  # no shard holds a part of it (cannot happen with a valid plan)
                total = np.zeros((bags.n_bags, self.dim), np.float32)
            if self.features[k][1].pooling == "mean":
                n = bags.lengths()
                np.divide(total, n[:, None], out=total, where=n[:, None] > 0)
            self._put(out, batch, k, total)
        return out

    def _put(self, out: np.ndarray, batch: Batch, k: int, pooled: np.ndarray) -> None:
        index = batch.bags[self.features[k][0]].index
        out[:, k, :] = pooled if index is None else pooled[index]
