"""Online updates under serving load: rows applied per second, commit latency, and what the
updates cost the requests being served, in one run.

A ``drm2`` model on a 4-shard local cluster (the demo's shape); after ``--warmup`` s of load
and pushes (not measured), loadgen's open-loop load at ``--rate`` requests/s for
``--duration`` s in ``--rounds`` alternating pairs: alone, then while a client pushes
updates of ``--rows`` rows (spread over random tables) through ``POST /v1/updates`` (back
to back or paced at ``--rows-per-s``), to the gateway's admin worker (``--admin-port``;
``--intake serving``: to the serving gateway itself); then once more with the updates
applied and none arriving. Printed: rows/s applied, commit latency P50/P99
(arrival to commit on every replica), serving P50/P99 of each phase and the median of the
rounds' P99 ratios, failed requests and updates, the CPU each process added, where the tail
grows (the serving gateway's stage and shard-RPC histograms with and without updates), the
bytes compaction wrote, and whether every committed version reached every shard (none
lost).

    python -m benchmarks.bench_updates [--size 256MiB] [--rate 20] [--duration 30] [--rows 10000]
        [--rows-per-s 0] [--compact-at 0.1] [--rounds 3] [--warmup 10] [--intake admin|serving]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
from hdrh.histogram import HdrHistogram

from benchmarks.common import histograms, print_table, run_cli, tail
from loadgen.runner import MAX_US
from recserve.contracts.manifest import read_manifest
from recserve.local.argv import loadgen_argv
from recserve.local.cluster import LocalCluster, cpu_seconds, free_port
from tests.integration.shards import header, raw

TOKEN = "bench-updates-token-0123456789abcdef"
BODIES = 100
TAIL_MS = 10.0  # a bucket bound of the gateway's histograms
TAIL_STAGES = ("request", "queue_wait", "pooling", "dense", "shard_rpc", "shard_work")


def update_body(rng: np.random.Generator, tables: list, rows: int) -> bytes:
    """An .npz of ``rows`` new rows spread over a few random tables (distinct ids each)."""
    picked = rng.choice(len(tables), min(4, len(tables)), replace=False)
    arrays = {}
    left = rows
    for k, i in enumerate(picked):
        t = tables[i]
        n = min(t.rows, left if k == len(picked) - 1 else rows // len(picked))
        ids = rng.choice(t.rows, n, replace=False).astype(np.int64)
        arrays[f"{t.name}.ids"] = ids
        arrays[f"{t.name}.rows"] = rng.standard_normal((n, t.dim)).astype(np.float32)
        left -= n
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def load(url: str, model: Path, rate: float, duration: float, out: Path) -> dict:
    argv = loadgen_argv(url, "--model", str(model), "--qps", str(rate))
    argv += ["--duration", str(duration), "--quiet", "--format", "columns", "--report", str(out)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    run: dict = json.loads(out.read_text())["runs"][0]
    return run


def pooled_p99(runs: list[dict]) -> float:
    """The P99 (ms) of every request of ``runs`` (loadgen reports), from their histograms."""
    total = HdrHistogram(1, MAX_US, 3)
    for r in runs:
        total.add(HdrHistogram.decode(r["histogram_us"]))
    return float(total.get_value_at_percentile(99)) / 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256MiB")
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument(
        "--rows-per-s", type=float, default=0.0,
        help="push at this rate of rows (0: each push right after the last one's reply)",
    )  # fmt: skip
    parser.add_argument("--compact-at", default="0.1", help="the shards' --compact-at")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument(
        "--warmup", type=float, default=10.0,
        help="seconds of load and pushes before the rounds, not measured",
    )  # fmt: skip
    parser.add_argument(
        "--intake", choices=("admin", "serving"), default="admin",
        help="updates to the gateway's admin worker (--admin-port) or its serving process",
    )  # fmt: skip
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-updates-") as tmp:
        root = Path(tmp)
        model = root / "m"
        run_cli(["synth", "--profile", "drm2", "--size", args.size, "--seed", "1",
                 "--out", str(model)])  # fmt: skip
        token = root / "token"
        token.write_text(TOKEN)
        tables = list(read_manifest(model).tables)
        cluster = LocalCluster(
            model, shards=4, strategy="net", port=free_port(), admin_token_file=token,
            gateway_args=("--timeout-ms", "5000"), shard_args=("--compact-at", args.compact_at),
            admin_port=free_port() if args.intake == "admin" else None,
        )  # fmt: skip
        with cluster as c:
            commits: list[float] = []
            failed: list[str] = []
            rng = np.random.default_rng(1)  # bodies made first: the client's CPU is not served
            bodies = [update_body(rng, tables, args.rows) for _ in range(BODIES)]

            def push(stop: threading.Event) -> None:
                every = args.rows / args.rows_per_s if args.rows_per_s else 0.0
                due = time.perf_counter()
                while not stop.is_set():
                    due += every
                    if (wait := due - time.perf_counter()) > 0:
                        time.sleep(wait)
                    body = bodies[len(commits) % BODIES]  # pushed again: a new version
                    headers = {"Content-Type": "application/x-npz",
                               "Authorization": f"Bearer {TOKEN}"}  # fmt: skip
                    req = urllib.request.Request(
                        c.admin_url + "/v1/updates", data=body, headers=headers
                    )
                    start = time.perf_counter()
                    try:
                        with urllib.request.urlopen(req, timeout=60) as r:
                            json.loads(r.read())
                        commits.append(time.perf_counter() - start)
                    except (urllib.error.URLError, OSError) as exc:
                        failed.append(str(exc))

            rounds: list[tuple[dict, dict]] = []
            pushing = 0.0
            pids = c.pids  # the gateway (with its workers), then each shard daemon
            cpu: dict[str, np.ndarray] = {"without": np.zeros(len(pids) + 1),
                                          "with": np.zeros(len(pids) + 1)}  # fmt: skip

            def cpu_now() -> np.ndarray:  # ... and this process's own: the pusher
                return np.array([*(cpu_seconds([p]) for p in pids), time.process_time()])

            @contextlib.contextmanager
            def updating() -> Iterator[None]:
                """Pushes from a thread of this process while the block runs."""
                stop = threading.Event()
                pusher = threading.Thread(target=push, args=(stop,))
                pusher.start()
                try:
                    yield
                finally:
                    stop.set()
                    pusher.join()

            if args.warmup > 0:  # unmeasured: the first loads, pushes and compactions
                with updating():
                    load(c.url, model, args.rate, args.warmup, root / "warmup.json")
            warm = len(commits)
            # The serving gateway's stage and shard-RPC histograms, per phase (their deltas).
            spans: dict[str, list[tuple[dict, dict]]] = {"without": [], "with": []}
            for k in range(args.rounds):  # alternating: the host's drift hits both alike
                before, seen = cpu_now(), histograms(c.url, "recserve_gateway")
                quiet = load(c.url, model, args.rate, args.duration, root / f"quiet{k}.json")
                cpu["without"] += cpu_now() - before
                spans["without"].append((seen, histograms(c.url, "recserve_gateway")))
                began = time.perf_counter()
                before, seen = cpu_now(), histograms(c.url, "recserve_gateway")
                with updating():
                    busy = load(c.url, model, args.rate, args.duration, root / f"busy{k}.json")
                cpu["with"] += cpu_now() - before
                spans["with"].append((seen, histograms(c.url, "recserve_gateway")))
                pushing += time.perf_counter() - began
                rounds.append((quiet, busy))
            names = ["gateway"] + [f"shard {i}" for i in range(len(pids) - 1)] + ["pusher"]
            infos = [
                msgpack.unpackb(raw(ep, [header("info")])[0])["versions"]
                for s in c.plan.shards
                for ep in s.endpoints
            ]
            versions = [i["version"] for i in infos]
            # The same load once more with the updates applied and none arriving: what the
            # corrections cost a lookup, apart from the CPU the updates take.
            after = load(c.url, model, args.rate, args.duration, root / "after.json")
    pushes = len(commits)  # the versions committed, warm-up included
    measured = commits[warm:]
    pace = f"at {args.rows_per_s:,.0f} rows/s" if args.rows_per_s else "back to back"
    print(f"drm2 {args.size}, 4 shards; {args.rate:g} req/s of 16 samples, {args.rounds} "
          f"rounds of {args.duration:g} s without and with updates of {args.rows} rows "
          f"{pace}, taken by the gateway's {args.intake} process")  # fmt: skip

    def row(name: str, r: dict) -> list:
        lat = r["latency_ms"]
        return [name, f"{lat['p50']:.1f}", f"{lat['p99']:.1f}", sum(r["errors"].values()),
                f"{r['samples_per_s']:.0f}", ""]  # fmt: skip

    table = []
    for k, (quiet, busy) in enumerate(rounds):
        ratio = busy["latency_ms"]["p99"] / quiet["latency_ms"]["p99"]
        table += [
            row(f"{k + 1}: without", quiet),
            [*row(f"{k + 1}: with", busy)[:-1], f"{ratio:.2f}x"],
        ]
    table.append(row("after updates", after))
    print_table(["serving", "p50 ms", "p99 ms", "failed", "samples/s", "p99 ratio"], table)
    lat = np.array(measured) * 1e3 if measured else np.zeros(1)
    print(
        f"updates: {len(measured)} committed in the rounds ({pushes - len(measured)} in the "
        f"warm-up), {len(failed)} failed; {len(measured) * args.rows / pushing:,.0f} rows/s "
        f"applied while pushing (target >= 100,000); commit latency p50 "
        f"{np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms"
    )
    ratios = [b["latency_ms"]["p99"] / q["latency_ms"]["p99"] for q, b in rounds]
    print(f"serving P99 with / without updates, median of the rounds: "
          f"{float(np.median(ratios)):.2f}x (target <= 1.2x)")  # fmt: skip
    # A phase's P99 is its sixth-worst of ~600 requests: the rounds' requests pooled give the
    # P99 of all of them, a steadier figure than any one round's.
    without, with_ = pooled_p99([q for q, _ in rounds]), pooled_p99([b for _, b in rounds])
    print(f"serving P99 of all rounds' requests pooled: {without:.1f} ms without, {with_:.1f} "
          f"ms with = {with_ / without:.2f}x")  # fmt: skip
    spent = args.rounds * args.duration
    print("CPU % of one core, without / with updates (where the updates' CPU goes):")
    print_table(["process", "without", "with", "added"],
                [[n, f"{w / spent * 100:.1f}", f"{b / spent * 100:.1f}",
                  f"{(b - w) / spent * 100:+.1f}"]
                 for n, w, b in zip(names, cpu["without"], cpu["with"], strict=True)])  # fmt: skip
    print(
        f"where the tail grows (the serving gateway's histograms over all rounds; share "
        f"of observations above {TAIL_MS:g} ms, and the P99 as its bucket's upper bound):"
    )
    tails = []
    for key in sorted(spans["with"][0][1]):
        if not any(stage in key for stage in TAIL_STAGES):
            continue
        row = [key.removeprefix("recserve_gateway_").replace("_seconds", "")]
        for phase in ("without", "with"):
            pairs = [(seen.get(key, {}), after.get(key, {})) for seen, after in spans[phase]]
            n, share, p99 = tail(pairs, TAIL_MS / 1e3)
            row += [f"{share:.2%}" if n else "-", f"{p99 * 1e3:g}"]
        tails.append(row)
    print_table(["histogram", "without", "P99 ms", "with", "P99 ms"], tails)
    done = [i["compactions"] for i in infos]
    print(f"compactions per shard (--compact-at {args.compact_at}): {done}")
    written = sum(i.get("compacted_bytes", 0) for i in infos)
    sent = sum(len(bodies[k % BODIES]) for k in range(pushes))
    print(f"part files written by compactions: {written / 2**20:,.0f} MiB = "
          f"{written / sent:.1f}x the {sent / 2**20:,.0f} MiB of update bodies pushed")  # fmt: skip
    lost = [v for v in versions if v != pushes]
    print(f"shard replicas at version {pushes}: {len(versions) - len(lost)} of {len(versions)}"
          f" ({'none lost' if not lost else f'behind: {lost}'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
