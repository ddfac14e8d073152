"""Helpers for tests and benchmarks (real gloo process groups, no mocks)."""

from xpar.testing.distributed import free_port, run_distributed

__all__ = ["free_port", "run_distributed"]
