"""The RetroMAE enhanced decoder: two-stream attention over [CLS] + unmasked embeddings.

The decoder is one `BertLayer` (``params["decoder"]``, HF naming ``c_head.*``) sharing the
encoder's embedding module and tied MLM head. Its two streams (SPEC, "Enhanced decoder"):

* keys/values ``hkv = [cls ; Emb(x)[1:]]`` — the encoder's final [CLS] state at position 0, then
  the shared embeddings of the *unmasked* input ids;
* queries ``hq`` — "fe" (FlagEmbedding): ``Emb(inputs_embeds = cls repeated L times)``, i.e.
  LayerNorm(cls + pos_i + type_0) then dropout; "rm" (original RetroMAE): ``cls + pos_i``.

Each query row i sees the columns its position-specific mask row allows (never itself).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from bge_jax.models.bert import BertModel


def query_stream(model: BertModel, cls: Array, length: int, deterministic: bool) -> Array:
  """[B, 1, E] final [CLS] state -> [B, L, E] decoder queries, per `decoder_query_stream`."""
  repeated = jnp.broadcast_to(cls, (cls.shape[0], length, cls.shape[-1]))
  if model.config.decoder_query_stream == "fe":
    return model.embed(inputs_embeds=repeated, deterministic=deterministic)
  positions = model.embeddings.position_embeddings(jnp.arange(length, dtype=jnp.int32))
  return repeated + positions[None].astype(repeated.dtype)


def retromae_logits(model: BertModel, encoder_input_ids: Array, encoder_attention_mask: Array,
                    decoder_input_ids: Array, decoder_attention_mask: Array,
                    deterministic: bool = True,
                    encoder_positions: Array | None = None) -> tuple[Array, Array]:
  """(encoder MLM logits [B, L, V], decoder logits [B, L, V]); call through `model.apply(...,
  method=retromae_logits)` so the function runs bound to the model's parameters.

  encoder_positions: optional int [B, K]; the encoder logits are then [B, K, V], at those
  positions only (the MLM head is per position, so this equals gathering the full logits).
  """
  hidden = model(encoder_input_ids, encoder_attention_mask, deterministic=deterministic)
  head_input = hidden
  if encoder_positions is not None:
    head_input = jnp.take_along_axis(hidden, encoder_positions[..., None], axis=1)
  encoder_logits = model.mlm_logits(head_input)
  cls = hidden[:, :1]
  embedded = model.embed(decoder_input_ids, deterministic=deterministic)
  hkv = jnp.concatenate([cls.astype(embedded.dtype), embedded[:, 1:]], axis=1)
  hq = query_stream(model, cls, decoder_input_ids.shape[1], deterministic)
  decoded = model.decoder_layer(hq, hkv, decoder_attention_mask, deterministic)
  return encoder_logits, model.mlm_logits(decoded)
