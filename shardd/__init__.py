"""Shard daemon (the "sparse shard"): serves pooled embedding lookups over ZeroMQ.

Not built yet (see the shardd issue); the package exists so the layering rules are enforced
from the start.
"""
