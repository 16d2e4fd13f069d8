"""Filter query/passage pairs by an embedding model's scores (C-Pack's C-MTP filtering).

  python launch/filter_pairs.py --model PATH --input PAIRS --output kept.jsonl \
      [--threshold 0.43] [--top-k 2 --sample-size 1000000 --seed 0] \
      [--query-instruction TEXT] [--dropped dropped.jsonl] [--prepared DIR] \
      [--summary S.json] [--plot S.png] [--pooling cls|mean] [--batch-size N] [--max-length N]

Every (query, positive) pair of --input is scored by --model (cosine of normalised embeddings)
and kept when it passes every rule given: --threshold (score >= T; C-Pack dropped pairs under
0.43 with Text2Vec-Chinese, a value that belongs to that model: read the PNG before choosing
one) and --top-k (consistency filtering as E5: the positive ranks in the top K for its query
among the positives of --sample-size random rows, or of every row when there are fewer).
Writes the kept rows (FlagEmbedding JSONL; a row keeps the positives that pass and is dropped
when none does), optionally the dropped pairs with their scores/ranks and source file:line,
and optionally a prepared dataset of the kept rows (launch/prepare_data.py's format); then a
JSON summary (kept/dropped counts, score quantiles) and the score distribution as a PNG
(default: beside --output, <stem>.summary.json and <stem>.scores.png).

--input is what training reads: JSONL/TSV files, folders, globs (pairs as query/pos,
title/passage, text/text_pos, sentence1/sentence2 or query<TAB>passage, or FlagEmbedding
rows), or a prepared dataset folder (read lazily). Outputs appear only when complete. Bad input
exits 2 with one `error:` line naming the file (and line).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys


def _parser() -> argparse.ArgumentParser:
  summary, _, details = __doc__.partition("\n\n")
  p = argparse.ArgumentParser(prog="launch/filter_pairs.py", description=summary,
                              epilog=details.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, metavar="PATH",
                 help="Hugging Face / sentence-transformers folder, bge-jax params folder, "
                      "or a training run's workdir (its newest checkpoint).")
  p.add_argument("--input", required=True, metavar="DATA",
                 help="pair/FlagEmbedding files, folders or globs, or a prepared dataset folder.")
  p.add_argument("--output", required=True, metavar="JSONL",
                 help="the kept rows, FlagEmbedding JSONL (replaced atomically).")
  rules = p.add_argument_group("rules (at least one; a pair must pass every rule given)")
  rules.add_argument("--threshold", type=float, default=None, metavar="T",
                     help="keep pairs with cosine >= T (default: off).")
  rules.add_argument("--top-k", "--top_k", type=int, default=None, metavar="K",
                     help="keep pairs whose positive ranks in the top K for its query among "
                     "the sample (E5: 2; default: off).")
  rules.add_argument("--sample-size", "--sample_size", type=int, default=None, metavar="N",
                     help="rows whose positives form the --top-k sample (default: 1000000, "
                     "E5's pool; every row when there are fewer).")
  rules.add_argument("--seed", type=int, default=0, help="the sample's seed (default: 0).")
  p.add_argument("--query-instruction", "--query_instruction", default=None, metavar="TEXT",
                 help="prepended to queries of rows without their own \"prompt\" (default: "
                 "none).")
  out = p.add_argument_group("more outputs")
  out.add_argument("--dropped", default=None, metavar="JSONL",
                   help='the dropped pairs: {"query", "pos", "score", "rank"?, "source"}.')
  out.add_argument("--prepared", default=None, metavar="DIR",
                   help="also write the kept rows as a prepared dataset (must not exist).")
  out.add_argument("--summary", default=None, metavar="JSON",
                   help="counts and score quantiles (default: <output stem>.summary.json).")
  out.add_argument("--plot", default=None, metavar="PNG",
                   help="the score distribution (default: <output stem>.scores.png).")
  data = p.add_argument_group("reading")
  data.add_argument("--kind", choices=("auto", "fe", "pairs"), default="auto",
                    help="how JSONL files are read, as data.kind in training (default: auto).")
  data.add_argument("--on-error", "--on_error", choices=("raise", "skip"), default="raise",
                    help="a bad input row: stop naming it (default), or skip and count it.")
  enc = p.add_argument_group("encoding")
  enc.add_argument("--pooling", choices=("cls", "mean"), default="cls",
                   help="cls for BGE models (default), mean for all-MiniLM-style models.")
  enc.add_argument("--batch-size", "--batch_size", type=int, default=256, metavar="N",
                   help="encoding batch size (default: 256).")
  enc.add_argument("--max-length", "--max_length", type=int, default=512, metavar="N",
                   help="tokens per text (default: 512, capped by the model).")
  enc.add_argument("--chunk-rows", "--chunk_rows", type=int, default=None, metavar="N",
                   help="rows encoded and decided at a time (default: 8192).")
  return p


def _fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def _stem(path: str) -> str:
  return path[:-len(".jsonl")] if path.endswith(".jsonl") else path


def _check_output(flag: str, path: str | None) -> str | None:
  if path is None:
    return None
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    return f"{flag} {path}: folder {folder} does not exist"
  if os.path.isdir(path):
    return f"{flag} {path} is a folder; name a file"
  return None


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("bge_jax.filter").setLevel(logging.INFO)

  from bge_jax import convert
  from bge_jax import filter as filter_lib
  from bge_jax.data import files, pairs
  from bge_jax.data.sources import DataError

  if args.threshold is None and args.top_k is None:
    return _fail("no rule: set --threshold (cosine) and/or --top-k (consistency)")
  if args.threshold is not None and not math.isfinite(args.threshold):
    return _fail(f"--threshold={args.threshold}; it must be a finite number")
  if args.sample_size is not None and args.top_k is None:
    return _fail("--sample-size is for the --top-k rule; give --top-k too")
  for name, value in (("--top-k", args.top_k), ("--sample-size", args.sample_size),
                      ("--batch-size", args.batch_size), ("--max-length", args.max_length),
                      ("--chunk-rows", args.chunk_rows)):
    if value is not None and value < 1:
      return _fail(f"{name}={value}; it must be >= 1")
  if args.seed < 0:
    return _fail(f"--seed={args.seed}; it must be >= 0")
  try:
    rule = filter_lib.FilterRule(args.threshold, args.top_k,
                                 args.sample_size or filter_lib.DEFAULT_SAMPLE_SIZE, args.seed)
  except ValueError as e:
    return _fail(str(e))
  summary_path = args.summary or _stem(args.output) + ".summary.json"
  plot_path = args.plot or _stem(args.output) + ".scores.png"
  for flag, path in (("--output", args.output), ("--dropped", args.dropped),
                     ("--summary", summary_path), ("--plot", plot_path)):
    problem = _check_output(flag, path)
    if problem:
      return _fail(problem)
  if args.prepared is not None:
    from bge_jax.data import prepare as prepare_lib
    parent = os.path.dirname(os.path.abspath(args.prepared))
    if os.path.exists(args.prepared):
      return _fail(f"--prepared {args.prepared} exists; remove it or name another folder")
    if not os.path.isdir(parent):
      return _fail(f"--prepared {args.prepared}: folder {parent} does not exist")
  if not os.path.exists(args.model):
    return _fail(f"--model {args.model}: no such file or folder")

  try:
    # A prepared folder is read lazily (bge_jax.data.prepared), files are read into memory.
    source = pairs.open_contrastive_data(args.input, kind=args.kind, on_error=args.on_error)
  except DataError as e:
    return _fail(str(e))

  from bge_jax.encoder import Encoder
  try:
    encoder = Encoder.from_hf(args.model, pooling=args.pooling, normalize=True)
  except (convert.ConversionError, OSError, ValueError) as e:
    return _fail(f"--model {args.model}: {e}")

  summary = filter_lib.FilterSummary(rule)
  results = filter_lib.score_rows(
      source, encoder, rule, query_instruction=args.query_instruction,
      batch_size=args.batch_size, max_length=args.max_length,
      chunk_rows=args.chunk_rows or filter_lib.DEFAULT_CHUNK_ROWS, show_progress=None)
  try:
    with files.atomic_file(args.output) as kept_file, \
        (files.atomic_file(args.dropped) if args.dropped else open(os.devnull, "w")) as dropped:
      locate = getattr(source, "locate", None)
      for result in results:
        summary.add(result)
        row = result.kept()
        if row is not None:
          kept_file.write(json.dumps(row, ensure_ascii=False) + "\n")
        if args.dropped:
          bad = result.dropped(locate(result.index) if locate else None)
          if bad is not None:
            dropped.write(json.dumps(bad, ensure_ascii=False) + "\n")
  except DataError as e:
    return _fail(str(e))
  if summary.kept_rows == 0:
    print(f"warning: no pair passed the rules; {args.output} is empty", file=sys.stderr)

  info = dict(summary.to_json(), model=args.model, input=args.input,
              query_instruction=args.query_instruction, output=args.output)
  with files.atomic_file(summary_path) as f:
    json.dump(info, f, indent=2, ensure_ascii=False)
    f.write("\n")
  filter_lib.plot_scores(summary, plot_path, title=f"{os.path.basename(args.input)}: "
                         f"{summary.kept_pairs} of {summary.pairs} pairs kept")
  if args.prepared is not None and summary.kept_rows:
    prepare_lib.prepare([args.output], args.prepared, data="pairs", kind="fe",
                        progress=summary.kept_rows > 100_000)
  print(f"filtered {args.input} -> {args.output}: {summary.line()}; summary {summary_path}, "
        f"plot {plot_path}" + (f", prepared {args.prepared}" if args.prepared and
                               summary.kept_rows else ""))
  return 0


if __name__ == "__main__":
  # The command's process defaults, set before main() imports transformers; importing this
  # module (tests call main() in-process) leaves the importer's environment alone.
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  sys.exit(main())
