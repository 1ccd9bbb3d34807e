"""Helpers to run real shard daemons in tests: start, wait until healthy, stop, talk."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import zmq

from recserve.local.argv import shardd_argv
from recserve.local.cluster import free_port  # noqa: F401 - the tests' import point
from recserve.rpc.curve import CurveKeys
from recserve.rpc.deadline import Deadline
from recserve.rpc.probe import ready
from recserve.rpc.wire import pack_header, request


def shard_cmd(plan: Path, model: Path, shard: int, endpoint: str, *extra: str) -> list[str]:
    return shardd_argv(plan, model, shard, *extra, bind=endpoint)


def start_shard(
    plan: Path,
    model: Path,
    shard: int,
    endpoint: str,
    *extra: str,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> subprocess.Popen:
    cmd = shard_cmd(plan, model, shard, endpoint, "--log-json", *extra)
    env = {**os.environ, **(env or {})}
    if log is None:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def raw(
    endpoint: str, frames: Sequence[Any], timeout: float = 5.0, keys: CurveKeys | None = None
) -> list[bytes]:
    """One request on a fresh DEALER (CURVE with client ``keys``); the reply's frames
    (raises on timeout)."""
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.secure_client(sock)
        sock.connect(endpoint)
        sock.send_multipart(list(frames))
        if not sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no reply from {endpoint}")
        return sock.recv_multipart()


def header(op: str, req_id: int = 1, **fields: Any) -> bytes:
    return pack_header(request(op, req_id, Deadline.after(10_000).at_ms, **fields))


def wait_healthy(endpoint: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"shard daemon exited with {proc.returncode}")
        if ready(endpoint):
            return
    raise TimeoutError(f"{endpoint} not healthy after {timeout} s")


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def running(
    plan: Path,
    model: Path,
    shard: int,
    endpoint: str,
    *extra: str,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    proc = start_shard(plan, model, shard, endpoint, *extra, env=env)
    try:
        wait_healthy(endpoint, proc)
        yield proc
    finally:
        stop(proc)
