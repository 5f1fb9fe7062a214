"""Benchmarks: each compares against a baseline measured in the same run, writes results/NAME.json."""
