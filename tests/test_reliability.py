"""Reliability of the trainer: bit-exact resume after SIGKILL, SIGTERM preemption, unreadable
checkpoints, write errors, NaN/inf steps, and refusals of impossible configs.

The run-level tests drive launch/train.py in subprocesses (a SIGKILL needs a process) that share
one persistent XLA cache, so only the first run compiles. They compare against one uninterrupted
reference run: loss of every step and the final parameters must be identical bit for bit (CPU,
one thread per device, so XLA is deterministic).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO, make_corpus, make_tokenizer, saved_steps, wait_for_step

STEPS = 16
EVERY = 2  # checkpoint interval of the runs below


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("rel")
  return {"corpus": make_corpus(root / "train.jsonl", 128), "tok": make_tokenizer(root / "tok"),
          "cache": root / "xla_cache"}


def command(data, workdir, *extra):
  return [sys.executable, str(REPO / "launch" / "train.py"),
          f"--config={REPO / 'configs' / 'retromae.py'}:tiny", f"--workdir={workdir}",
          f"--config.tokenizer={data['tok']}", f"--config.data.train={data['corpus']}",
          "--config.data.max_length=32", "--config.model.max_position_embeddings=64",
          "--config.batch_size=8", f"--config.num_train_steps={STEPS}",
          f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.keep=50",
          "--config.log_every_steps=1", "--config.export=False", *extra]


def environment(data):
  return dict(os.environ, BGE_JAX_COMPILATION_CACHE=str(data["cache"]),
              XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false")


def run(data, workdir, *extra, check=True):
  done = subprocess.run(command(data, workdir, *extra), env=environment(data), capture_output=True,
                        text=True, timeout=900)
  if check:
    assert done.returncode == 0, done.stderr[-3000:]
  return done


def loss_rows(workdir):
  """(step, loss) for each row of metrics.jsonl, in file order (resume must leave each step once)."""
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x.strip()]
  return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def final_params(workdir, step=STEPS):
  """The parameters and optimizer state of checkpoint `step` as host numpy arrays."""
  import jax
  import orbax.checkpoint as ocp

  path = workdir / "checkpoints" / str(step) / "default"
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, restore_args=args)


def assert_bitwise_equal(a, b):
  import jax
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
  """The uninterrupted run: its loss rows and final state."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  run(data, workdir)
  rows = loss_rows(workdir)
  assert [s for s, _ in rows] == list(range(1, STEPS + 1))
  return {"workdir": workdir, "losses": rows, "state": final_params(workdir)}


def start_and_signal(data, workdir, at_step, sig):
  """Starts a run, sends `sig` once metrics.jsonl shows `at_step`; returns (returncode, output)."""
  log_path = workdir.parent / f"{workdir.name}.log"  # a file, not a pipe nobody drains mid-run
  log_file = open(log_path, "w")
  proc = subprocess.Popen(command(data, workdir), env=environment(data), stdout=log_file,
                          stderr=subprocess.STDOUT, text=True)
  try:
    wait_for_step(workdir, at_step, [proc])
    proc.send_signal(sig)
    proc.wait(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
    log_file.close()
  return proc.returncode, log_path.read_text()


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_is_bitwise(data, reference, tmp_path):
  """Three SIGKILLs at random steps (any phase: mid-step, mid-save), each then resumed by the same
  command: every step's loss and the final params/optimizer state equal the uninterrupted run's."""
  kill_steps = sorted(random.Random(7).sample(range(2, STEPS - 3), 3))
  for at in kill_steps:
    workdir = tmp_path / f"killed_at_{at}"
    code, _ = start_and_signal(data, workdir, at, signal.SIGKILL)
    assert code == -signal.SIGKILL
    saved = saved_steps(workdir)
    assert not saved or saved[-1] < STEPS, (at, saved)
    resumed = run(data, workdir)
    if saved:
      assert "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    assert loss_rows(workdir) == reference["losses"], f"killed at {at}, checkpoints {saved}"
    assert_bitwise_equal(final_params(workdir), reference["state"])


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_0(data, reference, tmp_path):
  workdir = tmp_path / "preempted"
  code, out = start_and_signal(data, workdir, 5, signal.SIGTERM)
  assert code == 0, out[-3000:]
  saved = saved_steps(workdir)
  stopped = loss_rows(workdir)[-1][0]
  assert saved[-1] == stopped and stopped < STEPS, (saved, stopped)
  assert f"preempted (SIGTERM): saved step {stopped}" in out
  assert not (workdir / "export").exists()
  run(data, workdir)
  assert loss_rows(workdir) == reference["losses"]
  assert_bitwise_equal(final_params(workdir), reference["state"])


@pytest.mark.slow
def test_corrupt_latest_checkpoint_warns_and_resumes_from_the_one_before(data, reference, tmp_path):
  """The reference run stopped at step 10 with step 10's files truncated: the rerun warns,
  resumes from 8, keeps step 8, moves step 10 aside (not deleted) and ends bit-identical."""
  workdir = tmp_path / "corrupt"
  shutil.copytree(reference["workdir"], workdir)
  for p in (workdir / "checkpoints").iterdir():
    if p.name.isdigit() and int(p.name) > 10:
      shutil.rmtree(p)
  rows = (workdir / "metrics.jsonl").read_text().splitlines()
  (workdir / "metrics.jsonl").write_text("\n".join(rows[:10]) + "\n")
  damaged = 0
  for root, _, files in os.walk(workdir / "checkpoints" / "10"):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      with open(path, "r+b") as f:
        f.truncate(size // 2)
      damaged += 1
  assert damaged
  done = run(data, workdir)
  assert "checkpoint step 10" in done.stderr and "cannot be restored" in done.stderr
  assert "resumed from" in done.stderr and "at step 8" in done.stderr
  assert (workdir / "checkpoints_unreadable" / "10").is_dir()
  assert (workdir / "checkpoints" / "8").is_dir()
  assert loss_rows(workdir) == reference["losses"]
  assert_bitwise_equal(final_params(workdir), reference["state"])


@pytest.mark.slow
def test_nonfinite_steps_stop_or_are_skipped(data, tmp_path):
  """lr=1e30 blows the weights up after a few steps. Default: stop with an error naming the fix,
  keeping only checkpoints of finite steps. skip_nonfinite_updates=True: the bad updates are
  dropped (counted in metrics); as every update after the blow-up is bad, the run stops once
  more than max_consecutive_nonfinite_steps (10) are skipped in a row, and with a limit above
  the run's steps it finishes with finite weights."""
  huge = ("--config.optimizer.lr=1e30", "--config.optimizer.warmup_steps=0",
          "--config.optimizer.clip_norm=0.0", "--config.checkpoint.every_steps=1")
  stop = run(data, tmp_path / "stop", *huge, check=False)
  assert stop.returncode == 1, stop.stderr[-3000:]
  assert "NaN/inf loss or gradient" in stop.stderr and "skip_nonfinite_updates" in stop.stderr
  assert "Traceback" not in stop.stderr
  rows = [json.loads(x) for x in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()]
  saved = saved_steps(tmp_path / "stop")
  assert rows and saved == [r["step"] for r in rows], (saved, rows)  # one per checked good step
  assert all(np.isfinite(r["loss"]) and r["nonfinite_steps"] == 0 for r in rows)
  bad_step = saved[-1] + 1

  ruined = run(data, tmp_path / "ruined", *huge, "--config.skip_nonfinite_updates=True",
               check=False)
  assert ruined.returncode == 1, ruined.stderr[-3000:]
  assert "config.max_consecutive_nonfinite_steps=10" in ruined.stderr
  assert "Traceback" not in ruined.stderr
  assert saved_steps(tmp_path / "ruined")[-1] <= bad_step + 10

  run(data, tmp_path / "skip", *huge, "--config.skip_nonfinite_updates=True",
      f"--config.max_consecutive_nonfinite_steps={STEPS}")
  rows = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  counts = [r["nonfinite_steps"] for r in rows]
  assert counts[bad_step - 2] == 0 and counts[-1] >= 1 and counts == sorted(counts)
  state = final_params(tmp_path / "skip")
  import jax
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


# ---------------------------------------------------------------------------------------------
# Fast tests: the step itself, write errors, refusals
# ---------------------------------------------------------------------------------------------

def test_skip_nonfinite_update_leaves_params_and_optimizer_bitwise():
  import jax
  import jax.numpy as jnp

  from bge_jax.train import state as state_lib

  tx, schedule = state_lib.make_optimizer(
      {"lr": 0.1, "warmup_steps": 0, "weight_decay": 0.01, "clip_norm": 1.0}, 10)

  def loss_fn(params, batch, rng):
    return {"loss": jnp.mean((params["w"] * batch["x"] + params["bias"]) ** 2)}

  params = {"w": jnp.arange(1.0, 5.0), "bias": jnp.full((4,), 0.5)}
  good = {"x": jnp.ones((2, 4))}
  bad = {"x": jnp.ones((2, 4)).at[1, 2].set(jnp.nan)}
  for skip in (True, False):
    step = jax.jit(state_lib.make_train_step(loss_fn, tx, schedule, skip_nonfinite=skip))
    s1, m1 = step(state_lib.init_state(params, tx), good, jax.random.key(0))
    assert int(m1["nonfinite_steps"]) == 0 and bool(jnp.isfinite(m1["loss"]))
    s2, m2 = step(s1, bad, jax.random.key(0))
    assert int(s2.step) == 2 and int(s2.nonfinite_steps) == int(m2["nonfinite_steps"]) == 1
    leaves1, leaves2 = jax.tree.leaves((s1.params, s1.opt_state)), jax.tree.leaves((s2.params, s2.opt_state))
    if skip:
      for a, b in zip(leaves1, leaves2):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
      s3, m3 = step(s2, good, jax.random.key(0))  # goes on from the kept state
      assert int(m3["nonfinite_steps"]) == 1 and np.isfinite(np.asarray(s3.params["w"])).all()
      assert not np.array_equal(np.asarray(s3.params["w"]), np.asarray(s2.params["w"]))
    else:
      assert not np.isfinite(np.asarray(s2.params["w"])).all()


def _tiny_state():
  import jax.numpy as jnp
  return {"w": jnp.ones((4, 4)), "step": jnp.zeros((), jnp.int32)}


def test_disk_full_while_saving_names_the_folder(tmp_path, monkeypatch):
  import errno

  import orbax.checkpoint as ocp

  from bge_jax.train import checkpoints

  manager = checkpoints.open_checkpoints(str(tmp_path / "ckpt"), 3)

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"checkpoint step 7 in .*ckpt: the disk is full"):
    checkpoints.save_checkpoint(manager, 7, _tiny_state())
  # Checked before each save too: less free space than the state's bytes (4x4 float32 + int).
  monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: SimpleNamespace(free=60))
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"ckpt: the disk is full .*a checkpoint takes"):
    checkpoints.save_checkpoint(manager, 8, _tiny_state())
  monkeypatch.undo()
  manager.close()
  # Not a write failure: the original error, unchanged.
  manager = checkpoints.open_checkpoints(str(tmp_path / "ckpt2"), 3)
  monkeypatch.setattr(ocp.CheckpointManager, "save",
                      lambda *a, **k: (_ for _ in ()).throw(KeyError("boom")))
  with pytest.raises(KeyError):
    checkpoints.save_checkpoint(manager, 1, _tiny_state())


def permissions_enforced(folder) -> bool:
  """False for root (os.geteuid() == 0) unless it runs without CAP_DAC_OVERRIDE, e.g. under
  `setpriv --inh-caps=-dac_override --bounding-set=-dac_override`: then it is tested too."""
  probe = folder / "probe"
  probe.mkdir()
  probe.chmod(0o500)
  try:
    (probe / "x").write_text("")
    return False
  except PermissionError:
    return True
  finally:
    probe.chmod(0o700)


def test_read_only_checkpoint_folder_is_a_clear_error(tmp_path):
  from bge_jax.train import checkpoints

  if not permissions_enforced(tmp_path):
    pytest.skip(f"uid {os.geteuid()} ignores file permissions (root)")

  # Up front, before any compile: the trainer's open_checkpoints probes the folder.
  ro = tmp_path / "run" / "checkpoints"
  ro.mkdir(parents=True)
  ro.chmod(0o500)
  try:
    with pytest.raises(checkpoints.CheckpointError, match=rf"{ro}: permission denied"):
      checkpoints.open_checkpoints(str(ro), 3)
    # While saving: the folder turns read-only after the manager opened it.
    ok = tmp_path / "ok"
    manager = checkpoints.open_checkpoints(str(ok), 3)
    ok.chmod(0o500)
    with pytest.raises(checkpoints.CheckpointError, match=r"ok: permission denied"):
      checkpoints.save_checkpoint(manager, 1, _tiny_state())
      checkpoints.finish_checkpoints(manager)
  finally:
    ro.chmod(0o700)
    if (tmp_path / "ok").exists():
      (tmp_path / "ok").chmod(0o700)


def tiny_config(data, **kw):
  from test_train import load_config, override
  c = load_config("retromae", "tiny")
  c.tokenizer, c.data.train = str(data["tok"]), str(data["corpus"])
  c.data.max_length, c.model.max_position_embeddings = 32, 64
  c.num_train_steps, c.export = 1, False
  return override(c, **kw)


@pytest.mark.parametrize("overrides, pattern", [
    ({"batch_size": 12}, r"config\.batch_size=12 must be divisible by mesh data x fsdp \(8\)"),
    ({"data.max_length": 128}, r"config\.data\.max_length=128 exceeds the model's "
                               r"max_position_embeddings=64; lower config\.data\.max_length"),
    ({"model.vocab_size": 20}, r"tokenizer has \d+ tokens but the model's vocab_size is 20: "
                               r"set config\.tokenizer"),
    ({"mesh.fsdp": 3}, r"mesh fsdp=3 x tensor=1 does not divide the 8 devices; set mesh\.fsdp"),
])
def test_impossible_configs_fail_fast_naming_the_key(data, tmp_path, overrides, pattern):
  from bge_jax.train.loop import train
  with pytest.raises(ValueError, match=pattern):
    train(tiny_config(data, **overrides), str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_unknown_config_key_lists_close_matches(data, tmp_path):
  done = subprocess.run(
      command(data, tmp_path / "w", "--config.optimizer.lrr=1", "--config.lr=3",
              "--config.checkpoint.every_step=5"),
      env=environment(data), capture_output=True, text=True, timeout=300)
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert "config.optimizer.lrr" in done.stderr and "did you mean config.optimizer.lr?" in done.stderr
  assert "no key config.lr; did you mean config.optimizer.lr?" in done.stderr
  assert "did you mean config.checkpoint.every_steps" in done.stderr
  assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------
# One run per workdir; a resume under another config; the command line's own errors.
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_on_a_live_workdir_exits_1_naming_the_holder(data, tmp_path):
  """A requeued job while the old one lives: the second run stops at once, before it touches
  metrics.jsonl or a checkpoint; the first trains on undisturbed."""
  workdir = tmp_path / "w"
  log_path = tmp_path / "first.log"
  with open(log_path, "w") as log_file:
    first = subprocess.Popen(command(data, workdir, "--config.num_train_steps=100000"),
                             env=environment(data), stdout=log_file, stderr=subprocess.STDOUT,
                             text=True)
    try:
      wait_for_step(workdir, 2, [first])
      second = run(data, workdir, "--config.num_train_steps=100000", check=False)
      assert second.returncode == 1, second.stderr[-2000:]
      assert f"is in use by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
      wait_for_step(workdir, len(_logged_steps(workdir)) + 2, [first])  # the first goes on
    finally:
      first.kill()
      first.wait(timeout=60)
  steps = _logged_steps(workdir)
  assert len(steps) >= 4 and steps == list(range(1, len(steps) + 1))  # one writer, each step once


def _logged_steps(workdir) -> list[int]:
  """The steps of metrics.jsonl's whole rows (a SIGKILL may leave the last one torn)."""
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(x)["step"] for x in lines if x.endswith("}")]


@pytest.mark.slow
def test_a_resume_under_a_changed_config_is_refused_unless_accepted(data, tmp_path):
  workdir = tmp_path / "w"
  done = run(data, workdir, "--config.num_train_steps=4")
  # The project's INFO lines stay; orbax's per-checkpoint INFO lines (through absl) do not.
  assert "initialised from" in done.stderr and "checkpoint_manager.py" not in done.stderr
  again = run(data, workdir, "--config.num_train_steps=4", "--config.optimizer.lr=0.5",
              "--config.log_every_steps=2", check=False)
  assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-2000:]
  assert "optimizer.lr 0.001 -> 0.5" in again.stderr and "--accept_config_changes" in again.stderr
  assert "log_every_steps" not in again.stderr.split("error:")[-1]  # changes no update
  accepted = run(data, workdir, "--config.num_train_steps=4", "--config.optimizer.lr=0.5",
                 "--accept_config_changes")
  assert "optimizer.lr" in accepted.stderr  # each accepted change is logged


def test_a_wrong_type_override_is_one_line_and_exit_2(data, tmp_path):
  done = run(data, tmp_path / "w", "--config.batch_size=abc", check=False)
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert "error: flag --config.batch_size=abc" in done.stderr
  assert not (tmp_path / "w").exists()
