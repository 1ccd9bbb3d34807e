"""What a shard reports of its versions while a compaction finishes: ``info`` is answered on
the loop while the update thread works, so the order of the update thread's writes is what
a reader may see."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardd.updates import UpdateLog, Versions


def test_a_compaction_is_reported_only_once_the_log_is_short(tmp_path: Path, monkeypatch) -> None:
    versions = Versions([], tmp_path)
    versions.stage(1, [])
    versions.commit(1)
    assert versions.describe()["log_bytes"] > 0
    seen: list[dict[str, Any]] = []
    reset = UpdateLog.reset

    def watched(log: UpdateLog, first: dict[str, Any] | None = None) -> None:
        seen.append(versions.describe())  # what `info` could answer meanwhile
        reset(log, first)

    monkeypatch.setattr(UpdateLog, "reset", watched)
    versions.compacted(1, {}, None, 0)
    assert seen and seen[0]["compacted"] == 0  # not reported during the reset
    after = versions.describe()
    assert after["compacted"] == 1 and after["log_bytes"] == 0 and after["compactions"] == 1
    assert versions.log is not None
    versions.log.close()
