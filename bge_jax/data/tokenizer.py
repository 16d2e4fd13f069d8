"""Tokenizers: a private copy for batchers; a BERT WordPiece tokenizer trained on a corpus."""

from __future__ import annotations

import copy
import os
from typing import Iterable

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def private_copy(tokenizer):
  """A copy of `tokenizer` that no other thread calls.

  A Hugging Face fast tokenizer keeps its padding and truncation settings as mutable state on
  the Rust backend and sets them on every call, so two threads calling one tokenizer with
  different settings can get each other's padding. Batchers run in the trainer's prefetch
  thread while the evaluator tokenises on the main thread; each batcher keeps its own copy.
  """
  return copy.deepcopy(tokenizer)


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: str, *,
                    lowercase: bool = True, min_frequency: int = 2):
  """Trains a BERT-style WordPiece tokenizer, saves it to `out_dir` (HF files), returns it."""
  from tokenizers import BertWordPieceTokenizer
  from transformers import BertTokenizerFast

  wordpiece = BertWordPieceTokenizer(lowercase=lowercase)
  wordpiece.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(SPECIAL_TOKENS), show_progress=False)
  tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=lowercase)
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save_pretrained(out_dir)
  return tokenizer
