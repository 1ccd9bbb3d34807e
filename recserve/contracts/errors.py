"""The one exception tree of recserve.

Every error we raise on purpose derives from :class:`RecserveError` and carries a ``kind``: a
short stable string that travels on the wire and in HTTP error bodies. The HTTP status of a
kind is decided here, in :data:`HTTP_STATUS`, and nowhere else. Foreign errors (numpy, torch,
OS) are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class RecserveError(Exception):
    """Base of every recserve error; ``kind`` names the failure class."""

    kind = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str]:
        body = {"kind": self.kind, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


# --- client mistakes -------------------------------------------------------------------------


class BadRequest(RecserveError):
    """The caller sent something malformed; ``field`` points at it."""

    kind = "bad_request"


class UnknownFeature(BadRequest):
    kind = "unknown_feature"


class UnknownTable(BadRequest):
    kind = "unknown_table"


class IdOutOfRange(BadRequest):
    kind = "id_out_of_range"


class TooLarge(BadRequest):
    kind = "too_large"


class UnsupportedVersion(BadRequest):
    kind = "unsupported_version"


class UnknownOp(BadRequest):
    kind = "unknown_op"


class UnsupportedEncoding(BadRequest):
    """A compressed body: refused rather than inflated past the body limit."""

    kind = "unsupported_encoding"


class Unauthorized(BadRequest):
    """No credentials (an admin endpoint without ``Authorization: Bearer``)."""

    kind = "unauthorized"


class Forbidden(BadRequest):
    """Credentials that do not grant this."""

    kind = "forbidden"


class Misdirected(BadRequest):
    """Sent to a port that does not serve it (an update to a serving port under
    ``--admin-port``)."""

    kind = "misdirected"


class RequestTimeout(BadRequest):
    """The client did not send its request in time."""

    kind = "request_timeout"


# --- the service cannot answer (now) ------------------------------------------------------------


class Overloaded(RecserveError):
    """Too much work queued; retry after ``retry_after`` seconds."""

    kind = "overloaded"
    retry_after = 1.0

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(RecserveError):
    kind = "deadline_exceeded"


class ShardUnavailable(RecserveError):
    """A shard did not answer (down, stalled, or its connection broke)."""

    kind = "shard_unavailable"


class NotReady(RecserveError):
    """The process is starting or draining."""

    kind = "not_ready"


class VersionUnavailable(RecserveError):
    """A shard does not hold the model version asked for (not committed there yet, or no
    longer kept); another replica may."""

    kind = "version_unavailable"


class SharedMemoryUnavailable(RecserveError):
    """A shard cannot map the shared memory a lookup names (another host, another mount
    namespace, another user): the client sends its lookups over the socket instead."""

    kind = "shm_unavailable"


class DiskReadError(RecserveError):
    """A shard could not read rows from its on-disk tier (the lookup fails, the shard stays
    up; another replica may still answer)."""

    kind = "io_error"


# --- operator mistakes and damaged files ------------------------------------------------------


class ConfigError(RecserveError):
    """A config file, command-line value or schema document is invalid."""

    kind = "config"


class ArtifactError(RecserveError):
    """A model artifact is missing, damaged or of an unknown format; ``path`` names the file."""

    kind = "artifact"

    def __init__(self, message: str, *, path: str, field: str | None = None) -> None:
        super().__init__(f"{path}: {message}", field=field)
        self.path = path


class ChecksumMismatch(ArtifactError):
    kind = "checksum_mismatch"


class UnsupportedFormat(ArtifactError):
    kind = "unsupported_format"


class PlanError(RecserveError):
    """A sharding plan cannot be made, or a plan file does not fit the model."""

    kind = "plan"


class ImportFailed(RecserveError):
    """A checkpoint could not be turned into a model artifact."""

    kind = "import_failed"


HTTP_STATUS: dict[str, int] = {
    "bad_request": 400,
    "unknown_feature": 422,
    "unknown_table": 422,
    "id_out_of_range": 422,
    "too_large": 413,
    "unsupported_version": 400,
    "unknown_op": 400,
    "unsupported_encoding": 415,
    "request_timeout": 408,
    "unauthorized": 401,
    "forbidden": 403,
    "misdirected": 421,
    "overloaded": 429,
    "deadline_exceeded": 504,
    "shard_unavailable": 503,
    "not_ready": 503,
    "io_error": 503,
    "version_unavailable": 503,
    "shm_unavailable": 503,
    "config": 500,
    "artifact": 500,
    "checksum_mismatch": 500,
    "unsupported_format": 500,
    "import_failed": 500,
    "plan": 500,
    "internal": 500,
}


def error_class(kind: str) -> type[RecserveError]:
    """The class of a kind received from elsewhere (a shard's error reply)."""
    todo: list[type[RecserveError]] = [RecserveError]
    while todo:
        cls = todo.pop()
        if cls.kind == kind:
            return cls
        todo.extend(cls.__subclasses__())
    return RecserveError


def remote_error(kind: str, message: str, field: str | None = None) -> RecserveError:
    """An error another process reported (a shard's error reply) as our class of its kind;
    whatever arguments that class's constructor takes, only the message and field travel."""
    cls = error_class(kind)
    exc = cls.__new__(cls)
    RecserveError.__init__(exc, message, field=field)
    return exc


def http_status(exc: RecserveError) -> int:
    """The HTTP status that answers ``exc``; unknown kinds are server errors."""
    return HTTP_STATUS.get(exc.kind, 500)
