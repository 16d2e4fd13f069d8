"""Evaluate an embedding model: the offline suite of every task type, tasks by type and path,
named mteb tasks, or one STS / BEIR retrieval set.

  python launch/eval.py --suite --model PATH [--data-dir ../shared/data] [--truncate_dim 64 128]
      [--query-instruction TEXT] [--tasks TYPE:PATH,...] [--mteb-tasks NAME,...] [--out FILE]
  python launch/eval.py --tasks sts:FILE,retrieval:DIR,classification:FILE.jsonl --model PATH
  python launch/eval.py sts --model PATH --data FILE [--split dev] [--pooling cls|mean]
  python launch/eval.py retrieval --model PATH --data DIR [--query-instruction TEXT]

--model takes any path `Encoder.from_hf` takes: a Hugging Face or sentence-transformers folder
(with tokenizer files), a bge-jax params folder, an exported folder, or a training run's
workdir (its newest checkpoint, also while the run goes on).

--suite: `bge_jax.eval.suite.OFFLINE_SUITE`, every task type (retrieval, reranking, STS, pair
  classification, classification, clustering) on the shared data folder (--data-dir: STS-B dev,
  FlagEmbedding's MS MARCO / NQ / NLI example rows) and the generated standard-library corpus
  labelled by package. Offline; minutes on a CPU for a MiniLM-sized model. A suite file that is
  absent is named on a `skipped:` line and left out.
--tasks: TYPE:PATH entries (types and file formats: docs/tools.md, `bge_jax.eval.tasks`).
--mteb-tasks: mteb task names (C-MTEB, MTEB English, e.g. T2Reranking,STSBenchmark), run with
  mteb when their data is in the local Hugging Face cache; one `skipped:` line each otherwise.
Prints, per --truncate_dim (Matryoshka: the first D features, re-normalised; default the full
width), each task's metrics and a table of the per-category mean main scores and their average
(the mean over tasks, as C-MTEB averages). The query instruction goes before the queries of
retrieval and reranking tasks only (FlagEmbedding's convention). --check-mteb also runs each
local task through mteb and prints mteb's main score beside ours.

sts: FILE is the STS Benchmark TSV (header with score, sentence1, sentence2; --split picks the
  'split' column's rows) or a headerless `s1<TAB>s2<TAB>score` file (the Chinese STS-B).
retrieval: DIR is a BEIR folder: queries.jsonl, corpus.jsonl, qrels/<--qrels-split>.tsv (or
  qrels.tsv, or .jsonl); reports nDCG@10, Recall@1/10/100, MRR@10 (exact top-k search).

--out FILE also writes the results as JSON (written whole at the end, never partially).
Exit status: 0 done; 2 refused (one `error:` line on stderr, naming file:line for a bad row);
3 done, but some --mteb-tasks were skipped because their data is not in the local cache.
"""

from __future__ import annotations

import argparse
import collections
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


SUBCOMMANDS = ("sts", "retrieval")
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                os.pardir, "shared", "data")


def build_suite_parser() -> argparse.ArgumentParser:
  """The task-list mode: --suite, --tasks, --mteb-tasks (no subcommand)."""
  parser = _Parser(prog="launch/eval.py", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True,
                      help="model folder, checkpoint or run workdir (Encoder.from_hf)")
  parser.add_argument("--suite", action="store_true",
                      help="run the offline suite (every task type; see above)")
  parser.add_argument("--data-dir", default=os.path.normpath(DEFAULT_DATA_DIR),
                      help="the shared data folder the suite reads (default: ../shared/data "
                           "beside the repository)")
  parser.add_argument("--tasks", default="",
                      help="TYPE:PATH,... more tasks (types: retrieval, reranking, sts, "
                           "pair_classification, classification, clustering)")
  parser.add_argument("--mteb-tasks", default="",
                      help="NAME,... mteb tasks whose data is in the local cache")
  parser.add_argument("--pooling", choices=("cls", "mean"), default=None,
                      help="sentence pooling (default: the model's own, e.g. a sentence-"
                           "transformers folder's; else cls, BGE's)")
  parser.add_argument("--batch-size", type=int, default=64,
                      help="encoding batch size (small batches pad less on a CPU)")
  parser.add_argument("--max-length", type=int, default=512, help="max tokens per text")
  parser.add_argument("--query-instruction", default="",
                      help="prepended to retrieval and reranking queries (BGE English: "
                           "'Represent this sentence for searching relevant passages: ')")
  parser.add_argument("--truncate_dim", "--truncate-dim", type=int, nargs="+", default=None,
                      metavar="D", help="evaluate at these Matryoshka widths (one table each)")
  parser.add_argument("--check-mteb", action="store_true",
                      help="also run each local task through mteb and print its main score")
  parser.add_argument("--out", help="also write the results to this JSON file")
  return parser


def _load_tasks(args: argparse.Namespace) -> tuple[list, list[str]]:
  from bge_jax.eval import suite, tasks

  loaded, missing = [], []
  if args.suite:
    if not os.path.isdir(args.data_dir):
      raise _Refused(f"{args.data_dir}: no such folder (--data-dir: the shared data folder with "
                     "en/stsbenchmark.train-dev.tsv, en/msmarco.jsonl, ...)")
    loaded, missing = suite.offline_suite(args.data_dir)
  try:
    specs = tasks.parse_specs(args.tasks, "--tasks")
  except ValueError as e:
    raise _Refused(str(e)) from None
  for type_name, path in specs:
    loaded.append(tasks.load_task(type_name, path))
  return loaded, missing


def _named_mteb_tasks(names: list[str]) -> tuple[list, list[str]]:
  """(loaded mteb tasks, `skipped:` lines for those not in the local cache)."""
  if not names:
    return [], []
  from bge_jax.eval import mteb_adapter
  if mteb_adapter.mteb is None:
    raise _Refused("--mteb-tasks needs mteb: pip install 'bge-jax[eval]' (mteb>=2.26)")
  found, skipped = [], []
  for name in names:
    try:
      found.append(mteb_adapter.named_task(name))
    except KeyError as e:
      raise _Refused(f"--mteb-tasks: {e.args[0]}") from None
    except mteb_adapter.NotCached as e:
      skipped.append(str(e))
  return found, skipped


def _with_dim(encoder, dim: int | None):
  """`encoder` cut to its first `dim` features (re-normalised when it normalises)."""
  if dim is None:
    return encoder
  from bge_jax.encoder import Encoder
  return Encoder(encoder.params, encoder.config, encoder.tokenizer,
                 pooling=encoder.config.pooling, normalize=encoder.config.normalize,
                 devices=encoder.devices, truncate_dim=dim)


def run_suite(args: argparse.Namespace) -> tuple[dict, list[str]]:
  """Loads the tasks (data first), then the model; evaluates per dim. -> (result, skipped)."""
  from bge_jax.eval import mteb_adapter, tasks

  if args.batch_size < 1 or args.max_length < 1:
    raise _Refused("--batch-size and --max-length must be >= 1")
  if not (args.suite or args.tasks or args.mteb_tasks):
    raise _Refused("nothing to evaluate: give --suite, --tasks TYPE:PATH,... or --mteb-tasks "
                   "NAME,... (or a subcommand: sts, retrieval)")
  if not os.path.exists(args.model):
    raise _Refused(f"{args.model}: no such model file or folder")
  dims = args.truncate_dim or [None]
  if any(d < 1 for d in dims if d is not None):
    raise _Refused(f"--truncate_dim {args.truncate_dim}: widths must be >= 1")
  local, missing = _load_tasks(args)
  named, skipped = _named_mteb_tasks([n.strip() for n in args.mteb_tasks.split(",") if n.strip()])
  for path in missing:
    print(f"skipped: {path} is absent (suite task left out)")
  if not local and not named:
    raise _Refused("no task to run: " + ("; ".join(skipped + missing) or "empty task list"))
  if (named or args.check_mteb) and mteb_adapter.mteb is None:
    raise _Refused("--check-mteb needs mteb: pip install 'bge-jax[eval]' (mteb>=2.26)")

  encoder = mteb_adapter.load_encoder(args.model, args.pooling)
  width = encoder.dim
  if any(d is not None and d > width for d in dims):
    raise _Refused(f"--truncate_dim {args.truncate_dim}: the model's embeddings have {width} "
                   "features")
  settings = tasks.EvalSettings(batch_size=args.batch_size, max_length=args.max_length,
                                query_instruction=args.query_instruction or None)
  result = {"model": args.model, "pooling": encoder.config.pooling,
            "query_instruction": args.query_instruction, "max_length": args.max_length,
            "python": sys.version.split()[0], "skipped": skipped + missing, "dims": {}}
  total = len(local) + len(named)
  for dim in dims:
    full = _with_dim(encoder, dim)
    enc = tasks.CachedEncoder(full)  # retrieval and reranking tasks share their passages
    label = f"dim {dim or width}" + (" (full)" if (dim or width) == width else "")
    print(f"== {args.model}, {label}")
    rows = []
    for i, task in enumerate(local, 1):
      t0 = time.time()
      metrics = tasks.evaluate_task(enc, task, settings)
      row = {"type": task.type, "category": task.kind.category, "name": task.name,
             "source": task.source, "size": task.kind.describe(task.data),
             "main_metric": task.kind.main_metric, "main_score": tasks.main_score(task, metrics),
             "metrics": metrics, "seconds": round(time.time() - t0, 1)}
      if args.check_mteb:
        row["mteb_main_score"] = _mteb_main_score(full, mteb_adapter.local_task(task), args)
      rows.append(row)
      _print_task(i, total, row)
    for i, task in enumerate(named, len(local) + 1):
      t0 = time.time()
      score = _mteb_main_score(full, task, args)
      row = {"type": "mteb", "category": task.metadata.type, "name": task.metadata.name,
             "source": "mteb", "size": "", "main_metric": task.metadata.main_score,
             "main_score": score, "metrics": {task.metadata.main_score: score},
             "seconds": round(time.time() - t0, 1)}
      rows.append(row)
      _print_task(i, total, row)
    categories = tasks.category_averages([(r["category"], r["main_score"]) for r in rows])
    result["dims"][str(dim or width)] = {"tasks": rows, "categories": categories}
    counts = collections.Counter(r["category"] for r in rows)
    print_table(f"per category ({label}; main scores)", {},
                {f"{c} ({counts[c]})" if c in counts else c: v for c, v in categories.items()})
  return result, skipped


def _mteb_main_score(encoder, task, args: argparse.Namespace) -> float:
  import mteb

  from bge_jax.eval import mteb_adapter
  model = mteb_adapter.MTEBEncoder(encoder, query_instruction=args.query_instruction or None,
                                   batch_size=args.batch_size, max_length=args.max_length)
  return mteb_adapter.main_score(mteb.evaluate(model, [task], cache=None,
                                               show_progress_bar=False))


def _print_task(i: int, total: int, row: dict) -> None:
  extra = (f"  (mteb {row['mteb_main_score']:.4f})" if "mteb_main_score" in row else "")
  others = ", ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items()
                     if k != row["main_metric"])
  print(f"  [{i}/{total}] {row['category']:<18} {row['name']:<26} {row['main_metric']} "
        f"{row['main_score']:.4f}{extra}  {row['size']}  {others}  {row['seconds']} s",
        flush=True)


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
  """Runs the command line; returns the exit status (0 done, 2 refused, 3 some --mteb-tasks not
  in the local cache)."""
  from bge_jax.convert import ConversionError
  from bge_jax.eval import EvalDataError

  argv = sys.argv[1:] if argv is None else list(argv)
  subcommand = bool(argv) and argv[0] in SUBCOMMANDS
  skipped: list[str] = []
  try:
    if subcommand:
      args = build_parser().parse_args(argv)
      result = run(args)
    else:
      args = build_suite_parser().parse_args(argv)
      result, skipped = run_suite(args)
  except (_Refused, EvalDataError, ConversionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 2
  if subcommand:
    info = {k: v for k, v in result.items() if k not in ("task", "metrics")}
    print_table(f"{result['task']} evaluation", info, result["metrics"])
  if args.out:
    from bge_jax.data.files import atomic_file

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_file(args.out) as f:
      json.dump(result, f, indent=2)
      f.write("\n")
    print(f"wrote {args.out}")
  for line in skipped:
    print(f"skipped: {line}")
  return 3 if skipped else 0


if __name__ == "__main__":
  # The command's process defaults, set before main() imports transformers; importing this
  # module (tests call main() in-process) leaves the importer's environment alone.
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  sys.exit(main())
