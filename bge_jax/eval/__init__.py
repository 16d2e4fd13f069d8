"""Evaluation: STS (Spearman of cosine similarities) and BEIR-style retrieval, plus an mteb adapter.

  from bge_jax.eval import read_sts, sts_spearman, load_beir, evaluate_retrieval

`bge_jax.eval.mteb_adapter` needs the optional extra `pip install "bge-jax[eval]"` (mteb) and is
not imported here.
"""

from bge_jax.eval.data import EvalDataError
from bge_jax.eval.retrieval import (evaluate_retrieval, load_beir, read_corpus, read_qrels,
                                    read_queries, retrieval_metrics, topk_inner_product)
from bge_jax.eval.sts import read_sts, sts_spearman

__all__ = [
    "EvalDataError", "evaluate_retrieval", "load_beir", "read_corpus", "read_qrels", "read_queries",
    "read_sts", "retrieval_metrics", "sts_spearman", "topk_inner_product",
]
