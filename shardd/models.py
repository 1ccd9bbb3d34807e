"""The model artifacts a shard serves, and deploying a new one beside the old.

A deploy is a version like an update: the gateway asks every replica to ``load`` a new
artifact as version ``N + 1`` (the shard opens it beside the one it serves, with its own
state directory ``STATE/<digest>``), then commits that version everywhere, or aborts it if
any replica failed. From the commit on, lookups of versions ``N + 1`` and later read the new
artifact and updates apply to it; lookups naming an older version, still in flight, read the
old one until it is released ``RELEASE_S`` later. ``STATE/deployed.json`` records the
artifact a shard serves and its first version, so a restarted shard serves it again.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recserve.contracts.errors import BadRequest, VersionUnavailable
from recserve.contracts.manifest import Manifest, read_manifest
from shardd.compaction import write_bytes
from shardd.store import PartStore

log = logging.getLogger(__name__)
RELEASE_S = 60.0  # an old artifact stays readable this long after a deploy (the longest deadline)
DEPLOYED = "deployed.json"


@dataclass(frozen=True)
class Loaded:
    since: int  # the first version it serves
    path: Path
    manifest: Manifest
    store: PartStore

    def describe(self) -> dict[str, object]:
        m = self.manifest
        return {"name": m.name, "version": m.version, "digest": m.digest(),
                "path": str(self.path), "since": self.since}  # fmt: skip


# (artifact, first version, fresh: a deploy, whose state starts empty) -> what it opened
Opener = Callable[[Path, int, bool], tuple[Manifest, PartStore]]


class Models:
    def __init__(self, first: Loaded, opener: Opener, state_dir: Path | None) -> None:
        self.loaded = [first]  # by ``since``; the last is the current one
        self.loading: Loaded | None = None
        self.opener = opener
        self.state_dir = state_dir

    @property
    def current(self) -> Loaded:
        return self.loaded[-1]

    def store_for(self, version: int | None) -> PartStore:
        """The store serving ``version`` (None: the newest)."""
        if version is None:
            return self.current.store
        for m in reversed(self.loaded):
            if version >= m.since:
                return m.store
        raise VersionUnavailable(
            f"version {version} was served by an artifact this shard released",
            field="version",
        )

    def staged(self) -> int | None:
        if self.loading is not None:
            return self.loading.since
        return self.current.store.versions.staged[0] if self.current.store.versions.staged else None

    # --- the deploy's phases, on the update thread --------------------------------------

    def load(self, version: int, path: Path) -> Loaded:
        """Open ``path`` beside the current artifact as ``version`` (the ``stage`` of a
        deploy); a retry of the same load is answered with the same."""
        if self.loading is not None:
            if self.loading.since == version and self.loading.path == path:
                return self.loading
            raise BadRequest(
                f"version {self.loading.since} is being deployed here; commit or abort it first",
                field="version",
            )
        versions = self.current.store.versions
        if versions.staged is not None or version != versions.current + 1:
            raise BadRequest(
                f"version {version} does not follow this shard's {versions.current} "
                "(or an update is staged)",
                field="version",
            )
        digest = read_manifest(path).digest()
        if any(m.manifest.digest() == digest for m in self.loaded):
            raise BadRequest(f"this shard serves {path} already", field="model")
        manifest, store = self.opener(path, version, True)
        self.loading = Loaded(version, path, manifest, store)
        return self.loading

    def commit(self, version: int) -> bool:
        """Serve the artifact loaded as ``version`` from now on; False if ``version`` is not
        a deploy (then it is an update's)."""
        if self.loading is None or self.loading.since != version:
            return False
        self.loaded.append(self.loading)
        self.loading = None
        if self.state_dir is not None:
            record(self.state_dir, self.current)
        log.info("serving %s from version %d", self.current.path, version)
        return True

    def abort(self, version: int) -> bool:
        if self.loading is None or self.loading.since != version:
            return False
        self.loading.store.close()
        self.loading = None
        return True

    def release(self) -> None:
        """Close the artifacts older than the current one (``RELEASE_S`` after a deploy) and
        delete their update state (a later deploy of one of them starts afresh anyway)."""
        while len(self.loaded) > 1:
            old = self.loaded.pop(0)
            old.store.close()
            if old.store.state_dir is not None:
                shutil.rmtree(old.store.state_dir, ignore_errors=True)
            log.info("released %s", old.path)

    def close(self) -> None:
        for m in self.loaded:
            m.store.close()
        if self.loading is not None:
            self.loading.store.close()


def record(state_dir: Path, loaded: Loaded) -> None:
    """Write ``deployed.json`` (to a temporary name, fsync'ed, renamed into place)."""
    write_bytes(state_dir / DEPLOYED, json.dumps(loaded.describe(), indent=1).encode())


def deployed(state_dir: Path | None) -> tuple[Path, int] | None:
    """The artifact and first version ``deployed.json`` records, if any."""
    if state_dir is None:
        return None
    try:
        doc = json.loads((state_dir / DEPLOYED).read_text())
        return Path(doc["path"]), int(doc["since"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s is unreadable (%s); serving --model", state_dir / DEPLOYED, exc)
        return None
