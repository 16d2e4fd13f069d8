"""Matryoshka: `Encoder(truncate_dim=)` and the truncated-embedding loss (`loss.matryoshka_dims`),
each against a direct numpy computation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from bge_jax import config as config_lib, contrastive, weights
from bge_jax.data import packing
from bge_jax.encoder import Encoder
from bge_jax.models import bert
from conftest import tiny_random_bert


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
  """(params, config, tokenizer folder) of a random tiny BERT (hidden 64, vocab 1024)."""
  return tiny_random_bert(tmp_path_factory.mktemp("tiny_tok"))


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


# ---------------------------------------------------------------------------------------------
# The Matryoshka loss.
# ---------------------------------------------------------------------------------------------

def _numpy_info_nce(q, p, tau, g):
  """In-batch InfoNCE (target i*G) in float64."""
  s = q @ p.T / tau
  b = q.shape[0]
  lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
  return float(np.mean(lse - s[np.arange(b), np.arange(b) * g]))


@pytest.mark.parametrize("weights", [(), (1.0, 0.5, 2.0)])
def test_matryoshka_loss_matches_numpy(weights):
  rng = np.random.RandomState(0)
  b, g, d = 5, 3, 32
  q, p = rng.randn(b, d).astype(np.float32), rng.randn(b * g, d).astype(np.float32)
  dims = (8, 32, 16)  # any order: sorted largest first, as sentence-transformers
  out = contrastive.embedding_loss(jnp.asarray(q), jnp.asarray(p), normalize=True,
                                   matryoshka_dims=dims, matryoshka_weights=weights,
                                   temperature=0.05, group_size=g)
  w = dict(zip(dims, weights or (1.0,) * 3))
  per_dim = {k: _numpy_info_nce(_cut(q, k), _cut(p, k), 0.05, g) for k in dims}
  for k in dims:
    np.testing.assert_allclose(float(out[f"loss/dim_{k}"]), per_dim[k], rtol=1e-5)
  np.testing.assert_allclose(float(out["loss"]), sum(w[k] * per_dim[k] for k in dims), rtol=1e-5)
  np.testing.assert_allclose(float(out["contrastive_loss"]), float(out["loss"]), rtol=1e-6)
  full = contrastive.info_nce(jnp.asarray(_cut(q, 32), jnp.float32),
                              jnp.asarray(_cut(p, 32), jnp.float32), temperature=0.05,
                              group_size=g)
  assert float(out["accuracy"]) == float(full["accuracy"])  # the largest dim's


def test_matryoshka_config_checks():
  assert contrastive.check_matryoshka((96, 384), (), 384) == ((384, 96), (1.0, 1.0))
  assert contrastive.check_matryoshka((96, 384), (0.5, 2), 384) == ((384, 96), (2.0, 0.5))
  for dims, weights, match in [((385,), (), r"matryoshka_dims entry=385"),
                               ((0,), (), r"matryoshka_dims entry=0"),
                               (("",), (), r"matryoshka_dims entry=''"),
                               ((96, 96), (), "repeats"),
                               ((96,), (1, 2), "2 entries for 1"),
                               ((96,), (-1,), "finite numbers >= 0")]:
    with pytest.raises(ValueError, match=match):
      contrastive.check_matryoshka(dims, weights, 384, prefix="config.loss.")


@pytest.fixture(scope="module")
def model_and_batch():
  """A tiny BERT (hidden 64) and a contrastive batch of 4 queries x group 2, ragged lengths."""
  config = config_lib.preset("tiny", num_layers=1)
  gen = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: ((1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
                       + 0.2 * gen.standard_normal(s.shape)).astype(np.float32),
      bert.abstract_init(config)[0])
  rng = np.random.RandomState(0)

  def rows(n, length):
    lengths = rng.randint(2, length + 1, size=n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.randint(5, config.vocab_size, size=(n, length)), 0)
    ids[:, 0] = 2
    return ids.astype(np.int32), mask

  q_ids, q_mask = rows(4, 8)
  p_ids, p_mask = rows(8, 12)
  batch = {"query_input_ids": q_ids, "query_attention_mask": q_mask,
           "passage_input_ids": p_ids, "passage_attention_mask": p_mask}
  return config, params, batch


@functools.partial(jax.jit, static_argnames=("config", "opts"))
def _value_and_grad(params, batch, *, config, opts):
  def f(p):
    out = contrastive.loss(p, config, batch, **dict(opts))
    return out["loss"], out
  return jax.value_and_grad(f, has_aux=True)(params)


def _rel(a, b) -> float:
  a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
          for t in (a, b))
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_matryoshka_through_the_model_composes_with_gradcache_and_packing(model_and_batch):
  """contrastive.loss with matryoshka_dims: the loss of the model's embeddings cut per dim
  (numpy), and GradCache / packed rows give the unchunked padded loss and gradients."""
  config, params, batch = model_and_batch
  opts = dict(temperature=0.05, group_size=2, matryoshka_dims=(64, 16),
              matryoshka_weights=(1.0, 0.5))
  (value, out), grads = _value_and_grad(params, batch, config=config,
                                        opts=tuple(sorted(opts.items())))
  q = np.asarray(contrastive.embed(params, config, batch["query_input_ids"],
                                   batch["query_attention_mask"], pooling="cls",
                                   normalize=True), np.float64)
  p = np.asarray(contrastive.embed(params, config, batch["passage_input_ids"],
                                   batch["passage_attention_mask"], pooling="cls",
                                   normalize=True), np.float64)
  want = {k: _numpy_info_nce(_cut(q, k), _cut(p, k), 0.05, 2) for k in (64, 16)}
  assert abs(want[64] - want[16]) > 1e-3  # the cut changes the loss
  np.testing.assert_allclose(float(value), want[64] + 0.5 * want[16], rtol=1e-5)
  np.testing.assert_allclose(float(out["loss/dim_16"]), want[16], rtol=1e-5)

  packed = packing.pack_sides(batch, {"query": None, "passage": None})
  assert packed["passage_input_ids"].shape[0] < 8
  for tag, b, chunk in (("GradCache 2", batch, 2), ("GradCache 4", batch, 4),
                        ("packed", packed, 0)):
    (got, _), got_grads = _value_and_grad(params, b, config=config, opts=tuple(sorted(
        dict(opts, chunk_size=chunk).items())))
    assert abs(float(got) - float(value)) <= 1e-5 * abs(float(value)), tag
    assert _rel(got_grads, grads) <= 1e-5, (tag, _rel(got_grads, grads))


# ---------------------------------------------------------------------------------------------
# In the trainer: distillation + Matryoshka + duplicate masking, with GradCache and packing.
# ---------------------------------------------------------------------------------------------

def _scored_rows_with_shared_positives(path, n: int = 64):
  """FlagEmbedding rows with teacher scores; 16 positive texts shared by 4 rows each, so a
  batch of 16 queries holds duplicates of positives."""
  import json
  import random

  from conftest import WORDS
  rng = random.Random(0)
  positives = [" ".join(rng.sample(WORDS, 6)) for _ in range(16)]
  with open(path, "w") as f:
    for i in range(n):
      pos = positives[i % 16]
      row = {"query": " ".join(pos.split()[:3] + rng.sample(WORDS, 1)), "pos": [pos],
             "neg": [" ".join(rng.sample(WORDS, 6)) for _ in range(3)],
             "pos_scores": [rng.uniform(0.5, 1.0)],
             "neg_scores": [rng.uniform(0.0, 0.6) for _ in range(3)]}
      f.write(json.dumps(row) + "\n")
  return path


def test_trainer_logs_per_dim_and_distill_metrics_and_gradcache_packing_agree(tmp_path):
  from bge_jax.train import init
  from bge_jax.train.loop import train
  from bge_jax.train.metrics import read_metrics
  from bge_jax.train.stages import get_stage
  from conftest import make_tokenizer
  from test_train_contrastive import tiny

  rows = _scored_rows_with_shared_positives(tmp_path / "rows.jsonl")
  tok = make_tokenizer(tmp_path / "tok")
  common = {"data.group_size": 4, "dropout": False, "export": False,
            "data.use_teacher_scores": True, "loss.matryoshka_dims": (64, 16),
            "loss.mask_duplicate_positives": True, "loss.distill_type": "m3_kd_loss"}
  config = tiny("finetune", rows, tok, 2, **common, **{"data.pack": False})  # padded

  # The AOT abstract batch is the real batch, passage_hash included.
  stage = get_stage("finetune")
  tokenizer = init.load_tokenizer(config)
  model_config = stage.model_config(init.model_config_and_weights(config, tokenizer)[0], config)
  real = stage.batcher(config, tokenizer, model_config, 0, 1)(0)
  abstract = stage.abstract_batch(config, model_config)
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in abstract.items()} == {
      k: (np.shape(v), np.asarray(v).dtype) for k, v in real.items()}
  assert real["passage_hash"].shape == (64, 2)

  train(config, str(tmp_path / "plain"))
  train(tiny("finetune", rows, tok, 2, **common,
             **{"loss.gradcache_chunk": 4, "data.pack": True}), str(tmp_path / "packed"))
  plain, packed = ([r for r in read_metrics(str(tmp_path / name)) if "loss" in r]
                   for name in ("plain", "packed"))
  assert [r["step"] for r in plain] == [1, 2]
  for a, b in zip(plain, packed):
    for key in ("loss", "loss/dim_64", "loss/dim_16", "distill_loss", "contrastive_loss"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(a["loss"], a["loss/dim_64"] + a["loss/dim_16"], rtol=1e-6)
