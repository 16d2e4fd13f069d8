"""Tokenizers: a private copy for batchers; a BERT WordPiece tokenizer trained on a corpus."""

from __future__ import annotations

import copy
import json
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
  """Trains a BERT-style WordPiece tokenizer, saves it to `out_dir` (HF files), returns it.

  Deterministic: the same texts give the same vocabulary in every process. tokenizers' trainer
  (BPE with the "##" continuing-subword prefix) numbers the "##c" pieces as it meets them while
  iterating over a hash map, and those numbers break ties between equally frequent merges, so
  each run learns a different vocabulary (huggingface/tokenizers#1794). Here every "##c" piece of
  the corpus is numbered ahead of training, in sorted order: they are passed as extra special
  tokens (the trainer numbers those first, in order), then removed from the tokenizer's special
  tokens, staying in the vocabulary as ordinary pieces.
  """
  from tokenizers import BertWordPieceTokenizer, Tokenizer
  from transformers import BertTokenizerFast

  texts = list(texts)
  wordpiece = BertWordPieceTokenizer(lowercase=lowercase)
  backend = wordpiece._tokenizer
  continuing = set()
  for text in texts:
    for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
      continuing.update(word[1:])
  pieces = [f"##{c}" for c in sorted(continuing)]
  wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(SPECIAL_TOKENS) + pieces, show_progress=False)
  state = json.loads(backend.to_str())
  state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] in SPECIAL_TOKENS]
  tokenizer = BertTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                do_lower_case=lowercase)
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save_pretrained(out_dir)
  return tokenizer
