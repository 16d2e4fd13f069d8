"""The command lines (python launch/<name>.py): argument parsing over the bge_jax package."""
