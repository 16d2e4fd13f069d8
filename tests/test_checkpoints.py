"""Checked restores (fingerprints, NaN/inf) and a checkpoints folder removed mid-run."""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bge_jax.train import checkpoints


def _state(seed: int, scale: float = 1.0):
  # Random values: the data files stay about as large as the arrays, so flipped bytes in their
  # middle decode to other numbers rather than failing to decompress.
  return {"params": {"w": jax.random.normal(jax.random.key(seed), (64, 64)) * scale,
                     "b": jnp.arange(8, dtype=jnp.bfloat16)},
          "step": jnp.asarray(seed, jnp.int32)}


def _target(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _save(workdir, *states):
  manager = checkpoints.open_checkpoints(str(workdir / "checkpoints"), 10)
  for step, state in states:
    checkpoints.save_checkpoint(manager, step, state)
  checkpoints.finish_checkpoints(manager)
  manager.close()


def _restore(workdir, target):
  manager = checkpoints.open_checkpoints(str(workdir / "checkpoints"), 10)
  return checkpoints.restore_newest(manager, target, str(workdir))


def _corrupt(step_dir):
  """Overwrites 4 bytes in the middle of the step's largest array data file, size unchanged."""
  files = [os.path.join(root, name) for root, _, names in os.walk(step_dir)
           if os.path.basename(root) == "d" for name in names]
  path = max(files, key=os.path.getsize)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 2)
    data = f.read(4)
    f.seek(size // 2)
    f.write(bytes(b ^ 0x5A for b in data))
  assert os.path.getsize(path) == size


def _equal(a, b):
  return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_step_corrupted_in_place_is_set_aside(tmp_path, caplog):
  one, two = _state(1), _state(2)
  _save(tmp_path, (1, one), (2, two))
  _corrupt(tmp_path / "checkpoints" / "2")
  with caplog.at_level(logging.WARNING, logger="bge_jax.train"):
    state, manager = _restore(tmp_path, _target(one))
  assert _equal(state, one)
  assert "fingerprint mismatch" in caplog.text and "['params']['w']" in caplog.text
  assert manager.all_steps() == [1]
  assert (tmp_path / "checkpoints_unreadable" / "2").is_dir()
  assert not (tmp_path / "checkpoints" / "2").exists()


def test_step_with_nan_values_is_set_aside(tmp_path, caplog):
  one, bad = _state(1), _state(2, scale=float("nan"))
  _save(tmp_path, (1, one), (2, bad))
  with caplog.at_level(logging.WARNING, logger="bge_jax.train"):
    state, manager = _restore(tmp_path, _target(one))
  assert _equal(state, one)
  assert "non-finite" in caplog.text and "['params']['w']" in caplog.text
  assert (tmp_path / "checkpoints_unreadable" / "2").is_dir()


def test_no_step_passes_the_checks_is_an_error_and_moves_nothing(tmp_path):
  one = _state(1)
  _save(tmp_path, (1, one))
  _corrupt(tmp_path / "checkpoints" / "1")
  with pytest.raises(checkpoints.CheckpointError, match=r"no checkpoint in .*checkpoints can be"):
    _restore(tmp_path, _target(one))
  assert (tmp_path / "checkpoints" / "1").is_dir()
  assert not (tmp_path / "checkpoints_unreadable").exists()


def test_step_without_fingerprints_restores(tmp_path, caplog):
  import orbax.checkpoint as ocp
  one = _state(1)
  manager = checkpoints.open_checkpoints(str(tmp_path / "checkpoints"), 10)
  manager.save(1, args=ocp.args.StandardSave(one))  # as older versions saved: no custom metadata
  checkpoints.finish_checkpoints(manager)
  manager.close()
  with caplog.at_level(logging.INFO, logger="bge_jax.train"):
    state, _ = _restore(tmp_path, _target(one))
  assert _equal(state, one)
  assert "has no fingerprints" in caplog.text


def test_fingerprint_is_independent_of_the_mesh_and_sees_one_ulp():
  devices = np.asarray(jax.devices())
  assert devices.size == 8
  values = {"w": np.random.default_rng(0).standard_normal((16, 8, 4)).astype(np.float32),
            "h": np.arange(16 * 8 * 4, dtype=np.float32).reshape(16, 8, 4).astype(jnp.bfloat16),
            "n": np.arange(16, dtype=np.int32), "s": np.float32(3.5)}

  def placed(mesh_shape, vals):
    mesh = Mesh(devices.reshape(mesh_shape), ("a", "b", "c"))
    specs = {"w": P("a", "b", "c"), "h": P("c", "a", None), "n": P(("a", "b", "c")), "s": P()}
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in vals.items()}

  sums, nonfinite = checkpoints.fingerprints(placed((8, 1, 1), values))
  assert nonfinite == []
  assert checkpoints.fingerprints(placed((2, 2, 2), values))[0] == sums
  assert checkpoints.fingerprints(values)[0] == sums  # one device
  for key, index in (("w", (5, 3, 1)), ("h", (0, 7, 2))):
    changed = dict(values)
    bits = values[key].view({4: np.uint32, 2: np.uint16}[values[key].dtype.itemsize]).copy()
    bits[index] += 1  # one ulp up (float32, and bfloat16)
    changed[key] = bits.view(values[key].dtype)
    other = checkpoints.fingerprints(placed((2, 2, 2), changed))[0]
    assert other[f"['{key}']"][0] != sums[f"['{key}']"][0]
    assert other[f"['{key}']"][1] != sums[f"['{key}']"][1]
    assert {k: v for k, v in other.items() if k != f"['{key}']"} == {
        k: v for k, v in sums.items() if k != f"['{key}']"}
  bad = dict(values, w=np.where(np.arange(4) == 2, np.inf, values["w"]).astype(np.float32))
  assert checkpoints.fingerprints(bad)[1] == ["['w']"]


def test_checkpoints_folder_removed_mid_run(tmp_path):
  folder = tmp_path / "checkpoints"
  manager = checkpoints.open_checkpoints(str(folder), 3)
  checkpoints.save_checkpoint(manager, 1, _state(1))
  checkpoints.finish_checkpoints(manager)
  shutil.rmtree(folder)
  with pytest.raises(checkpoints.CheckpointError,
                     match=rf"{folder} was removed .* resumes from the newest checkpoint"):
    checkpoints.save_checkpoint(manager, 2, _state(2))
  assert not folder.exists()  # not recreated behind the error


def test_checkpoints_folder_removed_during_a_save(tmp_path):
  folder = tmp_path / "checkpoints"
  manager = checkpoints.open_checkpoints(str(folder), 3)
  checkpoints.save_checkpoint(manager, 1, _state(1))
  # Moved away rather than rmtree'd, which would race with orbax's writes into it; orbax's
  # background save then recreates parts of it under the old name: still an error.
  os.rename(folder, tmp_path / "moved")
  with pytest.raises(checkpoints.CheckpointError, match=rf"{folder} was removed"):
    checkpoints.finish_checkpoints(manager)
