"""Sharded forward / MLM logits / gradients on 8 fake CPU devices equal the single-device ones."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bge_jax import config as config_lib
from bge_jax import sharding
from bge_jax.models import bert

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (2, 4, 1)]  # (data, fsdp, tensor)
BATCH, LENGTH = 8, 16


@pytest.fixture(scope="module")
def setup():
  """Tiny MLM model (dims divisible by every mesh axis), a batch, and single-device results."""
  assert jax.device_count() == 8
  # One layer (compile time): the layers share one sharding pattern, golden-checked above.
  config = config_lib.preset("tiny", add_mlm_head=True, add_pooler=True, hf_family="bert_mlm",
                             num_layers=1)
  shapes, specs = bert.abstract_init(config)
  # Random values everywhere (LayerNorm scales near 1, non-zero biases), so that a mis-sharded
  # leaf cannot hide; drawn with numpy to skip compiling Flax's init.
  gen = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: ((1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
                       + 0.05 * gen.standard_normal(s.shape)).astype(np.float32), shapes)
  rng = np.random.RandomState(0)
  ids = rng.randint(1, config.vocab_size, size=(BATCH, LENGTH)).astype(np.int32)
  lengths = rng.randint(1, LENGTH + 1, size=BATCH)
  lengths[0] = LENGTH
  mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
  labels = np.where(rng.rand(BATCH, LENGTH) < 0.3, ids, -100)
  labels[0, 0] = ids[0, 0]
  labels = np.where(mask == 1, labels, -100).astype(np.int32)
  step = _step_fn(config)
  with jax.default_device(jax.devices()[0]):
    ref = jax.device_get(step(params, ids, mask, labels))
  return config, params, specs, (ids, mask, labels), ref


def _step_fn(config):
  model = bert.BertModel(config)

  def loss_fn(params, ids, mask, labels):
    hidden = model.apply({"params": params}, ids, mask)
    logits = model.apply({"params": params}, hidden, method=bert.BertModel.mlm_logits)
    pooled = model.apply({"params": params}, hidden, method=bert.BertModel.pooler_output)
    logp = jax.nn.log_softmax(logits, axis=-1)
    valid = labels != -100
    picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    loss = -jnp.sum(jnp.where(valid, picked, 0.0)) / valid.sum() + 0.1 * jnp.mean(pooled ** 2)
    return loss, (hidden, logits)

  @jax.jit
  def step(params, ids, mask, labels):
    (loss, (hidden, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, ids, mask, labels)
    return dict(loss=loss, hidden=hidden, logits=logits, grads=grads)

  return step


def test_logical_specs_map_as_intended():
  config = config_lib.preset("tiny", add_mlm_head=True, add_pooler=True, hf_family="bert_mlm")
  mesh = sharding.make_mesh(2, 2, 2)
  table = sharding.describe(sharding.logical_to_sharding(bert.logical_specs(config), mesh))
  golden = {
      "['embeddings']['word_embeddings']['embedding']": P("tensor", "fsdp"),
      "['embeddings']['position_embeddings']['embedding']": P(None, "fsdp"),
      "['embeddings']['token_type_embeddings']['embedding']": P(None, "fsdp"),
      "['embeddings']['norm']['scale']": P("fsdp"),
      "['layers_0']['query']['kernel']": P("fsdp", "tensor", None),
      "['layers_0']['query']['bias']": P("tensor", None),
      "['layers_1']['key']['kernel']": P("fsdp", "tensor", None),
      "['layers_1']['value']['kernel']": P("fsdp", "tensor", None),
      "['layers_0']['attention_out']['kernel']": P("tensor", None, "fsdp"),
      "['layers_0']['attention_out']['bias']": P("fsdp"),
      "['layers_0']['intermediate']['kernel']": P("fsdp", "tensor"),
      "['layers_0']['intermediate']['bias']": P("tensor"),
      "['layers_0']['output']['kernel']": P("tensor", "fsdp"),
      "['layers_1']['output_norm']['bias']": P("fsdp"),
      "['mlm_head']['bias']": P("tensor"),
      "['mlm_head']['transform']['kernel']": P("fsdp", "tensor"),
      "['pooler']['kernel']": P("fsdp", "tensor"),
  }
  for path, spec in golden.items():
    assert table[path] == str(spec), (path, table[path])
  # Every parameter is covered by the rules (no leaf left with an unmapped logical name).
  n_params = len(jax.tree.leaves(bert.abstract_init(config)[0]))
  assert len(table) == n_params
  assert sharding.batch_sharding(mesh, 2).spec == P(("data", "fsdp"), None)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_step_matches_single_device(setup, shape):
  config, params, specs, (ids, mask, labels), ref = setup
  data, fsdp, tensor = shape
  mesh = sharding.make_mesh(data, fsdp, tensor)
  assert dict(mesh.shape) == {"data": data, "fsdp": fsdp, "tensor": tensor}
  sharded = sharding.shard_params(params, specs, mesh)

  # Placement: each leaf follows its logical spec; with fsdp/tensor > 1 weights are really split.
  word = sharded["embeddings"]["word_embeddings"]["embedding"]
  query = sharded["layers_0"]["query"]["kernel"]
  assert query.sharding.spec == P("fsdp", "tensor", None)
  assert len(word.sharding.device_set) == 8
  split = [x for x in jax.tree.leaves(sharded)
           if x.addressable_shards[0].data.shape != x.shape]
  if fsdp * tensor == 1:
    assert split == []
  else:
    assert word.addressable_shards[0].data.shape == (config.vocab_size // tensor,
                                                     config.hidden_size // fsdp)
    assert query.addressable_shards[0].data.shape == (config.hidden_size // fsdp,
                                                      config.num_heads // tensor, config.head_dim)
    assert len(split) > len(jax.tree.leaves(sharded)) // 2

  batch = sharding.batch_sharding(mesh, 2)
  with sharding.activate(mesh):
    args = [jax.device_put(x, batch) for x in (ids, mask, labels)]
    assert args[0].addressable_shards[0].data.shape == (BATCH // (data * fsdp), LENGTH)
    out = _step_fn(config)(sharded, *args)
  out = jax.device_get(out)

  np.testing.assert_allclose(out["loss"], ref["loss"], rtol=1e-6)
  np.testing.assert_allclose(out["hidden"], ref["hidden"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(out["logits"], ref["logits"], rtol=0, atol=1e-5)
  assert jax.tree.structure(out["grads"]) == jax.tree.structure(ref["grads"])
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out["grads"]),
                          jax.tree.leaves(ref["grads"])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert np.abs(ref["grads"]["layers_0"]["query"]["kernel"]).max() > 1e-4
  worst = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out["grads"]),
                                                          jax.tree.leaves(ref["grads"])))
  print(f"\nmesh {shape}: hidden max |delta| {np.abs(out['hidden'] - ref['hidden']).max():.2g}, "
        f"logits {np.abs(out['logits'] - ref['logits']).max():.2g}, grads {worst:.2g}")


# ---------------------------------------------------------------------------------------------
# The trainer's own step for stage 1 (RetroMAE) and stage 2 (contrastive, in-batch negatives over
# the global batch) on four meshes against one device.
#
# The step, loss, optimizer and shardings are the trainer's (configs/*.py:tiny, the stage's
# model_config / loss_fn, program.optimizer_options / state.make_optimizer / make_train_step, the
# loop's state shardings).
# Gradients are read back from the optimizer state: with clipping off, Adam's first moment after
# one step from zero is exactly (1 - b1) * grad, so one compiled step per mesh checks the loss,
# the gradient of every parameter and the sharding of params, mu and nu at once.
# Tolerances (float32, dropout off): loss relative 1e-5; each gradient tensor relative in
# Frobenius norm 1e-5; attention key biases (whose gradient is exactly zero in exact arithmetic,
# so both sides hold rounding noise) absolute, relative to their layer's key-kernel gradient norm.
# ---------------------------------------------------------------------------------------------

STAGE_MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]  # (data, fsdp, tensor)
STAGE_TOL = 1e-5
# XLA:CPU compile time dominates: LLVM -O0 without the fusion emitters (float32 semantics kept).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
RMAE_BATCH, RMAE_LENGTH = 8, 16
PAIRS, Q_LEN, P_LEN = 8, 8, 12


def load_run_config(name: str, arg: str = "tiny"):
  """configs/<name>.py:get_config(arg), as launch/train.py would load it."""
  from bge_jax import config_files
  return config_files.load(f"{name}:{arg}")


class _Vocab:
  """What RetroMAECollator reads from a tokenizer: special ids, len, id -> token."""

  pad_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 1, 2, 3

  def __init__(self, size: int):
    self.tokens = ["[PAD]", "[CLS]", "[SEP]", "[MASK]"] + [
        f"##p{i}" if i % 5 == 0 else f"w{i}" for i in range(4, size)]

  def __len__(self):
    return len(self.tokens)

  def convert_ids_to_tokens(self, ids):
    return [self.tokens[i] for i in ids]


def _stage_batch(name: str, vocab_size: int) -> dict[str, np.ndarray]:
  rng = np.random.RandomState(3)
  if name == "retromae":
    from bge_jax.data.masking import RetroMAECollator
    collator = RetroMAECollator(_Vocab(vocab_size), max_length=RMAE_LENGTH, seed=0)
    lengths = rng.randint(3, RMAE_LENGTH - 1, size=RMAE_BATCH)
    lengths[0] = RMAE_LENGTH - 2
    return collator([rng.randint(4, vocab_size, size=n).tolist() for n in lengths], step=0)

  def rows(n, length):
    lengths = rng.randint(2, length + 1, size=n)
    lengths[0] = length
    mask = np.arange(length)[None] < lengths[:, None]
    ids = rng.randint(5, vocab_size, size=(n, length))
    ids[:, 0] = 2
    return np.where(mask, ids, 0).astype(np.int32), mask.astype(np.int32)

  q_ids, q_mask = rows(PAIRS, Q_LEN)
  p_ids, p_mask = rows(PAIRS, P_LEN)
  return {"query_input_ids": q_ids, "query_attention_mask": q_mask,
          "passage_input_ids": p_ids, "passage_attention_mask": p_mask}


class StageRun:
  """One stage's trainer pieces on tiny shapes, runnable on any mesh."""

  def __init__(self, name: str):
    from bge_jax.train import program, state as state_lib
    from bge_jax.train.stages import get_stage

    self.name = name
    run = load_run_config(name)
    run.dropout = False
    run.optimizer.clip_norm = 0.0  # so that mu = (1 - b1) * grad exactly
    self.b1 = run.optimizer.b1
    stage = get_stage(run.stage)
    # One layer (compile time); the layers share one sharding pattern (golden table below).
    self.model_config = stage.model_config(config_lib.preset("tiny", num_layers=1), run)
    self.tx, schedule = state_lib.make_optimizer(
        program.optimizer_options(run, self.model_config), total_steps=10)
    stage_loss = stage.loss_fn(run, self.model_config)
    self.step = state_lib.make_train_step(lambda p, b, r: stage_loss(p, b, None), self.tx,
                                          schedule)
    self.abstract_params, self.logical = bert.abstract_init(self.model_config)
    # Random values everywhere at a scale where float32 rounding stays far below the tolerance
    # (contrastive scores are divided by a temperature of 0.02: larger weights are needed for
    # distinct sentence embeddings, see tests/test_contrastive.py's sharded_setup).
    std = 0.2 if name == "contrastive" else 0.05
    gen = np.random.default_rng(0)
    self.params = jax.tree_util.tree_map_with_path(
        lambda path, s: ((1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
                         + std * gen.standard_normal(s.shape)).astype(np.float32),
        self.abstract_params)
    self.batch = _stage_batch(name, self.model_config.vocab_size)

  def shardings(self, mesh):
    """The TrainState shardings: params by the rules, optimizer state like its params."""
    from bge_jax.train import state as state_lib

    param_sh = sharding.logical_to_sharding(self.logical, mesh)
    abstract_state = jax.eval_shape(lambda p: state_lib.init_state(p, self.tx),
                                    self.abstract_params)
    return param_sh, sharding.train_state_sharding(abstract_state, param_sh, self.tx, mesh)

  def run(self, mesh):
    """(metrics, state after one step) of the trainer's jitted step on `mesh`."""
    from bge_jax.train import state as state_lib

    param_sh, state_sh = self.shardings(mesh)
    repl = sharding.replicated(mesh)
    params = jax.tree.map(jax.device_put, self.params, param_sh)
    state = jax.jit(lambda p: state_lib.init_state(p, self.tx), out_shardings=state_sh)(params)
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in self.batch.items()}
    step = jax.jit(self.step, in_shardings=(state_sh, batch_sh, repl),
                   out_shardings=(state_sh, repl), compiler_options=FAST_COMPILE)
    with sharding.activate(mesh):
      batch = {k: jax.device_put(v, batch_sh[k]) for k, v in self.batch.items()}
      new_state, metrics = step(state, batch, jax.random.key(0))
    return jax.device_get(metrics), new_state

  def grads(self, state) -> dict[str, np.ndarray]:
    import optax
    mu = optax.tree.get(state.opt_state, "mu")
    return {jax.tree_util.keystr(p): np.asarray(x, np.float64) / (1.0 - self.b1)
            for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(mu))[0]}


@pytest.fixture(scope="module", params=["retromae", "contrastive"])
def stage_run(request):
  """A stage's pieces and its single-device reference (the same step on a 1x1x1 mesh)."""
  assert jax.device_count() == 8
  run = StageRun(request.param)
  metrics, state = run.run(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  return run, metrics, run.grads(state)


def _expected_shard_shape(shape, spec, mesh) -> tuple[int, ...]:
  """The per-device block of a `shape` array under `spec`, from the mesh sizes alone."""
  out = []
  for i, dim in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    split = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    assert dim % split == 0, (shape, spec)
    out.append(dim // split)
  return tuple(out)


def _key_partner(name: str) -> str | None:
  return name[:-len("['bias']")] + "['kernel']" if name.endswith("['key']['bias']") else None


def test_global_negatives_span_the_batch(stage_run):
  """Stage 2's single-device loss is over the global batch, not a mean of per-shard losses, so
  the mesh equality below would catch negatives taken per device (8 and 4 shards)."""
  run, ref_metrics, _ = stage_run
  if run.name != "contrastive":
    pytest.skip("in-batch negatives are stage 2's")
  from bge_jax import contrastive

  def np_loss(q, p):
    s = q @ p.T / 0.02
    top = s.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(s - top).sum(1)) + top[:, 0] - np.diag(s)))

  embed = jax.jit(lambda params, ids, mask: contrastive.embed(
      params, run.model_config, ids, mask, pooling="cls", normalize=True),
      compiler_options=FAST_COMPILE)
  with jax.default_device(jax.devices()[0]):
    q, p = (np.asarray(embed(run.params, run.batch[f"{s}_input_ids"],
                             run.batch[f"{s}_attention_mask"]), np.float64)
            for s in ("query", "passage"))
  loss = float(ref_metrics["loss"])
  assert abs(np_loss(q, p) - loss) <= 1e-5 * loss
  for shards in (8, 4):
    n = PAIRS // shards
    local = np.mean([np_loss(q[i * n:(i + 1) * n], p[i * n:(i + 1) * n]) for i in range(shards)])
    assert abs(local - loss) > 0.05 * loss, (shards, local, loss)


# 2x2x2 (every axis split) stays in the fast subset; the other meshes are `slow` (~20 s each).
@pytest.mark.parametrize("shape", [s if s == (2, 2, 2) else pytest.param(s, marks=pytest.mark.slow)
                                   for s in STAGE_MESHES], ids=lambda s: "x".join(map(str, s)))
def test_stage_step_matches_single_device(stage_run, shape):
  run, ref_metrics, ref_grads = stage_run
  mesh = sharding.make_mesh(*shape)
  metrics, state = run.run(mesh)

  # Loss and the gradient of every parameter.
  for key in ("loss", "grad_norm"):
    rel = abs(float(metrics[key]) - float(ref_metrics[key])) / abs(float(ref_metrics[key]))
    assert rel <= STAGE_TOL, (key, float(metrics[key]), float(ref_metrics[key]))
  grads = run.grads(state)
  assert sorted(grads) == sorted(ref_grads)
  assert len(grads) == len(jax.tree.leaves(run.params))
  worst = (0.0, "")
  for name, want in ref_grads.items():
    got = grads[name]
    assert np.isfinite(got).all(), name
    partner = _key_partner(name)
    if partner is not None:
      err = max(np.linalg.norm(got), np.linalg.norm(want)) / np.linalg.norm(ref_grads[partner])
    else:
      assert np.linalg.norm(want) > 0, f"{name}: zero reference gradient, cannot compare"
      err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= STAGE_TOL, (name, err)
    worst = max(worst, (float(err), name))

  # Placement: params, mu and nu follow the rules, each device holding its block only.
  param_sh, _ = run.shardings(mesh)
  import optax
  trees = {"params": state.params, "mu": optax.tree.get(state.opt_state, "mu"),
           "nu": optax.tree.get(state.opt_state, "nu")}
  split = 0
  for tree_name, tree in trees.items():
    for (path, x), want_sh in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                                  jax.tree.leaves(param_sh)):
      where = f"{tree_name}{jax.tree_util.keystr(path)}"
      assert x.sharding.spec == want_sh.spec, (where, x.sharding.spec, want_sh.spec)
      block = _expected_shard_shape(x.shape, want_sh.spec, mesh)
      assert len(x.addressable_shards) == 8, where
      assert all(s.data.shape == block for s in x.addressable_shards), (where, block)
      split += block != x.shape
  leaves = len(jax.tree.leaves(run.params))
  if shape[1] * shape[2] == 1:
    assert split == 0
  else:
    assert split >= 3 * leaves // 2, (split, leaves)  # most of params, mu and nu are split
  print(f"\n{run.name} mesh {shape}: rel loss "
        f"{abs(float(metrics['loss']) - float(ref_metrics['loss'])) / float(ref_metrics['loss']):.2g}"
        f", worst rel grad {worst[0]:.2g} ({worst[1]})")


@pytest.mark.parametrize("shape", [(1, 2, 4), (2, 4, 1)], ids=lambda s: "x".join(map(str, s)))
def test_init_never_materialises_unsharded_params(shape):
  """The loop's init (`jit(bert.init, out_shardings=...)`, then `jit(init_state, out_shardings=...)`)
  writes each device's block only: the compiled programs' per-device outputs are the sharded
  sizes and their temporaries stay below one unsharded copy of the parameters."""
  from bge_jax.train import state as state_lib

  model_config = config_lib.preset("tiny", add_mlm_head=True, add_decoder=True,
                                   hf_family="retromae", num_layers=1)
  mesh = sharding.make_mesh(*shape)
  abstract, logical = bert.abstract_init(model_config)
  param_sh = sharding.logical_to_sharding(logical, mesh)
  full = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  per_device = sum(
      int(np.prod(_expected_shard_shape(x.shape, s.spec, mesh))) * x.dtype.itemsize
      for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(param_sh)))
  assert per_device < full / 3

  init = jax.jit(lambda r: bert.init(model_config, r)[0], out_shardings=param_sh,
                 compiler_options=FAST_COMPILE)
  compiled = init.lower(jax.random.key(0)).compile()
  memory = compiled.memory_analysis()
  # The output is the sharded blocks plus the result tuple's table of 8-byte buffer pointers.
  n = len(jax.tree.leaves(abstract))
  assert per_device <= memory.output_size_in_bytes <= per_device + 8 * n, (
      memory.output_size_in_bytes, per_device)
  assert memory.temp_size_in_bytes < full / 2, (memory.temp_size_in_bytes, full)
  params = compiled(jax.random.key(0))
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(param_sh)):
    assert x.sharding.spec == s.spec
    assert x.addressable_shards[0].data.shape == _expected_shard_shape(x.shape, s.spec, mesh)

  tx, _ = state_lib.make_optimizer({"lr": 1e-3, "warmup_steps": 0, "clip_norm": 1.0}, 10)
  abstract_state = jax.eval_shape(lambda p: state_lib.init_state(p, tx), abstract)
  state_sh = sharding.train_state_sharding(abstract_state, param_sh, tx, mesh)
  init_state = jax.jit(lambda p: state_lib.init_state(p, tx), out_shardings=state_sh,
                       compiler_options=FAST_COMPILE)
  memory = init_state.lower(params).compile().memory_analysis()
  # params (aliased or copied) + mu + nu, each at the sharded size, plus a few scalars.
  assert memory.output_size_in_bytes <= 3 * per_device + 8 * (3 * n + 8), (
      memory.output_size_in_bytes, per_device)
  assert memory.temp_size_in_bytes < full / 2


# ---------------------------------------------------------------------------------------------
# The golden PartitionSpec table of bge-base (tests/golden/bge_base_partition_specs.json).
# ---------------------------------------------------------------------------------------------

def test_golden_partition_specs_bge_base():
  """Every bge-base parameter's PartitionSpec is the checked-in one (rules or axis names that
  change are a reviewed diff of the golden file, regenerated by `python -m tests.regen_golden`)."""
  import json

  import regen_golden
  assert regen_golden.GOLDEN.exists(), (
      f"{regen_golden.GOLDEN} is missing; create it with {regen_golden.REGEN_COMMAND}")
  want = json.loads(regen_golden.GOLDEN.read_text())
  got = regen_golden.golden_table()
  diff = regen_golden.differences(want, got)
  assert not diff, (
      f"the PartitionSpecs differ from {regen_golden.GOLDEN.name} ({len(diff)} lines):\n"
      + "\n".join(diff[:40]) + f"\nIf the change is intended, run {regen_golden.REGEN_COMMAND} "
      "from the repository root and commit the file.")
  # The file is exactly what the regeneration would write (formatting included).
  assert regen_golden.GOLDEN.read_text() == regen_golden.dumps(got)
  # Spot checks written by hand: Megatron splits over tensor, ZeRO-3 over fsdp.
  params = got["params"]
  assert params["['embeddings']['word_embeddings']['embedding']"]["mesh"] == ["tensor", "fsdp"]
  assert params["['layers_11']['query']['kernel']"]["mesh"] == ["fsdp", "tensor", None]
  assert params["['layers_11']['attention_out']['kernel']"]["mesh"] == ["tensor", None, "fsdp"]
  assert params["['layers_11']['output']['kernel']"]["mesh"] == ["tensor", "fsdp"]
  assert params["['decoder']['intermediate']['kernel']"]["shape"] == [768, 3072]
  assert sum("['layers_" in p for p in params) == 12 * 16


def test_golden_table_is_what_a_mesh_applies():
  """spec_table's mesh specs are the NamedShardings the trainer builds (logical_to_sharding)."""
  import regen_golden
  params = regen_golden.golden_table()["params"]
  config = config_lib.preset(regen_golden.PRESET, add_mlm_head=True, add_decoder=True,
                             add_pooler=True, hf_family="retromae")
  live = sharding.describe(sharding.logical_to_sharding(bert.logical_specs(config),
                                                        sharding.make_mesh(2, 2, 2)))
  assert sorted(live) == sorted(params)
  for path, entry in params.items():
    spec = P(*[tuple(a) if isinstance(a, list) else a for a in entry["mesh"]])
    assert live[path] == str(spec), (path, live[path], spec)


def test_golden_regen_reports_a_difference(tmp_path, monkeypatch, capsys):
  """`--check` exits 1 naming the changed path; a plain run rewrites the file."""
  import regen_golden
  table = regen_golden.golden_table()
  path = "['layers_3']['query']['kernel']"
  table["params"][path]["mesh"] = ["tensor", "fsdp", None]
  stale = tmp_path / "golden.json"
  stale.write_text(regen_golden.dumps(table))
  monkeypatch.setattr(regen_golden, "GOLDEN", stale)
  assert regen_golden.main(["--check"]) == 1
  out = capsys.readouterr().out
  assert f"changed {path}" in out and "differs" in out
  assert regen_golden.main([]) == 0
  assert regen_golden.main(["--check"]) == 0
  assert stale.read_text() == regen_golden.dumps(regen_golden.golden_table())


def test_dropout_masks_are_drawn_in_place_on_a_batch_sharded_mesh():
  """`bert.Dropout` on activations sharded over 8 devices: the same mask as on one device, and
  no collective in the program (each device draws its own rows' bits)."""
  from jax.sharding import NamedSharding

  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jnp.asarray(np.random.RandomState(0).randn(16, 12, 64, 63).astype(np.float32))

  def drop(x, key):
    return bert.Dropout(0.1).apply({}, x, False, rngs={"dropout": key})

  ref = jax.jit(drop)(x, jax.random.key(3))
  # The mask from JAX's own generator: 16-bit halves of `jax.random.bits` below 0.9 * 2^16.
  class Key(nn.Module):  # the key a root module's first make_rng("dropout") returns
    def __call__(self):
      return self.make_rng("dropout")

  key = Key().apply({}, rngs={"dropout": jax.random.key(3)})
  words = jax.random.bits(key, (16, 12, 64, 32), jnp.uint32)
  halves = np.asarray(words).view(np.uint16).reshape(16, 12, 64, 64)[..., :63]
  np.testing.assert_array_equal(np.asarray(ref) != 0, halves < round(0.9 * 65536))
  on_mesh = jax.jit(drop, out_shardings=NamedSharding(mesh, P("data")))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  np.testing.assert_array_equal(np.asarray(on_mesh(xs, jax.random.key(3))), np.asarray(ref))
  hlo = on_mesh.lower(xs, jax.random.key(3)).compile().as_text()
  assert not [op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute")
              if op in hlo]


def test_micro_batch_split_moves_no_data():
  """`state.split_micro_batches` on a contrastive batch sharded over 8 devices: no collective,
  and every micro-batch stays sharded over the batch axis (each device's block holds whole
  examples of every micro-batch)."""
  from jax.sharding import NamedSharding

  from bge_jax.train.state import split_micro_batches

  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  n, g = 32, 4
  batch = {"query_input_ids": np.arange(n * 8).reshape(n, 8),
           "passage_input_ids": np.arange(n * g * 16).reshape(n * g, 16),
           "in_batch_negatives": np.asarray(1)}
  shard = {k: NamedSharding(mesh, P("data") if v.ndim else P()) for k, v in batch.items()}
  split = jax.jit(lambda b: split_micro_batches(b, 2), in_shardings=(shard,))
  hlo = split.lower(batch).compile().as_text()
  assert not [op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute")
              if op in hlo]
  out = split(jax.device_put(batch, shard))
  assert out["passage_input_ids"].sharding.spec == P(None, "data")
  np.testing.assert_array_equal(np.asarray(out["passage_input_ids"]),
                                np.asarray(split_micro_batches(batch, 2)["passage_input_ids"]))
