"""Hard-negative mining: exact top-k vs numpy brute force, sharding, sampling rules, the command."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bge_jax import mine
from bge_jax.encoder import Encoder
from bge_jax.sharding import make_mesh
from conftest import REPO, WORDS, make_hf_folder, make_tokenizer
from launch import mine as mine_cli

SCRIPT = REPO / "launch" / "mine.py"


def brute_force(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Full score matrix, stable argsort: equal scores rank the lower corpus index first."""
  scores = queries.astype(np.float64) @ corpus.astype(np.float64).T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, axis=1), order


def int_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
  """Small-integer vectors: float32 dot products are exact and ties are frequent."""
  return rng.integers(-2, 3, size=(n, dim)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# exact_top_k


@pytest.mark.parametrize("num_q,n,dim,k,block", [
    (1, 1, 4, 1, 8),        # a single passage
    (13, 100, 8, 7, 16),    # n not a multiple of the block
    (37, 250, 6, 40, 16),   # k > block
    (9, 64, 4, 64, 64),     # k = n = block
    (300, 517, 12, 25, 128),  # several query batches, ragged last block
])
def test_exact_top_k_matches_brute_force_with_ties(num_q, n, dim, k, block):
  rng = np.random.default_rng(num_q * 1000 + n)
  q, c = int_vectors(rng, num_q, dim), int_vectors(rng, n, dim)
  scores, idx = mine.exact_top_k(q, c, k, block_size=block, query_batch_size=64)
  ref_scores, ref_idx = brute_force(q, c, k)
  assert scores.shape == idx.shape == (num_q, k)
  assert scores.dtype == np.float32 and idx.dtype == np.int64
  np.testing.assert_array_equal(idx, ref_idx)  # same order, ties to the lower index
  np.testing.assert_array_equal(scores, ref_scores)


def test_exact_top_k_float_neighbour_sets():
  rng = np.random.default_rng(0)
  q = rng.standard_normal((50, 32)).astype(np.float32)
  c = rng.standard_normal((1000, 32)).astype(np.float32)
  for block, k in ((100, 150), (4096, 210)):
    scores, idx = mine.exact_top_k(q, c, k, block_size=block)
    ref_scores, ref_idx = brute_force(q, c, k)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-4)
    for row, ref_row in zip(idx, ref_idx):
      assert set(row.tolist()) == set(ref_row.tolist())
    assert (np.diff(scores, axis=1) <= 0).all()


def test_exact_top_k_sharded_equals_single_device():
  import jax
  assert jax.device_count() == 8
  rng = np.random.default_rng(1)
  meshes = (make_mesh(), "auto", make_mesh(data=2, fsdp=2, tensor=2))
  cases = ((21, 333, 30, 16, int_vectors(rng, 21, 5), int_vectors(rng, 333, 5)),  # k > block
           (40, 777, 12, 32, rng.standard_normal((40, 5)).astype(np.float32),
            rng.standard_normal((777, 5)).astype(np.float32)))
  for num_q, n, k, block, q, c in cases:
    single = mine.exact_top_k(q, c, k, block_size=block, query_batch_size=32)
    for m in meshes:
      sharded = mine.exact_top_k(q, c, k, block_size=block, query_batch_size=32, mesh=m)
      np.testing.assert_array_equal(sharded[1], single[1])
      np.testing.assert_array_equal(sharded[0], single[0])
    meshes = meshes[:1]
  np.testing.assert_array_equal(single[1], brute_force(q, c, k)[1])


def test_exact_top_k_refusals():
  c = np.ones((5, 4), np.float32)
  with pytest.raises(ValueError, match="between 1 and the corpus size 5"):
    mine.exact_top_k(c, c, 6)
  with pytest.raises(ValueError, match="same D"):
    mine.exact_top_k(np.ones((2, 3), np.float32), c, 1)
  with pytest.raises(ValueError, match="NaN"):
    mine.exact_top_k(np.full((1, 4), np.nan, np.float32), c, 1)
  scores, idx = mine.exact_top_k(np.zeros((0, 4), np.float32), c, 3)
  assert scores.shape == idx.shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# mine_hard_negatives


def _sentence(rng: np.random.Generator, n_words: int) -> str:
  return " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), n_words)) + "."


def make_rows(n_rows: int, seed: int = 0, n_neg: int = 3) -> list[dict]:
  """Rows over a shared passage pool: passages repeat across rows, some queries are passages."""
  rng = np.random.default_rng(seed)
  pool = list(dict.fromkeys(_sentence(rng, int(rng.integers(3, 12))) for _ in range(4 * n_rows)))
  rows = []
  for i in range(n_rows):
    pos = [pool[j] for j in rng.choice(len(pool), int(rng.integers(1, 3)), replace=False)]
    neg = [pool[j] for j in rng.choice(len(pool), n_neg, replace=False) if pool[j] not in pos]
    query = pool[int(rng.integers(len(pool)))] if i % 5 == 0 else _sentence(rng, 4)
    rows.append({"query": query, "pos": pos, "neg": neg, "id": i})
  return rows


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  folder = make_hf_folder(tmp_path_factory.mktemp("mine"), "bert", seed=3)
  make_tokenizer(folder)
  return folder


@pytest.fixture(scope="module")
def encoder(tiny_model):
  return Encoder.from_hf(str(tiny_model), pooling="cls")


@pytest.fixture(scope="module")
def rows():
  return make_rows(40)


def corpus_of(rows: list[dict]) -> list[str]:
  out = []
  for row in rows:
    for t in row["pos"] + row.get("neg", []):
      if t not in out:
        out.append(t)
  return out


def ranked_texts(encoder, rows, corpus, instruction=None, max_length=32):
  """Per row: corpus texts by brute-force rank and their scores, from fresh embeddings."""
  p = encoder.encode(corpus, batch_size=64, max_length=max_length)
  q = encoder.encode([r["query"] for r in rows], batch_size=64, max_length=max_length,
                     instruction=instruction)
  scores, order = brute_force(q, p, len(corpus))
  return [[corpus[j] for j in o] for o in order], scores


def test_negatives_come_from_the_rank_range(encoder, rows):
  corpus = corpus_of(rows)
  start, end, number = 3, 40, 8
  instruction = "query: "
  mined, stats = mine.mine_with_stats(rows, encoder, range_for_sampling=(start, end),
                                      negative_number=number, query_instruction=instruction,
                                      batch_size=64, max_length=32, mesh=None)
  assert stats.corpus_size == len(corpus) and stats.rows == len(rows)
  assert stats.topped_up == 0 and stats.short == 0
  ranked, scores = ranked_texts(encoder, rows, corpus, instruction)
  for row, out, texts, s in zip(rows, mined, ranked, scores):
    assert {k: v for k, v in out.items() if k != "neg"} == {k: v for k, v in row.items()
                                                             if k != "neg"}
    assert len(out["neg"]) == number == len(set(out["neg"]))
    assert not set(out["neg"]) & set(row["pos"]) and row["query"] not in out["neg"]
    allowed = texts[start:end]
    for t in out["neg"]:
      if t not in allowed:  # only a float near-tie at a range edge may differ
        r = texts.index(t)
        assert min(abs(s[r] - s[start]), abs(s[r] - s[end - 1])) < 1e-5, (t, r)
    # Sampled negatives keep their rank order.
    ranks = [texts.index(t) for t in out["neg"]]
    assert ranks == sorted(ranks)
  assert rows[0]["neg"] != mined[0]["neg"]  # the input rows are not modified in place


def test_all_candidates_then_top_up(encoder, rows):
  """Range 0-5 holds < 12 candidates: all of them in rank order, then random top-ups."""
  corpus = corpus_of(rows)
  number = 12
  mined, stats = mine.mine_with_stats(rows, encoder, range_for_sampling=(0, 5),
                                      negative_number=number, batch_size=64, max_length=32,
                                      mesh=None)
  assert stats.topped_up == len(rows) and stats.short == 0
  ranked, _ = ranked_texts(encoder, rows, corpus)
  queries_in_corpus = 0
  for row, out, texts in zip(rows, mined, ranked):
    queries_in_corpus += row["query"] in corpus
    expected = [t for t in texts[:5] if t not in row["pos"] and t != row["query"]]
    assert out["neg"][:len(expected)] == expected
    assert len(out["neg"]) == number == len(set(out["neg"]))
    assert not set(out["neg"]) & set(row["pos"]) and row["query"] not in out["neg"]
    assert set(out["neg"]) <= set(corpus)
  assert queries_in_corpus >= 5  # the query-is-a-passage rule was exercised


def test_deterministic_per_seed_and_device_count(encoder, rows):
  kwargs = dict(range_for_sampling="2-30", negative_number=5, batch_size=64, max_length=32)
  a = mine.mine_hard_negatives(rows, encoder, seed=7, **kwargs)
  assert a == mine.mine_hard_negatives(rows, encoder, seed=7, **kwargs)
  assert a == mine.mine_hard_negatives(rows, encoder, seed=7, mesh=None, block_size=16, **kwargs)
  b = mine.mine_hard_negatives(rows, encoder, seed=8, **kwargs)
  assert a != b
  # Per-row generators: a row's negatives do not depend on the rows after it.
  assert a[:10] == mine.mine_hard_negatives(rows[:10], encoder, seed=7,
                                            candidate_pool=corpus_of(rows), **kwargs)


def test_candidate_pool_file_small_corpus_and_fields(encoder, tmp_path):
  pool = ["alpha beta gamma.", "delta model vector.", "search index query.", "alpha beta gamma.",
          "river mountain city."]
  path = tmp_path / "pool.jsonl"
  path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(pool))
                  + "\n")
  rows = [{"query": "alpha", "pos": ["alpha beta gamma."], "neg": ["x"], "neg_scores": [0.5],
           "pos_scores": [0.9], "prompt": "p", "type": "normal"},
          {"query": "river mountain city.", "pos": ["not in the pool."]}]
  mined, stats = mine.mine_with_stats(rows, encoder, candidate_pool=str(path),
                                      range_for_sampling=(0, 10), negative_number=6,
                                      batch_size=64, max_length=32, mesh=None)
  assert stats.corpus_size == 4 and stats.short == 2
  assert sorted(mined[0]["neg"]) == sorted(["delta model vector.", "search index query.",
                                            "river mountain city."])
  assert sorted(mined[1]["neg"]) == sorted(["alpha beta gamma.", "delta model vector.",
                                            "search index query."])
  assert "neg_scores" not in mined[0]  # stale teacher scores are dropped, the rest kept
  assert {k: mined[0][k] for k in ("pos_scores", "prompt", "type")} == {
      "pos_scores": [0.9], "prompt": "p", "type": "normal"}
  same = mine.mine_hard_negatives(rows, encoder, candidate_pool=pool, range_for_sampling=(0, 10),
                                  negative_number=6, batch_size=64, max_length=32, mesh=None)
  assert same == mined


def test_top_up_on_a_large_corpus():
  """Past 4096 passages top-ups are drawn by rejection: distinct, never excluded, seeded."""
  excluded = set(range(0, 9000, 3))
  candidates = np.array([5, 8, 11])
  for n_corpus, number in ((9000, 40), (300, 40), (3003, 2100)):
    picked, extra = mine._sample_row(np.random.default_rng([1, 2]), candidates, excluded,
                                     n_corpus, number)
    eligible = n_corpus - len({j for j in excluded if j < n_corpus})
    assert picked[:3] == [5, 8, 11] and extra == min(number, eligible) - 3
    assert len(set(picked)) == len(picked) and not set(picked) & excluded
    assert max(picked) < n_corpus
    again, _ = mine._sample_row(np.random.default_rng([1, 2]), candidates, excluded, n_corpus,
                                number)
    assert again == picked


def test_row_and_argument_refusals(encoder):
  good = {"query": "q", "pos": ["p"]}
  for row, match in ((["q"], "expected a JSON object"), ({"pos": ["p"]}, 'missing field "query"'),
                     ({"query": "q"}, 'missing field "pos"'), ({"query": 1, "pos": ["p"]},
                                                              'field "query" is a JSON number'),
                     ({"query": "q", "pos": "p"}, r'wrap a single passage'),
                     ({"query": "q", "pos": []}, '"pos" is empty'),
                     ({"query": "q", "pos": ["p"], "neg": [None]}, r'"neg"\[0\] is a JSON null')):
    with pytest.raises(mine.MiningInputError, match=r"rows\[1\]: .*" + match):
      mine.mine_hard_negatives([good, row], encoder)
  for bad in ("10", "a-b", "5-5", "7-3", (-1, 4)):
    with pytest.raises(ValueError, match="range"):
      mine.mine_hard_negatives([good], encoder, range_for_sampling=bad)
  with pytest.raises(ValueError, match="negative_number"):
    mine.mine_hard_negatives([good], encoder, negative_number=0)
  assert mine.mine_hard_negatives([], encoder) == []


# ---------------------------------------------------------------------------------------------
# False-negative control: score limits against brute force


class TableEncoder:
  """Texts -> small-integer vectors from a hash of the text: exact float32 scores, many ties.
  An instruction changes the vector (as it changes an Encoder's)."""

  dim = 6

  def encode(self, texts, batch_size=256, max_length=512, instruction=None, show_progress=None):
    import zlib
    return np.stack([np.random.default_rng(zlib.crc32(((instruction or "") + t).encode())).integers(
        -2, 3, self.dim).astype(np.float32) for t in texts]).reshape(-1, self.dim)


def reference_candidates(rows, corpus, encoder, start, end, limits, instruction=None):
  """Per row, in numpy: (allowed candidates in rank order, whether top-ups are allowed, the
  per-rule skip counts), from a full score matrix and ST's comparisons."""
  p = encoder.encode(corpus)
  q = encoder.encode([r["query"] for r in rows], instruction=instruction)
  scores = (q.astype(np.float64) @ p.astype(np.float64).T).astype(np.float32)
  order = np.argsort(-scores, axis=1, kind="stable")
  k = min(end, len(corpus))
  out, skipped = [], {}
  for i, row in enumerate(rows):
    pos = min(float(scores[i, corpus.index(t)]) if t in corpus else
              float(q[i] @ encoder.encode([t])[0]) for t in row["pos"])
    pos = np.float32(pos)

    def breaks(s):
      rules = {}
      if limits.get("max_score") is not None:
        rules["max_score"] = s > np.float32(limits["max_score"])
      if limits.get("margin") is not None:
        rules["margin"] = s + np.float32(limits["margin"]) > pos
      if limits.get("relative_margin") is not None:
        rules["relative_margin"] = s > pos - abs(pos) * np.float32(limits["relative_margin"])
      return rules

    allowed = []
    for j in order[i, start:k]:
      if corpus[j] in row["pos"] or corpus[j] == row["query"]:
        continue
      rules = breaks(scores[i, j])
      for name, bad in rules.items():
        skipped[name] = skipped.get(name, 0) + bool(bad)
      if not any(rules.values()):
        allowed.append(corpus[j])
    top_up = k < len(corpus) and not any(breaks(scores[i, order[i, k - 1]]).values())
    out.append((allowed, top_up, [corpus[j] for j in order[i, k:]]))
  return out, skipped


@pytest.mark.parametrize("limits,rank_range", [
    (dict(max_score=2.0), (0, 60)),
    (dict(margin=1.0), (3, 80)),
    (dict(relative_margin=0.5), (0, 50)),
    (dict(max_score=3.0, margin=0.0, relative_margin=0.25), (2, 1000)),  # k = corpus: no top-ups
    (dict(max_score=-1.0), (0, 40)),  # almost nothing passes
])
def test_score_limits_match_brute_force(rows, limits, rank_range):
  encoder = TableEncoder()
  corpus = corpus_of(rows)
  number = 20
  mined, stats = mine.mine_with_stats(rows, encoder, range_for_sampling=rank_range,
                                      negative_number=number, query_instruction="q: ", mesh=None,
                                      **limits)
  ref, skipped = reference_candidates(rows, corpus, encoder, *rank_range, limits, "q: ")
  assert stats.skipped == skipped and sum(skipped.values()) > 0
  short = topped = 0
  for row, out, (allowed, top_up, beyond) in zip(rows, mined, ref):
    negs = out["neg"]
    if len(allowed) >= number:
      assert len(negs) == number and set(negs) <= set(allowed)
      assert negs == [t for t in allowed if t in negs]  # rank order kept
      continue
    assert negs[:len(allowed)] == allowed
    extra = negs[len(allowed):]
    if top_up:  # random passages ranked past the range's end, never a positive or the query
      assert len(negs) == min(number, len(allowed) + len([t for t in beyond if t not in
                                                           row["pos"] and t != row["query"]]))
      assert set(extra) <= set(beyond) and not set(extra) & {*row["pos"], row["query"]}
      topped += bool(extra)
    else:
      assert extra == []
    short += len(negs) < number
  assert (stats.short, stats.topped_up) == (short, topped)
  assert short > 0 or topped > 0  # the short-row rules were exercised


def test_score_limits_equal_scores_and_defaults(rows):
  """A candidate scoring exactly max_score, or exactly pos - margin, is kept (the rules skip
  `>`, as sentence-transformers); without limits nothing is skipped and the old output holds."""
  limits = mine.ScoreLimits(max_score=1.0, margin=0.5, relative_margin=0.5)
  s = np.array([0.5, 1.0, 1.5], np.float32)
  v = limits.violations(s, np.float32(1.5))
  np.testing.assert_array_equal(v["max_score"], [False, False, True])
  np.testing.assert_array_equal(v["margin"], [False, False, True])
  np.testing.assert_array_equal(v["relative_margin"], [False, True, True])  # 1.5 - 0.75
  np.testing.assert_array_equal(limits.violations(s, np.float32(-2.0))["relative_margin"],
                                [True, True, True])  # -2 - |-2| * 0.5 = -3
  with pytest.raises(ValueError, match="max_score=nan"):
    mine.ScoreLimits(max_score=float("nan"))
  a, stats = mine.mine_with_stats(rows, TableEncoder(), range_for_sampling=(0, 30),
                                  negative_number=4, mesh=None)
  assert stats.skipped == {}
  assert a == mine.mine_hard_negatives(rows, TableEncoder(), range_for_sampling=(0, 30),
                                       negative_number=4, mesh=None, max_score=100.0)


def test_corpus_split_and_merge_equal_one_search():
  """Each 'process' searches its own corpus rows (CorpusIndex with an offset); merge_top_k of
  the lists equals one search of the whole corpus, ties included."""
  rng = np.random.default_rng(5)
  q, c = int_vectors(rng, 30, 4), int_vectors(rng, 203, 4)
  for count, chunk, k in ((2, 16, 40), (3, 50, 203), (4, 100, 7)):
    bounds = [mine.corpus_split(len(c), chunk, p, count) for p in range(count)]
    assert bounds[0][0] == 0 and bounds[-1][1] == len(c)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(lo % chunk == 0 for lo, _ in bounds)
    block, q_batch = mine.search_shapes(len(c), len(q), 32, 16)
    parts = [mine.CorpusIndex(c[lo:hi], block=block, index_offset=lo, mesh=m).search(
        q, k, query_batch_size=q_batch) for (lo, hi), m in zip(bounds, (None, "auto") * 2)]
    scores, idx = mine.merge_top_k(np.stack([p[0] for p in parts]),
                                   np.stack([p[1] for p in parts]), k)
    ref_scores, ref_idx = brute_force(q, c, k)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(scores, ref_scores)
  # Fewer chunks than processes: a process may hold no rows.
  assert [mine.corpus_split(10, 16, p, 2) for p in (0, 1)] == [(0, 0), (0, 10)]
  empty = mine.CorpusIndex(np.zeros((0, 4), np.float32)).search(q, 3)
  assert (empty[0] == -np.inf).all()


# Runs launch/mine.py's main() in a jax.distributed process with Encoder.encode wrapped to
# record every call's texts, then gathers a test array with gather_split in pieces of 3 rows.
TWO_PROCESS_DRIVER = """
import json, sys
import jax
import numpy as np
from bge_jax import encoder as encoder_lib, mine
from launch import mine as cli

calls = []
encode = encoder_lib.Encoder.encode

def recorded(self, texts, *args, **kwargs):
  calls.append({"texts": list(texts), "instruction": kwargs.get("instruction")})
  return encode(self, texts, *args, **kwargs)

encoder_lib.Encoder.encode = recorded
code = cli.main(sys.argv[2:])
gathered = None
if code == 0:
  n, chunk = 23, 4
  lo, hi = mine.corpus_split(n, chunk, jax.process_index(), jax.process_count())
  full = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
  gathered = mine.gather_split(full[lo:hi], n, chunk, piece=3).tolist()
with open(sys.argv[1], "w") as f:
  json.dump({"code": code, "calls": calls, "gathered": gathered}, f)
sys.exit(code)
"""


@pytest.mark.slow
def test_two_processes_mine_as_one(tiny_model, encoder, rows, tmp_path):
  """launch/mine.py as 2 jax.distributed processes (gloo, 4 CPU devices each): each encodes
  only its own chunks of the corpus, of the queries and of the positives missing from the
  candidate pool (recorded from Encoder.encode), and the output is one process's rows."""
  from test_multihost import free_port

  chunk, instruction = 16, "q: "
  dropped = {row["pos"][0] for i, row in enumerate(rows) if i % 3 != 2}
  pool = [t for t in corpus_of(rows) if t not in dropped]
  missing = list(dict.fromkeys(t for row in rows for t in row["pos"] if t not in pool))
  queries = [row["query"] for row in rows]
  assert len(rows) > chunk and len(missing) > chunk  # both processes encode some of each
  train = write_jsonl(tmp_path / "train.jsonl", rows)
  pool_file = write_jsonl(tmp_path / "pool.jsonl", [{"text": t} for t in pool])
  out = tmp_path / "out.jsonl"
  port = free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                                   "--xla_cpu_multi_thread_eigen=false",
             HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  args = ["--model", str(tiny_model), "--input", train, "--output", str(out), "--range", "2-40",
          "--negatives", "6", "--max-length", "32", "--batch-size", "64", "--chunk-size",
          str(chunk), "--candidate-pool", pool_file, "--query-instruction", instruction,
          "--margin", "0.001", "--max-score", "0.98", "--coordinator-address",
          f"127.0.0.1:{port}", "--num-processes", "2"]
  records = [tmp_path / f"calls{i}.json" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_DRIVER, str(records[i]), *args,
                             "--process-id", str(i)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], logs
  assert "(2 processes)" in logs[0] and "mined 40 rows" in logs[0]
  assert "mined" not in logs[1]  # process 0 alone writes the output and the summary
  expected, stats = mine.mine_with_stats(
      rows, encoder, candidate_pool=pool, range_for_sampling=(2, 40), negative_number=6,
      query_instruction=instruction, batch_size=64, max_length=32, chunk_size=chunk,
      margin=0.001, max_score=0.98)
  assert stats.skipped["margin"] > 0  # the positives' scores crossed processes
  assert read_jsonl(out) == expected

  seen_queries, seen_passages = [], []
  for p, record in enumerate(records):
    calls = json.loads(record.read_text())["calls"]
    assert all(len(c["texts"]) <= chunk for c in calls)
    q_lo, q_hi = mine.corpus_split(len(queries), chunk, p, 2)
    lo, hi = mine.corpus_split(len(pool), chunk, p, 2)
    m_lo, m_hi = mine.corpus_split(len(missing), chunk, p, 2)
    assert 0 < q_hi - q_lo < len(queries) and 0 < m_hi - m_lo < len(missing)
    own_queries = [t for c in calls if c["instruction"] == instruction for t in c["texts"]]
    own_passages = [t for c in calls if c["instruction"] is None for t in c["texts"]]
    assert own_queries == queries[q_lo:q_hi], p
    assert own_passages == pool[lo:hi] + missing[m_lo:m_hi], p
    seen_queries += own_queries
    seen_passages += own_passages
  # Every text was encoded once, by one process.
  assert seen_queries == queries and sorted(seen_passages) == sorted(pool + missing)
  gathered = [json.loads(r.read_text())["gathered"] for r in records]
  assert gathered[0] == gathered[1] == np.arange(23 * 3).reshape(23, 3).tolist()


# ---------------------------------------------------------------------------------------------
# The output file (mine.write_rows) and launch/mine.py


def write_jsonl(path, rows) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in open(path, encoding="utf-8")]


def assert_nothing_written(folder, out) -> None:
  assert not out.exists()
  assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_write_rows_replaces_atomically_and_keeps_the_mode(tmp_path):
  rows = [{"query": "q", "pos": ["p"], "neg": ["n", "café"]}]
  out = tmp_path / "out.jsonl"
  mine.write_rows(str(out), rows)
  umask = os.umask(0)
  os.umask(umask)
  assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not 0600
  assert read_jsonl(out) == rows and "café" in out.read_text(encoding="utf-8")
  os.chmod(out, 0o640)
  mine.write_rows(str(out), rows * 2)
  assert out.stat().st_mode & 0o777 == 0o640 and read_jsonl(out) == rows * 2

  def interrupted():
    yield rows[0]
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    mine.write_rows(str(out), interrupted())
  assert read_jsonl(out) == rows * 2  # the old content, and no temporary file beside it
  assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_cli_subprocess(tiny_model, encoder, rows, tmp_path):
  train = write_jsonl(tmp_path / "train.jsonl", rows)
  out = tmp_path / "out.jsonl"
  cmd = [sys.executable, str(SCRIPT), "--model", str(tiny_model), "--input", train, "--output",
         str(out), "--range", "2-30", "--negatives", "5", "--max-length", "32", "--batch-size",
         "64", "--seed", "3", "--query-instruction", "q: "]
  # One device in the child (8 in this process): the negatives must not depend on it.
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr
  got = read_jsonl(out)
  expected = mine.mine_hard_negatives(rows, encoder, range_for_sampling=(2, 30),
                                      negative_number=5, query_instruction="q: ", seed=3,
                                      batch_size=64, max_length=32)
  assert got == expected
  summary = proc.stdout.strip().splitlines()[-1]
  assert summary.startswith(f"mined {len(rows)} rows")
  assert f"corpus {len(corpus_of(rows))} passages" in summary
  assert f"0 of {len(rows)} rows topped up" in summary
  assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
  umask = os.umask(0)
  os.umask(umask)
  assert out.stat().st_mode & 0o777 == 0o666 & ~umask

  # A refusal as a subprocess: exit 2, one error line naming file:line, the old output kept.
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(rows[0]) + "\n\n" + '{"query": "q", "pos": ["p"]\n')
  cmd[cmd.index(train)] = str(bad)
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
  assert proc.stderr.startswith(f"error: {bad}:3: invalid JSON")
  assert read_jsonl(out) == expected


def test_cli_refusals(tiny_model, tmp_path, capsys):
  good = {"query": "alpha beta", "pos": ["gamma delta."], "neg": ["model vector."]}
  folder = tmp_path / "work"
  folder.mkdir()
  out = folder / "out.jsonl"

  def refused(lines, *extra, needle, pool=None):
    train = folder / "train.jsonl"
    train.write_text("".join(line + "\n" for line in lines))
    argv = ["--model", str(tiny_model), "--input", str(train), "--output", str(out),
            "--max-length", "32", *extra]
    code = mine_cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and needle in err, err
    assert_nothing_written(folder, out)

  ok = json.dumps(good)
  refused([ok, "{oops"], needle=f"{folder / 'train.jsonl'}:2: invalid JSON")
  refused([ok, ok, json.dumps({"pos": ["x"]})], needle='train.jsonl:3: missing field "query"')
  refused([json.dumps({"query": "q"})], needle='train.jsonl:1: missing field "pos"')
  refused([json.dumps({"query": "q", "pos": "x"})], needle='train.jsonl:1: field "pos" is a JSON '
          "string")
  refused([ok, "[1, 2]"], needle="train.jsonl:2: expected a JSON object")
  refused([], needle="no rows")
  refused([ok], "--range", "20", needle="--range")
  refused([ok], "--negatives", "0", needle="--negatives=0")
  refused([ok], "--candidate-pool", str(folder / "missing.jsonl"), needle="missing.jsonl: no such")
  (folder / "pool.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
  refused([ok], "--candidate-pool", str(folder / "pool.jsonl"),
          needle='pool.jsonl:2: expected an object {"text": ...}, got no field "text"')
  train = folder / "train.jsonl"
  assert mine_cli.main(["--model", str(folder / "nope"), "--input", str(train), "--output",
                        str(out)]) == 2
  assert "--model" in capsys.readouterr().err
  assert_nothing_written(folder, out)
  assert mine_cli.main(["--model", str(tiny_model), "--input", str(train), "--output",
                        str(folder / "no" / "out.jsonl")]) == 2
  assert "does not exist" in capsys.readouterr().err

  # In process, the happy path with a pool too small for the request: a summary with the count.
  train.write_text(ok + "\n")
  (folder / "pool.jsonl").write_text('{"text": "alpha."}\n{"text": "beta."}\n')
  assert mine_cli.main(["--model", str(tiny_model), "--input", str(train), "--output", str(out),
                        "--candidate-pool", str(folder / "pool.jsonl"), "--range", "0-10"]) == 0
  summary = capsys.readouterr().out.strip().splitlines()[-1]
  assert "corpus 2 passages" in summary and "0 of 1 rows topped up" in summary
  assert summary.endswith("1 left short (the corpus is too small)")
  assert sorted(read_jsonl(out)[0]["neg"]) == ["alpha.", "beta."]


def test_cli_reads_prepared_data(tiny_model, rows, tmp_path, capsys):
  """A prepared pairs folder as --input and a prepared text folder as --candidate-pool mine
  the same negatives as their JSONL files."""
  prepare = pytest.importorskip("bge_jax.data.prepare")
  plain = [{k: v for k, v in r.items() if k != "id"} for r in rows]  # PairRow fields only
  train = write_jsonl(tmp_path / "train.jsonl", plain)
  pool = write_jsonl(tmp_path / "pool.jsonl", [{"text": t} for t in corpus_of(rows)[::2]])
  prepare.prepare([train], str(tmp_path / "train_prepared"), progress=False)
  prepare.prepare([pool], str(tmp_path / "pool_prepared"), data="text", progress=False)
  args = ["--model", str(tiny_model), "--range", "1-30", "--negatives", "4", "--max-length",
          "32", "--margin", "0.0"]
  assert mine_cli.main(args + ["--input", train, "--candidate-pool", pool, "--output",
                               str(tmp_path / "a.jsonl")]) == 0
  assert mine_cli.main(args + ["--input", str(tmp_path / "train_prepared"), "--candidate-pool",
                               str(tmp_path / "pool_prepared"), "--output",
                               str(tmp_path / "b.jsonl")]) == 0
  a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
  assert a == b and len(a) == len(rows) and a[0]["neg"] != plain[0]["neg"]
  assert "margin skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_mine_toy_finetune_data_with_minilm(minilm_path, shared_data, tmp_path):
  path = shared_data / "en" / "toy_finetune_data.jsonl"
  if not path.is_file():
    pytest.skip(f"{path} is absent")
  rows = mine.read_rows(str(path))
  encoder = Encoder.from_hf(minilm_path, pooling="mean")
  mined, stats = mine.mine_with_stats(rows, encoder, range_for_sampling=(2, 200),
                                      negative_number=15, batch_size=64)
  corpus = corpus_of(rows)
  assert stats.corpus_size == len(corpus) and stats.short == 0
  ranked, _ = ranked_texts(encoder, rows, corpus, max_length=512)
  for row, out, texts in zip(rows, mined, ranked):
    assert len(out["neg"]) == 15 == len(set(out["neg"]))
    assert not set(out["neg"]) & set(row["pos"]) and row["query"] not in out["neg"]
    assert set(out["neg"]) <= set(texts[2:])
  # The top neighbour of a query is rarely a random passage: MiniLM ranks each row's own
  # positive in the top 3 for most rows of this toy set.
  top3 = sum(any(p in texts[:3] for p in row["pos"]) for row, texts in zip(rows, ranked))
  assert top3 >= len(rows) // 2

  out = tmp_path / "mined.jsonl"
  assert mine_cli.main(["--model", minilm_path, "--pooling", "mean", "--input", str(path),
                        "--output", str(out), "--range", "2-200", "--negatives", "15",
                        "--batch-size", "64"]) == 0
  assert read_jsonl(out) == mined
