"""The README's first command, shrunk: all three stages run, report, PNG and a loadable export."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO


@pytest.mark.slow
def test_quickstart_runs_three_stages_and_exports(tmp_path):
  out = tmp_path / "qs"
  proc = subprocess.run(
      [sys.executable, str(REPO / "launch" / "quickstart.py"), "--out", str(out), "--scale", "0.05",
       "--skip-minilm"], capture_output=True, text=True, timeout=1500, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]

  report = (out / "report.md").read_text()
  for row in ("| random init |", "| after stage 1 |", "| after stage 2 |", "| after stage 3 |"):
    assert row in report, report
  assert str(out / "curves.png") in report
  png = (out / "curves.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

  # Each stage started from the previous one's export and was evaluated (held-out retrieval and
  # validation loss) before its first step, at EVALS_PER_STAGE points and at its end; the best
  # step's export is kept.
  from bge_jax.train.metrics import read_metrics
  for name, steps in (("stage1", 10), ("stage2", 10), ("stage3", 5)):
    rows = read_metrics(str(out / name))
    every = max(1, steps // 4)
    expected = sorted(set(range(0, steps + 1, every)) | {steps})
    assert [r["step"] for r in rows if "eval/heldout/ndcg@10" in r] == expected, name
    assert [r["step"] for r in rows if "val/loss" in r] == expected, name
    best = json.loads((out / name / "best" / "best.json").read_text())
    assert best["step"] in expected and (out / name / "best" / "hf" / "config.json").exists()
  assert "During training, at each evaluation" in report
  stage3_from = (out / "stage3" / "run_info.json").read_text()
  assert str(out / "stage2" / "export" / "hf") in stage3_from
  mined = (out / "data" / "mined.jsonl").read_text().splitlines()
  assert mined and all('"neg"' in row for row in mined)

  # The export is a sentence-transformers folder (mean pooling, as trained) giving our embeddings.
  from sentence_transformers import SentenceTransformer

  from bge_jax import Encoder
  export = out / "stage3" / "export" / "hf"
  texts = ["json.dumps", "Serialize obj to a JSON formatted str.", "os.path.join"]
  st = SentenceTransformer(str(export), device="cpu").encode(texts)
  ours = Encoder.from_hf(str(export), pooling="mean").encode(texts)  # the export declares mean
  np.testing.assert_allclose(st, ours, atol=2e-5)
  assert os.path.exists(export / "modules.json")
