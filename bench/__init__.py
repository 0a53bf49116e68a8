"""Benchmarks of leaseagent against their references (`python -m bench`; docs/benchmarks.md)."""
