"""Simulated hosts: two shards and a gateway on hosts of their own with 1 ms one way between
them score as the model does, a lookup's round trip takes >= 2 ms, and nothing is left of the
lab afterwards, also when the study is interrupted or one of its servers dies. Root only."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from recserve.cli import main as cli
from recserve.client import columns_of
from recserve.contracts.manifest import read_manifest
from recserve.local import netlab, study
from recserve.local.argv import gateway_argv, shardd_argv
from recserve.local.offline import predict
from recserve.model.scorer import Model
from recserve.model.workload import Workload

pytestmark = pytest.mark.skipif(netlab.available() is not None, reason=str(netlab.available()))

ASK = """
import json, sys, urllib.request
import msgpack
body = open(sys.argv[2], "rb").read()
req = urllib.request.Request(sys.argv[1] + "/v1/predict", data=body,
    headers={"Content-Type": "application/msgpack", "Accept": "application/json"})
print(json.dumps(json.loads(urllib.request.urlopen(req, timeout=30).read())["scores"]))
"""


def root_state() -> tuple[str, str, list[str]]:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    names = [re.sub(r"^\d+: ", "", line).split(":")[0] for line in links.splitlines()]
    labs = [ns for ns in netlab.namespaces() if ns.startswith(netlab.PREFIX)]
    return "\n".join(sorted(names)), qdiscs, labs


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study")
    assert cli(["synth", "--profile", "drm2", "--size", "8MiB", "--out", str(root / "m")]) == 0
    return root / "m"


def test_two_shards_on_their_own_hosts(model: Path, tmp_path: Path) -> None:
    before = root_state()
    setup = study.Setup("netns", 2, 5.0, 8, 1.0, netlab.Link(1000.0, 0.0, 10.0))
    with study.hosts_for(setup, 4) as hosts:
        assert hosts.lab is not None
        assert sum("tbf" in q for q in hosts.lab.qdiscs()) == 8  # both ends of 4 links
        plan = study._plan(model, tmp_path, "capacity", hosts, 2)
        procs = [
            subprocess.Popen(hosts.cmd(k + 2, shardd_argv(plan, model, k, "--preload")))
            for k in range(2)
        ]
        url = f"http://{hosts.addr(study.GATEWAY)}:{study.GATEWAY_PORT}"
        argv = gateway_argv(model, plan=plan, host=hosts.addr(0), port=study.GATEWAY_PORT)
        procs.append(subprocess.Popen(hosts.cmd(study.GATEWAY, argv)))
        try:
            hosts.fetch(url + "/v2/health/ready", timeout=120)
            manifest = read_manifest(model)
            samples = Workload(manifest, seed=4).samples(32)
            features = [f for t in manifest.tables for f in t.features]
            import msgpack

            from recserve.contracts.columns import columns_body

            body = tmp_path / "body.msgpack"
            body.write_bytes(msgpack.packb(columns_body(*columns_of(samples, features))))
            ask = hosts.cmd(study.LOADGEN, [sys.executable, "-c", ASK, url, str(body)])
            got = json.loads(subprocess.run(ask, capture_output=True, check=True).stdout)
            want = predict(Model.open(model), samples)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            metrics = hosts.fetch(url + "/metrics")
            rpc_sum = study._metric(metrics, "recserve_gateway_shard_rpc_seconds_sum")
            rpc_count = study._metric(metrics, "recserve_gateway_shard_rpc_seconds_count")
            assert rpc_count >= 1 and rpc_sum / rpc_count >= 0.002, (rpc_sum, rpc_count)
        finally:
            for p in procs:
                p.terminate()
                p.wait(30)
    assert root_state() == before


@pytest.mark.parametrize("how", ["sigint", "shard-killed"])
def test_study_leaves_nothing_behind(model: Path, tmp_path: Path, how: str) -> None:
    """Interrupted (Ctrl-C) or with a shard killed mid-run, the study exits and removes its
    namespaces, links and qdiscs."""
    before = root_state()
    argv = [sys.executable, "-m", "recserve.cli", "study", "--profiles", "drm2"]
    argv += ["--strategies", "net", "--shards", "2", "--size", "8MiB", "--duration", "8"]
    argv += ["--no-plot", "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tag = f"{netlab.PREFIX}{proc.pid}-"
    try:
        # Wait for the sharded run's load: its lab has the shards' hosts (h2, h3).
        end = time.monotonic() + 240
        while not (
            any(ns.startswith(tag) and ns.endswith("-h3") for ns in netlab.namespaces())
            and in_lab("loadgen")
        ):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
            assert time.monotonic() < end, "the sharded run never started"
            time.sleep(0.1)
        if how == "sigint":
            proc.send_signal(signal.SIGINT)
        else:
            os.kill(in_lab("shardd") or 0, signal.SIGKILL)
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out
    assert root_state() == before, out


def in_lab(name: str) -> int | None:
    """The pid of a process with ``name`` in its command line in another network namespace."""
    mine = os.readlink("/proc/self/ns/net")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            ns = os.readlink(entry / "ns" / "net")
        except OSError:
            continue
        if any(name.encode() in part for part in cmd) and ns != mine:
            return int(entry.name)
    return None
