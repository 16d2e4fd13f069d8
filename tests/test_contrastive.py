"""The contrastive loss of stages 2-3 (contrastive.loss): parity, GradCache, sharding, refusals.

The reference is the C-Pack paper's (arXiv:2309.07597) and FlagEmbedding's math, written here in
PyTorch over transformers' BertModel read from the same random folder
(conftest.make_hf_folder(..., "bert", seed)), eval mode: CLS or mean pooling,
torch.nn.functional.normalize, scores q @ p.T / temperature over the whole batch with targets
i*G (in-batch negatives) or over the own group with target 0, and the distillation loss
-(softmax(teacher) * log_softmax(group scores / temperature)).sum(-1).mean().
Losses and every parameter's gradient are compared in float32 with dropout off.
"""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers
from torch.nn import functional as F

from bge_jax import config as config_lib
from bge_jax import contrastive, convert, sharding
from bge_jax.data import packing
from bge_jax.models import bert
from bge_jax.testing.torch_reference import flagembedding_contrastive_loss as fe_loss
from conftest import make_hf_folder

# Seeds of conftest.tiny_hf_config sharing one shape (vocab 211, hidden 32, 1 layer, 4 heads,
# ffn 64), so that each loss variant compiles once.
SEEDS = (1, 10, 37)
N_QUERIES, LENGTH = 4, 12
FIRST_ID, CLS_ID = 5, 2  # random ids from [FIRST_ID, vocab); 0 = [PAD]
TEMPERATURE = 0.02  # FlagEmbedding's default
LOSS_TOL, GRAD_TOL = 1e-4, 1e-3  # vs torch
SAME_TOL = 1e-5  # GradCache vs unchunked, sharded vs single device
# d loss / d key bias is exactly 0 (q_i . b_k is constant over the columns softmax normalises),
# so both sides hold rounding noise there: checked against the layer's key-weight gradient norm.
ZERO_GRAD_TOL = 1e-5
# XLA:CPU compiles dominate this file's time: a value_and_grad of this model takes ~14 s of CPU
# with the defaults, ~1.5 s at LLVM -O0 without the fusion emitters (same float32 semantics).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


# ---------------------------------------------------------------------------------------------
# Batches and the PyTorch reference.
# ---------------------------------------------------------------------------------------------

def _rows(rng, n: int, length: int, vocab_size: int):
  """Right-padded rows with ragged lengths (at least one full, at least one padded)."""
  lengths = rng.randint(2, length, size=n)
  lengths[rng.randint(n)] = length
  mask = np.arange(length)[None] < lengths[:, None]
  ids = rng.randint(FIRST_ID, vocab_size, size=(n, length))
  ids[:, 0] = CLS_ID
  return np.where(mask, ids, 0).astype(np.int32), mask.astype(np.int32)


def make_batch(vocab_size: int, seed: int, group_size: int, teacher: bool = False,
               n_queries: int = N_QUERIES, q_len: int = LENGTH,
               p_len: int = LENGTH) -> dict[str, np.ndarray]:
  rng = np.random.RandomState(seed)
  q_ids, q_mask = _rows(rng, n_queries, q_len, vocab_size)
  p_ids, p_mask = _rows(rng, n_queries * group_size, p_len, vocab_size)
  batch = {"query_input_ids": q_ids, "query_attention_mask": q_mask,
           "passage_input_ids": p_ids, "passage_attention_mask": p_mask}
  if teacher:
    batch["teacher_scores"] = (rng.randn(n_queries, group_size) * 2.0).astype(np.float32)
  return batch


def torch_model(path) -> transformers.BertModel:
  return transformers.BertModel.from_pretrained(str(path), attn_implementation="eager").float().eval()


def torch_loss(model, batch, *, temperature, group_size, pooling="cls", normalize=True,
               in_batch_negatives=True, distill="kl_div", duplicates=None):
  def encode(ids, mask):
    ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    if pooling == "cls":
      v = hidden[:, 0]
    else:
      m = mask[..., None].float()
      v = (hidden * m).sum(1) / m.sum(1)
    return F.normalize(v, dim=-1) if normalize else v

  if not normalize:
    temperature = 1.0  # FlagEmbedding: unnormalised similarities are not scaled
  q = encode(batch["query_input_ids"], batch["query_attention_mask"])
  p = encode(batch["passage_input_ids"], batch["passage_attention_mask"])
  teacher = torch.tensor(batch["teacher_scores"]) if "teacher_scores" in batch else None
  return fe_loss(q, p, teacher, temperature=temperature, group_size=group_size,
                 in_batch=in_batch_negatives, kd=distill, duplicates=duplicates)


def torch_loss_and_grads(model, batch, **kw):
  model.zero_grad(set_to_none=True)
  out = torch_loss(model, batch, **kw)
  out.backward()
  grads = {name: p.grad.detach().numpy().astype(np.float64)
           for name, p in model.named_parameters() if p.grad is not None}
  return float(out.detach()), grads


# ---------------------------------------------------------------------------------------------
# The JAX side: jit(value_and_grad(contrastive.loss)), as the trainer runs it.
# ---------------------------------------------------------------------------------------------

def _value_and_grad(params, batch, rng, config, opts):
  def f(p):
    out = contrastive.loss(p, config, batch, rng=rng, **dict(opts))
    return out["loss"], out

  return jax.value_and_grad(f, has_aux=True)(params)


_jitted_value_and_grad = jax.jit(_value_and_grad, static_argnames=("config", "opts"),
                                 compiler_options=FAST_COMPILE)


@functools.partial(jax.jit, static_argnames=("config", "opts"), compiler_options=FAST_COMPILE)
def _value_grad_and_jvp(params, batch, rng, tangent, *, config, opts):
  """value_and_grad, and the forward-mode derivative along `tangent` (one compiled program)."""
  (value, _), grads = _value_and_grad(params, batch, rng, config, opts)
  primal, directional = jax.jvp(
      lambda p: contrastive.loss(p, config, batch, rng=rng, **dict(opts))["loss"], (params,),
      (tangent,))
  return value, grads, primal, directional


def jax_loss_and_grads(params, config, batch, rng=None, **kw):
  """(loss, aux outputs, grads); the batch, flags included, is traced."""
  (value, out), grads = _jitted_value_and_grad(params, batch, rng, config=config,
                                               opts=tuple(sorted(kw.items())))
  return float(value), jax.device_get(out), grads


def flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(x, np.float64)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _zero_grad_partner(name: str) -> str | None:
  """The key weight beside a key bias (HF or JAX naming), else None."""
  if name.endswith("attention.self.key.bias"):
    return name[:-len("bias")] + "weight"
  if name.endswith("['key']['bias']"):
    return name[:-len("['bias']")] + "['kernel']"
  return None


def compare_grads(got: dict, want: dict, tol: float) -> tuple[int, tuple[float, str], tuple[float, str]]:
  """Relative error per tensor (key biases against their key weight's scale; a reference that
  is exactly zero, e.g. the unused pooler's, must be matched exactly); returns (tensors
  compared, (worst relative error, name), (worst key-bias error, name))."""
  worst, worst_zero, compared = (0.0, ""), (0.0, ""), 0
  for name, w in want.items():
    assert name in got, f"no gradient for {name}"
    g = got[name]
    assert g.shape == w.shape, (name, g.shape, w.shape)
    assert np.isfinite(g).all(), name
    partner = _zero_grad_partner(name)
    if partner is not None:
      err = float(max(np.linalg.norm(g), np.linalg.norm(w)) / np.linalg.norm(want[partner]))
      assert err <= ZERO_GRAD_TOL, (name, err)
      worst_zero = max(worst_zero, (err, name))
    elif not w.any():
      assert not g.any(), f"{name}: non-zero where the reference gradient is exactly zero"
    else:
      rel = float(np.linalg.norm(g - w) / np.linalg.norm(w))
      assert rel <= tol, (name, rel)
      worst = max(worst, (rel, name))
    compared += 1
  assert compared == len(got), set(got) - set(want)
  return compared, worst, worst_zero


# ---------------------------------------------------------------------------------------------
# Parity with PyTorch.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("contrastive")
  return {seed: make_hf_folder(root, "bert", seed) for seed in SEEDS}


@pytest.fixture(scope="module")
def loaded(files):
  """seed -> (config, params, torch model)."""
  out = {}
  for seed, path in files.items():
    config, params = convert.load_hf(str(path))
    assert config.hf_family == "bert" and config.dtype == "float32"
    assert config.hidden_dropout > 0 and config.attention_dropout > 0  # rng=None turns it off
    out[seed] = (config, params, torch_model(path))
  return out


@pytest.fixture(scope="module")
def report():
  """Worst errors per case family, printed at the end of the module (pytest -s)."""
  worst: dict[str, dict[str, tuple[float, str]]] = {}
  yield worst
  if worst:
    print("\nContrastive loss: worst errors per case family (float32, CPU):")
    for family, w in worst.items():
      print(f"  {family}:")
      for k, (err, where) in sorted(w.items()):
        print(f"    {k:<28} {err:.2e}  ({where})")


def _note(report, family, kind, err, where=""):
  w = report.setdefault(family, {})
  if err >= w.get(kind, (-1.0, ""))[0]:
    w[kind] = (err, where)


POOLER = ("pooler.dense.weight", "pooler.dense.bias")


def check_parity(loaded, seed, report, family, *, group_size, teacher=False, flag=None,
                 pack=False, **kw):
  """Loss and every parameter's gradient, JAX vs torch; returns JAX's (loss, grads).

  flag: 0/1 given as batch["in_batch_negatives"] (a 0-d int32 array, traced under jit), which
  overrides the argument (left at its default, True: one compiled function for both flags).
  pack: JAX gets both sides packed into as few rows as fit (torch the padded batch).
  """
  config, params, model = loaded[seed]
  batch = make_batch(config.vocab_size, seed, group_size, teacher=teacher)
  assert (batch["query_attention_mask"] == 0).any() and (batch["passage_attention_mask"] == 0).any()
  kw = dict(temperature=TEMPERATURE, group_size=group_size, **kw)
  ref_kw = dict(kw)
  if flag is not None:
    batch["in_batch_negatives"] = np.asarray(flag, np.int32)
    ref_kw["in_batch_negatives"] = bool(flag)
  torch_value, torch_grads = torch_loss_and_grads(model, batch, **ref_kw)
  if pack:
    batch = packing.pack_sides(batch, {"query": None, "passage": None})
    assert batch["passage_input_ids"].shape[0] < N_QUERIES * group_size  # really packed
  value, out, grads = jax_loss_and_grads(params, config, batch, **kw)

  rel = abs(value - torch_value) / abs(torch_value)
  _note(report, family, "rel loss", rel, f"seed {seed}")
  assert rel <= LOSS_TOL, (value, torch_value, rel)
  # The reported terms: loss = contrastive_loss (+ distill_loss for kl_div), or distill_loss
  # alone for m3_kd_loss.
  if not teacher:
    terms = out["contrastive_loss"]
  elif kw.get("distill") == "m3_kd_loss":
    terms = out["distill_loss"]
  else:
    terms = out["contrastive_loss"] + out["distill_loss"]
  assert float(terms) == value

  hf = {k: np.asarray(v, np.float64) for k, v in convert.to_hf_state_dict(grads, config).items()}
  named = dict(model.named_parameters())
  assert set(hf) == set(named)
  # The pooler is a parameter of both, outside the loss: no torch grad, an exactly zero JAX one.
  assert set(named) - set(torch_grads) == set(POOLER)
  assert all(not hf[k].any() for k in POOLER)
  compared, worst, worst_zero = compare_grads({k: hf[k] for k in torch_grads}, torch_grads,
                                              GRAD_TOL)
  assert compared == len(torch_grads) == len(named) - 2 == 5 + 16 * config.num_layers
  _note(report, family, "rel grad", worst[0], f"seed {seed}, {worst[1]}")
  _note(report, family, "key-bias grad / key weight", worst_zero[0], f"seed {seed}")
  print(f"\n[{family}, seed {seed}] torch loss {torch_value:.6f}, rel err {rel:.1e}; {compared} "
        f"grads, max rel err {worst[0]:.1e} ({worst[1]}); key-bias {worst_zero[0]:.1e}")
  return value, grads


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", [1, 4])
def test_parity_in_batch(loaded, report, seed, group_size):
  check_parity(loaded, seed, report, f"cls, in-batch, G={group_size}", group_size=group_size)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_parity_mean_pooling(loaded, report, seed):
  check_parity(loaded, seed, report, "mean pooling, in-batch, G=4", group_size=4, pooling="mean")


@pytest.mark.parametrize("seed", SEEDS[1:])
def test_parity_own_group_only(loaded, report, seed):
  check_parity(loaded, seed, report, "cls, own group only, G=4", group_size=4,
               in_batch_negatives=False)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_parity_teacher_scores(loaded, report, seed):
  """FlagEmbedding's kl_div: the in-batch contrastive loss plus the cross-entropy of the own
  group's scores against softmax(teacher scores)."""
  check_parity(loaded, seed, report, "distillation kl_div, G=4", group_size=4, teacher=True)


@pytest.mark.parametrize("seed,flag", [(SEEDS[0], 1), (SEEDS[2], 0)])
def test_parity_m3_kd_loss(loaded, report, seed, flag):
  """FlagEmbedding's m3_kd_loss (in-batch; own group only with the batch's flag 0)."""
  check_parity(loaded, seed, report, "distillation m3_kd_loss, G=4", group_size=4, teacher=True,
               flag=flag, distill="m3_kd_loss")


@pytest.mark.parametrize("seed", SEEDS[::2])
def test_parity_unnormalized(loaded, report, seed, caplog):
  """normalize=False forces temperature 1 (the reference does the same), with a warning."""
  check_parity(loaded, seed, report, "unnormalised (temperature 1)", group_size=4,
               normalize=False)
  config, params, _ = loaded[seed]
  batch = make_batch(config.vocab_size, seed, 4)
  with caplog.at_level("WARNING", logger="bge_jax.contrastive"):  # emitted when tracing
    jax.eval_shape(lambda p: contrastive.loss(p, config, batch, temperature=TEMPERATURE,
                                              group_size=4, normalize=False), params)
  assert any("temperature 1.0" in r.getMessage() for r in caplog.records), caplog.records


@pytest.mark.parametrize("flag", [1, 0])
def test_traced_flag_matches_python_bool(loaded, report, flag):
  """batch["in_batch_negatives"] (traced) equals the Python bool (the argument left True)."""
  seed = SEEDS[0]
  value, grads = check_parity(loaded, seed, report, "traced in-batch flag, G=4",
                              group_size=4, flag=flag)
  config, params, _ = loaded[seed]
  batch = make_batch(config.vocab_size, seed, 4)
  ref_value, _, ref_grads = jax_loss_and_grads(params, config, batch, temperature=TEMPERATURE,
                                               group_size=4, in_batch_negatives=bool(flag))
  rel = abs(value - ref_value) / abs(ref_value)
  assert rel <= 1e-6, (value, ref_value)
  _, worst, _ = compare_grads(flat(grads), flat(ref_grads), SAME_TOL)
  family = "traced flag vs Python bool (JAX)"
  _note(report, family, "rel loss", rel, f"flag {flag}")
  _note(report, family, "rel grad", worst[0], f"flag {flag}, {worst[1]}")


def test_in_batch_negatives_off_wins_over_the_batchs_flag(loaded):
  """loss.in_batch_negatives=False holds for every batch, though the batcher's flag says 1: the
  loss is the group-only one, not the in-batch one."""
  config, params, _ = loaded[SEEDS[0]]
  batch = make_batch(config.vocab_size, SEEDS[0], 4)
  kw = dict(temperature=TEMPERATURE, group_size=4)
  within = contrastive.loss(params, config, batch, in_batch_negatives=False, **kw)["loss"]
  batch["in_batch_negatives"] = np.asarray(1, np.int32)
  off = contrastive.loss(params, config, batch, in_batch_negatives=False, **kw)["loss"]
  on = contrastive.loss(params, config, batch, in_batch_negatives=True, **kw)["loss"]
  np.testing.assert_allclose(float(off), float(within), rtol=1e-6)
  assert float(on) > float(off) + 0.1, (float(on), float(off))  # more negatives: a larger loss


# ---------------------------------------------------------------------------------------------
# GradCache (chunk_size > 0).
# ---------------------------------------------------------------------------------------------

GC_KW = dict(temperature=TEMPERATURE, group_size=4)  # 4 queries, 16 passages


def check_same(report, family, tag, value, grads, want, want_grads) -> None:
  """Loss and every gradient within SAME_TOL of a reference computed another way."""
  rel = abs(value - want) / abs(want)
  assert rel <= SAME_TOL, (value, want)
  compared, worst, worst_zero = compare_grads(flat(grads), want_grads, SAME_TOL)
  assert compared == len(want_grads)
  _note(report, family, "rel loss", rel, tag)
  _note(report, family, "rel grad", worst[0], f"{tag}, {worst[1]}")
  _note(report, family, "key-bias grad / key weight", worst_zero[0], tag)


def packed_batch(batch, lengths: dict, multiple: dict) -> tuple[dict, dict]:
  """(batch with each side packed into as few rows as fit, rounded up to multiple[side]; rows)."""
  rows = {}
  for side, length in lengths.items():
    n = batch[f"{side}_input_ids"].shape[0]
    need = packing.packed_rows(batch[f"{side}_attention_mask"].sum(1), length)
    rows[side] = packing.rows_for(n, need / n, multiple=multiple[side])
  return packing.pack_sides(batch, rows), rows


@pytest.fixture(scope="module")
def unchunked(loaded):
  """The reference: seed SEEDS[0], chunk_size=0 (compiled for the torch parity already)."""
  config, params, _ = loaded[SEEDS[0]]
  batch = make_batch(config.vocab_size, SEEDS[0], 4)
  value, _, grads = jax_loss_and_grads(params, config, batch, **GC_KW)
  value0, _, grads0 = jax_loss_and_grads(params, config, batch, chunk_size=0, **GC_KW)
  assert value0 == value  # chunk_size=0 is the default: no chunking
  return config, params, batch, value, flat(grads)


@pytest.mark.parametrize("chunk_size", [2, 4])
def test_gradcache_equals_unchunked(unchunked, report, chunk_size):
  config, params, batch, ref, ref_grads = unchunked
  value, _, grads = jax_loss_and_grads(params, config, batch, chunk_size=chunk_size, **GC_KW)
  check_same(report, "GradCache vs unchunked", f"chunk {chunk_size}", value, grads, ref,
             ref_grads)


def test_gradcache_with_dropout_is_deterministic_and_exact(unchunked, report):
  """With dropout, a fixed rng gives bit-identical chunked results, another rng others, and the
  gradient is the derivative of the returned loss (the backward's rematerialised chunks drop
  the same units as the forward): <grad, v> equals the forward-mode derivative along v."""
  config, params, batch, plain, _ = unchunked
  opts = tuple(sorted(dict(chunk_size=2, **GC_KW).items()))
  gen = np.random.default_rng(0)
  tangent = jax.tree.map(lambda x: gen.standard_normal(x.shape).astype(np.float32), params)

  def run(seed):
    value, grads, primal, directional = jax.device_get(_value_grad_and_jvp(
        params, batch, jax.random.key(seed), tangent, config=config, opts=opts))
    return float(value), grads, float(primal), float(directional)

  a, ga, primal, directional = run(0)
  a2, ga2, _, _ = run(0)
  b, _, _, _ = run(1)
  assert a == a2
  assert all((x == y).all() for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(ga2)))
  assert a != b, "different rngs must drop different units"
  assert abs(a - plain) > 1e-3 * plain and abs(b - plain) > 1e-3 * plain, "no dropout applied?"

  assert abs(primal - a) <= 1e-6 * abs(a), (primal, a)
  products = [np.asarray(g, np.float64) * np.asarray(t, np.float64)
              for g, t in zip(jax.tree.leaves(ga), jax.tree.leaves(tangent))]
  dot = sum(float(x.sum()) for x in products)
  scale = sum(float(np.abs(x).sum()) for x in products)
  err = abs(dot - directional) / scale
  assert err <= SAME_TOL, (dot, directional, scale)
  _note(report, "GradCache with dropout", "|<g,v> - jvp| / sum|g v|", err, "chunk 2")


def test_gradcache_refuses_indivisible_chunk(loaded):
  config, params, _ = loaded[SEEDS[0]]
  batch = make_batch(config.vocab_size, 0, 4)
  with pytest.raises(ValueError, match=r"loss\.gradcache_chunk=3"):
    jax.eval_shape(lambda p: contrastive.loss(p, config, batch, chunk_size=3, **GC_KW), params)


@pytest.mark.parametrize("seed,group_size,pooling", [(SEEDS[0], 4, "cls"), (SEEDS[1], 1, "cls"),
                                                     (SEEDS[2], 4, "mean")])
def test_parity_packed(loaded, report, seed, group_size, pooling):
  """Texts packed several to a row (block-diagonal attention, per-text positions and pooling)
  give the padded batch's loss and gradients: checked against torch on the padded batch."""
  check_parity(loaded, seed, report, "packed", group_size=group_size, pooling=pooling, pack=True)


@pytest.mark.parametrize("chunk_size", [2, 4])
def test_packed_gradcache_equals_unchunked(unchunked, report, chunk_size):
  """GradCache over packed rows (as many parts as the padded batch would use) vs the padded,
  unchunked step."""
  config, params, batch, ref, ref_grads = unchunked
  n_q, n_p = batch["query_input_ids"].shape[0], batch["passage_input_ids"].shape[0]
  packed, rows = packed_batch(batch, {"query": LENGTH, "passage": LENGTH},
                              {"query": n_q // chunk_size, "passage": n_p // chunk_size})
  if chunk_size == 4:
    assert rows["passage"] < n_p  # 12 rows for 16 passages (the 8 parts of chunk 2 need 16)
  value, _, grads = jax_loss_and_grads(params, config, packed, chunk_size=chunk_size, **GC_KW)
  check_same(report, "packed GradCache vs padded unchunked", f"chunk {chunk_size}", value, grads,
             ref, ref_grads)


def test_packed_gradcache_refuses_rows_that_do_not_split(unchunked):
  config, params, batch, _, _ = unchunked
  packed = packing.pack_sides(batch, {"query": None, "passage": 12})
  with pytest.raises(ValueError, match=r"12 rows do not split into 8 parts"):
    jax.eval_shape(lambda p: contrastive.loss(p, config, packed, chunk_size=2, **GC_KW), params)


# ---------------------------------------------------------------------------------------------
# Sharded over 8 fake devices: in-batch negatives span the global batch.
# ---------------------------------------------------------------------------------------------

SHARD_QUERIES, SHARD_GROUP, SHARD_Q_LEN, SHARD_P_LEN = 8, 2, 8, 12


def _sharded_loss(params, config, batch):
  out = contrastive.loss(params, config, batch, temperature=TEMPERATURE, group_size=SHARD_GROUP)
  return out["loss"], out


_sharded_step = jax.jit(jax.value_and_grad(_sharded_loss, has_aux=True), static_argnums=1,
                        compiler_options=FAST_COMPILE)


@functools.partial(jax.jit, static_argnums=1, compiler_options=FAST_COMPILE)
def _embeddings(params, config, batch):
  return tuple(contrastive.embed(params, config, batch[f"{s}_input_ids"],
                                 batch[f"{s}_attention_mask"], pooling="cls", normalize=True)
               for s in ("query", "passage"))


@pytest.fixture(scope="module")
def sharded_setup():
  """preset('tiny') (one layer: compile time) and its single-device loss, grads, embeddings.

  Values are drawn with numpy at std 0.2 (LayerNorm scales near 1): at bert.init's scale
  (std 0.02) every sentence embeds nearly alike and float32 gradients carry ~1e-3 relative
  rounding error on one device already (measured against float64), too much for 1e-5.
  """
  assert jax.device_count() == 8
  config = config_lib.preset("tiny", num_layers=1)
  shapes, specs = bert.abstract_init(config)  # bert.init's (params, logical specs), unallocated
  gen = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: ((1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
                       + 0.2 * gen.standard_normal(s.shape)).astype(np.float32), shapes)
  batch = make_batch(config.vocab_size, 5, SHARD_GROUP, n_queries=SHARD_QUERIES,
                     q_len=SHARD_Q_LEN, p_len=SHARD_P_LEN)
  device = jax.devices()[0]
  params, batch_1 = jax.device_put((params, batch), device)
  ref = jax.device_get(_sharded_step(params, config, batch_1))
  q, p = (np.asarray(x, np.float64) for x in jax.device_get(_embeddings(params, config, batch_1)))
  return config, params, specs, batch, ref, (q, p)


def _np_in_batch_loss(q, p):
  scores = q @ p.T / TEMPERATURE
  targets = np.arange(len(q)) * SHARD_GROUP
  top = scores.max(1)
  logz = np.log(np.exp(scores - top[:, None]).sum(1)) + top
  return float(np.mean(logz - scores[np.arange(len(q)), targets]))


def test_global_negatives_matter(sharded_setup):
  """The single-device loss is over the global batch and differs from the mean of per-shard
  losses, so the sharded equality below would catch negatives taken per device only."""
  _, _, _, _, ref, (q, p) = sharded_setup
  value = float(ref[0][0])
  assert abs(_np_in_batch_loss(q, p) - value) <= 1e-5 * value
  for shards in (8, 4):  # data x fsdp of the two meshes
    n, m = SHARD_QUERIES // shards, SHARD_QUERIES * SHARD_GROUP // shards
    local = np.mean([_np_in_batch_loss(q[i * n:(i + 1) * n], p[i * m:(i + 1) * m])
                     for i in range(shards)])
    assert abs(local - value) > 0.05 * value, (shards, local, value)


@pytest.mark.parametrize("shape", [(4, 2, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_matches_single_device(sharded_setup, report, shape):
  config, params, specs, batch, ref, _ = sharded_setup
  mesh = sharding.make_mesh(*shape)
  sharded = sharding.shard_params(params, specs, mesh)
  word = sharded["embeddings"]["word_embeddings"]["embedding"]
  assert len(word.sharding.device_set) == 8
  # fsdp (and tensor) really split the weights: each device holds a part of the table.
  assert word.addressable_shards[0].data.shape == (config.vocab_size // shape[2],
                                                   config.hidden_size // shape[1])
  with sharding.activate(mesh):
    args = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    rows = SHARD_QUERIES // (shape[0] * shape[1])
    assert args["query_input_ids"].addressable_shards[0].data.shape == (rows, SHARD_Q_LEN)
    assert args["passage_input_ids"].addressable_shards[0].data.shape == (rows * SHARD_GROUP,
                                                                          SHARD_P_LEN)
    (value, _), grads = _sharded_step(sharded, config, args)
  check_same(report, "sharded vs single device", "x".join(map(str, shape)), float(value),
             jax.device_get(grads), float(ref[0][0]), flat(ref[1]))


def test_packed_sharded_matches_single_device(sharded_setup, report):
  """Packed rows sharded over data x fsdp = 4 (2x2x2 mesh): per-row pooling stays on its
  device, the texts' gather and the global negatives match the padded single-device step."""
  config, params, specs, batch, ref, _ = sharded_setup
  mesh = sharding.make_mesh(2, 2, 2)
  packed, rows = packed_batch(batch, {"query": SHARD_Q_LEN, "passage": SHARD_P_LEN},
                              {"query": 4, "passage": 4})  # data x fsdp shards
  assert rows["passage"] < SHARD_QUERIES * SHARD_GROUP
  with sharding.activate(mesh):
    args = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in packed.items()}
    (value, _), grads = _sharded_step(sharding.shard_params(params, specs, mesh), config, args)
  check_same(report, "packed, sharded 2x2x2 vs padded single device", "2x2x2", float(value),
             jax.device_get(grads), float(ref[0][0]), flat(ref[1]))


# ---------------------------------------------------------------------------------------------
# Refusals.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("missing", contrastive.BATCH_KEYS)
def test_refuses_batch_missing_a_key(loaded, missing):
  config, params, _ = loaded[SEEDS[0]]
  batch = make_batch(config.vocab_size, 0, 2)
  del batch[missing]
  with pytest.raises(KeyError) as e:
    contrastive.loss(params, config, batch, temperature=TEMPERATURE, group_size=2)
  message = str(e.value.args[0])
  # The missing key is named, and first: not only inside a list of the expected keys.
  mentions = {k: message.find(k) for k in contrastive.BATCH_KEYS if k in message}
  assert missing in mentions and min(mentions, key=mentions.get) == missing, message


@pytest.mark.parametrize("group_size", [1, 3])
def test_refuses_passage_count_mismatch(loaded, group_size):
  config, params, _ = loaded[SEEDS[0]]
  batch = make_batch(config.vocab_size, 0, 2)  # 4 queries, 8 passages
  with pytest.raises(ValueError, match=rf"8 passages for 4 queries x group_size={group_size}"):
    jax.eval_shape(lambda p: contrastive.loss(p, config, batch, temperature=TEMPERATURE,
                                              group_size=group_size), params)
