"""The stage interface and registry: all the trainer, AOT and benchmarks know of a stage.

A stage supplies its model parts, loss, host batches, abstract batch (shapes and dtypes for a
config, with no data), step FLOPs and exports. Nothing outside the stage modules and this
registry names a stage (tests/test_stages.py checks): adding one is a module with an object of
this protocol and a line in `_REGISTRY`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Protocol

import jax
import numpy as np

from bge_jax.config import BertConfig
from bge_jax.flops import StepFlops


class ValidationBatches(Protocol):
  """Process-local batches of a run's validation data (`bge_jax.data.holdout.HeldOutBatches`):
  full global batches, each a pure function of its index (the same at every evaluation)."""

  num_batches: int  # this process's count (the trainer uses the least over processes)

  def __call__(self, index: int) -> dict[str, np.ndarray]: ...

  def describe(self) -> str: ...


class Batcher(Protocol):
  """Process-local host batches as a pure function of the step (so resume is exact)."""

  num_examples: int  # examples this process reads (its shard of the source)
  # The held-out validation batches (data.validation_fraction / data.validation), or None.
  validation: ValidationBatches | None

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

  def abstract_batch(self, config: Any, model_config: BertConfig, *, process_count: int = 1,
                     devices_per_process: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes and dtypes (no shardings) that `batcher` yields for `config`:
    what AOT compilation, memory checks and benchmarks compile for, without data."""

  def step_flops(self, config: Any, model_config: BertConfig, batch: Mapping[str, Any],
                 process_count: int = 1) -> StepFlops:
    """Analytic FLOPs of one train step (`bge_jax.flops`) from a process-local batch's shapes
    (anything with `.shape`); the global batch is `process_count` times it."""

  def export(self, params: Any, model_config: BertConfig, tokenizer: Any, out_dir: str,
             config: Any) -> list[str]:
    """Writes the stage's artefacts under out_dir; returns their paths."""


_REGISTRY = {
    "retromae": "bge_jax.retromae:STAGE",
    "contrastive": "bge_jax.contrastive:CONTRASTIVE",
    "finetune": "bge_jax.contrastive:FINETUNE",
}


STAGE_NAMES = tuple(_REGISTRY)


def get_stage(name: str) -> Stage:
  if name not in _REGISTRY:
    raise ValueError(f"config.stage={name!r} is not a stage; choose one of {sorted(_REGISTRY)}")
  module, attr = _REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), attr)
