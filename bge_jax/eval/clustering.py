"""The "clustering" task type: k-means on embeddings scored by V-measure (mteb's protocol).

As mteb 2.26's `AbsTaskClustering` (the "fast" protocol of C-MTEB's CLSClusteringS2S.v2 and
MTEB's *.v2 clustering tasks): with `rng = random.Random(seed)`, optionally a subset of
`max_documents` texts is embedded (`rng.sample`; None: all, mteb's per-task setting), then
`n_experiments` times `cluster_size` texts are drawn with replacement (`rng.choices`) and
clustered by scikit-learn's `MiniBatchKMeans(n_clusters=number of labels,
batch_size=kmeans_batch_size, init="k-means++", n_init=1, random_state=seed)`; the score is the
mean V-measure of the cluster assignments against the labels ("v_measure", the main score), with
its standard deviation over experiments ("v_measure_std"). Embeddings are used as the encoder
returns them, with no instruction.

Data (`load_clustering_task`): a JSONL file of `{"text", "label"}` rows, or `stdlib` for the
generated standard-library corpus labelled by package.

Cost: one encode of the texts; each experiment is a mini-batch k-means over `cluster_size`
points, O(cluster_size * labels * dim) per pass.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np

from bge_jax.eval import tasks
from bge_jax.eval.data import EvalDataError, read_labelled_texts, where


@dataclasses.dataclass(frozen=True)
class ClusteringData:
  """Texts with labels, and mteb's protocol settings (its `AbsTaskClustering` defaults, except
  max_documents: mteb embeds 4% of a large dataset; a local task embeds all by default)."""
  texts: list[str]
  labels: list[Any]
  n_experiments: int = 10
  cluster_size: int = 16384
  kmeans_batch_size: int = 512
  max_documents: int | None = None
  seed: int = 42


def load_clustering_task(path: str, **protocol: Any) -> ClusteringData:
  """`{"text", "label"}` JSONL rows, or "stdlib"; `protocol` overrides ClusteringData's
  settings."""
  if path == "stdlib":
    from bge_jax.eval.suite import stdlib_clustering
    return dataclasses.replace(stdlib_clustering(), **protocol)
  rows = read_labelled_texts(path)
  if len({label for _, label, _ in rows}) < 2:
    raise EvalDataError(f"{where(path)}: clustering needs at least 2 labels")
  return ClusteringData([t for t, _, _ in rows], [label for _, label, _ in rows], **protocol)


def evaluate_clustering(encoder: Any, data: ClusteringData, settings: tasks.EvalSettings
                        ) -> dict[str, float]:
  """{"v_measure", "v_measure_std"} over the experiments (module docstring)."""
  from sklearn.cluster import MiniBatchKMeans
  from sklearn.metrics.cluster import v_measure_score

  rng = random.Random(data.seed)
  index = list(range(len(data.texts)))
  if data.max_documents is not None:
    index = rng.sample(range(len(data.texts)), k=min(data.max_documents, len(data.texts)))
  emb = tasks.encode_unique(encoder, [data.texts[i] for i in index], settings)
  labels = np.array([data.labels[i] for i in index])
  kmeans = MiniBatchKMeans(n_clusters=np.unique(labels).size, batch_size=data.kmeans_batch_size,
                           init="k-means++", n_init=1, random_state=data.seed)
  scores = []
  for _ in range(data.n_experiments):
    drawn = rng.choices(range(len(emb)), k=data.cluster_size)
    scores.append(v_measure_score(labels[drawn], kmeans.fit_predict(emb[drawn])))
  return {"v_measure": float(np.mean(scores)), "v_measure_std": float(np.std(scores))}


def mteb_clustering_task(data: ClusteringData, name: str) -> Any:
  from datasets import Dataset, DatasetDict
  from mteb.abstasks import AbsTaskClustering

  from bge_jax.eval.mteb_adapter import in_memory_task
  dataset = DatasetDict({"test": Dataset.from_dict({"sentences": data.texts,
                                                    "labels": data.labels})})
  return in_memory_task(AbsTaskClustering, name=name, task_type="Clustering",
                        main_score="v_measure", eval_split="test", dataset=dataset,
                        seed=data.seed,
                        attrs={"n_clusters": data.n_experiments,
                               "max_documents_per_cluster": data.cluster_size,
                               "k_mean_batch_size": data.kmeans_batch_size,
                               "max_fraction_of_documents_to_embed": None,
                               "max_document_to_embed": data.max_documents})


CLUSTERING = tasks.register(tasks.TaskType(
    name="clustering", category="Clustering", main_metric="v_measure",
    load=load_clustering_task, evaluate=evaluate_clustering, to_mteb=mteb_clustering_task,
    mteb_metrics={"v_measure": "v_measure", "v_measure_std": "v_measure_std"},
    describe=lambda d: f"{len(set(d.labels))} labels, {len(d.texts)} texts"))
