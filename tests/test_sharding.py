"""Sharded forward / MLM logits / gradients on 8 fake CPU devices equal the single-device ones."""

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
