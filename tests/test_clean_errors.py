"""Failures that must come out as the real error or one clean line, not a cleanup's traceback."""

from __future__ import annotations

import errno
import logging

import pytest

from bge_jax.train import metrics


def _disk_full(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


def test_metric_writer_close_never_masks_the_real_error(tmp_path, monkeypatch, caplog):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(1, {"loss": 1.0})
  monkeypatch.setattr(writer._tb, "close", _disk_full)  # tensorboardX flushes on close

  class FullDisk:
    def __init__(self, f):
      self.f = f

    def close(self):
      self.f.close()
      _disk_full()

  writer._jsonl = FullDisk(writer._jsonl)
  with caplog.at_level(logging.WARNING, logger="bge_jax.train"):
    with pytest.raises(RuntimeError, match="^real$"):
      try:
        raise RuntimeError("real")
      finally:
        writer.close()
  assert "could not close metrics.jsonl (OSError" in caplog.text
  assert "could not close tb/ events (OSError" in caplog.text
  writer.close()  # a second close is a no-op
