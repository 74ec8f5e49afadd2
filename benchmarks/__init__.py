"""Benchmarks: run each from the repository root as ``python -m benchmarks.NAME``; shared
timing, environment card and JSON writing in :mod:`benchmarks.harness`."""
