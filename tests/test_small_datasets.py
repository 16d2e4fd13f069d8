"""Merging small datasets (data.small_threshold, data.drop_threshold;
`bge_jax.data.small_datasets`) against FlagEmbedding's rule computed directly, and a tiny run over
merged datasets that resumes bit for bit."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest

from bge_jax.data.pairs import ContrastiveBatcher, PairSource, open_contrastive_data
from bge_jax.data.small_datasets import (check_thresholds, folder_of, merge_small_datasets,
                                         merged_name)
from bge_jax.data.sources import DataError
from test_pairs import fe_rows, tok, write_jsonl  # noqa: F401  (tok: the word-level tokenizer)

# Two folders of FlagEmbedding files: (file name, rows, batch size).
FOLDERS = {"f1": [("a", 3, 4), ("b", 5, 2), ("c", 40, 8), ("d", 7, 4), ("e", 2, 8)],
           "f2": [("g", 4, 8), ("h", 30, 4), ("i", 1, 2)]}


def fe_rule(folders, small_threshold, drop_threshold):
  """FlagEmbedding's `AbsEmbedderSameDatasetTrainDataset.__init__` over `--train_data f1 f2`,
  on row counts: every file of a folder is a dataset; the files under small_threshold rows are
  concatenated into one, with the least of their batch sizes, kept when it has at least
  drop_threshold rows. Returns {(folder, files...): (rows, batch size)}."""
  out = {}
  for folder, files in folders.items():
    small, small_batch = [], math.inf
    for name, n, b in files:
      if n == 0:
        continue
      if n < small_threshold:
        small.append((name, n))
        small_batch = min(small_batch, b)
      else:
        out[(folder, name)] = (n, b)
    if small and sum(n for _, n in small) >= drop_threshold:
      out[(folder,) + tuple(name for name, _ in small)] = (sum(n for _, n in small), small_batch)
  return out


def write_folders(tmp_path):
  """The FOLDERS files; returns (data.train specs, batch sizes), every file a spec."""
  specs, sizes = [], []
  for d, (folder, files) in enumerate(FOLDERS.items()):
    for k, (name, n, b) in enumerate(files):
      specs.append(str(write_jsonl(tmp_path / folder / f"{name}.jsonl",
                                   fe_rows(10 * d + k, n, nneg=1))))
      sizes.append(b)
  return specs, sizes


@pytest.mark.parametrize("small,drop", [(0, 0), (6, 0), (6, 10), (6, 11), (8, 12), (41, 0),
                                        (41, 40), (41, 58)])
def test_merging_matches_flagembedding(tmp_path, small, drop):
  specs, sizes = write_folders(tmp_path)
  datasets = [(s, open_contrastive_data(s)) for s in specs]
  expected = fe_rule(FOLDERS, small, drop)
  if not expected:
    with pytest.raises(ValueError, match=rf"drop_threshold={drop}: every dataset of data.train "
                       "is small"):
      merge_small_datasets(datasets, small_threshold=small, drop_threshold=drop,
                           batch_sizes=sizes)
    return
  out = merge_small_datasets(datasets, small_threshold=small, drop_threshold=drop,
                             batch_sizes=sizes)
  members = dict(out.merges)
  got = {}
  for (name, src), b in zip(out.datasets, out.batch_sizes):
    files = members.get(name, (name,))
    folder = folder_of(files[0]).rsplit("/", 1)[-1]
    assert all(folder_of(f) == folder_of(files[0]) for f in files)
    got[(folder,) + tuple(f.rsplit("/", 1)[-1][:-len(".jsonl")] for f in files)] = (len(src), b)
  assert got == expected
  merged_away = {f for _, fs in out.merges for f in fs}
  assert set(out.dropped) | merged_away | {n for n, _ in out.datasets} >= set(specs)
  assert not set(out.dropped) & {n for n, _ in out.datasets}


def test_merged_rows_locations_and_order(tmp_path, caplog):
  specs, sizes = write_folders(tmp_path)
  datasets = [(s, open_contrastive_data(s)) for s in specs]
  with caplog.at_level(logging.INFO, logger="bge_jax.data.small_datasets"):
    out = merge_small_datasets(datasets, small_threshold=6, drop_threshold=6, batch_sizes=sizes,
                               weights=[1.0] * len(specs))
  f1, f2 = folder_of(specs[0]), folder_of(specs[5])
  # f1: a, b, e (3 + 5 + 2 rows) merge at a's place; f2: g, i (4 + 1 rows) are dropped.
  assert [n for n, _ in out.datasets] == [merged_name(f1, 3, False), specs[2], specs[3], specs[6]]
  assert out.batch_sizes == [2, 8, 4, 4] and out.weights == [1.0] * 4
  assert out.merges == [(merged_name(f1, 3, False), (specs[0], specs[1], specs[4]))]
  assert out.dropped == [specs[5], specs[7]]
  merged = out.datasets[0][1]
  parts = [datasets[j][1] for j in (0, 1, 4)]
  assert list(merged) == [r for p in parts for r in p]
  assert [merged.locate(i) for i in range(len(merged))] == [
      p.locate(i) for p in parts for i in range(len(p))]
  assert merged.locate(3) == f"{specs[1]}:1"
  lines = [r.getMessage() for r in caplog.records]
  assert any(f"merged 3 small datasets of {f1} into" in m and "(10 rows)" in m
             and f"{specs[0]} 3, {specs[1]} 5, {specs[4]} 2" in m for m in lines), lines
  assert any(f"dropped 2 small datasets of {f2}" in m and "5 rows together" in m
             for m in lines), lines


def test_in_batch_negative_flags_group_apart(tmp_path, tok):  # noqa: F811
  """Datasets without in-batch negatives (named, or *no_in_batch_neg) merge only with each other,
  and the merged one keeps the flag; a small dataset alone keeps its name."""
  names = ["x", "y_no_in_batch_neg", "z", "w", "big"]
  specs = [str(write_jsonl(tmp_path / "d" / f"{n}.jsonl", fe_rows(k, 4 if n != "big" else 32)))
           for k, n in enumerate(names)]
  specs.append(str(write_jsonl(tmp_path / "other" / "lone.jsonl", fe_rows(9, 5))))
  datasets = [(s, open_contrastive_data(s)) for s in specs]
  out = merge_small_datasets(datasets, small_threshold=8,
                             no_in_batch_datasets=[specs[3], specs[4], "typo"])
  folder = folder_of(specs[0])
  plain, alone = merged_name(folder, 2, False), merged_name(folder, 2, True)
  assert [n for n, _ in out.datasets] == [plain, alone, specs[4], specs[5]]
  assert dict(out.merges) == {plain: (specs[0], specs[2]), alone: (specs[1], specs[3])}
  assert [s.no_in_batch_neg for _, s in out.datasets] == [False, True, False, False]
  # w was merged away; big keeps its name; an unknown name stays for the batcher to refuse.
  assert out.no_in_batch_datasets == (specs[4], "typo")
  batcher = ContrastiveBatcher(out.datasets, tok, batch_size=4, group_size=2,
                               no_in_batch_datasets=out.no_in_batch_datasets[:1])
  flags = {batcher.dataset_at(s): int(batcher(s)["in_batch_negatives"])
           for s in range(batcher.steps_per_epoch)}
  assert flags == {plain: 1, alone: 0, specs[4]: 0, specs[5]: 1}


def test_bad_options(tmp_path, caplog):
  for key, value in (("small_threshold", -1), ("small_threshold", 2.5),
                     ("drop_threshold", True)):
    kw = {"small_threshold": 0, "drop_threshold": 0, key: value}
    with pytest.raises(ValueError, match=rf"config.data.{key}={value!r}: give a number of rows"):
      check_thresholds(kw["small_threshold"], kw["drop_threshold"])
  specs = [str(write_jsonl(tmp_path / "d" / f"{n}.jsonl", fe_rows(k, 3)))
           for k, n in enumerate("ab")]
  datasets = [(s, open_contrastive_data(s)) for s in specs]
  with pytest.raises(ValueError, match=r"config.data.weights: the small datasets .* have weights "
                     r"\[1.0, 2.0\]; give them the same weight"):
    merge_small_datasets(datasets, small_threshold=4, weights=[1, 2])
  with caplog.at_level(logging.WARNING, logger="bge_jax.data.small_datasets"):
    out = merge_small_datasets(datasets, small_threshold=0, drop_threshold=5)
  assert [n for n, _ in out.datasets] == specs
  assert "drop_threshold=5 has no effect with data.small_threshold=0" in caplog.text


def test_prepared_dataset_is_not_merged(tmp_path):
  from bge_jax.data import prepare

  a = write_jsonl(tmp_path / "in" / "a.jsonl", fe_rows(0, 3))
  prepare.prepare([str(a)], str(tmp_path / "d" / "p"), progress=False)
  b = str(write_jsonl(tmp_path / "d" / "b.jsonl", fe_rows(1, 3)))
  datasets = [(str(tmp_path / "d" / "p"), open_contrastive_data(str(tmp_path / "d" / "p"))),
              (b, open_contrastive_data(b))]
  assert not isinstance(datasets[0][1], PairSource)
  with pytest.raises(DataError, match=r"p is a prepared dataset with 3 rows, fewer than "
                     r"config.data.small_threshold=4.*prepare the small datasets"):
    merge_small_datasets(datasets, small_threshold=4)
  # Alone in its folder group (or not small), it is kept as it is.
  out = merge_small_datasets(datasets[:1], small_threshold=4)
  assert out.datasets[0][1] is datasets[0][1]


# ---------------------------------------------------------------------------------------------
# Training over merged datasets.
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_merged_datasets_train_and_resume_exactly(tmp_path, caplog):
  """data.train = one big file and three small ones of a folder, plus a lone small file in
  another: the three merge into one dataset (1 batch of 16 per epoch), the lone one is dropped;
  5 steps per epoch, and a run killed after its step-2 save resumes to the same losses."""
  from conftest import make_tokenizer
  from test_train import losses
  from test_train_contrastive import make_rows, tiny

  from bge_jax.train.loop import train

  d = tmp_path / "data"
  (d / "other").mkdir(parents=True)
  files = [make_rows(d / f"{n}.jsonl", k, seed=s)
           for n, k, s in (("big", 64, 1), ("s1", 10, 2), ("s2", 4, 3), ("s3", 5, 4))]
  lone = make_rows(d / "other" / "lone.jsonl", 6, seed=5)
  tokenizer = make_tokenizer(tmp_path / "tok")

  def config():
    c = tiny("contrastive", files[0], tokenizer, -1, **{"checkpoint.every_steps": 2,
                                                  "checkpoint.keep": 5})
    c.data.train = ",".join(map(str, files + [lone]))
    c.data.small_threshold = 16
    c.data.drop_threshold = 8
    c.num_epochs = 1.0
    c.export = False
    return c

  workdir = tmp_path / "run"
  with caplog.at_level(logging.INFO, logger="bge_jax.data.small_datasets"):
    train(config(), str(workdir))
  assert f"merged 3 small datasets of {d} into" in caplog.text
  assert f"dropped 1 small dataset of {d / 'other'}" in caplog.text
  curve = losses(workdir)
  assert sorted(curve) == [1, 2, 3, 4, 5]  # 64 // 16 + 19 // 16
  assert all(math.isfinite(v) for v in curve.values())
  info = json.loads((workdir / "run_info.json").read_text())
  assert [(s["name"], s["rows"], s["batches_per_epoch"]) for s in info["datasets"]] == [
      (str(files[0]), 64, 4), (merged_name(str(d), 3, False), 19, 1)]

  for step in (4, 5):
    shutil.rmtree(workdir / "checkpoints" / str(step))  # as if killed after the step-2 save
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="bge_jax.train"):
    train(config(), str(workdir))
  assert "at step 2" in caplog.text
  again = losses(workdir)
  assert [again[s] for s in range(1, 6)] == [curve[s] for s in range(1, 6)]
