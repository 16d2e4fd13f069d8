"""Expand a hyper-parameter sweep into runs: print their commands, run them, or collect results.

  python launch/sweep.py --config configs/contrastive.py:bge-base-en --workdir runs/lr \
      --grid optimizer.lr=1e-5,2e-5,3e-5 --grid loss.temperature=0.01,0.02 \
      --set data.train=pairs.jsonl --set num_train_steps=2000            # prints 6 commands
  python launch/sweep.py ... --run        # runs them one after the other on this machine
  python launch/sweep.py ... --collect    # one markdown table of every run's final metrics

A sweep is the cross product of its axes:
  --grid KEY=V1,V2,...   one axis per flag; several --grid flags multiply (3 x 2 = 6 runs above).
  --zip KEY=V1,V2,...    keys that move together: all --zip flags form ONE axis, so they need the
                         same number of values (e.g. --zip optimizer.lr=1e-5,3e-5
                         --zip batch_size=256,1024 is 2 runs, not 4).
  get_sweep()            a function beside get_config in the config file returning a list of
                         {key: value} dicts (one per run; Python values, e.g. built with
                         itertools.product); it is one more axis. `get_sweep(arg)` receives the
                         ':arg' of --config. --no-config-sweep ignores it.
  --set KEY=VALUE        the same override in every run (not part of the run names).
A value list that needs commas is written as a Python list: --grid 'data.train=["a,b", "c"]'.
Keys are config keys as `--config.KEY=` takes them (see configs/common.py); each value is checked
against the config's field type before anything runs, and an unknown key is refused with the
closest matches.

Each run gets its own workdir, WORKDIR/NAME, where NAME is made of the swept keys (their last
component when that is unambiguous) and values, e.g. runs/lr/lr=2e-05,temperature=0.02. Names
depend only on the overrides, so re-running a sweep resumes every run (train.py resumes from a
workdir's newest checkpoint) and --collect finds them again.

Modes (one; --print is the default):
  --print    one `python launch/train.py ...` command per line, for a cluster scheduler.
  --run      the runs in sequence in subprocesses (exactly the printed commands), then the table;
             stops at the first failed run unless --keep-going.
  --collect  reads WORKDIR/NAME/metrics.jsonl of every run (the trainer's log; the last value of
             each metric, so evaluation rows count too) and prints a markdown table: the swept
             values, the last step with the run's status (done, or step/total while unfinished),
             and the metrics (--metrics; default the loss and every eval/* metric). --out FILE
             also writes it to FILE.
Errors (bad key, bad value, mismatched --zip lengths, duplicate run names) exit 2 with one
`error:` line.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import importlib.util
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "launch", "train.py")
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
  """(module, arg) of a `path/to/config.py[:arg]` spec, as ml_collections' config_flags reads it."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise SweepError(f"--config {spec}: no such file {path!r}")
  name = "sweep_config_" + re.sub(r"\W", "_", os.path.abspath(path))
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise SweepError(f"--config {spec}: {path} has no get_config()")
  return module, arg


def _call(fn, arg: str):
  """fn(arg) when fn takes a parameter (as get_config(arg) does), else fn()."""
  return fn(arg) if inspect.signature(fn).parameters else fn()


def leaf_keys(config, prefix: str = "") -> list[str]:
  from ml_collections import ConfigDict
  keys = []
  for k in config.keys():
    v = config[k]
    if isinstance(v, ConfigDict):
      keys += leaf_keys(v, f"{prefix}{k}.")
    else:
      keys.append(f"{prefix}{k}")
  return keys


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
    close = difflib.get_close_matches(key, leaf_keys(config), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see configs/common.py"
    raise SweepError(f"{where}: {key!r} is not a config key{hint}")
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


def axes_from_flags(grid: Sequence[str], zips: Sequence[str]) -> tuple[list[list[dict[str, Any]]], dict[str, str]]:
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

  base = _call(module.get_config, arg)
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
    config = _call(module.get_config, arg)
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


def _parser() -> argparse.ArgumentParser:
  summary, _, details = __doc__.partition("\n\n")
  p = argparse.ArgumentParser(prog="launch/sweep.py", description=summary, epilog=details,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                 help="the config file as launch/train.py takes it (e.g. configs/retromae.py:tiny).")
  p.add_argument("--workdir", required=True, metavar="DIR",
                 help="the sweep's folder; run NAME trains in DIR/NAME.")
  p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                 help="one axis of the grid (repeatable; axes multiply).")
  p.add_argument("--zip", action="append", default=[], metavar="KEY=V1,V2",
                 help="keys that move together (repeatable; all --zip keys form one axis).")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="an override applied to every run (repeatable).")
  p.add_argument("--no-config-sweep", action="store_true",
                 help="ignore get_sweep() in the config file.")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--print", dest="mode", action="store_const", const="print",
                    help="print one train.py command per run (default).")
  mode.add_argument("--run", dest="mode", action="store_const", const="run",
                    help="run them in sequence here, then print the table.")
  mode.add_argument("--collect", dest="mode", action="store_const", const="collect",
                    help="print the markdown table of the runs' final metrics.")
  p.add_argument("--keep-going", action="store_true", help="--run: continue after a failed run.")
  p.add_argument("--metrics", default=None, metavar="K1,K2",
                 help="--collect: metric columns (default: loss and every eval/* metric).")
  p.add_argument("--out", default=None, metavar="FILE", help="--collect/--run: also write the table here.")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  mode = args.mode or "print"
  try:
    runs = expand(args.config, args.grid, args.zip, args.set, not args.no_config_sweep)
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if mode == "print":
    for line in commands(runs, args.config, args.workdir):
      print(line)
    return 0
  failed = []
  if mode == "run":
    failed = run_all(runs, args.config, args.workdir, args.keep_going)
  metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
  table = collect(runs, args.workdir, metrics)
  print(table, end="")
  if args.out:
    with open(args.out, "w") as f:
      f.write(table)
  if failed:
    print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
