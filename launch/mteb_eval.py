"""Evaluate a bge-jax model with mteb, offline, on a local STS or retrieval task (example).

  pip install "bge-jax[eval]"        # mteb >= 2.26, an optional extra
  python launch/mteb_eval.py --model PATH [--step N] [--data FILE] [--split dev]
      [--pooling cls|mean] [--limit N] [--check]
  python launch/mteb_eval.py --model PATH --retrieval BEIR_FOLDER [--retrieval-split test]
      [--query-instruction TEXT] [--check]
  python launch/mteb_eval.py --model PATH --task TYPE:PATH [--query-instruction TEXT] [--check]

--model is an exported folder (a run's export/hf), any Hugging Face or sentence-transformers
folder, a bge-jax params folder, or the WORKDIR of a run (still training or finished): its
newest committed checkpoint, or --step N, is read (params only) with the run's model config and
tokenizer. Pooling defaults to the model's own (the folder's 1_Pooling, the run's loss.pooling,
else CLS). --data defaults to the English STS Benchmark TSV in ../shared/data (dev split); the
Chinese `s1<TAB>s2<TAB>score` files work too (pass --split "" and --lang cmn-Hans).
--retrieval evaluates a BEIR folder (queries.jsonl, corpus.jsonl, qrels/test.tsv) instead:
main score nDCG@10, queries with --query-instruction, documents without.

--task runs any type of the evaluation registry (retrieval, reranking, sts, pair_classification,
classification, clustering; file formats in docs/tools.md) as an in-memory mteb task
(`mteb_adapter.local_task`); --check prints bge-jax's own main score (`tasks.evaluate_task`).

How it works (the pieces to reuse for other tasks):

1. `MTEBEncoder(encoder, query_instruction=...)` wraps the JAX `Encoder` as an mteb encoder
   (`mteb.models.abs_encoder.AbsEncoder` with a `ModelMeta.create_empty(...)` meta). Retrieval
   queries get the instruction; documents and symmetric tasks get none (BGE's convention).
2. `local_sts_task(path, split)` returns a task whose class subclasses mteb's `AbsTaskSTS` and
   overrides only `load_data`, reading the local file: no hub download.
   `local_retrieval_task(folder)` does the same with `AbsTaskRetrieval` over a BEIR folder.
3. `mteb.evaluate(model, [task], cache=None)` runs it (cache=None: no result files written) and
   the main score (`cosine_spearman` / `ndcg_at_10`) is printed. --check also computes
   bge-jax's own `sts_spearman` / `evaluate_retrieval` nDCG@10 on the same data; they agree to
   float rounding (mteb rounds retrieval scores to 5 decimals).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "en" / "stsbenchmark.train-dev.tsv"


def _tokenizer(folder: str | None):
  if folder is None:
    return None
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True,
                      help="HF / sentence-transformers folder, bge-jax params folder, or run "
                           "workdir")
  parser.add_argument("--step", type=int, help="checkpoint step of a run workdir (default: newest)")
  parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's / the run's)")
  parser.add_argument("--data", default=str(DEFAULT_DATA), help="STS file (read_sts formats)")
  parser.add_argument("--split", default="dev", help="split column value; '' for every row")
  parser.add_argument("--lang", default="eng-Latn", help="mteb language code of the data")
  parser.add_argument("--pooling", choices=("cls", "mean"), default=None,
                      help="default: the model's own (CLS for BGE models)")
  parser.add_argument("--limit", type=int, help="only the first N pairs")
  parser.add_argument("--retrieval", metavar="BEIR_FOLDER",
                      help="evaluate retrieval on this BEIR folder instead of STS")
  parser.add_argument("--retrieval-split", default="test", help="qrels split (default: test)")
  parser.add_argument("--task", metavar="TYPE:PATH",
                      help="an evaluation-registry task instead (e.g. reranking:rows.jsonl)")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--max-length", type=int, default=512)
  parser.add_argument("--query-instruction", help="prepended to retrieval queries (unused by STS)")
  parser.add_argument("--check", action="store_true",
                      help="also compute bge_jax.eval.sts_spearman on the same pairs")
  args = parser.parse_args(argv)

  from bge_jax.convert import ConversionError
  from bge_jax.eval import EvalDataError, evaluate_retrieval, load_beir, read_sts, sts_spearman
  from bge_jax.eval import mteb_adapter

  if mteb_adapter.mteb is None:
    print("error: mteb is not installed; pip install 'bge-jax[eval]' (mteb>=2.26)",
          file=sys.stderr)
    return 2
  import mteb

  from bge_jax.eval import tasks

  split = args.split or None
  try:  # the data is validated before the model loads
    if args.task:
      (type_name, path), = tasks.parse_specs([args.task], "--task")
      local = tasks.load_task(type_name, path)
    elif args.retrieval:
      queries, corpus, qrels = load_beir(args.retrieval, args.retrieval_split)
    else:
      s1, s2, scores = read_sts(args.data, split)
    encoder = mteb_adapter.load_encoder(args.model, args.pooling, step=args.step,
                                        tokenizer=_tokenizer(args.tokenizer))
  except (EvalDataError, ConversionError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  model = mteb_adapter.MTEBEncoder(encoder, query_instruction=args.query_instruction,
                                   name=f"bge-jax/{pathlib.Path(args.model).name or 'model'}",
                                   batch_size=args.batch_size, max_length=args.max_length)
  if args.task:
    task = mteb_adapter.local_task(local)
    what = local.kind.describe(local.data)
  elif args.retrieval:
    task = mteb_adapter.local_retrieval_task(args.retrieval, args.retrieval_split, lang=args.lang)
    what = f"{args.retrieval_split}, {len(corpus)} documents"
  else:
    n = len(s1) if args.limit is None else min(args.limit, len(s1))
    task = mteb_adapter.local_sts_task(args.data, split, limit=args.limit, lang=args.lang)
    what = f"{split or 'all rows'}, {n} pairs"
  result = mteb.evaluate(model, [task], cache=None, show_progress_bar=False)
  score = mteb_adapter.main_score(result)
  print(f"{task.metadata.name} ({what}, {encoder.config.pooling} pooling) "
        f"{task.metadata.main_score}: {score:.6f}")
  if args.check:
    if args.task:
      settings = tasks.EvalSettings(batch_size=args.batch_size, max_length=args.max_length,
                                    query_instruction=args.query_instruction)
      ours = tasks.main_score(local, tasks.evaluate_task(encoder, local, settings))
      name = f"bge_jax.eval.tasks {local.kind.main_metric}"
    elif args.retrieval:
      ours = evaluate_retrieval(encoder, queries, corpus, qrels,
                                query_instruction=args.query_instruction,
                                batch_size=args.batch_size, max_length=args.max_length)["ndcg@10"]
      name = "bge_jax.eval.evaluate_retrieval ndcg@10"
    else:
      ours = sts_spearman(encoder, s1[:n], s2[:n], scores[:n], batch_size=args.batch_size,
                          max_length=args.max_length)
      name = "bge_jax.eval.sts_spearman"
    print(f"{name}: {ours:.6f} (|difference| {abs(ours - score):.2g})")
  return 0


if __name__ == "__main__":
  # The command's process defaults, set before main() imports transformers; importing this
  # module (tests call main() in-process) leaves the importer's environment alone.
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  sys.exit(main())
