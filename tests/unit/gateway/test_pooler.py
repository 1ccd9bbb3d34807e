"""The gateway packs one shard's parts into wire frames."""

from __future__ import annotations

import numpy as np

from gateway.routing import ShardRequest
from recserve.rpc.wire import PartRequest


def request(narrow: bool) -> ShardRequest:
    req = ShardRequest(narrow=narrow)
    for name, ids, lengths, weights in (
        ("a", np.array([5, 2**31 - 1, 0]), np.array([2, 1]), None),
        ("b", np.array([7]), np.array([0, 1]), np.array([0.5], np.float32)),
    ):
        req.parts.append(PartRequest(name, 0, len(lengths)))
        req.ids.append(ids.astype(np.int64))
        req.lengths.append(lengths.astype(np.int64))
        req.weights.append(weights)
    return req


def test_ids_travel_as_int32_when_every_table_fits() -> None:
    ids, lengths, weights = request(narrow=True).frames()
    assert ids.dtype == np.int32 and ids.tolist() == [5, 2**31 - 1, 0, 7]
    assert lengths.dtype == np.int32 and lengths.tolist() == [2, 1, 0, 1]
    assert weights is not None and weights.tolist() == [1.0, 1.0, 1.0, 0.5]


def test_ids_stay_int64_for_a_table_past_int32() -> None:
    ids, _, weights = request(narrow=False).frames()
    assert ids.dtype == np.int64 and ids.tolist() == [5, 2**31 - 1, 0, 7]
    assert weights is not None
