"""Training-time validation: the stage's loss on held-out batches (val/*), and keep-best's setup.

The validation loss is the train program's eval step (`TrainProgram.jit_eval`: the stage's loss
on the params, no dropout, the train step's shardings), compiled once before the first step, run
over the run's validation batches (`bge_jax.data.holdout`) and averaged: `val/loss` and the
stage's other loss metrics (stage 1: val/encoder_loss, val/decoder_loss, ...). Each process feeds
its own rows of every global batch, as in training. Time per evaluation: one forward pass per
validation batch, i.e. about a third of a train step's time for each (no backward pass).

Its memory is checked against the device's limit as the train step's is (`memory.check_fits`): a
full global batch in one forward pass can need more than the train step, whose batch is split into
config.grad_accum_steps micro-batches; the run is refused before any step when it cannot fit.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from bge_jax import memory as memory_lib
from bge_jax import sharding
from bge_jax.train.checkpoints import EVAL_PREFIXES, BestExport
from bge_jax.train.init import ConfigError

log = logging.getLogger("bge_jax.train")


def least_over_processes(n: int) -> int:
  """The smallest of every process's `n` (each process its own count)."""
  if jax.process_count() == 1:
    return int(n)
  return int(np.min(multihost_utils.process_allgather(np.asarray(n, np.int64))))


def agreed(flag: bool) -> bool:
  """Process 0's `flag` on every process (a decision that must be the same everywhere)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


class Validator:
  """`validator(params) -> {"val/<metric>": mean over the validation batches}`."""

  def __init__(self, prog: Any, batches: Any):
    self.prog, self.batches = prog, batches
    self.num_batches = least_over_processes(batches.num_batches)
    if self.num_batches < 1:
      raise ConfigError(
          "the validation data fills no global batch on some process (config.batch_size="
          f"{prog.config.batch_size}); hold out more rows (config.data.validation_fraction) or "
          "give more validation data (config.data.validation).")
    self._compiled: dict[tuple, Any] = {}
    probe = batches(0)
    lowered = self._lower(probe)
    self.metric_names = sorted(f"val/{k}" for k in lowered.out_info)
    self._compiled[self._shapes(probe)] = self._checked(lowered.compile())
    log.info("%s; compiled eval step", batches.describe())

  def _checked(self, compiled: Any) -> Any:
    """`compiled`, refused (MemoryError) when it needs more memory than the device has."""
    c = self.prog.config
    accum = c.get("grad_accum_steps", 1)
    what = ("the eval step (the validation loss: the stage's loss, forward only, on a full "
            f"global batch of config.batch_size={c.batch_size} rows"
            + (f", not split into the train step's config.grad_accum_steps={accum} micro-batches"
               if accum > 1 else "") + ")")
    fixes = (f"lower config.batch_size (now {c.batch_size}; the validation batches are full "
             "global batches of it), set config.loss.gradcache_chunk (stages 2 and 3: the forward "
             "pass runs one chunk of the batch at a time), shard the parameters over more devices "
             "with config.mesh.fsdp, or turn the validation loss off "
             "(config.data.validation_fraction=0 and config.data.validation='')")
    memory_lib.check_fits(compiled, what, fixes, log)
    return compiled

  @staticmethod
  def _shapes(local: dict[str, np.ndarray]) -> tuple:
    return tuple((k, np.shape(v)) for k, v in sorted(local.items()))

  def _global(self, local: dict[str, np.ndarray], abstract: bool = False) -> dict[str, Any]:
    shardings = self.prog.batch_sharding(local)
    if abstract:
      count = jax.process_count()
      return {k: jax.ShapeDtypeStruct((np.shape(v)[0] * count,) + np.shape(v)[1:] if np.ndim(v)
                                      else (), np.asarray(v).dtype, sharding=shardings[k])
              for k, v in local.items()}
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}

  def _lower(self, local: dict[str, np.ndarray]):
    with sharding.activate(self.prog.mesh):
      return self.prog.jit_eval(local).lower(self.prog.abstract_state.params,
                                             self._global(local, abstract=True))

  def __call__(self, params: Any) -> dict[str, float]:
    total = None
    for i in range(self.num_batches):
      local = self.batches(i)
      shapes = self._shapes(local)
      if shapes not in self._compiled:
        self._compiled[shapes] = self._checked(self._lower(local).compile())
      with sharding.activate(self.prog.mesh):
        out = self._compiled[shapes](params, self._global(local))
      total = out if total is None else jax.tree.map(lambda a, b: a + b, total, out)
    return {f"val/{k}": float(v) / self.num_batches for k, v in jax.device_get(total).items()}


def make_best(config: Any, workdir: str, validator: Validator | None,
              evaluator: Callable | None) -> BestExport | None:
  """config.checkpoint.keep_best's BestExport (None when unset), refusing before training a
  metric that cannot appear: not val/* or eval/*, val/* without validation data or not among the
  stage's loss metrics, eval/* without config.eval or not among the evaluator's `metric_names`
  (an evaluator without them: checked at the first evaluation)."""
  c = config.checkpoint
  metric = c.get("keep_best", "") or ""
  if not metric:
    return None
  best = BestExport(workdir, metric, c.get("keep_best_mode", "auto"))
  if metric.startswith("val/"):
    if validator is None:
      raise ConfigError(f"config.checkpoint.keep_best={metric!r} needs validation data: set "
                        "config.data.validation_fraction (rows held out of data.train) or "
                        "config.data.validation (files).")
    best.check_available(validator.metric_names, "by the validation loss")
  elif metric.startswith("eval/"):
    if evaluator is None:
      raise ConfigError(f"config.checkpoint.keep_best={metric!r} needs config.eval (the "
                        "evaluation that logs eval/*); set its tasks, or keep the best by a "
                        "val/* metric.")
    if getattr(evaluator, "metric_names", None) is not None:
      best.check_available(evaluator.metric_names, "by config.eval")
  else:
    available = validator.metric_names if validator is not None else []
    raise ConfigError(f"config.checkpoint.keep_best={metric!r} must name a metric computed at "
                      f"evaluation points (names starting with {' or '.join(EVAL_PREFIXES)}), "
                      f"e.g. {available or ['val/loss', 'eval/sts/stsb']}.")
  if best.step is not None:
    log.info("keep_best: the best %s so far is %.6g at step %d (%s)", metric, best.value,
             best.step, best.directory)
  return best
