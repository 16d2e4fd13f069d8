"""Per-device memory of a compiled step: one estimate for the trainer and every benchmark.

XLA's memory analysis of a compiled program gives, per device, the bytes of its arguments, its
outputs, the outputs that reuse a donated argument's buffer (aliases), its temporaries and its
generated code. While the program runs, all of these are live at once, so

  peak = arguments + outputs - aliases + temporaries + generated code.

For a train step with the state donated, the outputs are the new state written over the old one,
so the peak is about the state, the batch and the temporaries. The limit it is checked against is
the device's `bytes_limit` (GPU, TPU); CPU reports none.

Imports only jax, so `launch/gpu_bench.py` can use it on a bare CUDA JAX image.
"""

from __future__ import annotations

import logging
from typing import Any

import jax

FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes", "generated_code_size_in_bytes")


def analysis(compiled: Any) -> dict[str, int] | None:
  """`compiled.memory_analysis()` as {field: bytes per device}, or None where the backend has
  none."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return {k: int(getattr(m, k, 0) or 0) for k in FIELDS}


def peak_bytes(compiled_or_analysis: Any) -> int | None:
  """The bytes per device a compiled program needs while it runs (module docstring), from the
  program or from its `analysis` dict; None where the backend reports no analysis."""
  m = compiled_or_analysis
  if m is not None and not isinstance(m, dict):
    m = analysis(m)
  if m is None:
    return None
  return (m["argument_size_in_bytes"] + m["output_size_in_bytes"] - m["alias_size_in_bytes"]
          + m["temp_size_in_bytes"] + m["generated_code_size_in_bytes"])


def device_limit(device: jax.Device | None = None) -> int | None:
  """The bytes a program may use on `device` (default: the first local one), or None where the
  backend does not say (CPU)."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  (backends without the call raise rather than return None)
    return None
  limit = (stats or {}).get("bytes_limit")
  return int(limit) if limit else None


def describe(n: int | None) -> str:
  """Bytes for a message: GiB from 1 GiB, MiB below."""
  if n is None:
    return "n/a"
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_fits(compiled: Any, what: str, fixes: str, log: logging.Logger, note: str = "") -> None:
  """Refuses a compiled program that needs more memory per device than the device has (GPU, TPU;
  CPU reports no limit), before it runs out of memory with XLA's allocator error: a MemoryError
  naming `what` (e.g. "the train step"), both sizes and `fixes` (the config keys that shrink it,
  a clause after "To fit it, "), then `note`. Warns on `log` when it needs more than 95% of the
  limit (the prefetched batches and the allocator's fragmentation come on top). The trainer's
  train steps and eval step are checked with it."""
  need, limit = peak_bytes(compiled), device_limit()
  if need is None or limit is None or need <= 0.95 * limit:
    return
  sizes = (f"{what} needs {describe(need)} per device (XLA's memory analysis: arguments + "
           f"outputs - donated buffers + temporaries) of the device's {describe(limit)}")
  if need <= limit:
    log.warning("%s: close to the limit, it may run out of memory; if it does, %s.", sizes,
                fixes)
    return
  raise MemoryError(f"{sizes}: it cannot run. To fit it, {fixes}.{note}")
