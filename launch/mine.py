"""Mine hard negatives for a FlagEmbedding training file (FlagEmbedding's `hn_mine`).

  python launch/mine.py --model PATH --input train.jsonl --output out.jsonl \
      [--candidate-pool pool.jsonl] [--range 10-210] [--negatives 15] \
      [--query-instruction TEXT] [--pooling cls|mean] [--batch-size N] [--max-length N] [--seed S]
      [--max-score S] [--margin M] [--relative-margin R]
      [--coordinator-address HOST:PORT --num-processes N --process-id I | --distributed]

Every row's "neg" is replaced by passages ranked [START, END) for its query (exact inner-product
search over the candidate pool, or over all pos/neg passages of the input), minus its positives
and the query itself, minus candidates breaking a score limit (false-negative control, as
sentence-transformers' mine_hard_negatives: --max-score, --margin = its absolute_margin,
--relative-margin), topped up with random passages when too few remain. The output appears
only when complete (written beside it, then renamed). Bad input exits 2 with one `error:` line
naming file:line.

Several processes (jax.distributed, e.g. one per host): each embeds its own slice of the
corpus, of the queries and of the positives missing from the pool (whole --chunk-size chunks),
the query embeddings are gathered so each process searches its corpus slice with every query,
and the top-k lists are merged: corpus embeddings and encoding time are split across hosts,
every process holds all query embeddings (Q x D x 4 bytes). Every process reads the input;
process 0 alone shows progress bars, writes the output and prints the summary. The negatives
are the same as one process's.
"""

from __future__ import annotations

import argparse
import logging
import math
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
                 help='training rows {"query", "pos", "neg"?, ...}, or a prepared pairs folder '
                 "(launch/prepare_data.py).")
  p.add_argument("--output", required=True, metavar="JSONL",
                 help="where to write the rows with mined negatives (replaced atomically).")
  p.add_argument("--candidate-pool", default=None, metavar="JSONL",
                 help='{"text"} rows to mine from, or a prepared text folder (default: all '
                 "pos/neg passages of --input).")
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
  p.add_argument("--chunk-size", type=int, default=None, metavar="N",
                 help="texts (passages, queries) encoded per call, the unit of the split "
                      "across processes (default: 65536).")
  limits = p.add_argument_group(
      "false-negative control (scores are inner products: cosine for normalised embeddings)")
  limits.add_argument("--max-score", "--max_score", type=float, default=None, metavar="S",
                      help="skip candidates scoring above S against the query (default: none).")
  limits.add_argument("--margin", "--absolute-margin", type=float, default=None, metavar="M",
                      help="skip candidates with score + M > the query's positive score (its "
                      "lowest positive's, when it has several); 0 keeps only candidates scoring "
                      "at most the positive (default: none).")
  limits.add_argument("--relative-margin", "--relative_margin", type=float, default=None,
                      metavar="R", help="skip candidates scoring above pos - |pos| * R, e.g. "
                      "0.05 as NV-Retriever (default: none).")
  multi = p.add_argument_group("several processes (jax.distributed)")
  multi.add_argument("--coordinator-address", "--coordinator_address", default=None,
                     metavar="HOST:PORT", help="process 0's host and a free port.")
  multi.add_argument("--num-processes", "--num_processes", type=int, default=None, metavar="N")
  multi.add_argument("--process-id", "--process_id", type=int, default=None, metavar="I",
                     help="this process's index (0 writes the output).")
  multi.add_argument("--distributed", action="store_true",
                     help="jax.distributed.initialize() from the cluster's environment (TPU pod "
                     "slice, SLURM, Open MPI) instead of the three flags above.")
  return p


def _init_distributed(args: argparse.Namespace) -> str | None:
  """jax.distributed from the flags; returns an error message for a wrong combination."""
  explicit = (args.coordinator_address, args.num_processes, args.process_id)
  if all(v is None for v in explicit):
    if args.distributed:
      import jax
      jax.distributed.initialize()
    return None
  if any(v is None for v in explicit):
    return ("--coordinator-address, --num-processes and --process-id go together (process 0's "
            "host:port, the process count, this process's index)")
  if not 0 <= args.process_id < args.num_processes:
    return (f"--process-id={args.process_id}; it must be in [0, --num-processes="
            f"{args.num_processes})")
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  return None


def _fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("bge_jax.mine").setLevel(logging.INFO)

  from bge_jax import convert, mine
  from bge_jax.data import prepared
  from bge_jax.data.sources import DataError

  try:
    start, end = mine.parse_range(args.range_for_sampling)
  except ValueError as e:
    return _fail(f"--range: {e}")
  for name, value in (("--negatives", args.negatives), ("--batch-size", args.batch_size),
                      ("--max-length", args.max_length), ("--block-size", args.block_size or 1),
                      ("--chunk-size", args.chunk_size or 1)):
    if value < 1:
      return _fail(f"{name}={value}; it must be >= 1")
  if args.seed < 0:
    return _fail(f"--seed={args.seed}; it must be >= 0")
  for name, value in (("--max-score", args.max_score), ("--margin", args.margin),
                      ("--relative-margin", args.relative_margin)):
    if value is not None and not math.isfinite(value):
      return _fail(f"{name}={value}; it must be a finite number")
  for name, path in (("--input", args.input), ("--candidate-pool", args.candidate_pool)):
    if path is not None and not (os.path.isfile(path) or prepared.is_prepared(path)):
      return _fail(f"{name} {path}: no such file")
  if not os.path.exists(args.model):
    return _fail(f"--model {args.model}: no such file or folder")
  out_dir = os.path.dirname(os.path.abspath(args.output))
  if not os.path.isdir(out_dir):
    return _fail(f"--output {args.output}: folder {out_dir} does not exist")
  if os.path.isdir(args.output):
    return _fail(f"--output {args.output} is a folder; name a .jsonl file")

  problem = _init_distributed(args)
  if problem:
    return _fail(problem)

  try:
    rows = mine.read_rows(args.input)
    pool = mine.read_candidate_pool(args.candidate_pool) if args.candidate_pool else None
  except (mine.MiningInputError, DataError) as e:
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
        block_size=args.block_size or mine.DEFAULT_BLOCK_SIZE, max_score=args.max_score,
        margin=args.margin, relative_margin=args.relative_margin,
        chunk_size=args.chunk_size or mine.DEFAULT_CHUNK_SIZE)
  except ValueError as e:
    return _fail(str(e))
  import jax
  if jax.process_index() != 0:
    return 0
  mine.write_rows(args.output, mined)
  why = "the corpus is too small" if not stats.skipped else "widen --range or loosen the limits"
  skipped = "".join(f", {k} skipped {v} of {stats.candidates} candidates"
                    for k, v in stats.skipped.items())
  processes = f" ({stats.processes} processes)" if stats.processes > 1 else ""
  print(f"mined {stats.rows} rows -> {args.output}: corpus {stats.corpus_size} passages"
        f"{processes}, ranks {start}-{end}, {stats.negative_number} negatives per row{skipped}, "
        f"{stats.topped_up} of {stats.rows} rows topped up with random passages"
        + (f", {stats.short} left short ({why})" if stats.short else ""))
  return 0


if __name__ == "__main__":
  # The command's process defaults, set before main() imports transformers; importing this
  # module (tests call main() in-process) leaves the importer's environment alone.
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  sys.exit(main())
