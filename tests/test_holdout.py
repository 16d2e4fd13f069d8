"""The validation hold-out's rule and memory (bge_jax.data.holdout): the held-out rows checked
against the rule computed directly, the training rows' `Complement` against np.setdiff1d, and a
prepared dataset's training view answering every batcher query without an array of its size."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from bge_jax.data import holdout
from bge_jax.data.holdout import Complement


def _rule_directly(n: int, fraction: float) -> np.ndarray:
  """Rule 2 one draw at a time: the first round(f n) distinct x_t mod n of PCG64((_TAG, n))."""
  k = int(round(fraction * n))
  stream = np.random.PCG64([holdout._TAG, n]).random_raw(max(64 * k, 4096))
  chosen: dict[int, None] = {}
  for x in stream.tolist():
    if len(chosen) == k:
      break
    chosen.setdefault(x % n)
  assert len(chosen) == k, "the reference stream is too short"
  return np.sort(np.fromiter(chosen, np.int64, k))


@pytest.mark.parametrize("n, fraction", [(1, 0.3), (10, 0.25), (1000, 0.1), (5003, 0.001),
                                         (20_000, 0.5), (300, 0.9), (77, 0.99)])
def test_held_out_rows_follow_the_rule_computed_directly(n, fraction, monkeypatch):
  rows = holdout.held_out(n, fraction)
  assert rows.dtype == np.int64 and len(rows) == int(round(fraction * n))
  assert np.all(np.diff(rows) > 0) and (rows.size == 0 or (rows[0] >= 0 and rows[-1] < n))
  np.testing.assert_array_equal(rows, _rule_directly(n, fraction))
  np.testing.assert_array_equal(holdout.held_out(n, fraction), rows)  # deterministic
  monkeypatch.setattr(holdout, "_OVERDRAW", (0.3, 1))  # many small batches: the same rows
  np.testing.assert_array_equal(holdout.held_out(n, fraction), rows)


def test_held_out_rows_depend_on_the_row_count_and_keep_rule_1_on_request():
  a, b = holdout.held_out(10_000, 0.01), holdout.held_out(10_001, 0.01)
  assert len(a) == 100 and len(b) == 100 and not np.array_equal(a, b)
  assert a[0] < 1000 and a[-1] > 9000  # spread over the rows, not their head
  old = np.sort(np.random.default_rng([holdout._TAG, 10_000]).permutation(10_000)[:100])
  np.testing.assert_array_equal(holdout.held_out(10_000, 0.01, rule=1), old)
  assert holdout.held_out(10, 1.0).tolist() == list(range(10))
  with pytest.raises(ValueError, match=r"config\.data\.validation_rule=3: use 2"):
    holdout.held_out(10, 0.1, rule=3)


@pytest.mark.parametrize("n, held", [
    (1, []), (5, [0]), (5, [4]), (9, [0, 1, 2, 6, 7, 8]), (40, [13]), (1000, None)])
def test_complement_maps_positions_as_setdiff1d(n, held):
  held = holdout.held_out(n, 0.1) if held is None else np.asarray(held, np.int64)
  ref = np.setdiff1d(np.arange(n), held)
  c = Complement(n, held)
  assert len(c) == len(ref) and list(c) == ref.tolist()
  np.testing.assert_array_equal(np.asarray(c), ref)
  rng = np.random.default_rng(0)
  if len(ref):
    pos = np.concatenate([[0, len(ref) - 1, -1, -len(ref)], rng.integers(-len(ref), len(ref), 500)])
    np.testing.assert_array_equal(c[pos], ref[pos])
    np.testing.assert_array_equal(c[pos.reshape(-1, 2)], ref[pos].reshape(-1, 2))  # any shape
    assert [c[int(p)] for p in pos[:20]] == ref[pos[:20]].tolist()
  rows = np.arange(-2, n + 3)
  np.testing.assert_array_equal(c.searchsorted(rows), np.searchsorted(ref, rows))
  for bad in (len(ref), -len(ref) - 1):
    with pytest.raises(IndexError, match="out of range"):
      c[np.array([0, bad]) if len(ref) else bad]
  for sl in (slice(1, None, 3), slice(2, None, 5), slice(0, -1), slice(None, None, -2)):
    part = c[sl]
    assert list(part) == ref[sl].tolist()
    np.testing.assert_array_equal(np.asarray(part[1::2]), ref[sl][1::2])  # a part of a part
    if sl.step is None or sl.step > 0:
      np.testing.assert_array_equal(part.searchsorted(rows), np.searchsorted(ref[sl], rows))
  with pytest.raises(ValueError, match="strictly increasing"):
    Complement(n, [1, 1] if n > 1 else [n])


def test_split_costs_memory_of_the_held_out_rows_only():
  """split of 2e7 rows at 0.001 (20,000 held out): numpy's traced peak is a few times the
  held-out rows' 160 KB (the rule 1 permutation and the training indices took 2 x 160 MB)."""
  n = 20_000_000
  config = {"validation_fraction": 0.001}
  tracemalloc.start()
  try:
    train, val = holdout.split(range(n), config)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert len(val) == 20_000 and len(train) == n - 20_000
  assert peak < 3_000_000, peak
  ref = np.asarray(val.indices)
  probe = np.array([0, 1, len(train) // 2, len(train) - 1])
  expect = probe + np.searchsorted(ref - np.arange(len(ref)), probe, side="right")
  np.testing.assert_array_equal(train.indices[probe], expect)
  assert not np.isin(train.indices[probe], ref).any()


def test_a_prepared_training_view_never_builds_an_array_of_its_rows(tmp_path, monkeypatch):
  """Every query the batcher makes of the training view (rows, locate, positives with several
  per row, type_mask, first_row_without, covering_row, batches) with Complement.__array__
  refused, against the JSONL path's training rows (PairSource copies them)."""
  from conftest import make_tokenizer
  from test_prepared import fe_file
  from transformers import BertTokenizerFast

  from bge_jax.data import prepare
  from bge_jax.data.pairs import ContrastiveBatcher, open_contrastive_data

  files = [str(fe_file(tmp_path / "in" / "a.jsonl", 130, neg_every=3)),
           str(fe_file(tmp_path / "in" / "b.jsonl", 60, seed=2))]
  prepare.prepare(files, str(tmp_path / "p"), rows_per_shard=25, progress=False)
  ref, src = open_contrastive_data(files), open_contrastive_data(str(tmp_path / "p"))
  config = {"validation_fraction": 0.15}
  ref_train, _ = holdout.split(ref, config)

  def refuse(self, dtype=None, copy=None):
    raise AssertionError("a Complement was made an array")

  monkeypatch.setattr(Complement, "__array__", refuse)
  train, val = holdout.split(src, config)
  assert isinstance(train.indices, Complement) and len(train) == len(ref_train) == 190 - 28
  assert list(train) == ref_train.rows
  assert train.__getitems__([len(train) - 1, 0, 7]) == ref_train.__getitems__(
      [len(train) - 1, 0, 7])
  assert [train.locate(i) for i in range(0, len(train), 9)] == [
      ref_train.locate(i) for i in range(0, len(train), 9)]
  pool, ref_pool = train.positives(), ref_train.positives()
  assert len(pool) == len(ref_pool) > len(train)
  assert [pool[t] for t in range(len(pool))] == ref_pool
  every = np.arange(len(train))
  np.testing.assert_array_equal(train.type_mask(("classification",))[every],
                                ref_train.type_mask(("classification",))[every])
  for what in ("neg", "pos_scores", "neg_scores"):
    assert train.first_row_without(what) == ref_train.first_row_without(what), what
  held = val.indices
  kept = np.setdiff1d(np.arange(len(src)), held)
  for row in (int(held[0]), int(kept[3]), int(kept[-1])):
    train._covering = row  # the dataset's covering row: held out (None) or its training position
    expect = None if row in held else int(np.searchsorted(kept, row))
    assert train.covering_row() == expect, row
  train._covering = None
  kw = dict(batch_size=8, group_size=3, query_max_length=12, passage_max_length=16, seed=5)
  tok = BertTokenizerFast.from_pretrained(str(make_tokenizer(tmp_path / "tok")))
  mine = ContrastiveBatcher([("d", train)], tok, **kw)
  theirs = ContrastiveBatcher([("d", ref_train)], tok, **kw)
  for step in (0, 5, mine.steps_per_epoch + 1):
    for key, value in theirs(step).items():
      np.testing.assert_array_equal(mine(step)[key], value, err_msg=key)


def test_resuming_a_run_that_held_out_rows_by_rule_1_is_refused_unless_it_keeps_rule_1(
    tmp_path, caplog):
  """A config recorded before data.validation_rule existed held out rows by rule 1: resuming it
  under rule 2 would train on its validation rows, so it is refused (workdir.IMPLIED_BEFORE);
  without held-out rows the rule does not matter."""
  import json
  import logging

  from conftest import REPO

  from bge_jax import config_files
  from bge_jax.train import workdir as workdir_lib
  from bge_jax.train.init import ConfigError

  def record(fraction, rule=None):
    c = config_files.load(f"{REPO / 'configs' / 'finetune.py'}:tiny")
    c.data.validation_fraction = fraction
    recorded = json.loads(c.to_json_best_effort())
    if rule is None:
      del recorded["data"]["validation_rule"]  # as bge-jax before the key wrote it
    else:
      recorded["data"]["validation_rule"] = rule
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    return c

  def check(config):
    return workdir_lib.check_resume_config(str(tmp_path), config, accept_changes=False)

  new = record(0.1)
  assert new.data.validation_rule == holdout.RULE == 2
  with pytest.raises(ConfigError, match=r"data\.validation_rule 1 -> 2"):
    check(new)
  new.data.validation_rule = 1
  assert check(new) == []  # its own rows: held_out(n, f, rule=1)
  with caplog.at_level(logging.INFO, logger="bge_jax.train"):
    assert check(record(0.0)) == []  # nothing held out: one-sided, logged
  assert "validation_rule is only in the current config" in caplog.text
  new = record(0.0, rule=2)
  new.data.validation_rule = 1
  assert check(new) == []  # a rule change without held-out rows changes nothing
  new = record(0.1, rule=2)
  assert check(new) == []
  new.data.validation_rule = 1
  with pytest.raises(ConfigError, match=r"data\.validation_rule 2 -> 1"):
    check(new)
