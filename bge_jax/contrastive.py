"""Stages 2-3, contrastive fine-tuning: the InfoNCE loss (public API), GradCache, trainer wiring.

In-batch negatives are taken over the **global** batch: under `jit` with the batch sharded over
the data axis, `q @ p.T` is one sharded matmul (XLA gathers the passages), so every query scores
every passage of every device and the gradient flows through all of them — FlagEmbedding's
cross-device negatives, minus its no-grad restriction on remote shards.

GradCache (`chunk_size > 0`): embeddings are computed by `lax.map` over chunks of the batch under
`jax.checkpoint`; autodiff then recomputes one chunk at a time in the backward pass, so peak
activation memory is one chunk's, whatever the batch size, and the gradient is exact.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bge_jax.config import BertConfig
from bge_jax.data import packing
from bge_jax.models.bert import (embed_sentences, l2_normalize, packed_slot_vectors,
                                 texts_from_slots)

log = logging.getLogger(__name__)

PACK_CALIBRATION_STEPS = 16  # batches read to size packed rows when data.pack_rows_fraction = 0

BATCH_KEYS = ("query_input_ids", "query_attention_mask", "passage_input_ids",
              "passage_attention_mask")


def check_truncate_dim(dim: Any, hidden_size: int, name: str = "truncate_dim") -> int:
  """`dim` as an int in [1, hidden_size], else a ValueError naming `name` (an argument or a
  config key) and the allowed range."""
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 0 < dim <= hidden_size:
    raise ValueError(f"{name}={dim!r}: it must be an integer from 1 to the model's hidden size "
                     f"{hidden_size} (a number of leading embedding dimensions to keep).")
  return int(dim)


def truncate_embeddings(x: jax.Array, dim: int, normalize: bool) -> jax.Array:
  """Matryoshka truncation: the first `dim` features of x [..., D], L2-re-normalised when
  `normalize` (sentence-transformers' `shrink`, FlagEmbedding's MRL). Truncating normalised or
  raw vectors gives the same result when re-normalised: the norm is a positive per-row scale."""
  x = x[..., :dim]
  return l2_normalize(x) if normalize else x


def split_strided(x: jax.Array, parts: int) -> jax.Array:
  """[N, ...] -> [parts, N // parts, ...] with part i = rows i, i + parts, i + 2 parts, ...

  For a batch sharded in contiguous blocks over devices, every device's block holds rows of
  every part, so iterating over parts moves no data between devices.
  """
  return jnp.swapaxes(x.reshape((x.shape[0] // parts, parts) + x.shape[1:]), 0, 1)


def merge_strided(x: jax.Array) -> jax.Array:
  """Inverse of `split_strided`: [parts, M, ...] -> [parts * M, ...]."""
  return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _gradcache_parts(n: int, chunk_size: int, unit: str) -> int:
  """The number of GradCache parts for n rows/texts: 0 when not chunked."""
  if not chunk_size or chunk_size >= n:
    return 0
  if n % chunk_size:
    raise ValueError(f"GradCache: {n} {unit} are not divisible by loss.gradcache_chunk="
                     f"{chunk_size}; choose a chunk size that divides the per-step query and "
                     "passage counts.")
  return n // chunk_size


def _remat_map(fn, arrays: tuple, parts: int, rng: jax.Array | None) -> jax.Array:
  """fn(*part_arrays, key) over `parts` strided parts of the arrays, each under
  jax.checkpoint (autodiff recomputes one part at a time); the outputs merged back in order."""
  body = jax.checkpoint(fn if rng is not None else (lambda *a: fn(*a[:-1], None)))
  keys = (jax.random.split(rng, parts) if rng is not None else jnp.zeros((parts,), jnp.uint32))
  split = tuple(split_strided(x, parts) for x in arrays)
  return merge_strided(jax.lax.map(lambda args: body(*args), split + (keys,)))


def embed(params: Any, config: BertConfig, input_ids: jax.Array, attention_mask: jax.Array, *,
          pooling: str, normalize: bool, rng: jax.Array | None = None,
          chunk_size: int = 0) -> jax.Array:
  """Sentence embeddings [N, D] in float32; chunked with rematerialisation when chunk_size > 0."""
  def one(ids, mask, key):
    return embed_sentences(params, config, ids, mask, pooling=pooling, normalize=normalize, rng=key)

  parts = _gradcache_parts(input_ids.shape[0], chunk_size, "rows")
  if not parts:
    return one(input_ids, attention_mask, rng)
  return _remat_map(one, (input_ids, attention_mask), parts, rng)


def embed_packed(params: Any, config: BertConfig, input_ids: jax.Array, segment_ids: jax.Array,
                 position_ids: jax.Array, text_slot: jax.Array, *, pooling: str, normalize: bool,
                 rng: jax.Array | None = None, chunk_size: int = 0) -> jax.Array:
  """`embed` of packed rows (`bge_jax.data.packing`): the N texts' embeddings [N, D], float32.

  With chunk_size > 0 (GradCache) the R packed rows run in N // chunk_size strided parts, the
  number of parts the padded batch would use, so R must be a multiple of it.
  """
  def one(ids, seg, pos, key):
    return packed_slot_vectors(params, config, ids, seg, pos, pooling=pooling, rng=key)

  n, rows = text_slot.shape[0], input_ids.shape[0]
  parts = _gradcache_parts(n, chunk_size, "texts")
  if not parts:
    slots = one(input_ids, segment_ids, position_ids, rng)
  elif rows % parts:
    raise ValueError(f"GradCache on packed rows: {rows} rows do not split into {parts} parts "
                     f"({n} texts / loss.gradcache_chunk={chunk_size}); the packer rounds the "
                     "rows up to a multiple of the parts (bge_jax.data.packing.rows_for)")
  else:
    slots = _remat_map(one, (input_ids, segment_ids, position_ids), parts, rng)
  return texts_from_slots(slots, text_slot, normalize)


def _side_embeddings(params, config, batch, side: str, rng, **kw) -> jax.Array:
  if packing.is_packed(batch, side):
    return embed_packed(params, config, *(batch[f"{side}_{k}"] for k in packing.PACKED_SUFFIXES),
                        rng=rng, **kw)
  return embed(params, config, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"],
               rng=rng, **kw)


DISTILL_TYPES = ("kl_div", "m3_kd_loss")
# A masked logit (FlagEmbedding's): exp(MASKED - max) is exactly 0, and unlike -inf it keeps
# log-sum-exps and their gradients finite when every entry of a row is masked.
MASKED = float(np.finfo(np.float32).min)


def duplicate_positives(passage_hash: jax.Array, group_size: int) -> jax.Array:
  """[B, B*G] bool: passage j carries the same text hash as query i's positive (passage i*G),
  j != i*G. passage_hash: [B*G, K] ints (e.g. K=2: 64 bits of a hash of the passage text)."""
  n = passage_hash.shape[0]
  b = n // group_size
  same = (passage_hash[None, :, :] == passage_hash[::group_size][:, None, :]).all(-1)
  return same & (jnp.arange(n)[None, :] != (jnp.arange(b) * group_size)[:, None])


def _group_cross_entropies(group_scores: jax.Array, outside: jax.Array, dup_group: jax.Array,
                           targets: int) -> jax.Array:
  """[B, targets]: for k < targets, the cross-entropy of query i's scores with target passage k
  of its group, where the group's passages before k are masked (FlagEmbedding's m3_kd_loss; for
  k = 0 nothing is), duplicates of the positive are masked except at k, and `outside` [B] adds
  the log-sum-exp of the scores outside the group (in-batch negatives; MASKED for none).

  Splitting the global row into its group and the rest keeps every step [B, G] after one
  log-sum-exp over [B, B*G]: the same value as masking the full row, at none of its cost.
  """
  g = group_scores.shape[1]
  k = jnp.arange(targets)[:, None]
  j = jnp.arange(g)[None, :]
  keep = (j >= k) & ((j == k) | ~dup_group[:, None, :])                       # [B, T, G]
  inside = jax.nn.logsumexp(jnp.where(keep, group_scores[:, None, :], MASKED), axis=-1)
  return jnp.logaddexp(outside[:, None], inside) - group_scores[:, :targets]


def info_nce(q: jax.Array, p: jax.Array, *, temperature: float, group_size: int,
             in_batch_negatives: bool | jax.Array = True,
             teacher_scores: jax.Array | None = None, distill: str = "kl_div",
             passage_hash: jax.Array | None = None) -> dict[str, jax.Array]:
  """The loss on embeddings: q [B, D], p [B*G, D] laid out [pos, neg_1..neg_{G-1}] per query.

  Scores s = q p^T / temperature. Contrastive term (`contrastive_loss`): with in-batch negatives
  query i's cross-entropy over all B*G passages (target i*G); without, over its own group
  (target 0). `in_batch_negatives` may be a traced boolean (a per-batch flag from the data).

  Distillation, with teacher_scores [B, G] (FlagEmbedding's `kd_loss_type`; the teacher's
  targets are softmax(teacher_scores), no temperature, as FlagEmbedding):
    distill="kl_div": loss = contrastive_loss + distill_loss, where distill_loss =
      -mean_i sum_g softmax(teacher_i)_g log_softmax(s_i over its group)_g.
    distill="m3_kd_loss": loss = distill_loss = sum_k mean_i softmax(teacher_i)_k CE_k(i), where
      CE_k is the contrastive cross-entropy with target passage k of the group and the group's
      passages before k masked (over the group only without in-batch negatives; FlagEmbedding
      only defines the in-batch form: its group form indexes past the [B, G] scores).
  FlagEmbedding computes the in-batch (cross-device) contrastive term over the global batch and
  the kl_div term over each device's queries; their sum is this loss, averaged the same way.

  passage_hash [B*G, K] (false-negative control): a passage whose hash equals query i's
  positive's is not scored as i's negative (its logit masked in the contrastive cross-entropy
  and in m3_kd_loss, except where it is the target); the teacher's kl_div term is unmasked.
  """
  b = q.shape[0]
  if p.shape[0] != b * group_size:
    raise ValueError(f"{p.shape[0]} passages for {b} queries x group_size={group_size}; the "
                     "passage batch must be [queries * group_size, L].")
  if distill not in DISTILL_TYPES:
    raise ValueError(f"distill={distill!r}; use one of {DISTILL_TYPES} (FlagEmbedding's "
                     "kd_loss_type)")
  hp = jax.lax.Precision.HIGHEST
  n, g = b * group_size, group_size
  all_scores = jnp.einsum("qd,pd->qp", q, p, precision=hp) / temperature          # [B, B*G]
  group_scores = jnp.einsum("qd,qgd->qg", q, p.reshape(b, g, -1), precision=hp) / temperature
  own_group = jnp.arange(n)[None, :] // g == jnp.arange(b)[:, None]              # [B, B*G]
  if passage_hash is None:
    dup = jnp.zeros((b, n), bool)
  else:
    if passage_hash.shape[0] != n:
      raise ValueError(f"passage_hash has {passage_hash.shape[0]} rows for {n} passages")
    dup = duplicate_positives(passage_hash, g)
  dup_group = jnp.take_along_axis(dup, jnp.arange(b)[:, None] * g + jnp.arange(g), axis=1)
  flag = jnp.asarray(in_batch_negatives, bool)
  outside = jax.nn.logsumexp(jnp.where(own_group | dup, MASKED, all_scores), axis=-1)
  outside = jnp.where(flag, outside, MASKED)
  m3 = teacher_scores is not None and distill == "m3_kd_loss"
  ce = _group_cross_entropies(group_scores, outside, dup_group, g if m3 else 1)  # [B, 1 or G]

  acc_in_batch = jnp.where(dup, MASKED, all_scores).argmax(-1) == jnp.arange(b) * g
  acc_group = jnp.where(dup_group, MASKED, group_scores).argmax(-1) == 0
  out = {"accuracy": jnp.where(flag, acc_in_batch, acc_group).mean(),
         "positive_score": group_scores[:, 0].mean() * temperature,
         "negative_score": (group_scores[:, 1:].mean() * temperature if g > 1
                            else jnp.zeros(())),
         "contrastive_loss": ce[:, 0].mean()}
  if teacher_scores is None:
    out["loss"] = out["contrastive_loss"]
    return out
  targets = jax.nn.softmax(jnp.asarray(teacher_scores, jnp.float32), axis=-1)    # [B, G]
  if m3:
    out["distill_loss"] = (targets * ce).mean(0).sum()
    out["loss"] = out["distill_loss"]
  else:
    out["distill_loss"] = -(targets * jax.nn.log_softmax(group_scores, axis=-1)).sum(-1).mean()
    out["loss"] = out["contrastive_loss"] + out["distill_loss"]
  return out


def check_matryoshka(dims: Sequence[Any], weights: Sequence[Any], hidden_size: int,
                     prefix: str = "loss.") -> tuple[tuple[int, ...], tuple[float, ...]]:
  """(dims, weights) checked, largest dim first (sentence-transformers sorts so); empty weights
  = 1 each. Errors name the config keys `{prefix}matryoshka_dims` / `_weights`."""
  dims, weights = tuple(dims or ()), tuple(weights or ())
  for d in dims:
    check_truncate_dim(d, hidden_size, f"{prefix}matryoshka_dims entry")
  if len(set(dims)) != len(dims):
    raise ValueError(f"{prefix}matryoshka_dims={dims} repeats a dimension; list each once")
  if not weights:
    weights = (1.0,) * len(dims)
  if len(weights) != len(dims):
    raise ValueError(f"{prefix}matryoshka_weights={weights} has {len(weights)} entries for "
                     f"{len(dims)} {prefix}matryoshka_dims={dims}; give one per dimension "
                     "(or none: 1 each)")
  for w in weights:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
      raise ValueError(f"{prefix}matryoshka_weights={weights}: weights must be finite numbers "
                       ">= 0")
  order = sorted(range(len(dims)), key=lambda i: -dims[i])
  return tuple(int(dims[i]) for i in order), tuple(float(weights[i]) for i in order)


def embedding_loss(q: jax.Array, p: jax.Array, *, normalize: bool = True,
                   matryoshka_dims: Sequence[int] = (), matryoshka_weights: Sequence[float] = (),
                   **info_nce_kw: Any) -> dict[str, jax.Array]:
  """`info_nce` on full embeddings, or the Matryoshka loss (sentence-transformers'
  MatryoshkaLoss): sum_d w_d info_nce(q[:, :d], p[:, :d]) with each cut re-normalised when
  `normalize` (`truncate_embeddings`). Only the listed dims count: list the full dimension to
  train it too. `loss`, `contrastive_loss` and `distill_loss` are the weighted sums, `loss/dim_{d}`
  each dim's loss; accuracy and scores are the largest dim's.
  """
  if not matryoshka_dims:
    return info_nce(q, p, **info_nce_kw)
  weights = tuple(matryoshka_weights) or (1.0,) * len(matryoshka_dims)
  outs = [(d, w, info_nce(truncate_embeddings(q, d, normalize),
                          truncate_embeddings(p, d, normalize), **info_nce_kw))
          for d, w in sorted(zip(matryoshka_dims, weights), key=lambda dw: -dw[0])]
  out = dict(outs[0][2])
  for key in ("loss", "contrastive_loss", "distill_loss"):
    if key in out:
      out[key] = sum(w * o[key] for _, w, o in outs)
  out.update({f"loss/dim_{d}": o["loss"] for d, _, o in outs})
  return out


def loss(params: Any, config: BertConfig, batch: Mapping[str, Any], *, temperature: float,
         group_size: int, pooling: str = "cls", normalize: bool = True,
         in_batch_negatives: bool | jax.Array = True, rng: jax.Array | None = None,
         chunk_size: int = 0, use_teacher_scores: bool = True, distill: str = "kl_div",
         matryoshka_dims: Sequence[int] = (), matryoshka_weights: Sequence[float] = (),
         mask_duplicate_positives: bool = False) -> dict[str, jax.Array]:
  """Contrastive loss of queries against their groups of passages (and the whole batch's).

  batch: query_input_ids, query_attention_mask [B, Lq]; passage_input_ids,
  passage_attention_mask [B*G, Lp]; optional teacher_scores [B, G] (distillation, the form
  `distill`: "kl_div" | "m3_kd_loss", see `info_nce`), in_batch_negatives (a scalar flag: 0 for
  a dataset scored within its groups) and passage_hash [B*G, K] (used with
  mask_duplicate_positives=True: a passage with the text of a query's positive is not its
  negative). A query is scored against the whole batch's passages only where both the argument
  and the batch's flag allow it (`loss.in_batch_negatives=False` turns them off for every
  batch). Embeddings are pooled (`cls` | `mean`) and L2-normalised; without normalisation the
  temperature is 1 (as FlagEmbedding). rng=None: no dropout. chunk_size > 0: GradCache (see
  module docstring); the loss then runs on the cached full-width embeddings, so Matryoshka
  (`matryoshka_dims`, `embedding_loss`) and every other option compose with it. A side given as
  packed rows (`bge_jax.data.packing.pack_sides`) is embedded packed.
  """
  for side in ("query", "passage"):
    keys = ([f"{side}_{k}" for k in packing.PACKED_SUFFIXES] if packing.is_packed(batch, side)
            else [k for k in BATCH_KEYS if k.startswith(side)])
    missing = [k for k in keys if k not in batch]
    if missing:
      raise KeyError(f"contrastive batch is missing {missing}; expected keys {list(BATCH_KEYS)} "
                     f"(or, packed, {side}_{{{','.join(packing.PACKED_SUFFIXES)}}})")
  if mask_duplicate_positives and "passage_hash" not in batch:
    raise KeyError("mask_duplicate_positives=True needs the batch's passage_hash [B*G, K] "
                   "(ContrastiveBatcher adds it with mask_duplicate_positives=True)")
  if not normalize and temperature != 1.0:
    log.warning("normalize=False: using temperature 1.0 instead of %s (unnormalised dot "
                "products are not scaled, as in FlagEmbedding)", temperature)
    temperature = 1.0
  q_rng, p_rng = (None, None) if rng is None else tuple(jax.random.split(rng))
  kw = dict(pooling=pooling, normalize=normalize, chunk_size=chunk_size)
  q = _side_embeddings(params, config, batch, "query", q_rng, **kw)
  p = _side_embeddings(params, config, batch, "passage", p_rng, **kw)
  flag = jnp.logical_and(jnp.asarray(in_batch_negatives, bool),
                         jnp.asarray(batch.get("in_batch_negatives", True), bool))
  teacher = batch.get("teacher_scores") if use_teacher_scores else None
  return embedding_loss(
      q, p, normalize=normalize, matryoshka_dims=matryoshka_dims,
      matryoshka_weights=matryoshka_weights, temperature=temperature, group_size=group_size,
      in_batch_negatives=flag, teacher_scores=teacher, distill=distill,
      passage_hash=batch["passage_hash"] if mask_duplicate_positives else None)


# ---------------------------------------------------------------------------------------------
# Stage wiring for the trainer (stage 2 "contrastive" and stage 3 "finetune" share it).
# ---------------------------------------------------------------------------------------------

def max_over_processes(need: Mapping[str, int], process_count: int) -> dict[str, int]:
  """The element-wise max of every process's `need` ({side: rows}), so that all processes pack
  to the same rows (a host all-gather; `need` itself on one process)."""
  if process_count == 1:
    return dict(need)
  if jax.process_count() != process_count:
    raise ValueError(f"sizing packed rows for {process_count} processes needs them running "
                     f"(jax.process_count() is {jax.process_count()}); pass "
                     "config.data.pack_rows_fraction instead")
  from jax.experimental import multihost_utils

  sides = list(need)  # the same order on every process: the same code built it
  every = multihost_utils.process_allgather(np.array([need[s] for s in sides], np.int64))
  return {s: int(v) for s, v in zip(sides, np.max(np.reshape(every, (-1, len(sides))), axis=0))}


def packed_rows(config, process_count: int, devices_per_process: int,
                measure: Callable[[], Mapping[str, int]] | None = None,
                ) -> tuple[dict[str, int], int]:
  """(rows per process of each packed side, the multiple they are rounded to).

  The rows are data.pack_rows_fraction of the texts; with data.pack_rows_fraction = 0, the most
  rows any process needs over the first PACK_CALIBRATION_STEPS batches (`measure()`) plus 5%, or
  without `measure` (no data) all of them. Rounded up to a multiple of the process's devices and
  of the GradCache parts.
  """
  d = config.data
  if config.get("grad_accum_steps", 1) > 1:
    raise ValueError(f"config.data.pack=True with config.grad_accum_steps="
                     f"{config.grad_accum_steps}: packed rows do not split into micro-batches; "
                     "use loss.gradcache_chunk for memory instead, or data.pack=False.")
  fraction = float(d.get("pack_rows_fraction", 0.0))
  need = measure() if fraction == 0.0 and measure is not None else None
  fraction = fraction or 1.0
  local_batch = config.batch_size // process_count
  local = {"query": local_batch, "passage": local_batch * d.group_size}
  chunk = config.loss.gradcache_chunk
  rows, multiples = {}, set()
  for side, n in local.items():
    total = n * process_count
    parts = total // chunk if 0 < chunk < total else 1
    multiple = math.lcm(devices_per_process, parts)
    multiples.add(multiple)
    if need is not None:
      fraction = min(1.0, (need[side] + max(1, math.ceil(0.05 * need[side]))) / n)
    rows[side] = packing.rows_for(n, fraction, multiple)
  log.info("data.pack: %s packed rows per process for %s texts (%s)", rows, local,
           f"needed at most {need} over the first {PACK_CALIBRATION_STEPS} batches"
           + (f" of {process_count} processes" if process_count > 1 else "")
           if need is not None else f"pack_rows_fraction={fraction}")
  return rows, math.lcm(*multiples)


def _batch_shards(config) -> int:
  """What every global batch size must be divisible by: the devices a batch is split over (mesh
  data x fsdp) times grad_accum_steps (as loop.py checks config.batch_size)."""
  m = config.mesh
  shards = m.data * m.fsdp if m.data > 0 else jax.device_count() // m.tensor
  return shards * config.get("grad_accum_steps", 1)


class ContrastiveStage:
  """Stage 2 (unlabeled pairs, in-batch negatives) and stage 3 (hard negatives, instructions)."""

  def __init__(self, name: str):
    self.name = name

  def model_config(self, base: BertConfig, config) -> BertConfig:
    return base.replace(add_mlm_head=False, add_decoder=False, hf_family="bert",
                        pooling=config.loss.pooling, normalize=config.loss.normalize)

  def loss_fn(self, config, model_config):
    l, d = config.loss, config.data
    distill = l.get("distill_type", "kl_div")
    if distill not in DISTILL_TYPES:
      raise ValueError(f"config.loss.distill_type={distill!r}; use one of {DISTILL_TYPES} "
                       "(FlagEmbedding's --kd_loss_type)")
    dims, weights = check_matryoshka(l.get("matryoshka_dims", ()), l.get("matryoshka_weights", ()),
                                     model_config.hidden_size, prefix="config.loss.")
    if dims and model_config.hidden_size not in dims:
      log.warning("config.loss.matryoshka_dims=%s leaves out the full dimension %d: the full "
                  "embeddings are not trained (as sentence-transformers warns); add %d to train "
                  "them too", list(dims), model_config.hidden_size, model_config.hidden_size)
    kw = dict(temperature=l.temperature, group_size=d.group_size, pooling=l.pooling,
              normalize=l.normalize, in_batch_negatives=l.in_batch_negatives,
              chunk_size=l.gradcache_chunk, use_teacher_scores=d.use_teacher_scores,
              distill=distill, matryoshka_dims=dims, matryoshka_weights=weights,
              mask_duplicate_positives=l.get("mask_duplicate_positives", False))
    return lambda params, batch, rng: loss(params, model_config, batch, rng=rng, **kw)

  @staticmethod
  def _check_lengths(config, model_config) -> None:
    for key in ("query_max_length", "passage_max_length"):
      if config.data[key] > model_config.max_position_embeddings:
        raise ValueError(f"config.data.{key}={config.data[key]} exceeds the model's "
                         f"max_position_embeddings={model_config.max_position_embeddings}.")

  def batcher(self, config, tokenizer, model_config, process_index, process_count):
    from bge_jax.data import holdout, small_datasets
    from bge_jax.data.pairs import (ContrastiveBatcher, mixing_options, open_contrastive_data,
                                    use_packing)

    d = config.data
    specs = [s.strip() for s in d.train.split(",") if s.strip()]
    if not specs:
      raise ValueError("config.data.train is empty: give FlagEmbedding JSONL files (query, pos, "
                       "neg), pair JSONL/TSV files, folders or globs, comma-separated; each "
                       "spec is one dataset (a batch is drawn from one dataset).")
    self._check_lengths(config, model_config)
    datasets = [(spec, open_contrastive_data(spec, kind=d.kind, on_error=d.on_error))
                for spec in specs]
    no_in_batch = [s.strip() for s in d.no_in_batch_datasets.split(",") if s.strip()]
    mixing = mixing_options(d, config.batch_size, process_count, _batch_shards(config),
                            len(datasets))
    # data.small_threshold / drop_threshold: FlagEmbedding's merging of a folder's small datasets.
    merged = small_datasets.merge_small_datasets(
        datasets, small_threshold=d.get("small_threshold", 0),
        drop_threshold=d.get("drop_threshold", 0), batch_sizes=mixing["batch_sizes"],
        weights=mixing["weights"], no_in_batch_datasets=no_in_batch)
    datasets = merged.datasets
    mixing.update(batch_sizes=merged.batch_sizes, weights=merged.weights)
    # data.validation_fraction: rows of each dataset held out, never trained on.
    splits = [(spec, holdout.split(src, d, spec)) for spec, src in datasets]
    datasets = [(spec, train) for spec, (train, _) in splits]
    held = [(spec, rows) for spec, (_, rows) in splits if rows is not None]
    if d.get("validation", ""):
      held = [(spec.strip(), open_contrastive_data(spec.strip(), kind=d.kind, on_error=d.on_error))
              for spec in d.validation.split(",") if spec.strip()]
    if not config.loss.in_batch_negatives and d.group_size == 1:
      raise ValueError("config.loss.in_batch_negatives=False with config.data.group_size=1 "
                       "leaves each query its positive alone: the loss is 0 and nothing trains. "
                       "Raise config.data.group_size (hard negatives) or set "
                       "config.loss.in_batch_negatives=True.")
    batcher = ContrastiveBatcher(
        datasets, tokenizer, batch_size=config.batch_size // process_count,
        group_size=d.group_size, query_max_length=d.query_max_length,
        passage_max_length=d.passage_max_length, query_instruction=d.query_instruction or None,
        passage_instruction=d.passage_instruction or None, seed=config.seed,
        process_index=process_index, process_count=process_count,
        no_in_batch_datasets=merged.no_in_batch_datasets,
        use_teacher_scores=d.use_teacher_scores,
        passage_hash=config.loss.get("mask_duplicate_positives", False), **mixing)
    batcher.validation = self._validation(config, tokenizer, held, no_in_batch, process_index,
                                          process_count)
    if use_packing(config):
      measure = lambda: max_over_processes(  # noqa: E731
          batcher.packed_rows_needed(range(PACK_CALIBRATION_STEPS)), process_count)
      rows, multiple = packed_rows(config, process_count, jax.local_device_count(), measure)
      batcher.enable_packing(rows, grow_multiple=multiple if process_count == 1 else None)
    return batcher

  @staticmethod
  def _validation(config, tokenizer, held, no_in_batch, process_index, process_count):
    """Padded batches (never packed) of config.batch_size rows of the held-out datasets that fill
    one; a batch is drawn from one dataset, so a smaller one is left out (logged), none at all
    refused. Groups (negatives) are seeded by (seed, batch index, process), as in training."""
    from bge_jax.data import holdout
    from bge_jax.data.pairs import ContrastiveBatcher

    if not held:
      return None
    global_batch, d = config.batch_size, config.data
    kept = [(name, rows) for name, rows in held if len(rows) >= global_batch]
    for name, rows in held:
      if len(rows) < global_batch:
        log.warning("validation: dataset %r has %d held-out rows, fewer than the global batch "
                    "%d; it is left out of the validation loss", name, len(rows), global_batch)
    if not kept:
      raise holdout.too_few(max(len(rows) for _, rows in held), global_batch,
                            "rows in its largest dataset")
    names = {name for name, _ in kept}
    val = ContrastiveBatcher(
        kept, tokenizer, batch_size=global_batch // process_count, group_size=d.group_size,
        query_max_length=d.query_max_length, passage_max_length=d.passage_max_length,
        query_instruction=d.query_instruction or None,
        passage_instruction=d.passage_instruction or None, seed=config.seed,
        process_index=process_index, process_count=process_count,
        no_in_batch_datasets=tuple(n for n in no_in_batch if n in names),
        use_teacher_scores=d.use_teacher_scores,
        passage_hash=config.loss.get("mask_duplicate_positives", False))
    return holdout.HeldOutBatches(val, val.steps_per_epoch, val.describe())

  def abstract_batch(self, config, model_config, *, process_count=1, devices_per_process=1):
    """`ContrastiveBatcher`'s arrays for the global batch: int32 token arrays [B, Lq] and
    [B*G, Lp] (packed: `packed_rows` rows per process, their text slots [B] and [B*G]), float32
    teacher_scores [B, G] with data.use_teacher_scores, int32 passage_hash [B*G, 2] with
    loss.mask_duplicate_positives, and the int32 in_batch_negatives flag.

    Packed rows with data.pack_rows_fraction=0 are sized from the data in training; without data
    this takes fraction 1 (one row per text: the largest step a batch can compile to).
    """
    from bge_jax.data.pairs import use_packing

    self._check_lengths(config, model_config)
    d = config.data
    b, g = config.batch_size, d.group_size
    sides = {"query": (b, d.query_max_length), "passage": (b * g, d.passage_max_length)}
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
    if use_packing(config):
      rows, _ = packed_rows(config, process_count, devices_per_process)
      for side, (n, length) in sides.items():
        shapes.update({f"{side}_{k}": ((rows[side] * process_count, length), jnp.int32)
                       for k in packing.PACKED_SUFFIXES if k != "text_slot"})
        shapes[f"{side}_text_slot"] = ((n,), jnp.int32)
    else:
      for side, (n, length) in sides.items():
        shapes[f"{side}_input_ids"] = shapes[f"{side}_attention_mask"] = ((n, length), jnp.int32)
    if d.use_teacher_scores:
      shapes["teacher_scores"] = ((b, g), jnp.float32)
    if config.loss.get("mask_duplicate_positives", False):
      from bge_jax.data.pairs import PASSAGE_HASH_WORDS
      shapes["passage_hash"] = ((b * g, PASSAGE_HASH_WORDS), jnp.int32)
    shapes["in_batch_negatives"] = ((), jnp.int32)
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}

  def step_flops(self, config, model_config, batch, process_count=1):
    """`flops.contrastive_step_flops` from the batch's shapes; packed sides hold more texts than
    rows, so the texts are counted by their slots."""
    from bge_jax import flops

    q_rows, q_len = batch["query_input_ids"].shape
    p_rows, p_len = batch["passage_input_ids"].shape
    b = batch["query_text_slot"].shape[0] if "query_text_slot" in batch else q_rows
    passages = batch["passage_text_slot"].shape[0] if "passage_text_slot" in batch else p_rows
    return flops.contrastive_step_flops(
        model_config, b * process_count, q_len, p_len, passages // b,
        gradcache_chunk=config.loss.gradcache_chunk, query_rows=q_rows * process_count,
        passage_rows=p_rows * process_count,
        micro_batches=getattr(config, "grad_accum_steps", 1))

  def export(self, params, model_config, tokenizer, out_dir, config):
    """out_dir/hf: an HF BertModel + sentence-transformers folder (the loss's pooling,
    Normalize) whose prompts are the training instructions ("query": data.query_instruction,
    "document": data.passage_instruction; no default prompt, so plain `encode` adds none, as
    BGE passages), with a model card (README.md, `bge_jax.model_card`) from the run's records
    in the workdir that holds out_dir."""
    import os

    from bge_jax import convert, model_card
    from bge_jax.config import fine_tuning_lr

    d = config.data
    prompts = {"query": d.query_instruction or "", "document": d.passage_instruction or ""}
    lr = config.optimizer.lr
    if lr is None:
      lr = fine_tuning_lr(config.model.init_from, config.model.preset, model_config)[0]
    card = model_card.render(config, model_config, os.path.dirname(os.path.abspath(out_dir)),
                             lr=lr, prompts=prompts)
    return [convert.save_hf(params, model_config, os.path.join(out_dir, "hf"), tokenizer=tokenizer,
                            overwrite=True, max_seq_length=d.passage_max_length,
                            prompts=prompts, model_card=card)]


CONTRASTIVE = ContrastiveStage("contrastive")
FINETUNE = ContrastiveStage("finetune")
