#!/usr/bin/env python
"""The conversion command: Hugging Face / sentence-transformers / RetroMAE weights <-> bge-jax.

  python conversion/convert.py hf-to-jax SRC OUT [--check] [--ignore-unknown] [--overwrite]
                                                 [--dtype float32] [--tol 1e-4]
  python conversion/convert.py jax-to-hf SRC OUT [--check] [--no-sentence-transformers]
                                                 [--pooling cls|mean] [--max-seq-length N]
                                                 [--step N] [--overwrite] [--tol 1e-4]

Parses the arguments and runs `bge_jax.interop.hf_to_jax` / `jax_to_hf` (see `--help` for the
formats). `main(argv) -> exit status` runs in-process too (tests call `main([...])`): refusals
(`convert.ConversionError`) come out as one `error:` line on stderr with exit status 2, a failed
`--check` exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from typing import Sequence

# A source checkout that was not pip-installed runs too: the package beside this folder comes
# first on the path (as in launch/aot.py); when it is imported, the path already holds it.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from bge_jax import convert, interop  # noqa: E402  (after the path above)

EXIT_OK, EXIT_CHECK_FAILED, EXIT_REFUSED = 0, 1, 2

_EPILOG = """\
formats:
  Hugging Face side (what `hf-to-jax` reads, via bge_jax.convert.load_hf):
    * a transformers folder: config.json + model.safetensors, model.safetensors.index.json,
      pytorch_model.bin or pytorch_model.bin.index.json, in BertModel (embeddings.*,
      encoder.layer.N.*, pooler.*) or BertForMaskedLM (bert.*, cls.*) naming;
    * a sentence-transformers folder (modules.json, 1_Pooling/config.json, optional
      Normalize): its pooling (cls or mean) and normalisation go into the checkpoint config;
    * a single .safetensors or .bin weight file with config.json beside it;
    * FlagEmbedding's RetroMAE pre-training state (lm.bert.*, lm.cls.*, c_head.*,
      decoder_embeddings.*) as a .bin with config.json beside it: encoder, MLM head and
      enhanced decoder are all kept.
    Only config.json model_type "bert" is converted (post-LN, exact GELU, absolute positions).
  Hugging Face side (what `jax-to-hf` writes, via bge_jax.convert.save_hf):
    config.json + model.safetensors (BertForMaskedLM when the params hold an MLM head, else
    BertModel), the tokenizer files, sentence-transformers modules.json + 1_Pooling (+
    2_Normalize), and retromae_state.safetensors (FlagEmbedding naming) when the params hold a
    RetroMAE decoder.
  bge-jax params folder (what `hf-to-jax` writes, `jax-to-hf` reads, training loads):
    DIR/bge_jax.json  {"format": "bge-jax/params", "version": 1, "config": {BertConfig fields}}
    DIR/params/       orbax StandardCheckpointer tree, nested like the Flax params
    DIR/tokenizer/    Hugging Face tokenizer files (vocab.txt, tokenizer.json, ...), when known

writing:
  OUT must not exist unless --overwrite is given, and --overwrite only replaces a previous
  output of the same kind (or an empty folder). Everything is written to a temporary folder
  beside OUT and renamed into place when complete (and, with --check, verified): after any
  failure there is no OUT and no temporary folder.

--check:
  Runs the Hugging Face side in PyTorch (transformers.AutoModel) and the bge-jax model on a few
  sample sentences (tokenised with the model's tokenizer, random ids when there is none) and
  prints max |delta| of the last hidden state over real tokens and of the pooled embedding.
  Needs torch (pip install torch==2.13.0).

exit status: 0 done; 1 --check found a difference above --tol (nothing written);
  2 refused (one "error:" line on stderr naming the file, key or shape and the fix).
"""


class _Parser(argparse.ArgumentParser):
  """argparse, but usage errors raise (one `error:` line from main) instead of exiting."""

  def error(self, message: str):
    raise convert.ConversionError(f"{message} (see {self.prog} --help)")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
  parser = _Parser(
      prog=prog or "convert.py",
      description=_fill("Convert BERT weights between Hugging Face / sentence-transformers / "
                        "FlagEmbedding RetroMAE files and bge-jax params folders."),
      epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, metavar="{hf-to-jax,jax-to-hf}")

  def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true",
                   help="compare PyTorch and bge-jax outputs on sample sentences before moving "
                        "OUT into place (needs torch)")
    p.add_argument("--tol", type=float, default=interop.DEFAULT_TOL, metavar="X",
                   help="largest max |delta| --check accepts (default %(default)g; use ~5e-2 "
                        "for bfloat16/float16 params)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT when it is a previous output of this command")

  h2j = sub.add_parser(
      "hf-to-jax", help="Hugging Face folder or file -> bge-jax params folder",
      description=_fill("Read a Hugging Face BERT (folder, sentence-transformers folder, single "
                        ".safetensors/.bin with config.json beside it, or FlagEmbedding "
                        "RetroMAE state .bin) and write a bge-jax params folder (bge_jax.json + "
                        "params/ + tokenizer/) at OUT. Tokenizer files next to the weights are "
                        "copied."),
      epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  h2j.add_argument("src", metavar="SRC", help="Hugging Face folder or weight file")
  h2j.add_argument("out", metavar="OUT", help="bge-jax params folder to create")
  h2j.add_argument("--ignore-unknown", action="store_true",
                   help="drop tensors that are not part of the BERT encoder, pooler, MLM head "
                        "or RetroMAE decoder (a warning lists them) instead of refusing")
  h2j.add_argument("--dtype", choices=interop.DTYPES, default="float32",
                   help="storage dtype of the written params (default %(default)s)")
  add_common(h2j)
  h2j.set_defaults(run=_run_hf_to_jax)

  j2h = sub.add_parser(
      "jax-to-hf", help="bge-jax params folder -> Hugging Face / sentence-transformers folder",
      description=_fill("Read a bge-jax params folder and write a folder that transformers "
                        "(AutoModel; AutoModelForMaskedLM when it holds an MLM head, which "
                        "AutoModel then reports as unused) and sentence-transformers load. "
                        "The tokenizer comes from the checkpoint's "
                        "tokenizer/ folder; the sentence-transformers pooling from the "
                        "checkpoint config unless --pooling is given. SRC may also be a "
                        "training run's workdir, finished or not: the params of its newest "
                        "committed checkpoint (or --step), with the run's model config and "
                        "tokenizer, as the run's own export would write them."),
      epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  j2h.add_argument("src", metavar="SRC",
                   help="bge-jax params folder (has bge_jax.json), or a training run's "
                        "workdir (run_info.json + checkpoints/): its newest checkpoint, or --step")
  j2h.add_argument("--step", type=int, default=None, metavar="N",
                   help="with a run workdir as SRC: the checkpoint of step N (default: newest)")
  j2h.add_argument("out", metavar="OUT", help="Hugging Face folder to create")
  j2h.add_argument("--no-sentence-transformers", action="store_true",
                   help="write only the transformers files (no modules.json / 1_Pooling)")
  j2h.add_argument("--pooling", choices=("cls", "mean"), default=None,
                   help="sentence-transformers pooling (default: the checkpoint config's, which "
                        "is cls unless it came from a mean-pooling model)")
  j2h.add_argument("--max-seq-length", type=int, default=None, metavar="N",
                   help="sentence-transformers max_seq_length (default: a run's "
                        "data.passage_max_length, else max_position_embeddings)")
  add_common(j2h)
  j2h.set_defaults(run=_run_jax_to_hf)
  return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
  """Runs the command line; returns the exit status (0 done, 1 check failed, 2 refused)."""
  parser = build_parser(prog)
  warnings = _WarningLines()
  logging.getLogger("bge_jax").addHandler(warnings)
  try:
    try:
      args = parser.parse_args(argv)
    except SystemExit as e:  # --help
      return int(e.code or 0)
    return args.run(args)
  except interop.CheckFailed as e:
    _error(str(e))
    return EXIT_CHECK_FAILED
  except KeyboardInterrupt:  # the temporary output is already removed
    _error("interrupted; nothing was written.")
    return 130
  except (convert.ConversionError, OSError) as e:
    _error(str(e))
    return EXIT_REFUSED
  finally:
    logging.getLogger("bge_jax").removeHandler(warnings)


def _run_hf_to_jax(args: argparse.Namespace) -> int:
  interop.hf_to_jax(args.src, args.out, check=args.check, tol=args.tol, overwrite=args.overwrite,
                    ignore_unknown=args.ignore_unknown, dtype=args.dtype)
  return EXIT_OK


def _run_jax_to_hf(args: argparse.Namespace) -> int:
  if args.max_seq_length is not None and args.max_seq_length < 1:
    raise convert.ConversionError(f"--max-seq-length={args.max_seq_length}; it must be >= 1.")
  interop.jax_to_hf(args.src, args.out, check=args.check, tol=args.tol, overwrite=args.overwrite,
                    sentence_transformers=not args.no_sentence_transformers, pooling=args.pooling,
                    max_seq_length=args.max_seq_length, step=args.step)
  return EXIT_OK


def _fill(text: str) -> str:
  return textwrap.fill(text, width=94)


def _error(message: str) -> None:
  print("error: " + " ".join(message.split()), file=sys.stderr, flush=True)


class _WarningLines(logging.Handler):
  """bge_jax library warnings (e.g. tensors dropped by --ignore-unknown) as `warning:` lines."""

  def __init__(self):
    super().__init__(level=logging.WARNING)

  def emit(self, record: logging.LogRecord) -> None:
    print("warning: " + record.getMessage(), file=sys.stderr, flush=True)


if __name__ == "__main__":
  sys.exit(main(prog=os.path.basename(sys.argv[0])))
