"""Tests for bge_jax.data.sources: spec kinds, validation, skip counts, sharding, TFDS."""

from __future__ import annotations

import gzip
import json
import logging
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
    (b'{"text": {"a": "b"}}', "not_string", "is a JSON object, not a string or a list of strings"),
    (b'{"text": [["a"]]}', "not_string", "field 'text'[0] is a JSON array, not a string"),
    (b'{"text": [null]}', "not_string", "field 'text'[0] is a JSON null"),
    (b'{"text": []}', "empty_text", "field 'text' is an empty list"),
    (b'{"text": [" "]}', "empty_text", "field 'text'[0] is empty or whitespace-only"),
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
# Several fields, lists of strings (FlagEmbedding fine-tuning rows), dedupe
# ---------------------------------------------------------------------------------------------

FINETUNE_ROWS = [
    {"query": "q1", "pos": ["p1"], "neg": ["n1", "n2"]},
    {"query": "q2", "pos": ["p2"]},  # No negatives: fine.
    {"query": "q3", "pos": "p3 as a string", "neg": []},
]


def write_finetune(path: pathlib.Path, rows=FINETUNE_ROWS) -> pathlib.Path:
  # Rows on lines 1, 3, 4 (a blank line 2).
  lines = [json.dumps(rows[0]), ""] + [json.dumps(r) for r in rows[1:]]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_several_fields_row_then_field_then_list_order(tmp_path):
  p = write_finetune(tmp_path / "ft.jsonl")
  src = open_text_source(p, field="pos,neg")
  assert list(src) == ["p1", "n1", "n2", "p2", "p3 as a string"]
  assert [src.locate(i) for i in range(len(src))] == [f"{p}:{n}" for n in (1, 1, 1, 3, 4)]
  assert src.skipped == {}
  assert list(open_text_source(p, field="query,pos,neg")) == [
      "q1", "p1", "n1", "n2", "q2", "p2", "q3", "p3 as a string"]
  assert list(open_text_source(p, field="neg,pos")) == ["n1", "n2", "p1", "p2", "p3 as a string"]
  assert list(open_text_source(p, field=" pos , neg ")) == list(src)
  assert list(open_text_source(p, field=["pos", "neg"])) == list(src)
  # A single list-valued field.
  assert list(open_text_source(p, field="pos")) == ["p1", "p2", "p3 as a string"]
  # Shards stride over texts, not rows.
  assert list(src.shard(0, 2)) == ["p1", "n2", "p3 as a string"]
  assert src.shard(1, 2).locate(0) == f"{p}:1" and src.shard(1, 2).locate(1) == f"{p}:3"
  assert src.__getitems__([4, 1, 2]) == ["p3 as a string", "n1", "n2"]
  # The same rows as one JSON array: line numbers are where items start.
  a = tmp_path / "ft.json"
  a.write_text("[\n" + ",\n".join(json.dumps(r) for r in FINETUNE_ROWS) + "\n]\n", encoding="utf-8")
  arr = open_text_source(a, field="pos,neg")
  assert list(arr) == list(src)
  assert [arr.locate(i) for i in range(len(arr))] == [f"{a}:{n}" for n in (2, 2, 2, 3, 4)]


def test_several_fields_missing_all(tmp_path):
  p = write_finetune(tmp_path / "ft.jsonl", FINETUNE_ROWS[:2] + [{"query": "q", "id": 3}])
  with pytest.raises(DataError) as info:
    open_text_source(p, field="pos,neg")
  assert str(info.value).startswith(
      f"{p}:4: none of the fields 'pos' or 'neg' (the row has keys 'query', 'id')")
  assert "on_error='skip'" in str(info.value)
  src = open_text_source(p, field="pos,neg", on_error="skip")
  assert list(src) == ["p1", "n1", "n2", "p2"] and src.skipped == {"missing_field": 1}
  assert f"missing_field 1 (first at {p}:4)" in src.summary()
  p.write_text('"p1"\n', encoding="utf-8")
  with pytest.raises(DataError, match=r"ft\.jsonl:1: a JSON string where an object like "
                     r'\{"pos": "\.\.\."\} was expected'):
    open_text_source(p, field="pos,neg")


LIST_ROW = (b'{"pos": ["ok", 7, "", "fine", "caf\xe9"], "neg": null, "x": 1}\n'
            b'{"pos": [], "neg": []}\n'
            b'{"query": "q", "neg": ["ab", "long enough"]}\n')


def test_bad_texts_in_lists_name_file_line_and_field(tmp_path):
  p = tmp_path / "ft.jsonl"
  p.write_bytes(LIST_ROW)
  with pytest.raises(DataError, match=r"ft\.jsonl:1: field 'pos'\[1\] is a JSON number, not a "
                     r"string\. Fix the row"):
    open_text_source(p, field="pos,neg")
  cases = [  # (file content, message) for each other problem, alone.
      (b'{"pos": ["ok", ""]}', r":1: field 'pos'\[1\] is empty or whitespace-only"),
      (b'{"pos": ["caf\xe9"]}', r":1: field 'pos'\[0\] holds byte 0xe9"),
      (b'{"pos": ["x \\ud800"]}', r":1: field 'pos'\[0\] holds a lone surrogate"),
      (b'{"pos": ["ok"], "neg": null}', r":1: field 'neg' is a JSON null, not a string or a list"),
      (b'{"pos": [], "neg": []}', r":1: fields 'pos' and 'neg' are empty lists: the row holds no"),
      (b'{"neg": []}', r":1: field 'neg' is an empty list"),
  ]
  for content, message in cases:
    p.write_bytes(content + b"\n")
    with pytest.raises(DataError, match=message):
      open_text_source(p, field="pos,neg")
  p.write_bytes(b'{"q": "q", "neg": ["ab", "long enough"]}\n')
  with pytest.raises(DataError, match=r":1: field 'neg'\[0\] has 2 characters, fewer than"):
    open_text_source(p, field="pos,neg", min_chars=3)
  # Skipping drops a bad text alone; the row's good texts stay.
  p.write_bytes(LIST_ROW)
  src = open_text_source(p, field="pos,neg", on_error="skip", min_chars=3)
  assert list(src) == ["fine", "long enough"]
  assert [src.locate(i) for i in range(2)] == [f"{p}:1", f"{p}:3"]
  assert src.skipped == {"not_string": 2, "empty_text": 2, "too_short": 2, "invalid_utf8": 1}
  assert f"not_string 2 (first at {p}:1)" in src.summary()
  assert f"too_short 2 (first at {p}:1)" in src.summary()  # "ok" is too short as well.


def test_field_option_is_checked(tmp_path):
  p = write_finetune(tmp_path / "ft.jsonl")
  for bad in ("", "pos,,neg", "pos,", " , "):
    with pytest.raises(ValueError, match="empty name"):
      open_text_source(p, field=bad)
  with pytest.raises(ValueError, match="'pos' more than once"):
    open_text_source(p, field="pos,neg,pos")
  with pytest.raises(ValueError, match="field name"):
    open_text_source(p, field=["pos", 3])


def test_field_in_no_row_warns(tmp_path, caplog):
  p = write_finetune(tmp_path / "ft.jsonl")
  with caplog.at_level(logging.WARNING, logger="bge_jax.data.sources"):
    src = open_text_source(p, field="pos,negs")
  assert list(src) == ["p1", "p2", "p3 as a string"]
  assert "holds field 'negs'" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="bge_jax.data.sources"):
    open_text_source(p, field="pos,neg")
  assert caplog.text == ""


def test_dedupe(tmp_path, caplog):
  rows = [
      {"query": "q1", "pos": ["shared"], "neg": ["a", "b", "a"]},
      {"query": "q2", "pos": ["b"], "neg": ["shared", "c"]},
  ]
  p = write_finetune(tmp_path / "ft.jsonl", rows)  # Lines 1 and 3.
  t = tmp_path / "more.txt"
  t.write_text("c\nd\nshared\n", encoding="utf-8")
  src = open_text_source([p, t], field="pos,neg")
  assert list(src) == ["shared", "a", "b", "a", "b", "shared", "c", "c", "d", "shared"]
  assert src.skipped == {}
  with caplog.at_level(logging.INFO, logger="bge_jax.data.sources"):
    dd = open_text_source([p, t], field="pos,neg", dedupe=True)
  assert list(dd) == ["shared", "a", "b", "c", "d"]  # First occurrences, in order, across files.
  assert [dd.locate(i) for i in range(len(dd))] == [f"{p}:1"] * 3 + [f"{p}:3", f"{t}:2"]
  assert dd.skipped == {"duplicate": 5}
  line = dd.summary()
  assert line.startswith("5 texts from 2 files")
  assert f"dropped 5 duplicate texts (first at {p}:1)" in line and "bad row" not in line
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # Not an error.
  # Bad texts are counted as bad, not as duplicates; dedupe compares exact strings.
  p.write_text('{"pos": ["x", "", "x ", "x"]}\n{"pos": [""]}\n', encoding="utf-8")
  src = open_text_source(p, field="pos", dedupe=True, on_error="skip")
  assert list(src) == ["x", "x "]
  assert src.skipped == {"empty_text": 2, "duplicate": 1}
  assert "skipped 2 bad rows: empty_text 2" in src.summary()
  assert src.shard(1, 2).skipped == src.skipped
  # Off by default; refused for TFDS specs (checked before opening anything).
  with pytest.raises(DataError, match="dedupe=True cannot apply to 'tfds:c4'"):
    open_text_source([p, "tfds:c4"], field="pos", dedupe=True, on_error="skip")


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


FINETUNE_RECORDS = [  # (query, pos, neg) per record; record keys are the list positions.
    ("q0", ["p0a"], ["n0a", "n0b"]),
    ("q1", ["p1a", "p1b"], []),  # No negatives: fine.
    ("q2", [], ["n2a"]),
    ("q3", ["p3a"], ["n3a", "", "n3c"]),  # An empty negative: refused when read.
    ("q4", ["p4a"], ["n4a"]),
]


@pytest.fixture(scope="module")
def tfds_finetune_dir(tmp_path_factory) -> pathlib.Path:
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")

  class BgeJaxToyFinetune(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """FlagEmbedding-style rows: a text query, variable-length sequences of passages."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      passages = tfds.features.Sequence(tfds.features.Text())
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"query": tfds.features.Text(), "pos": passages, "neg": passages}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(FINETUNE_RECORDS),
              "bad": self._generate_examples([("q", ["p"], []), ("r", [], [])])}

    def _generate_examples(self, records):
      for i, (q, pos, neg) in enumerate(records):
        yield i, {"query": q, "pos": pos, "neg": neg}

  data_dir = tmp_path_factory.mktemp("tfds_finetune")
  BgeJaxToyFinetune(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def _read_all(src):
  """(texts, errors) reading every text of a lazily validated source."""
  texts, errors = [], []
  for i in range(len(src)):
    try:
      texts.append(src[i])
    except DataError as e:
      errors.append((i, str(e)))
  return texts, errors


def test_tfds_several_fields_and_sequences(tfds_finetune_dir, caplog):
  spec = f"tfds:bge_jax_toy_finetune:train@{tfds_finetune_dir}"
  label = spec
  # Record order is TFDS's; check each record's texts against the record they name.
  by_query = {q: (q, pos, neg) for q, pos, neg in FINETUNE_RECORDS}
  for field, pick in [("pos,neg", lambda q, pos, neg: pos + neg),
                      ("neg,pos", lambda q, pos, neg: neg + pos),
                      ("query,pos,neg", lambda q, pos, neg: [q] + pos + neg)]:
    src = open_text_source(spec, field=field)
    expected_total = sum(len(pick(*r)) for r in FINETUNE_RECORDS)
    assert len(src) == expected_total, field
    queries = open_text_source(spec, field="query")  # Scalar: one text per record, lazy.
    assert len(queries) == len(FINETUNE_RECORDS)
    per_record: dict[str, list] = {}
    for i in range(len(src)):
      loc = src.locate(i)
      assert loc.startswith(f"{label}[") and loc.endswith("]")
      try:
        text = src[i]
      except DataError as e:
        assert "feature 'neg'[1] is empty or whitespace-only" in str(e), str(e)
        assert str(e).startswith(f"{label} record {loc[len(label) + 1:-1]}:")
        text = ""
      per_record.setdefault(loc, []).append(text)
    for loc, texts in per_record.items():
      record = int(loc[len(label) + 1:-1])
      q = queries[record]
      assert texts == pick(*by_query[q]), (field, loc)
  # Batched reads and shards agree with single reads.
  src = open_text_source(spec, field="pos,neg")
  texts, errors = _read_all(src)
  assert len(errors) == 1 and len(texts) == len(src) - 1
  good = [i for i in range(len(src)) if i != errors[0][0]]
  assert src.__getitems__(good[::-1]) == [src[i] for i in good[::-1]]
  shards = [src.shard(k, 3) for k in range(3)]
  assert sum(len(s) for s in shards) == len(src)
  assert [s.locate(0) for s in shards] == [src.locate(k) for k in range(3)]
  # A named feature the dataset lacks is ignored with a warning while another exists.
  with caplog.at_level(logging.WARNING, logger="bge_jax.data.sources"):
    src = open_text_source(spec, field="query,negs")
  assert len(src) == len(FINETUNE_RECORDS) and "no feature 'negs'" in caplog.text
  with pytest.raises(DataError, match=r"no feature 'negs' or 'poss' \(the dataset has "
                     r"\['neg', 'pos', 'query'\]\)"):
    open_text_source(spec, field="negs,poss")


def test_tfds_record_without_text_is_refused_when_opening(tfds_finetune_dir):
  spec = f"tfds:bge_jax_toy_finetune:bad@{tfds_finetune_dir}"
  with pytest.raises(DataError, match=r"record \d: features 'pos' and 'neg' hold no text \(empty "
                     r"sequences\).*cannot be skipped"):
    open_text_source(spec, field="pos,neg", on_error="skip")
  assert sorted(open_text_source(spec, field="query,pos,neg")) == ["p", "q", "r"]


def test_tfds_two_scalar_features(tfds_dir):
  # Two features per record (fixed), lazy: text 2k is record k's "text", 2k+1 its "id".
  src = open_text_source(f"tfds:bge_jax_toy_corpus:test@{tfds_dir}", field="text,id")
  assert len(src) == 4
  assert sorted([src[0], src[2]]) == ["held out a", "held out b"]
  assert src.locate(0) == src.locate(1) != src.locate(2) == src.locate(3)
  with pytest.raises(DataError, match=r"record \d: feature 'id' is a int"):
    src[3]


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


@pytest.mark.parametrize("name", ["en/nq.jsonl", "zh/bge_finetune_data.jsonl"])
def test_finetune_data_as_pretraining_corpus(shared_data, name):
  path = shared_data / name
  if not path.is_file():
    pytest.skip(f"{path} is absent")
  rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
          if line.strip()]
  passages = [t for r in rows for f in ("pos", "neg") for t in r.get(f, [])]
  src = open_text_source(str(path), field="pos,neg")
  assert len(src) == len(passages) > len(rows)
  assert list(src) == passages and src.skipped == {}
  assert src.locate(len(src) - 1) == f"{path}:{len(rows)}"
  dd = open_text_source(str(path), field="pos,neg", dedupe=True)
  assert len(dd) == len(set(passages)) and list(dd) == list(dict.fromkeys(passages))
  assert dd.skipped.get("duplicate", 0) == len(passages) - len(dd)
  assert len(open_text_source(str(path), field="query,pos,neg")) == len(passages) + len(rows)


def write_truncated_gz(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
  """`lines` gzipped, the stream cut in half (a download or copy that stopped early)."""
  data = gzip.compress("".join(line + "\n" for line in lines).encode())
  path.write_bytes(data[:len(data) // 2])
  return path


@pytest.mark.parametrize("name,line", [
    ("a.jsonl.gz", lambda i: json.dumps({"text": f"row {i} of a longer corpus"})),
    ("a.txt.gz", lambda i: f"row {i} of a longer corpus")])
def test_truncated_gz_names_the_file_or_keeps_the_rows_before(tmp_path, name, line, caplog):
  p = write_truncated_gz(tmp_path / name, [line(i) for i in range(3000)])
  after = write_jsonl(tmp_path / "b.jsonl", ["after the damaged file"])
  with pytest.raises(DataError, match=r"truncated or corrupt: re-download or recompress") as e:
    open_text_source([p, after])
  assert str(e.value).startswith(f"{p}:") and "on_error='skip'" in str(e.value)
  assert "\n" not in str(e.value)
  with caplog.at_level(logging.WARNING, logger="bge_jax.data.sources"):
    src = open_text_source([p, after], on_error="skip")
  texts = list(src)
  kept = len(texts) - 1
  assert 0 < kept < 3000 and texts[:kept] == [f"row {i} of a longer corpus" for i in range(kept)]
  assert texts[-1] == "after the damaged file"
  assert src.skipped == {"damaged_file": 1}
  assert f"damaged_file 1 (first at {p}:{kept + 1})" in src.summary()
  assert f"{p}:{kept + 1}: the file is truncated or corrupt" in caplog.text


def test_corrupt_gz_and_damaged_json_array(tmp_path):
  bad = tmp_path / "bad.jsonl.gz"
  bad.write_bytes(b"not gzip at all\n")
  with pytest.raises(DataError, match=rf"^{bad}:1: the file is truncated or corrupt"):
    open_text_source(bad)
  ok = write_jsonl(tmp_path / "ok.jsonl", ["fine"])
  assert open_text_source([bad, ok], on_error="skip").skipped == {"damaged_file": 1}
  # A JSON array cannot be read in part: it refuses in both modes.
  arr = tmp_path / "arr.json.gz"
  rows = [json.dumps({"text": f"item {i} of the array"}) for i in range(3000)]
  write_truncated_gz(arr, ["[" + ",\n".join(rows) + "]"])
  for on_error in ("raise", "skip"):
    with pytest.raises(DataError, match=rf"^{arr}: the file is truncated .*cannot be read in part"):
      open_text_source(arr, on_error=on_error)
