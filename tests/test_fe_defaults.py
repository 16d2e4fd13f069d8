"""Defaults that map to a FlagEmbedding (HF Trainer) argument take its value: weight decay, warmup
rounding, the learning rate by the initial model's size."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import types

import pytest

from bge_jax import config as config_lib
from bge_jax.config import preset
from bge_jax.config_files import load
from bge_jax.train import program as program_lib
from bge_jax.train.state import make_optimizer, warmup_steps

FAMILIES = ("retromae:tiny", "retromae:bge-base-en", "contrastive:bge-small-en", "finetune:tiny",
            "finetune:bge-large-zh", "demo:retromae", "demo:contrastive", "demo:finetune")


@pytest.mark.parametrize("name", FAMILIES)
def test_weight_decay_is_the_hf_trainers_default(name):
  from transformers import TrainingArguments

  hf_default = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}["weight_decay"]
  assert hf_default == 0.0
  assert load(name).optimizer.weight_decay == hf_default


def hf_warmup_steps(ratio: float, total: int) -> int:
  """The installed transformers' own rounding (TrainingArguments.get_warmup_steps): transformers
  5 reads a ratio from warmup_steps < 1, 4.x (FlagEmbedding 1.2.11) from warmup_ratio."""
  import transformers
  from transformers import TrainingArguments

  v5 = int(transformers.__version__.split(".")[0]) >= 5
  args = types.SimpleNamespace(warmup_steps=ratio if v5 else 0, warmup_ratio=ratio)
  return TrainingArguments.get_warmup_steps(args, total)


@pytest.mark.parametrize("ratio,total", [(0.1, 1), (0.1, 15), (0.1, 1001), (0.06, 50), (0.3, 7),
                                         (0.0, 100), (0.5, 9)])
def test_warmup_steps_round_up_as_hf(ratio, total):
  expected = hf_warmup_steps(ratio, total)
  assert expected == math.ceil(ratio * total)
  assert warmup_steps({"warmup_ratio": ratio, "warmup_steps": -1}, total) == expected
  # The schedule reaches the peak exactly at that step.
  _, schedule = make_optimizer({"lr": 1.0, "warmup_ratio": ratio, "warmup_steps": -1}, total)
  if expected:
    assert float(schedule(expected)) == pytest.approx(1.0)
    assert float(schedule(expected - 1)) < 1.0
  assert warmup_steps({"warmup_ratio": 0.5, "warmup_steps": 3}, 100) == 3  # explicit steps win


def test_lr_for_size_follows_the_preset_table():
  assert config_lib.lr_for_size(384, 6) == (3e-5, "bge-small-zh")  # all-MiniLM-L6
  assert config_lib.lr_for_size(384, 12)[0] == 3e-5
  assert config_lib.lr_for_size(768, 12)[0] == 2e-5
  assert config_lib.lr_for_size(1024, 12)[0] == 2e-5  # 12 x 1024^2: nearer base than large
  assert config_lib.lr_for_size(1024, 24)[0] == 1e-5
  assert config_lib.lr_for_size(64, 2) == (1e-3, "tiny")
  for name in config_lib.PRESETS:  # every preset's own shape gives its own lr
    shape = preset(name)
    assert config_lib.lr_for_size(shape.hidden_size, shape.num_layers)[0] == \
        config_lib.preset_lr(name)


def test_unset_lr_comes_from_the_initial_model_not_the_preset_name(minilm_path, caplog):
  """MiniLM (6 x 384) under the `tiny` and `bge-base-en` preset names trains at the small lr,
  3e-5, and the choice is logged; from scratch the preset's own; a set lr always wins."""
  hf = json.load(open(f"{minilm_path}/config.json"))
  minilm = preset("tiny").replace(hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                                  num_heads=hf["num_attention_heads"])
  for name in ("contrastive:tiny", "finetune:bge-base-en"):
    c = load(name)
    assert c.optimizer.lr is None
    c.model.init_from = minilm_path
    with caplog.at_level(logging.INFO, logger="bge_jax.train.program"):
      assert program_lib.optimizer_options(c, minilm)["lr"] == 3e-5
    assert "optimizer.lr unset: 3e-05, by the initial model's size: 6 layers x hidden 384" in \
        caplog.text
    c.model.init_from = ""
    assert program_lib.optimizer_options(c, preset(c.model.preset))["lr"] == \
        config_lib.preset_lr(c.model.preset)
    c.optimizer.lr = 7e-5
    c.model.init_from = minilm_path
    assert program_lib.optimizer_options(c, minilm)["lr"] == 7e-5


def test_the_built_program_trains_at_the_chosen_lr(minilm_path):
  """The whole path: a config naming bge-large-en but initialised from MiniLM builds a program
  whose schedule peaks at MiniLM's lr (3e-5), not large's (1e-5)."""
  c = load("contrastive:bge-large-en")
  c.model.init_from = minilm_path
  c.optimizer.warmup_steps = 2
  c.num_train_steps = 10
  prog = program_lib.from_config(c)
  assert prog.model_config.hidden_size == 384
  assert float(prog.schedule(2)) == pytest.approx(3e-5)


def test_packing_is_on_by_default_where_it_gives_the_padded_loss():
  """data.pack unset packs (the same loss and gradients as the padded batch: tests/test_packing.py,
  tests/test_contrastive.py), except where packing does not serve the run: micro-batches and
  per-dataset batch sizes; set values win."""
  from bge_jax.data.pairs import use_packing

  for name in ("contrastive:bge-small-en", "finetune:tiny", "demo:contrastive", "demo:finetune"):
    c = load(name)
    assert c.data.pack is None and use_packing(c), name
  c = load("finetune:tiny")
  c.grad_accum_steps = 2
  assert not use_packing(c)
  c.grad_accum_steps = 1
  c.data.batch_sizes = f"{c.batch_size},{2 * c.batch_size}"
  assert not use_packing(c)
  c.data.batch_sizes = f"{c.batch_size},{c.batch_size}"  # one size: packing serves it
  assert use_packing(c)
  c.data.pack = False
  assert not use_packing(c)
  c.data.pack = True
  c.grad_accum_steps = 2
  assert use_packing(c)  # forced: packed_rows then refuses it with the fix
