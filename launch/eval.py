"""Evaluate an embedding model: STS (Spearman of cosine) or BEIR-style retrieval.

  python launch/eval.py sts --model PATH --data FILE [--split dev] [--pooling cls|mean]
  python launch/eval.py retrieval --model PATH --data DIR [--query-instruction TEXT]

--model takes any path `Encoder.from_hf` takes: a Hugging Face or sentence-transformers folder
(with tokenizer files), a bge-jax params folder, an exported folder, or a training run's
workdir (its newest checkpoint, also while the run goes on).

sts: FILE is the STS Benchmark TSV (header with score, sentence1, sentence2; --split picks the
  'split' column's rows) or a headerless `s1<TAB>s2<TAB>score` file (the Chinese STS-B).
retrieval: DIR is a BEIR folder: queries.jsonl, corpus.jsonl, qrels/<--qrels-split>.tsv (or
  qrels.tsv, or .jsonl); reports nDCG@10, Recall@1/10/100, MRR@10 (exact top-k search).

Prints a table of metrics; --out FILE also writes them as JSON. Exit status: 0 done; 2 refused
(one `error:` line on stderr, naming file:line for a bad row).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


class _Refused(Exception):
  """An error reported as one `error:` line with exit status 2."""


class _Parser(argparse.ArgumentParser):
  """argparse, but usage errors raise (one `error:` line from main) instead of exiting."""

  def error(self, message: str):
    raise _Refused(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="launch/eval.py", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="model folder, checkpoint or run workdir (Encoder.from_hf)")
    p.add_argument("--pooling", choices=("cls", "mean"), default="cls",
                   help="sentence pooling: cls (BGE) or mean (e.g. all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=int, default=256, help="encoding batch size")
    p.add_argument("--max-length", type=int, default=512, help="max tokens per text")
    p.add_argument("--out", help="also write the results to this JSON file")

  sts = sub.add_parser("sts", help="Spearman of cosine similarity on STS pairs",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
  common(sts)
  sts.add_argument("--data", required=True, help="STS-B TSV or s1<TAB>s2<TAB>score file")
  sts.add_argument("--split", help="rows of this split only (STS-B TSV: train or dev)")
  sts.add_argument("--instruction", help="prepended to every sentence (BGE uses none for STS)")

  ret = sub.add_parser("retrieval", help="nDCG@10, Recall@k, MRR@10 on a BEIR folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
  common(ret)
  ret.add_argument("--data", required=True, help="BEIR folder (queries/corpus .jsonl, qrels)")
  ret.add_argument("--qrels-split", default="test", help="qrels/<split>.tsv to read")
  ret.add_argument("--query-instruction",
                   help="prepended to queries (BGE English: 'Represent this sentence for "
                        "searching relevant passages: ')")
  ret.add_argument("--query-max-length", type=int, help="max query tokens (default --max-length)")
  ret.add_argument("--top-k", type=int, default=100, help="documents retrieved per query (>= 10)")
  ret.add_argument("--corpus-block-size", type=int, default=16384,
                   help="corpus rows scored per device step")
  return parser


def print_table(title: str, info: dict, metrics: dict) -> None:
  print(title)
  width = max(len(k) for k in (*info, *metrics))
  for key, value in info.items():
    print(f"  {key:<{width}}  {value}")
  print(f"  {'-' * width}  {'-' * 8}")
  for key, value in metrics.items():
    print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float)
          else f"  {key:<{width}}  {value}")


def run(args: argparse.Namespace) -> dict:
  from bge_jax.eval import evaluate_retrieval, load_beir, read_sts, sts_spearman

  if args.batch_size < 1 or args.max_length < 1:
    raise _Refused("--batch-size and --max-length must be >= 1")
  if not os.path.exists(args.model):
    raise _Refused(f"{args.model}: no such model file or folder")
  # Read (and validate) the data before the slower model load.
  t0 = time.time()
  if args.command == "sts":
    s1, s2, scores = read_sts(args.data, args.split)
    info = {"pairs": len(s1), "split": args.split or "all"}
  else:
    if args.top_k < 10:
      raise _Refused(f"--top-k {args.top_k}: nDCG@10 and MRR@10 need --top-k >= 10")
    queries, corpus, qrels = load_beir(args.data, args.qrels_split)
    info = {"queries": len(queries), "documents": len(corpus), "qrels split": args.qrels_split}

  from bge_jax import Encoder
  encoder = Encoder.from_hf(args.model, pooling=args.pooling)
  if args.command == "sts":
    metrics = {"spearman": sts_spearman(encoder, s1, s2, scores, batch_size=args.batch_size,
                                        max_length=args.max_length,
                                        instruction=args.instruction)}
  else:
    metrics = evaluate_retrieval(encoder, queries, corpus, qrels,
                                 query_instruction=args.query_instruction, top_k=args.top_k,
                                 batch_size=args.batch_size, max_length=args.max_length,
                                 query_max_length=args.query_max_length,
                                 corpus_block_size=args.corpus_block_size)
  return {"task": args.command, "model": args.model, "data": args.data, "pooling": args.pooling,
          **info, "seconds": round(time.time() - t0, 1), "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
  """Runs the command line; returns the exit status (0 done, 2 refused)."""
  from bge_jax.convert import ConversionError
  from bge_jax.eval import EvalDataError

  try:
    args = build_parser().parse_args(argv)
    result = run(args)
  except (_Refused, EvalDataError, ConversionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 2
  info = {k: v for k, v in result.items() if k not in ("task", "metrics")}
  print_table(f"{result['task']} evaluation", info, result["metrics"])
  if args.out:
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
      f.write("\n")
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  # The command's process defaults, set before main() imports transformers; importing this
  # module (tests call main() in-process) leaves the importer's environment alone.
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  sys.exit(main())
