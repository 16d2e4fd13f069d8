"""The "classification" task type: logistic regression on embeddings (mteb's protocol).

As mteb 2.26's `AbsTaskClassification` (C-MTEB's TNews, IFlyTek, ...; MTEB's Banking77, ...):
`n_experiments` times, a training set of `samples_per_label` texts per label is drawn from the
train split (mteb's undersampling: the train indices are shuffled by a fresh
`np.random.RandomState(seed)` each experiment, cumulatively, and the first `samples_per_label` of
each label are kept), a scikit-learn `LogisticRegression(max_iter=max_iter,
random_state=seed)` is fitted on their embeddings and predicts the test split; reported are the
means over experiments of accuracy (the main score) and macro F1. Embeddings are used as the
encoder returns them (normalised for BGE), with no instruction.

Data (`load_classification_task`): a JSONL file of `{"text", "label", "split"}` rows (split
"train" or "test"), or `stdlib` for the generated Python standard-library corpus labelled by
package (`bge_jax.eval.suite.stdlib_labelled`).

Cost: one encode of the test split and of the union of the experiments' training samples
(at most n_experiments * samples_per_label * labels texts), then n_experiments small fits.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import numpy as np

from bge_jax.eval import tasks
from bge_jax.eval.data import EvalDataError, read_labelled_texts, where


@dataclasses.dataclass(frozen=True)
class ClassificationData:
  """Train and test texts with labels, and mteb's protocol settings (its defaults)."""
  train_texts: list[str]
  train_labels: list[Any]
  test_texts: list[str]
  test_labels: list[Any]
  n_experiments: int = 10
  samples_per_label: int = 8
  max_iter: int = 100
  seed: int = 42


def load_classification_task(path: str, **protocol: Any) -> ClassificationData:
  """`{"text", "label", "split"}` JSONL rows (split train/test), or "stdlib"; `protocol`
  overrides ClassificationData's n_experiments, samples_per_label, max_iter, seed."""
  if path == "stdlib":
    from bge_jax.eval.suite import stdlib_classification
    return dataclasses.replace(stdlib_classification(), **protocol)
  split_rows: dict[str, tuple[list[str], list[Any]]] = {"train": ([], []), "test": ([], [])}
  for text, label, split in read_labelled_texts(path):
    if split not in split_rows:
      raise EvalDataError(f"{where(path)}: a row has split {split!r}; classification rows need "
                          "\"split\": \"train\" or \"test\"")
    split_rows[split][0].append(text)
    split_rows[split][1].append(label)
  for split, (texts, _) in split_rows.items():
    if not texts:
      raise EvalDataError(f"{where(path)}: no {split!r} rows")
  return ClassificationData(*split_rows["train"], *split_rows["test"], **protocol)


def undersample(labels: list[Any], samples_per_label: int, seed: int, n_experiments: int
                ) -> list[list[int]]:
  """mteb's training draws: for each experiment, the indices of the kept train rows, in order."""
  idxs = list(range(len(labels)))
  draws = []
  for _ in range(n_experiments):
    np.random.RandomState(seed).shuffle(idxs)  # cumulative: the same permutation applied again
    counts: dict[Any, int] = defaultdict(int)
    kept = []
    for i in idxs:
      if counts[labels[i]] < samples_per_label:
        kept.append(i)
        counts[labels[i]] += 1
    draws.append(kept)
  return draws


def evaluate_classification(encoder: Any, data: ClassificationData,
                            settings: tasks.EvalSettings) -> dict[str, float]:
  """{"accuracy", "f1"} (macro F1), means over the experiments (module docstring)."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import accuracy_score, f1_score

  draws = undersample(data.train_labels, data.samples_per_label, data.seed, data.n_experiments)
  union = sorted(set().union(*draws))
  train_emb = tasks.encode_unique(encoder, [data.train_texts[i] for i in union], settings)
  test_emb = tasks.encode_unique(encoder, data.test_texts, settings)
  row = {j: i for i, j in enumerate(union)}
  accuracy, f1 = [], []
  for kept in draws:
    model = LogisticRegression(max_iter=data.max_iter, random_state=data.seed)
    model.fit(train_emb[[row[i] for i in kept]], [data.train_labels[i] for i in kept])
    predicted = model.predict(test_emb)
    accuracy.append(accuracy_score(data.test_labels, predicted))
    f1.append(f1_score(data.test_labels, predicted, average="macro"))
  return {"accuracy": float(np.mean(accuracy)), "f1": float(np.mean(f1))}


def mteb_classification_task(data: ClassificationData, name: str) -> Any:
  from datasets import Dataset, DatasetDict
  from mteb.abstasks import AbsTaskClassification
  from sklearn.linear_model import LogisticRegression

  from bge_jax.eval.mteb_adapter import in_memory_task
  dataset = DatasetDict({
      "train": Dataset.from_dict({"text": data.train_texts, "label": data.train_labels}),
      "test": Dataset.from_dict({"text": data.test_texts, "label": data.test_labels})})
  return in_memory_task(AbsTaskClassification, name=name, task_type="Classification",
                        main_score="accuracy", eval_split="test", dataset=dataset,
                        seed=data.seed,
                        attrs={"n_experiments": data.n_experiments,
                               "samples_per_label": data.samples_per_label,
                               "evaluator_model": LogisticRegression(max_iter=data.max_iter)})


CLASSIFICATION = tasks.register(tasks.TaskType(
    name="classification", category="Classification", main_metric="accuracy",
    load=load_classification_task, evaluate=evaluate_classification,
    to_mteb=mteb_classification_task, mteb_metrics={"accuracy": "accuracy", "f1": "f1"},
    describe=lambda d: f"{len(set(d.train_labels))} labels, {len(d.train_texts)} train / "
                       f"{len(d.test_texts)} test"))
