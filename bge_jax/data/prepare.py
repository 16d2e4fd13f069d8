"""Writes prepared datasets (`bge_jax.data.prepared`): the engine of launch/prepare_data.py.

Pipeline (every phase streams; memory is bounded whatever the number of rows):

1. Read, validate, write (parallel over input files, `workers` processes): each worker reads one
   input file with the in-memory path's own reader (`pairs._Reader` / `sources._Reader`, so the
   same `file:line` errors and `on_error="skip"` counts), and writes its rows as they come to
   shards of at most `rows_per_shard` rows, plus per shard the statistics the trainer needs
   (first row without negatives/scores, positives per row, types, the row whose positives cover
   every distinct positive). A worker holds one shard's statistics (O(rows_per_shard)); the main
   process holds O(shards). Shards follow input files, so the speed-up is up to
   min(workers, input files): split one huge file to parallelise it.
2. Exact dedupe (`dedupe=True`): every kept row (a pair row: all of its fields; a text: the text)
   has a 64-bit BLAKE2b hash, written per shard during phase 1. The hashes are partitioned by
   value into P temporary files (P chosen so that one partition, 16 bytes per row, fits
   `dedupe_memory`); each partition is sorted by (hash, row) and every row after the first of
   equal hashes is marked in a bitmap of 1 bit per row (12.5 MB per 100M rows). Then the shards are
   rewritten without the marked rows (parallel over shards). Two different rows share a 64-bit
   hash with probability about n^2 / 2^65 over the whole dataset (3e-4 at 100M rows): one such
   pair would drop one row wrongly. The drops are counted as skipped "duplicate".
3. Finalize: shards renamed in order, checksums (SHA-256, and CRC32 of the first/last 64 KiB for
   the cheap check when opening), the manifest written last, then the temporary folder (next to
   the output) is renamed to the output: an error or an interrupt leaves no partial output.
"""

from __future__ import annotations

import collections
from concurrent import futures
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bge_jax.data import files as files_lib
from bge_jax.data import pairs as pairs_lib
from bge_jax.data import prepared as fmt
from bge_jax.data import sources as sources_lib
from bge_jax.data.sources import DataError

log = logging.getLogger(__name__)

DEFAULT_ROWS_PER_SHARD = 250_000
DEFAULT_DEDUPE_MEMORY = 256 << 20
DUPLICATE = sources_lib.DUPLICATE
POOL_CAP = 1 << 16  # distinct positive hashes kept for the covering-row check (exact below it)

_counter: Any = None  # rows written, shared with the workers (progress bar)


def _hash(data: bytes) -> int:
  return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------
# Shard writing (phase 1 and the dedupe rewrite).
# ---------------------------------------------------------------------------------------------

class _ShardWriter:
  """Writes records to shards `{prefix}-{k:04d}.array_record` of at most `rows_per_shard` rows,
  with their statistics (`finish` -> one dict per shard)."""

  def __init__(self, work: str, prefix: str, rows_per_shard: int, kind: str, dedupe: bool,
               options: str):
    self.work, self.prefix, self.limit, self.options = work, prefix, rows_per_shard, options
    self.kind, self.dedupe = kind, dedupe
    self.shards: list[dict] = []
    self._writer = None
    self._pending = 0

  def _open(self) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter
    name = f"{self.prefix}-{len(self.shards):04d}"
    self._name = name
    self._writer = ArrayRecordWriter(os.path.join(self.work, name + ".array_record"),
                                     self.options)
    self._rows = 0
    self._hashes: list[int] = []
    self._npos: list[int] = []
    self._types: list[str | None] = []
    self._first: dict[str, int] = {}
    self._cover = (0, None)  # (distinct positives, local row) of the best neg-less row
    self._pool: set[int] = set()

  def add(self, location: tuple[int, int], body: bytes, row: pairs_lib.PairRow | None) -> None:
    if self._writer is None:
      self._open()
    self._writer.write(fmt.LOCATION.pack(*location) + body)
    i = self._rows
    self._rows += 1
    if self.dedupe:
      self._hashes.append(_hash(body))
    if row is not None:
      self._npos.append(len(row.pos))
      self._types.append(row.type)
      for what in fmt.ROW_FIELDS:
        if what not in self._first and not getattr(row, what):
          self._first[what] = i
      if not row.neg:
        distinct = len(set(row.pos))
        if distinct > self._cover[0]:
          self._cover = (distinct, i)
      if len(self._pool) < POOL_CAP:
        self._pool.update(_hash(p.encode("utf-8")) for p in row.pos)
    self._pending += 1
    if _counter is not None and self._pending >= 1024:
      with _counter.get_lock():
        _counter.value += self._pending
      self._pending = 0
    if self._rows >= self.limit:
      self._close()

  def _close(self) -> None:
    self._writer.close()
    self._writer = None
    base = os.path.join(self.work, self._name)
    path = base + ".array_record"
    info: dict[str, Any] = {"tmp": self._name, "rows": self._rows, **fmt.file_checks(path),
                            "sha256": fmt.sha256(path)}
    if self.dedupe:
      np.save(base + ".hash.npy", np.asarray(self._hashes, np.uint64))
    if self.kind == "pairs":
      vocab = sorted({t for t in self._types if t is not None})
      ids = {t: k + 1 for k, t in enumerate(vocab)}
      if vocab:
        np.save(base + ".types.npy", np.asarray([ids.get(t, 0) for t in self._types], np.uint16))
      npos = np.asarray(self._npos, np.int64)
      if (npos != 1).any():
        np.save(base + ".pos.npy", np.cumsum(npos))
      info.update(positives=int(npos.sum()), types=vocab, first=self._first,
                  cover=list(self._cover), pool=sorted(self._pool), uniform=bool((npos == 1).all()))
    self.shards.append(info)

  def finish(self) -> list[dict]:
    if self._writer is not None:
      self._close()
    if _counter is not None and self._pending:
      with _counter.get_lock():
        _counter.value += self._pending
      self._pending = 0
    return self.shards


class _PairSink(pairs_lib._Reader):  # pylint: disable=protected-access
  """The pair reader, its rows written to shards as they come instead of kept."""

  def __init__(self, writer: _ShardWriter, **kw):
    super().__init__(**kw)
    self.writer = writer

  def _keep(self, row: pairs_lib.PairRow, file_index: int, lineno: int) -> None:
    self.writer.add((file_index, lineno), fmt.encode_pair(row), row)


class _TextSink(sources_lib._Reader):  # pylint: disable=protected-access
  """The text reader, its texts written to shards as they come instead of kept."""

  def __init__(self, writer: _ShardWriter, file_index: int, **kw):
    super().__init__(**kw)
    self.writer, self.file_index = writer, file_index

  def _keep(self, text: str, path: str, lineno: int, texts: list, lines: list) -> None:
    self.writer.add((self.file_index, lineno), text.encode("utf-8"), None)


def _read_file(task: dict) -> dict:
  """Phase 1 for one input file (runs in a worker)."""
  i, path, o = task["index"], task["path"], task["options"]
  writer = _ShardWriter(task["work"], f"f{i:06d}", task["rows_per_shard"], task["data"],
                        o["dedupe"], task["writer_options"])
  if task["data"] == "pairs":
    reader = _PairSink(writer, kind=o["kind"], on_error=o["on_error"],
                       pair_fields=[tuple(p) for p in o["pair_fields"]])
    file_kind = reader.read(path, i)
    extra = {}
  else:
    reader = _TextSink(writer, i, fields=tuple(o["field"]), on_error=o["on_error"],
                       min_chars=o["min_chars"])
    reader.read(path)
    file_kind = "text"
    extra = {"json_rows": reader.rows, "field_rows": dict(reader.field_rows)}
  st = os.stat(path)
  return {"source": {"path": path, "bytes": st.st_size, "mtime": st.st_mtime, "kind": file_kind},
          "shards": writer.finish(), "skipped": dict(reader.skipped),
          "first_skipped": dict(reader.first_skipped), **extra}


def _rewrite_shard(task: dict) -> list[dict]:
  """Dedupe phase: shard `task["tmp"]` rewritten without the rows marked in `task["drop"]`."""
  from array_record.python.array_record_module import ArrayRecordReader
  work, src = task["work"], task["tmp"]
  drop = np.unpackbits(np.frombuffer(task["drop"], np.uint8), count=task["rows"],
                       bitorder="little").astype(bool)
  writer = _ShardWriter(work, src + "d", 1 << 62, task["data"], False, task["writer_options"])
  reader = ArrayRecordReader(os.path.join(work, src + ".array_record"))
  for lo in range(0, task["rows"], 4096):
    for j, record in enumerate(reader.read(lo, min(task["rows"], lo + 4096)), lo):
      if drop[j]:
        continue
      body = bytes(memoryview(record)[fmt.LOCATION.size:])
      row = fmt.decode_pair(record) if task["data"] == "pairs" else None
      writer.add(fmt.location(record), body, row)
  reader.close()
  shards = writer.finish()
  for suffix in (".array_record", ".hash.npy", ".types.npy", ".pos.npy"):
    if os.path.exists(os.path.join(work, src + suffix)):
      os.remove(os.path.join(work, src + suffix))
  return shards


# ---------------------------------------------------------------------------------------------
# Parallel map with a progress bar.
# ---------------------------------------------------------------------------------------------

def _init_worker(counter) -> None:
  global _counter
  _counter = counter


class _Workers:
  """`map(fn, tasks)` in order over `workers` spawned processes (1: in this process), with a
  progress bar of the rows written (a counter the workers share). ProcessPoolExecutor, not
  multiprocessing.Pool: a worker that dies raises here instead of hanging; spawn, not fork: the
  caller may hold threads (JAX). A worker imports no JAX (this module does not; `bge_jax`'s
  names are imported lazily): it starts in ~0.2 s. The pool starts once and serves every phase."""

  def __init__(self, workers: int, progress: bool):
    ctx = multiprocessing.get_context("spawn")
    self.counter = ctx.Value("q", 0)
    self.progress = progress
    self.pool = None
    if workers > 1:
      self.pool = futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                              initargs=(self.counter,))

  def close(self) -> None:
    if self.pool is not None:
      self.pool.shutdown(wait=True, cancel_futures=True)

  def map(self, fn, tasks: list, desc: str) -> list:
    global _counter
    from tqdm.auto import tqdm
    with self.counter.get_lock():
      self.counter.value = 0
    bar = tqdm(desc=desc, unit=" rows", unit_scale=True, disable=not self.progress,
               dynamic_ncols=True)
    shown = 0

    def tick() -> None:
      nonlocal shown
      value = self.counter.value
      bar.update(value - shown)
      shown = value

    try:
      if self.pool is None or len(tasks) <= 1:
        _counter = self.counter
        try:
          out = []
          for t in tasks:
            out.append(fn(t))
            tick()
          return out
        finally:
          _counter = None
      jobs = [self.pool.submit(fn, t) for t in tasks]
      try:
        while True:
          done, pending = futures.wait(jobs, timeout=0.5, return_when=futures.FIRST_EXCEPTION)
          tick()
          failed = next((j for j in done if j.exception() is not None), None)
          if failed is not None:
            raise failed.exception()
          if not pending:
            return [j.result() for j in jobs]
      except BaseException:
        for j in jobs:
          j.cancel()
        raise
    finally:
      tick()
      bar.close()


# ---------------------------------------------------------------------------------------------
# Dedupe.
# ---------------------------------------------------------------------------------------------

_PAIR_DTYPE = np.dtype([("h", "<u8"), ("r", "<i8")])


def _duplicates(work: str, shards: list[dict], total: int, memory: int) -> np.ndarray:
  """A bitmap (np.packbits, little bit order) over the rows: 1 for a row whose hash an earlier
  row has. External: partitions of the (hash, row) pairs, one in memory at a time."""
  parts = max(1, math.ceil(total * _PAIR_DTYPE.itemsize * 3 / memory))  # sort needs ~3x
  part_dir = os.path.join(work, "dedupe")
  os.makedirs(part_dir)
  handles = [open(os.path.join(part_dir, f"{p:05d}.bin"), "wb") for p in range(parts)]
  try:
    start = 0
    for s in shards:
      h = np.load(os.path.join(work, s["tmp"] + ".hash.npy"))
      pairs = np.empty(h.size, _PAIR_DTYPE)
      pairs["h"], pairs["r"] = h, np.arange(start, start + h.size)
      start += h.size
      p = (h % np.uint64(parts)).astype(np.int64)
      order = np.argsort(p, kind="stable")
      bounds = np.searchsorted(p[order], np.arange(parts + 1))
      for k in range(parts):
        if bounds[k + 1] > bounds[k]:
          handles[k].write(pairs[order[bounds[k]:bounds[k + 1]]].tobytes())
      os.remove(os.path.join(work, s["tmp"] + ".hash.npy"))
  finally:
    for f in handles:
      f.close()
  bitmap = np.zeros((total + 7) // 8, np.uint8)
  for k in range(parts):
    path = os.path.join(part_dir, f"{k:05d}.bin")
    pairs = np.fromfile(path, _PAIR_DTYPE)
    os.remove(path)
    if pairs.size < 2:
      continue
    pairs = pairs[np.lexsort((pairs["r"], pairs["h"]))]
    dup = pairs["r"][1:][pairs["h"][1:] == pairs["h"][:-1]]
    np.bitwise_or.at(bitmap, dup >> 3, (np.uint8(1) << (dup & 7).astype(np.uint8)))
  os.rmdir(part_dir)
  return bitmap


# ---------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------

def prepare(specs: Sequence[str], out: str, *, data: str = "pairs", kind: str = "auto",
            pair_fields: Sequence[tuple[str, str]] = pairs_lib.DEFAULT_PAIR_FIELDS,
            field: str | Sequence[str] = "text", min_chars: int = 1, on_error: str = "raise",
            dedupe: bool = False, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
            records_per_chunk: int = fmt.RECORDS_PER_CHUNK,
            workers: int = 1, overwrite: bool = False, progress: bool = True,
            dedupe_memory: int = DEFAULT_DEDUPE_MEMORY) -> dict:
  """Reads, validates and writes `specs` as a prepared dataset folder `out`; returns its manifest.

  Args:
    specs: files, folders or globs (as `open_contrastive_data` / `open_text_source` take them),
      concatenated in order.
    out: the output folder (must not exist unless `overwrite`).
    data: "pairs" (contrastive rows, stage 2/3) or "text" (stage 1 texts).
    kind, pair_fields: as `open_contrastive_data` (data="pairs").
    field, min_chars: as `open_text_source` (data="text").
    on_error: "raise" (the first bad row raises DataError naming file:line; nothing is written)
      or "skip" (counted per reason in the manifest, with the first file:line per reason).
    dedupe: drop exact duplicate rows (module docstring), counted as skipped "duplicate".
    rows_per_shard: the most rows per shard file.
    records_per_chunk: array_record records per compressed chunk (`prepared.writer_options`: 1
      reads fastest, 4 keeps a quarter of the reader's index in memory).
    workers: processes reading input files in parallel (1: this process).
    dedupe_memory: bytes of hashes sorted at once in the dedupe phase.

  Raises:
    DataError: a spec names nothing, a bad row (on_error="raise"), no usable row, `out` exists.
    ValueError: a bad option.
  """
  if data not in fmt.KINDS:
    raise ValueError(f"data={data!r}; use one of {fmt.KINDS}")
  if on_error not in sources_lib.ON_ERROR:
    raise ValueError(f"on_error={on_error!r}; use 'raise' or 'skip'")
  if rows_per_shard < 1 or workers < 1 or records_per_chunk < 1:
    raise ValueError(f"rows_per_shard={rows_per_shard}, workers={workers}, records_per_chunk="
                     f"{records_per_chunk}: each must be >= 1")
  options_string = fmt.writer_options(records_per_chunk)
  specs = [s for s in (os.fspath(s).strip() for s in specs) if s]
  if not specs:
    raise DataError("no input given: name JSONL/TSV/txt files, folders or globs")
  if data == "pairs":
    if kind not in pairs_lib.KINDS:
      raise ValueError(f"kind={kind!r}; use one of {pairs_lib.KINDS}")
    kind = "fe" if kind == "flag" else kind
    options = {"kind": kind, "pair_fields": [list(p) for p in pair_fields]}
    resolve = pairs_lib._resolve_files  # pylint: disable=protected-access
  else:
    if min_chars < 1:
      raise ValueError(f"min_chars={min_chars}; it must be at least 1")
    options = {"field": list(sources_lib._parse_fields(field)),  # pylint: disable=protected-access
               "min_chars": min_chars}
    resolve = sources_lib._resolve_files  # pylint: disable=protected-access
  options.update(on_error=on_error, dedupe=dedupe)
  for s in specs:
    if fmt.is_prepared(s):
      raise DataError(f"{s} is a prepared dataset already; name its input files instead")
  paths = [p for s in specs for p in resolve(s)]

  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(out) and not overwrite:
    raise DataError(f"{out} exists; choose another output folder or pass --overwrite")
  # Staging beside OUT; one left by a killed run (its process gone) is removed here.
  work = files_lib.staging_dir(out)
  pool = _Workers(min(workers, len(paths)), progress)
  try:
    t0 = time.perf_counter()
    tasks = [{"index": i, "path": p, "work": work, "data": data, "options": options,
              "rows_per_shard": rows_per_shard, "writer_options": options_string}
             for i, p in enumerate(paths)]
    results = pool.map(_read_file, tasks, "prepare")
    shards = [s for r in results for s in r["shards"] if s["rows"]]
    skipped: collections.Counter[str] = collections.Counter()
    first_skipped: dict[str, str] = {}
    for r in results:
      skipped.update(r["skipped"])
      for reason, where in r["first_skipped"].items():
        first_skipped.setdefault(reason, where)
    if data == "text":
      _warn_unused_fields(options["field"], results)
    total = sum(s["rows"] for s in shards)
    read_s = time.perf_counter() - t0
    if dedupe and total:
      bitmap = _duplicates(work, shards, total, dedupe_memory)
      dups = np.unpackbits(bitmap, count=total, bitorder="little")
      n_dup = int(dups.sum())
      if n_dup:
        first = int(np.argmax(dups))
        s_at = int(np.searchsorted(np.cumsum([s["rows"] for s in shards]), first, side="right"))
        from array_record.python.array_record_module import ArrayRecordReader
        reader = ArrayRecordReader(os.path.join(work, shards[s_at]["tmp"] + ".array_record"))
        start = sum(s["rows"] for s in shards[:s_at])
        f_i, line = fmt.location(reader.read([first - start])[0])
        reader.close()
        skipped[DUPLICATE] += n_dup
        first_skipped[DUPLICATE] = f"{paths[f_i]}:{line}"
        start, tasks = 0, []
        for s in shards:
          tasks.append({"work": work, "tmp": s["tmp"], "rows": s["rows"], "data": data,
                        "writer_options": options_string,
                        "drop": np.packbits(dups[start:start + s["rows"]],
                                            bitorder="little").tobytes()})
          start += s["rows"]
        del dups, bitmap
        shards = [s for r in pool.map(_rewrite_shard, tasks, "dedupe") for s in r if s["rows"]]
        total = sum(s["rows"] for s in shards)
    if not total:
      raise DataError(f"inputs {', '.join(specs)}: no usable row in {len(paths)} file"
                      f"{'s' if len(paths) != 1 else ''}"
                      + fmt.skip_line(dict(skipped), first_skipped))
    manifest = _finalize(work, shards, data, options, results, dict(skipped), first_skipped,
                         specs)
    manifest["writer_options"] = options_string
    manifest["prepare_seconds"] = {"read": round(read_s, 3),
                                   "total": round(time.perf_counter() - t0, 3)}
    _write_json(os.path.join(work, fmt.MANIFEST), manifest)
    files_lib.replace_dir(work, out)  # overwrite: the old output goes once the new one is whole
    return manifest
  except BaseException:
    shutil.rmtree(work, ignore_errors=True)
    raise
  finally:
    pool.close()


def _warn_unused_fields(fields: list[str], results: list[dict]) -> None:
  rows = sum(r.get("json_rows", 0) for r in results)
  seen: collections.Counter[str] = collections.Counter()
  for r in results:
    seen.update(r.get("field_rows", {}))
  if len(fields) > 1 and rows:
    unused = [f for f in fields if not seen[f]]
    if unused:
      log.warning("data: no row of the JSON files holds field(s) %s (of --field %s)",
                  ", ".join(map(repr, unused)), ",".join(fields))


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False)
    f.write("\n")


def _finalize(work: str, shards: list[dict], data: str, options: dict, results: list[dict],
              skipped: dict, first_skipped: dict, specs: list[str]) -> dict:
  """Renames the shards in order, merges their statistics; returns the manifest."""
  n = len(shards)
  entries = []
  pairs: dict[str, Any] = {}
  if data == "pairs":
    vocab = sorted({t for s in shards for t in s["types"]})
    ids = {t: k + 1 for k, t in enumerate(vocab)}
    first: dict[str, int | None] = {w: None for w in fmt.ROW_FIELDS}
    pool: set[int] = set()
    cover = (0, None)
    start = 0
    uniform = all(s["uniform"] for s in shards)
    for s in shards:
      for w, i in s["first"].items():
        if first[w] is None:
          first[w] = start + i
      if s["cover"][1] is not None and s["cover"][0] > cover[0]:
        cover = (s["cover"][0], start + s["cover"][1])
      if len(pool) < POOL_CAP:
        pool.update(s["pool"])
      start += s["rows"]
    # A neg-less row covers every distinct positive when its distinct positives number as many
    # as the dataset's (exact while the dataset has fewer than POOL_CAP distinct positives).
    covering = cover[1] if cover[1] is not None and len(pool) < POOL_CAP and \
        cover[0] >= len(pool) else None
    pairs = {"positives": int(sum(s["positives"] for s in shards)), "types": vocab,
             "first_row_without": first, "covering_row": covering}
  for k, s in enumerate(shards):
    name = fmt.shard_name(k, n)
    src = os.path.join(work, s["tmp"])
    os.rename(src + ".array_record", os.path.join(work, name + ".array_record"))
    entry = {"file": name + ".array_record", "rows": s["rows"], "bytes": s["bytes"],
             "sha256": s["sha256"], "head_crc32": s["head_crc32"], "tail_crc32": s["tail_crc32"]}
    if data == "pairs":
      entry["positives"] = s["positives"]
      if vocab:
        local = s["types"]
        table = np.asarray([0] + [ids[t] for t in local], np.uint16)
        types = (table[np.load(src + ".types.npy")] if local
                 else np.zeros(s["rows"], np.uint16))
        np.save(os.path.join(work, name + ".types.npy"), types)
      if os.path.exists(src + ".types.npy"):
        os.remove(src + ".types.npy")
      if not uniform:
        cum = (np.load(src + ".pos.npy") if os.path.exists(src + ".pos.npy")
               else np.arange(1, s["rows"] + 1, dtype=np.int64))
        np.save(os.path.join(work, name + ".pos.npy"), cum)
      if os.path.exists(src + ".pos.npy"):
        os.remove(src + ".pos.npy")
    entries.append(entry)
  leftover = [f for f in os.listdir(work) if f.startswith("f") and f.endswith(".array_record")]
  for f in leftover:  # empty shards
    os.remove(os.path.join(work, f))
  manifest = {
      "format": fmt.FORMAT, "version": fmt.VERSION, "kind": data,
      "record": list(fmt.PAIR_RECORD if data == "pairs" else fmt.TEXT_RECORD),
      "options": options, "rows": int(sum(s["rows"] for s in shards)), "shards": entries,
      "sources": [r["source"] for r in results], "skipped": skipped,
      "first_skipped": first_skipped,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  if data == "pairs":
    stem = pairs_lib._stem  # pylint: disable=protected-access
    manifest["no_in_batch_neg"] = all(stem(s).endswith(pairs_lib.NO_IN_BATCH_SUFFIX) for s in specs)
    manifest["pairs"] = pairs
  return manifest
