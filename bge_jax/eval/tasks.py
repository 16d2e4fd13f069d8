"""The evaluation registry: task types by name, loading tasks, running them, summarising.

A task type is one module of `bge_jax.eval` (listed in `TASK_MODULES`) that registers a
`TaskType` at import: how to read its data (`load`), how to score an encoder on it (`evaluate`,
mteb 2.26's protocol for that type), and how to build the same data as an in-memory mteb task
(`to_mteb`, used by the tests and `launch/eval.py --check-mteb` to compare numbers). Adding a type
is one new module (and its name in `TASK_MODULES`) plus its test.

  from bge_jax.eval import tasks
  task = tasks.load_task("sts", "../shared/data/en/stsbenchmark.train-dev.tsv", split="dev")
  metrics = tasks.evaluate_task(encoder, task, tasks.EvalSettings(max_length=128))
  # {"spearman": 0.82, "pearson": 0.83}

Encoders are anything with `encode(texts, batch_size=, max_length=, instruction=) -> [N, D]`
(`bge_jax.Encoder`). Only retrieval-type tasks (`TaskType.query_instruction`: retrieval and
reranking) put `EvalSettings.query_instruction` before their queries, never before documents:
FlagEmbedding's and the C-Pack paper's evaluation convention. Similarities are cosines.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np


# The modules that define task types, imported on first use of the registry.
TASK_MODULES = ("retrieval", "reranking", "sts", "classification", "pair_classification",
                "clustering")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How texts are encoded during evaluation.

  Attributes:
    batch_size: texts per `encoder.encode` batch.
    max_length: tokens per text (queries and documents alike).
    query_instruction: prepended to the queries of retrieval-type tasks (BGE English: "Represent
      this sentence for searching relevant passages: "); None or "" for none.
  """
  batch_size: int = 256
  max_length: int = 512
  query_instruction: str | None = None


@dataclasses.dataclass(frozen=True)
class TaskType:
  """One kind of evaluation (mteb's task type), registered under `name`.

  Attributes:
    name: the registry key used in specs ("sts", "retrieval", ...).
    category: mteb's task type name, the C-MTEB table's column ("STS", "Retrieval", ...).
    main_metric: the key of `evaluate`'s dict that the category averages use.
    load: `(path, **options) -> data`: reads a file or folder (raises `EvalDataError` naming it).
    evaluate: `(encoder, data, settings) -> {metric: float}`.
    to_mteb: `(data, name) -> mteb task instance` holding the same data (needs mteb).
    mteb_metrics: {our metric: mteb's score key} for comparisons with mteb's results.
    query_instruction: whether `settings.query_instruction` applies (retrieval-type tasks).
    describe: `data -> short size summary` for tables ("1500 pairs").
  """
  name: str
  category: str
  main_metric: str
  load: Callable[..., Any]
  evaluate: Callable[[Any, Any, EvalSettings], dict[str, float]]
  to_mteb: Callable[[Any, str], Any]
  mteb_metrics: Mapping[str, str]
  describe: Callable[[Any], str]
  query_instruction: bool = False


_REGISTRY: dict[str, TaskType] = {}


def register(task_type: TaskType) -> TaskType:
  """Adds `task_type` to the registry (a module calls this at import); returns it."""
  if task_type.name in _REGISTRY and _REGISTRY[task_type.name] is not task_type:
    raise ValueError(f"task type {task_type.name!r} is registered twice")
  _REGISTRY[task_type.name] = task_type
  return task_type


def task_types() -> dict[str, TaskType]:
  """{name: TaskType} of every registered type, in `TASK_MODULES` order."""
  for module in TASK_MODULES:
    importlib.import_module(f"bge_jax.eval.{module}")
  rank = {name: i for i, name in enumerate(TASK_MODULES)}  # a type is named after its module
  return {n: _REGISTRY[n] for n in sorted(_REGISTRY, key=lambda n: rank.get(n, len(rank)))}


def task_type(name: str) -> TaskType:
  """The registered type `name`; an unknown name raises ValueError listing the known ones."""
  known = task_types()
  if name not in known:
    raise ValueError(f"unknown task type {name!r}; known: {', '.join(known)}")
  return known[name]


@dataclasses.dataclass(frozen=True)
class Task:
  """A loaded evaluation task: its type's name, a display name, the data, where it came from."""
  type: str
  name: str
  data: Any
  source: str = ""

  @property
  def kind(self) -> TaskType:
    return task_type(self.type)


def task_name(path: str) -> str:
  """A task's default name: its file or folder name without extension."""
  return os.path.splitext(os.path.basename(os.path.normpath(path.strip())))[0]


def load_task(type_name: str, path: str, name: str | None = None, **options: Any) -> Task:
  """Reads one task: `task_type(type_name).load(path, **options)`, named `name`, else the path's
  file name ("stdlib_<type>" for the generated standard-library tasks)."""
  kind = task_type(type_name)
  name = name or (f"stdlib_{type_name}" if path == "stdlib" else task_name(path))
  return Task(type_name, name, kind.load(path, **options), path)


def parse_specs(spec: str | Sequence[str], key: str = "eval.tasks") -> list[tuple[str, str]]:
  """"type:path,type:path" (or a list of "type:path") -> [(type, path)]; `key` names the setting
  in errors. Types are checked against the registry."""
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  out = []
  for item in (i.strip() for i in items):
    if not item:
      continue
    type_name, sep, path = item.partition(":")
    if not sep or not path.strip():
      raise ValueError(f"{key}: {item!r} is not TYPE:PATH (types: {', '.join(task_types())})")
    if type_name.strip() not in task_types():
      raise ValueError(f"{key}: unknown task type {type_name.strip()!r} in {item!r}; known: "
                       f"{', '.join(task_types())}")
    out.append((type_name.strip(), path.strip()))
  return out


def evaluate_task(encoder: Any, task: Task, settings: EvalSettings = EvalSettings()
                  ) -> dict[str, float]:
  """{metric: value} of `encoder` on `task` (the type's `evaluate`)."""
  return task.kind.evaluate(encoder, task.data, settings)


def main_score(task: Task, metrics: Mapping[str, float]) -> float:
  return float(metrics[task.kind.main_metric])


def category_averages(scores: Sequence[tuple[str, float]]) -> dict[str, float]:
  """[(category, main score)] of evaluated tasks -> {category: mean main score}, in registry order
  (categories outside the registry, e.g. named mteb tasks' types, after it by name), plus
  "average": the mean over every task (C-MTEB's overall average is over tasks, not categories)."""
  order = {k.category: i for i, k in enumerate(task_types().values())}
  by_category: dict[str, list[float]] = {}
  for category, score in scores:
    by_category.setdefault(category, []).append(float(score))
  ranked = sorted(by_category, key=lambda c: (order.get(c, len(order)), c))
  out = {c: float(np.mean(by_category[c])) for c in ranked}
  if scores:
    out["average"] = float(np.mean([score for _, score in scores]))
  return out


# ---------------------------------------------------------------------------------------------
# Helpers shared by the task modules
# ---------------------------------------------------------------------------------------------

def encode_unique(encoder: Any, texts: Sequence[str], settings: EvalSettings,
                  instruction: str | None = None) -> np.ndarray:
  """`encoder.encode` of `texts` [N, D] (float32 as returned), each distinct text encoded once."""
  unique = list(dict.fromkeys(texts))
  if not unique:
    raise ValueError("nothing to encode")
  index = {t: i for i, t in enumerate(unique)}
  emb = np.asarray(encoder.encode(unique, batch_size=settings.batch_size,
                                  max_length=settings.max_length, instruction=instruction or None))
  if emb.ndim != 2 or emb.shape[0] != len(unique):
    raise ValueError(f"encoder.encode returned shape {emb.shape} for {len(unique)} texts")
  return emb[[index[t] for t in texts]]


class CachedEncoder:
  """Wraps an encoder and remembers each (text, instruction, max_length)'s embedding, so tasks
  sharing texts (the suite's retrieval and reranking tasks read the same rows) encode them once.
  Memory: one [D] float32 vector per distinct text."""

  def __init__(self, encoder: Any):
    self.encoder = encoder
    self._cache: dict[tuple[str | None, int, str], np.ndarray] = {}

  @property
  def dim(self) -> int:
    return self.encoder.dim

  def encode(self, texts: Sequence[str], batch_size: int = 256, max_length: int = 512,
             instruction: str | None = None, **kwargs: Any) -> np.ndarray:
    keys = [(instruction, max_length, t) for t in texts]
    new = list(dict.fromkeys(k[2] for k in keys if k not in self._cache))
    if new:
      emb = np.asarray(self.encoder.encode(new, batch_size=batch_size, max_length=max_length,
                                           instruction=instruction, **kwargs))
      self._cache.update({(instruction, max_length, t): e for t, e in zip(new, emb)})
    return np.stack([self._cache[k] for k in keys]) if keys else np.zeros((0, self.dim))


def unit_rows(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm in float64 (zero rows stay zero)."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Cosine similarity [N] (float64) of row i of `a` with row i of `b`."""
  return (unit_rows(a) * unit_rows(b)).sum(-1)
