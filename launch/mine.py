"""Mine hard negatives for a FlagEmbedding training file (FlagEmbedding's `hn_mine`).

  python launch/mine.py --model PATH --input train.jsonl --output out.jsonl \
      [--candidate-pool pool.jsonl] [--range 10-210] [--negatives 15] \
      [--query-instruction TEXT] [--pooling cls|mean] [--batch-size N] [--max-length N] [--seed S]

Every row's "neg" is replaced by passages ranked [START, END) for its query (exact inner-product
search over the candidate pool, or over all pos/neg passages of the input), minus its positives
and the query itself, topped up with random passages when too few remain. The output appears
only when complete (written beside it, then renamed). Bad input exits 2 with one `error:` line
naming file:line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
  summary, _, details = __doc__.partition("\n\n")
  p = argparse.ArgumentParser(prog="launch/mine.py", description=summary,
                              epilog=details.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, metavar="PATH",
                 help="Hugging Face / sentence-transformers folder, bge-jax params folder, "
                      "or a training run's workdir (its newest checkpoint).")
  p.add_argument("--input", required=True, metavar="JSONL",
                 help='training rows {"query", "pos", "neg"?, ...}.')
  p.add_argument("--output", required=True, metavar="JSONL",
                 help="where to write the rows with mined negatives (replaced atomically).")
  p.add_argument("--candidate-pool", default=None, metavar="JSONL",
                 help='{"text"} rows to mine from (default: all pos/neg passages of --input).')
  p.add_argument("--range", default="10-210", dest="range_for_sampling", metavar="START-END",
                 help="neighbour ranks to sample from, END exclusive (default: 10-210).")
  p.add_argument("--negatives", type=int, default=15, metavar="N",
                 help="negatives per row (default: 15).")
  p.add_argument("--query-instruction", default=None, metavar="TEXT",
                 help="prepended to queries before encoding, e.g. 'Represent this sentence for "
                 "searching relevant passages: ' (default: none).")
  p.add_argument("--pooling", choices=("cls", "mean"), default="cls",
                 help="sentence pooling: cls for BGE models (default), mean for "
                 "sentence-transformers models such as all-MiniLM-L6-v2.")
  p.add_argument("--batch-size", type=int, default=256, metavar="N",
                 help="encoding batch size (default: 256).")
  p.add_argument("--max-length", type=int, default=512, metavar="N",
                 help="tokens per text when encoding (default: 512, capped by the model).")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0).")
  p.add_argument("--block-size", type=int, default=None, metavar="N",
                 help="corpus rows scored at a time per device (default: 8192).")
  return p


def _fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("bge_jax.mine").setLevel(logging.INFO)

  from bge_jax import convert, mine

  try:
    start, end = mine.parse_range(args.range_for_sampling)
  except ValueError as e:
    return _fail(f"--range: {e}")
  for name, value in (("--negatives", args.negatives), ("--batch-size", args.batch_size),
                      ("--max-length", args.max_length), ("--block-size", args.block_size or 1)):
    if value < 1:
      return _fail(f"{name}={value}; it must be >= 1")
  if args.seed < 0:
    return _fail(f"--seed={args.seed}; it must be >= 0")
  for name, path in (("--input", args.input), ("--candidate-pool", args.candidate_pool)):
    if path is not None and not os.path.isfile(path):
      return _fail(f"{name} {path}: no such file")
  if not os.path.exists(args.model):
    return _fail(f"--model {args.model}: no such file or folder")
  out_dir = os.path.dirname(os.path.abspath(args.output))
  if not os.path.isdir(out_dir):
    return _fail(f"--output {args.output}: folder {out_dir} does not exist")
  if os.path.isdir(args.output):
    return _fail(f"--output {args.output} is a folder; name a .jsonl file")

  try:
    rows = mine.read_rows(args.input)
    pool = mine.read_candidate_pool(args.candidate_pool) if args.candidate_pool else None
  except mine.MiningInputError as e:
    return _fail(str(e))

  from bge_jax.encoder import Encoder
  try:
    encoder = Encoder.from_hf(args.model, pooling=args.pooling)
  except (convert.ConversionError, OSError, ValueError) as e:
    return _fail(f"--model {args.model}: {e}")

  try:
    mined, stats = mine.mine_with_stats(
        rows, encoder, candidate_pool=pool, range_for_sampling=(start, end),
        negative_number=args.negatives, query_instruction=args.query_instruction,
        seed=args.seed, batch_size=args.batch_size, max_length=args.max_length,
        block_size=args.block_size or mine.DEFAULT_BLOCK_SIZE)
  except ValueError as e:
    return _fail(str(e))
  mine.write_rows(args.output, mined)
  print(f"mined {stats.rows} rows -> {args.output}: corpus {stats.corpus_size} passages, "
        f"ranks {start}-{end}, {stats.negative_number} negatives per row, "
        f"{stats.topped_up} of {stats.rows} rows topped up with random passages"
        + (f", {stats.short} left short (the corpus is too small)" if stats.short else ""))
  return 0


if __name__ == "__main__":
  # The command's process defaults, set before main() imports transformers; importing this
  # module (tests call main() in-process) leaves the importer's environment alone.
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  sys.exit(main())
