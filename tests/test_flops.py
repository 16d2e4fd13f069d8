"""bge_jax.flops against XLA's own counts of the same programs.

Two references, both computed by XLA from the traced step, not from our formulas:

* exact: the matmul FLOPs of the lowered StableHLO (2 x output size x contracted size of every
  `dot_general`), summed over the program JAX builds for the forward, the full gradient, and the
  gradient under remat (whose recompute is our `StepFlops.recompute`). They must be equal.
* XLA's cost analysis of the compiled program (`compile().cost_analysis()["flops"]`), which also
  counts element-wise work (LayerNorm, GELU, softmax, loss): our model FLOPs must lie in
  [1.0, 1.25] x below it on these tiny shapes (the element-wise share shrinks as hidden grows).
"""

import math
import re
import types

import jax
import jax.numpy as jnp
import pytest

from bge_jax import contrastive, flops, retromae
from bge_jax.config import preset
from bge_jax.data import masking
from bge_jax.models import bert
from bge_jax.train.stages import get_stage

B, L, Q_LEN, G = 4, 32, 8, 2
COST_TOL = 1.25  # XLA count / analytic, upper bound (element-wise ops on tiny shapes)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}

_DOT = re.compile(r"stablehlo\.dot_general .*contracting_dims = \[([\d, ]*)\] x .*"
                  r": \(tensor<([\dx]+)x\w+>, tensor<([\dx]+)x\w+>\) -> tensor<([\dx]+)x\w+>")


def _dots(lowered):
  """(is it a row sum, 2 x |output| x |contracted dims|) of every dot_general of a lowered program.

  Refuses programs with dots outside `main` (called functions or loop bodies may run several
  times, which the text does not say).
  """
  dots, in_private = [], False
  for line in lowered.as_text().splitlines():
    if "func.func private" in line:
      in_private = True
    if "dot_general" not in line:
      continue
    assert not in_private, "a dot_general outside main: the count would miss its multiplicity"
    m = _DOT.search(line)
    assert m, f"unparsed dot_general: {line.strip()[:200]}"
    lhs, rhs, out = ([int(x) for x in m.group(i).split("x")] for i in (2, 3, 4))
    contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d.strip())
    row_sum = "batching_dims" not in line and contracted in (math.prod(lhs), math.prod(rhs))
    dots.append((row_sum, 2 * math.prod(out) * contracted))
  return dots


def hlo_dot_flops(lowered) -> int:
  """2 * |output| * |contracted dims| summed over the matmuls of a lowered program: every
  dot_general but the row sums of bias gradients (`hlo_row_sums`), which are not model FLOPs."""
  return sum(f for row_sum, f in _dots(lowered) if not row_sum)


def hlo_row_sums(lowered) -> int:
  """Products with an operand contracted whole (g [N, V] against ones[N, 1]): the MLM heads'
  bias gradients, which `bert._repeat_rows` makes GEMVs."""
  return sum(row_sum for row_sum, _ in _dots(lowered))


def bias_gradients(program: str) -> int:
  """Row sums a gradient program takes: the vocab bias of the MLM head (`bert.tied_logits`),
  used twice in stage 1 (encoder and decoder predictions), none in the contrastive stages."""
  return 2 if program == "retromae" else 0


def _i32(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.int32)


def _config(remat="none", **kw):
  return preset("tiny", hidden_dropout=0.0, attention_dropout=0.0, remat_policy=remat, **kw)


def _encode_program(c):
  params = bert.abstract_init(c)[0]
  fn = lambda p, i, m: bert.embed_sentences(p, c, i, m)  # noqa: E731
  return jax.jit(fn).lower(params, _i32(B, L), _i32(B, L))


def _retromae_program(c, k=None):
  """k: the sparse encoder MLM head's positions per row (None: every position)."""
  c = c.replace(add_mlm_head=True, add_decoder=True)
  params = bert.abstract_init(c)[0]
  batch = {k: _i32(B, L) for k in retromae.BATCH_KEYS}
  batch["decoder_attention_mask"] = _i32(B, L, L)
  grad = jax.grad(lambda p, b: retromae.loss(p, c, b, max_encoder_predictions=k)["loss"])
  return jax.jit(grad).lower(params, batch), flops.retromae_step_flops(c, B, L,
                                                                       encoder_predictions=k)


def _retromae_sparse_program(c):
  return _retromae_program(c, masking.max_predictions(L, 0.3))


def _contrastive_program(c):
  params = bert.abstract_init(c)[0]
  batch = {"query_input_ids": _i32(B, Q_LEN), "query_attention_mask": _i32(B, Q_LEN),
           "passage_input_ids": _i32(B * G, L), "passage_attention_mask": _i32(B * G, L)}
  grad = jax.grad(lambda p, b: contrastive.loss(p, c, b, temperature=0.02, group_size=G)["loss"])
  return jax.jit(grad).lower(params, batch), flops.contrastive_step_flops(c, B, Q_LEN, L, G)


TRAIN_PROGRAMS = {"retromae": _retromae_program, "retromae_sparse": _retromae_sparse_program,
                  "contrastive": _contrastive_program}


def test_encode_forward_equals_hlo_matmuls():
  c = _config()
  assert hlo_dot_flops(_encode_program(c)) == flops.encode_flops(c, B, L)
  assert hlo_row_sums(_encode_program(c)) == 0  # no gradient, no bias row sums


@pytest.mark.parametrize("remat", ["none", "full", "dots_no_batch"])
@pytest.mark.parametrize("stage", ["retromae", "retromae_sparse", "contrastive"])
def test_train_step_equals_hlo_matmuls(stage, remat):
  """The gradient program's matmuls = 3 x forward (model) + the remat policy's recompute."""
  c = _config(remat)
  lowered, expected = TRAIN_PROGRAMS[stage](c)
  assert (expected.recompute == 0) == (remat == "none")
  assert hlo_dot_flops(lowered) == expected.hardware
  assert hlo_row_sums(lowered) == bias_gradients(stage.split("_")[0])


def test_hlo_counter_sees_every_matmul():
  """The exact check could pass vacuously if the counter missed dots: the MLM head's vocab
  projection alone (a third of stage 1 at these shapes) must show up."""
  c = _config()
  lowered, expected = _retromae_program(c)
  vocab_part = 3 * 2 * (2 * B * L * c.hidden_size * c.vocab_size)
  assert vocab_part > expected.model / 4
  assert hlo_dot_flops(lowered) - vocab_part < expected.model


@pytest.mark.parametrize("program", ["encode", "retromae", "retromae_sparse", "contrastive"])
def test_within_xla_cost_analysis(program):
  c = _config()
  if program == "encode":
    lowered, analytic = _encode_program(c), flops.encode_flops(c, B, L)
  else:
    lowered, expected = TRAIN_PROGRAMS[program](c)
    analytic = expected.model
  xla = lowered.compile(compiler_options=FAST_COMPILE).cost_analysis()["flops"]
  ratio = xla / analytic
  print(f"{program}: XLA {xla:.4g} FLOPs, analytic {analytic:.4g}, ratio {ratio:.3f}")
  assert 1.0 <= ratio <= COST_TOL, (program, xla, analytic)


def test_gradcache_recompute_is_one_forward():
  c = _config()
  plain = flops.contrastive_step_flops(c, 64, 16, 32, group_size=2)
  cached = flops.contrastive_step_flops(c, 64, 16, 32, group_size=2, gradcache_chunk=16)
  assert cached.model == plain.model and plain.recompute == 0
  assert cached.recompute == flops.encoder_flops(c, 64, 16) + flops.encoder_flops(c, 128, 32)
  # A chunk as large as the batch is no GradCache (contrastive.embed runs it unchunked).
  assert flops.contrastive_step_flops(c, 64, 16, 32, 2, gradcache_chunk=64).recompute == \
      flops.encoder_flops(c, 128, 32)


def test_stage_step_flops_read_run_config_and_batch():
  c = _config()
  run = types.SimpleNamespace(loss=types.SimpleNamespace(gradcache_chunk=0))
  batch = {"query_input_ids": jnp.zeros((B, Q_LEN)), "passage_input_ids": jnp.zeros((B * G, L))}
  got = get_stage("finetune").step_flops(run, c, batch, process_count=2)
  assert got == flops.contrastive_step_flops(c, 2 * B, Q_LEN, L, G)
  run.data = types.SimpleNamespace(encoder_mlm_probability=0.3)
  got = get_stage("retromae").step_flops(run, c, {"encoder_input_ids": jnp.zeros((B, L))})
  # The trainer's encoder MLM head runs on the collator's bound of labelled positions per row.
  k = masking.max_predictions(L, 0.3)
  assert 0 < k < L and got == flops.retromae_step_flops(c, B, L, encoder_predictions=k)
  assert got.model < flops.retromae_step_flops(c, B, L).model


def test_micro_batches_score_their_own_passages():
  """grad_accum_steps=2: the formula equals the matmuls of the two micro-batches' gradients
  written out (`state.split_micro_batches`, then one loss each; no loop for the counter)."""
  from bge_jax.train.state import split_micro_batches

  c = _config()
  params = bert.abstract_init(c)[0]
  batch = {"query_input_ids": _i32(B, Q_LEN), "query_attention_mask": _i32(B, Q_LEN),
           "passage_input_ids": _i32(B * G, L), "passage_attention_mask": _i32(B * G, L)}

  def two_micro_batches(p, b):
    micro = split_micro_batches(b, 2)
    return sum(contrastive.loss(p, c, jax.tree.map(lambda x: x[i], micro), temperature=0.02,
                                group_size=G)["loss"] for i in range(2))

  lowered = jax.jit(jax.grad(two_micro_batches)).lower(params, batch)
  want = flops.contrastive_step_flops(c, B, Q_LEN, L, G, micro_batches=2)
  assert hlo_dot_flops(lowered) == want.model
  assert want.model < flops.contrastive_step_flops(c, B, Q_LEN, L, G).model
  run = types.SimpleNamespace(loss=types.SimpleNamespace(gradcache_chunk=0), grad_accum_steps=2)
  got = get_stage("finetune").step_flops(run, c, {"query_input_ids": jnp.zeros((B, Q_LEN)),
                                                  "passage_input_ids": jnp.zeros((B * G, L))})
  assert got == want


def test_step_flops_of_a_packed_batch_count_rows_for_the_encoder():
  c = _config()
  run = types.SimpleNamespace(loss=types.SimpleNamespace(gradcache_chunk=0))
  rows_q, rows_p = B // 2, B * G // 2
  packed = {"query_input_ids": jnp.zeros((rows_q, Q_LEN)), "query_text_slot": jnp.zeros((B,)),
            "passage_input_ids": jnp.zeros((rows_p, L)), "passage_text_slot": jnp.zeros((B * G,))}
  got = get_stage("finetune").step_flops(run, c, packed, process_count=2)
  padded = flops.contrastive_step_flops(c, 2 * B, Q_LEN, L, G)
  # The encoder on half the rows; the score matrices still over every text.
  scores = 3 * (2 * (2 * B) * (2 * B * G) * c.hidden_size + 2 * (2 * B) * G * c.hidden_size)
  assert got.model == pytest.approx((padded.model - scores) / 2 + scores, rel=1e-12)


def test_peak_flops_and_mfu():
  dev = lambda kind: types.SimpleNamespace(device_kind=kind)  # noqa: E731
  assert flops.peak_flops(dev("NVIDIA H100 80GB HBM3")) == 989e12
  assert flops.peak_flops(dev("NVIDIA H100 PCIe")) == 756e12
  assert flops.peak_flops(dev("NVIDIA H200")) == 989e12
  assert flops.peak_flops(dev("NVIDIA A100-SXM4-80GB")) == 312e12
  assert flops.peak_flops(dev("cpu")) is None
  assert flops.mfu(989e12 * 0.5, 1.0, 989e12) == pytest.approx(0.5)
  assert flops.mfu(8e12, 2.0, 1e12, num_devices=8) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="step_seconds"):
    flops.mfu(1.0, 0.0, 1e12)
