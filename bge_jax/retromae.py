"""Stage 1, RetroMAE pre-training: the loss (public API) over the collator's batch."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from bge_jax.config import BertConfig
from bge_jax.models.bert import BertModel
from bge_jax.models.decoder import retromae_logits

IGNORE_INDEX = -100
BATCH_KEYS = ("encoder_input_ids", "encoder_attention_mask", "encoder_labels",
              "decoder_input_ids", "decoder_attention_mask", "decoder_labels")


def masked_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mean CE over labels != -100, accuracy over them, their count), in float32."""
  valid = labels != IGNORE_INDEX
  safe = jnp.where(valid, labels, 0)
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  count = valid.sum()
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  loss = jnp.where(valid, ce, 0.0).sum() / denom
  correct = jnp.where(valid, logits.argmax(-1) == safe, False).sum()
  return loss, correct / denom, count


def check_config(config: BertConfig) -> None:
  if not (config.add_mlm_head and config.add_decoder):
    raise ValueError(
        "RetroMAE needs an MLM head and the enhanced decoder: set model add_mlm_head=True and "
        f"add_decoder=True (got add_mlm_head={config.add_mlm_head}, "
        f"add_decoder={config.add_decoder}).")


def labelled_positions(labels: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(positions [B, k], their labels [B, k]): each row's first k labelled positions, then
  unlabelled ones (label -100) where a row has fewer than k labels."""
  positions = jnp.argsort(labels == IGNORE_INDEX, axis=1, stable=True)[:, :k]
  return positions, jnp.take_along_axis(labels, positions, axis=1)


def loss(params: Any, config: BertConfig, batch: Mapping[str, Any],
         rng: jax.Array | None = None, *,
         max_encoder_predictions: int | None = None) -> dict[str, jax.Array]:
  """RetroMAE loss = mean CE(encoder MLM) + mean CE(decoder), with both terms and accuracies.

  batch: FlagEmbedding's collator names (`BATCH_KEYS`); `decoder_attention_mask` is [B, L, L]
  with 1 = visible. rng=None: no dropout.
  max_encoder_predictions: a static bound K on the encoder labels per row; the encoder's MLM head
    then runs on K positions per row instead of L (the same loss, ~1/3 of the head's FLOPs at
    BGE's 30% masking). The trainer passes the collator's bound,
    `masking.max_predictions(L, encoder_mlm_probability)`. Labels beyond K in a row would be
    left out of the loss; "encoder_labels_dropped" counts them (0 under that bound).
  """
  check_config(config)
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise KeyError(f"RetroMAE batch is missing {missing}; expected keys {list(BATCH_KEYS)}")
  encoder_labels = jnp.asarray(batch["encoder_labels"])
  positions, dropped = None, None
  if max_encoder_predictions is not None:
    k = int(max_encoder_predictions)
    if not 0 < k <= encoder_labels.shape[1]:
      raise ValueError(f"max_encoder_predictions={max_encoder_predictions} must lie in "
                       f"[1, {encoder_labels.shape[1]}] (the batch's length)")
    per_row = (encoder_labels != IGNORE_INDEX).sum(axis=1)
    dropped = jnp.maximum(per_row - k, 0).sum()
    positions, encoder_labels = labelled_positions(encoder_labels, k)
  encoder_logits, decoder_logits = BertModel(config).apply(
      {"params": params}, batch["encoder_input_ids"], batch["encoder_attention_mask"],
      batch["decoder_input_ids"], batch["decoder_attention_mask"], rng is None, positions,
      method=retromae_logits, rngs=None if rng is None else {"dropout": rng})
  enc_loss, enc_acc, enc_n = masked_cross_entropy(encoder_logits, encoder_labels)
  dec_loss, dec_acc, dec_n = masked_cross_entropy(decoder_logits, batch["decoder_labels"])
  out = {"loss": enc_loss + dec_loss, "encoder_loss": enc_loss, "decoder_loss": dec_loss,
         "encoder_accuracy": enc_acc, "decoder_accuracy": dec_acc,
         "encoder_tokens": enc_n, "decoder_tokens": dec_n}
  if dropped is not None:
    out["encoder_labels_dropped"] = dropped
  return out


# ---------------------------------------------------------------------------------------------
# Stage wiring for the trainer: text source -> tokenise -> masking collator; exports.
# ---------------------------------------------------------------------------------------------

class RetroMAEStage:
  name = "retromae"

  def model_config(self, base: BertConfig, config) -> BertConfig:
    return base.replace(add_mlm_head=True, add_decoder=True, hf_family="retromae")

  def loss_fn(self, config, model_config):
    from bge_jax.data.masking import max_predictions

    probability = config.data.encoder_mlm_probability

    def stage_loss(params, batch, rng):
      # The collator's bound on encoder labels per row: the MLM head skips unlabelled positions.
      k = max_predictions(batch["encoder_labels"].shape[1], probability)
      return loss(params, model_config, batch, rng, max_encoder_predictions=k)

    return stage_loss

  @staticmethod
  def _check_length(config, model_config) -> None:
    if config.data.max_length > model_config.max_position_embeddings:
      raise ValueError(
          f"config.data.max_length={config.data.max_length} exceeds the model's "
          f"max_position_embeddings={model_config.max_position_embeddings}; lower "
          "config.data.max_length.")

  def batcher(self, config, tokenizer, model_config, process_index, process_count):
    from bge_jax.data import holdout
    from bge_jax.data.masking import RetroMAECollator
    from bge_jax.data.sources import open_text_source
    from bge_jax.data.text_batcher import TextBatcher

    d = config.data
    self._check_length(config, model_config)
    specs = [s for s in d.train.split(",") if s.strip()]
    if not specs:
      raise ValueError("config.data.train is empty: give JSONL/txt files, folders, globs or "
                       "tfds:NAME[:SPLIT] specs, comma-separated.")
    source = open_text_source(specs, field=d.field, on_error=d.on_error, dedupe=d.dedupe)
    source, held = holdout.split(source, d)  # data.validation_fraction: never trained on
    if d.get("validation", ""):
      held = open_text_source([s for s in d.validation.split(",") if s.strip()], field=d.field,
                              on_error=d.on_error, dedupe=d.dedupe)

    def text_batcher(texts):
      collator = RetroMAECollator(
          tokenizer, max_length=d.max_length, encoder_mlm_probability=d.encoder_mlm_probability,
          decoder_mlm_probability=d.decoder_mlm_probability, seed=config.seed)
      return TextBatcher(texts.shard(process_index, process_count), tokenizer, collator,
                         config.batch_size // process_count, seed=config.seed,
                         max_length=d.max_length, mode=d.mode, process_index=process_index,
                         overlong=d.overlong)

    batcher = text_batcher(source)
    if held is not None:
      if len(held) < config.batch_size:
        raise holdout.too_few(len(held), config.batch_size, "texts")
      # Masks are seeded by (seed, batch index, process): the same at every evaluation.
      val = text_batcher(held)
      batcher.validation = holdout.HeldOutBatches(
          val, val.num_examples // (config.batch_size // process_count), val.describe())
    return batcher

  def abstract_batch(self, config, model_config, *, process_count=1, devices_per_process=1):
    """The collator's arrays, all int32, padded to data.max_length: [B, L] each and the
    decoder's [B, L, L] attention mask (`masking.RetroMAECollator`)."""
    del process_count, devices_per_process  # every row has the same shape
    self._check_length(config, model_config)
    b, length = config.batch_size, config.data.max_length
    shapes = {k: (b, length) for k in BATCH_KEYS}
    shapes["decoder_attention_mask"] = (b, length, length)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k, shape in shapes.items()}

  def step_flops(self, config, model_config, batch, process_count=1):
    """`flops.retromae_step_flops`, the encoder's MLM head on the loss's bounded positions."""
    from bge_jax import flops
    from bge_jax.data.masking import max_predictions

    b, length = batch["encoder_input_ids"].shape
    return flops.retromae_step_flops(model_config, b * process_count, length, encoder_predictions=(
        max_predictions(length, config.data.encoder_mlm_probability)))

  def export(self, params, model_config, tokenizer, out_dir, config):
    """The encoder + MLM head as an HF folder (stage 2's input) and the full RetroMAE state."""
    import os

    from bge_jax import convert
    path = convert.save_hf(params, model_config, os.path.join(out_dir, "hf"), tokenizer=tokenizer,
                           overwrite=True)
    return [path, os.path.join(path, convert.RETROMAE_STATE_FILE)]


STAGE = RetroMAEStage()
