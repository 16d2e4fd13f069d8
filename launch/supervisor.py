"""A parent process for each process of a multi-process run, so that a lost peer ends in one line.

When a process of a jax.distributed run dies, jax's coordination service tells the others, and
jax's C++ client aborts them (`LOG(FATAL)`: "Terminating process because the JAX distributed
service detected fatal errors", a C++ stack, SIGABRT). Python cannot intercept that abort: it
runs on a C++ thread, and the client's `missed_heartbeat_callback` cannot be replaced from Python
(a Python callback fails to receive its absl::Status argument, checked with jax 0.10). It
happens at once when the coordinator (process 0) dies, and after the heartbeat timeout
(`--heartbeat_timeout_s`, jax's default 100 s) when another process dies or hangs while this one
waits in a barrier (orbax's save barrier) or a collective that never fails (NCCL, ICI).

So `launch/train.py` runs the trainer as a child of a small supervisor when it starts a
multi-process run. The supervisor:

* passes the child's stdout through untouched and forwards its stderr as it comes (a pty when
  stderr is a terminal, so progress bars still draw);
* once jax's abort starts in that stream, writes the rest of it (and a Python traceback of the
  same failure that raced it) to `<workdir>/lost-peer.process<I>.log` instead of the terminal,
  and when the child is gone prints one `error:` line saying what happened, where the
  checkpoints are and that restarting every process resumes; exit status 1;
* forwards SIGTERM / SIGINT / SIGHUP to the child (preemption notices keep working), and kills
  the child if the supervisor itself is killed (Linux: PR_SET_PDEATHSIG), so that killing a
  process of the run still stops its trainer;
* otherwise exits with the child's status.

A traceback is held back from the terminal for at most `HOLD_S` seconds, the time a lost peer's
abort takes to follow the Python error it raced; a traceback not followed by jax's abort is
forwarded whole (late by at most that long).
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import time
from typing import Sequence

# The child's environment marker: a supervised trainer does not supervise itself.
ENV_MARKER = "BGE_JAX_SUPERVISED"
HOLD_S = 10.0
# Lines that start jax's abort of a process whose peer is lost (jax 0.10's C++ client).
ABORT_MARKERS = (b"Polled an error from coordination service",
                 b"Use error polling to propagate the following error to all tasks",
                 b"Failed to retrieve preemption notice from coordination service",
                 b"Terminating process because the JAX distributed service detected fatal errors",
                 b"*** SIGABRT received")
TRACEBACK = b"Traceback (most recent call last):"
_UNHEALTHY = re.compile(rb"tasks are unhealthy \(stopped sending heartbeats\):\s*([\d,\s]+)")
_GRPC = re.compile(rb"PollForError[^\n]*\n[^\n]*grpc_message:\"([^\"]+)\"")


class _Stream:
  """The child's stderr as it arrives: forwarded, held (a traceback) or diverted (jax's abort)."""

  def __init__(self, out_fd: int, log_path: str):
    self.out_fd = out_fd
    self.log_path = log_path
    self.held = b""           # a traceback not yet forwarded
    self.held_since = 0.0
    self.diverted = b""       # jax's abort and what followed it
    self.aborting = False
    self.tail = b""           # the last bytes seen, to find markers split across reads
    self.shown_error = False  # an `error:` line of the trainer already reached the terminal
    self.at_line_start = True  # the terminal's last byte ended a line

  def feed(self, data: bytes) -> None:
    window = self.tail + data
    self.tail = window[-256:]
    if self.aborting:
      self.diverted += data
      return
    if any(m in window for m in ABORT_MARKERS):
      self.aborting = True
      # What precedes the marker's line in this read is ordinary output, unless a traceback is
      # being held (then it is the traceback that raced jax's abort).
      at = min((i for i in (data.find(m) for m in ABORT_MARKERS) if i >= 0), default=0)
      start = data.rfind(b"\n", 0, at) + 1
      if not self.held:
        self._write(data[:start])
        data = data[start:]
      self.diverted += self.held + data
      self.held = b""
      return
    if self.held:
      self.held += data
      return
    at = data.find(TRACEBACK)
    if at < 0:
      self._write(data)
      return
    self._write(data[:at])
    self.held, self.held_since = data[at:], time.monotonic()

  def tick(self) -> None:
    """Forwards a held traceback that jax's abort did not follow in time."""
    if self.held and time.monotonic() - self.held_since > HOLD_S:
      self._write(self.held)
      self.held = b""

  def finish(self) -> None:
    if self.held:
      self._write(self.held)
      self.held = b""
    if self.diverted:
      try:
        with open(self.log_path, "ab") as f:
          f.write(self.diverted)
      except OSError:
        self.log_path = ""

  def child_error_lines(self) -> list[bytes]:
    """The trainer's own `error:` lines that jax's abort pushed into the diverted output (the
    trainer saw the lost peer too, and said so, just after jax's client did)."""
    return re.findall(rb"(?m)^error: [^\n]*\n?", self.diverted)

  def cause(self, process_count: int | None) -> str:
    """What jax's coordination service said, in the run's terms."""
    m = _UNHEALTHY.search(self.diverted)
    if m:
      ids = [int(t) for t in re.split(rb"[,\s]+", m.group(1).strip()) if t]
      which = ", ".join(str(i) for i in ids)
      return (f"process{'es' if len(ids) > 1 else ''} {which} stopped sending heartbeats (dead "
              "or hung for longer than --heartbeat_timeout_s)")
    m = _GRPC.search(self.diverted)
    if m:
      return ("the coordinator, process 0, is unreachable: "
              f"{m.group(1).decode('utf-8', 'replace')}")
    size = f"{process_count}-process " if process_count else "multi-process "
    return f"another process of this {size}run failed, says jax's coordination service"

  def _write(self, data: bytes) -> None:
    if re.search(rb"(?m)^error: ", data):
      self.shown_error = True
    if data:
      self.at_line_start = data.endswith(b"\n")
    while data:
      try:
        data = data[os.write(self.out_fd, data):]
      except BlockingIOError:
        select.select([], [self.out_fd], [])
      except OSError:  # our stderr is gone (a closed terminal): nothing to show it on
        return


def _die_with(parent: int):
  """A preexec_fn for the child: SIGKILL when the supervisor (pid `parent`) dies (Linux)."""

  def set_death_signal() -> None:
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
      return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
      os._exit(1)

  return set_death_signal


def supervise(command: Sequence[str], *, workdir: str, process_index: int | None,
              process_count: int | None) -> int:
  """Runs `command` (the trainer) as a supervised child; returns the exit status to use."""
  name = f"process{process_index}" if process_index is not None else f"pid{os.getpid()}"
  log_path = os.path.join(workdir, f"lost-peer.{name}.log")
  err_fd = sys.stderr.fileno()
  sys.stdout.flush()
  sys.stderr.flush()
  tty = os.isatty(err_fd)
  if tty:
    import fcntl
    import pty
    import termios
    read_fd, child_err = pty.openpty()
    try:  # the terminal's size (progress bars' widths); bytes as written (our tty adds the \r)
      fcntl.ioctl(child_err, termios.TIOCSWINSZ, fcntl.ioctl(err_fd, termios.TIOCGWINSZ, b"\0" * 8))
      attrs = termios.tcgetattr(child_err)
      attrs[1] &= ~termios.ONLCR
      termios.tcsetattr(child_err, termios.TCSANOW, attrs)
    except (OSError, termios.error):
      pass
  else:
    read_fd, child_err = os.pipe()
  env = dict(os.environ, **{ENV_MARKER: "1"})
  child = subprocess.Popen(list(command), env=env, stderr=child_err, start_new_session=True,
                           preexec_fn=_die_with(os.getpid()) if sys.platform == "linux" else None)
  os.close(child_err)

  def forward(signum, _frame):
    if child.poll() is None:
      child.send_signal(signum)

  for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, forward)
  stream = _Stream(err_fd, log_path)
  while True:
    try:
      ready, _, _ = select.select([read_fd], [], [], 1.0)
    except InterruptedError:
      continue
    if ready:
      try:
        data = os.read(read_fd, 65536)
      except OSError:  # a pty's EIO once the child is gone
        data = b""
      if not data:
        break
      stream.feed(data)
    stream.tick()
  os.close(read_fd)
  rc = child.wait()
  stream.finish()
  if not stream.aborting:
    return rc if rc >= 0 else 128 - rc
  own = stream.child_error_lines()
  if stream.shown_error:
    return 1
  if not stream.at_line_start:  # e.g. a progress bar's line
    stream._write(b"\n")
  if own:  # the trainer said what happened as jax aborted it: its line names the lost process
    stream._write(own[0] if own[0].endswith(b"\n") else own[0] + b"\n")
    return 1
  who = f"process {process_index}" if process_index is not None else "this process"
  where = f" (jax's output: {stream.log_path})" if stream.log_path else ""
  print(f"error: jax stopped {who}: {stream.cause(process_count)}{where}. The checkpoints "
        f"saved so far are kept in {os.path.join(workdir, 'checkpoints')}: restart every "
        "process with the same command to resume.", file=sys.stderr, flush=True)
  return 1
