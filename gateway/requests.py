"""Request bodies to batches: the v1 forms (JSON or msgpack) and KServe's columnar tensors.

Everything here runs in the executor and checks limits before it allocates per sample or
per id, so a small body cannot make the gateway build something large.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import orjson

from recserve.contracts.batch import Bags, Batch, concat_weights
from recserve.contracts.columns import decode_array
from recserve.contracts.errors import BadRequest, IdOutOfRange, TooLarge, UnknownFeature
from recserve.contracts.http import MSGPACK_TYPES
from recserve.contracts.manifest import Manifest
from recserve.contracts.samples import F32_MAX, Limits, parse_samples


def decode_body(body: bytes, content_type: str) -> Any:
    try:
        if content_type in MSGPACK_TYPES:
            # bin only for typed arrays of the columnar form; never past the body itself
            return msgpack.unpackb(
                body, raw=False, strict_map_key=True, max_bin_len=len(body), max_ext_len=0
            )
        return orjson.loads(body)
    except (
        orjson.JSONDecodeError,
        ValueError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        TypeError,
    ) as exc:
        kind = "msgpack" if content_type in MSGPACK_TYPES else "JSON"
        raise BadRequest(f"the body is not valid {kind}: {exc}", field="body") from None


def parse_request(body: Any, manifest: Manifest, limits: Limits = Limits()) -> Batch:
    """The v1 request forms: ``{"samples": [...]}``; the ranking form
    ``{"context": {"dense": [...], "sparse": {...}}, "candidates": [{"sparse": {...}}]}``
    where every candidate shares the context's dense values and sparse bags; or the columnar
    form ``{"columns": ...}`` (``recserve.contracts.columns``)."""
    if not isinstance(body, dict):
        raise BadRequest(
            "the body must be an object with samples, context and candidates, or columns",
            field="body",
        )
    if "columns" in body:
        extra = sorted(set(body) - {"columns", "timeout_ms"})
        if extra:
            raise BadRequest(f"unknown field {extra[0]!r}", field=extra[0])
        return parse_columns(body["columns"], manifest, limits)
    if "samples" in body:
        extra = sorted(set(body) - {"samples", "timeout_ms"})
        if extra:
            raise BadRequest(f"unknown field {extra[0]!r}", field=extra[0])
        return parse_samples(body["samples"], manifest, limits=limits)
    extra = sorted(set(body) - {"context", "candidates", "timeout_ms"})
    if extra or "context" not in body or "candidates" not in body:
        field = extra[0] if extra else "samples"
        raise BadRequest("the body needs samples, or context and candidates", field=field)
    context, candidates = body["context"], body["candidates"]
    if not isinstance(context, dict):
        raise BadRequest("context must be an object", field="context")
    if not isinstance(candidates, list) or not candidates:
        raise BadRequest("candidates must be a non-empty list", field="candidates")
    shared = context.get("sparse", {})
    if not isinstance(shared, dict):
        raise BadRequest("context.sparse must be an object", field="context.sparse")
    try:
        ctx = parse_samples([context], manifest, field="context", limits=limits)
    except BadRequest as exc:
        raise _rename(exc, "context[0]", "context") from None
    for i, cand in enumerate(candidates[: limits.max_samples]):
        both = isinstance(cand, dict) and sorted(set(cand.get("sparse") or {}) & set(shared))
        if both:
            raise BadRequest(
                f"feature {both[0]!r} is in both the context and the candidate",
                field=f"candidates[{i}].sparse.{both[0]}",
            )
    per = parse_samples(
        candidates, manifest, field="candidates", limits=limits, dense=context["dense"]
    )
    k = len(candidates)
    bags = {}
    for feature in per.bags:
        if feature in shared or feature in (context.get("weights") or {}):
            b = ctx.bags[feature]
            bags[feature] = Bags(b.ids, b.bounds, b.weights, np.zeros(k, np.intp))
        else:
            bags[feature] = per.bags[feature]
    return Batch(per.dense, bags)


def parse_columns(doc: Any, manifest: Manifest, limits: Limits = Limits()) -> Batch:
    """The columnar form's arrays, checked as KServe tensors are."""
    if not isinstance(doc, dict) or not doc.keys() <= {"dense", "sparse"} or "dense" not in doc:
        raise BadRequest("columns must be an object of dense and sparse", field="columns")
    cap = limits.max_samples * manifest.dense_width
    dense = decode_array(doc["dense"], "columns.dense", floats=True, max_items=cap)
    if dense.ndim == 1 and dense.size % manifest.dense_width == 0:
        dense = dense.reshape(-1, manifest.dense_width)
    sparse_doc = doc.get("sparse", {})
    if not isinstance(sparse_doc, dict):
        raise BadRequest("columns.sparse must be an object", field="columns.sparse")
    sparse = {}
    for feature, col in sparse_doc.items():
        where = f"columns.sparse.{feature}"
        if not isinstance(col, dict) or col.keys() != {"values", "lengths"}:
            raise BadRequest(f"{where} must be an object of values and lengths", field=where)
        values = decode_array(
            col["values"], f"{where}.values", floats=False, max_items=limits.max_ids
        )
        lengths = decode_array(
            col["lengths"], f"{where}.lengths", floats=False, max_items=limits.max_samples
        )
        sparse[str(feature)] = (values, lengths.reshape(-1))
    try:
        return batch_from_arrays(dense, sparse, manifest, limits)
    except BadRequest as exc:  # KServe's names (dense, f.values) to this form's
        field = exc.field
        if field == "dense":
            field = "columns.dense"
        elif field and field != "sparse":
            field = f"columns.sparse.{field}"
        raise type(exc)(exc.message, field=field) from None


def _bags(
    size: int, features: list[tuple[str, int, tuple[np.ndarray, np.ndarray] | None]]
) -> dict[str, Bags]:
    """Every feature's ``Bags`` from its ``(values, lengths)`` (None: not sent, no ids),
    checked as one ``[features, B]`` array rather than feature by feature (a numpy call
    costs ~1-3 us, and a request holds tens of features): every feature's ids are views
    into one array, in manifest order (int32 when every feature's came as int32)."""
    sent = [(f, rows, arrays) for f, rows, arrays in features if arrays is not None]
    values = [arrays[0].reshape(-1) for _, _, arrays in sent]
    counts = np.array([v.size for v in values], np.int64)
    for (feature, _, (_, lengths)), n in zip(sent, counts.tolist(), strict=True):
        if lengths.shape != (size,):
            raise _bad_lengths(feature, size, n)
    lens = np.stack([arrays[1] for _, _, arrays in sent]) if sent else np.zeros((0, size))
    if lens.size:
        # Each length at most the ids sent, so their int64 sums cannot wrap around.
        bad = (lens.min(axis=1) < 0) | (lens.max(axis=1) > counts)
        if bad.any():
            j = int(bad.argmax())
            raise _bad_lengths(sent[j][0], size, int(counts[j]))
    bounds = np.zeros((len(sent), size + 1), np.int64)
    np.cumsum(lens, axis=1, out=bounds[:, 1:])
    if (short := bounds[:, -1] != counts).any():
        j = int(short.argmax())
        raise BadRequest(
            f"{sent[j][0]}.values has {int(counts[j])} ids, its lengths add up to "
            f"{int(bounds[j, -1])}",
            field=f"{sent[j][0]}.values",
        )
    # Ids sent as int32 stay int32 (half the bytes to copy, check and pool); others int64.
    narrow = bool(sent) and all(v.dtype == np.int32 for v in values)
    ids = np.concatenate(values, dtype=np.int32 if narrow else np.int64) if sent else _NO_IDS
    starts = np.zeros(len(sent) + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    nonempty = np.flatnonzero(counts)
    if nonempty.size:
        # One pass: as unsigned, a negative id is larger than any row count.
        top = np.maximum.reduceat(ids.view(np.uint32 if narrow else np.uint64), starts[nonempty])
        limit = np.array([sent[j][1] for j in nonempty.tolist()], np.uint64)
        if (over := top >= limit).any():
            j = int(nonempty[over.argmax()])
            feature, rows = sent[j][0], sent[j][1]
            mine = ids[starts[j] : starts[j + 1]]
            pos = int(np.flatnonzero(mine.astype(np.int64).view(np.uint64) >= rows)[0])
            raise IdOutOfRange(
                f"{feature}.values[{pos}]: id {int(mine[pos])} is outside [0, {rows})",
                field=f"{feature}.values[{pos}]",
            )
    out, j, empty = {}, 0, np.zeros(size + 1, np.int64)
    for feature, _, arrays in features:  # ``sent`` keeps their order
        if arrays is None:
            out[feature] = Bags(_NO_IDS, empty)
        else:
            out[feature] = Bags(ids[starts[j] : starts[j + 1]], bounds[j])
            j += 1
    return out


_NO_IDS = np.zeros(0, np.int64)


def _bad_lengths(feature: str, size: int, ids: int) -> BadRequest:
    return BadRequest(
        f"{feature}.lengths must be {size} counts in [0, {ids}]", field=f"{feature}.lengths"
    )


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
        bounds = [parts[0].bounds]
        index = []
        id_base = bag_base = 0
        for i, (p, b) in enumerate(zip(parts, batches, strict=True)):
            if i:
                bounds.append(p.bounds[1:] + id_base)
            index.append((np.arange(b.size) if p.index is None else p.index) + bag_base)
            id_base += p.ids.size
            bag_base += p.n_bags
        shared = any(p.index is not None for p in parts)
        bags[feature] = Bags(
            np.concatenate([p.ids for p in parts]),
            np.concatenate(bounds),
            concat_weights([p.weights for p in parts], [p.ids.size for p in parts]),
            np.concatenate(index).astype(np.intp) if shared else None,
        )
    return Batch(dense, bags)


def batch_from_arrays(
    dense: np.ndarray,
    sparse: dict[str, tuple[np.ndarray, np.ndarray]],
    manifest: Manifest,
    limits: Limits = Limits(),
) -> Batch:
    """A batch from columnar arrays (KServe v2 tensors): ``dense`` ``[B, width]``, per feature
    ``(values, lengths)`` with ``lengths`` ``[B]``. The same checks as ``parse_samples``."""
    rows = {f: t.rows for f, t in manifest.features()}
    if dense.ndim != 2 or dense.shape[1] != manifest.dense_width:
        raise BadRequest(
            f"dense must be [B, {manifest.dense_width}], got {list(dense.shape)}", field="dense"
        )
    size = dense.shape[0]
    if size == 0:
        raise BadRequest("the batch is empty", field="dense")
    if size > limits.max_samples:
        raise TooLarge(f"{size} samples exceed the limit of {limits.max_samples}", field="dense")
    unknown = sorted(set(sparse) - set(rows))
    if unknown:
        raise UnknownFeature(f"the model has no feature {unknown[0]!r}", field=unknown[0])
    total = sum(values.size for values, _ in sparse.values())
    if total > limits.max_ids:
        raise TooLarge(f"{total} ids exceed the limit of {limits.max_ids}", field="sparse")
    dense64 = dense.astype(np.float64)
    if not (np.abs(dense64) <= F32_MAX).all():
        raise BadRequest("dense holds NaN or Infinity", field="dense")
    bags = _bags(size, [(f, n, sparse.get(f)) for f, n in rows.items()])
    return Batch(dense64.astype(np.float32), bags)
