"""bge_jax.config_files (load by path or bundled name, flat keys, suggestions) and the presets'
own fine-tuning learning rates."""

import re

import pytest
from ml_collections import ConfigDict

from bge_jax import config as config_lib
from bge_jax import config_files
from conftest import REPO


def test_load_by_path_with_and_without_arg():
  tiny = config_files.load(f"{REPO / 'configs' / 'finetune.py'}:tiny")
  assert tiny.stage == "finetune" and tiny.model.preset == "tiny" and tiny.batch_size == 16
  default = config_files.load(str(REPO / "configs" / "finetune.py"))  # get_config()
  assert default.model.preset == "bge-small-en"
  zh = config_files.load(f"{REPO / 'configs' / 'finetune.py'}:bge-base-zh")
  assert zh.data.query_instruction.startswith("为这个句子")


def test_load_any_file_and_a_bundled_name(tmp_path):
  own = tmp_path / "own.py"
  own.write_text("from configs.common import base_config\n"  # configs/ is importable
                 "def get_config(arg='x'):\n"
                 "  c = base_config()\n"
                 "  c.stage = arg\n"
                 "  return c\n")
  assert config_files.load(str(own)).stage == "x"
  assert config_files.load(f"{own}:y").stage == "y"
  assert config_files.load("retromae:tiny").to_dict() == config_files.load(
      f"{REPO / 'configs' / 'retromae.py'}:tiny").to_dict()
  assert config_files.load("contrastive").model.preset == "bge-small-en"
  demo = config_files.load("demo:contrastive,runs/x")  # imports its sibling configs
  assert demo.model.init_from == "runs/x/stage1/export/hf"
  assert "finetune" in config_files.bundled() and "common" not in config_files.bundled()


def test_missing_file_or_get_config_names_the_file(tmp_path):
  missing = tmp_path / "nope.py"
  with pytest.raises(config_files.ConfigFileError,
                     match=f"no config file {re.escape(str(missing))}$"):
    config_files.load(f"{missing}:tiny")
  with pytest.raises(config_files.ConfigFileError,
                     match=r"configs/nope\.py; the bundled configs are contrastive, demo"):
    config_files.load("nope:tiny")
  empty = tmp_path / "empty.py"
  empty.write_text("X = 1\n")
  with pytest.raises(config_files.ConfigFileError,
                     match=f"{re.escape(str(empty))} has no get_config"):
    config_files.load_module(str(empty))


def test_flat_keys_of_a_nested_config():
  c = ConfigDict({"seed": 0, "optimizer": {"lr": 1e-3, "schedule": {"kind": "linear"}},
                  "data": {"train": ""}})
  assert config_files.flat_keys(c) == {"seed": 0, "optimizer.lr": 1e-3,
                                       "optimizer.schedule.kind": "linear", "data.train": ""}


@pytest.mark.parametrize("key, expected", [
    ("optimizer.lrr", "; did you mean config.optimizer.lr?"),  # a misspelt leaf: its siblings
    ("optimiser.lr", "; did you mean config.optimizer.lr?"),  # a misspelt parent
    ("lr", "; did you mean config.optimizer.lr?"),  # a leaf under another parent
    ("checkpoint.every_step", "; did you mean config.checkpoint.every_steps, "
     "config.eval.every_steps, config.log_every_steps?"),
    ("zzz.qqq", ""),
])
def test_suggest_close_keys(key, expected):
  keys = config_files.flat_keys(config_files.load("finetune:tiny"))
  assert config_files.suggest(key, keys) == expected
  assert config_files.suggest(key, keys, prefix="") == expected.replace("config.", "")


def test_every_preset_has_its_own_lr():
  assert {n: config_lib.preset_lr(n) for n in config_lib.PRESETS} == {
      "tiny": 1e-3, "bge-small-zh": 3e-5, "bge-small-en": 3e-5, "bge-base-zh": 2e-5,
      "bge-base-en": 2e-5, "bge-large-zh": 1e-5, "bge-large-en": 1e-5}
  assert not hasattr(config_lib.preset("bge-base-en"), "lr")  # not a BertConfig field
  with pytest.raises(ValueError, match="unknown model preset 'bge-huge-en'"):
    config_lib.preset_lr("bge-huge-en")


def test_a_new_preset_gets_its_own_lr_not_one_matched_from_its_name(monkeypatch):
  shape = dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
  monkeypatch.setitem(config_lib._PRESETS, "mini-encoder", dict(shape, lr=7e-4))
  # Its name says "large", its entry says otherwise: the entry wins.
  monkeypatch.setitem(config_lib._PRESETS, "large-but-tiny", dict(shape, lr=5e-4))
  for name, lr in (("mini-encoder", 7e-4), ("large-but-tiny", 5e-4)):
    for stage in ("contrastive", "finetune"):
      c = config_files.load(f"{stage}:{name}")
      # Unset in the config; the run start picks the preset's own (from scratch).
      assert c.model.preset == name and c.optimizer.lr is None
      assert config_lib.fine_tuning_lr("", name, config_lib.preset(name))[0] == lr
    assert config_lib.preset(name).hidden_size == 64
  with pytest.raises(ValueError, match="unknown model preset 'bge-huge-en'"):
    config_files.load("contrastive:bge-huge-en")  # no silent base-size lr
