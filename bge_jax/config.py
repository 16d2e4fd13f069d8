"""The BERT model configuration: shapes, numerics, which heads the params hold, and presets."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax.numpy as jnp

# Which Hugging Face state-dict naming a params pytree came from (and goes back to).
HF_FAMILIES = ("bert", "bert_mlm", "sentence_transformers", "retromae")
POOLINGS = ("cls", "mean")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
QUERY_STREAMS = ("fe", "rm")
ATTENTION_IMPLS = (None, "xla", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hashable (usable as a jit static argument) description of one BERT.

  Shape fields follow Hugging Face's `BertConfig` with shorter names. `dtype` is the compute
  dtype, `param_dtype` the storage dtype of the parameters. `add_pooler`, `add_mlm_head` and
  `add_decoder` say which optional parts the params hold; `hf_family` which HF naming they
  convert back to (see `bge_jax.convert`).
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  initializer_range: float = 0.02
  pad_token_id: int = 0

  dtype: str = "float32"
  param_dtype: str = "float32"
  # Rematerialisation of each layer in the backward pass: "none", "full" (save nothing),
  # "dots" (save matmul outputs), "dots_no_batch" (save matmuls without batch dims: weights-only).
  remat_policy: str = "none"
  # Attention: None (XLA picks), "xla" or "cudnn" go to jax.nn.dot_product_attention, which
  # has no dropout, so training with attention dropout takes the explicit softmax path;
  # "pallas" (GPU) trains the encoder through the fused Triton kernel with dropout
  # (bge_jax.models.flash_attention) and uses jax.nn.dot_product_attention elsewhere.
  attention_impl: str | None = None

  pooling: str = "cls"
  normalize: bool = True

  add_pooler: bool = False
  add_mlm_head: bool = False
  add_decoder: bool = False
  # RetroMAE decoder query stream: "fe" = Emb(cls repeated) with LayerNorm (FlagEmbedding),
  # "rm" = cls + position embedding, no LayerNorm (original RetroMAE).
  decoder_query_stream: str = "fe"

  hf_family: str = "bert"

  def __post_init__(self):
    def bad(key, value, allowed):
      raise ValueError(f"BertConfig.{key}={value!r} is not one of {allowed}")

    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"BertConfig.hidden_size={self.hidden_size} is not divisible by "
          f"num_heads={self.num_heads}; choose a head count that divides it.")
    if self.pooling not in POOLINGS:
      bad("pooling", self.pooling, POOLINGS)
    if self.remat_policy not in REMAT_POLICIES:
      bad("remat_policy", self.remat_policy, REMAT_POLICIES)
    if self.hf_family not in HF_FAMILIES:
      bad("hf_family", self.hf_family, HF_FAMILIES)
    if self.attention_impl not in ATTENTION_IMPLS:
      bad("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    head_dim = self.hidden_size // self.num_heads
    if self.attention_impl == "pallas" and (head_dim < 16 or head_dim > 256
                                           or head_dim & (head_dim - 1)):
      raise ValueError(f"BertConfig.attention_impl='pallas' needs a head dim that is a power of "
                       f"two from 16 to 256 (Triton blocks); this model's is {head_dim}: leave "
                       "attention_impl unset")
    if self.decoder_query_stream not in QUERY_STREAMS:
      bad("decoder_query_stream", self.decoder_query_stream, QUERY_STREAMS)
    for key in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, key))
      except TypeError:
        bad(key, getattr(self, key), "numpy dtype names such as 'float32', 'bfloat16'")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def replace(self, **changes: Any) -> "BertConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "BertConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown BertConfig keys {unknown}; known keys: {sorted(known)}")
    return cls(**values)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  def num_params(self, include_heads: bool = True) -> int:
    """Parameter count (tied MLM decoder counted once)."""
    e, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    layer = 4 * (e * e + e) + 2 * e + (e * f + f) + (f * e + e) + 2 * e
    total = (v + self.max_position_embeddings + self.type_vocab_size) * e + 2 * e
    total += self.num_layers * layer
    if include_heads:
      total += (e * e + e) * self.add_pooler
      total += (e * e + e + 2 * e + v) * self.add_mlm_head
      total += layer * self.add_decoder
    return total


# The shapes (vocab / hidden / layers / heads / ffn) of the published BAAI/bge-* configs (BGE:
# Xiao et al. 2023, "C-Pack: Packaged Resources To Advance General Chinese Embedding",
# arXiv:2309.07597; the encoder is BERT, Devlin et al. 2019), plus `tiny` for tests and demos.
# `lr` is the preset's fine-tuning (stages 2 and 3) peak learning rate, FlagEmbedding's by size;
# it is not a BertConfig field (see `preset_lr`).
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4,
                 intermediate_size=128, max_position_embeddings=128, lr=1e-3),
    "bge-small-zh": dict(vocab_size=21128, hidden_size=512, num_layers=4, num_heads=8,
                         intermediate_size=2048, lr=3e-5),
    "bge-small-en": dict(vocab_size=30522, hidden_size=384, num_layers=12, num_heads=12,
                         intermediate_size=1536, lr=3e-5),
    "bge-base-zh": dict(vocab_size=21128, hidden_size=768, num_layers=12, num_heads=12,
                        intermediate_size=3072, lr=2e-5),
    "bge-base-en": dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                        intermediate_size=3072, lr=2e-5),
    "bge-large-zh": dict(vocab_size=21128, hidden_size=1024, num_layers=24, num_heads=16,
                         intermediate_size=4096, lr=1e-5),
    "bge-large-en": dict(vocab_size=30522, hidden_size=1024, num_layers=24, num_heads=16,
                         intermediate_size=4096, lr=1e-5),
}
PRESETS = tuple(_PRESETS)


def _entry(name: str) -> dict[str, Any]:
  if name not in _PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {tuple(_PRESETS)}")
  return _PRESETS[name]


def preset(name: str, **overrides: Any) -> BertConfig:
  """A named model shape (`tiny`, `bge-{small,base,large}-{zh,en}`) with optional overrides."""
  shape = {k: v for k, v in _entry(name).items() if k != "lr"}
  return BertConfig(**{**shape, **overrides})


def preset_lr(name: str) -> float:
  """The preset's fine-tuning learning rate (stages 2 and 3), stored in its own entry."""
  return _entry(name)["lr"]


def _weights_per_token(hidden_size: int, num_layers: int) -> float:
  """layers x hidden^2: the encoder's matmul weights up to a constant (12 for BERT), the size
  measure FlagEmbedding's per-size learning rates follow."""
  return float(num_layers) * float(hidden_size) ** 2


def lr_for_size(hidden_size: int, num_layers: int) -> tuple[float, str]:
  """(fine-tuning lr, the preset it comes from) for an encoder of this shape: the lr of the
  preset nearest in layers x hidden^2 on a log scale (e.g. all-MiniLM-L6, 6 x 384: bge-small-zh's
  3e-5; a 12 x 768 BERT: 2e-5; 24 x 1024: 1e-5). Ties go to the first preset in table order."""
  size = math.log(_weights_per_token(hidden_size, num_layers))
  name = min(_PRESETS, key=lambda n: abs(size - math.log(_weights_per_token(
      _PRESETS[n]["hidden_size"], _PRESETS[n]["num_layers"]))))
  return _PRESETS[name]["lr"], name


def fine_tuning_lr(init_from: str, preset_name: str, model: BertConfig) -> tuple[float, str]:
  """The stages-2/3 learning rate when config.optimizer.lr is unset, and why.

  From scratch (no `init_from`), the preset's own entry (`preset_lr`); from other weights, the
  size of the model they hold (`lr_for_size` of `model`'s hidden size and layers), whatever the
  preset's name says.
  """
  if not init_from:
    return preset_lr(preset_name), f"the preset {preset_name!r}'s own (training from scratch)"
  lr, nearest = lr_for_size(model.hidden_size, model.num_layers)
  return lr, (f"by the initial model's size: {model.num_layers} layers x hidden "
              f"{model.hidden_size} from model.init_from, nearest preset {nearest!r}")
