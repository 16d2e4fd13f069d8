"""The one train-step builder: run config + mesh + stage -> the jitted step and its shardings.

The trainer (`loop.train`), AOT compilation for TPU slices (`bge_jax.aot`), the benchmarks
(`launch/bench.py`, `launch/gpu_bench.py`) all build their step here, so the program a memory
table or a benchmark describes is the program the trainer runs (tests/test_program.py lowers
both and compares the text).

The step is `state.make_train_step` over the stage's loss (dropout as `config.dropout` says,
`config.grad_accum_steps` micro-batches, `config.skip_nonfinite_updates`), with the optimizer of
`config.optimizer` for `total_steps`, jitted with the train state in the logical rules'
shardings (`sharding.train_state_sharding`), batch-major arrays split over (data, fsdp), 0-d
flags and the RNG key replicated, and the state donated. The eval step (`jit_eval`) is the same
loss on the params alone, without dropout: the trainer's validation loss.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

import jax
import optax
from jax.sharding import Mesh

from bge_jax import flops, sharding
from bge_jax.config import BertConfig, fine_tuning_lr
from bge_jax.models import bert
from bge_jax.train import state as state_lib
from bge_jax.train.stages import Stage

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """A run's train step with everything its shapes and shardings need; nothing is allocated."""

  config: Any
  stage: Stage
  model_config: BertConfig
  mesh: Mesh
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  param_sharding: Any  # the params' NamedShardings (logical rules)
  state_sharding: Any  # the TrainState's
  abstract_state: Any  # ShapeDtypeStructs of the TrainState, with state_sharding
  step_fn: Callable  # the pure (state, batch, rng) -> (state, metrics), before jit
  eval_fn: Callable  # the pure (params, batch) -> metrics: the stage's loss without dropout

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return sharding.replicated(self.mesh)

  def batch_sharding(self, batch: Mapping[str, Any]) -> dict[str, jax.sharding.NamedSharding]:
    """Batch-major arrays split over (data, fsdp); 0-d flags (e.g. in_batch_negatives)
    replicated. `batch`: arrays or anything with `.shape`."""
    return {k: sharding.batch_sharding(self.mesh, len(v.shape)) if len(v.shape)
            else self.replicated for k, v in batch.items()}

  def jit(self, batch: Mapping[str, Any], donate: bool = True):
    """The jitted step for batches laid out like `batch` (its keys and ranks); the state is
    donated (`donate=False` only for benchmarks that measure what donation saves)."""
    return jax.jit(self.step_fn, in_shardings=(self.state_sharding, self.batch_sharding(batch),
                                               self.replicated),
                   out_shardings=(self.state_sharding, self.replicated),
                   donate_argnums=(0,) if donate else ())

  def jit_eval(self, batch: Mapping[str, Any]):
    """The jitted eval step (validation loss) for batches laid out like `batch`: params in the
    train state's shardings, the batch as the train step's, metrics replicated; nothing donated."""
    return jax.jit(self.eval_fn, in_shardings=(self.param_sharding, self.batch_sharding(batch)),
                   out_shardings=self.replicated)

  @property
  def batch_sizes(self) -> list[int]:
    """The distinct global batch sizes the run's train steps take, ascending: one compiled step
    each (`data.pairs.global_batch_sizes`: config.data.batch_sizes when datasets are mixed at
    different sizes, else config.batch_size)."""
    from bge_jax.data.pairs import global_batch_sizes

    return global_batch_sizes(self.config)

  def abstract_batch(self, process_count: int = 1, devices_per_process: int | None = None,
                     batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The stage's global batch for this config (`Stage.abstract_batch`), with the shardings
    the trainer gives its batches. Default: one process driving every device of the mesh, and
    config.batch_size queries; `batch_size` gives another global batch (one of `batch_sizes`)."""
    if devices_per_process is None:
      devices_per_process = self.mesh.devices.size // process_count
    config = self.config
    if batch_size is not None and batch_size != config.batch_size:
      config = config.copy_and_resolve_references()
      config.batch_size = int(batch_size)
    shapes = self.stage.abstract_batch(config, self.model_config,
                                       process_count=process_count,
                                       devices_per_process=devices_per_process)
    shardings = self.batch_sharding(shapes)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
            for k, v in shapes.items()}

  def abstract_rng(self) -> jax.ShapeDtypeStruct:
    # No sharding of its own, like the trainer's key (jit's in_shardings replicate it): with one,
    # JAX lowers the key's uses into differently shared private functions, another program text.
    return jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

  def lower(self, state: Any = None, batch: Mapping[str, Any] | None = None,
            rng: Any = None, donate: bool = True) -> jax.stages.Lowered:
    """The step lowered for these arguments (concrete or abstract); defaults: the abstract
    state, batch and key."""
    state = self.abstract_state if state is None else state
    batch = self.abstract_batch() if batch is None else batch
    rng = self.abstract_rng() if rng is None else rng
    with sharding.activate(self.mesh):
      return self.jit(batch, donate).lower(state, batch, rng)

  def compile(self, state: Any = None, batch: Mapping[str, Any] | None = None,
              rng: Any = None, donate: bool = True) -> jax.stages.Compiled:
    return self.lower(state, batch, rng, donate).compile()

  def step_flops(self, local_batch: Mapping[str, Any], process_count: int = 1) -> flops.StepFlops:
    return self.stage.step_flops(self.config, self.model_config, local_batch, process_count)

  def init_state(self, params: Any) -> Any:
    """The TrainState of sharded `params` (fresh optimizer state), in state_sharding."""
    return jax.jit(lambda p: state_lib.init_state(p, self.tx),
                   out_shardings=self.state_sharding)(params)

  def init_params(self, rng: jax.Array) -> Any:
    """Freshly initialised params, created shard by shard in param_sharding (never whole)."""
    return jax.jit(lambda r: bert.init(self.model_config, r)[0],
                   out_shardings=self.param_sharding)(rng)


def optimizer_options(config: Any, model_config: BertConfig) -> dict[str, Any]:
  """config.optimizer as a dict, an unset lr (stages 2-3) resolved and logged
  (`bge_jax.config.fine_tuning_lr`: the preset's own from scratch, else by the model's size)."""
  opt = config.optimizer.to_dict()
  if opt.get("lr") is None:
    opt["lr"], why = fine_tuning_lr(config.model.init_from, config.model.preset, model_config)
    log.info("optimizer.lr unset: %g, %s; set config.optimizer.lr to choose another",
             opt["lr"], why)
  return opt


def build(config: Any, stage: Stage, model_config: BertConfig, mesh: Mesh, total_steps: int,
          loss_fn: Callable | None = None) -> TrainProgram:
  """The train program of `config` (a run config: optimizer, dropout, grad_accum_steps,
  skip_nonfinite_updates, and the stage's own keys) for `model_config` on `mesh`.

  `total_steps` sets the learning-rate schedule, a constant of the compiled program. `loss_fn`
  replaces the stage's loss (`(params, batch, rng) -> metrics`): for benchmark variants that
  measure an alternative (launch/bench.py's dense MLM head); the trainer never passes it.
  """
  tx, schedule = state_lib.make_optimizer(optimizer_options(config, model_config), total_steps)
  abstract_params, logical = bert.abstract_init(model_config)
  param_sh = sharding.logical_to_sharding(logical, mesh)
  abstract = jax.eval_shape(lambda p: state_lib.init_state(p, tx), abstract_params)
  state_sh = sharding.train_state_sharding(abstract, param_sh, tx, mesh)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)

  stage_loss = loss_fn or stage.loss_fn(config, model_config)
  dropout = bool(config.dropout)

  def loss_fn(params, batch, rng):
    return stage_loss(params, batch, rng if dropout else None)

  step_fn = state_lib.make_train_step(
      loss_fn, tx, schedule, config.grad_accum_steps,
      skip_nonfinite=bool(config.get("skip_nonfinite_updates", False)))
  return TrainProgram(config=config, stage=stage, model_config=model_config, mesh=mesh, tx=tx,
                      schedule=schedule, param_sharding=param_sh, state_sharding=state_sh,
                      abstract_state=abstract_state, step_fn=step_fn,
                      eval_fn=lambda params, batch: stage_loss(params, batch, None))


DEFAULT_SCHEDULE_STEPS = 1000


class _VocabOnly:
  """Stands in for the tokenizer where model init only asks for its length."""

  def __init__(self, size: int):
    self.size = size

  def __len__(self):
    return self.size


def from_config(config: Any, mesh: Mesh | None = None, *, base_model: BertConfig | None = None,
                total_steps: int | None = None, loss_fn: Callable | None = None) -> TrainProgram:
  """The trainer's program for `config` without data: for AOT compilation and benchmarks.

  The model config is the stage's parts (`Stage.model_config`) on `base_model`, by default the
  trainer's own (`init.model_config_and_weights` for a tokenizer of config.model.vocab_size
  tokens; -1: the preset's vocabulary). The mesh defaults to the first device alone. The
  schedule runs over `total_steps`, else config.num_train_steps, else DEFAULT_SCHEDULE_STEPS
  (the schedule is a constant of the program: it changes no shape and no memory).
  """
  from bge_jax.config import preset
  from bge_jax.train import init
  from bge_jax.train.stages import get_stage

  stage = get_stage(config.stage)
  if base_model is None:
    vocab = config.model.vocab_size
    if vocab in (-1, None):
      vocab = preset(config.model.preset).vocab_size
    base_model = init.model_config_and_weights(config, _VocabOnly(vocab))[0]
  if mesh is None:
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  if total_steps is None:
    total_steps = config.num_train_steps if config.num_train_steps > 0 else DEFAULT_SCHEDULE_STEPS
  return build(config, stage, stage.model_config(base_model, config), mesh, total_steps, loss_fn)
