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
