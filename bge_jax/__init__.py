"""bge-jax: BGE (BAAI General Embedding) training in JAX/Flax, with Hugging Face conversion."""

from bge_jax import convert, sharding, weights
from bge_jax.config import BertConfig, preset
from bge_jax.encoder import Encoder

__all__ = ["BertConfig", "Encoder", "convert", "preset", "sharding", "weights"]
__version__ = "0.1.0"
