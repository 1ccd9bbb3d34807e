"""LoopSocket over real ZeroMQ sockets (inproc and tcp on loopback) in one process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from recserve.rpc.loopsocket import BATCH, LoopSocket


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)


def pair(ctx: zmq.Context[Any], name: str) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    server = ctx.socket(zmq.ROUTER)
    server.bind(f"inproc://{name}")
    client = ctx.socket(zmq.DEALER)
    client.connect(f"inproc://{name}")
    return server, client


async def until(cond: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


def test_delivers_queued_and_bursts_and_echoes(ctx: zmq.Context[Any]) -> None:
    """Messages sent before the reader starts, bursts longer than a batch, and replies sent
    from inside the callback (which consume the descriptor's edge) all get through."""
    server, client = pair(ctx, "a")
    n = 3 * BATCH + 5
    for i in range(10):
        client.send_multipart([b"early", str(i).encode()])

    async def main() -> list[bytes]:
        got: list[bytes] = []
        replies: list[bytes] = []
        io: LoopSocket

        def on_message(frames: list[zmq.Frame]) -> None:
            got.append(frames[2].bytes)
            assert io.send([frames[0], b"re", frames[2]])

        io = LoopSocket(server, on_message)
        cio = LoopSocket(client, lambda f: replies.append(f[1].bytes))
        for i in range(n):
            assert cio.send([b"burst", str(i).encode()])
        await until(lambda: len(replies) == n + 10)
        io.close()
        cio.close()
        assert replies == [str(i).encode() for i in range(10)] + [str(i).encode() for i in range(n)]
        return got

    got = asyncio.run(main())
    assert len(got) == n + 10
    server.close(0)
    client.close(0)


def test_a_failing_handler_does_not_stop_the_reader(ctx: zmq.Context[Any]) -> None:
    server, client = pair(ctx, "b")

    async def main() -> list[bytes]:
        got: list[bytes] = []

        def on_message(frames: list[zmq.Frame]) -> None:
            if frames[1].bytes == b"bad":
                raise ValueError("boom")
            got.append(frames[1].bytes)

        io = LoopSocket(server, on_message)
        for body in (b"1", b"bad", b"2"):
            client.send(body)
        await until(lambda: len(got) == 2)
        io.close()
        return got

    assert asyncio.run(main()) == [b"1", b"2"]
    server.close(0)
    client.close(0)


def test_send_waits_for_a_peer_and_close_stops_reading(ctx: zmq.Context[Any]) -> None:
    """A DEALER with IMMEDIATE cannot send before it connects: send says False and
    writable() resolves once the peer is there."""
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.IMMEDIATE, 1)
    server = ctx.socket(zmq.ROUTER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    server.unbind(server.getsockopt_string(zmq.LAST_ENDPOINT))

    async def main() -> list[bytes]:
        got: list[bytes] = []
        cio = LoopSocket(client, lambda f: None)
        sio = LoopSocket(server, lambda f: got.append(f[1].bytes))
        client.connect(f"tcp://127.0.0.1:{port}")
        assert not cio.send([b"too early"])
        waiter = asyncio.ensure_future(cio.writable())
        await asyncio.sleep(0.05)
        assert not waiter.done()
        server.bind(f"tcp://127.0.0.1:{port}")
        async with asyncio.timeout(5):
            await waiter
        assert cio.send([b"hello"])
        await until(lambda: got == [b"hello"])
        sio.close()
        client.send(b"after close")
        await asyncio.sleep(0.05)
        cio.close()
        with pytest.raises(zmq.ZMQError):
            cio.send([b"x"])
        return got

    assert asyncio.run(main()) == [b"hello"]
    server.close(0)
    client.close(0)


def test_a_message_with_a_part_that_is_no_buffer_is_not_sent_at_all(
    ctx: zmq.Context[Any],
) -> None:
    server, client = pair(ctx, "bad")

    async def main() -> list[list[bytes]]:
        got: list[list[bytes]] = []
        io = LoopSocket(server, lambda f: got.append([x.bytes for x in f[1:]]))
        cio = LoopSocket(client, lambda f: None)
        with pytest.raises(TypeError):
            cio.send([b"first", object()])
        assert cio.send([b"next", b"message"])
        await until(lambda: len(got) == 1)
        io.close()
        cio.close()
        return got

    assert asyncio.run(main()) == [[b"next", b"message"]]
    server.close(0)
    client.close(0)
