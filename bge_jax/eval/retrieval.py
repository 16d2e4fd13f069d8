"""BEIR-style dense retrieval evaluation: read a BEIR folder, exact top-k search in JAX, metrics.

A BEIR folder holds `queries.jsonl` (`{"_id" or "id", "text"}`), `corpus.jsonl` (`{"_id" or "id",
"title"?, "text"}`) and relevance judgements: `qrels/<split>.tsv` (BEIR's layout), `qrels.tsv`, or
the same as `.jsonl`. A TSV has `query-id<TAB>corpus-id<TAB>score` rows after a header line (TREC's
`qid 0 docid score` rows are read too); a JSONL has `{"query-id", "corpus-id", "score"}` rows.

Metrics (`retrieval_metrics`, definitions as in BEIR / pytrec_eval), averaged over the queries with
at least one judgement of score > 0:

* nDCG@k: graded gains (the qrels score), discount 1/log2(rank + 1), normalised by the ideal DCG
  of the query's judgements sorted by score (judged documents missing from the corpus included).
* Recall@k: |relevant in top k| / |relevant| (relevant: score > 0).
* MRR@k: 1 / rank of the first relevant document within the top k, else 0.

Search (`topk_inner_product`) is exact: the corpus streams through the device in blocks of
`corpus_block_size` rows; each block's scores for a block of queries go through `jax.lax.top_k`
and merge with the running top k, so memory is bounded by the block sizes, not the corpus.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from bge_jax.eval import tasks
from bge_jax.eval.data import EvalDataError, iter_jsonl, read_query_rows, require_file, where

log = logging.getLogger(__name__)

Qrels = Mapping[str, Mapping[str, float]]

NDCG_AT = (10,)
RECALL_AT = (1, 10, 100)
MRR_AT = (10,)


# ---------------------------------------------------------------------------------------------
# Reading a BEIR folder
# ---------------------------------------------------------------------------------------------

def _row_id(row: dict[str, Any], path: str | os.PathLike, line: int) -> str:
  value = row.get("_id", row.get("id"))
  if value is None or isinstance(value, (dict, list, bool)):
    raise EvalDataError(f"{where(path, line)}: no \"_id\" (or \"id\") string")
  return str(value)


def _row_text(row: dict[str, Any], key: str, path: str | os.PathLike, line: int,
              required: bool = True) -> str:
  value = row.get(key)
  if value is None and not required:
    return ""
  if not isinstance(value, str):
    what = "missing" if value is None else f"a {type(value).__name__}, not a string"
    raise EvalDataError(f"{where(path, line)}: \"{key}\" is {what}")
  return value


def read_queries(path: str | os.PathLike) -> dict[str, str]:
  """`queries.jsonl` -> {query id: text}; duplicate ids and rows without text raise."""
  out: dict[str, str] = {}
  for line, row in iter_jsonl(path):
    qid = _row_id(row, path, line)
    if qid in out:
      raise EvalDataError(f"{where(path, line)}: duplicate query id {qid!r}")
    out[qid] = _row_text(row, "text", path, line)
  return out


def read_corpus(path: str | os.PathLike) -> dict[str, dict[str, str]]:
  """`corpus.jsonl` -> {doc id: {"title", "text"}} (title "" when absent)."""
  out: dict[str, dict[str, str]] = {}
  for line, row in iter_jsonl(path):
    did = _row_id(row, path, line)
    if did in out:
      raise EvalDataError(f"{where(path, line)}: duplicate corpus id {did!r}")
    out[did] = {"title": _row_text(row, "title", path, line, required=False),
                "text": _row_text(row, "text", path, line)}
  return out


def _qrel_score(value: Any, path: str | os.PathLike, line: int) -> float:
  try:
    score = float(value)
  except (TypeError, ValueError):
    raise EvalDataError(f"{where(path, line)}: relevance score {value!r} is not a number") from None
  if not math.isfinite(score):
    raise EvalDataError(f"{where(path, line)}: relevance score {value!r} is not finite")
  return score


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, float]]:
  """Relevance judgements -> {query id: {doc id: score}}; `.jsonl`/`.json` by name, else TSV."""
  require_file(path)
  out: dict[str, dict[str, float]] = {}

  def add(qid: str, did: str, score: float, line: int) -> None:
    judged = out.setdefault(qid, {})
    if did in judged:
      raise EvalDataError(f"{where(path, line)}: ({qid!r}, {did!r}) is judged twice")
    judged[did] = score

  if os.fspath(path).endswith((".jsonl", ".json")):
    for line, row in iter_jsonl(path):
      qid = row.get("query-id", row.get("query_id", row.get("qid")))
      did = row.get("corpus-id", row.get("corpus_id", row.get("doc-id", row.get("docid"))))
      if qid is None or did is None:
        raise EvalDataError(f"{where(path, line)}: a qrels row needs \"query-id\" and "
                            "\"corpus-id\" (and \"score\")")
      add(str(qid), str(did), _qrel_score(row.get("score", 1), path, line), line)
    return out

  with open(path, encoding="utf-8") as f:
    for line, text in enumerate(f, 1):
      text = text.rstrip("\r\n")
      if not text.strip():
        continue
      fields = text.split("\t") if "\t" in text else text.split()
      if len(fields) == 4:  # TREC: qid iteration docid relevance
        fields = [fields[0], fields[2], fields[3]]
      if len(fields) != 3:
        raise EvalDataError(f"{where(path, line)}: {len(fields)} fields; expected "
                            "query-id<TAB>corpus-id<TAB>score")
      if line == 1:
        try:
          float(fields[2])
        except ValueError:
          continue  # the header line
      add(fields[0], fields[1], _qrel_score(fields[2], path, line), line)
  return out


def find_qrels(folder: str | os.PathLike, split: str = "test") -> str:
  """The qrels file of a BEIR folder: qrels/<split>.tsv|.jsonl, else qrels.tsv|.jsonl."""
  tried = [os.path.join(folder, "qrels", f"{split}.tsv"),
           os.path.join(folder, "qrels", f"{split}.jsonl"),
           os.path.join(folder, "qrels.tsv"), os.path.join(folder, "qrels.jsonl")]
  for path in tried:
    if os.path.isfile(path):
      return path
  raise EvalDataError(f"{where(folder)}: no qrels file (tried {', '.join(tried)})")


def load_beir(folder: str | os.PathLike, split: str = "test"
              ) -> tuple[dict[str, str], dict[str, dict[str, str]], dict[str, dict[str, float]]]:
  """(queries, corpus, qrels) of a BEIR folder; see the module docstring for the layout."""
  if not os.path.isdir(folder):
    raise EvalDataError(f"{where(folder)}: no such folder")
  qrels_path = find_qrels(folder, split)
  queries = read_queries(os.path.join(folder, "queries.jsonl"))
  corpus = read_corpus(os.path.join(folder, "corpus.jsonl"))
  qrels = read_qrels(qrels_path)
  missing = [q for q in qrels if q not in queries]
  if missing:
    raise EvalDataError(f"{where(qrels_path)}: {len(missing)} query ids are not in queries.jsonl "
                        f"(first: {missing[0]!r})")
  return queries, corpus, qrels


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def retrieval_metrics(ranked_ids: Mapping[str, Sequence[str]], qrels: Qrels, *,
                      ndcg_at: Sequence[int] = NDCG_AT, recall_at: Sequence[int] = RECALL_AT,
                      mrr_at: Sequence[int] = MRR_AT, map_at: Sequence[int] = ()
                      ) -> dict[str, float]:
  """nDCG@k, Recall@k, MRR@k (and MAP@k for `map_at`) of rankings against graded judgements.

  MAP@k is trec_eval's `map_cut_k`: the sum of precision@rank over the relevant documents
  ranked within the top k, divided by the number of relevant judgements (module docstring for
  the others).

  Args:
    ranked_ids: {query id: doc ids, best first}. A judged query with no ranking scores 0.
    qrels: {query id: {doc id: score}}; score > 0 is relevant and is the nDCG gain.
    ndcg_at, recall_at, mrr_at: cut-offs.

  Returns:
    {"ndcg@10": ..., "recall@1": ..., "recall@10": ..., "recall@100": ..., "mrr@10": ...,
    "num_queries": number of queries averaged over}, each metric the mean over queries with at
    least one relevant judgement (0.0 everywhere when there is none).
  """
  names = ([f"map@{k}" for k in map_at] + [f"ndcg@{k}" for k in ndcg_at]
           + [f"recall@{k}" for k in recall_at] + [f"mrr@{k}" for k in mrr_at])
  sums = dict.fromkeys(names, 0.0)
  depth = max((*ndcg_at, *recall_at, *mrr_at, *map_at), default=0)
  discount = 1.0 / np.log2(np.arange(2, depth + 2, dtype=np.float64))
  n = 0
  for qid, judged in qrels.items():
    relevant = {d: float(s) for d, s in judged.items() if s > 0}
    if not relevant:
      continue
    n += 1
    ranking = list(ranked_ids.get(qid, ()))[:depth]
    gains = np.array([relevant.get(d, 0.0) for d in ranking] + [0.0] * (depth - len(ranking)))
    hits = gains > 0
    ideal = np.zeros(depth)
    best = np.sort(np.fromiter(relevant.values(), np.float64))[::-1][:depth]
    ideal[:len(best)] = best
    for k in ndcg_at:
      dcg, idcg = (gains[:k] * discount[:k]).sum(), (ideal[:k] * discount[:k]).sum()
      sums[f"ndcg@{k}"] += float(dcg / idcg)
    for k in recall_at:
      sums[f"recall@{k}"] += float(hits[:k].sum()) / len(relevant)
    first = np.flatnonzero(hits)
    precision = np.cumsum(hits) / np.arange(1, depth + 1)
    for k in map_at:
      sums[f"map@{k}"] += float((precision[:k] * hits[:k]).sum()) / len(relevant)
    for k in mrr_at:
      sums[f"mrr@{k}"] += 1.0 / float(first[0] + 1) if len(first) and first[0] < k else 0.0
  out = {name: (total / n if n else 0.0) for name, total in sums.items()}
  out["num_queries"] = n
  return out


# ---------------------------------------------------------------------------------------------
# Exact blocked top-k
# ---------------------------------------------------------------------------------------------

def topk_inner_product(queries: np.ndarray, corpus: np.ndarray, k: int, *,
                       corpus_block_size: int = 16384,
                       query_block_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by inner product: (scores [Q, k] float32, corpus row ids [Q, k] int64).

  `bge_jax.mine.exact_top_k` (blocked, sharded over devices when there are several, lower
  index first on ties) with `k` capped at the corpus size and empty query sets allowed.
  """
  from bge_jax.mine import exact_top_k

  queries = np.asarray(queries, np.float32)
  corpus = np.asarray(corpus, np.float32)
  if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
    raise ValueError(f"queries {queries.shape} and corpus {corpus.shape} must be [Q, D], [N, D]")
  if corpus_block_size < 1 or query_block_size < 1:
    raise ValueError("block sizes must be >= 1")
  k = min(k, len(corpus))
  if k < 1 or len(queries) == 0:
    return np.zeros((len(queries), max(k, 0)), np.float32), np.zeros((len(queries), max(k, 0)), np.int64)
  return exact_top_k(queries, corpus, k, block_size=corpus_block_size,
                     query_batch_size=query_block_size)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

def _doc_text(doc: Any) -> str:
  if isinstance(doc, str):
    return doc
  return (doc.get("title", "") + " " + doc["text"]).strip()


def evaluate_retrieval(encoder: Any, queries: Mapping[str, str], corpus: Mapping[str, Any],
                       qrels: Qrels, *, query_instruction: str | None = None, top_k: int = 100,
                       batch_size: int = 256, max_length: int = 512,
                       query_max_length: int | None = None, corpus_block_size: int = 16384,
                       query_block_size: int = 1024,
                       return_rankings: bool = False) -> dict[str, Any]:
  """Encodes, searches exactly and scores: nDCG@10, Recall@1/10/100, MRR@10 (module docstring).

  Args:
    encoder: anything with `encode(texts, batch_size=, max_length=, instruction=) -> [N, D]`
      (`bge_jax.Encoder`); scores are inner products, so use normalised embeddings for cosine.
    queries: {query id: text}. Only queries with a relevant judgement are encoded.
    corpus: {doc id: text, or {"title"?, "text"}} (title and text joined by a space, as BEIR).
    qrels: {query id: {doc id: score}}.
    query_instruction: prepended to each query (BGE: "Represent this sentence for searching
      relevant passages: "); passages get none.
    top_k: documents retrieved per query (>= 10); Recall@k is reported for k <= top_k, or for
      every k when the whole corpus fits in top_k.
    batch_size, max_length: encoding; `query_max_length` defaults to `max_length`.
    corpus_block_size, query_block_size: `topk_inner_product` blocks.
    return_rankings: also return {"rankings": {query id: [(doc id, score), ...]}}.

  Returns:
    The metrics of `retrieval_metrics` plus "num_docs".
  """
  if top_k < 10:
    raise ValueError(f"top_k={top_k}; nDCG@10 and MRR@10 need top_k >= 10")
  qids = [q for q, judged in qrels.items() if any(s > 0 for s in judged.values())]
  missing = [q for q in qids if q not in queries]
  if missing:
    raise ValueError(f"{len(missing)} judged query ids have no query text (first: {missing[0]!r})")
  if not corpus:
    raise ValueError("the corpus is empty")
  doc_ids = list(corpus)
  unknown = sum(d not in corpus for q in qids for d in qrels[q])
  if unknown:
    log.warning("%d judged (query, doc) pairs name documents absent from the corpus; they count "
                "as relevant and can never be retrieved.", unknown)
  q_emb = encoder.encode([queries[q] for q in qids], batch_size=batch_size,
                         max_length=query_max_length or max_length, instruction=query_instruction)
  d_emb = encoder.encode([_doc_text(corpus[d]) for d in doc_ids], batch_size=batch_size,
                         max_length=max_length)
  scores, rows = topk_inner_product(q_emb, d_emb, top_k, corpus_block_size=corpus_block_size,
                                    query_block_size=query_block_size)
  ranked = {q: [doc_ids[j] for j in row] for q, row in zip(qids, rows)}
  recall_at = tuple(k for k in RECALL_AT if k <= top_k or top_k >= len(doc_ids))
  out: dict[str, Any] = retrieval_metrics(ranked, {q: qrels[q] for q in qids}, recall_at=recall_at)
  out["num_docs"] = len(doc_ids)
  if return_rankings:
    out["rankings"] = {q: list(zip(ranked[q], map(float, s))) for q, s in zip(qids, scores)}
  return out


# ---------------------------------------------------------------------------------------------
# The "retrieval" task type (mteb's AbsTaskRetrieval without candidates: search the corpus)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RetrievalData:
  """queries {id: text}, corpus {id: text or {"title", "text"}}, qrels {query id: {doc id:
  score}}."""
  queries: dict[str, str]
  corpus: dict[str, Any]
  qrels: dict[str, dict[str, float]]


def beir_from_query_rows(rows: Sequence[tuple[str, list[str], list[str]]]
                         ) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, float]],
                                    dict[str, list[str]]]:
  """FlagEmbedding rows [(query, pos, neg)] -> (queries, corpus, qrels, candidates).

  Query ids are "q<row>", document ids "d<n>" over the distinct passages in order of appearance
  (a passage repeated across rows is one document); qrels mark each row's positives with 1;
  candidates are each row's positives then negatives (distinct, a passage listed as both counts
  as a positive).
  """
  queries: dict[str, str] = {}
  corpus: dict[str, str] = {}
  ids: dict[str, str] = {}
  qrels: dict[str, dict[str, float]] = {}
  candidates: dict[str, list[str]] = {}
  for i, (query, pos, neg) in enumerate(rows):
    qid = f"q{i}"
    queries[qid] = query
    for text in pos + neg:
      if text not in ids:
        ids[text] = f"d{len(ids)}"
        corpus[ids[text]] = text
    qrels[qid] = {ids[t]: 1.0 for t in pos}
    candidates[qid] = list(dict.fromkeys(ids[t] for t in pos + neg))
  return queries, corpus, qrels, candidates


def load_retrieval_task(path: str, split: str = "test") -> RetrievalData:
  """A BEIR folder (`load_beir(path, split)`), or a FlagEmbedding JSONL file whose passages (every
  row's positives and negatives) form the corpus and whose positives are the judgements."""
  if os.path.isfile(path):
    queries, corpus, qrels, _ = beir_from_query_rows(read_query_rows(path))
    return RetrievalData(queries, corpus, qrels)
  return RetrievalData(*load_beir(path, split))


def evaluate_retrieval_task(encoder: Any, data: RetrievalData, settings: tasks.EvalSettings
                            ) -> dict[str, float]:
  """`evaluate_retrieval`'s metrics (nDCG@10, Recall@1/10/100, MRR@10) with the query
  instruction on queries."""
  metrics = evaluate_retrieval(encoder, data.queries, data.corpus, data.qrels,
                               query_instruction=settings.query_instruction or None,
                               batch_size=settings.batch_size, max_length=settings.max_length)
  return {k: float(v) for k, v in metrics.items() if not k.startswith("num_")}


def mteb_retrieval_dataset(queries: Mapping[str, str], corpus: Mapping[str, Any],
                           qrels: Qrels, top_ranked: Mapping[str, list[str]] | None = None,
                           split: str = "test") -> dict[str, Any]:
  """mteb 2's retrieval layout {"default": {split: {corpus, queries, relevant_docs,
  top_ranked}}}, with only the queries that have a relevant judgement (as we evaluate) and
  each document's title and text joined by a space (`_doc_text`)."""
  from datasets import Dataset

  judged = {q: dict(j) for q, j in qrels.items() if any(v > 0 for v in j.values())}
  return {"default": {split: {
      "corpus": Dataset.from_dict({"id": list(corpus),
                                   "text": [_doc_text(d) for d in corpus.values()]}),
      "queries": Dataset.from_dict({"id": list(judged), "text": [queries[q] for q in judged]}),
      "relevant_docs": {q: {d: int(v) for d, v in j.items()} for q, j in judged.items()},
      "top_ranked": None if top_ranked is None else {q: list(top_ranked[q]) for q in judged},
  }}}


def mteb_retrieval_task(data: RetrievalData, name: str) -> Any:
  from mteb.abstasks import AbsTaskRetrieval

  from bge_jax.eval.mteb_adapter import in_memory_task
  return in_memory_task(AbsTaskRetrieval, name=name, task_type="Retrieval",
                        main_score="ndcg_at_10", eval_split="test",
                        dataset=mteb_retrieval_dataset(data.queries, data.corpus, data.qrels))


RETRIEVAL = tasks.register(tasks.TaskType(
    name="retrieval", category="Retrieval", main_metric="ndcg@10", load=load_retrieval_task,
    evaluate=evaluate_retrieval_task, to_mteb=mteb_retrieval_task,
    mteb_metrics={"ndcg@10": "ndcg_at_10", "recall@1": "recall_at_1",
                  "recall@10": "recall_at_10", "recall@100": "recall_at_100",
                  "mrr@10": "mrr_at_10"},
    describe=lambda d: f"{len(d.qrels)} queries, {len(d.corpus)} documents",
    query_instruction=True))
