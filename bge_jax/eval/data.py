"""Shared helpers for evaluation data files: one error type that names `file:line`, JSONL rows,
the row formats several task types read."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np


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


@dataclasses.dataclass(frozen=True)
class TextPairs:
  """Sentence pairs with one value each: STS gold scores, or 0/1 pair-classification labels.

  Attributes:
    s1, s2: the pairs' texts [N].
    values: float64 [N].
  """
  s1: list[str]
  s2: list[str]
  values: np.ndarray

  def __len__(self) -> int:
    return len(self.s1)


def read_query_rows(path: str | os.PathLike) -> list[tuple[str, list[str], list[str]]]:
  """FlagEmbedding fine-tuning rows `{"query", "pos": [...], "neg": [...]}` -> [(query, pos,
  neg)]; other keys (prompt, scores, type) are ignored. A row without a query or a positive raises
  (naming `path:line`)."""
  rows = []
  for line, row in iter_jsonl(path):
    query, pos, neg = row.get("query"), row.get("pos"), row.get("neg", [])
    if not isinstance(query, str) or not query:
      raise EvalDataError(f"{where(path, line)}: \"query\" must be a non-empty string")
    for key, value in (("pos", pos), ("neg", neg)):
      if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise EvalDataError(f"{where(path, line)}: \"{key}\" must be a list of strings")
    if not pos:
      raise EvalDataError(f"{where(path, line)}: \"pos\" is empty; every query needs a positive")
    rows.append((query, list(pos), list(neg)))
  if not rows:
    raise EvalDataError(f"{where(path)}: no rows")
  return rows


def read_labelled_texts(path: str | os.PathLike) -> list[tuple[str, Any, str | None]]:
  """`{"text", "label", "split"?}` rows -> [(text, label, split or None)]; label str or int."""
  rows = []
  for line, row in iter_jsonl(path):
    text, label, split = row.get("text"), row.get("label"), row.get("split")
    if not isinstance(text, str) or not text:
      raise EvalDataError(f"{where(path, line)}: \"text\" must be a non-empty string")
    if not isinstance(label, (str, int)) or isinstance(label, bool):
      raise EvalDataError(f"{where(path, line)}: \"label\" must be a string or an integer")
    if split is not None and not isinstance(split, str):
      raise EvalDataError(f"{where(path, line)}: \"split\" must be a string")
    rows.append((text, label, split))
  if not rows:
    raise EvalDataError(f"{where(path)}: no rows")
  return rows
