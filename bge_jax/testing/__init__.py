"""Reference implementations for tests and benchmarks (import torch; never imported by bge_jax itself)."""
