"""HTTP gateway (the "main shard"): parses requests, batches them, fans embedding lookups out
to the shard daemons (or pools in-process with ``--singular``), runs the dense MLP.

``recserve gateway --model DIR --plan plan.json`` (or ``recserve-gateway``).
"""
