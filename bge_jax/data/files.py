"""Which data files a spec (a file, a folder, or a glob) names and how their rows are read, shared
by every data reader; and the atomic writers of files (`atomic_file`) and output folders
(`atomic_output_dir`, `staging_dir`). Needs no JAX: data-preparation workers import it."""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import zlib
from typing import IO, Callable, Iterator, Sequence

log = logging.getLogger(__name__)
GLOB_CHARS = re.compile(r"[*?\[]")

# What a damaged gzip stream raises while being read: EOFError when it ends before the
# end-of-stream marker (a truncated download or copy), BadGzipFile (an OSError) for a bad header
# or CRC, zlib.error for corrupt deflate data. Readers catch these where they can still keep the
# rows read before the damage, so they are not lumped in with other OSErrors.
DAMAGED = (EOFError, gzip.BadGzipFile, zlib.error)
DAMAGE_REASON = "damaged_file"  # The `skipped` reason counted for a damaged file, once per file.
DAMAGE_FIX = "the file is truncated or corrupt: re-download or recompress it"


def open_data(path: str) -> IO[bytes]:
  """`path` opened for reading bytes, decompressed when it ends in .gz."""
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def damaged(path: str, line: int | None, e: BaseException) -> str:
  """The one-line message for a damaged file, `line` the first line not read whole (if known)."""
  where = f"{path}:{line}" if line else path
  return f"{where}: {DAMAGE_FIX} ({type(e).__name__}: {e})"


def read_head(f: IO[bytes], size: int = 4096) -> bytes:
  """Up to `size` first bytes of `f`; on a damaged stream, those read before the damage (the
  caller meets the damage again, with its line number, when it reads the rest)."""
  chunks: list[bytes] = []
  got = 0
  try:
    while got < size:
      chunk = f.read(min(512, size - got))  # small reads: little is lost to the damage
      if not chunk:
        break
      chunks.append(chunk)
      got += len(chunk)
  except DAMAGED:
    pass
  return b"".join(chunks)


def has_suffix(name: str, suffixes: Sequence[str]) -> bool:
  """True when `name` (optionally .gz) ends with one of `suffixes`."""
  base = name[:-3] if name.endswith(".gz") else name
  return base.endswith(tuple(suffixes))


def folder_files(folder: str, suffixes: Sequence[str]) -> list[str]:
  """Data files below `folder`, recursively, hidden names skipped, sorted by relative path."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    found.extend(os.path.join(root, f) for f in files
                 if not f.startswith(".") and has_suffix(f, suffixes))
  return sorted(found, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def resolve_files(spec: str, suffixes: Sequence[str], error: type[Exception], *,
                  name_hint: str, other_specs: str = "") -> list[str]:
  """The files `spec` names, in order; raises `error` naming the spec when there are none.

  `name_hint` tells how to name a file so its format is known (e.g. "*.jsonl (or *.json) for
  JSON rows or *.txt for one text per line"); `other_specs` lists further spec forms the caller
  accepts, for the "no such file" message.
  """
  kinds = ", ".join(f"*{s}" for s in suffixes[:-1]) + f" or *{suffixes[-1]}"
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    files = folder_files(path, suffixes)
    if not files:
      raise error(f"data spec {spec!r}: the folder holds no {kinds} files "
                  "(optionally .gz; hidden files are ignored)")
    return files
  if os.path.isfile(path):
    if not has_suffix(path, suffixes):
      raise error(f"data spec {spec!r}: cannot tell the format from the name; name the file "
                  f"{name_hint} (optionally .gz)")
    return [path]
  if GLOB_CHARS.search(path):
    files = []
    for m in sorted(glob.glob(path, recursive=True)):
      if os.path.isdir(m):
        files.extend(folder_files(m, suffixes))
      elif has_suffix(m, suffixes):
        files.append(m)
    if not files:
      raise error(f"data spec {spec!r}: the pattern matches no {kinds} files")
    return files
  raise error(f"data spec {spec!r}: no such file or folder (nor a glob pattern"
              f"{', nor ' + other_specs if other_specs else ''})")


def nonblank_lines(f: IO[bytes], on_damage: Callable[[int, BaseException], None]
                   ) -> Iterator[tuple[int, bytes]]:
  """(line number, line without its break) of the non-blank lines of a binary data file, a UTF-8
  BOM dropped: the one line reader of text sources and pair files. A damaged .gz stream ends the
  lines with `on_damage(line number reached, error)`, which raises or records the damage."""
  lineno = 0
  try:
    for lineno, raw in enumerate(f, 1):
      if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
      raw = raw.rstrip(b"\r\n")
      if raw and not raw.isspace():
        yield lineno, raw
  except DAMAGED as e:
    on_damage(lineno + 1, e)


class DataError(ValueError):
  """A data source cannot be opened or holds a bad row; the message says where and how to fix."""


class BadRow(Exception):
  """One row failed validation: `reason` (the skip-count key) and a human-readable `problem`."""

  def __init__(self, reason: str, problem: str):
    super().__init__(problem)
    self.reason, self.problem = reason, problem


class RowReader:
  """What the text and pair readers share: `on_error`, the skip counts per reason with the first
  `file:line` of each, and the handling of bad rows and damaged .gz files.

  Subclasses validate rows and call `bad` for each bad one; `option` is how messages name the
  on_error setting ("data.on_error" for the trainer's text sources).
  """

  option = "on_error"

  def __init__(self, on_error: str):
    self.on_error = on_error
    self.skipped: collections.Counter[str] = collections.Counter()
    self.first_skipped: dict[str, str] = {}

  def count(self, reason: str, path: str, lineno: int) -> None:
    self.skipped[reason] += 1
    self.first_skipped.setdefault(reason, f"{path}:{lineno}")

  def bad(self, path: str, lineno: int, row: BadRow) -> None:
    """A bad row: raises DataError naming file:line (on_error="raise") or counts it."""
    if self.on_error == "raise":
      raise DataError(f"{path}:{lineno}: {row.problem}. Fix the row, or set {self.option}='skip' "
                      "to count and skip bad rows.")
    self.count(row.reason, path, lineno)

  def damaged(self, path: str, lineno: int, e: BaseException) -> None:
    """A damaged compressed file: raises, or (on_error="skip") counts it once, keeping the rows
    read before the damage."""
    message = damaged(path, lineno, e)
    if self.on_error == "raise":
      raise DataError(f"{message}; or set {self.option}='skip' to keep the rows before line "
                      f"{lineno}")
    logging.getLogger(type(self).__module__).warning(
        "data: %s; kept the rows before line %d (%s='skip')", message, lineno, self.option)
    self.count(DAMAGE_REASON, path, lineno)

  def lines(self, path: str, f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of the non-blank lines of `f`, damage handled by `damaged`."""
    return nonblank_lines(f, lambda line, e: self.damaged(path, line, e))


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO]:
  """Yields a file whose content appears at `path` only when the block completes: written to a
  temporary file beside it, flushed to disk, then renamed, so `path` holds either its old content
  or all of the new (also on a full disk, or when several hosts share the folder), and an error
  (or an interrupt) leaves no temporary file. The file gets the mode an ordinary open() would give
  it, or the old file's."""
  folder = os.path.dirname(os.path.abspath(path))
  # Unique per writer; O_EXCL with mode 0o666 gives open()'s permissions (umask applied) without
  # reading the umask, which only os.umask can do, and that changes it for every thread.
  tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    if os.path.exists(path):
      os.fchmod(fd, os.stat(path).st_mode & 0o777)
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      fd = None  # the file object owns it now
      yield f
      f.flush()
      # Some file systems (NFS, delayed allocation) report a full disk only here, not at write.
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if fd is not None:
      os.close(fd)
    try:
      os.remove(tmp)
    except OSError:
      pass  # cleanup is best effort: never mask the real error
    raise


# Output folders: written in a staging folder beside OUT, renamed to OUT when complete.

def replace_dir(tmp: str, out_dir: str) -> None:
  """Moves `tmp` to `out_dir`; an existing `out_dir` is swapped out only once tmp is complete."""
  if os.path.exists(out_dir):
    old = tmp + ".old"
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, out_dir)


def _staging_prefix(out_dir: str) -> str:
  """`.OUT.tmp-`: the name of OUT's staging folders up to the creator's pid@host."""
  return f".{os.path.basename(out_dir)}.tmp-"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # e.g. PermissionError: the process exists, under another user
    return True
  return True


def remove_stale_staging(out_dir: str) -> list[str]:
  """Removes the staging folders beside `out_dir` that conversions killed on this host left
  (`.OUT.tmp-PID@HOST-*`, PID no longer running); returns their paths.

  A live process's folder (a concurrent conversion into the same OUT), another host's (its pid
  cannot be checked from here, on a shared file system) and unnamed older ones are left alone.
  """
  parent = os.path.dirname(out_dir)
  pattern = re.compile(re.escape(_staging_prefix(out_dir)) + r"(\d+)@(.+)-[^-]+$")
  host = socket.gethostname()
  removed = []
  try:
    names = os.listdir(parent)
  except OSError:
    return removed
  for name in sorted(names):
    m = pattern.match(name)
    path = os.path.join(parent, name)
    if (not m or m.group(2) != host or os.path.islink(path) or not os.path.isdir(path)
        or _pid_alive(int(m.group(1)))):
      continue
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.exists(path):
      removed.append(path)
      log.warning("removed %s: the staging folder of an earlier conversion into %s that was "
                  "killed (process %s is gone)", path, out_dir, m.group(1))
  return removed


def staging_dir(out_dir: str) -> str:
  """A new, empty staging folder `.OUT.tmp-PID@HOST-*` beside `out_dir` (parents created), after
  removing those of writers into OUT that were killed (`remove_stale_staging`). The caller
  renames it to OUT when complete and removes it on failure."""
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  remove_stale_staging(out_dir)
  return tempfile.mkdtemp(
      prefix=f"{_staging_prefix(out_dir)}{os.getpid()}@{socket.gethostname()}-", dir=parent)


def atomic_output_dir(out_dir: str, write: Callable[[str], None], *, overwrite: bool = False) -> str:
  """Runs `write(tmp_dir)` and renames tmp_dir to `out_dir`; nothing is left behind on failure.

  tmp_dir is `.OUT.tmp-PID@HOST-*` beside OUT: a process killed mid-write cannot remove it, so
  the next call for the same OUT removes those whose process is gone (`remove_stale_staging`).
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists; choose another output folder or pass overwrite=True.")
  tmp = staging_dir(out_dir)
  try:
    write(tmp)
    replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
