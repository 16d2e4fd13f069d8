"""Metrics out of the loop: a JSONL log and TensorBoard event files (tensorboardX, no TensorFlow)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and `<workdir>/tb/`; a no-op off process 0."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in scalars.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)
      if math.isfinite(v):
        self._tb.add_scalar(k, v, global_step=int(step))
    self._jsonl.write(json.dumps(row) + "\n")

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Rows of a metrics.jsonl (a folder is taken as its workdir)."""
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
