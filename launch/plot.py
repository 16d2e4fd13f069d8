"""Plot training curves of one or several runs into a PNG.

  python launch/plot.py runs/s2 [runs/s3 ...] --out curves.png [--metrics loss eval/* lr]

Each WORKDIR is a trainer workdir (its metrics.jsonl is read) or a metrics.jsonl file. One
subplot per metric against the step, the runs overlaid with a legend. By default the training
loss and every evaluation metric (eval/*); --metrics takes names or glob patterns (e.g. lr,
grad_norm, accuracy, "eval/sts/*"), and an unknown one is refused with the list of logged
metrics. Uses matplotlib (Agg, no display needed). For live curves point TensorBoard at
WORKDIR/tb instead. Errors (a missing or empty log) print one `error:` line and exit 2.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  summary, _, details = __doc__.partition("\n\n")
  p = argparse.ArgumentParser(prog="launch/plot.py", description=summary, epilog=details,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run workdirs or metrics.jsonl files")
  p.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
  p.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                 help="metric names or glob patterns (default: loss eval/*)")
  p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                 help="legend labels, one per WORKDIR (default: folder names)")
  p.add_argument("--title", default=None, help="figure title")
  args = p.parse_args(argv)

  from bge_jax.train.plots import PlotError, plot_runs

  try:
    out = plot_runs(args.workdirs, args.out, args.metrics, labels=args.labels, title=args.title)
  except PlotError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
