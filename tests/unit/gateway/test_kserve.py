"""KServe v2 infer bodies to batches: JSON and binary tensors, and bodies that must be 400s
(sizes that overflow int64, lengths that wrap around) rather than 500s."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from gateway.config import ApiSettings, GatewayConfig
from gateway.kserve import parse_infer
from gateway.state import Gateway
from recserve.contracts.errors import BadRequest, TooLarge
from recserve.rpc.deadline import now_ms
from tests.models import tiny_manifest

M = tiny_manifest()


def gateway() -> Gateway:
    config = GatewayConfig(model=None, plan=None)  # type: ignore[arg-type]
    return Gateway(config, M, None, None, None, None, None)  # type: ignore[arg-type]


def body(*inputs: dict[str, Any], **params: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs), "parameters": params})


DENSE = {"name": "dense", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}


def test_json_tensors() -> None:
    doc = body(
        DENSE,
        {"name": "fa.values", "datatype": "INT64", "shape": [3], "data": [1, 2, 9]},
        {"name": "fa.lengths", "datatype": "INT32", "shape": [2], "data": [2, 1]},
    )
    batch, _, binary = parse_infer(doc, None, gateway(), now_ms())
    assert not binary
    np.testing.assert_array_equal(batch.dense, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(batch.bags["fa"].ids, [1, 2, 9])
    np.testing.assert_array_equal(batch.bags["fa"].bounds, [0, 2, 3])
    np.testing.assert_array_equal(batch.bags["fb"].bounds, [0, 0, 0])


def tensors(feature: str, ids: list[int], lengths: list[int], kind: str = "INT64") -> list:
    return [
        {"name": f"{feature}.values", "datatype": kind, "shape": [len(ids)], "data": ids},
        {"name": f"{feature}.lengths", "datatype": "INT32", "shape": [len(lengths)],
         "data": lengths},
    ]  # fmt: skip


@pytest.mark.parametrize("kinds", [("INT32", "INT32"), ("INT32", "INT64"), ("INT64", "INT64")])
def test_features_checked_together_keep_their_bags(kinds: tuple[str, str]) -> None:
    """Every feature's ids and bounds as sent, a feature not sent empty; ids stay int32 when
    every feature sent int32."""
    doc = body(DENSE, *tensors("fc", [6, 0, 5], [1, 2], kinds[0]),
               *tensors("fa", [9, 8], [0, 2], kinds[1]))  # fmt: skip
    batch, _, _ = parse_infer(doc, None, gateway(), now_ms())
    assert list(batch.bags) == ["fa", "fb", "fc"]  # the manifest's order
    for feature, ids, bounds in [("fa", [9, 8], [0, 0, 2]), ("fb", [], [0, 0, 0]),
                                 ("fc", [6, 0, 5], [0, 1, 3])]:  # fmt: skip
        np.testing.assert_array_equal(batch.bags[feature].ids, ids)
        np.testing.assert_array_equal(batch.bags[feature].bounds, bounds)
    wanted = np.int32 if kinds == ("INT32", "INT32") else np.int64
    assert batch.bags["fa"].ids.dtype == batch.bags["fc"].ids.dtype == wanted


def test_binary_tensors() -> None:
    dense = np.arange(6, dtype="<f4")
    values, lengths = np.array([4, 6], "<i8"), np.array([0, 2], "<i4")
    tensors = [
        ("dense", "FP32", [2, 3], dense),
        ("fb.values", "INT64", [2], values),
        ("fb.lengths", "INT32", [2], lengths),
    ]
    head = body(
        *(
            {"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": a.nbytes}}
            for n, d, s, a in tensors
        ),
        binary_data_output=True,
    )
    raw = head + b"".join(a.tobytes() for *_, a in tensors)
    batch, _, binary = parse_infer(raw, len(head), gateway(), now_ms())
    assert binary
    np.testing.assert_array_equal(batch.bags["fb"].ids, [4, 6])
    np.testing.assert_array_equal(batch.bags["fb"].bounds, [0, 0, 2])


@pytest.mark.parametrize(
    "inputs, field",
    [
        # 2**32 * 2**32 wraps to 0 in int64
        ([{**DENSE, "shape": [2**32, 2**32], "data": []}], "dense"),
        # lengths whose int64 sum wraps around to the number of values (0)
        (
            [
                {**DENSE, "shape": [4, 3], "data": [0] * 12},
                {"name": "fa.values", "datatype": "INT64", "shape": [0], "data": []},
                {"name": "fa.lengths", "datatype": "INT64", "shape": [4], "data": [2**62] * 4},
            ],
            "fa.lengths",
        ),
        (
            [
                DENSE,
                {"name": "fa.values", "datatype": "INT64", "shape": [1], "data": [1]},
                {"name": "fa.lengths", "datatype": "INT32", "shape": [2], "data": [-1, 2]},
            ],
            "fa.lengths",
        ),
        (
            [
                DENSE,
                {"name": "zz.values", "datatype": "INT64", "shape": [0], "data": []},
                {"name": "zz.lengths", "datatype": "INT32", "shape": [2], "data": [0, 0]},
            ],
            "zz",
        ),
        # the second feature's second id is past its table's 7 rows (the first's are fine)
        (
            [
                DENSE,
                *tensors("fa", [1, 9], [1, 1], "INT32"),
                *tensors("fb", [0, 7], [2, 0], "INT32"),
            ],
            "fb.values[1]",
        ),
        ([DENSE, *tensors("fc", [3, -1], [0, 2], "INT32")], "fc.values[1]"),  # negative
        ([DENSE, *tensors("fc", [3, -1], [0, 2], "INT64")], "fc.values[1]"),
        ([DENSE, *tensors("fa", [1, 2, 3], [1, 1], "INT32")], "fa.values"),  # lengths add to 2
        ([DENSE, *tensors("fa", [1], [1, 0]), {**tensors("fb", [1], [1])[0]}], "fb.lengths"),
    ],
)
def test_bad_tensors_are_bad_requests(inputs: list[dict[str, Any]], field: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_infer(body(*inputs), None, gateway(), now_ms())
    assert info.value.field == field


def test_limits_apply_before_the_batch_is_built() -> None:
    gw = gateway()
    gw.config = GatewayConfig(model=None, plan=None, api=ApiSettings(max_request_samples=1))  # type: ignore[arg-type]
    with pytest.raises(TooLarge):
        parse_infer(body(DENSE), None, gw, now_ms())
