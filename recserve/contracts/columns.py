"""The columnar request form of ``/v1/predict`` and ``/v1/embeddings``: arrays, not samples.

::

    {"columns": {"dense": D, "sparse": {"<feature>": {"values": I, "lengths": L}}},
     "timeout_ms": 200}

``D`` is ``[B, dense_width]`` floats, ``I`` a feature's ids of all samples concatenated and
``L`` its ``B`` bag lengths (as KServe v2's ``<feature>.values`` / ``.lengths``); a feature
left out is empty bags. Each array is a JSON list (``D`` nested or flat), or in msgpack a
typed array ``{"dtype": "<f4" | "<i8" | "<i4", "shape": [...], "data": <bin>}`` holding the
little-endian values: decoding it is one ``np.frombuffer``, no per-value work. Per-id weights
need the sample form.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from recserve.contracts.errors import BadRequest

DTYPES: dict[str, np.dtype[Any]] = {
    "<f4": np.dtype("<f4"),
    "<i8": np.dtype("<i8"),
    "<i4": np.dtype("<i4"),
}
_TYPED_KEYS = frozenset({"dtype", "shape", "data"})


def typed(array: np.ndarray) -> dict[str, Any]:
    """``array`` as a msgpack typed array (the encoder's side); ``data`` is a view of the
    array's bytes, which msgpack packs as a bin without copying them first."""
    arr = np.ascontiguousarray(array)
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    if dtype.str not in DTYPES:
        raise ValueError(f"typed arrays are float32, int64 or int32, not {arr.dtype}")
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    return {"dtype": dtype.str, "shape": list(arr.shape), "data": arr.data.cast("B")}


def narrow_ids(ids: Any) -> np.ndarray:
    """``ids`` as int32 when every one fits (half the bytes to send, read and copy; tables
    of fewer than 2**31 rows), else int64."""
    arr = np.asarray(ids)
    if arr.dtype == np.int32:
        return arr
    arr = np.asarray(arr, np.int64)
    if arr.size == 0 or 0 <= np.bitwise_or.reduce(arr) < 2**31:  # one pass: ids are >= 0
        return arr.astype(np.int32)
    if arr.min() < -(2**31) or arr.max() >= 2**31:
        return arr
    return arr.astype(np.int32)


def columns_body(
    dense: np.ndarray, sparse: Mapping[str, tuple[np.ndarray, np.ndarray]], **extra: Any
) -> dict[str, Any]:
    """A columnar request document of typed arrays, for msgpack; ids as int32 where they
    fit (``narrow_ids``)."""
    return {
        "columns": {
            "dense": typed(np.asarray(dense, np.float32)),
            "sparse": {
                f: {"values": typed(narrow_ids(v)), "lengths": typed(np.asarray(n))}
                for f, (v, n) in sparse.items()
            },
        },
        **extra,
    }


def decode_array(value: Any, field: str, *, floats: bool, max_items: int) -> np.ndarray:
    """A list or typed array as numpy (float32 or int64 wanted), checked before it is
    built: at most ``max_items`` values."""
    if isinstance(value, dict):
        if value.keys() != _TYPED_KEYS:
            raise BadRequest(
                f"{field} must be a list or a typed array {{dtype, shape, data}}", field=field
            )
        dtype = DTYPES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
        shape, data = value["shape"], value["data"]
        if dtype is None or (dtype.kind == "f") != floats:
            want = "<f4" if floats else "<i8 or <i4"
            raise BadRequest(f"{field}.dtype must be {want}", field=f"{field}.dtype")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise BadRequest(f"{field}.shape must be a list of sizes", field=f"{field}.shape")
        count = math.prod(shape)  # Python integers: no wrap-around
        if not isinstance(data, bytes) or len(data) != count * dtype.itemsize:
            raise BadRequest(
                f"{field}.data must be {count} little-endian {dtype} values in a bin",
                field=f"{field}.data",
            )
        if count > max_items:
            raise BadRequest(f"{field} holds more than {max_items} values", field=field)
        return np.frombuffer(data, dtype).reshape(shape)
    if not isinstance(value, list):
        raise BadRequest(f"{field} must be a list or a typed array", field=field)
    if len(value) > max_items:
        raise BadRequest(f"{field} holds more than {max_items} values", field=field)
    return _from_list(value, field, floats)


def _from_list(value: list[Any], field: str, floats: bool) -> np.ndarray:
    """JSON numbers only: numpy infers the type in C; ``true``/``false`` would pass as 1/0,
    so only values equal to 0 or 1 get a look at their Python type."""
    kind = "numbers" if floats else "integer ids"
    try:
        arr = np.array(value)
    except (ValueError, TypeError):  # ragged nesting
        arr = None
    if arr is not None and arr.size == 0 and arr.ndim == 1:
        return np.zeros(0, np.float64 if floats else np.int64)
    allowed = ("i", "f") if floats else ("i",)
    if arr is None or arr.dtype.kind not in allowed or arr.ndim > (2 if floats else 1):
        raise BadRequest(f"{field} must hold {kind} only", field=field)
    flat = arr.reshape(-1)
    suspects = np.flatnonzero((flat == 0) | (flat == 1))
    if suspects.size:
        items = [x for row in value for x in row] if arr.ndim == 2 else value
        if any(type(items[i]) is bool for i in suspects.tolist()):
            raise BadRequest(f"{field} must hold {kind} only", field=field)
    return arr.astype(np.float64 if floats else np.int64, copy=False)
