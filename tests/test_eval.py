"""`bge_jax.eval`: metrics by hand, exact blocked top-k, BEIR end to end, STS, mteb, the CLI."""

import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bge_jax.encoder import Encoder
from bge_jax.eval import (EvalDataError, evaluate_retrieval, load_beir, read_qrels, read_sts,
                          retrieval_metrics, sts_spearman, topk_inner_product)
from conftest import REPO, WORDS, make_hf_folder, make_tokenizer
from launch import eval as eval_cli

EVAL_SCRIPT = REPO / "launch" / "eval.py"


# ---------------------------------------------------------------------------------------------
# retrieval_metrics: hand-computed values
# ---------------------------------------------------------------------------------------------

def test_retrieval_metrics_hand_computed():
  qrels = {
      "q1": {"d1": 2, "d3": 1, "d7": 1, "d4": 0},  # graded; d4 judged non-relevant
      "q2": {"d5": 1},                             # found at rank 11
      "q3": {"d2": 0},                             # no relevant document: not averaged
      "q4": {"dx": 3},                             # relevant but never ranked: zeros
  }
  ranked = {
      "q1": ["d3", "d2", "d1", "d4"],
      "q2": [f"n{i}" for i in range(10)] + ["d5"],
      "q3": ["d2"],
  }
  got = retrieval_metrics(ranked, qrels)
  # q1: gains (1, 0, 2, 0) -> DCG = 1/log2(2) + 2/log2(4) = 2;
  #     ideal gains (2, 1, 1) -> IDCG = 2 + 1/log2(3) + 1/2.
  ndcg_q1 = 2.0 / (2.0 + 1.0 / math.log2(3) + 0.5)
  assert got["num_queries"] == 3
  assert got["ndcg@10"] == pytest.approx(ndcg_q1 / 3, abs=1e-12)
  assert got["recall@1"] == pytest.approx((1 / 3) / 3, abs=1e-12)
  assert got["recall@10"] == pytest.approx((2 / 3) / 3, abs=1e-12)
  assert got["recall@100"] == pytest.approx((2 / 3 + 1) / 3, abs=1e-12)
  assert got["mrr@10"] == pytest.approx(1.0 / 3, abs=1e-12)
  assert all(isinstance(v, float) for k, v in got.items() if k != "num_queries")

  # Cut-offs and a first hit at rank 3.
  one = retrieval_metrics({"q": ["a", "b", "c", "d"]}, {"q": {"c": 1, "d": 3}},
                          ndcg_at=(3, 4), recall_at=(2, 3), mrr_at=(2, 3))
  ideal = 3 + 1 / math.log2(3)
  assert one["ndcg@3"] == pytest.approx((1 / 2) / ideal, abs=1e-12)  # c at rank 3: 1/log2(4)
  assert one["ndcg@4"] == pytest.approx((1 / 2 + 3 / math.log2(5)) / ideal, abs=1e-12)
  assert (one["recall@2"], one["recall@3"]) == (0.0, 0.5)
  assert (one["mrr@2"], one["mrr@3"]) == (0.0, pytest.approx(1 / 3))
  assert retrieval_metrics({}, {"q": {"a": 0}})["num_queries"] == 0


def test_retrieval_metrics_match_pytrec_eval():
  pytrec_eval = pytest.importorskip("pytrec_eval")
  rng = np.random.default_rng(0)
  docs = [f"d{i}" for i in range(150)]
  qrels, run, ranked = {}, {}, {}
  for q in range(20):
    judged = rng.choice(docs, size=int(rng.integers(1, 12)), replace=False)
    qrels[f"q{q}"] = {d: int(rng.integers(0, 4)) for d in judged}
    scores = rng.permutation(len(docs))[:120].astype(float)
    order = np.argsort(-scores)
    ranked[f"q{q}"] = [docs[i] for i in order]
    run[f"q{q}"] = {docs[i]: float(scores[i]) for i in range(120)}
  ours = retrieval_metrics(ranked, qrels)
  evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.1,10,100"})
  per_query = evaluator.evaluate(run)
  kept = [q for q in qrels if any(s > 0 for s in qrels[q].values())]
  for ours_name, theirs in (("ndcg@10", "ndcg_cut_10"), ("recall@1", "recall_1"),
                            ("recall@10", "recall_10"), ("recall@100", "recall_100")):
    ref = float(np.mean([per_query[q][theirs] for q in kept]))
    assert ours[ours_name] == pytest.approx(ref, abs=1e-9), ours_name


# ---------------------------------------------------------------------------------------------
# Exact blocked top-k in JAX
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("corpus_block,query_block,k", [
    (10_000, 1024, 50),  # one block
    (64, 8, 50),         # many blocks, last one padded; several query blocks
    (7, 23, 10),         # blocks smaller than k
    (128, 5, 600),       # k above the corpus size: everything, sorted
])
def test_topk_matches_numpy_brute_force(corpus_block, query_block, k):
  rng = np.random.default_rng(corpus_block)
  queries = rng.normal(size=(23, 12)).astype(np.float32)
  corpus = rng.normal(size=(517, 12)).astype(np.float32)
  scores, ids = topk_inner_product(queries, corpus, k, corpus_block_size=corpus_block,
                                   query_block_size=query_block)
  full = queries.astype(np.float64) @ corpus.T.astype(np.float64)
  ref = np.argsort(-full, axis=1, kind="stable")[:, :min(k, len(corpus))]
  assert ids.shape == scores.shape == ref.shape
  for row, (got_row, ref_row) in enumerate(zip(ids, ref)):
    assert set(got_row.tolist()) == set(ref_row.tolist()), row
  np.testing.assert_allclose(scores, np.take_along_axis(full, ids, 1), atol=1e-5)
  assert (np.diff(scores, axis=1) <= 0).all()  # best first


def test_topk_edge_cases():
  corpus = np.eye(4, dtype=np.float32)
  scores, ids = topk_inner_product(corpus[[2, 0]], corpus, 1, corpus_block_size=3)
  assert ids.tolist() == [[2], [0]] and scores.tolist() == [[1.0], [1.0]]
  scores, ids = topk_inner_product(np.zeros((0, 4), np.float32), corpus, 3)
  assert ids.shape == (0, 3)
  with pytest.raises(ValueError, match="must be"):
    topk_inner_product(np.zeros((2, 3), np.float32), corpus, 1)


# ---------------------------------------------------------------------------------------------
# BEIR folder end to end with a random tiny model
# ---------------------------------------------------------------------------------------------

def _sentence(rng: np.random.Generator, n: int) -> str:
  return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=n)) + "."


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("eval_model")
  folder = make_hf_folder(root, "bert", seed=1)
  tok = make_tokenizer(root / "tokenizer")
  for f in tok.iterdir():
    shutil.copy(f, folder / f.name)
  return folder


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model) -> Encoder:
  return Encoder.from_hf(str(tiny_model))


@pytest.fixture(scope="module")
def beir_folder(tmp_path_factory) -> pathlib.Path:
  """30 documents; 8 queries, each a copy of one document's text (its grade-2 answer) plus a
  grade-1 second document; one judged query with no relevant document; TSV qrels in qrels/."""
  rng = np.random.default_rng(7)
  folder = tmp_path_factory.mktemp("beir")
  docs = {f"doc{i}": {"title": WORDS[i % len(WORDS)] if i % 3 else "",
                      "text": _sentence(rng, int(rng.integers(4, 14)))} for i in range(30)}
  with open(folder / "corpus.jsonl", "w") as f:
    for i, (did, doc) in enumerate(docs.items()):
      row = {"_id" if i % 2 else "id": did, "text": doc["text"]}
      if doc["title"]:
        row["title"] = doc["title"]
      f.write(json.dumps(row) + "\n")
  (folder / "qrels").mkdir()
  with open(folder / "queries.jsonl", "w") as fq, open(folder / "qrels" / "test.tsv", "w") as fr:
    fr.write("query-id\tcorpus-id\tscore\n")
    for q in range(8):
      answer, other = f"doc{3 * q}", f"doc{3 * q + 1}"
      text = (docs[answer]["title"] + " " + docs[answer]["text"]).strip()
      fq.write(json.dumps({"_id": f"q{q}", "text": text}) + "\n")
      fr.write(f"q{q}\t{answer}\t2\nq{q}\t{other}\t1\n")
    fq.write(json.dumps({"_id": "q-none", "text": "river"}) + "\n")
    fr.write("q-none\tdoc5\t0\n")
  return folder


def test_load_beir(beir_folder):
  queries, corpus, qrels = load_beir(beir_folder)
  assert len(queries) == 9 and len(corpus) == 30 and len(qrels) == 9
  assert qrels["q0"] == {"doc0": 2.0, "doc1": 1.0}
  assert corpus["doc1"]["title"] == WORDS[1] and corpus["doc0"]["title"] == ""


@pytest.fixture(scope="module")
def beir_result(tiny_encoder, beir_folder) -> dict:
  queries, corpus, qrels = load_beir(beir_folder)
  return evaluate_retrieval(tiny_encoder, queries, corpus, qrels, top_k=100, batch_size=8,
                            corpus_block_size=7, query_block_size=3, return_rankings=True)


def test_evaluate_retrieval_end_to_end(tiny_encoder, beir_folder, beir_result):
  queries, corpus, qrels = load_beir(beir_folder)
  got = beir_result
  assert got["num_queries"] == 8 and got["num_docs"] == 30
  # Each query is its grade-2 document's text: found first (cosine 1 with itself).
  assert got["recall@1"] == pytest.approx(0.5) and got["mrr@10"] == pytest.approx(1.0)
  assert got["recall@100"] == pytest.approx(1.0)
  # Same numbers as a numpy brute-force ranking of the same embeddings.
  qids = [f"q{q}" for q in range(8)]
  doc_ids = list(corpus)
  q_emb = tiny_encoder.encode([queries[q] for q in qids], batch_size=8)
  d_emb = tiny_encoder.encode([(d["title"] + " " + d["text"]).strip() for d in corpus.values()],
                              batch_size=8)
  order = np.argsort(-(q_emb @ d_emb.T), axis=1, kind="stable")
  ref = retrieval_metrics({q: [doc_ids[j] for j in row] for q, row in zip(qids, order)}, qrels)
  for name in ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10"):
    assert got[name] == pytest.approx(ref[name], abs=1e-9), name
  assert [d for d, _ in got["rankings"]["q3"][:1]] == ["doc9"]
  # An instruction changes the queries only.
  with_instruction = evaluate_retrieval(tiny_encoder, queries, corpus, qrels,
                                        query_instruction="query: ", top_k=10)
  assert "recall@100" not in with_instruction and with_instruction["num_queries"] == 8


def test_beir_readers_refuse_bad_rows(tmp_path):
  bad = tmp_path / "qrels.tsv"
  bad.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\thigh\n")
  with pytest.raises(EvalDataError, match=r"qrels\.tsv:3: relevance score 'high'"):
    read_qrels(bad)
  bad.write_text("q1\td1\n")
  with pytest.raises(EvalDataError, match=r"qrels\.tsv:1: 2 fields"):
    read_qrels(bad)
  jsonl = tmp_path / "qrels.jsonl"
  jsonl.write_text('{"query-id": "q1", "corpus-id": 7, "score": 2}\n\n{"query-id": "q2"}\n')
  with pytest.raises(EvalDataError, match=r"qrels\.jsonl:3: a qrels row needs"):
    read_qrels(jsonl)
  jsonl.write_text('{"query-id": "q1", "corpus-id": 7, "score": 2}\n')
  assert read_qrels(jsonl) == {"q1": {"7": 2.0}}

  folder = tmp_path / "beir"
  folder.mkdir()
  (folder / "qrels.jsonl").write_text('{"query-id": "q1", "corpus-id": "d1"}\n')
  (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n')
  (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n{"_id": "q2"}\n')
  with pytest.raises(EvalDataError, match=r"queries\.jsonl:2: \"text\" is missing"):
    load_beir(folder)
  (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n{"_id": "q2", "text": \n')
  with pytest.raises(EvalDataError, match=r"queries\.jsonl:2: not valid JSON"):
    load_beir(folder)
  (folder / "queries.jsonl").write_text('{"_id": "q9", "text": "x"}\n')
  with pytest.raises(EvalDataError, match=r"1 query ids are not in queries\.jsonl"):
    load_beir(folder)
  (tmp_path / "empty").mkdir()
  with pytest.raises(EvalDataError, match="no qrels file"):
    load_beir(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# STS
# ---------------------------------------------------------------------------------------------

def test_read_sts_formats_and_errors(tmp_path):
  tsv = tmp_path / "sts.tsv"
  tsv.write_bytes('split\tgenre\tdataset\tyear\tsid\tscore\tsentence1\tsentence2\r\n'
                  'train\tg\td\t2012\t1\t5.000\tA "quoted\tA plain one.\r\n'
                  'dev\tg\td\t2012\t2\t1.5\tx\ty\r\n'
                  'dev\tg\td\t2012\t3\t0\tp\tq\r\n'.encode())
  s1, s2, scores = read_sts(tsv)
  assert s1 == ['A "quoted', "x", "p"] and s2 == ["A plain one.", "y", "q"]
  assert scores.tolist() == [5.0, 1.5, 0.0]
  assert read_sts(tsv, "dev")[0] == ["x", "p"]
  with pytest.raises(EvalDataError, match=r"no rows with split='test'.*\['dev', 'train'\]"):
    read_sts(tsv, "test")
  with open(tsv, "ab") as f:
    f.write(b"dev\tg\td\t2012\t4\tNaNa\tp\tq\r\n")
  with pytest.raises(EvalDataError, match=r"sts\.tsv:5: score 'NaNa' is not a number"):
    read_sts(tsv)

  three = tmp_path / "sts.data"
  three.write_text("一个男人。\t一个人。\t4\n猫\t狗\t0\n")
  assert read_sts(three)[2].tolist() == [4.0, 0.0]
  with pytest.raises(EvalDataError, match="no split column"):
    read_sts(three, "dev")
  three.write_text("a\tb\t4\na\tb\n")
  with pytest.raises(EvalDataError, match=r"sts\.data:2: 2 tab-separated fields"):
    read_sts(three)
  with pytest.raises(EvalDataError, match="no such file"):
    read_sts(tmp_path / "absent.tsv")


def test_read_sts_real_files(shared_data):
  s1, s2, scores = read_sts(shared_data / "zh" / "STS-B.valid.data")
  with open(shared_data / "zh" / "STS-B.valid.data", encoding="utf-8") as f:
    n_lines = sum(1 for line in f if line.strip())
  assert len(s1) == len(s2) == len(scores) == n_lines == 1458
  assert scores.min() >= 0 and scores.max() <= 5 and all(s1) and all(s2)
  en = shared_data / "en" / "stsbenchmark.train-dev.tsv"
  assert len(read_sts(en, "dev")[0]) == 1500 and len(read_sts(en, "train")[0]) == 5749
  s1, s2, _ = read_sts(en)
  assert len(s1) == 7249 and not any("\r" in s for s in s1 + s2)
  assert any('"' in s for s in s1 + s2)  # quotes kept verbatim (QUOTE_NONE)


class _TableEncoder:
  """Stands in for `Encoder`: a fixed random vector per distinct text (no batching effects)."""

  def __init__(self, dim: int = 5):
    self.rng, self.table, self.dim = np.random.default_rng(0), {}, dim

  def encode(self, texts, batch_size=256, max_length=512, instruction=None, show_progress=None):
    return np.stack([self.table.setdefault((instruction or "") + t, self.rng.normal(size=self.dim))
                     for t in texts]).astype(np.float32)


def test_sts_spearman_is_the_spearman_of_cosines():
  from scipy.stats import spearmanr

  rng = np.random.default_rng(3)
  s1 = [_sentence(rng, 6) for _ in range(12)]
  s2 = [s if i % 3 == 0 else _sentence(rng, 6) for i, s in enumerate(s1)]
  s2[5] = s1[7]  # a sentence on both sides: encoded once
  enc = _TableEncoder()
  emb1, emb2 = enc.encode(s1).astype(np.float64), enc.encode(s2).astype(np.float64)
  emb1 /= np.linalg.norm(emb1, axis=-1, keepdims=True)
  emb2 /= np.linalg.norm(emb2, axis=-1, keepdims=True)
  cos = (emb1 * emb2).sum(-1)  # float64: the 4 identical pairs tie at 1
  gold = rng.uniform(0, 5, size=12)
  assert sts_spearman(enc, s1, s2, gold) == pytest.approx(spearmanr(cos, gold).statistic,
                                                          abs=1e-12)
  assert sts_spearman(enc, s1, s2, cos * 5) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="shape"):
    sts_spearman(enc, s1, s2, gold[:3])


@pytest.fixture(scope="module")
def minilm_encoder(minilm_path):
  return Encoder.from_hf(minilm_path, pooling="mean")


@pytest.mark.slow
def test_sts_spearman_matches_sentence_transformers(shared_data, minilm_path, minilm_encoder):
  from scipy.stats import spearmanr
  from sentence_transformers import SentenceTransformer

  s1, s2, scores = read_sts(shared_data / "en" / "stsbenchmark.train-dev.tsv", "dev")
  s1, s2, scores = s1[:200], s2[:200], scores[:200]
  st = SentenceTransformer(minilm_path, device="cpu")
  a = st.encode(s1, batch_size=64, convert_to_numpy=True)
  b = st.encode(s2, batch_size=64, convert_to_numpy=True)
  cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  ref = float(spearmanr(cos, scores).statistic)
  ours = sts_spearman(minilm_encoder, s1, s2, scores, batch_size=128, max_length=256)
  print(f"\nSTS-B dev[:200] Spearman: bge-jax {ours:.6f}, sentence-transformers {ref:.6f}")
  assert abs(ours - ref) < 1e-4
  assert ref > 0.8


# ---------------------------------------------------------------------------------------------
# mteb adapter (optional extra)
# ---------------------------------------------------------------------------------------------

class _RecordingEncoder:
  """Stands in for `Encoder`: records the instruction of each call."""

  dim = 3

  def __init__(self):
    self.calls = []

  def encode(self, texts, batch_size=256, max_length=512, instruction=None, show_progress=None):
    self.calls.append((list(texts), instruction))
    return np.ones((len(texts), self.dim), np.float32)


@pytest.fixture(scope="module")
def mteb_module():
  """mteb, or a skip: it is the optional extra bge-jax[eval]."""
  return pytest.importorskip("mteb")


@pytest.mark.slow
def test_mteb_encoder_instructions(mteb_module):
  from mteb.types import PromptType

  from bge_jax.eval import mteb_adapter

  class Meta:  # the two TaskMetadata fields the adapter reads
    def __init__(self, name, type_):
      self.name, self.type = name, type_

  rec = _RecordingEncoder()
  model = mteb_adapter.MTEBEncoder(rec, query_instruction="Q: ")
  assert model.mteb_model_meta.name == "local/bge-jax" and model.mteb_model_meta.embed_dim == 3
  loader = [{"text": ["a", "b"]}, {"text": ["c"]}]  # what iterating a DataLoader yields
  out = model.encode(loader, task_metadata=Meta("NFCorpus", "Retrieval"), hf_split="test",
                     hf_subset="default", prompt_type=PromptType.query, batch_size=32)
  assert out.shape == (3, 3) and rec.calls[-1] == (["a", "b", "c"], "Q: ")
  model.encode(loader, task_metadata=Meta("NFCorpus", "Retrieval"), hf_split="test",
               hf_subset="default", prompt_type=PromptType.document)
  assert rec.calls[-1][1] is None
  for name, type_ in (("STSBenchmark", "STS"), ("Banking77", "Classification")):
    model.encode(loader, task_metadata=Meta(name, type_), hf_split="test", hf_subset="default")
    assert rec.calls[-1][1] is None
  assert mteb_adapter.MTEBEncoder(rec, query_instruction="Q: ").instruction_for(
      Meta("T2Reranking", "Reranking"), "query") == "Q: "
  custom = mteb_adapter.MTEBEncoder(rec, instructions_by_task_type={"STS": "S: ", "MyTask": "M: "},
                                    name="org/x")
  assert custom.mteb_model_meta.name == "org/x"
  assert custom.instruction_for(Meta("STSB", "STS"), None) == "S: "
  assert custom.instruction_for(Meta("MyTask", "STS"), None) == "M: "
  assert custom.instruction_for(Meta("NQ", "Retrieval"), "query") is None


@pytest.mark.slow
def test_mteb_local_sts_task_matches_sts_spearman(mteb_module, shared_data, minilm_encoder):
  mteb = mteb_module
  from bge_jax.eval import mteb_adapter

  path = shared_data / "en" / "stsbenchmark.train-dev.tsv"
  task = mteb_adapter.local_sts_task(path, "dev", limit=100)
  model = mteb_adapter.MTEBEncoder(minilm_encoder, max_length=256)
  result = mteb.evaluate(model, [task], cache=None, show_progress_bar=False)
  score = mteb_adapter.main_score(result)
  s1, s2, scores = read_sts(path, "dev")
  ours = sts_spearman(minilm_encoder, s1[:100], s2[:100], scores[:100], max_length=256)
  print(f"\nSTS-B dev[:100]: mteb cosine_spearman {score:.6f}, sts_spearman {ours:.6f}")
  assert abs(score - ours) < 1e-3
  assert task.metadata.main_score == "cosine_spearman"


def test_mteb_adapter_without_mteb(monkeypatch):
  # A fresh copy of the module in a process where `import mteb` fails.
  monkeypatch.setitem(sys.modules, "mteb", None)
  spec = importlib.util.find_spec("bge_jax.eval.mteb_adapter")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.mteb is None and module.MTEBEncoder.__bases__ == (object,)
  assert module.bge_instructions("Q: ") == {"Retrieval": "Q: ", "Reranking": "Q: "}
  with pytest.raises(ImportError, match=r"bge-jax\[eval\]"):
    module.MTEBEncoder(_RecordingEncoder())
  with pytest.raises(ImportError, match=r"bge-jax\[eval\]"):
    module.local_sts_task("x.tsv")


# ---------------------------------------------------------------------------------------------
# launch/eval.py
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # a fresh process: imports and compiles again (the pyproject's slow marker)
def test_eval_cli_runs_as_a_subprocess(tmp_path, tiny_model, beir_folder, beir_result):
  out = tmp_path / "res" / "results.json"
  env = {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "HF_HUB_OFFLINE": "1"}
  proc = subprocess.run(
      [sys.executable, str(EVAL_SCRIPT), "retrieval", "--model", str(tiny_model), "--data",
       str(beir_folder), "--batch-size", "8", "--out", str(out)],
      capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
  assert proc.returncode == 0, proc.stderr
  assert "ndcg@10" in proc.stdout and "recall@100" in proc.stdout and "mrr@10" in proc.stdout
  result = json.loads(out.read_text())
  ref = beir_result  # the same model and data in process (other block sizes)
  for name in ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10", "num_queries"):
    assert result["metrics"][name] == pytest.approx(ref[name], abs=1e-9), name
  assert result["task"] == "retrieval" and result["documents"] == 30


def test_eval_cli_sts_and_refusals(tmp_path, tiny_model, capsys):
  sts = tmp_path / "pairs.data"
  sts.write_text("alpha beta\talpha beta\t5\nriver city\tmusic paper\t0\n"
                 "ocean forest\tocean stone\t3\n")
  assert eval_cli.main(["sts", "--model", str(tiny_model), "--data", str(sts), "--out",
                        str(tmp_path / "sts.json")]) == 0
  assert "spearman" in capsys.readouterr().out
  assert json.loads((tmp_path / "sts.json").read_text())["pairs"] == 3

  sts.write_text("a\tb\t1\na\tb\tx\n")
  cases = [
      (["sts", "--model", str(tiny_model), "--data", str(sts)], r"pairs\.data:2: score 'x'"),
      (["sts", "--model", str(tiny_model), "--data", str(tmp_path / "nope.tsv")], "no such file"),
      (["sts", "--model", str(tmp_path / "nomodel"), "--data", str(sts)], "no such model"),
      (["retrieval", "--model", str(tiny_model), "--data", str(tmp_path)], "no qrels file"),
      (["retrieval", "--model", str(tiny_model), "--data", str(tmp_path), "--top-k", "5"],
       "--top-k >= 10"),
      (["sts", "--model", str(tiny_model)], "required: --data"),
  ]
  for argv, message in cases:
    assert eval_cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), (message, err[0])
