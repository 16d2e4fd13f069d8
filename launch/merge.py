"""Merge embedding models by weighted parameter averaging (LM-Cocktail).

  python launch/merge.py --models FINETUNED BASE --weights 0.5 0.5 --out merged/
  python launch/merge.py --models A B C --examples few.jsonl --out merged/ [--format jax]

Every model is a Hugging Face folder, a sentence-transformers folder or a bge-jax params folder
folder; all must have the same architecture (a mismatch is refused, naming the first differing
tensor and both paths). Only the encoder is merged unless --keep-heads (MLM head, pooler and
RetroMAE decoder are not used by sentence embeddings).

Weights: --weights gives one per model (normalised to sum to 1); --examples gives a few
FlagEmbedding rows {"query", "pos": [...], "neg": [...]} (JSONL) of the target task, and model i
gets softmax(-loss_i / --temperature) where loss_i is its contrastive loss on them (in-batch
negatives, tau 0.02, the model's own pooling); with neither, the models are averaged uniformly.
LM-Cocktail's usual recipe: merge the fine-tuned model with its base (e.g. 0.5 / 0.5) to keep
the gain on the new task without losing general quality, or weight several experts by examples.

The merged model takes the first model's config (pooling, normalisation) and tokenizer: list
the fine-tuned model first. Output (--format hf, the default): a Hugging Face BertModel folder
with sentence-transformers files (modules.json, 1_Pooling, 2_Normalize) that transformers,
sentence-transformers and bge_jax.Encoder load; --format jax: a bge-jax params folder. The
output appears only when complete (written to a temporary folder, then renamed). Errors print
one `error:` line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
  summary, _, details = __doc__.partition("\n\n")
  p = argparse.ArgumentParser(prog="launch/merge.py", description=summary, epilog=details,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", required=True, metavar="PATH",
                 help="two or more model folders (HF, sentence-transformers, bge-jax "
                 "checkpoint, or a training run's workdir: its newest checkpoint); the first "
                 "one's config and tokenizer are kept.")
  how = p.add_mutually_exclusive_group()
  how.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per model, >= 0 (normalised to sum to 1).")
  how.add_argument("--examples", metavar="JSONL",
                   help="a few target-task rows {query, pos, neg}: weights = "
                   "softmax(-loss / --temperature).")
  p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist "
                 "unless --overwrite).")
  p.add_argument("--format", choices=("hf", "jax"), default="hf",
                 help="hf: Hugging Face + sentence-transformers folder (default); jax: bge-jax "
                 "checkpoint.")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out.")
  p.add_argument("--keep-heads", action="store_true",
                 help="also merge the MLM head / pooler / RetroMAE decoder (all models must "
                 "have them).")
  p.add_argument("--pooling", choices=("cls", "mean"), default=None,
                 help="pooling of the merged model (default: the first model's).")
  p.add_argument("--temperature", type=float, default=5.0,
                 help="softmax temperature of --examples weights (default: 5, LM-Cocktail's).")
  p.add_argument("--loss-temperature", type=float, default=0.02,
                 help="tau of the contrastive loss on --examples (default: 0.02; LM-Cocktail "
                 "uses 0.05).")
  p.add_argument("--neg-number", type=int, default=7,
                 help="negatives per example row at most (default: 7, LM-Cocktail's).")
  p.add_argument("--query-instruction", default=None, metavar="TEXT",
                 help="prepended to the example queries (e.g. BGE's retrieval instruction).")
  p.add_argument("--query-max-length", type=int, default=64)
  p.add_argument("--passage-max-length", type=int, default=256)
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  out = os.path.abspath(args.out)
  if os.path.exists(out) and not args.overwrite:
    print(f"error: {out} exists; choose another --out or pass --overwrite.", file=sys.stderr)
    return 2

  from bge_jax import convert, merge, weights
  from bge_jax.data.sources import DataError

  try:
    result = merge.merge_paths(
        args.models, args.weights, examples=args.examples, temperature=args.temperature,
        encoder_only=not args.keep_heads, pooling=args.pooling,
        **({} if args.examples is None else dict(
            loss_temperature=args.loss_temperature, neg_number=args.neg_number,
            query_instruction=args.query_instruction, query_max_length=args.query_max_length,
            passage_max_length=args.passage_max_length)))
  except (merge.MergeError, convert.ConversionError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  source = ("given" if args.weights else
            f"softmax(-loss / {args.temperature}) on {args.examples}" if args.examples else
            "uniform")
  print(f"weights ({source}):")
  for i, (path, w) in enumerate(zip(result.models, result.weights)):
    loss = f"  loss {result.losses[i]:.4f}" if result.losses is not None else ""
    print(f"  {w:.6f}  {path}{loss}")
  if args.format == "hf":
    convert.save_hf(result.params, result.config, out, tokenizer=result.tokenizer,
                    overwrite=args.overwrite)
  else:
    weights.save_params(out, result.params, result.config, tokenizer=result.tokenizer,
                           overwrite=args.overwrite)
  print(f"wrote {out} ({args.format}, pooling {result.config.pooling}"
        f"{' + normalize' if result.config.normalize else ''})")
  return 0


if __name__ == "__main__":
  # The command's process defaults, set before main() imports transformers; importing this
  # module (tests call main() in-process) leaves the importer's environment alone.
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  sys.exit(main())
