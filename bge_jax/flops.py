"""Analytic FLOPs of the BGE steps and model FLOPs utilisation (MFU).

Why analytic: XLA's own count (`compiled.cost_analysis()["flops"]`) depends on the backend, the
remat policy, fusion and GradCache recompute, so it cannot be compared across devices or
configurations. MFU here follows PaLM's "model FLOPs" (Chowdhery et al. 2022, appendix B):

* only matrix multiplications are counted, 2 FLOPs per multiply-add: the Q/K/V/output
  projections, the attention scores Q.K^T and the context P.V (over the full padded key length,
  masked or not), the feed-forward pair, the MLM head (transform + tied vocab projection, on every
  position, as the loss computes logits everywhere) and the contrastive score matrices;
  element-wise work (LayerNorm, GELU, softmax, the loss) and embedding gathers count 0;
* shapes are the padded batch shapes the step is compiled for (tokens/s reports real tokens);
* a training step is 3x its forward (forward + backward w.r.t. activations + w.r.t. weights);
* rematerialisation (`remat_policy`, GradCache's checkpointed chunks) is NOT model FLOPs: it is
  returned separately as `StepFlops.recompute`, and `StepFlops.hardware` = model + recompute
  ("hardware FLOPs utilisation" = HFU).

Formulas only: each stage turns its batch's shapes into these (`Stage.step_flops`).
tests/test_flops.py checks them against XLA's own counts on small shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bge_jax.config import BertConfig

# Dense bf16 peak FLOP/s per chip (vendor datasheets; no sparsity). Matched against
# jax.Device.device_kind, longest key first.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
    "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "A10G": 70e12, "L4": 121e12, "V100": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one step: `model` (PaLM model FLOPs) and `recompute` (remat, not counted in MFU)."""

  model: int
  recompute: int = 0

  @property
  def hardware(self) -> int:
    return self.model + self.recompute


def layer_flops(config: BertConfig, batch: int, q_len: int, kv_len: int | None = None) -> int:
  """Forward matmul FLOPs of one BertLayer: `batch` rows of `q_len` queries over `kv_len` keys."""
  kv_len = q_len if kv_len is None else kv_len
  e, f = config.hidden_size, config.intermediate_size
  q_tokens, kv_tokens = batch * q_len, batch * kv_len
  projections = 2 * q_tokens * e * e * 2 + 2 * kv_tokens * e * e * 2  # Q, out; K, V
  attention = 2 * 2 * batch * q_len * kv_len * e  # Q.K^T and P.V over all heads (H * Dh = E)
  ffn = 2 * 2 * q_tokens * e * f
  return projections + attention + ffn


def encoder_flops(config: BertConfig, batch: int, length: int) -> int:
  """Forward matmul FLOPs of the encoder stack (embedding gathers are free)."""
  return config.num_layers * layer_flops(config, batch, length)


def mlm_head_flops(config: BertConfig, tokens: int) -> int:
  """Forward FLOPs of the MLM head on `tokens` positions: transform E x E + vocab E x V."""
  e = config.hidden_size
  return 2 * tokens * e * (e + config.vocab_size)


def encode_flops(config: BertConfig, batch: int, length: int) -> int:
  """Inference (Encoder.encode) FLOPs of one [batch, length] batch: the encoder forward."""
  return encoder_flops(config, batch, length)


def _remat_recompute(config: BertConfig, batch: int, length: int) -> int:
  """Forward FLOPs the encoder's remat policy recomputes in the backward pass."""
  per_layer = {
      "none": 0,
      "full": layer_flops(config, batch, length),
      "dots": 0,  # every matmul output is saved
      # weight matmuls saved; the batched attention matmuls (scores, context) are recomputed
      "dots_no_batch": 2 * 2 * batch * length * length * config.hidden_size,
  }[config.remat_policy]
  return config.num_layers * per_layer


def retromae_step_flops(config: BertConfig, batch: int, length: int, training: bool = True,
                        encoder_predictions: int | None = None) -> StepFlops:
  """Stage 1: the encoder on [batch, length] and its MLM head on `encoder_predictions` positions
  per row (all `length` when None: `retromae.loss`'s max_encoder_predictions), the decoder layer
  (L queries over L keys) and its MLM head on every position; x3 when `training`."""
  tokens = batch * length
  head_tokens = batch * (length if encoder_predictions is None else encoder_predictions)
  forward = (encoder_flops(config, batch, length) + mlm_head_flops(config, head_tokens)
             + layer_flops(config, batch, length) + mlm_head_flops(config, tokens))
  if not training:
    return StepFlops(forward)
  return StepFlops(3 * forward, _remat_recompute(config, batch, length))


def contrastive_step_flops(config: BertConfig, queries: int, q_len: int, p_len: int,
                           group_size: int = 1, gradcache_chunk: int = 0,
                           training: bool = True, query_rows: int | None = None,
                           passage_rows: int | None = None,
                           micro_batches: int = 1) -> StepFlops:
  """Stages 2-3: encoder on queries [B, Lq] and passages [B*G, Lp], the in-batch score matrix
  q.p^T [B, B*G] and the group scores [B, G]; x3 when `training`. Packed batches run the
  encoder on `query_rows` / `passage_rows` rows instead (default: one text per row). With
  `micro_batches` = k (grad_accum_steps) the score matrices are the micro-batches': k of
  [B/k, B*G/k].

  GradCache (`gradcache_chunk` > 0 and smaller than the batch) recomputes both encoder forwards
  in the backward pass: that is recompute, on top of the remat policy's (which then applies to
  the recomputed forward's backward only, so it is counted once either way).
  """
  passages = queries * group_size
  q_rows = queries if query_rows is None else query_rows
  p_rows = passages if passage_rows is None else passage_rows
  d = config.hidden_size
  enc = encoder_flops(config, q_rows, q_len) + encoder_flops(config, p_rows, p_len)
  scores = 2 * queries * passages * d // micro_batches + 2 * queries * group_size * d
  forward = enc + scores
  if not training:
    return StepFlops(forward)
  recompute = (_remat_recompute(config, q_rows, q_len)
               + _remat_recompute(config, p_rows, p_len))
  chunked = lambda texts: 0 < gradcache_chunk < texts // micro_batches  # noqa: E731
  if chunked(queries):
    recompute += encoder_flops(config, q_rows, q_len)
  if chunked(passages):
    recompute += encoder_flops(config, p_rows, p_len)
  return StepFlops(3 * forward, recompute)


def peak_flops(device: Any = None) -> float | None:
  """Dense bf16 peak FLOP/s of a JAX device (default: the first), or None when unknown (CPU)."""
  if device is None:
    import jax
    device = jax.devices()[0]
  kind = str(getattr(device, "device_kind", device))
  for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if key.lower() in kind.lower():
      return PEAK_BF16_FLOPS[key]
  return None


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_device: float,
        num_devices: int = 1) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices (0..1)."""
  if step_seconds <= 0 or peak_flops_per_device <= 0:
    raise ValueError(f"mfu: step_seconds={step_seconds} and peak_flops_per_device="
                     f"{peak_flops_per_device} must be > 0")
  return flops_per_step / step_seconds / (peak_flops_per_device * num_devices)
