"""Benchmarks: each compares against a peer and a physical bound in the same run."""
