"""The offline evaluation suite: every task type on data at hand, no download.

`offline_suite(data_dir)` builds (`launch/eval.py --suite`):

| type | task | data |
|---|---|---|
| retrieval | FEMSMARCO, FENQ | `en/msmarco.jsonl`, `en/nq.jsonl`: FlagEmbedding rows; the corpus is every row's positives and mined negatives, the judgements its positives |
| reranking | FEMSMARCORerank, FENQRerank | the same rows: each query ranks its own positives and negatives |
| sts | STSBenchmarkDev | `en/stsbenchmark.train-dev.tsv`, split dev (1,500 pairs) |
| pair_classification | FENLIPairs | `en/nli.jsonl`: (query, positive) pairs are 1, (query, negative) pairs 0 |
| classification | StdlibPackages | generated: standard-library docstrings labelled by top-level package |
| clustering | StdlibPackagesClustering | the same texts and labels |

`data_dir` is the shared data folder (`../shared/data` from the repository root); a task whose
file is absent is left out and named in `missing`. The standard-library tasks are generated
(`bge_jax.data.stdlib_corpus.stdlib_pairs`), so they depend on the Python version only.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from functools import lru_cache

from bge_jax.eval import tasks

# (task type, name, path under data_dir or "stdlib", load options)
OFFLINE_SUITE = (
    ("retrieval", "FEMSMARCO", "en/msmarco.jsonl", {}),
    ("retrieval", "FENQ", "en/nq.jsonl", {}),
    ("reranking", "FEMSMARCORerank", "en/msmarco.jsonl", {}),
    ("reranking", "FENQRerank", "en/nq.jsonl", {}),
    ("sts", "STSBenchmarkDev", "en/stsbenchmark.train-dev.tsv", {"split": "dev"}),
    ("pair_classification", "FENLIPairs", "en/nli.jsonl", {}),
    ("classification", "StdlibPackages", "stdlib", {}),
    ("clustering", "StdlibPackagesClustering", "stdlib", {}),
)

# Standard-library packages with at least MIN_PER_LABEL docstrings become labels; each keeps at
# most MAX_PER_LABEL (a random, seeded choice), so no package dominates.
MIN_PER_LABEL = 20
MAX_PER_LABEL = 40


@lru_cache(maxsize=1)
def stdlib_labelled(min_per_label: int = MIN_PER_LABEL, max_per_label: int = MAX_PER_LABEL,
                    seed: int = 0) -> tuple[tuple[str, str], ...]:
  """((docstring, top-level package), ...): the standard-library corpus labelled by package,
  packages with >= min_per_label docstrings, at most max_per_label each, grouped by package."""
  from bge_jax.data.stdlib_corpus import stdlib_pairs

  by_package: dict[str, list[str]] = defaultdict(list)
  for title, passage in stdlib_pairs():
    by_package[title.split(".")[0]].append(passage)
  rng = random.Random(seed)
  out = []
  for package in sorted(by_package):
    texts = by_package[package]
    if len(texts) >= min_per_label:
      out.extend((t, package) for t in sorted(rng.sample(texts, min(len(texts), max_per_label))))
  return tuple(out)


def stdlib_classification():
  """`ClassificationData`: each package's texts alternate between train and test."""
  from bge_jax.eval.classification import ClassificationData

  train, test = [], []
  seen: dict[str, int] = defaultdict(int)
  for text, label in stdlib_labelled():
    (train if seen[label] % 2 == 0 else test).append((text, label))
    seen[label] += 1
  return ClassificationData([t for t, _ in train], [label for _, label in train],
                            [t for t, _ in test], [label for _, label in test])


def stdlib_clustering():
  """`ClusteringData` over every labelled standard-library text."""
  from bge_jax.eval.clustering import ClusteringData

  rows = stdlib_labelled()
  # mteb draws max_documents_per_cluster (16,384) texts per experiment, sized for datasets of
  # tens of thousands; for these few hundred texts one draw of their own size keeps the suite fast.
  return ClusteringData([t for t, _ in rows], [label for _, label in rows],
                        cluster_size=len(rows))


def offline_suite(data_dir: str) -> tuple[list[tasks.Task], list[str]]:
  """(the suite's tasks whose data is present, the paths of those whose data is absent)."""
  loaded, missing = [], []
  for type_name, name, rel, options in OFFLINE_SUITE:
    path = rel if rel == "stdlib" else os.path.join(data_dir, rel)
    if rel != "stdlib" and not os.path.exists(path):
      missing.append(path)
      continue
    loaded.append(tasks.load_task(type_name, path, name, **options))
  return loaded, missing
