"""The "pair_classification" task type: tell related pairs (label 1) from unrelated ones (0).

As mteb 2.26's `AbsTaskPairClassification` with cosine similarity (C-MTEB's Ocnli/Cmnli, MTEB's
SprintDuplicateQuestions, ...): each pair's cosine is its score; reported are the average
precision of the scores against the labels ("ap", scikit-learn's `average_precision_score`:
threshold-free), and the accuracy and F1 at the best threshold ("accuracy", "f1"; a threshold
never splits tied scores). mteb's `max_*` scores take the best over several similarity
functions; for a cosine model (normalised embeddings) the cosine scores are the ones to compare.

Data (`load_pair_classification_task`), a JSONL file of either
* labelled pairs: `{"sentence1", "sentence2", "label"}` or `{"text1", "text2", "label"}`
  (label 0/1; the Chinese `snli_zh` rows), or
* FlagEmbedding rows `{"query", "pos", "neg"}` (e.g. NLI triples): (query, each positive) is a
  1-pair, (query, each negative) a 0-pair.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bge_jax.eval import tasks
from bge_jax.eval.data import EvalDataError, TextPairs, iter_jsonl, where


def load_pair_classification_task(path: str) -> TextPairs:
  """Labelled pairs or FlagEmbedding rows (module docstring) -> `TextPairs` with 0/1 values."""
  s1: list[str] = []
  s2: list[str] = []
  labels: list[int] = []
  for line, row in iter_jsonl(path):
    if "query" in row:
      query, pos, neg = row.get("query"), row.get("pos"), row.get("neg", [])
      if not (isinstance(query, str) and isinstance(pos, list) and isinstance(neg, list)
              and all(isinstance(t, str) for t in pos + neg)):
        raise EvalDataError(f"{where(path, line)}: a query row needs \"query\" (string), "
                            "\"pos\" and \"neg\" (lists of strings)")
      for texts, label in ((pos, 1), (neg, 0)):
        s1.extend([query] * len(texts))
        s2.extend(texts)
        labels.extend([label] * len(texts))
      continue
    a = row.get("sentence1", row.get("text1"))
    b = row.get("sentence2", row.get("text2"))
    label = row.get("label")
    if not isinstance(a, str) or not isinstance(b, str):
      raise EvalDataError(f"{where(path, line)}: expected \"sentence1\"/\"sentence2\" (or "
                          "\"text1\"/\"text2\") strings, or a \"query\" row")
    if label not in (0, 1) or isinstance(label, bool):
      raise EvalDataError(f"{where(path, line)}: \"label\" is {label!r}; expected 0 or 1")
    s1.append(a)
    s2.append(b)
    labels.append(int(label))
  if len(set(labels)) != 2:
    raise EvalDataError(f"{where(path)}: pair classification needs pairs of both labels 0 and "
                        f"1; found {sorted(set(labels))}")
  return TextPairs(s1, s2, np.asarray(labels, np.float64))


def best_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
  """Best accuracy of "score > threshold means 1" over thresholds between distinct scores."""
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], labels[order]
  ok = np.flatnonzero(s[:-1] != s[1:])  # cut after row i: rows 0..i predicted 1
  positives = np.cumsum(y == 1)[ok]
  negatives_after = (y == 0).sum() - np.cumsum(y == 0)[ok]
  return float(((positives + negatives_after) / len(y)).max(initial=0.0))


def best_f1(scores: np.ndarray, labels: np.ndarray) -> float:
  """Best F1 of "score > threshold means 1" over thresholds between distinct scores."""
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], labels[order]
  ok = np.flatnonzero(s[:-1] != s[1:])
  true_pos = np.cumsum(y == 1)[ok]
  precision = true_pos / (ok + 1)
  recall = true_pos / max((y == 1).sum(), 1)
  with np.errstate(invalid="ignore", divide="ignore"):
    f1 = np.where(true_pos > 0, 2 * precision * recall / (precision + recall), 0.0)
  return float(f1.max(initial=0.0))


def evaluate_pair_classification(encoder: Any, data: TextPairs, settings: tasks.EvalSettings
                                 ) -> dict[str, float]:
  """{"ap", "accuracy", "f1"} of the pairs' cosines (module docstring); no instruction."""
  from sklearn.metrics import average_precision_score

  emb = tasks.encode_unique(encoder, data.s1 + data.s2, settings)
  cos = tasks.paired_cosine(emb[:len(data)], emb[len(data):])
  labels = data.values.astype(np.int64)
  return {"ap": float(average_precision_score(labels, cos)),
          "accuracy": best_accuracy(cos, labels), "f1": best_f1(cos, labels)}


def mteb_pair_classification_task(data: TextPairs, name: str) -> Any:
  from datasets import Dataset, DatasetDict
  from mteb.abstasks import AbsTaskPairClassification

  from bge_jax.eval.mteb_adapter import in_memory_task
  dataset = DatasetDict({"test": Dataset.from_dict(
      {"sentence1": data.s1, "sentence2": data.s2,
       "labels": data.values.astype(np.int64).tolist()})})
  return in_memory_task(AbsTaskPairClassification, name=name, task_type="PairClassification",
                        main_score="cosine_ap", eval_split="test", dataset=dataset)


PAIR_CLASSIFICATION = tasks.register(tasks.TaskType(
    name="pair_classification", category="PairClassification", main_metric="ap",
    load=load_pair_classification_task, evaluate=evaluate_pair_classification,
    to_mteb=mteb_pair_classification_task,
    mteb_metrics={"ap": "cosine_ap", "accuracy": "cosine_accuracy", "f1": "cosine_f1"},
    describe=lambda d: f"{len(d)} pairs ({int(d.values.sum())} positive)"))
