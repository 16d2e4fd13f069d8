"""The trainer's eval step (the validation loss) is checked against the device's memory as the
train step is (`memory.check_fits`): it runs the forward pass on a full global batch, which can
need more than a train step whose batch is split into grad_accum_steps micro-batches."""

import json

import pytest

from test_train_contrastive import data, tiny  # noqa: F401 (fixture)


@pytest.mark.slow  # a one-step run (two compiles) and a refused one (one compile): ~30 s
def test_an_eval_step_larger_than_the_device_is_refused_before_training(
    data, tmp_path, monkeypatch):  # noqa: F811
  from bge_jax import memory
  from bge_jax.train.loop import train

  rows, tok = data
  # 64 queries x 8 passages of 128 tokens in one forward pass (8 queries per device), against
  # train micro-batches of 8 queries (one per device).
  keys = {"batch_size": 64, "grad_accum_steps": 8, "data.group_size": 8,
          "data.passage_max_length": 128, "model.max_position_embeddings": 128,
          "data.validation_fraction": 0.25}
  needs, peak_bytes = [], memory.peak_bytes
  monkeypatch.setattr(memory, "peak_bytes", lambda c: needs.append(peak_bytes(c)) or needs[-1])
  train(tiny("contrastive", rows, tok, 1, export=False, **keys), str(tmp_path / "measure"))
  # Checked: the eval step (compiled first), then the train step (then read again, for
  # run_info.json's largest step).
  assert len(needs) >= 3 and set(needs[1:]) == {needs[1]}, needs
  eval_need, train_need = needs[:2]
  assert eval_need > train_need, (eval_need, train_need)

  # A device with room for the train step but not the eval step: refused before any step.
  limit = (eval_need + train_need) // 2
  monkeypatch.setattr(memory, "device_limit", lambda device=None: limit)
  checked = len(needs)
  with pytest.raises(MemoryError) as e:
    train(tiny("contrastive", rows, tok, 1, export=False, **keys), str(tmp_path / "run"))
  msg = str(e.value)
  assert msg.startswith(
      "the eval step (the validation loss: the stage's loss, forward only, on a full global "
      "batch of config.batch_size=64 rows, not split into the train step's "
      f"config.grad_accum_steps=8 micro-batches) needs {memory.describe(eval_need)} "
      "per device"), msg
  assert f"of the device's {memory.describe(limit)}: it cannot run" in msg
  for fix in ("lower config.batch_size (now 64;", "config.loss.gradcache_chunk", "config.mesh.fsdp",
              "config.data.validation_fraction=0 and config.data.validation=''"):
    assert fix in msg, (fix, msg)
  assert not (tmp_path / "run" / "metrics.jsonl").exists()
  assert needs[checked:] == [eval_need]  # only the eval step: the train step was not compiled
  measured = [json.loads(x) for x in (tmp_path / "measure" / "metrics.jsonl").read_text()
              .splitlines()]
  assert any("val/loss" in r for r in measured)  # the first run did validate
