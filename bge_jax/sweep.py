"""Sweeps: grids, zips and get_sweep() as named, type-checked runs; their commands and results."""

from __future__ import annotations

import ast
import hashlib
import inspect
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from bge_jax import config_files

TRAIN = os.path.join(config_files.REPO, "launch", "train.py")
MAX_NAME = 120


class SweepError(ValueError):
  """A sweep that cannot be expanded; the message names the flag or key and the fix."""


@dataclass
class Run:
  name: str
  overrides: dict[str, Any]  # the swept keys -> values (the run's identity)
  fixed: dict[str, Any] = field(default_factory=dict)  # --set overrides

  def args(self, config: str, workdir: str) -> list[str]:
    """train.py's arguments for this run."""
    out = ["--config", config, "--workdir", os.path.join(workdir, self.name)]
    for key, value in {**self.fixed, **self.overrides}.items():
      out.append(f"--config.{key}={format_value(value)}")
    return out


# ---------------------------------------------------------------------------------------------
# Config: load, look up keys, type-check values.
# ---------------------------------------------------------------------------------------------

def load_config_module(spec: str):
  """(module, arg) of a `path/to/config.py[:arg]` spec (or a bundled `name[:arg]`)."""
  path, arg = config_files.resolve(spec)
  try:
    return config_files.load_module(path), arg
  except config_files.ConfigFileError as e:
    raise SweepError(f"--config {spec}: {e}") from e


def _call(fn, arg: str | None):
  """fn(arg) when fn takes a parameter (as get_sweep(arg) may), else fn()."""
  return fn(arg or "") if inspect.signature(fn).parameters else fn()


def _parent(config, key: str, where: str):
  from ml_collections import ConfigDict
  parts = key.split(".")
  node = config
  for part in parts[:-1]:
    if not isinstance(node, ConfigDict) or part not in node:
      node = None
      break
    node = node[part]
  if node is None or not isinstance(node, ConfigDict) or parts[-1] not in node or isinstance(
      node[parts[-1]], ConfigDict):
    hint = config_files.suggest(key, config_files.flat_keys(config), prefix="")
    raise SweepError(f"{where}: {key!r} is not a config key{hint or '; see configs/common.py'}")
  return node, parts[-1]


def coerce(config, key: str, value: Any, where: str) -> Any:
  """`value` (a command-line string or a Python value) as the type of config field `key`."""
  node, leaf = _parent(config, key, where)
  kind = node.get_type(leaf)
  try:
    if isinstance(value, str) and kind is not str:
      if kind is bool:
        low = value.lower()
        if low not in ("true", "false", "1", "0"):
          raise ValueError(f"{value!r} is not a boolean (true/false)")
        value = low in ("true", "1")
      elif kind in (int, float):
        value = ast.literal_eval(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    node[leaf] = value  # ml_collections checks the type
  except (ValueError, TypeError, SyntaxError) as e:
    raise SweepError(f"{where}: {key}={value!r} does not fit the field's type "
                     f"{getattr(kind, '__name__', kind)}: {e}") from e
  return node[leaf]


def format_value(value: Any) -> str:
  """The text of `--config.key=<text>` that train.py parses back to `value`."""
  if isinstance(value, float):
    return repr(value)
  return str(value)


# ---------------------------------------------------------------------------------------------
# Expansion.
# ---------------------------------------------------------------------------------------------

def parse_assignment(text: str, flag: str) -> tuple[str, list[str]]:
  """'key=v1,v2' or 'key=[...python list...]' -> (key, values as strings or Python values)."""
  key, sep, rhs = text.partition("=")
  key = key.strip()
  if not sep or not key:
    raise SweepError(f"{flag} {text!r}: expected KEY=V1,V2,...")
  rhs = rhs.strip()
  if rhs.startswith("["):
    try:
      values = ast.literal_eval(rhs)
    except (ValueError, SyntaxError) as e:
      raise SweepError(f"{flag} {key}: {rhs!r} is not a Python list literal: {e}") from e
    if not isinstance(values, list):
      raise SweepError(f"{flag} {key}: {rhs!r} is not a list")
  else:
    values = [v.strip() for v in rhs.split(",")]
  if not values or any(v == "" for v in values):
    raise SweepError(f"{flag} {key}: empty value in {rhs!r}")
  return key, values


def axes_from_flags(grid: Sequence[str], zips: Sequence[str]
                    ) -> tuple[list[list[dict[str, Any]]], dict[str, str]]:
  """(axes, the flag of each key): each axis is a list of partial override dicts; the runs are
  the cross product of the axes."""
  axes = []
  seen: dict[str, str] = {}

  def claim(key, flag):
    if key in seen:
      raise SweepError(f"{flag} {key}: the key is swept twice")
    seen[key] = flag

  for text in grid:
    key, values = parse_assignment(text, "--grid")
    claim(key, "--grid")
    axes.append([{key: v} for v in values])
  if zips:
    columns = []
    for text in zips:
      key, values = parse_assignment(text, "--zip")
      claim(key, "--zip")
      columns.append((key, values))
    lengths = {k: len(v) for k, v in columns}
    if len(set(lengths.values())) != 1:
      raise SweepError(f"--zip keys need the same number of values, got {lengths}")
    axes.append([dict(zip([k for k, _ in columns], row))
                 for row in zip(*[v for _, v in columns])])
  return axes, seen


def config_sweep_axis(module, arg: str) -> list[dict[str, Any]] | None:
  fn = getattr(module, "get_sweep", None)
  if fn is None:
    return None
  runs = _call(fn, arg)
  if not isinstance(runs, (list, tuple)) or not all(isinstance(r, dict) for r in runs) or not runs:
    raise SweepError(f"get_sweep() in {module.__file__} must return a non-empty list of "
                     f"{{key: value}} dicts, got {type(runs).__name__}")
  return [dict(r) for r in runs]


def _short_keys(keys: Iterable[str]) -> dict[str, str]:
  keys = list(dict.fromkeys(keys))
  last = [k.rsplit(".", 1)[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _name_value(value: Any) -> str:
  text = format_value(value)
  if "/" in text:  # a path: its last component names it
    text = os.path.basename(text.rstrip("/")) or text
  return text.replace(",", "+")  # "," separates the keys of a name


def run_name(overrides: dict[str, Any], short: dict[str, str]) -> str:
  if not overrides:
    return "default"
  name = ",".join(f"{short[k]}={_name_value(v)}" for k, v in overrides.items())
  name = re.sub(r"[^A-Za-z0-9._=,+@-]", "-", name)
  if len(name) > MAX_NAME:
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    name = f"{name[:MAX_NAME - 9]}-{digest}"
  return name


def expand(config_spec: str, grid: Sequence[str] = (), zips: Sequence[str] = (),
           sets: Sequence[str] = (), use_config_sweep: bool = True) -> list[Run]:
  """The runs of a sweep, every value type-checked against the config."""
  module, arg = load_config_module(config_spec)
  axes, sources = axes_from_flags(grid, zips)
  from_config = config_sweep_axis(module, arg) if use_config_sweep else None
  if from_config is not None:
    axes.insert(0, from_config)
  fixed_raw = {}
  for text in sets:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
      raise SweepError(f"--set {text!r}: expected KEY=VALUE")
    fixed_raw[key.strip()] = value

  base = config_files.get_config(module, arg)
  fixed = {k: coerce(base, k, v, "--set") for k, v in fixed_raw.items()}
  runs = []
  for combo in itertools.product(*axes) if axes else [()]:
    overrides: dict[str, Any] = {}
    for part in combo:
      clash = set(part) & set(overrides)
      if clash:
        raise SweepError(f"keys {sorted(clash)} are set by two sweep axes (get_sweep and "
                         "--grid/--zip); sweep each key once")
      overrides.update(part)
    clash = set(overrides) & set(fixed)
    if clash:
      raise SweepError(f"--set {sorted(clash)}: also swept; drop one of them")
    config = config_files.get_config(module, arg)
    for k, v in fixed.items():
      coerce(config, k, v, "--set")
    typed = {k: coerce(config, k, v, sources.get(k, "get_sweep()"))
             for k, v in overrides.items()}
    runs.append(Run(name="", overrides=typed, fixed=dict(fixed)))
  short = _short_keys(k for r in runs for k in r.overrides)
  names: dict[str, Run] = {}
  for run in runs:
    run.name = run_name(run.overrides, short)
    if run.name in names:
      raise SweepError(f"two runs are both named {run.name!r} ({names[run.name].overrides} and "
                       f"{run.overrides}); a sweep value is repeated")
    names[run.name] = run
  return runs


# ---------------------------------------------------------------------------------------------
# Modes.
# ---------------------------------------------------------------------------------------------

def train_config_arg(spec: str) -> str:
  """The --config text train.py takes for `spec`: a bundled `name[:arg]` becomes its file's path
  (config_flags reads files only); a file path is kept as given."""
  if os.path.isfile(spec.partition(":")[0]):
    return spec
  path, arg = config_files.resolve(spec)
  rel = os.path.relpath(path)
  path = path if rel.startswith("..") else rel
  return path if arg is None else f"{path}:{arg}"


def _train_script_for_print() -> str:
  rel = os.path.relpath(TRAIN)
  return TRAIN if rel.startswith("..") else rel


def commands(runs: Sequence[Run], config: str, workdir: str, python: str = "python") -> list[str]:
  script = _train_script_for_print()
  return [shlex.join([python, script] + run.args(config, workdir)) for run in runs]


def final_metrics(workdir: str) -> tuple[dict[str, Any], int | None]:
  """(last value of every metric in workdir/metrics.jsonl, total steps from run_info.json)."""
  from bge_jax.train.metrics import read_metrics

  last: dict[str, Any] = {}
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    for row in read_metrics(workdir):
      step = row.pop("step")
      last.update(row)
      last["step"] = max(step, last.get("step", step))
  total = None
  info = os.path.join(workdir, "run_info.json")
  if os.path.exists(info):
    with open(info) as f:
      total = json.load(f).get("total_steps")
  return last, total


def _fmt(value: Any) -> str:
  if value is None:
    return "—"
  if isinstance(value, float):
    return f"{value:.4g}" if math.isfinite(value) else str(value)
  return str(value)


def collect(runs: Sequence[Run], workdir: str, metrics: Sequence[str] | None = None) -> str:
  """A markdown table: run, swept values, step/status, final metrics."""
  results = [(run, *final_metrics(os.path.join(workdir, run.name))) for run in runs]
  if metrics is None:
    found = {k for _, last, _ in results for k in last}
    metrics = (["loss"] if "loss" in found else []) + sorted(k for k in found
                                                             if k.startswith("eval/"))
  keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
  short = _short_keys(keys)
  header = ["run"] + [short[k] for k in keys] + ["step"] + list(metrics)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for run, last, total in results:
    if not last:
      status = "not started" if not os.path.isdir(os.path.join(workdir, run.name)) else "no metrics"
    elif total is not None and last.get("step", 0) >= total:
      status = f"{last['step']} (done)"
    else:
      status = f"{last.get('step', '?')}/{total if total is not None else '?'}"
    cells = [run.name] + [_fmt(run.overrides.get(k)) for k in keys] + [status]
    cells += [_fmt(last.get(m)) for m in metrics]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def run_all(runs: Sequence[Run], config: str, workdir: str, keep_going: bool) -> list[str]:
  """Runs each train.py command in a subprocess, in order; returns the names that failed."""
  failed = []
  for i, run in enumerate(runs, 1):
    cmd = [sys.executable, TRAIN] + run.args(config, workdir)
    print(f"[sweep {i}/{len(runs)}] {run.name}: {shlex.join(cmd)}", flush=True)
    code = subprocess.call(cmd)
    if code != 0:
      print(f"[sweep {i}/{len(runs)}] {run.name} failed (exit {code})", file=sys.stderr, flush=True)
      failed.append(run.name)
      if not keep_going:
        break
  return failed
