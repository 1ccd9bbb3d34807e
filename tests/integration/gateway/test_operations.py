"""Operating the gateway: model info, health, metrics, a dead shard, drain, start-up checks."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import aiohttp

from gateway.config import GatewayConfig
from recserve.local.argv import gateway_argv
from tests.integration.gateway.helpers import post, serve
from tests.integration.shards import start_shard, stop, wait_healthy
from tests.promtool import check_metrics


def test_model_health_and_metrics(deployments) -> None:
    model, plan = deployments["D4_torchrec"]

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url + "/v1/model") as r:
            doc = await r.json()
        assert doc["dense_width"] == 13 and [f["name"] for f in doc["features"]] == [
            "0",
            "1",
            "2",
            "3",
        ]
        assert doc["plan"] == {
            "mode": "sharded",
            "strategy": "capacity",
            "shards": 3,
            "replicas": 1,
        }
        async with session.get(url + "/v2/health/live") as r:
            assert r.status == 200
        await post(session, url, {"samples": [{"dense": [0.0] * 13}]})
        async with session.get(url + "/metrics") as r:
            text = await r.text()
        assert 'recserve_gateway_requests_total{route="/v1/predict",status="200"}' in text
        assert "recserve_gateway_pooling_seconds_bucket" in text
        for shard in range(3):
            assert f'recserve_gateway_shard_rpc_seconds_count{{shard="{shard}"}} 1.0' in text
            # The shards listen on ipc://: the lookups went through shared memory.
            assert f'recserve_gateway_shm_lookups_total{{shard="{shard}"}} 1.0' in text
            # And pooled its features straight into the batch's array.
            assert f'recserve_gateway_into_lookups_total{{shard="{shard}"}} 1.0' in text
            # The shard's own account of the lookup: part of the round trip, not more.
            assert f'recserve_gateway_shard_work_seconds_count{{shard="{shard}"}} 1.0' in text
            work, rpc = (
                float(re.search(rf'^recserve_gateway_shard_{m}_seconds_sum{{shard="{shard}"}} '
                                r"(\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
                for m in ("work", "rpc")
            )  # fmt: skip
            assert 0 < work < rpc
        assert "recserve_gateway_shards_contacted_count 1.0" in text
        assert "recserve_gateway_request_seconds_count 1.0" in text  # the predict, not /v1/model
        assert 'recserve_gateway_shard_bytes_total{direction="received"}' in text
        for stage in ("parse", "assembly", "merge", "dense"):  # CPU the request took in each
            found = re.search(
                rf'^recserve_gateway_stage_cpu_seconds_total{{stage="{stage}"}} (\S+)$', text, re.M
            )
            assert found and float(found.group(1)) > 0, stage
        check_metrics(text)

    asyncio.run(serve(GatewayConfig(model=model, plan=plan, port=0), check))


def test_dead_shard_is_503_naming_it_within_the_deadline_then_recovers(
    deployments, tmp_path: Path
) -> None:
    model, plan_path = deployments["D3"]
    doc = json.loads(plan_path.read_text())
    for s in doc["shards"]:
        s["endpoints"] = [f"ipc://{tmp_path}/{s['id']}.sock"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(doc))
    procs = [start_shard(plan, model, s["id"], s["endpoints"][0]) for s in doc["shards"]]
    try:
        for s, p in zip(doc["shards"], procs, strict=True):
            wait_healthy(s["endpoints"][0], p)
        sample = {"dense": [0.1] * 13, "sparse": {"0": [1], "1": [3], "2": [5]}}

        async def check(session: aiohttp.ClientSession, url: str) -> None:
            status, before, _ = await post(session, url, {"samples": [sample]})
            assert status == 200
            procs[1].kill()
            procs[1].wait()
            start = asyncio.get_running_loop().time()
            status, body, headers = await post(
                session, url, {"samples": [sample], "timeout_ms": 300}
            )
            elapsed = asyncio.get_running_loop().time() - start
            assert status == 503, body
            assert "shard 1/0" in body["error"]["message"] and "Retry-After" in headers
            assert elapsed < 1.5
            async with asyncio.timeout(10):  # readiness notices too
                while True:
                    async with session.get(url + "/v2/health/ready") as r:
                        if r.status == 503:
                            break
                    await asyncio.sleep(0.2)
            # The shard comes back on the same endpoint: the client reconnects by itself.
            endpoint = doc["shards"][1]["endpoints"][0]
            procs[1] = start_shard(plan, model, 1, endpoint)
            await asyncio.get_running_loop().run_in_executor(None, wait_healthy, endpoint, procs[1])
            async with asyncio.timeout(15):
                while True:
                    status, body, _ = await post(session, url, {"samples": [sample]})
                    if status == 200:
                        assert body["scores"] == before["scores"]
                        break
                    assert status == 503, body
                    await asyncio.sleep(0.2)
                while True:
                    async with session.get(url + "/v2/health/ready") as r:
                        if r.status == 200:
                            break
                    await asyncio.sleep(0.2)

        asyncio.run(serve(GatewayConfig(model=model, plan=plan, port=0), check))
    finally:
        for p in procs:
            stop(p)


def test_gateway_process_drains_on_sigterm(deployments, tmp_path: Path) -> None:
    import signal
    import subprocess
    import urllib.error
    import urllib.request

    from tests.integration.shards import free_port

    model, _ = deployments["D1"]
    port = free_port()
    proc = subprocess.Popen(
        gateway_argv(model, "--max-queue-delay-us", "200000", port=port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass

            time.sleep(0.05)
        sample = {"dense": [0.0] * 13, "sparse": {"0": [1]}}

        async def run() -> list[int]:
            async with aiohttp.ClientSession() as session:
                tasks = [
                    asyncio.ensure_future(post(session, url, {"samples": [sample] * 5}))
                    for _ in range(8)
                ]
                await asyncio.sleep(0.05)  # queued: the batcher waits up to 200 ms
                proc.send_signal(signal.SIGTERM)
                return [r[0] for r in await asyncio.gather(*tasks)]

        assert asyncio.run(run()) == [200] * 8
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_batch_limits_are_checked_at_start(tmp_path: Path, capsys) -> None:
    from gateway.main import main

    for flag, value in (("--max-concurrent-batches", "0"), ("--max-batch-samples", "0")):
        code = main(["--model", str(tmp_path), "--singular", flag, value])
        assert code == 2 and "must be >= 1" in capsys.readouterr().err


def test_blas_choice_is_checked_at_start(tmp_path: Path, capsys) -> None:
    from gateway.main import main

    for args, says in (
        (["--blas", "atlas"], "--blas must be one of auto, mkl, openblas"),
        (["--blas", "mkl", "--blas-threads", "2"], "--blas-threads must be 1"),
    ):
        assert main(["--model", str(tmp_path), "--singular", *args]) == 2
        assert says in capsys.readouterr().err
