"""Benchmark scripts (each runnable as `python benchmarks/<name>.py`); shared helpers in common.py."""
