"""Benchmark implementations; run them through scripts/bench.py."""
