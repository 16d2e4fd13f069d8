"""Hugging Face / FlagEmbedding PyTorch weights <-> bge-jax params, for every BERT naming family.

Families (``BertConfig.hf_family``) and the state dict each one reads and writes:

* ``bert``: ``BertModel`` (``embeddings.*``, ``encoder.layer.N.*``, optional ``pooler.*``).
* ``sentence_transformers``: a sentence-transformers folder; the Transformer module holds
  ``bert`` naming, pooling and normalisation come from ``modules.json`` / ``1_Pooling``.
* ``bert_mlm``: ``BertForMaskedLM`` (``bert.*`` and ``cls.predictions.*``), the MLM decoder tied
  to the word embeddings (stored once, as in ``save_pretrained``).
* ``retromae``: FlagEmbedding's ``RetroMAEForPretraining.state_dict()``: ``lm.bert.*``,
  ``lm.cls.*``, ``c_head.*`` (the enhanced decoder, a BertLayer) and the aliases a torch
  ``state_dict()`` of that module holds (``decoder_embeddings.*`` = ``lm.bert.embeddings.*``,
  ``lm.cls.predictions.decoder.{weight,bias}``), so ``load_state_dict`` accepts it as is.

Buffers (``position_ids``, ``token_type_ids``) are not parameters: ignored on load, not written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from bge_jax.config import BertConfig
from bge_jax.data.files import atomic_output_dir

log = logging.getLogger(__name__)

PathTuple = tuple[str, ...]

_LAYER_TABLE: tuple[tuple[PathTuple, str, str], ...] = (
    (("query", "kernel"), "attention.self.query.weight", "qkv_kernel"),
    (("query", "bias"), "attention.self.query.bias", "qkv_bias"),
    (("key", "kernel"), "attention.self.key.weight", "qkv_kernel"),
    (("key", "bias"), "attention.self.key.bias", "qkv_bias"),
    (("value", "kernel"), "attention.self.value.weight", "qkv_kernel"),
    (("value", "bias"), "attention.self.value.bias", "qkv_bias"),
    (("attention_out", "kernel"), "attention.output.dense.weight", "out_kernel"),
    (("attention_out", "bias"), "attention.output.dense.bias", "copy"),
    (("attention_norm", "scale"), "attention.output.LayerNorm.weight", "copy"),
    (("attention_norm", "bias"), "attention.output.LayerNorm.bias", "copy"),
    (("intermediate", "kernel"), "intermediate.dense.weight", "kernel"),
    (("intermediate", "bias"), "intermediate.dense.bias", "copy"),
    (("output", "kernel"), "output.dense.weight", "kernel"),
    (("output", "bias"), "output.dense.bias", "copy"),
    (("output_norm", "scale"), "output.LayerNorm.weight", "copy"),
    (("output_norm", "bias"), "output.LayerNorm.bias", "copy"),
)
_EMBEDDINGS_TABLE: tuple[tuple[PathTuple, str, str], ...] = (
    (("word_embeddings", "embedding"), "word_embeddings.weight", "copy"),
    (("position_embeddings", "embedding"), "position_embeddings.weight", "copy"),
    (("token_type_embeddings", "embedding"), "token_type_embeddings.weight", "copy"),
    (("norm", "scale"), "LayerNorm.weight", "copy"),
    (("norm", "bias"), "LayerNorm.bias", "copy"),
)
_POOLER_TABLE = ((("kernel",), "dense.weight", "kernel"), (("bias",), "dense.bias", "copy"))
_MLM_TABLE: tuple[tuple[PathTuple, str, str], ...] = (
    (("transform", "kernel"), "predictions.transform.dense.weight", "kernel"),
    (("transform", "bias"), "predictions.transform.dense.bias", "copy"),
    (("transform_norm", "scale"), "predictions.transform.LayerNorm.weight", "copy"),
    (("transform_norm", "bias"), "predictions.transform.LayerNorm.bias", "copy"),
    (("bias",), "predictions.bias", "copy"),
)

# Where each part lives in each family: (embeddings/encoder/pooler prefix, MLM prefix).
_PREFIXES = {
    "bert": ("", None),
    "sentence_transformers": ("", None),
    "bert_mlm": ("bert.", "cls."),
    "retromae": ("lm.bert.", "lm.cls."),
}
_BUFFER_KEY = re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json", "added_tokens.json")
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
ST_CONFIG_FILE = "config_sentence_transformers.json"  # prompts, default prompt, similarity


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names the file, key or shape and the fix."""


# ---------------------------------------------------------------------------------------------
# The key table: one row per tensor, (flax path, HF key, layout transform).
# ---------------------------------------------------------------------------------------------

def key_table(config: BertConfig) -> list[tuple[PathTuple, str, str]]:
  """Every (params path, HF key, transform) for `config`'s parts, in its `hf_family` naming."""
  base, mlm = _PREFIXES[config.hf_family]
  rows = [(("embeddings",) + p, f"{base}embeddings.{k}", t) for p, k, t in _EMBEDDINGS_TABLE]
  for i in range(config.num_layers):
    rows += [((f"layers_{i}",) + p, f"{base}encoder.layer.{i}.{k}", t) for p, k, t in _LAYER_TABLE]
  if config.add_pooler:
    rows += [(("pooler",) + p, f"{base}pooler.{k}", t) for p, k, t in _POOLER_TABLE]
  if config.add_mlm_head:
    if mlm is None:
      raise ConversionError(
          f"hf_family={config.hf_family!r} has no MLM head naming; use hf_family='bert_mlm' "
          "(BertForMaskedLM) or 'retromae' for params with an MLM head.")
    rows += [(("mlm_head",) + p, f"{mlm}{k}", t) for p, k, t in _MLM_TABLE]
  if config.add_decoder:
    if config.hf_family != "retromae":
      raise ConversionError(
          f"params hold a RetroMAE decoder but hf_family={config.hf_family!r}; only "
          "hf_family='retromae' names it (c_head.*). Drop params['decoder'] and set "
          "add_decoder=False to export the encoder alone.")
    rows += [(("decoder",) + p, f"c_head.{k}", t) for p, k, t in _LAYER_TABLE]
  return rows


def _aliases(config: BertConfig) -> dict[str, str]:
  """alias HF key -> primary HF key, for the families whose files carry tied duplicates."""
  if config.hf_family != "retromae":
    return {}
  out = {f"decoder_embeddings.{k}": f"lm.bert.embeddings.{k}" for _, k, _ in _EMBEDDINGS_TABLE}
  if config.add_mlm_head:
    out["lm.cls.predictions.decoder.weight"] = "lm.bert.embeddings.word_embeddings.weight"
    out["lm.cls.predictions.decoder.bias"] = "lm.cls.predictions.bias"
  return out


def _tied_in_file(config: BertConfig) -> dict[str, str]:
  """Tied duplicates a file may or may not hold (accepted on load when equal, never written)."""
  _, mlm = _PREFIXES[config.hf_family]
  if not config.add_mlm_head or config.hf_family == "retromae":
    return {}
  return {f"{mlm}predictions.decoder.weight": f"{_PREFIXES[config.hf_family][0]}embeddings."
          "word_embeddings.weight", f"{mlm}predictions.decoder.bias": f"{mlm}predictions.bias"}


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "copy":
    return x
  if kind == "kernel":
    return x.T
  if kind == "qkv_kernel":  # [E, H, D] -> [H*D, E]
    return x.reshape(x.shape[0], -1).T
  if kind == "qkv_bias":  # [H, D] -> [H*D]
    return x.reshape(-1)
  if kind == "out_kernel":  # [H, D, E] -> [E, H*D]
    return x.reshape(-1, x.shape[-1]).T
  raise AssertionError(kind)


def _from_hf(x: np.ndarray, kind: str, config: BertConfig) -> np.ndarray:
  h, d = config.num_heads, config.head_dim
  if kind == "copy":
    return x
  if kind == "kernel":
    return x.T
  if kind == "qkv_kernel":  # [H*D, E] -> [E, H, D]
    return x.T.reshape(x.shape[1], h, d)
  if kind == "qkv_bias":
    return x.reshape(h, d)
  if kind == "out_kernel":  # [E, H*D] -> [H, D, E]
    return x.T.reshape(h, d, x.shape[0])
  raise AssertionError(kind)


def _hf_shape(kind: str, path: PathTuple, config: BertConfig) -> tuple[int, ...]:
  """The HF tensor shape a row of the key table expects for `config`."""
  e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  leaf = path[-2:]
  if path[0] == "embeddings":
    rows = {"word_embeddings": v, "position_embeddings": config.max_position_embeddings,
            "token_type_embeddings": config.type_vocab_size}
    return (rows[path[1]], e) if path[1] in rows else (e,)
  if path[0] == "mlm_head" and path[-1] == "bias" and len(path) == 2:
    return (v,)
  if leaf == ("intermediate", "kernel"):
    return (f, e)
  if leaf == ("intermediate", "bias"):
    return (f,)
  if leaf == ("output", "kernel"):
    return (e, f)
  if path[-1] == "kernel":
    return (e, e)
  return (e,)


def _get(tree: Mapping[str, Any], path: PathTuple) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict[str, Any], path: PathTuple, value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------
# params -> HF
# ---------------------------------------------------------------------------------------------

def to_hf_state_dict(params: Any, config: BertConfig) -> dict[str, np.ndarray]:
  """params (or any pytree shaped like them, e.g. gradients) -> HF state dict of numpy arrays.

  The exact inverse of `load_hf` in `config.hf_family`'s naming: layout changes are transposes
  and reshapes only, so a round trip is bit-exact. Values keep the tree's dtype.
  """
  out: dict[str, np.ndarray] = {}
  for path, key, kind in key_table(config):
    try:
      leaf = _get(params, path)
    except (KeyError, TypeError) as e:
      raise ConversionError(
          f"params has no entry {'/'.join(path)} (needed for HF key {key}); the config says "
          f"num_layers={config.num_layers}, add_pooler={config.add_pooler}, "
          f"add_mlm_head={config.add_mlm_head}, add_decoder={config.add_decoder}.") from e
    out[key] = np.ascontiguousarray(_to_hf(np.asarray(jax.device_get(leaf)), kind))
  for alias, primary in _aliases(config).items():
    out[alias] = out[primary]
  return out


# ---------------------------------------------------------------------------------------------
# HF -> params
# ---------------------------------------------------------------------------------------------

def config_from_hf(hf: Mapping[str, Any], source: str = "config.json", **overrides: Any) -> BertConfig:
  """BertConfig from a Hugging Face config.json dict; refuses anything that is not a plain BERT."""
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or []
  if model_type != "bert":
    raise ConversionError(
        f"{source}: model_type={model_type!r}, architectures={archs}: bge-jax converts BERT only "
        "(model_type 'bert': BertModel, BertForMaskedLM, sentence-transformers BERT, RetroMAE).")
  unsupported = [a for a in archs if a not in ("BertModel", "BertForMaskedLM")]
  if unsupported:
    raise ConversionError(
        f"{source}: architectures {unsupported} are not supported; bge-jax reads BertModel and "
        "BertForMaskedLM checkpoints (and FlagEmbedding RetroMAE state dicts).")
  if hf.get("hidden_act", "gelu") != "gelu":
    raise ConversionError(f"{source}: hidden_act={hf['hidden_act']!r}; only exact 'gelu' is implemented.")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ConversionError(f"{source}: position_embedding_type={hf['position_embedding_type']!r}; "
                          "only 'absolute' is implemented.")
  fields = dict(
      vocab_size="vocab_size", hidden_size="hidden_size", num_layers="num_hidden_layers",
      num_heads="num_attention_heads", intermediate_size="intermediate_size",
      max_position_embeddings="max_position_embeddings", type_vocab_size="type_vocab_size",
      layer_norm_eps="layer_norm_eps", hidden_dropout="hidden_dropout_prob",
      attention_dropout="attention_probs_dropout_prob", initializer_range="initializer_range",
      pad_token_id="pad_token_id")
  values = {ours: hf[theirs] for ours, theirs in fields.items() if hf.get(theirs) is not None}
  missing = [theirs for ours, theirs in fields.items()
             if ours in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
             and theirs not in hf]
  if missing:
    raise ConversionError(f"{source}: missing required BERT fields {missing}.")
  try:
    return BertConfig(**{**values, **overrides})
  except ValueError as e:
    raise ConversionError(f"{source}: {e}") from e


def config_to_hf(config: BertConfig, architecture: str) -> dict[str, Any]:
  """A transformers BertConfig dict for `config`."""
  return {
      "architectures": [architecture], "model_type": "bert",
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "intermediate_size": config.intermediate_size, "hidden_act": "gelu",
      "hidden_dropout_prob": config.hidden_dropout,
      "attention_probs_dropout_prob": config.attention_dropout,
      "max_position_embeddings": config.max_position_embeddings,
      "type_vocab_size": config.type_vocab_size, "initializer_range": config.initializer_range,
      "layer_norm_eps": config.layer_norm_eps, "pad_token_id": config.pad_token_id,
      "position_embedding_type": "absolute", "dtype": "float32",
      "tie_word_embeddings": True,
  }


def detect_family(keys: Iterable[str]) -> str:
  keys = list(keys)
  if any(k.startswith(("lm.", "c_head.", "decoder_embeddings.")) for k in keys):
    return "retromae"
  if any(k.startswith(("bert.", "cls.")) for k in keys):
    return "bert_mlm"
  return "bert"


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: BertConfig, *,
                           source: str = "state dict", strict: bool = True,
                           dtype: Any = None) -> Any:
  """HF state dict -> params for `config` (whose family and parts must match the keys).

  Refuses, naming the keys: missing tensors, unknown tensors (unless strict=False, which drops
  them with a warning), shape mismatches (both shapes), and tied aliases that differ.
  """
  rows = key_table(config)
  expected = {key for _, key, _ in rows}
  optional = {**_aliases(config), **_tied_in_file(config)}
  missing = sorted(expected - set(state_dict))
  if missing:
    raise ConversionError(
        f"{source}: missing {len(missing)} tensor(s) for a {config.num_layers}-layer "
        f"{config.hf_family} checkpoint: {_short(missing)}")
  unknown = sorted(k for k in state_dict
                   if k not in expected and k not in optional and not _BUFFER_KEY.search(k))
  if unknown and strict:
    raise ConversionError(
        f"{source}: {len(unknown)} unknown tensor(s) {_short(unknown)}; bge-jax converts the "
        "BERT encoder, pooler, MLM head and RetroMAE decoder only. Pass strict=False "
        "(CLI: --ignore-unknown) to drop them.")
  if unknown:
    log.warning("%s: dropping %d unknown tensor(s): %s", source, len(unknown), _short(unknown))
  for alias, primary in optional.items():
    if alias in state_dict and not np.array_equal(np.asarray(state_dict[alias]),
                                                  np.asarray(state_dict[primary])):
      raise ConversionError(f"{source}: {alias} should be tied to {primary} but the values differ.")

  dtype = np.dtype(config.param_dtype if dtype is None else dtype)
  params: dict[str, Any] = {}
  for path, key, kind in rows:
    value = np.asarray(state_dict[key])
    want = _hf_shape(kind, path, config)
    if tuple(value.shape) != want:
      raise ConversionError(
          f"{source}: {key} has shape {tuple(value.shape)}, expected {want} for this config "
          f"(hidden_size={config.hidden_size}, heads={config.num_heads}, "
          f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}).")
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
      raise ConversionError(f"{source}: {key} has dtype {value.dtype}, expected a float tensor.")
    _set(params, path, np.ascontiguousarray(_from_hf(value, kind, config)).astype(dtype, copy=False))
  return params


def _short(keys: list[str], n: int = 8) -> str:
  return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors / .bin file, or of a sharded checkpoint's index .json.

  Raises:
    ConversionError: naming the file and the fix, for a missing, truncated or corrupt file or a
      .bin that torch refuses to load with weights_only=True.
  """
  try:
    return _read_state_dict(path)
  except ConversionError:
    raise
  except FileNotFoundError as e:
    raise ConversionError(f"{e.filename or path}: file not found; re-download the checkpoint "
                          "(a sharded one needs every file its index names).") from e
  except Exception as e:  # safetensors, torch.load (pickle, zip) and OS errors of a damaged file
    if path.endswith((".bin", ".pt")) and "weights_only" in str(e):
      raise ConversionError(
          f"{path}: torch refuses to load it with weights_only=True (it holds pickled objects "
          "besides tensors); convert it to model.safetensors where you trust the file, e.g. "
          "with safetensors.torch.save_file.") from e
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ConversionError(f"{path}: cannot read the weights ({type(e).__name__}: {first}); the "
                          "file is truncated or corrupt: re-download or re-export it.") from e


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".index.json"):
    index = read_json(path)
    if not isinstance(index, Mapping) or not isinstance(index.get("weight_map"), Mapping):
      raise ConversionError(f"{path}: no \"weight_map\" object; a sharded checkpoint's index maps "
                            "each tensor name to its shard file.")
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
      out.update(read_state_dict(os.path.join(os.path.dirname(path), shard)))
    return out
  if path.endswith(".safetensors"):
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
      return {k: f.get_tensor(k) for k in f.keys()}
  if path.endswith(".bin") or path.endswith(".pt"):
    try:
      import torch
    except ImportError as e:
      raise ConversionError(
          f"{path}: reading a PyTorch .bin needs torch (pip install 'bge-jax[test]' or "
          "torch==2.13.0), or convert it to model.safetensors first.") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
      raise ConversionError(f"{path}: expected a state dict (a mapping of tensors), got "
                            f"{type(sd).__name__}.")
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()
            if hasattr(v, "numpy")}
  raise ConversionError(f"{path}: unknown weight file type; expected .safetensors or .bin.")


def _weights_in(folder: str) -> str:
  for name in WEIGHT_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise ConversionError(f"{folder}: no weights found; expected one of {list(WEIGHT_FILES)}.")


def read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise ConversionError(f"{path}: file not found.") from e
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}.") from e


def read_sentence_transformers(folder: str) -> tuple[str, str | None, bool]:
  """(Transformer module folder, pooling or None, normalize) from a sentence-transformers folder."""
  modules = read_json(os.path.join(folder, "modules.json"))
  by_type: dict[str, dict] = {}
  for m in modules:
    by_type.setdefault(m.get("type", "").replace("sentence_transformers.models.", ""), m)
  if "Transformer" not in by_type:
    raise ConversionError(f"{folder}/modules.json lists no {ST_TRANSFORMER} module.")
  model_dir = os.path.join(folder, by_type["Transformer"].get("path", ""))
  pooling = None
  if "Pooling" in by_type:
    pcfg = read_json(os.path.join(folder, by_type["Pooling"]["path"], "config.json"))
    modes = [k for k, v in pcfg.items() if k.startswith("pooling_mode_") and v]
    mapping = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}
    if len(modes) != 1 or modes[0] not in mapping:
      raise ConversionError(
          f"{folder}/{by_type['Pooling']['path']}/config.json: pooling modes {modes}; bge-jax "
          "implements exactly one of pooling_mode_cls_token, pooling_mode_mean_tokens.")
    pooling = mapping[modes[0]]
  return model_dir, pooling, "Normalize" in by_type


def resolve(path: str) -> tuple[str, str, str | None, bool | None, str]:
  """(weights file, config.json, pooling, normalize, family hint) for a load_hf path."""
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file or folder.")
  pooling = normalize = None
  hint = ""
  if os.path.isdir(path):
    model_dir = path
    if os.path.isfile(os.path.join(path, "modules.json")):
      model_dir, pooling, normalize = read_sentence_transformers(path)
      hint = "sentence_transformers"
    cfg = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg):
      raise ConversionError(f"{model_dir}: no config.json (a Hugging Face BERT folder needs one).")
    return _weights_in(model_dir), cfg, pooling, normalize, hint
  cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
  if not os.path.isfile(cfg):
    raise ConversionError(f"{path}: a single weight file needs config.json beside it ({cfg}).")
  return path, cfg, None, None, hint


def load_hf(path: str, *, strict: bool = True, **overrides: Any) -> tuple[BertConfig, Any]:
  """(config, params) from a Hugging Face folder, a sentence-transformers folder, or a single
  .safetensors / .bin file with config.json beside it. See the module docstring for families.

  `overrides` set BertConfig fields (e.g. dtype="bfloat16", remat_policy="full").
  """
  weights, cfg_path, pooling, normalize, hint = resolve(path)
  state_dict = read_state_dict(weights)
  family = detect_family(state_dict)
  if hint == "sentence_transformers" and family == "bert":
    family = hint
  base, mlm = _PREFIXES[family]
  parts = dict(
      hf_family=family,
      add_pooler=f"{base}pooler.dense.weight" in state_dict,
      add_mlm_head=mlm is not None and f"{mlm}predictions.transform.dense.weight" in state_dict,
      add_decoder="c_head.attention.self.query.weight" in state_dict,
  )
  if pooling is not None:
    parts["pooling"] = pooling
  if normalize is not None:
    parts["normalize"] = normalize
  config = config_from_hf(read_json(cfg_path), cfg_path, **{**parts, **overrides})
  params = params_from_state_dict(state_dict, config, source=weights, strict=strict)
  return config, params


# ---------------------------------------------------------------------------------------------
# Writing Hugging Face / sentence-transformers folders
# ---------------------------------------------------------------------------------------------

RETROMAE_STATE_FILE = "retromae_state.safetensors"


def export_config(config: BertConfig) -> BertConfig:
  """The config of the HF model folder written for `config`: BertForMaskedLM naming when there
  is an MLM head, BertModel naming otherwise; the RetroMAE decoder goes to its own file."""
  family = "bert_mlm" if config.add_mlm_head else "bert"
  return config.replace(hf_family=family, add_decoder=False)


def save_hf(params: Any, config: BertConfig, out_dir: str, tokenizer: Any = None,
            sentence_transformers: bool = True, *, overwrite: bool = False,
            max_seq_length: int | None = None, prompts: Mapping[str, str] | None = None,
            default_prompt_name: str | None = None, model_card: str | None = None) -> str:
  """Writes a folder that transformers and sentence-transformers load with no weight warnings.

  * config.json + model.safetensors: BertForMaskedLM when the params have an MLM head
    (AutoModelForMaskedLM loads it whole, AutoModel the encoder), else BertModel.
  * tokenizer: a folder to copy tokenizer files from, or a tokenizer with `save_pretrained`.
  * sentence_transformers=True: modules.json (classic module names), 1_Pooling with the
    config's pooling (CLS unless the source said otherwise), 2_Normalize when normalising, and
    config_sentence_transformers.json with `prompts` (name -> text prepended to the input, e.g.
    {"query": instruction, "document": ""}: `encode(texts, prompt_name="query")`) and
    `default_prompt_name` (the prompt `encode` uses when given none; None = no prompt).
  * model_card: the text of a README.md (a model card) written into the folder.
  * params with a RetroMAE decoder: also `retromae_state.safetensors`, the full state in
    FlagEmbedding's naming (`load_hf` reads it back with the folder's config.json).

  Written into a temporary folder and renamed into place: a failure leaves no partial output.
  """
  from safetensors.numpy import save_file

  hf_config = export_config(config)
  arch = "BertForMaskedLM" if hf_config.add_mlm_head else "BertModel"

  def write(tmp: str) -> None:
    state = to_hf_state_dict(_strip_decoder(params), hf_config)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config_to_hf(config, arch), f, indent=2)
    if config.add_decoder:
      full = to_hf_state_dict(params, config.replace(hf_family="retromae"))
      # safetensors refuses aliasing arrays; the copies are what torch.save(state_dict()) holds.
      full = {k: np.array(v, copy=True) for k, v in full.items()}
      save_file(full, os.path.join(tmp, RETROMAE_STATE_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
      write_tokenizer(tokenizer, tmp)
    if sentence_transformers:
      write_sentence_transformers_files(tmp, config, max_seq_length, prompts,
                                        default_prompt_name)
    if model_card is not None:
      with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card)

  return atomic_output_dir(out_dir, write, overwrite=overwrite)


def _strip_decoder(params: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in params.items() if k != "decoder"}


def write_tokenizer(tokenizer: Any, out_dir: str) -> None:
  if isinstance(tokenizer, (str, os.PathLike)):
    src = str(tokenizer)
    found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if not found:
      raise ConversionError(f"{src}: no tokenizer files (looked for {list(TOKENIZER_FILES)}).")
    for name in found:
      shutil.copy2(os.path.join(src, name), os.path.join(out_dir, name))
  elif hasattr(tokenizer, "save_pretrained"):
    tokenizer.save_pretrained(out_dir)
  else:
    raise TypeError(f"tokenizer must be a folder path or have save_pretrained, got {type(tokenizer)}")


def write_sentence_transformers_files(out_dir: str, config: BertConfig,
                                      max_seq_length: int | None = None,
                                      prompts: Mapping[str, str] | None = None,
                                      default_prompt_name: str | None = None) -> None:
  """sentence-transformers' module files (see `save_hf`) in out_dir."""
  prompts = {str(k): str(v) for k, v in (prompts or {}).items()}
  if default_prompt_name is not None and default_prompt_name not in prompts:
    raise ValueError(f"default_prompt_name={default_prompt_name!r} is not one of the prompts "
                     f"{sorted(prompts)}")
  modules = [{"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER},
             {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_POOLING}]
  if config.normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_NORMALIZE})
    os.makedirs(os.path.join(out_dir, "2_Normalize"), exist_ok=True)
  with open(os.path.join(out_dir, "modules.json"), "w") as f:
    json.dump(modules, f, indent=2)
  os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
  pooling = {"word_embedding_dimension": config.hidden_size,
             "pooling_mode_cls_token": config.pooling == "cls",
             "pooling_mode_mean_tokens": config.pooling == "mean",
             "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
  with open(os.path.join(out_dir, "1_Pooling", "config.json"), "w") as f:
    json.dump(pooling, f, indent=2)
  with open(os.path.join(out_dir, "sentence_bert_config.json"), "w") as f:
    json.dump({"max_seq_length": max_seq_length or config.max_position_embeddings,
               "do_lower_case": False}, f, indent=2)
  # sentence-transformers' own keys (SentenceTransformer._get_model_config; it reads prompts and
  # default_prompt_name at load, and compares with cosine unless told otherwise). Dot products
  # for unnormalised embeddings: what the contrastive loss scored.
  with open(os.path.join(out_dir, ST_CONFIG_FILE), "w") as f:
    json.dump({"model_type": "SentenceTransformer", "prompts": prompts,
               "default_prompt_name": default_prompt_name,
               "similarity_fn_name": "cosine" if config.normalize else "dot"}, f, indent=2)
