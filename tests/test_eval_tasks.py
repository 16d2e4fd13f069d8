"""The evaluation registry (`bge_jax.eval.tasks`) and its six task types.

Each type is checked twice on small generated data, with a deterministic bag-of-words encoder
(every word a fixed random vector, seeded by its CRC32; a text is the normalised sum), so mteb
and bge-jax see bit-identical embeddings whatever their batching:

* against mteb 2.26 itself: the type's `to_mteb` task (the same data in mteb's layout) run by
  `mteb.evaluate` through `MTEBEncoder`. Tolerances: 1e-6 for the other types: mteb computes
  cosines in float32, we in float64 (about 1e-7 apart), which moves a Pearson correlation by
  ~1e-8 and leaves rank-based scores (Spearman, AP, best-threshold accuracy) and the fits on the
  identical embeddings (logistic regression, k-means) unchanged; 1e-5 for retrieval-type
  metrics, which mteb rounds to 5 decimals (error <= 5e-6);
* against a direct numpy / scikit-learn / scipy computation written here.
"""

import dataclasses
import json
import pathlib
import re
import zlib

import numpy as np
import pytest

from bge_jax.eval import tasks
from bge_jax.eval.classification import ClassificationData, undersample
from bge_jax.eval.data import EvalDataError
from conftest import make_hf_folder, make_tokenizer

INSTRUCTION = "Represent this query: "
TOPICS = {
    "astro": "star planet orbit comet galaxy telescope moon",
    "cook": "bread oven flour butter salt recipe bake",
    "sea": "ocean wave boat harbor fish sail tide",
    "code": "python compiler function variable loop debug class",
    "music": "guitar melody chord rhythm drum song tempo",
}
NOISE = "the a of and in with very some".split()


class HashEncoder:
  """Bag of words: each word a fixed N(0, 1) vector seeded by its CRC32; rows L2-normalised."""

  dim = 24

  def encode(self, texts, batch_size=256, max_length=512, instruction=None, show_progress=None):
    out = np.zeros((len(texts), self.dim), np.float32)
    for i, text in enumerate(texts):
      for word in ((instruction or "") + text).lower().split()[:max_length]:
        out[i] += np.random.default_rng(zlib.crc32(word.encode())).standard_normal(self.dim)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _text(rng, topic: str, n: int = 5, noise: int = 2) -> str:
  words = list(rng.choice(TOPICS[topic].split(), n)) + list(rng.choice(NOISE, noise))
  rng.shuffle(words)
  return " ".join(words)


def _jsonl(path: pathlib.Path, rows) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
  """One small file per task type, in the formats the loaders read."""
  root = tmp_path_factory.mktemp("tasks")
  rng = np.random.default_rng(0)
  names = list(TOPICS)
  other = lambda t: names[(names.index(t) + 1 + rng.integers(len(names) - 1)) % len(names)]
  out = {}
  labelled = [{"text": _text(rng, t, noise=4), "label": t, "split": ("train", "test")[i % 2]}
              for t in names for i in range(12)]
  out["classification"] = _jsonl(root / "cls.jsonl", labelled)
  out["clustering"] = _jsonl(root / "clu.jsonl", [{"text": r["text"], "label": r["label"]}
                                                  for r in labelled])
  pairs = []
  for i in range(40):
    t = names[i % len(names)]
    same = i % 2 == 0
    pairs.append({"sentence1": _text(rng, t, 3, 3),
                  "sentence2": _text(rng, t if same else other(t), 3, 3), "label": int(same)})
  out["pair_classification"] = _jsonl(root / "pairs.jsonl", pairs)
  lines = []
  for i in range(40):
    t = names[i % len(names)]
    a, b = _text(rng, t, 4, 2), _text(rng, t if i % 3 else other(t), 4, 2)
    lines.append(f"{a}\t{b}\t{len(set(a.split()) & set(b.split()))}")
  (root / "sts.data").write_text("\n".join(lines) + "\n")
  out["sts"] = str(root / "sts.data")
  rows = []
  for i in range(10):
    t = names[i % len(names)]
    rows.append({"query": _text(rng, t, 3, 1), "pos": [_text(rng, t, 6, 4)
                                                       for _ in range(1 + i % 2)],
                 "neg": [_text(rng, other(t), 6, 4) for _ in range(5)]
                        + [_text(rng, t, 2, 8) for _ in range(2)],
                 "prompt": "ignored"})
  out["reranking"] = out["retrieval"] = _jsonl(root / "fe.jsonl", rows)
  return out


# Protocol settings small enough for a fast test (mteb receives the same ones).
OPTIONS = {"classification": dict(n_experiments=3, samples_per_label=3),
           "clustering": dict(n_experiments=3, cluster_size=40)}
SETTINGS = tasks.EvalSettings(batch_size=16, max_length=64, query_instruction=INSTRUCTION)


@pytest.fixture(scope="module")
def loaded(files) -> dict[str, tasks.Task]:
  return {t: tasks.load_task(t, files[t], f"Gen{t.title().replace('_', '')}",
                             **OPTIONS.get(t, {}))
          for t in files}


@pytest.fixture(scope="module")
def ours(loaded) -> dict[str, dict[str, float]]:
  return {t: tasks.evaluate_task(HashEncoder(), task, SETTINGS) for t, task in loaded.items()}


def test_registry_lists_six_types_and_parses_specs(files):
  kinds = tasks.task_types()
  assert list(kinds) == ["retrieval", "reranking", "sts", "classification",
                         "pair_classification", "clustering"]
  assert [k.query_instruction for k in kinds.values()] == [True, True] + [False] * 4
  assert tasks.parse_specs(f" sts:{files['sts']} ,, clustering:stdlib") == [
      ("sts", files["sts"]), ("clustering", "stdlib")]
  with pytest.raises(ValueError, match=r"eval.tasks: unknown task type 'stss' in 'stss:x'; "
                                       r"known: retrieval, reranking"):
    tasks.parse_specs("stss:x")
  with pytest.raises(ValueError, match="--tasks: 'sts' is not TYPE:PATH"):
    tasks.parse_specs("sts", "--tasks")
  with pytest.raises(ValueError, match="registered twice"):
    tasks.register(dataclasses.replace(kinds["sts"]))


def test_category_averages(loaded, ours):
  avg = tasks.category_averages([(task.kind.category, tasks.main_score(task, ours[t]))
                                  for t, task in reversed(loaded.items())])
  assert list(avg) == ["Retrieval", "Reranking", "STS", "Classification",
                       "PairClassification", "Clustering", "average"]
  assert avg["STS"] == ours["sts"]["spearman"]
  assert avg["average"] == pytest.approx(np.mean([
      ours["retrieval"]["ndcg@10"], ours["reranking"]["map@1000"], ours["sts"]["spearman"],
      ours["classification"]["accuracy"], ours["pair_classification"]["ap"],
      ours["clustering"]["v_measure"]]), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Against mteb 2.26
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mteb_scores(loaded) -> dict[str, dict]:
  mteb = pytest.importorskip("mteb")
  from bge_jax.eval import mteb_adapter

  model = mteb_adapter.MTEBEncoder(HashEncoder(), query_instruction=INSTRUCTION)
  out = {}
  for type_name, task in loaded.items():
    result = mteb.evaluate(model, [mteb_adapter.local_task(task)], cache=None,
                           show_progress_bar=False)
    out[type_name] = mteb_adapter.scores(result)
  return out


@pytest.mark.parametrize("type_name", ["retrieval", "reranking", "sts", "classification",
                                       "pair_classification", "clustering"])
def test_each_type_matches_mteb(type_name, loaded, ours, mteb_scores):
  kind = tasks.task_type(type_name)
  tol = 1e-5 if kind.query_instruction else 1e-6
  got, ref = ours[type_name], mteb_scores[type_name]
  assert set(got) == set(kind.mteb_metrics)
  for metric, value in got.items():
    assert value == pytest.approx(ref[kind.mteb_metrics[metric]], abs=tol), metric
  assert ref["main_score"] == pytest.approx(got[kind.main_metric], abs=tol)
  # not a degenerate case: the scores are neither perfect nor zero
  assert 0.05 < got[kind.main_metric] < 0.999, got


def test_query_instruction_reaches_queries_only(loaded):
  class Recorder(HashEncoder):
    calls = []

    def encode(self, texts, instruction=None, **kwargs):
      self.calls.append(instruction)
      return super().encode(texts, instruction=instruction, **kwargs)

  for type_name, task in loaded.items():
    Recorder.calls = []
    tasks.evaluate_task(Recorder(), task, SETTINGS)
    expected = {INSTRUCTION, None} if task.kind.query_instruction else {None}
    assert set(Recorder.calls) == expected, type_name


# ---------------------------------------------------------------------------------------------
# Against direct numpy / scikit-learn / scipy computations
# ---------------------------------------------------------------------------------------------

def _emb(texts, instruction=None) -> np.ndarray:
  return HashEncoder().encode(list(texts), instruction=instruction).astype(np.float64)


def _cos(a, b) -> np.ndarray:
  a, b = _emb(a), _emb(b)
  return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_sts_direct(loaded, ours):
  from scipy.stats import pearsonr, spearmanr
  d = loaded["sts"].data
  cos = _cos(d.s1, d.s2)
  assert ours["sts"]["spearman"] == pytest.approx(spearmanr(cos, d.values)[0], abs=1e-12)
  assert ours["sts"]["pearson"] == pytest.approx(pearsonr(cos, d.values)[0], abs=1e-12)


def test_pair_classification_direct(loaded, ours):
  from sklearn.metrics import accuracy_score, average_precision_score, f1_score
  d = loaded["pair_classification"].data
  cos, y = _cos(d.s1, d.s2), d.values.astype(int)
  assert ours["pair_classification"]["ap"] == pytest.approx(average_precision_score(y, cos),
                                                            abs=1e-12)
  cuts = np.unique(cos)
  cuts = (cuts[1:] + cuts[:-1]) / 2  # thresholds between distinct scores
  acc = max(accuracy_score(y, cos > c) for c in cuts)
  f1 = max(f1_score(y, cos > c) for c in cuts)
  assert ours["pair_classification"]["accuracy"] == pytest.approx(acc, abs=1e-12)
  assert ours["pair_classification"]["f1"] == pytest.approx(f1, abs=1e-12)


def test_reranking_and_retrieval_direct(loaded, ours, files):
  from sklearn.metrics import average_precision_score, ndcg_score
  rows = [json.loads(line) for line in open(files["reranking"])]
  aps, rrs, ndcgs, full_ndcgs = [], [], [], []
  corpus = list(dict.fromkeys(t for r in rows for t in r["pos"] + r["neg"]))
  c_emb = _emb(corpus)
  for r in rows:
    q = _emb([r["query"]], INSTRUCTION)[0]
    cands = list(dict.fromkeys(r["pos"] + r["neg"]))
    e = _emb(cands)
    score = e @ q / np.linalg.norm(e, axis=1) / np.linalg.norm(q)
    rel = np.array([t in r["pos"] for t in cands])
    aps.append(average_precision_score(rel, score))
    first = np.flatnonzero(rel[np.argsort(-score)])[0]
    rrs.append(1 / (first + 1) if first < 10 else 0.0)
    ndcgs.append(ndcg_score(rel[None].astype(float), score[None], k=10))
    full = c_emb @ q / np.linalg.norm(c_emb, axis=1) / np.linalg.norm(q)
    full_ndcgs.append(ndcg_score(np.array([[t in r["pos"] for t in corpus]], float),
                                 full[None], k=10))
  got = ours["reranking"]
  assert got["map@1000"] == pytest.approx(np.mean(aps), abs=1e-12)
  assert got["mrr@10"] == pytest.approx(np.mean(rrs), abs=1e-12)
  assert got["ndcg@10"] == pytest.approx(np.mean(ndcgs), abs=1e-12)
  assert ours["retrieval"]["ndcg@10"] == pytest.approx(np.mean(full_ndcgs), abs=1e-6)


def test_classification_direct(loaded):
  """All training rows per label (samples_per_label >= every label's count, one experiment):
  the protocol reduces to one logistic regression on the whole train split."""
  from sklearn.linear_model import LogisticRegression
  d = dataclasses.replace(loaded["classification"].data, n_experiments=1, samples_per_label=100)
  got = tasks.task_type("classification").evaluate(HashEncoder(), d, SETTINGS)
  order = undersample(d.train_labels, 100, d.seed, 1)[0]
  assert sorted(order) == list(range(len(d.train_texts)))
  model = LogisticRegression(max_iter=100, random_state=42).fit(
      _emb([d.train_texts[i] for i in order]).astype(np.float32),
      [d.train_labels[i] for i in order])
  predicted = model.predict(_emb(d.test_texts).astype(np.float32))
  assert got["accuracy"] == pytest.approx(np.mean(predicted == np.array(d.test_labels)),
                                          abs=1e-12)


def test_undersample_is_mteb_cumulative_shuffle():
  labels = ["a", "b"] * 6
  draws = undersample(labels, 2, 42, 2)
  idxs = list(range(12))
  np.random.RandomState(42).shuffle(idxs)
  first = [i for i in idxs if [labels[j] for j in idxs[:idxs.index(i) + 1]].count(labels[i]) <= 2]
  assert draws[0] == first
  np.random.RandomState(42).shuffle(idxs)  # the second experiment shuffles the shuffled list
  assert draws[1] == [i for i in idxs
                      if [labels[j] for j in idxs[:idxs.index(i) + 1]].count(labels[i]) <= 2]


def test_clustering_separable_and_direct(loaded, ours):
  from sklearn.metrics import v_measure_score
  d = loaded["clustering"].data

  class OneHot:  # each label its own axis: k-means recovers the labels exactly
    dim = len(TOPICS)

    def encode(self, texts, **kwargs):
      label = dict(zip(d.texts, d.labels))
      return np.eye(self.dim, dtype=np.float32)[[list(TOPICS).index(label[t]) for t in texts]]

  got = tasks.task_type("clustering").evaluate(OneHot(), d, SETTINGS)
  assert got == {"v_measure": pytest.approx(1.0), "v_measure_std": pytest.approx(0.0)}
  assert v_measure_score(d.labels, d.labels) == 1.0
  assert 0.05 < ours["clustering"]["v_measure"] < 0.99


# ---------------------------------------------------------------------------------------------
# Loading: formats and refusals
# ---------------------------------------------------------------------------------------------

def test_loaders_refuse_bad_rows(tmp_path):
  bad = tmp_path / "bad.jsonl"
  cases = [
      ("classification", '{"text": "a", "label": "x", "split": "dev"}\n', "split 'dev'"),
      ("classification", '{"text": "a", "label": "x", "split": "train"}\n', "no 'test' rows"),
      ("clustering", '{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n', "at least 2 labels"),
      ("clustering", '{"text": "a"}\n', r"bad.jsonl:1: \"label\""),
      ("pair_classification", '{"sentence1": "a", "sentence2": "b", "label": 2}\n',
       r"bad.jsonl:1: \"label\" is 2"),
      ("pair_classification", '{"sentence1": "a", "sentence2": "b", "label": 1}\n',
       "both labels 0 and 1"),
      ("reranking", '{"query": "q", "pos": [], "neg": ["x"]}\n', r"bad.jsonl:1: \"pos\" is empty"),
      ("retrieval", '{"query": "q", "pos": "p"}\n', r"bad.jsonl:1: \"pos\" must be a list"),
  ]
  for type_name, text, message in cases:
    bad.write_text(text)
    with pytest.raises(EvalDataError, match=message):
      tasks.load_task(type_name, str(bad))


def test_pair_classification_reads_fe_rows_and_text_pairs(tmp_path):
  from bge_jax.eval.pair_classification import load_pair_classification_task
  p = _jsonl(tmp_path / "p.jsonl", [{"query": "q", "pos": ["p1"], "neg": ["n1", "n2"]},
                                    {"text1": "a", "text2": "b", "label": 1}])
  d = load_pair_classification_task(p)
  assert (d.s1, d.s2, d.values.tolist()) == (["q", "q", "q", "a"], ["p1", "n1", "n2", "b"],
                                              [1, 0, 0, 1])


def test_stdlib_tasks_are_generated():
  from bge_jax.eval import suite
  cls = tasks.load_task("classification", "stdlib").data
  clu = tasks.load_task("clustering", "stdlib", n_experiments=2).data
  assert len(set(cls.train_labels)) == len(set(clu.labels)) >= 10
  assert set(cls.train_labels) == set(cls.test_labels)
  assert clu.n_experiments == 2 and len(clu.texts) == len(cls.train_texts) + len(cls.test_texts)
  assert all(suite.MIN_PER_LABEL // 2 <= cls.train_labels.count(x) <= suite.MAX_PER_LABEL // 2
             for x in set(cls.train_labels))


def test_cached_encoder_encodes_each_text_once():
  calls = []

  class Counting(HashEncoder):
    def encode(self, texts, **kwargs):
      calls.append(list(texts))
      return super().encode(texts, **kwargs)

  enc = tasks.CachedEncoder(Counting())
  a = enc.encode(["x y", "z"], instruction="q: ")
  b = enc.encode(["z", "x y", "w"], instruction="q: ")
  c = enc.encode(["z"])
  assert calls == [["x y", "z"], ["w"], ["z"]]
  np.testing.assert_array_equal(a[[1, 0]], b[:2])
  np.testing.assert_array_equal(c[0], HashEncoder().encode(["z"])[0])


# ---------------------------------------------------------------------------------------------
# In-training evaluation (bge_jax.train.evaluate) and launch/eval.py
# ---------------------------------------------------------------------------------------------

def _word_files(root: pathlib.Path) -> dict[str, str]:
  """STS, pair and FlagEmbedding-row files over the tiny tokenizer's words."""
  from conftest import WORDS
  rng = np.random.default_rng(1)
  say = lambda n: " ".join(rng.choice(WORDS, n))
  lines, pairs, rows = [], [], []
  for i in range(24):
    a = say(5)
    b = " ".join(a.split()[:2 + i % 4]) + " " + say(3 - i % 3)
    lines.append(f"{a}\t{b}\t{i % 4 + 2 * (i % 2)}")
    pairs.append({"sentence1": a, "sentence2": b if i % 2 else say(5), "label": i % 2})
    rows.append({"query": say(3), "pos": [say(6)], "neg": [say(6) for _ in range(4)]})
  (root / "words.data").write_text("\n".join(lines) + "\n")
  return {"sts": str(root / "words.data"),
          "pair_classification": _jsonl(root / "wpairs.jsonl", pairs),
          "reranking": _jsonl(root / "wrows.jsonl", rows)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(root, params, model config, tokenizer, word files, saved HF folder) of random tiny BERTs."""
  import jax
  from transformers import AutoTokenizer

  from bge_jax import config as config_lib
  from bge_jax.models import bert

  root = tmp_path_factory.mktemp("tiny_eval")
  model = config_lib.preset("tiny", num_layers=1, vocab_size=64, max_position_embeddings=64,
                            pooling="mean")
  params, _ = bert.init(model, jax.random.key(0))
  params = jax.tree.map(lambda x: x * 4.0, params)  # beyond init's 0.02: distinct embeddings
  tokenizer = AutoTokenizer.from_pretrained(str(make_tokenizer(root / "tok")))
  folder = make_hf_folder(root, "bert", seed=1)  # a saved model for the command lines
  for f in (root / "tok").iterdir():
    (folder / f.name).write_bytes(f.read_bytes())
  return root, params, model, tokenizer, _word_files(root), folder


class _Sliced:
  """The reference for a Matryoshka width: full embeddings cut in numpy and re-normalised."""

  def __init__(self, encoder, dim):
    self.encoder, self.dim = encoder, dim

  def encode(self, texts, **kwargs):
    return tasks.unit_rows(self.encoder.encode(texts, **kwargs)[:, :self.dim])


def test_make_evaluator_tasks_legacy_keys_and_matryoshka_dims(tiny):
  from ml_collections import ConfigDict

  from bge_jax.encoder import Encoder
  from bge_jax.train.evaluate import make_evaluator

  root, params, model, tokenizer, files, _ = tiny
  config = ConfigDict({
      "eval": {"every_steps": 0, "sts": files["sts"], "sts_split": "dev", "retrieval": "",
               "tasks": f"pair_classification:{files['pair_classification']},"
                        f"reranking:{files['reranking']}",
               "query_instruction": "query: ", "max_length": 32, "batch_size": 8},
      "loss": {"matryoshka_dims": [16, 8]}})
  evaluator = make_evaluator(config, tokenizer)
  metrics = evaluator(params, model)
  assert sorted(evaluator.metric_names) == sorted(metrics)
  assert sorted(metrics) == sorted(
      f"eval/{key}{suffix}" for key in
      ["sts/words", "wpairs/ap", "wpairs/accuracy", "wpairs/f1", "wrows/map@1000",
       "wrows/mrr@10", "wrows/ndcg@10"] for suffix in ("", "/dim_16", "/dim_8"))
  full = Encoder(params, model, tokenizer, pooling="mean")
  settings = tasks.EvalSettings(batch_size=8, max_length=32, query_instruction="query: ")
  for dim, suffix in ((None, ""), (8, "/dim_8")):
    enc = full if dim is None else _Sliced(full, dim)
    ref = tasks.evaluate_task(enc, tasks.load_task("reranking", files["reranking"]), settings)
    for metric, value in ref.items():
      assert metrics[f"eval/wrows/{metric}{suffix}"] == pytest.approx(value, abs=1e-5), metric
    ref = tasks.evaluate_task(enc, tasks.load_task("sts", files["sts"]), settings)
    assert metrics[f"eval/sts/words{suffix}"] == pytest.approx(ref["spearman"], abs=1e-5)
  assert metrics["eval/sts/words/dim_8"] != metrics["eval/sts/words"]

  config.eval.tasks = f"retrieval:{files['reranking']},reranking:{files['reranking']}"
  with pytest.raises(ValueError, match=r"two tasks log 'eval/wrows/.*wrows.jsonl and .*wrows.jsonl"):
    make_evaluator(config, tokenizer)
  config.eval.tasks, config.eval.sts = "", ""
  assert make_evaluator(config, tokenizer) is None


def test_eval_cli_tasks_per_dim_json_and_refusals(tiny, capsys):
  from launch import eval as eval_cli

  root, _, _, _, files, model = tiny
  out = root / "res" / "suite.json"
  argv = ["--model", str(model), "--tasks", ",".join(f"{t}:{p}" for t, p in files.items()),
          "--truncate_dim", "16", "8", "--batch-size", "8", "--max-length", "32",
          "--query-instruction", "query: ", "--out", str(out)]
  assert eval_cli.main(argv) == 0
  printed = capsys.readouterr().out
  result = json.loads(out.read_text())
  assert list(result["dims"]) == ["16", "8"]
  for dim, block in result["dims"].items():
    assert [r["type"] for r in block["tasks"]] == ["sts", "pair_classification", "reranking"]
    assert list(block["categories"]) == ["Reranking", "STS", "PairClassification", "average"]
    assert block["categories"]["average"] == pytest.approx(
        np.mean([r["main_score"] for r in block["tasks"]]), abs=1e-12)
    assert f"per category (dim {dim}; main scores)" in printed
  assert re.search(r"\n  PairClassification \(1\)\s+0\.\d{4}\n", printed)
  assert re.search(r"\[2/3\] PairClassification\s+wpairs\s+ap \d\.\d{4}", printed)

  cases = [
      (["--model", str(model)], "nothing to evaluate"),
      (["--model", str(model), "--tasks", "nope:x"], "unknown task type 'nope'"),
      (["--model", str(model), "--tasks", f"sts:{root / 'absent.tsv'}"], "absent.tsv: no such"),
      (["--model", str(model), "--tasks", f"sts:{files['sts']}", "--truncate_dim", "999"],
       "the model's embeddings have"),
      (["--model", str(root / "nomodel"), "--suite"], "no such model"),
      (["--model", str(model), "--suite", "--data-dir", str(root / "nodata")], "no such folder"),
  ]
  for argv, message in cases:
    assert eval_cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (message, err)
  assert not (root / "res" / "other.json").exists()


def test_eval_cli_mteb_task_not_cached_is_one_line_and_exit_3(tiny, capsys):
  pytest.importorskip("mteb")
  from launch import eval as eval_cli

  root, _, _, _, files, model = tiny
  status = eval_cli.main(["--model", str(model), "--tasks", f"sts:{files['sts']}",
                          "--mteb-tasks", "STSBenchmark", "--max-length", "32"])
  printed = capsys.readouterr().out
  skipped = [line for line in printed.splitlines() if line.startswith("skipped:")]
  if status == 0:
    pytest.skip("STSBenchmark is in this machine's Hugging Face cache")
  assert status == 3 and len(skipped) == 1, printed
  assert "STSBenchmark: its data is not in the local cache" in skipped[0]
  assert "per category" in printed  # the local task still ran


@pytest.mark.slow
def test_minilm_reranking_and_pairs_agree_with_mteb(minilm_path, shared_data, tmp_path, capsys):
  """all-MiniLM-L6-v2 on real rows, ours beside mteb's (`--check-mteb`). The model encodes
  different batches in the two runs (packing differs), so cosines differ by float rounding
  (~1e-6); mteb rounds MAP to 5 decimals: 1e-4 covers both."""
  pytest.importorskip("mteb")
  from launch import eval as eval_cli

  out = tmp_path / "minilm.json"
  assert eval_cli.main(["--model", minilm_path, "--tasks",
                        f"reranking:{shared_data / 'en' / 'msmarco.jsonl'},"
                        f"pair_classification:{shared_data / 'en' / 'nli.jsonl'}",
                        "--max-length", "256", "--check-mteb", "--out", str(out)]) == 0
  rows = json.loads(out.read_text())["dims"]["384"]["tasks"]
  assert [r["main_metric"] for r in rows] == ["map@1000", "ap"]
  for row in rows:
    assert row["main_score"] == pytest.approx(row["mteb_main_score"], abs=1e-4), row
    assert 0.2 < row["main_score"] < 1.0
  assert "(mteb 0." in capsys.readouterr().out


def test_mteb_eval_cli_runs_a_registry_task(tiny, capsys):
  """launch/mteb_eval.py --task: mteb's main score beside ours on a tiny real model (the two
  encode different batches, so cosines differ by float rounding; AP is rank-based: 1e-6)."""
  pytest.importorskip("mteb")
  from launch import mteb_eval

  root, _, _, _, files, model = tiny
  assert mteb_eval.main(["--model", str(model), "--task",
                         f"pair_classification:{files['pair_classification']}",
                         "--max-length", "32", "--batch-size", "8", "--check"]) == 0
  printed = capsys.readouterr().out
  theirs = float(re.search(r"cosine_ap: (\S+)", printed).group(1))
  ours = float(re.search(r"bge_jax.eval.tasks ap: (\S+)", printed).group(1))
  assert ours == pytest.approx(theirs, abs=1e-6) and 0.05 < ours < 1
