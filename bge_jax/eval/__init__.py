"""Evaluation: the task registry (six mteb task types), STS and BEIR-style retrieval, an mteb
adapter.

  from bge_jax.eval import EvalSettings, evaluate_task, load_task
  task = load_task("reranking", "rows.jsonl")   # or retrieval, sts, pair_classification,
  print(evaluate_task(encoder, task, EvalSettings(query_instruction="...")))  # classification,
                                                                              # clustering
  from bge_jax.eval import read_sts, sts_spearman, load_beir, evaluate_retrieval

`bge_jax.eval.mteb_adapter` needs the optional extra `pip install "bge-jax[eval]"` (mteb) and is
not imported here.
"""

from bge_jax.eval.data import EvalDataError
from bge_jax.eval.retrieval import (evaluate_retrieval, load_beir, read_corpus, read_qrels,
                                    read_queries, retrieval_metrics, topk_inner_product)
from bge_jax.eval.sts import read_sts, sts_spearman
from bge_jax.eval.tasks import (EvalSettings, Task, TaskType, evaluate_task, load_task,
                                task_type, task_types)

__all__ = [
    "EvalDataError", "EvalSettings", "Task", "TaskType", "evaluate_retrieval", "evaluate_task",
    "load_beir", "load_task", "read_corpus", "read_qrels", "read_queries", "read_sts",
    "retrieval_metrics", "sts_spearman", "task_type", "task_types", "topk_inner_product",
]
