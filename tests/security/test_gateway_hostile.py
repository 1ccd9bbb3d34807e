"""Hostile clients against a real gateway process: small bodies that would cost a lot,
compressed bodies, stalled bodies, disconnects, KServe sizes that overflow. Each gets a clear
4xx (or is dropped), the gateway's memory stays flat, and a well-formed request sent
meanwhile still gets its reference scores."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest

from recserve.cli import main as cli
from recserve.local.argv import gateway_argv
from recserve.local.cluster import free_port

FIXTURE = "D1"
MAX_CONNECTIONS = 8


@pytest.fixture(scope="module")
def gateway(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("hostile")
    model = root / "model"
    checkpoint = fixtures_dir / FIXTURE / "model.pt"
    assert cli(["import", "dlrm", "--checkpoint", str(checkpoint), "--out", str(model)]) == 0
    port = free_port()
    log = root / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            gateway_argv(
                model,
                *("--body-timeout-s", "1", "--header-timeout-s", "1"),
                *("--max-connections", str(MAX_CONNECTIONS), "--log-json"),
                port=port,
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < end, log.read_text()
            time.sleep(0.1)
        yield url, proc, log
    finally:
        proc.terminate()
        proc.wait(20)


def peak_rss_mib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) // 1024  # type: ignore[union-attr]


def reference(fixtures_dir: Path) -> tuple[list[Any], np.ndarray]:
    batch = fixtures_dir / FIXTURE / "batch_17"
    samples = json.loads((batch / "request.json").read_text())
    return samples, np.load(fixtures_dir / FIXTURE / "expected_17.npy")[:, 0]


async def post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, Any]:
    async with session.post(url, data=body, headers=headers) as r:
        raw = await r.read()
        if r.content_type == "application/msgpack":
            return r.status, msgpack.unpackb(raw)
        return r.status, json.loads(raw) if raw else None


JSON = {"Content-Type": "application/json"}
MSGPACK = {"Content-Type": "application/msgpack"}
SMALL_BUT_COSTLY = [
    (json.dumps({"samples": [0] * 100_000}).encode(), JSON, 413),
    (msgpack.packb({"samples": [0] * 100_000}), MSGPACK, 413),
    (json.dumps({"context": {"dense": [0] * 13}, "candidates": [{}] * 60_000}).encode(), JSON, 413),
    (gzip.compress(json.dumps({"samples": [{"dense": [0] * 13}] * 3}).encode()), 0, 415),
]


def test_costly_bodies_are_refused_and_memory_stays_flat(gateway, fixtures_dir: Path) -> None:
    url, proc, _ = gateway
    samples, want = reference(fixtures_dir)

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            predict = url + "/v1/predict"
            await post(session, predict, json.dumps({"samples": samples}).encode(), JSON)
            before = peak_rss_mib(proc.pid)
            good = post(session, predict, json.dumps({"samples": samples}).encode(), JSON)

            async def hostile() -> list[tuple[int, Any]]:
                out = []
                for _ in range(5):
                    for body, headers, _status in SMALL_BUT_COSTLY:
                        if headers == 0:
                            headers = {**JSON, "Content-Encoding": "gzip"}
                        out.append(await post(session, predict, body, headers))
                return out

            (status, doc), refused = await asyncio.gather(good, hostile())
            assert status == 200
            np.testing.assert_allclose(doc["scores"], want, atol=1e-5)
            expected = [s for _ in range(5) for *_, s in SMALL_BUT_COSTLY]
            assert [s for s, _ in refused] == expected, refused
            for _, doc in refused:
                assert doc["error"]["kind"] in ("too_large", "unsupported_encoding")
            growth = peak_rss_mib(proc.pid) - before
            # Each body decodes to at most ~5 MB of Python objects; before the limits were
            # checked first, one 0.2 MB body of zeros made the gateway grow ~75 MB.
            assert growth < 20, f"peak RSS grew {growth} MiB"

    asyncio.run(run())


def test_kserve_sizes_that_overflow_are_400(gateway) -> None:
    url, _, _ = gateway
    bodies = [
        {"inputs": [{"name": "dense", "datatype": "FP32", "shape": [2**32, 2**32], "data": []}]},
        {
            "inputs": [
                {"name": "dense", "datatype": "FP32", "shape": [4, 13], "data": [0] * 52},
                {"name": "0.values", "datatype": "INT64", "shape": [0], "data": []},
                {"name": "0.lengths", "datatype": "INT64", "shape": [4], "data": [2**62] * 4},
            ]
        },
    ]

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/v1/model") as r:
                name = (await r.json())["name"]
            for body in bodies:
                status, doc = await post(
                    session,
                    f"{url}/v2/models/{name}/infer",
                    json.dumps(body).encode(),
                    JSON,
                )
                assert status == 400 and isinstance(doc["error"], str), doc

    asyncio.run(run())


def test_a_stalled_body_gets_408_and_a_gone_client_is_499(gateway) -> None:
    url, _, log = gateway
    port = int(url.rsplit(":", 1)[1])
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        start = time.monotonic()
        reply = sock.recv(4096).decode(errors="replace")
        assert reply.startswith("HTTP/1.1 408"), reply
        assert time.monotonic() - start < 5
        assert '"request_timeout"' in reply
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)  # and leave before the body arrives
    time.sleep(0.3)
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert re.search(
        r'recserve_gateway_requests_total\{route="/v1/predict",status="499"\}', metrics
    )
    assert "Traceback" not in log.read_text()


def test_embeddings_are_off_unless_enabled(gateway, fixtures_dir: Path) -> None:
    url, _, _ = gateway
    samples, _ = reference(fixtures_dir)
    body = json.dumps({"samples": samples}).encode()
    req = urllib.request.Request(url + "/v1/embeddings", data=body, headers=JSON)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    assert info.value.code == 404
    info.value.close()


def test_headers_that_never_end_are_cut_off(gateway) -> None:
    url, _, _ = gateway
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")  # and no more
        start = time.monotonic()
        assert sock.recv(4096) == b""  # closed by the gateway
        assert time.monotonic() - start < 5


def test_connections_past_the_limit_get_503(gateway) -> None:
    url, _, _ = gateway
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    try:
        time.sleep(0.2)
        refused = 0
        for sock in idle:
            sock.setblocking(False)
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue  # held open: one of the allowed connections
            if data:
                assert data.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in data, data
                refused += 1
        assert 20 - MAX_CONNECTIONS <= refused < 20
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    with urllib.request.urlopen(url + "/v2/health/ready", timeout=5) as r:
        assert r.status == 200  # and the gateway serves again once they are gone


def test_sigterm_does_not_wait_for_stalled_clients(gateway) -> None:
    """Last in this module: it stops the gateway. A client stalled mid-body does not hold
    the shutdown (the body deadline answers it 408), and nothing was logged as an error."""
    url, proc, log = gateway
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        time.sleep(0.2)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert time.monotonic() - start < 12
    text = log.read_text()
    errors = [line for line in text.splitlines() if '"level":"error"' in line]
    assert not errors, errors
    assert "Logging error" not in text and '"msg":"ready"' in text  # readiness logged cleanly
