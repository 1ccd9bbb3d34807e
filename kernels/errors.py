"""Errors raised by the kernels.

``kernels`` imports nothing of ours, so it has its own small tree; ``recserve`` translates
these into its own error kinds at the boundary.
"""

from __future__ import annotations


class KernelError(ValueError):
    """Invalid arguments to a kernel (shapes, dtypes, modes)."""


class IdOutOfRangeError(KernelError):
    """An id is negative or not below the table's row count.

    Raised before any memory is touched; ``position`` is the index into ``ids`` of the first
    offending id.
    """

    def __init__(self, position: int, value: int, rows: int, first: int = 0) -> None:
        super().__init__(f"id {value} at position {position} is outside [{first}, {first + rows})")
        self.position = position
        self.value = value
        self.rows = rows
        self.first = first
