"""A small body cannot make request parsing allocate much more than the decoded body itself
(traced with tracemalloc, which sees numpy's buffers too)."""

from __future__ import annotations

import contextlib
import sys
import tracemalloc
from typing import Any

import orjson
import pytest

from gateway.requests import parse_request
from recserve.contracts.errors import BadRequest
from recserve.contracts.manifest import TableSpec
from recserve.contracts.samples import Limits
from tests.models import manifest_of

# The demo's shape: 64 features, dense width 32.
M = manifest_of(tuple(TableSpec(f"t{i}", 1000, 32, features=(f"f{i}",)) for i in range(64)), 32)
GATEWAY_LIMITS = Limits(max_samples=8192, max_ids=4_000_000)
DENSE = [0.5] * 32


def deep_size(value: Any) -> int:
    """Bytes of a decoded JSON document: containers, strings and numbers."""
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(deep_size(k) + deep_size(v) for k, v in value.items())
    elif isinstance(value, list):
        size += sum(deep_size(v) for v in value)
    return size


def peak_of(doc: Any) -> int:
    tracemalloc.start()
    with contextlib.suppress(BadRequest):
        parse_request(doc, M, GATEWAY_LIMITS)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


@pytest.mark.parametrize(
    "body",
    [
        {"samples": [0] * 100_000},  # 0.2 MB of JSON; before: ~75 MB allocated
        {"samples": [{}] * 8192},
        {"context": {"dense": DENSE}, "candidates": [{}] * 8192},
        {"context": {"dense": DENSE}, "candidates": [{}] * 60_000},
        {"samples": [{"dense": DENSE, "sparse": {"f1": [1] * 50}}] * 4000},
    ],
    ids=["zeros", "empty-samples", "empty-candidates", "too-many-candidates", "normal"],
)
def test_parsing_allocates_a_small_multiple_of_the_decoded_body(body: Any) -> None:
    decoded = orjson.loads(orjson.dumps(body))  # what the gateway holds after decoding
    peak = peak_of(decoded)
    assert peak <= 3 * deep_size(decoded) + (1 << 20), (peak, deep_size(decoded))
