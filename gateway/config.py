"""The gateway's configuration: one frozen schema, validated once, from which ``main`` also
generates the command line (``recserve.runtime.config``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kernels.blas import BACKENDS
from recserve.contracts.errors import ConfigError
from recserve.rpc.shm import MAX_ARENA
from recserve.runtime.config import option


@dataclass(frozen=True)
class BatchSettings:
    max_batch_samples: int = option(1024, "samples in one batch (a larger request is its own)")
    max_queue_delay_us: int = option(
        500, "how long a request waits for company, while requests come at least that often"
    )
    max_inflight_samples: int = option(
        32768, "samples queued or being scored (per worker); more are refused with 429"
    )
    max_concurrent_batches: int = option(
        2, "batches pooled and scored at once; the next waits (and grows) in the queue"
    )

    def __post_init__(self) -> None:
        if (
            self.max_batch_samples < 1
            or self.max_queue_delay_us < 0
            or self.max_inflight_samples < 1
            or self.max_concurrent_batches < 1
        ):
            raise ConfigError("batch sizes and counts must be >= 1 and the queue delay >= 0")


@dataclass(frozen=True)
class ApiSettings:
    timeout_ms: float = option(
        1000.0, "a request's deadline; a request may ask for a shorter one, never a longer"
    )
    max_request_samples: int = option(8192, "samples in one request (413 above)")
    max_request_ids: int = option(4_000_000, "ids in one request (413 above)")
    max_body_bytes: int = option(64 << 20, "bytes of one request body (413 above)")
    body_timeout_s: float = option(10.0, "seconds a client may take to send its body (408)")
    header_timeout_s: float = option(
        15.0, "seconds a connection may stay without a complete request (then it is closed)"
    )
    max_connections: int = option(
        4096, "open connections (per worker); more get 503 and are closed"
    )
    enable_embeddings: bool = option(
        False, "serve POST /v1/embeddings (it returns the tables' learned values: opt in)"
    )
    max_embedding_floats: int = option(
        1 << 22, "floats in one /v1/embeddings reply, samples x features x dim (413 above)"
    )
    admin_token_file: Path | None = option(
        None,
        "serve POST /v1/updates (online updates) to callers presenting this file's token as "
        "Authorization: Bearer; without it the endpoint answers 404",
        metavar="FILE",
    )

    def __post_init__(self) -> None:
        if not self.timeout_ms > 0:
            raise ConfigError("--timeout-ms must be positive")
        if min(self.max_request_samples, self.max_request_ids, self.max_body_bytes) < 1:
            raise ConfigError("request limits must be >= 1")
        if not self.body_timeout_s > 0 or not self.header_timeout_s > 0:
            raise ConfigError("--body-timeout-s and --header-timeout-s must be positive")
        if self.max_connections < 1:
            raise ConfigError("--max-connections must be >= 1")


SHM_MIN = 1 << 20


@dataclass(frozen=True)
class ReplicaSettings:
    hedge_after_ms: str = option(
        "off",
        "send a lookup to a second replica when the first has not answered after this many "
        "ms, or pNN of the shard's recent lookups (e.g. p95); off: never",
    )
    hedge_budget: float = option(0.1, "share of lookups that may be hedged")
    retry_budget: float = option(0.2, "share of lookups that may be retried on another replica")
    eject_after: int = option(3, "failures in a row that take a replica out of rotation")
    shm_bytes: int = option(
        16 << 20,
        "bytes of shared memory (allocated at start) per replica on this host (ipc:// or "
        "loopback), through which its lookups travel without copies; 0: always the socket",
    )

    def __post_init__(self) -> None:
        hedge = self.hedge_after_ms
        pct = hedge[1:] if hedge.startswith("p") else None
        ok = hedge == "off" or (
            _number(pct) and 0 < float(pct or 0) < 100
            if pct is not None
            else _number(hedge) and float(hedge) > 0
        )
        if not ok:
            raise ConfigError(
                f"--hedge-after-ms must be off, a positive number or pNN, not {hedge!r}"
            )
        if not 0 <= self.hedge_budget <= 1 or not 0 <= self.retry_budget <= 1:
            raise ConfigError("--hedge-budget and --retry-budget are shares in [0, 1]")
        if self.eject_after < 1:
            raise ConfigError("--eject-after must be >= 1")
        if self.shm_bytes and not SHM_MIN <= self.shm_bytes <= MAX_ARENA:
            raise ConfigError(f"--shm-bytes must be 0 or {SHM_MIN}..{MAX_ARENA}")


def _number(text: str | None) -> bool:
    try:
        float(text or "")
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class GatewayConfig:
    model: Path = option(help="the model artifact directory")
    plan: Path | None = None  # None: --singular (main declares the two as exclusive)
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8080, "port to listen on (0: any free port)")
    admin_port: int | None = option(
        None,
        "take POST /v1/updates and /v1/deploy on this port, in a worker process of their own "
        "(the serving workers follow its versions): updates cost the served requests less",
        metavar="PORT",
    )
    batching: BatchSettings = field(default_factory=BatchSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    replicas: ReplicaSettings = field(default_factory=ReplicaSettings)
    workers: int = option(
        1,
        "gateway processes sharing the port, each with its own GIL and executor (connections "
        "are balanced, not requests); above 1 online updates need --admin-port",
    )
    pin_workers: bool = option(
        False,
        "run each worker's threads only on CPUs of its own: its share of the CPUs the gateway "
        "may use, in blocks (one CPU each, round robin, beyond a worker a CPU); the admin "
        "worker is not pinned",
    )
    threads: int | None = option(
        None,
        "executor threads per worker (parsing, routing, merging, dense MLP); default 2, or 1 "
        "when the workers have fewer than 2 cores each",
    )
    blas_threads: int = option(
        1, "BLAS threads per dense MLP (1: batches run side by side instead)"
    )
    blas: str = option(
        "auto",
        "the dense MLP's GEMMs: mkl (the mkl extra, one thread a GEMM), openblas (numpy's), "
        "or auto: mkl when installed and --blas-threads is 1",
    )
    drain_timeout: float = option(10.0, "seconds to finish requests on SIGTERM")
    curve_keys: Path | None = option(
        None,
        "CURVE keys directory (recserve keygen): talk to the shards encrypted, as a known "
        "client (client.key_secret, server.key)",
        metavar="DIR",
    )
    preload: bool = option(False, "with --singular: touch every table page before serving")
    hugepages: bool = option(
        False,
        "with --singular: score from copies of the tables in huge-page memory (fewer TLB "
        "misses; costs the tables' size in anonymous memory)",
    )

    @property
    def executor_threads(self) -> int:
        """``--threads``, or 2, or 1 when the workers have fewer than 2 cores each: two
        workers on two cores with two threads each ran 5-7 % fewer samples/s than with one
        (their four threads took turns at the cores and at each worker's GIL). Read in a
        worker: a pinned one counts the CPUs it was given."""
        if self.threads is not None:
            return self.threads
        cpus = len(os.sched_getaffinity(0))
        return max(1, min(2, cpus if self.pin_workers else cpus // self.workers))

    def __post_init__(self) -> None:
        if (self.threads is not None and self.threads < 1) or self.blas_threads < 1:
            raise ConfigError("--threads and --blas-threads must be >= 1")
        if self.workers < 1:
            raise ConfigError("--workers must be >= 1")
        if self.admin_port is not None:
            if self.api.admin_token_file is None or self.plan is None:
                raise ConfigError("--admin-port needs --admin-token-file and --plan")
            if not 0 < self.admin_port < 65536 or self.admin_port == self.port:
                raise ConfigError("--admin-port must be a port (1-65535) other than --port")
        elif self.workers > 1 and self.api.admin_token_file is not None:
            raise ConfigError(
                "--admin-token-file with --workers above 1 needs --admin-port: online updates "
                "are ordered by one process"
            )
        if self.workers > 1 and self.hugepages:
            raise ConfigError("--hugepages needs --workers 1: each worker would copy the tables")
        if self.blas not in BACKENDS:
            raise ConfigError(f"--blas must be one of {', '.join(BACKENDS)}, not {self.blas!r}")
        if self.blas == "mkl" and self.blas_threads > 1:
            raise ConfigError("--blas mkl runs one thread a GEMM: --blas-threads must be 1")
        if self.drain_timeout < 0:
            raise ConfigError("--drain-timeout must be >= 0")
