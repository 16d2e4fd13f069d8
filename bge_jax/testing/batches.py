"""Synthetic batches with the collators' array names and SPEC's invariants (numpy only).

`launch/bench.py` times the train steps on ragged ones (rows of random length, padding at the
tail), `launch/gpu_bench.py` on full-length ones; `tests/test_bench.py` checks both against the
stage-1 invariants the parity tests use.
"""

from __future__ import annotations

import numpy as np

from bge_jax.data.masking import max_predictions

CLS_ID, MASK_ID = 2, 4  # ids the batches use; random tokens are drawn from 5..vocab-1


def row_lengths(rng: np.random.RandomState, rows: int, length: int,
                shortest: int | None) -> tuple[np.ndarray, np.ndarray]:
  """(lengths [rows], real-token mask [rows, length]): lengths uniform in shortest..length with
  the first row full, so the padded length is really used; shortest=None: every row full."""
  if shortest is None:
    n = np.full(rows, length)
  else:
    n = rng.randint(shortest, length + 1, size=rows)
    n[0] = length
  return n, np.arange(length)[None, :] < n[:, None]


def retromae_batch(rng: np.random.RandomState, rows: int, length: int, vocab: int, *,
                   shortest: int | None = None, mlm_probability: float = 0.3) -> dict:
  """A RetroMAE batch: rows of `row_lengths`; ~30% encoder MLM labels, at most the collator's
  bound per row (`max_predictions`: what the trainer's sparse MLM head computes); a decoder mask
  showing ~half the real columns (always column 0, never the row itself); decoder labels on
  every real token but [CLS] and the last."""
  n, real = row_lengths(rng, rows, length, shortest)
  ids = np.where(real, rng.randint(5, vocab, size=(rows, length)), 0)
  ids[:, 0] = CLS_ID
  masked = real & (rng.rand(rows, length) < mlm_probability)
  masked[:, 0] = False
  masked[:, 1] = True  # every row has a label
  masked &= np.cumsum(masked, axis=1) <= max_predictions(length, mlm_probability)
  visible = (rng.rand(rows, length, length) < 0.5) & real[:, None, :] & real[:, :, None]
  visible[:, :, 0] = real
  visible[:, np.arange(length), np.arange(length)] = False
  dec_labels = np.where(real, ids, -100)
  dec_labels[:, 0] = -100
  dec_labels[np.arange(rows), n - 1] = -100
  i32 = lambda x: np.asarray(x, np.int32)  # noqa: E731
  return {"encoder_input_ids": i32(np.where(masked, MASK_ID, ids)),
          "encoder_attention_mask": i32(real), "encoder_labels": i32(np.where(masked, ids, -100)),
          "decoder_input_ids": i32(ids), "decoder_attention_mask": i32(visible),
          "decoder_labels": i32(dec_labels)}


def pair_batch(rng: np.random.RandomState, rows: int, vocab: int, *, q_len: int = 32,
               p_len: int = 128, shortest: int | None = None) -> dict:
  """A contrastive batch of `rows` queries [rows, q_len] and passages [rows, p_len] (group size
  1), right-padded rows of `row_lengths`, [CLS] first."""
  out = {}
  for side, length in (("query", q_len), ("passage", p_len)):
    _, real = row_lengths(rng, rows, length, shortest)
    ids = np.where(real, rng.randint(5, vocab, size=(rows, length)), 0)
    ids[:, 0] = CLS_ID
    out[f"{side}_input_ids"] = ids.astype(np.int32)
    out[f"{side}_attention_mask"] = real.astype(np.int32)
  return out
