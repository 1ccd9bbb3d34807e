"""``recserve study``: Lui et al.'s experiment over simulated hosts with a network between them.

For each profile, a synthetic model; then the singular baseline (the gateway alone) and each
table-mapping strategy over ``--shards`` shards, under the same open-loop load from the
bundled loadgen. With ``--hosts netns`` (root) every shard daemon, the gateway and the load
generator run on hosts of their own (``netlab``), reached only through the lab's links by the
addresses of a generated hosts TOML, so the multi-host configuration path runs for real;
``--hosts local`` (or without root) runs them on loopback and says so. ``--delays`` adds a
sweep of the one-way network delay for the first profile.

Per run (one row of ``study.json``): P50/P99 from the load generator, CPU seconds per 1k
samples and RSS over every server process, shards contacted per batch and bytes to and from
shards per request (the gateway's own counters), the plan's modelled cost. ``study.md`` holds
the table with each run's ratios to its singular baseline; ``--plot`` writes the figures.
"""

from __future__ import annotations

import atexit
import json
import math
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from recserve.contracts.errors import RecserveError
from recserve.contracts.manifest import read_manifest
from recserve.contracts.plan import local_endpoints, read_hosts
from recserve.contracts.units import parse_size
from recserve.local import netlab
from recserve.local.argv import gateway_argv, loadgen_argv, shardd_argv
from recserve.local.cluster import cpu_seconds, free_port, rss_mib
from recserve.model.synth import synthesize
from recserve.planning import build

GATEWAY, LOADGEN = 0, 1  # lab hosts; shard k is host k + 2
SHARD_PORT, GATEWAY_PORT = 5600, 8080
_FETCH = (
    "import sys, urllib.request, time\n"
    "end = time.monotonic() + float(sys.argv[2])\n"
    "while True:\n"
    "    try:\n"
    "        print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode()); break\n"
    "    except Exception as exc:\n"
    "        if time.monotonic() > end: sys.exit(f'{sys.argv[1]}: {exc}')\n"
    "        time.sleep(0.2)\n"
)


@dataclass(frozen=True)
class Setup:
    hosts: str  # "netns" or "local"
    shards: int
    qps: float
    samples: int
    duration: float
    link: netlab.Link
    sweep: bool = False  # raise the rate until P99 > slo_ms (loadgen --sweep) instead of qps
    slo_ms: float = 50.0


class Hosts:
    """Where processes run: lab hosts (``netns``) or this host (``local``)."""

    def __init__(self, lab: netlab.NetLab | None) -> None:
        self.lab = lab

    def addr(self, host: int) -> str:
        return self.lab.addr(host) if self.lab else "127.0.0.1"

    def cmd(self, host: int, argv: list[str]) -> list[str]:
        return self.lab.cmd(host, argv) if self.lab else argv

    def fetch(self, url: str, timeout: float = 120.0) -> str:
        """GET ``url`` from the load generator's host (retried until ``timeout``)."""
        argv = self.cmd(LOADGEN, [sys.executable, "-c", _FETCH, url, str(timeout)])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
        if done.returncode != 0:
            raise RecserveError(f"cannot reach {url}: {done.stderr.strip()[-300:]}")
        return done.stdout


@contextmanager
def hosts_for(setup: Setup, n: int) -> Iterator[Hosts]:
    if setup.hosts != "netns":
        yield Hosts(None)
        return
    lab = netlab.NetLab(n, setup.link)
    atexit.register(lab.close)  # also when the study dies of an exception
    try:
        yield Hosts(lab)
    finally:
        lab.close()
        atexit.unregister(lab.close)


def _plan(model: Path, work: Path, strategy: str, hosts: Hosts, n: int) -> Path:
    """A plan of ``strategy`` over ``n`` shards at the hosts' addresses (written as a hosts
    TOML and read back, the multi-host path) or at loopback ports."""
    plan = work / f"plan-{strategy}.json"
    if hosts.lab is not None:
        toml = work / "hosts.toml"
        toml.write_text(
            "".join(
                f'[[shards]]\nendpoints = ["tcp://{hosts.addr(k + 2)}:{SHARD_PORT}"]\n'
                for k in range(n)
            )
        )
        endpoints = read_hosts(toml, n, 1)
    else:
        endpoints = local_endpoints(n, 1, base_port=free_port())
    plan.write_bytes(build(read_manifest(model), n, strategy, endpoints).to_json() + b"\n")
    return plan


def _metric(text: str, name: str) -> float:
    """Sum of every sample of ``name`` (all label sets)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


def one_run(model: Path, work: Path, profile: str, strategy: str, setup: Setup) -> dict[str, Any]:
    """One setup under load; ``strategy`` ``singular`` runs the gateway alone."""
    n = 0 if strategy == "singular" else setup.shards
    work.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    with hosts_for(setup, n + 2) as hosts:
        try:
            plan = None if n == 0 else _plan(model, work, strategy, hosts, n)
            for k in range(n):
                log = open(work / f"{strategy}-shard{k}.log", "wb")  # noqa: SIM115
                logs.append(log)
                argv = shardd_argv(plan or "", model, k, "--preload")
                procs.append(subprocess.Popen(hosts.cmd(k + 2, argv), stdout=log, stderr=log))
            port = GATEWAY_PORT if hosts.lab else free_port()
            url = f"http://{hosts.addr(GATEWAY)}:{port}"
            extra = ["--preload"] if plan is None else []
            argv = gateway_argv(model, *extra, plan=plan, host=hosts.addr(GATEWAY), port=port)
            log = open(work / f"{strategy}-gateway.log", "wb")  # noqa: SIM115
            logs.append(log)
            gateway = subprocess.Popen(hosts.cmd(GATEWAY, argv), stdout=log, stderr=log)
            procs.insert(0, gateway)
            end = time.monotonic() + 300
            while True:  # ready, or a server died, or out of time
                for p in procs:
                    if p.poll() is not None:
                        raise RecserveError(f"a server exited with {p.returncode} (logs: {work})")
                try:
                    hosts.fetch(url + "/v2/health/ready", timeout=2)
                    break
                except RecserveError:
                    if time.monotonic() > end:
                        raise
            pids = [p.pid for p in procs]
            before_cpu = cpu_seconds(pids)
            before = hosts.fetch(url + "/metrics")
            report = work / f"{strategy}-load.json"
            load = (
                ["--sweep", "--slo-ms", str(setup.slo_ms)]
                if setup.sweep
                else ["--qps", str(setup.qps)]
            )
            argv = loadgen_argv(url, "--model", str(model), *load)
            argv += ["--duration", str(setup.duration), "--samples", str(setup.samples)]
            argv += ["--format", "columns", "--quiet", "--report", str(report)]
            argv += ["--bodies", str(min(2000, int(setup.qps * setup.duration) + 16))]
            done = subprocess.run(hosts.cmd(LOADGEN, argv), capture_output=True, text=True)
            if done.returncode != 0:
                raise RecserveError(f"loadgen failed: {done.stderr.strip()[-300:]}")
            cpu = cpu_seconds(pids) - before_cpu
            after = hosts.fetch(url + "/metrics")
            rss = [rss_mib(pid) for pid in pids]
            crashed = [p.returncode for p in procs if p.poll() is not None]
            if crashed:
                raise RecserveError(f"a server exited with {crashed[0]} during the run")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
    steps = json.loads(report.read_text())["runs"]
    run = steps[-1]  # with --sweep: the highest rate that held the SLO (or the last tried)
    held = setup.sweep and run["label"].startswith("max")
    ok = max(1, sum(r["ok"] for r in (steps[:-1] if setup.sweep else steps)))
    delta = {
        name: _metric(after, name) - _metric(before, name)
        for name in (
            "recserve_gateway_shards_contacted_sum",
            "recserve_gateway_shards_contacted_count",
            "recserve_gateway_shard_bytes_total",
        )
    }
    batches = delta["recserve_gateway_shards_contacted_count"]
    return {
        "profile": profile,
        "strategy": strategy,
        "hosts": setup.hosts,
        "delay_us": setup.link.delay_us if setup.hosts == "netns" else 0.0,
        "shards": n,
        "qps": run["offered_qps"] if setup.sweep else setup.qps,
        "max_qps": (run["offered_qps"] if held else 0.0) if setup.sweep else None,
        "samples": setup.samples,
        "p50_ms": run["latency_ms"]["p50"],
        "p99_ms": run["latency_ms"]["p99"],
        "samples_per_s": run["samples_per_s"],
        "errors": sum(run["errors"].values()),
        "cpu_s_per_1k_samples": cpu / (ok * setup.samples / 1000),
        "rss_mb": sum(rss),
        "rss_mb_per_process": rss,
        "shards_contacted_mean": (
            delta["recserve_gateway_shards_contacted_sum"] / batches if batches else 0.0
        ),
        "wire_bytes_per_request": delta["recserve_gateway_shard_bytes_total"] / ok,
        "plan_cost_us": (
            json.loads(plan.read_text())["report"]["cost_us"] if plan is not None else None
        ),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    base = {(r["profile"], r["delay_us"]): r for r in rows if r["strategy"] == "singular"}
    head = (
        "| profile | strategy | hosts | one-way delay us | P50 ms | P99 ms | P99 vs singular | "
        "CPU s/1k samples | CPU vs singular | RSS MB | shards/batch | shard KB/request | errors |"
    )
    out = [head, "|" + "---|" * 13]
    for r in rows:
        b = base.get((r["profile"], r["delay_us"]))

        def ratio(key: str, r: dict[str, Any] = r, b: dict[str, Any] | None = b) -> str:
            return f"{r[key] / b[key]:.2f}x" if b and b[key] else "-"

        out.append(
            f"| {r['profile']} | {r['strategy']} | {r['hosts']} | {r['delay_us']:g} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {ratio('p99_ms')} | "
            f"{r['cpu_s_per_1k_samples']:.3f} | {ratio('cpu_s_per_1k_samples')} | "
            f"{r['rss_mb']} | {r['shards_contacted_mean']:.2f} | "
            f"{r['wire_bytes_per_request'] / 1024:.0f} | {r['errors']} |"
        )
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    base = {(r["profile"], r["delay_us"]): r for r in rows if r["strategy"] == "singular"}
    main = [r for r in rows if r["strategy"] != "singular"]
    delays = sorted({r["delay_us"] for r in rows})
    first = delays[len(delays) // 2] if len(delays) > 1 else delays[0]
    nominal = [r for r in main if r["delay_us"] == first] or main
    profiles = sorted({r["profile"] for r in nominal})
    strategies = sorted({r["strategy"] for r in nominal})
    figures = {
        "p99_overhead.png": ("P99 / singular", lambda r, b: r["p99_ms"] / b["p99_ms"]),
        "cpu_per_sample.png": (
            "CPU per sample / singular",
            lambda r, b: r["cpu_s_per_1k_samples"] / b["cpu_s_per_1k_samples"],
        ),
        "memory_per_shard.png": (
            "RSS per shard (MB)",
            lambda r, b: sum(r["rss_mb_per_process"][1:]) / max(1, r["shards"]),
        ),
        "shards_contacted.png": (
            "shards contacted per batch",
            lambda r, b: r["shards_contacted_mean"],
        ),
    }
    for name, (label, value) in figures.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(strategies))
        for j, s in enumerate(strategies):
            ys = []
            for p in profiles:
                r = next((x for x in nominal if x["profile"] == p and x["strategy"] == s), None)
                b = base.get((p, r["delay_us"])) if r else None
                ys.append(value(r, b) if r and b else math.nan)
            ax.bar([i + j * width for i in range(len(profiles))], ys, width, label=s)
        ax.set_xticks([i + width * (len(strategies) - 1) / 2 for i in range(len(profiles))])
        ax.set_xticklabels(profiles)
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    if len(delays) > 1:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for s in strategies:
            pts = []
            for d in delays:
                r = next((x for x in main if x["strategy"] == s and x["delay_us"] == d), None)
                b = base.get((r["profile"], d)) if r else None
                if r and b:
                    pts.append((d, r["p50_ms"] - b["p50_ms"], r["p99_ms"] / b["p99_ms"]))
            left.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=s)
            right.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=s)
        left.set_ylabel("P50 added over singular (ms)")
        right.set_ylabel("P99 / singular")
        for ax in (left, right):
            ax.set_xlabel("one-way network delay (us)")
            ax.set_xscale("symlog", linthresh=50)
            ax.legend()
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "p99_vs_delay.png", dpi=110)
        plt.close(fig)
        written.append(out / "p99_vs_delay.png")
    return written


def run_study(
    profiles: list[str],
    strategies: list[str],
    setup: Setup,
    size: str,
    out: Path,
    delays: list[float],
    plots: bool,
) -> list[dict[str, Any]]:
    if setup.hosts == "netns":
        why = netlab.available()
        if why is not None:
            print(f"recserve study: simulated hosts {why}; falling back to loopback (local)")
            setup = replace(setup, hosts="local")
        else:
            gone = netlab.sweep()
            if gone:
                print(f"removed {len(gone)} namespaces of an earlier study that died")
    else:
        print("recserve study: hosts on loopback (--hosts local): no network in between")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def save() -> None:
        (out / "study.json").write_text(json.dumps({"rows": rows}, indent=2))
        (out / "study.md").write_text(markdown(rows))

    runs: list[tuple[str, str, Setup]] = []
    for i, profile in enumerate(profiles):
        sweep = delays if i == 0 and delays and setup.hosts == "netns" else [setup.link.delay_us]
        for d in sweep:
            s = replace(setup, link=_delay(setup.link, d))
            runs += [(profile, strategy, s) for strategy in ["singular", *strategies]]
    with tempfile.TemporaryDirectory(prefix="recserve-study-") as tmp:
        models = {}
        for profile in profiles:
            models[profile] = Path(tmp) / profile
            print(f"== synthesize {profile} ({size})", flush=True)
            synthesize(profile, parse_size(size), models[profile], seed=1)
        for k, (profile, strategy, s) in enumerate(runs):
            where = f"{s.hosts}, {s.link.delay_us:g} us" if s.hosts == "netns" else s.hosts
            print(f"[{k + 1}/{len(runs)}] {profile} {strategy} ({where})", flush=True)
            at = f"{int(s.link.delay_us)}us" if s.hosts == "netns" else "local"
            work = out / "runs" / f"{profile}-{strategy}-{at}"
            row = one_run(models[profile], work, profile, strategy, s)
            rows.append(row)
            save()
            print(
                f"    p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms  "
                f"cpu {row['cpu_s_per_1k_samples']:.3f} s/1k  errors {row['errors']}",
                flush=True,
            )
    if plots:
        for path in plot(rows, out):
            print(f"wrote {path}")
    print(f"wrote {out / 'study.json'} and {out / 'study.md'}")
    return rows


def _delay(link: netlab.Link, delay_us: float) -> netlab.Link:
    return netlab.Link(delay_us, link.jitter_us if delay_us > 0 else 0.0, link.rate_gbit)


def install_signal_cleanup() -> None:
    """SIGTERM ends the study as Ctrl-C does: through every ``finally`` (labs removed)."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
