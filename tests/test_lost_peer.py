"""A lost peer in a multi-process run: the survivor says, in one line, that another process
stopped and that rerunning every process resumes, and exits 1 (no traceback, no C++ abort stack
from jax's coordination service, which launch/supervisor.py diverts to a log file).

Three ways a peer is lost, each reaching the survivor by another path:
* process 1 is SIGKILLed: the survivor's step collective fails (gloo: a reset connection) and
  the trainer itself prints the line (launch/train.py);
* process 0, the coordinator, is SIGKILLed: jax's C++ client aborts the survivor at once;
* process 1 stops responding (SIGSTOP): nothing fails until the coordination service's heartbeat
  timeout (`--heartbeat_timeout_s`), then jax aborts the survivor, as it would one waiting in
  orbax's save barrier or in a collective that hangs (NCCL).
In the last two the supervisor prints the line.
"""

import os
import signal
import subprocess
import time

import pytest

from conftest import make_corpus, make_tokenizer, wait_for_step
from test_multihost import free_port, start_processes

# The bound leaves room for a slow, busy CI machine; it stays well under jax's default 100 s
# heartbeat timeout, which the first two cases must not wait for.
EXIT_WITHIN_S = 45
HEARTBEAT_S = 10
FORBIDDEN = ("Traceback", "SIGABRT", "Fatal Python error", "*** Begin stack trace",
             "Check failure stack trace", "Terminating process")


def _trainer_pid(supervisor_pid: int) -> int:
  """The trainer process the supervisor of a process started (its only child)."""
  deadline = time.time() + 30
  while time.time() < deadline:
    with open(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children") as f:
      children = f.read().split()
    if children:
      return int(children[0])
    time.sleep(0.1)
  raise AssertionError("the supervisor started no trainer")


def _lose_a_peer(tmp_path, lost: int, how: signal.Signals, extra_flags=()):
  """Starts a 2-process stage-1 run, makes process `lost` go away with `how` at step 3, and
  returns (survivor's exit status, seconds it took after the signal, its output, workdir)."""
  workdir = tmp_path / "run"
  port = free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                                   "--xla_cpu_multi_thread_eigen=false",
             BGE_JAX_COMPILATION_CACHE=str(tmp_path / "xla_cache"))
  values = {"tokenizer": make_tokenizer(tmp_path / "tok"),
            "data.train": make_corpus(tmp_path / "train.jsonl", 128), "data.max_length": 32,
            "model.max_position_embeddings": 64, "batch_size": 8,
            "num_train_steps": 100000, "checkpoint.every_steps": 100000, "log_every_steps": 1,
            "export": False}
  logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
  procs = start_processes("retromae", workdir, values, env, logs, port, list(extra_flags))
  survivor = procs[1 - lost]
  stopped = None
  try:
    wait_for_step(workdir, 3, procs)
    if how == signal.SIGSTOP:  # the trainer itself: its supervisor would forward nothing
      stopped = _trainer_pid(procs[lost].pid)
      os.kill(stopped, signal.SIGSTOP)
    else:
      procs[lost].send_signal(how)
    start = time.monotonic()
    try:
      survivor.wait(timeout=EXIT_WITHIN_S + (HEARTBEAT_S if how == signal.SIGSTOP else 0))
    except subprocess.TimeoutExpired:
      pass
    waited = time.monotonic() - start
  finally:
    if stopped is not None:
      os.kill(stopped, signal.SIGKILL)
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  f = logs[1 - lost]
  f.seek(0)
  out = f.read()
  for f in logs:
    f.close()
  return survivor.returncode, waited, out, workdir


def _check_one_line(rc, waited, out, limit_s, *phrases):
  assert rc == 1, f"exit {rc} after {waited:.0f} s:\n{out[-4000:]}"
  assert waited < limit_s, f"{waited:.0f} s:\n{out[-4000:]}"
  lines = [x for x in out.splitlines() if x.startswith("error:")]
  assert len(lines) == 1, out[-4000:]
  for phrase in phrases:
    assert phrase in lines[0], lines[0]
  for bad in FORBIDDEN:
    assert bad not in out, f"{bad!r} in:\n{out[-4000:]}"
  return lines[0]


@pytest.mark.slow
def test_survivor_of_a_killed_process_exits_1_with_one_line(tmp_path):
  rc, waited, out, workdir = _lose_a_peer(tmp_path, lost=1, how=signal.SIGKILL)
  _check_one_line(rc, waited, out, EXIT_WITHIN_S, "process 1 of this 2-process run stopped",
                  "restart every process with the same command to resume",
                  str(workdir / "checkpoints"))


@pytest.mark.slow
def test_survivor_of_a_killed_coordinator_exits_1_with_one_line(tmp_path):
  rc, waited, out, workdir = _lose_a_peer(tmp_path, lost=0, how=signal.SIGKILL)
  line = _check_one_line(rc, waited, out, EXIT_WITHIN_S,
                         "restart every process with the same command to resume",
                         str(workdir / "checkpoints"))
  # jax's own account of the abort is kept, not shown.
  if "lost-peer" in line:
    log = workdir / "lost-peer.process1.log"
    assert log.exists() and "coordination service" in log.read_text()


@pytest.mark.slow
def test_survivor_of_a_hung_process_exits_1_after_the_heartbeat_timeout(tmp_path):
  rc, waited, out, workdir = _lose_a_peer(tmp_path, lost=1, how=signal.SIGSTOP,
                                          extra_flags=[f"--heartbeat_timeout_s={HEARTBEAT_S}"])
  line = _check_one_line(rc, waited, out, EXIT_WITHIN_S + HEARTBEAT_S,
                         "jax stopped process 0: process 1 stopped sending heartbeats",
                         "restart every process with the same command to resume",
                         str(workdir / "lost-peer.process0.log"))
  assert waited > HEARTBEAT_S * 0.5, line  # it was the heartbeat that ended it
  assert "Terminating process" in (workdir / "lost-peer.process0.log").read_text()


# The supervisor's stream handling, on bytes as jax 0.10 writes them (no processes).

def _stream(tmp_path):
  from launch.supervisor import _Stream

  out = open(tmp_path / "terminal", "wb+")
  return _Stream(out.fileno(), str(tmp_path / "jax.log")), out


def _shown(out) -> bytes:
  out.seek(0)
  return out.read()


ABORT = (b"E1205 coordination_service_agent.cc:289] Polled an error from coordination service "
         b"(this can be an error from this or another task).\nF1205 client.h:80] Terminating "
         b"process because the JAX distributed service detected fatal errors.\nAdditional GRPC "
         b"error information from remote target coordination_service while calling "
         b"/xla.coordination.CoordinationService/PollForError:\n:UNKNOWN:Error received from peer"
         b"  {grpc_message:\"Socket closed\", grpc_status:14}\n*** Check failure stack trace: ***\n")


def test_supervisor_diverts_the_abort_and_the_traceback_it_raced(tmp_path):
  stream, out = _stream(tmp_path)
  stream.feed(b"train: 3/10 [loss=1.0]\rtrain: 4/10")
  stream.feed(b"\nTraceback (most recent call last):\n  File \"x.py\", line 1\n")
  stream.feed(ABORT[:40])  # a marker split across two reads
  stream.feed(ABORT[40:])
  stream.finish()
  assert _shown(out) == b"train: 3/10 [loss=1.0]\rtrain: 4/10\n"
  kept = (tmp_path / "jax.log").read_bytes()
  assert kept.startswith(b"Traceback") and b"Check failure stack trace" in kept
  assert stream.aborting and stream.cause(2) == (
      "the coordinator, process 0, is unreachable: Socket closed")


def test_supervisor_forwards_a_traceback_jax_did_not_follow(tmp_path, monkeypatch):
  import launch.supervisor as supervisor

  stream, out = _stream(tmp_path)
  stream.feed(b"Traceback (most recent call last):\nValueError: a real bug\n")
  assert _shown(out) == b""  # held: jax's abort may follow it
  monkeypatch.setattr(supervisor, "HOLD_S", 0.0)
  time.sleep(0.01)
  stream.tick()
  assert _shown(out) == b"Traceback (most recent call last):\nValueError: a real bug\n"
  stream.feed(b"more\n")
  stream.finish()
  assert _shown(out).endswith(b"more\n") and not stream.aborting


def test_supervisor_shows_the_trainers_own_line_once(tmp_path):
  stream, out = _stream(tmp_path)
  stream.feed(ABORT + b"error: process 0 of this 2-process run stopped (...); restart\n")
  stream.finish()
  assert stream.child_error_lines() == [b"error: process 0 of this 2-process run stopped (...); "
                                        b"restart\n"]
  stream, out = _stream(tmp_path)
  stream.feed(b"error: process 1 of this 2-process run stopped\n")
  stream.feed(ABORT)
  stream.finish()
  assert stream.shown_error and _shown(out) == b"error: process 1 of this 2-process run stopped\n"


_SUPERVISED = r'''
import sys
sys.path.insert(0, {repo!r})
from launch.supervisor import supervise
sys.exit(supervise([sys.executable, "-c", {child!r}], workdir={workdir!r}, process_index=1,
                   process_count=2))
'''


def _run_supervised(tmp_path, child: str) -> tuple[int, bytes]:
  """supervise(child) in a process whose stderr and stdout are a 123-column pseudo-terminal:
  (exit status, what the terminal showed)."""
  import fcntl
  import pathlib
  import pty
  import struct
  import sys
  import termios

  code = _SUPERVISED.format(repo=str(pathlib.Path(__file__).parents[1]), child=child,
                            workdir=str(tmp_path))
  pid, fd = pty.fork()
  if pid == 0:  # pragma: no cover (the child)
    fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 123, 0, 0))
    os.execv(sys.executable, [sys.executable, "-c", code])
  shown = b""
  while True:
    try:
      data = os.read(fd, 65536)
    except OSError:  # EIO: the other side closed
      break
    if not data:
      break
    shown += data
  _, status = os.waitpid(pid, 0)
  return os.waitstatus_to_exitcode(status), shown


def test_supervisor_passes_status_and_terminal_through(tmp_path):
  rc, shown = _run_supervised(
      tmp_path, "import os, sys; sys.stderr.write('cols=%d\\n' % os.get_terminal_size(2).columns)"
                "; sys.exit(3)")
  assert rc == 3 and shown == b"cols=123\r\n", shown  # one \r: the terminal's, not a second pty's


def test_supervisor_turns_jax_abort_into_one_line(tmp_path):
  child = ("import os, signal, sys; sys.stderr.buffer.write(b'step 3\\n' + %r); "
           "sys.stderr.flush(); os.kill(os.getpid(), signal.SIGABRT)" % ABORT)
  rc, shown = _run_supervised(tmp_path, child)
  lines = shown.decode().splitlines()
  assert rc == 1 and lines[0] == "step 3", shown
  assert len(lines) == 2 and lines[1].startswith("error: jax stopped process 1: the coordinator, "
                                                  "process 0, is unreachable: Socket closed"), shown
  assert "restart every process with the same command to resume" in lines[1]
  assert (tmp_path / "lost-peer.process1.log").read_bytes() == ABORT


def test_which_commands_run_supervised(monkeypatch):
  """Multi-process commands run under the supervisor; single-process ones, --nosupervise, --help
  and the supervised trainer itself (its environment marker) do not."""
  import launch.train as train_cli
  from launch import supervisor

  monkeypatch.delenv(supervisor.ENV_MARKER, raising=False)
  monkeypatch.setattr(train_cli, "_cluster_detected", lambda: None)
  multi = ["--config", "configs/retromae.py:tiny", "--workdir", "runs/x",
           "--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id", "1"]
  assert train_cli._supervised_command(multi) == ("runs/x", 1, 2)
  assert train_cli._supervised_command(multi + ["--nosupervise"]) is None
  assert train_cli._supervised_command(multi + ["--helpfull"]) is None
  assert train_cli._supervised_command(["--workdir=runs/x", "--config=c.py"]) is None
  assert train_cli._supervised_command(["--workdir=runs/x", "--distributed=on"]) == (
      "runs/x", None, None)
  monkeypatch.setattr(train_cli, "_cluster_detected", lambda: "SLURM")
  assert train_cli._supervised_command(["--workdir=runs/x"]) == ("runs/x", None, None)
  assert train_cli._supervised_command(["--workdir=runs/x", "--distributed=off"]) is None
  monkeypatch.setenv(supervisor.ENV_MARKER, "1")
  assert train_cli._supervised_command(multi) is None
