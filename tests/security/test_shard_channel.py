"""A peer that reaches a shard cannot make it take or build more than its limits: frames
over ``--max-message-bytes`` drop the peer, lookups whose reply would pass
``--max-reply-bytes`` are ``too_large``, and the daemon keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import zmq

from recserve.contracts.plan import local_endpoints
from recserve.local.cluster import free_port
from recserve.planning import build
from recserve.rpc.deadline import Deadline
from recserve.rpc.probe import ready
from recserve.rpc.wire import PartRequest, encode_lookup
from tests.integration.shards import raw, running
from tests.models import tiny_manifest, write_random


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("channel")
    manifest = write_random(root / "m", tiny_manifest())
    (root / "plan.json").write_bytes(
        build(manifest, 1, "capacity", local_endpoints(1, 1)).to_json()
    )
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    limits = ["--max-message-bytes", "65536", "--max-reply-bytes", "100000"]
    with running(root / "plan.json", root / "m", 0, endpoint, "--preload", *limits):
        yield endpoint


def lookup_frames(bags: int) -> list[object]:
    lengths = np.zeros(bags, np.int32)  # empty bags: tiny to send, dim floats each to answer
    part = PartRequest("b", 0, bags)  # table b: dim 2
    return encode_lookup(1, Deadline.after(5000).at_ms, [part], np.zeros(0, np.int64), lengths)


def test_a_reply_over_the_limit_is_too_large(shard: str) -> None:
    ok = msgpack.unpackb(raw(shard, lookup_frames(1000))[0])  # 1000 x 2 floats: fine
    assert ok["ok"], ok
    # 60 KB of lengths asking for 15,000 bags x 2 floats = 120 KB of reply: over 100,000 B.
    refused = msgpack.unpackb(raw(shard, lookup_frames(15_000))[0])
    assert not refused["ok"] and refused["error"]["kind"] == "too_large", refused
    assert ready(shard)


def test_a_frame_over_the_limit_drops_the_peer(shard: str) -> None:
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(shard)
        sock.send_multipart(lookup_frames(20_000))  # an 80 KB lengths frame
        assert not sock.poll(1000), "the shard answered a frame over its limit"
    assert ready(shard, 2.0)  # and still serves everyone else
