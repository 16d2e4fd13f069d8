"""The training loop shared by all stages: mesh, model, data, step, metrics, checkpoints, exports.

Read top to bottom, in the order it runs (big_vision style). The stage (config.stage) supplies
the model parts, the loss, the host batches and the exports; nothing here knows which stage. What
it calls lives beside it: the starting point (tokenizer, model config, initial weights) in
`init`, orbax checkpoint I/O and the SIGTERM watch in `checkpoints`, run_info.json in `run_info`,
the metrics log in `metrics`, the batch prefetch thread in `bge_jax.data.prefetch`.

Resume is bit-exact. A stage's batcher is a pure function of the step (example order seeded by
(seed, epoch), masks and groups by (seed, step, process)), and the dropout key is
fold_in(key(seed + 1), step); so the checkpointed TrainState (step, params, optimizer state,
non-finite step count) is the whole state of a run: the data position is `step`, there is no
iterator state to save. Checkpoints are orbax, saved asynchronously (the device-to-host copy
happens inside `save`, before the next step may reuse the donated buffers; the file writes run
in the background). A SIGTERM saves at the current step and returns; an unreadable newest
checkpoint is set aside with a warning and the one before it is used.

Evaluation (before the first step, every config.eval.every_steps, at the end; before that step's
checkpoint save, so a resume never skips one): the validation loss `val/*` (`validation`: the
stage's loss on the batcher's held-out batches, `bge_jax.data.holdout`) and `eval/*`
(`evaluate`); with config.checkpoint.keep_best, the best step's export goes to <workdir>/best/
(`checkpoints.BestExport`).

Multi-process: every process runs this same function on its own shard of the data
(`stage.batcher(..., process_index, process_count)`); the global batch is assembled with
`make_array_from_process_local_data`; orbax writes checkpoints collectively; only process 0
writes logs, metrics, run info and exports.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from bge_jax import flops, sharding
from bge_jax import memory as memory_lib
from bge_jax.data.prefetch import Prefetcher
from bge_jax.train import checkpoints, init, run_checks, run_info
from bge_jax.train import metrics as metrics_lib
from bge_jax.train import program as program_lib
from bge_jax.train import validation as validation_lib
from bge_jax.train import workdir as workdir_lib
from bge_jax.train.evaluate import make_evaluator
from bge_jax.train.init import ConfigError
from bge_jax.train.metrics import MetricWriter
from bge_jax.train.stages import get_stage

log = logging.getLogger("bge_jax.train")


# ---------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------

def total_train_steps(config: Any, num_examples_global: int,
                      steps_per_epoch: int | None = None) -> int:
  """config.num_train_steps, or num_epochs x the steps of an epoch: the batcher's own count when
  it has one (per-dataset batch sizes: `ContrastiveBatcher.steps_per_epoch`), else
  num_examples_global / config.batch_size."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  if config.num_epochs <= 0:
    raise ConfigError("set config.num_train_steps > 0 or config.num_epochs > 0.")
  per_epoch = (steps_per_epoch if steps_per_epoch is not None
               else num_examples_global / config.batch_size)
  return max(1, math.ceil(config.num_epochs * per_epoch))


def train(config: Any, workdir: str, accept_config_changes: bool = False) -> dict[str, float]:
  """Runs (or resumes) a training run in `workdir`; returns the last logged metrics.

  One run at a time holds the workdir (`workdir.lock`: a second one raises WorkdirBusy naming
  the holder). A resume whose config differs from the recorded one in a key that changes the
  run is a ConfigError naming the keys and both values, unless `accept_config_changes`
  (`workdir.check_resume_config`).

  After a SIGTERM it saves a checkpoint at the current step and returns early (no exports);
  the returned dict then has "preempted_at_step". A config value out of range is a ConfigError
  before anything compiles or the checkpoint folder is created (`run_checks.check_ranges`). A
  step with a NaN/inf loss, gradient or updated parameter raises FloatingPointError at the next
  log or save step, before any checkpoint after it is saved; with skip_nonfinite_updates only
  more than config.max_consecutive_nonfinite_steps of them in a row do (`run_checks`).
  """
  run_checks.check_ranges(config)
  workdir = os.path.abspath(workdir)
  with workdir_lib.lock(workdir, jax.process_index()):
    return _train(config, workdir, accept_config_changes)


def _train(config: Any, workdir: str, accept_config_changes: bool) -> dict[str, float]:
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
  tokenizer = init.load_tokenizer(config)
  evaluator = make_evaluator(config, tokenizer)
  base_config, loaded, origin = init.model_config_and_weights(config, tokenizer)
  model_config = stage.model_config(base_config, config)

  # --- Data -----------------------------------------------------------------------------------
  batcher = stage.batcher(config, tokenizer, model_config, jax.process_index(), jax.process_count())
  total_steps = total_train_steps(config, batcher.num_examples * jax.process_count(),
                                  getattr(batcher, "steps_per_epoch", None))

  # --- The step: optimizer, shardings, the jitted step (the one builder, also AOT's) ----------
  prog = program_lib.build(config, stage, model_config, mesh, total_steps)

  # --- Validation loss (val/*, the eval step compiled here) and checkpoint.keep_best ----------
  validation = getattr(batcher, "validation", None)
  validator = validation_lib.Validator(prog, validation) if validation is not None else None
  best = validation_lib.make_best(config, workdir, validator, evaluator)

  # --- Restore or initialise (never materialising unsharded parameters on device) -------------
  manager = checkpoints.open_checkpoints(os.path.join(workdir, "checkpoints"),
                                         config.checkpoint.keep)
  if manager.all_steps():  # a resume: refuse a config that changes the run before restoring
    workdir_lib.check_resume_config(workdir, config, accept_config_changes)
  state, manager = checkpoints.restore_newest(manager, prog.abstract_state, workdir)
  if state is not None:
    log.info("resumed from %s at step %d", manager.directory, int(jax.device_get(state.step)))
  else:
    fresh = prog.init_params(jax.random.key(config.seed))
    params, new_parts = init.merge_loaded(fresh, loaded, prog.param_sharding)
    state = prog.init_state(params)
    log.info("initialised from %s; freshly initialised parts: %s", origin, new_parts)
  start_step = int(jax.device_get(state.step))
  nonfinite = run_checks.NonfiniteWatch(config, int(jax.device_get(state.nonfinite_steps)))
  if is_main:
    # Also at step 0: a killed run that saved no checkpoint yet.
    metrics_lib.drop_metrics_after(workdir, start_step)

  # --- Compiled steps, one per batch shape ----------------------------------------------------
  probe = batcher(start_step)
  # The device peak for MFU: config.peak_tflops per device, or the detected accelerator's (none
  # on CPU).
  peak = float(config.get("peak_tflops", 0.0) or 0.0) * 1e12 or flops.peak_flops()
  batch_sh = prog.batch_sharding(probe)

  def global_batch(local):
    return {k: jax.make_array_from_process_local_data(batch_sh[k], v) for k, v in local.items()}

  compiled_steps: dict[tuple, tuple[Any, float]] = {}

  def compiled_step_for(local, step: int) -> tuple[Any, float]:
    """(the step compiled for this batch's shapes, its analytic model FLOPs: PaLM convention,
    remat/GradCache recompute not counted). Every batch has the probe's shapes, except those of
    datasets mixed at another batch size (config.data.batch_sizes: compiled before the loop) and
    packed ones that outgrew their rows (one process only, `ContrastiveBatcher.enable_packing`)."""
    shapes = tuple((k, np.shape(v)) for k, v in sorted(local.items()))
    if shapes not in compiled_steps:
      if compiled_steps:
        log.warning("compiling the train step for new batch shapes: %s",
                    {k: s for k, s in shapes if s != np.shape(probe[k])})
      compiled = prog.lower(state, global_batch(local), jax.random.key(0)).compile()
      if compiled_steps:
        first = next(iter(compiled_steps.values()))[0]
        log.warning("that step needs %s per device (the first one: %s)",
                    memory_lib.describe(memory_lib.peak_bytes(compiled)),
                    memory_lib.describe(memory_lib.peak_bytes(first)))
      # The batcher may name what set this step's shape (a mixed dataset's batch size).
      source = getattr(batcher, "batch_source", lambda s: None)(step)
      _check_fits(compiled, config, grown=bool(compiled_steps), source=source)
      compiled_steps[shapes] = (compiled, prog.step_flops(local, jax.process_count()).model)
    return compiled_steps[shapes]

  # Compiled ahead of the loop, so the memory analysis is printed and checked before the first
  # step: the probe's step and, with datasets mixed at different batch sizes (data.batch_sizes),
  # one per other size, from the first batch of it the run will train on (the batcher is a pure
  # function of the step: building it here changes no batch, the prefetch order nor the RNG). A
  # size that does not fit is refused now, not hours in. run_info records the largest step.
  ahead = [compiled_step_for(probe, start_step)[0]]
  for step in getattr(batcher, "batch_size_steps", lambda start, end: [])(start_step, total_steps):
    ahead.append(compiled_step_for(batcher(step), step)[0])
  memory = max((memory_lib.analysis(c) for c in ahead),
               key=lambda m: memory_lib.peak_bytes(m) or 0)
  if is_main:
    if start_step:
      run_info.warn_if_processes_changed(workdir, start_step)
    run_info.write_run_info(workdir, config, model_config, origin, total_steps, batcher, memory)

  # --- Loop -----------------------------------------------------------------------------------
  preemption = checkpoints.PreemptionWatch(manager)
  writer = MetricWriter(workdir, enabled=is_main)
  rng = jax.random.key(config.seed + 1)
  # The compile probe is the first step's batch; the thread prepares the ones after it.
  prefetch = Prefetcher(batcher, start_step + 1, config.data.prefetch)
  progress = _progress(is_main, start_step, total_steps)
  last: dict[str, float] = {}

  def run_eval(step: int) -> None:
    """val/* (the validation loss) and eval/* of the current params, logged; keep_best's export."""
    if evaluator is None and validator is None:
      return
    results = validator(state.params) if validator is not None else {}
    params = None
    if evaluator is not None:
      params = _gather(state.params)
      results.update(evaluator(params, model_config))
    writer.write(step, results)
    last.update(results)
    if is_main:
      print(f"[bge-jax] step {step} eval: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()),
            flush=True)
    if best is not None:
      best.check_available(results, "at evaluation points")
      if validation_lib.agreed(best.improves(results)):  # process 0's view of best/
        params = _gather(state.params) if params is None else params
        if is_main:
          best.save(step, results[best.metric], lambda out: stage.export(
              params, model_config, tokenizer, out, config))

  if start_step == 0:
    run_eval(0)
  window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
  preempted_at = None
  try:
    for step in range(start_step, total_steps):
      local = probe if step == start_step else prefetch.next()[1]
      t = time.perf_counter()
      compiled_step, step_flops = compiled_step_for(local, step)
      window_start += time.perf_counter() - t  # a compile for new shapes is not step time
      window_tokens += batcher.real_tokens(local) * jax.process_count()
      window_flops += step_flops
      with sharding.activate(mesh):
        state, metrics = compiled_step(state, global_batch(local), rng)
      nonfinite.add(metrics["nonfinite_steps"])
      done = step + 1
      preempted = preemption.reached(done)
      should_log = done % config.log_every_steps == 0 or done == total_steps or preempted
      should_save = done % config.checkpoint.every_steps == 0 or done == total_steps or preempted
      if should_log or should_save:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        # Checked before every save, so every checkpoint on disk follows good steps only.
        nonfinite.check(done, values, manager, log)
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
      every = config.eval.every_steps if "eval" in config else 0
      if ((every and done % every == 0) or done == total_steps) and not preempted:
        # Before the save: a run killed after this step's save resumes after it, so its
        # evaluation (and keep_best's export) must already be done.
        t = time.perf_counter()
        run_eval(done)
        window_start += time.perf_counter() - t  # evaluation is not step time
      if should_save:
        checkpoints.save_checkpoint(manager, done, state)
      if preempted:
        preempted_at = done
        break
      if progress is not None:
        progress.update(1)
    checkpoints.finish_checkpoints(manager)
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




def _check_fits(compiled, config, grown: bool, source: str | None = None) -> None:
  """Refuses a compiled train step larger than the device (`memory.check_fits`), naming the batch
  shape it was compiled for: `source` (the batcher's `batch_source`: a dataset's batch size when
  datasets are mixed at different sizes), else, for a later step (`grown`), packed rows that
  outgrew the first ones."""
  if source:
    what = f"the train step compiled for {source}"
  elif grown:
    what = ("the train step compiled for a new packed batch shape (a batch that needed more rows "
            "than the first ones; config.data.pack grows them)")
  else:
    what = "the train step"
  batch = (f"config.data.batch_sizes (now {config.data.batch_sizes!r})" if source
           else f"config.batch_size (now {config.batch_size})")
  fixes = (f"lower {batch}, set config.model.remat_policy='full' (recomputes each layer in the "
           "backward pass), config.loss.gradcache_chunk (stages 2 and 3: the memory of one chunk "
           "of the batch), or shard the parameters and optimizer state over more devices with "
           "config.mesh.fsdp")
  # A mixed dataset's size is compiled before the first step (`batch_size_steps`): nothing to
  # keep then; a grown packed shape comes mid-run.
  memory_lib.check_fits(compiled, what, fixes, log,
                        " The checkpoints saved so far are kept." if grown and not source else "")

