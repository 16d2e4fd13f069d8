"""Training-time validation: held-out rows never trained on, val/* logged and equal to the loss
computed directly (unsharded, outside the trainer), the same on every evaluation and resume."""

import json

import numpy as np
import pytest

from test_train import corpus_and_tokenizer, tiny_retromae  # noqa: F401 (fixture)
from test_train_contrastive import data, tiny  # noqa: F401 (fixture)


def test_held_out_rows_are_a_function_of_the_data_size_alone():
  from bge_jax.data import holdout
  a, b = holdout.held_out(1000, 0.1), holdout.held_out(1000, 0.1)
  assert len(a) == 100 and np.array_equal(a, b) and np.all(np.diff(a) > 0)
  assert not np.array_equal(a, np.arange(100))  # spread over the data, not its head
  rows = list(range(1000))
  config = type("D", (), {"get": lambda self, k, d=None: {"validation_fraction": 0.1}.get(k, d)})()
  train, val = holdout.split(rows, config)
  assert sorted(set(train.indices) | set(val.indices)) == rows
  assert not set(train.indices) & set(val.indices)
  shards = [train.shard(p, 3) for p in range(3)]
  assert sorted(i for s in shards for i in s.indices) == sorted(train.indices)


@pytest.mark.parametrize("key, value, pattern", [
    ("data.validation_fraction", 1.0, r"validation_fraction=1.0 must be in \[0, 1\)"),
    ("data.validation", "x.jsonl", r"both set"),
])
def test_bad_validation_keys_are_refused(corpus_and_tokenizer, tmp_path, key, value,  # noqa: F811
                                         pattern):
  from bge_jax.train.loop import train
  corpus, tok = corpus_and_tokenizer
  c = tiny_retromae(corpus, tok, 1, export=False, **{"data.validation_fraction": 0.2, key: value})
  with pytest.raises(ValueError, match=pattern):
    train(c, str(tmp_path / "w"))


def _texts_of(batcher, steps):
  """The token rows (unmasked: decoder_input_ids) a stage-1 batcher feeds over `steps`."""
  return {tuple(row[row > 0]) for s in steps for row in batcher(s)["decoder_input_ids"]}


def test_stage1_held_out_texts_are_never_trained_on_by_any_process(corpus_and_tokenizer,  # noqa: F811
                                                                   tmp_path):
  from bge_jax.train import init
  from bge_jax.train.stages import get_stage
  from conftest import make_corpus
  _, tok = corpus_and_tokenizer
  # Short distinct texts: none truncated, so equal token rows mean the same text.
  corpus = make_corpus(tmp_path / "short.jsonl", 256, min_words=4, max_words=9)
  c = tiny_retromae(corpus, tok, 1, **{"data.validation_fraction": 0.25, "data.dedupe": True})
  tokenizer = init.load_tokenizer(c)
  stage = get_stage("retromae")
  model_config = stage.model_config(init.model_config_and_weights(c, tokenizer)[0], c)
  trained, validated = set(), set()
  for p in range(2):  # two processes: each its own rows of training and of validation batches
    b = stage.batcher(c, tokenizer, model_config, p, 2)
    steps_per_epoch = b.num_examples // 4
    trained |= _texts_of(b, range(2 * steps_per_epoch))  # two epochs
    v = b.validation
    assert v.num_batches >= 4
    validated |= _texts_of(v, range(v.num_batches))
    again = v(0)
    np.testing.assert_array_equal(again["decoder_attention_mask"],
                                  v(0)["decoder_attention_mask"])  # masks seeded: same each time
  assert len(validated) >= 4 * 8 and len(trained) > 100
  assert not trained & validated


def test_stage2_held_out_rows_are_never_trained_on(data):  # noqa: F811
  from bge_jax.train import init
  from bge_jax.train.stages import get_stage
  rows, tok = data
  c = tiny("contrastive", rows, tok, 1, **{"data.validation_fraction": 0.25})
  tokenizer = init.load_tokenizer(c)
  stage = get_stage("contrastive")
  model_config = stage.model_config(init.model_config_and_weights(c, tokenizer)[0], c)
  b = stage.batcher(c, tokenizer, model_config, 0, 1)
  queries = lambda bt, steps: {q for s in steps for q in bt.examples(s)[2]}  # noqa: E731
  trained = queries(b, range(3 * b.steps_per_epoch))
  v = b.validation
  assert v.num_batches == 64 // 16
  validated = {q for i in range(v.num_batches) for q in v.batcher.examples(i)[2]}
  assert len(validated) > 40 and not trained & validated


def test_stage2_prepared_data_holds_out_the_jsonl_paths_rows(data, tmp_path):  # noqa: F811
  """data.validation_fraction on a prepared folder of the same rows as the JSONL file: the stage
  holds out the same rows (chosen by the row count alone), so every process's training and
  validation batches are equal, and so is the validation loss on the same parameters."""
  import jax

  from bge_jax.data import prepare
  from bge_jax.data.prepared import PreparedPairs
  from bge_jax.models import bert
  from bge_jax.train import init
  from bge_jax.train.stages import get_stage
  rows, tok = data
  prepare.prepare([str(rows)], str(tmp_path / "prep"), rows_per_shard=100, progress=False)
  configs = [tiny("contrastive", path, tok, 1, **{"data.validation_fraction": 0.25,
                                                  "data.pack_rows_fraction": 1.0})
             for path in (rows, tmp_path / "prep")]
  stage = get_stage("contrastive")
  tokenizer = init.load_tokenizer(configs[0])
  model_config = stage.model_config(init.model_config_and_weights(configs[0], tokenizer)[0],
                                    configs[0])
  for p in range(2):
    jsonl, prep = (stage.batcher(c, tokenizer, model_config, p, 2) for c in configs)
    assert isinstance(prep.sources[0], PreparedPairs) and prep.sources[0].indices is not None
    assert jsonl.steps_per_epoch == prep.steps_per_epoch == 192 // 16
    for step in (0, 1, 2, prep.steps_per_epoch - 1, prep.steps_per_epoch):  # and the next epoch
      a, b = jsonl(step), prep(step)
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"process {p} step {step} {k}")
    assert jsonl.validation.num_batches == prep.validation.num_batches == 64 // 16
    for i in range(prep.validation.num_batches):
      a, b = jsonl.validation(i), prep.validation(i)
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"process {p} validation {i} {k}")
  # The validation loss of the tiny preset's initial parameters on each run's batches.
  params = jax.jit(lambda key: bert.init(model_config, key)[0])(jax.random.key(0))
  loss = jax.jit(lambda b: stage.loss_fn(configs[0], model_config)(params, b, None)["loss"])
  losses = [np.mean([float(loss(v(i))) for i in range(v.num_batches)]) for v in
            (stage.batcher(c, tokenizer, model_config, 0, 1).validation for c in configs)]
  assert np.isfinite(losses[0]) and losses[0] == losses[1]


def _direct_val_loss(stage_name, config, params):
  """The stage's loss (no dropout) on the validation batches, one device, no jit, averaged."""
  from bge_jax.train import init
  from bge_jax.train.stages import get_stage
  stage = get_stage(stage_name)
  tokenizer = init.load_tokenizer(config)
  model_config = stage.model_config(init.model_config_and_weights(config, tokenizer)[0], config)
  v = stage.batcher(config, tokenizer, model_config, 0, 1).validation
  loss = stage.loss_fn(config, model_config)
  return np.mean([float(loss(params, v(i), None)["loss"]) for i in range(v.num_batches)])


def test_stage1_validation_loss_is_logged_and_equals_the_direct_loss(corpus_and_tokenizer,  # noqa: F811
                                                                      tmp_path):
  from bge_jax import weights
  from bge_jax.train.loop import train
  from bge_jax.train.metrics import read_metrics
  corpus, tok = corpus_and_tokenizer
  c = tiny_retromae(corpus, tok, 4, export=False, **{
      "data.validation_fraction": 0.25, "eval.every_steps": 2, "checkpoint.every_steps": 2,
      "checkpoint.keep": 5})
  train(c, str(tmp_path / "w"))
  rows = read_metrics(str(tmp_path / "w"))
  val = {r["step"]: r for r in rows if "val/loss" in r}
  assert sorted(val) == [0, 2, 4]
  for key in ("val/encoder_loss", "val/decoder_loss"):
    assert key in val[4]
  for step in (2, 4):
    _, _, params = weights.load_run_params(str(tmp_path / "w"), step)
    assert val[step]["val/loss"] == pytest.approx(_direct_val_loss("retromae", c, params),
                                                  rel=1e-5)
  assert val[4]["val/loss"] < val[0]["val/loss"]


def test_stage2_validation_loss_from_a_file(data, tmp_path):  # noqa: F811
  from bge_jax import weights
  from bge_jax.train.loop import train
  from bge_jax.train.metrics import read_metrics
  from test_train_contrastive import make_rows
  rows, tok = data
  val_file = make_rows(tmp_path / "val.jsonl", 40, seed=7)
  c = tiny("contrastive", rows, tok, 2, export=False,
           **{"data.validation": str(val_file), "checkpoint.every_steps": 2})
  train(c, str(tmp_path / "w"))
  logged = {r["step"]: r for r in read_metrics(str(tmp_path / "w")) if "val/loss" in r}
  assert sorted(logged) == [0, 2]
  _, _, params = weights.load_run_params(str(tmp_path / "w"), 2)
  assert logged[2]["val/loss"] == pytest.approx(_direct_val_loss("contrastive", c, params),
                                                rel=1e-5)
  info = json.loads((tmp_path / "w" / "run_info.json").read_text())
  assert info  # the run recorded its start as usual


@pytest.mark.slow
def test_two_processes_validate_on_their_rows_of_the_global_batches(tmp_path):
  """launch/train.py as 2 processes: val/loss equals the loss on the global validation batches
  assembled from both processes' rows (computed here in one process, without the trainer)."""
  from bge_jax import weights
  from bge_jax.train import init
  from bge_jax.train.metrics import read_metrics
  from bge_jax.train.stages import get_stage
  from test_multihost import overrides, run_two_processes
  from test_train import load_config, override

  values = dict(overrides("retromae", tmp_path), **{
      "data.validation_fraction": 0.25, "eval.every_steps": 2, "checkpoint.keep": 5})
  workdir = tmp_path / "multi"
  procs, outputs = run_two_processes("retromae", workdir, values, tmp_path)
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  logged = {r["step"]: r["val/loss"] for r in read_metrics(str(workdir)) if "val/loss" in r}

  config = override(load_config("retromae", "tiny"), **values)
  stage, tokenizer = get_stage("retromae"), init.load_tokenizer(config)
  model_config = stage.model_config(init.model_config_and_weights(config, tokenizer)[0], config)
  parts = [stage.batcher(config, tokenizer, model_config, p, 2).validation for p in range(2)]
  n = min(v.num_batches for v in parts)
  batches = [{k: np.concatenate([v(i)[k] for v in parts]) for k in parts[0](i)} for i in range(n)]
  loss = stage.loss_fn(config, model_config)
  for step in sorted(s for s in logged if s > 0):
    _, _, params = weights.load_run_params(str(workdir), step)
    direct = np.mean([float(loss(params, b, None)["loss"]) for b in batches])
    assert logged[step] == pytest.approx(direct, rel=1e-5), step
