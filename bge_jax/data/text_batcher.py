"""Stage 1's host batches: texts in epoch order, tokenised, masked by the RetroMAE collator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MODES = ("truncate", "concatenate")
OVERLONG = ("truncate", "error", "skip")


class TextBatcher:
  """Process-local RetroMAE batches for a step: texts in epoch order, tokenised, masked.

  Texts longer than max_length (with [CLS]/[SEP]) are truncated (`overlong="truncate"`,
  FlagEmbedding's behaviour), refused with the file:line (`"error"`), or counted and skipped
  (`"skip"`); the last two tokenise the whole source once up front. `mode="concatenate"`
  concatenates consecutive texts into full blocks instead (original RetroMAE), so nothing is
  overlong. (Not to be confused with stages 2-3's `data.pack`, several whole texts per row with
  block-diagonal attention: `bge_jax.data.packing`.)
  """

  # Batches of the run's validation data (`bge_jax.data.holdout.HeldOutBatches`), set by the stage.
  validation = None

  def __init__(self, source, tokenizer, collator, local_batch: int, *, seed: int,
               max_length: int, mode: str, process_index: int, overlong: str = "truncate"):
    from bge_jax.data.masking import concatenate_into_blocks
    from bge_jax.data.order import EpochOrder
    from bge_jax.data.tokenizer import private_copy

    if mode == "pack":
      raise ValueError("config.data.mode='pack' is now called 'concatenate' (consecutive texts "
                       "concatenated into full blocks, as the original RetroMAE): set "
                       "config.data.mode='concatenate'.")
    if mode not in MODES:
      raise ValueError(f"config.data.mode={mode!r}; use 'truncate' (FlagEmbedding) or "
                       "'concatenate' (original RetroMAE: consecutive texts in full blocks)")
    if overlong not in OVERLONG:
      raise ValueError(f"config.data.overlong={overlong!r}; use one of {OVERLONG}")
    self.source, self.collator = source, collator
    self.tokenizer = private_copy(tokenizer)  # it runs in the prefetch thread
    self.max_length, self.mode, self.process_index = max_length, mode, process_index
    self.overlong_skipped = 0
    self._blocks = None
    # The source rows trained on: all (a range, no per-row array), or those not skipped below.
    self._rows: Sequence[int] = range(len(source))
    if mode == "concatenate":
      self._blocks = concatenate_into_blocks(self._tokenize_all(), max_length)
    elif overlong != "truncate":
      lengths = np.array([len(x) for x in self._tokenize_all()]) + 2
      too_long = np.flatnonzero(lengths > max_length)
      if too_long.size and overlong == "error":
        i = int(too_long[0])
        raise ValueError(
            f"{source.locate(i)}: the text has {lengths[i]} tokens with [CLS]/[SEP], more than "
            f"config.data.max_length={max_length} ({too_long.size} such texts in all); set "
            "config.data.overlong='truncate' (FlagEmbedding's behaviour) or 'skip'.")
      self.overlong_skipped = int(too_long.size)
      self._rows = np.flatnonzero(lengths <= max_length)
      if not self._rows.size:
        raise ValueError(f"every text is longer than config.data.max_length={max_length}.")
    self.num_examples = len(self._blocks) if self._blocks is not None else len(self._rows)
    self.order = EpochOrder(self.num_examples, local_batch, seed)

  def _tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
    return self.tokenizer(texts, add_special_tokens=False, truncation=truncate,
                          max_length=self.max_length - 2 if truncate else None,
                          return_attention_mask=False, return_token_type_ids=False)["input_ids"]

  def _tokenize_all(self, chunk: int = 4096) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(self.source), chunk):
      texts = self.source.__getitems__(range(start, min(start + chunk, len(self.source))))
      out += self._tokenize(texts, truncate=False)
    return out

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx = self.order.indices(step)
    if self._blocks is not None:
      examples = [self._blocks[i] for i in idx]
    else:
      examples = self._tokenize(self.source.__getitems__([int(self._rows[i]) for i in idx]),
                                truncate=True)
    return self.collator(examples, step, self.process_index)

  def real_tokens(self, batch) -> int:
    return int(batch["encoder_attention_mask"].sum())

  def describe(self) -> str:
    unit = "blocks of concatenated texts" if self._blocks is not None else "texts"
    parts = [f"{self.num_examples} {unit} on this process ({self.mode})"]
    if self.overlong_skipped:
      parts.append(f"{self.overlong_skipped} overlong texts skipped")
    parts.append(self.source.summary())
    return "; ".join(parts)
