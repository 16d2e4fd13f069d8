"""The training loop shared by all stages: mesh, model init or restore, step, metrics, checkpoints.

Read top to bottom, in the order it runs (big_vision style). The stage (config.stage) supplies
the model parts, the loss, the host batches and the exports; nothing here knows which stage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

from bge_jax import checkpoint as project_checkpoint
from bge_jax import convert, sharding
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


# ---------------------------------------------------------------------------------------------
# Model: tokenizer, config, initial weights (auto-resume order: workdir > init_from > scratch)
# ---------------------------------------------------------------------------------------------

def load_tokenizer(config: Any):
  from transformers import AutoTokenizer
  path = config.tokenizer or config.model.init_from
  if not path:
    raise ConfigError("no tokenizer: set config.tokenizer to a folder with tokenizer files "
                      "(or config.model.init_from to a Hugging Face model folder).")
  folder = path
  if os.path.isfile(path):
    folder = os.path.dirname(path)
  elif project_checkpoint.is_checkpoint(path):
    folder = project_checkpoint.tokenizer_dir(path) or path
  try:
    return AutoTokenizer.from_pretrained(folder)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.tokenizer: cannot load a tokenizer from {folder}: {e}") from e


def model_config_and_weights(config: Any, tokenizer: Any) -> tuple[BertConfig, dict | None, str]:
  """(model config, host params loaded from init_from or None, a description of the origin)."""
  m = config.model
  overrides = {k: m[k] for k in MODEL_OVERRIDES if k in m and m[k] is not None}
  if m.init_from:
    path = m.init_from
    if project_checkpoint.is_checkpoint(path):
      base, params = project_checkpoint.load_params(path)
      params = jax.device_get(params)
    else:
      base, params = convert.load_hf(path)
    origin = f"{path} ({base.hf_family}, {base.num_layers} layers, hidden {base.hidden_size})"
  else:
    vocab = m.get("vocab_size", -1)
    vocab = len(tokenizer) if vocab in (-1, None) else vocab
    base, params = preset(m.preset, vocab_size=vocab), None
    origin = f"scratch ({m.preset}, vocab {vocab})"
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

  def close(self):
    self._stop.set()


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
  """Runs (or resumes) a training run in `workdir`; returns the last logged metrics."""
  import orbax.checkpoint as ocp

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
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, param_sh,
                                 transform_non_params=lambda _: repl)
  state_sh = state_lib.TrainState(step=repl, params=param_sh, opt_state=opt_sh)

  # --- Restore or initialise (never materialising unsharded parameters on device) -------------
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True))
  latest = manager.latest_step()
  if latest is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_sh)
    state = manager.restore(latest, args=ocp.args.StandardRestore(target))
    log.info("resumed from %s at step %d", manager.directory, latest)
  else:
    rng_init = jax.random.key(config.seed)
    fresh = jax.jit(lambda r: bert.init(model_config, r)[0], out_shardings=param_sh)(rng_init)
    params, new_parts = merge_loaded(fresh, loaded, param_sh)
    state = jax.jit(lambda p: state_lib.init_state(p, tx), out_shardings=state_sh)(params)
    log.info("initialised from %s; freshly initialised parts: %s", origin, new_parts)
  start_step = int(jax.device_get(state.step))

  # --- The step ---------------------------------------------------------------------------------
  stage_loss = stage.loss_fn(config, model_config)

  def loss_fn(params, batch, rng):
    return stage_loss(params, batch, rng if config.dropout else None)

  step_fn = state_lib.make_train_step(loss_fn, tx, schedule, config.grad_accum_steps)
  probe = batcher(start_step)
  # Batch-major arrays split over (data, fsdp); 0-d flags (e.g. in_batch_negatives) replicated.
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) if v.ndim else repl
              for k, v in probe.items()}
  jit_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh, repl),
                     out_shardings=(state_sh, repl), donate_argnums=(0,))

  def global_batch(local):
    return {k: jax.make_array_from_process_local_data(batch_sh[k], v) for k, v in local.items()}

  # Compiled once, ahead of time: the memory analysis is printed before the first step.
  with sharding.activate(mesh):
    compiled_step = jit_step.lower(state, global_batch(probe), jax.random.key(0)).compile()
  memory = compiled_step.memory_analysis()
  if is_main:
    _write_run_info(workdir, config, model_config, origin, total_steps, batcher, memory)

  # --- Loop -----------------------------------------------------------------------------------
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
  window_tokens, window_start = 0, time.perf_counter()
  try:
    for step in range(start_step, total_steps):
      local = probe if step == start_step else prefetch.next()[1]
      window_tokens += batcher.real_tokens(local) * jax.process_count()
      with sharding.activate(mesh):
        state, metrics = compiled_step(state, global_batch(local), rng)
      done = step + 1
      should_log = done % config.log_every_steps == 0 or done == total_steps
      should_save = done % config.checkpoint.every_steps == 0 or done == total_steps
      if should_log or should_save:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(values[k]) for k in ("loss", "grad_norm")):
          raise FloatingPointError(
              f"step {done}: loss={values['loss']} grad_norm={values['grad_norm']} is not "
              f"finite; stopping with the last good checkpoint kept in {manager.directory} "
              "(try a lower optimizer.lr, optimizer.clip_norm, or model.dtype='float32').")
        elapsed = time.perf_counter() - window_start
        values["tokens_per_sec"] = window_tokens / max(elapsed, 1e-9)
        window_tokens, window_start = 0, time.perf_counter()
        if should_log:
          writer.write(done, values)
          last = values
          if progress is not None:
            progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        if should_save:
          manager.save(done, args=ocp.args.StandardSave(state))
      every = config.eval.every_steps if "eval" in config else 0
      if (every and done % every == 0) or done == total_steps:
        run_eval(done)
      if progress is not None:
        progress.update(1)
    manager.wait_until_finished()
  finally:
    prefetch.close()
    if progress is not None:
      progress.close()
    writer.close()
    manager.close()

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


def _write_run_info(workdir, config, model_config, origin, total_steps, batcher, memory) -> None:
  os.makedirs(workdir, exist_ok=True)
  info = {
      "stage": config.stage, "origin": origin, "total_steps": total_steps,
      "data": batcher.describe(), "model": model_config.to_dict(),
      "num_params": model_config.num_params(), "devices": jax.device_count(),
      "processes": jax.process_count(),
  }
  if memory is not None:
    info["compiled_step_bytes"] = {
        k: int(getattr(memory, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                             "temp_size_in_bytes", "generated_code_size_in_bytes")
        if hasattr(memory, k)}
  with open(os.path.join(workdir, "run_info.json"), "w") as f:
    json.dump(info, f, indent=2)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  print(f"[bge-jax] stage={config.stage} from {origin}; {model_config.num_params():,} params; "
        f"{total_steps} steps of {config.batch_size}; data: {batcher.describe()}", flush=True)
  if "compiled_step_bytes" in info:
    mb = {k: f"{v / 2**20:.1f} MiB" for k, v in info["compiled_step_bytes"].items()}
    print(f"[bge-jax] compiled step memory per device: {mb}", flush=True)
