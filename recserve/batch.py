"""Samples to arrays: the validated, columnar form of a scoring request.

A request is a list of samples ``{"dense": [...], "sparse": {feature: [ids]}, "weights":
{feature: [w]}}``. ``parse_samples`` checks every value (types, widths, finiteness, feature
names, id ranges) and returns a :class:`Batch` of numpy arrays, one bag per (sample, feature).
Errors name the offending field, e.g. ``samples[3].sparse.f1[2]``. A feature a sample omits
is an empty bag, which pools to zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recserve.errors import BadRequest, IdOutOfRange, UnknownFeature
from recserve.manifest import Manifest


@dataclass(frozen=True)
class Bags:
    """All bags of one feature: ``ids[bounds[b]:bounds[b+1]]`` is bag ``b``.

    Without ``index`` bag ``b`` belongs to sample ``b``. With it, sample ``s`` uses bag
    ``index[s]``: a ranking request's context feature is one bag shared by every candidate,
    looked up and pooled once.
    """

    ids: np.ndarray  # int64 [n]
    bounds: np.ndarray  # int64 [bags + 1]
    weights: np.ndarray | None = None  # float32 [n]
    index: np.ndarray | None = None  # intp [B]

    @property
    def n_bags(self) -> int:
        return int(self.bounds.size - 1)

    def lengths(self) -> np.ndarray:
        return self.bounds[1:] - self.bounds[:-1]  # np.diff costs ~4x as much a call


@dataclass(frozen=True)
class Batch:
    dense: np.ndarray  # float32 [B, dense_width]
    bags: dict[str, Bags]  # every feature of the model, in manifest order

    @property
    def size(self) -> int:
        return int(self.dense.shape[0])


F32_MAX = float(np.finfo(np.float32).max)


_SAMPLE_FIELDS = frozenset({"dense", "sparse", "weights"})
_EMPTY: dict[str, Any] = {}
_UNSET = object()


def _is_number(x: Any) -> bool:
    return type(x) is float or type(x) is int


def _check_dense(dense: Any, width: int, where: str) -> None:
    if not isinstance(dense, list) or len(dense) != width:
        got = f"{len(dense)} values" if isinstance(dense, list) else type(dense).__name__
        raise BadRequest(f"{where} must be a list of {width} numbers, got {got}", field=where)
    if not all(map(_is_number, dense)):
        raise BadRequest(f"{where} must hold numbers only", field=where)


def _ids_array(values: list[Any], locate: Callable[[int], tuple[str, int]]) -> np.ndarray:
    """Ids as int64, refusing anything but JSON integers (``locate(pos)`` names the bag of
    position ``pos`` and the position in it). numpy infers the type of all the values in C,
    ~2x faster than checking each in Python; only ids 0 and 1 need a look (``true`` and
    ``false`` become 1 and 0 beside integers), and only odd input takes the slow path."""
    if not values:
        return np.zeros(0, np.int64)
    try:
        arr = np.array(values)
    except (ValueError, TypeError):  # nested lists
        arr = None
    if arr is not None and arr.ndim == 1 and arr.dtype == np.int64:
        suspects = np.flatnonzero((arr == 0) | (arr == 1))
        if not any(type(values[i]) is bool for i in suspects.tolist()):
            return arr
    for pos, x in enumerate(values):
        if type(x) is not int:
            bag, _ = locate(pos)
            raise BadRequest(f"{bag} must be a list of integer ids", field=bag)
    # Integers past int64: clamp to -1, which the range check reports.
    return np.array([x if -(2**63) <= x < 2**63 else -1 for x in values], dtype=np.int64)


def parse_samples(samples: Any, manifest: Manifest, *, field: str = "samples") -> Batch:
    if not isinstance(samples, list):
        raise BadRequest(f"{field} must be a list of samples", field=field)
    if not samples:
        raise BadRequest(f"{field} is empty", field=field)
    rows = {f: t.rows for f, t in manifest.features()}
    slot = {f: k for k, f in enumerate(rows)}
    width = manifest.dense_width
    dense_rows: list[Sequence[Any]] = []
    ids: list[list[int]] = [[] for _ in rows]  # per feature, in manifest order
    weights: list[list[float] | None] = [None for _ in rows]
    counts = [[0] * (len(samples) + 1) for _ in rows]  # ids per bag, per feature
    checked: Any = _UNSET  # the last dense list checked: a ranking request's candidates share one
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise BadRequest(f"{field}[{i}] must be an object", field=f"{field}[{i}]")
        if not sample.keys() <= _SAMPLE_FIELDS:
            key = sorted(set(sample) - _SAMPLE_FIELDS)[0]
            raise BadRequest(
                f"{field}[{i}].{key} is not a sample field (dense, sparse, weights)",
                field=f"{field}[{i}].{key}",
            )
        dense: Any = sample.get("dense")
        if dense is not checked:
            _check_dense(dense, width, f"{field}[{i}].dense")
            checked = dense
        dense_rows.append(dense)
        sparse = sample.get("sparse", _EMPTY)
        if not isinstance(sparse, dict):
            raise BadRequest(f"{field}[{i}].sparse must be an object", field=f"{field}[{i}].sparse")
        for feature, bag in sparse.items():
            k = slot.get(feature)
            if k is None:
                fwhere = f"{field}[{i}].sparse.{feature}"
                raise UnknownFeature(
                    f"{fwhere}: the model has no feature {feature!r}", field=fwhere
                )
            if not isinstance(bag, list):
                fwhere = f"{field}[{i}].sparse.{feature}"
                raise BadRequest(f"{fwhere} must be a list of integer ids", field=fwhere)
            ids[k].extend(bag)  # element types are checked all at once, below
            counts[k][i + 1] = len(bag)
        sample_weights = sample.get("weights", _EMPTY)
        if not isinstance(sample_weights, dict):
            raise BadRequest(
                f"{field}[{i}].weights must be an object", field=f"{field}[{i}].weights"
            )
        for feature, wbag in sample_weights.items():
            wwhere = f"{field}[{i}].weights.{feature}"
            k = slot.get(feature)
            if k is None:
                raise UnknownFeature(
                    f"{wwhere}: the model has no feature {feature!r}", field=wwhere
                )
            n = counts[k][i + 1]
            if not isinstance(wbag, list) or len(wbag) != n or not all(map(_is_number, wbag)):
                raise BadRequest(
                    f"{wwhere} must be a list of {n} numbers (one per id)", field=wwhere
                )
            # Weighted features are dense lists: ids without weights weigh 1.
            w = weights[k]
            if w is None:
                w = weights[k] = []
            w.extend([1.0] * (len(ids[k]) - n - len(w)))
            w.extend(wbag)
    for k, w in enumerate(weights):
        if w is not None:
            w.extend([1.0] * (len(ids[k]) - len(w)))
    dense64 = np.array(dense_rows, dtype=np.float64)
    ok = np.abs(dense64) <= F32_MAX  # False for NaN and +-Infinity too
    if not ok.all():
        bad = int(np.flatnonzero(~ok.all(axis=1))[0])
        raise BadRequest(
            f"{field}[{bad}].dense holds NaN or Infinity (or overflows float32)",
            field=f"{field}[{bad}].dense",
        )
    dense_arr = dense64.astype(np.float32)
    # Every feature's ids in one array, checked by a handful of numpy calls: per feature
    # they cost ~15 us each, most of a ranking request's parse on a 64-feature model.
    counts_arr = np.array(counts, np.int64).reshape(len(rows), len(samples) + 1)
    bounds = np.cumsum(counts_arr, axis=1)  # row k: feature k's bag bounds
    starts = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(bounds[:, -1], out=starts[1:])
    names = list(rows)
    flat: list[Any] = []
    for bag_ids in ids:
        flat += bag_ids

    def locate(pos: int) -> tuple[str, int]:
        k = int(np.searchsorted(starts, pos, side="right")) - 1
        at = pos - int(starts[k])
        sample = int(np.searchsorted(bounds[k], at, side="right")) - 1
        return f"{field}[{sample}].sparse.{names[k]}", at - int(bounds[k, sample])

    arr = _ids_array(flat, locate)
    limits = np.repeat(np.array(list(rows.values()), np.int64), bounds[:, -1])
    bad_mask = (arr < 0) | (arr >= limits)
    if bad_mask.any():
        pos = int(np.flatnonzero(bad_mask)[0])
        bag, at = locate(pos)
        fld = f"{bag}[{at}]"
        raise IdOutOfRange(f"{fld}: id {flat[pos]} is outside [0, {int(limits[pos])})", field=fld)
    out = {}
    for k, feature in enumerate(names):
        w = weights[k]
        warr = None if w is None else np.array(w, dtype=np.float32)
        if warr is not None and not np.isfinite(warr).all():
            raise BadRequest(
                f"{field}: weights of {feature} must be finite", field=f"{field}.weights.{feature}"
            )
        out[feature] = Bags(arr[starts[k] : starts[k + 1]], bounds[k], warr)
    return Batch(dense_arr, out)


def parse_request(body: Any, manifest: Manifest) -> Batch:
    """The HTTP request forms: ``{"samples": [...]}``, or the ranking form
    ``{"context": {"dense": [...], "sparse": {...}}, "candidates": [{"sparse": {...}}]}``
    where every candidate shares the context's dense values and sparse bags."""
    if not isinstance(body, dict):
        raise BadRequest(
            "the body must be an object with samples, or context and candidates", field="body"
        )
    if "samples" in body:
        extra = sorted(set(body) - {"samples", "timeout_ms"})
        if extra:
            raise BadRequest(f"unknown field {extra[0]!r}", field=extra[0])
        return parse_samples(body["samples"], manifest)
    extra = sorted(set(body) - {"context", "candidates", "timeout_ms"})
    if extra or "context" not in body or "candidates" not in body:
        field = extra[0] if extra else "samples"
        raise BadRequest("the body needs samples, or context and candidates", field=field)
    context, candidates = body["context"], body["candidates"]
    if not isinstance(context, dict):
        raise BadRequest("context must be an object", field="context")
    if not isinstance(candidates, list) or not candidates:
        raise BadRequest("candidates must be a non-empty list", field="candidates")
    dense = context.get("dense")
    shared = context.get("sparse", {})
    if not isinstance(shared, dict):
        raise BadRequest("context.sparse must be an object", field="context.sparse")
    try:
        ctx = parse_samples([context], manifest, field="context")
    except BadRequest as exc:
        raise _rename(exc, "context[0]", "context") from None
    expanded = []
    for i, cand in enumerate(candidates):
        if not isinstance(cand, dict):
            raise BadRequest(f"candidates[{i}] must be an object", field=f"candidates[{i}]")
        if "dense" in cand:
            raise BadRequest("dense values come from the context", field=f"candidates[{i}].dense")
        both = sorted(set(cand.get("sparse") or {}) & set(shared))
        if both:
            raise BadRequest(
                f"feature {both[0]!r} is in both the context and the candidate",
                field=f"candidates[{i}].sparse.{both[0]}",
            )
        expanded.append({**cand, "dense": dense})
    per = parse_samples(expanded, manifest, field="candidates")
    k = len(candidates)
    bags = {}
    for feature in per.bags:
        if feature in shared or feature in (context.get("weights") or {}):
            b = ctx.bags[feature]
            bags[feature] = Bags(b.ids, b.bounds, b.weights, np.zeros(k, np.intp))
        else:
            bags[feature] = per.bags[feature]
    return Batch(np.repeat(ctx.dense, k, axis=0), bags)


def _rename(exc: BadRequest, old: str, new: str) -> BadRequest:
    field = exc.field.replace(old, new, 1) if exc.field else exc.field
    return type(exc)(exc.message.replace(old, new), field=field)


def merge(batches: list[Batch]) -> Batch:
    """Several requests' batches as one (the dynamic batcher's merge)."""
    if len(batches) == 1:
        return batches[0]
    dense = np.concatenate([b.dense for b in batches])
    bags = {}
    for feature in batches[0].bags:
        parts = [b.bags[feature] for b in batches]
        ids = np.concatenate([p.ids for p in parts])
        bounds = [parts[0].bounds]
        index = []
        id_base = bag_base = 0
        for i, (p, b) in enumerate(zip(parts, batches, strict=True)):
            if i:
                bounds.append(p.bounds[1:] + id_base)
            index.append((np.arange(b.size) if p.index is None else p.index) + bag_base)
            id_base += p.ids.size
            bag_base += p.n_bags
        weights = None
        if any(p.weights is not None for p in parts):
            weights = np.concatenate(
                [
                    p.weights if p.weights is not None else np.ones(p.ids.size, np.float32)
                    for p in parts
                ]
            )
        shared = any(p.index is not None for p in parts)
        bags[feature] = Bags(
            ids,
            np.concatenate(bounds),
            weights,
            np.concatenate(index).astype(np.intp) if shared else None,
        )
    return Batch(dense, bags)


def batch_from_arrays(
    dense: np.ndarray, sparse: dict[str, tuple[np.ndarray, np.ndarray]], manifest: Manifest
) -> Batch:
    """A batch from columnar arrays (KServe v2 tensors): ``dense`` ``[B, width]``, per feature
    ``(values, lengths)`` with ``lengths`` ``[B]``. The same checks as ``parse_samples``."""
    rows = {f: t.rows for f, t in manifest.features()}
    if dense.ndim != 2 or dense.shape[1] != manifest.dense_width:
        raise BadRequest(
            f"dense must be [B, {manifest.dense_width}], got {list(dense.shape)}", field="dense"
        )
    dense64 = dense.astype(np.float64)
    if not (np.abs(dense64) <= F32_MAX).all():
        raise BadRequest("dense holds NaN or Infinity", field="dense")
    size = dense.shape[0]
    if size == 0:
        raise BadRequest("the batch is empty", field="dense")
    bags = {}
    for feature in rows:
        if feature not in sparse:
            bags[feature] = Bags(np.zeros(0, np.int64), np.zeros(size + 1, np.int64))
            continue
        values, lengths = sparse[feature]
        if lengths.shape != (size,) or (lengths.size and int(lengths.min()) < 0):
            raise BadRequest(
                f"{feature}.lengths must be {size} non-negative counts", field=f"{feature}.lengths"
            )
        bounds = np.zeros(size + 1, np.int64)
        np.cumsum(lengths, out=bounds[1:])
        ids = values.astype(np.int64, copy=False).reshape(-1)
        if ids.size != int(bounds[-1]):
            raise BadRequest(
                f"{feature}.values has {ids.size} ids, its lengths add up to {int(bounds[-1])}",
                field=f"{feature}.values",
            )
        bad = (ids < 0) | (ids >= rows[feature])
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            raise IdOutOfRange(
                f"{feature}.values[{pos}]: id {int(ids[pos])} is outside [0, {rows[feature]})",
                field=f"{feature}.values[{pos}]",
            )
        bags[feature] = Bags(ids, bounds)
    unknown = sorted(set(sparse) - set(rows))
    if unknown:
        raise UnknownFeature(f"the model has no feature {unknown[0]!r}", field=unknown[0])
    return Batch(dense64.astype(np.float32), bags)
