"""Metrics out of the loop: metrics.jsonl (write, read, trim on resume), tensorboardX events."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from typing import Any, Mapping

log = logging.getLogger("bge_jax.train")


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
    """Best effort: never raises. The trainer calls it in a `finally`, where a full disk's error
    from flushing the logs would replace the error that stopped the run; a failed flush loses at
    most the last rows, so it is logged as a warning instead."""
    for name, handle in (("metrics.jsonl", self._jsonl), ("tb/ events", self._tb)):
      if handle is None:
        continue
      try:
        handle.close()
      except Exception as e:  # any failure here must not mask the real one
        log.warning("could not close %s (%s: %s); its last rows may be lost", name,
                    type(e).__name__, e)
    self._jsonl = self._tb = None


class MetricsLogError(ValueError):
  """A metrics log that cannot be read; the message names the file (and line) and the fix."""


def metrics_path(run: str) -> str:
  """The metrics.jsonl of a workdir (or the path itself when it is a file)."""
  return os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def read_metrics(run: str) -> list[dict[str, Any]]:
  """Rows of a run's metrics log (its workdir, or the metrics.jsonl itself), in file order.

  The one reader of what `MetricWriter` writes. Each row is a JSON object with an integer
  "step"; non-finite values, which the writer logs as the strings "nan", "inf" and "-inf", come
  back as floats. A last line without its newline is a write cut short (a run killed while
  logging) and is left out; any other malformed line raises MetricsLogError naming file:line.

  Raises:
    MetricsLogError: no log at `run`, or a malformed line.
  """
  path = metrics_path(run)
  if not os.path.isfile(path):
    hint = (" (a workdir has one once the trainer logged a step; see config.log_every_steps)"
            if os.path.isdir(run) or not path.endswith(".jsonl") else "")
    raise MetricsLogError(f"{path}: no metrics log here{hint}.")
  with open(path) as f:
    lines = f.readlines()
  rows = []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if lineno == len(lines) and not line.endswith("\n"):
        break  # the writer was killed mid-line
      raise MetricsLogError(f"{path}:{lineno}: invalid JSON ({e.msg}); a metrics log holds one "
                            "JSON object per line.") from e
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
      raise MetricsLogError(f"{path}:{lineno}: expected an object with an integer \"step\", got "
                            f"{line.strip()[:80]!r}.")
    rows.append({k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()})
  return rows


def drop_metrics_after(workdir: str, step: int) -> None:
  """On resume: rows logged after the restored step (a killed run's lost steps) are dropped, so
  metrics.jsonl holds each step once, as the uninterrupted run would. A torn last line goes too.
  The tb/ event files are trimmed the same way (`drop_tb_events_after`)."""
  drop_tb_events_after(os.path.join(workdir, "tb"), step)
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return

  def row_step(line: str) -> int | None:
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      return None

  with open(path) as f:
    lines = f.readlines()
  kept = [x if x.endswith("\n") else x + "\n" for x in lines
          if (s := row_step(x)) is not None and s <= step]
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
    log.info("metrics.jsonl: dropped %d rows after step %d (not in any checkpoint)",
             len(lines) - len(kept), step)


def _records(data: bytes) -> list[tuple[bytes, bytes]]:
  """(raw record, payload) of a TFRecord stream (an event file), a torn last record left out.

  A record is a uint64 length, its masked CRC (4 bytes), the payload and the payload's CRC.
  """
  out, pos = [], 0
  while pos + 12 <= len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    end = pos + 12 + n + 4
    if end > len(data):
      break
    out.append((data[pos:end], data[pos + 12:pos + 12 + n]))
    pos = end
  return out


def drop_tb_events_after(tb_dir: str, step: int) -> None:
  """Rewrites the TensorBoard event files under `tb_dir` without the scalars of steps after
  `step`: a resumed run logs those steps again, and TensorBoard would draw both (it cannot be
  told to forget events). Files with nothing to drop are left as they are; a file the trainer
  cannot parse is left too, with a warning (the plots may then show the replayed steps twice)."""
  if not os.path.isdir(tb_dir):
    return
  from tensorboardX.proto import event_pb2
  for name in sorted(os.listdir(tb_dir)):
    path = os.path.join(tb_dir, name)
    if "tfevents" not in name or name.endswith(".tmp") or not os.path.isfile(path):
      continue
    try:
      with open(path, "rb") as f:
        data = f.read()
      records = _records(data)
      kept = []
      for raw, payload in records:
        event = event_pb2.Event.FromString(payload)
        if not event.HasField("summary") or event.step <= step:
          kept.append(raw)
    except Exception as e:  # a damaged file must not stop the resume; it is only plots
      log.warning("%s: cannot trim the events after step %d (%s: %s); TensorBoard may show "
                  "the replayed steps twice", path, step, type(e).__name__, e)
      continue
    if len(kept) == len(records) and sum(map(len, kept)) == len(data):
      continue
    with open(path + ".tmp", "wb") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
    log.info("%s: dropped %d events after step %d (not in any checkpoint)", path,
             len(records) - len(kept), step)
