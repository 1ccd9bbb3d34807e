"""``promtool check metrics`` (Debian's prometheus package) on an exposition, as an operator's
Prometheus would read it; .ci/run installs it. Without it the check is skipped."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def check_metrics(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
