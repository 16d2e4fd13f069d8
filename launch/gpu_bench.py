"""GPU throughput benchmark: step time, tokens/s and MFU of the stage-2 and stage-1 train steps.

  PYTHONPATH=$PWD python3 launch/gpu_bench.py --out /tmp/gpu_bench           # bge-base, bf16
  python launch/gpu_bench.py --smoke                                          # tiny shapes, CPU ok

Why a separate script from launch/bench.py: it runs on a bare CUDA JAX image (jax, flax, optax,
transformers, absl, PyYAML; no grain, tfds, torch), so it imports only bge_jax's model, loss,
step and FLOPs modules and its numpy-only synthetic batches (`bge_jax.testing.batches`), and it
needs no network. The step is the trainer's own (`bge_jax.train.program`, from configs/
contrastive.py and configs/retromae.py), so the one package beyond that image is ml_collections
(pure Python; launch/gpu_checks.sh installs it from a carried wheel, see there).

Per stage: random bge-base weights (bf16 compute, float32 params and AdamW state), full-length
synthetic batches already on the device (the input pipeline is not measured), the step compiled
ahead of time with the state donated, XLA's memory analysis checked against the device limit
(the batch is halved until it fits), `--warmup` steps, then `--steps` steps each timed to
completion. Reported: median step time, tokens/s (every token is real here), analytic model
FLOPs per step (bge_jax.flops, PaLM convention: matmuls only, 3x forward, remat recompute not
counted) and MFU against the detected device's dense bf16 peak (H100/H200 SXM 989 TFLOP/s,
A100 312; `--peak-tflops` overrides), plus the device's peak memory.

Default shapes: stage 2 = bge-base-en, queries and passages of 512 tokens, in-batch negatives,
64 pairs; stage 1 = bge-base-en RetroMAE at 512 tokens, batch 64; dropout 0.1 as in training
(`--attention-dropout 0` measures the fused-attention path; `--attention-impl pallas` the fused
kernel with dropout, after checking it on the device). About 3 minutes on one H100 (two
compiles of ~30-60 s each, a third if a batch must shrink, then seconds of steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bge_jax import flops, memory  # noqa: E402
from bge_jax.config import preset  # noqa: E402
from bge_jax.testing import batches  # noqa: E402
from bge_jax.testing.programs import benchmark_program  # noqa: E402


def _shrink(rows: int) -> int:
  """The next smaller batch to try: 3/4, rounded down to a multiple of 8 (at least 1)."""
  return max(1, (rows * 3 // 4) // 8 * 8 or rows // 2)


def run_stage(name: str, program, make_batch, rows: int, args) -> dict:
  """Compile (shrinking `rows` until XLA's memory analysis and the first step fit the
  device), then time steps."""
  config = program.model_config
  device = jax.devices()[0]
  limit = memory.device_limit(device)
  key = jax.random.key(1)
  while True:
    state = program.init_state(program.init_params(jax.random.key(0)))
    batch = jax.device_put(make_batch(np.random.RandomState(0), rows))
    t = time.perf_counter()
    compiled = program.compile(state, batch, key)
    compile_s = time.perf_counter() - t
    need = memory.peak_bytes(compiled)
    print(f"[{name}] rows={rows}: compiled in {compile_s:.1f} s, XLA needs "
          f"{'n/a' if need is None else f'{need / 2**30:.1f} GiB'} of "
          f"{'n/a' if limit is None else f'{limit / 2**30:.1f} GiB'}", flush=True)
    fits = limit is None or need is None or need <= 0.95 * limit
    if fits:
      try:
        state, metrics = compiled(state, batch, key)
        float(metrics["loss"])
        break
      except Exception as e:  # noqa: BLE001  (jaxlib's XlaRuntimeError)
        if "RESOURCE_EXHAUSTED" not in str(e) or rows == 1:
          raise
        print(f"[{name}] rows={rows}: out of memory on the first step", flush=True)
    if rows == 1:
      break
    rows = _shrink(rows)
    del compiled, batch, state
  times = []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch, key)
    loss = float(metrics["loss"])  # waits for the step
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  tokens = sum(int(v.size) for k, v in batch.items() if k.endswith("input_ids")
               and not k.startswith("decoder"))
  model = program.step_flops(batch)
  peak = args.peak_tflops * 1e12 if args.peak_tflops else flops.peak_flops(device)
  stats = device.memory_stats() or {}
  row = {"stage": name, "preset": config_name(args), "dtype": config.dtype, "rows": rows,
         "compile_s": round(compile_s, 1), "step_s_median": step_s, "step_s_all": times,
         "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
         "model_flops_per_step": model.model, "recompute_flops_per_step": model.recompute,
         "model_tflops_per_s": model.model / step_s / 1e12,
         "mfu": None if peak is None else flops.mfu(model.model, step_s, peak),
         "peak_flops": peak, "xla_bytes": memory.peak_bytes(compiled),
         "device_peak_bytes": stats.get("peak_bytes_in_use"), "final_loss": loss}
  print(json.dumps(row), flush=True)
  del state, compiled
  return row


def check_attention_kernel(config, args) -> bool:
  """The fused kernel, compiled for this device, against plain attention with the same dropout
  mask (`bge_jax.testing.attention`): forward and q/k/v gradients at this run's head shape, in
  float32 and bfloat16. False (and the errors printed) when one is off."""
  from bge_jax.testing.attention import check_kernel

  interpret = jax.default_backend() == "cpu"  # --smoke on CPU: Pallas's interpreter
  ok = True
  for dtype, tolerance in (("float32", 1e-4), ("bfloat16", 3e-2)):
    t = time.perf_counter()
    errors = check_kernel(batch=2, length=min(args.seq, 512), heads=config.num_heads,
                          head_dim=config.head_dim, rate=config.attention_dropout, dtype=dtype,
                          interpret=interpret)
    worst = max(errors.values())
    ok &= worst < tolerance
    print(f"[attention kernel] {dtype}: relative errors "
          f"{ {k: float(f'{v:.2e}') for k, v in errors.items()} } (tolerance {tolerance}) "
          f"{'ok' if worst < tolerance else 'FAILED'} in {time.perf_counter() - t:.1f} s",
          flush=True)
  return ok


def config_name(args) -> str:
  return "tiny" if args.smoke else args.preset


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script on CPU")
  p.add_argument("--preset", default="bge-base-en")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", default="none", help="none | full | dots | dots_no_batch")
  p.add_argument("--seq", type=int, default=512, help="stage 2 passage length; stage 1 length")
  p.add_argument("--query-len", type=int, default=512, help="stage 2 query length")
  p.add_argument("--stage2-pairs", type=int, default=64,
                 help="queries (= passages) per stage-2 step; shrunk until it fits")
  p.add_argument("--stage1-batch", type=int, default=64, help="shrunk until it fits")
  p.add_argument("--attention-dropout", type=float, default=0.1,
                 help="0 lets the fused jax.nn.dot_product_attention (cuDNN) run in training")
  p.add_argument("--attention-impl", default=None, choices=["xla", "cudnn", "pallas"],
                 help="model.attention_impl; pallas: the fused Triton kernel with dropout "
                      "(bge_jax.models.flash_attention), checked against plain attention with "
                      "the same mask on the device before the steps are timed")
  p.add_argument("--stages", default="2,1")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="override the device's dense bf16 peak (TFLOP/s per device)")
  p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
  args = p.parse_args(argv)
  if args.smoke:
    args.seq, args.query_len = 64, 16
    args.stage2_pairs, args.stage1_batch = 8, 4
    args.steps, args.warmup = 2, 1
  name = config_name(args)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}",
        flush=True)
  base = preset(name, dtype=args.dtype, remat_policy=args.remat,
                attention_dropout=args.attention_dropout, attention_impl=args.attention_impl)
  if args.attention_impl == "pallas" and not check_attention_kernel(base, args):
    return 1
  rows = []
  for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
    if stage == "2":
      program = benchmark_program("contrastive.py", base)
      rows.append(run_stage(
          "stage2", program,
          lambda rng, n, c=base: batches.pair_batch(rng, n, c.vocab_size, q_len=args.query_len,
                                                    p_len=args.seq),
          args.stage2_pairs, args))
    elif stage == "1":
      program = benchmark_program("retromae.py", base)
      rows.append(run_stage(
          "stage1", program,
          lambda rng, n, c=base: batches.retromae_batch(rng, n, args.seq, c.vocab_size),
          args.stage1_batch, args))
    else:
      print(f"error: --stages {stage!r}: use 1 and/or 2, comma-separated", file=sys.stderr)
      return 2
  table = markdown(rows, str(device.device_kind), args)
  print(table)
  if args.out:
    with open(args.out + ".json", "w") as f:
      json.dump({"device": str(device.device_kind), "backend": jax.default_backend(),
                 "jax": jax.__version__, "rows": rows}, f, indent=2)
    with open(args.out + ".md", "w") as f:
      f.write(table + "\n")
  return 0


def markdown(rows: list[dict], device: str, args) -> str:
  lines = [f"bge-jax train steps on {device} ({rows[0]['dtype'] if rows else args.dtype}, remat "
           f"{args.remat}, attention dropout {args.attention_dropout}, attention "
           f"{args.attention_impl or 'default'}); MFU = analytic model FLOPs (bge_jax.flops) / "
           "step time / peak.", "",
           "| stage | shape | rows x tokens | step ms | tokens/s | model TFLOP/s | MFU | "
           "device peak GiB |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    length = f"{args.query_len}+{args.seq}" if r["stage"] == "stage2" else f"{args.seq}"
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    peak = r["device_peak_bytes"]
    lines.append(f"| {r['stage']} | {r['preset']} | {r['rows']} x {length} | "
                 f"{r['step_s_median'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | "
                 f"{r['model_tflops_per_s']:.1f} | {mfu} | "
                 f"{'n/a' if peak is None else f'{peak / 2**30:.1f}'} |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
