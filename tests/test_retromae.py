"""Parity of the RetroMAE (stage 1) loss with an independent PyTorch implementation.

The reference (bge_jax/testing/torch_reference.py) is FlagEmbedding's RetroMAEForPretraining
rebuilt from transformers' BertForMaskedLM (`lm`) and a two-stream decoder layer written from
the RetroMAE paper's enhanced decoding (Xiao et al. 2022, arXiv:2205.12035, section 3.3; `c_head`,
with HF BertLayer parameter names). Both sides read the same random FlagEmbedding-style state dict
(conftest.make_hf_folder(..., "retromae", seed)); losses and every parameter's gradient are
compared in float32 with dropout off (torch .eval(), JAX rng=None).
"""

import functools
import math

import jax
import numpy as np
import pytest
import torch
import transformers

from bge_jax import convert, retromae
from bge_jax.testing.torch_reference import TorchRetroMAE
from conftest import make_hf_folder

# Seeds of conftest.tiny_hf_config that share one shape (vocab 211, hidden 32, 2 layers, 4 heads,
# ffn 64), so that each query stream compiles once (XLA:CPU compiles dominate this file's time).
SEEDS = (11, 12, 67)
STREAMS = ("fe", "rm")
LENGTH = 12
# Real tokens per row (ragged, padding on the tail), one pattern per seed.
LENGTHS = {11: (LENGTH, 7, 4, 10), 12: (5, LENGTH, LENGTH, 9), 67: (LENGTH, 3, 8, 11)}
FIRST_ID = 5  # random ids are drawn from [FIRST_ID, vocab); 0 = [PAD]
MASK_ID = 4
ENCODER_RATIO, DECODER_RATIO = 0.3, 0.5
LOSS_TOL, GRAD_TOL = 1e-5, 1e-3
LOSS_KEYS = ("loss", "encoder_loss", "decoder_loss")


# ---------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------

def make_batch(vocab_size: int, seed: int, lengths=LENGTHS[SEEDS[0]]) -> dict[str, np.ndarray]:
  """A RetroMAE batch as the collator names it, with the invariants of `assert_batch_invariants`.

  Encoder: ~30% of real positions (never [CLS]) labelled, 80% [MASK] / 10% random / 10% kept.
  Decoder mask: per example a pool of min(L, 128) random masks (ratio 0.5 over positions
  1..n-2); row i takes a random pool member, then hides itself; padding rows/columns are 0.
  Decoder labels: every real token but position 0 and the last real one.
  """
  rng = np.random.RandomState(seed)
  b, l = len(lengths), LENGTH
  n = np.asarray(lengths)
  real = np.arange(l)[None, :] < n[:, None]
  ids = np.where(real, rng.randint(FIRST_ID, vocab_size, size=(b, l)), 0)

  enc_ids = ids.copy()
  enc_labels = np.full((b, l), -100)
  for r in range(b):
    candidates = np.arange(1, n[r])
    picked = rng.choice(candidates, max(1, round(ENCODER_RATIO * len(candidates))), replace=False)
    enc_labels[r, picked] = ids[r, picked]
    for p in picked:
      u = rng.rand()
      enc_ids[r, p] = MASK_ID if u < 0.8 else (rng.randint(FIRST_ID, vocab_size) if u < 0.9
                                                else ids[r, p])

  dec_mask = np.zeros((b, l, l))
  for r in range(b):
    candidates = np.arange(1, n[r] - 1)
    pool = []
    for _ in range(min(l, 128)):
      hidden = np.zeros(l, bool)
      if len(candidates):
        k = max(1, round(DECODER_RATIO * len(candidates)))
        hidden[rng.choice(candidates, k, replace=False)] = True
      pool.append(real[r] & ~hidden)
    for i in range(n[r]):
      row = pool[rng.randint(len(pool))].copy()
      row[i] = False
      dec_mask[r, i] = row
  dec_labels = np.where(real, ids, -100)
  dec_labels[:, 0] = -100
  dec_labels[np.arange(b), n - 1] = -100

  as_int = lambda x: np.asarray(x, np.int32)  # noqa: E731
  batch = {"encoder_input_ids": as_int(enc_ids), "encoder_attention_mask": as_int(real),
           "encoder_labels": as_int(enc_labels), "decoder_input_ids": as_int(ids),
           "decoder_attention_mask": as_int(dec_mask), "decoder_labels": as_int(dec_labels)}
  assert_batch_invariants(batch)
  return batch


def assert_batch_invariants(batch) -> None:
  """RetroMAE's position-specific decoder mask and decoder labels (arXiv:2205.12035, section
  3.3, as FlagEmbedding's collator builds them), for a batch of right-padded rows."""
  real = batch["encoder_attention_mask"].astype(bool)
  n = real.sum(axis=1)
  m = batch["decoder_attention_mask"]
  b, l = real.shape
  assert m.shape == (b, l, l) and set(np.unique(m)) <= {0, 1}
  assert (real == (np.arange(l)[None] < n[:, None])).all(), "padding must be on the tail"
  assert (batch["decoder_input_ids"][~real] == 0).all()
  assert not m[:, np.arange(l), np.arange(l)].any(), "a row must not see itself"
  assert (m[:, 1:, 0] == real[:, 1:]).all(), "column 0 is visible to every real row but row 0"
  assert not m[~real].any() and not m.transpose(0, 2, 1)[~real].any(), "padding rows/cols are 0"
  labelled = np.arange(l)[None] < (n - 1)[:, None]
  labelled[:, 0] = False
  expected = np.where(labelled, batch["decoder_input_ids"], -100)
  assert (batch["decoder_labels"] == expected).all(), "decoder labels: all but [CLS], last, pad"
  assert ((batch["encoder_labels"] != -100) <= real).all()
  assert (batch["encoder_labels"] != -100).any(axis=1).all()


# ---------------------------------------------------------------------------------------------
# The PyTorch reference on a random file; both implementations on it.
# ---------------------------------------------------------------------------------------------

def torch_reference(path, query_stream: str) -> TorchRetroMAE:
  cfg = transformers.BertConfig.from_json_file(str(path.parent / "config.json"))
  cfg._attn_implementation = "eager"  # the plain softmax path (SDPA would also do)
  model = TorchRetroMAE(cfg, query_stream)
  state = torch.load(path, map_location="cpu", weights_only=True)
  model.load_state_dict(state, strict=True)
  return model.float().eval()


def torch_loss_and_grads(model: TorchRetroMAE, batch):
  model.zero_grad(set_to_none=True)
  out = model(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})
  out["loss"].backward()
  losses = {k: float(v.detach()) for k, v in out.items()}
  grads = {name: p.grad.detach().numpy().astype(np.float64)
           for name, p in model.named_parameters() if p.grad is not None}
  return losses, grads


@functools.partial(jax.jit, static_argnums=(1, 3))
def _jax_value_and_grad(params, config, batch, max_encoder_predictions=None):
  def f(p):
    out = retromae.loss(p, config, batch, rng=None, max_encoder_predictions=max_encoder_predictions)
    return out["loss"], out

  return jax.value_and_grad(f, has_aux=True)(params)


@functools.partial(jax.jit, static_argnums=1)
def _jax_dropout_loss(params, config, batch, rng):
  return retromae.loss(params, config, batch, rng=rng)["loss"]


def jax_loss_and_grads(params, config, batch, max_encoder_predictions=None):
  (_, out), grads = _jax_value_and_grad(params, config, batch, max_encoder_predictions)
  if max_encoder_predictions is not None:
    assert int(out["encoder_labels_dropped"]) == 0
  losses = {k: float(out[k]) for k in LOSS_KEYS}
  hf = {k: np.asarray(v, np.float64) for k, v in convert.to_hf_state_dict(grads, config).items()}
  return losses, hf


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("retromae")
  return {seed: make_hf_folder(root, "retromae", seed) for seed in SEEDS}


@pytest.fixture(scope="module")
def report():
  """Worst errors per query stream, printed at the end of the module (pytest -s)."""
  worst: dict[str, dict[str, tuple[float, str]]] = {}
  yield worst
  if worst:
    print("\nRetroMAE parity vs PyTorch, worst errors over seeds (float32, CPU):")
    for stream, w in sorted(worst.items()):
      print(f"  query stream {stream!r}:")
      for k, (err, where) in sorted(w.items()):
        print(f"    {k:<22} {err:.2e}  ({where})")


def _note(report, stream, kind, err, where):
  w = report.setdefault(stream, {})
  if err >= w.get(kind, (-1.0, ""))[0]:
    w[kind] = (err, where)


# d loss / d key bias is exactly 0: q_i . b_k is the same for every column j of row i, and
# softmax ignores a per-row constant. Both sides return rounding noise there, so it is checked
# absolutely, against the gradient scale of the same layer's key weight.
ZERO_GRAD_SUFFIX = "attention.self.key.bias"
ZERO_GRAD_TOL = 1e-5


def check_parity(path, query_stream: str, batch, report, tag: str,
                 max_encoder_predictions: int | None = None) -> None:
  """Losses and every parameter's gradient, JAX vs the torch reference, for one batch."""
  config, params = convert.load_hf(str(path), decoder_query_stream=query_stream)
  assert config.hf_family == "retromae" and config.add_mlm_head and config.add_decoder
  assert config.decoder_query_stream == query_stream and config.dtype == "float32"
  model = torch_reference(path, query_stream)

  torch_losses, torch_grads = torch_loss_and_grads(model, batch)
  jax_losses, jax_grads = jax_loss_and_grads(params, config, batch, max_encoder_predictions)

  loss_errs = {}
  for k in LOSS_KEYS:
    loss_errs[k] = abs(jax_losses[k] - torch_losses[k]) / abs(torch_losses[k])
    _note(report, query_stream, f"rel {k}", loss_errs[k], tag)
  for k in LOSS_KEYS:
    assert loss_errs[k] <= LOSS_TOL, (k, jax_losses[k], torch_losses[k], loss_errs[k])
  assert math.isclose(jax_losses["loss"], jax_losses["encoder_loss"] + jax_losses["decoder_loss"],
                      rel_tol=1e-6)

  torch_params = dict(model.named_parameters())
  assert len(torch_grads) == len(torch_params), "every torch parameter should get a gradient"
  # What to_hf_state_dict writes beyond torch's parameters must be tied aliases of them.
  aliases = set(jax_grads) - set(torch_params)
  alias_prefixes = ("decoder_embeddings.", "lm.cls.predictions.decoder.")
  assert aliases <= set(model.state_dict()), aliases
  assert all(k.startswith(alias_prefixes) for k in aliases), aliases
  compared, worst, worst_zero = 0, (0.0, ""), (0.0, "")
  for name, g_torch in torch_grads.items():
    assert name in jax_grads, f"no JAX gradient for torch parameter {name}"
    g_jax = jax_grads[name]
    assert g_jax.shape == g_torch.shape, (name, g_jax.shape, g_torch.shape)
    assert np.isfinite(g_jax).all(), name
    if name.endswith(ZERO_GRAD_SUFFIX):
      scale = np.linalg.norm(torch_grads[name[:-len("bias")] + "weight"])
      err = float(max(np.linalg.norm(g_jax), np.linalg.norm(g_torch)) / scale)
      assert err <= ZERO_GRAD_TOL, (name, err)
      worst_zero = max(worst_zero, (err, name))
    else:
      norm = np.linalg.norm(g_torch)
      assert norm > 0, f"{name}: a zero torch gradient makes the relative check vacuous"
      rel = float(np.linalg.norm(g_jax - g_torch) / norm)
      assert rel <= GRAD_TOL, (name, rel)
      worst = max(worst, (rel, name))
    compared += 1
  assert compared == len(torch_grads) == len(torch_params)
  _note(report, query_stream, "rel grad", worst[0], f"{tag}, {worst[1]}")
  _note(report, query_stream, "key-bias grad (abs)", worst_zero[0], f"{tag}, {worst_zero[1]}")
  print(f"\n[{tag} {query_stream}] torch loss {torch_losses['loss']:.6f} "
        f"(enc {torch_losses['encoder_loss']:.6f}, dec {torch_losses['decoder_loss']:.6f}); "
        f"max rel loss err {max(loss_errs.values()):.2e}; {compared} grads, max rel err "
        f"{worst[0]:.2e} ({worst[1]}); key-bias grads {worst_zero[0]:.1e} of key-weight grads")


@pytest.mark.parametrize("query_stream", STREAMS)
@pytest.mark.parametrize("seed", SEEDS)
def test_loss_and_gradient_parity(files, report, seed, query_stream):
  vocab_size = transformers.BertConfig.from_json_file(
      str(files[seed].parent / "config.json")).vocab_size
  batch = make_batch(vocab_size, seed, LENGTHS[seed])
  check_parity(files[seed], query_stream, batch, report, f"seed {seed}")


class _WordPieceVocab:
  """What RetroMAECollator reads from a tokenizer: special ids, len, id -> token (with `##`)."""

  pad_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 1, 2, 3

  def __init__(self, vocab_size: int):
    self.tokens = ["[PAD]", "[CLS]", "[SEP]", "[MASK]"] + [
        f"##p{i}" if i % 3 == 0 else f"w{i}" for i in range(4, vocab_size)]

  def __len__(self):
    return len(self.tokens)

  def convert_ids_to_tokens(self, ids):
    return [self.tokens[i] for i in ids]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse-head"])
@pytest.mark.parametrize("query_stream", STREAMS)
def test_parity_on_collator_batch(files, report, query_stream, sparse):
  """The same parity on a batch of the project's RetroMAECollator (whole-word masks); with
  `sparse`, the encoder's MLM head runs only on the collator's bound of labelled positions per
  row (what the trainer does) against the reference's full-length head."""
  from bge_jax.data import masking

  seed = SEEDS[0]
  vocab_size = transformers.BertConfig.from_json_file(
      str(files[seed].parent / "config.json")).vocab_size
  collator = masking.RetroMAECollator(_WordPieceVocab(vocab_size), max_length=LENGTH, seed=seed)
  rng = np.random.RandomState(seed)
  examples = [rng.randint(4, vocab_size, size=n - 2).tolist() for n in LENGTHS[seed]]
  batch = collator(examples, step=3)
  assert_batch_invariants(batch)
  k = masking.max_predictions(LENGTH, collator.encoder_mlm_probability) if sparse else None
  if sparse:  # the bound is tight on the full-length rows, and smaller than the length
    assert (batch["encoder_labels"] != -100).sum(axis=1).max() == k < LENGTH
  check_parity(files[seed], query_stream, batch, report, "collator" + (" sparse" if sparse else ""),
               k)


def test_sparse_head_counts_labels_beyond_its_bound(files):
  """K below a row's labels leaves them out and says so; K outside [1, L] is refused."""
  config, params = convert.load_hf(str(files[SEEDS[0]]))
  batch = make_batch(config.vocab_size, 0)
  per_row = (batch["encoder_labels"] != -100).sum(axis=1)
  k = int(per_row.max())
  (_, full), _ = _jax_value_and_grad(params, config, batch, None)
  (_, exact), _ = _jax_value_and_grad(params, config, batch, k)
  (_, short), _ = _jax_value_and_grad(params, config, batch, k - 1)
  assert int(exact["encoder_labels_dropped"]) == 0
  np.testing.assert_allclose(float(exact["encoder_loss"]), float(full["encoder_loss"]), rtol=1e-6)
  assert int(short["encoder_labels_dropped"]) == int((per_row == k).sum()) > 0
  assert int(short["encoder_tokens"]) == int(per_row.sum()) - int(short["encoder_labels_dropped"])
  for bad in (0, LENGTH + 1):
    with pytest.raises(ValueError, match="max_encoder_predictions"):
      retromae.loss(params, config, batch, max_encoder_predictions=bad)


def test_query_streams_differ(files):
  """'fe' and 'rm' are different functions (else the parity above could not tell them apart)."""
  out = {}
  for stream in STREAMS:
    config, params = convert.load_hf(str(files[SEEDS[0]]), decoder_query_stream=stream)
    (_, losses), _ = _jax_value_and_grad(params, config, make_batch(config.vocab_size, 0))
    out[stream] = (float(losses["encoder_loss"]), float(losses["decoder_loss"]))
  assert out["fe"][0] == out["rm"][0], out  # same encoder
  assert abs(out["fe"][1] - out["rm"][1]) > 1e-3 * abs(out["fe"][1]), out


# ---------------------------------------------------------------------------------------------
# Dropout and refusals.
# ---------------------------------------------------------------------------------------------

def test_dropout_only_with_rng(files):
  config, params = convert.load_hf(str(files[SEEDS[0]]))
  assert config.hidden_dropout > 0 and config.attention_dropout > 0
  batch = make_batch(config.vocab_size, 3)

  def dropped(seed):
    return float(_jax_dropout_loss(params, config, batch, jax.random.key(seed)))

  def deterministic():  # rng=None, through the parity test's compiled function
    return float(_jax_value_and_grad(params, config, batch)[0][0])

  a1, a2, b1 = dropped(0), dropped(0), dropped(1)
  n1, n2 = deterministic(), deterministic()
  assert a1 == a2, "the same rng must give the same loss"
  assert a1 != b1, "different rngs must drop different units"
  assert n1 == n2, "rng=None must be deterministic"
  assert n1 not in (a1, b1), "rng=None must mean no dropout"
  # rng=None equals the torch reference in eval mode (no dropout at all).
  model = torch_reference(files[SEEDS[0]], "fe")
  with torch.no_grad():
    ref = float(model(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})["loss"])
  assert abs(n1 - ref) <= LOSS_TOL * abs(ref), (n1, ref)


@pytest.mark.parametrize("missing", ["add_decoder", "add_mlm_head"])
def test_refuses_config_without_heads(files, missing):
  config, params = convert.load_hf(str(files[SEEDS[0]]))
  batch = make_batch(config.vocab_size, 0)
  with pytest.raises(ValueError, match=r"add_mlm_head.*add_decoder|add_decoder.*add_mlm_head"):
    retromae.loss(params, config.replace(**{missing: False}), batch)


# The collator's names, per API.md.
BATCH_KEYS = ("encoder_input_ids", "encoder_attention_mask", "encoder_labels",
              "decoder_input_ids", "decoder_attention_mask", "decoder_labels")


@pytest.mark.parametrize("missing", BATCH_KEYS)
def test_refuses_batch_missing_a_key(files, missing):
  config, params = convert.load_hf(str(files[SEEDS[0]]))
  batch = make_batch(config.vocab_size, 0)
  del batch[missing]
  with pytest.raises(KeyError) as e:
    retromae.loss(params, config, batch)
  message = str(e.value.args[0])
  # The missing key is named, and first: not only inside a list of the expected keys.
  mentions = {k: message.find(k) for k in BATCH_KEYS if k in message}
  assert missing in mentions and min(mentions, key=mentions.get) == missing, message
