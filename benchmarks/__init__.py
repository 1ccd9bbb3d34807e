"""Benchmarks: each prints its contenders and baselines from the same run, with ratios."""
