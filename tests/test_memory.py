"""bge_jax.memory: the per-device bytes of a compiled step, and the device limit it must fit."""

import types

import jax
import jax.numpy as jnp
import numpy as np

from bge_jax import memory


def test_peak_counts_a_donated_output_once():
  """x -> (2x, x.sum()) on 1,000 float32: 4,000 bytes in, at least 4,004 out (plus the output
  tuple's table). Donating x lets 2x reuse its buffer, which saves exactly those 4,000 bytes."""
  x = np.ones(1000, np.float32)
  f = lambda a: (a * 2, a.sum())
  kept = jax.jit(f).lower(x).compile()
  donated = jax.jit(f, donate_argnums=0).lower(x).compile()
  a, b = memory.analysis(kept), memory.analysis(donated)
  assert a["argument_size_in_bytes"] == b["argument_size_in_bytes"] == 4000
  assert a["output_size_in_bytes"] == b["output_size_in_bytes"] >= 4004
  assert a["alias_size_in_bytes"] == 0 and b["alias_size_in_bytes"] == 4000
  out = a["output_size_in_bytes"]
  assert memory.peak_bytes(kept) == 4000 + out + a["temp_size_in_bytes"]
  assert memory.peak_bytes(donated) == out + b["temp_size_in_bytes"]
  assert memory.peak_bytes(b) == memory.peak_bytes(donated)  # the dict or the program
  assert memory.peak_bytes(None) is None


def test_peak_includes_the_temporaries():
  """A chain whose intermediate outlives no output still needs its buffer while it runs."""
  x = jnp.ones((256, 256), jnp.float32)
  compiled = jax.jit(lambda a: (jnp.sin(a) @ jnp.cos(a)).sum()).lower(x).compile()
  m = memory.analysis(compiled)
  assert m["temp_size_in_bytes"] >= 256 * 256 * 4  # at least one [256, 256] intermediate
  assert memory.peak_bytes(compiled) >= 256 * 256 * 4 * 2


def test_device_limit_reads_the_devices_bytes_limit():
  device = lambda stats: types.SimpleNamespace(memory_stats=lambda: stats)
  assert memory.device_limit(device({"bytes_limit": 12345, "bytes_in_use": 7})) == 12345
  # No limit reported (CPU: memory_stats() is None, or the call is missing): nothing to check.
  assert memory.device_limit(device(None)) is None
  assert memory.device_limit(device({"bytes_in_use": 7})) is None
  assert memory.device_limit(types.SimpleNamespace(memory_stats=lambda: 1 / 0)) is None
  assert memory.device_limit() is None  # this CPU
  assert memory.describe(3 * 2**29) == "1.50 GiB" and memory.describe(3 * 2**19) == "1.5 MiB"
