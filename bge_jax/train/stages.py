"""What the trainer knows of a stage: its model parts, loss, host batches and exports."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Protocol

import jax
import numpy as np

from bge_jax.config import BertConfig


class Batcher(Protocol):
  """Process-local host batches as a pure function of the step (so resume is exact)."""

  num_examples: int  # examples this process reads (its shard of the source)

  def __call__(self, step: int) -> dict[str, np.ndarray]: ...

  def real_tokens(self, batch: Mapping[str, np.ndarray]) -> int: ...

  def describe(self) -> str: ...


class Stage(Protocol):
  name: str

  def model_config(self, base: BertConfig, config: Any) -> BertConfig:
    """The model parts the stage trains (e.g. RetroMAE adds the MLM head and decoder)."""

  def loss_fn(self, config: Any, model_config: BertConfig) -> Callable[
      [Any, Mapping[str, jax.Array], jax.Array | None], dict[str, jax.Array]]:
    """`(params, batch, rng) -> metrics` with a scalar "loss"; rng=None means no dropout."""

  def batcher(self, config: Any, tokenizer: Any, model_config: BertConfig,
              process_index: int, process_count: int) -> Batcher: ...

  def export(self, params: Any, model_config: BertConfig, tokenizer: Any, out_dir: str,
             config: Any) -> list[str]:
    """Writes the stage's artefacts under out_dir; returns their paths."""


_REGISTRY = {
    "retromae": "bge_jax.retromae:STAGE",
    "contrastive": "bge_jax.contrastive:CONTRASTIVE",
    "finetune": "bge_jax.contrastive:FINETUNE",
}


def get_stage(name: str) -> Stage:
  if name not in _REGISTRY:
    raise ValueError(f"config.stage={name!r} is not a stage; choose one of {sorted(_REGISTRY)}")
  module, attr = _REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), attr)
