"""Pod-scale memory without a pod: compile the real train steps for TPU slices on this CPU host.

  pip install -e ".[tpu-aot]"          # libtpu: the TPU compiler, usable without a TPU
  python launch/aot.py                 # the default table (v5e:16x16 and v5p:4x4x8, bge-base/large)
  python launch/aot.py --topology v5e:2x2 --model tiny --stage2-batch 64 --stage1-batch 8 \
      --out /tmp/aot.md               # a quick check

For every topology x model x case this builds the trainer's own step (bge_jax.train.program, the
builder the trainer uses, from configs/<stage>.py; bge_jax.aot), lowers it for abstract TPU
devices from `jax.experimental.topologies.get_topology_desc` with the stage's abstract batch,
compiles it with the TPU compiler, and reads the per-chip bytes of XLA's memory analysis:

  peak per chip = arguments + outputs - aliased (the donated state) + temporaries + code

which is compared with the chip's HBM (v5e 16 GiB, v5p 95 GiB, v4 32 GiB). Cases:
  stage 1 (RetroMAE)     batch --stage1-batch (default 768: BGE's 720 rounded up to a multiple
                         of 256 chips), 512 tokens, encoder + MLM head + decoder.
  stage 2 (contrastive)  the paper's global batches (--stage2-batch, default 19200 and 32768:
                         the paper's 32,784 = 2^4 x 3 x 683 splits over no 128- or 256-chip
                         batch axis, so its nearest power of two), query 32 / passage 128
                         tokens, in-batch negatives over the global batch, without and with
                         GradCache (chunk = chips x the largest divisor of the rows per chip
                         that is <= --gradcache-rows-per-chip).
Compute is bfloat16 (model.dtype, the paper's AMP), parameters and Adam state float32, dropout
on, the trainer's defaults otherwise; --set KEY=VALUE sets any other config key on every case.
A config that mixes datasets at different global batch sizes (--set
data.batch_sizes=19200,32768) runs one train step per distinct size: each is compiled and gets its
own row (the global batch column is that size), so the largest one is checked before a TPU job.
The mesh is (data, fsdp, tensor) = (1, chips, 1) unless --mesh says otherwise: pure FSDP, the
smallest per-chip state. libtpu prints warnings about
TPU_ACCELERATOR_TYPE / worker hostnames on a host without TPUs; they do not affect compilation.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's own backend; TPU devices are abstract
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from bge_jax import aot  # noqa: E402  (after the environment above)
from bge_jax.aot import DEFAULT_MODELS, DEFAULT_TOPOLOGIES, GIB  # noqa: E402


def _parser() -> argparse.ArgumentParser:
  summary, _, details = __doc__.partition("\n\n")
  p = argparse.ArgumentParser(prog="launch/aot.py", description=summary, epilog=details,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--topology", action="append", default=None,
                 help=f"TPU topology (repeatable); default {' and '.join(DEFAULT_TOPOLOGIES)}.")
  p.add_argument("--model", action="append", default=None,
                 help=f"preset name (repeatable); default {' and '.join(DEFAULT_MODELS)}.")
  p.add_argument("--stages", default="12", help="which stages: 1, 2 or 12 (default).")
  p.add_argument("--stage1-batch", type=int, default=768)
  p.add_argument("--stage1-length", type=int, default=512)
  p.add_argument("--stage2-lengths", default="32,128", metavar="Q,P",
                 help="stage-2 query and passage lengths (default 32,128).")
  p.add_argument("--stage2-batch", type=int, action="append", default=None,
                 help="stage-2 global batch (repeatable); default 19200 and 32768.")
  p.add_argument("--gradcache", choices=("both", "on", "off"), default="both",
                 help="stage-2 cases with GradCache, without it, or both (default).")
  p.add_argument("--gradcache-rows-per-chip", type=int, default=8)
  p.add_argument("--mesh", default=None, metavar="D,F,T",
                 help="data,fsdp,tensor sizes (-1 = the rest); default 1,chips,1.")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype (model.dtype).")
  p.add_argument("--remat", default=None, help="model.remat_policy (default: the config's).")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="keys",
                 help="a config key set on every case, after the case's own (repeatable), e.g. "
                      "data.batch_sizes=19200,32768: one row per distinct batch size.")
  p.add_argument("--out", default=None, help="also write the markdown table to this file.")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if not aot.libtpu_available():
    print("error: libtpu is not installed; pip install -e '.[tpu-aot]' (jax[tpu]: the TPU "
          "compiler runs on a CPU host)", file=sys.stderr)
    return 2
  topologies = args.topology or list(DEFAULT_TOPOLOGIES)
  models = args.model or list(DEFAULT_MODELS)
  stage2 = args.stage2_batch or [19200, 32768]
  keys = []
  for text in args.keys:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
      print(f"error: --set {text!r}: expected KEY=VALUE (e.g. data.batch_sizes=19200,32768)",
            file=sys.stderr)
      return 2
    keys.append((key.strip(), value))
  results = []
  for topology in topologies:
    try:
      aot.hbm_gib(topology)
      devices = aot.topology_devices(topology)
      mesh_shape = aot.parse_mesh(args.mesh, len(devices))
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    for model in models:
      for case in aot.cases_for(len(devices), args.stage1_batch, stage2,
                            args.gradcache_rows_per_chip, args.stages, args.stage1_length,
                            tuple(int(x) for x in args.stage2_lengths.split(",")),
                            args.gradcache):
        try:
          rows = aot.run_case(topology, devices, model, case, mesh_shape, args.dtype,
                              args.remat, keys)
        except (KeyError, ValueError) as e:  # a --set key or value the config refuses
          print(f"error: {e.args[0] if isinstance(e, KeyError) else e} (--set applies to every "
                "stage --stages selects, e.g. --stages 2 for the stage-2 keys)", file=sys.stderr)
          return 2
        results += rows
        for r in rows:
          status = (f"peak {r.peak / GIB:.2f} GiB" if r.memory else f"error {r.error}")
          print(f"[aot] {topology} {model} {r.describe()} batch {r.batch}: {status} "
                f"({r.seconds:.0f} s)", file=sys.stderr, flush=True)
        if args.out:  # rewritten after every case: a long sweep leaves its rows so far
          with open(args.out, "w") as f:
            f.write(aot.markdown(results))
  print(aot.markdown(results), end="")
  return 0 if all(r.memory is not None for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
