"""Load generator for the gateway's HTTP API: ``recserve loadgen`` (or ``recserve-loadgen``).

It talks to the gateway over HTTP only; the workload comes from the served model
(``GET /v1/model``): per-feature Zipf ids and pooling factors from the manifest statistics.
"""
