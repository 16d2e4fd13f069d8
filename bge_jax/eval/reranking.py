"""The "reranking" task type: order each query's candidate passages (mteb's Reranking tasks).

As mteb 2.26 evaluates reranking (`AbsTaskRetrieval` with `top_ranked` candidates, e.g.
C-MTEB's T2Reranking, MMarcoReranking): the query (with the query instruction, FlagEmbedding's
convention) is compared by cosine with each of its candidates, candidates are ranked by score
(ties: larger document id first, as pytrec_eval), and the ranking is scored against the
judgements: MAP@1000 (mteb's main score), MRR@10 and nDCG@10 (`retrieval.retrieval_metrics`).

Data (`load_reranking_task`): a FlagEmbedding fine-tuning JSONL file, `{"query", "pos": [...],
"neg": [...]}` rows: a row's candidates are its positives (relevant) and negatives.

Cost: one encode of the queries and of the distinct passages; scoring is O(candidates * dim).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bge_jax.eval import tasks
from bge_jax.eval.data import read_query_rows
from bge_jax.eval.retrieval import beir_from_query_rows, mteb_retrieval_dataset, retrieval_metrics

METRICS = dict(map_at=(1000,), mrr_at=(10,), ndcg_at=(10,), recall_at=())


@dataclasses.dataclass(frozen=True)
class RerankingData:
  """queries {id: text}, corpus {id: text}, qrels {query id: {doc id: score}}, candidates
  {query id: [doc id, ...]}."""
  queries: dict[str, str]
  corpus: dict[str, str]
  qrels: dict[str, dict[str, float]]
  candidates: dict[str, list[str]]


def load_reranking_task(path: str) -> RerankingData:
  """FlagEmbedding `{"query", "pos", "neg"}` rows -> one query per row, candidates pos + neg."""
  return RerankingData(*beir_from_query_rows(read_query_rows(path)))


def rank_candidates(query_emb: np.ndarray, doc_emb: np.ndarray, doc_ids: list[str]) -> list[str]:
  """`doc_ids` ordered by cosine with the query [D] (docs [C, D]), best first; ties put the
  larger id first (pytrec_eval's order, which mteb's MRR follows too)."""
  scores = tasks.unit_rows(doc_emb) @ tasks.unit_rows(query_emb[None])[0]
  return [d for _, d in sorted(zip(scores.tolist(), doc_ids), reverse=True)]


def evaluate_reranking(encoder: Any, data: RerankingData, settings: tasks.EvalSettings
                       ) -> dict[str, float]:
  """{"map@1000", "ndcg@10", "mrr@10"} averaged over the queries with a relevant candidate."""
  qids = [q for q, judged in data.qrels.items() if any(v > 0 for v in judged.values())]
  doc_ids = list(dict.fromkeys(d for q in qids for d in data.candidates[q]))
  q_emb = tasks.encode_unique(encoder, [data.queries[q] for q in qids], settings,
                              settings.query_instruction)
  d_emb = tasks.encode_unique(encoder, [data.corpus[d] for d in doc_ids], settings)
  row = {d: i for i, d in enumerate(doc_ids)}
  ranked = {}
  for q, emb in zip(qids, q_emb):
    cands = data.candidates[q]
    ranked[q] = rank_candidates(emb, d_emb[[row[d] for d in cands]], cands)
  metrics = retrieval_metrics(ranked, {q: data.qrels[q] for q in qids}, **METRICS)
  return {k: float(v) for k, v in metrics.items() if k != "num_queries"}


def mteb_reranking_task(data: RerankingData, name: str) -> Any:
  from mteb.abstasks import AbsTaskRetrieval

  from bge_jax.eval.mteb_adapter import in_memory_task
  return in_memory_task(AbsTaskRetrieval, name=name, task_type="Reranking",
                        main_score="map_at_1000", eval_split="test",
                        dataset=mteb_retrieval_dataset(data.queries, data.corpus, data.qrels,
                                                       data.candidates))


RERANKING = tasks.register(tasks.TaskType(
    name="reranking", category="Reranking", main_metric="map@1000", load=load_reranking_task,
    evaluate=evaluate_reranking, to_mteb=mteb_reranking_task,
    mteb_metrics={"map@1000": "map_at_1000", "mrr@10": "mrr_at_10", "ndcg@10": "ndcg_at_10"},
    describe=lambda d: f"{len(d.qrels)} queries, "
                       f"{sum(map(len, d.candidates.values()))} candidates",
    query_instruction=True))
