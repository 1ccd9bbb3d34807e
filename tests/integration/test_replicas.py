"""Replicas that keep serving: 2 shards x 2 replicas under steady load while a replica of
each shard is killed (SIGKILL), one drained (SIGTERM), both restarted, and one stalled
(SIGSTOP). No request fails, readiness never drops while each
shard has a replica up, and a replica that comes back gets traffic again."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from recserve.cli import main as cli
from recserve.local.cluster import LocalCluster, free_port


class Traffic:
    """Requests one after another on a thread, and readiness polled on another."""

    def __init__(self, url: str, body: bytes) -> None:
        self.url, self.body = url, body
        self.statuses: list[int] = []
        self.ready: list[int] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._poll, daemon=True),
        ]

    def _get(self, req: urllib.request.Request | str) -> int:
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()
                return int(r.status)
        except urllib.error.HTTPError as exc:
            with exc:
                return int(exc.code)

    def _send(self) -> None:
        while not self.stop.is_set():
            req = urllib.request.Request(
                self.url + "/v1/predict",
                data=self.body,
                headers={"Content-Type": "application/json"},
            )
            self.statuses.append(self._get(req))

    def _poll(self) -> None:
        while not self.stop.is_set():
            self.ready.append(self._get(self.url + "/v2/health/ready"))
            time.sleep(0.05)

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


def served_by(url: str, shard: int, replica: int) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    pattern = (
        rf'recserve_gateway_replica_requests_total\{{outcome="ok",replica="{replica}",'
        rf'shard="{shard}"\}} ([0-9.e+]+)'
    )
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.slow
def test_no_request_fails_while_replicas_die_drain_return_and_stall(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "m"
    checkpoint = fixtures_dir / "D1" / "model.pt"
    assert cli(["import", "dlrm", "--checkpoint", str(checkpoint), "--out", str(model)]) == 0
    samples = json.loads((fixtures_dir / "D1" / "batch_17" / "request.json").read_text())
    body = json.dumps({"samples": samples}).encode()
    gateway = ("--timeout-ms", "3000", "--hedge-after-ms", "100")
    with LocalCluster(
        model, shards=2, replicas=2, strategy="capacity", port=free_port(), gateway_args=gateway
    ) as cluster:
        procs = cluster.shards  # shard-major: 0/0, 0/1, 1/0, 1/1
        with Traffic(cluster.url, body) as traffic:
            time.sleep(1.0)
            procs[0].kill()  # kill -9 a replica of shard 0
            procs[0].wait()
            time.sleep(1.5)
            procs[2].send_signal(signal.SIGTERM)  # drain a replica of shard 1
            assert procs[2].wait(20) == 0
            time.sleep(1.5)
            before = served_by(cluster.url, 0, 0)
            for index, (shard, replica) in ((0, (0, 0)), (2, (1, 0))):
                procs[index] = cluster.start_shard(shard, replica)
                cluster.wait_ready(shard, replica, procs[index], 60)
            time.sleep(4.0)  # the probe brings them back once their backoff is over
            assert served_by(cluster.url, 0, 0) > before, "the restarted replica got no traffic"
            procs[3].kill()  # kill -9 the other replica of shard 1
            procs[3].wait()
            time.sleep(1.5)
            procs[1].send_signal(signal.SIGSTOP)  # and stall the other one of shard 0
            time.sleep(2.0)
            procs[1].send_signal(signal.SIGCONT)
            time.sleep(1.0)
    failed = [s for s in traffic.statuses if s != 200]
    assert len(traffic.statuses) > 50 and not failed, (len(traffic.statuses), failed[:10])
    assert traffic.ready and set(traffic.ready) == {200}, sorted(set(traffic.ready))
