"""Run-level refusals and stops (bge_jax/train/run_checks.py): out-of-range config values, updates
that overflow the parameters, and too many consecutive skipped updates.

In-process runs of loop.train on the tiny stage-1 config (8 fake CPU devices, tests/conftest.py).
"""

import math

import numpy as np
import pytest

from conftest import make_corpus, make_tokenizer, saved_steps
from test_reliability import tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("checks")
  return {"corpus": make_corpus(root / "train.jsonl", 128), "tok": make_tokenizer(root / "tok")}


# ---------------------------------------------------------------------------------------------
# Range checks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("batch_size", 0), ("batch_size", -8), ("grad_accum_steps", 0), ("num_train_steps", 0),
    ("num_train_steps", -2), ("num_epochs", -1.0), ("checkpoint.every_steps", 0),
    ("checkpoint.keep", 0), ("log_every_steps", 0), ("eval.every_steps", -1),
    ("data.prefetch", -1), ("data.max_length", 0),
    ("optimizer.lr", -1e-3), ("optimizer.lr", math.nan), ("optimizer.warmup_steps", -2),
    ("optimizer.clip_norm", -1.0), ("max_consecutive_nonfinite_steps", 0), ("mesh.fsdp", 0),
])
def test_out_of_range_value_is_refused_naming_the_key(data, tmp_path, key, value):
  from bge_jax.train.init import ConfigError
  from bge_jax.train.loop import train
  with pytest.raises(ConfigError, match=rf"config\.{key}={value!r} .*must be "):
    train(tiny_config(data, **{key: value}), str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_contrastive_lengths_and_group_size_are_checked():
  """Keys a stage's config has are checked; keys it lacks (data.max_length here) are not."""
  from bge_jax.train import run_checks
  from bge_jax.train.init import ConfigError
  from test_train import load_config, override
  run_checks.check_ranges(load_config("finetune", "tiny"))
  for key, value in (("data.query_max_length", 0), ("data.passage_max_length", 0),
                     ("data.group_size", 0), ("loss.gradcache_chunk", -1)):
    with pytest.raises(ConfigError, match=rf"config\.{key}={value} .*must be >= "):
      run_checks.check_ranges(override(load_config("finetune", "tiny"), **{key: value}))
  with pytest.raises(ConfigError, match=r"config\.num_epochs=0\.0 .*config\.num_train_steps=-1"):
    run_checks.check_ranges(override(load_config("finetune", "tiny"), num_epochs=0.0))


# ---------------------------------------------------------------------------------------------
# Non-finite parameters
# ---------------------------------------------------------------------------------------------

def test_update_that_overflows_the_params_counts_as_nonfinite():
  """Loss (-3e38) and gradient (-1) finite, the updated weight inf (3e38 + 1e38 in float32): the
  step is counted as non-finite, and with skip_nonfinite its update is dropped."""
  import jax
  import jax.numpy as jnp

  from bge_jax.train import state as state_lib

  tx, schedule = state_lib.make_optimizer(
      {"lr": 1e38, "warmup_steps": 0, "weight_decay": 0.0, "clip_norm": 0.0}, 10)

  def loss_fn(params, batch, rng):
    return {"loss": -jnp.sum(params["w"] * batch["x"])}

  params = {"w": jnp.full((1,), 3e38, jnp.float32)}
  for skip in (False, True):
    step = jax.jit(state_lib.make_train_step(loss_fn, tx, schedule, skip_nonfinite=skip))
    new, metrics = step(state_lib.init_state(params, tx), {"x": jnp.ones((1, 1))},
                        jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["nonfinite_steps"]) == 1
    assert np.isfinite(np.asarray(new.params["w"])).all() == skip


def _restored_params(workdir, step):
  import jax
  import orbax.checkpoint as ocp
  path = workdir / "checkpoints" / str(step) / "default"
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, restore_args=args)["params"]


def test_overflowing_update_never_becomes_the_last_good_checkpoint(data, tmp_path):
  """Steps 1-2 train normally; resumed with lr=1e39 (inf in float32) step 3's loss and gradient
  are finite but its update makes the weights inf/NaN. The run stops there, before saving it:
  every checkpoint left restores to finite weights, and the message says how to go back."""
  import jax

  from bge_jax.train.loop import train

  workdir = tmp_path / "run"
  every = {"checkpoint.every_steps": 1, "checkpoint.keep": 10, "log_every_steps": 1,
           "optimizer.warmup_steps": 0}
  train(tiny_config(data, num_train_steps=2, **every), str(workdir))
  assert saved_steps(workdir) == [1, 2]
  with pytest.raises(FloatingPointError) as stop:
    train(tiny_config(data, num_train_steps=4, **every, **{"optimizer.lr": 1e39}), str(workdir),
          accept_config_changes=True)  # the resume changes the lr on purpose
  message = str(stop.value)
  assert "at step 3" in message and "last good checkpoint (step 2)" in message, message
  assert "delete the newer step folders" in message, message
  assert saved_steps(workdir) == [1, 2]
  for step in saved_steps(workdir):
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_restored_params(workdir, step)))


# ---------------------------------------------------------------------------------------------
# Consecutive skipped updates
# ---------------------------------------------------------------------------------------------

class _PoisonedStage:
  """The stage with a NaN added to the loss of the given steps (1-based), through a 0-d batch
  entry (replicated, like a contrastive batch's flags): a loss NaN on chosen steps only."""

  def __init__(self, stage, bad_steps):
    self._stage, self._bad = stage, set(bad_steps)

  def __getattr__(self, name):
    return getattr(self._stage, name)

  def batcher(self, *args, **kwargs):
    inner, bad = self._stage.batcher(*args, **kwargs), self._bad

    class Batcher:
      num_examples = inner.num_examples

      def __call__(self, step):
        return dict(inner(step), poison=np.float32(np.nan if step + 1 in bad else 0.0))

      def real_tokens(self, batch):
        return inner.real_tokens(batch)

      def describe(self):
        return inner.describe()

    return Batcher()

  def loss_fn(self, config, model_config):
    loss = self._stage.loss_fn(config, model_config)

    def poisoned(params, batch, rng):
      out = loss(params, {k: v for k, v in batch.items() if k != "poison"}, rng)
      return dict(out, loss=out["loss"] + batch["poison"])

    return poisoned


def _run_with_bad_steps(monkeypatch, data, workdir, bad_steps):
  from bge_jax.train import loop
  real = loop.get_stage
  monkeypatch.setattr(loop, "get_stage", lambda name: _PoisonedStage(real(name), bad_steps))
  # Checks at steps 4, 5, 8, 10, 12: a run of bad steps spans two checks.
  return loop.train(tiny_config(data, **{
      "num_train_steps": 12, "skip_nonfinite_updates": True, "max_consecutive_nonfinite_steps": 3,
      "log_every_steps": 5, "checkpoint.every_steps": 4, "checkpoint.keep": 10}), str(workdir))


@pytest.mark.parametrize("bad_steps, stop_at, first", [
    (range(2, 13), 5, 2),  # NaN on most steps: the 4th in a row is step 5
    (range(4, 9), 8, 4),  # steps 4-8: the checks at 5 and 8 each see a good step
])
def test_too_many_consecutive_skipped_updates_stop_the_run(monkeypatch, data, tmp_path,
                                                           bad_steps, stop_at, first):
  workdir = tmp_path / "run"
  with pytest.raises(FloatingPointError, match=r"config\.max_consecutive_nonfinite_steps=3") as e:
    _run_with_bad_steps(monkeypatch, data, workdir, bad_steps)
  assert f"steps {first}-{first + 3}" in str(e.value), str(e.value)
  assert max(saved_steps(workdir)) < stop_at


def test_fewer_consecutive_skipped_updates_than_the_limit_finish(monkeypatch, data, tmp_path):
  last = _run_with_bad_steps(monkeypatch, data, tmp_path / "run", [2, 3, 4, 6, 7, 8, 10, 11, 12])
  assert last["nonfinite_steps"] == 9 and saved_steps(tmp_path / "run")[-1] == 12
