"""Prometheus metrics of the gateway, in a registry owned by the app (no globals).

With ``--workers`` above 1 each worker process calls ``use_multiprocess`` first: values then
live in prometheus_client's per-process files, and ``scrape`` reads all workers' (gauges
declare how they combine: ``livesum``, or ``livemax`` for the version).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    multiprocess,
    values,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def use_multiprocess(path: str) -> None:
    """Keep this process's metric values in ``path``, beside its sibling workers'. Before
    any metric is made: prometheus_client picks its value class from the environment at
    import, so the class is chosen again here (the worker was forked after the import)."""
    os.environ[MULTIPROC_ENV] = path
    values.ValueClass = values.get_value_class()


SECONDS = (
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2e-3,
    3e-3,
    5e-3,
    7.5e-3,
    10e-3,
    15e-3,
    20e-3,
    30e-3,
    50e-3,
    75e-3,
    100e-3,
    200e-3,
    500e-3,
    1.0,
    2.0,
)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class GatewayMetrics:
    registry: CollectorRegistry  # this process's metrics
    scrape: CollectorRegistry  # what /metrics shows: the same, or every worker's
    requests: Counter
    latency: Histogram
    queue_wait: Histogram
    assembly: Histogram
    pooling: Histogram
    dense: Histogram
    stage_cpu: Counter
    batch_samples: Histogram
    inflight: Gauge
    shard_rpc: Histogram
    shard_work: Histogram
    shards_contacted: Histogram
    shard_bytes: Counter
    shm_lookups: Counter
    into_lookups: Counter
    replica_requests: Counter
    replica_outstanding: Gauge
    ejections: Counter
    hedges: Counter
    retries: Counter
    model_version: Gauge
    versions: Counter
    rows_updated: Counter
    update_seconds: Histogram

    @contextlib.contextmanager
    def cpu(self, stage: str) -> Iterator[None]:
        """Count the calling thread's CPU time in the block as ``stage``'s."""
        start = time.thread_time()
        try:
            yield
        finally:
            self.stage_cpu.labels(stage=stage).inc(time.thread_time() - start)

    def updated(self, version: int, rows: int, seconds: float) -> None:
        """One committed update: its version, rows, and push-to-commit seconds."""
        self.model_version.set(version)
        self.versions.inc()
        self.rows_updated.inc(rows)
        self.update_seconds.observe(seconds)

    @classmethod
    def create(cls) -> GatewayMetrics:
        reg = CollectorRegistry()
        shared = os.environ.get(MULTIPROC_ENV)
        if shared:  # a worker: what /metrics shows is every worker's, summed
            scrape = CollectorRegistry()
            multiprocess.MultiProcessCollector(scrape, path=shared)
        else:
            scrape = reg
            ProcessCollector(registry=reg)

        def stage(name: str, what: str) -> Histogram:
            return Histogram(
                f"recserve_gateway_{name}_seconds", what, buckets=SECONDS, registry=reg
            )

        return cls(
            registry=reg,
            scrape=scrape,
            requests=Counter(
                "recserve_gateway_requests",
                "HTTP requests by route and status",
                ["route", "status"],
                registry=reg,
            ),
            latency=stage(
                "request", "End-to-end latency of scoring requests (predict, embeddings, infer)"
            ),
            queue_wait=stage("queue_wait", "Time a request waited for its batch"),
            assembly=stage(
                "batch_assembly", "Merging requests into a batch and routing it to shards"
            ),
            pooling=stage("pooling", "Embedding lookups (all shards, or in-process)"),
            dense=stage("dense", "Dense MLP of a batch"),
            stage_cpu=Counter(
                "recserve_gateway_stage_cpu_seconds",
                "CPU time of the executor's stages: parse (request bodies), assembly "
                "(merging requests, routing), pooling (in-process), merge (shard replies), "
                "dense; the rest of the process's CPU is its event loop's (HTTP, RPC)",
                ["stage"],
                registry=reg,
            ),
            batch_samples=Histogram(
                "recserve_gateway_batch_samples", "Samples per batch", buckets=SIZES, registry=reg
            ),
            inflight=Gauge(
                "recserve_gateway_inflight_samples",
                "Samples queued or being scored",
                registry=reg,
                multiprocess_mode="livesum",
            ),
            shard_rpc=Histogram(
                "recserve_gateway_shard_rpc_seconds",
                "One lookup round trip, by shard",
                ["shard"],
                buckets=SECONDS,
                registry=reg,
            ),
            shard_work=Histogram(
                "recserve_gateway_shard_work_seconds",
                "The part of a lookup's round trip spent on its shard, as the shard reports it "
                "(queued there, then pooled); the rest is transport and wake-ups",
                ["shard"],
                buckets=SECONDS,
                registry=reg,
            ),
            shards_contacted=Histogram(
                "recserve_gateway_shards_contacted",
                "Shards a batch's lookups went to",
                buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
                registry=reg,
            ),
            shard_bytes=Counter(
                "recserve_gateway_shard_bytes",
                "Bytes to and from shards",
                ["direction"],
                registry=reg,
            ),
            shm_lookups=Counter(
                "recserve_gateway_shm_lookups",
                "Lookups whose ids and pooled vectors went through shared memory (a shard "
                "on this host), not the socket",
                ["shard"],
                registry=reg,
            ),
            into_lookups=Counter(
                "recserve_gateway_into_lookups",
                "Lookups whose features the shard pooled straight into the batch's pooled "
                "array (shared memory), leaving the gateway nothing to copy",
                ["shard"],
                registry=reg,
            ),
            replica_requests=Counter(
                "recserve_gateway_replica_requests",
                "Lookups by shard, replica and outcome (ok or an error kind)",
                ["shard", "replica", "outcome"],
                registry=reg,
            ),
            replica_outstanding=Gauge(
                "recserve_gateway_replica_outstanding",
                "Lookups sent to a replica and not answered yet",
                ["shard", "replica"],
                registry=reg,
                multiprocess_mode="livesum",
            ),
            ejections=Counter(
                "recserve_gateway_replica_ejections",
                "Times a replica was taken out of rotation",
                ["shard", "replica"],
                registry=reg,
            ),
            hedges=Counter(
                "recserve_gateway_hedges",
                "Hedged lookups: sent, and won by the hedge",
                ["shard", "outcome"],
                registry=reg,
            ),
            retries=Counter(
                "recserve_gateway_retries",
                "Lookups retried on another replica",
                ["shard"],
                registry=reg,
            ),
            model_version=Gauge(
                "recserve_gateway_model_version",
                "The version requests are scored at",
                registry=reg,
                multiprocess_mode="livemax",
            ),
            versions=Counter(
                "recserve_gateway_versions_committed", "Online updates committed", registry=reg
            ),
            rows_updated=Counter(
                "recserve_gateway_rows_updated", "Rows changed by online updates", registry=reg
            ),
            update_seconds=Histogram(
                "recserve_gateway_update_seconds",
                "An update from its arrival to its commit on every shard (update lag)",
                buckets=SECONDS,
                registry=reg,
            ),
        )
