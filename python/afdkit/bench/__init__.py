"""Benchmarks of afdkit's parts, runnable as ``afdkit bench <part>``."""
