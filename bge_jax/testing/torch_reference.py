"""PyTorch references of bge-jax's models, importable by tests and benchmarks (needs torch).

`TwoStreamLayer` is SPEC's RetroMAE enhanced decoder layer written from the math in PyTorch, with
HF BertLayer parameter names; `TorchRetroMAE` is FlagEmbedding's RetroMAEForPretraining forward
rebuilt from transformers' BertForMaskedLM and that layer. tests/test_retromae.py checks the JAX
stage-1 loss and gradients against it; launch/bench.py times it against the JAX step.
`flagembedding_contrastive_loss` is FlagEmbedding's stage-2/3 loss (contrastive, distillation)
on embeddings, for tests/test_distill.py and tests/test_contrastive.py.
"""

from __future__ import annotations

import math

import torch
import transformers
from torch import nn
from torch.nn import functional as F


class TwoStreamLayer(nn.Module):
  """SPEC's enhanced decoder layer: queries from `query`, keys/values from `kv`, post-LN.

  Submodule names reproduce HF BertLayer's state-dict keys (attention.self.{query,key,value},
  attention.output.{dense,LayerNorm}, intermediate.dense, output.{dense,LayerNorm}).
  """

  def __init__(self, cfg: transformers.BertConfig):
    super().__init__()
    e, f, eps = cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps
    self.num_heads = cfg.num_attention_heads
    self.attention = nn.ModuleDict({
        "self": nn.ModuleDict({n: nn.Linear(e, e) for n in ("query", "key", "value")}),
        "output": nn.ModuleDict({"dense": nn.Linear(e, e), "LayerNorm": nn.LayerNorm(e, eps=eps)}),
    })
    self.intermediate = nn.ModuleDict({"dense": nn.Linear(e, f)})
    self.output = nn.ModuleDict({"dense": nn.Linear(f, e), "LayerNorm": nn.LayerNorm(e, eps=eps)})
    self.attention_dropout = nn.Dropout(cfg.attention_probs_dropout_prob)
    self.hidden_dropout = nn.Dropout(cfg.hidden_dropout_prob)

  def forward(self, query: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """query, kv [B, L, E]; mask [B, L, L] with 1 = row i may see column j."""
    b, l, e = query.shape
    h = self.num_heads
    d = e // h

    def heads(x):  # [B, L, E] -> [B, H, L, D]
      return x.view(b, -1, h, d).transpose(1, 2)

    attn = self.attention["self"]
    q, k, v = heads(attn["query"](query)), heads(attn["key"](kv)), heads(attn["value"](kv))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    additive = (1.0 - mask[:, None].to(scores.dtype)) * torch.finfo(scores.dtype).min
    probs = self.attention_dropout(torch.softmax(scores + additive, dim=-1))
    ctx = (probs @ v).transpose(1, 2).reshape(b, l, e)
    out = self.attention["output"]
    x = out["LayerNorm"](self.hidden_dropout(out["dense"](ctx)) + query)
    y = self.output["dense"](F.gelu(self.intermediate["dense"](x)))
    return self.output["LayerNorm"](self.hidden_dropout(y) + x)


class TorchRetroMAE(nn.Module):
  """FlagEmbedding's RetroMAEForPretraining forward, with SPEC's two query streams."""

  def __init__(self, cfg: transformers.BertConfig, query_stream: str):
    super().__init__()
    self.lm = transformers.BertForMaskedLM(cfg)
    self.decoder_embeddings = self.lm.bert.embeddings  # an alias, as in FlagEmbedding
    self.c_head = TwoStreamLayer(cfg)
    self.query_stream = query_stream

  def forward(self, encoder_input_ids, encoder_attention_mask, encoder_labels,
              decoder_input_ids, decoder_attention_mask, decoder_labels):
    lm_out = self.lm(input_ids=encoder_input_ids, attention_mask=encoder_attention_mask,
                     labels=encoder_labels, output_hidden_states=True, return_dict=True)
    cls = lm_out.hidden_states[-1][:, :1]  # [B, 1, E]
    embedded = self.decoder_embeddings(input_ids=decoder_input_ids)
    kv = torch.cat([cls, embedded[:, 1:]], dim=1)
    b, l, e = kv.shape
    if self.query_stream == "fe":  # LayerNorm(cls + pos_i + type_0), then dropout
      query = self.decoder_embeddings(inputs_embeds=cls.expand(b, l, e))
    else:  # "rm": cls + pos_i, no LayerNorm
      positions = self.lm.bert.embeddings.position_embeddings(torch.arange(l))
      query = cls + positions[None]
    decoded = self.c_head(query, kv, decoder_attention_mask)
    scores = self.lm.cls(decoded)
    decoder_loss = F.cross_entropy(scores.reshape(-1, scores.shape[-1]),
                                   decoder_labels.reshape(-1), ignore_index=-100)
    return {"loss": decoder_loss + lm_out.loss, "encoder_loss": lm_out.loss,
            "decoder_loss": decoder_loss}


def flagembedding_contrastive_loss(q, p, teacher=None, *, temperature, group_size, in_batch=True,
                                   kd="kl_div", duplicates=None):
  """FlagEmbedding's training loss on embeddings q [B, D], p [B*G, D] (torch tensors), written
  from `FlagEmbedding/abc/finetune/embedder/AbsModeling.py` (`_compute_in_batch_neg_loss`,
  `_compute_no_in_batch_neg_loss`, `distill_loss`; kd = its `kd_loss_type`).

  teacher: [B, G] teacher scores or None. in_batch: scores over all passages (target i*G), else
  over the own group (target 0). duplicates: [B, B*G] bool or None, passages equal to query i's
  positive; their logits are set to the float minimum (as FlagEmbedding masks) except at the
  cross-entropy's target. m3_kd_loss without in-batch negatives (FlagEmbedding indexes the
  [B, G] scores with targets i*G + k there) uses targets k of each row's own group.
  """
  b = q.shape[0]
  scores = q @ p.T / temperature                                                 # [B, B*G]
  cols = torch.arange(b)[:, None] * group_size + torch.arange(group_size)        # [B, G]
  local = scores.gather(1, cols)                                                 # get_local_score
  minimum = torch.finfo(scores.dtype).min
  if in_batch:
    ce_scores, labels = scores, torch.arange(b) * group_size
    dup = duplicates
  else:
    ce_scores, labels = local, torch.zeros(b, dtype=torch.long)
    dup = None if duplicates is None else duplicates.gather(1, cols)
  columns = torch.arange(ce_scores.shape[1])[None, :]

  def cross_entropy(target, extra_mask=None):
    s = ce_scores if extra_mask is None else ce_scores + extra_mask
    if dup is not None:
      s = torch.where(dup & (columns != target[:, None]), torch.full_like(s, minimum), s)
    return F.cross_entropy(s, target, reduction="none")

  if teacher is None:
    return cross_entropy(labels).mean()
  targets = torch.softmax(teacher, dim=-1)
  if kd == "kl_div":
    distill = -torch.mean(torch.sum(torch.log_softmax(local, dim=-1) * targets, dim=-1))
    return distill + cross_entropy(labels).mean()
  assert kd == "m3_kd_loss"
  loss, mask = 0, torch.zeros_like(ce_scores)
  for i in range(group_size):
    target = labels + i
    loss = loss + torch.mean(targets[:, i] * cross_entropy(target, mask))
    mask = torch.scatter(mask, -1, target[:, None], minimum)
  return loss
