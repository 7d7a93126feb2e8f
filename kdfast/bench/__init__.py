"""Benchmarks and budget calibration: shared measurement utilities, kernel and budget suites."""
