"""Prometheus metrics of one shard daemon, in a registry owned by the process (no globals)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

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


@dataclass(frozen=True)
class ShardMetrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    ids: Counter
    bags: Counter
    bytes_in: Counter
    bytes_out: Counter
    queue_depth: Gauge
    inline: Counter
    cache_hits: Counter
    cache_misses: Counter
    cache_bypassed: Counter
    cache_evictions: Counter
    cache_bytes: Gauge
    disk_read: Histogram
    version: Gauge
    rows_updated: Gauge
    log_bytes: Gauge
    compaction: Histogram
    compacted_bytes: Counter
    # Labelled children by (op, outcome): ``labels()`` costs a lock and a dict per call.
    children: dict[tuple[str, str], Counter] = field(default_factory=dict)
    # The same counts as plain numbers, for the ``stats`` op (never read back from Prometheus).
    counts: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=lambda: {"ids": 0, "bags": 0, "inline": 0})
    cache: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("hits", "misses", "bypassed", "evictions", "disk_seconds"), 0
        )
    )

    def request(self, op: str, outcome: str) -> None:
        """Count one answered request."""
        child = self.children.get((op, outcome))
        if child is None:
            child = self.children[(op, outcome)] = self.requests.labels(op=op, outcome=outcome)
        child.inc()
        key = f"{op}:{outcome}"
        self.counts[key] = self.counts.get(key, 0) + 1

    def pooled(self, ids: int, bags: int, *, inline: bool) -> None:
        """Count one lookup's work."""
        self.ids.inc(ids)
        self.bags.inc(bags)
        self.totals["ids"] += ids
        self.totals["bags"] += bags
        if inline:
            self.inline.inc()
            self.totals["inline"] += 1

    def cached(self, hits: int, misses: int, bypassed: int, evictions: int, disk_s: float) -> None:
        """Count one lookup's use of the row cache."""
        self.cache_hits.inc(hits)
        self.cache_misses.inc(misses)
        self.cache_bypassed.inc(bypassed)
        self.cache_evictions.inc(evictions)
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
        return cls(
            registry=reg,
            requests=Counter(
                "recserve_shard_requests",
                "Requests by op and outcome",
                ["op", "outcome"],
                registry=reg,
            ),
            latency=Histogram(
                "recserve_shard_lookup_seconds",
                "Lookup time from receipt to reply",
                buckets=LATENCY_BUCKETS,
                registry=reg,
            ),
            ids=Counter("recserve_shard_ids", "Ids pooled", registry=reg),
            bags=Counter("recserve_shard_bags", "Bags pooled", registry=reg),
            bytes_in=Counter("recserve_shard_received_bytes", "Bytes received", registry=reg),
            bytes_out=Counter("recserve_shard_sent_bytes", "Bytes sent", registry=reg),
            queue_depth=Gauge(
                "recserve_shard_queue_depth", "Lookups queued or running", registry=reg
            ),
            inline=Counter(
                "recserve_shard_inline_lookups",
                "Lookups small enough to be pooled on the event loop",
                registry=reg,
            ),
            cache_hits=Counter(
                "recserve_shard_cache_hits", "Ids served from the row cache", registry=reg
            ),
            cache_misses=Counter(
                "recserve_shard_cache_misses",
                "Rows read from disk into the row cache",
                registry=reg,
            ),
            cache_bypassed=Counter(
                "recserve_shard_cache_bypassed",
                "Rows read from disk around the cache (a lookup wider than its free slots)",
                registry=reg,
            ),
            cache_evictions=Counter(
                "recserve_shard_cache_evictions", "Rows evicted from the row cache", registry=reg
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
