"""Which data files a spec (a file, a folder, or a glob) names: shared by every data reader."""

from __future__ import annotations

import glob
import os
import re
from typing import Sequence

GLOB_CHARS = re.compile(r"[*?\[]")


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
