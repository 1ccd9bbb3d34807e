"""HTTP gateway (the "main shard"): batching, fan-out to shards, dense MLP.

Not built yet (see the gateway issue); the package exists so the layering rules are enforced
from the start.
"""
