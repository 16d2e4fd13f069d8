"""Training curves as a PNG: runs' `metrics.jsonl` logs -> one subplot per metric, runs overlaid.

The trainer logs scalars to `<workdir>/metrics.jsonl` (and TensorBoard files in `<workdir>/tb/`,
see `bge_jax.train.metrics`). TensorBoard needs a server and a browser; a PNG is what a demo, a
report or a remote machine wants, so `plot_runs` turns one or several runs' logs into a single
image: the training loss, the validation loss and every `eval/*` metric against the step by default, one subplot per
metric, each run a coloured line with a legend. Rendering uses matplotlib's Agg canvas directly
(no pyplot, no display, no global backend switch), and the file is written atomically.
"""

from __future__ import annotations

import fnmatch
import math
import os
from typing import Any, Sequence

from bge_jax.data.files import atomic_file
from bge_jax.train.metrics import MetricsLogError, metrics_path, read_metrics

DEFAULT_METRICS = ("loss", "val/loss", "eval/*")


class PlotError(ValueError):
  """A run log that cannot be plotted; the message names the file (and line) and the fix."""


def read_run(run: str) -> list[dict[str, Any]]:
  """Rows of a run's metrics log (`bge_jax.train.metrics.read_metrics`), at least one."""
  try:
    rows = read_metrics(run)
  except MetricsLogError as e:
    raise PlotError(str(e)) from e
  if not rows:
    raise PlotError(f"{metrics_path(run)}: the metrics log is empty; the run has not logged a "
                    "step yet.")
  return rows


def select_metrics(runs: Sequence[Sequence[dict[str, Any]]],
                   metrics: Sequence[str] | None = None) -> list[str]:
  """Metric names to plot, in the order asked for: exact names or glob patterns ("eval/*").

  Default: `DEFAULT_METRICS` (the loss, the validation loss and every eval metric); patterns that match nothing are
  then ignored. An explicitly asked name or pattern that matches nothing is an error listing
  the metrics the runs have.
  """
  available: list[str] = []
  for rows in runs:
    for row in rows:
      for k, v in row.items():
        if k != "step" and k not in available and isinstance(v, (int, float)):
          available.append(k)
  patterns = DEFAULT_METRICS if metrics is None else tuple(metrics)
  chosen: list[str] = []
  for pattern in patterns:
    found = sorted(k for k in available if fnmatch.fnmatchcase(k, pattern))
    if not found and metrics is not None:
      raise PlotError(f"no logged metric matches {pattern!r}; the runs have: "
                      f"{', '.join(sorted(available))}.")
    chosen += [k for k in found if k not in chosen]
  if not chosen:
    raise PlotError(f"nothing to plot: none of {list(patterns)} is logged; the runs have: "
                    f"{', '.join(sorted(available)) or 'no metrics'}.")
  return chosen


def run_labels(runs: Sequence[str]) -> list[str]:
  """Short legend labels: folder names, or longer paths where names repeat."""
  paths = [os.path.abspath(r if os.path.isdir(r) else os.path.dirname(r) or ".") for r in runs]
  names = [os.path.basename(p) for p in paths]
  if len(set(names)) == len(names):
    return names
  common = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
  return [os.path.relpath(p, common) if p != common else p for p in paths]


def plot_runs(workdirs: Sequence[str] | str, out_path: str, metrics: Sequence[str] | None = None,
              *, labels: Sequence[str] | None = None, title: str | None = None,
              dpi: int = 100) -> str:
  """Writes a PNG of the runs' curves and returns its path.

  Args:
    workdirs: trainer workdirs (or metrics.jsonl files); each is one line per subplot.
    out_path: the PNG to write (parent folders are created; replaced atomically).
    metrics: names or glob patterns (default: "loss", "val/loss" and "eval/*").
    labels: legend labels, one per run (default: the folder names).
    title: the figure title (default: none).
    dpi: resolution.

  Raises:
    PlotError: a missing, empty or malformed log, or a metric no run logged.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if isinstance(workdirs, (str, os.PathLike)):
    workdirs = [workdirs]
  workdirs = [os.fspath(w) for w in workdirs]
  if not workdirs:
    raise PlotError("no run given: pass one or more workdirs.")
  if labels is not None and len(labels) != len(workdirs):
    raise PlotError(f"{len(labels)} labels for {len(workdirs)} runs; give one per run.")
  runs = [read_run(w) for w in workdirs]
  names = select_metrics(runs, metrics)
  labels = list(labels) if labels is not None else run_labels(workdirs)

  cols = min(len(names), 3)
  rows = math.ceil(len(names) / cols)
  fig = Figure(figsize=(4.8 * cols, 3.4 * rows), dpi=dpi, layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, name in zip(axes, names):
    for i, (rows_i, label) in enumerate(zip(runs, labels)):
      points = sorted((r["step"], float(r[name])) for r in rows_i
                      if isinstance(r.get(name), (int, float)))
      if not points:
        continue
      steps, values = zip(*points)
      # Eval metrics have a few points: markers make them visible.
      ax.plot(steps, values, label=label, color=f"C{i % 10}",
              marker="o" if len(points) <= 20 else None, markersize=4, linewidth=1.4)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if len(runs) > 1:
      ax.legend(fontsize="small")
  for ax in axes[len(names):]:
    ax.set_visible(False)
  if title:
    fig.suptitle(title)
  return save_png(fig, out_path)


def save_png(fig: Any, out_path: str) -> str:
  """Writes a matplotlib Figure (on an Agg canvas) as a PNG atomically; returns the path.
  Parent folders are created; a failure leaves no temporary file."""
  out_path = os.path.abspath(os.fspath(out_path))
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  with atomic_file(out_path, "wb") as f:
    fig.savefig(f, format="png")
  return out_path
