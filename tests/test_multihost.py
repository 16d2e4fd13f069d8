"""Multi-process training: 2 local processes x 4 CPU devices (jax.distributed over gloo, started
by launch/train.py's coordinator flags) reproduce a one-process 8-device run, stages 1 and 2.

Each process reads only its shard of the data, so the global batch of a 2-process run is not the
one a single process would draw for itself (the RetroMAE corpus is sharded by index, masks are
seeded per process). The reference therefore runs in this (8-device) process with the stage's
batcher replaced by the concatenation of the two processes' batchers — the global batch that
`make_array_from_process_local_data` assembles in the real run. What is compared is everything
else: initialisation, the cross-process step (collectives, loss reduction), dropout, the
optimizer, and that only process 0 writes metrics.
"""

import json
import os
import socket
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, make_corpus, make_tokenizer, saved_steps, wait_for_step

STEPS = 4


class ConcatBatcher:
  """The global batch of `count` processes, built in one process (test reference)."""

  def __init__(self, parts):
    self.parts = parts
    self.num_examples = sum(p.num_examples for p in parts)

  def __call__(self, step):
    batches = [p(step) for p in self.parts]
    out = {}
    for k, v in batches[0].items():
      if np.ndim(v) == 0:  # a flag every process computes alike (e.g. in_batch_negatives)
        assert all(np.array_equal(b[k], v) for b in batches), k
        out[k] = v
      else:
        out[k] = np.concatenate([b[k] for b in batches])
    return out

  def real_tokens(self, batch):
    return self.parts[0].real_tokens(batch)

  def describe(self):
    return " | ".join(p.describe() for p in self.parts)


class SimulatedProcesses:
  def __init__(self, stage, count):
    self.stage, self.count = stage, count
    self.name = stage.name

  def __getattr__(self, name):
    return getattr(self.stage, name)

  def batcher(self, config, tokenizer, model_config, process_index, process_count):
    assert (process_index, process_count) == (0, 1)
    from unittest import mock

    from bge_jax import contrastive

    def parts():
      return [self.stage.batcher(config, tokenizer, model_config, i, self.count)
              for i in range(self.count)]

    # Packed rows sized from the processes' first batches: their all-gather, in one process.
    needs = []
    with mock.patch.object(contrastive, "max_over_processes",
                           lambda need, count: needs.append(need) or need):
      parts()
    if not needs:
      return ConcatBatcher(parts())
    agreed = {side: max(n[side] for n in needs) for side in needs[0]}
    with mock.patch.object(contrastive, "max_over_processes", lambda need, count: agreed):
      return ConcatBatcher(parts())


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def overrides(stage, tmp_path):
  """Tiny runs: stage 1 on a text corpus; stage 2 on query/pos/neg rows, whose in-batch
  negatives span both processes' rows."""
  common = {"tokenizer": str(make_tokenizer(tmp_path / "tok")), "num_train_steps": STEPS,
            "log_every_steps": 1, "checkpoint.every_steps": 2, "export": False}
  if stage == "retromae":
    return dict(common, **{"data.train": str(make_corpus(tmp_path / "train.jsonl", 128)),
                           "data.max_length": 32, "model.max_position_embeddings": 64,
                           "batch_size": 8})
  from test_train_contrastive import make_rows
  # Padded unless a test packs (packing is the default; its rows, hence its dropout masks,
  # depend on the devices per process).
  return dict(common, **{"data.train": str(make_rows(tmp_path / "rows.jsonl", 128)),
                         "data.query_max_length": 8, "data.passage_max_length": 16,
                         "model.max_position_embeddings": 32, "batch_size": 16,
                         "data.pack": False})


def start_processes(stage, workdir, values, env, logs, port, flags=()):
  """launch/train.py with configs/<stage>.py:tiny, `values` and extra command-line `flags` as
  len(logs) processes over gloo on 127.0.0.1:port, process i writing to logs[i]; returns the
  Popen objects."""
  return [subprocess.Popen(
      [sys.executable, str(REPO / "launch" / "train.py"),
       f"--config={REPO / 'configs' / f'{stage}.py'}:tiny", f"--workdir={workdir}",
       f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={len(logs)}",
       f"--process_id={i}", *flags] + [f"--config.{k}={v}" for k, v in values.items()],
      env=env, stdout=log, stderr=subprocess.STDOUT, text=True) for i, log in enumerate(logs)]


def run_two_processes(stage, workdir, values, tmp_path, until=None):
  """launch/train.py as 2 processes x 4 CPU devices over gloo; returns (procs, outputs).

  until=(step, signal, process): send `signal` to that process once process 0's metrics.jsonl
  shows `step`, as a preemption notice reaching one host would."""
  port = free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                                   "--xla_cpu_multi_thread_eigen=false",
             BGE_JAX_COMPILATION_CACHE=str(tmp_path / "xla_cache"))
  logs = [open(tmp_path / f"{workdir.name}.{i}.log", "w+") for i in range(2)]
  procs = start_processes(stage, workdir, values, env, logs, port)
  try:
    if until is not None:
      at_step, sig, target = until
      wait_for_step(workdir, at_step, procs)
      procs[target].send_signal(sig)
    for p in procs:
      p.wait(timeout=900)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = []
  for f in logs:
    f.seek(0)
    outputs.append(f.read())
    f.close()
  return procs, outputs


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["retromae", "contrastive", "contrastive packed"])
def test_two_processes_reproduce_one_process_loss_curve(stage, tmp_path, monkeypatch):
  """`contrastive packed`: data.pack with rows sized from both processes' first batches (an
  all-gather); no dropout, whose masks depend on the rows, which the one-process reference
  rounds to its 8 devices, not 4."""
  from test_train import load_config, losses, override

  from bge_jax.train import init, loop

  stage, packed = stage.split()[0], stage.endswith("packed")
  values = overrides(stage, tmp_path)
  if packed:  # passages of 1-6 words: each process's first batches need their own rows
    from test_train_contrastive import _rows_of_length
    values.update({"data.pack": True, "dropout": False, "data.query_max_length": 16,
                   "data.train": str(_rows_of_length(tmp_path / "ragged.jsonl", 128, (1, 6)))})

  workdir = tmp_path / "multi"
  procs, outputs = run_two_processes(stage, workdir, values, tmp_path)
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  assert "process 1 of 2, 4 local / 8 devices" in outputs[1]
  assert f"[bge-jax] stage={stage}" in outputs[0] and "[bge-jax]" not in outputs[1]
  info = json.loads((workdir / "run_info.json").read_text())
  assert info["processes"] == 2 and info["devices"] == 8
  assert saved_steps(workdir) == [2, 4]
  if packed:  # both processes pack to the rows the larger of their needs asks for (here the
    # two needs may be equal: test_max_over_processes_takes_every_process_need checks the max)
    import types

    from bge_jax import contrastive
    unpacked = override(load_config(stage, "tiny"), **{**values, "data.pack": False})
    own = [contrastive.CONTRASTIVE.batcher(
        unpacked, init.load_tokenizer(unpacked), types.SimpleNamespace(max_position_embeddings=32),
        i, 2).packed_rows_needed(range(contrastive.PACK_CALIBRATION_STEPS)) for i in range(2)]
    agreed = {side: max(n[side] for n in own) for side in own[0]}
    for out in outputs:
      assert f"needed at most {agreed} over the first 16 batches of 2 processes" in out, agreed
  multi = losses(workdir)

  real = loop.get_stage(stage)
  monkeypatch.setattr(loop, "get_stage", lambda name: SimulatedProcesses(real, 2))
  config = override(load_config(stage, "tiny"), **values)
  loop.train(config, str(tmp_path / "single"))
  single = losses(tmp_path / "single")

  assert sorted(multi) == sorted(single) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([multi[s] for s in single], [single[s] for s in single],
                             rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["checkpoint", "run"])
def test_two_processes_initialise_from_a_checkpoint_or_a_run(source, tmp_path, monkeypatch):
  """model.init_from a bge-jax params folder or another run's workdir, on 2 processes: each
  restores the params onto its own devices (process 1 cannot place arrays on process 0's), and
  the loss curve is the one-process run's from the same source."""
  from test_train import load_config, losses, override

  from bge_jax import weights
  from bge_jax.train import loop

  values = overrides("contrastive", tmp_path)
  src = tmp_path / "src_run"
  loop.train(override(load_config("contrastive", "tiny"), **dict(values, num_train_steps=2)),
             str(src))
  if source == "checkpoint":
    _, config, params = weights.load_run_params(src)
    weights.save_params(str(tmp_path / "src_ckpt"), params, config)
    src = tmp_path / "src_ckpt"
  values["model.init_from"] = str(src)

  procs, outputs = run_two_processes("contrastive", tmp_path / "multi", values, tmp_path)
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  assert f"from {src} (" in outputs[0]
  multi = losses(tmp_path / "multi")

  real = loop.get_stage("contrastive")
  monkeypatch.setattr(loop, "get_stage", lambda name: SimulatedProcesses(real, 2))
  loop.train(override(load_config("contrastive", "tiny"), **values), str(tmp_path / "single"))
  single = losses(tmp_path / "single")
  assert sorted(multi) == sorted(single) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([multi[s] for s in single], [single[s] for s in single],
                             rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_at_one_step_and_resume_matches(tmp_path):
  """A preemption notice reaching only process 1: jax's preemption sync picks one step, both
  processes save it and exit 0; rerunning both continues to the uninterrupted 2-process run's
  losses (bit for bit) and final step."""
  from test_train import losses

  steps = 40  # room for the sync point to fall well before the end
  values = dict(overrides("retromae", tmp_path), num_train_steps=steps,
                **{"checkpoint.every_steps": 100})  # checkpoints only when preempted, and at the end
  procs, outputs = run_two_processes("retromae", tmp_path / "reference", values, tmp_path)
  assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
  reference = losses(tmp_path / "reference")
  assert sorted(reference) == list(range(1, steps + 1))

  workdir = tmp_path / "preempted"
  procs, outputs = run_two_processes("retromae", workdir, values, tmp_path,
                                     until=(3, signal.SIGTERM, 1))
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  saved = saved_steps(workdir)
  stopped = max(losses(workdir))
  assert saved == [stopped] and 3 <= stopped < steps, (saved, stopped)
  assert f"preempted (SIGTERM): saved step {stopped}" in outputs[0]

  procs, outputs = run_two_processes("retromae", workdir, values, tmp_path)
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  resumed = losses(workdir)
  assert sorted(resumed) == list(range(1, steps + 1))
  assert [resumed[s] for s in range(1, steps + 1)] == [reference[s] for s in range(1, steps + 1)]
  saved = saved_steps(workdir)
  assert saved == [stopped, steps]


_MAX_OVER_PROCESSES = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
i = int(sys.argv[2])
jax.distributed.initialize(sys.argv[1], 2, i)
from bge_jax.contrastive import max_over_processes
print("agreed", max_over_processes({"query": 3 + i, "passage": 9 - 4 * i}, 2), flush=True)
"""


@pytest.mark.slow
def test_max_over_processes_takes_every_process_need(tmp_path):
  """Two processes with different packed-row needs both get the element-wise max (the
  all-gather `data.pack` sizes its rows with), in the order the sides were given."""
  address = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=str(REPO))
  procs = [subprocess.Popen([sys.executable, "-c", _MAX_OVER_PROCESSES, address, str(i)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    assert "agreed {'query': 4, 'passage': 9}" in out, out[-3000:]
