from recserve.planning.planner import (
    STRATEGIES,
    Traffic,
    build,
    compare_table,
    read_access_stats,
    report,
)

__all__ = ["STRATEGIES", "Traffic", "build", "compare_table", "read_access_stats", "report"]
