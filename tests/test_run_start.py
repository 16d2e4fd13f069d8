"""A run's start: init_from's tokenizer check (init.py) and the atomic run_info/config writes."""

import errno
import json
import logging
import os
import re
import types

import pytest

from bge_jax import config_files
from conftest import make_hf_folder, make_tokenizer


def foreign_tokenizer(folder):
  """A BERT tokenizer of other words and another special-token order than make_tokenizer's."""
  from transformers import BertTokenizerFast

  folder.mkdir(parents=True)
  vocab = ["[UNK]", "[PAD]", "[MASK]", "[SEP]", "[CLS]", "one", "two", "three", "four", "five"]
  BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(folder)
  return folder


def init_from_config(init_from, tokenizer):
  c = config_files.load("retromae:tiny")
  c.model.init_from = str(init_from)
  c.tokenizer = str(tokenizer) if tokenizer else ""
  return c


@pytest.fixture(scope="module")
def hf_with_tokenizer(tmp_path_factory):
  """A BertForMaskedLM folder with its own (make_tokenizer's) tokenizer: 46 of 97+ rows used."""
  folder = make_hf_folder(tmp_path_factory.mktemp("src"), "bert_mlm")
  make_tokenizer(folder)
  return folder


def test_a_foreign_smaller_tokenizer_is_refused_with_init_from(hf_with_tokenizer, tmp_path):
  from bge_jax.train import init

  config = init_from_config(hf_with_tokenizer, foreign_tokenizer(tmp_path / "foreign"))
  tokenizer = init.load_tokenizer(config)
  with pytest.raises(init.ConfigError) as e:
    init.model_config_and_weights(config, tokenizer)
  message = str(e.value)
  assert "config.tokenizer=" in message and "config.model.init_from=" in message
  assert re.search(r"it has 10 tokens, the source's \d+\)", message) and "trained with the source's tokenizer" in message


def test_a_same_size_tokenizer_with_other_ids_is_refused(hf_with_tokenizer, tmp_path):
  """Equal sizes are no proof: the special tokens' ids are compared too."""
  from transformers import BertTokenizerFast

  from bge_jax.train import init

  own = json.load(open(hf_with_tokenizer / "tokenizer.json"))["model"]["vocab"]
  swapped = dict(own, **{"[CLS]": own["[SEP]"], "[SEP]": own["[CLS]"]})
  BertTokenizerFast(vocab=swapped).save_pretrained(tmp_path / "swapped")
  config = init_from_config(hf_with_tokenizer, tmp_path / "swapped")
  with pytest.raises(init.ConfigError, match=r"token ids differ: '\[CLS\]'"):
    init.model_config_and_weights(config, init.load_tokenizer(config))


def test_the_sources_own_tokenizer_is_accepted(hf_with_tokenizer, tmp_path):
  """Smaller than vocab_size (as many HF models pad it) but the source's own: named by the
  source's folder itself, or a copy elsewhere, or left unset."""
  from bge_jax.train import init

  for tok in (hf_with_tokenizer, make_tokenizer(tmp_path / "copy"), None):
    config = init_from_config(hf_with_tokenizer, tok)
    tokenizer = init.load_tokenizer(config)
    model_config, loaded, _ = init.model_config_and_weights(config, tokenizer)
    assert len(tokenizer) < model_config.vocab_size and loaded is not None


def test_a_source_without_a_tokenizer_keeps_the_size_check(tmp_path, caplog):
  from bge_jax.train import init

  source = make_hf_folder(tmp_path, "bert_mlm")
  config = init_from_config(source, foreign_tokenizer(tmp_path / "foreign"))
  with caplog.at_level(logging.INFO, logger="bge_jax.train"):
    _, loaded, _ = init.model_config_and_weights(config, init.load_tokenizer(config))
  assert loaded is not None
  assert any("has no tokenizer files" in r.getMessage() for r in caplog.records)


# --- run_info.json / config.json ----------------------------------------------------------------


def write(workdir):
  from bge_jax.train import run_info

  config = types.SimpleNamespace(stage="retromae", batch_size=8,
                                 to_json_best_effort=lambda **kw: json.dumps({"stage": "retromae"}))
  model_config = types.SimpleNamespace(to_dict=lambda: {"hidden_size": 8}, num_params=lambda: 10)
  batcher = types.SimpleNamespace(describe=lambda: "stub data")
  run_info.write_run_info(str(workdir), config, model_config, "scratch", 3, batcher, None)


def test_run_info_and_config_are_written(tmp_path):
  write(tmp_path)
  assert json.loads((tmp_path / "run_info.json").read_text())["total_steps"] == 3
  assert json.loads((tmp_path / "config.json").read_text()) == {"stage": "retromae"}
  assert sorted(os.listdir(tmp_path)) == ["config.json", "run_info.json"]
  mode = os.stat(tmp_path / "run_info.json").st_mode & 0o777
  umask = os.umask(0)
  os.umask(umask)
  assert mode == 0o666 & ~umask  # as open() makes it, not a temporary file's 0o600


@pytest.mark.parametrize("target,code", [("json.dump", errno.ENOSPC), ("os.replace", errno.EROFS),
                                         ("os.fsync", errno.EDQUOT)])
def test_a_full_disk_at_start_is_a_clean_error_and_keeps_the_old_file(tmp_path, monkeypatch,
                                                                       target, code):
  from bge_jax.train.checkpoints import CheckpointError

  (tmp_path / "run_info.json").write_text('{"processes": 2}')  # a resume's, from before

  def fail(*args, **kwargs):
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(target, fail)
  with pytest.raises(CheckpointError, match=rf"cannot write run_info.json in {tmp_path}"):
    write(tmp_path)
  assert (tmp_path / "run_info.json").read_text() == '{"processes": 2}'
  assert os.listdir(tmp_path) == ["run_info.json"]  # no temporary file left


def test_a_full_disk_for_config_json_names_it(tmp_path, monkeypatch):
  real = os.replace

  def replace(src, dst):
    if str(dst).endswith("config.json"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(src, dst)

  from bge_jax.train.checkpoints import CheckpointError
  monkeypatch.setattr("os.replace", replace)
  with pytest.raises(CheckpointError, match="cannot write config.json"):
    write(tmp_path)
  assert os.listdir(tmp_path) == ["run_info.json"]


def test_other_write_errors_propagate_and_clean_up(tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise OSError(errno.EIO, os.strerror(errno.EIO))

  monkeypatch.setattr("json.dump", fail)
  with pytest.raises(OSError) as e:
    write(tmp_path)
  assert e.value.errno == errno.EIO and os.listdir(tmp_path) == []
