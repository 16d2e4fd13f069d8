"""Pod-scale memory without a pod: compile the real train steps for TPU slices on this CPU host.

  pip install -e ".[tpu-aot]"          # libtpu: the TPU compiler, usable without a TPU
  python launch/aot.py                 # the default table (v5e:16x16 and v5p:4x4x8, bge-base/large)
  python launch/aot.py --topology v5e:2x2 --model tiny --stage2-batch 64 --stage1-batch 8 \
      --out /tmp/aot.md               # a quick check

For every topology x model x case this builds the trainer's step exactly as bge_jax/train/loop.py
does (the stage's model_config and loss_fn from configs/<stage>.py, state.make_optimizer,
state.make_train_step, the sharding rules, batch over (data, fsdp), the state donated), lowers it
for abstract TPU devices from `jax.experimental.topologies.get_topology_desc`, compiles it with
the TPU compiler, and reads the per-chip bytes of `compiled.memory_analysis()`:

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
on, the trainer's defaults otherwise. The mesh is (data, fsdp, tensor) = (1, chips, 1) unless
--mesh says otherwise: pure FSDP, the smallest per-chip state. libtpu prints warnings about
TPU_ACCELERATOR_TYPE / worker hostnames on a host without TPUs; they do not affect compilation.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time
from typing import Any, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's own backend; TPU devices are abstract
# libtpu takes /tmp/libtpu_lockfile so that two processes cannot drive one TPU; compiling for
# abstract devices drives none, so several compile-only processes may load it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The TPU compiler's cost model recurses deeply on large fused convolutions: compiling the
# GradCache steps at batch 32,768 (bge-base on v5e:16x16 and v5p:4x4x8, bge-large at 19,200 on
# v5p) overflowed libtpu's default thread stacks (SIGSEGV "STACK OVERFLOW" after ~20 minutes).
# 256 MiB stacks (address space; only touched pages use memory), unless LIBTPU_INIT_ARGS sets them.
COMPILER_STACK_FLAGS = ("--fibers_default_thread_stack_size=268435456",
                        "--xla_internal_thread_stack_size_bytes=268435456")
_init_args = os.environ.get("LIBTPU_INIT_ARGS", "")
os.environ["LIBTPU_INIT_ARGS"] = " ".join(
    [_init_args] + [f for f in COMPILER_STACK_FLAGS if f.split("=")[0] not in _init_args]).strip()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from bge_jax import memory as memory_lib  # noqa: E402  (after the environment above)

GIB = 2 ** 30
# HBM per chip (GiB), by topology prefix.
HBM_GIB = {"v5e": 16, "v5litepod": 16, "v5p": 95, "v4": 32, "v6e": 32}
DEFAULT_TOPOLOGIES = ("v5e:16x16", "v5p:4x4x8")
DEFAULT_MODELS = ("bge-base-en", "bge-large-en")


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list:
  """Abstract (compile-only) TPU devices of a topology such as 'v5e:16x16' or 'v5p:4x4x8'."""
  from jax.experimental import topologies

  if not libtpu_available():
    raise RuntimeError("libtpu is not installed: pip install -e '.[tpu-aot]' "
                       "(jax[tpu], the TPU compiler) to compile for TPU topologies.")
  # One host drives a 2x2x1 block of chips (4-chip v4, v5e and v5p hosts).
  return topologies.get_topology_desc(platform="tpu", topology_name=name,
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1).devices


def hbm_gib(topology: str) -> float:
  prefix = topology.split(":", 1)[0]
  if prefix not in HBM_GIB:
    raise ValueError(f"--topology {topology}: unknown HBM size for {prefix!r}; known: "
                     f"{sorted(HBM_GIB)}")
  return HBM_GIB[prefix]


@dataclasses.dataclass
class Case:
  stage: str  # retromae | contrastive
  batch: int
  gradcache_chunk: int = 0  # rows; 0 = off
  lengths: tuple[int, ...] = ()  # (max_length,) for stage 1, (query, passage) for stage 2

  @property
  def seq(self) -> str:
    if self.stage == "retromae":
      return str(self.lengths[0])
    return f"q{self.lengths[0]}/p{self.lengths[1]}"

  def describe(self) -> str:
    if self.stage == "retromae":
      return "stage 1 RetroMAE"
    return "stage 2 " + (f"GradCache {self.gradcache_chunk}" if self.gradcache_chunk
                         else "no GradCache")


@dataclasses.dataclass
class Result:
  topology: str
  chips: int
  model: str
  case: Case
  mesh: tuple[int, int, int]
  memory: dict[str, int] | None
  seconds: float
  error: str = ""

  @property
  def peak(self) -> int | None:
    return memory_lib.peak_bytes(self.memory)


def load_run_config(stage: str, preset: str):
  path = os.path.join(REPO, "configs", f"{stage}.py")
  spec = importlib.util.spec_from_file_location(f"aot_cfg_{stage}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


class _VocabOnly:
  """Stands in for the tokenizer where the loop only asks for its length (the preset's vocab)."""

  def __init__(self, size: int):
    self.size = size

  def __len__(self):
    return self.size


def run_config(case: Case, preset: str, dtype: str, remat: str | None):
  """configs/<stage>.py:<preset> with the case's batch, lengths and GradCache chunk."""
  config = load_run_config(case.stage, preset)
  config.batch_size = case.batch
  config.model.dtype = dtype
  if remat:
    config.model.remat_policy = remat
  if case.stage == "retromae":
    (config.data.max_length,) = case.lengths
  else:
    config.data.query_max_length, config.data.passage_max_length = case.lengths
    config.loss.gradcache_chunk = case.gradcache_chunk
  return config


def abstract_batch(config, model_config, mesh) -> dict[str, Any]:
  """ShapeDtypeStructs of the stage's global batch with the trainer's batch shardings."""
  import jax
  import numpy as np

  from bge_jax import sharding
  b = config.batch_size
  if config.stage == "retromae":
    from bge_jax.data.masking import RetroMAECollator

    class Vocab:  # what the collator reads from a tokenizer
      pad_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 1, 2, 3

      def __len__(self):
        return 16

      def convert_ids_to_tokens(self, ids):
        return [f"w{i}" for i in ids]

    one = RetroMAECollator(Vocab(), max_length=config.data.max_length, seed=0)(
        [list(range(4, 12))], step=0)
    shapes = {k: ((b,) + v.shape[1:], v.dtype) for k, v in one.items()}
  else:
    d = config.data
    g = d.group_size
    shapes = {"query_input_ids": ((b, d.query_max_length), np.int32),
              "query_attention_mask": ((b, d.query_max_length), np.int32),
              "passage_input_ids": ((b * g, d.passage_max_length), np.int32),
              "passage_attention_mask": ((b * g, d.passage_max_length), np.int32),
              "in_batch_negatives": ((), np.int32)}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=(
      sharding.batch_sharding(mesh, len(shape)) if shape else sharding.replicated(mesh)))
          for k, (shape, dtype) in shapes.items()}


def compile_step(config, devices, mesh_shape: tuple[int, int, int]):
  """The trainer's jitted step for `config`, lowered and compiled for `devices`."""
  import jax

  from bge_jax import sharding
  from bge_jax.config import preset
  from bge_jax.models import bert
  from bge_jax.train import init
  from bge_jax.train import state as state_lib
  from bge_jax.train.stages import get_stage

  mesh = sharding.make_mesh(*mesh_shape, devices=devices)
  stage = get_stage(config.stage)
  vocab = preset(config.model.preset).vocab_size
  base, _, _ = init.model_config_and_weights(config, _VocabOnly(vocab))
  model_config = stage.model_config(base, config)
  longest = (config.data.max_length if config.stage == "retromae"
             else max(config.data.query_max_length, config.data.passage_max_length))
  if longest > model_config.max_position_embeddings:
    raise ValueError(f"sequence length {longest} exceeds {config.model.preset}'s "
                     f"max_position_embeddings={model_config.max_position_embeddings}; pass "
                     "shorter --stage1-length / --stage2-lengths.")

  tx, schedule = state_lib.make_optimizer(config.optimizer.to_dict(), 1000)
  abstract_params, logical = bert.abstract_init(model_config)
  param_sh = sharding.logical_to_sharding(logical, mesh)
  abstract_state = jax.eval_shape(lambda p: state_lib.init_state(p, tx), abstract_params)
  state_sh = sharding.train_state_sharding(abstract_state, param_sh, tx, mesh)
  repl = sharding.replicated(mesh)

  stage_loss = stage.loss_fn(config, model_config)

  def loss_fn(params, batch, rng):
    return stage_loss(params, batch, rng if config.dropout else None)

  step_fn = state_lib.make_train_step(loss_fn, tx, schedule, config.grad_accum_steps)
  batch = abstract_batch(config, model_config, mesh)
  batch_sh = {k: v.sharding for k, v in batch.items()}
  jit_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh, repl),
                     out_shardings=(state_sh, repl), donate_argnums=(0,))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract_state, state_sh)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
  with sharding.activate(mesh):
    compiled = jit_step.lower(state, batch, key).compile()
  return compiled, state_sh, model_config


def memory_dict(compiled) -> dict[str, int]:
  m = memory_lib.analysis(compiled)
  if m is None:
    raise RuntimeError("the TPU compiler returned no memory analysis for this step")
  return m


def gradcache_chunk(batch: int, chips: int, rows_per_chip: int) -> int:
  """chips x the largest divisor of batch / chips that is <= rows_per_chip."""
  per_chip = batch // chips
  k = max(d for d in range(1, min(rows_per_chip, per_chip) + 1) if per_chip % d == 0)
  return chips * k


def cases_for(chips: int, stage1_batch: int, stage2_batches: Sequence[int],
              rows_per_chip: int, stages: Sequence[str], stage1_length: int = 512,
              stage2_lengths: tuple[int, int] = (32, 128),
              gradcache: str = "both") -> list[Case]:
  """The cases to compile; `gradcache` is "both", "on" or "off" for the stage-2 cases."""
  if gradcache not in ("both", "on", "off"):
    raise ValueError(f"gradcache={gradcache!r}: expected 'both', 'on' or 'off'")
  out = []
  if "1" in stages and stage1_batch:
    out.append(Case("retromae", stage1_batch, lengths=(stage1_length,)))
  if "2" in stages:
    for b in stage2_batches:
      if gradcache != "on":
        out.append(Case("contrastive", b, lengths=tuple(stage2_lengths)))
      if gradcache != "off":
        out.append(Case("contrastive", b, gradcache_chunk(b, chips, rows_per_chip),
                        lengths=tuple(stage2_lengths)))
  return out


def run_case(topology: str, devices, model: str, case: Case, mesh_shape, dtype: str,
             remat: str | None) -> Result:
  chips = len(devices)
  config = run_config(case, model, dtype, remat)
  shards = mesh_shape[0] * mesh_shape[1]
  if case.batch % shards:
    return Result(topology, chips, model, case, mesh_shape, None, 0.0,
                  f"batch {case.batch} does not split over data x fsdp = {shards}")
  start = time.perf_counter()
  try:
    compiled, _, _ = compile_step(config, devices, mesh_shape)
    memory = memory_dict(compiled)
    error = ""
  except Exception as e:  # noqa: BLE001 - reported in the table (e.g. an XLA OOM at compile)
    memory, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return Result(topology, chips, model, case, mesh_shape, memory,
                time.perf_counter() - start, error)


def markdown(results: Sequence[Result]) -> str:
  head = ["topology", "chips", "HBM/chip", "model", "case", "global batch", "tokens", "mesh d×f×t",
          "args GiB", "temp GiB", "peak GiB", "fits", "compile s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    hbm = hbm_gib(r.topology)
    gc = f" (chunk {r.case.gradcache_chunk} = {r.case.gradcache_chunk // r.chips}/chip)" \
        if r.case.gradcache_chunk else ""
    cells = [r.topology, str(r.chips), f"{hbm:g} GiB", r.model,
             (r.case.describe().split(" (")[0] if not gc else "stage 2 GradCache") + gc,
             f"{r.case.batch:,}", r.case.seq, "×".join(map(str, r.mesh))]
    if r.memory is None:
      cells += ["—", "—", "—", f"error: {r.error}", f"{r.seconds:.0f}"]
    else:
      peak = r.peak / GIB
      cells += [f"{r.memory['argument_size_in_bytes'] / GIB:.2f}",
                f"{r.memory['temp_size_in_bytes'] / GIB:.2f}", f"{peak:.2f}",
                "yes" if peak <= hbm else "**no**", f"{r.seconds:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _parse_mesh(text: str | None, chips: int) -> tuple[int, int, int]:
  if not text:
    return (1, chips, 1)
  parts = [int(x) for x in text.split(",")]
  if len(parts) != 3:
    raise SystemExit(f"error: --mesh {text!r}: expected DATA,FSDP,TENSOR (e.g. 1,-1,1)")
  data, fsdp, tensor = parts
  if -1 in parts:
    known = abs(data * fsdp * tensor)
    missing = chips // known
    data, fsdp, tensor = (missing if x == -1 else x for x in parts)
  if data * fsdp * tensor != chips:
    raise SystemExit(f"error: --mesh {text}: {data}x{fsdp}x{tensor} != {chips} chips")
  return data, fsdp, tensor


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
  p.add_argument("--out", default=None, help="also write the markdown table to this file.")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if not libtpu_available():
    print("error: libtpu is not installed; pip install -e '.[tpu-aot]' (jax[tpu]: the TPU "
          "compiler runs on a CPU host)", file=sys.stderr)
    return 2
  topologies = args.topology or list(DEFAULT_TOPOLOGIES)
  models = args.model or list(DEFAULT_MODELS)
  stage2 = args.stage2_batch or [19200, 32768]
  results = []
  for topology in topologies:
    hbm_gib(topology)
    devices = topology_devices(topology)
    mesh_shape = _parse_mesh(args.mesh, len(devices))
    for model in models:
      for case in cases_for(len(devices), args.stage1_batch, stage2,
                            args.gradcache_rows_per_chip, args.stages, args.stage1_length,
                            tuple(int(x) for x in args.stage2_lengths.split(",")),
                            args.gradcache):
        r = run_case(topology, devices, model, case, mesh_shape, args.dtype, args.remat)
        results.append(r)
        status = (f"peak {r.peak / GIB:.2f} GiB" if r.memory else f"error {r.error}")
        print(f"[aot] {topology} {model} {case.describe()} batch {case.batch}: {status} "
              f"({r.seconds:.0f} s)", file=sys.stderr, flush=True)
        if args.out:  # rewritten after every case: a long sweep leaves its rows so far
          with open(args.out, "w") as f:
            f.write(markdown(results))
  print(markdown(results), end="")
  return 0 if all(r.memory is not None for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
