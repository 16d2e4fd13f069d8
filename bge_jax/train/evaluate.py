"""Evaluation inside a training run: STS and retrieval on the current params, logged as eval/*."""

from __future__ import annotations

import logging
from typing import Any, Callable

from bge_jax.config import BertConfig

log = logging.getLogger("bge_jax.train")


def make_evaluator(config: Any, tokenizer: Any) -> Callable[[Any, BertConfig], dict[str, float]] | None:
  """`(params, model_config) -> {"eval/...": value}` from `config.eval`, or None when unset.

  config.eval.sts: comma-separated STS files (English STS-B TSV or `s1<TAB>s2<TAB>score`), each
  scored as Spearman of cosine similarities (split `config.eval.sts_split` where the file has
  one). config.eval.retrieval: comma-separated BEIR folders (queries.jsonl, corpus.jsonl,
  qrels), scored by nDCG@10, Recall@k and MRR@10 with `config.eval.query_instruction` on queries.
  Data is read once, here, so a bad file fails before training starts.
  """
  e = config.get("eval")
  if e is None or not (e.sts or e.retrieval):
    return None
  from bge_jax.eval import evaluate_retrieval, load_beir, read_sts, sts_spearman

  sts_sets = []
  for path in [p.strip() for p in e.sts.split(",") if p.strip()]:
    try:
      data = read_sts(path, split=e.sts_split)
    except ValueError:  # a file without a split column (e.g. s1<TAB>s2<TAB>score)
      data = read_sts(path)
    sts_sets.append((_name(path), data))
  beir_sets = [(_name(p), load_beir(p.strip())) for p in e.retrieval.split(",") if p.strip()]

  def evaluate(params: Any, model_config: BertConfig) -> dict[str, float]:
    from bge_jax.encoder import Encoder

    enc = Encoder(params, model_config.replace(add_mlm_head=False, add_decoder=False), tokenizer,
                  pooling=model_config.pooling, normalize=model_config.normalize)
    out: dict[str, float] = {}
    for name, (s1, s2, gold) in sts_sets:
      out[f"eval/sts/{name}"] = sts_spearman(enc, s1, s2, gold, batch_size=e.batch_size,
                                             max_length=e.max_length)
    for name, (queries, corpus, qrels) in beir_sets:
      metrics = evaluate_retrieval(enc, queries, corpus, qrels,
                                   query_instruction=e.query_instruction or None,
                                   batch_size=e.batch_size, max_length=e.max_length)
      out.update({f"eval/{name}/{k}": float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not k.startswith("num_")})
    return out

  return evaluate


def _name(path: str) -> str:
  import os
  return os.path.splitext(os.path.basename(os.path.normpath(path.strip())))[0]
