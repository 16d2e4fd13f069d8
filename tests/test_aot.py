"""The sharding rules compile for TPU: the trainer's stage-1 and stage-2 steps, AOT on v5e:2x2.

bge_jax.aot (launch/aot.py) lowers the trainer's own train step for abstract TPU devices and compiles it with libtpu's
compiler on this CPU host. Here a tiny model on a (data, fsdp, tensor) = (1, 2, 2) mesh of a 2x2
v5e slice: the step must compile (no sharding the TPU partitioner refuses), keep the train state
in the rules' shardings, and its per-chip arguments must be the sharded state, not a replica.
Skipped without libtpu (pip install -e ".[tpu-aot]").
"""

import importlib.util

import numpy as np
import pytest

from bge_jax import aot

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu-aot]'): no TPU compiler to compile "
           "for TPU topologies")

MESH = (1, 2, 2)


@pytest.fixture(scope="module")
def devices():
  devs = aot.topology_devices("v5e:2x2")
  assert len(devs) == 4 and all(d.platform == "tpu" for d in devs)
  assert "v5" in devs[0].device_kind.lower()
  return devs


def _bytes(tree, per_device_mesh=None):
  import jax
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.shape if per_device_mesh is None else x.sharding.shard_shape(x.shape)
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


@needs_libtpu
@pytest.mark.slow  # the TPU compiler takes minutes per step on 2 shared CPU cores
@pytest.mark.parametrize("case", [
    aot.cases_for(4, 8, [], 1, "1", stage1_length=64)[0],
    *aot.cases_for(4, 0, [16], 1, "2", stage2_lengths=(16, 32)),
], ids=["stage1", "stage2", "stage2-gradcache"])
def test_real_step_compiles_for_tpu_with_the_rules(devices, case):
  import jax

  from bge_jax.train import state as state_lib

  config = aot.run_config(case, "tiny", "bfloat16", None)
  program = aot.program_for(config, devices, MESH)
  compiled, state_sh, model_config = program.compile(), program.state_sharding, program.model_config

  # The state comes out in the rules' shardings (params split over fsdp and tensor).
  out_state_sh = compiled.output_shardings[0]
  want, got = jax.tree.leaves(state_sh), jax.tree.leaves(out_state_sh)
  assert len(want) == len(got)
  for w, g in zip(want, got):
    assert g.is_equivalent_to(w, 3) or g.spec == w.spec, (g, w)
  word = state_sh.params["embeddings"]["word_embeddings"]["embedding"]
  assert tuple(word.spec) == ("tensor", "fsdp")

  # Per-chip arguments: the sharded state (plus the batch), far below a replicated state.
  from bge_jax.models import bert
  abstract, _ = bert.abstract_init(model_config)
  tx, _ = state_lib.make_optimizer(config.optimizer.to_dict(), 1000)
  abstract_state = jax.eval_shape(lambda p: state_lib.init_state(p, tx), abstract)
  sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract_state, state_sh)
  full, per_chip = _bytes(sharded), _bytes(sharded, per_device_mesh=True)
  assert per_chip < full / 2
  memory = aot.memory_dict(compiled)
  assert memory["argument_size_in_bytes"] >= per_chip
  assert memory["argument_size_in_bytes"] < full, (memory, full)
  # The donated state is aliased to the new state.
  assert memory["alias_size_in_bytes"] >= per_chip // 2

  result = aot.Result("v5e:2x2", 4, "tiny", case, MESH, memory, 0.0)
  table = aot.markdown([result])
  assert "| v5e:2x2 | 4 | 16 GiB | tiny |" in table and "| yes |" in table


def test_gradcache_chunk_is_whole_rows_per_chip():
  assert aot.gradcache_chunk(19200, 256, 8) == 256 * 5  # 75 rows per chip: 5 | 75
  assert aot.gradcache_chunk(32768, 256, 8) == 256 * 8
  assert aot.gradcache_chunk(19200, 128, 8) == 128 * 6  # 150 rows per chip
  cases = aot.cases_for(256, 768, [19200], 8, "12")
  assert [(c.config_file, c.batch, c.gradcache_chunk, c.seq) for c in cases] == [
      ("retromae.py", 768, 0, "512"), ("contrastive.py", 19200, 0, "q32/p128"),
      ("contrastive.py", 19200, 1280, "q32/p128")]
  assert [c.describe() for c in cases] == ["stage 1", "stage 2", "stage 2 GradCache 1280"]


def test_cases_for_can_select_gradcache_on_or_off():
  only_on = aot.cases_for(256, 768, [19200, 32768], 8, "2", gradcache="on")
  assert [(c.batch, c.gradcache_chunk) for c in only_on] == [(19200, 1280), (32768, 2048)]
  only_off = aot.cases_for(256, 768, [32768], 8, "12", gradcache="off")
  assert [(c.label, c.gradcache_chunk) for c in only_off] == [("stage 1", 0), ("stage 2", 0)]
  with pytest.raises(ValueError, match="gradcache"):
    aot.cases_for(256, 768, [32768], 8, "2", gradcache="yes")


def test_compiler_stack_flags_are_set_for_libtpu(monkeypatch):
  """libtpu reads them at its first use (topology_devices sets them first); an unknown flag
  would abort it (so the v5e:2x2 compile above also shows it accepts them)."""
  import os
  monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_internal_thread_stack_size_bytes=1048576")
  aot.set_compiler_environment()
  args = os.environ["LIBTPU_INIT_ARGS"].split()
  # A size the user set is kept; the other flag is added.
  assert "--xla_internal_thread_stack_size_bytes=1048576" in args and len(args) == 2
  assert aot.COMPILER_STACK_FLAGS[0] in args


# ---------------------------------------------------------------------------------------------
# Dataset mixing: one compiled step, one row, per distinct batch size (on the fake CPU devices).
# ---------------------------------------------------------------------------------------------

STAGE2 = aot.cases_for(2, 0, [16], 1, "2", stage2_lengths=(8, 16), gradcache="off")[0]
CPU_MESH = (1, 2, 1)


def _cpus():
  import jax
  return jax.devices()[:2]


def _recording_lower(monkeypatch):
  """The query batch dimension of every train step `TrainProgram.lower` lowers."""
  from bge_jax.train import program

  dims, real = [], program.TrainProgram.lower

  def lower(self, state=None, batch=None, rng=None, donate=True):
    dims.append(batch["query_input_ids"].shape[0] if batch is not None else None)
    return real(self, state, batch, rng, donate)

  monkeypatch.setattr(program.TrainProgram, "lower", lower)
  return dims


def test_a_mixing_config_compiles_one_step_per_batch_size(monkeypatch):
  """data.batch_sizes = 32,16,32: the two distinct sizes are lowered (query batch 16, then 32:
  the shapes the trainer's steps take) and compiled, each a row of the table with its size; the
  larger batch needs more memory."""
  dims = _recording_lower(monkeypatch)
  results = aot.run_case("v5e:2x2", _cpus(), "tiny", STAGE2, CPU_MESH, "float32", None,
                         [("data.batch_sizes", "32,16,32")])
  assert dims == [16, 32]
  assert [(r.batch, r.batch_sizes, r.error) for r in results] == [(16, (16, 32), ""),
                                                                 (32, (16, 32), "")]
  small, large = (r.memory["temp_size_in_bytes"] for r in results)
  assert large > small, (small, large)
  assert [r.describe() for r in results] == ["stage 2 (data.batch_sizes 16/32)"] * 2
  rows = aot.markdown(results).splitlines()[2:]
  assert len(rows) == 2
  for row, b in zip(rows, (16, 32)):
    assert f"| stage 2, data.batch_sizes 16/32 | {b} | q8/p16 | 1×2×1 |" in row, row


def test_a_batch_size_that_does_not_split_is_its_own_error_row(monkeypatch):
  dims = _recording_lower(monkeypatch)
  results = aot.run_case("v5e:2x2", _cpus(), "tiny", STAGE2, CPU_MESH, "float32", None,
                         [("data.batch_sizes", "9,15")])
  assert dims == []  # neither is lowered
  assert [(r.batch, r.memory, r.error) for r in results] == [
      (b, None, f"batch {b} does not split over data x fsdp = 2") for b in (9, 15)]
  assert "| error: batch 15 does not split" in aot.markdown(results)


def test_without_mixing_one_row_as_before(monkeypatch):
  """No data.batch_sizes: one step, config.batch_size's, and the row of a single-size case."""
  dims = _recording_lower(monkeypatch)
  (result,) = aot.run_case("v5e:2x2", _cpus(), "tiny", STAGE2, CPU_MESH, "float32", None)
  assert dims == [16] and result.global_batch is None and result.batch == 16
  assert result.describe() == "stage 2" and result.memory is not None
  assert "| tiny | stage 2 | 16 | q8/p16 | 1×2×1 |" in aot.markdown([result])


def test_a_set_key_the_stage_lacks_names_it_and_the_config_file():
  from bge_jax.sweep import SweepError

  stage1 = aot.cases_for(8, 8, [], 1, "1", stage1_length=32)[0]
  with pytest.raises(SweepError, match=r"--set data.batch_sizes=16,32 \(configs/retromae.py\): "
                     r"'data.batch_sizes' is not a config key"):
    aot.run_config(stage1, "tiny", "float32", None, [("data.batch_sizes", "16,32")])
