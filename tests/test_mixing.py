"""Dataset mixing in stages 2-3: per-dataset batch sizes and weights, proportional and round-robin
sampling (`ContrastiveBatcher`), the config keys, and a tiny training run over two batch sizes that
resumes bit for bit."""

from __future__ import annotations

import collections
import json
import logging
import math
import shutil

import numpy as np
import pytest
from ml_collections import ConfigDict

from bge_jax.data.pairs import ContrastiveBatcher, mixing_options
from test_pairs import fe_source, tok  # noqa: F401  (the word-level tokenizer fixture)


def sources(tmp_path, sizes):
  return [(name, fe_source(tmp_path, d, n, nneg=1)) for d, (name, n) in enumerate(sizes.items())]


def epoch_rows(batcher, epoch):
  """(dataset, row) -> how often the epoch's global selections hold it."""
  rows = collections.Counter()
  for s in range(epoch * batcher.steps_per_epoch, (epoch + 1) * batcher.steps_per_epoch):
    d, selection = batcher.select(s)
    rows.update((d, int(i)) for i in selection)
  return rows


def test_per_dataset_batch_sizes_and_weights(tmp_path, tok):  # noqa: F811
  sizes = {"short": 96, "long": 50}
  # Global batches 16 (short texts, bigger batches) and 8 over two processes.
  batcher = ContrastiveBatcher(sources(tmp_path, sizes), tok, batch_size=4, group_size=1,
                               process_count=2, batch_sizes=[8, 4])
  assert batcher.global_batches == [16, 8] and batcher.slots == [6, 6]
  assert batcher.steps_per_epoch == 12 and batcher.num_examples == 6 * 8 + 6 * 4
  for epoch in range(2):
    counts = collections.Counter(batcher.dataset_at(s)
                                 for s in range(epoch * 12, (epoch + 1) * 12))
    assert counts == {"short": 6, "long": 6}
    assert max(epoch_rows(batcher, epoch).values()) == 1  # no row twice in an epoch
  for step in range(12):
    d, selection = batcher.select(step)
    batch = batcher(step)
    b = (8, 4)[d]
    assert len(selection) == 2 * b
    assert batch["query_input_ids"].shape == (b, 32)
    assert batch["passage_input_ids"].shape == (b, 128)
  describe = batcher.describe()
  assert "short 96 rows, 6 batches/epoch (global batch 16)" in describe
  assert "global batches 16/8 = 8/4 x 2 processes" in describe

  # Weights: passes per epoch. A pass over "short" is 96 // 16 = 6 batches, over "long" 50 // 8 =
  # 6. Weight 0.5: 3 batches of fresh rows each epoch; 2.5: 15 batches over 3 passes, each row at
  # most 3 times in the epoch, never twice in a batch.
  weighted = ContrastiveBatcher(sources(tmp_path, sizes), tok, batch_size=4, group_size=1,
                                process_count=2, batch_sizes=[8, 4], weights=[0.5, 2.5])
  assert weighted.slots == [3, 15] and weighted.steps_per_epoch == 18
  for epoch in range(2):
    rows = epoch_rows(weighted, epoch)
    assert max(n for (d, _), n in rows.items() if d == 0) == 1
    assert sum(n for (d, _), n in rows.items() if d == 0) == 3 * 16
    long_counts = [n for (d, _), n in rows.items() if d == 1]
    assert max(long_counts) == 3 and sum(long_counts) == 15 * 8
  for step in range(36):
    selection = weighted.select(step)[1]
    assert len(set(selection.tolist())) == len(selection)
  shares = collections.Counter(weighted.dataset_at(s) for s in range(18))
  assert shares == {"short": 3, "long": 15}
  with pytest.raises(ValueError, match="'short': weight 0.1 x its 6 batches per pass"):
    ContrastiveBatcher(sources(tmp_path, sizes), tok, batch_size=4, group_size=1,
                       process_count=2, batch_sizes=[8, 4], weights=[0.1, 1])


def test_round_robin_order(tmp_path, tok):  # noqa: F811
  sizes = {"a": 40, "b": 17, "c": 64}
  batcher = ContrastiveBatcher(sources(tmp_path, sizes), tok, batch_size=8, group_size=1,
                               batch_sizes=[8, 4, 16], sampling="round_robin")
  # The smallest dataset bounds the epoch: min(40 // 8, 17 // 4, 64 // 16) = 4 rounds.
  assert batcher.slots == [4, 4, 4] and batcher.steps_per_epoch == 12
  assert [batcher.dataset_at(s) for s in range(24)] == ["a", "b", "c"] * 8
  for epoch in range(2):
    assert max(epoch_rows(batcher, epoch).values()) == 1
  # Rows are drawn afresh each epoch (the leftovers differ).
  assert not np.array_equal(batcher.select(1)[1], batcher.select(13)[1])
  assert "round-robin" in batcher.describe()
  with pytest.raises(ValueError, match="weights apply to proportional sampling only"):
    ContrastiveBatcher(sources(tmp_path, sizes), tok, batch_size=8, group_size=1,
                       weights=[1, 2, 1], sampling="round_robin")


def test_schedule_is_a_pure_function_of_seed_step_and_process(tmp_path, tok):  # noqa: F811
  """Batches computed in any order, by separately built batchers, are identical; processes read
  the same dataset at a step and disjoint rows; another seed gives another schedule."""
  srcs = sources(tmp_path, {"x": 48, "y": 80})
  kw = dict(batch_size=4, group_size=1, batch_sizes=[4, 8], weights=[1.0, 0.7], process_count=2)
  p0 = ContrastiveBatcher(srcs, tok, process_index=0, **kw)
  again = ContrastiveBatcher(srcs, tok, process_index=0, **kw)
  p1 = ContrastiveBatcher(srcs, tok, process_index=1, **kw)
  steps = list(range(3 * p0.steps_per_epoch))
  forward = {s: p0(s) for s in steps}
  for s in reversed(steps):
    batch = again(s)
    assert all(np.array_equal(batch[k], forward[s][k]) for k in batch)
    d0, sel0 = p0.select(s)
    d1, sel1 = p1.select(s)
    assert d0 == d1 and np.array_equal(sel0, sel1)
    b = p0.batch_sizes[d0]
    assert not set(sel0[:b].tolist()) & set(sel0[b:].tolist())
  other = ContrastiveBatcher(srcs, tok, seed=1, **kw)
  assert [other.dataset_at(s) for s in steps] != [p0.dataset_at(s) for s in steps]


def test_mixing_options_from_config():
  data = ConfigDict({"batch_sizes": "64, 32", "weights": "", "sampling": "round_robin"})
  assert mixing_options(data, 32, 2, 8, 2) == {"batch_sizes": [32, 16], "weights": None,
                                               "sampling": "round_robin"}
  assert mixing_options(ConfigDict({"batch_sizes": "", "weights": "1,0.5", "sampling":
                                    "proportional"}), 32, 1, 8, 2)["weights"] == [1.0, 0.5]
  with pytest.raises(ValueError, match=r"config.data.batch_sizes has 1 entries for the 2"):
    mixing_options(ConfigDict({"batch_sizes": "64"}), 32, 1, 8, 2)
  with pytest.raises(ValueError, match=r"config.data.batch_sizes: 36 must be >= 1 and "
                     r"divisible .* \(8\)"):
    mixing_options(ConfigDict({"batch_sizes": "64,36"}), 32, 1, 8, 2)
  with pytest.raises(ValueError, match=r"config.data.weights='1,x': expected comma-separated "
                     "float"):
    mixing_options(ConfigDict({"weights": "1,x"}), 32, 1, 8, 2)
  with pytest.raises(ValueError, match="config.data.sampling='random'"):
    mixing_options(ConfigDict({"sampling": "random"}), 32, 1, 8, 1)


def test_batch_size_steps_are_each_sizes_first_step(tmp_path, tok):  # noqa: F811
  """The steps the trainer compiles ahead: from any start, the first later step of each other
  global batch size (within the run's steps); none without mixing."""
  batcher = ContrastiveBatcher(sources(tmp_path, {"short": 96, "long": 50}), tok, batch_size=4,
                               group_size=1, process_count=2, batch_sizes=[8, 4])
  sizes = [batcher.global_batches[batcher.select(s)[0]] for s in range(3 * 12)]
  for start in (0, 5, 11, 12, 23):
    steps = batcher.batch_size_steps(start, 36)
    assert len(steps) == 1 and sizes[steps[0]] != sizes[start]
    assert all(sizes[s] == sizes[start] for s in range(start, steps[0]))
    assert batcher.batch_size_steps(start, steps[0]) == []  # a size the run never reaches
  single = ContrastiveBatcher(sources(tmp_path, {"short": 96, "long": 50}), tok, batch_size=4,
                              group_size=1, process_count=2)
  assert single.batch_size_steps(0, 100) == []


def test_the_memory_check_names_the_mixed_datasets_batch_size(tmp_path, tok,  # noqa: F811
                                                               monkeypatch):
  """A train step compiled for a mixed dataset's batch size that does not fit the device is
  refused naming that dataset, its global batch and config.data.batch_sizes (not "packed batch
  shape" nor config.batch_size); without mixing, the batcher names nothing (the packed-rows
  message stays)."""
  from bge_jax import memory
  from bge_jax.train import loop

  batcher = ContrastiveBatcher(sources(tmp_path, {"short": 96, "long": 50}), tok, batch_size=4,
                               group_size=1, process_count=2, batch_sizes=[8, 4])
  sources_ = {batcher.dataset_at(s): batcher.batch_source(s) for s in range(12)}
  assert sources_ == {
      "short": "dataset 'short''s global batch 16 (config.data.batch_sizes)",
      "long": "dataset 'long''s global batch 8 (config.data.batch_sizes)"}
  single = ContrastiveBatcher(sources(tmp_path, {"short": 96, "long": 50}), tok, batch_size=4,
                              group_size=1, process_count=2)
  assert single.batch_source(0) is None

  config = ConfigDict({"batch_size": 8, "data": {"batch_sizes": "16,8"}})
  monkeypatch.setattr(memory, "peak_bytes", lambda compiled: 3 * 2**20)
  monkeypatch.setattr(memory, "device_limit", lambda device=None: 2**20)
  with pytest.raises(MemoryError) as e:
    loop._check_fits(None, config, grown=True, source=sources_["short"])
  msg = str(e.value)
  assert msg.startswith("the train step compiled for dataset 'short''s global batch 16 "
                        "(config.data.batch_sizes) needs 3.0 MiB per device"), msg
  assert "lower config.data.batch_sizes (now '16,8')" in msg and "packed" not in msg
  assert msg.endswith("config.mesh.fsdp.")  # compiled before the first step: no checkpoints
  with pytest.raises(MemoryError, match=r"^the train step compiled for a new packed batch shape "
                     r".* lower config.batch_size \(now 8\)"):
    loop._check_fits(None, config, grown=True, source=single.batch_source(0))


# ---------------------------------------------------------------------------------------------
# Training over two batch sizes.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
  from conftest import make_tokenizer
  from test_train_contrastive import make_rows

  root = tmp_path_factory.mktemp("mixing")
  return (make_rows(root / "a.jsonl", 100, seed=1), make_rows(root / "b.jsonl", 70, seed=2),
          make_tokenizer(root / "tok"))


def mixed_config(two_datasets, **kw):
  from test_train_contrastive import tiny

  a, b, tok = two_datasets
  c = tiny("contrastive", a, tok, -1, **kw)
  c.data.train = f"{a},{b}"
  c.data.batch_sizes = "32,16"  # 3 + 4 batches per epoch; data.pack unset: padded batches
  c.num_epochs = 2.0
  c.export = False
  return c


@pytest.mark.slow
def test_two_batch_sizes_train_compile_once_each_and_resume_exactly(two_datasets, tmp_path,
                                                                      caplog):
  """Two epochs over two datasets with global batches 32 and 16: 2 x (3 + 4) = 14 steps, the
  step compiled once per batch size (not once per step), both before the first step, and a run
  killed after its step-6 save (which compiles both again before it resumes) resumes to the
  uninterrupted run's losses bit for bit."""
  from test_train import losses

  from bge_jax.train import loop, program
  from bge_jax.train.loop import train

  events = []  # "compile" per lowered train step, the step of each metrics row, in order
  real_lower, real_write = program.TrainProgram.lower, loop.MetricWriter.write

  def lower(self, *args, **kw):
    events.append("compile")
    return real_lower(self, *args, **kw)

  def write(self, step, values):
    events.append(step)
    return real_write(self, step, values)

  workdir = tmp_path / "run"
  kw = {"checkpoint.every_steps": 6, "checkpoint.keep": 5}
  with (pytest.MonkeyPatch.context() as m,
        caplog.at_level(logging.WARNING, logger="bge_jax.train")):
    m.setattr(program.TrainProgram, "lower", lower)
    m.setattr(loop.MetricWriter, "write", write)
    train(mixed_config(two_datasets, **kw), str(workdir))
  recompiles = [r for r in caplog.records if "compiling the train step for new batch shapes"
                in r.getMessage()]
  assert len(recompiles) == 1, [r.getMessage() for r in recompiles]
  # Both sizes compiled before the first step, none after.
  assert events[:2] == ["compile", "compile"] and "compile" not in events[2:], events
  curve = losses(workdir)
  assert sorted(curve) == list(range(1, 15))
  assert all(math.isfinite(v) for v in curve.values())
  info = json.loads((workdir / "run_info.json").read_text())
  assert "global batches 32/16" in json.dumps(info)

  shutil.rmtree(workdir / "checkpoints" / "14")
  shutil.rmtree(workdir / "checkpoints" / "12")  # as if killed after the step-6 save
  train(mixed_config(two_datasets, **kw), str(workdir))
  again = losses(workdir)
  assert [again[s] for s in range(1, 15)] == [curve[s] for s in range(1, 15)]


@pytest.mark.slow
def test_a_mixed_size_that_does_not_fit_is_refused_before_the_first_step(two_datasets, tmp_path,
                                                                         monkeypatch):
  """A fake device limit between the two sizes' needs (XLA's analysis of the steps compiled
  here): the run stops before any step, metrics row or checkpoint, naming the bigger dataset's
  size, although its first batch would come after a checkpoint (step 0 draws the smaller)."""
  from bge_jax import memory
  from bge_jax.train.loop import train

  compiled_needs: dict[int, int] = {}  # id(compiled step) -> its need, in compile order
  real_peak = memory.peak_bytes

  def peak_bytes(compiled):
    need = real_peak(compiled)
    if not isinstance(compiled, dict):
      compiled_needs.setdefault(id(compiled), need)
    return need

  def device_limit(device=None):
    """The first step's need passes; the next one is checked against the middle of the two."""
    needs = list(compiled_needs.values())
    return needs[0] * 2 if len(needs) == 1 else (needs[0] + needs[1]) // 2

  monkeypatch.setattr(memory, "peak_bytes", peak_bytes)
  monkeypatch.setattr(memory, "device_limit", device_limit)
  workdir = tmp_path / "run"
  with pytest.raises(MemoryError) as e:
    train(mixed_config(two_datasets, **{"checkpoint.every_steps": 1}), str(workdir))
  needs = list(compiled_needs.values())
  assert len(needs) == 2 and needs[1] > needs[0], needs
  msg = str(e.value)
  assert msg.startswith(f"the train step compiled for dataset '{two_datasets[0]}''s global "
                        "batch 32 (config.data.batch_sizes) needs"), msg
  assert not list((workdir / "checkpoints").glob("*[0-9]"))
  assert not (workdir / "metrics.jsonl").exists()  # no step logged
