"""Pod-scale memory without a pod: the trainer's own step compiled for abstract TPU slices.

`program_for` builds the step through `bge_jax.train.program` (the trainer's builder: the
stage's model parts and loss, the optimizer, skip_nonfinite_updates, grad accumulation, the
sharding rules, the state donated), lowers it for abstract TPU devices from
`jax.experimental.topologies.get_topology_desc` with the stage's abstract batch
(`Stage.abstract_batch`), compiles it with the TPU compiler (libtpu, usable on a CPU host) and
reads the per-chip bytes of XLA's memory analysis (`bge_jax.memory.peak_bytes`), compared with
the chip's HBM. A config that mixes datasets at different global batch sizes
(config.data.batch_sizes) runs one train step per distinct size, so `run_case` compiles each
(`TrainProgram.batch_sizes`) and gives one result, one table row, per size. The command line is
launch/aot.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from typing import Any, Sequence

from bge_jax import memory as memory_lib

GIB = 2 ** 30
# HBM per chip (GiB), by topology prefix.
HBM_GIB = {"v5e": 16, "v5litepod": 16, "v5p": 95, "v4": 32, "v6e": 32}
DEFAULT_TOPOLOGIES = ("v5e:16x16", "v5p:4x4x8")
DEFAULT_MODELS = ("bge-base-en", "bge-large-en")
# The TPU compiler's cost model recurses deeply on large fused convolutions: compiling the
# GradCache steps at batch 32,768 (bge-base on v5e:16x16 and v5p:4x4x8, bge-large at 19,200 on
# v5p) overflowed libtpu's default thread stacks (SIGSEGV "STACK OVERFLOW" after ~20 minutes).
# 256 MiB stacks (address space; only touched pages use memory), unless LIBTPU_INIT_ARGS sets them.
COMPILER_STACK_FLAGS = ("--fibers_default_thread_stack_size=268435456",
                        "--xla_internal_thread_stack_size_bytes=268435456")
# The stages a table can hold: the config file each compiles (configs/<file>) and its label.
STAGE_CONFIGS = {"1": ("retromae.py", "stage 1"), "2": ("contrastive.py", "stage 2")}


def set_compiler_environment() -> None:
  """libtpu's settings for compiling on a host without TPUs; read at libtpu's first use."""
  # libtpu takes /tmp/libtpu_lockfile so that two processes cannot drive one TPU; compiling for
  # abstract devices drives none, so several compile-only processes may load it at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  current = os.environ.get("LIBTPU_INIT_ARGS", "")
  os.environ["LIBTPU_INIT_ARGS"] = " ".join(
      [current] + [f for f in COMPILER_STACK_FLAGS if f.split("=")[0] not in current]).strip()


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list:
  """Abstract (compile-only) TPU devices of a topology such as 'v5e:16x16' or 'v5p:4x4x8'."""
  from jax.experimental import topologies

  if not libtpu_available():
    raise RuntimeError("libtpu is not installed: pip install -e '.[tpu-aot]' "
                       "(jax[tpu], the TPU compiler) to compile for TPU topologies.")
  set_compiler_environment()
  # One host drives a 2x2x1 block of chips (4-chip v4, v5e and v5p hosts).
  return topologies.get_topology_desc(platform="tpu", topology_name=name,
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1).devices


def hbm_gib(topology: str) -> float:
  prefix = topology.split(":", 1)[0]
  if prefix not in HBM_GIB:
    raise ValueError(f"--topology {topology}: unknown HBM size for {prefix!r}; known: "
                     f"{sorted(HBM_GIB)}")
  return HBM_GIB[prefix]


@dataclasses.dataclass(frozen=True)
class Case:
  """One row of the table: a config file, its global batch and the keys set on top of it."""

  label: str  # "stage 1", "stage 2", ...
  config_file: str  # under configs/
  batch: int
  seq: str  # the lengths, for the table
  overrides: tuple[tuple[str, Any], ...] = ()

  @property
  def gradcache_chunk(self) -> int:
    return dict(self.overrides).get("loss.gradcache_chunk", 0)

  def describe(self) -> str:
    chunk = self.gradcache_chunk
    return f"{self.label} GradCache {chunk}" if chunk else self.label


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
  # The global batch compiled, when the config mixes datasets at different sizes: one of
  # `batch_sizes` (config.data.batch_sizes' distinct values); else None and case.batch.
  global_batch: int | None = None
  batch_sizes: tuple[int, ...] = ()

  @property
  def peak(self) -> int | None:
    return memory_lib.peak_bytes(self.memory)

  @property
  def batch(self) -> int:
    return self.case.batch if self.global_batch is None else self.global_batch

  def describe(self) -> str:
    """The case, and for a mixing config which of its batch sizes this row compiled."""
    if len(self.batch_sizes) < 2:
      return self.case.describe()
    return f"{self.case.describe()} (data.batch_sizes {'/'.join(map(str, self.batch_sizes))})"


def run_config(case: Case, preset: str, dtype: str, remat: str | None,
               keys: Sequence[tuple[str, Any]] = ()):
  """configs/<case.config_file>:<preset> with the case's batch and overrides, compute dtype and
  remat policy, then `keys`: (dotted config key, value) pairs, a string value read as the field's
  type as on a command line (launch/aot.py --set, e.g. ("data.batch_sizes", "19200,32768"))."""
  from bge_jax import config_files, sweep

  config = config_files.load(f"{os.path.join(config_files.CONFIGS, case.config_file)}:{preset}")
  values = {"batch_size": case.batch, "model.dtype": dtype, **dict(case.overrides)}
  if remat:
    values["model.remat_policy"] = remat
  config = config_files.set_keys(config, values)
  for key, value in keys:
    sweep.coerce(config, key, value, f"--set {key}={value} (configs/{case.config_file})")
  return config


def program_for(config, devices, mesh_shape: tuple[int, int, int]):
  """The trainer's TrainProgram for `config` on a (data, fsdp, tensor) mesh of `devices`
  (`bge_jax.train.program.from_config`)."""
  from bge_jax import sharding
  from bge_jax.train import program

  return program.from_config(config, sharding.make_mesh(*mesh_shape, devices=devices))


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
    file, label = STAGE_CONFIGS["1"]
    out.append(Case(label, file, stage1_batch, str(stage1_length),
                    (("data.max_length", stage1_length),)))
  if "2" in stages:
    file, label = STAGE_CONFIGS["2"]
    q, p = stage2_lengths
    lengths = (("data.query_max_length", q), ("data.passage_max_length", p))
    for b in stage2_batches:
      chunks = {"both": (0, gradcache_chunk(b, chips, rows_per_chip)), "off": (0,),
                "on": (gradcache_chunk(b, chips, rows_per_chip),)}[gradcache]
      out += [Case(label, file, b, f"q{q}/p{p}", lengths + (("loss.gradcache_chunk", c),))
              for c in chunks]
  return out


def _error(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def run_case(topology: str, devices, model: str, case: Case, mesh_shape, dtype: str,
             remat: str | None, keys: Sequence[tuple[str, Any]] = ()) -> list[Result]:
  """The case's train steps compiled for `devices`: one Result per distinct global batch of the
  config (`TrainProgram.batch_sizes`; one unless config.data.batch_sizes mixes datasets at
  different sizes, each of which the trainer compiles a step for), in ascending size."""
  chips = len(devices)
  config = run_config(case, model, dtype, remat, keys)
  shards = mesh_shape[0] * mesh_shape[1] * config.grad_accum_steps
  start = time.perf_counter()
  try:
    program = program_for(config, devices, mesh_shape)
  except Exception as e:  # noqa: BLE001 - reported in the table, as a compile error is
    return [Result(topology, chips, model, case, mesh_shape, None,
                   time.perf_counter() - start, _error(e))]
  sizes = program.batch_sizes
  mixed = len(sizes) > 1
  results = []
  for b in sizes:
    row = {"global_batch": b, "batch_sizes": tuple(sizes)} if mixed else {}
    if b % shards:
      over = "data x fsdp" + (" x grad_accum_steps" if config.grad_accum_steps > 1 else "")
      results.append(Result(topology, chips, model, case, mesh_shape, None, 0.0,
                            f"batch {b} does not split over {over} = {shards}", **row))
      continue
    try:
      memory = memory_dict(program.compile(batch=program.abstract_batch(batch_size=b)))
      error = ""
    except Exception as e:  # noqa: BLE001 - reported in the table (e.g. an XLA OOM at compile)
      memory, error = None, _error(e)
    results.append(Result(topology, chips, model, case, mesh_shape, memory,
                          time.perf_counter() - start, error, **row))
    start = time.perf_counter()
  return results


def markdown(results: Sequence[Result]) -> str:
  head = ["topology", "chips", "HBM/chip", "model", "case", "global batch", "tokens", "mesh d×f×t",
          "args GiB", "temp GiB", "peak GiB", "fits", "compile s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    hbm = hbm_gib(r.topology)
    chunk = r.case.gradcache_chunk
    what = (f"{r.case.label} GradCache (chunk {chunk} = {chunk // r.chips}/chip)" if chunk
            else r.case.label)
    if len(r.batch_sizes) > 1:
      what += f", data.batch_sizes {'/'.join(f'{b:,}' for b in r.batch_sizes)}"
    cells = [r.topology, str(r.chips), f"{hbm:g} GiB", r.model, what, f"{r.batch:,}",
             r.case.seq, "×".join(map(str, r.mesh))]
    if r.memory is None:
      cells += ["—", "—", "—", f"error: {r.error}", f"{r.seconds:.0f}"]
    else:
      peak = r.peak / GIB
      cells += [f"{r.memory['argument_size_in_bytes'] / GIB:.2f}",
                f"{r.memory['temp_size_in_bytes'] / GIB:.2f}", f"{peak:.2f}",
                "yes" if peak <= hbm else "**no**", f"{r.seconds:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def parse_mesh(text: str | None, chips: int) -> tuple[int, int, int]:
  """DATA,FSDP,TENSOR with -1 for the rest; default (1, chips, 1): pure FSDP."""
  if not text:
    return (1, chips, 1)
  parts = [int(x) for x in text.split(",")]
  if len(parts) != 3:
    raise ValueError(f"--mesh {text!r}: expected DATA,FSDP,TENSOR (e.g. 1,-1,1)")
  data, fsdp, tensor = parts
  if -1 in parts:
    known = abs(data * fsdp * tensor)
    missing = chips // known
    data, fsdp, tensor = (missing if x == -1 else x for x in parts)
  if data * fsdp * tensor != chips:
    raise ValueError(f"--mesh {text}: {data}x{fsdp}x{tensor} != {chips} chips")
  return data, fsdp, tensor
