"""One run per workdir: an OS lock held for the whole run, and the config check before a resume.

Without them a second launch on a live run's workdir (a scheduler requeue while the old job
still runs, a rerun "to resume") resumes from the same checkpoints, rewrites metrics.jsonl and
config.json, and both then save the same step numbers; and a rerun with a changed config
resumes silently, so the run's record (config.json) no longer describes the checkpoints.

Neither imports jax: the caller passes `jax.process_index()`, and this module stays importable
(and testable) in processes that never start a backend.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from typing import Any, Iterator

from bge_jax import config_files

log = logging.getLogger("bge_jax.train")

LOCK_FILE = ".lock"
ACCEPT_FLAG = "--accept_config_changes"


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir's lock; the message names it and what to do."""


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------

def holder() -> dict[str, Any]:
  """What the lock file records about this process, for the error a second run gets."""
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "command": shlex.join([sys.executable] + sys.argv)}


def _describe(path: str, text: str) -> str:
  """'pid P on host H, started T: CMD; wait for it to finish, stop it (kill P)'."""
  try:
    h = json.loads(text)
    who, pid, host = f"pid {h['pid']} on host {h['host']}", h["pid"], h["host"]
  except (ValueError, TypeError, KeyError):
    # The holder has the lock but has not written itself yet (or wrote something else).
    return (f"another process (not yet named in {path}); wait for it to finish, stop it "
            f"(`fuser -v {path}` names it)")
  kill = f"kill {pid}" if host == socket.gethostname() else f"kill {pid} on {host}"
  return (f"{who}, started {h.get('started', '?')}: {h.get('command', '?')}; wait for it to "
          f"finish, stop it ({kill})")


def _try_lock(fd: int, path: str, workdir: str) -> bool:
  """True when locked; False when the file system cannot lock; WorkdirBusy when held."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except OSError as e:
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      log.warning("cannot lock %s (%s); running without the one-run-per-workdir guard: make "
                  "sure no other run uses this workdir.", path, e)
      return False
  with open(path, errors="replace") as f:
    text = f.read()
  raise WorkdirBusy(f"workdir {workdir} is in use by {_describe(path, text)}, or use another "
                    "--workdir.")


@contextlib.contextmanager
def lock(workdir: str, process_index: int = 0) -> Iterator[str | None]:
  """Holds an exclusive lock on `workdir` for the `with` block; yields the lock file's path.

  flock on <workdir>/.lock: the OS releases it when the holder's process ends, however it ends
  (SIGKILL, OOM kill), so a crashed run's lock is taken over with no stale-lock guesswork, and
  a live holder always wins. The holder writes its host, pid, start time and command line into
  the file; a second holder gets WorkdirBusy naming it. The lock belongs to the open file, so a
  second lock() in the same process is refused too; a child forked while it is held (not
  exec'd) holds it until the child ends.

  Only process 0 of a multi-process run locks (yields None elsewhere): all processes of one run
  share the workdir by design; a second run's other processes stop when its process 0 does.

  A file system without flock (some Lustre/FUSE mounts: ENOLCK/ENOSYS/EOPNOTSUPP) is warned
  about and the run goes on unlocked: refusing would make such clusters unusable. (Linux NFS
  clients map flock to NFS byte-range locks, which the server releases when a client dies.)

  The file is emptied on exit, never deleted: unlinking it could let a run that opened the old
  file lock it while a third run locks a new one, both "holding" the workdir.
  """
  if process_index != 0:
    yield None
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  # No O_TRUNC: the file names the current holder until the lock is ours.
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    locked = _try_lock(fd, path, workdir)
    if locked:
      os.ftruncate(fd, 0)
      os.write(fd, (json.dumps(holder(), indent=2) + "\n").encode())
    try:
      yield path
    finally:
      if locked:
        with contextlib.suppress(OSError):
          os.ftruncate(fd, 0)
  finally:
    os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------------------------
# The config check before a resume
# ---------------------------------------------------------------------------------------------

# Keys whose change leaves the trained model the same: how often and where the run logs,
# evaluates, checkpoints and exports, how it is laid out on devices (orbax restores onto another
# mesh), the input pipeline's depth, the MFU denominator, and when a run of skipped NaN/inf
# updates stops it (raising it is how such a stopped run goes on; no applied update changes),
# and validation files (data.validation: evaluated only; data.validation_fraction, which takes
# rows out of training, is refused). A name ending in "." is a prefix.
KEPT_ON_RESUME = (
    "log_every_steps", "checkpoint.", "eval.", "export", "data.prefetch", "peak_tflops", "mesh.",
    "max_consecutive_nonfinite_steps", "data.validation",
)
# Paths read at the start: on resume the checkpoint's weights win over model.init_from, and a
# moved folder is the usual reason these change. Logged, not refused (a different model shape
# still fails at the restore; a different tokenizer at these paths is the user's call).
PATHS = ("model.init_from", "tokenizer")
# Their change moves the end of the run; see _schedule_depends_on_total.
TOTAL_STEPS = ("num_train_steps", "num_epochs")
# Keys added after runs were recorded without them, where such a run had a known value: a
# recorded config that lacks one (and where `applies` holds) is compared as if it held that value
# rather than logged as one-sided. data.validation_rule: the held-out rows
# (bge_jax.data.holdout.held_out) were chosen by rule 1 before the key existed; it matters only
# with rows held out.
IMPLIED_BEFORE = {
    "data.validation_rule": (1, lambda flat: bool(flat.get("data.validation_fraction"))),
}
# A change of the key is kept (logged) when the other key is unset on both sides.
MATTERS_ONLY_WITH = {"data.validation_rule": "data.validation_fraction"}


def _flat(config: Any) -> dict[str, Any]:
  # The current config written the way the previous start recorded it (to_json_best_effort):
  # tuples become lists, unset placeholders null, other objects their best-effort strings.
  if not isinstance(config, dict):
    config = json.loads(config.to_json_best_effort())
  return config_files.flat_keys(config)


def _same(a: Any, b: Any) -> bool:
  # 1 vs 1.0, 1e-3 vs 0.001 (json writes floats by repr, so they round-trip exactly); bools are
  # not numbers here (True vs 1 is a change).
  if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
    return float(a) == float(b)
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  return type(a) is type(b) and a == b


def _kept(key: str) -> bool:
  return any(key == k or (k.endswith(".") and key.startswith(k)) for k in KEPT_ON_RESUME)


def _schedule_depends_on_total(flat: dict[str, Any]) -> bool:
  """Whether the lr at a given step depends on the run's total steps (bge_jax.train.state
  make_optimizer): a linear decay to 0 over the total, or a warmup of warmup_ratio x total."""
  linear = flat.get("optimizer.schedule", "linear") != "constant"
  ratio_warmup = (flat.get("optimizer.warmup_steps", -1) < 0
                  and flat.get("optimizer.warmup_ratio", 0.0) > 0)
  return linear or ratio_warmup


def _total(flat: dict[str, Any]) -> tuple[str, float]:
  # num_train_steps > 0 wins over num_epochs (loop.total_train_steps).
  steps = flat.get("num_train_steps", -1)
  return ("num_train_steps", steps) if steps > 0 else ("num_epochs", flat.get("num_epochs", 0.0))


def _fmt(key: str, before: Any, after: Any) -> str:
  return f"{key} {json.dumps(before)} -> {json.dumps(after)}"


def check_resume_config(workdir: str, config: Any, accept_changes: bool = False) -> list[str]:
  """Refuses to resume the run in `workdir` with a config that changes the run; returns the
  changes it let through ("key old -> new"), logged.

  Call it only when a checkpoint will be restored, before anything rewrites
  <workdir>/config.json (run_info.write_run_info records the config of every start). It
  compares `config` with that record and raises ConfigError naming every changed key that
  changes what is trained, with both values, unless `accept_changes` (--accept_config_changes):
  then each such change is logged as a warning and the run goes on.

  Not refused (logged at info): KEPT_ON_RESUME (logging, checkpoint, eval and export settings,
  the mesh, data.prefetch, peak_tflops, max_consecutive_nonfinite_steps) and PATHS
  (model.init_from: the checkpoint's weights win on resume; tokenizer).

  num_train_steps / num_epochs: extending (or shortening) a run changes the lr schedule's total,
  so with a linear decay or a warmup_ratio the lr of every step from here differs from the run
  so far's plan (a finished linear run jumps from ~0 back up): refused as a change then,
  accepted with a constant schedule and a fixed (or no) warmup, where only the end moves.

  Everything else (optimizer.*, model shape and dtypes, data.*, loss.*, seed, batch_size, stage,
  grad_accum_steps, dropout, skip_nonfinite_updates, and keys added later) is refused when
  changed.

  Keys only one side has (a newer or older bge-jax) are logged, not refused: the user did not
  change them; except IMPLIED_BEFORE, a key whose value before it existed is known: a run
  recorded with data.validation_fraction > 0 and no data.validation_rule held out rows by rule
  1, so resuming it under rule 2 (the default) is refused as "data.validation_rule 1 -> 2" (set
  data.validation_rule=1 to resume it with its own rows). data.validation_rule is not compared
  when no rows are held out on either side. A missing or unreadable config.json (a run from
  before it was recorded) is warned about and the resume goes on.
  """
  from bge_jax.train.init import ConfigError

  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      before = config_files.flat_keys(json.load(f))
  except (OSError, ValueError, AttributeError) as e:
    log.warning("cannot read the config the run in %s started with (%s: %s); resuming without "
                "checking that this config continues it.", workdir, type(e).__name__, e)
    return []
  after = _flat(config)
  for key, (value, applies) in IMPLIED_BEFORE.items():
    if key not in before and key in after and applies(before):
      before[key] = value

  refused, kept, one_sided = [], [], []
  for key in sorted(set(before) | set(after)):
    if key not in before or key not in after:
      one_sided.append(key)
    elif _same(before[key], after[key]):
      continue
    elif _kept(key) or key in PATHS or (key in MATTERS_ONLY_WITH and not any(
        side.get(MATTERS_ONLY_WITH[key]) for side in (before, after))):
      kept.append(_fmt(key, before[key], after[key]))
    elif key in TOTAL_STEPS:
      if _total(before) == _total(after) or key not in (_total(before)[0], _total(after)[0]):
        kept.append(_fmt(key, before[key], after[key]))  # e.g. num_epochs under num_train_steps
      elif _schedule_depends_on_total(after):
        refused.append(_fmt(key, before[key], after[key]) + " (changes the lr schedule)")
      else:
        kept.append(_fmt(key, before[key], after[key]))
    else:
      refused.append(_fmt(key, before[key], after[key]))

  if kept:
    log.info("resuming with changed settings that leave the run the same: %s", "; ".join(kept))
  for key in one_sided:
    log.info("config.%s is only in the %s config (another bge-jax version); not compared.", key,
             "recorded" if key in before else "current")
  if not refused:
    return []
  if not accept_changes:
    raise ConfigError(
        f"the config changed since the run in {workdir} started ({path}), and resuming would "
        f"mix two runs in one: {'; '.join(refused)}. Rerun with the recorded values, pass "
        f"{ACCEPT_FLAG} to continue this run with the new ones, or use a new --workdir.")
  for change in refused:
    log.warning("resuming with a changed config (%s): %s", ACCEPT_FLAG, change)
  return refused
