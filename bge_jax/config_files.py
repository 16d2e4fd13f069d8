"""Run config files: load `path.py[:arg]` or a bundled name, flatten keys, suggest close ones."""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
from typing import Any, Iterable

# The repository (the folder above this package) and its bundled configs. The repository goes on
# sys.path when a file is loaded, so that a config's `from configs.common import ...` resolves
# wherever the file itself lies.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


class ConfigFileError(ValueError):
  """A config file that cannot be loaded; the message names the file."""


def add_repo_to_path() -> None:
  if REPO not in sys.path:
    sys.path.insert(0, REPO)


def bundled() -> list[str]:
  """The names of the bundled configs (configs/<name>.py with a get_config)."""
  if not os.path.isdir(CONFIGS):
    return []
  names = []
  for f in sorted(os.listdir(CONFIGS)):
    if f.endswith(".py") and not f.startswith("_"):
      with open(os.path.join(CONFIGS, f), encoding="utf-8") as src:
        if "def get_config(" in src.read():
          names.append(f[:-3])
  return names


def resolve(spec: str) -> tuple[str, str | None]:
  """(path, arg) of `path.py[:arg]` or of a bundled `name[:arg]` (configs/<name>.py).

  arg is None without a ':', as ml_collections' config_flags calls get_config() then.
  """
  target, sep, arg = spec.partition(":")
  if target and not target.endswith(".py") and "/" not in target and os.sep not in target:
    target = os.path.join(CONFIGS, f"{target}.py")
  return target, (arg if sep else None)


def load_module(path: str):
  """The module of a config file, executed afresh; it must define get_config."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    hint = ""
    if os.path.dirname(os.path.abspath(path)) == CONFIGS:
      hint = f"; the bundled configs are {', '.join(bundled())}"
    raise ConfigFileError(f"no config file {path}{hint}")
  add_repo_to_path()
  # A name of its own per file: two files never share a module, and dataclasses or pickling
  # inside the file find it in sys.modules.
  name = "_bge_jax_config_" + re.sub(r"\W", "_", os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    sys.modules.pop(name, None)
    raise
  if not callable(getattr(module, "get_config", None)):
    raise ConfigFileError(f"config file {path} has no get_config() function")
  return module


def get_config(module, arg: str | None):
  """module.get_config(arg), or get_config() without an arg (as config_flags calls it)."""
  return module.get_config() if arg is None else module.get_config(arg)


def load(spec: str):
  """The ConfigDict of `path.py[:arg]` or of a bundled `name[:arg]` (e.g. `finetune:tiny`)."""
  path, arg = resolve(os.fspath(spec))
  return get_config(load_module(path), arg)


def flat_keys(config, prefix: str = "") -> dict[str, Any]:
  """Dotted leaf key ("optimizer.lr") -> value of a nested ConfigDict (or dict)."""
  out = {}
  for k in config.keys():
    v = config[k]
    if hasattr(v, "keys") and hasattr(v, "items"):
      out.update(flat_keys(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def suggest(key: str, keys: Iterable[str], prefix: str = "config.") -> str:
  """'; did you mean config.x, ...?' for an unknown dotted key, or '' when nothing is close.

  Siblings first (optimizer.lrr -> optimizer.lr), whole keys when the parent is unknown
  (optimiser.lr -> optimizer.lr), then close leaf names elsewhere (lr -> optimizer.lr).
  """
  keys = list(keys)
  parent, _, leaf = key.rpartition(".")
  siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
  close = [f"{parent}.{m}" if parent else m
           for m in difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.6)]
  if not siblings:  # a misspelt parent
    close += difflib.get_close_matches(key, keys, n=3, cutoff=0.8)
  leaves = set(difflib.get_close_matches(leaf, {k.rpartition(".")[2] for k in keys}, n=3,
                                         cutoff=0.75))
  close += [k for k in sorted(keys) if k.rpartition(".")[2] in leaves and k not in close]
  if not close:
    return ""
  return "; did you mean " + ", ".join(prefix + c for c in close[:5]) + "?"


def set_keys(config, values: dict[str, Any]):
  """Sets dotted keys ({"optimizer.lr": 1e-4}) on a ConfigDict, as --config.optimizer.lr=1e-4
  would; returns the config. An unknown key raises KeyError naming it and the closest ones."""
  keys = flat_keys(config)
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise KeyError(f"{key!r} is not a config key{suggest(key, keys)}")
      node = node[part]
    if leaf not in node:
      raise KeyError(f"{key!r} is not a config key{suggest(key, keys)}")
    node[leaf] = value
  return config
