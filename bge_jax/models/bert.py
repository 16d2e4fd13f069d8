"""BERT in Flax Linen (embeddings, post-LN layers, MLM head, pooler), named by logical axes only."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bge_jax.config import BertConfig
from bge_jax.models import flash_attention, threefry

Array = jax.Array
LP = nn.with_logical_partitioning

# BERT's initialisation: truncation-free normal(initializer_range) weights, zero biases, unit LN.
_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _normal(config: BertConfig):
  return nn.initializers.normal(stddev=config.initializer_range)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  # use_fast_variance=False: E[(x-mu)^2] like PyTorch, not E[x^2]-mu^2 (parity at 1e-5 needs it).
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
      use_fast_variance=False, name=name,
      scale_init=LP(nn.initializers.ones_init(), ("embed",)),
      bias_init=LP(nn.initializers.zeros_init(), ("embed",)))


def _repeat_rows(n: int, v: Array) -> Array:
  """v [F] repeated over n rows, written as the matmul ones[n, 1] . v[1, F] (in float32, cast
  back) so that its transpose, a bias gradient, is the vector-matrix product ones[n] . g.

  Autodiff's transpose of a broadcast is a column reduction, which XLA:CPU runs at ~0.3G
  elements/s (55 ms for the bge-small decoder's [512, 30522] logits gradient); as a GEMV it
  runs at memory speed. Used in `tied_logits`' tangent only, so forward values are unchanged.
  (The Dense layers' biases, at most 1536 wide, moved a bge-small step by -1 to +3% with it
  in same-process A/B runs: within noise, so they keep autodiff's reduction.)
  """
  return jnp.dot(jnp.ones((n, 1), v.dtype), v[None, :],
                 preferred_element_type=jnp.float32).astype(v.dtype)


class Dense(nn.Module):
  """y = x . kernel + bias, contracting the last `n_in` dims of x; kernel [*in, *features].

  Used instead of nn.DenseGeneral, whose init builds a flat 2-D kernel and reshapes it: with
  logical partitioning under a mesh, Flax's shape check re-runs that init and applies the 3-D
  sharding to the 2-D array, which fails.

  The product is one 2-D matmul, [rows, in] x [in, out], with the leading and the feature dims
  flattened (free reshapes of row-major arrays): XLA:CPU then runs the kernel gradient as one
  plain GEMM instead of a multi-dim contraction with transposes around it (bge-small stage-2
  gradient 5-8% faster on CPU; `launch/bench.py`).
  """

  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  config: BertConfig
  n_in: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    kernel = self.param("kernel", LP(_normal(c), self.kernel_axes),
                        x.shape[x.ndim - self.n_in:] + self.features, c.param_dtype)
    bias = self.param("bias", LP(nn.initializers.zeros_init(), self.kernel_axes[self.n_in:]),
                      self.features, c.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=c.dtype)
    lead, n_in = x.shape[:x.ndim - self.n_in], math.prod(kernel.shape[:self.n_in])
    y = x.reshape(-1, n_in) @ kernel.reshape(n_in, -1)
    return y.reshape(lead + self.features) + bias


def _dense(config: BertConfig, features, kernel_axes: tuple, name: str, n_in: int = 1) -> Dense:
  features = (features,) if isinstance(features, int) else tuple(features)
  return Dense(features, tuple(kernel_axes), config, n_in, name=name)


def _embed(config: BertConfig, num: int, axes: tuple, name: str) -> nn.Embed:
  return nn.Embed(num, config.hidden_size, dtype=config.dtype, param_dtype=config.param_dtype,
                  embedding_init=LP(_normal(config), axes), name=name)


def gelu(x: Array) -> Array:
  """BERT's exact GELU, x * Phi(x), written with erf: the values of
  `jax.nn.gelu(approximate=False)` within float32 rounding, whose erfc form differentiates into
  a slower XLA:CPU program (2-4% of the bge-small stage-2 step; README "Benchmarks")."""
  return x * (0.5 + 0.5 * jax.lax.erf(x * math.sqrt(0.5)))


@jax.custom_jvp
def tied_logits(x: Array, table: Array, bias: Array) -> Array:
  """`x @ table^T + bias`, x [..., E], table [V, E], bias [V]: the MLM heads' vocab projection
  on the tied word embeddings, with a JVP written so that its transpose suits XLA:CPU.

  Autodiff's VJP sums the logits gradient over its rows for the bias (a column reduction,
  see `_repeat_rows`) and, for the table, transposes that gradient before its GEMM (a 62 MB
  copy, 53 ms, for the bge-small decoder's [512, 30522]). The tangent here flattens the leading
  dims first, so the table gradient is one GEMM contracting the rows in place, and repeats the
  bias tangent by a matmul, so its gradient is a GEMV: the head's gradient 245 -> 200 ms at
  those shapes. Forward values are those of the plain expression.
  """
  return jnp.dot(x, table.T) + bias


@tied_logits.defjvp
def _tied_logits_jvp(primals, tangents):
  (x, table, bias), (dx, dtable, dbias) = primals, tangents
  out = jnp.dot(x, table.T) + bias
  x2, dx2 = x.reshape(-1, x.shape[-1]), dx.reshape(-1, x.shape[-1])
  dout = jnp.dot(dx2, table.T) + jnp.dot(x2, dtable.T) + _repeat_rows(x2.shape[0], dbias)
  return out, dout.reshape(out.shape)


class Dropout(nn.Module):
  """Inverted dropout drawing 16 random bits per element instead of `nn.Dropout`'s 32.

  Threefry makes 32-bit words, so two masks' worth come from one draw: half the generator's
  work, which is most of dropout's cost on CPU (a `[8, 12, 128, 128]` mask: 4.0 vs 8.1 ms; the
  bge-small train steps draw ~30M of them a step). The keep probability is rounded to a multiple
  of 2^-16 (rate 0.1 -> 0.1000061) and the kept values are scaled by its inverse, so the layer
  stays unbiased. Uses the "dropout" rng stream, like `nn.Dropout`.
  """

  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    threshold = flash_attention.keep_threshold(self.rate)
    if threshold >= 65536:  # a rate under 2^-17 rounds to no dropout
      return x
    if threshold == 0:
      return jnp.zeros_like(x)
    # Words over the leading dims as x has them, so a batch-sharded x draws its bits in place.
    last = x.shape[-1]
    words = threefry.bits32(self.make_rng("dropout"), x.shape[:-1] + (-(-last // 2),))
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*x.shape[:-1], -1)
    keep = halves[..., :last] < threshold
    # The scale in float32: a bf16 scale (1/0.9 -> 1.109) would bias every kept value by 0.2%.
    scaled = (x.astype(jnp.float32) * (65536 / threshold)).astype(x.dtype)
    return jnp.where(keep, scaled, jnp.zeros((), x.dtype))


def padding_mask(attention_mask: Array) -> Array:
  """[B, L] 1/0 key mask -> boolean [B, 1, 1, L], broadcastable to attention logits [B, H, Q, K]."""
  return attention_mask.astype(bool)[:, None, None, :]


def segment_mask(segment_ids: Array) -> Array:
  """[B, L] segment ids of packed rows -> boolean [B, 1, L, L]: a token sees its own segment.

  Padding (segment 0) sees only padding, so no row of the mask is empty and no real token
  sees a pad or another text.
  """
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, :, :]


def matrix_mask(attention_matrix: Array) -> Array:
  """[B, Q, K] position-specific mask (1 = row may see column) -> boolean [B, 1, Q, K]."""
  return attention_matrix.astype(bool)[:, None, :, :]


class BertEmbeddings(nn.Module):
  """word + token type + absolute position embeddings, LayerNorm, dropout."""

  config: BertConfig

  def setup(self):
    c = self.config
    self.word_embeddings = _embed(c, c.vocab_size, ("vocab", "embed"), "word_embeddings")
    self.position_embeddings = _embed(c, c.max_position_embeddings, (None, "embed"),
                                      "position_embeddings")
    self.token_type_embeddings = _embed(c, c.type_vocab_size, (None, "embed"),
                                        "token_type_embeddings")
    self.norm = _layer_norm(c, "norm")
    self.dropout = Dropout(c.hidden_dropout)

  def __call__(self, input_ids: Array | None = None, token_type_ids: Array | None = None,
               position_ids: Array | None = None, inputs_embeds: Array | None = None,
               deterministic: bool = True) -> Array:
    if inputs_embeds is None:
      inputs_embeds = self.word_embeddings(input_ids)
    batch, length = inputs_embeds.shape[:2]
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if token_type_ids is None:
      token_type_ids = jnp.zeros((batch, length), jnp.int32)
    x = inputs_embeds + self.token_type_embeddings(token_type_ids)
    x = x + self.position_embeddings(position_ids)
    x = self.dropout(self.norm(x), deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def attend(self, x: Array, bias: Array) -> Array:
    """x @ word_embeddings^T + bias: the tied MLM output projection (`tied_logits`)."""
    dtype = self.config.dtype
    return tied_logits(x.astype(dtype), self.word_embeddings.embedding.astype(dtype),
                       bias.astype(dtype))


class BertLayer(nn.Module):
  """One post-LN transformer layer; queries from `hq`, keys/values from `hkv`.

  The encoder calls it with hq = hkv. The RetroMAE enhanced decoder is the same layer (same
  parameter names as HF's BertLayer) fed two streams: hq = the [CLS]-derived query stream,
  hkv = [cls ; Emb(x)[1:]]; the residual of the attention block comes from hq.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, hq: Array, hkv: Array, mask: Array, deterministic: bool = True,
               segments: Array | None = None) -> Array:
    """`mask` as `padding_mask`/`segment_mask`/`matrix_mask` give it; `segments` [B, L], the
    same mask as segment ids (the attention mask, or packed rows' segment ids), lets
    `attention_impl="pallas"` train with the fused dropout kernel (the decoder passes none)."""
    c = self.config
    qkv = functools.partial(_dense, c, (c.num_heads, c.head_dim), ("embed", "heads", "kv"))
    q = qkv("query")(hq)
    k = qkv("key")(hkv)
    v = qkv("value")(hkv)
    q, k, v = (nn.with_logical_constraint(t, ("batch", "length", "heads", "kv")) for t in (q, k, v))

    if deterministic or c.attention_dropout == 0.0:
      # Fused attention (cuDNN flash attention on GPU when implementation allows it).
      impl = None if c.attention_impl == "pallas" else c.attention_impl
      ctx = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    elif c.attention_impl == "pallas" and segments is not None:
      # Fused attention with dropout (a Triton kernel; Pallas's interpreter on CPU, for tests:
      # the trainer refuses this setting off GPU).
      seed = threefry.bits32(self.make_rng("dropout"), (2,))
      ctx = flash_attention.sharded(q, k, v, segments, seed, rate=c.attention_dropout,
                                    interpret=jax.default_backend() == "cpu")
    else:
      ctx = self._attention_with_dropout(q, k, v, mask)
    ctx = nn.with_logical_constraint(ctx, ("batch", "length", "heads", "kv"))

    attn = _dense(c, c.hidden_size, ("heads", "kv", "embed"), "attention_out", n_in=2)(ctx)
    attn = Dropout(c.hidden_dropout)(attn, deterministic=deterministic)
    x = _layer_norm(c, "attention_norm")(attn + hq)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    h = _dense(c, c.intermediate_size, ("embed", "mlp"), "intermediate")(x)
    h = gelu(h)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = _dense(c, c.hidden_size, ("mlp", "embed"), "output")(h)
    h = Dropout(c.hidden_dropout)(h, deterministic=deterministic)
    out = _layer_norm(c, "output_norm")(h + x)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))

  def _attention_with_dropout(self, q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Explicit softmax attention: the fused kernel has no dropout on the probabilities.

    Heads are moved next to the batch first ([B, H, L, D]), so both products and their
    gradients are batched matmuls over leading dims (bge-small stage-2 gradient ~4% faster on
    XLA:CPU than einsums over [B, L, H, D] operands).
    """
    c = self.config
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(c.head_dim).astype(q.dtype)
    logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    probs = Dropout(c.attention_dropout)(probs, deterministic=False)
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs, v), 1, 2)


def _layer_class(config: BertConfig):
  if config.remat_policy == "none":
    return BertLayer
  # Argument 4 (counting self) is `deterministic`, a Python bool.
  return nn.remat(BertLayer, policy=_REMAT_POLICIES[config.remat_policy], static_argnums=(4,))


class BertMLMHead(nn.Module):
  """BERT's transform (dense, GELU, LayerNorm); the vocab projection is the word embeddings."""

  config: BertConfig

  @nn.compact
  def __call__(self, hidden: Array, embeddings: BertEmbeddings) -> Array:
    c = self.config
    x = _dense(c, c.hidden_size, ("embed", "mlp"), "transform")(hidden)
    # Pin the activation layout: left free, XLA's SPMD partitioner (jax 0.10.2, Shardy and GSPMD)
    # miscompiles the backward of x.kernel.embeddings^T on meshes with data, fsdp and tensor > 1
    # (MLM gradients off by O(1) relative; tests/test_sharding.py checks them).
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = _layer_norm(c, "transform_norm")(gelu(x))
    bias = self.param("bias", LP(nn.initializers.zeros_init(), ("vocab",)), (c.vocab_size,),
                      c.param_dtype)
    logits = embeddings.attend(x, bias)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class BertModel(nn.Module):
  """The encoder plus the optional parts its config enables (pooler, MLM head, RetroMAE decoder).

  Methods (use with `apply(..., method=...)`): `__call__` -> last hidden state [B, L, E];
  `mlm_logits`; `pooler_output`; `decoder_layer`; `embeddings`. `init_all` touches every part,
  so `model.init(rng, ..., method=BertModel.init_all)` creates all parameters.
  """

  config: BertConfig

  def setup(self):
    c = self.config
    self.embeddings = BertEmbeddings(c)
    layer = _layer_class(c)
    self.layers = [layer(c) for _ in range(c.num_layers)]
    if c.add_pooler:
      self.pooler = _dense(c, c.hidden_size, ("embed", "mlp"), "pooler")
    if c.add_mlm_head:
      self.mlm_head = BertMLMHead(c)
    if c.add_decoder:
      self.decoder = BertLayer(c)

  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
               position_ids: Array | None = None, deterministic: bool = True,
               segment_ids: Array | None = None) -> Array:
    """Last hidden state [B, L, E]. With `segment_ids` (packed rows: several texts per row,
    see `bge_jax.data.packing`) attention stays within each segment and `attention_mask` is
    unused; pass each text's own `position_ids`."""
    h = self.embeddings(input_ids, token_type_ids, position_ids, deterministic=deterministic)
    mask = padding_mask(attention_mask) if segment_ids is None else segment_mask(segment_ids)
    segments = attention_mask if segment_ids is None else segment_ids
    for layer in self.layers:
      h = layer(h, h, mask, deterministic, segments)
    return h

  def embed(self, input_ids: Array | None = None, inputs_embeds: Array | None = None,
            deterministic: bool = True) -> Array:
    return self.embeddings(input_ids, inputs_embeds=inputs_embeds, deterministic=deterministic)

  def mlm_logits(self, hidden: Array) -> Array:
    return self.mlm_head(hidden, self.embeddings)

  def pooler_output(self, hidden: Array) -> Array:
    return jnp.tanh(self.pooler(hidden[:, 0]))

  def decoder_layer(self, hq: Array, hkv: Array, attention_matrix: Array,
                    deterministic: bool = True) -> Array:
    return self.decoder(hq, hkv, matrix_mask(attention_matrix), deterministic)

  def init_all(self, input_ids: Array, attention_mask: Array) -> Array:
    h = self(input_ids, attention_mask)
    if self.config.add_pooler:
      self.pooler_output(h)
    if self.config.add_mlm_head:
      self.mlm_logits(h)
    if self.config.add_decoder:
      length = input_ids.shape[1]
      self.decoder_layer(h, h, jnp.ones((input_ids.shape[0], length, length), jnp.int32))
    return h


def pool(hidden: Array, attention_mask: Array, pooling: str) -> Array:
  """Sentence vector from token states, in float32: [CLS] state or mean over real tokens."""
  hidden = hidden.astype(jnp.float32)
  if pooling == "cls":
    return hidden[:, 0]
  if pooling == "mean":
    m = attention_mask.astype(jnp.float32)[..., None]
    return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
  raise ValueError(f"pooling={pooling!r}; use 'cls' or 'mean'")


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||, eps), as torch.nn.functional.normalize."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def embed_sentences(params: Any, config: BertConfig, input_ids: Array, attention_mask: Array,
                    token_type_ids: Array | None = None, *, pooling: str | None = None,
                    normalize: bool | None = None, rng: Array | None = None) -> Array:
  """Pooled (and by default L2-normalised) sentence embeddings [B, E]; `rng` enables dropout."""
  pooling = config.pooling if pooling is None else pooling
  normalize = config.normalize if normalize is None else normalize
  hidden = BertModel(config).apply(
      {"params": params}, input_ids, attention_mask, token_type_ids,
      deterministic=rng is None, rngs=None if rng is None else {"dropout": rng})
  vectors = pool(hidden, attention_mask, pooling)
  return l2_normalize(vectors) if normalize else vectors


def pool_packed(hidden: Array, segment_ids: Array, position_ids: Array, pooling: str) -> Array:
  """Slot vectors [R, L // 2, E] (float32) of packed rows: hidden [R, L, E], segment_ids [R, L]
  (0 = padding, s = the row's s-th text, pooled into slot s - 1; unused slots are zero).

  A one-hot contraction within each row: no data crosses rows, so a row-sharded batch stays
  local. A text has at least 2 tokens ([CLS] ... [SEP]), so a row holds at most L // 2 texts.
  Gather the texts' slots with `text_slot` (`bge_jax.data.packing`), then normalise.
  """
  slots = hidden.shape[1] // 2
  onehot = segment_ids[:, None, :] == jnp.arange(1, slots + 1, dtype=segment_ids.dtype)[:, None]
  if pooling == "cls":
    weights = (onehot & (position_ids[:, None, :] == 0)).astype(jnp.float32)
  elif pooling == "mean":
    weights = onehot.astype(jnp.float32)
    weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1.0)
  else:
    raise ValueError(f"pooling={pooling!r}; use 'cls' or 'mean'")
  return jnp.einsum("rsl,rle->rse", weights, hidden.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def packed_slot_vectors(params: Any, config: BertConfig, input_ids: Array, segment_ids: Array,
                        position_ids: Array, *, pooling: str, rng: Array | None = None) -> Array:
  """Encoder + `pool_packed` on packed rows: un-normalised slot vectors [R, L // 2, E]."""
  hidden = BertModel(config).apply(
      {"params": params}, input_ids, None, None, position_ids, deterministic=rng is None,
      segment_ids=segment_ids, rngs=None if rng is None else {"dropout": rng})
  return pool_packed(hidden, segment_ids, position_ids, pooling)


def texts_from_slots(slots: Array, text_slot: Array, normalize: bool) -> Array:
  """[R, S, E] slot vectors -> the N texts' vectors [N, E] (L2-normalised if asked).

  Normalised after the gather: an unused (zero) slot would give norm's gradient a 0/0.
  """
  vectors = slots.reshape(-1, slots.shape[-1])[text_slot]
  return l2_normalize(vectors) if normalize else vectors


def init(config: BertConfig, rng: Array, batch: int = 1, length: int = 8) -> tuple[Any, Any]:
  """Fresh parameters: (params as a plain pytree, their logical PartitionSpecs)."""
  ids = jnp.zeros((batch, length), jnp.int32)
  variables = BertModel(config).init(rng, ids, jnp.ones_like(ids), method=BertModel.init_all)
  return nn.unbox(variables)["params"], nn.get_partition_spec(variables)["params"]


def abstract_init(config: BertConfig, batch: int = 1, length: int = 8) -> tuple[Any, Any]:
  """(ShapeDtypeStruct params, logical PartitionSpecs) without allocating anything."""
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  variables = jax.eval_shape(
      lambda r, i: BertModel(config).init(r, i, i, method=BertModel.init_all),
      jax.random.key(0), ids)
  return nn.unbox(variables)["params"], nn.get_partition_spec(variables)["params"]


def logical_specs(config: BertConfig) -> Any:
  """Logical PartitionSpecs of the params pytree for `config`."""
  return abstract_init(config)[1]
