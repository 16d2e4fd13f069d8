"""launch/demo_finetune.py's own logic: data paths, the character vocabulary, the TF-IDF baseline.

The training runs themselves go through `bge_jax.train.loop.train` (tested elsewhere); what the
demonstration adds is a deterministic character-level tokenizer for the tiny Chinese model and
a TF-IDF baseline scored by the same STS code. Both are checked here against references computed
another way (the texts' own characters, scikit-learn's TfidfVectorizer).
"""

import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

TEXTS = [
    "一架飞机要起飞了。",
    "一架飞机正在起飞。",
    "一个男人在吹一支大笛子。",
    "一个人在吹长笛。",
    "他在2013年去了Paris",
    "一个女人在弹吉他。",
]


@pytest.fixture(scope="module")
def demo():
  from launch import demo_finetune
  return demo_finetune


def test_data_files_default_beside_the_repository_or_under_data_dir(demo, tmp_path):
  args = demo.parser().parse_args([])
  demo.data_files(args)
  assert args.zh_sts == str(REPO.parent / "shared" / "data" / "zh" / "STS-B.valid.data")
  args = demo.parser().parse_args(["--data-dir", str(tmp_path), "--zh-sts", "own.data"])
  demo.data_files(args)
  assert args.en_sts == str(tmp_path / "en" / "stsbenchmark.train-dev.tsv")
  assert args.zh_train == str(tmp_path / "zh" / "bge_finetune_data.jsonl")
  assert args.zh_sts == "own.data"  # a file given by its own flag wins


def test_char_tokenizer_one_token_per_character(demo, tmp_path):
  tok = demo.build_char_tokenizer(TEXTS, str(tmp_path / "tok"))
  for text in TEXTS:
    pieces = tok.tokenize(text)
    assert "[UNK]" not in pieces
    assert "".join(p.removeprefix("##") for p in pieces) == text.lower().replace(" ", "")
    assert len(pieces) == len(text.replace(" ", ""))
  # CJK characters stand alone; Latin words and numbers are spelled with ## continuations.
  assert tok.tokenize("飞机起飞") == ["飞", "机", "起", "飞"]
  assert tok.tokenize("paris 2013") == ["p", "##a", "##r", "##i", "##s", "2", "##0", "##1", "##3"]
  assert tok.tokenize("鲸") == ["[UNK]"]  # a character no training text has
  ids = tok("飞机")["input_ids"]
  assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and len(ids) == 4


def test_char_tokenizer_vocabulary_order_and_determinism(demo, tmp_path):
  from transformers import AutoTokenizer

  tok = demo.build_char_tokenizer(TEXTS, str(tmp_path / "a"))
  again = demo.build_char_tokenizer(list(reversed(TEXTS)), str(tmp_path / "b"))
  vocab_a = (tmp_path / "a" / "vocab.txt").read_text(encoding="utf-8")
  assert vocab_a == (tmp_path / "b" / "vocab.txt").read_text(encoding="utf-8")
  assert ((tmp_path / "a" / "tokenizer.json").read_bytes()
          == (tmp_path / "b" / "tokenizer.json").read_bytes())
  tokens = vocab_a.split("\n")[:-1]
  assert len(tokens) == len(tok) and tokens == sorted(tok.get_vocab(), key=tok.get_vocab().get)
  assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  # Then by count, descending ("一" is the most frequent character), ties by code point.
  counts = {}
  for text in TEXTS:
    for piece in tok.tokenize(text):
      counts[piece] = counts.get(piece, 0) + 1
  assert set(tokens[5:]) == set(counts)
  assert tokens[5:] == sorted(counts, key=lambda t: (-counts[t], t))
  assert tokens[5] == "一"
  # The saved folder is an ordinary BERT tokenizer folder: same ids after reloading.
  loaded = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
  assert loaded(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"] == again(TEXTS)["input_ids"]


def test_char_tokenizer_min_frequency(demo, tmp_path):
  tok = demo.build_char_tokenizer(TEXTS, str(tmp_path / "tok"), min_frequency=2)
  vocab = tok.get_vocab()
  assert "一" in vocab and "飞" in vocab
  assert "吉" not in vocab  # once in TEXTS
  assert tok.tokenize("吉他") == ["[UNK]", "他"]
  with pytest.raises(ValueError, match="min_frequency"):
    demo.build_char_tokenizer(TEXTS, str(tmp_path / "bad"), min_frequency=0)
  with pytest.raises(ValueError, match="no character occurs 100 times"):
    demo.build_char_tokenizer(TEXTS, str(tmp_path / "bad"), min_frequency=100)


def test_char_tfidf_matches_sklearn(demo):
  sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")
  from scipy.stats import spearmanr

  from bge_jax.eval.sts import cosine_scores, sts_spearman

  corpus = [t for t in TEXTS if " " not in t] + ["一个人在弹吉他。", "一个人吹长笛。"]
  s1 = ["一架飞机要起飞了。", "一个男人在吹一支大笛子。", "一个女人在弹吉他。", "一个人吹长笛。"]
  s2 = ["一架飞机正在起飞。", "一个人在吹长笛。", "一个人在弹吉他。", "一架飞机要起飞了。"]
  gold = np.array([4.0, 3.0, 2.0, 0.0])

  ref = sklearn_text.TfidfVectorizer(analyzer="char", lowercase=False, smooth_idf=True,
                                     norm="l2").fit(corpus)
  a, b = ref.transform(s1).toarray(), ref.transform(s2).toarray()
  expected = (a * b).sum(-1)

  baseline = demo.CharTfidf(corpus)
  got = cosine_scores(baseline, s1, s2)
  np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
  assert got[0] > got[3] > 0.0  # shared characters, weighted by rarity
  assert sts_spearman(baseline, s1, s2, gold) == pytest.approx(spearmanr(expected, gold).statistic)
  # Identical texts score 1, texts with no common character 0.
  np.testing.assert_allclose(cosine_scores(baseline, ["飞机", "飞机"], ["飞机", "笛子"]), [1.0, 0.0],
                             atol=1e-12)
