"""Train any stage: python launch/train.py --config configs/<stage>.py[:arg] --workdir DIR [--config.key=value ...]

Re-running the same command resumes from the newest checkpoint in DIR. SIGTERM saves a
checkpoint at the current step and exits 0.

Several processes (one per host, or per GPU group) run the same command:
  * TPU pod slices, SLURM (srun), Open MPI (mpirun): `jax.distributed.initialize()` finds the
    coordinator, process count and index itself (`--distributed=auto`, the default);
  * elsewhere pass --coordinator_address=HOST:PORT (process 0's host, a free port)
    --num_processes=N --process_id=I on each. CPU processes exchange data with gloo.

Exit status: 0 done or preempted; 1 a checkpoint that cannot be written/read, a NaN/inf stop,
another process of a multi-process run that stopped, or another live run holding the workdir
(the message says which and what to do); 2 a config or data error naming the key, including a
resume whose config changes the run (--accept_config_changes accepts it).
"""

import logging
import os
import sys

# Before the flags are parsed: config_flags loads the config file by path, and configs/*.py
# import configs.common (and bge_jax, also from a clone that is not pip-installed).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

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
_ACCEPT_CONFIG_CHANGES = flags.DEFINE_bool(
    "accept_config_changes", False,
    "Resume the run in --workdir although the config changed in keys that change the run "
    "(optimizer, model, data, loss, seed, batch...; each change is logged). Without it such a "
    "resume is refused, naming the keys (exit 2). A flag, not a config key, so that it is not "
    "recorded in the run's config.json.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100,
    "Multi-process runs: seconds without a heartbeat after which jax's coordination service "
    "counts a process as lost and stops the others (jax's default, 100). A process that dies "
    "is usually noticed sooner, by the step's collective.")
_SUPERVISE = flags.DEFINE_bool(
    "supervise", True,
    "Multi-process runs: run the trainer under a small parent process that turns jax's abort "
    "on a lost peer (a C++ stack) into one error line and exit status 1, keeping jax's output "
    "in WORKDIR/lost-peer.process<I>.log (launch/supervisor.py). --nosupervise runs the "
    "trainer in this process.")


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
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
  elif _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto" and _cluster_detected()):
    jax.distributed.initialize(heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
  else:
    return
  logging.getLogger("bge_jax").info("jax.distributed: process %d of %d, %d local / %d devices",
                                    jax.process_index(), jax.process_count(),
                                    jax.local_device_count(), jax.device_count())


# Set once main() runs: an AttributeError before it is config_flags refusing an override; one
# after it is a bug to show with its traceback, not an "unknown config key".
_MAIN_STARTED = False


def main(argv):
  global _MAIN_STARTED
  _MAIN_STARTED = True
  del argv
  logging.getLogger("bge_jax").setLevel(logging.INFO)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  if not flags.FLAGS["verbosity"].present:
    # absl raises its verbosity to INFO once flags are parsed, and orbax logs a dozen INFO lines
    # through it per checkpoint, burying the project's own: warnings only, unless --verbosity
    # asks otherwise (the "bge_jax" logger keeps its INFO lines).
    absl_logging.set_verbosity(absl_logging.WARNING)
  import jax

  # Persistent XLA cache: a re-run (e.g. a resume) skips most of the compile time.
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "BGE_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/bge-jax/xla")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  init_distributed()

  from bge_jax.train.checkpoints import CheckpointError
  from bge_jax.train.init import ConfigError
  from bge_jax.train.loop import train
  from bge_jax.train.workdir import WorkdirBusy
  try:
    train(_CONFIG.value, _WORKDIR.value, accept_config_changes=_ACCEPT_CONFIG_CHANGES.value)
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (CheckpointError, FloatingPointError, WorkdirBusy) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except Exception as e:
    if jax.process_count() == 1 or not _lost_peer(e):
      raise
    print(f"error: {_lost_peer_message(e, jax.process_index(), jax.process_count())}",
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: the atexit hook jax.distributed.shutdown() would then wait in the
    # coordination service's shutdown barrier for the dead process until its heartbeat times
    # out (~60-100 s) and abort this process with a C++ check-failure stack. Nothing is left to
    # save: a checkpoint is complete or set aside on resume, and the workdir's flock goes with us.
    os._exit(1)


# What a process sees when another process of its run has stopped (observed with a SIGKILLed
# peer on CPU: gloo's collective over the peer's reset TCP connection; the coordination
# service's heartbeat and barrier failures, for a process that waits there instead).
_LOST_PEER_TEXT = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                   "heartbeat timeout", "stopped sending heartbeats", "Barrier failed",
                   "barrier has failed", "tasks are unhealthy")


def _lost_peer(e: BaseException | None) -> bool:
  """A JaxRuntimeError (possibly wrapped, e.g. by orbax) saying that a peer process is gone."""
  import jax

  while e is not None:
    if isinstance(e, jax.errors.JaxRuntimeError) and any(
        t.lower() in str(e).lower() for t in _LOST_PEER_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


def _lost_peer_message(e: BaseException, index: int, count: int) -> str:
  import re

  text = str(e)
  # The coordination service names the lost task; gloo only an address, and of 2 processes the
  # lost one is the other.
  task = re.search(r"\btask (\d+)\b", text, re.IGNORECASE)
  who = (f"process {task.group(1)}" if task else f"process {1 - index}" if count == 2
         else "another process")
  cause = re.sub(r"^[A-Z_]+: ", "", text.strip().splitlines()[0])  # the status code
  cause = re.sub(r"\[[^\]]*\.cc:\d+\] ", "", cause)  # the C++ source location
  if len(cause) > 160:
    cause = cause[:157] + "..."
  return (f"{who} of this {count}-process run stopped ({cause}); the checkpoints saved so far "
          f"are kept in {os.path.join(_WORKDIR.value, 'checkpoints')}: restart every process "
          "with the same command to resume.")


# ---------------------------------------------------------------------------------------------
# Unknown --config.key overrides: refused before anything starts, with the closest keys.
# ---------------------------------------------------------------------------------------------

def _flag_value(argv: list[str], name: str) -> str | None:
  """--name=value or --name value, before absl parses the flags (the last one wins)."""
  value = None
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
    elif a == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def unknown_config_keys(argv: list[str]) -> list[str]:
  """One message per --config.KEY override that the config file does not define."""
  from bge_jax import config_files

  spec = _flag_value(argv, "config")
  if not spec:
    return []
  # The file as config_flags reads it (a path, never a bundled name); a missing one is refused
  # here in one line.
  path, sep, arg = spec.partition(":")
  module = config_files.load_module(path)
  keys = config_files.flat_keys(config_files.get_config(module, arg if sep else None))
  messages = []
  for a in argv:
    if not a.startswith("--config."):
      continue
    key = a[len("--config."):].split("=", 1)[0]
    if key in keys or (key.startswith("no") and isinstance(keys.get(key[2:]), bool)):
      continue
    if any(k.startswith(key + ".") for k in keys):
      continue  # a whole sub-config; config_flags decides what it accepts
    hint = (config_files.suggest(key, keys)
            or f"; the keys are listed in {path} and configs/common.py")
    messages.append(f"--config.{key}: {path} has no key config.{key}{hint}")
  return messages


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a value it refuses (e.g. --config.batch_size=abc) reported as one
  `error:` line and exit status 2, the documented status for config errors (absl exits 1)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e} (see --helpfull)", file=sys.stderr)
    sys.exit(2)


def _run():
  # bge_jax (and so jax) is imported here, after __main__ has set XLA_FLAGS.
  from bge_jax import config_files

  flags.mark_flags_as_required(["config", "workdir"])
  try:
    unknown = unknown_config_keys(sys.argv[1:])
  except (config_files.ConfigFileError, ValueError) as e:  # e.g. an unknown preset as the arg
    print(f"error: --config {_flag_value(sys.argv[1:], 'config')}: {e}", file=sys.stderr)
    sys.exit(2)
  if unknown:
    for m in unknown:
      print(f"error: unknown config key {m}", file=sys.stderr)
    sys.exit(2)
  try:
    app.run(main, flags_parser=_parse_flags)
  except AttributeError as e:  # config_flags: an override it refuses after all
    if not _MAIN_STARTED and ("Did you mean" in str(e) or "has no" in str(e)
                              or "not a" in str(e)):
      print(f"error: unknown config key: {e}", file=sys.stderr)
      sys.exit(2)
    raise


def _supervised_command(argv: list[str]) -> tuple[str, int | None, int | None] | None:
  """(workdir, process index, process count) when this command starts a process of a
  multi-process run that should run under the supervisor (see --supervise), else None."""
  from launch import supervisor

  if os.environ.get(supervisor.ENV_MARKER) or any(
      a in ("--help", "--helpfull", "--helpshort", "-h", "--nosupervise", "--supervise=false",
            "--supervise=False", "--supervise=0") for a in argv):
    return None
  distributed = _flag_value(argv, "distributed") or "auto"
  workdir = _flag_value(argv, "workdir")
  if not workdir or distributed == "off" or not (
      _flag_value(argv, "coordinator_address") or distributed == "on" or _cluster_detected()):
    return None

  def integer(name):
    v = _flag_value(argv, name)
    return int(v) if v is not None and v.lstrip("-").isdigit() else None

  return workdir, integer("process_id"), integer("num_processes")


if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
  _supervised = _supervised_command(sys.argv[1:])
  if _supervised is not None:
    from launch.supervisor import supervise

    _workdir, _index, _count = _supervised
    sys.exit(supervise([sys.executable, os.path.abspath(__file__)] + sys.argv[1:],
                       workdir=os.path.abspath(_workdir), process_index=_index,
                       process_count=_count))
  _run()
