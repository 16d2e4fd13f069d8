"""The run's start: tokenizer, model config, initial weights (workdir > init_from > scratch)."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from bge_jax import weights
from bge_jax.config import BertConfig, preset

log = logging.getLogger("bge_jax.train")

MODEL_OVERRIDES = ("dtype", "param_dtype", "remat_policy", "attention_impl", "hidden_dropout",
                   "attention_dropout", "decoder_query_stream", "max_position_embeddings")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and the fix."""


def load_tokenizer(config: Any):
  from transformers import AutoTokenizer
  path = config.tokenizer or config.model.init_from
  if not path:
    raise ConfigError("no tokenizer: set config.tokenizer to a folder with tokenizer files "
                      "(or config.model.init_from to a Hugging Face model folder).")
  folder = weights.tokenizer_folder(path) or path
  try:
    return AutoTokenizer.from_pretrained(folder)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.tokenizer: cannot load a tokenizer from {folder}: {e}") from e


def model_config_and_weights(config: Any, tokenizer: Any) -> tuple[BertConfig, dict | None, str]:
  """(model config, host params loaded from init_from or None, a description of the origin)."""
  m = config.model
  overrides = {k: m[k] for k in MODEL_OVERRIDES if k in m and m[k] is not None}
  if "dtype" not in overrides:
    # Mixed precision on accelerators, as BGE was trained (AMP): bf16 compute, float32
    # parameters and optimizer state. XLA:CPU has no fast bf16 matmul (README "Benchmarks"):
    # float32 there. Set here even for init_from checkpoints, whose config records the compute
    # dtype of the run that saved them, not a property of the weights.
    overrides["dtype"] = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if overrides["dtype"] == "bfloat16":
      log.info("config.model.dtype unset: bfloat16 compute on %s (float32 parameters); "
               "--config.model.dtype=float32 for full precision", jax.default_backend())
  if m.init_from:
    path = m.init_from
    check_source_tokenizer(config, tokenizer)
    # A checkpoint, another run's workdir (its newest checkpoint) or a Hugging Face model.
    base, params, what = weights.load_source(path)
    origin = (f"{path} ({what}, {base.hf_family}, {base.num_layers} layers, "
              f"hidden {base.hidden_size})")
  else:
    vocab = m.get("vocab_size", -1)
    vocab = len(tokenizer) if vocab in (-1, None) else vocab
    base, params = preset(m.preset, vocab_size=vocab), None
    origin = f"scratch ({m.preset}, vocab {vocab})"
  backend = jax.default_backend()
  if overrides.get("attention_impl") == "pallas" and backend != "gpu":
    raise ConfigError(
        f"config.model.attention_impl='pallas' is a GPU (Triton) kernel and this run's backend "
        f"is {backend}: leave model.attention_impl unset here.")
  if base.attention_impl == "pallas" and "attention_impl" not in overrides and backend != "gpu":
    # A runtime choice the init_from run saved with its config, like its dtype.
    log.info("init_from %s trained with attention_impl='pallas' (GPU only): %s uses the "
             "default attention", m.init_from, backend)
    overrides["attention_impl"] = None
  try:
    model_config = base.replace(**overrides)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e
  if len(tokenizer) > model_config.vocab_size:
    raise ConfigError(
        f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
        f"{model_config.vocab_size}: set config.tokenizer to the model's own tokenizer, or "
        "config.model.vocab_size=-1 when training from scratch.")
  return model_config, params, origin


# Compared beyond the vocabulary's size: a foreign tokenizer of the same size maps them elsewhere.
_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")


def check_source_tokenizer(config: Any, tokenizer: Any) -> None:
  """Refuses a config.tokenizer whose vocabulary is not init_from's own: the loaded embeddings'
  rows are that tokenizer's ids, so another one (even a smaller one, which the vocab_size check
  lets through) would train on rows meaning other tokens, silently."""
  given, source = config.tokenizer, config.model.init_from
  if not given or not source or not hasattr(tokenizer, "get_vocab"):
    return  # the source's own tokenizer, or no real one (program.from_config's vocab size)
  own = weights.tokenizer_folder(source)
  given_folder = weights.tokenizer_folder(given) or given
  if own is None:
    log.info("config.model.init_from %s has no tokenizer files to compare config.tokenizer %s "
             "with: only its size is checked against the model's vocab_size", source, given)
    return
  if os.path.realpath(own) == os.path.realpath(given_folder):
    return
  from transformers import AutoTokenizer
  try:
    own_vocab = AutoTokenizer.from_pretrained(own).get_vocab()
  except (OSError, ValueError) as e:
    log.info("config.model.init_from %s: cannot load its tokenizer from %s (%s): only "
             "config.tokenizer's size is checked against the model's vocab_size", source, own, e)
    return
  vocab = tokenizer.get_vocab()
  if vocab == own_vocab:
    return
  if len(vocab) != len(own_vocab):
    why = f"it has {len(vocab)} tokens, the source's {len(own_vocab)}"
  else:
    differ = [t for t in _SPECIAL_TOKENS if vocab.get(t) != own_vocab.get(t)]
    differ = differ or sorted(t for t in own_vocab if vocab.get(t) != own_vocab[t])
    why = ("token ids differ: " + ", ".join(f"{t!r} {vocab.get(t)} vs {own_vocab[t]}"
                                            for t in differ[:3]))
  raise ConfigError(
      f"config.tokenizer={given} is not the tokenizer of config.model.init_from={source} ({why}): "
      f"its embeddings were trained with the source's tokenizer ({own}); leave config.tokenizer "
      "unset (or set it to that folder) to use it, or train from scratch without init_from.")


def merge_loaded(fresh: Any, loaded: dict | None, shardings: Any) -> tuple[Any, list[str]]:
  """Replaces fresh leaves by loaded ones (placed shard by shard); returns the fresh-only parts."""
  if loaded is None:
    return fresh, ["all (from scratch)"]
  flat_loaded = {jax.tree_util.keystr(p): v
                 for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  new_parts = set()

  def pick(path, leaf, sh):
    key = jax.tree_util.keystr(path)
    if key not in flat_loaded:
      new_parts.add(str(getattr(path[0], "key", path[0])))
      return leaf
    host = np.asarray(flat_loaded[key], dtype=leaf.dtype)
    if host.shape != leaf.shape:
      raise ConfigError(f"init_from: {key} has shape {host.shape}, the model wants {leaf.shape}.")
    return jax.make_array_from_callback(leaf.shape, sh, lambda idx: host[idx])

  merged = jax.tree_util.tree_map_with_path(pick, fresh, shardings)
  used = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(fresh)[0]}
  dropped = sorted({k.split("]")[0] + "]" for k in flat_loaded if k not in used})
  if dropped:
    log.info("init_from: parts this stage does not train, not loaded: %s", dropped)
  return merged, sorted(new_parts)
