"""References and synthetic data for tests and benchmarks, never imported by bge_jax itself:
`torch_reference` (PyTorch models; needs torch), `batches` (numpy only), `attention` (jax: the
fused attention kernel's reference and on-device check)."""
