"""bge-jax: BGE (BAAI General Embedding) training in JAX/Flax, with Hugging Face conversion."""

from bge_jax import checkpoint, convert, sharding
from bge_jax.config import BertConfig, preset
from bge_jax.encoder import Encoder

__all__ = ["BertConfig", "Encoder", "checkpoint", "convert", "preset", "sharding"]
__version__ = "0.1.0"
