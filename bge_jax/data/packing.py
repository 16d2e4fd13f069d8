"""Sequence packing for the contrastive stages: several short texts per row, no padding waste.

A padded batch [N, L] computes N x L tokens however short its texts are; in stage 2 a batch of
passages cut at 128 tokens is often half padding. `pack` moves the N texts into R <= N rows of
the same length L (first-fit decreasing), and the encoder runs with a block-diagonal attention
mask (each text sees only itself), per-text position ids, and per-text pooling
(`bge_jax.contrastive.embed_packed`), so the embeddings are those of the padded batch.

The packed arrays of one side (`query` or `passage`) of a batch:

  {side}_input_ids     [R, L]  token ids, texts back to back, padding at the tail of each row
  {side}_segment_ids   [R, L]  0 = padding, s = the row's s-th text (1-based)
  {side}_position_ids  [R, L]  0.. within each text (0 on padding)
  {side}_text_slot     [N]     row * (L // 2) + s - 1 for text i: where its vector is pooled

R is a static shape: pass `rows` (e.g. from `packed_rows`) so every batch compiles to the same
program. A batch whose texts do not fit raises, naming the fix, unless the caller lets it grow
(`grow_multiple`, one process only): it then takes the next of a few larger row counts
(`grown_rows`), one more compiled shape each.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

PACKED_SUFFIXES = ("input_ids", "segment_ids", "position_ids", "text_slot")


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
  """Bins of text indices (longest first) whose lengths sum to at most `capacity` each.

  First fit: each text goes to the lowest-numbered bin with room for it. The search is one
  vectorised scan of the bins' free space per text (this runs in the prefetch thread every
  step: a Python scan was 3.4 s for 16,384 texts).
  """
  lengths = np.asarray(lengths)
  too_long = np.flatnonzero(lengths > capacity)
  if too_long.size:
    i = int(too_long[0])
    raise ValueError(f"text {i} has {int(lengths[i])} tokens, more than the row length {capacity}")
  room = np.full(len(lengths), capacity, np.int64)  # free space of bins 0.. (at most one per text)
  bins: list[list[int]] = []
  for i in np.argsort(-lengths, kind="stable"):
    n = int(lengths[i])
    b = int(np.argmax(room[:len(bins) + 1] >= n))  # bin len(bins) is a fresh, empty one
    if b == len(bins):
      bins.append([])
    bins[b].append(int(i))
    room[b] -= n
  return bins


def packed_rows(lengths: np.ndarray, capacity: int) -> int:
  """The fewest rows first-fit decreasing needs for these text lengths."""
  return len(first_fit_decreasing(lengths, capacity))


def pack(input_ids: np.ndarray, attention_mask: np.ndarray, rows: int | None = None,
         pad_id: int = 0, grow_multiple: int | None = None) -> dict[str, np.ndarray]:
  """Pack a right-padded batch [N, L] into `rows` rows of length L (default: as few as fit).

  Returns the arrays of the module docstring without the side prefix. Texts keep their tokens
  and order within a row; the real tokens of each row come first. Texts that need more than
  `rows` rows raise, or with `grow_multiple` get `grown_rows(needed, N, grow_multiple)` rows.
  """
  input_ids = np.asarray(input_ids)
  attention_mask = np.asarray(attention_mask).astype(bool)
  n, length = input_ids.shape
  lengths = attention_mask.sum(1)
  if not np.array_equal(attention_mask, np.arange(length)[None, :] < lengths[:, None]):
    raise ValueError("pack expects right-padded rows (attention_mask 1...1 0...0 in every row)")
  if (lengths < 1).any():
    raise ValueError(f"text {int(np.argmin(lengths))} is empty; every text needs its [CLS]")
  bins = first_fit_decreasing(lengths, length)
  if rows is None:
    rows = len(bins)
  if len(bins) > rows and grow_multiple is not None:
    rows = grown_rows(len(bins), n, grow_multiple)
  if len(bins) > rows:
    raise ValueError(
        f"{n} texts of {int(lengths.sum())} tokens need {len(bins)} packed rows of {length}, "
        f"more than the {rows} allowed; raise data.pack_rows_fraction (or set data.pack=False)")
  slots = length // 2
  if max(len(t) for t in bins) > slots:
    raise ValueError(f"a packed row would hold more than {slots} texts (L // 2 slots); "
                     "texts need >= 2 tokens ([CLS] ... [SEP])")
  return fill(bins, [input_ids[i, :k] for i, k in enumerate(lengths)], rows, length, pad_id,
              input_ids.dtype)


def fill(bins: list[list[int]], texts: list, rows: int, length: int, pad_id: int = 0,
         dtype=np.int32) -> dict[str, np.ndarray]:
  """The packed arrays (module docstring, no side prefix) of `texts` (token id sequences) placed
  by `bins` (text indices per row, e.g. from `first_fit_decreasing`) in `rows` rows of `length`."""
  slots = length // 2
  ids = np.full((rows, length), pad_id, dtype)
  segments = np.zeros((rows, length), np.int32)
  positions = np.zeros((rows, length), np.int32)
  text_slot = np.zeros((len(texts),), np.int32)
  for r, row in enumerate(bins):
    start = 0
    for s, i in enumerate(row, 1):
      k = len(texts[i])
      ids[r, start:start + k] = texts[i]
      segments[r, start:start + k] = s
      positions[r, start:start + k] = np.arange(k)
      text_slot[i] = r * slots + s - 1
      start += k
  return {"input_ids": ids, "segment_ids": segments, "position_ids": positions,
          "text_slot": text_slot}


def smallest_shape(lengths: np.ndarray, row_lengths: tuple[int, ...],
                   max_rows: int) -> tuple[int, int, list[list[int]]]:
  """(rows, row length, bins): the packed shape with the fewest tokens, rows * length, that holds
  texts of these lengths, with rows a power of two below max_rows or max_rows itself and the
  length one of `row_lengths` (ascending), so a corpus compiles a handful of shapes. Ties go to
  the shorter rows (cheaper attention). Every text needs >= 2 tokens; the longest must fit a row.
  """
  lengths = np.asarray(lengths)
  if lengths.size == 0 or lengths.min() < 2:
    raise ValueError("smallest_shape needs texts of >= 2 tokens ([CLS] ... [SEP])")
  if lengths.max() > row_lengths[-1]:
    raise ValueError(f"a text has {int(lengths.max())} tokens, more than the longest row "
                     f"{row_lengths[-1]}")
  total, longest = int(lengths.sum()), int(lengths.max())
  row_counts = {1 << k for k in range(max_rows.bit_length()) if 1 << k < max_rows} | {max_rows}
  candidates = sorted((r * n, n, r) for r in row_counts
                      for n in row_lengths if n >= longest and r * n >= total)
  for _, n, r in candidates:  # the first that first-fit decreasing can fill; usually the first
    bins = first_fit_decreasing(lengths, n)
    if len(bins) <= r and max(len(b) for b in bins) <= n // 2:
      return r, n, bins
  raise ValueError(f"{lengths.size} texts of {total} tokens do not fit {max_rows} rows of "
                   f"{row_lengths[-1]}")


def rows_for(n: int, fraction: float, multiple: int = 1) -> int:
  """ceil(fraction * n) rounded up to a multiple of `multiple` (the batch shards), at most n
  rounded up likewise."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"data.pack_rows_fraction={fraction}: expected a value in (0, 1]")
  r = math.ceil(fraction * n)
  return min(-(-r // multiple) * multiple, -(-n // multiple) * multiple)


def grown_rows(needed: int, n: int, multiple: int = 1, steps: int = 8) -> int:
  """Rows for n texts that need `needed` rows, more than their budget: the smallest of
  rows_for(n, k / steps, multiple), k = 1..steps, that holds them. Overflowing batches thus share
  at most `steps` shapes, and the largest (n rows rounded up) holds any batch."""
  if not 0 < needed <= n:
    raise ValueError(f"needed={needed} rows for {n} texts: expected 1..{n}")
  return next(r for r in (rows_for(n, k / steps, multiple) for k in range(1, steps + 1))
              if r >= needed)


def pack_sides(batch: Mapping[str, np.ndarray], rows: Mapping[str, int | None],
               pad_id: int = 0, grow_multiple: int | None = None) -> dict[str, np.ndarray]:
  """The batch with each side in `rows` ({"query": R_q, "passage": R_p}) packed (`pack`, with
  `grow_multiple`); other keys (teacher scores, passage hashes, flags) unchanged."""
  tokens = {f"{side}_{k}" for side in rows for k in ("input_ids", "attention_mask")}
  out = {k: v for k, v in batch.items() if k not in tokens}
  for side, r in rows.items():
    packed = pack(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], r, pad_id,
                  grow_multiple)
    out.update({f"{side}_{k}": v for k, v in packed.items()})
  return out


def is_packed(batch: Mapping[str, object], side: str) -> bool:
  return f"{side}_segment_ids" in batch
