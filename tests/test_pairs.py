"""Tests for bge_jax.data.pairs: reading contrastive data and building stage 2/3 batches."""

from __future__ import annotations

import collections
import gzip
import json
import pathlib

import numpy as np
import pytest

from bge_jax.data.pairs import (INSTRUCTIONS, ContrastiveBatcher, PairRow, PairSource,
                                open_contrastive_data)
from bge_jax.data.sources import DataError

WORDS = ("query", "pos", "neg", "instr", "prompt", "pinstr", "long")


@pytest.fixture(scope="module")
def tok():
  """A word-level BERT tokenizer over WORDS and digits, so decoded texts compare exactly."""
  from transformers import BertTokenizerFast

  digits = [str(i) for i in range(10)]
  vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(WORDS) + digits
           + [f"##{d}" for d in digits])
  return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)


def write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                          for r in rows), encoding="utf-8")
  return path


def fe_rows(d: int, n: int, npos=1, nneg=3, scores=False, **extra) -> list[dict]:
  """Rows whose texts name themselves: "query d i", "pos d i j", "neg d i j"."""
  rows = []
  for i in range(n):
    p = npos(i) if callable(npos) else npos
    k = nneg(i) if callable(nneg) else nneg
    row = {"query": f"query {d} {i}", "pos": [f"pos {d} {i} {j}" for j in range(p)],
           "neg": [f"neg {d} {i} {j}" for j in range(k)]}
    if scores:
      row["pos_scores"] = [1000 * d + 100 * i + j for j in range(p)]
      row["neg_scores"] = [1000 * d + 100 * i + 50 + j for j in range(k)]
    row.update(extra)
    rows.append(row)
  return rows


def fe_source(tmp_path, d, n, name=None, **kw) -> PairSource:
  return open_contrastive_data(str(write_jsonl(tmp_path / (name or f"d{d}.jsonl"),
                                               fe_rows(d, n, **kw))))


def decode(tok, ids: np.ndarray) -> list[str]:
  return [tok.decode(row, skip_special_tokens=True) for row in ids]


def groups(tok, batch, g: int) -> list[list[str]]:
  p = decode(tok, batch["passage_input_ids"])
  return [p[i * g:(i + 1) * g] for i in range(len(p) // g)]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def test_fe_jsonl(tmp_path):
  rows = [{"query": "q1", "pos": ["p1", "p2"], "neg": ["n1"], "pos_scores": [1, 2.5],
           "neg_scores": [0.5], "prompt": "Do it: ", "type": "normal"},
          {"query": "q2", "pos": ["p3"]},
          {"query": "q3", "pos": "p4", "neg": [], "prompt": None}]
  p = write_jsonl(tmp_path / "a.jsonl", rows[:1] + [""] + rows[1:])  # A blank line 2.
  src = open_contrastive_data(str(p))
  assert len(src) == 3 and src.kinds == ("fe",) and src.skipped == {}
  assert src[0] == PairRow("q1", ("p1", "p2"), ("n1",), (1.0, 2.5), (0.5,), "Do it: ", "normal")
  assert src[1] == PairRow("q2", ("p3",), (), None, None, None, None)
  assert src[2].pos == ("p4",) and src[2].neg == () and src[2].prompt is None
  assert src.locate(1) == f"{p}:3"
  assert "3 rows (fe) from 1 file" in src.summary()


@pytest.mark.parametrize("fields", [("query", "pos"), ("title", "passage"), ("text", "text_pos"),
                                    ("sentence1", "sentence2")])
def test_pair_jsonl(tmp_path, fields):
  a, b = fields
  p = write_jsonl(tmp_path / "pairs.jsonl", [{a: "a query", b: "its passage", "x": 1},
                                             {a: "q2", b: "p2"}])
  src = open_contrastive_data(str(p))
  assert src.kinds == ("fe",) if a == "query" else ("pairs",)
  assert src[0] == PairRow("a query", ("its passage",), (), None, None, None, None)
  assert open_contrastive_data(str(p), kind="pairs")[1].pos == ("p2",)
  if a == "query":
    assert open_contrastive_data(str(p), kind="flag")[0].pos == ("its passage",)


def test_tsv(tmp_path):
  plain = tmp_path / "plain.tsv"
  plain.write_text("what is x\tx is y\nsecond\tpassage two\n", encoding="utf-8")
  src = open_contrastive_data(str(plain))
  assert src.kinds == ("pairs",) and len(src) == 2
  assert src[0] == PairRow("what is x", ("x is y",), (), None, None, None, None)
  for header in ("query\tpassage", "title\tpassage", "Sentence1\tsentence2"):
    h = tmp_path / "h.tsv"
    h.write_text(f"{header}\r\nq\tp\r\n", encoding="utf-8")
    src = open_contrastive_data(str(h), kind="pairs")
    assert len(src) == 1 and src[0].query == "q" and src.locate(0) == f"{h}:2"
  # A header naming the two columns among others (STS-B style): those two are read.
  wide = tmp_path / "wide.tsv"
  wide.write_text("id\tsentence1\tscore\tsentence2\n7\ts one\t4.5\ts two\n", encoding="utf-8")
  assert open_contrastive_data(str(wide))[0] == PairRow("s one", ("s two",), (), None, None, None,
                                                        None)
  with pytest.raises(DataError, match="kind='fe' reads FlagEmbedding JSONL"):
    open_contrastive_data(str(plain), kind="fe")


def test_folder_glob_gz_and_lists(tmp_path):
  write_jsonl(tmp_path / "data" / "b.jsonl", fe_rows(0, 2))
  write_jsonl(tmp_path / "data" / "a" / "z.jsonl", fe_rows(1, 1))
  (tmp_path / "data" / "c.tsv").write_text("q\tp\n", encoding="utf-8")
  write_jsonl(tmp_path / "data" / ".hidden.jsonl", ["not json"])
  (tmp_path / "data" / "notes.md").write_text("ignored")
  with gzip.open(tmp_path / "data" / "d.jsonl.gz", "wt") as f:
    f.write(json.dumps({"title": "t", "passage": "p"}) + "\n")
  src = open_contrastive_data(str(tmp_path / "data"))
  names = [pathlib.Path(o).name for o in src.origins]
  assert names == ["z.jsonl", "b.jsonl", "c.tsv", "d.jsonl.gz"]
  assert src.kinds == ("fe", "fe", "pairs", "pairs") and len(src) == 5
  assert [r.query for r in src] == ["query 1 0", "query 0 0", "query 0 1", "q", "t"]
  globbed = open_contrastive_data(str(tmp_path / "data" / "*.jsonl"))
  assert [pathlib.Path(o).name for o in globbed.origins] == ["b.jsonl"]
  both = open_contrastive_data([str(tmp_path / "data" / "c.tsv"),
                                str(tmp_path / "data" / "b.jsonl")])
  assert len(both) == 3
  with pytest.raises(DataError, match="no such file"):
    open_contrastive_data(str(tmp_path / "missing.jsonl"))
  with pytest.raises(DataError, match="cannot tell the format"):
    open_contrastive_data(str(tmp_path / "data" / "notes.md"))
  with pytest.raises(ValueError, match="kind="):
    open_contrastive_data(str(tmp_path / "data"), kind="jsonl")


GOOD = {"query": "q", "pos": ["p"], "neg": ["n"]}
BAD_ROWS = [
    ("{not json", "invalid_json", "invalid JSON"),
    ('["a list"]', "not_object", "a JSON array where an object"),
    ({"pos": ["p"]}, "missing_field", "no field 'query'"),
    ({"query": "", "pos": ["p"]}, "empty_text", "field 'query' is empty"),
    ({"query": 3, "pos": ["p"]}, "not_string", "field 'query' is a JSON number"),
    ({"query": "q"}, "missing_field", "no field 'pos'"),
    ({"query": "q", "pos": []}, "empty_pos", "field 'pos' is an empty list"),
    ({"query": "q", "pos": ["p", 1]}, "not_string", "field 'pos'[1] is a JSON number"),
    ({"query": "q", "pos": ["  "]}, "empty_text", "field 'pos'[0] is empty"),
    ({"query": "q", "pos": ["p"], "neg": [None]}, "not_string", "field 'neg'[0] is a JSON null"),
    ({"query": "q", "pos": ["p"], "neg": {"a": 1}}, "not_string", "field 'neg' is a JSON object"),
    ({"query": "q", "pos": ["p"], "pos_scores": [1, 2]}, "score_mismatch",
     "field 'pos_scores' holds 2 scores but 'pos' holds 1"),
    ({"query": "q", "pos": ["p"], "neg": ["a", "b"], "neg_scores": [1]}, "score_mismatch",
     "field 'neg_scores' holds 1 scores but 'neg' holds 2"),
    ({"query": "q", "pos": ["p"], "pos_scores": ["high"]}, "bad_score",
     "field 'pos_scores'[0] is \"high\", not a finite number"),
    ({"query": "q", "pos": ["p"], "prompt": 5}, "not_string", "field 'prompt' is a JSON number"),
    ('{"query": "q", "pos": ["\\ud800"]}', "invalid_utf8", "lone surrogate"),
]


@pytest.mark.parametrize("bad,reason,message", BAD_ROWS, ids=[f"{r}-{i}" for i, (_, r, _) in
                                                              enumerate(BAD_ROWS)])
def test_bad_fe_rows(tmp_path, bad, reason, message):
  p = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", bad, GOOD])
  with pytest.raises(DataError) as e:
    open_contrastive_data(str(p))
  assert str(e.value).startswith(f"{p}:3: ") and message in str(e.value)
  assert "on_error='skip'" in str(e.value)
  src = open_contrastive_data(str(p), on_error="skip")
  assert len(src) == 2 and src.skipped == {reason: 1}
  assert f"{reason} 1 (first at {p}:3)" in src.summary()


def test_bad_bytes_pairs_and_tsv(tmp_path):
  p = tmp_path / "latin.jsonl"
  p.write_bytes(json.dumps(GOOD).encode() + b'\n{"query": "caf\xe9", "pos": ["p"]}\n')
  with pytest.raises(DataError, match=rf"^{p}:2: byte 0xe9 .* not UTF-8"):
    open_contrastive_data(str(p))
  assert open_contrastive_data(str(p), on_error="skip").skipped == {"invalid_utf8": 1}
  pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"title": "t", "passage": "p"},
                                                 {"title": "t", "body": "b"}])
  with pytest.raises(DataError, match=rf"^{pairs}:2: none of the field pairs query/pos, "
                     "title/passage"):
    open_contrastive_data(str(pairs))
  tsv = tmp_path / "bad.tsv"
  tsv.write_text("query\tpassage\nq\tp\nq only\nq\tp\textra\nq\t \nq\tp\n", encoding="utf-8")
  with pytest.raises(DataError, match=rf"^{tsv}:3: the line has 1 tab-separated columns, "
                     r"expected 2 \(query<TAB>passage\)"):
    open_contrastive_data(str(tsv))
  src = open_contrastive_data(str(tsv), on_error="skip")
  assert len(src) == 2 and src.skipped == {"wrong_columns": 2, "empty_text": 1}
  assert "skipped 3 bad rows" in src.summary()
  everything_bad = write_jsonl(tmp_path / "worse.jsonl", ["{", "[1]"])
  with pytest.raises(DataError, match="no usable row"):
    open_contrastive_data(str(everything_bad), on_error="skip")
  array = tmp_path / "array.json"
  array.write_text(json.dumps([GOOD]))
  with pytest.raises(DataError, match="one JSON array"):
    open_contrastive_data(str(array))


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

def test_batch_shapes_and_group_layout(tmp_path, tok):
  # Row i has 1 + i % 3 positives and i % 6 negatives (0..5), G = 4: repetition below 3.
  src = fe_source(tmp_path, 0, 24, npos=lambda i: 1 + i % 3, nneg=lambda i: i % 6)
  b, g = 6, 4
  batcher = ContrastiveBatcher([("d0", src)], tok, batch_size=b, group_size=g,
                               query_max_length=8, passage_max_length=12)
  assert batcher.steps_per_epoch == 4 and batcher.num_examples == 24
  seen_rows = []
  for step in range(8):
    batch = batcher(step)
    assert set(batch) == {"query_input_ids", "query_attention_mask", "passage_input_ids",
                          "passage_attention_mask", "in_batch_negatives"}
    assert batch["query_input_ids"].shape == batch["query_attention_mask"].shape == (b, 8)
    assert batch["passage_input_ids"].shape == (b * g, 12)
    assert all(v.dtype == np.int32 for v in batch.values())
    assert batch["in_batch_negatives"].shape == () and int(batch["in_batch_negatives"]) == 1
    assert batcher.real_tokens(batch) == (batch["query_attention_mask"].sum()
                                          + batch["passage_attention_mask"].sum())
    queries = decode(tok, batch["query_input_ids"])
    for q, group in zip(queries, groups(tok, batch, g)):
      i = int(q.split()[2])
      row = src[i]
      seen_rows.append((step // 4, i))
      assert group[0] in row.pos
      negs = group[1:]
      if row.neg:
        assert set(negs) <= set(row.neg)
        counts = collections.Counter(negs)
        assert max(counts.values()) <= -(-(g - 1) // len(row.neg))  # Repeated evenly.
        if len(row.neg) >= g - 1:
          assert len(counts) == g - 1  # Without replacement.
      else:  # Drawn from other rows' positives.
        assert all(n.startswith("pos 0 ") and n not in row.pos for n in negs)
  # Every row exactly once per epoch (24 rows, 4 steps of 6).
  assert collections.Counter(seen_rows) == {(e, i): 1 for e in range(2) for i in range(24)}


def test_negless_rows_never_get_own_positives(tmp_path, tok):
  # Few rows and passages shared between rows: the own positives are excluded by text.
  rows = [{"query": f"query {i}", "pos": [f"pos {i % 3}", f"pos {i % 3 + 1}"]} for i in range(4)]
  src = open_contrastive_data(str(write_jsonl(tmp_path / "pairs.jsonl", rows)))
  batcher = ContrastiveBatcher([("p", src)], tok, batch_size=4, group_size=6, passage_max_length=6)
  for step in range(20):
    for q, group in zip(decode(tok, batcher(step)["query_input_ids"]),
                        groups(tok, batcher(step), 6)):
      own = set(rows[int(q.split()[1])]["pos"])
      assert group[0] in own and not own & set(group[1:])
  lonely = open_contrastive_data(str(write_jsonl(tmp_path / "one.jsonl",
                                                 [{"query": "q", "pos": ["a", "b"]}] * 2)))
  with pytest.raises(ValueError, match=r"one.jsonl:1 has no negatives and no other row"):
    ContrastiveBatcher([("x", lonely)], tok, batch_size=1, group_size=2)
  ContrastiveBatcher([("x", lonely)], tok, batch_size=1, group_size=1)  # No negatives needed.


def test_instructions_and_prompts(tmp_path, tok):
  plain = fe_source(tmp_path, 0, 4, name="plain.jsonl")
  prompted = fe_source(tmp_path, 1, 4, name="prompted.jsonl", prompt="prompt ")
  symmetric = fe_source(tmp_path, 2, 4, name="sym.jsonl", prompt="prompt ", type="symmetric_sts")

  def texts(src, **kw):
    batcher = ContrastiveBatcher([("d", src)], tok, batch_size=4, group_size=2, **kw)
    batch = batcher(0)
    return decode(tok, batch["query_input_ids"]), decode(tok, batch["passage_input_ids"])

  q, p = texts(plain)
  assert all(x.startswith("query 0") for x in q) and all(x[:3] in ("pos", "neg") for x in p)
  q, p = texts(plain, query_instruction="instr ", passage_instruction="pinstr ")
  assert all(x.startswith("instr query 0") for x in q)
  assert all(x.startswith(("pinstr pos", "pinstr neg")) for x in p)
  q, _ = texts(prompted, query_instruction="instr ")
  assert all(x.startswith("prompt query 1") for x in q)  # The row's prompt wins.
  q, _ = texts(prompted)
  assert all(x.startswith("prompt query 1") for x in q)
  q, _ = texts(prompted, query_instruction="instr ", use_row_prompts=False)
  assert all(x.startswith("instr query 1") for x in q)
  q, _ = texts(plain, query_instruction="instr", instruction_format="{} {}")
  assert all(x.startswith("instr query 0") for x in q)
  q, p = texts(symmetric, passage_instruction="pinstr ")  # Symmetric: passages as the query.
  assert all(x.startswith("prompt query 2") for x in q)
  assert all(x.startswith(("prompt pos", "prompt neg")) for x in p)
  assert INSTRUCTIONS["en"] == "Represent this sentence for searching relevant passages: "
  assert INSTRUCTIONS["zh"] == "为这个句子生成表示以用于检索相关文章："


def test_truncation_and_padding(tmp_path, tok):
  rows = [{"query": "query " + "long " * 20, "pos": ["pos " + "long " * 30], "neg": ["neg"]},
          {"query": "query", "pos": ["pos"], "neg": ["neg"]}]
  src = open_contrastive_data(str(write_jsonl(tmp_path / "t.jsonl", rows)))
  batcher = ContrastiveBatcher([("t", src)], tok, batch_size=2, group_size=2,
                               query_max_length=5, passage_max_length=7)
  batch = batcher(0)
  ids, mask = batch["query_input_ids"], batch["query_attention_mask"]
  lengths = sorted(mask.sum(1).tolist())
  assert lengths == [3, 5]  # [CLS] query [SEP] and a truncated one, both padded to 5.
  sep, pad = tok.sep_token_id, tok.pad_token_id
  for row, m in zip(ids, mask):
    n = int(m.sum())
    assert row[0] == tok.cls_token_id and row[n - 1] == sep and (row[n:] == pad).all()
  assert batch["passage_attention_mask"].sum(1).max() == 7


def test_determinism_and_processes(tmp_path, tok):
  sources = [("a", fe_source(tmp_path, 0, 40, nneg=5)), ("b", fe_source(tmp_path, 1, 24, nneg=5))]
  kw = dict(batch_size=4, group_size=3, seed=7, process_count=2)
  p0 = ContrastiveBatcher(sources, tok, process_index=0, **kw)
  again = ContrastiveBatcher(sources, tok, process_index=0, **kw)
  p1 = ContrastiveBatcher(sources, tok, process_index=1, **kw)
  other_seed = ContrastiveBatcher(sources, tok, process_index=0, **{**kw, "seed": 8})
  assert p0.steps_per_epoch == 5 + 3
  for step in (0, 3, 11):
    x, y = p0(step), again(step)
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert not np.array_equal(p0(0)["query_input_ids"], p0(1)["query_input_ids"])
  assert any(not np.array_equal(p0(s)["passage_input_ids"], other_seed(s)["passage_input_ids"])
             for s in range(3))
  for step in range(p0.steps_per_epoch * 2):
    assert p0.dataset_at(step) == p1.dataset_at(step)
    q0 = decode(tok, p0(step)["query_input_ids"])
    q1 = decode(tok, p1(step)["query_input_ids"])
    assert len({q.split()[1] for q in q0 + q1}) == 1  # One dataset across processes.
    assert not set(q0) & set(q1)  # Disjoint rows.


def test_batcher_in_a_thread_beside_other_calls_of_its_tokenizer(tmp_path, tok):
  # The trainer runs the batcher in its prefetch thread while the evaluator tokenises with the
  # same tokenizer on the main thread. A fast tokenizer sets padding/truncation as state on its
  # backend at every call, so a shared one hands each thread the other's padding (CI, stop 9).
  from bge_jax.data.prefetch import Prefetcher

  src = fe_source(tmp_path, 0, 64, nneg=5)
  kw = dict(batch_size=8, group_size=4, query_max_length=16, passage_max_length=24)
  expected = [ContrastiveBatcher([("d0", src)], tok, **kw)(s) for s in range(30)]
  prefetch = Prefetcher(ContrastiveBatcher([("d0", src)], tok, **kw), 0, depth=2)
  try:
    for step in range(30):
      for _ in range(30):  # Main-thread calls with other settings, while the thread works.
        ids = tok(["query", "pos 1 2 3"], padding="longest", truncation=True, max_length=4,
                  return_tensors="np")["input_ids"]
        assert ids.shape == (2, 4)
      got_step, got = prefetch.next()
      assert got_step == step
      assert all(np.array_equal(got[k], expected[step][k]) for k in got)
  finally:
    prefetch.close()


def test_mixing_is_proportional_and_homogeneous(tmp_path, tok):
  sizes = {"small": 16, "mid": 40, "big": 83}  # Global batch 8: 2, 5, 10 batches per epoch.
  sources = [(name, fe_source(tmp_path, d, n, nneg=1)) for d, (name, n) in enumerate(sizes.items())]
  batcher = ContrastiveBatcher(sources, tok, batch_size=4, group_size=1, process_count=2)
  assert batcher.steps_per_epoch == 17 and batcher.num_examples == 17 * 4
  for epoch in range(3):
    steps = range(epoch * 17, (epoch + 1) * 17)
    counts = collections.Counter(batcher.dataset_at(s) for s in steps)
    assert counts == {"small": 2, "mid": 5, "big": 10}
    rows = collections.Counter()
    for s in steps:
      d, selection = batcher.select(s)
      rows.update((d, int(i)) for i in selection)
    assert max(rows.values()) == 1  # No row twice in an epoch.
  orders = [[batcher.dataset_at(s) for s in range(e * 17, (e + 1) * 17)] for e in range(3)]
  assert orders[0] != orders[1]  # A fresh schedule every epoch.
  for s in range(0, 34, 5):
    names = {q.split()[1] for q in decode(tok, batcher(s)["query_input_ids"])}
    assert names == {str(list(sizes).index(batcher.dataset_at(s)))}
  assert "3 datasets: small 16 rows, 2 batches/epoch" in batcher.describe()
  assert "global batch 8 = 4 x 2 processes" in batcher.describe()
  with pytest.raises(ValueError, match="'small' has 16 rows, fewer than the global batch 24"):
    ContrastiveBatcher(sources, tok, batch_size=12, group_size=1, process_count=2)


def test_teacher_scores(tmp_path, tok):
  src = fe_source(tmp_path, 0, 8, npos=3, nneg=lambda i: 1 + i % 4, scores=True)
  batcher = ContrastiveBatcher([("s", src)], tok, batch_size=4, group_size=4,
                               use_teacher_scores=True)
  for step in range(4):
    batch = batcher(step)
    assert batch["teacher_scores"].dtype == np.float32 and batch["teacher_scores"].shape == (4, 4)
    for group, scores in zip(groups(tok, batch, 4), batch["teacher_scores"]):
      expected = [(50 if kind == "neg" else 0) + 100 * int(i) + int(j)
                  for kind, _, i, j in (t.split() for t in group)]
      assert scores.tolist() == expected
  unscored = fe_source(tmp_path, 1, 8, name="plain.jsonl")
  with pytest.raises(ValueError, match=r"dataset 'u' has a row without 'pos_scores' \(first at "
                     r".*plain.jsonl:1\)"):
    ContrastiveBatcher([("s", src), ("u", unscored)], tok, batch_size=4, group_size=2,
                       use_teacher_scores=True)
  assert "teacher_scores" not in ContrastiveBatcher([("s", src)], tok, batch_size=4,
                                                    group_size=2)(0)


def test_in_batch_negatives_flag(tmp_path, tok):
  normal = fe_source(tmp_path, 0, 8)
  clustering = fe_source(tmp_path, 1, 8, type="clustering")
  named = fe_source(tmp_path, 2, 8, name="cls_no_in_batch_neg.jsonl")
  assert named.no_in_batch_neg and not normal.no_in_batch_neg
  data = [("normal", normal), ("clustering", clustering), ("named", named),
          ("listed", fe_source(tmp_path, 3, 8, name="listed.jsonl"))]
  batcher = ContrastiveBatcher(data, tok, batch_size=8, group_size=2,
                               no_in_batch_datasets=["listed"])
  flags = {batcher.dataset_at(s): int(batcher(s)["in_batch_negatives"]) for s in range(4)}
  assert flags == {"normal": 1, "clustering": 0, "named": 0, "listed": 0}
  assert "named 8 rows, 1 batches/epoch (no in-batch negatives)" in batcher.describe()
  custom = ContrastiveBatcher(data[:2], tok, batch_size=8, group_size=2, no_in_batch_types=())
  assert all(int(custom(s)["in_batch_negatives"]) == 1 for s in range(2))
  with pytest.raises(ValueError, match="not datasets"):
    ContrastiveBatcher(data, tok, batch_size=8, group_size=2, no_in_batch_datasets=["nope"])
  # Within-group scoring with groups of one passage: a loss of 0, refused by name.
  with pytest.raises(ValueError, match=r"dataset 'named' is scored within its groups only .* "
                                       r"group_size=1"):
    ContrastiveBatcher(data[:3], tok, batch_size=8, group_size=1)
  assert ContrastiveBatcher(data[:1], tok, batch_size=8, group_size=1)(0)["in_batch_negatives"]


def test_bad_options(tmp_path, tok):
  src = fe_source(tmp_path, 0, 8)
  for kw, message in [(dict(group_size=0), "group_size"), (dict(process_index=2), "process_index"),
                      (dict(query_max_length=1), "room"), (dict(instruction_format="{}"), "two"),
                      (dict(seed=-1), "seed")]:
    with pytest.raises(ValueError, match=message):
      ContrastiveBatcher([("a", src)], tok, **{"batch_size": 2, "group_size": 2, **kw})
  with pytest.raises(ValueError, match="more than once"):
    ContrastiveBatcher([("a", src), ("a", src)], tok, batch_size=2, group_size=2)


# ---------------------------------------------------------------------------------------------
# Real data (../shared/data), MiniLM tokenizer
# ---------------------------------------------------------------------------------------------

def test_shared_finetune_data(shared_data, minilm_path):
  from transformers import AutoTokenizer

  tokenizer = AutoTokenizer.from_pretrained(minilm_path)
  msmarco = open_contrastive_data(str(shared_data / "en" / "msmarco.jsonl"))
  nli = open_contrastive_data(str(shared_data / "en" / "nli.jsonl"))
  assert len(msmarco) == len(nli) == 10 and msmarco[0].neg_scores is not None
  batcher = ContrastiveBatcher([("msmarco", msmarco), ("nli", nli)], tokenizer, batch_size=2,
                               group_size=4, query_max_length=64, passage_max_length=128,
                               query_instruction=INSTRUCTIONS["en"], use_teacher_scores=True,
                               process_count=2, process_index=1)
  assert batcher.steps_per_epoch == 4
  for step in range(batcher.steps_per_epoch):
    name = batcher.dataset_at(step)
    src = msmarco if name == "msmarco" else nli
    batch = batcher(step)
    assert batch["passage_input_ids"].shape == (8, 128)
    assert batch["teacher_scores"].shape == (2, 4)
    queries = decode(tokenizer, batch["query_input_ids"])
    prompt = src[0].prompt.lower()
    assert all(q.startswith(prompt[:20]) for q in queries)  # The rows' prompts win.
    passages = decode(tokenizer, batch["passage_input_ids"])
    if name == "nli":  # One negative per row: repeated to fill the group.
      for i in range(2):
        assert len(set(passages[i * 4 + 1:i * 4 + 4])) == 1
      assert np.all(batch["teacher_scores"][:, 1:] == batch["teacher_scores"][:, 1:2])
  for name in ("toy_finetune_data.jsonl", "sts.jsonl", "nq.jsonl"):
    assert len(open_contrastive_data(str(shared_data / "en" / name))) == 10
  zh = open_contrastive_data(str(shared_data / "zh" / "bge_finetune_data.jsonl"))
  assert len(zh) == 2701
  stsb = open_contrastive_data(str(shared_data / "en" / "stsbenchmark.train-dev.tsv"))
  assert len(stsb) == 7249 and stsb.kinds == ("pairs",)
  batch = ContrastiveBatcher([("zh", zh)], tokenizer, batch_size=4, group_size=2,
                             query_instruction=INSTRUCTIONS["zh"])(0)
  assert batch["query_attention_mask"].sum(1).min() > 5


def test_prefetcher_close_joins_its_thread_and_reraises_errors():
  import threading
  import time

  from bge_jax.data.prefetch import Prefetcher

  def slow(step):
    time.sleep(0.05)
    return step * 10

  before = threading.active_count()
  prefetch = Prefetcher(slow, 3, depth=2)
  assert [prefetch.next() for _ in range(3)] == [(3, 30), (4, 40), (5, 50)]
  time.sleep(0.2)  # the thread now blocks on a full queue
  prefetch.close()
  assert not prefetch._thread.is_alive() and threading.active_count() == before

  def failing(step):
    if step == 1:
      raise ValueError("bad row in step 1")
    return step

  prefetch = Prefetcher(failing, 0, depth=2)
  try:
    assert prefetch.next() == (0, 0)
    with pytest.raises(ValueError, match="bad row in step 1"):
      prefetch.next()
  finally:
    prefetch.close()
  assert not prefetch._thread.is_alive()


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.tsv.gz"])
def test_truncated_gz_names_the_file_or_keeps_the_rows_before(tmp_path, name):
  lines = ([json.dumps(r) for r in fe_rows(0, 3000)] if name.endswith(".jsonl.gz")
           else [f"query {i}\tpassage {i} of a longer corpus" for i in range(3000)])
  data = gzip.compress("".join(line + "\n" for line in lines).encode())
  p = tmp_path / name
  p.write_bytes(data[:len(data) // 2])
  after = write_jsonl(tmp_path / "e.jsonl", fe_rows(1, 1))
  with pytest.raises(DataError, match=r"truncated or corrupt: re-download or recompress") as e:
    open_contrastive_data([str(p), str(after)])
  assert str(e.value).startswith(f"{p}:") and "on_error='skip'" in str(e.value)
  src = open_contrastive_data([str(p), str(after)], on_error="skip")
  kept = len(src) - 1
  assert 0 < kept < 3000 and src.skipped == {"damaged_file": 1}
  prefix = "query 0 " if name.endswith(".jsonl.gz") else "query "
  assert [r.query for r in src][:kept] == [f"{prefix}{i}" for i in range(kept)]
  assert src[kept].query == "query 1 0"
  assert f"damaged_file 1 (first at {p}:{kept + 1})" in src.summary()


def test_row_permutations_are_numpys_in_half_the_memory():
  """`order.permutation` (every stored row order: stage 1's epochs, stages 2-3's passes) is
  numpy's `default_rng(key).permutation(n)`, element for element, held as int32."""
  from bge_jax.data import order

  for n in (1, 2, 17, 100_003):
    for key in ([0], [3, 1, 4], [12345, 7, 2, 1]):
      got = order.permutation(key, n)
      assert got.dtype == np.int32
      np.testing.assert_array_equal(got, np.random.default_rng(key).permutation(n))
