"""Samples to arrays: the validated, columnar form of the HTTP API's samples.

A sample is ``{"dense": [...], "sparse": {feature: [ids]}, "weights": {feature: [w]}}``.
``parse_samples`` checks every value (types, widths, finiteness, feature names, id ranges)
and returns a :class:`~recserve.contracts.batch.Batch` with one bag per (sample, feature).
Errors name the offending field, e.g. ``samples[3].sparse.f1[2]``. A feature a sample omits
is an empty bag, which pools to zeros.

Work and memory are bounded by the request before they are spent: the sample count is
checked against ``Limits`` before anything is allocated per sample, ids are counted while
they are collected, and per-bag bookkeeping is kept only for the bags a body has.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import numpy as np

from recserve.contracts.batch import Bags, Batch
from recserve.contracts.errors import BadRequest, IdOutOfRange, TooLarge, UnknownFeature
from recserve.contracts.manifest import Manifest

F32_MAX = float(np.finfo(np.float32).max)
_SAMPLE_FIELDS = frozenset({"dense", "sparse", "weights"})
_EMPTY: dict[str, Any] = {}


@dataclass(frozen=True)
class Limits:
    """How much one request may ask for (the gateway's ``--max-request-*``)."""

    max_samples: int = 1 << 31
    max_ids: int = 1 << 62


@dataclass
class _Collected:
    """What a pass over the samples gathered, per feature in manifest order."""

    ids: list[list[Any]]
    weights: list[list[float] | None]
    # Every bag a body has, in order: its feature and its length, and per sample how many
    # bags it has (flat lists of ints: numpy reads them far faster than tuples).
    bag_features: list[int] = field(default_factory=list)
    bag_lengths: list[int] = field(default_factory=list)
    sample_bags: list[int] = field(default_factory=list)
    dense: list[Any] = field(default_factory=list)
    total_ids: int = 0


def parse_samples(
    samples: Any,
    manifest: Manifest,
    *,
    field: str = "samples",
    limits: Limits = Limits(),
    dense: list[Any] | None = None,
) -> Batch:
    """``dense``, when given, is every sample's dense list (a ranking request's context):
    checked once here, and samples must not carry their own."""
    if not isinstance(samples, list):
        raise BadRequest(f"{field} must be a list of samples", field=field)
    if not samples:
        raise BadRequest(f"{field} is empty", field=field)
    if len(samples) > limits.max_samples:
        raise TooLarge(
            f"{len(samples)} samples exceed the limit of {limits.max_samples}", field="samples"
        )
    names = [f for f, _ in manifest.features()]
    rows = np.array([t.rows for _, t in manifest.features()], np.int64)
    width = manifest.dense_width
    if dense is not None:
        _check_dense(dense, width, "context.dense")
    got = _collect(samples, {f: k for k, f in enumerate(names)}, field, dense is None, limits)
    if dense is None:
        for i, values in enumerate(got.dense):
            _check_dense(values, width, f"{field}[{i}].dense")
    dense_arr = _dense_array([dense] if dense is not None else got.dense, field, len(samples))
    bounds = _bounds(got, len(names), len(samples))
    starts = np.zeros(len(names) + 1, np.int64)  # feature k's ids: starts[k]:starts[k + 1]
    np.cumsum([len(feature_ids) for feature_ids in got.ids], out=starts[1:])
    ids = _ids(got, names, rows, bounds, starts, field)
    out = {}
    for k, feature in enumerate(names):
        out[feature] = Bags(
            ids[starts[k] : starts[k + 1]], bounds[k], _weights(got, k, feature, field)
        )
    return Batch(dense_arr, out)


def _collect(
    samples: list[Any], slot: dict[str, int], field: str, own_dense: bool, limits: Limits
) -> _Collected:
    """One pass over the samples. Its inner loop runs once per (sample, feature), a
    thousand times for 16 samples of a 64-feature model, so it does only what good input
    needs; the error messages are built where they are raised."""
    got = _Collected([[] for _ in slot], [None for _ in slot])
    ids, add_feature, add_length = got.ids, got.bag_features.append, got.bag_lengths.append
    total = 0
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise BadRequest(f"{field}[{i}] must be an object", field=f"{field}[{i}]")
        if not sample.keys() <= _SAMPLE_FIELDS:
            key = sorted(set(sample) - _SAMPLE_FIELDS)[0]
            raise BadRequest(
                f"{field}[{i}].{key} is not a sample field (dense, sparse, weights)",
                field=f"{field}[{i}].{key}",
            )
        if own_dense:
            got.dense.append(sample.get("dense"))
        elif "dense" in sample:
            raise BadRequest("dense values come from the context", field=f"{field}[{i}].dense")
        sparse = sample.get("sparse", _EMPTY)
        if not isinstance(sparse, dict):
            where = f"{field}[{i}].sparse"
            raise BadRequest(f"{where} must be an object", field=where)
        for feature, bag in sparse.items():
            k = slot.get(feature)
            if k is None or not isinstance(bag, list):
                where = f"{field}[{i}].sparse.{feature}"
                _slot(slot, feature, where)
                raise BadRequest(f"{where} must be a list of integer ids", field=where)
            ids[k].extend(bag)  # element types are checked all at once, in _ids
            n = len(bag)
            add_feature(k)
            add_length(n)
            total += n
        got.sample_bags.append(len(sparse))
        if total > limits.max_ids:
            raise TooLarge(
                f"more than {limits.max_ids} ids exceed the limit of {limits.max_ids}",
                field="sparse",
            )
        weights = sample.get("weights", _EMPTY)
        if not isinstance(weights, dict):
            where = f"{field}[{i}].weights"
            raise BadRequest(f"{where} must be an object", field=where)
        for feature, wbag in weights.items():
            wwhere = f"{field}[{i}].weights.{feature}"
            k = _slot(slot, feature, wwhere)
            bag = sparse.get(feature)
            n = len(bag) if isinstance(bag, list) else 0
            if not isinstance(wbag, list) or len(wbag) != n or not all(map(_is_number, wbag)):
                raise BadRequest(
                    f"{wwhere} must be a list of {n} numbers (one per id)", field=wwhere
                )
            # A weighted feature's weights are a dense list: ids without weights weigh 1.
            w = got.weights[k]
            if w is None:
                w = got.weights[k] = []
            w.extend([1.0] * (len(ids[k]) - n - len(w)))
            w.extend(wbag)
    got.total_ids = total
    return got


def _slot(slot: dict[str, int], feature: str, where: str) -> int:
    k = slot.get(feature)
    if k is None:
        raise UnknownFeature(f"{where}: the model has no feature {feature!r}", field=where)
    return k


def _is_number(x: Any) -> bool:
    return type(x) is float or type(x) is int


def _check_dense(dense: Any, width: int, where: str) -> None:
    if not isinstance(dense, list) or len(dense) != width:
        got = f"{len(dense)} values" if isinstance(dense, list) else type(dense).__name__
        raise BadRequest(f"{where} must be a list of {width} numbers, got {got}", field=where)
    if not all(map(_is_number, dense)):
        raise BadRequest(f"{where} must hold numbers only", field=where)


def _dense_array(rows: list[Any], field: str, size: int) -> np.ndarray:
    """float32 ``[size, width]``; one shared row is repeated."""
    dense64 = np.array(rows, dtype=np.float64)
    ok = np.abs(dense64) <= F32_MAX  # False for NaN and +-Infinity too
    if not ok.all():
        bad = int(np.flatnonzero(~ok.all(axis=1))[0])
        where = "context.dense" if len(rows) != size else f"{field}[{bad}].dense"
        raise BadRequest(f"{where} holds NaN or Infinity (or overflows float32)", field=where)
    out = dense64.astype(np.float32)
    return np.repeat(out, size, axis=0) if len(rows) != size else out


def _bounds(got: _Collected, features: int, size: int) -> list[np.ndarray]:
    """Each feature's ``size + 1`` bag bounds. When most (feature, sample) pairs have a bag
    they come from one table; otherwise features no sample names share one read-only array
    of zeros, so a body of many empty samples costs one array, not one per feature."""
    if got.bag_features:
        k = np.array(got.bag_features, np.int64)
        i = np.repeat(np.arange(size), got.sample_bags)
        n = np.array(got.bag_lengths, np.int64)
        if features * (size + 1) <= 2 * k.size + 4096:
            counts = np.zeros((features, size + 1), np.int64)
            counts[k, i + 1] = n
            return list(np.cumsum(counts, axis=1))
    zeros = np.zeros(size + 1, np.int64)
    zeros.flags.writeable = False
    out = [zeros] * features
    if got.bag_features:
        present, row = np.unique(k, return_inverse=True)
        counts = np.zeros((present.size, size + 1), np.int64)
        counts[row, i + 1] = n
        for j, bounds in zip(present.tolist(), np.cumsum(counts, axis=1), strict=True):
            out[j] = bounds
    return out


def _ids(
    got: _Collected,
    names: list[str],
    rows: np.ndarray,
    bounds: list[np.ndarray],
    starts: np.ndarray,
    field: str,
) -> np.ndarray:
    """Every feature's ids as one int64 array, checked by a handful of numpy calls (per
    feature they cost ~15 us each, most of a ranking request's parse on a 64-feature
    model)."""
    flat: list[Any] = []
    for bag_ids in got.ids:
        flat += bag_ids

    def locate(pos: int) -> tuple[str, int]:
        k = int(np.searchsorted(starts, pos, side="right")) - 1
        at = pos - int(starts[k])
        sample = int(np.searchsorted(bounds[k], at, side="right")) - 1
        return f"{field}[{sample}].sparse.{names[k]}", at - int(bounds[k][sample])

    arr = _ids_array(flat, locate)
    limits = np.repeat(rows, np.diff(starts))
    bad = (arr < 0) | (arr >= limits)
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        bag, at = locate(pos)
        fld = f"{bag}[{at}]"
        raise IdOutOfRange(f"{fld}: id {flat[pos]} is outside [0, {int(limits[pos])})", field=fld)
    return arr


def _ids_array(values: list[Any], locate: Callable[[int], tuple[str, int]]) -> np.ndarray:
    """Ids as int64, refusing anything but JSON integers (``locate(pos)`` names the bag of
    position ``pos`` and the position in it). ``array.array`` converts the values in C and
    refuses any that is not an integer, in 2/3 of the time numpy takes to infer their type
    (~15 ns an id); only ids 0 and 1 need a look (``true`` and ``false`` are integers to it),
    and only odd input (a float, a string, a list, an integer past int64) takes the slow
    path."""
    if not values:
        return np.zeros(0, np.int64)
    try:
        arr = np.frombuffer(array("q", values), np.int64)
    except (TypeError, OverflowError):
        arr = None
    if arr is not None:
        suspects = np.flatnonzero((arr == 0) | (arr == 1)).tolist()
        # The suspects' types, gathered and collected in C: skewed ids have thousands. (The
        # extra index 0 makes itemgetter return a tuple even for one suspect.)
        if not suspects or bool not in set(map(type, itemgetter(*suspects, 0)(values))):
            return arr
    for pos, x in enumerate(values):
        if type(x) is not int:
            bag, _ = locate(pos)
            raise BadRequest(f"{bag} must be a list of integer ids", field=bag)
    # Integers past int64: clamp to -1, which the range check reports.
    return np.array([x if -(2**63) <= x < 2**63 else -1 for x in values], dtype=np.int64)


def _weights(got: _Collected, k: int, feature: str, field: str) -> np.ndarray | None:
    w = got.weights[k]
    if w is None:
        return None
    w.extend([1.0] * (len(got.ids[k]) - len(w)))
    arr = np.array(w, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise BadRequest(
            f"{field}: weights of {feature} must be finite", field=f"{field}.weights.{feature}"
        )
    return arr
