"""bge-jax: BGE (BAAI General Embedding) training in JAX/Flax, with Hugging Face conversion.

The public names are imported on first use (PEP 562 module `__getattr__`), so that importing a
submodule that needs no JAX (`bge_jax.data.prepare`, whose worker processes
`launch/prepare_data.py` spawns) does not import jax and flax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["BertConfig", "Encoder", "convert", "preset", "sharding", "weights"]
__version__ = "0.1.0"

# Public name -> (module, attribute; None: the module itself).
_LAZY = {
    "BertConfig": ("bge_jax.config", "BertConfig"),
    "Encoder": ("bge_jax.encoder", "Encoder"),
    "convert": ("bge_jax.convert", None),
    "preset": ("bge_jax.config", "preset"),
    "sharding": ("bge_jax.sharding", None),
    "weights": ("bge_jax.weights", None),
}

if TYPE_CHECKING:  # what type checkers and IDEs see
  from bge_jax import convert, sharding, weights
  from bge_jax.config import BertConfig, preset
  from bge_jax.encoder import Encoder


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  module, attr = _LAZY[name]
  value = importlib.import_module(module)
  if attr is not None:
    value = getattr(value, attr)
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
