"""Numerical parity of the Flax BERT with Hugging Face's PyTorch BERT (float32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from bge_jax import convert
from bge_jax.models import bert
from conftest import make_hf_folder

# Seeds of conftest.tiny_hf_config: 1-3 layers, hidden 32/64, 2/4 heads, vocab 97/211.
SEEDS = (1, 4, 5, 7)
BATCH, LENGTH = 4, 11
# Real-token counts per row for each padding pattern.
PATTERNS = {
    "no_padding": (LENGTH,) * BATCH,
    "ragged": (LENGTH, 6, 3, 9),
    "single_token_row": (1, LENGTH, 5, 1),
}
TOL = 1e-5
# Dropout keys: "rbg" bits compile ~4x faster on CPU than the default threefry.
RNG_IMPL = "rbg"


def _batch(vocab_size: int, lengths, seed: int):
  """Random ids (pad id 0 after each row's length), its 1/0 mask and random token types."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, vocab_size, size=(len(lengths), LENGTH)).astype(np.int32)
  mask = (np.arange(LENGTH)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
  ids = np.where(mask == 1, ids, 0).astype(np.int32)
  types = rng.randint(0, 2, size=ids.shape).astype(np.int32)
  return ids, mask, types


def _torch_inputs(ids, mask, types):
  return dict(input_ids=torch.tensor(ids, dtype=torch.long),
              attention_mask=torch.tensor(mask, dtype=torch.long),
              token_type_ids=torch.tensor(types, dtype=torch.long))


def _max_abs_on_real(ours, ref, mask) -> float:
  real = np.asarray(mask).astype(bool)
  return float(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))[real].max())


class _Case:
  """One random tiny model: HF torch modules and our (config, params) for the same weights."""

  def __init__(self, root, seed):
    self.seed = seed
    folder = make_hf_folder(root, "bert", seed)
    self.config, self.params = convert.load_hf(str(folder))
    self.torch_model = transformers.BertModel.from_pretrained(folder).eval()
    mlm_folder = make_hf_folder(root, "bert_mlm", seed)
    self.mlm_config, self.mlm_params = convert.load_hf(str(mlm_folder))
    self.torch_mlm = transformers.BertForMaskedLM.from_pretrained(mlm_folder).eval()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  root = tmp_path_factory.mktemp("bert_parity")
  return {seed: _Case(root, seed) for seed in SEEDS}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("seed", SEEDS)
def test_hidden_state_and_pooler_match_hf(cases, seed, pattern):
  case = cases[seed]
  assert case.config.add_pooler and case.config.hf_family == "bert"
  ids, mask, types = _batch(case.config.vocab_size, PATTERNS[pattern], seed)
  with torch.no_grad():
    ref = case.torch_model(**_torch_inputs(ids, mask, types))
  model = bert.BertModel(case.config)
  hidden = model.apply({"params": case.params}, ids, mask, types)
  assert hidden.shape == (BATCH, LENGTH, case.config.hidden_size)
  assert hidden.dtype == jnp.float32
  assert _max_abs_on_real(hidden, ref.last_hidden_state.numpy(), mask) <= TOL

  pooled = model.apply({"params": case.params}, hidden, method=bert.BertModel.pooler_output)
  np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), rtol=0, atol=TOL)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("seed", SEEDS)
def test_mlm_logits_match_hf(cases, seed, pattern):
  case = cases[seed]
  assert case.mlm_config.add_mlm_head and case.mlm_config.hf_family == "bert_mlm"
  ids, mask, types = _batch(case.mlm_config.vocab_size, PATTERNS[pattern], seed + 100)
  with torch.no_grad():
    ref = case.torch_mlm(**_torch_inputs(ids, mask, types), output_hidden_states=True)
  model = bert.BertModel(case.mlm_config)
  hidden = model.apply({"params": case.mlm_params}, ids, mask, types)
  assert _max_abs_on_real(hidden, ref.hidden_states[-1].numpy(), mask) <= TOL
  logits = model.apply({"params": case.mlm_params}, hidden, method=bert.BertModel.mlm_logits)
  assert logits.shape == (BATCH, LENGTH, case.mlm_config.vocab_size)
  assert _max_abs_on_real(logits, ref.logits.numpy(), mask) <= TOL


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("seed", SEEDS)
def test_pooled_normalized_embeddings_match_reference(cases, seed, pooling):
  case = cases[seed]
  ids, mask, types = _batch(case.config.vocab_size, PATTERNS["ragged"], seed + 200)
  with torch.no_grad():
    h = case.torch_model(**_torch_inputs(ids, mask, types)).last_hidden_state.numpy()
  h = h.astype(np.float64)
  if pooling == "cls":
    ref = h[:, 0]
  else:
    m = mask[..., None].astype(np.float64)
    ref = (h * m).sum(1) / m.sum(1)
  ref_norm = ref / np.linalg.norm(ref, axis=-1, keepdims=True)

  got = bert.embed_sentences(case.params, case.config, ids, mask, types, pooling=pooling)
  np.testing.assert_allclose(np.asarray(got), ref_norm, rtol=0, atol=TOL)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(got), axis=-1), 1.0, atol=1e-6)
  raw = bert.embed_sentences(case.params, case.config, ids, mask, types, pooling=pooling,
                             normalize=False)
  np.testing.assert_allclose(np.asarray(raw), ref, rtol=0, atol=TOL)


def test_attention_with_dropout_path_matches_hf(cases):
  """The explicit-softmax attention (used when attention dropout is on) is exact with ~0 rate."""
  case = cases[5]
  config = case.config.replace(attention_dropout=1e-9, hidden_dropout=0.0)
  ids, mask, types = _batch(config.vocab_size, PATTERNS["single_token_row"], 300)
  with torch.no_grad():
    ref = case.torch_model(**_torch_inputs(ids, mask, types)).last_hidden_state.numpy()
  hidden = jax.jit(lambda p: bert.BertModel(config).apply(
      {"params": p}, ids, mask, types, deterministic=False,
      rngs={"dropout": jax.random.key(0, impl=RNG_IMPL)}))(case.params)
  assert _max_abs_on_real(hidden, ref, mask) <= TOL


def test_dropout_keeps_the_rate_unbiased_and_independent():
  """`bert.Dropout` (16 random bits per element): the kept share is 1 - rate within sampling
  error (1.3M draws: 5 sigma = 0.0013), kept values are scaled by the inverse of the exact
  2^-16-rounded keep probability, so the mean is preserved; two keys give independent masks;
  rate 0 and rates under 2^-17 are the identity; rate 1 drops everything."""
  x = jnp.ones((40, 250, 130), jnp.float32)  # 130 = 65 random words per row

  def drop(rate, seed=0, inputs=x):
    return np.asarray(bert.Dropout(rate).apply({}, inputs, False,
                                               rngs={"dropout": jax.random.key(seed)}))

  for rate in (0.1, 0.5):
    y = drop(rate)
    kept = y != 0
    keep = round((1 - rate) * 65536) / 65536
    assert abs(kept.mean() - (1 - rate)) < 0.0013, (rate, kept.mean())
    np.testing.assert_allclose(np.unique(y[kept]), [1 / keep], rtol=1e-7)
    assert abs(y.mean() - 1.0) < 0.003
    other = drop(rate, seed=1) != 0
    both = (kept & other).mean()
    assert abs(both - (1 - rate) ** 2) < 0.0013  # independent draws
  odd = drop(0.1, inputs=jnp.ones((7, 3, 5)))  # an odd last dim uses half of the last word
  assert odd.shape == (7, 3, 5) and 0.5 < (odd != 0).mean() < 1.0
  np.testing.assert_array_equal(drop(0.0), np.asarray(x))
  np.testing.assert_array_equal(drop(1e-9), np.asarray(x))
  assert not drop(1.0).any()
  assert bert.Dropout(0.1).apply({}, x, True) is x  # deterministic: no rng needed
  # bf16 activations: scaled in float32, then rounded, so the mean scale is 1 / keep; dividing by
  # bf16(keep) = 0.8984 would scale every kept value 0.17% too much.
  xb = jnp.asarray(np.random.RandomState(0).uniform(1, 2, x.shape), jnp.bfloat16)
  y = np.asarray(drop(0.1, inputs=xb).astype(np.float32))
  kept = y != 0
  scale = (y[kept] / np.asarray(xb.astype(np.float32))[kept]).mean()
  keep = round(0.9 * 65536) / 65536
  assert abs(scale * keep - 1) < 3e-4, scale * keep


def test_tied_logits_vjp_equals_autodiff():
  """`bert.tied_logits`' hand-written VJP (bias gradient as a vector-matrix product, the table's
  as one GEMM over the flattened rows) against autodiff of the plain expression, for 2-D and
  3-D inputs, in reverse and forward mode."""
  rs = np.random.RandomState(0)
  table = jnp.asarray(rs.randn(97, 16).astype(np.float32))
  bias = jnp.asarray(rs.randn(97).astype(np.float32))
  for shape in [(7, 16), (3, 5, 16)]:
    x = jnp.asarray(rs.randn(*shape).astype(np.float32))
    g = jnp.asarray(rs.randn(*shape[:-1], 97).astype(np.float32))
    out, vjp = jax.vjp(bert.tied_logits, x, table, bias)
    ref_out, ref_vjp = jax.vjp(lambda x, t, b: x @ t.T + b, x, table, bias)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-6, atol=1e-6)
    for ours, ref in zip(vjp(g), ref_vjp(g)):
      assert ours.shape == ref.shape
      np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)
    tangents = (x, table * 0.5, bias * 2.0)
    ours_t = jax.jvp(bert.tied_logits, (x, table, bias), tangents)[1]
    ref_t = jax.jvp(lambda x, t, b: x @ t.T + b, (x, table, bias), tangents)[1]
    np.testing.assert_allclose(np.asarray(ours_t), np.asarray(ref_t), rtol=1e-5, atol=1e-5)
  # bf16 compute: gradients in bf16, within bf16 rounding of the float32 ones.
  x = jnp.asarray(rs.randn(300, 16).astype(np.float32))
  g = jnp.asarray(rs.randn(300, 97).astype(np.float32))
  ref = jax.vjp(bert.tied_logits, x, table, bias)[1](g)
  low = [t.astype(jnp.bfloat16) for t in (x, table, bias, g)]
  ours = jax.vjp(bert.tied_logits, *low[:3])[1](low[3])
  for o, r in zip(ours, ref):
    assert o.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(r), rtol=2e-2,
                               atol=2e-2 * float(jnp.abs(r).max()))


def test_threefry_bits_equal_jax_random_bits_without_a_loop():
  """`threefry.bits32` (the rounds as element-wise ops) returns `jax.random.bits`' words, bit for
  bit, for any shape and key; its CPU program has no `while` (JAX's CPU lowering rolls the rounds
  into one, which is what made dropout slow); other PRNG implementations are passed through."""
  from bge_jax.models import threefry

  shapes = [(), (1,), (5,), (3, 7), (2, 3, 5, 64), (8, 12, 128, 64)]
  keys = [jax.random.key(0), jax.random.fold_in(jax.random.key(12345), 7),
          jax.random.split(jax.random.key(2**31 - 1), 3)[2], jax.random.PRNGKey(9)]  # raw too
  bits = jax.jit(threefry.bits32, static_argnums=1)
  for key in keys:
    for shape in shapes:
      ours, ref = bits(key, shape), jax.random.bits(key, shape, jnp.uint32)
      assert ours.dtype == jnp.uint32 and ours.shape == shape
      np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref), err_msg=str(shape))
  assert " while(" not in bits.lower(keys[0], (64, 64)).compile().as_text()
  assert " while(" in jax.jit(lambda k: jax.random.bits(k, (64, 64), jnp.uint32)).lower(
      keys[0]).compile().as_text()  # the lowering this module replaces (rolled on CPU)
  rbg = jax.random.key(5, impl="rbg")
  np.testing.assert_array_equal(np.asarray(threefry.bits32(rbg, (4, 9))),
                                np.asarray(jax.random.bits(rbg, (4, 9), jnp.uint32)))


# ---------------------------------------------------------------------------------------------
# Real weights: all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------

SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Hi",
    "Embeddings map sentences to vectors; similar sentences land close together.",
    "JAX and PyTorch should agree to within float32 rounding on every real token.",
]


@pytest.fixture(scope="module")
def minilm(minilm_path):
  config, params = convert.load_hf(minilm_path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
  torch_model = transformers.AutoModel.from_pretrained(minilm_path).eval()
  return config, params, tokenizer, torch_model


def test_minilm_matches_transformers(minilm):
  config, params, tokenizer, torch_model = minilm
  batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
  mask = batch["attention_mask"]
  assert mask.sum(1).min() < mask.shape[1]  # some padding
  with torch.no_grad():
    ref = torch_model(**{k: torch.tensor(v) for k, v in batch.items()})
  model = bert.BertModel(config)
  hidden = model.apply({"params": params}, batch["input_ids"], mask, batch["token_type_ids"])
  delta = _max_abs_on_real(hidden, ref.last_hidden_state.numpy(), mask)
  print(f"\nall-MiniLM-L6-v2 last hidden state max |delta| on real tokens: {delta:.3g}")
  assert delta <= TOL
  pooled = model.apply({"params": params}, hidden, method=bert.BertModel.pooler_output)
  np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), rtol=0, atol=TOL)


def test_minilm_bfloat16_compute_stays_close(minilm):
  """A sanity check: bf16 compute runs, returns bf16 states and stays near the f32 reference."""
  config, params, tokenizer, torch_model = minilm
  batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
  mask = batch["attention_mask"]
  with torch.no_grad():
    ref = torch_model(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
  config16 = config.replace(dtype="bfloat16")
  hidden = bert.BertModel(config16).apply({"params": params}, batch["input_ids"], mask,
                                          batch["token_type_ids"])
  assert hidden.dtype == jnp.bfloat16
  hidden = np.asarray(hidden.astype(jnp.float32))
  assert np.isfinite(hidden).all()
  # Per-token relative error of the state vectors (raw |delta| scales with MiniLM's large states).
  real = mask.astype(bool)
  rel = (np.linalg.norm(hidden - ref, axis=-1) / np.linalg.norm(ref, axis=-1))[real]
  assert rel.max() <= 5e-2
  # The pooled, normalised sentence vectors (what the embedder serves) within 5e-2 abs.
  got = bert.embed_sentences(params, config16, batch["input_ids"], mask, batch["token_type_ids"],
                             pooling="mean")
  m = mask[..., None]
  ref_vec = (ref * m).sum(1) / m.sum(1)
  ref_vec /= np.linalg.norm(ref_vec, axis=-1, keepdims=True)
  assert got.dtype == jnp.float32
  assert np.abs(np.asarray(got) - ref_vec).max() <= 5e-2
  # bf16 is not the f32 computation (the check above is not vacuous).
  assert np.abs(hidden - ref)[real].max() > 1e-4


# ---------------------------------------------------------------------------------------------
# Rematerialisation and dropout
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def remat_case(cases):
  """(case, inputs, f64 params, remat-free hidden state and gradients) for the remat tests."""
  case = cases[1]  # 1 layer: each layer is rematerialised on its own, one shows the policy
  ids, mask, types = _batch(case.config.vocab_size, PATTERNS["ragged"], 400)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), case.params)
    weights = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, case.config.hidden_size),
                                jnp.float64)
    ref = _hidden_and_grads(case.config, params, ids, mask, types, weights)
  return case, (ids, mask, types, weights), params, ref


def _hidden_and_grads(config, params, ids, mask, types, weights):
  """Hidden state and d/dparams of a scalar function of it, in float64 (call under enable_x64)."""
  config = config.replace(dtype="float64", param_dtype="float64")
  model = bert.BertModel(config)

  def loss(p):
    h = model.apply({"params": p}, ids, mask, types)
    return jnp.sum(jnp.tanh(h) * weights * mask[..., None]), h

  (_, h), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return jax.device_get(h), jax.device_get(g)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_same_outputs_and_gradients(remat_case, policy):
  """Remat recomputes the same function: outputs and gradients agree with remat "none".

  In float64, so that the comparison at 1e-6 is about the math and not about float32 rounding
  (XLA fuses the recomputation differently, which moves float32 gradients by ~1e-6 relative).
  """
  case, (ids, mask, types, weights), params, (h_ref, g_ref) = remat_case
  # The policy is really applied: the layer is a rematerialised (checkpoint) call.
  remat_model = bert.BertModel(case.config.replace(remat_policy=policy))
  jaxpr = str(jax.make_jaxpr(jax.grad(
      lambda p: remat_model.apply({"params": p}, ids, mask, types).sum()))(case.params))
  assert "remat" in jaxpr and "policy=" in jaxpr
  assert ("nothing_saveable" in jaxpr) == (policy == "full")
  with jax.enable_x64(True):
    h, g = _hidden_and_grads(case.config.replace(remat_policy=policy), params, ids, mask, types,
                             weights)
  assert h.dtype == np.float64
  np.testing.assert_allclose(h, h_ref, rtol=0, atol=1e-6)
  assert jax.tree.structure(g) == jax.tree.structure(g_ref)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # The gradient reaches every layer (not a vacuous all-zero comparison).
  assert np.abs(g_ref["layers_0"]["query"]["kernel"]).max() > 1e-3


def test_dropout_changes_outputs_and_is_deterministic_per_rng(cases):
  case = cases[5]
  config = case.config.replace(hidden_dropout=0.1, attention_dropout=0.1)
  ids, mask, types = _batch(config.vocab_size, PATTERNS["ragged"], 500)
  model = bert.BertModel(config)
  p = {"params": case.params}
  clean = np.asarray(model.apply(p, ids, mask, types))
  # Arrays go in as arguments (a closure would bake the params into the program as constants).
  noisy_fn = jax.jit(lambda variables, key: model.apply(
      variables, ids, mask, types, deterministic=False, rngs={"dropout": key}))

  def noisy(seed):
    return np.asarray(noisy_fn(p, jax.random.key(seed, impl=RNG_IMPL)))

  a, a_again, b = noisy(0), noisy(0), noisy(1)
  real = mask.astype(bool)
  assert np.abs(a - clean)[real].max() > 1e-2
  np.testing.assert_array_equal(a, a_again)
  assert np.abs(a - b)[real].max() > 1e-2
  # deterministic=True ignores any rng.
  np.testing.assert_array_equal(
      clean, np.asarray(model.apply(p, ids, mask, types, rngs={"dropout": jax.random.key(0)})))
  # embed_sentences: an rng switches dropout on.
  embed = jax.jit(lambda params, key: bert.embed_sentences(params, config, ids, mask, types,
                                                           rng=key))
  e0 = bert.embed_sentences(case.params, config, ids, mask, types)
  key = jax.random.key(3, impl=RNG_IMPL)
  e1, e2 = embed(case.params, key), embed(case.params, key)
  assert np.abs(np.asarray(e0) - np.asarray(e1)).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
