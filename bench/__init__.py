"""Benchmarks: `coldstart bench <name|all>`; each writes bench/results/<name>.json."""
