"""Training curves (bge_jax.train.plots, launch/plot.py) and the trainer's TensorBoard files.

PNGs are checked by their signature, IHDR size and nonzero length, plus the pixels of a subplot
(a curve really was drawn). TensorBoard event files are read back with a TFRecord parser written
here over tensorboardX's Event proto (no TensorFlow / tensorboard needed), CRCs checked, and
compared with the JSONL log the same writer produced.
"""

import json
import os
import struct

import numpy as np
import pytest

from bge_jax.train import plots
from bge_jax.train.metrics import MetricWriter, read_metrics
from launch import plot as plot_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(folder, steps=30, seed=0, evals=True):
  """A workdir with a metrics.jsonl as the trainer writes it (loss every step, eval every 10)."""
  rng = np.random.RandomState(seed)
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / "metrics.jsonl", "w") as f:
    if evals:
      f.write(json.dumps({"step": 0, "eval/sts/spearman": 0.3 + seed * 0.01}) + "\n")
    for s in range(1, steps + 1):
      f.write(json.dumps({"step": s, "loss": float(3 * np.exp(-s / 10) + rng.rand() * 0.1),
                          "lr": 1e-3 * s / steps, "grad_norm": "nan" if s == 5 else 1.0}) + "\n")
      if evals and s % 10 == 0:
        f.write(json.dumps({"step": s, "eval/sts/spearman": 0.3 + s / 100,
                            "eval/retrieval/ndcg@10": 0.2 + s / 200}) + "\n")
  return folder


def png_size(path) -> tuple[int, int]:
  data = open(path, "rb").read()
  assert len(data) > 1000 and data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def test_plot_runs_writes_a_png_with_one_subplot_per_metric(tmp_path):
  a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", seed=1)
  out = plots.plot_runs([str(a), str(b)], str(tmp_path / "plots" / "curves.png"), dpi=50)
  assert out == str(tmp_path / "plots" / "curves.png")
  width, height = png_size(out)
  # loss + 2 eval metrics -> one row of three subplots (4.8 x 3.4 inches each at 50 dpi).
  assert (width, height) == (720, 170)
  assert plots.select_metrics([read_metrics(str(a))]) == [
      "loss", "eval/retrieval/ndcg@10", "eval/sts/spearman"]
  assert not [p for p in os.listdir(tmp_path / "plots") if ".tmp-" in p]

  # The pixels: the loss subplot of two runs has both default colours C0 and C1 in it.
  from matplotlib import image
  pixels = image.imread(out)[..., :3]
  left = pixels[:, : width // 3].reshape(-1, 3)
  for colour in ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05)):  # C0 blue, C1 orange
    assert (np.abs(left - colour).max(-1) < 0.08).sum() > 20, colour


def test_metric_selection_patterns_and_errors(tmp_path):
  run = fake_run(tmp_path / "r", evals=False)
  rows = [read_metrics(str(run))]
  assert plots.select_metrics(rows) == ["loss"]  # no eval metric logged: loss only
  assert plots.select_metrics(rows, ["lr", "grad*"]) == ["lr", "grad_norm"]
  with pytest.raises(plots.PlotError, match="no logged metric matches 'eval/\\*'.*grad_norm"):
    plots.select_metrics(rows, ["eval/*"])
  out = plots.plot_runs(str(run), tmp_path / "one.png", ["lr", "grad_norm", "loss", "lr"], dpi=40)
  assert png_size(out) == (3 * 4.8 * 40, 3.4 * 40)


def test_missing_empty_or_bad_logs_are_clear_errors(tmp_path):
  with pytest.raises(plots.PlotError, match="no metrics log here"):
    plots.plot_runs([str(tmp_path / "nope")], str(tmp_path / "x.png"))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "metrics.jsonl").write_text("\n")
  with pytest.raises(plots.PlotError, match="metrics.jsonl: the metrics log is empty"):
    plots.plot_runs([str(empty)], str(tmp_path / "x.png"))
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n')
  with pytest.raises(plots.PlotError, match="metrics.jsonl:2: invalid JSON"):
    plots.plot_runs([str(bad)], str(tmp_path / "x.png"))
  assert not (tmp_path / "x.png").exists()


def test_cli(tmp_path, capsys):
  a = fake_run(tmp_path / "run1")
  out = tmp_path / "c.png"
  assert plot_cli.main([str(a), str(a / "metrics.jsonl"), "--out", str(out), "--labels", "x",
                        "y", "--metrics", "loss", "--title", "t"]) == 0
  assert f"wrote {out}" in capsys.readouterr().out
  png_size(out)
  assert plot_cli.main([str(tmp_path / "missing"), "--out", str(tmp_path / "d.png")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "missing" in err[0]


# ---------------------------------------------------------------------------------------------
# TensorBoard event files.
# ---------------------------------------------------------------------------------------------

def tensorboard_events(logdir) -> list[tuple[str, int, float]]:
  """(tag, step, value) of every scalar in every events file in `logdir`, in file and record
  order, repeats kept (TFRecord framing read here, independently of the writer; CRCs checked)."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c

  out: list[tuple[str, int, float]] = []
  files = sorted(f for f in os.listdir(logdir) if f.startswith("events.out.tfevents"))
  assert files, f"no event files in {logdir}"
  for name in files:
    data = open(os.path.join(logdir, name), "rb").read()
    assert data, name
    pos = 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
      body = data[pos + 12:pos + 12 + length]
      assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(body)
      pos += 16 + length
      event = event_pb2.Event.FromString(body)
      out += [(value.tag, event.step, value.simple_value) for value in event.summary.value]
  return out


def read_tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from every events file in `logdir` (the last value of a step wins)."""
  out: dict[str, dict[int, float]] = {}
  for tag, step, value in tensorboard_events(logdir):
    out.setdefault(tag, {})[step] = value
  return out


def test_metric_writer_event_files_match_the_jsonl(tmp_path):
  writer = MetricWriter(str(tmp_path))
  for step in range(1, 4):
    writer.write(step, {"loss": 1.0 / step, "eval/x": step * 0.25, "bad": float("nan")})
  writer.close()
  scalars = read_tensorboard_scalars(tmp_path / "tb")
  rows = read_metrics(str(tmp_path))
  assert scalars["loss"] == {r["step"]: pytest.approx(r["loss"], rel=1e-7) for r in rows}
  assert scalars["eval/x"] == {1: 0.25, 2: 0.5, 3: 0.75}
  assert "bad" not in scalars and np.isnan(rows[0]["bad"])  # non-finite: JSONL only
  assert '"bad": "nan"' in (tmp_path / "metrics.jsonl").read_text().splitlines()[0]


def test_read_metrics_drops_only_a_cut_last_line(tmp_path):
  """A run killed while logging leaves a last line without its newline: left out, not an error.

  A malformed line anywhere else is an error naming file:line; "nan"/"inf"/"-inf" become floats.
  """
  from bge_jax.train.metrics import MetricsLogError

  log = tmp_path / "metrics.jsonl"
  log.write_text('{"step": 1, "loss": "inf", "g": "-inf"}\n\n{"step": 2, "loss": "nan"}\n'
                 '{"step": 3, "loss": 0.')
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["loss"] == float("inf") and rows[0]["g"] == float("-inf")
  assert np.isnan(rows[1]["loss"])
  log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \n{"step": 3, "loss": 1.0}\n')
  with pytest.raises(MetricsLogError, match="metrics.jsonl:2: invalid JSON"):
    read_metrics(str(log))
  log.write_text('{"step": "1", "loss": 1.0}\n')
  with pytest.raises(MetricsLogError, match="metrics.jsonl:1: expected an object with an integer"):
    read_metrics(str(tmp_path))
  with pytest.raises(MetricsLogError, match="no metrics log here"):
    read_metrics(str(tmp_path / "missing"))


@pytest.mark.slow
def test_trainer_writes_tensorboard_events_and_its_log_plots(tmp_path):
  """A 4-step tiny RetroMAE run: tb/ holds the same losses as metrics.jsonl; the log plots."""
  from bge_jax.train.loop import train
  from conftest import make_corpus, make_tokenizer
  from test_train import tiny_retromae

  corpus = make_corpus(tmp_path / "train.jsonl", 64)
  tok = make_tokenizer(tmp_path / "tok")
  workdir = tmp_path / "run"
  train(tiny_retromae(corpus, tok, 4, export=False), str(workdir))
  scalars = read_tensorboard_scalars(workdir / "tb")
  rows = {r["step"]: r for r in read_metrics(str(workdir)) if "loss" in r}
  assert sorted(rows) == [1, 2, 3, 4] and sorted(scalars["loss"]) == [1, 2, 3, 4]
  for step, row in rows.items():
    assert scalars["loss"][step] == pytest.approx(row["loss"], rel=1e-6)
    assert scalars["lr"][step] == pytest.approx(row["lr"], rel=1e-6)
  out = plots.plot_runs([str(workdir)], str(tmp_path / "curves.png"), ["loss", "lr"], dpi=40)
  png_size(out)
