"""bge_jax.data.packing: first-fit-decreasing packing of right-padded texts (numpy only)."""

import numpy as np
import pytest

from bge_jax.data import packing


def _batch(lengths, length, seed=0):
  rng = np.random.RandomState(seed)
  lengths = np.asarray(lengths)
  mask = np.arange(length)[None] < lengths[:, None]
  ids = np.where(mask, rng.randint(5, 100, size=(len(lengths), length)), 0).astype(np.int32)
  return ids, mask.astype(np.int32)


def test_first_fit_decreasing_fills_rows_and_keeps_every_text():
  lengths = np.array([9, 3, 7, 2, 5, 4, 6, 2])
  bins = packing.first_fit_decreasing(lengths, 10)
  assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
  assert all(lengths[b].sum() <= 10 for b in bins)
  assert len(bins) == 4 == packing.packed_rows(lengths, 10)  # 38 tokens: 4 rows of 10 at best


def test_pack_places_each_text_with_its_positions_and_slot():
  length = 8
  ids, mask = _batch([8, 3, 5, 2, 4, 6], length)
  out = packing.pack(ids, mask)
  rows, slots = out["input_ids"].shape[0], length // 2
  assert rows == packing.packed_rows(mask.sum(1), length) < len(ids)
  for i, n in enumerate(mask.sum(1)):
    r, s = divmod(int(out["text_slot"][i]), slots)
    where = np.flatnonzero(out["segment_ids"][r] == s + 1)
    assert len(where) == n and (np.diff(where) == 1).all()  # contiguous
    np.testing.assert_array_equal(out["input_ids"][r, where], ids[i, :n])
    np.testing.assert_array_equal(out["position_ids"][r, where], np.arange(n))
  # Real tokens first in each row, padding (segment 0, id 0) after.
  seg = out["segment_ids"]
  real = seg > 0
  assert (real == (np.arange(length)[None] < real.sum(1)[:, None])).all()
  assert (out["input_ids"][~real] == 0).all() and (out["position_ids"][~real] == 0).all()


def test_pack_to_a_fixed_row_count_and_the_overflow_error():
  ids, mask = _batch([8, 3, 5, 2, 4, 6], 8)
  out = packing.pack(ids, mask, rows=5)
  assert out["input_ids"].shape == (5, 8) and (out["segment_ids"][-1] == 0).all()
  with pytest.raises(ValueError, match=r"need 4 packed rows of 8, more than the 2 allowed; "
                                       r"raise data\.pack_rows_fraction"):
    packing.pack(ids, mask, rows=2)


def test_a_batch_that_outgrows_its_rows_takes_the_next_of_a_few_shapes():
  ids, mask = _batch([8, 3, 5, 2, 4, 6], 8)  # needs 4 rows of 8
  out = packing.pack(ids, mask, rows=2, grow_multiple=1)
  assert out["input_ids"].shape == (4, 8)  # eighths of 6 texts, rounded up: 1, 2, 3, 3, 4, ...
  np.testing.assert_array_equal(out["input_ids"], packing.pack(ids, mask, rows=4)["input_ids"])
  assert packing.pack(ids, mask, rows=2, grow_multiple=4)["input_ids"].shape == (4, 8)
  assert packing.pack(ids, mask, rows=5, grow_multiple=4)["input_ids"].shape == (5, 8)  # fits
  # Every need maps to one of at most 8 row counts, the largest holding any batch of n texts.
  grown = {packing.grown_rows(need, 64, multiple=8) for need in range(1, 65)}
  assert grown == {8, 16, 24, 32, 40, 48, 56, 64}
  assert all(packing.grown_rows(need, 64, 8) >= need for need in range(1, 65))
  assert packing.grown_rows(60, 60, multiple=8) == 64  # n rounded up to the shards
  with pytest.raises(ValueError, match="needed=0 rows for 64 texts"):
    packing.grown_rows(0, 64)


def test_pack_refuses_left_padding_and_empty_texts():
  ids, mask = _batch([3, 4], 6)
  with pytest.raises(ValueError, match="right-padded"):
    packing.pack(ids, mask[:, ::-1])
  with pytest.raises(ValueError, match="text 1 is empty"):
    packing.pack(ids, np.array([[1, 1, 0, 0, 0, 0], [0] * 6]))


def test_rows_for_rounds_to_the_shards():
  assert packing.rows_for(64, 0.7) == 45
  assert packing.rows_for(64, 0.7, multiple=8) == 48
  assert packing.rows_for(60, 1.0, multiple=8) == 64
  with pytest.raises(ValueError, match="pack_rows_fraction=0"):
    packing.rows_for(64, 0.0)


def test_pack_sides_keeps_other_keys():
  q, qm = _batch([3, 2, 4, 2], 6)
  p, pm = _batch([5, 6, 2, 3], 6, seed=1)
  batch = {"query_input_ids": q, "query_attention_mask": qm, "passage_input_ids": p,
           "passage_attention_mask": pm, "teacher_scores": np.ones((4, 1), np.float32)}
  out = packing.pack_sides(batch, {"passage": None})
  assert set(out) == {"query_input_ids", "query_attention_mask", "teacher_scores"} | {
      f"passage_{k}" for k in packing.PACKED_SUFFIXES}
  assert packing.is_packed(out, "passage") and not packing.is_packed(out, "query")


def _brute_force_tokens(lengths, row_lengths, row_counts):
  """The fewest rows * length over every allowed shape that first-fit decreasing can fill."""
  best = None
  for r in row_counts:
    for n in row_lengths:
      if n >= max(lengths) and len(packing.first_fit_decreasing(lengths, n)) <= r:
        best = r * n if best is None else min(best, r * n)
  return best


@pytest.mark.parametrize("seed", range(6))
def test_smallest_shape_is_the_cheapest_fillable_shape(seed):
  rng = np.random.RandomState(seed)
  n = int(rng.randint(1, 40))
  lengths = rng.randint(2, 60, size=n)
  row_lengths = (8, 16, 24, 32, 48, 64, 96, 128)
  max_rows = int(rng.choice([n, 16, 24]))
  max_rows = max(max_rows, n)  # one text per row must stay possible
  rows, length, bins = packing.smallest_shape(lengths, row_lengths, max_rows)
  allowed = {1 << k for k in range(8) if 1 << k < max_rows} | {max_rows}
  assert rows in allowed and length in row_lengths and len(bins) <= rows
  assert sorted(i for b in bins for i in b) == list(range(n))
  assert all(lengths[b].sum() <= length for b in bins)
  assert rows * length == _brute_force_tokens(lengths, row_lengths, sorted(allowed))
  assert rows * length >= lengths.sum()


def test_fill_places_token_lists_and_smallest_shape_errors():
  texts = [[2, 7, 3], [2, 3], [2, 9, 9, 9, 3]]
  rows, length, bins = packing.smallest_shape([len(t) for t in texts], (4, 8, 12), 4)
  assert (rows, length) == (1, 12)  # 10 tokens: one row of 12 beats 2 x 8 and 4 x 4 can't hold 5
  out = packing.fill(bins, texts, rows, length, pad_id=0)
  for i, t in enumerate(texts):
    row, slot = divmod(int(out["text_slot"][i]), length // 2)
    where = out["segment_ids"][row] == slot + 1
    assert out["input_ids"][row][where].tolist() == t
    assert out["position_ids"][row][where].tolist() == list(range(len(t)))
  assert (out["input_ids"][out["segment_ids"] == 0] == 0).all()
  with pytest.raises(ValueError, match=">= 2 tokens"):
    packing.smallest_shape([2, 1], (4, 8), 2)
  with pytest.raises(ValueError, match="more than the longest row 8"):
    packing.smallest_shape([2, 9], (4, 8), 2)
