"""The conversion command (python conversion/convert.py) over bge_jax.interop."""
