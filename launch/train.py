"""Train any stage: python launch/train.py --config configs/<stage>.py[:arg] --workdir DIR [--config.key=value ...]

Re-running the same command resumes from the newest checkpoint in DIR. SIGTERM saves a
checkpoint at the current step and exits 0.

Several processes (one per host, or per GPU group) run the same command:
  * TPU pod slices, SLURM (srun), Open MPI (mpirun): `jax.distributed.initialize()` finds the
    coordinator, process count and index itself (`--distributed=auto`, the default);
  * elsewhere pass --coordinator_address=HOST:PORT (process 0's host, a free port)
    --num_processes=N --process_id=I on each. CPU processes exchange data with gloo.

Exit status: 0 done or preempted; 1 a checkpoint that cannot be written/read or a NaN/inf
stop (the message says which and what to do); 2 a config or data error naming the key.
"""

import difflib
import importlib.util
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file in configs/, optionally with ':arg' (e.g. a model preset).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, exports.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs off TPU/SLURM.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (0 = coordinator).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "auto: initialise jax.distributed when --coordinator_address is given or a multi-process "
    "cluster is detected (TPU pod slice, SLURM with several tasks, Open MPI); on: always "
    "(jax.distributed.initialize() then detects the cluster itself); off: single process.")


def _cluster_detected() -> str | None:
  """The multi-process environment jax.distributed.initialize() can configure itself, if any."""
  env = os.environ
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "TPU pod slice"
  if os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio") and any(
      n.isdigit() for n in os.listdir("/dev/vfio")):
    return "Cloud TPU VM"  # single- or multi-host; the TPU metadata server says which
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_NODELIST" in env:
    return "SLURM"
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "Open MPI"
  return None


def init_distributed() -> None:
  """jax.distributed for multi-process runs: explicit flags, or the detected cluster."""
  import jax

  explicit = [_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go together "
                           "(process 0's host:port, the process count, this process's index).")
    if _DISTRIBUTED.value == "off":
      raise app.UsageError("--distributed=off contradicts --coordinator_address.")
    # Cross-process collectives between CPU devices (jax's default, set explicitly here; it
    # only concerns the CPU backend).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto" and _cluster_detected()):
    jax.distributed.initialize()
  else:
    return
  logging.getLogger("bge_jax").info("jax.distributed: process %d of %d, %d local / %d devices",
                                    jax.process_index(), jax.process_count(),
                                    jax.local_device_count(), jax.device_count())


def main(argv):
  del argv
  logging.getLogger("bge_jax").setLevel(logging.INFO)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  import jax

  # Persistent XLA cache: a re-run (e.g. a resume) skips most of the compile time.
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "BGE_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/bge-jax/xla")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  init_distributed()

  from bge_jax.train.loop import CheckpointError, ConfigError, train
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (CheckpointError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------
# Unknown --config.key overrides: refused before anything starts, with the closest keys.
# ---------------------------------------------------------------------------------------------

def _config_arg(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _flat_keys(node, prefix: str = "") -> dict[str, object]:
  out = {}
  for k in node.keys():
    v = node[k]
    if hasattr(v, "keys") and hasattr(v, "items"):
      out.update(_flat_keys(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def unknown_config_keys(argv: list[str]) -> list[str]:
  """One message per --config.KEY override that the config file does not define."""
  spec = _config_arg(argv)
  if not spec:
    return []
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    return []  # config_flags reports a missing file itself
  module_spec = importlib.util.spec_from_file_location("_bge_jax_launch_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  keys = _flat_keys(module.get_config(arg) if arg else module.get_config())
  messages = []
  for a in argv:
    if not a.startswith("--config."):
      continue
    key = a[len("--config."):].split("=", 1)[0]
    if key in keys or (key.startswith("no") and isinstance(keys.get(key[2:]), bool)):
      continue
    if any(k.startswith(key + ".") for k in keys):
      continue  # a whole sub-config; config_flags decides what it accepts
    messages.append(f"--config.{key}: {path} has no key config.{key}{_suggest(key, keys, path)}")
  return messages


def _suggest(key: str, keys, path: str) -> str:
  """Close matches: siblings (optimizer.lrr -> optimizer.lr), whole keys when the parent is
  unknown (optimiser.lr -> optimizer.lr), and close names elsewhere (lr -> optimizer.lr)."""
  parent, _, leaf = key.rpartition(".")
  siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
  close = [f"{parent}.{m}" if parent else m
           for m in difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.6)]
  if not siblings:  # a misspelt parent
    close += [k for k in difflib.get_close_matches(key, list(keys), n=3, cutoff=0.8)]
  leaves = set(difflib.get_close_matches(leaf, {k.rpartition(".")[2] for k in keys}, n=3,
                                         cutoff=0.75))
  close += [k for k in sorted(keys) if k.rpartition(".")[2] in leaves and k not in close]
  if not close:
    return f"; the keys are listed in {path} and configs/common.py"
  return "; did you mean " + ", ".join("config." + c for c in close[:5]) + "?"


def _run():
  flags.mark_flags_as_required(["config", "workdir"])
  unknown = unknown_config_keys(sys.argv[1:])
  if unknown:
    for m in unknown:
      print(f"error: unknown config key {m}", file=sys.stderr)
    sys.exit(2)
  try:
    app.run(main)
  except AttributeError as e:  # config_flags: an override it refuses after all
    if "Did you mean" in str(e) or "has no" in str(e) or "not a" in str(e):
      print(f"error: unknown config key: {e}", file=sys.stderr)
      sys.exit(2)
    raise


if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
  _run()
