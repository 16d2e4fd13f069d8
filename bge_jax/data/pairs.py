"""Contrastive fine-tuning data (stages 2 and 3): query/passage rows and their batches.

This module owns reading and validating contrastive data (`open_contrastive_data` -> `PairSource`)
and turning one or several such datasets into fixed-shape, process-local batches for a step
(`ContrastiveBatcher`), the host-side half of `contrastive.loss`.

Inputs (`open_contrastive_data(spec, kind=...)`; a spec is a file, a folder (every *.jsonl, *.json
and *.tsv below it, optionally .gz, recursively, sorted; hidden names ignored) or a glob (matches
sorted), or a list of those, concatenated):

  kind="fe"     (alias "flag") FlagEmbedding fine-tuning JSONL, one object per line:
                  {"query": str, "pos": [str, ...], "neg": [str, ...], "pos_scores": [float, ...],
                   "neg_scores": [float, ...], "prompt": str, "type": str}
                `pos` must be non-empty; `neg` may be empty or missing (negatives are then drawn
                from other rows' positives, see `ContrastiveBatcher`); the score lists are optional
                and must match `pos`/`neg` in length. A bare string for `pos`/`neg` counts as a list
                of one. A null optional field counts as missing.
  kind="pairs"  Pair data (stage 2): JSONL whose rows hold one of the field pairs
                `DEFAULT_PAIR_FIELDS` (tried in order: query/pos, title/passage, text/text_pos,
                sentence1/sentence2; the passage may be a string or a list of strings), or a TSV
                file of two columns, query<TAB>passage. A TSV header row is recognised when its
                cells hold one of the pairs of `TSV_HEADERS` (e.g. "query\tpassage",
                "sentence1\tsentence2"); the header may have more columns, the named two are read
                (then every row must have the header's column count). Each pair becomes a row with
                pos=[passage], neg=[].
  kind="auto"   per file: *.tsv is pairs; a JSONL file is "fe" when its first JSON object has a
                "pos" key, else "pairs".

  a prepared folder (written by launch/prepare_data.py; `bge_jax.data.prepared`): read lazily,
                its rows validated when prepared; opens in time O(shards), each process reads
                only the rows of its own batches. A spec of its own (one dataset).

Every row of a JSONL/TSV spec is validated up front and kept in memory (every process holds every
row, so that all processes agree on each step's global selection): fine up to about a million
rows; prepare larger data (`launch/prepare_data.py`). A bad row (invalid JSON or UTF-8, not an
object, a missing or empty query, a missing or empty `pos`, a non-string or empty text, scores
that are not numbers or do not match `pos`/`neg` in length, a non-string prompt/type, a TSV line
with the wrong number of columns, a pair row without any known field pair) raises a `DataError` naming
`file:line`, the problem and the fix, or with `on_error="skip"` is skipped whole and counted per
reason in `source.skipped`. Blank lines are ignored. A truncated or corrupt .gz file raises a
`DataError` naming the file and the line reached, or with `on_error="skip"` keeps the rows read
before the damage and counts the file as `damaged_file`.

FlagEmbedding's file-name convention is kept: a dataset whose file stem or folder name ends with
`no_in_batch_neg` does not use in-batch negatives (`PairSource.no_in_batch_neg`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import string
from collections.abc import Sequence
from typing import Any, Iterator, Mapping, NamedTuple, Union

import numpy as np

from bge_jax.data import files as files_lib
from bge_jax.data import order as order_lib
from bge_jax.data import packing
from bge_jax.data.files import BadRow as _BadRow
from bge_jax.data.sources import DataError
from bge_jax.data.tokenizer import private_copy

Spec = Union[str, os.PathLike]
log = logging.getLogger(__name__)

INSTRUCTIONS = {
    "zh": "为这个句子生成表示以用于检索相关文章：",
    "en": "Represent this sentence for searching relevant passages: ",
}
KINDS = ("auto", "fe", "flag", "pairs")  # "flag" is an alias of "fe" (FlagEmbedding).
ON_ERROR = ("raise", "skip")
FILE_SUFFIXES = (".jsonl", ".json", ".tsv")
DEFAULT_PAIR_FIELDS: tuple[tuple[str, str], ...] = (
    ("query", "pos"), ("title", "passage"), ("text", "text_pos"), ("sentence1", "sentence2"))
TSV_HEADERS: tuple[tuple[str, str], ...] = (("query", "passage"),) + DEFAULT_PAIR_FIELDS
# Row types whose batches score each query against its own group only (no in-batch negatives):
# other rows of a classification/clustering batch often share the label, so their passages would
# be false negatives. FlagEmbedding's own type names are included.
NO_IN_BATCH_TYPES = ("classification", "clustering", "symmetric_class", "symmetric_clustering")
# Row types whose passages get the query's instruction too (FlagEmbedding: symmetric tasks).
SYMMETRIC_TYPES = ("symmetric_sts", "symmetric_clustering")
NO_IN_BATCH_SUFFIX = "no_in_batch_neg"

_SURROGATE = re.compile("[\ud800-\udfff]")
# Stream tags of the seeded generators (so the schedule, row order and groups are independent).
_TAG_MIX, _TAG_ROWS, _TAG_GROUP = 0x6D6978, 0x726F77, 0x677270


class PairRow(NamedTuple):
  """One validated contrastive example."""

  query: str
  pos: tuple[str, ...]  # Non-empty.
  neg: tuple[str, ...]  # May be empty.
  pos_scores: tuple[float, ...] | None  # Aligned with `pos` when present.
  neg_scores: tuple[float, ...] | None  # Aligned with `neg` when present.
  prompt: str | None  # Per-row query instruction.
  type: str | None


# ---------------------------------------------------------------------------------------------
# PairSource
# ---------------------------------------------------------------------------------------------

class PairSource(Sequence):
  """Validated contrastive rows in memory: `len(src)`, `src[i] -> PairRow`, `src.locate(i)`.

  Attributes:
    origins: the files read, in order.
    kinds: the kind each file was read as ("fe" or "pairs"), aligned with `origins`.
    skipped: reason -> number of rows skipped while opening (with `on_error="skip"`); reasons are
      invalid_json, invalid_utf8, not_object, missing_field, not_string, empty_text, empty_pos,
      bad_score, score_mismatch, wrong_columns, damaged_file (a truncated or corrupt .gz file,
      counted once, the rows before the damage kept).
    no_in_batch_neg: the spec is named `*no_in_batch_neg` (FlagEmbedding's convention).
  """

  def __init__(self, rows: list[PairRow], files: np.ndarray, lines: np.ndarray, *,
               origins: Sequence[str], kinds: Sequence[str],
               skipped: Mapping[str, int] | None = None,
               first_skipped: Mapping[str, str] | None = None, no_in_batch_neg: bool = False):
    self.rows, self._files, self._lines = rows, files, lines
    self.origins, self.kinds = tuple(origins), tuple(kinds)
    self.skipped = dict(skipped or {})
    self._first_skipped = dict(first_skipped or {})
    self.no_in_batch_neg = no_in_batch_neg

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i):
    return self.rows[i]

  def __iter__(self) -> Iterator[PairRow]:
    return iter(self.rows)

  def locate(self, i: int) -> str:
    """Where row `i` comes from: `file:line`."""
    i = int(i)
    return f"{self.origins[int(self._files[i])]}:{int(self._lines[i])}"

  def __getitems__(self, indices: Sequence[int]) -> list[PairRow]:
    return [self.rows[int(i)] for i in indices]

  def first_row_without(self, what: str) -> int | None:
    """Index of the first row lacking `what`: "neg", "pos_scores" or "neg_scores" (None: none)."""
    for i, r in enumerate(self.rows):
      if not getattr(r, what):
        return i
    return None

  def positives(self) -> list[str]:
    """Every row's positives in row order: the pool negatives are drawn from for rows without."""
    return [p for r in self.rows for p in r.pos]

  def covering_row(self) -> int | None:
    """The first row without negatives whose distinct positives are all the dataset's distinct
    positives (no other row has a positive to draw its negatives from), or None."""
    distinct = len(set(self.positives()))
    return next((i for i, r in enumerate(self.rows) if not r.neg and len(set(r.pos)) >= distinct),
                None)

  def type_mask(self, types: Sequence[str]) -> np.ndarray:
    """bool [rows]: row i's `type` is in `types`."""
    types = frozenset(types)
    return np.array([r.type in types for r in self.rows], bool)

  def subset(self, indices: Sequence[int]) -> PairSource:
    """The rows at `indices` as a PairSource of their own (`bge_jax.data.holdout`: the training
    rows without the held-out ones); `locate` still names each row's file:line."""
    idx = np.asarray(indices, np.int64)
    return PairSource([self.rows[int(i)] for i in idx], self._files[idx], self._lines[idx],
                      origins=self.origins, kinds=self.kinds, skipped=self.skipped,
                      first_skipped=self._first_skipped, no_in_batch_neg=self.no_in_batch_neg)

  @classmethod
  def concat(cls, sources: Sequence[PairSource], *, no_in_batch_neg: bool = False) -> PairSource:
    """The rows of `sources` one after the other, as one dataset (`bge_jax.data.small_datasets`
    merges small ones); `locate` still names each row's file:line, skips are summed per reason
    (the first location of each kept from the first source that has one)."""
    if not sources:
      raise ValueError("PairSource.concat needs at least one source")
    rows, files, lines, origins, kinds = [], [], [], [], []
    skipped: dict[str, int] = {}
    first: dict[str, str] = {}
    for src in sources:
      rows.extend(src.rows)
      files.append(src._files + len(origins))
      lines.append(src._lines)
      origins.extend(src.origins)
      kinds.extend(src.kinds)
      for reason, k in src.skipped.items():
        skipped[reason] = skipped.get(reason, 0) + k
      for reason, where in src._first_skipped.items():
        first.setdefault(reason, where)
    return cls(rows, np.concatenate(files).astype(np.int32), np.concatenate(lines),
               origins=origins, kinds=kinds, skipped=skipped, first_skipped=first,
               no_in_batch_neg=no_in_batch_neg)

  def summary(self) -> str:
    """One line: how many rows from where, and what was skipped."""
    names = ", ".join(self.origins[:3]) + (f", +{len(self.origins) - 3} more"
                                           if len(self.origins) > 3 else "")
    kinds = "/".join(sorted(set(self.kinds)))
    n = len(self.origins)
    line = f"{len(self)} rows ({kinds}) from {n} file{'s' if n != 1 else ''} ({names})"
    if self.skipped:
      total = sum(self.skipped.values())
      detail = ", ".join(f"{reason} {k} (first at {self._first_skipped.get(reason, '?')})"
                         for reason, k in sorted(self.skipped.items()))
      line += f"; skipped {total} bad row{'s' if total != 1 else ''}: {detail}"
    return line

  def __repr__(self) -> str:
    return f"PairSource({self.summary()})"


# ---------------------------------------------------------------------------------------------
# Reading files.
# ---------------------------------------------------------------------------------------------

def _json_type(value: Any) -> str:
  if value is None:
    return "null"
  return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
          float: "number"}.get(type(value), type(value).__name__)


def _keys(row: dict) -> str:
  keys = ", ".join(repr(k) for k in list(row)[:8]) + (", ..." if len(row) > 8 else "")
  return f"the row has keys {keys}" if keys else "the row is an empty object"


def _text(value: Any, what: str, check_surrogates: bool) -> str:
  if not isinstance(value, str):
    raise _BadRow("not_string", f"{what} is a JSON {_json_type(value)}, not a string")
  if not value or value.isspace():
    raise _BadRow("empty_text", f"{what} is empty or whitespace-only")
  if check_surrogates and _SURROGATE.search(value):
    raise _BadRow("invalid_utf8", f"{what} holds a lone surrogate (from a JSON \\u escape), which "
                  "is not valid Unicode")
  return value


def _texts(row: dict, name: str, required: bool, check_surrogates: bool) -> tuple[str, ...]:
  """A string or a list of strings at `row[name]` as a tuple (empty when absent and optional)."""
  value = row.get(name)
  if value is None:
    if required:
      raise _BadRow("missing_field", f"no field {name!r} ({_keys(row)}); each row needs "
                    f"{{\"query\": \"...\", \"pos\": [\"...\"]}}")
    return ()
  if isinstance(value, str):
    return (_text(value, f"field {name!r}", check_surrogates),)
  if not isinstance(value, list):
    raise _BadRow("not_string", f"field {name!r} is a JSON {_json_type(value)}, not a list of "
                  "strings")
  if required and not value:
    raise _BadRow("empty_pos", f"field {name!r} is an empty list: a row needs at least one "
                  "positive passage")
  if not check_surrogates and all(type(v) is str and v and not v.isspace() for v in value):
    return tuple(value)  # The common case, checked at once.
  return tuple(_text(v, f"field {name!r}[{j}]", check_surrogates) for j, v in enumerate(value))


def _scores(row: dict, name: str, texts: tuple[str, ...], of: str) -> tuple[float, ...] | None:
  value = row.get(name)
  if value is None:
    return None
  if not isinstance(value, list):
    raise _BadRow("bad_score", f"field {name!r} is a JSON {_json_type(value)}, not a list of "
                  "numbers")
  for j, v in enumerate(value):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise _BadRow("bad_score", f"field {name!r}[{j}] is {json.dumps(v)}, not a finite number")
  if len(value) != len(texts):
    raise _BadRow("score_mismatch", f"field {name!r} holds {len(value)} scores but {of!r} holds "
                  f"{len(texts)} passages; give one score per passage")
  return tuple(float(v) for v in value)


def _optional_str(row: dict, name: str) -> str | None:
  value = row.get(name)
  if value is None or isinstance(value, str):
    return value
  raise _BadRow("not_string", f"field {name!r} is a JSON {_json_type(value)}, not a string")


def _fe_row(row: Any, check_surrogates: bool) -> PairRow:
  if not isinstance(row, dict):
    raise _BadRow("not_object", f"a JSON {_json_type(row)} where an object like "
                  "{\"query\": \"...\", \"pos\": [\"...\"], \"neg\": [\"...\"]} was expected")
  if row.get("query") is None:
    raise _BadRow("missing_field", f"no field 'query' ({_keys(row)})")
  query = _text(row["query"], "field 'query'", check_surrogates)
  pos = _texts(row, "pos", True, check_surrogates)
  neg = _texts(row, "neg", False, check_surrogates)
  return PairRow(query, pos, neg, _scores(row, "pos_scores", pos, "pos"),
                 _scores(row, "neg_scores", neg, "neg"), _optional_str(row, "prompt"),
                 _optional_str(row, "type"))


def _pair_row(row: Any, pair_fields: Sequence[tuple[str, str]],
              check_surrogates: bool) -> PairRow:
  if not isinstance(row, dict):
    a, b = pair_fields[0]
    raise _BadRow("not_object", f"a JSON {_json_type(row)} where an object like "
                  f"{{\"{a}\": \"...\", \"{b}\": \"...\"}} was expected")
  for a, b in pair_fields:
    if row.get(a) is not None and row.get(b) is not None:
      query = _text(row[a], f"field {a!r}", check_surrogates)
      return PairRow(query, _texts(row, b, True, check_surrogates), (), None, None,
                     _optional_str(row, "prompt"), _optional_str(row, "type"))
  pairs = ", ".join(f"{a}/{b}" for a, b in pair_fields)
  raise _BadRow("missing_field", f"none of the field pairs {pairs} ({_keys(row)}); set "
                "pair_fields to the keys holding the query and the passage")


class _Reader(files_lib.RowReader):
  """Reads and validates files of one spec, collecting skip counts (`files.RowReader`)."""

  def __init__(self, kind: str, on_error: str, pair_fields: Sequence[tuple[str, str]]):
    super().__init__(on_error)
    self.kind, self.pair_fields = kind, tuple(pair_fields)
    self.rows: list[PairRow] = []
    self.files: list[int] = []
    self.linenos: list[int] = []

  def _keep(self, row: PairRow, file_index: int, lineno: int) -> None:
    self.rows.append(row)
    self.files.append(file_index)
    self.linenos.append(lineno)

  @staticmethod
  def _decode(raw: bytes) -> str:
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _BadRow("invalid_utf8", f"byte 0x{raw[e.start]:02x} (byte {e.start} of the line) is "
                    "not UTF-8; re-encode the file as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)"
                    ) from None

  def read(self, path: str, file_index: int) -> str:
    """Reads one file; returns the kind it was read as."""
    base = path[:-3] if path.endswith(".gz") else path
    try:
      with files_lib.open_data(path) as f:
        if base.endswith(".tsv"):
          if self.kind == "fe":
            raise DataError(f"{path}: kind='fe' reads FlagEmbedding JSONL; a TSV file holds "
                            "query<TAB>passage pairs: use kind='pairs' or 'auto'")
          self._read_tsv(path, file_index, f)
          return "pairs"
        return self._read_jsonl(path, file_index, f)
    except OSError as e:
      raise DataError(f"cannot read {path}: {e}") from None

  def _read_jsonl(self, path: str, file_index: int, f) -> str:
    kind = None if self.kind == "auto" else self.kind
    for lineno, raw in self.lines(path, f):
      try:
        line = self._decode(raw)
        escapes = b"\\u" in raw
        if lineno == 1 and line.lstrip().startswith("["):
          raise DataError(f"{path}:1: the file looks like one JSON array; write one JSON object "
                          "per line (JSONL)")
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise _BadRow("invalid_json", f"invalid JSON ({e.msg} at column {e.colno}); each line "
                        "must be one object like {\"query\": \"...\", \"pos\": [\"...\"]}"
                        ) from None
        if kind is None and isinstance(row, dict):
          kind = "fe" if "pos" in row else "pairs"
        if kind == "pairs":
          self._keep(_pair_row(row, self.pair_fields, escapes), file_index, lineno)
        else:
          self._keep(_fe_row(row, escapes), file_index, lineno)
      except _BadRow as e:
        self.bad(path, lineno, e)
    return kind or "fe"

  def _read_tsv(self, path: str, file_index: int, f) -> None:
    columns: tuple[int, int] | None = None
    width = 2
    for lineno, raw in self.lines(path, f):
      try:
        cells = self._decode(raw).split("\t")
        if columns is None:
          columns = (0, 1)
          names = [c.strip().lower() for c in cells]
          header = next(((names.index(a), names.index(b)) for a, b in TSV_HEADERS
                         if a in names and b in names), None)
          if header is not None:
            columns, width = header, len(cells)
            continue
        if len(cells) != width:
          what = ("2 (query<TAB>passage)" if width == 2 and columns == (0, 1)
                  else f"{width} (as the header)")
          raise _BadRow("wrong_columns", f"the line has {len(cells)} tab-separated columns, "
                        f"expected {what}")
        query = _text(cells[columns[0]], f"column {columns[0] + 1} (query)", False)
        passage = _text(cells[columns[1]], f"column {columns[1] + 1} (passage)", False)
        self._keep(PairRow(query, (passage,), (), None, None, None, None), file_index, lineno)
      except _BadRow as e:
        self.bad(path, lineno, e)


def _resolve_files(spec: str) -> list[str]:
  return files_lib.resolve_files(
      spec, FILE_SUFFIXES, DataError,
      name_hint="*.jsonl (or *.json) for JSON rows or *.tsv for query<TAB>passage pairs")


def _stem(spec: str) -> str:
  name = os.path.basename(os.path.expanduser(spec).rstrip("/" + os.sep))
  if name.endswith(".gz"):
    name = name[:-3]
  for suffix in FILE_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def open_contrastive_data(spec: Spec | Sequence[Spec], *, kind: str = "auto",
                          on_error: str = "raise",
                          pair_fields: Sequence[tuple[str, str]] = DEFAULT_PAIR_FIELDS
                          ) -> PairSource:
  """Opens and validates contrastive data (one dataset) as a `PairSource`.

  Args:
    spec: a .jsonl / .json / .tsv file (optionally .gz), a folder (recursively, sorted), a glob
      pattern (matches sorted), or a list of those, concatenated in order.
    kind: "fe" or "flag" (FlagEmbedding query/pos/neg JSONL), "pairs" (two-field JSONL or two-column TSV,
      each pair a row with pos=[passage], neg=[]) or "auto" (decided per file; module docstring).
    on_error: "raise" (a bad row raises `DataError` naming file:line) or "skip" (bad rows are
      skipped and counted per reason in `src.skipped`).
    pair_fields: the (query, passage) JSON key pairs of pair data, tried in order per row.

  Returns:
    A `PairSource` holding at least one row.

  Raises:
    DataError: a spec names nothing, a file holds a bad row (on_error="raise") or no row is left.
    ValueError: a bad option.
  """
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}; use one of {KINDS}")
  kind = "fe" if kind == "flag" else kind
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r}; use 'raise' or 'skip'")
  pair_fields = tuple(tuple(p) for p in pair_fields)
  if not pair_fields or not all(len(p) == 2 and all(isinstance(n, str) and n for n in p)
                                for p in pair_fields):
    raise ValueError(f"pair_fields={pair_fields!r}; give (query_key, passage_key) pairs")
  specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
  specs = [s for s in (os.fspath(s).strip() for s in specs) if s]
  if not specs:
    raise DataError("no data spec given: name JSONL/TSV files, folders or globs")
  from bge_jax.data import prepared  # pylint: disable=import-outside-toplevel
  ready = [s for s in specs if prepared.is_prepared(s)]
  if ready:
    if len(specs) > 1:
      raise DataError(f"{ready[0]} is a prepared dataset: give it as a spec of its own (one "
                      f"dataset), or prepare all of {', '.join(specs)} together")
    source = prepared.open_prepared_pairs(
        ready[0], kind=kind, on_error=on_error,
        pair_fields=None if pair_fields == DEFAULT_PAIR_FIELDS else pair_fields)
    source.no_in_batch_neg |= _stem(ready[0]).endswith(NO_IN_BATCH_SUFFIX)
    return source
  reader = _Reader(kind, on_error, pair_fields)
  origins, kinds = [], []
  for s in specs:
    for path in _resolve_files(s):
      kinds.append(reader.read(path, len(origins)))
      origins.append(path)
  source = PairSource(reader.rows, np.asarray(reader.files, np.int32),
                      np.asarray(reader.linenos, np.int64), origins=origins, kinds=kinds,
                      skipped=dict(reader.skipped), first_skipped=reader.first_skipped,
                      no_in_batch_neg=all(_stem(s).endswith(NO_IN_BATCH_SUFFIX) for s in specs))
  if not len(source):
    raise DataError(f"data spec {', '.join(specs)}: no usable row in {len(origins)} file"
                    f"{'s' if len(origins) != 1 else ''} ({source.summary()})")
  return source


# ---------------------------------------------------------------------------------------------
# Dataset mixing options.
# ---------------------------------------------------------------------------------------------

SAMPLINGS = ("proportional", "round_robin")


def _mixing(names: Sequence[str], batch_size: int, batch_sizes: Sequence[int] | None,
            weights: Sequence[float] | None, sampling: str
            ) -> tuple[list[int], list[float], str]:
  """Checks `ContrastiveBatcher`'s mixing options: (per-dataset batch sizes, weights, sampling)."""
  if sampling not in SAMPLINGS:
    raise ValueError(f"sampling={sampling!r}; use one of {SAMPLINGS}")
  n = len(names)
  sizes = [batch_size] * n if batch_sizes is None else [int(b) for b in batch_sizes]
  w = [1.0] * n if weights is None else [float(x) for x in weights]
  for what, values in (("batch_sizes", sizes), ("weights", w)):
    if len(values) != n:
      raise ValueError(f"{what} has {len(values)} entries for {n} datasets ({list(names)}); "
                       "give one per dataset, in order")
  bad = [(name, b) for name, b in zip(names, sizes) if b < 1]
  if bad:
    raise ValueError(f"batch sizes {bad} must be >= 1")
  bad = [(name, x) for name, x in zip(names, w) if not (x > 0 and math.isfinite(x))]
  if bad:
    raise ValueError(f"weights {bad} must be finite and > 0")
  if sampling == "round_robin" and any(x != 1 for x in w):
    raise ValueError("round_robin sampling gives every dataset the same number of batches; "
                     "weights apply to proportional sampling only (leave them at 1)")
  return sizes, w, sampling


def _list(value: Any, cast, key: str) -> list | None:
  """A comma-separated config string (or a sequence) as a list; None when empty."""
  items = ([t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str)
           else list(value or ()))
  if not items:
    return None
  try:
    return [cast(t) for t in items]
  except (TypeError, ValueError):
    raise ValueError(f"config.data.{key}={value!r}: expected comma-separated "
                     f"{cast.__name__} values, one per dataset of data.train") from None


def mixing_options(data: Any, batch_size: int, process_count: int, batch_shards: int,
                   num_datasets: int) -> dict[str, Any]:
  """`ContrastiveBatcher`'s mixing arguments (process-local batch sizes, weights, sampling) from
  the config keys `data.batch_sizes` (global batch per dataset, comma-separated; empty =
  `batch_size` for each), `data.weights` and `data.sampling`.

  Every global batch size must be divisible by `batch_shards` (the devices a batch is split
  over, times grad_accum_steps) and by the processes, as `batch_size` is.
  """
  sizes = _list(data.get("batch_sizes", ""), int, "batch_sizes")
  weights = _list(data.get("weights", ""), float, "weights")
  for key, values in (("batch_sizes", sizes), ("weights", weights)):
    if values is not None and len(values) != num_datasets:
      raise ValueError(f"config.data.{key} has {len(values)} entries for the {num_datasets} "
                       "datasets of config.data.train; give one per dataset, in order")
  if sizes is not None:
    for b in sizes:
      if b < 1 or b % process_count or b % batch_shards:
        raise ValueError(
            f"config.data.batch_sizes: {b} must be >= 1 and divisible by the "
            f"{process_count} processes and by mesh data x fsdp x grad_accum_steps "
            f"({batch_shards}), as config.batch_size is")
    sizes = [b // process_count for b in sizes]
  sampling = data.get("sampling", "proportional")
  if sampling not in SAMPLINGS:
    raise ValueError(f"config.data.sampling={sampling!r}; use one of {SAMPLINGS}")
  return {"batch_sizes": sizes, "weights": weights, "sampling": sampling}


def use_packing(config: Any) -> bool:
  """Whether stages 2-3 pack their batches (`ContrastiveBatcher.enable_packing`).

  config.data.pack True or False as set; unset (None, the default) packs wherever packing gives
  the padded batch's loss and gradients, i.e. unless config.grad_accum_steps > 1 (packed rows do
  not split into micro-batches) or data.batch_sizes gives datasets different batch sizes (the
  packed rows are sized for one). With dropout the packed and padded steps draw different masks
  from the same distribution.
  """
  pack = config.data.get("pack", None)
  if pack is not None:
    return bool(pack)
  return (config.get("grad_accum_steps", 1) == 1
          and global_batch_sizes(config) == [config.batch_size])


def global_batch_sizes(config: Any) -> list[int]:
  """The distinct global batch sizes of a run's train steps, ascending: the values of
  config.data.batch_sizes (dataset mixing, one per dataset), else config.batch_size alone. Each
  is one batch shape, so one compiled train step (the trainer's; `bge_jax.aot` compiles them all).
  """
  sizes = _list(config.data.get("batch_sizes", ""), int, "batch_sizes")
  return sorted(set(sizes or [config.batch_size]))


# ---------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------

class ContrastiveBatcher:
  """Process-local contrastive batches for a step, from one or several datasets.

  Mixing schedule. Each batch comes from ONE dataset (FlagEmbedding's
  `same_dataset_within_batch`). Dataset d has n_d rows, a global batch `Bg_d = b_d *
  process_count` (`batch_sizes[d]`, default `batch_size`: short-text datasets can take bigger
  batches, as FlagEmbedding's per-file `batch_size`) and a weight w_d (`weights[d]`, default 1,
  its passes per epoch). A pass over d is `floor(n_d / Bg_d)` batches; d owns
  `k_d = floor(w_d * floor(n_d / Bg_d))` batch slots per epoch, and `steps_per_epoch` counts the
  slots the sampling uses:
    sampling="proportional" (FlagEmbedding; sentence-transformers' PROPORTIONAL): all
      `sum_d k_d` slots, in an order seeded by (seed, epoch), so datasets are drawn in proportion
      to their batch counts k_d;
    sampling="round_robin" (sentence-transformers' ROUND_ROBIN): datasets in turn, in the given
      order, `min_d k_d` batches each (the smallest dataset bounds the epoch; weights must be 1).
  The j-th batch of d in an epoch is chunk `c = j mod floor(n_d / Bg_d)` of pass
  `j div floor(n_d / Bg_d)`: rows `[c*Bg_d, (c+1)*Bg_d)` of d's row permutation seeded by
  (seed, d, epoch[, pass]). So no row repeats within a batch, nor within an epoch when w_d <= 1
  (w_d > 1 repeats rows across passes only, each row at most ceil(w_d) times), and the rows left
  over each pass (`n_d mod Bg_d`) differ from epoch to epoch. They are dropped, as
  FlagEmbedding's same-dataset sampler drops each dataset's partial last batch; its default
  sampler (one shuffled dataset, the HF Trainer's dataloader_drop_last=False) keeps one smaller
  last batch per epoch instead, which static shapes would pay with another compiled step and a
  batch with fewer in-batch negatives. Process p takes rows `[p*b_d, (p+1)*b_d)` of the global
  selection, so all processes read the same dataset at a step and disjoint rows. Everything is
  a pure function of (seed, step, process_index): resume is exact. Each distinct batch size is
  one batch shape: the trainer compiles the step once per distinct size.

  Groups. Per query: one positive drawn at random from `pos`, then `group_size - 1` negatives
  from `neg`, without replacement when there are enough, else each negative about equally often
  (FlagEmbedding's `random.sample(idx * ceil(k / n), k)`). A row without `neg` gets negatives drawn
  at random from the positives of the dataset's rows, never a text equal to one of its own
  positives. The draws come from a generator seeded by (seed, step, process_index), consumed in
  the process's row order. Passages are laid out `[pos, neg_1..neg_{G-1}]` per query.

  Instructions. A query becomes `instruction_format.format(instruction, query)` where the
  instruction is the row's `prompt` when it has one (and `use_row_prompts`), else
  `query_instruction`; None means the bare query. Passages get `passage_instruction` the same way,
  except rows of a type in `symmetric_types`, whose passages get the query's instruction
  (FlagEmbedding). `INSTRUCTIONS` holds BGE's zh/en retrieval instructions.

  Batch (numpy, the keys of `contrastive.loss`; static shapes per dataset whatever the data; B
  is the step's dataset's b_d):
    query_input_ids, query_attention_mask        int32 [B, query_max_length]
    passage_input_ids, passage_attention_mask    int32 [B*G, passage_max_length]
    teacher_scores                               float32 [B, G] (only with use_teacher_scores):
                                                 the rows' pos_scores/neg_scores of the chosen
                                                 passages, in the passage layout
    passage_hash                                 int32 [B*G, 2] (only with passage_hash):
                                                 `text_hashes` of the passages (instructions
                                                 included), to tell duplicates in the loss
    in_batch_negatives                           int32 [] (scalar, same on every process): 1 when
                                                 the loss may score each query against every
                                                 passage of the global batch; 0 when it must score
                                                 a query against its own group only: the dataset
                                                 is in `no_in_batch_datasets`, is named
                                                 `*no_in_batch_neg`, or a row of the step's
                                                 global selection has a type in
                                                 `no_in_batch_types`.
  Texts are tokenised with special tokens, truncated and padded to the max lengths.
  """

  def __init__(self, datasets: Sequence[tuple[str, PairSource]], tokenizer: Any, *,
               batch_size: int, group_size: int, query_max_length: int = 32,
               passage_max_length: int = 128, query_instruction: str | None = None,
               passage_instruction: str | None = None, instruction_format: str = "{}{}",
               use_row_prompts: bool = True, seed: int = 0, process_index: int = 0,
               process_count: int = 1, no_in_batch_datasets: Sequence[str] = (),
               no_in_batch_types: Sequence[str] = NO_IN_BATCH_TYPES,
               symmetric_types: Sequence[str] = SYMMETRIC_TYPES,
               use_teacher_scores: bool = False, batch_sizes: Sequence[int] | None = None,
               weights: Sequence[float] | None = None, sampling: str = "proportional",
               passage_hash: bool = False):
    """Checks the options against the data (every problem is reported before training starts).

    Args:
      datasets: (name, source) pairs; names must be unique.
      tokenizer: a Hugging Face tokenizer with a pad token.
      batch_size: queries per step on this process (B), for every dataset without its own.
      group_size: passages per query (G >= 1): one positive and G-1 negatives.
      query_max_length, passage_max_length: token lengths (with special tokens) of the padded
        queries and passages.
      query_instruction, passage_instruction, instruction_format, use_row_prompts,
        symmetric_types: see "Instructions" in the class docstring.
      seed: seeds the schedule, the row order and the groups.
      process_index, process_count: this process and the number of processes.
      no_in_batch_datasets, no_in_batch_types: see `in_batch_negatives` in the class docstring.
      use_teacher_scores: add `teacher_scores` (every row must carry the scores it needs).
      batch_sizes: per dataset (aligned with `datasets`), its queries per step on this process;
        None = `batch_size` for all.
      weights: per dataset, its passes over its rows per epoch (> 0); None = 1 for all.
      sampling: "proportional" or "round_robin" (see "Mixing schedule").
      passage_hash: add `passage_hash` (the loss's loss.mask_duplicate_positives).
    """
    if batch_size < 1 or group_size < 1:
      raise ValueError(f"batch_size={batch_size}, group_size={group_size}: both must be >= 1")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index}, process_count={process_count}: need "
                       "0 <= process_index < process_count")
    if query_max_length < 2 or passage_max_length < 2:
      raise ValueError("query_max_length and passage_max_length must leave room for the special "
                       f"tokens (got {query_max_length}, {passage_max_length})")
    if seed < 0:
      raise ValueError(f"seed={seed}; it must be >= 0")
    try:
      fields = [f for _, f, _, _ in string.Formatter().parse(instruction_format) if f is not None]
      instruction_format.format("", "")
    except (IndexError, KeyError, ValueError):
      fields = []
    if len(fields) != 2:
      raise ValueError(f"instruction_format={instruction_format!r}; it needs two {{}} fields: "
                       "instruction, then text (FlagEmbedding's default is '{}{}')")
    if getattr(tokenizer, "pad_token_id", None) is None:
      raise ValueError("the tokenizer has no pad token; static-shape batches need one")
    datasets = [(str(name), src) for name, src in datasets]
    if not datasets:
      raise ValueError("no dataset given: pass a list of (name, PairSource)")
    names = [name for name, _ in datasets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
      raise ValueError(f"dataset names {twice} occur more than once; names must be unique")
    unknown = sorted(set(no_in_batch_datasets) - set(names))
    if unknown:
      raise ValueError(f"no_in_batch_datasets names {unknown}, which are not datasets "
                       f"(datasets: {names})")

    self.names, self.sources = names, [src for _, src in datasets]
    self.tokenizer = private_copy(tokenizer)  # it runs in the prefetch thread
    self.batch_size, self.group_size = batch_size, group_size
    self.query_max_length, self.passage_max_length = query_max_length, passage_max_length
    self.query_instruction, self.passage_instruction = query_instruction, passage_instruction
    self.instruction_format, self.use_row_prompts = instruction_format, use_row_prompts
    self.seed, self.process_index, self.process_count = seed, process_index, process_count
    self.symmetric_types = frozenset(symmetric_types)
    self.use_teacher_scores = use_teacher_scores
    self.passage_hash = passage_hash
    self.global_batch = batch_size * process_count
    self.pack_rows: dict[str, int] | None = None  # enable_packing
    self.pack_grow_multiple: int | None = None
    self.grown_batches = 0  # packed batches that needed more rows than pack_rows
    self.batch_sizes, self.weights, self.sampling = _mixing(names, batch_size, batch_sizes,
                                                            weights, sampling)
    self.global_batches = [b * process_count for b in self.batch_sizes]

    slots = []
    for name, src, bg, w, b in zip(names, self.sources, self.global_batches, self.weights,
                                   self.batch_sizes):
      if len(src) < bg:
        raise ValueError(
            f"dataset {name!r} has {len(src)} rows, fewer than the global batch {bg} (batch "
            f"size {b} x {process_count} processes): a batch is drawn from one dataset "
            "without repeating rows; use a smaller batch, or merge the small datasets of a "
            "folder into one (config data.small_threshold) and drop what is still too small "
            "(data.drop_threshold)")
      slots.append(int(math.floor(w * (len(src) // bg))))
      if not slots[-1]:
        raise ValueError(f"dataset {name!r}: weight {w} x its {len(src) // bg} batches per pass "
                         "is less than one batch per epoch; raise its weight")
    if self.sampling == "round_robin":
      slots = [min(slots)] * len(slots)
    self.slots = slots  # batches per epoch of each dataset
    self.steps_per_epoch = int(sum(slots))
    self._slot_dataset = np.repeat(np.arange(len(slots)), slots)
    self._slot_chunk = np.concatenate([np.arange(s) for s in slots])
    # Rows this process reads per epoch.
    self.num_examples = int(sum(k * b for k, b in zip(slots, self.batch_sizes)))

    no_types = frozenset(no_in_batch_types)
    self._always_no_ibn = [name in set(no_in_batch_datasets) or src.no_in_batch_neg
                           for name, src in datasets]
    self._no_ibn_rows = [src.type_mask(no_types) for src in self.sources]
    for (name, _), alone in zip(datasets, self._always_no_ibn):
      if alone and self.group_size == 1:
        raise ValueError(
            f"dataset {name!r} is scored within its groups only (no in-batch negatives: "
            "no_in_batch_datasets or a *no_in_batch_neg name) but group_size=1 leaves each "
            "query its positive alone: its loss is 0 and it trains nothing. Raise group_size "
            "(hard negatives) or let the dataset use in-batch negatives.")
    self._pools: list[Sequence[str] | None] = []
    for name, src in datasets:
      self._pools.append(self._check_dataset(name, src))
    self._cache: dict[tuple, np.ndarray] = {}

  def _check_dataset(self, name: str, src: PairSource) -> Sequence[str] | None:
    """Refuses data the options cannot serve; returns the passage pool of neg-less rows."""
    g = self.group_size
    if self.use_teacher_scores:
      i = src.first_row_without("pos_scores")
      if i is not None:
        raise ValueError(f"use_teacher_scores: dataset {name!r} has a row without 'pos_scores' "
                         f"(first at {src.locate(i)}); distillation needs the teacher's score of "
                         "every passage: add pos_scores/neg_scores or turn distillation off")
      if g > 1:
        i = src.first_row_without("neg_scores")  # a row without negatives lacks their scores too
        if i is not None:
          lacks = "negatives" if not src[i].neg else "'neg_scores'"
          raise ValueError(f"use_teacher_scores: dataset {name!r} has a row without {lacks} "
                           f"(first at {src.locate(i)}); distillation needs the teacher's score "
                           "of every passage of the group")
    if g == 1 or src.first_row_without("neg") is None:
      return None
    i = src.covering_row()
    if i is not None:
      raise ValueError(f"dataset {name!r}: the row at {src.locate(i)} has no negatives and no "
                       "other row has a positive to draw them from; add 'neg' passages or more "
                       "rows")
    return src.positives()

  # -------------------------------------------------------------------------------------------
  # Schedule.
  # -------------------------------------------------------------------------------------------

  def _cached(self, key: tuple, make) -> np.ndarray:
    """A small cache of permutations (safe to share between threads: a miss recomputes)."""
    value = self._cache.get(key)
    if value is None:
      value = make()
      if len(self._cache) > 4 + 2 * len(self.sources):
        self._cache = {}
      self._cache[key] = value
    return value

  def select(self, step: int) -> tuple[int, np.ndarray]:
    """(dataset index, global row indices [Bg]) of a step, the same on every process."""
    if step < 0:
      raise ValueError(f"step={step}; steps start at 0")
    epoch, position = divmod(int(step), self.steps_per_epoch)
    if self.sampling == "round_robin":
      d, chunk = position % len(self.sources), position // len(self.sources)
    else:
      order = self._cached(("slots", epoch), lambda: np.random.default_rng(
          [self.seed, _TAG_MIX, epoch]).permutation(self.steps_per_epoch))
      slot = int(order[position])
      d, chunk = int(self._slot_dataset[slot]), int(self._slot_chunk[slot])
    bg = self.global_batches[d]
    per_pass = len(self.sources[d]) // bg
    rows = self._cached(("rows", d, epoch, chunk // per_pass),
                        lambda: self._row_order(d, epoch, chunk // per_pass))
    chunk %= per_pass
    return d, rows[chunk * bg:(chunk + 1) * bg]

  def _row_order(self, d: int, epoch: int, pass_: int = 0) -> np.ndarray:
    """Dataset d's row permutation for one pass of an epoch, seeded by (seed, d, epoch[, pass])."""
    key = [self.seed, _TAG_ROWS, d, epoch] + ([pass_] if pass_ else [])
    return order_lib.permutation(key, len(self.sources[d]))

  def dataset_at(self, step: int) -> str:
    """The name of the dataset a step's batch comes from."""
    return self.names[self.select(step)[0]]

  def batch_source(self, step: int) -> str | None:
    """What sets a step's batch shape when datasets have different batch sizes (data.batch_sizes):
    its dataset and global batch, for messages about the step compiled for it (the trainer's
    memory check); None when every dataset has the same size."""
    if len(set(self.batch_sizes)) < 2:
      return None
    d = self.select(step)[0]
    return (f"dataset {self.names[d]!r}'s global batch {self.global_batches[d]} "
            "(config.data.batch_sizes)")

  def batch_size_steps(self, start: int, end: int) -> list[int]:
    """The first step in [start, end) of each global batch size other than step `start`'s, in
    step order: the steps whose batches set every other batch shape of a run resumed (or begun)
    at `start`, which the trainer compiles before its first step. Empty when every dataset has
    the same batch size. Every dataset has a batch in every epoch, so the rest of `start`'s epoch
    and the next one hold them all: O(steps_per_epoch) `select` calls, no tokenising."""
    if len(set(self.batch_sizes)) < 2:
      return []
    seen = {self.global_batches[self.select(start)[0]]}
    steps = []
    stop = min(end, (start // self.steps_per_epoch + 2) * self.steps_per_epoch)
    for step in range(start + 1, stop):
      if len(seen) == len(set(self.global_batches)):
        break
      size = self.global_batches[self.select(step)[0]]
      if size not in seen:
        seen.add(size)
        steps.append(step)
    return steps

  def epoch(self, step: int) -> float:
    return step / self.steps_per_epoch

  # -------------------------------------------------------------------------------------------
  # Groups.
  # -------------------------------------------------------------------------------------------

  def _negatives(self, rng: np.random.Generator, row: PairRow,
                 pool: Sequence[str] | None) -> list[int]:
    """Indices into `row.neg` (or into `pool` when the row has no negatives) for one group."""
    k = self.group_size - 1
    if row.neg:
      n = len(row.neg)
      if n >= k:
        return [int(i) for i in rng.choice(n, size=k, replace=False)]
      return [int(i) for i in rng.permutation(np.tile(np.arange(n), -(-k // n)))[:k]]
    own = set(row.pos)
    picks = [int(i) for i in rng.integers(len(pool), size=k)]
    for _ in range(32):
      seen: set[int] = set()
      bad = []
      for j, t in enumerate(picks):
        if pool[t] in own or t in seen:
          bad.append(j)
        seen.add(t)
      if not bad:
        return picks
      for j in bad:
        picks[j] = int(rng.integers(len(pool)))
    # A tiny pool: draw (with repetition) among the passages that are not the row's positives.
    allowed = [t for t in range(len(pool)) if pool[t] not in own]
    return [t if pool[t] not in own else allowed[int(rng.integers(len(allowed)))] for t in picks]

  def _format(self, instruction: str | None, text: str) -> str:
    return text if instruction is None else self.instruction_format.format(instruction, text)

  def examples(self, step: int) -> tuple[int, np.ndarray, list[str], list[str], np.ndarray | None]:
    """The step's texts before tokenisation.

    Returns:
      (dataset index, global row selection [Bg], queries [B], passages [B*G] in the group layout,
      teacher scores [B, G] or None).
    """
    d, selection = self.select(step)
    b = self.batch_sizes[d]
    rows = selection[self.process_index * b:(self.process_index + 1) * b]
    src, pool = self.sources[d], self._pools[d]
    rng = np.random.default_rng([self.seed, _TAG_GROUP, int(step), self.process_index])
    queries, passages = [], []
    scores = np.zeros((b, self.group_size), np.float32) if self.use_teacher_scores else None
    for q, i in enumerate(rows):
      row = src[int(i)]
      p = int(rng.integers(len(row.pos)))
      negs = self._negatives(rng, row, pool) if self.group_size > 1 else []
      group = [row.pos[p]] + ([row.neg[j] for j in negs] if row.neg else [pool[j] for j in negs])
      if scores is not None:
        scores[q, 0] = row.pos_scores[p]
        scores[q, 1:] = [row.neg_scores[j] for j in negs]
      instruction = (row.prompt if self.use_row_prompts and row.prompt is not None
                     else self.query_instruction)
      queries.append(self._format(instruction, row.query))
      passage_instruction = (instruction if row.type in self.symmetric_types
                             else self.passage_instruction)
      passages.extend(self._format(passage_instruction, t) for t in group)
    return d, selection, queries, passages, scores

  def _in_batch_negatives(self, d: int, selection: np.ndarray) -> int:
    return 0 if self._always_no_ibn[d] or self._no_ibn_rows[d][selection].any() else 1

  # -------------------------------------------------------------------------------------------
  # Batcher protocol.
  # -------------------------------------------------------------------------------------------

  def _tokenize(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                         padding_side="right", return_attention_mask=True,
                         return_token_type_ids=False, return_tensors="np")
    ids = np.asarray(enc["input_ids"]).astype(np.int32)
    mask = np.asarray(enc["attention_mask"]).astype(np.int32)
    if ids.shape != (len(texts), max_length):
      raise ValueError(f"the tokenizer returned shape {ids.shape}, expected "
                       f"{(len(texts), max_length)}; does it pad and truncate to max_length?")
    return ids, mask

  def padded(self, step: int) -> dict[str, np.ndarray]:
    """The step's batch with both sides padded to their max lengths (never packed)."""
    d, selection, queries, passages, scores = self.examples(step)
    q_ids, q_mask = self._tokenize(queries, self.query_max_length)
    p_ids, p_mask = self._tokenize(passages, self.passage_max_length)
    batch = {"query_input_ids": q_ids, "query_attention_mask": q_mask,
             "passage_input_ids": p_ids, "passage_attention_mask": p_mask}
    if scores is not None:
      batch["teacher_scores"] = scores
    if self.passage_hash:
      batch["passage_hash"] = text_hashes(passages)
    batch["in_batch_negatives"] = np.asarray(self._in_batch_negatives(d, selection), np.int32)
    return batch

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    batch = self.padded(step)
    if self.pack_rows is None:
      return batch
    try:
      batch = packing.pack_sides(batch, self.pack_rows, self.tokenizer.pad_token_id,
                                 self.pack_grow_multiple)
    except ValueError as e:
      fix = ""
      if self.process_count > 1:
        fits = max(rows / len(batch[f"{side}_input_ids"])
                   for side, rows in self._rows_needed(batch).items())
        fix = (f" Every one of the {self.process_count} processes packs to the same rows, so a "
               "batch cannot grow; the checkpoints so far are kept: resume with "
               f"data.pack_rows_fraction of at least {math.ceil(fits * 100) / 100} (this "
               "batch's need).")
      raise ValueError(f"step {step} (dataset {self.dataset_at(step)!r}): {e}.{fix}") from None
    rows = {side: batch[f"{side}_input_ids"].shape[0] for side in self.pack_rows}
    if rows != self.pack_rows:
      self.grown_batches += 1
      if self.grown_batches == 1 or self.grown_batches % 100 == 0:
        log.warning("step %d: the packed batch takes %s rows, more than the %s budgeted (%d "
                    "grown batches so far); each new shape compiles another step: raise "
                    "data.pack_rows_fraction to avoid that", step, rows, self.pack_rows,
                    self.grown_batches)
    # Slots index the global array: this process's rows come after the lower processes'.
    for side, r in rows.items():
      length = batch[f"{side}_input_ids"].shape[1]
      batch[f"{side}_text_slot"] += np.int32(self.process_index * r * (length // 2))
    return batch

  def enable_packing(self, rows: Mapping[str, int], grow_multiple: int | None = None) -> None:
    """Pack each side of every batch into rows[side] rows per process (`bge_jax.data.packing`);
    the same counts on every process (the global array is their concatenation).

    grow_multiple (one process only): a batch whose texts need more rows takes
    `packing.grown_rows` rows, a multiple of this (the batch shards), instead of raising.
    """
    if set(self.batch_sizes) != {self.batch_size}:
      raise ValueError("packing (data.pack=True) with per-dataset batch sizes (data.batch_sizes) "
                       "is not supported: the packed rows are sized for batch_size; set "
                       "data.pack=False (or leave it unset), or drop data.batch_sizes")
    if grow_multiple is not None and self.process_count > 1:
      raise ValueError("packed rows can grow on one process only: every process must pack "
                       "to the same shape")
    self.pack_rows = {side: int(rows[side]) for side in ("query", "passage")}
    self.pack_grow_multiple = grow_multiple

  @staticmethod
  def _rows_needed(batch: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The rows first-fit decreasing needs per side of a padded batch."""
    return {side: packing.packed_rows(batch[f"{side}_attention_mask"].sum(1),
                                      batch[f"{side}_input_ids"].shape[1])
            for side in ("query", "passage")}

  def packed_rows_needed(self, steps: Sequence[int]) -> dict[str, int]:
    """The most rows first-fit decreasing needs per side over these steps' batches."""
    need = {"query": 0, "passage": 0}
    for step in steps:
      for side, rows in self._rows_needed(self.padded(step)).items():
        need[side] = max(need[side], rows)
    return need

  def real_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
    """Non-pad tokens of the queries and passages of a batch (padded or packed)."""
    return int(sum(np.count_nonzero(batch[f"{side}_segment_ids"]) if packing.is_packed(batch, side)
                   else np.sum(batch[f"{side}_attention_mask"]) for side in ("query", "passage")))

  def dataset_summaries(self) -> list[dict[str, Any]]:
    """Per dataset: name, rows, global batch, weight, batches per epoch (run_info.json records
    them; the export's model card reads them)."""
    return [{"name": name, "rows": len(src), "global_batch": bg, "weight": w,
             "batches_per_epoch": k}
            for name, src, bg, w, k in zip(self.names, self.sources, self.global_batches,
                                           self.weights, self.slots)]

  def describe(self) -> str:
    """One line: the datasets, their rows and skips, the batch geometry."""
    parts = []
    sizes_differ = len(set(self.batch_sizes)) > 1
    for d, (name, src, s) in enumerate(zip(self.names, self.sources, self.slots)):
      flags = []
      if sizes_differ:
        flags.append(f"global batch {self.global_batches[d]}")
      if self.weights[d] != 1:
        flags.append(f"weight {self.weights[d]:g}")
      if self._always_no_ibn[d]:
        flags.append("no in-batch negatives")
      skipped = sum(src.skipped.values())
      if skipped:
        flags.append(f"{skipped} bad rows skipped: " + ", ".join(
            f"{reason} {n}" for reason, n in sorted(src.skipped.items())))
      parts.append(f"{name} {len(src)} rows, {s} batches/epoch" +
                   (f" ({'; '.join(flags)})" if flags else ""))
    batch = (f"global batches {'/'.join(map(str, self.global_batches))} = "
             f"{'/'.join(map(str, self.batch_sizes))}" if sizes_differ else
             f"global batch {self.global_batch} = {self.batch_size}")
    geometry = (f"{batch} x {self.process_count} processes, group {self.group_size}, lengths "
                f"{self.query_max_length}/{self.passage_max_length}, {self.steps_per_epoch} "
                f"steps/epoch" + (", round-robin" if self.sampling == "round_robin" else ""))
    return f"{len(self.names)} dataset{'s' if len(self.names) != 1 else ''}: " + \
        "; ".join(parts) + f"; {geometry}"


PASSAGE_HASH_WORDS = 2  # int32 words of `text_hashes`: 64 bits


def text_hashes(texts: Sequence[str]) -> np.ndarray:
  """int32 [N, PASSAGE_HASH_WORDS]: 64 bits of BLAKE2b of each text's UTF-8 bytes, so that equal
  texts anywhere in a global batch compare equal on device (a chance collision of two different
  texts among n has probability about n^2 / 2^65)."""
  digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=4 * PASSAGE_HASH_WORDS)
                     .digest() for t in texts)
  return np.frombuffer(digests, np.int32).reshape(len(texts), PASSAGE_HASH_WORDS).copy()
