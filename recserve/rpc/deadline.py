"""Deadlines: absolute points in time that travel with a request, gateway to shard.

A deadline is Unix time in milliseconds, the form the wire header carries (``deadline_ms``),
so a shard compares it with its own clock (hosts are assumed NTP-synchronised). Every wait
in the serving path is bounded by one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


def now_ms() -> float:
    return time.time() * 1e3


@dataclass(frozen=True, order=True)
class Deadline:
    at_ms: float  # Unix time, milliseconds

    @classmethod
    def after(cls, ms: float) -> Deadline:
        return cls(now_ms() + ms)

    @classmethod
    def from_wire(cls, at_ms: float | None) -> Deadline | None:
        return None if at_ms is None else cls(float(at_ms))

    def left_ms(self) -> float:
        """Milliseconds left; negative once passed."""
        return self.at_ms - now_ms()

    def left_s(self) -> float:
        """Seconds left, never negative: a timeout for ``asyncio.timeout``."""
        return max(0.0, self.left_ms() / 1e3)

    def expired(self) -> bool:
        return now_ms() >= self.at_ms

    def sooner(self, ms: float) -> Deadline:
        """This deadline moved ``ms`` earlier."""
        return Deadline(self.at_ms - ms)
