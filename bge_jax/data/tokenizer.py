"""Training a BERT WordPiece tokenizer on a corpus (for models trained from scratch)."""

from __future__ import annotations

import os
from typing import Iterable

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


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
