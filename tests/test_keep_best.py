"""checkpoint.keep_best: WORKDIR/best/ holds the best step's export (its weights are that step's
params), survives a kill and resume without being replaced by a worse one, and a metric that
cannot appear is refused up front with the metrics available."""

import json
import os
import shutil
import types

import jax
import numpy as np
import pytest

from test_train import corpus_and_tokenizer, tiny_retromae  # noqa: F401 (fixture)


def _write(folder):
  os.makedirs(os.path.join(folder, "hf"))
  with open(os.path.join(folder, "hf", "weights.txt"), "w") as f:
    f.write("w")


def test_best_export_keeps_the_best_and_reads_it_back(tmp_path):
  from bge_jax.train.checkpoints import BestExport, best_mode
  from bge_jax.train.init import ConfigError
  assert best_mode("val/loss") == best_mode("val/decoder_loss") == "min"
  assert best_mode("eval/sts/stsb") == best_mode("val/encoder_accuracy") == "max"
  assert best_mode("val/loss", "max") == "max"

  best = BestExport(str(tmp_path), "val/loss")
  assert best.improves({"val/loss": 3.0}) and not best.improves({"val/loss": float("nan")})
  best.save(2, 3.0, _write)
  assert not best.improves({"val/loss": 3.0}) and best.improves({"val/loss": 2.5})
  record = json.loads((tmp_path / "best" / "best.json").read_text())
  assert record == {"metric": "val/loss", "mode": "min", "step": 2, "value": 3.0}
  assert (tmp_path / "best" / "hf" / "weights.txt").exists()
  assert [n for n in os.listdir(tmp_path) if n != "best"] == []  # no staging folder left

  again = BestExport(str(tmp_path), "val/loss")  # a resumed run
  assert (again.step, again.value) == (2, 3.0) and not again.improves({"val/loss": 3.5})
  with pytest.raises(ConfigError, match=r"best export by 'val/loss' \(min\).*keep_best='eval/x'"):
    BestExport(str(tmp_path), "eval/x")

  # A kill between the two renames of a replacement: the previous best is put back.
  os.rename(tmp_path / "best", tmp_path / ".best.tmp-1@host-abc.old")
  assert BestExport(str(tmp_path), "val/loss").step == 2 and (tmp_path / "best").is_dir()


@pytest.mark.parametrize("metric, validator, evaluator, pattern", [
    ("val/loss", None, None, r"keep_best='val/loss' needs validation data: set "
                             r"config\.data\.validation_fraction"),
    ("val/los", ["val/loss", "val/decoder_loss"], None,
     r"keep_best='val/los' is not computed by the validation loss; the metrics there: "
     r"\['val/decoder_loss', 'val/loss'\]"),
    ("eval/sts/stsb", None, None, r"keep_best='eval/sts/stsb' needs config\.eval"),
    ("eval/sts/stsb", None, types.SimpleNamespace(metric_names=("eval/heldout/ndcg@10",)),
     r"keep_best='eval/sts/stsb' is not computed by config\.eval; the metrics there: "
     r"\['eval/heldout/ndcg@10'\]"),
    ("loss", ["val/loss"], None, r"keep_best='loss' must name a metric computed at evaluation "
                                 r"points \(names starting with val/ or eval/\)"),
])
def test_a_metric_that_cannot_appear_is_refused(tmp_path, metric, validator, evaluator, pattern):
  from bge_jax.train.init import ConfigError
  from bge_jax.train.validation import make_best
  config = types.SimpleNamespace(checkpoint={"keep_best": metric})
  v = types.SimpleNamespace(metric_names=validator) if validator else None
  with pytest.raises(ConfigError, match=pattern):
    make_best(config, str(tmp_path), v, evaluator)


def _params_equal(a, b):
  flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert flat_a.keys() == flat_b.keys()
  return all(np.array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k])) for k in flat_a)


@pytest.mark.slow
def test_kept_export_is_the_best_steps_after_a_kill_and_resume_too(corpus_and_tokenizer,  # noqa: F811
                                                                   tmp_path):
  from bge_jax import convert, weights
  from bge_jax.train.loop import train
  from bge_jax.train.metrics import read_metrics
  corpus, tok = corpus_and_tokenizer
  workdir = tmp_path / "w"
  config = lambda: tiny_retromae(corpus, tok, 6, export=False, **{  # noqa: E731
      "data.validation_fraction": 0.25, "eval.every_steps": 2, "checkpoint.every_steps": 2,
      "checkpoint.keep": 5, "checkpoint.keep_best": "val/loss", "optimizer.lr": 3e-3})
  train(config(), str(workdir))
  logged = {r["step"]: r["val/loss"] for r in read_metrics(str(workdir)) if "val/loss" in r}
  assert sorted(logged) == [0, 2, 4, 6]
  record = json.loads((workdir / "best" / "best.json").read_text())
  best_step = min(logged, key=logged.get)
  assert record == {"metric": "val/loss", "mode": "min", "step": best_step,
                    "value": logged[best_step]}
  assert best_step > 0, logged  # the loss falls: a trained step is the best

  def kept_params():
    return convert.load_hf(str(workdir / "best" / "hf" / convert.RETROMAE_STATE_FILE))[1]

  _, _, at_best = weights.load_run_params(str(workdir), best_step)
  _, _, last = weights.load_run_params(str(workdir), 6)
  assert _params_equal(kept_params(), at_best)
  if best_step != 6:
    assert not _params_equal(kept_params(), last)

  # Killed after the step-2 save: the rerun evaluates steps 4 and 6 again (bit for bit the same
  # values) and, the best value being read back, leaves best/ as it is.
  before = (workdir / "best" / "best.json").stat().st_mtime_ns
  for step in (4, 6):
    shutil.rmtree(workdir / "checkpoints" / str(step))
  train(config(), str(workdir))
  again = {r["step"]: r["val/loss"] for r in read_metrics(str(workdir)) if "val/loss" in r}
  assert again == logged
  assert (workdir / "best" / "best.json").stat().st_mtime_ns == before
  assert json.loads((workdir / "best" / "best.json").read_text()) == record
  assert _params_equal(kept_params(), at_best)
