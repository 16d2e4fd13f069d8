"""Train state, the optax optimizer (AdamW, warmup + linear decay, clipping) and the jitted step.

The TrainState is the whole of a run's mutable state: the data a step reads and the dropout
RNG are pure functions of (config.seed, step), so checkpointing this state (step, params,
optimizer, the non-finite step count) is enough for a bit-exact resume.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array | None], dict[str, jax.Array]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # Steps whose loss, gradient norm or updated params were NaN/inf so far (int32). Kept in the
  # checkpoint so the count (logged as `nonfinite_steps`) and the fail-fast check survive a
  # resume.
  nonfinite_steps: jax.Array


def lr_schedule(peak: float, total_steps: int, warmup_steps: int, kind: str = "linear") -> optax.Schedule:
  """Linear warmup to `peak`, then linear decay to 0 (HF's default) or constant."""
  warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
  if kind == "linear":
    after = optax.linear_schedule(peak, 0.0, max(total_steps - warmup_steps, 1))
  elif kind == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optimizer.schedule={kind!r}; use 'linear' or 'constant'")
  return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices and embeddings, not LayerNorm or biases."""
  def wants_decay(path, _):
    return getattr(path[-1], "key", None) not in ("bias", "scale")
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` as one scalar multiply: g * min(1, max_norm / ||g||).

  optax computes `select(||g|| < max_norm, g, g / ||g|| * max_norm)` per leaf. XLA does not
  copy a divide into each of its consumers, so the clipped gradient is written out once and
  read again by Adam's two moment updates: on XLA:CPU the bge-small AdamW update alone takes 74
  ms that way against 42 ms with a multiply (which fuses into them); whole bge-small steps, both
  compiled in one process and run interleaved: stage 2 1,037 -> 1,008 ms, stage 1 784 -> 762
  ms (~3%). Same state (none) and the same values within rounding (`g * (m / n)` against
  `(g / n) * m`); below the threshold the gradient passes unchanged, and a NaN or infinite
  norm gives what optax's gives.
  """
  def update(updates, state, params=None):
    del params
    norm = optax.global_norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def warmup_steps(opt: Mapping[str, Any], total_steps: int) -> int:
  """optimizer.warmup_steps when >= 0, else ceil(warmup_ratio x total_steps): the HF Trainer's
  `TrainingArguments.get_warmup_steps` (FlagEmbedding's --warmup_ratio), which rounds up."""
  if opt.get("warmup_steps", -1) >= 0:
    return int(opt["warmup_steps"])
  return math.ceil(opt.get("warmup_ratio", 0.0) * total_steps)


def make_optimizer(opt: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with decoupled weight decay (masked), global-norm clipping, warmup + decay."""
  warmup = warmup_steps(opt, total_steps)
  schedule = lr_schedule(opt["lr"], total_steps, warmup, opt.get("schedule", "linear"))
  parts = []
  if opt.get("clip_norm", 0.0) and opt["clip_norm"] > 0:
    parts.append(clip_by_global_norm(opt["clip_norm"]))
  parts.append(optax.adamw(schedule, b1=opt.get("b1", 0.9), b2=opt.get("b2", 0.999),
                           eps=opt.get("eps", 1e-8), weight_decay=opt.get("weight_decay", 0.0),
                           mask=decay_mask))
  return optax.chain(*parts), schedule


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    nonfinite_steps=jnp.zeros((), jnp.int32))


def split_micro_batches(batch: Any, k: int) -> Any:
  """The batch as k micro-batches: every leaf gets a leading axis of k.

  The batch holds n examples, n the smallest leading dim of its arrays; an array with n * m
  rows holds m consecutive rows per example (a contrastive batch's passages: its group of m =
  group_size). Micro-batch i takes examples i, i+k, i+2k, ... with all their rows, so a query
  keeps its whole group, and each device's contiguous block of the data-sharded batch holds
  examples of every micro-batch: the split moves no data. 0-d leaves (flags such as
  `in_batch_negatives`) go to every micro-batch.
  """
  leading = [x.shape[0] for x in jax.tree.leaves(batch) if jnp.ndim(x)]
  n = min(leading)
  if n % k or any(m % n for m in leading):
    raise ValueError(f"grad_accum_steps={k}: a batch of {n} examples with arrays of "
                     f"{sorted(set(leading))} rows does not split into {k} micro-batches of whole "
                     "examples")

  def split(x):
    if not jnp.ndim(x):
      return jnp.broadcast_to(x, (k,))
    m = x.shape[0] // n
    x = x.reshape((n // k, k, m) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((k, (n // k) * m) + x.shape[3:])

  return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int = 1, skip_nonfinite: bool = False,
                    ) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]]:
  """A pure `(state, batch, rng) -> (state, metrics)`; the batch's leading dim is the global batch.

  With grad_accum_steps=k the batch is split into k micro-batches (`split_micro_batches`), run
  in sequence by `lax.scan` (activations of one micro-batch live at a time), and their gradients
  averaged: the same update as one step on the whole batch for per-example losses. A contrastive
  loss scores each micro-batch's queries against that micro-batch's passages only.

  A step whose loss or gradient norm is NaN/inf, or whose update leaves a parameter NaN/inf
  (a finite gradient times a huge lr), increments `state.nonfinite_steps`. With
  skip_nonfinite=True its update is also dropped inside the compiled step (an elementwise
  select, so no host round trip): params and optimizer state come out bit-identical to the
  input and only `step` advances, so the run moves on to the next batch. Without it the update
  is applied and the trainer stops at its next check (see loop.py).
  """

  def loss_and_metrics(params, batch, rng):
    out = loss_fn(params, batch, rng)
    return out["loss"], out

  grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)

  def step(state: TrainState, batch: Any, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    if grad_accum_steps == 1:
      (_, metrics), grads = grad_fn(state.params, batch, rng)
    else:
      micro = split_micro_batches(batch, grad_accum_steps)

      def body(carry, inputs):
        i, mb = inputs
        (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, m)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      metric_shapes = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), rng)[0][1])
      zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
      (grads, metrics), _ = jax.lax.scan(
          body, (zeros, zero_metrics), (jnp.arange(grad_accum_steps), micro))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
      metrics = jax.tree.map(lambda m: m / grad_accum_steps, metrics)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A finite loss and gradient can still overflow the weights (a huge lr: inf * m / sqrt(v)),
    # and such a step must not pass as good: the trainer saves checkpoints only after good
    # steps. One elementwise test and reduction over the new params: small next to the update.
    params_finite = functools.reduce(
        jnp.logical_and, [jnp.isfinite(p).all() for p in jax.tree.leaves(params)], True)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & params_finite
    if skip_nonfinite:
      keep_if_bad = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep_if_bad, params, state.params)
      opt_state = jax.tree.map(keep_if_bad, opt_state, state.opt_state)
    nonfinite_steps = state.nonfinite_steps + jnp.where(finite, 0, 1).astype(jnp.int32)
    metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step),
                   nonfinite_steps=nonfinite_steps)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      nonfinite_steps=nonfinite_steps), metrics

  return step
