"""Train any stage: python launch/train.py --config configs/<stage>.py[:arg] --workdir DIR [--config.key=value ...]

Re-running the same command resumes from the newest checkpoint in DIR.
"""

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
    "coordinator_address", None, "host:port of process 0 for multi-process runs off TPU.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  del argv
  logging.getLogger("bge_jax").setLevel(logging.INFO)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  import jax

  # Persistent XLA cache: a re-run (e.g. a resume) skips most of the compile time.
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "BGE_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/bge-jax/xla")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()

  from bge_jax.train.loop import ConfigError, train
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _run():
  flags.mark_flags_as_required(["config", "workdir"])
  try:
    app.run(main)
  except AttributeError as e:  # config_flags: an unknown --config.key
    if "Did you mean" in str(e) or "has no" in str(e) or "not a" in str(e):
      print(f"error: unknown config key: {e}", file=sys.stderr)
      sys.exit(2)
    raise


if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
  _run()
