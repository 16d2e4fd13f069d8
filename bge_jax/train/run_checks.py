"""The trainer's guards: config value ranges up front, non-finite steps as the run goes.

`check_ranges` runs first in `loop.train`, before anything compiles or the checkpoint folder is
created: an impossible count or size is one ConfigError line naming the key, not a
ZeroDivisionError mid-run or, for checkpoint.keep=0, a run that deletes every checkpoint it
writes and exits 0.

`NonfiniteWatch` decides, at each of the loop's checks (log and save steps), whether the steps
since the last check may go on: without skip_nonfinite_updates any non-finite step stops the
run; with it, more than config.max_consecutive_nonfinite_steps skipped updates in a row do.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax

from bge_jax import config_files
from bge_jax.train.init import ConfigError

_MISSING = object()


def _at_least(low: float) -> tuple[Callable[[float], bool], str]:
  return (lambda v: v >= low), f">= {low}"


def _above(low: float) -> tuple[Callable[[float], bool], str]:
  return (lambda v: v > low), f"> {low}"


# key -> (test, the allowed range in words). A key the stage's config lacks is not checked; an
# unset placeholder (None) neither. Every value must also be a finite number.
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "batch_size": _at_least(1),
    "grad_accum_steps": _at_least(1),
    "num_train_steps": ((lambda v: v > 0 or v == -1), "> 0, or -1 (steps from config.num_epochs)"),
    "num_epochs": _at_least(0),
    "max_consecutive_nonfinite_steps": _at_least(1),
    "log_every_steps": _at_least(1),
    "checkpoint.every_steps": _at_least(1),
    "checkpoint.keep": _at_least(1),
    "mesh.data": ((lambda v: v >= 1 or v == -1), ">= 1, or -1 (the devices left)"),
    "mesh.fsdp": _at_least(1),
    "mesh.tensor": _at_least(1),
    "model.max_position_embeddings": _at_least(1),
    # 0 is allowed: a run that changes no weight (tests/test_train.py exports the initial ones).
    "optimizer.lr": _at_least(0),
    "optimizer.warmup_steps": _at_least(-1),
    "optimizer.warmup_ratio": ((lambda v: 0 <= v <= 1), "between 0 and 1"),
    "optimizer.clip_norm": _at_least(0),
    "optimizer.weight_decay": _at_least(0),
    "eval.every_steps": _at_least(0),
    "eval.max_length": _at_least(1),
    "eval.batch_size": _at_least(1),
    "data.prefetch": _at_least(0),
    "data.max_length": _at_least(1),
    "data.query_max_length": _at_least(1),
    "data.passage_max_length": _at_least(1),
    "data.group_size": _at_least(1),
    "data.pack_rows_fraction": _at_least(0),
    "loss.gradcache_chunk": _at_least(0),
    "loss.temperature": _above(0),
}


def check_ranges(config: Any) -> None:
  """Raises ConfigError naming the first count, size or rate of `config` out of its range."""
  values = config_files.flat_keys(config)
  for key, (ok, allowed) in _RANGES.items():
    value = values.get(key, _MISSING)
    if value is _MISSING or value is None or isinstance(value, bool):
      continue
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
      raise ConfigError(f"config.{key}={value!r} is out of range: it must be {allowed}; set "
                        f"--config.{key} to such a value.")
  if config.num_train_steps == -1 and not config.num_epochs > 0:
    raise ConfigError(f"config.num_epochs={config.num_epochs!r} must be > 0 when "
                      "config.num_train_steps=-1; set one of them (num_train_steps > 0 wins).")


class NonfiniteWatch:
  """Per-step non-finite counts between the loop's checks, and the decision to stop.

  The step counts a non-finite loss, gradient norm or updated parameter in the TrainState's
  `nonfinite_steps` (cumulative, checkpointed). The loop hands each step's count here as a
  device scalar (`add`, no host sync) and calls `check` before it logs or saves; `check` fetches
  the counts of every step since the previous check at once, so it knows exactly which steps
  were bad, whatever the log and save periods: the consecutive run of skipped updates needs no
  field of its own in the TrainState (whose checkpoint structure stays as it was). The run of a
  resumed run starts at 0: a checkpoint holds the weights before the skipped steps, so at most
  the limit's worth of skips before a save are forgiven by a restart.
  """

  def __init__(self, config: Any, nonfinite_seen: int):
    self.skip = bool(config.get("skip_nonfinite_updates", False))
    self.limit = int(config.get("max_consecutive_nonfinite_steps", 10))
    self.seen = nonfinite_seen  # the cumulative count at the last check
    self.consecutive = 0  # skipped updates in a row up to the last check
    self._pending: list[jax.Array] = []

  def add(self, count: jax.Array) -> None:
    self._pending.append(count)

  def check(self, done: int, values: dict[str, float], manager: Any, log: Any) -> None:
    """Raises FloatingPointError if the steps since the last check may not stand."""
    counts = [int(c) for c in jax.device_get(self._pending)]
    self._pending = []
    first = done - len(counts) + 1
    bad = [first + i for i, c in enumerate(counts) if c > (counts[i - 1] if i else self.seen)]
    bad_set = set(bad)
    if bad and not self.skip:
      raise FloatingPointError(
          f"a NaN/inf loss or gradient, or updated parameters that overflowed, at step {bad[0]} "
          f"(checked at step {done}: loss={values['loss']}, grad_norm={values['grad_norm']}); "
          f"{_kept(manager)} Try a lower config.optimizer.lr or config.optimizer.clip_norm, "
          "config.model.dtype='float32', or config.skip_nonfinite_updates=True to skip such "
          f"updates and go on. {_going_back(manager)}")
    for step in range(first, done + 1):
      self.consecutive = self.consecutive + 1 if step in bad_set else 0
      if self.consecutive > self.limit:
        raise FloatingPointError(
            f"{self.consecutive} consecutive updates with a NaN/inf loss, gradient or updated "
            f"parameters skipped (steps {step - self.consecutive + 1}-{step}), more than "
            f"config.max_consecutive_nonfinite_steps={self.limit}: the run is not recovering. "
            f"{_kept(manager)} Try a lower config.optimizer.lr or config.optimizer.clip_norm, "
            "or config.model.dtype='float32'; raise config.max_consecutive_nonfinite_steps "
            f"only if such stretches are expected. {_going_back(manager)}")
    if bad:
      log.warning("steps %d-%d: %d update(s) with a NaN/inf loss, gradient or updated "
                  "parameters skipped (%d in the run)", first, done, len(bad), counts[-1])
    if counts:
      self.seen = counts[-1]


def _kept(manager: Any) -> str:
  latest = manager.latest_step()
  if latest is None:
    return f"Stopped before any checkpoint was saved in {manager.directory}."
  return f"Stopped with the last good checkpoint (step {latest}) kept in {manager.directory}."


def _going_back(manager: Any) -> str:
  return ("If the weights had already gone bad before that checkpoint (a loss rising for a "
          f"while), delete the newer step folders in {manager.directory} and rerun: it resumes "
          "from the newest step left.")
