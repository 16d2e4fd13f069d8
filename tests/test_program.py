"""The one step builder: AOT compilation and the benchmarks compile the trainer's own program.

The trainer's step is captured as it lowers it (on the 8 fake CPU devices, from real data) and
compared, as StableHLO text, with the program `bge_jax.aot` builds for the same config from the
stage's abstract batch alone; with skip_nonfinite_updates, teacher scores and packed batches on,
each of which changes the program (checked, so the comparison could fail).
"""

import json
import random
import re

import pytest

from conftest import WORDS, make_corpus, make_tokenizer


def _rows(path, n, seed=0):
  """FlagEmbedding rows with teacher scores (pos_scores / neg_scores)."""
  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(n):
      words = rng.sample(WORDS, 4)
      others = [w for w in WORDS if w not in words]
      negs = [" ".join(rng.sample(others, 7)) for _ in range(3)]
      f.write(json.dumps({"query": " ".join(words[:3]), "pos": [" ".join(words + others[:3])],
                          "neg": negs, "pos_scores": [0.9],
                          "neg_scores": [rng.random() for _ in negs]}) + "\n")
  return path


def _config(tmp_path, **keys):
  from bge_jax import config_files
  from bge_jax.config import preset

  c = config_files.load("finetune:tiny")
  c.tokenizer = str(make_tokenizer(tmp_path / "tok"))
  c.data.train = str(_rows(tmp_path / "rows.jsonl", 64))
  c.data.group_size = 2
  c.data.query_instruction = ""  # short queries: the packed rows below hold every batch
  c.data.query_max_length, c.data.passage_max_length = 16, 32
  c.model.max_position_embeddings = 32
  # The trainer sizes a from-scratch vocabulary from the tokenizer, AOT from the preset: the same
  # number here.
  c.model.vocab_size = preset("tiny").vocab_size
  c.batch_size, c.num_train_steps = 16, 1
  c.export = False
  c.skip_nonfinite_updates = True
  c.data.use_teacher_scores = True
  c.data.pack, c.data.pack_rows_fraction = True, 0.5
  return config_files.set_keys(c, keys)


def _canonical(text: str) -> str:
  """StableHLO text with its symbols (@main, @mesh, private functions) renamed in order of first
  appearance: JAX numbers the private functions of a lowering by what the process traced before
  (`@_threefry_fold_in` in one, `@_threefry_fold_in_4` in a later one), nothing else differs."""
  names: dict[str, str] = {}
  return re.sub(r"@[\w.$-]+", lambda m: names.setdefault(m.group(0), f"@s{len(names)}"), text)


def _aot_text(config) -> str:
  from bge_jax import aot

  import jax
  mesh = (config.mesh.data if config.mesh.data > 0 else jax.device_count(), config.mesh.fsdp,
          config.mesh.tensor)
  return _canonical(aot.program_for(config, jax.devices(), mesh).lower().as_text())


@pytest.mark.slow  # a one-step training run (two compiles) and four lowerings: ~1 minute
def test_aot_lowers_the_trainers_own_program(tmp_path, monkeypatch):
  from bge_jax.train import loop, program

  lowered = []
  real_lower = program.TrainProgram.lower

  def recording_lower(self, *args, **kw):
    out = real_lower(self, *args, **kw)
    lowered.append(out.as_text())
    return out

  monkeypatch.setattr(program.TrainProgram, "lower", recording_lower)
  config = _config(tmp_path)
  metrics = loop.train(config, str(tmp_path / "run"))
  assert "loss" in metrics and len(lowered) == 1, len(lowered)
  trainer = _canonical(lowered[0])
  monkeypatch.setattr(program.TrainProgram, "lower", real_lower)

  assert _aot_text(config) == trainer
  # Each feature changes the program, so the equality above is not vacuous.
  for key, value in (("skip_nonfinite_updates", False), ("data.use_teacher_scores", False),
                     ("data.pack", False)):
    assert _aot_text(_config(tmp_path / key, **{key: value})) != trainer, key


@pytest.mark.parametrize("which", ["finetune-packed-teacher", "finetune", "retromae",
                                   "retromae-concatenate"])
def test_abstract_batches_match_the_batchers(tmp_path, which):
  """Stage.abstract_batch gives the shapes and dtypes of the batcher's real global batch."""
  import jax

  from bge_jax import config_files
  from bge_jax.train import init
  from bge_jax.train.stages import get_stage

  if which.startswith("retromae"):
    config = config_files.load("retromae:tiny")
    config.tokenizer = str(make_tokenizer(tmp_path / "tok"))
    # Short texts (3-6 words): several fit one 32-token row when concatenated.
    config.data.train = str(make_corpus(tmp_path / "corpus.jsonl", 128, min_words=3, max_words=6))
    config.data.max_length = 32
    if which == "retromae-concatenate":
      config.data.mode = "concatenate"
  elif which == "finetune":
    config = _config(tmp_path, **{"data.pack": False, "data.use_teacher_scores": False})
  else:
    config = _config(tmp_path)
  stage = get_stage(config.stage)
  tokenizer = init.load_tokenizer(config)
  model_config = stage.model_config(init.model_config_and_weights(config, tokenizer)[0], config)
  batcher = stage.batcher(config, tokenizer, model_config, 0, 1)
  batch = batcher(0)
  abstract = stage.abstract_batch(config, model_config,
                                  devices_per_process=jax.local_device_count())
  assert {k: (v.shape, str(v.dtype)) for k, v in batch.items()} == \
      {k: (v.shape, str(v.dtype)) for k, v in abstract.items()}
  if which == "finetune-packed-teacher":
    assert "teacher_scores" in abstract and "query_segment_ids" in abstract
  if which == "retromae-concatenate":  # the 128 texts concatenated into fewer, longer rows
    assert "blocks of concatenated texts" in batcher.describe()
    assert 8 <= batcher.num_examples < 128 / 3, batcher.num_examples


def test_a_mixing_configs_abstract_batches_match_each_datasets_batches(tmp_path):
  """data.batch_sizes = 16,8: TrainProgram.batch_sizes is [8, 16] and abstract_batch(batch_size=b)
  has the shapes and dtypes of the batcher's real batches of the dataset of global batch b (what
  AOT compiles for each size is what the trainer's steps get)."""
  from bge_jax.train import init, program

  config = _config(tmp_path, **{"data.pack": False})
  config.data.train = f"{config.data.train},{_rows(tmp_path / 'b.jsonl', 48, seed=1)}"
  config.data.batch_sizes = "16,8"
  prog = program.from_config(config)
  assert prog.batch_sizes == [8, 16]
  tokenizer = init.load_tokenizer(config)
  batcher = prog.stage.batcher(config, tokenizer, prog.model_config, 0, 1)
  seen = set()
  for step in range(batcher.steps_per_epoch):
    d, _ = batcher.select(step)
    b = batcher.global_batches[d]
    abstract = prog.abstract_batch(batch_size=b)
    assert {k: (v.shape, str(v.dtype)) for k, v in batcher(step).items()} == \
        {k: (v.shape, str(v.dtype)) for k, v in abstract.items()}, (step, b)
    assert abstract["query_input_ids"].shape[0] == b
    seen.add(b)
  assert seen == {8, 16}
  assert prog.abstract_batch()["query_input_ids"].shape[0] == config.batch_size == 16
