"""The WordPiece tokenizer trained for a model from scratch (`tokenizer.train_wordpiece`)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

_TRAIN = """
import json, sys
from bge_jax.data import stdlib_corpus, tokenizer
texts = [p for _, p in stdlib_corpus.stdlib_pairs()][:600]
tok = tokenizer.train_wordpiece(texts, 1500, sys.argv[1])
print(json.dumps(sorted(tok.get_vocab().items())))
"""


@pytest.mark.slow
def test_training_gives_the_same_vocabulary_in_every_process(tmp_path):
  """tokenizers' own trainer numbers its "##" pieces in hash-map order, so two processes learned
  different vocabularies (430 of 4,000 ids differed between two quickstart runs); with the pieces
  numbered ahead of training, every process learns the same one, id for id."""
  vocabs = []
  for i in range(3):
    out = subprocess.run([sys.executable, "-c", _TRAIN, str(tmp_path / f"t{i}")], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=300)
    vocabs.append(json.loads(out.stdout.splitlines()[-1]))
  assert len(vocabs[0]) == 1500
  assert vocabs[1] == vocabs[0] and vocabs[2] == vocabs[0]


def test_continuing_pieces_are_ordinary_tokens(tmp_path):
  """The "##c" pieces numbered ahead of training are vocabulary entries, not special tokens: text
  that contains "##a" is split as any text, and decoding keeps it."""
  from transformers import AutoTokenizer

  from bge_jax.data import tokenizer

  texts = ["the quick brown fox jumps over the lazy dog", "a lazy dog sleeps all day long",
           "foxes and dogs are quick animals", "# a comment"] * 20
  tok = tokenizer.train_wordpiece(texts, 120, str(tmp_path))
  vocab = tok.get_vocab()
  assert {"##o", "##x", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"} <= set(vocab)
  assert [vocab[t] for t in tokenizer.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
  for t in (tok, AutoTokenizer.from_pretrained(str(tmp_path))):
    assert sorted(t.all_special_tokens) == sorted(tokenizer.SPECIAL_TOKENS)
    ids = t("##o fox")["input_ids"]
    assert t.convert_ids_to_tokens(ids)[1:3] == ["#", "#"]  # split, not one special token
    assert t.decode(ids, skip_special_tokens=True) == "# # o fox"
