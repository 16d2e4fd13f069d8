"""The device mesh and the one table that maps logical axis names to mesh axes."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Flax resolves a logical axis with the first rule whose mesh axes
# are still free for that array, so activations shaped (batch, length, embed) put batch on
# (data, fsdp) and leave embed replicated, while parameters shaped (vocab, embed) shard embed
# over fsdp: ZeRO-3 style FSDP for weights, data parallel for activations, and Megatron-style
# tensor parallelism over heads / mlp / vocab.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("embed", "fsdp"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types; `-1` for data takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  if data == -1:
    if len(devices) % (fsdp * tensor):
      raise ValueError(
          f"mesh fsdp={fsdp} x tensor={tensor} does not divide the {len(devices)} devices; "
          "set mesh.fsdp / mesh.tensor to divisors of the device count.")
    data = len(devices) // (fsdp * tensor)
  shape = (data, fsdp, tensor)
  if math.prod(shape) != len(devices):
    raise ValueError(
        f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {math.prod(shape)} devices, "
        f"but {len(devices)} are available; set mesh.data=-1 to use all remaining devices.")
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Iterator[Mesh]:
  """Context in which the model's logical activation constraints bind to `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield mesh


def logical_to_sharding(logical_specs: Any, mesh: Mesh,
                        rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """Maps a pytree of logical PartitionSpecs (from `nn.get_partition_spec`) to NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def params_sharding(abstract_variables: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for an (abstract, boxed) variables tree as returned by `jax.eval_shape(init)`."""
  return logical_to_sharding(nn.get_partition_spec(abstract_variables), mesh, rules)


def shard_params(params: Any, logical_specs: Any, mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """Places host / single-device params onto `mesh` following their logical specs."""
  shardings = logical_to_sharding(logical_specs, mesh, rules)
  return jax.tree.map(jax.device_put, params, shardings)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batch-major arrays: the leading dim over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def opt_state_sharding(tx: Any, abstract_opt_state: Any, param_sharding: Any, mesh: Mesh) -> Any:
  """Optimizer-state shardings: leaves shaped like the params (Adam's mu and nu) take their
  parameter's sharding, so the optimizer state is split exactly like the weights (ZeRO-3);
  the rest (step counts) is replicated."""
  import optax

  repl = replicated(mesh)
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, param_sharding,
                               transform_non_params=lambda _: repl)


def train_state_sharding(abstract_state: Any, param_sharding: Any, tx: Any, mesh: Mesh) -> Any:
  """Shardings of a whole train state (a flax.struct dataclass with `params` and `opt_state`):
  params by the rules, the optimizer state like its params, every other field (step, counters)
  replicated. Written over the state's own fields, so a new scalar field needs no change here."""
  replicated_tree = jax.tree.map(lambda _: replicated(mesh), abstract_state)
  return replicated_tree.replace(
      params=param_sharding,
      opt_state=opt_state_sharding(tx, abstract_state.opt_state, param_sharding, mesh))


def spec_table(abstract_params: Any, logical_specs: Any,
               rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> dict[str, dict[str, Any]]:
  """`{path: {"shape", "logical", "mesh"}}` for every parameter: its shape, its logical axis
  names and the mesh PartitionSpec the rules give it, one entry per dimension (a mesh axis name,
  a list of them, or None; independent of the mesh's sizes and of PartitionSpec's repr). The golden table
  tests/golden/*.json is this function's output; a change of rules or model layout shows up as
  a diff there."""
  shapes = {jax.tree_util.keystr(p): tuple(int(d) for d in x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
  table = {}
  for path, logical in jax.tree_util.tree_flatten_with_path(logical_specs, is_leaf=is_spec)[0]:
    key = jax.tree_util.keystr(path)
    mesh_spec = tuple(nn.logical_to_mesh_axes(tuple(logical), rules))
    mesh_spec += (None,) * (len(shapes[key]) - len(mesh_spec))
    table[key] = {"shape": list(shapes[key]), "logical": list(logical),
                  "mesh": [list(a) if isinstance(a, tuple) else a for a in mesh_spec]}
  missing = sorted(set(shapes) - set(table))
  if missing:
    raise ValueError(f"parameters without a logical PartitionSpec: {missing}")
  return table


def describe(shardings: Any) -> dict[str, str]:
  """Flat `{path: PartitionSpec}` view, for logs and golden tables."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {jax.tree_util.keystr(path): str(s.spec if hasattr(s, "spec") else s)
          for path, s in flat}


__all__ = ["MESH_AXES", "LOGICAL_AXIS_RULES", "make_mesh", "activate", "logical_to_sharding",
           "params_sharding", "shard_params", "batch_sharding", "replicated", "opt_state_sharding",
           "train_state_sharding", "spec_table", "describe"]
