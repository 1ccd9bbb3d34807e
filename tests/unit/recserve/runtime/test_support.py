"""Small shared pieces: systemd notifications, JSON logs, byte sizes."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
from pathlib import Path

import pytest

from recserve.contracts.errors import ConfigError
from recserve.contracts.units import format_size, parse_size
from recserve.runtime.logs import JsonFormatter
from recserve.runtime.systemd import Notifier


def test_notifier_without_socket_is_a_no_op() -> None:
    n = Notifier({})
    assert n.ready() is False and n.watchdog_s is None


def test_notifier_path_and_abstract_sockets(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "500000"})
        assert n.watchdog_s == 0.5
        assert n.ready("up") and sock.recv(100) == b"READY=1\nSTATUS=up"
        assert n.ping() and sock.recv(100) == b"WATCHDOG=1"
    name = f"recserve-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert sock.recv(100) == b"STOPPING=1"
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent")}).ready() is False


def test_watchdog_for_another_pid_is_ignored() -> None:
    n = Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog_s is None


def test_json_log_lines_carry_extra_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("recserve.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("shard %d up", 3, extra={"endpoint": "ipc:///x"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines()[:2])
    assert first["msg"] == "shard 3 up" and first["endpoint"] == "ipc:///x"
    assert first["level"] == "warning" and first["logger"] == "recserve.test.json"
    assert "ValueError: boom" in second["exc"]


@pytest.mark.parametrize(
    "text, value",
    [
        ("4096", 4096),
        ("1KiB", 1024),
        ("1.5GiB", 3 * 2**29),
        ("2GB", 2 * 10**9),
        ("512m", 512 << 20),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "1 XB", "-1MiB", "1e3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="not a size"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(512) == "512 B" and format_size(3 << 30) == "3.0 GiB"
