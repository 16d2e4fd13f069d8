"""Shared helpers for evaluation data files: one error type that names `file:line`, JSONL rows."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator


class EvalDataError(ValueError):
  """A missing or malformed evaluation file; the message starts with `path` or `path:line`."""


def where(path: str | os.PathLike, line: int | None = None) -> str:
  return f"{os.fspath(path)}:{line}" if line is not None else os.fspath(path)


def require_file(path: str | os.PathLike) -> None:
  if not os.path.isfile(path):
    raise EvalDataError(f"{where(path)}: no such file")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, object) for each non-blank line; a line that is not a JSON object raises."""
  require_file(path)
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise EvalDataError(f"{where(path, n)}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise EvalDataError(f"{where(path, n)}: expected a JSON object, got {type(row).__name__}")
      yield n, row
