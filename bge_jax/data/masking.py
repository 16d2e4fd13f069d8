"""RetroMAE host-side corruption: whole-word masks, the encoder/decoder batch, sentence packing.

Pure numpy. A batch is a function of (examples, seed, step, process_index) only, so a resumed or
re-sharded run rebuilds exactly the batches it would have seen. Behaviour follows FlagEmbedding's
RetroMAE collator (itself Hugging Face's whole-word-mask collator, v4): the batch names and meanings
are those `retromae.loss` takes (see docs/API.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100
DEFAULT_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]")
# FlagEmbedding draws min(n, 128) decoder masks per example (the original RetroMAE repo, 256).
DECODER_POOL_SIZE = 128


def _check_ratio(name: str, ratio: float) -> None:
  if not 0.0 < float(ratio) < 1.0:
    raise ValueError(f"{name}={ratio!r} must lie strictly between 0 and 1 "
                     f"(FlagEmbedding uses 0.3 for the encoder and 0.5 for the decoder)")


def _check_max_length(max_length: int) -> None:
  if int(max_length) < 3:
    raise ValueError(f"max_length={max_length!r} leaves no room for a token between [CLS] and "
                     f"[SEP]; pass max_length >= 3 (FlagEmbedding uses 512)")


def _word_index(continues: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Groups tokens into words from per-token flags, along the last axis.

  Args:
    continues: bool [..., n], the token continues the previous token's word (a `##` piece, or a
      token the caller marked as not beginning a word).
    candidate: bool [..., n], the token may be masked (a real, non-special token).

  Returns:
    (word, n_words): int [..., n], each candidate's word number (0-based, in order of appearance)
    and -1 for other tokens; int [...], the number of words. A continuation joins the previous word
    only when the token just before it is itself a candidate; otherwise it starts a word of its own.
  """
  prev_candidate = np.zeros_like(candidate)
  prev_candidate[..., 1:] = candidate[..., :-1]
  begins = candidate & ~(continues & prev_candidate)
  word = np.cumsum(begins, axis=-1) - 1
  return np.where(candidate, word, -1), begins.sum(axis=-1)


def _num_to_predict(n_tokens: np.ndarray | int, ratio: float) -> np.ndarray:
  # Hugging Face counts every token of the wrapped sequence, [CLS] and [SEP] included, and rounds
  # half to even (Python's round); np.rint does the same.
  return np.maximum(1, np.rint(np.asarray(n_tokens) * ratio)).astype(np.int64)


def max_predictions(length: int, ratio: float) -> int:
  """The most tokens one whole-word mask labels in a row padded to `length` (static).

  A row of n <= length tokens gets at most num_to_predict(n) = max(1, round(n * ratio)) labels
  (a word that would overshoot is skipped), which never exceeds num_to_predict(length). The
  RetroMAE loss uses it to project only labelled positions onto the vocabulary.
  """
  _check_ratio("ratio", ratio)
  return int(_num_to_predict(int(length), ratio))


def _sample_masks(word: np.ndarray, n_words: np.ndarray, row_example: np.ndarray,
                  row_target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Draws independent whole-word masks, one per row, bool [R, n].

  Each row visits the words of its example in a fresh uniformly random order and adds a word while
  the masked count stays within the row's target, skipping a word that would overshoot and stopping
  once the target is reached (Hugging Face's `_whole_word_mask`). Vectorised over all rows of all
  examples: examples are padded to the same number of words with empty words (a uniform shuffle of
  all slots visits the real words in a uniform order, and an empty word masks nothing); a
  cumulative sum covers the prefix up to the first overshoot, then a short loop (fewer rounds than
  the longest word has tokens) adds the later words that still fit.

  Args:
    word: int [E, n], each token's word number in its example, -1 for tokens never masked.
    n_words: int [E], words per example.
    row_example: int [R], the example each mask is drawn for.
    row_target: int [R], num_to_predict of each mask.
    rng: the generator.
  """
  num_examples, n = word.shape
  width = max(int(n_words.max(initial=0)), 1)
  stride = width + 1                                      # word `width`: the non-word, never chosen
  token_word = np.where(word < 0, width, word)
  word_len = np.bincount((np.arange(num_examples)[:, None] * stride + token_word).ravel(),
                         minlength=num_examples * stride).reshape(num_examples, stride)
  word_len[:, width] = 0
  rows = row_example.size
  # Shuffle (flat index into [R, stride]) << bits | word length (a word has at most n tokens), so
  # one permutation yields both the visiting order and the lengths in that order.
  bits = int(n).bit_length()
  flat_word = np.arange(width) + (np.arange(rows) * stride)[:, None]
  packed = rng.permuted((flat_word << bits) | word_len[row_example, :width], axis=1)
  order, lens = packed >> bits, packed & ((1 << bits) - 1)
  cum = np.cumsum(lens.ravel()).reshape(rows, width)      # a flat cumsum, then per-row offsets:
  cum -= (cum[:, 0] - lens[:, 0])[:, None]                # much faster than cumsum(axis=1)
  taken = cum <= row_target[:, None]                      # a prefix of each row
  first_skip = taken.sum(axis=1)                          # the first word that overshoots
  remaining = row_target - np.where(
      first_skip > 0, cum[np.arange(rows), np.maximum(first_skip - 1, 0)], 0)
  col = np.arange(width)
  active = np.flatnonzero((remaining > 0) & (first_skip < width))
  last = first_skip
  while active.size:
    row_lens = lens[active]
    fits = (row_lens <= remaining[active, None]) & (row_lens > 0) & (col > last[active, None])
    found = fits.any(axis=1)
    hit, cols = active[found], fits[found].argmax(axis=1)
    taken[hit, cols] = True
    remaining[hit] -= lens[hit, cols]
    last[hit] = cols
    active = hit[remaining[hit] > 0]
  chosen = np.zeros(rows * stride, dtype=bool)
  chosen[order] = taken
  chosen = chosen.reshape(rows, stride)
  # Words to tokens, one example's rows at a time (a 1-D take per block beats a 2-D gather).
  masks = np.empty((rows, n), dtype=bool)
  bounds = np.flatnonzero(np.diff(row_example)) + 1
  for start, stop in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [rows]])):
    np.take(chosen[start:stop], token_word[row_example[start]], axis=1, out=masks[start:stop])
  return masks


def whole_words(tokens: Sequence[str], word_starts: Sequence[bool] | None = None,
                special_tokens: Sequence[str] = ()) -> list[list[int]]:
  """The masking candidates of a token sequence, as groups of token indices (one group per word).

  A word is a token plus the `##` continuations that follow it. [CLS], [SEP], [PAD] and any token in
  `special_tokens` are never candidates. The Chinese BERT vocabulary tokenises CJK text per
  character (no `##`), so each character is its own word unless `word_starts` is given.

  Args:
    tokens: WordPiece tokens, e.g. `tokenizer.convert_ids_to_tokens(ids)`.
    word_starts: optional per-token bools, True where a token begins a word (from a Chinese word
      segmenter, say); a False token joins the word before it. A `##` token never begins a word.
    special_tokens: extra tokens that must never be masked.

  Returns:
    The words in order, each a list of consecutive token indices.
  """
  n = len(tokens)
  never = set(DEFAULT_SPECIAL_TOKENS) | set(special_tokens)
  continues = np.fromiter((t.startswith("##") for t in tokens), dtype=bool, count=n)
  if word_starts is not None:
    starts = np.asarray(word_starts, dtype=bool)
    if starts.shape != (n,):
      raise ValueError(f"word_starts has {starts.size} entries for {n} tokens; give one bool per "
                       f"token (True where a word begins)")
    continues |= ~starts
  candidate = np.fromiter((t not in never for t in tokens), dtype=bool, count=n)
  word, n_words = _word_index(continues, candidate)
  positions = np.flatnonzero(word >= 0)
  bounds = np.flatnonzero(np.diff(word[positions])) + 1
  return [group.tolist() for group in np.split(positions, bounds)] if positions.size else []


def sample_whole_word_mask(words: Sequence[Sequence[int]], n_tokens: int, ratio: float,
                           rng: np.random.Generator) -> np.ndarray:
  """One whole-word mask, bool [n_tokens], over the words of `whole_words`.

  The words are shuffled; num_to_predict = max(1, round(n_tokens * ratio)) where n_tokens counts
  every token, [CLS] and [SEP] included (as Hugging Face does); whole words are added while the
  count stays within num_to_predict, a word that would overshoot is skipped.
  """
  _check_ratio("ratio", ratio)
  word = np.full((1, int(n_tokens)), -1, dtype=np.int64)
  groups = [list(w) for w in words if len(w)]
  for number, group in enumerate(groups):
    if min(group) < 0 or max(group) >= n_tokens:
      raise ValueError(f"word {group} has indices outside [0, n_tokens={n_tokens})")
    word[0, group] = number
  return _sample_masks(word, np.array([len(groups)]), np.zeros(1, dtype=np.int64),
                       _num_to_predict([n_tokens], ratio), rng)[0]


class RetroMAECollator:
  """Builds RetroMAE batches (FlagEmbedding's names) from token ids without special tokens.

  Each example is truncated to `max_length - 2` ids and wrapped as [CLS] ... [SEP]. All arrays are
  int32 and padded to `pad_to or max_length`, so their shapes are fixed for jit:

    encoder_input_ids [B,L]: whole-word mask at `encoder_mlm_probability`, then 80% [MASK], 10% a
      random id (uniform over the vocabulary), 10% unchanged.
    encoder_attention_mask [B,L]: 1 on real tokens.
    encoder_labels [B,L]: the original id where masked, -100 elsewhere.
    decoder_input_ids [B,L]: the uncorrupted ids.
    decoder_attention_mask [B,L,L]: 1 = row i may see column j. Per example a pool of
      min(n, 128) whole-word masks at `decoder_mlm_probability`; row i takes a uniform member of the
      pool and also hides itself. [CLS] is never masked, so column 0 is visible to every real row
      but row 0. Padding rows and columns are 0.
    decoder_labels [B,L]: every original id except [CLS], the final [SEP] and padding (-100).

  Randomness comes from `np.random.default_rng([seed, step, process_index])` alone.

  Args:
    tokenizer: a WordPiece (BERT) tokenizer with [MASK]/[CLS]/[SEP]/[PAD]; `len(tokenizer)` is the
      range of random replacement ids.
    max_length: the longest sequence, [CLS] and [SEP] included (FlagEmbedding: 512).
    encoder_mlm_probability, decoder_mlm_probability: masking ratios in (0, 1).
    seed: the run's seed.
    pad_to: the padded length L, when it should differ from max_length (e.g. a length bucket).
    decoder_pool_size: masks per example for the decoder rows (FlagEmbedding 128, RetroMAE 256).
  """

  def __init__(self, tokenizer: Any, max_length: int = 512, encoder_mlm_probability: float = 0.3,
               decoder_mlm_probability: float = 0.5, seed: int = 0, pad_to: int | None = None,
               decoder_pool_size: int = DECODER_POOL_SIZE):
    _check_max_length(max_length)
    _check_ratio("encoder_mlm_probability", encoder_mlm_probability)
    _check_ratio("decoder_mlm_probability", decoder_mlm_probability)
    if pad_to is not None and int(pad_to) < 3:
      raise ValueError(f"pad_to={pad_to!r} must be >= 3 (or None to pad to max_length)")
    if int(decoder_pool_size) < 1:
      raise ValueError(f"decoder_pool_size={decoder_pool_size!r} must be >= 1 (FlagEmbedding: 128)")
    if int(seed) < 0:
      raise ValueError(f"seed={seed!r} must be a non-negative int")
    missing = [name for name in ("mask", "cls", "sep", "pad")
               if getattr(tokenizer, f"{name}_token_id", None) is None]
    if missing:
      names = ", ".join(f"{m}_token" for m in missing)
      raise ValueError(
          f"tokenizer has no {names}; RetroMAE needs a BERT-style "
          f"(WordPiece) tokenizer with [MASK], [CLS], [SEP] and [PAD], e.g. "
          f"AutoTokenizer.from_pretrained('BAAI/bge-base-en-v1.5'), or set the missing tokens "
          f"(tokenizer.add_special_tokens({{'mask_token': '[MASK]', ...}}))")
    self.tokenizer = tokenizer
    self.max_length = int(max_length)
    self.encoder_mlm_probability = float(encoder_mlm_probability)
    self.decoder_mlm_probability = float(decoder_mlm_probability)
    self.seed = int(seed)
    self.pad_to = None if pad_to is None else int(pad_to)
    self.decoder_pool_size = int(decoder_pool_size)
    self.mask_id = int(tokenizer.mask_token_id)
    self.cls_id = int(tokenizer.cls_token_id)
    self.sep_id = int(tokenizer.sep_token_id)
    self.pad_id = int(tokenizer.pad_token_id)
    self.vocab_size = len(tokenizer)
    # Per-id lookup tables, so a batch never converts ids back to strings.
    id_tokens = tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
    self._continues = np.fromiter(((t or "").startswith("##") for t in id_tokens), dtype=bool,
                                  count=self.vocab_size)
    self._never_mask = np.zeros(self.vocab_size, dtype=bool)
    self._never_mask[[self.cls_id, self.sep_id, self.pad_id]] = True

  @property
  def length(self) -> int:
    """L, the padded sequence length of every output array."""
    return self.pad_to or self.max_length

  def __call__(self, examples: Sequence[Sequence[int]], step: int, process_index: int = 0,
               word_starts: Sequence[Sequence[bool]] | None = None) -> dict[str, np.ndarray]:
    """One batch from `examples` (token ids without special tokens).

    Args:
      examples: B lists of token ids, without [CLS]/[SEP].
      step: the training step (seeds the masks together with `seed` and `process_index`).
      process_index: the host's index (jax.process_index()), so hosts draw different masks.
      word_starts: optional, per example one bool per id of `examples[b]`, True where a word
        begins (e.g. from a Chinese word segmenter); see `whole_words`.

    Returns:
      The six int32 arrays described in the class docstring.
    """
    if not len(examples):
      raise ValueError("examples is empty; pass at least one list of token ids")
    if int(step) < 0 or int(process_index) < 0:
      raise ValueError(f"step={step!r} and process_index={process_index!r} must be >= 0")
    if word_starts is not None and len(word_starts) != len(examples):
      raise ValueError(f"word_starts has {len(word_starts)} entries for {len(examples)} examples; "
                       f"give one per example (or None)")
    batch, length, keep = len(examples), self.length, self.max_length - 2
    original = np.full((batch, length), self.pad_id, dtype=np.int64)
    continues = np.zeros((batch, length), dtype=bool)
    sizes = np.zeros(batch, dtype=np.int64)
    for b, example in enumerate(examples):
      body = np.asarray(example, dtype=np.int64).reshape(-1)[:keep]
      n = body.size + 2
      if n > length:
        raise ValueError(f"example {b} has {n} tokens with [CLS]/[SEP] but pad_to={self.pad_to}; "
                         f"raise pad_to to at least {n} or use None")
      original[b, 0], original[b, 1:n - 1], original[b, n - 1] = self.cls_id, body, self.sep_id
      sizes[b] = n
      if word_starts is not None:
        starts = np.asarray(word_starts[b], dtype=bool).reshape(-1)
        if starts.size != len(example):
          raise ValueError(f"word_starts[{b}] has {starts.size} entries for {len(example)} ids; "
                           f"give one bool per token id")
        continues[b, 1:n - 1] = ~starts[:keep]
    if original.min() < 0 or original.max() >= self.vocab_size:
      raise ValueError(f"examples hold ids outside [0, {self.vocab_size}); tokenise with the "
                       f"collator's tokenizer (add_special_tokens=False)")

    positions = np.arange(length)
    real = positions < sizes[:, None]
    continues |= self._continues[original]
    word, n_words = _word_index(continues, real & ~self._never_mask[original])

    # Rows 0..B-1: the encoder's mask of each example; then each example's decoder pool.
    rng = np.random.default_rng([self.seed, int(step), int(process_index)])
    pool_sizes = np.minimum(sizes, self.decoder_pool_size)
    pool_start = batch + np.cumsum(pool_sizes) - pool_sizes
    row_example = np.concatenate([np.arange(batch), np.repeat(np.arange(batch), pool_sizes)])
    row_target = np.concatenate([
        _num_to_predict(sizes, self.encoder_mlm_probability),
        np.repeat(_num_to_predict(sizes, self.decoder_mlm_probability), pool_sizes)])
    masks = _sample_masks(word, n_words, row_example, row_target, rng)
    encoder_mask = masks[:batch]

    # Row i of example b shows pool member pool_start[b] + u (u uniform below the pool size); a
    # padding row shows an all-zero row appended after the pool. Padding columns are zero in the
    # pool already, so one int32 gather writes the whole [B, L, L] matrix.
    visible = np.zeros((masks.shape[0] + 1, length), dtype=np.int32)
    visible[batch:-1] = ~masks[batch:] & real[row_example[batch:]]
    member = pool_start[:, None] + rng.integers(0, pool_sizes[:, None], size=(batch, length))
    member = np.where(real, member, visible.shape[0] - 1)
    decoder_attention_mask = visible[member]
    decoder_attention_mask.reshape(batch, length * length)[:, ::length + 1] = 0  # hide oneself

    # Encoder corruption, drawn per masked token: 80% [MASK], 10% a random id, 10% unchanged.
    encoder_ids = original.copy()
    rows, cols = np.nonzero(encoder_mask)
    draw = rng.random(rows.size)
    to_mask, to_random = draw < 0.8, (draw >= 0.8) & (draw < 0.9)
    encoder_ids[rows[to_mask], cols[to_mask]] = self.mask_id
    encoder_ids[rows[to_random], cols[to_random]] = rng.integers(
        self.vocab_size, size=int(to_random.sum()))

    decoder_labels = np.where(real & (positions > 0) & (positions < sizes[:, None] - 1), original,
                              IGNORE_INDEX)
    return {
        "encoder_input_ids": encoder_ids.astype(np.int32),
        "encoder_attention_mask": real.astype(np.int32),
        "encoder_labels": np.where(encoder_mask, original, IGNORE_INDEX).astype(np.int32),
        "decoder_input_ids": original.astype(np.int32),
        "decoder_attention_mask": decoder_attention_mask,
        "decoder_labels": decoder_labels.astype(np.int32),
    }


def concatenate_into_blocks(token_id_lists: Sequence[Sequence[int]], max_length: int) -> list[list[int]]:
  """Concatenates consecutive tokenised sentences into blocks of at most `max_length - 2` ids.

  The original RetroMAE's pre-training data: sentences (ids without special tokens) are appended
  to the current block while they fit; one that does not fit starts the next block, and one that
  alone exceeds a block is cut into block-sized pieces (its last piece starts the next block).
  Unlike the original, which lets a block overflow and then truncates it in the collator, no token
  is lost: the blocks concatenated are the sentences concatenated, in order.
  """
  _check_max_length(max_length)
  room = int(max_length) - 2
  blocks: list[list[int]] = []
  current: list[int] = []
  for sentence in token_id_lists:
    sentence = list(sentence)
    if not sentence:
      continue
    if len(current) + len(sentence) <= room:
      current.extend(sentence)
      continue
    if current:
      blocks.append(current)
    start = 0
    while len(sentence) - start > room:
      blocks.append(sentence[start:start + room])
      start += room
    current = sentence[start:]
  if current:
    blocks.append(current)
  return blocks
