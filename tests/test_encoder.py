"""`Encoder`: parity with sentence-transformers, ordering, bucketed shapes, checkpoints, STS-B."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from bge_jax import weights
from bge_jax.encoder import Encoder, bucket_for, length_buckets
from bge_jax.models import bert
from conftest import tiny_random_bert

WORDS = ("the a man woman child dog cat plays runs reads quickly slowly under over bright dark "
         "river mountain city music guitar piano soccer weather tomorrow yesterday because "
         "although embedding vector similarity search retrieval passage query model training "
         "gradient Zürich naïve 3.14 e-mail well-known").split()


def _sentences(n: int, seed: int, max_words: int) -> list[str]:
  rng = np.random.RandomState(seed)
  out = []
  for i in range(n):
    k = 1 + (i * 7919 + int(rng.randint(0, max_words))) % max_words
    words = [WORDS[j] for j in rng.randint(0, len(WORDS), size=k)]
    out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ""]))
  return out


@pytest.fixture(scope="module")
def minilm_encoder(minilm_path):
  return Encoder.from_hf(minilm_path, pooling="mean")


@pytest.fixture(scope="module")
def st_model(minilm_path):
  from sentence_transformers import SentenceTransformer
  return SentenceTransformer(minilm_path, device="cpu")


# Lengths up to ~60 tokens (a few length buckets), well under MiniLM's max_seq_length of 256.
SENTENCES = _sentences(50, seed=0, max_words=45)


@pytest.mark.parametrize("pack", [True, False])
def test_encode_matches_sentence_transformers(minilm_encoder, st_model, pack):
  lengths = [len(x) for x in minilm_encoder.tokenize(SENTENCES, 512)]
  assert min(lengths) <= 4 and max(lengths) > 32 and max(lengths) < st_model.max_seq_length
  ref = st_model.encode(SENTENCES, batch_size=16, convert_to_numpy=True)
  got = minilm_encoder.encode(SENTENCES, batch_size=32, pack=pack)  # 2 batches, by length
  assert got.shape == (50, 384) and got.dtype == np.float32
  delta = float(np.abs(got - ref).max())
  print(f"\nEncoder (pack={pack}) vs sentence-transformers (MiniLM, mean) max |delta|: {delta:.3g}")
  assert delta <= 1e-5
  # In input order: each row is closest to its own reference row.
  assert (np.argmax(got @ ref.T, axis=1) == np.arange(50)).all()
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


def test_instruction_prefix(minilm_encoder, st_model):
  texts = SENTENCES[:5]
  prefix = "Represent this sentence for searching relevant passages: "
  got = minilm_encoder.encode(texts, batch_size=8, instruction=prefix)
  prefixed = [prefix + t for t in texts]
  np.testing.assert_allclose(got, minilm_encoder.encode(prefixed, batch_size=8), rtol=0,
                             atol=1e-6)
  np.testing.assert_allclose(got, st_model.encode(prefixed, convert_to_numpy=True), rtol=0,
                             atol=1e-5)
  assert np.abs(got - minilm_encoder.encode(texts, batch_size=8)).max() > 1e-2


def test_single_string_empty_and_type_errors(minilm_encoder, st_model):
  one = minilm_encoder.encode("A man is playing a guitar.")
  assert one.shape == (1, 384)
  np.testing.assert_allclose(one[0], st_model.encode("A man is playing a guitar."), atol=1e-5)
  empty = minilm_encoder.encode([])
  assert empty.shape == (0, 384) and empty.dtype == np.float32
  with pytest.raises(TypeError, match=r"texts\[1\]"):
    minilm_encoder.encode(["fine", 3])
  with pytest.raises(TypeError):
    minilm_encoder.encode(["fine", b"bytes"])
  with pytest.raises(TypeError):
    minilm_encoder.encode([None])


def test_encoder_from_project_checkpoint(minilm_path, minilm_encoder, tmp_path):
  folder = weights.save_params(str(tmp_path / "ckpt"), minilm_encoder.params,
                                  minilm_encoder.config, tokenizer=minilm_path)
  texts = SENTENCES[:5]
  enc = Encoder.from_hf(folder, pooling="mean")  # a checkpoint folder goes to from_checkpoint
  assert enc.config == minilm_encoder.config
  assert enc.tokenizer(texts)["input_ids"] == minilm_encoder.tokenizer(texts)["input_ids"]
  np.testing.assert_allclose(enc.encode(texts, batch_size=8),
                             minilm_encoder.encode(texts, batch_size=8), rtol=0, atol=1e-6)
  direct = Encoder.from_checkpoint(folder, pooling="mean")
  for a, b in zip(jax.tree.leaves(direct.params), jax.tree.leaves(minilm_encoder.params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_encoder_from_a_bf16_run_checkpoint_computes_in_float32(minilm_path, minilm_encoder,
                                                                tmp_path):
  """A checkpoint records its training run's compute dtype (bf16 on accelerators); encoding
  it gives the float32 embeddings of the same weights unless asked for bf16."""
  bf16 = minilm_encoder.config.replace(dtype="bfloat16")
  folder = weights.save_params(str(tmp_path / "ckpt"), minilm_encoder.params, bf16,
                                  tokenizer=minilm_path)
  texts = SENTENCES[:5]
  enc = Encoder.from_hf(folder, pooling="mean")
  assert enc.config.dtype == "float32"
  np.testing.assert_allclose(enc.encode(texts, batch_size=8),
                             minilm_encoder.encode(texts, batch_size=8), rtol=0, atol=1e-6)
  fast = Encoder.from_hf(folder, pooling="mean", dtype="bfloat16")  # passed on to the checkpoint
  assert fast.config.dtype == "bfloat16"
  got = fast.encode(texts, batch_size=8)
  assert np.abs(got - minilm_encoder.encode(texts, batch_size=8)).max() > 1e-4  # really bf16
  np.testing.assert_allclose(got, minilm_encoder.encode(texts, batch_size=8), atol=5e-2)
  with pytest.raises(ValueError, match=r"from_checkpoint\(.*dtype"):
    Encoder.from_checkpoint(folder, dtype="float13")


# ---------------------------------------------------------------------------------------------
# Bucketing: bounded compiled shapes, input order, padding invariance (tiny random model)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
  params, config, folder = tiny_random_bert(tmp_path_factory.mktemp("tiny_tok"))
  tokenizer = transformers.BertTokenizer.from_pretrained(folder)
  return Encoder(params, config, tokenizer, pooling="mean")  # max_position_embeddings 128


def _tiny_texts(n: int = 200, seed: int = 1, skewed: bool = False):
  """Texts of 3..127 tokens with [CLS] and [SEP]: uniform, or long-tailed (most short, like
  web text) when `skewed`."""
  rng = np.random.RandomState(seed)
  if skewed:
    n_words = np.clip(np.round(rng.lognormal(2.5, 0.8, size=n)).astype(int), 1, 125)
  else:
    n_words = rng.randint(1, 125, size=n)
  return [" ".join(f"w{i}" for i in rng.randint(5, 1024, size=k)) for k in n_words], n_words


def _one_padded_batch(enc, texts):
  """Reference: every text in one padded batch (no sorting, buckets, filler rows or packing)."""
  ids = enc.tokenize(texts, 128)
  input_ids = np.zeros((len(ids), 128), np.int32)
  mask = np.zeros_like(input_ids)
  for r, row in enumerate(ids):
    input_ids[r, :len(row)] = row
    mask[r, :len(row)] = 1
  ref = jax.jit(bert.embed_sentences, static_argnames=("config", "pooling"))(
      enc.params, enc.config, jnp.asarray(input_ids), jnp.asarray(mask), pooling="mean")
  return np.asarray(ref), mask


def test_compiled_shapes_stay_bounded_and_order_is_kept(tiny_encoder, monkeypatch):
  enc = tiny_encoder
  texts, n_words = _tiny_texts()

  seen = []
  embed = enc._embed

  def recording(params, input_ids, attention_mask):
    seen.append(tuple(input_ids.shape))
    return embed(params, input_ids=input_ids, attention_mask=attention_mask)

  monkeypatch.setattr(enc, "_embed", recording)
  got = enc.encode(texts, batch_size=8, max_length=128, show_progress=False, pack=False)
  buckets = length_buckets(128)
  # Quarter-octave grid (bge_jax/encoder.py): padding past 32 tokens is at most 1/4 of a batch.
  assert buckets == (4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128)
  assert len(seen) == 25  # ceil(200 / 8) batches
  shapes = set(seen)
  assert all(length in buckets for _, length in shapes)
  assert all(rows in (1, 2, 4, 8) for rows, _ in shapes)
  # Without buckets this would be ~25 distinct lengths; with them at most one per bucket.
  assert len(shapes) <= len(buckets) and len({length for _, length in shapes}) < len(seen)
  if hasattr(embed, "_cache_size"):
    assert embed._cache_size() == len(shapes)

  ref, mask = _one_padded_batch(enc, texts)
  assert (mask.sum(1) == n_words + 2).all()
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_packed_encode_matches_padded_in_fewer_tokens(tiny_encoder, monkeypatch):
  """The default packed path: the one-padded-batch reference, in bounded shapes, and far fewer
  tokens than the padded path on long-tailed lengths (a sorted batch of 64 spans a wide range)."""
  enc = tiny_encoder
  texts, n_words = _tiny_texts(seed=2, skewed=True)
  seen = []
  embed = enc._embed_packed

  def recording(params, input_ids, segment_ids, position_ids, text_slot):
    seen.append((tuple(input_ids.shape), len(text_slot)))
    return embed(params, input_ids, segment_ids, position_ids, text_slot)

  monkeypatch.setattr(enc, "_embed_packed", recording)
  got = enc.encode(texts, batch_size=64, max_length=128, show_progress=False)
  buckets = length_buckets(128)
  assert len(seen) == 4  # ceil(200 / 64) batches, every one packed
  assert all(length in buckets and rows in (1, 2, 4, 8, 16, 32, 64) and out in (8, 64)
             for (rows, length), out in seen)
  packed_tokens = sum(rows * length for (rows, length), _ in seen)
  order = sorted(n_words + 2)[::-1]
  padded_tokens = sum(min(64, 1 << (len(order[i:i + 64]) - 1).bit_length())
                      * bucket_for(order[i], buckets) for i in range(0, len(order), 64))
  real = int((n_words + 2).sum())
  print(f"\npacked encode: {packed_tokens} tokens for {real} real, padded {padded_tokens}")
  assert real <= packed_tokens < 0.7 * padded_tokens
  ref, _ = _one_padded_batch(enc, texts)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_filler_rows_do_not_leak(tiny_encoder):
  """3 texts pad to 4 rows; the result equals encoding each text on its own."""
  texts = ["w5 w6 w7", "w8", "w9 w10 w11 w12 w13"]
  together = tiny_encoder.encode(texts, batch_size=8)
  alone = np.concatenate([tiny_encoder.encode([t]) for t in texts])
  np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# STS-B dev (real data, real weights)
# ---------------------------------------------------------------------------------------------

def _sts_dev(shared_data):
  path = shared_data / "en" / "stsbenchmark.train-dev.tsv"
  if not path.is_file():
    pytest.skip(f"{path} is absent")
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  header, rows = rows[0], rows[1:]
  col = {name: i for i, name in enumerate(header)}
  assert {"split", "score", "sentence1", "sentence2"} <= set(col)
  dev = [r for r in rows if r[col["split"]] == "dev"]
  assert len(dev) == 1500
  return ([r[col["sentence1"]] for r in dev], [r[col["sentence2"]] for r in dev],
          np.array([float(r[col["score"]]) for r in dev]))


def _cosine_spearman(a, b, scores):
  from scipy.stats import spearmanr
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return float(spearmanr((a * b).sum(-1), scores).correlation)


@pytest.mark.slow
def test_stsb_dev_spearman_matches_sentence_transformers(shared_data, minilm_encoder, st_model):
  s1, s2, scores = _sts_dev(shared_data)
  ours = minilm_encoder.encode(s1 + s2, batch_size=128, max_length=256, show_progress=False)
  ref = st_model.encode(s1 + s2, batch_size=128, convert_to_numpy=True)
  delta = float(np.abs(ours - ref).max())
  n = len(s1)
  rho_ours = _cosine_spearman(ours[:n], ours[n:], scores)
  rho_ref = _cosine_spearman(ref[:n], ref[n:], scores)
  print(f"\nSTS-B dev cosine Spearman: bge-jax {rho_ours:.8f}, sentence-transformers "
        f"{rho_ref:.8f} (|diff| {abs(rho_ours - rho_ref):.2g}); embeddings max |delta| {delta:.3g}")
  assert delta <= 1e-5
  assert abs(rho_ours - rho_ref) < 5e-5
  assert rho_ref > 0.8  # all-MiniLM-L6-v2 scores ~0.87 on STS-B dev


def test_params_are_placed_on_the_device_once(minilm_encoder):
  # numpy leaves would be copied host -> device at every batch (bge-small encode: 650 -> 509 ms
  # and 362 -> 1 MiB peak growth once they are placed up front; README "Benchmarks").
  leaves = jax.tree.leaves(minilm_encoder.params)
  assert leaves and all(isinstance(x, jax.Array) for x in leaves)


@pytest.mark.parametrize("pack", [True, False])
def test_encode_splits_each_batch_over_the_devices(minilm_path, minilm_encoder, pack,
                                                   monkeypatch):
  """devices=8 (the test's fake CPU devices): params replicated, each batch's rows split over
  all of them (row counts rounded up with fillers), the same embeddings as one device."""
  from bge_jax import encoder as encoder_lib

  devices = tuple(jax.local_devices())
  assert len(devices) == 8 and minilm_encoder.devices == devices[:1]  # CPU default: one
  many = Encoder.from_hf(minilm_path, pooling="mean", devices=devices)
  assert all(len(x.sharding.device_set) == 8 and x.sharding.is_fully_replicated
             for x in jax.tree.leaves(many.params))
  texts = SENTENCES[:45]  # batches of 32 and 13 texts: row counts that are not multiples of 8
  np.testing.assert_allclose(many.encode(texts, batch_size=32, pack=pack),
                             minilm_encoder.encode(texts, batch_size=32, pack=pack),
                             rtol=0, atol=1e-6)
  v = many._dispatch_padded([[101, 2023, 102]] * 3, 8, 4, 0)
  assert v.sharding.spec[0] == "batch" and len(v.sharding.device_set) == 8
  # On an accelerator the default is every local device.
  monkeypatch.setattr(encoder_lib.jax, "default_backend", lambda: "gpu")
  assert encoder_lib.default_devices() == devices
