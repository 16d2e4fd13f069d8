"""Prepared datasets: validated rows in sharded, indexed array_record files, read lazily by index.

`launch/prepare_data.py` (`bge_jax.data.prepare.prepare`) reads JSONL/TSV/text inputs once,
validates every row with the same readers as the in-memory path (`pairs.open_contrastive_data`,
`sources.open_text_source`), and writes a folder:

  bge_jax_manifest.json                  the manifest (below); its presence marks the folder
  shard-00000-of-00012.array_record      the rows, in input order (file order, then line order)
  shard-00000-of-00012.pos.npy           (pairs, only when some row has several positives) int64
                                         [rows]: positives in rows 0..i of the shard (inclusive)
  shard-00000-of-00012.types.npy         (pairs, only when some row has a `type`) uint16 [rows]:
                                         index into manifest["pairs"]["types"] plus 1 (0: none)

Record layout (one array_record record per row; written with `writer_options()`, by default
one record per chunk, so reading row i decompresses row i only): 12 bytes `<IQ` (input file
index into manifest["sources"], 1-based line), then for pairs the msgpack list
[query, pos, neg, pos_scores, neg_scores, prompt, type] (a `pairs.PairRow`), for text the UTF-8
text.

Manifest (JSON): format "bge-jax-prepared", version, kind ("pairs" or "text"), record (field
names), options (how it was prepared: kind/pair_fields or field/min_chars, on_error, dedupe),
rows, shards [{file, rows, bytes, sha256, head_crc32, tail_crc32, positives}], sources [{path,
bytes, mtime, kind}], skipped {reason: count}, first_skipped {reason: "file:line"},
no_in_batch_neg, writer_options, created, prepare_seconds, and for pairs what
`ContrastiveBatcher` needs without reading every row: pairs {positives, first_row_without {neg,
pos_scores, neg_scores}, types, covering_row}. The shards are plain array_record files (grain's
`ArrayRecordDataSource` reads them; decode records with `decode_pair` / `decode_text`).

Reading (`open_prepared_pairs`, `open_prepared_texts`): opening reads the manifest and checks each
shard's size and the CRC32 of its first and last 64 KiB (`CHECK_BYTES`): O(shards) time and
memory, independent of the rows. `verify=True` (or `launch/prepare_data.py --verify DIR`) also
checks every shard's full SHA-256 (reads everything). A shard's reader is opened on first use
(random-access options `READER_OPTIONS`; its index holds ~12-15 bytes per row of that shard with
one record per chunk, see `writer_options`), and
a read returns only the rows asked for. Every refusal (no or bad manifest, a missing, resized or
altered shard, a dataset prepared as another kind or for other fields) is one `DataError` naming
the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from typing import Any, Iterator

import msgpack
import numpy as np

from bge_jax.data.holdout import Complement
from bge_jax.data.pairs import PairRow
from bge_jax.data.sources import DataError

MANIFEST = "bge_jax_manifest.json"
FORMAT = "bge-jax-prepared"
VERSION = 1
KINDS = ("pairs", "text")
PAIR_RECORD = ("query", "pos", "neg", "pos_scores", "neg_scores", "prompt", "type")
TEXT_RECORD = ("text",)
RECORDS_PER_CHUNK = 1  # array_record group_size: random access decompresses one chunk


def writer_options(records_per_chunk: int = RECORDS_PER_CHUNK) -> str:
  """array_record writer options. One record per chunk reads fastest (one row decompressed per
  read) but the reader's index holds ~12-15 bytes per row of every shard it opened; 4 records
  per chunk cut that to ~1/4 and the file by ~20%, at ~1.8x the time per random read."""
  return f"group_size:{records_per_chunk},zstd:3"

READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # array_record's random-access setting
CHECK_BYTES = 1 << 16
LOCATION = struct.Struct("<IQ")  # (input file index, line) at the head of every record
ROW_FIELDS = ("neg", "pos_scores", "neg_scores")  # first_row_without keys
_REDO = "re-run launch/prepare_data.py to rebuild the dataset"


def is_prepared(spec: str | os.PathLike) -> bool:
  """True when `spec` is a folder holding a prepared-dataset manifest."""
  return os.path.isfile(os.path.join(os.path.expanduser(os.fspath(spec)), MANIFEST))


def shard_name(i: int, n: int) -> str:
  return f"shard-{i:05d}-of-{n:05d}"


# ---------------------------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------------------------

def encode_pair(row: PairRow) -> bytes:
  """The msgpack body of a pair record (without the location header)."""
  return msgpack.packb(list(row), use_bin_type=True)


def decode_pair(record: bytes) -> PairRow:
  q, pos, neg, ps, ns, prompt, typ = msgpack.unpackb(memoryview(record)[LOCATION.size:])
  return PairRow(q, tuple(pos), tuple(neg), None if ps is None else tuple(ps),
                 None if ns is None else tuple(ns), prompt, typ)


def decode_text(record: bytes) -> str:
  return bytes(memoryview(record)[LOCATION.size:]).decode("utf-8")


def location(record: bytes) -> tuple[int, int]:
  """(input file index, line) of a record."""
  return LOCATION.unpack_from(record)


def file_checks(path: str, size: int | None = None) -> dict[str, int]:
  """bytes, and CRC32 of the first and last `CHECK_BYTES` of a file (the cheap open-time check)."""
  size = os.path.getsize(path) if size is None else size
  with open(path, "rb") as f:
    head = zlib.crc32(f.read(CHECK_BYTES))
    f.seek(max(0, size - CHECK_BYTES))
    tail = zlib.crc32(f.read(CHECK_BYTES))
  return {"bytes": size, "head_crc32": head, "tail_crc32": tail}


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Manifest.
# ---------------------------------------------------------------------------------------------

def read_manifest(folder: str) -> dict:
  """The manifest of a prepared folder, its structure checked; DataError naming the file."""
  path = os.path.join(folder, MANIFEST)

  def bad(problem: str) -> DataError:
    return DataError(f"{path}: not a valid bge-jax prepared-dataset manifest ({problem}); {_REDO}")

  try:
    with open(path, "rb") as f:
      m = json.loads(f.read())
  except FileNotFoundError:
    raise DataError(f"{folder}: no {MANIFEST}: not a prepared dataset (launch/prepare_data.py "
                    "writes one)") from None
  except (OSError, ValueError) as e:
    raise bad(f"{type(e).__name__}: {e}") from None
  if not isinstance(m, dict) or m.get("format") != FORMAT:
    raise bad(f"'format' is not {FORMAT!r}")
  if not isinstance(m.get("version"), int) or m["version"] > VERSION:
    raise bad(f"version {m.get('version')!r}; this bge-jax reads version <= {VERSION}: upgrade "
              "bge-jax or")
  want = {"kind": str, "rows": int, "shards": list, "sources": list, "options": dict,
          "skipped": dict, "first_skipped": dict}
  for key, t in want.items():
    if not isinstance(m.get(key), t):
      raise bad(f"{key!r} is missing or not a JSON {t.__name__}")
  if m["kind"] not in KINDS:
    raise bad(f"kind {m['kind']!r} is not one of {KINDS}")
  if m["kind"] == "pairs" and not isinstance(m.get("pairs"), dict):
    raise bad("'pairs' is missing")
  for i, s in enumerate(m["shards"]):
    if not (isinstance(s, dict) and isinstance(s.get("file"), str) and os.sep not in s["file"]
            and all(isinstance(s.get(k), int) and s[k] >= 0
                    for k in ("rows", "bytes", "head_crc32", "tail_crc32"))):
      raise bad(f"shard entry {i} lacks file/rows/bytes/head_crc32/tail_crc32")
  if sum(s["rows"] for s in m["shards"]) != m["rows"]:
    raise bad(f"the shards' rows add up to {sum(s['rows'] for s in m['shards'])}, not rows="
              f"{m['rows']}")
  if not m["rows"]:
    raise bad("it holds no row")
  return m


def check_shards(folder: str, manifest: dict, verify: bool = False) -> None:
  """Each shard exists with its recorded size and head/tail CRC32 (and SHA-256 with `verify`)."""
  for s in manifest["shards"]:
    path = os.path.join(folder, s["file"])
    try:
      size = os.path.getsize(path)
    except OSError:
      raise DataError(f"{path}: missing shard of the prepared dataset {folder} (listed in "
                      f"{MANIFEST}); restore the file or {_REDO}") from None
    if size != s["bytes"]:
      raise DataError(f"{path}: {size} bytes where {MANIFEST} records {s['bytes']}: the shard is "
                      f"truncated or was replaced; restore it or {_REDO}")
    got = file_checks(path, size)
    if (got["head_crc32"], got["tail_crc32"]) != (s["head_crc32"], s["tail_crc32"]):
      raise DataError(f"{path}: checksum mismatch (CRC32 of the first/last {CHECK_BYTES} bytes "
                      f"differ from {MANIFEST}): the shard was altered; restore it or {_REDO}")
    if verify and sha256(path) != s.get("sha256"):
      raise DataError(f"{path}: SHA-256 mismatch with {MANIFEST}: the shard is corrupt; restore "
                      f"it or {_REDO}")


# ---------------------------------------------------------------------------------------------
# Shards.
# ---------------------------------------------------------------------------------------------

class _Shards:
  """The array_record shards of a prepared folder: records by global row index, readers opened on
  first use (one lock per shard: the batcher reads from a prefetch thread)."""

  def __init__(self, folder: str, entries: Sequence[dict]):
    self.folder = folder
    self.paths = [os.path.join(folder, s["file"]) for s in entries]
    self.counts = np.asarray([s["rows"] for s in entries], np.int64)
    self.starts = np.concatenate([[0], np.cumsum(self.counts)])
    self._readers: list[Any] = [None] * len(entries)
    self._locks = [threading.Lock() for _ in entries]

  def __len__(self) -> int:
    return int(self.starts[-1])

  def _reader(self, s: int):
    reader = self._readers[s]
    if reader is None:
      from array_record.python.array_record_module import ArrayRecordReader
      try:
        reader = ArrayRecordReader(self.paths[s], READER_OPTIONS)
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(f"{self.paths[s]}: cannot open the shard as array_record ({e}); {_REDO}"
                        ) from None
      if reader.num_records() != self.counts[s]:
        raise DataError(f"{self.paths[s]}: {reader.num_records()} records where {MANIFEST} "
                        f"records {self.counts[s]}; {_REDO}")
      self._readers[s] = reader
    return reader

  def shard_of(self, idx: np.ndarray) -> np.ndarray:
    return np.searchsorted(self.starts, idx, side="right") - 1

  def read(self, indices: Sequence[int]) -> list[bytes]:
    """The records at global row `indices` (any order, repeats allowed), one batched read per
    shard touched."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    n = len(self)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
      bad = int(idx[(idx < 0) | (idx >= n)][0])
      raise IndexError(f"row {bad} out of range for {n} rows ({self.folder})")
    shards = self.shard_of(idx)
    out: list[bytes] = [b""] * idx.size
    for s in np.unique(shards):
      at = np.flatnonzero(shards == s)
      local = (idx[at] - self.starts[s]).tolist()
      with self._locks[s]:
        reader = self._reader(int(s))
        # One record: the range read (~15 us); the list read costs ~20x more for one record.
        records = reader.read(local[0], local[0] + 1) if len(local) == 1 else reader.read(local)
      for j, r in zip(at.tolist(), records):
        out[j] = r
    return out

  def iter_shard(self, s: int, chunk: int = 4096) -> Iterator[bytes]:
    """The records of shard `s` in order (sequential reads of `chunk` records)."""
    for lo in range(0, int(self.counts[s]), chunk):
      hi = min(int(self.counts[s]), lo + chunk)
      with self._locks[s]:
        records = self._reader(s).read(lo, hi)
      yield from records

  def close(self) -> None:
    for s, reader in enumerate(self._readers):
      if reader is not None:
        reader.close()
        self._readers[s] = None


def _open(spec: str | os.PathLike, kind: str, verify: bool) -> tuple[str, dict, _Shards]:
  folder = os.path.expanduser(os.fspath(spec)).rstrip("/") or "/"
  manifest = read_manifest(folder)
  if manifest["kind"] != kind:
    use = ("data.train of a contrastive stage (stage 2/3)" if manifest["kind"] == "pairs"
           else "data.train of stage 1 (RetroMAE)")
    raise DataError(f"{os.path.join(folder, MANIFEST)}: the dataset was prepared as "
                    f"{manifest['kind']!r} data, not {kind!r}: use it as {use}, or prepare the "
                    f"inputs again with --data {kind}")
  check_shards(folder, manifest, verify)
  return folder, manifest, _Shards(folder, manifest["shards"])


def _check_on_error(folder: str, manifest: dict, on_error: str, hint: str) -> None:
  """A dataset prepared with on_error='skip' that skipped bad rows, opened with 'raise', is
  refused as its inputs would be (naming the first bad row)."""
  bad = {r: n for r, n in manifest["skipped"].items() if r != "duplicate"}
  if on_error == "raise" and bad:
    reason = min(bad, key=lambda r: manifest["first_skipped"].get(r, ""))
    raise DataError(
        f"{os.path.join(folder, MANIFEST)}: prepared with on_error='skip', which skipped "
        f"{sum(bad.values())} bad rows (first {reason} at "
        f"{manifest['first_skipped'].get(reason, '?')}); opening it with on_error='raise' "
        f"refuses them as the inputs would be refused: {hint}")


def skip_line(skipped: dict, first: dict) -> str:
  """'; skipped N rows: reason k (first at file:line), ...' (empty when nothing was skipped)."""
  if not skipped:
    return ""
  total = sum(skipped.values())
  detail = ", ".join(f"{r} {k} (first at {first.get(r, '?')})" for r, k in sorted(skipped.items()))
  return f"; skipped {total} row{'s' if total != 1 else ''}: {detail}"


# ---------------------------------------------------------------------------------------------
# Pairs.
# ---------------------------------------------------------------------------------------------

class PreparedPairs(Sequence):
  """A prepared contrastive dataset, read lazily: the reader other tools use.

      src = open_prepared_pairs("data/cmtp_prepared")   # O(shards): reads the manifest only
      len(src)                  # rows (int)
      src[i]                    # -> pairs.PairRow, read from its shard on demand
      src.__getitems__([i, j])  # -> [PairRow, ...]: one batched read per shard touched
      for row in src: ...       # sequential, shard by shard (a full pass reads everything)
      src.locate(i)             # -> "input_file:line" the row was read from
      src.subset(indices)       # -> the rows `indices` (increasing) as a PreparedPairs view
      src.manifest              # the manifest dict (module docstring); src.folder its folder

  It answers what `pairs.PairSource` answers (`origins`, `kinds`, `skipped`, `no_in_batch_neg`,
  `first_row_without`, `positives`, `covering_row`, `type_mask`, `subset`, `summary`), from the
  manifest and the side files, so `ContrastiveBatcher` reads only the rows of its own batches. Row
  indices are global and in input order: the same as `open_contrastive_data` on the inputs gives
  (without dedupe, the same rows at the same indices).

  A view (`subset`, e.g. the training or held-out rows of data.validation_fraction,
  `bge_jax.data.holdout`) keeps `indices`, the dataset rows it holds, and reads nothing when
  made: its row i is the dataset's row indices[i]. `indices` is an int64 array [rows] (8 bytes a
  row: the held-out rows) or a `holdout.Complement` (every row but k held-out ones: 8 bytes a
  held-out row, row i found by a binary search over them); no query of a view makes an array
  of the dataset's size.
  """

  def __init__(self, folder: str, manifest: dict, shards: _Shards,
               indices: np.ndarray | Complement | None = None):
    self.folder, self.manifest, self._shards = folder, manifest, shards
    self.indices = indices  # the dataset rows of this view (increasing); None: every row
    info = manifest["pairs"]
    self.origins = tuple(s["path"] for s in manifest["sources"])
    self.kinds = tuple(s.get("kind", "fe") for s in manifest["sources"])
    self.skipped = dict(manifest["skipped"])
    self._first_skipped = dict(manifest["first_skipped"])
    self.no_in_batch_neg = bool(manifest.get("no_in_batch_neg", False))
    self._first_without = dict(info.get("first_row_without", {}))
    self._types = list(info.get("types", []))
    self._positives = int(info.get("positives", len(shards)))
    self._covering = info.get("covering_row")
    self._side: dict[tuple[str, int], np.ndarray] = {}

  def __len__(self) -> int:
    return len(self._shards) if self.indices is None else len(self.indices)

  def _dataset_rows(self, idx) -> np.ndarray:
    """The dataset (global) rows of this view's rows `idx` (int64, idx's shape)."""
    idx = np.asarray(idx, np.int64)
    if self.indices is None:
      return idx
    if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
      bad = int(idx[(idx < 0) | (idx >= len(self))].reshape(-1)[0])
      raise IndexError(f"row {bad} out of range for a view of {len(self)} rows ({self.folder})")
    return self.indices[idx]

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.__getitems__(range(len(self))[i])
    i = int(i)
    if i < 0:
      i += len(self)
    return decode_pair(self._shards.read(self._dataset_rows([i]))[0])

  def __getitems__(self, indices: Sequence[int]) -> list[PairRow]:
    return [decode_pair(r) for r in self._shards.read(self._dataset_rows(indices))]

  def __iter__(self) -> Iterator[PairRow]:
    if self.indices is None:
      for s in range(len(self._shards.paths)):
        for record in self._shards.iter_shard(s):
          yield decode_pair(record)
      return
    for lo in range(0, len(self), 4096):
      yield from self.__getitems__(range(lo, min(len(self), lo + 4096)))

  def locate(self, i: int) -> str:
    f, line = location(self._shards.read(self._dataset_rows([int(i)]))[0])
    return f"{self.origins[f]}:{line}"

  def first_row_without(self, what: str) -> int | None:
    """Index of the first row lacking `what`: "neg", "pos_scores" or "neg_scores" (None: none).

    The dataset's answer is in the manifest; a view reads its rows from the dataset's first such
    row on until one lacks `what` (one read unless that row and the next ones are not in it)."""
    if what not in ROW_FIELDS:
      raise ValueError(f"what={what!r}; use one of {ROW_FIELDS}")
    first = self._first_without.get(what)
    if first is None or self.indices is None:
      return first
    start = int(self.indices.searchsorted(first))
    for lo in range(start, len(self), 256):
      rows = self.__getitems__(range(lo, min(len(self), lo + 256)))
      hit = next((j for j, r in enumerate(rows) if not getattr(r, what)), None)
      if hit is not None:
        return lo + hit
    return None

  def covering_row(self) -> int | None:
    """The first row without negatives whose distinct positives are all the dataset's distinct
    positives (negatives cannot be drawn for it from other rows), or None. A view answers the
    dataset's row when it holds it (a view of few rows may have another such row for its fewer
    positives: not searched, that would read every row)."""
    if self._covering is None or self.indices is None:
      return self._covering
    at = int(self.indices.searchsorted(self._covering))
    return at if at < len(self) and int(self.indices[at]) == self._covering else None

  def _side_array(self, suffix: str, s: int) -> np.ndarray:
    key = (suffix, s)
    a = self._side.get(key)
    if a is None:
      path = self._shards.paths[s][:-len(".array_record")] + suffix
      try:
        a = np.load(path, mmap_mode="r")
      except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the side file of the prepared dataset ({e}); "
                        f"{_REDO}") from None
      if a.shape != (int(self._shards.counts[s]),):
        raise DataError(f"{path}: shape {a.shape}, expected ({int(self._shards.counts[s])},); "
                        f"{_REDO}")
      self._side[key] = a
    return a

  def _side_values(self, suffix: str, rows: np.ndarray) -> np.ndarray:
    """A side file's values (`suffix`: ".pos.npy", ".types.npy") at dataset `rows` (any shape)."""
    idx = np.asarray(rows, np.int64).reshape(-1)
    shards = self._shards.shard_of(idx)
    out = None
    for s in np.unique(shards):
      at = shards == s
      a = self._side_array(suffix, int(s))
      out = np.zeros(idx.shape, a.dtype) if out is None else out
      out[at] = a[idx[at] - self._shards.starts[s]]
    return (np.zeros(idx.shape, np.int64) if out is None else out).reshape(np.shape(rows))

  def positives(self) -> Sequence[str]:
    """Every row's positives in row order (`[p for r in src for p in r.pos]`), read lazily."""
    return _Positives(self)

  def type_mask(self, types: Sequence[str]):
    """Row-indexable booleans: row i's `type` is in `types` (`mask[int array] -> bool array`)."""
    wanted = [k + 1 for k, t in enumerate(self._types) if t in set(types)]
    if not wanted:
      return np.broadcast_to(np.False_, (len(self),))
    return _TypeMask(self, np.asarray(wanted, np.uint16))

  def subset(self, indices: Sequence[int] | Complement) -> PreparedPairs:
    """The rows `indices` (strictly increasing) of this dataset or view as a view of their own
    (`bge_jax.data.holdout`: the training or held-out rows); reads nothing. A `Complement` of
    the dataset's rows is kept as is (O(held-out rows)); of a view's rows, made an array."""
    if isinstance(indices, Complement) and self.indices is None:
      if indices.n != len(self) or indices.positions != range(len(indices)):
        raise ValueError(f"subset of {self.folder}: a Complement of {indices.n} rows (whole) "
                         f"is needed for a dataset of {len(self)} rows")
      return PreparedPairs(self.folder, self.manifest, self._shards, indices)
    idx = np.asarray(indices, np.int64).reshape(-1)
    if idx.size and (np.any(np.diff(idx) <= 0) or idx[0] < 0 or idx[-1] >= len(self)):
      raise ValueError(f"subset of {self.folder}: the indices must be strictly increasing rows "
                       f"in [0, {len(self)})")
    return PreparedPairs(self.folder, self.manifest, self._shards, self._dataset_rows(idx))

  def summary(self) -> str:
    n = len(self.origins)
    kinds = "/".join(sorted(set(self.kinds)))
    of = "" if self.indices is None else f" of {len(self._shards)}"
    return (f"{len(self)}{of} rows ({kinds}) prepared in {self.folder} from {n} file"
            f"{'s' if n != 1 else ''}" + skip_line(self.skipped, self._first_skipped))

  def __repr__(self) -> str:
    return f"PreparedPairs({self.summary()})"


class _Positives(Sequence):
  """`[p for r in src for p in r.pos]` of a `PreparedPairs` (a dataset or a view), each read on
  demand. With several positives in some row (no record read to set up; from the .pos.npy side
  files): a dataset keeps each shard's first positive; a view of rows `indices` (an array) keeps
  its rows' positive offsets (int64 [view rows]); a view of a `Complement` keeps the held-out
  rows' positive spans (two int64 [held-out rows]) and maps its positive t to the dataset's by a
  binary search over them, as `Complement` maps rows."""

  CACHE = 1 << 14  # texts kept: a group's draws are checked, then read again

  def __init__(self, src: PreparedPairs):
    self.src = src
    self._cache: dict[int, str] = {}
    shards = src._shards
    self.uniform = src._positives == len(shards)  # one positive per row: positive t is row t's
    self.starts = None  # the first positive of each shard (dataset) or of each row (array view)
    self.shard_starts = np.concatenate([[0], np.cumsum([s.get("positives", 0)
                                                        for s in src.manifest["shards"]])])
    if self.uniform:
      self.count = len(src)
    elif src.indices is None:
      self.count = src._positives
    elif isinstance(src.indices, Complement):
      first, counts = self._spans(src.indices.held)
      taken = np.concatenate([[0], np.cumsum(counts)])  # held-out positives before each span
      self.taken, self.gaps = taken, first - taken[:-1]  # gaps: kept positives before span j
      self.count = src._positives - int(taken[-1])
    else:
      _, counts = self._spans(src.indices)
      self.starts = np.concatenate([[0], np.cumsum(counts)])
      self.count = int(self.starts[-1])

  def _spans(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index of the first positive, number of positives) of each dataset row."""
    shards, src = self.src._shards, self.src
    of = shards.shard_of(rows)
    first, counts = np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64)
    for s in np.unique(of):
      at = of == s
      cum = src._side_array(".pos.npy", int(s))  # inclusive cumulative positives per row
      local = rows[at] - shards.starts[s]
      before = np.where(local > 0, cum[np.maximum(local - 1, 0)], 0)
      first[at] = self.shard_starts[s] + before
      counts[at] = cum[local] - before
    return first, counts

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, t):
    t = int(t)
    text = self._cache.get(t)
    if text is None:
      text = self._read(t)
      if len(self._cache) >= self.CACHE:
        self._cache = {}
      self._cache[t] = text
    return text

  def _read(self, t: int) -> str:
    if not 0 <= t < len(self):
      raise IndexError(t)
    if self.uniform:
      return self.src[t].pos[0]
    if self.starts is not None:  # an array view: `at` is the view's row
      at = int(np.searchsorted(self.starts, t, side="right") - 1)
      return self.src[at].pos[t - int(self.starts[at])]
    if self.src.indices is not None:  # a Complement view: its positive t is the dataset's u
      t += int(self.taken[np.searchsorted(self.gaps, t, side="right")])
    s = int(np.searchsorted(self.shard_starts, t, side="right") - 1)
    local = t - int(self.shard_starts[s])
    cum = self.src._side_array(".pos.npy", s)
    row = int(np.searchsorted(cum, local, side="right"))
    k = local - (int(cum[row - 1]) if row else 0)
    record = self.src._shards.read([int(self.src._shards.starts[s]) + row])[0]
    return decode_pair(record).pos[k]


class _TypeMask:
  """mask[rows] -> bool array: the rows' type ids (from the .types.npy side files) in `wanted`."""

  def __init__(self, src: PreparedPairs, wanted: np.ndarray):
    self.src, self.wanted = src, wanted

  def __len__(self) -> int:
    return len(self.src)

  def __getitem__(self, rows) -> np.ndarray:
    ids = self.src._side_values(".types.npy", self.src._dataset_rows(rows))
    return np.isin(ids, self.wanted)


def open_prepared_pairs(spec: str | os.PathLike, *, kind: str = "auto", on_error: str = "raise",
                        pair_fields: Sequence[tuple[str, str]] | None = None,
                        verify: bool = False) -> PreparedPairs:
  """Opens a prepared contrastive dataset (a folder written by launch/prepare_data.py).

  Args:
    spec: the folder.
    kind: "auto" accepts any; "fe" (or "flag") / "pairs" refuses a dataset whose inputs were read
      as the other kind.
    on_error: "raise" refuses a dataset that skipped bad rows when prepared (as the inputs would
      be refused); "skip" accepts it (the counts are in `skipped`).
    pair_fields: None accepts any; else must equal the pair fields it was prepared with.
    verify: also check each shard's full SHA-256 (reads every byte).

  Raises:
    DataError: one line naming the file: no/bad manifest, a missing or altered shard, a dataset
      prepared as text or for another kind/fields.
  """
  folder, manifest, shards = _open(spec, "pairs", verify)
  path = os.path.join(folder, MANIFEST)
  kind = "fe" if kind == "flag" else kind
  if kind != "auto":
    other = [s for s in manifest["sources"] if s.get("kind") != kind]
    if other:
      raise DataError(f"{path}: asked for kind={kind!r} but {other[0]['path']} was prepared as "
                      f"{other[0].get('kind')!r} rows: set data.kind to 'auto' or "
                      f"{other[0].get('kind')!r}, or prepare again with --kind {kind}")
  if pair_fields is not None:
    have = [list(p) for p in manifest["options"].get("pair_fields", [])]
    if have != [list(p) for p in pair_fields]:
      raise DataError(f"{path}: prepared with pair_fields {have}, asked for "
                      f"{[list(p) for p in pair_fields]}: prepare again with the fields wanted")
  _check_on_error(folder, manifest, on_error, "set data.on_error='skip' to accept the skips, or "
                  "fix the inputs and prepare again")
  return PreparedPairs(folder, manifest, shards)


# ---------------------------------------------------------------------------------------------
# Text (stage 1).
# ---------------------------------------------------------------------------------------------

class PreparedTextPart:
  """A prepared text dataset as a `sources.TextSource` part: texts by index, read on demand.

  `text_ids` are the global record indices of this part (a strided range once sharded).
  """

  def __init__(self, folder: str, manifest: dict, shards: _Shards, text_ids: range | None = None):
    self.folder, self.manifest, self._shards = folder, manifest, shards
    self.origins = tuple(s["path"] for s in manifest["sources"])
    self.text_ids = range(len(shards)) if text_ids is None else text_ids
    self.label = folder

  def __len__(self) -> int:
    return len(self.text_ids)

  def get(self, i: int) -> str:
    return decode_text(self._shards.read([self.text_ids[i]])[0])

  def get_many(self, idx: Sequence[int]) -> list[str]:
    return [decode_text(r) for r in self._shards.read([self.text_ids[i] for i in idx])]

  def locate(self, i: int) -> str:
    f, line = location(self._shards.read([self.text_ids[i]])[0])
    return f"{self.origins[f]}:{line}"

  def take(self, r: range) -> PreparedTextPart:
    return PreparedTextPart(self.folder, self.manifest, self._shards,
                            self.text_ids[r.start:r.stop:r.step])


def open_prepared_texts(spec: str | os.PathLike, *, fields: Sequence[str] | None = None,
                        min_chars: int | None = None, on_error: str = "raise",
                        dedupe: bool = False, verify: bool = False) -> PreparedTextPart:
  """Opens a prepared text dataset (stage 1); refuses one prepared for other fields, a lower
  min_chars than asked (`fields`/`min_chars` None: accept any) or without dedupe when `dedupe`."""
  folder, manifest, shards = _open(spec, "text", verify)
  path = os.path.join(folder, MANIFEST)
  options = manifest["options"]
  if fields is not None and list(options.get("field", [])) != list(fields):
    raise DataError(f"{path}: prepared with field {','.join(options.get('field', []))!r} but "
                    f"data.field is {','.join(fields)!r}: set data.field to match, or prepare "
                    "again with --field")
  if min_chars is not None and int(options.get("min_chars", 1)) < min_chars:
    raise DataError(f"{path}: prepared with min_chars={options.get('min_chars', 1)}, below "
                    f"data.min_chars={min_chars}: prepare again with --min-chars {min_chars}")
  if dedupe and not options.get("dedupe"):
    raise DataError(f"{path}: prepared without --dedupe but data.dedupe is set: prepare again "
                    "with --dedupe, or unset data.dedupe")
  _check_on_error(folder, manifest, on_error, "set data.on_error='skip' to accept the skips, or "
                  "fix the inputs and prepare again")
  return PreparedTextPart(folder, manifest, shards)
