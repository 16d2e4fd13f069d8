"""The trainer's program as the benchmarks build it, so both sides of a comparison train alike.

A bundled run config (configs/<file>) on the first device, for a given model config, with AdamW
at lr 1e-5 after one warmup step, weight decay 0.01 and clipping at 1.0: what the PyTorch side
of launch/bench.py runs (`torch.optim.AdamW(lr=1e-5, weight_decay=0.01)` + clip_grad_norm_).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from bge_jax import config_files
from bge_jax.config import BertConfig
from bge_jax.train import program as program_lib


def benchmark_program(config_file: str, base_model: BertConfig,
                      loss_fn: Callable | None = None, **keys: Any) -> program_lib.TrainProgram:
  """`program.from_config` of configs/<config_file> with the optimizer above; `keys` set other
  run-config keys by dotted name (`**{"loss.gradcache_chunk": 64}`)."""
  config = config_files.load(os.path.join(config_files.CONFIGS, config_file))
  config_files.set_keys(config, {
      "optimizer.lr": 1e-5, "optimizer.warmup_steps": 1, "optimizer.weight_decay": 0.01,
      "optimizer.clip_norm": 1.0, **keys})
  return program_lib.from_config(config, base_model=base_model, loss_fn=loss_fn)
