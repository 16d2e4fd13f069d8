"""Model weights on disk, in every form the project reads: its own params folder, a trainer's
workdir, a Hugging Face folder (`load_source`).

"Params folder" is the project's exported model format (a model, not a training state: the
trainer's orbax TrainState checkpoints are `bge_jax.train.checkpoints`). Layout::

    <dir>/bge_jax.json   {"format": "bge-jax/params", "version": 1, "config": {BertConfig fields}}
    <dir>/params/        orbax StandardCheckpointer tree (same nesting as the Flax params)
    <dir>/tokenizer/     Hugging Face tokenizer files (when known)

Written atomically (temporary folder, then rename). `load_params` restores onto the default
device, or straight into given shardings (no unsharded copy is made).

A trainer's workdir (`run_info.json` + `checkpoints/<step>/`) is read for its params too
(`load_run_params`): evaluation, `init_from` and `jax-to-hf` take a run, finished or not.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from bge_jax import convert
from bge_jax.config import BertConfig
from bge_jax.data import files

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

  return files.atomic_output_dir(out_dir, write, overwrite=overwrite)


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
        f"{path}: not a bge-jax params folder (no {META_FILE}); for a Hugging Face folder use "
        "bge_jax.convert.load_hf.")
  config = load_config(path)
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(os.path.join(path, "params")).item_metadata
  if shardings is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
                             metadata)
  target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                        metadata, shardings)
  params = checkpointer.restore(os.path.join(path, "params"), target)
  checkpointer.close()
  return config, params


def tokenizer_dir(path: str) -> str | None:
  folder = os.path.join(path, "tokenizer")
  return folder if os.path.isdir(folder) else None


# ---------------------------------------------------------------------------------------------
# Training runs: a trainer workdir's train-state checkpoints, read for their params.
# ---------------------------------------------------------------------------------------------

def is_run_workdir(path: str | os.PathLike) -> bool:
  """A trainer workdir: `run_info.json` (the model config) and a `checkpoints/` folder."""
  return (os.path.isfile(os.path.join(path, "run_info.json"))
          and os.path.isdir(os.path.join(path, "checkpoints")))


def run_steps(workdir: str | os.PathLike) -> list[int]:
  """Committed checkpoint steps of a run, ascending (orbax's in-flight *.tmp-* folders excluded)."""
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder)
                if n.isdigit() and os.path.isdir(os.path.join(folder, n, "default")))


def run_tokenizer_folder(workdir: str | os.PathLike) -> str:
  """The tokenizer the run trained with: its config.tokenizer, else config.model.init_from's."""
  run_config = convert.read_json(os.path.join(workdir, "config.json"))
  path = run_config.get("tokenizer") or run_config.get("model", {}).get("init_from") or ""
  if not path:
    raise convert.ConversionError(
        f"{workdir}/config.json names no tokenizer (config.tokenizer and "
        "config.model.init_from are empty); give the tokenizer folder explicitly.")
  return tokenizer_folder(path) or path


def load_run_params(workdir: str | os.PathLike, step: int | None = None) -> tuple[int, Any, Any]:
  """(step, BertConfig, params) of a trainer workdir's checkpoint: the newest, or `step`.

  Reads only the params of the saved train state (orbax partial restore: the optimizer state is
  not loaded), onto the default device. Safe while the run is still writing checkpoints: only
  committed steps are listed.
  """
  import orbax.checkpoint as ocp

  workdir = os.path.abspath(os.fspath(workdir))  # orbax (tensorstore) wants absolute paths
  steps = run_steps(workdir)
  if not steps:
    raise convert.ConversionError(
        f"{workdir}/checkpoints: no committed checkpoint yet (the trainer writes one every "
        "config.checkpoint.every_steps steps and at the end).")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise convert.ConversionError(
        f"{workdir}/checkpoints: no step {step}; the run has steps {steps}.")
  info_path = os.path.join(workdir, "run_info.json")
  try:
    config = BertConfig.from_dict(convert.read_json(info_path)["model"])
  except (KeyError, TypeError, ValueError) as e:
    raise convert.ConversionError(f"{info_path}: no usable model config ({e}).") from e
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  if "params" not in tree:
    raise convert.ConversionError(
        f"{path}: not a bge-jax train state (no 'params'; has {sorted(tree)}).")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                   tree["params"])}
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True))
  return step, config, restored["params"]


# ---------------------------------------------------------------------------------------------
# Any model source: what `model.init_from`, `launch/merge.py` and the converters read.
# ---------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def tokenizer_folder(path: str | os.PathLike) -> str | None:
  """The folder with the tokenizer files of a model source: a bge-jax params folder's tokenizer/,
  a training run's (`run_tokenizer_folder`), else the folder itself or the one holding its
  weights (a sentence-transformers module, a single weight file's folder). None: none found."""
  path = os.fspath(path)
  if os.path.isdir(path) and is_checkpoint(path):
    return tokenizer_dir(path)
  if os.path.isdir(path) and is_run_workdir(path):
    return run_tokenizer_folder(path)
  candidates = [os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))]
  try:
    candidates.append(os.path.dirname(os.path.abspath(convert.resolve(path)[0])))
  except convert.ConversionError:  # a tokenizer-only folder, or no weights there
    pass
  for folder in candidates:
    if any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES):
      return folder
  return None


def load_source(path: str | os.PathLike) -> tuple[BertConfig, Any, str]:
  """(config, params as host arrays, what it is) of any model source: a bge-jax params folder
  folder, a training run's workdir (its newest checkpoint: finished or not), or a Hugging Face /
  sentence-transformers folder or weight file (`convert.load_hf`)."""
  path = os.fspath(path)
  if os.path.isdir(path) and is_checkpoint(path):
    config, params = load_params(path)
    return config, to_numpy(params), "bge-jax params folder"
  if os.path.isdir(path) and is_run_workdir(path):
    step, config, params = load_run_params(path)
    return config, to_numpy(params), f"training run, step {step}"
  config, params = convert.load_hf(path)
  return config, params, "Hugging Face"


def to_numpy(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
