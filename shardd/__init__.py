"""Shard daemon (the "sparse shard"): serves pooled embedding lookups over ZeroMQ.

``recserve shardd --plan plan.json --model DIR --shard K`` (or ``recserve-shardd``) opens
this shard's table parts with mmap and answers the ops of ``recserve.rpc.wire``.
"""
