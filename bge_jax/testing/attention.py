"""Plain attention with the fused kernel's dropout mask (jax only): the reference that
`tests/test_flash_attention.py` (Pallas interpreter, CPU) and `launch/gpu_bench.py` (the
compiled Triton kernel, on the GPU) check `bge_jax.models.flash_attention` against."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bge_jax.models import flash_attention as fa


def reference_attention(q, k, v, segment_ids, seed, rate):
  """Softmax attention in float32 at full precision, q, k, v [B, L, H, D], segment_ids [B, L]
  (a query sees its own segment's keys), dropping the probabilities the kernel drops: the mask
  from `flash_attention.dropout_bits` over the same padded length, the same scale."""
  batch, length, heads, head_dim = q.shape
  q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(head_dim)
  s = jnp.where((segment_ids[:, :, None] == segment_ids[:, None, :])[:, None], s, -jnp.inf)
  a = jax.nn.softmax(s, axis=-1)
  threshold = min(fa.keep_threshold(rate), 65536)
  padded = fa.padded_length(length)
  pos = jnp.arange(length)
  bits = jax.vmap(jax.vmap(lambda bh: fa.dropout_bits(seed[0], seed[1], bh, pos, pos, padded)))(
      jnp.arange(batch * heads).reshape(batch, heads))
  z = jnp.where(bits < threshold, a * (65536 / threshold), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", z, v, precision="highest")


def check_kernel(batch: int = 2, length: int = 512, heads: int = 12, head_dim: int = 64,
                 rate: float = 0.1, dtype: str = "float32", interpret: bool = False,
                 seed: int = 0) -> dict[str, float]:
  """Forward and q/k/v gradients of the kernel against `reference_attention` on random inputs
  in `dtype` with packed segments and padding: the largest error of each, relative to the
  reference's largest magnitude (text rows only: padding rows' outputs are never used)."""
  rng = np.random.RandomState(seed)
  q, k, v = (jnp.asarray(rng.randn(batch, length, heads, head_dim), dtype) for _ in range(3))
  cut = [length // 3, length // 2, length - length // 8]
  row = np.concatenate([np.full(cut[0], 1), np.full(cut[1] - cut[0], 2),
                        np.full(cut[2] - cut[1], 3), np.zeros(length - cut[2])])
  segments = jnp.asarray(np.stack([row] + [np.ones(length)] * (batch - 1)), jnp.int32)
  text = segments > 0
  key = jnp.asarray(rng.randint(0, 2**31, 2), jnp.uint32)
  w = jnp.asarray(rng.randn(batch, length, heads, head_dim), jnp.float32)

  def loss(attend, q, k, v):
    out = attend(q, k, v).astype(jnp.float32)
    return jnp.sum(jnp.where(text[:, :, None, None], out * w, 0.0)), out

  kernel = lambda q, k, v: fa.flash_attention(q, k, v, segments, key, rate=rate,  # noqa: E731
                                              interpret=interpret)
  plain = lambda q, k, v: reference_attention(q, k, v, segments, key, rate)  # noqa: E731
  grad = lambda f: jax.jit(jax.grad(lambda *a: loss(f, *a), argnums=(0, 1, 2), has_aux=True))
  (gk, ok), (gr, orf) = grad(kernel)(q, k, v), grad(plain)(q, k, v)
  rel = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())  # noqa: E731
  mask = text[:, :, None, None]
  errors = {"out": rel(jnp.where(mask, ok, 0.0), jnp.where(mask, orf, 0.0))}
  errors.update({f"d{n}": rel(a.astype(jnp.float32), b.astype(jnp.float32))
                 for n, a, b in zip("qkv", gk, gr)})
  return errors
