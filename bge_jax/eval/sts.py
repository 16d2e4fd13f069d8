"""Semantic textual similarity: read STS pairs, score them with the Spearman of cosine similarities.

Two file formats are read (`read_sts` tells them apart by the first line):

* the STS Benchmark TSV (`stsbenchmark.train-dev.tsv`): a header naming at least `score`,
  `sentence1` and `sentence2` (usually `split genre dataset year sid score sentence1 sentence2`),
  tab-separated, no quoting (sentences contain bare `"`), CRLF or LF line ends. `split=` keeps
  the rows whose `split` column equals it ('train', 'dev', ...).
* the headerless three-column format of the Chinese STS-B (`STS-B.valid.data`):
  `sentence1<TAB>sentence2<TAB>score`.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Sequence

import numpy as np

from bge_jax.eval import tasks
from bge_jax.eval.data import EvalDataError, TextPairs, require_file, where

REQUIRED_COLUMNS = ("score", "sentence1", "sentence2")


def _score(value: str, path: str | os.PathLike, line: int) -> float:
  try:
    score = float(value)
  except ValueError:
    raise EvalDataError(f"{where(path, line)}: score {value!r} is not a number") from None
  if not np.isfinite(score):
    raise EvalDataError(f"{where(path, line)}: score {value!r} is not finite")
  return score


def read_sts(path: str | os.PathLike,
             split: str | None = None) -> tuple[list[str], list[str], np.ndarray]:
  """Reads STS pairs: (sentences1, sentences2, gold scores as float64 [N]).

  Args:
    path: an STS Benchmark TSV with a header, or a headerless `s1<TAB>s2<TAB>score` file.
    split: keep only rows whose `split` column has this value (header format only); None keeps
      every row.

  Raises:
    EvalDataError: missing file, a row with the wrong number of fields or a non-numeric score
      (the message names `path:line`), `split` on a file without a split column, or no pairs.
  """
  require_file(path)
  s1: list[str] = []
  s2: list[str] = []
  scores: list[float] = []
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    first = next(reader, None)
    if first is None:
      raise EvalDataError(f"{where(path)}: empty file")
    header = [c.strip() for c in first]
    if all(c in header for c in REQUIRED_COLUMNS):
      col = {name: i for i, name in enumerate(header)}
      if split is not None and "split" not in col:
        raise EvalDataError(f"{where(path, 1)}: split={split!r} asked for, but the header has no "
                            f"'split' column ({' '.join(header)})")
      seen_splits: set[str] = set()
      for row in reader:
        line = reader.line_num
        if not any(row):
          continue
        if len(row) != len(header):
          raise EvalDataError(f"{where(path, line)}: {len(row)} tab-separated fields, the header "
                              f"has {len(header)}")
        if split is not None:
          seen_splits.add(row[col["split"]])
          if row[col["split"]] != split:
            continue
        s1.append(row[col["sentence1"]])
        s2.append(row[col["sentence2"]])
        scores.append(_score(row[col["score"]], path, line))
      if split is not None and not s1:
        raise EvalDataError(f"{where(path)}: no rows with split={split!r}; the file has "
                            f"{sorted(seen_splits)}")
    else:
      if split is not None:
        raise EvalDataError(f"{where(path)}: split={split!r} asked for, but this is a headerless "
                            "s1<TAB>s2<TAB>score file with no split column")
      _three_columns(first, path, 1, s1, s2, scores)
      for row in reader:
        _three_columns(row, path, reader.line_num, s1, s2, scores)
  if not s1:
    raise EvalDataError(f"{where(path)}: no sentence pairs")
  return s1, s2, np.asarray(scores, np.float64)


def _three_columns(row: list[str], path: str | os.PathLike, line: int, s1: list[str],
                   s2: list[str], scores: list[float]) -> None:
  if not any(row):
    return
  if len(row) != 3:
    raise EvalDataError(f"{where(path, line)}: {len(row)} tab-separated fields; expected "
                        "sentence1<TAB>sentence2<TAB>score (or an STS Benchmark header naming "
                        "score, sentence1, sentence2)")
  s1.append(row[0])
  s2.append(row[1])
  scores.append(_score(row[2], path, line))


def cosine_scores(encoder: Any, s1: Sequence[str], s2: Sequence[str], *, batch_size: int = 256,
                  max_length: int = 512, instruction: str | None = None) -> np.ndarray:
  """Cosine similarity [N] (float64) of each pair; each distinct sentence is encoded once."""
  if len(s1) != len(s2):
    raise ValueError(f"{len(s1)} first sentences but {len(s2)} second sentences")
  settings = tasks.EvalSettings(batch_size=batch_size, max_length=max_length)
  emb = tasks.encode_unique(encoder, list(s1) + list(s2), settings, instruction)
  return tasks.paired_cosine(emb[:len(s1)], emb[len(s1):])


def sts_spearman(encoder: Any, s1: Sequence[str], s2: Sequence[str], scores: Sequence[float], *,
                 batch_size: int = 256, max_length: int = 512,
                 instruction: str | None = None) -> float:
  """Spearman rank correlation between the pairs' embedding cosines and the gold `scores`.

  Args:
    encoder: anything with `encode(texts, batch_size=, max_length=, instruction=) -> [N, D]`,
      e.g. `bge_jax.Encoder`.
    s1, s2: the pairs' sentences.
    scores: gold similarity scores [N].
    batch_size, max_length: passed to `encoder.encode`.
    instruction: prepended to every sentence (STS is symmetric: BGE uses none).
  """
  from scipy.stats import spearmanr

  scores = np.asarray(scores, np.float64)
  if scores.shape != (len(s1),):
    raise ValueError(f"scores has shape {scores.shape}; expected ({len(s1)},)")
  if len(s1) < 2:
    raise ValueError("Spearman correlation needs at least 2 pairs")
  cos = cosine_scores(encoder, s1, s2, batch_size=batch_size, max_length=max_length,
                      instruction=instruction)
  return float(spearmanr(cos, scores).statistic)


# ---------------------------------------------------------------------------------------------
# The "sts" task type (mteb's AbsTaskSTS: Spearman and Pearson of cosine vs the gold scores)
# ---------------------------------------------------------------------------------------------

def load_sts_task(path: str, split: str | None = None) -> TextPairs:
  """`read_sts(path, split)` as `TextPairs`; `split` is ignored (all rows) for a file without a
  split column (the headerless Chinese STS-B format)."""
  try:
    s1, s2, scores = read_sts(path, split)
  except EvalDataError as e:
    if split is None or "asked for, but" not in str(e):
      raise
    s1, s2, scores = read_sts(path)
  return TextPairs(s1, s2, scores)


def evaluate_sts(encoder: Any, data: TextPairs, settings: tasks.EvalSettings) -> dict[str, float]:
  """{"spearman", "pearson"} of the pairs' cosines against the gold scores (no instruction)."""
  from scipy.stats import pearsonr, spearmanr

  if len(data) < 2:
    raise ValueError("STS needs at least 2 pairs")
  cos = cosine_scores(encoder, data.s1, data.s2, batch_size=settings.batch_size,
                      max_length=settings.max_length)
  return {"spearman": float(spearmanr(cos, data.values).statistic),
          "pearson": float(pearsonr(cos, data.values).statistic)}


def mteb_sts_task(data: TextPairs, name: str) -> Any:
  from datasets import Dataset, DatasetDict
  from mteb.abstasks import AbsTaskSTS

  from bge_jax.eval.mteb_adapter import in_memory_task
  dataset = DatasetDict({"test": Dataset.from_dict(
      {"sentence1": data.s1, "sentence2": data.s2, "score": [float(v) for v in data.values]})})
  return in_memory_task(AbsTaskSTS, name=name, task_type="STS", main_score="cosine_spearman",
                        eval_split="test", dataset=dataset,
                        attrs={"min_score": float(data.values.min()),
                               "max_score": float(data.values.max())})


STS = tasks.register(tasks.TaskType(
    name="sts", category="STS", main_metric="spearman", load=load_sts_task,
    evaluate=evaluate_sts, to_mteb=mteb_sts_task,
    mteb_metrics={"spearman": "cosine_spearman", "pearson": "cosine_pearson"},
    describe=lambda d: f"{len(d)} pairs"))
