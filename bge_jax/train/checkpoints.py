"""The trainer's orbax TrainState checkpoints: room checks, async save, restore, preemption;
the best step's export (checkpoint.keep_best)."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("bge_jax.train")


class CheckpointError(RuntimeError):
  """A checkpoint folder that cannot be written or read; the message names it and the fix."""


_WRITE_FAILURES = (  # (errno, text in non-OSError messages, e.g. tensorstore's) -> why
    (errno.ENOSPC, "No space left", "the disk is full"),
    (errno.EDQUOT, "quota exceeded", "the disk quota is exceeded"),
    (errno.EACCES, "Permission denied", "permission denied"),
    (errno.EPERM, "Operation not permitted", "permission denied"),
    (errno.EROFS, "Read-only file system", "the file system is read-only"),
)


def write_failure(directory: str, what: str, error: BaseException) -> CheckpointError | None:
  """A CheckpointError naming `directory` when `error` (or its cause) is disk-full/permission."""
  seen, e = set(), error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    for code, text, why in _WRITE_FAILURES:
      if (isinstance(e, OSError) and e.errno == code) or text.lower() in str(e).lower():
        return CheckpointError(
            f"cannot write {what} in {directory}: {why} ({type(e).__name__}: {e}). Free disk "
            "space or make the folder writable (or use another --workdir), then rerun the same "
            "command: it resumes from the newest checkpoint already there, which this failure "
            "left untouched.")
    e = e.__cause__ or e.__context__
  return None


def check_room(directory: str, nbytes: int = 0) -> None:
  """Raises the CheckpointError of a write failure now, rather than from orbax's background
  threads (where a step folder that cannot be created surfaces as a signal timeout minutes
  later): creates and removes a probe file, and compares the free space with `nbytes`."""
  try:
    os.makedirs(directory, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
    os.close(fd)
    os.remove(probe)
    free = shutil.disk_usage(directory).free
  except OSError as e:
    failure = write_failure(directory, "checkpoints", e)
    if failure is None:
      raise
    raise failure from e
  if free < nbytes:
    raise write_failure(directory, "a checkpoint", OSError(
        errno.ENOSPC, f"No space left: {free / 2**20:.1f} MiB free, a checkpoint takes about "
        f"{nbytes / 2**20:.1f} MiB"))


def open_checkpoints(directory: str, keep: int):
  """An async orbax CheckpointManager; fails here, before compiling, if it cannot write."""
  import orbax.checkpoint as ocp
  check_room(directory)
  try:
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        # Half-written steps of a killed run (orbax's *.orbax-checkpoint-tmp-* folders) are
        # never restored; remove them rather than let them pile up.
        cleanup_tmp_directories=True))
  except Exception as e:
    failure = write_failure(directory, "checkpoints", e)
    if failure is None:
      raise
    raise failure from e
  # The folder itself, so that a save can tell it was deleted (or replaced) mid-run: orbax would
  # otherwise recreate parts of it or fail deep inside with a message that reads like a config
  # error.
  manager._bge_jax_folder = _Folder(directory)
  return manager


class _Folder:
  """An open descriptor of a directory: it pins the inode, so a folder recreated under the same
  name never gets the same (device, inode) back, and a removed one reads st_nlink == 0."""

  def __init__(self, directory: str):
    self._fd = os.open(directory, os.O_RDONLY)
    st = os.fstat(self._fd)
    self.identity = st.st_dev, st.st_ino

  def gone(self, directory: str) -> bool:
    try:
      st = os.stat(directory)
    except FileNotFoundError:
      return True
    return (st.st_dev, st.st_ino) != self.identity or os.fstat(self._fd).st_nlink == 0

  def __del__(self):
    os.close(self._fd)


def _folder_gone(manager) -> CheckpointError | None:
  """The CheckpointError for a checkpoints folder removed or replaced since it was opened."""
  directory = str(manager.directory)
  folder = getattr(manager, "_bge_jax_folder", None)
  if folder is None or not folder.gone(directory):
    return None
  return CheckpointError(
      f"the checkpoint folder {directory} was removed (or replaced) while this run was writing to "
      "it. Rerun the same command: it resumes from the newest checkpoint that remains there, or "
      "starts over if none does.")


def save_checkpoint(manager, step: int, state: Any) -> None:
  """Starts an async save of `state` as `step` (also surfaces a failure of the previous save),
  with the fingerprints of its arrays in the step's metadata (see `fingerprints`)."""
  import orbax.checkpoint as ocp
  gone = _folder_gone(manager)  # before check_room, whose makedirs would recreate the folder
  if gone is not None:
    raise gone
  check_room(str(manager.directory),
             sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)))
  try:
    manager.save(step, args=ocp.args.StandardSave(state), force=True,
                 custom_metadata={_FINGERPRINTS: fingerprints(state)[0]})
  except Exception as e:
    failure = _folder_gone(manager) or write_failure(
        str(manager.directory), f"checkpoint step {step}", e)
    if failure is None:
      raise
    raise failure from e


def finish_checkpoints(manager) -> None:
  """Waits for the in-flight save; its write errors come out as a CheckpointError."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    failure = _folder_gone(manager) or write_failure(str(manager.directory), "a checkpoint", e)
    if failure is None:
      raise
    raise failure from e
  # Orbax's background save may "succeed" into a folder it recreated after the removal.
  gone = _folder_gone(manager)
  if gone is not None:
    raise gone


# --- Fingerprints: a restore that "succeeds" with bytes changed on disk --------------------------
# Orbax does not checksum array data: bytes overwritten in place restore silently as other values
# (or NaN), and the run then dies on NaN with that step as its newest, on every rerun. Each save
# records two 32-bit sums per array, computed on device; a restore recomputes and compares them.
_FINGERPRINTS = "bge_jax_fingerprints"  # key in orbax's per-step custom_metadata (in the step
# folder, so it is committed, set aside and deleted together with the step; old steps lack it)


def _mix(h: jax.Array) -> jax.Array:  # murmur3's 32-bit finaliser: every input bit moves ~half
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """uint32[3]: two wrapping sums over x's 32-bit words, and whether x is finite.

  Integer sums mod 2**32 do not depend on the order of the reduction, hence not on the sharding.
  Sum 1 weighs word i by the odd number 2i+1, so a change of any single word (1 ulp included)
  always changes it; sum 2 hashes (word, i) so that several changes do not cancel out.
  """
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif x.dtype.itemsize < 4:
    words = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize])
    words = words.astype(jnp.uint32)
  else:  # 8-byte types get a trailing axis of 2 words
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(
        stride % 2**32)
    stride *= words.shape[axis]
  weighted = jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  hashed = jnp.sum(_mix(words ^ _mix(index + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
  return jnp.stack([weighted, hashed, jnp.asarray(finite, jnp.uint32)])


@jax.jit
def _fingerprint_leaves(leaves: list) -> jax.Array:
  return jnp.stack([_leaf_fingerprint(x) for x in leaves]) if leaves else jnp.zeros((0, 3),
                                                                                    jnp.uint32)


def fingerprints(state: Any) -> tuple[dict[str, list[int]], list[str]]:
  """({leaf path: [sum 1, sum 2]}, [paths of leaves holding NaN/inf]) of `state`'s arrays:
  a function of the values alone, the same whatever the mesh or sharding they live on."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  out = _fingerprint_leaves([x for _, x in flat])
  if not out.is_fully_addressable:  # several processes: every one needs the whole small table
    out = multihost_utils.process_allgather(out, tiled=True)
  table = np.asarray(jax.device_get(out))
  names = [jax.tree_util.keystr(path) for path, _ in flat]
  return ({name: [int(a), int(b)] for name, (a, b, _) in zip(names, table)},
          [name for name, (_, _, ok) in zip(names, table) if not ok])


def _damage(manager, step: int, state: Any) -> str | None:
  """Why the restored `state` of `step` is not what was saved (None when it is)."""
  sums, nonfinite = fingerprints(state)
  if nonfinite:
    return f"non-finite values (NaN/inf) in {', '.join(nonfinite[:5])}"
  try:
    saved = (manager.metadata(step).custom_metadata or {}).get(_FINGERPRINTS)
  except Exception as e:  # a damaged _CHECKPOINT_METADATA is damage too
    return f"its metadata cannot be read ({type(e).__name__}: {str(e)[:200]})"
  if saved is None:
    log.info("checkpoint step %d in %s has no fingerprints (saved by an older version, or saved "
             "without them); only checked for NaN/inf.", step, manager.directory)
    return None
  changed = [name for name, value in sums.items() if name in saved and saved[name] != value]
  if changed:
    return (f"values differ from those saved (fingerprint mismatch) in {', '.join(changed[:5])}"
            f"{' and more' if len(changed) > 5 else ''}")
  return None


def restore_newest(manager, target: Any, workdir: str) -> tuple[Any | None, Any]:
  """(restored state or None, manager): the newest step that restores; never deletes one.

  A step that fails to restore (truncated or corrupted files, a half-copied folder), or restores
  with NaN/inf or with values whose fingerprints differ from the saved ones, is reported
  with a warning and the one before it is tried. Once an older step restores, the unreadable
  newer ones are moved (not deleted) to <workdir>/checkpoints_unreadable/, since the resumed run
  will save those step numbers again. If none restores, nothing is moved and the error says so.
  """
  import orbax.checkpoint as ocp
  directory = str(manager.directory)
  failed: list[tuple[int, BaseException]] = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(target))
      damage = _damage(manager, step, state)
      if damage is not None:
        state = None
        raise CheckpointError(f"step {step} restored with {damage}")
    except Exception as e:  # corruption surfaces as many error types (tensorstore, json, OS)
      log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying the one before.",
                  step, directory, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
      failed.append((step, e))
      continue
    if failed:
      aside = os.path.join(workdir, "checkpoints_unreadable")
      if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        for bad, _ in failed:
          dest = os.path.join(aside, str(bad))
          while os.path.exists(dest):
            dest += "_"
          os.rename(os.path.join(directory, str(bad)), dest)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("bge_jax: unreadable checkpoints set aside")
      manager.reload()
      log.warning("resuming from step %d; the unreadable step(s) %s were moved to %s.", step,
                  [b for b, _ in failed], aside)
    return state, manager
  if failed:
    step, error = failed[0]
    raise CheckpointError(
        f"no checkpoint in {directory} can be restored (steps {[s for s, _ in failed]}); the "
        f"newest failed with {type(error).__name__}: {error}. If the model, optimizer or mesh "
        "config changed since they were written, use a new --workdir (or the old config); if "
        "the files are damaged, move the broken step folders out of the way.") from error
  return None, manager


class PreemptionWatch:
  """Whether to save and stop now: a SIGTERM (preemption notice) arrived.

  One process: a Python SIGTERM handler sets a flag. Several processes: jax's preemption sync
  service (started by jax.distributed.initialize) relays the notice to every host and picks a
  step all of them reach; orbax's `reached_preemption(step)` asks it, and must be asked at
  every step on every host, which the loop does.
  """

  def __init__(self, manager):
    self._manager = manager
    self._multi = jax.process_count() > 1
    self._flag = threading.Event()
    self._previous = None
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

  def reached(self, step: int) -> bool:
    if self._multi:
      return bool(self._manager.reached_preemption(step))
    return self._flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


# --- checkpoint.keep_best: the best step's export beside the last one ----------------------------
BEST_DIR = "best"  # <workdir>/best/: the stage's export (hf/, ...) and BEST_FILE
BEST_FILE = "best.json"  # {"metric", "mode", "step", "value"}
EVAL_PREFIXES = ("val/", "eval/")  # the metrics computed at evaluation points


def best_mode(metric: str, mode: str = "auto") -> str:
  """"min" or "max": `mode`, or for "auto" "min" when the metric's name (its last part) says
  loss (val/loss, val/decoder_loss), else "max" (nDCG, Spearman, accuracy, ...)."""
  if mode not in ("auto", "min", "max"):
    from bge_jax.train.init import ConfigError
    raise ConfigError(f"config.checkpoint.keep_best_mode={mode!r}; use auto, min or max.")
  if mode != "auto":
    return mode
  return "min" if "loss" in metric.rsplit("/", 1)[-1] else "max"


class BestExport:
  """The export of the step with the best value of `metric` so far, in <workdir>/best/.

  Written through a staging folder that replaces best/ in one rename (`files.atomic_output_dir`),
  so best/ is always one whole export with the best.json that names its step and value. The best
  value so far is read back from best/best.json, so a resumed run replaces it only with a strictly
  better one (a resume recomputes the same steps bit for bit: a tie is the same step). A kill in
  the moment between the two renames of a replacement leaves the previous best beside the
  folder; it is put back here.
  """

  def __init__(self, workdir: str, metric: str, mode: str = "auto"):
    from bge_jax.train.init import ConfigError

    self.metric, self.mode = metric, best_mode(metric, mode)
    self.directory = os.path.join(workdir, BEST_DIR)
    self.step: int | None = None
    self.value: float | None = None
    self._recover()
    path = os.path.join(self.directory, BEST_FILE)
    if os.path.exists(path):
      with open(path) as f:
        record = json.load(f)
      if (record.get("metric"), record.get("mode")) != (self.metric, self.mode):
        raise ConfigError(
            f"{self.directory} holds the best export by {record.get('metric')!r} "
            f"({record.get('mode')}), but config.checkpoint.keep_best={self.metric!r} "
            f"({self.mode}); set the recorded one again, or move {self.directory} away to keep "
            "the best by the new one from now on.")
      self.step, self.value = int(record["step"]), float(record["value"])

  def _recover(self) -> None:
    """Puts back the previous best/ if a kill fell between the two renames of a replacement."""
    if os.path.exists(self.directory):
      return
    parent, prefix = os.path.dirname(self.directory), f".{BEST_DIR}.tmp-"
    try:
      names = sorted(n for n in os.listdir(parent) if n.startswith(prefix) and n.endswith(".old"))
    except OSError:
      return
    for name in names:
      if os.path.exists(os.path.join(parent, name, BEST_FILE)):
        os.rename(os.path.join(parent, name), self.directory)
        log.warning("restored %s from %s (a replacement of it was interrupted)", self.directory,
                    name)
        return

  def check_available(self, available: Any, when: str) -> None:
    """ConfigError when the metric is not among `available` (the names logged at `when`)."""
    from bge_jax.train.init import ConfigError

    if self.metric not in available:
      raise ConfigError(
          f"config.checkpoint.keep_best={self.metric!r} is not computed {when}; the metrics "
          f"there: {sorted(available) or 'none'}. Set it to one of them (val/* come with "
          "config.data.validation_fraction or config.data.validation, eval/* with config.eval).")

  def improves(self, metrics: dict[str, float]) -> bool:
    """Whether metrics[metric] is finite and strictly better than the best so far."""
    value = float(metrics[self.metric])
    if not math.isfinite(value):
      return False
    if self.value is None:
      return True
    return value < self.value if self.mode == "min" else value > self.value

  def save(self, step: int, value: float, write_export) -> None:
    """Replaces best/ with `write_export(folder)`'s files and best.json naming step and value."""
    from bge_jax.data import files

    def write(tmp: str) -> None:
      write_export(tmp)
      with open(os.path.join(tmp, BEST_FILE), "w") as f:
        json.dump({"metric": self.metric, "mode": self.mode, "step": int(step),
                   "value": float(value)}, f, indent=1)

    self._recover()
    try:
      files.atomic_output_dir(self.directory, write, overwrite=True)
    except OSError as e:
      failure = write_failure(os.path.dirname(self.directory), "the best export", e)
      if failure is None:
        raise
      raise failure from e
    self.step, self.value = int(step), float(value)
    log.info("best %s so far: %.6g at step %d, exported to %s", self.metric, value, step,
             self.directory)
