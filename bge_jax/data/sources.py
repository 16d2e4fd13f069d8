"""Raw-text data sources: validated, random-access sequences of texts for the trainer.

The trainer derives the examples of a step from a permutation seeded by (seed, epoch), so a
source must answer `len(src)` and `src[i] -> str` for any `i`, in any order. `open_text_source`
builds such a `TextSource` from one or several specs:

  path/to/file.jsonl        one JSON object per line; the texts are `row[field]` (default "text";
                            see below for several fields and lists of strings)
  path/to/file.json         JSONL too, or one JSON array of objects when it starts with `[`
  path/to/file.txt          one text per non-blank line
  (any of the above may end in `.gz`)
  path/to/folder            every *.jsonl, *.json, *.txt (and .gz) below it, recursively, sorted
                            by relative path; hidden files and folders (".name") are ignored
  path/with/*/glob*.jsonl   matches sorted (`**` recurses); a matched folder is read as above
  path/to/prepared          a folder written by `launch/prepare_data.py --data text`
                            (`bge_jax.data.prepared`): validated when prepared, read lazily,
                            record by record; opening reads only its manifest (it must have been
                            prepared with the same `field`, a `min_chars` at least as high and,
                            for `dedupe=True`, with --dedupe)
  tfds:NAME[/CONFIG][:VERSION][:SPLIT][@DATA_DIR]
                            a TFDS dataset in array_record format, read lazily with
                            `tfds.data_source` (no TensorFlow needed); SPLIT defaults to "train"
                            and may be a slice ("train[:10%]"); records are dicts holding `field`
                            (bytes are decoded as UTF-8)

`field` may name several fields, comma-separated ("pos,neg", "query,pos,neg"), and a field's value
may be a string or a list of strings: every string is one text, in row order, then field order,
then list order. This reads FlagEmbedding fine-tuning files ({"query": str, "pos": [str, ...],
"neg": [str, ...]}) as a pre-training corpus. A row needs at least one of the named fields (a row
without negatives is fine); `locate(i)` names the row a text comes from. With `dedupe=True` a text
seen before (anywhere in the source, compared exactly) is dropped and counted as "duplicate" in
`src.skipped`, which is not an error: mined passages repeat a lot across rows.

Files are validated up front, in one streaming pass, and their texts are kept in memory as a
list of str (plus one int64 line number per text, for error messages). That is fine up to a few
GB of text per process; corpora beyond memory belong in a TFDS array_record dataset, which is
read record by record. Every process reads (and validates) every file so that all processes
agree on the global indexing, then `shard` keeps only the process's part and the rest is freed.

Bad rows (invalid JSON, a row that is not an object, a row with none of the fields) and bad
texts (a value that is neither a string nor a list of strings, a list item that is not a string,
an empty list, an empty, whitespace-only or too short text, bytes that are not UTF-8) raise a
`DataError` naming `file:line`, the field, the problem and the fix, or with `on_error="skip"` are
skipped and counted per reason in `src.skipped`; a bad text is skipped alone, the row's other
texts are kept. Blank lines are not rows and are ignored silently in both modes. A truncated or
corrupt .gz file raises a `DataError` naming the file and the line reached, or with
`on_error="skip"` keeps the rows read before the damage and counts the file as `damaged_file`
(a JSON array file cannot be read in part and raises in both modes).

TFDS records cannot be skipped without scanning the whole dataset, which would defeat lazy
reading, so they are validated when read: a bad record raises a `DataError` naming the dataset
and the record index whatever `on_error` says (clean the dataset when building it). Whether the
fields exist is checked up front from the dataset's features (a named feature the dataset lacks is
ignored with a warning, as long as one exists). Text features (shape ()) and fixed-length
sequences of text give a fixed number of texts per record and stay fully lazy; a variable-length
sequence (`tfds.features.Sequence(tfds.features.Text())`) needs one pass over the records when
opening to count their texts (one int64 per record is kept), which also refuses a record with no
text. `dedupe` does not apply to TFDS datasets (it would need all texts in memory).
"""

from __future__ import annotations

import bisect
import collections
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any, Iterator, Union

import numpy as np

from bge_jax.data import files as files_lib

log = logging.getLogger(__name__)

Spec = Union[str, os.PathLike]

FILE_SUFFIXES = (".jsonl", ".json", ".txt")
ON_ERROR = ("raise", "skip")
DUPLICATE = "duplicate"  # The `skipped` reason for texts dropped by dedupe=True (not an error).
TFDS_PREFIX = "tfds:"

_TFDS_HINT = ("TFDS records are checked when read and cannot be skipped (on_error does not apply); "
              "clean the dataset when building it")
_SURROGATE = re.compile("[\ud800-\udfff]")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


DataError = files_lib.DataError  # one class for every data reader (re-exported here)
_BadRow = files_lib.BadRow


# ---------------------------------------------------------------------------------------------
# Validation of one text value (shared by files and TFDS records).
# ---------------------------------------------------------------------------------------------

def _check_text(text: str, min_chars: int, what: str, may_be_invalid: bool = True,
                item: int | None = None) -> str:
  """Returns `text` if usable, else raises `_BadRow`.

  `what` names the value in messages ("field 'pos'"), `item` its index in a list (appended as
  `[item]`; formatted only on failure). `may_be_invalid=False` skips the (relatively costly) scan
  for surrogates when the caller knows there can be none (the raw line decoded strictly and holds
  no JSON \\u escape).
  """
  m = _SURROGATE.search(text) if may_be_invalid else None
  if m is not None:
    what = _item_name(what, item)
    code = ord(m.group())
    if 0xDC80 <= code <= 0xDCFF:  # A raw byte kept by errors="surrogateescape".
      problem = (f"{what} holds byte 0x{code - 0xDC00:02x} (character {m.start()}), which is not "
                 "UTF-8; re-encode the file as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)")
    else:
      problem = (f"{what} holds a lone surrogate \\u{code:04x} (from a JSON \\u escape), which "
                 "is not valid Unicode")
    raise _BadRow("invalid_utf8", problem)
  if not text or text.isspace():
    raise _BadRow("empty_text", f"{_item_name(what, item)} is empty or whitespace-only")
  if min_chars > 1:
    n = len(text.strip())
    if n < min_chars:
      raise _BadRow("too_short", f"{_item_name(what, item)} has {n} characters, fewer than "
                    f"min_chars={min_chars}")
  return text


def _item_name(what: str, item: int | None) -> str:
  return what if item is None else f"{what}[{item}]"


def _parse_fields(field: str | Sequence[str]) -> tuple[str, ...]:
  """`"pos,neg"` (or `["pos", "neg"]`) -> `("pos", "neg")`; raises ValueError on a bad list."""
  names = field.split(",") if isinstance(field, str) else list(field)
  if not all(isinstance(n, str) for n in names):
    raise ValueError(f"field={field!r}; give a field name or comma-separated names")
  fields = tuple(n.strip() for n in names)
  if not fields or not all(fields):
    raise ValueError(f"field={field!r} holds an empty name; give a field name or comma-separated "
                     "names such as 'pos,neg'")
  twice = sorted({n for n in fields if fields.count(n) > 1})
  if twice:
    raise ValueError(f"field={field!r} names {', '.join(map(repr, twice))} more than once")
  return fields


def _names(fields: Sequence[str], conj: str = "or") -> str:
  """'a' / 'a' or 'b' / 'a', 'b' or 'c' (for messages)."""
  quoted = [repr(f) for f in fields]
  return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} {conj} {quoted[-1]}"


def _json_type(value: Any) -> str:
  if value is None:
    return "null"
  return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
          float: "number"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Parts: the pieces a TextSource concatenates.
# ---------------------------------------------------------------------------------------------

class _MemoryPart:
  """Texts of one file, in memory, with the 1-based line number of each."""

  def __init__(self, path: str, texts: list[str], lines: np.ndarray):
    self.path, self.texts, self.lines = path, texts, lines

  def __len__(self) -> int:
    return len(self.texts)

  def get(self, i: int) -> str:
    return self.texts[i]

  def get_many(self, idx: Sequence[int]) -> list[str]:
    return [self.texts[i] for i in idx]

  def locate(self, i: int) -> str:
    return f"{self.path}:{int(self.lines[i])}"

  def take(self, r: range) -> _MemoryPart:
    s = slice(r.start, r.stop, r.step)
    return _MemoryPart(self.path, self.texts[s], self.lines[s].copy())


class _TfdsPart:
  """A TFDS array_record data source, read and validated record by record.

  Text `t` of the full dataset (global text id, in record order, then field order, then list
  order) is in record `t // per_record` when every record holds `per_record` texts (`starts` is
  None), else in the record `r` with `starts[r] <= t < starts[r + 1]`. `text_ids` are the global
  text ids of this part (a strided range once sharded).
  """

  def __init__(self, label: str, ds: Any, fields: tuple[str, ...], min_chars: int,
               text_ids: range, per_record: int = 1, starts: np.ndarray | None = None):
    self.label, self.ds, self.fields, self.min_chars = label, ds, fields, min_chars
    self.text_ids, self.per_record, self.starts = text_ids, per_record, starts

  def __len__(self) -> int:
    return len(self.text_ids)

  def _record_of(self, i: int) -> tuple[int, int]:
    """(record index, text offset within the record) of local text `i`."""
    t = self.text_ids[i]
    if self.starts is None:
      return divmod(t, self.per_record)
    r = int(np.searchsorted(self.starts, t, side="right")) - 1
    return r, t - int(self.starts[r])

  def _text(self, record: Any, k: int, offset: int) -> str:
    try:
      if not isinstance(record, dict):
        raise _BadRow("not_object", f"record is a {type(record).__name__}, not a dict of features")
      name, item, value = _record_unit(record, self.fields, offset)
      what = f"feature {name!r}"
      if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
      if isinstance(value, (bytes, np.bytes_)):
        try:
          value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
          raise _BadRow("invalid_utf8", f"{_item_name(what, item)} holds byte "
                        f"0x{value[e.start]:02x} (byte {e.start}), which is not UTF-8") from None
      if not isinstance(value, str):
        raise _BadRow("not_string", f"{_item_name(what, item)} is a {type(value).__name__}, not "
                      "text")
      return _check_text(value, self.min_chars, what, item=item)
    except _BadRow as e:
      raise DataError(f"{self.label} record {k}: {e.problem}. {_TFDS_HINT}.") from None

  def get(self, i: int) -> str:
    k, offset = self._record_of(i)
    return self._text(self.ds[k], k, offset)

  def get_many(self, idx: Sequence[int]) -> list[str]:
    where = [self._record_of(i) for i in idx]
    keys = list(dict.fromkeys(k for k, _ in where))  # Each record read once.
    getitems = getattr(self.ds, "__getitems__", None)
    records = getitems(keys) if getitems is not None else [self.ds[k] for k in keys]
    by_key = dict(zip(keys, records))
    return [self._text(by_key[k], k, offset) for k, offset in where]

  def locate(self, i: int) -> str:
    return f"{self.label}[{self._record_of(i)[0]}]"

  def take(self, r: range) -> _TfdsPart:
    text_ids = self.text_ids[r.start:r.stop:r.step]
    return _TfdsPart(self.label, self.ds, self.fields, self.min_chars, text_ids, self.per_record,
                     self.starts)


def _is_list(value: Any) -> bool:
  return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)


def _record_unit(record: dict, fields: Sequence[str], offset: int) -> tuple[str, int | None, Any]:
  """(field, list index or None, value) of the `offset`-th text of a TFDS record."""
  present = False
  for name in fields:
    if name not in record:
      continue
    present = True
    value = record[name]
    if _is_list(value):
      if offset < len(value):
        return name, offset, value[offset]
      offset -= len(value)
    elif offset == 0:
      return name, None, value
    else:
      offset -= 1
  if not present:
    raise _BadRow("missing_field", f"no feature {_names(fields)} (the record has "
                  f"{sorted(record)}); set data.field to the feature holding the text")
  raise _BadRow("changed", "holds fewer texts than when the source was opened (was the dataset "
                "rewritten meanwhile?)")


def _record_count(record: Any, fields: Sequence[str]) -> int | None:
  """How many texts a TFDS record holds (None: none of the fields)."""
  if not isinstance(record, dict):
    return 1  # Refused when read.
  n, present = 0, False
  for name in fields:
    if name in record:
      present = True
      value = record[name]
      n += len(value) if _is_list(value) else 1
  return n if present else None


_Part = Union[_MemoryPart, _TfdsPart]


# ---------------------------------------------------------------------------------------------
# TextSource
# ---------------------------------------------------------------------------------------------

class TextSource(Sequence):
  """A random-access sequence of validated texts: `len(src)`, `src[i] -> str`.

  Attributes:
    origins: where the texts come from, in order: file paths and `tfds:NAME:SPLIT[@DIR]` labels
      (all of them, also on a shard).
    skipped: reason -> number of rows (or texts of a row) skipped while opening (with
      `on_error="skip"`); reasons are invalid_json, not_object, missing_field, not_string,
      empty_text, too_short, invalid_utf8, damaged_file (a truncated or corrupt .gz file, counted
      once, the rows before the damage kept), and "duplicate" for texts dropped by
      `dedupe=True` (not an error). Counts are over the whole source, also on a shard.
    shard_index, shard_count: which strided part of the full source this is (0, 1 when unsharded).
    full_length: the number of texts before sharding.
  """

  def __init__(self, parts: Sequence[_Part], *, origins: Sequence[str],
               skipped: dict[str, int] | None = None,
               first_skipped: dict[str, str] | None = None, shard_index: int = 0,
               shard_count: int = 1, full_length: int | None = None):
    self._parts = list(parts)
    self._offsets = [0]
    for p in self._parts:
      self._offsets.append(self._offsets[-1] + len(p))
    self.origins = tuple(origins)
    self.skipped = dict(skipped or {})
    self._first_skipped = dict(first_skipped or {})
    self.shard_index, self.shard_count = shard_index, shard_count
    self.full_length = len(self) if full_length is None else full_length

  def __len__(self) -> int:
    return self._offsets[-1]

  def _find(self, i: Any) -> tuple[_Part, int]:
    i = int(np.asarray(i)) if isinstance(i, np.ndarray) else i.__index__()
    n = len(self)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"text index {i} out of range for a source of {n} texts")
    j = bisect.bisect_right(self._offsets, i) - 1
    return self._parts[j], i - self._offsets[j]

  def __getitem__(self, i):
    """`src[i]` is the i-th text (negative i counts from the end); `src[a:b:c]` (c > 0) a view."""
    if isinstance(i, slice):
      return self._select(range(len(self))[i], self.shard_index, self.shard_count)
    part, k = self._find(i)
    return part.get(k)

  def __getitems__(self, indices: Sequence[int]) -> list[str]:
    """Texts at `indices` in that order; reads TFDS records in one batch per dataset."""
    located = [self._find(i) for i in indices]
    out: list[str | None] = [None] * len(located)
    groups: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for pos, (part, k) in enumerate(located):
      groups[id(part)].append((pos, k))
    parts = {id(p): p for p in self._parts}
    for pid, members in groups.items():
      texts = parts[pid].get_many([k for _, k in members])
      for (pos, _), text in zip(members, texts):
        out[pos] = text
    return out  # type: ignore[return-value]

  def __iter__(self) -> Iterator[str]:
    for p in self._parts:
      for k in range(len(p)):
        yield p.get(k)

  def locate(self, i: int) -> str:
    """Where text `i` comes from: `file:line` or `tfds:NAME:SPLIT[record]`."""
    part, k = self._find(i)
    return part.locate(k)

  def shard(self, index: int, count: int) -> TextSource:
    """The texts whose index `i` satisfies `i % count == index` (one process's part).

    The shards of `count` processes partition the source; their lengths differ by at most one.
    Texts of files are copied into the shard, so the full source can be freed; TFDS parts stay
    lazy. A shard of a shard is a strided part of the shard (composing the strides).
    """
    if count < 1 or not 0 <= index < count:
      raise ValueError(f"shard({index}, {count}): need count >= 1 and 0 <= index < count")
    out = self._select(range(index, len(self), count), self.shard_index + index * self.shard_count,
                       self.shard_count * count)
    if len(out) == 0:
      raise DataError(f"shard {index} of {count} is empty: the source has only {len(self)} texts "
                      f"({self.summary()}); use fewer processes or more data")
    return out

  def _select(self, r: range, shard_index: int, shard_count: int) -> TextSource:
    if r.step < 1:
      raise ValueError("a TextSource slice needs a positive step")
    parts = []
    for p, lo in zip(self._parts, self._offsets):
      hi = lo + len(p)
      k0 = min(len(r), max(0, -(-(lo - r.start) // r.step)))
      k1 = min(len(r), max(0, -(-(hi - r.start) // r.step)))
      if k1 > k0:
        first = r[k0] - lo
        parts.append(p.take(range(first, first + (k1 - k0 - 1) * r.step + 1, r.step)))
    return TextSource(parts, origins=self.origins, skipped=self.skipped,
                      first_skipped=self._first_skipped, shard_index=shard_index,
                      shard_count=shard_count, full_length=self.full_length)

  def summary(self) -> str:
    """One line: how many texts from where, and what was skipped."""
    files = [o for o in self.origins if not o.startswith(TFDS_PREFIX)]
    tfds_labels = [o for o in self.origins if o.startswith(TFDS_PREFIX)]
    where = []
    if files:
      names = ", ".join(files[:3]) + (f", +{len(files) - 3} more" if len(files) > 3 else "")
      where.append(f"{len(files)} file{'s' if len(files) != 1 else ''} ({names})")
    where.extend(tfds_labels)
    if self.shard_count > 1:
      head = (f"shard {self.shard_index}/{self.shard_count}: {len(self)} of {self.full_length} "
              "texts")
    else:
      head = f"{len(self)} texts"
    line = f"{head} from {' and '.join(where) or 'nowhere'}"
    bad = {reason: n for reason, n in self.skipped.items() if reason != DUPLICATE}
    if bad:
      total = sum(bad.values())
      detail = ", ".join(f"{reason} {n} (first at {self._first_skipped.get(reason, '?')})"
                         for reason, n in sorted(bad.items()))
      line += f"; skipped {total} bad row{'s' if total != 1 else ''}: {detail}"
    dups = self.skipped.get(DUPLICATE, 0)
    if dups:
      line += (f"; dropped {dups} duplicate text{'s' if dups != 1 else ''} (first at "
               f"{self._first_skipped.get(DUPLICATE, '?')})")
    return line

  def __repr__(self) -> str:
    return f"TextSource({self.summary()})"


# ---------------------------------------------------------------------------------------------
# Reading files.
# ---------------------------------------------------------------------------------------------

class _Reader(files_lib.RowReader):
  """Reads and validates files, collecting skip counts (and, with dedupe, the texts seen)."""

  option = "data.on_error"

  def __init__(self, fields: tuple[str, ...], on_error: str, min_chars: int,
               dedupe: bool = False):
    super().__init__(on_error)
    self.fields, self.min_chars = fields, min_chars
    self.what = {name: f"field {name!r}" for name in fields}
    self.seen: set[str] | None = set() if dedupe else None
    self.rows = 0  # JSON rows read (objects), for the warning about fields that never occur.
    self.field_rows: collections.Counter[str] = collections.Counter()

  def _keep(self, text: str, path: str, lineno: int, texts: list[str], lines: list[int]) -> None:
    seen = self.seen
    if seen is not None:
      if text in seen:
        return self.count(DUPLICATE, path, lineno)
      seen.add(text)
    texts.append(text)
    lines.append(lineno)

  def _add_row(self, row: Any, path: str, lineno: int, suspect: bool, texts: list[str],
               lines: list[int]) -> None:
    """Appends the valid texts of a decoded JSON row (reporting bad rows and texts)."""
    if not isinstance(row, dict):
      return self.bad(path, lineno, _BadRow(
          "not_object", f"a JSON {_json_type(row)} where an object like "
          f"{{\"{self.fields[0]}\": \"...\"}} was expected"))
    self.rows += 1
    present = units = 0
    for name in self.fields:
      if name not in row:
        continue
      present += 1
      value = row[name]
      if isinstance(value, str):
        units += 1
        try:
          text = _check_text(value, self.min_chars, self.what[name], suspect)
        except _BadRow as e:
          self.bad(path, lineno, e)
        else:
          self._keep(text, path, lineno, texts, lines)
      elif isinstance(value, list):
        units += len(value)
        for j, item in enumerate(value):
          if not isinstance(item, str):
            self.bad(path, lineno, _BadRow("not_string", f"field {name!r}[{j}] is a JSON "
                                            f"{_json_type(item)}, not a string"))
            continue
          try:
            text = _check_text(item, self.min_chars, self.what[name], suspect, item=j)
          except _BadRow as e:
            self.bad(path, lineno, e)
          else:
            self._keep(text, path, lineno, texts, lines)
      else:
        units += 1
        self.bad(path, lineno, _BadRow("not_string", f"field {name!r} is a JSON "
                                        f"{_json_type(value)}, not a string or a list of strings"))
    if len(self.fields) > 1:
      self.field_rows.update(name for name in self.fields if name in row)
    if not present:
      keys = ", ".join(repr(k) for k in list(row)[:8]) + (", ..." if len(row) > 8 else "")
      has = f"the row has keys {keys}" if keys else "the row is an empty object"
      if len(self.fields) == 1:
        problem = (f"no field {self.fields[0]!r} ({has}); set data.field to the key holding the "
                   "text")
      else:
        problem = (f"none of the fields {_names(self.fields)} ({has}); set data.field to the keys "
                   "holding the texts")
      self.bad(path, lineno, _BadRow("missing_field", problem))
    elif not units:
      empty = [name for name in self.fields if name in row]
      self.bad(path, lineno, _BadRow("empty_text", (
          f"field {empty[0]!r} is an empty list" if len(empty) == 1 else
          f"fields {_names(empty, 'and')} are empty lists") + ": the row holds no text"))

  def warn_unused_fields(self) -> None:
    """Logs the named fields that no JSON row holds (a typo in data.field?)."""
    if len(self.fields) > 1 and self.rows:
      unused = [name for name in self.fields if not self.field_rows[name]]
      if unused:
        log.warning("data: no row of the JSON files holds field%s %s (of data.field=%r); check "
                    "the names", "s" if len(unused) > 1 else "", _names(unused, "nor"),
                    ",".join(self.fields))

  def read(self, path: str) -> _MemoryPart:
    base = path[:-3] if path.endswith(".gz") else path
    try:
      with files_lib.open_data(path) as f:
        if base.endswith(".txt"):
          return self._read_txt(path, f)
        head = files_lib.read_head(f)
        f.seek(0)
        if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
          try:
            data = f.read()
          except files_lib.DAMAGED as e:
            # Not skippable: the items before the damage sit in an array that never closes.
            raise DataError(f"{files_lib.damaged(path, None, e)}; a JSON array cannot be read in "
                            "part, whatever data.on_error says") from None
          return self._read_json_array(path, data)
        return self._read_jsonl(path, f)
    except OSError as e:
      raise DataError(f"cannot read {path}: {e}") from None

  def _lines(self, path: str, f) -> Iterator[tuple[int, str, bool]]:
    """(line number, decoded line, may hold surrogates) for the non-blank lines.

    Bytes that are not UTF-8 survive decoding as surrogates (errors="surrogateescape") so that
    they are reported (or skipped) per row, with the row's line number. A damaged .gz stream
    ends the lines (or raises) through `damaged`.
    """
    for lineno, raw in self.lines(path, f):
      try:
        yield lineno, raw.decode("utf-8"), b"\\u" in raw
      except UnicodeDecodeError:
        yield lineno, raw.decode("utf-8", errors="surrogateescape"), True

  def _read_txt(self, path: str, f) -> _MemoryPart:
    texts, lines = [], []
    for lineno, line, suspect in self._lines(path, f):
      try:
        text = _check_text(line, self.min_chars, "line", suspect)
      except _BadRow as e:
        self.bad(path, lineno, e)
      else:
        self._keep(text, path, lineno, texts, lines)
    return _MemoryPart(path, texts, np.asarray(lines, np.int64))

  def _read_jsonl(self, path: str, f) -> _MemoryPart:
    texts, lines = [], []
    loads, add_row = json.loads, self._add_row
    for lineno, line, suspect in self._lines(path, f):
      try:
        row = loads(line)
      except json.JSONDecodeError as e:
        self.bad(path, lineno, _BadRow(
            "invalid_json", f"invalid JSON ({e.msg} at column {e.colno}); each line must be one "
            f"object like {{\"{self.fields[0]}\": \"...\"}}"))
        continue
      add_row(row, path, lineno, suspect, texts, lines)
    return _MemoryPart(path, texts, np.asarray(lines, np.int64))

  def _read_json_array(self, path: str, data: bytes) -> _MemoryPart:
    """A file holding one JSON array of objects; line numbers are those where items start."""
    text = data.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
      text = text[1:]
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\r\n]*")
    texts, lines = [], []
    pos = ws.match(text, 0).end() + 1  # Past the "[".
    line, line_pos = 1, 0

    def line_at(p: int) -> int:
      nonlocal line, line_pos
      line += text.count("\n", line_pos, p)
      line_pos = p
      return line

    def fail(p: int, msg: str) -> DataError:
      return DataError(f"{path}:{line_at(p)}: invalid JSON array ({msg}); a broken array cannot be "
                       "skipped row by row: fix the file or convert it to JSONL (one object per "
                       "line)")

    pos = ws.match(text, pos).end()
    if text.startswith("]", pos):
      pos += 1
    else:
      while True:
        pos = ws.match(text, pos).end()
        try:
          row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
          raise fail(e.pos, e.msg) from None
        self._add_row(row, path, line_at(pos), True, texts, lines)
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
          pos += 1
        elif text.startswith("]", pos):
          pos += 1
          break
        else:
          raise fail(pos, "expected ',' or ']' after an item")
    if text[pos:].strip():
      raise fail(pos, "extra data after the array")
    return _MemoryPart(path, texts, np.asarray(lines, np.int64))


def _resolve_files(spec: str) -> list[str]:
  """The data files a (non-TFDS) spec names, in order; raises DataError when there are none."""
  return files_lib.resolve_files(
      spec, FILE_SUFFIXES, DataError,
      name_hint="*.jsonl (or *.json) for JSON rows or *.txt for one text per line",
      other_specs="tfds:NAME[/CONFIG][:SPLIT][@DATA_DIR]")


# ---------------------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------------------

def parse_tfds_spec(spec: str) -> tuple[str, str, str | None]:
  """`tfds:NAME[/CONFIG][:VERSION][:SPLIT][@DATA_DIR]` -> (name[:version], split, data_dir).

  NAME may carry a config (`wiki40b/en`); a VERSION (`1.0.0`) right after it is kept in the name
  as TFDS expects; SPLIT defaults to "train" and may be a TFDS slice such as `train[:10%]`.
  """
  body = spec[len(TFDS_PREFIX):] if spec.startswith(TFDS_PREFIX) else spec
  name_split, _, data_dir = body.partition("@")
  name, _, split = name_split.partition(":")
  head, _, rest = split.partition(":")
  if _VERSION.match(head):
    name, split = f"{name}:{head}", rest
  name, split = name.strip(), split.strip() or "train"
  if not name:
    raise DataError(f"data spec {spec!r}: no dataset name; write tfds:NAME[/CONFIG][:SPLIT]"
                    "[@DATA_DIR]")
  return name, split, (os.path.expanduser(data_dir.strip()) if data_dir.strip() else None)


def _texts_per_value(feature: Any) -> int | None:
  """Texts per record a TFDS feature holds: 1 for shape (), n for shape (n,), None if it varies."""
  try:
    shape = tuple(feature.shape)
  except Exception:  # pylint: disable=broad-except
    return None
  if not shape:
    return 1
  if len(shape) == 1 and isinstance(shape[0], (int, np.integer)) and shape[0] >= 0:
    return int(shape[0])
  return None


def _open_tfds(spec: str, fields: tuple[str, ...], min_chars: int) -> _TfdsPart:
  name, split, data_dir = parse_tfds_spec(spec)
  label = f"{TFDS_PREFIX}{name}:{split}" + (f"@{data_dir}" if data_dir else "")
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(f"data spec {spec!r} needs tensorflow-datasets (pip install "
                    "tensorflow-datasets array-record)") from None
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                          builder_kwargs={"file_format": "array_record"})
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise DataError(f"data spec {spec!r}: cannot open {name} split {split!r} in "
                    f"{data_dir or 'the default TFDS data dir'} as array_record: {first} "
                    f"({type(e).__name__}). The dataset must be prepared already (download=False) "
                    "with file_format='array_record'.") from None
  features = getattr(getattr(ds, "dataset_info", None), "features", None)
  keys = None
  try:
    keys = list(features.keys()) if features is not None else None
  except Exception:  # pylint: disable=broad-except
    keys = None
  per_record: int | None = None
  if keys is not None:
    present = tuple(f for f in fields if f in keys)
    if not present:
      raise DataError(f"{label}: no feature {_names(fields)} (the dataset has {sorted(keys)}); "
                      "set data.field to the feature holding the text")
    if len(present) < len(fields):
      log.warning("%s: the dataset has no feature %s (of data.field=%r); reading %s", label,
                  _names([f for f in fields if f not in keys], "nor"), ",".join(fields),
                  _names(present, "and"))
    fields = present
    counts = [_texts_per_value(features[f]) for f in fields]
    if all(c is not None for c in counts):
      per_record = sum(counts)  # type: ignore[arg-type]
  if per_record is not None:
    if per_record == 0:
      raise DataError(f"{label}: features {_names(fields, 'and')} are empty sequences (length 0); "
                      "set data.field to the features holding the texts")
    return _TfdsPart(label, ds, fields, min_chars, range(len(ds) * per_record), per_record)
  return _TfdsPart(label, ds, fields, min_chars, *_count_tfds_texts(label, ds, fields))


def _count_tfds_texts(label: str, ds: Any, fields: tuple[str, ...],
                      chunk: int = 1024) -> tuple[range, int, np.ndarray]:
  """One pass over a dataset whose records hold a varying number of texts: (ids, 1, starts)."""
  n = len(ds)
  log.info("%s: counting the texts of %d records (variable-length %s)", label, n, _names(fields))
  counts = np.zeros(n, np.int64)
  getitems = getattr(ds, "__getitems__", None)
  for lo in range(0, n, chunk):
    keys = list(range(lo, min(n, lo + chunk)))
    records = getitems(keys) if getitems is not None else [ds[k] for k in keys]
    for k, record in zip(keys, records):
      c = _record_count(record, fields)
      if not c:
        problem = (f"no feature {_names(fields)} (the record has {sorted(record)})" if c is None
                   else f"features {_names(fields, 'and')} hold no text (empty sequences)")
        raise DataError(f"{label} record {k}: {problem}. {_TFDS_HINT}.")
      counts[k] = c
  starts = np.zeros(n + 1, np.int64)
  np.cumsum(counts, out=starts[1:])
  return range(int(starts[-1])), 1, starts


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def open_text_source(spec: Spec | Sequence[Spec], *, field: str | Sequence[str] = "text",
                     on_error: str = "raise", min_chars: int = 1,
                     dedupe: bool = False) -> TextSource:
  """Opens and validates one or several text specs as a single `TextSource`.

  Args:
    spec: a spec or a list of specs, concatenated in order (see the module docstring): a .jsonl /
      .json / .txt file (optionally .gz), a folder, a glob pattern, or
      `tfds:NAME[/CONFIG][:VERSION][:SPLIT][@DATA_DIR]`.
    field: the JSON key / TFDS feature holding the text, or several, comma-separated ("pos,neg")
      or as a list; each value may be a string or a list of strings, every string is one text
      (row order, then field order, then list order). A row needs at least one of the fields.
      Unused for .txt.
    on_error: "raise" (a bad row raises `DataError` naming file:line) or "skip" (bad rows are
      skipped and counted in `src.skipped`). TFDS records always raise, when read.
    min_chars: texts with fewer non-surrounding-whitespace characters are bad rows ("too_short").
      Empty or whitespace-only texts are always bad ("empty_text").
    dedupe: keep only the first of identical texts (over all files of the source, after
      validation); the drops are counted in `src.skipped["duplicate"]`. Not for TFDS specs.

  Returns:
    A `TextSource` holding at least one text.

  Raises:
    DataError: a spec names nothing, a file holds a bad row (on_error="raise"), no text is left,
      or dedupe is asked of a TFDS spec.
    ValueError: a bad option (on_error, min_chars, field).
  """
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r}; use 'raise' or 'skip'")
  if min_chars < 1:
    raise ValueError(f"min_chars={min_chars}; it must be at least 1")
  fields = _parse_fields(field)
  specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
  specs = [os.fspath(s).strip() for s in specs]
  specs = [s for s in specs if s]
  if not specs:
    raise DataError("no data spec given: name JSONL/txt files, folders, globs or "
                    "tfds:NAME[:SPLIT] datasets")
  if dedupe:
    tfds_specs = [s for s in specs if s.startswith(TFDS_PREFIX)]
    if tfds_specs:
      raise DataError(f"dedupe=True cannot apply to {tfds_specs[0]!r}: TFDS records are read "
                      "lazily, deduplicating them would need every text in memory; deduplicate "
                      "the dataset when building it, or set dedupe=False")
  from bge_jax.data import prepared  # pylint: disable=import-outside-toplevel
  ready = [s for s in specs if prepared.is_prepared(s)]
  if dedupe and ready and len(specs) > 1:
    raise DataError(f"dedupe=True cannot apply across the prepared dataset {ready[0]} and other "
                    "specs; prepare all the inputs together with --dedupe")
  reader = _Reader(fields, on_error, min_chars, dedupe)
  parts: list[_Part] = []
  origins: list[str] = []
  seen: set[str] = set()
  for s in specs:
    if s in ready:
      part = prepared.open_prepared_texts(s, fields=fields, min_chars=min_chars,
                                          on_error=on_error, dedupe=dedupe)
      parts.append(part)
      origins.extend(part.origins)
      reader.skipped.update(part.manifest["skipped"])
      for reason, where in part.manifest["first_skipped"].items():
        reader.first_skipped.setdefault(reason, where)
      continue
    if s.startswith(TFDS_PREFIX):
      part = _open_tfds(s, fields, min_chars)
      parts.append(part)
      origins.append(part.label)
      continue
    for path in _resolve_files(s):
      real = os.path.realpath(path)
      if real in seen:
        log.warning("%s is read more than once (named by several data specs)", path)
      seen.add(real)
      parts.append(reader.read(path))
      origins.append(path)
  reader.warn_unused_fields()
  source = TextSource([p for p in parts if len(p)], origins=origins, skipped=dict(reader.skipped),
                      first_skipped=reader.first_skipped)
  if len(source) == 0:
    raise DataError(f"data spec {', '.join(specs)}: no usable text in {len(origins)} "
                    f"source{'s' if len(origins) != 1 else ''}"
                    + (f" ({source.summary()})" if source.skipped else ""))
  if any(reason != DUPLICATE for reason in source.skipped):
    log.warning("data: %s", source.summary())
  elif source.skipped:
    log.info("data: %s", source.summary())
  return source
