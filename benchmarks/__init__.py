"""Benchmarks of the serving stack (never part of the test suite): run them as `python -m benchmarks.<name>`."""
