"""What a run records about itself in its workdir: run_info.json, config.json, the start banner."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import jax

from bge_jax import memory as memory_lib
from bge_jax.data import files
from bge_jax.train.checkpoints import write_failure

log = logging.getLogger("bge_jax.train")


def write_run_info(workdir, config, model_config, origin, total_steps, batcher, memory) -> None:
  info = {
      "stage": config.stage, "origin": origin, "total_steps": total_steps,
      "data": batcher.describe(), "model": model_config.to_dict(),
      "num_params": model_config.num_params(), "devices": jax.device_count(),
      "processes": jax.process_count(),
  }
  if hasattr(batcher, "dataset_summaries"):  # stages 2-3: rows and batches per dataset
    info["datasets"] = batcher.dataset_summaries()
  if memory is not None:
    info["compiled_step_bytes"] = dict(memory, peak=memory_lib.peak_bytes(memory))
  write_atomic(workdir, "run_info.json", lambda f: json.dump(info, f, indent=2))
  write_atomic(workdir, "config.json", lambda f: f.write(config.to_json_best_effort(indent=2)))
  print(f"[bge-jax] stage={config.stage} from {origin}; {model_config.num_params():,} params; "
        f"{total_steps} steps of {config.batch_size}; data: {batcher.describe()}", flush=True)
  if "compiled_step_bytes" in info:
    mb = {k: f"{v / 2**20:.1f} MiB" for k, v in info["compiled_step_bytes"].items()}
    print(f"[bge-jax] compiled step memory per device: {mb}", flush=True)


def write_atomic(folder: str, name: str, write: Callable[[Any], Any]) -> None:
  """Writes folder/name through `write(file)` all or nothing (`files.atomic_file`), so a full disk
  leaves the previous file (a resume's) intact rather than truncated. A disk-full/permission
  OSError raises checkpoints' CheckpointError naming the file."""
  try:
    os.makedirs(folder, exist_ok=True)
    with files.atomic_file(os.path.join(folder, name)) as f:
      write(f)
  except OSError as e:
    failure = write_failure(folder, name, e)
    if failure is None:
      raise
    raise failure from e


def warn_if_processes_changed(workdir: str, start_step: int) -> None:
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
