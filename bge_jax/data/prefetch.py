"""Host batches ahead of the device: a background thread keeps `depth` batches ready."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

log = logging.getLogger("bge_jax.train")  # the trainer's logger: the trainer runs it


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
