"""Distillation (FlagEmbedding's kd_loss_type "kl_div" and "m3_kd_loss") and duplicate-positive
masking: `contrastive.info_nce` against a PyTorch transcription of FlagEmbedding's formulas
(`FlagEmbedding/abc/finetune/embedder/AbsModeling.py`: `_compute_in_batch_neg_loss`,
`_compute_no_in_batch_neg_loss`, `distill_loss`), loss and gradients w.r.t. the embeddings; then
through `contrastive.loss` w.r.t. the parameters of a tiny BERT, GradCache against unchunked."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bge_jax import contrastive, convert, sharding
from bge_jax.data import packing
from bge_jax.data.pairs import text_hashes
from bge_jax.testing.torch_reference import flagembedding_contrastive_loss as fe_loss
from test_contrastive import (  # noqa: F401 (files, loaded, sharded_setup: fixtures)
    FAST_COMPILE, SEEDS, compare_grads, files, flat, jax_loss_and_grads, loaded, make_batch,
    sharded_setup, torch_loss_and_grads)

LOSS_TOL, GRAD_TOL = 1e-5, 1e-3  # relative, float32 JAX vs float64 torch (float32 below)
B, G, D, TAU = 6, 4, 16, 0.05


# ---------------------------------------------------------------------------------------------
# A batch of embeddings with deliberate duplicates.
# ---------------------------------------------------------------------------------------------

def embeddings(seed: int, with_duplicates: bool):
  """(q [B, D], p [B*G, D] unit vectors, passage texts [B*G], teacher scores [B, G]).

  Duplicates of query 0's positive (passage 0): a hard negative of its own group (1), a
  negative of query 2's group (2G+3) and query 3's positive (3G), so passage 0 is also a
  duplicate of query 3's positive. Equal texts have equal embeddings, as an encoder gives.
  """
  rng = np.random.RandomState(seed)
  q = rng.randn(B, D)
  p = rng.randn(B * G, D) + 0.8 * np.repeat(q, G, axis=0)  # scores with some structure
  texts = [f"passage {j}" for j in range(B * G)]
  if with_duplicates:
    for j in (1, 2 * G + 3, 3 * G):
      p[j], texts[j] = p[0], texts[0]
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  p /= np.linalg.norm(p, axis=-1, keepdims=True)
  teacher = rng.randn(B, G) * 2.0
  return q.astype(np.float32), p.astype(np.float32), texts, teacher.astype(np.float32)


def duplicate_matrix(texts) -> np.ndarray:
  """[B, B*G]: passage j has query i's positive's text and is not that positive (numpy)."""
  t = np.asarray(texts)
  dup = t[None, :] == t[::G][:, None]
  dup[np.arange(B), np.arange(B) * G] = False
  return dup


@functools.partial(jax.jit, static_argnames=("in_batch", "kd", "masked"))
def jax_value_and_grads(q, p, teacher, hashes, *, in_batch, kd, masked):
  def f(q, p):
    out = contrastive.info_nce(q, p, temperature=TAU, group_size=G, in_batch_negatives=in_batch,
                               teacher_scores=teacher, distill=kd or "kl_div",
                               passage_hash=hashes if masked else None)
    return out["loss"], out
  return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(q, p)


def torch_value_and_grads(q, p, teacher, dup, *, in_batch, kd):
  tq = torch.tensor(q, dtype=torch.float64, requires_grad=True)
  tp = torch.tensor(p, dtype=torch.float64, requires_grad=True)
  value = fe_loss(tq, tp, None if teacher is None else torch.tensor(teacher, dtype=torch.float64),
                  temperature=TAU, group_size=G, in_batch=in_batch, kd=kd,
                  duplicates=None if dup is None else torch.tensor(dup))
  value.backward()
  return float(value.detach()), tq.grad.numpy(), tp.grad.numpy()


def rel(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


CASES = [(kd, in_batch) for kd in (None, "kl_div", "m3_kd_loss") for in_batch in (True, False)]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kd,in_batch", CASES)
def test_info_nce_matches_flagembedding(kd, in_batch, masked):
  q, p, texts, teacher = embeddings(seed=3, with_duplicates=masked)
  teacher = teacher if kd else None
  dup = duplicate_matrix(texts) if masked else None
  if masked:
    # Rows 0 and 3 share the positive's text: each sees the other three copies.
    assert sorted(zip(*np.nonzero(dup))) == [(0, 1), (0, 2 * G + 3), (0, 3 * G), (3, 0), (3, 1),
                                             (3, 2 * G + 3)]
  (value, out), (gq, gp) = jax_value_and_grads(q, p, teacher, text_hashes(texts),
                                               in_batch=in_batch, kd=kd, masked=masked)
  want, want_q, want_p = torch_value_and_grads(q, p, teacher, dup, in_batch=in_batch, kd=kd)
  assert abs(float(value) - want) <= LOSS_TOL * abs(want), (float(value), want)
  assert rel(gq, want_q) <= GRAD_TOL and rel(gp, want_p) <= GRAD_TOL, (rel(gq, want_q),
                                                                       rel(gp, want_p))
  # The reported terms: loss = contrastive + distill (kl_div), distill alone (m3_kd_loss).
  terms = {None: out["contrastive_loss"], "kl_div": out["contrastive_loss"] + out.get(
      "distill_loss", np.nan), "m3_kd_loss": out.get("distill_loss", np.nan)}[kd]
  np.testing.assert_allclose(float(terms), float(value), rtol=1e-6)
  if kd:
    # The distillation term alone, from the same reference: FE's loss minus the contrastive one.
    plain, _, _ = torch_value_and_grads(q, p, None, dup, in_batch=in_batch, kd=kd)
    np.testing.assert_allclose(float(out["contrastive_loss"]), plain, rtol=LOSS_TOL)


@pytest.mark.parametrize("kd,in_batch", [(None, True), ("kl_div", True), ("m3_kd_loss", True),
                                         (None, False)])
def test_duplicate_masking_changes_the_loss(kd, in_batch):
  """On a batch with duplicates the masked loss is the reference's masked loss (above) and not
  the unmasked one; on a batch without duplicates the hashes change nothing."""
  q, p, texts, teacher = embeddings(seed=5, with_duplicates=True)
  teacher = teacher if kd else None
  hashes = text_hashes(texts)
  (masked, _), _ = jax_value_and_grads(q, p, teacher, hashes, in_batch=in_batch, kd=kd,
                                       masked=True)
  (plain, _), _ = jax_value_and_grads(q, p, teacher, hashes, in_batch=in_batch, kd=kd,
                                      masked=False)
  assert abs(float(masked) - float(plain)) > 1e-2 * abs(float(plain))
  # Numpy, directly (contrastive term, in-batch): the duplicates' logits dropped from the
  # softmax denominator.
  if kd is None and in_batch:
    dup = duplicate_matrix(texts)
    s = q.astype(np.float64) @ p.T.astype(np.float64) / TAU
    target = s[np.arange(B), np.arange(B) * G]
    lse = np.log(np.where(dup, 0.0, np.exp(s)).sum(-1))
    np.testing.assert_allclose(float(masked), np.mean(lse - target), rtol=LOSS_TOL)
  q, p, texts, teacher = embeddings(seed=5, with_duplicates=False)
  (a, _), _ = jax_value_and_grads(q, p, teacher if kd else None, text_hashes(texts),
                                  in_batch=in_batch, kd=kd, masked=True)
  (b, _), _ = jax_value_and_grads(q, p, teacher if kd else None, text_hashes(texts),
                                  in_batch=in_batch, kd=kd, masked=False)
  assert float(a) == float(b)


@pytest.mark.parametrize("kd", [None, "kl_div", "m3_kd_loss"])
def test_traced_in_batch_flag_selects_the_form(kd):
  """A per-batch flag traced under jit gives each form's loss."""
  q, p, texts, teacher = embeddings(seed=7, with_duplicates=True)
  teacher = teacher if kd else None
  hashes = text_hashes(texts)

  @jax.jit
  def traced(flag):
    return contrastive.info_nce(q, p, temperature=TAU, group_size=G, in_batch_negatives=flag,
                                teacher_scores=teacher, distill=kd or "kl_div",
                                passage_hash=hashes)["loss"]

  for flag in (True, False):
    (want, _), _ = jax_value_and_grads(q, p, teacher, hashes, in_batch=flag, kd=kd, masked=True)
    np.testing.assert_allclose(float(traced(jnp.asarray(flag))), float(want), rtol=1e-6)


def test_unknown_distill_type_is_refused():
  q, p, _, teacher = embeddings(seed=0, with_duplicates=False)
  with pytest.raises(ValueError, match=r"distill='kl'.*kl_div.*m3_kd_loss"):
    contrastive.info_nce(q, p, temperature=TAU, group_size=G, teacher_scores=teacher,
                         distill="kl")


def test_text_hashes_are_64_bit_and_equal_for_equal_texts():
  h = text_hashes(["a", "b", "a", "é", "e\u0301", ""])
  assert h.shape == (6, 2) and h.dtype == np.int32
  assert (h[0] == h[2]).all() and not (h[0] == h[1]).all()
  assert not (h[3] == h[4]).all()  # different code points, different texts
  assert text_hashes([]).shape == (0, 2)


# ---------------------------------------------------------------------------------------------
# Through `contrastive.loss` on a tiny BERT: torch parity of the parameters' gradients, and
# GradCache / packing against the unchunked padded step.
# ---------------------------------------------------------------------------------------------

PARAM_LOSS_TOL = 1e-5  # float32 JAX vs float32 torch through the model
SAME_TOL = 1e-5  # GradCache / packed vs unchunked padded (the brief's bound is 1e-3)


def batch_with_duplicates(vocab_size: int, seed: int, group_size: int = 4):
  """make_batch with teacher scores, passage 0 repeated as a hard negative of its own group
  (1) and in another query's group (2G+1), and the passages' text hashes."""
  batch = make_batch(vocab_size, seed, group_size, teacher=True)
  for j in (1, 2 * group_size + 1):
    batch["passage_input_ids"][j] = batch["passage_input_ids"][0]
    batch["passage_attention_mask"][j] = batch["passage_attention_mask"][0]
  texts = [" ".join(map(str, ids[mask > 0])) for ids, mask in
           zip(batch["passage_input_ids"], batch["passage_attention_mask"])]
  batch["passage_hash"] = text_hashes(texts)
  return batch, texts


@pytest.mark.parametrize("distill", ["kl_div", "m3_kd_loss"])
def test_params_parity_and_gradcache_with_distillation_and_masking(loaded, distill):
  config, params, model = loaded[SEEDS[1]]
  batch, texts = batch_with_duplicates(config.vocab_size, SEEDS[1])
  g = 4
  dup = np.asarray(texts)[None, :] == np.asarray(texts)[::g][:, None]
  dup[np.arange(4), np.arange(4) * g] = False
  assert dup.sum() == 2
  kw = dict(temperature=0.02, group_size=g, distill=distill)
  want, want_grads = torch_loss_and_grads(model, batch, duplicates=torch.tensor(dup), **kw)
  value, out, grads = jax_loss_and_grads(params, config, batch, mask_duplicate_positives=True,
                                         **kw)
  assert abs(value - want) <= PARAM_LOSS_TOL * abs(want), (value, want)
  hf = {k: np.asarray(v, np.float64)
        for k, v in convert.to_hf_state_dict(grads, config).items()}
  compare_grads({k: hf[k] for k in want_grads}, want_grads, GRAD_TOL)
  assert "distill_loss" in out and "contrastive_loss" in out
  unmasked, _, _ = jax_loss_and_grads(params, config, batch, **kw)
  assert abs(unmasked - value) > 1e-3 * abs(value)  # the duplicates mattered

  ref_grads = flat(grads)
  packed = packing.pack_sides(batch, {"query": None, "passage": None})
  assert "passage_hash" in packed and packed["passage_input_ids"].shape[0] < 16
  for tag, b, chunk in (("GradCache 2", batch, 2), ("GradCache 4", batch, 4),
                        ("packed", packed, 0)):
    got, _, got_grads = jax_loss_and_grads(params, config, b, chunk_size=chunk,
                                           mask_duplicate_positives=True, **kw)
    assert abs(got - value) <= SAME_TOL * abs(value), (tag, got, value)
    compare_grads(flat(got_grads), ref_grads, SAME_TOL)


def test_mask_without_hashes_is_refused(loaded):
  config, params, _ = loaded[SEEDS[1]]
  batch = make_batch(config.vocab_size, SEEDS[1], 4)
  with pytest.raises(KeyError, match="passage_hash"):
    contrastive.loss(params, config, batch, temperature=0.02, group_size=4,
                     mask_duplicate_positives=True)


_ALL_OPTIONS = dict(temperature=0.02, group_size=2, distill="m3_kd_loss",
                    mask_duplicate_positives=True, matryoshka_dims=(64, 16))


@functools.partial(jax.jit, static_argnums=1, compiler_options=FAST_COMPILE)
def _all_options_step(params, config, batch):
  def f(p):
    out = contrastive.loss(p, config, batch, **_ALL_OPTIONS)
    return out["loss"], out
  return jax.value_and_grad(f, has_aux=True)(params)


def test_sharded_distillation_matryoshka_masking_match_single_device(sharded_setup):
  """m3_kd_loss + Matryoshka + duplicate masking with the batch sharded over data x fsdp = 8
  devices and the params over fsdp: the single-device loss and gradients (global negatives,
  global duplicates)."""
  config, params, specs, batch, _, _ = sharded_setup
  batch = dict(batch)
  n_p = batch["passage_input_ids"].shape[0]
  batch["passage_input_ids"], batch["passage_attention_mask"] = (
      x.copy() for x in (batch["passage_input_ids"], batch["passage_attention_mask"]))
  for j in (3, n_p - 1):  # copies of query 0's positive on other devices' shards
    batch["passage_input_ids"][j] = batch["passage_input_ids"][0]
    batch["passage_attention_mask"][j] = batch["passage_attention_mask"][0]
  batch["passage_hash"] = text_hashes([" ".join(map(str, r[m > 0])) for r, m in zip(
      batch["passage_input_ids"], batch["passage_attention_mask"])])
  batch["teacher_scores"] = np.random.RandomState(0).randn(n_p // 2, 2).astype(np.float32)
  (want, out), want_grads = jax.device_get(_all_options_step(
      jax.device_put(params, jax.devices()[0]), config, jax.device_put(batch, jax.devices()[0])))
  assert {"loss/dim_64", "loss/dim_16", "distill_loss"} <= set(out)
  mesh = sharding.make_mesh(4, 2, 1)
  with sharding.activate(mesh):
    args = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    (value, _), grads = _all_options_step(sharding.shard_params(params, specs, mesh), config, args)
  assert abs(float(value) - float(want)) <= SAME_TOL * abs(float(want))
  compare_grads(flat(jax.device_get(grads)), flat(want_grads), SAME_TOL)
