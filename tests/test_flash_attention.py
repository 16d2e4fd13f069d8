"""The fused attention-with-dropout kernel (`bge_jax.models.flash_attention`), run through
Pallas's interpreter on CPU, against plain jnp attention with the same dropout mask; its
wiring into the encoder against the explicit attention path; and its Triton lowering for CUDA
(what can be checked without a GPU: the kernels' speed is measured by launch/gpu_checks.sh)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bge_jax.config import BertConfig, preset
from bge_jax.models import bert
from bge_jax.models import flash_attention as fa
from bge_jax.testing.attention import check_kernel, reference_attention as reference


def inputs(batch, length, heads, head_dim, segments, seed=0):
  rng = np.random.RandomState(seed)
  q, k, v = (jnp.asarray(rng.randn(batch, length, heads, head_dim).astype(np.float32))
             for _ in range(3))
  return q, k, v, jnp.asarray(np.asarray(segments, np.int32))


# Padded rows (1 = text, 0 = pad) and packed rows (segment ids), at a length that is one block
# padded up (40 -> 64), and at one of three blocks (160 -> 192): the online softmax carries
# across key blocks.
CASES = {
    "padded-40": (40, [[1] * 30 + [0] * 10, [1] * 40]),
    "packed-40": (40, [[1] * 10 + [2] * 20 + [3] * 5 + [0] * 5, [1] * 17 + [2] * 23]),
    "packed-160": (160, [[1] * 70 + [2] * 50 + [3] * 30 + [0] * 10, [1] * 100 + [0] * 60]),
}


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_match_plain_attention_with_the_same_mask(case, rate):
  length, segments = CASES[case]
  q, k, v, seg = inputs(2, length, 3, 16, segments)
  seed = jnp.asarray([123, 456], jnp.uint32)
  text = jnp.asarray(np.asarray(segments) > 0)  # padding rows' outputs are never used
  w = jnp.asarray(np.random.RandomState(1).randn(*q.shape).astype(np.float32))

  def loss(attend, q, k, v):
    return jnp.sum(attend(q, k, v, seg, seed, rate) * w * text[:, :, None, None])

  def flash(q, k, v, seg, seed, rate):
    return fa.flash_attention(q, k, v, seg, seed, rate=rate, interpret=True)

  out = flash(q, k, v, seg, seed, rate)
  ref = reference(q, k, v, seg, seed, rate)
  np.testing.assert_allclose(np.asarray(out)[np.asarray(text)], np.asarray(ref)[np.asarray(text)],
                             atol=2e-6, rtol=0)
  got = jax.grad(lambda *a: loss(flash, *a), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", got, want):
    err = float(jnp.abs(g - r).max() / jnp.abs(r).max())
    assert err < 1e-5, (name, err)
  if rate:  # the mask is there: without it the output differs
    assert float(jnp.abs(out - reference(q, k, v, seg, seed, 0.0))[text].max()) > 0.1


def test_the_mask_keeps_the_rate_and_changes_with_seed_head_and_position():
  """16 bits per element against keep_threshold: the kept fraction is the keep probability, the
  bits are uniform, and the mask differs across seeds, batch-head matrices and positions."""
  rows = cols = jnp.arange(256)

  def bits(seed, bh):
    s = jnp.asarray(seed, jnp.uint32)
    return np.asarray(fa.dropout_bits(s[0], s[1], jnp.uint32(bh), rows, cols, 256))

  a, b, c = bits([1, 2], 0), bits([1, 3], 0), bits([1, 2], 1)
  assert a.max() < 65536
  # The kernels skip the second hash round's last xorshift: the top 16 bits are unchanged.
  pos = rows.astype(jnp.uint32)[:, None] * np.uint32(256) + cols.astype(jnp.uint32)[None, :]
  full = fa._mix32(fa._mix32(pos + np.uint32(1)) ^ (np.uint32(0) * fa._GOLDEN + np.uint32(2)))
  np.testing.assert_array_equal(a, np.asarray(full >> np.uint32(16)))
  threshold = fa.keep_threshold(0.1)
  assert threshold == 58982
  for m in (a, b, c):  # 65,536 draws each: 4 sigma is 0.005
    assert abs((m < threshold).mean() - threshold / 65536) < 0.005
    assert abs(m.mean() / 65535 - 0.5) < 0.01
  for other in (b, c):
    assert np.mean(a == other) < 0.001
  # Neighbouring rows and columns are not shifted copies of each other.
  assert np.mean(a[1:] == a[:-1]) < 0.001 and np.mean(a[:, 1:] == a[:, :-1]) < 0.001
  keep = a < threshold
  assert abs(np.corrcoef(keep[:, 1:].ravel(), keep[:, :-1].ravel())[0, 1]) < 0.02


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_the_on_device_check_reports_small_errors(dtype, tolerance):
  """`check_kernel`, which launch/gpu_bench.py runs on the GPU before timing the kernel, at
  a small shape through the interpreter: every error is small, in float32 and bfloat16."""
  errors = check_kernel(batch=2, length=96, heads=2, head_dim=16, dtype=dtype, interpret=True)
  assert set(errors) == {"out", "dq", "dk", "dv"}
  assert max(errors.values()) < tolerance, errors


def test_rate_one_drops_everything_and_bad_shapes_are_refused():
  q, k, v, seg = inputs(1, 16, 2, 16, [[1] * 16])
  seed = jnp.zeros(2, jnp.uint32)
  assert not np.any(np.asarray(fa.flash_attention(q, k, v, seg, seed, rate=1.0, interpret=True)))
  with pytest.raises(ValueError, match="head_dim 24 must be a power of two"):
    fa.flash_attention(*inputs(1, 16, 2, 24, [[1] * 16])[:3], seg, seed, rate=0.1)
  with pytest.raises(ValueError, match="segment_ids"):
    fa.flash_attention(q, k, v, seg[:, :8], seed, rate=0.1)


def _layer_outputs(attention_impl, packed, rate):
  config = preset("tiny", attention_impl=attention_impl, attention_dropout=rate, hidden_dropout=0.0)
  params, _ = bert.init(config, jax.random.key(0))
  rng = np.random.RandomState(3)
  ids = jnp.asarray(rng.randint(5, config.vocab_size, (2, 48)), jnp.int32)
  if packed:
    seg = jnp.asarray([[1] * 20 + [2] * 20 + [0] * 8, [1] * 48], jnp.int32)
    pos = jnp.asarray([list(range(20)) * 2 + [0] * 8, list(range(48))], jnp.int32)
    text = seg > 0
    kwargs = dict(segment_ids=seg, position_ids=pos)
    mask = None
  else:
    mask = jnp.asarray([[1] * 30 + [0] * 18, [1] * 48], jnp.int32)
    text, kwargs = mask > 0, {}

  w = jnp.asarray(rng.randn(2, 48, config.hidden_size).astype(np.float32))

  def loss(p):
    h = bert.BertModel(config).apply({"params": p}, ids, mask, deterministic=False,
                                     rngs={"dropout": jax.random.key(7)}, **kwargs)
    return jnp.sum(jnp.where(text[..., None], h, 0.0) * w), h

  (_, h), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return np.asarray(h)[np.asarray(text)], grads


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_the_encoder_trains_through_the_kernel_like_the_explicit_path(packed):
  """At a rate that rounds to no dropout (1e-6: keep threshold 2^16) the kernel path and the
  explicit softmax path compute the same attention: same text-token states and gradients.
  At rate 0.1 the kernel path drops probabilities (states differ from no dropout)."""
  h_kernel, g_kernel = _layer_outputs("pallas", packed, 1e-6)
  h_explicit, g_explicit = _layer_outputs(None, packed, 1e-6)
  np.testing.assert_allclose(h_kernel, h_explicit, atol=1e-5, rtol=0)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_explicit))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_kernel)[0],
                          jax.tree.leaves(g_explicit)):
    name = jax.tree_util.keystr(path)
    if name.endswith("['key']['bias']"):
      # Its true gradient is zero (softmax ignores a per-query constant): both are rounding noise.
      assert max(float(jnp.abs(a).max()), float(jnp.abs(b).max())) < 1e-7 * scale, name
      continue
    err = float(jnp.abs(a - b).max() / float(jnp.abs(b).max()))
    assert err < 1e-4, (name, err)
  h_dropped, _ = _layer_outputs("pallas", packed, 0.1)
  assert np.abs(h_dropped - h_kernel).max() > 1e-3  # 1,000x the paths' difference above


def test_sharded_kernel_draws_the_one_device_mask():
  """Under a (data 2, fsdp 2, tensor 2) mesh, `sharded` runs the kernel on each device's batch
  rows and heads, and each element draws the bits it draws on one device: values and gradients
  equal the one-device call's, with dropout on. Identical rows and heads on different shards
  still get different masks (their global indices differ)."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from bge_jax import sharding

  rng = np.random.RandomState(0)
  q, k, v, seg = inputs(4, 40, 2, 16, [[1] * 40, [1] * 25 + [0] * 15, [1] * 10 + [2] * 30,
                                       [1] * 40])
  same = jnp.asarray(np.tile(rng.randn(1, 40, 1, 16).astype(np.float32), (4, 1, 2, 1)))
  seed = jnp.asarray([5, 6], jnp.uint32)
  w = jnp.asarray(rng.randn(*q.shape).astype(np.float32))

  def value_and_grads(q, k, v, seg, attend):
    def f(q, k, v):
      return jnp.sum(attend(q, k, v, seg, seed, rate=0.1, interpret=True) * w)
    return (jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v),
            attend(q, k, v, seg, seed, rate=0.1, interpret=True))

  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  with sharding.activate(mesh):
    spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    seg_spec = NamedSharding(mesh, P(("data", "fsdp"), None))
    put = lambda *a: [jax.device_put(x, spec) for x in a]  # noqa: E731
    run = jax.jit(lambda q, k, v, s: value_and_grads(q, k, v, s, fa.sharded))
    (loss, grads), out = run(*put(q, k, v), jax.device_put(seg, seg_spec))
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor", None)
    dropped = np.asarray(jax.jit(lambda x, s: fa.sharded(x, x, x, s, seed, rate=0.1,
                                                         interpret=True))(
        *put(same), jax.device_put(jnp.ones((4, 40), jnp.int32), seg_spec)))
  (loss1, grads1), out1 = value_and_grads(q, k, v, seg, fa.flash_attention)
  np.testing.assert_allclose(np.asarray(out), np.asarray(out1), atol=1e-6)
  np.testing.assert_allclose(float(loss), float(loss1), atol=1e-4)  # a sum of ~5,000 terms
  for g, g1 in zip(grads, grads1):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g1), atol=1e-5)
  blocks = [dropped[b, :, h] for b in range(4) for h in range(2)]
  for i in range(len(blocks)):
    for j in range(i):
      assert np.abs(blocks[i] - blocks[j]).max() > 1e-3, (i, j)


@pytest.mark.parametrize("length,dtype", [(512, "bfloat16"), (32, "bfloat16"), (100, "float32")])
def test_the_kernels_lower_to_triton_for_cuda(length, dtype):
  """Forward and gradient lower for CUDA on this CPU-only install: Pallas's Triton lowering
  accepts every op, block shape and dtype (the PTX compile needs a GPU)."""
  shape = jax.ShapeDtypeStruct((2, length, 12, 64), jnp.dtype(dtype))

  def loss(q, k, v, seg, seed):
    return fa.flash_attention(q, k, v, seg, seed, rate=0.1).astype(jnp.float32).sum()

  lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(
      shape, shape, shape, jax.ShapeDtypeStruct((2, length), jnp.int32),
      jax.ShapeDtypeStruct((2,), jnp.uint32)).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dK/dV, dQ
  for name in ("bge_flash_attention_fwd", "bge_flash_attention_dkv", "bge_flash_attention_dq"):
    assert name in text


def test_config_names_the_attention_impls():
  with pytest.raises(ValueError, match="attention_impl='flash' is not one of"):
    BertConfig(attention_impl="flash")
  with pytest.raises(ValueError, match="head dim that is a power of two.*this model's is 24"):
    BertConfig(hidden_size=48, num_heads=2, attention_impl="pallas")
  assert BertConfig(attention_impl="pallas").attention_impl == "pallas"
