"""Helpers for tests and benchmarks: start real clusters, guests and registries."""
