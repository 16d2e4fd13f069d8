"""The training loop shared by all stages: mesh, model init or restore, step, metrics, checkpoints.

Read top to bottom, in the order it runs (big_vision style). The stage (config.stage) supplies
the model parts, the loss, the host batches and the exports; nothing here knows which stage.

Resume is bit-exact. A stage's batcher is a pure function of the step (example order seeded by
(seed, epoch), masks and groups by (seed, step, process)), and the dropout key is
fold_in(key(seed + 1), step); so the checkpointed TrainState (step, params, optimizer state,
non-finite step count) is the whole state of a run: the data position is `step`, there is no
iterator state to save. Checkpoints are orbax, saved asynchronously (the device-to-host copy
happens inside `save`, before the next step may reuse the donated buffers; the file writes run
in the background). A SIGTERM saves at the current step and returns; an unreadable newest
checkpoint is set aside with a warning and the one before it is used.

Multi-process: every process runs this same function on its own shard of the data
(`stage.batcher(..., process_index, process_count)`); the global batch is assembled with
`make_array_from_process_local_data`; orbax writes checkpoints collectively; only process 0
writes logs, metrics, run info and exports.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from bge_jax import weights
from bge_jax import flops, sharding
from bge_jax import memory as memory_lib
from bge_jax.config import BertConfig, preset
from bge_jax.models import bert
from bge_jax.train import state as state_lib
from bge_jax.train.evaluate import make_evaluator
from bge_jax.train.metrics import MetricWriter
from bge_jax.train.stages import get_stage

log = logging.getLogger("bge_jax.train")

MODEL_OVERRIDES = ("dtype", "param_dtype", "remat_policy", "attention_impl", "hidden_dropout",
                   "attention_dropout", "decoder_query_stream", "max_position_embeddings")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and the fix."""


class CheckpointError(RuntimeError):
  """A checkpoint folder that cannot be written or read; the message names it and the fix."""


# ---------------------------------------------------------------------------------------------
# Model: tokenizer, config, initial weights (auto-resume order: workdir > init_from > scratch)
# ---------------------------------------------------------------------------------------------

def load_tokenizer(config: Any):
  from transformers import AutoTokenizer
  path = config.tokenizer or config.model.init_from
  if not path:
    raise ConfigError("no tokenizer: set config.tokenizer to a folder with tokenizer files "
                      "(or config.model.init_from to a Hugging Face model folder).")
  folder = weights.tokenizer_folder(path) or path
  try:
    return AutoTokenizer.from_pretrained(folder)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.tokenizer: cannot load a tokenizer from {folder}: {e}") from e


def model_config_and_weights(config: Any, tokenizer: Any) -> tuple[BertConfig, dict | None, str]:
  """(model config, host params loaded from init_from or None, a description of the origin)."""
  m = config.model
  overrides = {k: m[k] for k in MODEL_OVERRIDES if k in m and m[k] is not None}
  if "dtype" not in overrides:
    # Mixed precision on accelerators, as BGE was trained (AMP): bf16 compute, float32
    # parameters and optimizer state. XLA:CPU has no fast bf16 matmul (README "Benchmarks"):
    # float32 there. Set here even for init_from checkpoints, whose config records the compute
    # dtype of the run that saved them, not a property of the weights.
    overrides["dtype"] = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if overrides["dtype"] == "bfloat16":
      log.info("config.model.dtype unset: bfloat16 compute on %s (float32 parameters); "
               "--config.model.dtype=float32 for full precision", jax.default_backend())
  if m.init_from:
    path = m.init_from
    # A checkpoint, another run's workdir (its newest checkpoint) or a Hugging Face model.
    base, params, what = weights.load_source(path)
    origin = (f"{path} ({what}, {base.hf_family}, {base.num_layers} layers, "
              f"hidden {base.hidden_size})")
  else:
    vocab = m.get("vocab_size", -1)
    vocab = len(tokenizer) if vocab in (-1, None) else vocab
    base, params = preset(m.preset, vocab_size=vocab), None
    origin = f"scratch ({m.preset}, vocab {vocab})"
  backend = jax.default_backend()
  if overrides.get("attention_impl") == "pallas" and backend != "gpu":
    raise ConfigError(
        f"config.model.attention_impl='pallas' is a GPU (Triton) kernel and this run's backend "
        f"is {backend}: leave model.attention_impl unset here.")
  if base.attention_impl == "pallas" and "attention_impl" not in overrides and backend != "gpu":
    # A runtime choice the init_from run saved with its config, like its dtype.
    log.info("init_from %s trained with attention_impl='pallas' (GPU only): %s uses the "
             "default attention", m.init_from, backend)
    overrides["attention_impl"] = None
  try:
    model_config = base.replace(**overrides)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e
  if len(tokenizer) > model_config.vocab_size:
    raise ConfigError(
        f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
        f"{model_config.vocab_size}: set config.tokenizer to the model's own tokenizer, or "
        "config.model.vocab_size=-1 when training from scratch.")
  return model_config, params, origin


def merge_loaded(fresh: Any, loaded: dict | None, shardings: Any) -> tuple[Any, list[str]]:
  """Replaces fresh leaves by loaded ones (placed shard by shard); returns the fresh-only parts."""
  if loaded is None:
    return fresh, ["all (from scratch)"]
  flat_loaded = {jax.tree_util.keystr(p): v
                 for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  new_parts = set()

  def pick(path, leaf, sh):
    key = jax.tree_util.keystr(path)
    if key not in flat_loaded:
      new_parts.add(str(getattr(path[0], "key", path[0])))
      return leaf
    host = np.asarray(flat_loaded[key], dtype=leaf.dtype)
    if host.shape != leaf.shape:
      raise ConfigError(f"init_from: {key} has shape {host.shape}, the model wants {leaf.shape}.")
    return jax.make_array_from_callback(leaf.shape, sh, lambda idx: host[idx])

  merged = jax.tree_util.tree_map_with_path(pick, fresh, shardings)
  used = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(fresh)[0]}
  dropped = sorted({k.split("]")[0] + "]" for k in flat_loaded if k not in used})
  if dropped:
    log.info("init_from: parts this stage does not train, not loaded: %s", dropped)
  return merged, sorted(new_parts)


# ---------------------------------------------------------------------------------------------
# Host batches: a background thread keeps `depth` batches ready ahead of the device.
# ---------------------------------------------------------------------------------------------

class Prefetcher:
  """Runs `make(step)` for start, start+1, ... in a thread, `depth` ahead of the consumer."""

  def __init__(self, make: Callable[[int], Any], start: int, depth: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(make, start), daemon=True)
    self._thread.start()

  def _run(self, make, step):
    while not self._stop.is_set():
      try:
        item = (step, make(step), None)
      except BaseException as e:  # handed to the consumer, which re-raises it
        item = (step, None, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[2] is not None:
        return
      step += 1

  def next(self) -> tuple[int, Any]:
    step, batch, error = self._queue.get()
    if error is not None:
      raise error
    return step, batch

  def close(self, timeout: float = 30.0) -> None:
    """Stops the thread and waits for it (at most `timeout` s: it finishes the batch it is
    building), so no batch work outlives the run."""
    self._stop.set()
    self._thread.join(timeout)
    if self._thread.is_alive():
      log.warning("the prefetch thread is still building a batch after %.0f s; leaving it to "
                  "finish in the background (a daemon thread)", timeout)


# ---------------------------------------------------------------------------------------------
# Checkpoints: orbax, async; the newest readable step wins; write errors name the folder.
# ---------------------------------------------------------------------------------------------

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


def drop_metrics_after(workdir: str, step: int) -> None:
  """On resume: rows logged after the restored step (a killed run's lost steps) are dropped, so
  metrics.jsonl holds each step once, as the uninterrupted run would. A torn last line goes too."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return

  def row_step(line: str) -> int | None:
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      return None

  with open(path) as f:
    lines = f.readlines()
  kept = [x if x.endswith("\n") else x + "\n" for x in lines
          if (s := row_step(x)) is not None and s <= step]
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
    log.info("metrics.jsonl: dropped %d rows after step %d (not in any checkpoint)",
             len(lines) - len(kept), step)


# ---------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------

def total_train_steps(config: Any, num_examples_global: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  if config.num_epochs <= 0:
    raise ConfigError("set config.num_train_steps > 0 or config.num_epochs > 0.")
  return max(1, math.ceil(config.num_epochs * num_examples_global / config.batch_size))


def train(config: Any, workdir: str) -> dict[str, float]:
  """Runs (or resumes) a training run in `workdir`; returns the last logged metrics.

  After a SIGTERM it saves a checkpoint at the current step and returns early (no exports);
  the returned dict then has "preempted_at_step".
  """
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  stage = get_stage(config.stage)

  # --- Mesh and batch layout -----------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % (batch_shards * config.grad_accum_steps):
    raise ConfigError(
        f"config.batch_size={config.batch_size} must be divisible by mesh data x fsdp "
        f"({batch_shards}) x config.grad_accum_steps ({config.grad_accum_steps}).")
  if config.batch_size % jax.process_count():
    raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by the "
                      f"{jax.process_count()} processes.")

  # --- Model ----------------------------------------------------------------------------------
  tokenizer = load_tokenizer(config)
  evaluator = make_evaluator(config, tokenizer)
  base_config, loaded, origin = model_config_and_weights(config, tokenizer)
  model_config = stage.model_config(base_config, config)

  # --- Data -----------------------------------------------------------------------------------
  batcher = stage.batcher(config, tokenizer, model_config, jax.process_index(), jax.process_count())
  total_steps = total_train_steps(config, batcher.num_examples * jax.process_count())

  # --- Optimizer and shardings ----------------------------------------------------------------
  tx, schedule = state_lib.make_optimizer(config.optimizer.to_dict(), total_steps)
  abstract_params, logical = bert.abstract_init(model_config)
  param_sh = sharding.logical_to_sharding(logical, mesh)
  abstract_state = jax.eval_shape(lambda p: state_lib.init_state(p, tx), abstract_params)
  repl = sharding.replicated(mesh)
  state_sh = sharding.train_state_sharding(abstract_state, param_sh, tx, mesh)

  # --- Restore or initialise (never materialising unsharded parameters on device) -------------
  manager = open_checkpoints(os.path.join(workdir, "checkpoints"), config.checkpoint.keep)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, state_sh)
  state, manager = restore_newest(manager, target, workdir)
  if state is not None:
    log.info("resumed from %s at step %d", manager.directory, int(jax.device_get(state.step)))
  else:
    rng_init = jax.random.key(config.seed)
    fresh = jax.jit(lambda r: bert.init(model_config, r)[0], out_shardings=param_sh)(rng_init)
    params, new_parts = merge_loaded(fresh, loaded, param_sh)
    state = jax.jit(lambda p: state_lib.init_state(p, tx), out_shardings=state_sh)(params)
    log.info("initialised from %s; freshly initialised parts: %s", origin, new_parts)
  start_step = int(jax.device_get(state.step))
  nonfinite_seen = int(jax.device_get(state.nonfinite_steps))
  if is_main:
    drop_metrics_after(workdir, start_step)  # also a killed run that saved no checkpoint yet

  # --- The step ---------------------------------------------------------------------------------
  stage_loss = stage.loss_fn(config, model_config)

  def loss_fn(params, batch, rng):
    return stage_loss(params, batch, rng if config.dropout else None)

  skip_nonfinite = bool(config.get("skip_nonfinite_updates", False))
  step_fn = state_lib.make_train_step(loss_fn, tx, schedule, config.grad_accum_steps,
                                      skip_nonfinite=skip_nonfinite)
  probe = batcher(start_step)
  # The device peak for MFU: config.peak_tflops per device, or the detected accelerator's (none
  # on CPU).
  peak = float(config.get("peak_tflops", 0.0) or 0.0) * 1e12 or flops.peak_flops()
  # Batch-major arrays split over (data, fsdp); 0-d flags (e.g. in_batch_negatives) replicated.
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) if v.ndim else repl
              for k, v in probe.items()}
  jit_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh, repl),
                     out_shardings=(state_sh, repl), donate_argnums=(0,))

  def global_batch(local):
    return {k: jax.make_array_from_process_local_data(batch_sh[k], v) for k, v in local.items()}

  programs: dict[tuple, tuple[Any, float]] = {}

  def program(local) -> tuple[Any, float]:
    """(the step compiled for this batch's shapes, its analytic model FLOPs: PaLM convention,
    remat/GradCache recompute not counted). Every batch has the probe's shapes, except packed
    ones that outgrew their rows (one process only, `ContrastiveBatcher.enable_packing`)."""
    shapes = tuple((k, np.shape(v)) for k, v in sorted(local.items()))
    if shapes not in programs:
      if programs:
        log.warning("compiling the train step for new batch shapes: %s",
                    {k: s for k, s in shapes if s != np.shape(probe[k])})
      with sharding.activate(mesh):
        compiled = jit_step.lower(state, global_batch(local), jax.random.key(0)).compile()
      if programs:
        first = next(iter(programs.values()))[0]
        log.warning("that step needs %s per device (the first one: %s)",
                    memory_lib.describe(memory_lib.peak_bytes(compiled)),
                    memory_lib.describe(memory_lib.peak_bytes(first)))
      _check_fits(compiled, config, grown=bool(programs))
      programs[shapes] = (compiled, flops.train_step_flops(config, model_config, local,
                                                           jax.process_count()).model)
    return programs[shapes]

  # Compiled ahead of the loop: the memory analysis is printed before the first step.
  memory = memory_lib.analysis(program(probe)[0])
  if is_main:
    if start_step:
      _warn_if_processes_changed(workdir, start_step)
    _write_run_info(workdir, config, model_config, origin, total_steps, batcher, memory)

  # --- Loop -----------------------------------------------------------------------------------
  preemption = PreemptionWatch(manager)
  writer = MetricWriter(workdir, enabled=is_main)
  rng = jax.random.key(config.seed + 1)
  # The compile probe is the first step's batch; the thread prepares the ones after it.
  prefetch = Prefetcher(batcher, start_step + 1, config.data.prefetch)
  progress = _progress(is_main, start_step, total_steps)
  last: dict[str, float] = {}

  def run_eval(step: int) -> None:
    if evaluator is None:
      return
    results = evaluator(_gather(state.params), model_config)
    writer.write(step, results)
    last.update(results)
    if is_main:
      print(f"[bge-jax] step {step} eval: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()),
            flush=True)

  if start_step == 0:
    run_eval(0)
  window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
  checked = start_step  # steps up to here had a finite loss and gradient (or were skipped)
  preempted_at = None
  try:
    for step in range(start_step, total_steps):
      local = probe if step == start_step else prefetch.next()[1]
      t = time.perf_counter()
      compiled_step, step_flops = program(local)
      window_start += time.perf_counter() - t  # a compile for new shapes is not step time
      window_tokens += batcher.real_tokens(local) * jax.process_count()
      window_flops += step_flops
      with sharding.activate(mesh):
        state, metrics = compiled_step(state, global_batch(local), rng)
      done = step + 1
      preempted = preemption.reached(done)
      should_log = done % config.log_every_steps == 0 or done == total_steps or preempted
      should_save = done % config.checkpoint.every_steps == 0 or done == total_steps or preempted
      if should_log or should_save:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        # Checked before every save, so every checkpoint on disk follows finite steps only.
        if values["nonfinite_steps"] > nonfinite_seen:
          new_bad = int(values["nonfinite_steps"]) - nonfinite_seen
          if not skip_nonfinite:
            raise FloatingPointError(
                f"a NaN/inf loss or gradient in steps {checked + 1}-{done} (at step {done}: "
                f"loss={values['loss']}, grad_norm={values['grad_norm']}); stopped with the last "
                f"good checkpoint (step {manager.latest_step()}) kept in {manager.directory}. "
                "Try a lower config.optimizer.lr or config.optimizer.clip_norm, "
                "config.model.dtype='float32', or config.skip_nonfinite_updates=True to skip "
                "such updates and go on.")
          log.warning("steps %d-%d: %d update(s) with a NaN/inf loss or gradient skipped "
                      "(%d in the run)", checked + 1, done, new_bad, int(values["nonfinite_steps"]))
          nonfinite_seen = int(values["nonfinite_steps"])
        checked = done
        elapsed = time.perf_counter() - window_start
        values["tokens_per_sec"] = window_tokens / max(elapsed, 1e-9)
        values["model_tflops_per_sec"] = window_flops / max(elapsed, 1e-9) / 1e12
        if peak:
          values["mfu"] = flops.mfu(window_flops, max(elapsed, 1e-9), peak, jax.device_count())
        window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
        if should_log:
          writer.write(done, values)
          last = values
          if progress is not None:
            progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        if should_save:
          save_checkpoint(manager, done, state)
      if preempted:
        preempted_at = done
        break
      every = config.eval.every_steps if "eval" in config else 0
      if (every and done % every == 0) or done == total_steps:
        run_eval(done)
      if progress is not None:
        progress.update(1)
    finish_checkpoints(manager)
  finally:
    preemption.close()
    prefetch.close()
    if progress is not None:
      progress.close()
    writer.close()
    try:
      manager.close()  # waits for an in-flight save: the last good checkpoint gets committed
    except Exception as e:  # already reported by finish_checkpoints, or masking another error
      log.error("closing the checkpoint manager of %s: %s", manager.directory, e)

  if preempted_at is not None:
    if is_main:
      print(f"[bge-jax] preempted (SIGTERM): saved step {preempted_at} in {manager.directory}; "
            "rerun the same command to resume.", flush=True)
    return dict(last, preempted_at_step=preempted_at)

  # --- Exports ----------------------------------------------------------------------------------
  if config.export:
    params = _gather(state.params)
    if is_main:
      for path in stage.export(params, model_config, tokenizer, os.path.join(workdir, "export"),
                               config):
        log.info("exported %s", path)
  return last


def _gather(tree: Any) -> Any:
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def _progress(enabled: bool, start: int, total: int):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _warn_if_processes_changed(workdir: str, start_step: int) -> None:
  """Each process reads its own shard of the data, so the batches after a resume are the
  uninterrupted run's only with the process count that run had (`run_info.json`)."""
  try:
    with open(os.path.join(workdir, "run_info.json")) as f:
      before = json.load(f).get("processes")
  except (OSError, ValueError):
    return
  if before is not None and before != jax.process_count():
    log.warning(
        "resuming at step %d with %d processes; the run so far had %d. Each process reads its "
        "own shard of the data, so from here the batches differ from an uninterrupted run's "
        "(examples may repeat or be skipped until the epoch ends); resume with %d processes "
        "to continue it exactly.", start_step, jax.process_count(), before, before)


def _check_fits(compiled, config, grown: bool) -> None:
  """Refuses a compiled step that needs more memory per device than the device has (GPU, TPU;
  CPU reports no limit), before it runs out of memory with XLA's allocator error; warns when it
  needs more than 95% (the prefetched batches and the allocator's fragmentation come on top)."""
  need, limit = memory_lib.peak_bytes(compiled), memory_lib.device_limit()
  if need is None or limit is None or need <= 0.95 * limit:
    return
  what = ("the train step compiled for a new packed batch shape (a batch that needed more rows "
          "than the first ones; config.data.pack grows them)" if grown else "the train step")
  sizes = (f"{what} needs {memory_lib.describe(need)} per device (XLA's memory analysis: "
           f"arguments + outputs - donated buffers + temporaries) of the device's "
           f"{memory_lib.describe(limit)}")
  fixes = (f"lower config.batch_size (now {config.batch_size}), set "
           "config.model.remat_policy='full' (recomputes each layer in the backward pass), "
           "config.loss.gradcache_chunk (stages 2 and 3: the memory of one chunk of the batch), "
           "or shard the parameters and optimizer state over more devices with config.mesh.fsdp")
  if need <= limit:
    log.warning("%s: close to the limit, it may run out of memory; if it does, %s.", sizes,
                fixes)
    return
  raise MemoryError(f"{sizes}: it cannot run. To fit it, {fixes}."
                    + (" The checkpoints saved so far are kept." if grown else ""))


def _write_run_info(workdir, config, model_config, origin, total_steps, batcher, memory) -> None:
  os.makedirs(workdir, exist_ok=True)
  info = {
      "stage": config.stage, "origin": origin, "total_steps": total_steps,
      "data": batcher.describe(), "model": model_config.to_dict(),
      "num_params": model_config.num_params(), "devices": jax.device_count(),
      "processes": jax.process_count(),
  }
  if memory is not None:
    info["compiled_step_bytes"] = dict(memory, peak=memory_lib.peak_bytes(memory))
  with open(os.path.join(workdir, "run_info.json"), "w") as f:
    json.dump(info, f, indent=2)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  print(f"[bge-jax] stage={config.stage} from {origin}; {model_config.num_params():,} params; "
        f"{total_steps} steps of {config.batch_size}; data: {batcher.describe()}", flush=True)
  if "compiled_step_bytes" in info:
    mb = {k: f"{v / 2**20:.1f} MiB" for k, v in info["compiled_step_bytes"].items()}
    print(f"[bge-jax] compiled step memory per device: {mb}", flush=True)
