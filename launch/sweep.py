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
import os
import sys
from typing import Sequence

# Run as a script from a clone: the package and configs/ are importable from the repository.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from bge_jax import sweep  # noqa: E402


def _parser() -> argparse.ArgumentParser:
  summary, _, details = __doc__.partition("\n\n")
  p = argparse.ArgumentParser(prog="launch/sweep.py", description=summary, epilog=details,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                 help="the config file as launch/train.py takes it (e.g. configs/retromae.py:tiny)"
                 ", or a bundled config's name (retromae:tiny).")
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
  p.add_argument("--out", default=None, metavar="FILE",
                 help="--collect/--run: also write the table here.")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  mode = args.mode or "print"
  try:
    runs = sweep.expand(args.config, args.grid, args.zip, args.set, not args.no_config_sweep)
  except sweep.SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  config = sweep.train_config_arg(args.config)
  if mode == "print":
    for line in sweep.commands(runs, config, args.workdir):
      print(line)
    return 0
  failed = []
  if mode == "run":
    failed = sweep.run_all(runs, config, args.workdir, args.keep_going)
  metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
  table = sweep.collect(runs, args.workdir, metrics)
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
