"""Failures that must come out as the real error or one clean line, not a cleanup's traceback."""

from __future__ import annotations

import errno
import json
import logging
import os

import jax
import numpy as np
import pytest

from bge_jax import config as config_lib
from bge_jax import convert, weights
from bge_jax.encoder import Encoder
from bge_jax.models import bert
from bge_jax.train import metrics
from launch import merge as merge_cli


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


# ---------------------------------------------------------------------------------------------
# Unreadable weights: one ConversionError naming the file, one `error:` line from the CLIs.
# ---------------------------------------------------------------------------------------------

CONFIG = config_lib.preset("tiny", num_layers=1, vocab_size=64, max_position_embeddings=64)


class NotATensor:
  """Pickled into a .bin, it makes torch.load(weights_only=True) refuse the file."""


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  params, _ = bert.init(CONFIG, jax.random.key(0))
  return convert.save_hf(weights.to_numpy(params), CONFIG,
                         str(tmp_path_factory.mktemp("clean") / "hf"))


def _damaged(hf_folder: str, where, how: str) -> tuple[str, str]:
  """A copy of `hf_folder` at `where` with its weights damaged `how`; (folder, damaged file)."""
  import shutil

  import torch
  folder = str(where / how)
  shutil.copytree(hf_folder, folder)
  st = os.path.join(folder, "model.safetensors")
  if how == "truncated_safetensors":
    data = open(st, "rb").read()
    open(st, "wb").write(data[:len(data) // 2])
    return folder, st
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in convert.read_state_dict(st).items()}
  os.remove(st)
  if how == "missing_shard":
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index, "w") as f:
      json.dump({"weight_map": {k: "model-00001-of-00002.safetensors" for k in tensors}}, f)
    return folder, os.path.join(folder, "model-00001-of-00002.safetensors")
  binary = os.path.join(folder, "pytorch_model.bin")
  if how == "refused_bin":
    tensors["extra"] = NotATensor()
    torch.save(tensors, binary)
  else:  # truncated_bin
    torch.save(tensors, binary)
    data = open(binary, "rb").read()
    open(binary, "wb").write(data[:len(data) // 2])
  return folder, binary


DAMAGE = {"truncated_safetensors": "truncated or corrupt: re-download",
          "truncated_bin": "truncated or corrupt: re-download",
          "refused_bin": "weights_only=True .*convert it to model.safetensors",
          "missing_shard": "file not found; re-download"}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_unreadable_weights_raise_conversion_error_naming_the_file(hf_folder, tmp_path, how):
  folder, damaged = _damaged(hf_folder, tmp_path, how)
  with pytest.raises(convert.ConversionError, match=DAMAGE[how]) as e:
    Encoder.from_hf(folder)
  assert str(e.value).startswith(damaged + ":") and "\n" not in str(e.value)
  with pytest.raises(convert.ConversionError, match=DAMAGE[how]):
    weights.load_source(folder)  # what the trainer's init_from and merge read through


@pytest.mark.parametrize("how", ["truncated_safetensors", "refused_bin"])
def test_merge_cli_prints_one_error_line_for_unreadable_weights(hf_folder, tmp_path, capsys, how):
  folder, damaged = _damaged(hf_folder, tmp_path, how)
  out = tmp_path / "merged"
  assert merge_cli.main(["--models", hf_folder, folder, "--out", str(out)]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {damaged}: "), err
  assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Staging folders of killed conversions.
# ---------------------------------------------------------------------------------------------

def test_next_conversion_removes_stale_staging_folders_only(hf_folder, tmp_path, caplog):
  import socket
  import subprocess
  import sys

  from bge_jax import interop
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()  # a pid that no longer runs: the conversion it stood for was killed
  host = socket.gethostname()
  stale = tmp_path / f".out.tmp-{gone.pid}@{host}-k1lled00"
  stale_old = tmp_path / f".out.tmp-{gone.pid}@{host}-k1lled00.old"  # mid-swap with --overwrite
  live = tmp_path / f".out.tmp-{os.getpid()}@{host}-running"  # a concurrent conversion
  other_host = tmp_path / f".out.tmp-{gone.pid}@not-{host}-elsewher"  # pid not checkable here
  other_out = tmp_path / f".other.tmp-{gone.pid}@{host}-k1lled00"  # another OUT's, not ours
  for folder in (stale, stale_old, live, other_host, other_out):
    (folder / "params").mkdir(parents=True)
  with caplog.at_level(logging.WARNING, logger="bge_jax.convert"):
    interop.hf_to_jax(hf_folder, str(tmp_path / "out"))
  assert weights.is_checkpoint(str(tmp_path / "out"))
  assert not stale.exists() and not stale_old.exists()
  assert live.exists() and other_host.exists() and other_out.exists()
  assert f"removed {stale}: the staging folder of an earlier conversion" in caplog.text
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == sorted(
      [live.name, other_host.name])


# ---------------------------------------------------------------------------------------------
# Resume: TensorBoard events of the replayed steps are dropped, as metrics.jsonl rows are.
# ---------------------------------------------------------------------------------------------

def _tb_events(tb_dir) -> list[tuple[int, str]]:
  """(step, tag) of every scalar in the event files under `tb_dir`, repeats kept, each record's
  CRCs checked (`test_plots.tensorboard_events`)."""
  from test_plots import tensorboard_events
  return [(step, tag) for tag, step, _ in tensorboard_events(tb_dir)]


def test_resume_drops_the_replayed_steps_from_tensorboard_events(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  for step in range(1, 11):
    writer.write(step, {"loss": 1.0 / step, "lr": 0.1})
  writer.close()
  tb = tmp_path / "tb"
  assert sorted({s for s, _ in _tb_events(tb)}) == list(range(1, 11))
  (event_file,) = tb.iterdir()
  with open(event_file, "ab") as f:  # a record torn by the kill
    f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x01\x02")
  metrics.drop_metrics_after(str(tmp_path), 6)  # what loop.train calls on resume at step 6
  assert sorted(_tb_events(tb)) == sorted((s, t) for s in range(1, 7) for t in ("loss", "lr"))
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == list(range(1, 7))
  before = event_file.read_bytes()
  metrics.drop_metrics_after(str(tmp_path), 6)  # nothing more to drop: the file is left as is
  assert event_file.read_bytes() == before
