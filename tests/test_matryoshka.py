"""Matryoshka: `Encoder(truncate_dim=)` and the truncated-embedding loss (`loss.matryoshka_dims`),
each against a direct numpy computation."""

import jax
import numpy as np
import pytest
import transformers

from bge_jax import config as config_lib, weights
from bge_jax.encoder import Encoder
from bge_jax.models import bert


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
  """(params, config, tokenizer folder) of a random tiny BERT (hidden 64, vocab 1024)."""
  config = config_lib.preset("tiny")
  gen = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * gen.standard_normal(s.shape)).astype(np.float32),
                        bert.abstract_init(config)[0])
  folder = tmp_path_factory.mktemp("tiny_tok")
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
      f"w{i}" for i in range(5, config.vocab_size)]
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
  transformers.BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(str(folder))
  return params, config, str(folder)


TEXTS = [" ".join(f"w{(7 * i + 3 * k) % 1000 + 5}" for k in range(1 + (i * 5) % 23))
         for i in range(13)]


def _cut(x: np.ndarray, d: int) -> np.ndarray:
  x = x[:, :d].astype(np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encoder_truncate_dim_matches_numpy(tiny_parts, pack, pooling):
  params, config, tok = tiny_parts
  tokenizer = transformers.BertTokenizer.from_pretrained(tok)
  raw = Encoder(params, config, tokenizer, pooling=pooling, normalize=False).encode(
      TEXTS, batch_size=8, pack=pack)
  assert raw.shape == (13, config.hidden_size)
  for d in (1, 16, config.hidden_size):
    enc = Encoder(params, config, tokenizer, pooling=pooling, truncate_dim=d)
    got = enc.encode(TEXTS, batch_size=8, pack=pack)
    assert got.shape == (13, d) and enc.dim == d
    np.testing.assert_allclose(got, _cut(raw, d), rtol=0, atol=2e-6)
  # Not normalised: a plain cut of the raw vectors.
  cut = Encoder(params, config, tokenizer, pooling=pooling, normalize=False, truncate_dim=16)
  np.testing.assert_allclose(cut.encode(TEXTS, batch_size=8, pack=pack), raw[:, :16], rtol=0,
                             atol=2e-6)
  assert cut.encode([]).shape == (0, 16)


def test_encoder_truncate_dim_through_loaders(tiny_parts, tmp_path):
  params, config, tok = tiny_parts
  folder = weights.save_params(str(tmp_path / "ckpt"), params, config, tokenizer=tok)
  full = Encoder.from_hf(folder, pooling="mean").encode(TEXTS, batch_size=8)
  for enc in (Encoder.from_hf(folder, pooling="mean", truncate_dim=24),
              Encoder.from_checkpoint(folder, pooling="mean", truncate_dim=24)):
    assert enc.dim == 24
    np.testing.assert_allclose(enc.encode(TEXTS, batch_size=8), _cut(full, 24), rtol=0,
                               atol=2e-6)


@pytest.mark.parametrize("bad", [0, -3, 65, 2.0, True])
def test_encoder_truncate_dim_refusals_name_the_argument(tiny_parts, bad):
  params, config, tok = tiny_parts
  tokenizer = transformers.BertTokenizer.from_pretrained(tok)
  with pytest.raises(ValueError, match=r"truncate_dim=.*from 1 to the model's hidden size 64"):
    Encoder(params, config, tokenizer, truncate_dim=bad)
