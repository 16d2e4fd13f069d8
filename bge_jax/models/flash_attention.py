"""Fused attention with dropout on the probabilities: a Pallas (Triton) kernel for GPUs.

BERT trains with dropout on its attention probabilities (rate 0.1), and no public fused kernel
takes it: `jax.nn.dot_product_attention` has no dropout argument, and JAX's cuDNN lowering
fixes its dropout seed at trace time, so its mask would repeat every step and every layer. The
explicit path (`bert.BertLayer._attention_with_dropout`) writes the [B, H, L, L] scores and
probabilities to memory several times in the forward and backward; at bge-base shapes and 512
tokens that traffic is, by estimate, of the order of the layer's matmul time on an H100, and
the saved probabilities are most of the step's memory (`launch/bench.py gradcache
--attention-impls default,pallas`).

This kernel never materialises them. FlashAttention-2's online softmax in the forward (one
program per (batch row, head, query block), a loop over key blocks), the log-sum-exp kept for
the backward, and two backward kernels (dK/dV per key block, dQ per query block) that recompute
the probabilities block by block. The dropout mask is a counter-based hash of each element's
(row, column, batch row, head) and a 64-bit seed drawn from the "dropout" rng stream, so the
backward regenerates exactly the forward's mask and nothing mask-shaped is stored. The hash
takes global batch and head indices, so a sharded call (`sharded`, one kernel per device under
`shard_map`) draws the same mask as one device.

Math, for one head with A = softmax(S), keep mask M and keep probability p:
  Z = A * M / p,  O = Z V
  dV = Z^T dO,  dZ = dO V^T,  dA = dZ * M / p,
  dS = A * (dA - rowsum(dA * A)) = A * (dA - rowsum(dO * O)),  dQ = dS K s,  dK = dS^T Q s.

Masking is by segment ids [B, L]: a query sees the keys of its own segment. Packed rows pass
their segment ids; a padded batch passes its attention mask (1 = text, 0 = pad), so text sees
text and padding sees padding (the padding rows' outputs are never used). The mask differs from
`bert.Dropout`'s Threefry draws (another generator), not in distribution: the keep test uses 16
bits against the same threshold, and kept values are scaled by the same exact inverse.

Limits: head_dim a power of two from 16 to 256. Lengths are padded inside to a multiple of the
block (segment -1, which no text has). `interpret=True` runs the same kernels through Pallas's
interpreter, on any backend: that is how the CPU tests check them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array

# A finite "minus infinity": masked scores underflow exp to exactly 0, and a row that sees no
# key (only the padding this wrapper adds can be one) stays finite.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_GOLDEN = np.uint32(0x9E3779B9)


def keep_threshold(rate: float) -> int:
  """Dropout's keep test on 16 random bits: keep when bits < this (0..65536). The keep
  probability is this / 2^16, rate rounded to a multiple of 2^-16 (0.1 -> 0.1000061)."""
  return round((1.0 - rate) * 65536)


def _mix32(x: Array) -> Array:
  """A bijective 32-bit integer hash with full avalanche (multiply-xorshift, "lowbias32"
  constants by C. Wellons): each output bit depends on every input bit."""
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> np.uint32(15))
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def _hash_words(seed0: Array, seed1: Array, batch_head: Array, rows: Array, cols: Array,
                length: int) -> Array:
  """uint32 words [rows, cols] whose top 16 bits are the elements' dropout bits: two rounds of
  `_mix32` over (position + seed0) and then (that ^ batch-head key). The second round's last
  xorshift is left out: it does not change the top 16 bits, the only ones used."""
  u32 = jnp.uint32
  row_base = rows.astype(u32) * np.uint32(length) + seed0  # the position's row part, per row
  x = _mix32(row_base[:, None] + cols.astype(u32)[None, :])
  x = x ^ (batch_head.astype(u32) * _GOLDEN + seed1)
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> np.uint32(15))
  return x * np.uint32(0x846CA68B)


def dropout_bits(seed0: Array, seed1: Array, batch_head: Array, rows: Array, cols: Array,
                 length: int) -> Array:
  """16 random bits (as uint32 < 2^16) for attention-probability elements (rows[:, None],
  cols[None, :]) of matrix `batch_head` (b * H + h): the kernels' dropout mask (an element is
  kept when its bits are below `keep_threshold`), and the reference the tests build the same
  mask with. `length`: the padded key length (positions are row * length + col)."""
  return _hash_words(seed0, seed1, batch_head, rows, cols, length) >> np.uint32(16)


def _scores(q, k, q_seg, k_seg, scale, precision):
  s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale
  return jnp.where(q_seg[:, None] == k_seg[None, :], s, _MASK_VALUE)


def _matrix(rng_ref, b, h, total_heads):
  """The global batch-head index of program (b, h): rng_ref holds (seed0, seed1, batch offset,
  head offset), the offsets of this device's shard, so a sharded call draws the masks the
  one-device call would."""
  u32 = jnp.uint32
  return ((rng_ref[2] + b.astype(u32)) * np.uint32(total_heads) + rng_ref[3] + h.astype(u32))


def _keep(rng_ref, bh, rows, cols, length, threshold):
  # bits < threshold, on the unshifted words (threshold < 2^16 here).
  words = _hash_words(rng_ref[0], rng_ref[1], bh, rows, cols, length)
  return words < np.uint32(threshold << 16)


def _fwd_kernel(rng_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *,
                scale, threshold, block_k, total_heads, precision):
  b, h, iq = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q = q_ref[...]
  q_seg = qseg_ref[...]
  block_q, length = q.shape[0], k_ref.shape[0]
  rows = iq * block_q + jnp.arange(block_q)
  bh = _matrix(rng_ref, b, h, total_heads)

  def body(j, carry):
    acc, m, l = carry
    ks = pl.ds(j * block_k, block_k)
    s = _scores(q, k_ref[ks, :], q_seg, kseg_ref[ks], scale, precision)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    correction = jnp.exp(m - m_new)
    l = l * correction + jnp.sum(p, axis=1)  # the softmax normaliser: before dropout
    if threshold < 65536:
      cols = j * block_k + jnp.arange(block_k)
      p = jnp.where(_keep(rng_ref, bh, rows, cols, length, threshold), p, 0.0)
    v = v_ref[ks, :]
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
    return acc, m_new, l

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), _MASK_VALUE, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, length // block_k, body, init)
  o_ref[...] = (acc * ((65536 / threshold) / l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _probs_and_grad(q, k, v, do, q_seg, k_seg, lse, delta, keep, scale, threshold, precision):
  """The recomputed block: dropped probabilities Z and the score gradient dS."""
  p = jnp.exp(_scores(q, k, q_seg, k_seg, scale, precision) - lse[:, None])
  dz = plgpu.dot(do, v, trans_b=True, precision=precision)
  inv_keep = 65536 / threshold
  if keep is None:
    z, dp = p, dz
  else:
    z = jnp.where(keep, p * inv_keep, 0.0)
    dp = jnp.where(keep, dz * inv_keep, 0.0)
  return z, p * (dp - delta[:, None])


def _dkv_kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
                dk_ref, dv_ref, *, scale, threshold, block_q, total_heads, precision):
  b, h, jk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  k_seg = kseg_ref[...]
  block_k, length = k.shape[0], q_ref.shape[0]
  cols = jk * block_k + jnp.arange(block_k)
  bh = _matrix(rng_ref, b, h, total_heads)

  def body(i, carry):
    dk, dv = carry
    qs = pl.ds(i * block_q, block_q)
    q, do = q_ref[qs, :], do_ref[qs, :]
    keep = None
    if threshold < 65536:
      rows = i * block_q + jnp.arange(block_q)
      keep = _keep(rng_ref, bh, rows, cols, length, threshold)
    z, ds = _probs_and_grad(q, k, v, do, qseg_ref[qs], k_seg, lse_ref[qs], delta_ref[qs],
                            keep, scale, threshold, precision)
    dv = dv + plgpu.dot(z.astype(do.dtype), do, trans_a=True, precision=precision)
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, length // block_q, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
               dq_ref, *, scale, threshold, block_k, total_heads, precision):
  b, h, iq = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  q_seg, lse, delta = qseg_ref[...], lse_ref[...], delta_ref[...]
  block_q, length = q.shape[0], k_ref.shape[0]
  rows = iq * block_q + jnp.arange(block_q)
  bh = _matrix(rng_ref, b, h, total_heads)

  def body(j, dq):
    ks = pl.ds(j * block_k, block_k)
    k = k_ref[ks, :]
    keep = None
    if threshold < 65536:
      cols = j * block_k + jnp.arange(block_k)
      keep = _keep(rng_ref, bh, rows, cols, length, threshold)
    _, ds = _probs_and_grad(q, k, v_ref[ks, :], do, q_seg, kseg_ref[ks], lse, delta, keep,
                            scale, threshold, precision)
    return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)

  dq = jax.lax.fori_loop(0, length // block_k, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def block_size(length: int) -> int:
  """The kernels' query and key block: 64, or the next power of two (at least 16) for
  shorter sequences."""
  return max(16, min(64, 1 << max(0, length - 1).bit_length()))


def padded_length(length: int) -> int:
  """The length the kernels run at: `length` rounded up to a whole number of blocks (the hash
  numbers positions row * padded_length + col)."""
  block = block_size(length)
  return -(-length // block) * block


def _specs(length, head_dim, block):
  """BlockSpecs over the grid (batch row, head, block index) for [B, L, H, D] tensors."""
  rng = pl.BlockSpec((4,), lambda b, h, i: (0,))
  blocked = pl.BlockSpec((None, block, None, head_dim), lambda b, h, i: (b, i, h, 0))
  whole = pl.BlockSpec((None, length, None, head_dim), lambda b, h, i: (b, 0, h, 0))
  row_blocked = pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))
  row_whole = pl.BlockSpec((None, None, length), lambda b, h, i: (b, h, 0))
  seg_blocked = pl.BlockSpec((None, block), lambda b, h, i: (b, i))
  seg_whole = pl.BlockSpec((None, length), lambda b, h, i: (b, 0))
  return rng, blocked, whole, row_blocked, row_whole, seg_blocked, seg_whole


def _precision(dtype):
  # Full float32 products for float32 inputs (Triton would otherwise use TF32).
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, segment_ids, rng, threshold, total_heads, interpret):
  return _forward(q, k, v, segment_ids, rng, threshold, total_heads, interpret)[0]


def _forward(q, k, v, segment_ids, rng, threshold, total_heads, interpret):
  batch, length, heads, head_dim = q.shape
  block = block_size(length)
  rng_s, blocked, whole, row_blocked, _, seg_blocked, seg_whole = _specs(length, head_dim, block)
  kernel = functools.partial(_fwd_kernel, scale=1 / math.sqrt(head_dim), threshold=threshold,
                             block_k=block, total_heads=total_heads, precision=_precision(q.dtype))
  o, lse = pl.pallas_call(
      kernel, grid=(batch, heads, length // block),
      in_specs=[rng_s, blocked, whole, whole, seg_blocked, seg_whole],
      out_specs=[blocked, row_blocked],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name="bge_flash_attention_fwd",
  )(rng, q, k, v, segment_ids, segment_ids)
  return o, lse


def _flash_fwd(q, k, v, segment_ids, rng, threshold, total_heads, interpret):
  o, lse = _forward(q, k, v, segment_ids, rng, threshold, total_heads, interpret)
  return o, (q, k, v, segment_ids, rng, o, lse)


def _flash_bwd(threshold, total_heads, interpret, residuals, do):
  q, k, v, segment_ids, rng, o, lse = residuals
  batch, length, heads, head_dim = q.shape
  block = block_size(length)
  rng_s, blocked, whole, row_blocked, row_whole, seg_blocked, seg_whole = _specs(
      length, head_dim, block)
  # rowsum(dO * O) per query: [B, H, L], float32.
  delta = jnp.einsum("blhd,blhd->bhl", do.astype(jnp.float32), o.astype(jnp.float32))
  common = dict(scale=1 / math.sqrt(head_dim), threshold=threshold, total_heads=total_heads,
                precision=_precision(q.dtype))
  params = plgpu.CompilerParams(num_warps=4, num_stages=2)
  grid = (batch, heads, length // block)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=block, **common), grid=grid,
      in_specs=[rng_s, whole, blocked, blocked, whole, row_whole, row_whole, seg_whole,
                seg_blocked],
      out_specs=[blocked, blocked],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=interpret, name="bge_flash_attention_dkv",
  )(rng, q, k, v, do, lse, delta, segment_ids, segment_ids)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_k=block, **common), grid=grid,
      in_specs=[rng_s, blocked, whole, whole, blocked, row_blocked, row_blocked, seg_blocked,
                seg_whole],
      out_specs=blocked,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=interpret, name="bge_flash_attention_dq",
  )(rng, q, k, v, do, lse, delta, segment_ids, segment_ids)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: Array, k: Array, v: Array, segment_ids: Array, seed: Array, *,
                    rate: float, interpret: bool = False, batch_offset: Array | int = 0,
                    head_offset: Array | int = 0, total_heads: int | None = None) -> Array:
  """Attention with dropout `rate` on the probabilities, fused: q, k, v [B, L, H, D] (one
  length for queries and keys), segment_ids [B, L] int (a query sees its own segment's keys),
  seed uint32[2] (a fresh draw per call). Returns [B, L, H, D] in q's dtype.

  Local to one device; `sharded` runs it under a mesh, passing where this device's block sits
  in the global array (`batch_offset`, `head_offset`, `total_heads`: the global head count) so
  that each element draws the mask bits it would draw on one device."""
  batch, length, heads, head_dim = q.shape
  if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
    raise ValueError(f"flash_attention: head_dim {head_dim} must be a power of two from 16 to "
                     "256 (Triton blocks); use model.attention_impl=None for this model")
  if k.shape != q.shape or v.shape != q.shape or segment_ids.shape != (batch, length):
    raise ValueError(f"flash_attention: q {q.shape}, k {k.shape}, v {v.shape} and segment_ids "
                     f"{segment_ids.shape} must be [B, L, H, D] x3 and [B, L]")
  threshold = keep_threshold(rate)
  if threshold == 0:
    return jnp.zeros_like(q)
  threshold = min(threshold, 65536)
  padded = padded_length(length)
  segment_ids = segment_ids.astype(jnp.int32)
  if padded != length:  # padding keys and queries form their own segment (-1)
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - length)), constant_values=-1)
  seed = jnp.asarray(seed).astype(jnp.uint32)
  rng = jnp.stack([seed[0], seed[1], jnp.asarray(batch_offset).astype(jnp.uint32),
                   jnp.asarray(head_offset).astype(jnp.uint32)])
  out = _flash(q, k, v, segment_ids, rng, threshold, total_heads or heads, interpret)
  return out[:, :length]


def sharded(q: Array, k: Array, v: Array, segment_ids: Array, seed: Array, *, rate: float,
            interpret: bool = False) -> Array:
  """`flash_attention` under the active mesh (`jax.set_mesh`) and logical axis rules: each
  device runs the kernel on its block of batch rows and heads, drawing the same mask as the
  one-device call (no communication). Without a mesh (or on one device) it is
  `flash_attention` itself."""
  import flax.linen as nn  # local: this module needs flax only for its sharding rules

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return flash_attention(q, k, v, segment_ids, seed, rate=rate, interpret=interpret)
  spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
  seg_spec = jax.sharding.PartitionSpec(spec[0], None)
  total_heads = q.shape[2]

  def shard_index(part) -> Array:
    """This device's index along a dim split over `part` (mesh axes, the first major)."""
    index = jnp.int32(0)
    for a in () if part is None else (part,) if isinstance(part, str) else part:
      index = index * mesh.shape[a] + jax.lax.axis_index(a)
    return index

  def local(q, k, v, segment_ids, seed):
    return flash_attention(q, k, v, segment_ids, seed, rate=rate, interpret=interpret,
                           batch_offset=shard_index(spec[0]) * q.shape[0],
                           head_offset=shard_index(spec[2]) * q.shape[2],
                           total_heads=total_heads)

  return jax.shard_map(local, in_specs=(spec, spec, spec, seg_spec, jax.sharding.PartitionSpec()),
                       out_specs=spec, check_vma=False)(q, k, v, segment_ids, seed)
