"""The project's own model checkpoint: an orbax params tree, its BertConfig, and the tokenizer.

Layout of a checkpoint folder::

    <dir>/bge_jax.json   {"format": "bge-jax/params", "version": 1, "config": {BertConfig fields}}
    <dir>/params/        orbax StandardCheckpointer tree (same nesting as the Flax params)
    <dir>/tokenizer/     Hugging Face tokenizer files (when known)

Written atomically (temporary folder, then rename). `load_params` restores onto the default
device, or straight into given shardings (no unsharded copy is made).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from bge_jax import convert
from bge_jax.config import BertConfig

FORMAT = "bge-jax/params"
VERSION = 1
META_FILE = "bge_jax.json"


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, META_FILE))


def save_params(out_dir: str, params: Any, config: BertConfig, tokenizer: Any = None, *,
                overwrite: bool = False) -> str:
  """Writes a project checkpoint; `tokenizer` is a folder with tokenizer files or a tokenizer."""
  import orbax.checkpoint as ocp

  def write(tmp: str) -> None:
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump({"format": FORMAT, "version": VERSION, "config": config.to_dict()}, f, indent=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, "params"), params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    if tokenizer is not None:
      os.makedirs(os.path.join(tmp, "tokenizer"))
      convert.write_tokenizer(tokenizer, os.path.join(tmp, "tokenizer"))

  return convert.atomic_output_dir(out_dir, write, overwrite=overwrite)


def load_config(path: str) -> BertConfig:
  meta_path = os.path.join(path, META_FILE)
  meta = convert.read_json(meta_path)
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise convert.ConversionError(
        f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; this "
        f"bge-jax reads {FORMAT!r} version {VERSION}.")
  try:
    return BertConfig.from_dict(meta["config"])
  except (KeyError, ValueError, TypeError) as e:
    raise convert.ConversionError(f"{meta_path}: bad config: {e}") from e


def load_params(path: str, shardings: Any = None) -> tuple[BertConfig, Any]:
  """(config, params) of a project checkpoint; with `shardings` each leaf restores sharded."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  if not is_checkpoint(path):
    raise convert.ConversionError(
        f"{path}: not a bge-jax checkpoint (no {META_FILE}); for a Hugging Face folder use "
        "bge_jax.convert.load_hf.")
  config = load_config(path)
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(os.path.join(path, "params")).item_metadata
  if shardings is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                             metadata)
  target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                        metadata, shardings)
  params = checkpointer.restore(os.path.join(path, "params"), target)
  checkpointer.close()
  return config, params


def tokenizer_dir(path: str) -> str | None:
  folder = os.path.join(path, "tokenizer")
  return folder if os.path.isdir(folder) else None


def to_numpy(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
