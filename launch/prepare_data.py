"""Prepare training data once: validated rows in sharded, indexed array_record files + a manifest.

  python launch/prepare_data.py --out data/cmtp_prepared pairs/*.jsonl.gz [more specs ...]
      [--data pairs|text] [--kind auto|fe|pairs] [--on-error raise|skip] [--dedupe]
      [--workers N] [--rows-per-shard N] [--field text] [--min-chars N] [--overwrite]
  python launch/prepare_data.py --verify data/cmtp_prepared

Inputs are what data.train takes: files (.jsonl/.json/.tsv for pairs, .jsonl/.json/.txt for
text, each optionally .gz), folders (recursively, sorted) and globs (quote them), concatenated in
order. --data pairs (stages 2/3) reads FlagEmbedding rows {"query", "pos", "neg", ...} and pair
files exactly as the trainer's JSONL path does (same validation, same `file:line` errors, same
on_error="skip" counts per reason); --data text (stage 1) reads texts as `open_text_source`.

The output folder (written beside itself under a temporary name, then renamed: an error or ^C
leaves nothing) holds bge_jax_manifest.json (counts per shard, fields, sources with sizes and
mtimes, a SHA-256 per shard, skip counts by reason with the first file:line) and the shards.
Name it as data.train; the trainer then opens it in time proportional to the shards (not the
rows) and each process reads only the rows of its own batches. Row order is the inputs' order,
so training on the prepared folder gives the same batches as training on the inputs.

Scaling: workers read input files in parallel (the speed-up is up to min(--workers, files); one
huge file is read by one worker: split it); memory per worker is bounded by --rows-per-shard
statistics, never by the rows. --dedupe drops exact duplicate rows with 64-bit hashes sorted in
external memory (--dedupe-memory-mb at a time, plus a 1-bit-per-row bitmap).

--verify DIR checks every shard's full SHA-256 against the manifest (opening checks only each
shard's size and the CRC32 of its first and last 64 KiB). Exit status: 0 done; 2 bad input or
a refused dataset (one `error:` line naming the file and the fix).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def _parser() -> argparse.ArgumentParser:
  summary, _, details = __doc__.partition("\n\n")
  p = argparse.ArgumentParser(prog="launch/prepare_data.py", description=summary,
                              epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("inputs", nargs="*", metavar="SPEC",
                 help="input files, folders or globs, in order.")
  p.add_argument("--out", metavar="DIR", help="the prepared dataset folder to write.")
  p.add_argument("--verify", metavar="DIR", default=None,
                 help="check a prepared folder's shards against their full SHA-256; no writing.")
  p.add_argument("--data", choices=("pairs", "text"), default="pairs",
                 help="pairs: contrastive rows (stages 2/3, default); text: texts (stage 1).")
  p.add_argument("--kind", choices=("auto", "fe", "flag", "pairs"), default="auto",
                 help="(--data pairs) as config data.kind: FlagEmbedding rows (fe), pair rows, "
                      "or decided per file (auto, default).")
  p.add_argument("--field", default="text",
                 help="(--data text) JSON key(s) holding the texts, comma-separated "
                      "(default: text), as config data.field.")
  p.add_argument("--min-chars", type=int, default=1, metavar="N",
                 help="(--data text) shorter texts are bad rows (default: 1), as data.min_chars.")
  p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                 help="raise: the first bad row stops with file:line (default); skip: bad rows "
                      "are skipped and counted per reason in the manifest.")
  p.add_argument("--dedupe", action="store_true",
                 help="drop exact duplicate rows (pairs: all fields equal; text: equal texts).")
  p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                 help="processes reading input files in parallel (default: min(8, CPUs)).")
  p.add_argument("--rows-per-shard", type=int, default=None, metavar="N",
                 help="most rows per shard file (default: 250000).")
  p.add_argument("--records-per-chunk", type=int, default=1, metavar="N",
                 help="array_record records per compressed chunk (default: 1, the fastest random "
                      "reads; the reader's index keeps ~12-15 bytes per row of each shard it "
                      "opened: 4 cuts that to a quarter, ~1.8x the time per read).")
  p.add_argument("--dedupe-memory-mb", type=int, default=256, metavar="MB",
                 help="memory for sorting hashes in the dedupe phase (default: 256).")
  p.add_argument("--overwrite", action="store_true",
                 help="replace --out if it exists (only once the new one is complete).")
  p.add_argument("--quiet", action="store_true", help="no progress bars.")
  return p


def _interrupt(signum, frame) -> None:
  """SIGTERM unwinds like ^C, so the temporary output folder is removed."""
  raise KeyboardInterrupt


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  signal.signal(signal.SIGTERM, _interrupt)
  from bge_jax.data import prepare, prepared
  from bge_jax.data.sources import DataError
  try:
    if args.verify:
      if args.inputs or args.out:
        raise DataError("--verify DIR takes no inputs and no --out")
      t = time.perf_counter()
      m = prepared.read_manifest(args.verify)
      prepared.check_shards(args.verify, m, verify=True)
      print(f"{args.verify}: {m['rows']} rows in {len(m['shards'])} shards: every SHA-256 "
            f"matches ({time.perf_counter() - t:.1f} s)")
      return 0
    if not args.inputs or not args.out:
      raise DataError("give input SPECs and --out DIR (or --verify DIR); see --help")
    kw = {}
    if args.rows_per_shard is not None:
      kw["rows_per_shard"] = args.rows_per_shard
    m = prepare.prepare(args.inputs, args.out, data=args.data, kind=args.kind, field=args.field,
                        min_chars=args.min_chars, on_error=args.on_error, dedupe=args.dedupe,
                        workers=args.workers, overwrite=args.overwrite, progress=not args.quiet,
                        dedupe_memory=args.dedupe_memory_mb << 20,
                        records_per_chunk=args.records_per_chunk, **kw)
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: nothing written", file=sys.stderr)
    return 130
  seconds = m["prepare_seconds"]["total"]
  skipped = ", ".join(f"{r} {n} (first at {m['first_skipped'].get(r, '?')})"
                      for r, n in sorted(m["skipped"].items()))
  print(f"{os.path.abspath(args.out)}: {m['rows']} rows ({args.data}) in {len(m['shards'])} "
        f"shards from {len(m['sources'])} files in {seconds:.1f} s "
        f"({m['rows'] / max(seconds, 1e-9):.0f} rows/s)" + (f"; skipped {skipped}" if skipped
                                                             else ""))
  print(json.dumps({"rows": m["rows"], "shards": len(m["shards"]), "skipped": m["skipped"]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
