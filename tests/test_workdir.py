"""One run per workdir (the flock on <workdir>/.lock) and the config check before a resume.

Without the lock, nothing in loop.train stops a second run on a live run's workdir: both open
the same checkpoints, the second restores the newest step and truncates metrics.jsonl after it
(metrics.drop_metrics_after), and both go on saving the same step numbers. The lock tests use a
holder in another process: flock belongs to an open file, and the OS releases it when that
process dies, which is what a SIGKILLed run must look like.
"""

import json
import logging
import os
import signal
import subprocess
import sys

import pytest

from bge_jax import config_files
from bge_jax.train import workdir as workdir_lib
from bge_jax.train.init import ConfigError
from bge_jax.train.workdir import WorkdirBusy
from conftest import REPO

HOLDER = """
import sys
from bge_jax.train import workdir
with workdir.lock(sys.argv[1]):
  print("locked", flush=True)
  sys.stdin.read()  # held until the test closes stdin (or kills this process)
"""


@pytest.fixture
def holder(tmp_path):
  """A process on another pid holding tmp_path's lock."""
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "locked"
    yield proc
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()


def test_second_lock_in_another_process_fails_naming_the_holder(tmp_path, holder):
  with pytest.raises(WorkdirBusy) as e:
    with workdir_lib.lock(str(tmp_path)):
      pytest.fail("took a lock another process holds")
  message = str(e.value)
  assert f"pid {holder.pid} on host" in message
  assert f"kill {holder.pid}" in message and "another --workdir" in message
  assert "workdir.lock(sys.argv[1])" not in message  # the command line, not the script's text
  assert sys.executable in message


def test_other_processes_of_a_run_do_not_lock(tmp_path, holder):
  with workdir_lib.lock(str(tmp_path), process_index=1) as path:
    assert path is None


def test_lock_taken_over_after_the_holder_is_sigkilled(tmp_path, holder):
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with workdir_lib.lock(str(tmp_path)) as path:
    with open(path) as f:
      assert json.load(f)["pid"] == os.getpid()


def test_lock_released_on_normal_exit_and_on_exception(tmp_path):
  with workdir_lib.lock(str(tmp_path)) as path:
    with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):  # another open file: refused
      with workdir_lib.lock(str(tmp_path)):
        pass
  assert open(path).read() == ""  # emptied, kept (see lock's docstring)
  with pytest.raises(KeyError):
    with workdir_lib.lock(str(tmp_path)):
      raise KeyError("the run failed")
  # Another process takes it now and releases it when it exits normally.
  done = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, input="",
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0 and done.stdout.strip() == "locked", done.stderr
  with workdir_lib.lock(str(tmp_path)):
    pass


def test_lock_creates_the_workdir(tmp_path):
  with workdir_lib.lock(str(tmp_path / "new" / "run")) as path:
    assert os.path.exists(path)


# ---------------------------------------------------------------------------------------------
# check_resume_config
# ---------------------------------------------------------------------------------------------

def tiny_config():
  return config_files.load(f"{REPO / 'configs' / 'finetune.py'}:tiny")


def record(workdir, config):
  """config.json as run_info.write_run_info writes it at a start."""
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def test_changed_lr_refused_naming_both_values(tmp_path):
  old = tiny_config()
  old.optimizer.lr = 1e-3  # stages 2-3 leave it unset (picked by the model's size at the start)
  record(tmp_path, old)
  new = tiny_config()
  new.optimizer.lr = old.optimizer.lr / 2
  new.seed = 7
  with pytest.raises(ConfigError) as e:
    workdir_lib.check_resume_config(str(tmp_path), new, accept_changes=False)
  message = str(e.value)
  lrs = f"{json.dumps(old.optimizer.lr)} -> {json.dumps(old.optimizer.lr / 2)}"
  assert f"optimizer.lr {lrs}" in message
  assert "seed 0 -> 7" in message
  assert "--accept_config_changes" in message and "new --workdir" in message


def test_changes_that_leave_the_run_the_same_are_accepted(tmp_path, caplog):
  record(tmp_path, tiny_config())
  new = tiny_config()
  new.log_every_steps = 1
  new.checkpoint.every_steps = 3
  new.checkpoint.keep = 9
  new.eval.every_steps = 5
  new.export = False
  new.data.prefetch = 8
  new.peak_tflops = 989.0
  new.mesh.fsdp = 2
  new.model.init_from = "/moved/model"
  new.tokenizer = "/moved/tokenizer"
  with caplog.at_level(logging.INFO, logger="bge_jax.train"):
    assert workdir_lib.check_resume_config(str(tmp_path), new, accept_changes=False) == []
  assert "log_every_steps" in caplog.text and "model.init_from" in caplog.text
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_accept_flag_accepts_and_logs_each_change(tmp_path, caplog):
  record(tmp_path, tiny_config())
  new = tiny_config()
  new.optimizer.lr = 5e-4
  new.batch_size = 32
  new.log_every_steps = 1
  with caplog.at_level(logging.INFO, logger="bge_jax.train"):
    accepted = workdir_lib.check_resume_config(str(tmp_path), new, accept_changes=True)
  assert [a.split()[0] for a in accepted] == ["batch_size", "optimizer.lr"]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 2
  assert any("batch_size 16 -> 32" in w and "--accept_config_changes" in w for w in warnings)
  assert any("optimizer.lr" in w and "-> 0.0005" in w for w in warnings)


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]"])
def test_missing_or_unreadable_config_json_accepted_with_a_warning(tmp_path, caplog, content):
  if content is not None:
    (tmp_path / "config.json").write_text(content)
  new = tiny_config()
  new.optimizer.lr = 5e-4
  with caplog.at_level(logging.WARNING, logger="bge_jax.train"):
    assert workdir_lib.check_resume_config(str(tmp_path), new, accept_changes=False) == []
  assert "cannot read the config the run" in caplog.text and str(tmp_path) in caplog.text


def test_values_json_writes_differently_compare_equal(tmp_path):
  old = tiny_config()
  old.optimizer.lr = 1e-3
  old.num_epochs = 5.0
  old.data.shape = (1, 2)  # a tuple is recorded as a list
  text = old.to_json_best_effort(indent=2)
  # Written by another tool or by hand: 1e-3 spelt as such, 5.0 as the int 5.
  text = text.replace('"lr": 0.001', '"lr": 1e-3').replace('"num_epochs": 5.0', '"num_epochs": 5')
  assert '"lr": 1e-3' in text and '"num_epochs": 5,' in text
  (tmp_path / "config.json").write_text(text)
  new = tiny_config()
  new.optimizer.lr = 0.001
  new.num_epochs = 5
  new.data.shape = (1, 2)
  assert workdir_lib.check_resume_config(str(tmp_path), new, accept_changes=False) == []
  # A bool is not a number: 1 -> true is a change.
  (tmp_path / "config.json").write_text(text.replace('"dropout": true', '"dropout": 1'))
  with pytest.raises(ConfigError, match="dropout 1 -> true"):
    workdir_lib.check_resume_config(str(tmp_path), new, accept_changes=False)


def test_extending_a_run_is_refused_only_when_the_lr_schedule_depends_on_its_length(tmp_path):
  old = tiny_config()
  old.num_train_steps = 100
  record(tmp_path, old)
  longer = tiny_config()
  longer.num_train_steps = 200  # linear decay over the total: the lr of every step changes
  with pytest.raises(ConfigError, match=r"num_train_steps 100 -> 200 \(changes the lr schedule\)"):
    workdir_lib.check_resume_config(str(tmp_path), longer, accept_changes=False)
  longer.num_epochs = 3.0  # under num_train_steps > 0: no effect, not named
  with pytest.raises(ConfigError) as e:
    workdir_lib.check_resume_config(str(tmp_path), longer, accept_changes=False)
  assert "num_epochs" not in str(e.value)

  old.optimizer.schedule = "constant"
  old.optimizer.warmup_steps = 10
  record(tmp_path, old)
  longer.optimizer.schedule = "constant"
  longer.optimizer.warmup_steps = 10
  assert workdir_lib.check_resume_config(str(tmp_path), longer, accept_changes=False) == []


def test_keys_of_another_bge_jax_version_are_not_refused(tmp_path):
  old = tiny_config()
  old.retired_key = 1
  record(tmp_path, old)
  new = tiny_config()
  new.added_key = "x"
  assert workdir_lib.check_resume_config(str(tmp_path), new, accept_changes=False) == []
