"""Tests for bge_jax.data.sources: spec kinds, validation, skip counts, sharding, TFDS."""

from __future__ import annotations

import gzip
import json
import pathlib

import numpy as np
import pytest

from bge_jax.data.sources import DataError, TextSource, open_text_source, parse_tfds_spec


def write_jsonl(path: pathlib.Path, rows, field: str = "text") -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps({field: r} if isinstance(r, str) else r) + "\n"
                          for r in rows), encoding="utf-8")
  return path


# ---------------------------------------------------------------------------------------------
# Spec kinds
# ---------------------------------------------------------------------------------------------

def test_jsonl(tmp_path):
  p = write_jsonl(tmp_path / "a.jsonl", ["alpha", "beta", "gamma é 中文"])
  src = open_text_source(str(p))
  assert isinstance(src, TextSource)
  assert len(src) == 3
  assert list(src) == ["alpha", "beta", "gamma é 中文"]
  assert src[0] == "alpha" and src[-1] == "gamma é 中文" and src[np.int64(1)] == "beta"
  with pytest.raises(IndexError):
    src[3]
  assert src.origins == (str(p),)
  assert src.skipped == {}
  assert src.locate(2) == f"{p}:3"
  assert "3 texts from 1 file" in src.summary()


def test_jsonl_custom_field_blank_lines_and_bom(tmp_path):
  p = tmp_path / "a.jsonl"
  p.write_bytes(b'\xef\xbb\xbf{"content": "one", "id": 1}\r\n\n   \n{"content": "two"}')
  src = open_text_source(p, field="content")
  assert list(src) == ["one", "two"]
  assert src.locate(1) == f"{p}:4"


def test_txt(tmp_path):
  p = tmp_path / "a.txt"
  p.write_bytes("first line\r\n\n  \nsecond, with  spaces \nthird 中文".encode())
  src = open_text_source(str(p))
  assert list(src) == ["first line", "second, with  spaces ", "third 中文"]
  assert src.locate(1) == f"{p}:4"


def test_gzip(tmp_path):
  p = tmp_path / "a.jsonl.gz"
  with gzip.open(p, "wt", encoding="utf-8") as f:
    f.write('{"text": "zipped"}\n{"text": "too"}\n')
  q = tmp_path / "b.txt.gz"
  with gzip.open(q, "wt", encoding="utf-8") as f:
    f.write("plain\n")
  assert list(open_text_source([p, q])) == ["zipped", "too", "plain"]


def test_json_array(tmp_path):
  p = tmp_path / "a.json"
  p.write_text('[\n  {"text": "one"},\n  {"text": "two"}\n]\n', encoding="utf-8")
  src = open_text_source(p)
  assert list(src) == ["one", "two"]
  assert src.locate(1) == f"{p}:3"
  p.write_text('[\n  {"text": "one"},\n  {"text": ""},\n  {"text": "three"}\n]', encoding="utf-8")
  with pytest.raises(DataError, match=r"a\.json:3: field 'text' is empty"):
    open_text_source(p)
  src = open_text_source(p, on_error="skip")
  assert list(src) == ["one", "three"] and src.skipped == {"empty_text": 1}
  p.write_text('[\n  {"text": "one"},\n  {"text": "two"\n]', encoding="utf-8")
  with pytest.raises(DataError, match=r"a\.json:4: invalid JSON array"):
    open_text_source(p, on_error="skip")
  p.write_text("[]", encoding="utf-8")
  with pytest.raises(DataError, match="no usable text"):
    open_text_source(p)


def test_folder_recursive_sorted(tmp_path):
  d = tmp_path / "corpus"
  write_jsonl(d / "b.jsonl", ["b1", "b2"])
  write_jsonl(d / "a" / "z.json", ["az"])
  (d / "a" / "y.txt").write_text("ay\n", encoding="utf-8")
  write_jsonl(d / "c" / "d" / "e.jsonl", ["cde"])
  (d / "notes.md").write_text("ignored\n", encoding="utf-8")
  write_jsonl(d / ".hidden" / "x.jsonl", ["hidden"])
  write_jsonl(d / ".x.jsonl", ["hidden too"])
  src = open_text_source(str(d))
  assert list(src) == ["ay", "az", "b1", "b2", "cde"]
  assert [pathlib.Path(o).name for o in src.origins] == ["y.txt", "z.json", "b.jsonl", "e.jsonl"]


def test_glob_sorted(tmp_path):
  for name in ("part-2.jsonl", "part-10.jsonl", "part-1.jsonl", "other.jsonl"):
    write_jsonl(tmp_path / name, [name])
  src = open_text_source(str(tmp_path / "part-*.jsonl"))
  assert list(src) == ["part-1.jsonl", "part-10.jsonl", "part-2.jsonl"]
  write_jsonl(tmp_path / "deep" / "er" / "part-9.jsonl", ["deep"])
  assert list(open_text_source(str(tmp_path / "**" / "part-9.jsonl"))) == ["deep"]


def test_list_of_specs_concatenates_in_order(tmp_path):
  a = write_jsonl(tmp_path / "a.jsonl", ["a1", "a2"])
  (tmp_path / "t.txt").write_text("t1\nt2\nt3\n", encoding="utf-8")
  d = tmp_path / "dir"
  write_jsonl(d / "x.jsonl", ["x1"])
  src = open_text_source([str(tmp_path / "t.txt"), str(a), str(d)])
  assert list(src) == ["t1", "t2", "t3", "a1", "a2", "x1"]
  assert len(src.origins) == 3
  assert src.__getitems__([5, 0, 3, -1]) == ["x1", "t1", "a1", "x1"]
  assert list(src[1:6:2]) == ["t2", "a1", "x1"]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

BAD_ROWS = [
    # (raw line, reason, words the message must contain)
    (b'{"text": "ok" ', "invalid_json", "invalid JSON"),
    (b'["a list"]', "not_object", "JSON array where an object"),
    (b'"just a string"', "not_object", "JSON string where an object"),
    (b'{"body": "x", "id": 3}', "missing_field", "no field 'text' (the row has keys 'body', 'id')"),
    (b'{"text": 17}', "not_string", "is a JSON number, not a string"),
    (b'{"text": null}', "not_string", "is a JSON null"),
    (b'{"text": ["a", "b"]}', "not_string", "is a JSON array"),
    (b'{"text": ""}', "empty_text", "empty or whitespace-only"),
    (b'{"text": " \\t\\n "}', "empty_text", "empty or whitespace-only"),
    (b'{"text": "caf\xe9"}', "invalid_utf8", "byte 0xe9"),
    (b'{"text": "x \\ud800 y"}', "invalid_utf8", "lone surrogate"),
]


@pytest.mark.parametrize("raw,reason,words", BAD_ROWS, ids=[r[1] for r in BAD_ROWS])
def test_bad_row_raises_with_file_line(tmp_path, raw, reason, words):
  p = tmp_path / "bad.jsonl"
  p.write_bytes(b'{"text": "good one"}\n\n' + raw + b'\n{"text": "good two"}\n')
  with pytest.raises(DataError) as info:
    open_text_source(str(p))
  msg = str(info.value)
  assert isinstance(info.value, ValueError)
  assert msg.startswith(f"{p}:3: ")
  assert words in msg
  assert "on_error='skip'" in msg
  src = open_text_source(str(p), on_error="skip")
  assert list(src) == ["good one", "good two"]
  assert src.skipped == {reason: 1}
  assert f"first at {p}:3" in src.summary()


def test_txt_bad_rows(tmp_path):
  p = tmp_path / "bad.txt"
  p.write_bytes(b"fine\nna\xefve\nok\n")
  with pytest.raises(DataError, match=r"bad\.txt:2: line holds byte 0xef .*not UTF-8"):
    open_text_source(p)
  p.write_bytes(b"fine\nab\nok\n")
  with pytest.raises(DataError, match=r"bad\.txt:2: line has 2 characters, fewer than min_chars=3"):
    open_text_source(p, min_chars=3)
  src = open_text_source(p, min_chars=3, on_error="skip")
  assert list(src) == ["fine"] and src.skipped == {"too_short": 2}


def test_skip_counts_per_reason(tmp_path):
  a = tmp_path / "a.jsonl"
  a.write_bytes(b"\n".join([
      b'{"text": "keep 1"}', b"{broken", b"[1]", b'{"x": "y"}', b'{"text": 1}', b'{"text": "  "}',
      b'{"text": "keep 2"}', b"{also broken", b'{"text": "\xff\xfe"}', b'{"text": "keep 3"}']))
  b = tmp_path / "b.txt"
  b.write_bytes(b"keep 4\n\xc3\n")
  src = open_text_source([a, b], on_error="skip")
  assert list(src) == ["keep 1", "keep 2", "keep 3", "keep 4"]
  assert src.skipped == {"invalid_json": 2, "not_object": 1, "missing_field": 1, "not_string": 1,
                         "empty_text": 1, "invalid_utf8": 2}
  line = src.summary()
  assert "\n" not in line
  assert "skipped 8 bad rows" in line and "invalid_json 2" in line
  assert f"invalid_json 2 (first at {a}:2)" in line
  assert f"invalid_utf8 2 (first at {a}:9)" in line


def test_options_are_checked(tmp_path):
  p = write_jsonl(tmp_path / "a.jsonl", ["x"])
  with pytest.raises(ValueError, match="on_error"):
    open_text_source(p, on_error="ignore")
  with pytest.raises(ValueError, match="min_chars"):
    open_text_source(p, min_chars=0)


def test_specs_matching_nothing(tmp_path):
  with pytest.raises(DataError, match="missing.jsonl.*no such file"):
    open_text_source(str(tmp_path / "missing.jsonl"))
  with pytest.raises(DataError, match=r"nothing-\*\.jsonl.*matches no"):
    open_text_source(str(tmp_path / "nothing-*.jsonl"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.md").write_text("x", encoding="utf-8")
  with pytest.raises(DataError, match="empty.*holds no"):
    open_text_source(str(tmp_path / "empty"))
  (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
  with pytest.raises(DataError, match="cannot tell the format"):
    open_text_source(str(tmp_path / "data.csv"))
  with pytest.raises(DataError, match="no data spec"):
    open_text_source([" ", ""])


def test_zero_texts_after_skipping(tmp_path):
  p = tmp_path / "a.jsonl"
  p.write_text('{"text": ""}\n{"nope": 1}\n', encoding="utf-8")
  with pytest.raises(DataError, match=r"no usable text.*empty_text 1.*missing_field 1"):
    open_text_source(p, on_error="skip")
  (tmp_path / "blank.txt").write_text("\n\n", encoding="utf-8")
  with pytest.raises(DataError, match="no usable text"):
    open_text_source(tmp_path / "blank.txt")


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------

def _numbered_source(tmp_path, sizes) -> TextSource:
  specs, n = [], 0
  for j, size in enumerate(sizes):
    specs.append(write_jsonl(tmp_path / f"part{j}.jsonl", [f"t{n + k}" for k in range(size)]))
    n += size
  return open_text_source(specs)


@pytest.mark.parametrize("sizes", [(1,), (7,), (3, 1, 6), (2, 2, 2, 5)])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shard_partitions(tmp_path, sizes, count):
  src = _numbered_source(tmp_path, sizes)
  n = len(src)
  if count > n:
    with pytest.raises(DataError, match="empty"):
      src.shard(count - 1, count)
    return
  seen = []
  for index in range(count):
    shard = src.shard(index, count)
    texts = list(shard)
    assert texts == [f"t{i}" for i in range(index, n, count)]
    assert [shard[k] for k in range(len(shard))] == texts
    assert shard.__getitems__(list(range(len(shard)))[::-1]) == texts[::-1]
    assert shard.origins == src.origins and shard.full_length == n
    seen.extend(int(t[1:]) for t in texts)
  assert sorted(seen) == list(range(n))  # Full cover, no overlap.


def test_shard_of_shard_and_errors(tmp_path):
  src = _numbered_source(tmp_path, (5, 8))
  inner = src.shard(1, 2).shard(2, 3)  # Global indices 1 + 2 * (2 + 3j) = 5 + 6j.
  assert list(inner) == ["t5", "t11"]
  assert (inner.shard_index, inner.shard_count) == (5, 6)
  assert inner.summary().startswith("shard 5/6: 2 of 13 texts")
  assert inner.locate(1) == f"{tmp_path / 'part1.jsonl'}:7"
  with pytest.raises(ValueError):
    src.shard(2, 2)
  with pytest.raises(ValueError):
    src.shard(0, 0)


# ---------------------------------------------------------------------------------------------
# TFDS array_record (built here without TensorFlow)
# ---------------------------------------------------------------------------------------------

TFDS_TEXTS = ["first record", "second record", "", "fourth record", "fifth 中文"]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")

  class BgeJaxToyCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tiny text corpus (one empty record, to test lazy validation)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text(), "id": np.int64}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(TFDS_TEXTS),
              "test": self._generate_examples(["held out a", "held out b"])}

    def _generate_examples(self, texts):
      for i, t in enumerate(texts):
        yield i, {"text": t, "id": i}

  data_dir = tmp_path_factory.mktemp("tfds")
  BgeJaxToyCorpus(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_parse_tfds_spec():
  assert parse_tfds_spec("tfds:c4") == ("c4", "train", None)
  assert parse_tfds_spec("tfds:wiki40b/en:validation@/data/tfds") == (
      "wiki40b/en", "validation", "/data/tfds")
  assert parse_tfds_spec("tfds:x/y:1.2.0:train[:10%]") == ("x/y:1.2.0", "train[:10%]", None)
  assert parse_tfds_spec("tfds:x:1.2.0") == ("x:1.2.0", "train", None)
  with pytest.raises(DataError, match="no dataset name"):
    parse_tfds_spec("tfds::train")


def test_tfds_array_record(tfds_dir, tmp_path):
  spec = f"tfds:bge_jax_toy_corpus:train@{tfds_dir}"
  src = open_text_source(spec)
  assert len(src) == len(TFDS_TEXTS)
  assert src.origins == (f"tfds:bge_jax_toy_corpus:train@{tfds_dir}",)
  texts, bad = [], []
  for i in range(len(src)):
    try:
      texts.append(src[i])
    except DataError as e:  # The empty record: lazily validated, raised on access.
      bad.append(i)
      assert f"tfds:bge_jax_toy_corpus:train@{tfds_dir} record " in str(e)
      assert "empty or whitespace-only" in str(e) and "cannot be skipped" in str(e)
  assert len(bad) == 1
  assert sorted(texts) == sorted(t for t in TFDS_TEXTS if t)
  assert all(isinstance(t, str) for t in texts)
  assert src.locate(bad[0]).startswith("tfds:bge_jax_toy_corpus:train@")
  good = [i for i in range(len(src)) if i not in bad]
  assert src.__getitems__(good[::-1]) == [src[i] for i in good[::-1]]

  held_out = open_text_source(f"tfds:bge_jax_toy_corpus:1.0.0:test@{tfds_dir}")
  assert sorted(held_out) == ["held out a", "held out b"]
  assert len(open_text_source(f"tfds:bge_jax_toy_corpus:train[:2]@{tfds_dir}")) == 2

  # Mixed with a file, sharded: strided over the concatenation, TFDS part stays lazy.
  p = write_jsonl(tmp_path / "a.jsonl", ["file 0", "file 1", "file 2"])
  mixed = open_text_source([str(p), f"tfds:bge_jax_toy_corpus:test@{tfds_dir}"])
  assert len(mixed) == 5
  shards = [mixed.shard(i, 2) for i in range(2)]
  assert list(shards[0])[:2] == ["file 0", "file 2"] and list(shards[1])[:1] == ["file 1"]
  assert sorted(list(shards[0])[2:] + list(shards[1])[1:]) == ["held out a", "held out b"]


def test_tfds_errors(tfds_dir):
  with pytest.raises(DataError, match=r"no feature 'body' \(the dataset has \['id', 'text'\]\)"):
    open_text_source(f"tfds:bge_jax_toy_corpus@{tfds_dir}", field="body")
  with pytest.raises(DataError, match="no_such_corpus.*cannot open") as info:
    open_text_source(f"tfds:no_such_corpus:train@{tfds_dir}")
  assert "\n" not in str(info.value)
  with pytest.raises(DataError, match="split 'valid'.*Unknown split"):
    open_text_source(f"tfds:bge_jax_toy_corpus:valid@{tfds_dir}")
  src = open_text_source(f"tfds:bge_jax_toy_corpus@{tfds_dir}", field="id")
  with pytest.raises(DataError, match="feature 'id' is a int"):
    src[0]


# ---------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------

def test_toy_pretrain_data(shared_data):
  path = shared_data / "en" / "toy_pretrain_data.jsonl"
  if not path.is_file():
    pytest.skip(f"{path} is absent")
  src = open_text_source(str(path))
  # 10 rows: `wc -l` says 9 (and so does shared/data/README.md) because the last row has no
  # trailing newline.
  rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  assert len(src) == len(rows) == 10
  assert all(t.startswith("RetroMAE") for t in src)
  assert src.skipped == {}
