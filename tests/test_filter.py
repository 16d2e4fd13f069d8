"""C-MTP pair filtering (bge_jax.filter, launch/filter_pairs.py) against numpy decisions."""

import json
import zlib

import numpy as np
import pytest

from bge_jax import filter as filter_lib
from bge_jax.data.pairs import PairRow
from bge_jax.encoder import Encoder
from conftest import WORDS, make_hf_folder, make_tokenizer
from launch import filter_pairs as cli


class TableEncoder:
  """Texts -> vectors of -1/0/1 from a hash of the text: exact float32 scores, many ties."""

  dim = 4

  def encode(self, texts, batch_size=256, max_length=512, instruction=None, show_progress=None):
    assert instruction is None  # the filter puts instructions into the texts itself
    return np.stack([np.random.default_rng(zlib.crc32(t.encode())).integers(-1, 2, self.dim)
                     for t in texts]).astype(np.float32).reshape(-1, self.dim)


def _sentence(rng, n):
  return " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), n)) + "."


def make_pair_rows(n=60, seed=0):
  """Pairs and FlagEmbedding rows: some with several positives, passages shared across rows,
  a row's positive repeated in another row, prompts, scores."""
  rng = np.random.default_rng(seed)
  pool = list(dict.fromkeys(_sentence(rng, int(rng.integers(2, 8))) for _ in range(3 * n)))
  rows = []
  for i in range(n):
    n_pos = 1 if i % 4 else int(rng.integers(2, 4))
    pos = tuple(pool[j] for j in rng.choice(len(pool) // 2, n_pos, replace=False))
    rows.append(PairRow(
        query=_sentence(rng, 3), pos=pos, neg=(pool[-1 - i],) if i % 3 == 0 else (),
        pos_scores=tuple(float(s) for s in range(n_pos)) if i % 5 == 0 else None,
        neg_scores=None, prompt="p: " if i % 7 == 0 else None, type=None))
  return rows


def reference(rows, encoder, threshold, top_k, sample_size, seed, instruction):
  """(scores, ranks, keep) per pair, flat in row order, decided in numpy (float64 scores of the
  encoder's embeddings; rank = 1 + sample passages, other than the row's positives, scoring
  strictly above the positive)."""
  q = encoder.encode([(r.prompt if r.prompt is not None else instruction) + r.query
                      for r in rows]).astype(np.float64)
  n = len(rows)
  picks = range(n) if sample_size >= n else sorted(
      np.random.default_rng(seed).choice(n, sample_size, replace=False).tolist())
  sample = list(dict.fromkeys(p for i in picks for p in rows[i].pos))
  s_vecs = encoder.encode(sample).astype(np.float64)
  scores, ranks, keep = [], [], []
  for i, row in enumerate(rows):
    sample_scores = s_vecs @ q[i]
    others = np.array([t not in row.pos for t in sample])
    for p in row.pos:
      s = float(encoder.encode([p]).astype(np.float64)[0] @ q[i])
      rank = 1 + int(((sample_scores > s) & others).sum())
      scores.append(s)
      ranks.append(rank)
      keep.append((threshold is None or s >= threshold) and (top_k is None or rank <= top_k))
  return np.array(scores), np.array(ranks), np.array(keep)


def flat(results, field):
  return np.concatenate([getattr(r, field) for r in results])


@pytest.mark.parametrize("threshold,top_k,sample_size,chunk,mesh", [
    (1.0, None, 1, 7, None),          # threshold only; scores of exactly 1 are kept
    (None, 1, 10**6, 16, "auto"),     # top-1 against the whole corpus, sample over 8 devices
    (None, 3, 25, 64, None),          # top-3 against a sample of 25 rows
    (0.0, 2, 40, 5, "auto"),          # both rules
])
def test_filter_keeps_what_numpy_keeps(threshold, top_k, sample_size, chunk, mesh):
  rows = make_pair_rows()
  encoder = TableEncoder()
  rule = filter_lib.FilterRule(threshold, top_k, sample_size, seed=3)
  results = list(filter_lib.score_rows(rows, encoder, rule, query_instruction="q: ",
                                       chunk_rows=chunk, mesh=mesh, block_size=16))
  assert [r.index for r in results] == list(range(len(rows)))
  ref_scores, ref_ranks, ref_keep = reference(rows, encoder, threshold, top_k, sample_size, 3,
                                              "q: ")
  np.testing.assert_array_equal(flat(results, "scores"), ref_scores)
  np.testing.assert_array_equal(flat(results, "keep"), ref_keep)
  if top_k is not None:
    # Exact up to top_k; "more than top_k" is reported as top_k + 1.
    np.testing.assert_array_equal(flat(results, "ranks"), np.minimum(ref_ranks, top_k + 1))
    assert (ref_ranks == top_k).any() and (ref_ranks > top_k).any()
  if threshold is not None:
    assert (ref_scores == threshold).any()  # ties at the threshold were decided
  assert 0 < ref_keep.sum() < len(ref_keep)

  kept, summary = filter_lib.filter_pairs(rows, encoder, rule, query_instruction="q: ",
                                          chunk_rows=chunk, mesh=mesh)
  assert summary.pairs == len(ref_keep) and summary.kept_pairs == ref_keep.sum()
  pos_keep = iter(ref_keep)
  expected = []
  for row in rows:
    mask = [next(pos_keep) for _ in row.pos]
    if any(mask):
      expected.append((row.query, [p for p, k in zip(row.pos, mask) if k],
                       None if row.pos_scores is None else
                       [s for s, k in zip(row.pos_scores, mask) if k]))
  assert [(r["query"], r["pos"], r.get("pos_scores")) for r in kept] == expected
  assert summary.kept_rows == len(kept)


def test_histogram_quantiles_match_numpy():
  rng = np.random.default_rng(0)
  scores = np.clip(rng.normal(0.4, 0.2, 5000), -1, 1).astype(np.float32)
  hist = filter_lib.ScoreHistogram()
  for part in np.array_split(np.arange(len(scores)), 7):
    hist.add(scores[part], scores[part] > 0.3)
  qs = hist.quantiles()
  for q in filter_lib.QUANTILES:
    ref = np.quantile(scores, q, method="inverted_cdf")
    assert abs(qs[f"{q:g}"] - ref) <= hist.width / 2 + 1e-6, q
  assert qs["0"] == round(float(scores.min()), 6) and qs["1"] == round(float(scores.max()), 6)
  assert hist.counts[True].sum() == (scores > 0.3).sum()


def test_rule_refusals():
  for kwargs, match in ((dict(), "no rule"), (dict(top_k=0), "top_k=0"),
                        (dict(threshold=float("inf")), "finite"),
                        (dict(top_k=1, sample_size=0), "sample_size=0")):
    with pytest.raises(ValueError, match=match):
      filter_lib.FilterRule(**kwargs)


# ---------------------------------------------------------------------------------------------
# launch/filter_pairs.py with a real (tiny) model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  folder = make_hf_folder(tmp_path_factory.mktemp("filter"), "bert", seed=5)
  make_tokenizer(folder)
  return folder


def write_pairs(folder, rows):
  """A folder as training reads it: a.jsonl of FlagEmbedding rows (several positives, prompts),
  b.jsonl of C-MTP-like {"title", "passage"} pairs. Returns (folder, rows in read order)."""
  folder.mkdir()
  fe = [r for r in rows if len(r.pos) > 1 or r.prompt is not None]
  pairs = [r for r in rows if not (len(r.pos) > 1 or r.prompt is not None)]
  (folder / "a.jsonl").write_text("".join(json.dumps(
      {"query": r.query, "pos": list(r.pos), "prompt": r.prompt}) + "\n" for r in fe))
  (folder / "b.jsonl").write_text("".join(json.dumps(
      {"title": r.query, "passage": r.pos[0]}) + "\n" for r in pairs))
  return str(folder), fe + pairs


def read_jsonl(path):
  return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_cli_threshold_with_a_real_model(tiny_model, tmp_path, capsys):
  """Decisions against numpy on the model's own embeddings (away from float-rounding ties at
  the threshold), the outputs, the summary's counts and quantiles, the PNG."""
  data, rows = write_pairs(tmp_path / "pairs", make_pair_rows(50, seed=1))
  encoder = Encoder.from_hf(str(tiny_model), pooling="cls")
  q = encoder.encode([(r.prompt if r.prompt is not None else "q: ") + r.query for r in rows],
                     max_length=32).astype(np.float64)
  p = encoder.encode([t for r in rows for t in r.pos], max_length=32).astype(np.float64)
  pair_row = np.repeat(np.arange(len(rows)), [len(r.pos) for r in rows])
  ref = np.einsum("nd,nd->n", q[pair_row], p)
  threshold = float(np.median(ref))
  out = tmp_path / "kept.jsonl"
  code = cli.main(["--model", str(tiny_model), "--input", data, "--output", str(out),
                   "--threshold", str(threshold), "--query-instruction", "q: ",
                   "--max-length", "32", "--chunk-rows", "16", "--dropped",
                   str(tmp_path / "dropped.jsonl")])
  assert code == 0, capsys.readouterr().err
  line = capsys.readouterr().out.strip().splitlines()[-1]
  kept = read_jsonl(out)
  dropped = read_jsonl(tmp_path / "dropped.jsonl")
  kept_pairs = {(r["query"], t) for r in kept for t in r["pos"]}
  dropped_pairs = {(r["query"], t) for r in dropped for t in r["pos"]}
  clear = np.abs(ref - threshold) > 1e-5
  assert clear.sum() >= len(ref) - 2
  for m in np.flatnonzero(clear):
    pair = (rows[pair_row[m]].query, p_text := [t for r in rows for t in r.pos][m])
    assert (pair in kept_pairs) == (ref[m] >= threshold), (pair, ref[m])
    assert (pair in dropped_pairs) == (ref[m] < threshold), p_text
  assert len(kept_pairs) + len(dropped_pairs) == len(ref)
  for r in dropped:
    assert r["source"].startswith(data + "/") and all(s < threshold + 1e-5 for s in r["score"])
  summary = json.load(open(tmp_path / "kept.summary.json"))
  assert summary["pairs"] == len(ref) and summary["kept_pairs"] == len(kept_pairs)
  assert summary["dropped_pairs"] == summary["failed_threshold"] == len(dropped_pairs)
  assert summary["rule"] == {"threshold": threshold, "top_k": None}
  for key, value in summary["scores"]["quantiles"].items():
    assert abs(value - np.quantile(ref, float(key), method="inverted_cdf")) <= 5e-4 + 1e-5
  png = (tmp_path / "kept.scores.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
  assert f"kept {len(kept_pairs)} of {len(ref)} pairs" in line
  assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


def test_cli_top_k_and_prepared_data(tiny_model, tmp_path, capsys):
  """The consistency rule from JSONL and from a prepared dataset; --prepared writes the kept
  rows as a prepared dataset that reads back as them."""
  prepare = pytest.importorskip("bge_jax.data.prepare")
  from bge_jax.data import prepared

  data, rows = write_pairs(tmp_path / "pairs", make_pair_rows(40, seed=2))
  prepare.prepare([data], str(tmp_path / "in_prepared"), progress=False)
  args = ["--model", str(tiny_model), "--top-k", "2", "--sample-size", "30", "--max-length",
          "32", "--chunk-rows", "8"]
  assert cli.main(args + ["--input", data, "--output", str(tmp_path / "a.jsonl")]) == 0
  assert cli.main(args + ["--input", str(tmp_path / "in_prepared"), "--output",
                          str(tmp_path / "b.jsonl"), "--prepared",
                          str(tmp_path / "out_prepared")]) == 0
  a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
  assert a == b and 0 < len(a) < len(rows)
  back = prepared.open_prepared_pairs(str(tmp_path / "out_prepared"))
  assert [(r.query, list(r.pos)) for r in back] == [(r["query"], r["pos"]) for r in a]
  summary = json.load(open(tmp_path / "b.summary.json"))
  assert summary["rule"] == {"threshold": None, "top_k": 2, "sample_size": 30, "seed": 0}
  assert summary["failed_top_k"] == summary["dropped_pairs"] > 0
  capsys.readouterr()


def test_cli_refusals(tiny_model, tmp_path, capsys):
  good = json.dumps({"title": "alpha beta", "passage": "gamma delta."})
  folder = tmp_path / "work"
  folder.mkdir()
  data = folder / "pairs.jsonl"
  out = folder / "kept.jsonl"

  def refused(lines, *extra, needle, output=out):
    data.write_text("".join(line + "\n" for line in lines))
    argv = ["--model", str(tiny_model), "--input", str(data), "--output", str(output),
            "--max-length", "32", *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and needle in err, err
    assert {f.name for f in folder.iterdir()} <= {"pairs.jsonl", "taken"}
    assert not out.exists()

  refused([good], needle="no rule: set --threshold (cosine) and/or --top-k")
  refused([good], "--top-k", "0", needle="--top-k=0")
  refused([good], "--threshold", "nan", needle="--threshold=nan")
  refused([good], "--threshold", "0.5", "--sample-size", "9", needle="give --top-k too")
  refused([good, "{oops"], "--threshold", "0.5", needle=f"{data}:2: invalid JSON")
  refused([good, json.dumps({"title": "t"})], "--threshold", "0.5", needle=f"{data}:2: none of")
  refused([good], "--threshold", "0.5", needle="does not exist",
          output=folder / "no" / "kept.jsonl")
  refused([good], "--threshold", "0.5", "--dropped", str(folder), needle="is a folder")
  (folder / "taken").mkdir()
  try:
    refused([good], "--threshold", "0.5", "--prepared", str(folder / "taken"), needle="exists")
  finally:
    (folder / "taken").rmdir()
  assert cli.main(["--model", str(folder / "nope"), "--input", str(data), "--output", str(out),
                   "--threshold", "0.5"]) == 2
  assert "--model" in capsys.readouterr().err
