"""Model merging (LM-Cocktail): a weighted average of same-shaped models' parameters.

LM-Cocktail (Xiao et al. 2023, FlagEmbedding's `LM_Cocktail`) merges a fine-tuned embedding model
with its base (or several fine-tuned experts) by averaging every parameter with weights that sum
to one. This keeps most of the fine-tuned model's gain on its task while recovering the base
model's general quality. The weights are either given, or derived from a few examples of the
target task: model i gets weight softmax(-loss_i / T) (T = 5) where loss_i is its contrastive loss
on those examples, so the models that already fit the task count most.

The pieces, usable on their own:

* `load_models(paths)` reads Hugging Face folders, sentence-transformers folders and bge-jax
  checkpoints and checks that they all hold the same tensors with the same shapes (a mismatch is
  refused with the first differing tensor and both paths). By default only the encoder is kept
  (`encoder_only=True`: no MLM head, pooler or RetroMAE decoder, none of which a sentence
  embedding uses), as LM-Cocktail's `AutoModel` does, so a RetroMAE export merges with a
  fine-tuned BertModel.
* `average(params_list, weights)` averages every leaf in float32 and casts back.
* `example_losses` / `weights_from_examples` score the models on (query, pos[, neg]) rows with
  `bge_jax.contrastive.loss` (in-batch negatives, temperature 0.02, each model's own pooling).
* `merge_paths(...)` does all of it and returns the merged model; `launch/merge.py` is the CLI.

Differences from LM-Cocktail, on purpose: weights are normalised rather than assumed to sum to
one; the example loss uses the project's usual temperature 0.02 (LM-Cocktail hard-codes 0.05;
pass `loss_temperature=0.05` to match it) and each model's pooling (LM-Cocktail always uses CLS);
negatives are the first `neg_number` of each row (LM-Cocktail samples them at random, and fails
on rows with fewer), and every row contributes the same count: the smallest row's, capped by
`neg_number`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from bge_jax import contrastive, weights
from bge_jax.config import BertConfig

log = logging.getLogger(__name__)

# BertConfig fields that decide the parameter shapes (and the numerics of the same weights).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size")
# Parts of the params that sentence embeddings do not use (dropped with encoder_only=True).
HEAD_PARTS = ("mlm_head", "pooler", "decoder")
DEFAULT_TEMPERATURE = 5.0  # LM-Cocktail's softmax(-loss / 5)
DEFAULT_LOSS_TEMPERATURE = 0.02  # the contrastive loss's tau (FlagEmbedding's default)


class MergeError(ValueError):
  """Models or weights that cannot be merged; the message names the tensor/files and the fix."""


class Model(NamedTuple):
  """One loaded model: where it came from, its config, its params and its tokenizer folder."""

  path: str
  config: BertConfig
  params: Any
  tokenizer: str | None  # a folder with tokenizer files, or None when the source has none


# ---------------------------------------------------------------------------------------------
# Loading and compatibility.
# ---------------------------------------------------------------------------------------------

def strip_heads(config: BertConfig, params: Mapping[str, Any]) -> tuple[BertConfig, dict]:
  """(config, params) without the MLM head, pooler and RetroMAE decoder (BertModel naming)."""
  params = {k: v for k, v in params.items() if k not in HEAD_PARTS}
  config = config.replace(add_mlm_head=False, add_pooler=False, add_decoder=False,
                          hf_family="bert")
  return config, params


def load_model(path: str, *, encoder_only: bool = True) -> Model:
  """A Hugging Face / sentence-transformers folder, a weight file, a bge-jax params folder, or a
  training run's workdir (its newest checkpoint): `weights.load_source`."""
  path = os.fspath(path)
  config, params, _ = weights.load_source(path)
  if encoder_only:
    config, params = strip_heads(config, params)
  return Model(path, config, params, weights.tokenizer_folder(path))


def load_models(paths: Sequence[str], *, encoder_only: bool = True) -> list[Model]:
  """Loads every path (see `load_model`) and checks they can be merged (`check_compatible`)."""
  if len(paths) < 2:
    raise MergeError(f"got {len(paths)} model(s); merging needs at least two.")
  models = [load_model(p, encoder_only=encoder_only) for p in paths]
  check_compatible(models)
  return models


def _flat(params: Any) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def check_compatible(models: Sequence[Model]) -> None:
  """Raises MergeError unless every model holds the first one's tensors with the same shapes
  and the same shape-deciding config (`SHAPE_FIELDS`, layer_norm_eps).

  The message names the first differing tensor (or config field), both values and both paths.
  """
  first = models[0]
  ref = _flat(first.params)
  for other in models[1:]:
    flat = _flat(other.params)
    for name in sorted(set(ref) | set(flat)):
      if name not in flat or name not in ref:
        has, lacks = (first, other) if name in ref else (other, first)
        raise MergeError(
            f"cannot merge: tensor {name} is in {has.path} but not in {lacks.path}; the models "
            "must have the same layers and parts (merge encoders only: encoder_only=True, the "
            "default; CLI: without --keep-heads).")
      sa, sb = tuple(np.shape(ref[name])), tuple(np.shape(flat[name]))
      if sa != sb:
        raise MergeError(
            f"cannot merge: tensor {name} has shape {sb} in {other.path} and {sa} in "
            f"{first.path}; LM-Cocktail merging needs models of one architecture (e.g. a "
            "fine-tuned model and its base).")
    for field in SHAPE_FIELDS + ("layer_norm_eps",):
      a, b = getattr(first.config, field), getattr(other.config, field)
      if a != b:
        raise MergeError(
            f"cannot merge {other.path} with {first.path}: config {field} is {b} there and {a} "
            "here; the models must share one architecture.")


# ---------------------------------------------------------------------------------------------
# Weights and averaging.
# ---------------------------------------------------------------------------------------------

def normalize_weights(weights: Sequence[float], n_models: int) -> np.ndarray:
  """Weights / their sum as float64; refuses a wrong count, negative or non-finite values, sum 0."""
  w = np.asarray(list(weights), np.float64)
  if w.ndim != 1 or w.shape[0] != n_models:
    raise MergeError(f"got {w.size} weight(s) for {n_models} model(s); give one per model.")
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise MergeError(f"weights {w.tolist()} must be finite and >= 0.")
  if w.sum() <= 0:
    raise MergeError(f"weights {w.tolist()} sum to 0; at least one must be positive.")
  return w / w.sum()


def average(params_list: Sequence[Any], weights: Sequence[float]) -> Any:
  """sum_i w_i params_i / sum_i w_i for every leaf, accumulated in float32.

  Each leaf is cast back to the first model's dtype (e.g. bfloat16 weights stay bfloat16);
  non-float leaves (none in a BERT, kept for safety) are taken from the first model. Returns
  numpy arrays in the first tree's structure.
  """
  if not params_list:
    raise MergeError("no params to average.")
  w = normalize_weights(weights, len(params_list))
  structure = jax.tree.structure(params_list[0])
  for i, p in enumerate(params_list[1:], 1):
    if jax.tree.structure(p) != structure:
      raise MergeError(f"params_list[{i}] has another tree structure than params_list[0]; use "
                       "load_models (it names the differing tensor).")

  def mix(*leaves):
    first = np.asarray(jax.device_get(leaves[0]))
    if not (np.issubdtype(first.dtype, np.floating) or first.dtype.name == "bfloat16"):
      return first
    acc = np.zeros(first.shape, np.float32)
    for wi, leaf in zip(w, leaves):
      acc += np.float32(wi) * np.asarray(jax.device_get(leaf), np.float32)
    return acc.astype(first.dtype)

  return jax.tree.map(mix, *params_list)


def softmax_weights(losses: Sequence[float], temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
  """LM-Cocktail's weights: softmax(-loss / temperature)."""
  if temperature <= 0:
    raise MergeError(f"temperature={temperature}; it must be > 0 (LM-Cocktail uses 5).")
  z = -np.asarray(losses, np.float64) / temperature
  z = np.exp(z - z.max())
  return z / z.sum()


# ---------------------------------------------------------------------------------------------
# Weights from a few examples.
# ---------------------------------------------------------------------------------------------

def read_examples(examples: Any) -> list[tuple[str, str, tuple[str, ...]]]:
  """(query, first positive, negatives) rows from a JSONL path (FlagEmbedding rows or pairs,
  validated with file:line errors by `bge_jax.data.pairs`) or from dicts/PairRows in memory."""
  from bge_jax.data.pairs import open_contrastive_data

  if isinstance(examples, (str, os.PathLike)):
    examples = list(open_contrastive_data(examples))
  rows = []
  for i, e in enumerate(examples):
    if isinstance(e, Mapping):
      query, pos, neg = e.get("query"), e.get("pos"), e.get("neg") or ()
      pos = [pos] if isinstance(pos, str) else pos
      neg = (neg,) if isinstance(neg, str) else tuple(neg)
    else:
      query, pos, neg = e.query, e.pos, tuple(e.neg)
    if not isinstance(query, str) or not query or not pos or not isinstance(pos[0], str):
      raise MergeError(f"example {i}: needs a non-empty 'query' string and a non-empty 'pos' "
                       "list (FlagEmbedding rows {\"query\", \"pos\": [...], \"neg\": [...]}).")
    rows.append((query, pos[0], neg))
  if not rows:
    raise MergeError("no examples: give a few {\"query\", \"pos\", \"neg\"} rows.")
  return rows


def examples_batch(examples: Any, tokenizer: Any, *, neg_number: int = 7,
                   query_max_length: int = 64, passage_max_length: int = 256,
                   query_instruction: str | None = None) -> tuple[dict[str, np.ndarray], int]:
  """(contrastive batch, group size) of all the examples, padded to their longest row.

  Group size G = 1 + min(neg_number, fewest negatives of any row): each query's passages are
  [pos, neg_1 .. neg_{G-1}], the first negatives of its row.
  """
  rows = read_examples(examples)
  if neg_number < 0:
    raise MergeError(f"neg_number={neg_number}; it must be >= 0.")
  group = 1 + min(neg_number, min(len(neg) for _, _, neg in rows))
  queries = [(query_instruction or "") + q for q, _, _ in rows]
  passages = [t for _, pos, neg in rows for t in (pos,) + tuple(neg[:group - 1])]

  def tok(texts, max_length):
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                    return_tensors="np", return_token_type_ids=False)
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

  q_ids, q_mask = tok(queries, query_max_length)
  p_ids, p_mask = tok(passages, passage_max_length)
  return {"query_input_ids": q_ids, "query_attention_mask": q_mask,
          "passage_input_ids": p_ids, "passage_attention_mask": p_mask}, group


def example_losses(params_list: Sequence[Any], config: BertConfig | Sequence[BertConfig],
                   tokenizer: Any, examples: Any, *,
                   loss_temperature: float = DEFAULT_LOSS_TEMPERATURE, neg_number: int = 7,
                   query_max_length: int = 64, passage_max_length: int = 256,
                   query_instruction: str | None = None) -> list[float]:
  """Each model's `contrastive.loss` on the examples (one batch, in-batch negatives, no dropout).

  `config` is one BertConfig for all models or one per model; each model is scored with its
  config's pooling and normalisation.
  """
  configs = [config] * len(params_list) if isinstance(config, BertConfig) else list(config)
  if len(configs) != len(params_list):
    raise MergeError(f"{len(configs)} configs for {len(params_list)} models.")
  batch, group = examples_batch(examples, tokenizer, neg_number=neg_number,
                                query_max_length=query_max_length,
                                passage_max_length=passage_max_length,
                                query_instruction=query_instruction)
  return [float(_contrastive_loss(params, batch, config=cfg, temperature=loss_temperature,
                                  group_size=group)) for params, cfg in zip(params_list, configs)]


@functools.partial(jax.jit, static_argnames=("config", "temperature", "group_size"))
def _contrastive_loss(params, batch, *, config: BertConfig, temperature: float, group_size: int):
  return contrastive.loss(params, config, batch, temperature=temperature, group_size=group_size,
                          pooling=config.pooling, normalize=config.normalize,
                          in_batch_negatives=True)["loss"]


def weights_from_examples(params_list: Sequence[Any], config: BertConfig | Sequence[BertConfig],
                          tokenizer: Any, examples: Any, temperature: float = DEFAULT_TEMPERATURE,
                          **loss_kwargs: Any) -> np.ndarray:
  """LM-Cocktail's data-driven weights: softmax(-loss_i / temperature), loss_i from
  `example_losses` (keyword arguments go there)."""
  return softmax_weights(example_losses(params_list, config, tokenizer, examples, **loss_kwargs),
                         temperature)


# ---------------------------------------------------------------------------------------------
# All together.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MergeResult:
  config: BertConfig
  params: Any
  weights: np.ndarray  # normalised, one per model
  losses: list[float] | None  # the example losses when the weights came from examples
  tokenizer: str | None  # the first model's tokenizer folder
  models: list[str]


def merge_paths(paths: Sequence[str], weights: Sequence[float] | None = None, *,
                examples: Any = None, temperature: float = DEFAULT_TEMPERATURE,
                encoder_only: bool = True, pooling: str | None = None,
                normalize: bool | None = None, **loss_kwargs: Any) -> MergeResult:
  """Loads `paths`, picks the weights (given, or from `examples`, else uniform) and averages.

  The merged config is the first model's (with `pooling`/`normalize` overrides), so list the
  model whose pooling and tokenizer you want first (usually the fine-tuned one).
  """
  if weights is not None and examples is not None:
    raise MergeError("give weights or examples, not both.")
  models = load_models(paths, encoder_only=encoder_only)
  tokenizer = next((m.tokenizer for m in models if m.tokenizer), None)
  losses = None
  if examples is not None:
    if tokenizer is None:
      raise MergeError(f"none of {list(paths)} has tokenizer files; weights from examples need "
                       "one.")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer)
    losses = example_losses([m.params for m in models], [m.config for m in models], tok,
                            examples, **loss_kwargs)
    w = softmax_weights(losses, temperature)
  else:
    w = normalize_weights(weights if weights is not None else [1.0] * len(models), len(models))
  poolings = {m.config.pooling for m in models}
  if len(poolings) > 1 and pooling is None:
    log.warning("the models pool differently (%s); the merged model uses the first one's "
                "(%s). Pass pooling= to choose.", sorted(poolings), models[0].config.pooling)
  config = models[0].config
  config = config.replace(pooling=pooling or config.pooling,
                          normalize=config.normalize if normalize is None else normalize)
  params = average([m.params for m in models], w)
  return MergeResult(config, params, w, losses, models[0].tokenizer or tokenizer,
                     [m.path for m in models])
