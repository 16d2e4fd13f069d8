"""RetroMAE masking collator: whole words, ratios, 80/10/10, decoder matrix, labels, determinism."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bge_jax.data.masking import (RetroMAECollator, concatenate_into_blocks, sample_whole_word_mask,
                                  whole_words)

TEXT = (
    "Retrieval-augmented language models answer questions by first searching a large corpus for "
    "relevant passages. The quality of the retriever therefore bounds the quality of the answer. "
    "Dense retrievers embed queries and passages independently, which makes indexing millions of "
    "documents feasible, but their representations are notoriously data-hungry. Pre-training with "
    "a masked auto-encoder forces the sentence embedding to carry enough information to "
    "reconstruct an aggressively corrupted copy of the input. Unbelievably, a single shallow "
    "decoder layer suffices, provided the decoder cannot simply copy its neighbours. "
    "Hyperparameters such as the masking ratios, the learning rate and the warmup schedule were "
    "chosen on a held-out collection of Wikipedia articles, encyclopaedic paragraphs, "
    "biographical sketches and miscellaneous newswire. Counterintuitively, heavier corruption of "
    "the decoder's input improved downstream effectiveness on zero-shot benchmarks. "
    "Characterisation of the embeddings' anisotropy revealed that contrastive fine-tuning later "
    "redistributes the vectors more uniformly across the hypersphere. "
)
MAX_LENGTH = 256


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[list[int]]:
  """48 windows of real English text, 20-300 tokens (some longer than MAX_LENGTH - 2)."""
  ids = tokenizer(TEXT * 3, add_special_tokens=False)["input_ids"]
  rng = np.random.default_rng(123)
  out = []
  for _ in range(48):
    n = int(rng.integers(20, 300))
    start = int(rng.integers(0, len(ids) - n))
    out.append(ids[start:start + n])
  return out


@pytest.fixture(scope="module")
def collator(tokenizer) -> RetroMAECollator:
  return RetroMAECollator(tokenizer, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def batches(collator, examples) -> list[dict[str, np.ndarray]]:
  return [collator(examples, step=s) for s in range(4)]


def _lengths(batch) -> np.ndarray:
  return batch["encoder_attention_mask"].sum(axis=1)


def _continuation(tokenizer, ids: np.ndarray) -> np.ndarray:
  """bool per position: the token is a `##` piece (so it belongs to the word before it)."""
  return np.array([t.startswith("##") for t in tokenizer.convert_ids_to_tokens(ids.tolist())])


def _assert_whole_words(hidden: np.ndarray, continuation: np.ndarray, exempt: int = -1):
  """A ## piece is hidden exactly when the token before it is (ignoring position `exempt`).

  A window may start inside a word: a piece right after [CLS] is a word of its own.
  """
  for j in np.flatnonzero(continuation):
    if j > 1 and exempt not in (j, j - 1):
      assert hidden[j] == hidden[j - 1], (j, hidden[j - 1:j + 1])


# ------------------------------------------------------------------------------ whole words

def test_whole_words_groups_pieces_and_skips_specials():
  tokens = ["[CLS]", "the", "un", "##bel", "##ie", "##va", "##bly", "token", "##s", ".", "[SEP]",
            "[PAD]"]
  assert whole_words(tokens) == [[1], [2, 3, 4, 5, 6], [7, 8], [9]]
  assert whole_words(tokens, special_tokens=["."]) == [[1], [2, 3, 4, 5, 6], [7, 8]]
  # A piece with no word before it (right after [CLS]) is a word of its own.
  assert whole_words(["[CLS]", "##x", "##y", "z", "[SEP]"]) == [[1, 2], [3]]
  assert whole_words(["[CLS]", "[SEP]"]) == []


def test_whole_words_on_real_tokenizer(tokenizer):
  ids = tokenizer("Unbelievably, hyperparameters matter.")["input_ids"]
  tokens = tokenizer.convert_ids_to_tokens(ids)
  words = whole_words(tokens)
  flat = [i for w in words for i in w]
  assert flat == list(range(1, len(tokens) - 1))          # every non-special token, once, in order
  for w in words:
    assert not tokens[w[0]].startswith("##")
    assert all(tokens[i].startswith("##") for i in w[1:])
  assert max(len(w) for w in words) > 1                    # the text does split words


def test_sample_whole_word_mask_count_skip_and_uniformity():
  words = [[i] for i in range(1, 11)]                      # 10 one-token words in 12 tokens
  hits = np.zeros(12)
  for s in range(2000):
    mask = sample_whole_word_mask(words, 12, 0.3, np.random.default_rng(s))
    assert mask.dtype == bool and mask.shape == (12,)
    assert mask.sum() == round(12 * 0.3) and not mask[0] and not mask[11]
    hits += mask
  np.testing.assert_allclose(hits[1:11] / 2000, 0.4, atol=0.05)   # a uniform shuffle
  # num_to_predict = round(6 * 0.2) = 1: the 3-token word would overshoot and is always skipped.
  for s in range(50):
    mask = sample_whole_word_mask([[1, 2, 3], [4]], 6, 0.2, np.random.default_rng(s))
    assert np.flatnonzero(mask).tolist() == [4]
  # A target beyond every candidate masks all of them; max(1, ...) masks at least one token.
  assert sample_whole_word_mask([[1], [2]], 4, 0.9, np.random.default_rng(0)).tolist() == [
      False, True, True, False]
  assert sample_whole_word_mask([[1], [2]], 4, 0.01, np.random.default_rng(0)).sum() == 1
  assert not sample_whole_word_mask([], 4, 0.5, np.random.default_rng(0)).any()


def _reference_mask(words, n_tokens, ratio, rng: random.Random) -> np.ndarray:
  """Hugging Face's `_whole_word_mask` (transformers v4), written as the plain loop it is."""
  order = [list(w) for w in words]
  rng.shuffle(order)
  target, masked = max(1, round(n_tokens * ratio)), set()
  for word in order:
    if len(masked) >= target:
      break
    if len(masked) + len(word) > target:
      continue
    masked.update(word)
  return np.isin(np.arange(n_tokens), sorted(masked))


def test_sample_whole_word_mask_matches_the_reference_loop_in_distribution():
  words = [[1], [2, 3, 4], [5, 6], [7], [8, 9, 10, 11], [12], [13, 14]]   # target round(4.8) = 5
  draws = 3000
  ours = np.stack([sample_whole_word_mask(words, 16, 0.3, np.random.default_rng(s))
                   for s in range(draws)])
  python_rng = random.Random(0)
  reference = np.stack([_reference_mask(words, 16, 0.3, python_rng) for _ in range(draws)])
  np.testing.assert_allclose(ours.mean(axis=0), reference.mean(axis=0), atol=0.045)
  for count in range(1, 6):
    assert abs((ours.sum(1) == count).mean() - (reference.sum(1) == count).mean()) < 0.045


# ------------------------------------------------------------------------------ encoder side

def test_encoder_mask_ratio(batches):
  masked = sum(int((b["encoder_labels"] != -100).sum()) for b in batches)
  tokens = sum(int(_lengths(b).sum()) for b in batches)   # [CLS]/[SEP] counted, as HF does
  assert abs(masked / tokens - 0.3) < 0.02
  for b in batches:
    per_example = (b["encoder_labels"] != -100).sum(axis=1)
    assert (per_example <= np.maximum(1, np.rint(_lengths(b) * 0.3))).all()


def test_encoder_replacement_split(batches, collator):
  kinds = np.zeros(3)
  for b in batches:
    masked = b["encoder_labels"] != -100
    inputs, originals = b["encoder_input_ids"][masked], b["decoder_input_ids"][masked]
    kinds += [(inputs == collator.mask_id).sum(), (inputs == originals).sum(),
              ((inputs != collator.mask_id) & (inputs != originals)).sum()]
    np.testing.assert_array_equal(b["encoder_input_ids"][~masked], b["decoder_input_ids"][~masked])
  assert kinds.sum() > 5000
  np.testing.assert_allclose(kinds / kinds.sum(), [0.8, 0.1, 0.1], atol=0.02)


def test_encoder_masks_whole_words_only(batches, tokenizer):
  for b in batches[:2]:
    for row, n in enumerate(_lengths(b)):
      ids = b["decoder_input_ids"][row, :n]
      _assert_whole_words(b["encoder_labels"][row, :n] != -100, _continuation(tokenizer, ids))


def test_inputs_labels_and_specials(batches, collator, examples):
  b = batches[0]
  assert all(v.dtype == np.int32 for v in b.values())
  assert b["decoder_attention_mask"].shape == (len(examples), MAX_LENGTH, MAX_LENGTH)
  for row, example in enumerate(examples):
    body = example[:MAX_LENGTH - 2]
    n = len(body) + 2
    expected = [collator.cls_id, *body, collator.sep_id] + [collator.pad_id] * (MAX_LENGTH - n)
    np.testing.assert_array_equal(b["decoder_input_ids"][row], expected)
    np.testing.assert_array_equal(b["encoder_attention_mask"][row],
                                  [1] * n + [0] * (MAX_LENGTH - n))
    labels, inputs = b["encoder_labels"][row], b["encoder_input_ids"][row]
    masked = labels != -100
    np.testing.assert_array_equal(labels[masked], np.asarray(expected)[masked])
    assert not masked[0] and not masked[n - 1] and not masked[n:].any()
    assert inputs[0] == collator.cls_id and inputs[n - 1] == collator.sep_id
    assert (inputs[n:] == collator.pad_id).all()
    np.testing.assert_array_equal(b["decoder_labels"][row],
                                  [-100, *body, -100] + [-100] * (MAX_LENGTH - n))


# ------------------------------------------------------------------------------ decoder side

def test_decoder_matrix_structure(batches, tokenizer):
  fractions = []
  for b in batches[:2]:
    for row, n in enumerate(_lengths(b)):
      m = b["decoder_attention_mask"][row]
      real = m[:n, :n]
      assert not np.diag(real).any()                       # nobody sees itself
      assert real[0, 0] == 0 and real[1:, 0].all()         # [CLS] seen by all rows but its own
      assert real[:n - 1, n - 1].all()                     # [SEP] is never a masking candidate
      assert not m[n:].any() and not m[:, n:].any()        # padding rows and columns
      target = round(n * 0.5)
      hidden = (real == 0).sum(axis=1)
      assert (hidden <= target + 1).all()
      if n >= 40:
        fractions.extend(real.sum(axis=1) / n)
        assert (np.abs(real.sum(axis=1) / n - 0.5) < 0.1).all()
      continuation = _continuation(tokenizer, b["decoder_input_ids"][row, :n])
      for i in range(0, n, 7):
        _assert_whole_words(real[i] == 0, continuation, exempt=i)
  assert abs(np.mean(fractions) - 0.5) < 0.02


def _count_pool_members(hidden: np.ndarray) -> int:
  """Groups rows that agree everywhere except on their own two positions (same pool member)."""
  representatives: list[int] = []
  for i in range(hidden.shape[0]):
    if representatives:
      reps = np.asarray(representatives)
      differ = hidden[reps] != hidden[i]
      differ[:, i] = False
      differ[np.arange(reps.size), reps] = False
      if (~differ.any(axis=1)).any():
        continue
    representatives.append(i)
  return len(representatives)


def test_decoder_rows_come_from_a_pool(tokenizer):
  ids = tokenizer(TEXT * 3, add_special_tokens=False)["input_ids"]
  collator = RetroMAECollator(tokenizer, max_length=512)
  b = collator([ids[:398], ids[:18]], step=3)
  long_rows = b["decoder_attention_mask"][0, :400, :400] == 0
  short_rows = b["decoder_attention_mask"][1, :20, :20] == 0
  # 400 rows drawing from 128 masks use ~122 of them; 20 rows from 20 masks use ~13.
  assert 100 < _count_pool_members(long_rows) <= 128
  assert 5 < _count_pool_members(short_rows) <= 20


# ------------------------------------------------------------------------------ determinism

def test_batches_are_a_function_of_seed_step_process(tokenizer, examples):
  subset = examples[:6]
  first = RetroMAECollator(tokenizer, max_length=MAX_LENGTH)
  again = RetroMAECollator(tokenizer, max_length=MAX_LENGTH)
  reference = first(subset, step=5, process_index=1)
  first(subset, step=6)                                    # call order does not matter
  for batch in (first(subset, step=5, process_index=1), again(subset, step=5, process_index=1)):
    for name, array in reference.items():
      np.testing.assert_array_equal(batch[name], array, err_msg=name)
  others = [first(subset, step=6, process_index=1), first(subset, step=5, process_index=0),
            RetroMAECollator(tokenizer, max_length=MAX_LENGTH, seed=1)(subset, step=5,
                                                                       process_index=1)]
  for other in others:
    assert not np.array_equal(other["encoder_input_ids"], reference["encoder_input_ids"])
    assert not np.array_equal(other["decoder_attention_mask"], reference["decoder_attention_mask"])


def test_pad_to_and_truncation(tokenizer):
  collator = RetroMAECollator(tokenizer, max_length=8, pad_to=12)
  b = collator([list(range(1000, 1020)), [1000, 1001]], step=0)
  assert b["encoder_input_ids"].shape == (2, 12)
  assert b["decoder_attention_mask"].shape == (2, 12, 12)
  np.testing.assert_array_equal(b["decoder_input_ids"][0, :8],
                                [collator.cls_id, *range(1000, 1006), collator.sep_id])
  np.testing.assert_array_equal(_lengths(b), [8, 4])
  with pytest.raises(ValueError, match="pad_to"):
    RetroMAECollator(tokenizer, max_length=16, pad_to=8)([list(range(1000, 1020))], step=0)


# ------------------------------------------------------------------------------ concatenation

def test_the_old_mode_name_pack_is_refused_with_the_new_one():
  """Stage 1's data.mode='pack' was renamed 'concatenate' (stages 2-3's data.pack is another
  thing); the old value stops with the key and its new name, before any data is read."""
  from bge_jax.data.text_batcher import TextBatcher

  with pytest.raises(ValueError, match=r"config.data.mode='pack' is now called 'concatenate'"):
    TextBatcher(None, None, None, 1, seed=0, max_length=8, mode="pack", process_index=0)
  with pytest.raises(ValueError, match=r"config.data.mode='blocks'; use 'truncate'"):
    TextBatcher(None, None, None, 1, seed=0, max_length=8, mode="blocks", process_index=0)


def test_concatenate_into_blocks_fills_blocks_and_keeps_every_token():
  assert concatenate_into_blocks([[1, 2], [3, 4, 5], [], [6], [7] * 10], max_length=7) == [
      [1, 2, 3, 4, 5], [6], [7] * 5, [7] * 5]
  rng = np.random.default_rng(0)
  sentences = [list(range(100 * k, 100 * k + int(n))) for k, n in
               enumerate(rng.integers(1, 60, size=300))] + [list(range(50000, 50300))]
  room = 128 - 2
  blocks = concatenate_into_blocks(sentences, max_length=128)
  stream = [t for s in sentences for t in s]
  assert [t for blk in blocks for t in blk] == stream       # no token lost, order kept
  assert all(0 < len(blk) <= room for blk in blocks)
  sentence_at = {sum(map(len, sentences[:k])): len(s) for k, s in enumerate(sentences)}
  offset = 0
  for blk, following in zip(blocks, blocks[1:]):
    offset += len(blk)
    # A block ends early only because the next sentence would not fit.
    assert len(blk) == room or (offset in sentence_at and len(blk) + sentence_at[offset] > room)
  assert np.mean([len(blk) for blk in blocks[:-1]]) > 0.75 * room


# ------------------------------------------------------------------------------ Chinese

@pytest.fixture(scope="module")
def zh_tokenizer(tmp_path_factory):
  from transformers import BertTokenizer
  folder = tmp_path_factory.mktemp("zh_vocab")
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"我喜欢北京天安门的雪很美", "##欢"]
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
  # from_pretrained: transformers 5's BertTokenizer(vocab_file=...) silently ignores the file.
  return BertTokenizer.from_pretrained(str(folder))


def test_chinese_is_per_character_unless_word_starts_given(zh_tokenizer):
  text = "我喜欢北京天安门的雪"
  ids = zh_tokenizer(text, add_special_tokens=False)["input_ids"]
  tokens = zh_tokenizer.convert_ids_to_tokens([zh_tokenizer.cls_token_id, *ids,
                                              zh_tokenizer.sep_token_id])
  assert tokens[1:-1] == list(text)
  assert whole_words(tokens) == [[i] for i in range(1, 11)]
  #           我    喜    欢     北    京     天    安     门     的    雪
  starts = [True, True, False, True, False, True, False, False, True, True]
  groups = [[1], [2, 3], [4, 5], [6, 7, 8], [9], [10]]
  assert whole_words(tokens, word_starts=[False, *starts, False]) == groups

  collator = RetroMAECollator(zh_tokenizer, max_length=16)
  plain = collator([ids] * 8, step=0)
  assert ((plain["encoder_labels"] != -100).sum(axis=1) == round(12 * 0.3)).all()
  segmented_masks = []
  for step in range(10):
    b = collator([ids] * 8, step=step, word_starts=[starts] * 8)
    segmented_masks.append(b["encoder_labels"][:, :12] != -100)
    for row in range(8):
      rows = b["decoder_attention_mask"][row, :12, :12] == 0
      for i in range(12):
        for group in groups:
          if i not in group:
            assert len(set(rows[i, group])) == 1, (i, group)
  segmented = np.concatenate(segmented_masks)
  for group in groups:
    assert (segmented[:, group] == segmented[:, group[:1]]).all()
  assert segmented[:, [2, 3]].any()                         # multi-character words do get masked


# ------------------------------------------------------------------------------ errors

class _NoMaskTokenizer:
  mask_token_id = None
  cls_token_id, sep_token_id, pad_token_id = 2, 3, 0


@pytest.mark.parametrize("kwargs, match", [
    ({"max_length": 2}, "max_length"),
    ({"encoder_mlm_probability": 0.0}, "encoder_mlm_probability"),
    ({"encoder_mlm_probability": 1.0}, "encoder_mlm_probability"),
    ({"decoder_mlm_probability": 1.5}, "decoder_mlm_probability"),
    ({"decoder_mlm_probability": -0.1}, "decoder_mlm_probability"),
])
def test_bad_arguments_name_the_fix(tokenizer, kwargs, match):
  with pytest.raises(ValueError, match=match):
    RetroMAECollator(tokenizer, **kwargs)


def test_other_errors(tokenizer, collator):
  with pytest.raises(ValueError, match="mask_token"):
    RetroMAECollator(_NoMaskTokenizer())
  with pytest.raises(ValueError, match="max_length"):
    concatenate_into_blocks([[1, 2]], max_length=2)
  with pytest.raises(ValueError, match="ratio"):
    sample_whole_word_mask([[1]], 3, 1.0, np.random.default_rng(0))
  with pytest.raises(ValueError, match="word_starts"):
    collator([[1000, 1001]], step=0, word_starts=[[True]])
  with pytest.raises(ValueError, match="outside"):
    collator([[10 ** 6]], step=0)
  with pytest.raises(ValueError, match="empty"):
    collator([], step=0)
