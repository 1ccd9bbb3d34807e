"""Prometheus metrics of one shard daemon, in a registry owned by the process (no globals).

What every lookup counts (requests, ids, bags, bytes, the row cache's counts) is kept as
plain numbers, which the ``stats`` op answers with too, and a collector reads them when
``/metrics`` is scraped: a prometheus-client ``Counter.inc`` takes a lock and three Python
calls, and a lookup made six of them and two gauge sets (the queue depth is now read when
scraped, ``Gauge.set_function``). The collector runs on the scrape's thread; it only reads
the numbers, which the event loop alone writes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# Fine below a millisecond, where loopback lookups live.
LATENCY_BUCKETS = (
    50e-6,
    100e-6,
    200e-6,
    300e-6,
    500e-6,
    750e-6,
    1e-3,
    1.5e-3,
    2e-3,
    3e-3,
    5e-3,
    7.5e-3,
    10e-3,
    20e-3,
    50e-3,
    100e-3,
    250e-3,
    1.0,
)


DISK_BUCKETS = (100e-6, 250e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 0.5, 2.0)


# Per-lookup counts: (metric name, help, key in ``ShardMetrics.totals``).
COUNTED = (
    ("recserve_shard_ids", "Ids pooled", "ids"),
    ("recserve_shard_bags", "Bags pooled", "bags"),
    ("recserve_shard_received_bytes", "Bytes received", "bytes_in"),
    ("recserve_shard_sent_bytes", "Bytes sent", "bytes_out"),
    ("recserve_shard_inline_lookups", "Lookups small enough to be pooled on the event loop",
     "inline"),
)  # fmt: skip
# A lookup's stages, each the CPU time of the thread that runs it (``time.thread_time``, not
# the wall clock: a thread waiting for a core would count its wait): decode (the header and
# arrays read and checked, the shared memory mapped), prepare (the kernel calls planned),
# pool (the kernel, on the loop or a worker; a kernel on several threads counts the calling
# thread's share), reply (answered, counted, sent). The rest of a shard's CPU is its event
# loop's and ZeroMQ's (receiving, waking up, other ops) and a kernel's other threads'.
LOOKUP_STAGES = ("decode", "prepare", "pool", "reply")
CACHE_COUNTED = (
    ("recserve_shard_cache_hits", "Ids served from the row cache", "hits"),
    ("recserve_shard_cache_misses", "Rows read from disk into the row cache", "misses"),
    ("recserve_shard_cache_bypassed",
     "Rows read from disk around the cache (a lookup wider than its free slots)", "bypassed"),
    ("recserve_shard_cache_evictions", "Rows evicted from the row cache", "evictions"),
)  # fmt: skip


@dataclass(frozen=True)
class ShardMetrics:
    registry: CollectorRegistry
    latency: Histogram
    queue_depth: Gauge  # the server's count, read when scraped (``set_function``)
    cache_bytes: Gauge
    disk_read: Histogram
    version: Gauge
    rows_updated: Gauge
    log_bytes: Gauge
    compaction: Histogram
    compacted_bytes: Counter
    # Answered requests by "op:outcome", and the other per-lookup counts (``COUNTED``).
    counts: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("ids", "bags", "inline", "bytes_in", "bytes_out"), 0)
    )
    cache: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("hits", "misses", "bypassed", "evictions", "disk_seconds"), 0
        )
    )
    # CPU seconds answered lookups took per stage (``LOOKUP_STAGES``): where a shard's CPU goes.
    stages: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOOKUP_STAGES, 0.0))

    def request(self, op: str, outcome: str, sent: int = 0) -> None:
        """Count one answered request and the bytes of its reply."""
        key = f"{op}:{outcome}"
        self.counts[key] = self.counts.get(key, 0) + 1
        self.totals["bytes_out"] += sent

    def received(self, nbytes: int) -> None:
        self.totals["bytes_in"] += nbytes

    def pooled(self, ids: int, bags: int, *, inline: bool) -> None:
        """Count one lookup's work."""
        t = self.totals
        t["ids"] += ids
        t["bags"] += bags
        if inline:
            t["inline"] += 1

    def staged(self, decode: float, prepare: float, pool: float, reply: float) -> None:
        """One answered lookup's CPU seconds per stage."""
        st = self.stages
        st["decode"] += decode
        st["prepare"] += prepare
        st["pool"] += pool
        st["reply"] += reply

    def cached(self, hits: int, misses: int, bypassed: int, evictions: int, disk_s: float) -> None:
        """Count one lookup's use of the row cache."""
        if misses or bypassed:
            self.disk_read.observe(disk_s)
        c = self.cache
        c["hits"] += hits
        c["misses"] += misses
        c["bypassed"] += bypassed
        c["evictions"] += evictions
        c["disk_seconds"] += disk_s

    def updated(self, versions: dict[str, int | None]) -> None:
        """The shard's versions after a stage, commit or abort (``Versions.describe``)."""
        self.version.set(versions["version"] or 0)
        self.rows_updated.set(versions["rows_updated"] or 0)
        self.log_bytes.set(versions["log_bytes"] or 0)

    @classmethod
    def create(cls) -> ShardMetrics:
        reg = CollectorRegistry()
        ProcessCollector(registry=reg)  # process_resident_memory_bytes, cpu seconds, ...
        metrics = cls(
            registry=reg,
            latency=Histogram(
                "recserve_shard_lookup_seconds",
                "Lookup time from receipt to reply",
                buckets=LATENCY_BUCKETS,
                registry=reg,
            ),
            queue_depth=Gauge(
                "recserve_shard_queue_depth", "Lookups queued or running", registry=reg
            ),
            cache_bytes=Gauge(
                "recserve_shard_cache_bytes", "Bytes of rows held in the row cache", registry=reg
            ),
            disk_read=Histogram(
                "recserve_shard_disk_read_seconds",
                "Time to read one lookup's missed rows from disk (in parallel)",
                buckets=DISK_BUCKETS,
                registry=reg,
            ),
            version=Gauge(
                "recserve_shard_model_version", "Newest committed model version", registry=reg
            ),
            rows_updated=Gauge(
                "recserve_shard_rows_updated",
                "Updated rows held as corrections over the part files at the newest version",
                registry=reg,
            ),
            log_bytes=Gauge("recserve_shard_update_log_bytes", "Update log size", registry=reg),
            compaction=Histogram(
                "recserve_shard_compaction_seconds",
                "Time to fold the updated rows into new part files and swap them in",
                buckets=(0.1, 0.3, 1, 3, 10, 30, 100, 300),
                registry=reg,
            ),
            compacted_bytes=Counter(
                "recserve_shard_compacted_bytes",
                "Bytes of part files written by compactions",
                registry=reg,
            ),
        )
        reg.register(_Counted(metrics))
        return metrics


class _Counted(Collector):
    """The plain per-lookup counts of ``ShardMetrics``, as metric families when scraped."""

    def __init__(self, metrics: ShardMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        m = self.metrics
        requests = CounterMetricFamily(
            "recserve_shard_requests", "Requests by op and outcome", labels=["op", "outcome"]
        )
        for key, n in sorted(m.counts.items()):
            requests.add_metric(key.split(":", 1), n)
        yield requests
        for name, text, key in COUNTED:
            yield CounterMetricFamily(name, text, value=m.totals[key])
        for name, text, key in CACHE_COUNTED:
            yield CounterMetricFamily(name, text, value=m.cache[key])
        stages = CounterMetricFamily(
            "recserve_shard_lookup_stage_cpu_seconds",
            "CPU seconds answered lookups took per stage, on the thread running it: decode "
            "(header and arrays read and checked), prepare (kernel calls planned), pool (the "
            "kernel), reply (answered and sent); the rest of the process's CPU is its event "
            "loop's and ZeroMQ's",
            labels=["stage"],
        )
        for stage in LOOKUP_STAGES:
            stages.add_metric([stage], m.stages[stage])
        yield stages
