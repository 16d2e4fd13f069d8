"""Prepared datasets (launch/prepare_data.py, bge_jax.data.prepare / prepared): the same rows and
batches as the JSONL path, lazy per-process reads, exact dedupe, atomic output, refusals."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, WORDS, make_corpus, make_tokenizer, saved_steps, wait_for_step

from bge_jax.data import prepare, prepared
from bge_jax.data.pairs import ContrastiveBatcher, open_contrastive_data
from bge_jax.data.sources import DataError, open_text_source

sys.path.insert(0, str(REPO / "launch"))


def fe_file(path, n, seed=0, neg_every=2, types=True, scores=False, dup_every=0):
  """FlagEmbedding rows of WORDS; every `neg_every`-th row has negatives, every 7th two
  positives, every 5th a no-in-batch type, every 11th a prompt; every `dup_every`-th repeats an
  earlier row."""
  rng = random.Random(seed)
  rows = []
  for i in range(n):
    if dup_every and i % dup_every == dup_every - 1 and rows:
      rows.append(rows[rng.randrange(len(rows))])
      continue
    words = rng.sample(WORDS, 6)
    row = {"query": " ".join(words[:3]), "pos": [" ".join(words[2:]) + f" {i}"]}
    if i % 7 == 0:
      row["pos"].append(" ".join(words[:2]) + f" {i} b")
    if i % neg_every == 0:
      row["neg"] = [" ".join(rng.sample(WORDS, 5)) for _ in range(1 + i % 3)]
    if scores:
      row["pos_scores"] = [round(rng.random(), 6) for _ in row["pos"]]
      row["neg_scores"] = [round(rng.random(), 6) for _ in row.get("neg", [])]
    if types and i % 5 == 0:
      row["type"] = "classification"
    if i % 11 == 0:
      row["prompt"] = "find "
    rows.append(row)
  path.parent.mkdir(parents=True, exist_ok=True)
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path


def tsv_file(path, n, seed=1):
  rng = random.Random(seed)
  path.write_text("query\tpassage\n" + "".join(
      f"{' '.join(rng.sample(WORDS, 3))}\t{' '.join(rng.sample(WORDS, 6))} {i}\n"
      for i in range(n)))
  return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("prep")
  files = [fe_file(root / "in" / "a.jsonl", 150), fe_file(root / "in" / "b.jsonl.gz", 90, seed=3),
           tsv_file(root / "in" / "c.tsv", 70)]
  return {"root": root, "files": [str(f) for f in files], "tok": make_tokenizer(root / "tok")}


@pytest.fixture(scope="module")
def ready(inputs):
  """The inputs prepared in small shards (several per file)."""
  out = inputs["root"] / "prepared"
  prepare.prepare(inputs["files"], str(out), rows_per_shard=40, progress=False)
  return out


def tokenizer(inputs):
  from transformers import BertTokenizerFast
  return BertTokenizerFast.from_pretrained(str(inputs["tok"]))


def test_prepared_rows_equal_the_inputs(inputs, ready):
  ref = open_contrastive_data(inputs["files"])
  src = open_contrastive_data(str(ready))
  assert isinstance(src, prepared.PreparedPairs) and len(src.manifest["shards"]) == 9
  assert len(src) == len(ref) == 310
  assert list(src) == ref.rows  # sequential pass
  idx = np.random.default_rng(0).permutation(len(ref))[:60]
  assert src.__getitems__(idx) == [ref[int(i)] for i in idx]  # random access across shards
  assert [src[int(i)] for i in idx[:5]] == [ref[int(i)] for i in idx[:5]]
  assert [src.locate(i) for i in (0, 149, 150, 309)] == [ref.locate(i) for i in (0, 149, 150, 309)]
  assert src.kinds == ref.kinds == ("fe", "fe", "pairs")
  for what in ("neg", "pos_scores", "neg_scores"):
    assert src.first_row_without(what) == ref.first_row_without(what)
  pool = src.positives()
  assert len(pool) == len(ref.positives()) > len(src)  # rows with two positives
  assert [pool[t] for t in range(len(pool))] == ref.positives()
  assert src.covering_row() is None and ref.covering_row() is None
  types = ("classification",)
  np.testing.assert_array_equal(src.type_mask(types)[idx], ref.type_mask(types)[idx])
  assert not src.type_mask(("clustering",))[idx].any()
  m = json.loads((ready / prepared.MANIFEST).read_text())
  # The shards are plain array_record files: grain reads them too (records: prepared.decode_pair).
  from grain import python as grain
  ds = grain.ArrayRecordDataSource([str(ready / s["file"]) for s in m["shards"]])
  assert [prepared.decode_pair(ds[int(i)]) for i in idx[:20]] == [ref[int(i)] for i in idx[:20]]
  assert [s["path"] for s in m["sources"]] == inputs["files"]
  assert all(s["bytes"] == os.path.getsize(s["path"]) for s in m["sources"])
  assert sum(s["rows"] for s in m["shards"]) == m["rows"] == 310


def test_covering_row_is_found_at_prepare_time(tmp_path):
  """A neg-less row whose positives are every positive of the dataset: refused as JSONL is."""
  path = tmp_path / "one.jsonl"
  path.write_text("".join(json.dumps({"query": f"q {i}", "pos": ["same passage"]}) + "\n"
                          for i in range(4)))
  prepare.prepare([str(path)], str(tmp_path / "p"), progress=False)
  src, ref = open_contrastive_data(str(tmp_path / "p")), open_contrastive_data(str(path))
  assert src.covering_row() == ref.covering_row() == 0


@pytest.mark.parametrize("process_count", [1, 2])
def test_batches_equal_the_jsonl_path_batch_for_batch(inputs, ready, process_count):
  """ContrastiveBatcher on the inputs and on the prepared folder: every batch of two epochs is
  equal (groups drawn from the positives pool for neg-less rows, no-in-batch types, prompts)."""
  tok = tokenizer(inputs)
  kw = dict(batch_size=16 // process_count, group_size=4, query_max_length=12,
            passage_max_length=16, seed=5, process_count=process_count)
  for p in range(process_count):
    a = ContrastiveBatcher([("d", open_contrastive_data(inputs["files"]))], tok,
                           process_index=p, **kw)
    b = ContrastiveBatcher([("d", open_contrastive_data(str(ready)))], tok, process_index=p, **kw)
    assert a.steps_per_epoch == b.steps_per_epoch == 310 // 16
    flags = set()
    for step in range(2 * a.steps_per_epoch):
      x, y = a(step), b(step)
      assert x.keys() == y.keys()
      for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=f"step {step} {k}")
      flags.add(int(x["in_batch_negatives"]))
    assert flags == {0, 1}  # both kinds of batch occurred


def test_teacher_scores_batches_equal(tmp_path, inputs):
  path = fe_file(tmp_path / "s.jsonl", 64, neg_every=1, scores=True)
  # 4 records per compressed chunk (a smaller reader index): the same rows.
  prepare.prepare([str(path)], str(tmp_path / "p"), progress=False, rows_per_shard=20,
                  records_per_chunk=4)
  assert "group_size:4" in open_contrastive_data(str(tmp_path / "p")).manifest["writer_options"]
  tok = tokenizer(inputs)
  kw = dict(batch_size=8, group_size=3, query_max_length=12, passage_max_length=16,
            use_teacher_scores=True)
  a = ContrastiveBatcher([("d", open_contrastive_data(str(path)))], tok, **kw)
  b = ContrastiveBatcher([("d", open_contrastive_data(str(tmp_path / "p")))], tok, **kw)
  for step in range(a.steps_per_epoch):
    np.testing.assert_array_equal(a(step)["teacher_scores"], b(step)["teacher_scores"])


def _recording(src):
  """Wraps the source's shard reads; returns the list of row indices read."""
  seen: list[int] = []
  read = src._shards.read

  def wrapped(indices):
    seen.extend(int(i) for i in indices)
    return read(indices)

  src._shards.read = wrapped
  return seen


def test_validation_fraction_holds_out_the_jsonl_paths_rows_read_lazily(inputs, ready, tmp_path):
  """data.validation_fraction on the prepared folder (`holdout.split`): the same held-out and
  training rows as on its JSONL inputs (a function of the row count alone), made without
  reading a row, and the same training and validation batches (two processes)."""
  from bge_jax.data import holdout

  config = {"validation_fraction": 0.2}
  ref = open_contrastive_data(inputs["files"])
  src = open_contrastive_data(str(ready))
  seen = _recording(src)
  (ref_train, ref_val), (train, val) = holdout.split(ref, config), holdout.split(src, config)
  assert seen == []  # the split read no row
  assert isinstance(val, prepared.PreparedPairs) and len(val) == round(0.2 * 310) == 62
  np.testing.assert_array_equal(val.indices, holdout.held_out(310, 0.2))
  assert list(val) == ref_val.rows and list(train) == ref_train.rows
  assert sorted(seen) == list(range(310)) and len(seen) == 310  # each row read once, by its view
  for mine, theirs in ((train, ref_train), (val, ref_val)):
    assert [mine.locate(i) for i in (0, len(mine) - 1)] == [theirs.locate(i)
                                                            for i in (0, len(theirs) - 1)]
    for what in ("neg", "pos_scores", "neg_scores"):
      assert mine.first_row_without(what) == theirs.first_row_without(what), what
    pool = mine.positives()
    assert len(pool) == len(theirs.positives()) > len(mine)  # rows with two positives
    assert [pool[t] for t in range(len(pool))] == theirs.positives()
    every = np.arange(len(mine))
    np.testing.assert_array_equal(mine.type_mask(("classification",))[every],
                                  theirs.type_mask(("classification",))[every])
    assert mine.covering_row() is None and theirs.covering_row() is None
  assert val.subset([1, 3]).__getitems__([0, 1]) == [ref_val[1], ref_val[3]]  # a view of a view
  for folder in (ready, tmp_path / "tsv"):  # some rows with two positives; one positive a row
    if folder != ready:
      prepare.prepare(inputs["files"][2:], str(folder), rows_per_shard=30, progress=False)
    tsv = open_contrastive_data(str(folder))
    tsv = tsv.subset(range(len(tsv) - 70, len(tsv))).subset(range(2, 70, 3))  # c.tsv's rows
    assert list(tsv.positives()) == [r.pos[0] for r in open_contrastive_data(
        inputs["files"][2]).rows[2::3]]
  with pytest.raises(ValueError, match="strictly increasing"):
    val.subset([3, 1])

  tok = tokenizer(inputs)
  kw = dict(batch_size=8, group_size=4, query_max_length=12, passage_max_length=16, seed=5,
            process_count=2)
  for data in ((train, ref_train), (val, ref_val)):
    for p in range(2):
      a, b = (ContrastiveBatcher([("d", d)], tok, process_index=p, **kw) for d in data)
      assert a.steps_per_epoch == b.steps_per_epoch == len(data[0]) // 16
      for step in range(a.steps_per_epoch + 2):
        x, y = a(step), b(step)
        assert x.keys() == y.keys()
        for k in x:
          np.testing.assert_array_equal(x[k], y[k], err_msg=f"step {step} {k}")


def test_two_processes_read_disjoint_rows_that_cover_the_epoch(inputs, tmp_path):
  """With negatives in every row (no pool draws), each process reads exactly the rows of its own
  batches: the two sets are disjoint and together are the epoch's global selections."""
  path = fe_file(tmp_path / "n.jsonl", 100, neg_every=1)
  prepare.prepare([str(path)], str(tmp_path / "p"), progress=False, rows_per_shard=30)
  tok = tokenizer(inputs)
  reads, selected = [], set()
  for p in range(2):
    src = open_contrastive_data(str(tmp_path / "p"))
    seen = _recording(src)
    b = ContrastiveBatcher([("d", src)], tok, batch_size=6, group_size=3, query_max_length=8,
                           passage_max_length=8, process_index=p, process_count=2)
    assert seen == []  # opening read no row
    for step in range(b.steps_per_epoch):
      b(step)
      selected.update(int(i) for i in b.select(step)[1])
    reads.append(set(seen))
    assert len(seen) == len(set(seen)) == b.steps_per_epoch * 6
  assert not reads[0] & reads[1]
  assert reads[0] | reads[1] == selected and len(selected) == 8 * 12


def test_another_process_count_reads_the_same_global_batch(inputs, ready):
  """A resume with 2 processes instead of 1 (same global batch): the same global selection, and
  the processes' queries together are the one process's."""
  tok = tokenizer(inputs)
  kw = dict(group_size=2, query_max_length=12, passage_max_length=16, seed=9)
  one = ContrastiveBatcher([("d", open_contrastive_data(str(ready)))], tok, batch_size=16, **kw)
  two = [ContrastiveBatcher([("d", open_contrastive_data(str(ready)))], tok, batch_size=8,
                            process_index=p, process_count=2, **kw) for p in range(2)]
  for step in (0, 7, 25):
    np.testing.assert_array_equal(one.select(step)[1], two[0].select(step)[1])
    np.testing.assert_array_equal(one(step)["query_input_ids"], np.concatenate(
        [t(step)["query_input_ids"] for t in two]))


def test_dedupe_keeps_the_first_of_equal_rows(tmp_path):
  files = [fe_file(tmp_path / "a.jsonl", 120, dup_every=4), fe_file(tmp_path / "b.jsonl", 80,
                                                                      dup_every=3, seed=1)]
  ref = open_contrastive_data([str(f) for f in files])
  keep, seen = [], set()
  for r in ref.rows:
    if r not in seen:
      seen.add(r)
      keep.append(r)
  # A tiny dedupe_memory: the hashes are sorted in many partitions.
  m = prepare.prepare([str(f) for f in files], str(tmp_path / "p"), dedupe=True,
                      dedupe_memory=600, rows_per_shard=25, progress=False)
  src = open_contrastive_data(str(tmp_path / "p"))
  assert list(src) == keep and len(keep) < len(ref)
  assert m["skipped"] == {"duplicate": len(ref) - len(keep)}
  first_dup = next(i for i, r in enumerate(ref.rows) if r in ref.rows[:i])
  assert m["first_skipped"]["duplicate"] == ref.locate(first_dup)
  assert src.first_row_without("neg") == next(i for i, r in enumerate(keep) if not r.neg)


def test_text_dedupe_matches_open_text_source(tmp_path):
  corpus = make_corpus(tmp_path / "c.jsonl", 60)
  with open(corpus, "a") as f:
    f.write(open(corpus).readline() * 3)
  ref = open_text_source(str(corpus), dedupe=True)
  prepare.prepare([str(corpus)], str(tmp_path / "p"), data="text", dedupe=True,
                  rows_per_shard=16, progress=False)
  part = prepared.open_prepared_texts(str(tmp_path / "p"), fields=["text"])
  assert part.get_many(range(len(part))) == list(ref)
  assert part.manifest["skipped"] == ref.skipped == {"duplicate": 3}
  assert part.locate(len(part) - 1) == ref.locate(len(ref) - 1)


def test_stage1_reads_prepared_text_lazily(tmp_path):
  """open_text_source on a prepared text folder: the texts, locations, skips and process shards
  of the inputs; refusals for other fields and a missing dedupe."""
  corpus = make_corpus(tmp_path / "c.jsonl", 50)
  with open(corpus, "a") as f:
    f.write('{"text": ""}\n')
  ref = open_text_source(str(corpus), on_error="skip")
  prepare.prepare([str(corpus)], str(tmp_path / "p"), data="text", on_error="skip",
                  rows_per_shard=12, progress=False)
  src = open_text_source(str(tmp_path / "p"), on_error="skip")
  assert list(src) == list(ref) and src.skipped == ref.skipped == {"empty_text": 1}
  assert src.locate(49) == ref.locate(49) and src.summary() == ref.summary()
  for k in range(2):
    assert list(src.shard(k, 2)) == list(ref.shard(k, 2))
  assert src.__getitems__([40, 3, 17]) == ref.__getitems__([40, 3, 17])
  from bge_jax.data import holdout  # data.validation_fraction: the same held-out texts
  for mine, theirs in zip(holdout.split(src, {"validation_fraction": 0.2}),
                          holdout.split(ref, {"validation_fraction": 0.2})):
    assert list(mine) == list(theirs) and mine.locate(3) == theirs.locate(3)
  with pytest.raises(DataError, match=r"prepared with on_error='skip'.*empty_text at "):
    open_text_source(str(tmp_path / "p"))
  with pytest.raises(DataError, match=r"prepared with field 'text' but data\.field is 'body'"):
    open_text_source(str(tmp_path / "p"), field="body", on_error="skip")
  with pytest.raises(DataError, match=r"prepared without --dedupe but data\.dedupe is set"):
    open_text_source(str(tmp_path / "p"), dedupe=True, on_error="skip")


def test_bad_row_stops_with_file_line_and_leaves_nothing(tmp_path):
  path = fe_file(tmp_path / "in" / "a.jsonl", 20)
  with open(path, "a") as f:
    f.write('{"query": "q", "pos": []}\n')
  with pytest.raises(DataError, match=rf"{path}:21: field 'pos' is an empty list"):
    prepare.prepare([str(path)], str(tmp_path / "out"), progress=False)
  assert sorted(os.listdir(tmp_path)) == ["in"]  # no output, no temporary folder
  m = prepare.prepare([str(path)], str(tmp_path / "out"), on_error="skip", progress=False)
  assert m["rows"] == 20 and m["skipped"] == {"empty_pos": 1}
  assert m["first_skipped"] == {"empty_pos": f"{path}:21"}
  # Opened with on_error="raise" (the trainer's default), the skips are refused as the input is.
  with pytest.raises(DataError, match=rf"prepared with on_error='skip'.*empty_pos at {path}:21"):
    open_contrastive_data(str(tmp_path / "out"))
  assert len(open_contrastive_data(str(tmp_path / "out"), on_error="skip")) == 20
  with pytest.raises(DataError, match="exists; choose another output folder or pass --overwrite"):
    prepare.prepare([str(path)], str(tmp_path / "out"), progress=False)


def test_a_killed_prepares_staging_folder_is_removed_by_the_next(tmp_path):
  import socket
  import subprocess
  import sys

  path = fe_file(tmp_path / "in" / "a.jsonl", 20)
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()  # a pid that no longer runs: the prepare it stood for was killed
  stale = tmp_path / f".out.tmp-{gone.pid}@{socket.gethostname()}-k1lled00"
  (stale / "shard").mkdir(parents=True)
  prepare.prepare([str(path)], str(tmp_path / "out"), progress=False)
  assert sorted(os.listdir(tmp_path)) == ["in", "out"]


def _copy(ready, tmp_path):
  dst = tmp_path / "copy"
  shutil.copytree(ready, dst)
  return dst


def _shard(folder, k=0):
  return folder / json.loads((folder / prepared.MANIFEST).read_text())["shards"][k]["file"]


def _edit_manifest(folder, fn):
  path = folder / prepared.MANIFEST
  m = json.loads(path.read_text())
  fn(m)
  path.write_text(json.dumps(m))


@pytest.mark.parametrize("case, pattern", [
    ("not_json", r"bge_jax_manifest\.json: not a valid bge-jax prepared-dataset manifest "
                 r"\(JSONDecodeError"),
    ("format", r"bge_jax_manifest\.json: not a valid .*'format' is not 'bge-jax-prepared'"),
    ("version", r"bge_jax_manifest\.json: not a valid .*version 99"),
    ("counts", r"bge_jax_manifest\.json: not a valid .*the shards' rows add up to 310, not "
               r"rows=311"),
    ("missing", r"shard-00001-of-00009\.array_record: missing shard of the prepared dataset"),
    ("truncated", r"shard-00000-of-00009\.array_record: \d+ bytes where bge_jax_manifest\.json "
                  r"records \d+: the shard is truncated or was replaced"),
    ("altered", r"shard-00000-of-00009\.array_record: checksum mismatch"),
    ("kind", r"bge_jax_manifest\.json: asked for kind='fe' but .*c\.tsv was prepared as 'pairs' "
             r"rows"),
    ("mixed", r"is a prepared dataset: give it as a spec of its own"),
])
def test_refusals_name_the_file(ready, inputs, tmp_path, case, pattern):
  folder = _copy(ready, tmp_path)
  kw = {}
  spec = str(folder)
  if case == "not_json":
    (folder / prepared.MANIFEST).write_text("{not json")
  elif case == "format":
    _edit_manifest(folder, lambda m: m.update(format="other"))
  elif case == "version":
    _edit_manifest(folder, lambda m: m.update(version=99))
  elif case == "counts":
    _edit_manifest(folder, lambda m: m.update(rows=311))
  elif case == "missing":
    _shard(folder, 1).unlink()
  elif case == "truncated":
    path = _shard(folder)
    path.write_bytes(path.read_bytes()[:-10])
  elif case == "altered":
    path = _shard(folder)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
  elif case == "kind":
    kw["kind"] = "fe"
  elif case == "mixed":
    spec = [str(folder), inputs["files"][0]]
  with pytest.raises(DataError, match=pattern):
    open_contrastive_data(spec, **kw)


def test_verify_finds_what_the_open_check_cannot(tmp_path):
  """A byte changed past the first and last 64 KiB of a shard: opening (size + head/tail CRC)
  accepts it, --verify (full SHA-256) refuses it naming the shard."""
  from prepare_data import main

  path = fe_file(tmp_path / "big.jsonl", 3000, neg_every=1)
  assert main([str(path), "--out", str(tmp_path / "p"), "--quiet", "--workers", "1"]) == 0
  shard = _shard(tmp_path / "p")
  data = bytearray(shard.read_bytes())
  assert len(data) > 3 * prepared.CHECK_BYTES
  data[len(data) // 2] ^= 0x01
  shard.write_bytes(bytes(data))
  open_contrastive_data(str(tmp_path / "p"))
  assert main(["--verify", str(tmp_path / "p")]) == 2
  with pytest.raises(DataError, match=rf"{shard}: SHA-256 mismatch"):
    prepared.open_prepared_pairs(str(tmp_path / "p"), verify=True)


def test_a_text_dataset_is_refused_as_pairs_and_for_other_fields(tmp_path):
  corpus = make_corpus(tmp_path / "c.jsonl", 20)
  prepare.prepare([str(corpus)], str(tmp_path / "t"), data="text", progress=False)
  with pytest.raises(DataError, match=r"bge_jax_manifest\.json: the dataset was prepared as "
                                      r"'text' data, not 'pairs'"):
    open_contrastive_data(str(tmp_path / "t"))
  with pytest.raises(DataError, match=r"prepared with field 'text' but data\.field is 'body'"):
    prepared.open_prepared_texts(str(tmp_path / "t"), fields=["body"])


def test_cli_help_and_errors(tmp_path, capsys):
  from prepare_data import main

  with pytest.raises(SystemExit):
    main(["--help"])
  assert "--dedupe" in capsys.readouterr().out
  assert main(["--out", str(tmp_path / "o"), str(tmp_path / "nothing.jsonl")]) == 2
  assert "error: data spec" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_parallel_prepare_writes_the_same_dataset(inputs, ready, tmp_path):
  """workers=2 (spawned processes) writes the same shards and statistics as one process."""
  m = prepare.prepare(inputs["files"], str(tmp_path / "p"), rows_per_shard=40, workers=2,
                      progress=False)
  one = json.loads((ready / prepared.MANIFEST).read_text())
  for key in ("created", "prepare_seconds"):
    m.pop(key), one.pop(key)
  assert m == one
  for s in m["shards"]:
    assert (tmp_path / "p" / s["file"]).read_bytes() == (ready / s["file"]).read_bytes()


@pytest.mark.slow
def test_kill_and_resume_on_prepared_data_is_bitwise(inputs, tmp_path):
  """Stage 2 on the JSONL inputs (uninterrupted) and on their prepared folder, SIGKILLed at step 5
  then resumed, both holding out a quarter of the rows (data.validation_fraction): every step's
  loss, every validation loss and the final parameters equal bit for bit."""
  from test_reliability import assert_bitwise_equal, final_params, loss_rows

  from bge_jax.train.metrics import read_metrics

  rows = fe_file(tmp_path / "rows.jsonl", 128, neg_every=2, types=False)
  prepare.prepare([str(rows)], str(tmp_path / "prep"), rows_per_shard=50, progress=False)
  steps = 10
  env = dict(os.environ, BGE_JAX_COMPILATION_CACHE=str(tmp_path / "xla_cache"),
             XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                       "--xla_cpu_multi_thread_eigen=false")

  def command(data, workdir):
    return [sys.executable, str(REPO / "launch" / "train.py"),
            f"--config={REPO / 'configs' / 'contrastive.py'}:tiny", f"--workdir={workdir}",
            f"--config.tokenizer={inputs['tok']}", f"--config.data.train={data}",
            "--config.data.query_max_length=8", "--config.data.passage_max_length=16",
            "--config.data.group_size=3", "--config.model.max_position_embeddings=32",
            "--config.batch_size=8", f"--config.num_train_steps={steps}",
            "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=50",
            "--config.log_every_steps=1", "--config.export=False",
            "--config.data.validation_fraction=0.25", "--config.eval.every_steps=2"]

  def run(data, workdir):
    done = subprocess.run(command(data, workdir), env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done

  run(rows, tmp_path / "reference")
  killed = tmp_path / "killed"
  with open(tmp_path / "killed.log", "w") as log:
    proc = subprocess.Popen(command(tmp_path / "prep", killed), env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
      wait_for_step(killed, 5, [proc])
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=600)
    finally:
      if proc.poll() is None:
        proc.kill()
  assert saved_steps(killed) and saved_steps(killed)[-1] < steps
  assert "resumed from" in run(tmp_path / "prep", killed).stderr
  assert loss_rows(killed) == loss_rows(tmp_path / "reference")
  val = [[(r["step"], r["val/loss"]) for r in read_metrics(str(w)) if "val/loss" in r]
         for w in (killed, tmp_path / "reference")]
  assert val[0] == val[1] and [s for s, _ in val[0]] == list(range(0, steps + 1, 2))
  assert_bitwise_equal(final_params(killed, steps), final_params(tmp_path / "reference", steps))


@pytest.mark.slow
def test_data_benchmark_smoke(tmp_path, minilm_path):
  """launch/bench.py data on 3,000 synthetic pairs: the generated JSONL is the row count, and the
  figures are measured (open, RSS, batches)."""
  from launch import bench

  tok = minilm_path
  written = bench.synthetic_pairs(str(tmp_path / "gen"), 300, 2, tok)
  lines = [json.loads(x) for f in sorted((tmp_path / "gen").iterdir()) for x in open(f)]
  assert len(lines) == 300
  assert written == sum(os.path.getsize(f) for f in (tmp_path / "gen").iterdir())
  bench.main(["data", "--rows", "3000", "--files", "2", "--workers", "1", "--steps", "2",
              "--batch-size", "16", "--processes", "2", "--quiet", "--dir", str(tmp_path / "w"),
              "--out", str(tmp_path / "data")])
  result = json.loads((tmp_path / "data.json").read_text())
  run, = result["runs"]
  assert run["rows"] == 3000 and run["shards"] == 2 and run["examples_per_s"] > 0
  assert 0 < run["open_s"] < 10 and run["shards_opened"] == 2
  assert "a host (300 queries) needs" in (tmp_path / "data.md").read_text()


def test_damaged_gz_is_counted_as_the_jsonl_path_counts_it(tmp_path):
  """A truncated .gz input: with on_error='skip' the rows before the damage are prepared and the
  file counted once as damaged_file, as open_contrastive_data does; with 'raise', nothing."""
  path = fe_file(tmp_path / "in" / "d.jsonl.gz", 400)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  ref = open_contrastive_data(str(path), on_error="skip")
  m = prepare.prepare([str(path)], str(tmp_path / "p"), on_error="skip", progress=False)
  assert m["skipped"] == ref.skipped == {"damaged_file": 1}
  assert m["first_skipped"]["damaged_file"] == ref._first_skipped["damaged_file"]
  assert list(open_contrastive_data(str(tmp_path / "p"), on_error="skip")) == ref.rows
  with pytest.raises(DataError, match=rf"{path}:\d+: the file is truncated or corrupt"):
    prepare.prepare([str(path)], str(tmp_path / "q"), progress=False)
  assert not (tmp_path / "q").exists()
