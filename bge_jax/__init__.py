"""bge-jax: BGE embedding-model training in JAX/Flax."""
