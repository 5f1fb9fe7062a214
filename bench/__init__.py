"""Benchmarks: each measures a baseline in the same run and writes results/NAME.json."""
