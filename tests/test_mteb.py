"""launch/mteb_eval.py end to end, offline: mteb's score equals bge-jax's own STS evaluator.

Skipped when mteb (the optional extra `bge-jax[eval]`) is not installed. The models are the
bundled all-MiniLM-L6-v2 on the English STS-B dev pairs (slow) and a tiny model saved as a
trainer workdir's checkpoints (the format the trainer writes, via `bge_jax.train.checkpoints`'
save functions) on a generated STS file; the reference is `bge_jax.eval.sts_spearman` over an
`Encoder` built directly from the same params.
"""

import json
import re

import jax
import numpy as np
import pytest

from bge_jax import weights
from bge_jax import config as config_lib
from bge_jax.encoder import Encoder
from bge_jax.eval import read_sts, sts_spearman
from bge_jax.models import bert
from conftest import WORDS, make_tokenizer
from launch import mteb_eval

pytest.importorskip("mteb")

SCORE = re.compile(r"cosine_spearman: (\S+)")
OURS = re.compile(r"bge_jax.eval.sts_spearman: (\S+)")
CONFIG = config_lib.preset("tiny", num_layers=1, vocab_size=64, max_position_embeddings=64,
                           pooling="mean")


def _scores(stdout: str) -> tuple[float, float]:
  return float(SCORE.search(stdout).group(1)), float(OURS.search(stdout).group(1))


@pytest.fixture(scope="module")
def run_workdir(tmp_path_factory):
  """A trainer workdir with checkpoints at steps 3 and 7 (different params), run_info.json and
  config.json as the trainer writes them; returns (workdir, {step: params}, tokenizer folder)."""
  import optax

  from bge_jax.train import checkpoints, state

  root = tmp_path_factory.mktemp("mteb_run")
  tok = make_tokenizer(root / "tok")
  workdir = root / "run"
  workdir.mkdir()
  # The run's model config as a GPU run records it: bf16 compute.
  (workdir / "run_info.json").write_text(json.dumps({
      "stage": "contrastive", "model": {**CONFIG.to_dict(), "dtype": "bfloat16"}}))
  (workdir / "config.json").write_text(json.dumps({"tokenizer": str(tok),
                                                   "model": {"init_from": ""}}))
  manager = checkpoints.open_checkpoints(str(workdir / "checkpoints"), keep=3)
  saved = {}
  for step, seed in ((3, 0), (7, 1)):
    params, _ = bert.init(CONFIG, jax.random.key(seed))
    params = jax.tree.map(lambda x: x * 4.0, params)  # beyond init's 0.02: distinct embeddings
    checkpoints.save_checkpoint(manager, step, state.init_state(params, optax.adam(1e-3)))
    checkpoints.finish_checkpoints(manager)
    saved[step] = weights.to_numpy(params)
  manager.close()
  return workdir, saved, tok


@pytest.fixture(scope="module")
def sts_file(tmp_path_factory):
  """30 generated pairs in the Chinese STS-B layout: s1<TAB>s2<TAB>score."""
  rng = np.random.RandomState(0)
  path = tmp_path_factory.mktemp("sts") / "pairs.data"
  lines = []
  for _ in range(30):
    a = " ".join(rng.choice(WORDS, 6))
    b = " ".join(rng.choice(WORDS, 6))
    lines.append(f"{a}\t{b}\t{rng.randint(0, 6)}")
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.mark.slow  # orbax saves and mteb's first import: ~80 s on 2 busy cores
def test_run_workdir_newest_and_chosen_step_agree_with_sts_spearman(run_workdir, sts_file, capsys,
                                                                    monkeypatch):
  from transformers import AutoTokenizer

  from bge_jax.eval import mteb_adapter

  workdir, saved, tok = run_workdir
  assert mteb_adapter.is_run_workdir(workdir) and weights.run_steps(workdir) == [3, 7]
  monkeypatch.chdir(workdir.parent)  # a relative workdir (orbax itself needs absolute paths)
  step, config, params = weights.load_run_params(workdir.name)
  assert step == 7 and config == CONFIG.replace(dtype="bfloat16")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved[7])):
    np.testing.assert_array_equal(np.asarray(a), b)

  s1, s2, gold = read_sts(sts_file)
  tokenizer = AutoTokenizer.from_pretrained(tok)
  # The encoder computes in float32 whatever the run recorded: the saved params' float32 vectors.
  encoder = mteb_adapter.load_encoder(workdir.name, "mean")
  assert encoder.config.dtype == "float32"
  np.testing.assert_allclose(
      encoder.encode(s1[:8], max_length=32),
      Encoder(saved[7], CONFIG, tokenizer, pooling="mean").encode(s1[:8], max_length=32),
      rtol=0, atol=1e-6)
  scores = {}
  for step in (3, 7):
    argv = ["--model", str(workdir), "--data", str(sts_file), "--split", "", "--check",
            "--max-length", "32"]
    assert mteb_eval.main(argv + (["--step", "3"] if step == 3 else [])) == 0
    out = capsys.readouterr().out
    assert "(all rows, 30 pairs, mean pooling)" in out, out
    mteb_score, ours_in_cli = _scores(out)
    # The reference: an Encoder built here from the saved params, not from the checkpoint.
    reference = sts_spearman(Encoder(saved[step], CONFIG, tokenizer, pooling="mean"),
                             s1, s2, gold, max_length=32)
    assert abs(mteb_score - reference) < 1e-6 and abs(ours_in_cli - reference) < 1e-6
    scores[step] = mteb_score
  assert scores[3] != scores[7]  # the step really selects the checkpoint


@pytest.mark.slow  # shares the run_workdir fixture
def test_refusals_are_one_error_line(run_workdir, sts_file, tmp_path, capsys):
  workdir, _, _ = run_workdir
  base = ["--data", str(sts_file), "--split", ""]
  assert mteb_eval.main(["--model", str(workdir), "--step", "5", *base]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no step 5" in err[0] and "[3, 7]" in err[0], err
  empty = tmp_path / "fresh_run"
  (empty / "checkpoints").mkdir(parents=True)
  (empty / "run_info.json").write_text(json.dumps({"model": CONFIG.to_dict()}))
  assert mteb_eval.main(["--model", str(empty), *base]) == 2
  assert "no committed checkpoint yet" in capsys.readouterr().err
  assert mteb_eval.main(["--model", str(tmp_path / "nothing"), *base]) == 2
  assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_minilm_on_stsb_dev_matches_bge_jax_evaluator(minilm_path, shared_data, capsys):
  data = shared_data / "en" / "stsbenchmark.train-dev.tsv"
  assert mteb_eval.main(["--model", minilm_path, "--data", str(data), "--split", "dev",
                         "--limit", "200", "--max-length", "128", "--check"]) == 0
  out = capsys.readouterr().out
  print(out)
  assert "(dev, 200 pairs, mean pooling)" in out  # the folder's own pooling (1_Pooling)
  mteb_score, ours = _scores(out)
  assert abs(mteb_score - ours) < 1e-6
  assert 0.85 < mteb_score < 0.97  # all-MiniLM-L6-v2 on STS-B dev: about 0.93 with mean pooling


@pytest.mark.slow
def test_cli_minilm_retrieval_on_local_beir_folder_matches_evaluate_retrieval(
    minilm_path, shared_data, tmp_path, capsys):
  """A BEIR folder from the NQ sample (10 queries, their positives and 20 mined negatives each)."""
  rows = [json.loads(line) for line in open(shared_data / "en" / "nq.jsonl")]
  folder = tmp_path / "nq_beir"
  (folder / "qrels").mkdir(parents=True)
  with open(folder / "queries.jsonl", "w") as fq, open(folder / "corpus.jsonl", "w") as fc, \
      open(folder / "qrels" / "test.tsv", "w") as fr:
    fr.write("query-id\tcorpus-id\tscore\n")
    for i, row in enumerate(rows):
      fq.write(json.dumps({"_id": f"q{i}", "text": row["query"]}) + "\n")
      for j, text in enumerate(row["pos"]):
        fc.write(json.dumps({"_id": f"q{i}-pos{j}", "title": "", "text": text}) + "\n")
        fr.write(f"q{i}\tq{i}-pos{j}\t1\n")
      for j, text in enumerate(row["neg"][:20]):
        fc.write(json.dumps({"_id": f"q{i}-neg{j}", "text": text}) + "\n")
  assert mteb_eval.main(["--model", minilm_path, "--retrieval", str(folder), "--max-length",
                         "256", "--query-instruction", "query: ", "--check"]) == 0
  out = capsys.readouterr().out
  print(out)
  mteb_score = float(re.search(r"ndcg_at_10: (\S+)", out).group(1))
  ours = float(re.search(r"evaluate_retrieval ndcg@10: (\S+)", out).group(1))
  assert abs(mteb_score - ours) < 1e-5  # mteb rounds retrieval scores to 5 decimals
  assert 0.5 < ours <= 1.0
