"""The trainer's orbax TrainState checkpoints: room checks, async save, restore, preemption."""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
from typing import Any

import jax
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
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        # Half-written steps of a killed run (orbax's *.orbax-checkpoint-tmp-* folders) are
        # never restored; remove them rather than let them pile up.
        cleanup_tmp_directories=True))
  except Exception as e:
    failure = write_failure(directory, "checkpoints", e)
    if failure is None:
      raise
    raise failure from e


def save_checkpoint(manager, step: int, state: Any) -> None:
  """Starts an async save of `state` as `step` (also surfaces a failure of the previous save)."""
  import orbax.checkpoint as ocp
  check_room(str(manager.directory),
             sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)))
  try:
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
  except Exception as e:
    failure = write_failure(str(manager.directory), f"checkpoint step {step}", e)
    if failure is None:
      raise
    raise failure from e


def finish_checkpoints(manager) -> None:
  """Waits for the in-flight save; its write errors come out as a CheckpointError."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    failure = write_failure(str(manager.directory), "a checkpoint", e)
    if failure is None:
      raise
    raise failure from e


def restore_newest(manager, target: Any, workdir: str) -> tuple[Any | None, Any]:
  """(restored state or None, manager): the newest step that restores; never deletes one.

  A step that fails to restore (truncated or corrupted files, a half-copied folder) is reported
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
