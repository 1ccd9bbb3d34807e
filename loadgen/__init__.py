"""Load generator for the gateway's HTTP API.

Not built yet (see the loadgen issue); the package exists so the layering rules are enforced
from the start.
"""
