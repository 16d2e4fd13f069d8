"""Hugging Face <-> bge-jax conversion: exact round trips, gradients, exported folders, refusals."""

import json
import logging
import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from bge_jax import convert, weights
from bge_jax.encoder import Encoder
from bge_jax.models import bert
from conftest import make_hf_folder

FAMILIES = ("bert", "bert_mlm", "sentence_transformers", "retromae")
# Seeds of conftest.tiny_hf_config, chosen so the families get different shapes.
FAMILY_SEED = {"bert": 0, "bert_mlm": 4, "sentence_transformers": 5, "retromae": 1}
BUFFER = re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$")
EMBEDDING_KEYS = ("word_embeddings.weight", "position_embeddings.weight",
                  "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")
# Tied duplicates a torch state dict may hold -> the tensor they alias (written out by hand here,
# independently of the converter's own tables).
TIED = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
    "lm.cls.predictions.decoder.weight": "lm.bert.embeddings.word_embeddings.weight",
    "lm.cls.predictions.decoder.bias": "lm.cls.predictions.bias",
    **{f"decoder_embeddings.{k}": f"lm.bert.embeddings.{k}" for k in EMBEDDING_KEYS},
}
WEIGHT_WARNING = re.compile(
    r"LOAD REPORT|MISSING|UNEXPECTED|MISMATCH|not used|newly initialized|not initialized|corrupted",
    re.IGNORECASE)


def read_source(path) -> dict[str, np.ndarray]:
  """The tensors of a source checkpoint, read with safetensors / torch directly."""
  path = pathlib.Path(path)
  if path.is_dir():
    return dict(safetensors.numpy.load_file(str(path / "model.safetensors")))
  return {k: v.numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """family -> path load_hf takes, one random tiny checkpoint per naming family."""
  root = tmp_path_factory.mktemp("sources")
  return {f: make_hf_folder(root, f, FAMILY_SEED[f]) for f in FAMILIES}


@pytest.fixture(scope="module")
def loaded(sources):
  return {f: convert.load_hf(str(sources[f])) for f in FAMILIES}


def _ids(config, batch=3, length=9, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, config.vocab_size, size=(batch, length)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  mask[2, 1:] = 0
  types = rng.randint(0, 2, size=ids.shape).astype(np.int32)
  return np.where(mask == 1, ids, 0).astype(np.int32), mask, types


# ---------------------------------------------------------------------------------------------
# load_hf -> to_hf_state_dict round trip
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(sources, loaded, family):
  source = read_source(sources[family])
  config, params = loaded[family]
  assert config.hf_family == family
  assert config.add_mlm_head == (family in ("bert_mlm", "retromae"))
  assert config.add_decoder == (family == "retromae")
  assert config.add_pooler == (family in ("bert", "sentence_transformers"))
  # params: a pytree of float32 arrays only.
  for leaf in jax.tree.leaves(params):
    assert np.asarray(leaf).dtype == np.float32

  out = convert.to_hf_state_dict(params, config)
  assert set(out) <= set(source), sorted(set(out) - set(source))
  for key, value in out.items():
    assert isinstance(value, np.ndarray)
    assert value.shape == source[key].shape, key
    assert value.dtype == source[key].dtype, key
    assert np.array_equal(value, source[key]), key
  for key in sorted(set(source) - set(out)):
    assert BUFFER.search(key) or key in TIED, f"{key} was dropped"
  for alias, primary in TIED.items():
    if alias in source:
      assert np.array_equal(source[alias], source[primary]), alias
  if family == "bert_mlm":
    # A transformers save_pretrained folder stores the tied decoder once (nothing to alias).
    assert "cls.predictions.decoder.weight" not in out


def test_buffers_in_source_are_ignored(sources, tmp_path):
  """Older transformers saved embeddings.position_ids; it is a buffer, not a parameter."""
  folder = tmp_path / "with_buffers"
  shutil.copytree(sources["bert"], folder)
  state = read_source(folder)
  n_pos = state["embeddings.position_embeddings.weight"].shape[0]
  state["embeddings.position_ids"] = np.arange(n_pos, dtype=np.int64)[None]
  safetensors.numpy.save_file(state, str(folder / "model.safetensors"))
  config, params = convert.load_hf(str(folder))
  out = convert.to_hf_state_dict(params, config)
  assert set(state) - set(out) == {"embeddings.position_ids"}
  for key, value in out.items():
    assert np.array_equal(value, state[key]), key


def test_retromae_export_loads_strictly_in_torch(sources, loaded):
  config, params = loaded["retromae"]
  out = convert.to_hf_state_dict(params, config)
  for k in EMBEDDING_KEYS:
    assert f"decoder_embeddings.{k}" in out
  assert "lm.cls.predictions.decoder.weight" in out
  assert "lm.cls.predictions.decoder.bias" in out
  assert any(k.startswith("c_head.") for k in out)

  hf_config = transformers.BertConfig.from_pretrained(os.path.dirname(sources["retromae"]))

  class RetroMAELike(torch.nn.Module):
    """The parameter layout of FlagEmbedding's RetroMAEForPretraining."""

    def __init__(self):
      super().__init__()
      self.lm = transformers.BertForMaskedLM(hf_config)
      self.decoder_embeddings = self.lm.bert.embeddings
      self.c_head = transformers.models.bert.modeling_bert.BertLayer(hf_config)

  module = RetroMAELike()
  result = module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in out.items()},
                                  strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  source = read_source(sources["retromae"])
  loaded_back = module.state_dict()
  assert set(loaded_back) == set(source)
  for key, value in loaded_back.items():
    assert np.array_equal(value.numpy(), source[key]), key


# ---------------------------------------------------------------------------------------------
# Gradients through to_hf_state_dict
# ---------------------------------------------------------------------------------------------

def _loss_touching_every_part(params, config, ids, mask):
  def body(module, ids, mask):
    h = module(ids, mask)
    total = jnp.sum(jnp.tanh(h))
    if config.add_pooler:
      total += jnp.sum(module.pooler_output(h))
    if config.add_mlm_head:
      total += jnp.mean(module.mlm_logits(h) ** 2)
    if config.add_decoder:
      matrix = jnp.ones((ids.shape[0], ids.shape[1], ids.shape[1]), jnp.int32)
      total += jnp.sum(jnp.tanh(module.decoder_layer(h, h, matrix)))
    return total

  return bert.BertModel(config).apply({"params": params}, ids, mask, method=body)


def test_gradients_export_with_param_keys_and_shapes(sources, loaded):
  """retromae holds every part but the pooler (and has aliases); bert_mlm grads are checked
  against torch in test_mlm_gradients_match_torch."""
  family = "retromae"
  config, params = loaded[family]
  ids, mask, _ = _ids(config)
  grads = jax.jit(jax.grad(_loss_touching_every_part), static_argnums=1)(params, config, ids, mask)
  exported = convert.to_hf_state_dict(grads, config)
  reference = convert.to_hf_state_dict(params, config)
  assert set(exported) == set(reference)
  source = read_source(sources[family])
  for key, g in exported.items():
    assert g.shape == reference[key].shape == source[key].shape, key
    assert g.dtype == np.float32
  # The gradient of a loss that touches every part is non-zero in every part.
  for prefix in ("lm.bert.embeddings.", "lm.bert.encoder.", "lm.cls.", "c_head."):
    assert max(np.abs(g).max() for k, g in exported.items() if k.startswith(prefix)) > 1e-4


def test_mlm_gradients_match_torch(sources, loaded):
  config, params = loaded["bert_mlm"]
  ids, mask, types = _ids(config, batch=4, length=12, seed=3)
  rng = np.random.RandomState(7)
  labels = rng.randint(0, config.vocab_size, size=ids.shape).astype(np.int64)
  keep = (rng.rand(*ids.shape) < 0.5) & (mask == 1)
  keep[0, 0] = True
  labels = np.where(keep, labels, -100)

  def loss(p):
    model = bert.BertModel(config)
    h = model.apply({"params": p}, ids, mask, types)
    logits = model.apply({"params": p}, h, method=bert.BertModel.mlm_logits)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    valid = labels != -100
    picked = jnp.take_along_axis(logp, np.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / valid.sum()

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  ours = convert.to_hf_state_dict(grads, config)

  model = transformers.BertForMaskedLM.from_pretrained(sources["bert_mlm"]).eval()
  out = model(input_ids=torch.tensor(ids, dtype=torch.long),
              attention_mask=torch.tensor(mask, dtype=torch.long),
              token_type_ids=torch.tensor(types, dtype=torch.long),
              labels=torch.tensor(labels))
  out.loss.backward()
  np.testing.assert_allclose(float(value), out.loss.item(), rtol=1e-5)
  theirs = {name: p.grad.numpy() for name, p in model.named_parameters()}
  assert set(ours) == set(theirs)
  worst = 0.0
  for key, ref in theirs.items():
    assert ours[key].shape == ref.shape, key
    diff = np.linalg.norm(ours[key] - ref)
    if key.endswith("attention.self.key.bias"):
      # Softmax is shift-invariant, so the key bias gradient is zero up to rounding on both sides.
      assert np.abs(ref).max() < 1e-6 and np.abs(ours[key]).max() < 1e-6, key
      continue
    assert np.linalg.norm(ref) > 0, key
    worst = max(worst, diff / np.linalg.norm(ref))
    assert diff <= 1e-3 * np.linalg.norm(ref), (key, diff / np.linalg.norm(ref))
  print(f"\nMLM gradients vs torch: worst per-tensor |diff|/|ref| {worst:.2g}")


# ---------------------------------------------------------------------------------------------
# save_hf: folders for transformers and sentence-transformers
# ---------------------------------------------------------------------------------------------

def _word_tokenizer(vocab_size: int, folder: pathlib.Path):
  """A BERT word-piece tokenizer over words w5..w{V-1} that fits a tiny model's vocabulary."""
  folder.mkdir(parents=True)
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, vocab_size)]
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
  tokenizer = transformers.BertTokenizer.from_pretrained(str(folder))
  assert len(tokenizer) == vocab_size
  return tokenizer


def _sentences(vocab_size: int, n: int = 7, seed: int = 0) -> list[str]:
  rng = np.random.RandomState(seed)
  lengths = [1, 30] + list(rng.randint(2, 25, size=n - 2))
  return [" ".join(f"w{i}" for i in rng.randint(5, vocab_size, size=k)) for k in lengths]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, loaded):
  """family -> (config, params, tokenizer, exported folder) for the save_hf tests."""
  root = tmp_path_factory.mktemp("exports")
  out = {}
  for family in ("bert", "bert_mlm", "sentence_transformers"):
    config, params = loaded[family]
    tokenizer = _word_tokenizer(config.vocab_size, root / f"tok-{family}")
    # Both tokenizer forms: a folder of files, and an object with save_pretrained.
    tok_arg = str(root / f"tok-{family}") if family == "bert" else tokenizer
    folder = convert.save_hf(params, config, str(root / family), tokenizer=tok_arg)
    out[family] = (config, params, tokenizer, folder)
  return out


@pytest.fixture
def transformers_warnings(caplog):
  """Records of transformers' loggers (which do not propagate by default)."""
  transformers.logging.enable_propagation()
  caplog.set_level(logging.WARNING)
  yield lambda: [r.getMessage() for r in caplog.records if r.name.startswith("transformers")
                 and r.levelno >= logging.WARNING and WEIGHT_WARNING.search(r.getMessage())]
  transformers.logging.disable_propagation()


def _torch_hidden(model, ids, mask, types):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long),
                 token_type_ids=torch.tensor(types, dtype=torch.long), output_hidden_states=True)


def _assert_info_clean(info):
  for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info[key], (key, info[key])


def test_save_hf_bert_loads_in_automodel_without_warnings(exports, transformers_warnings):
  config, params, _, folder = exports["bert"]
  model, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
  assert type(model).__name__ == "BertModel"
  _assert_info_clean(info)
  assert transformers_warnings() == []
  ids, mask, types = _ids(config)
  ref = _torch_hidden(model.eval(), ids, mask, types)
  hidden = bert.BertModel(config).apply({"params": params}, ids, mask, types)
  real = mask.astype(bool)
  assert np.abs(np.asarray(hidden) - ref.last_hidden_state.numpy())[real].max() <= 1e-5
  pooled = bert.BertModel(config).apply({"params": params}, hidden,
                                        method=bert.BertModel.pooler_output)
  np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), rtol=0, atol=1e-5)


def test_save_hf_mlm_loads_in_automodel_for_masked_lm_without_warnings(
    exports, sources, transformers_warnings):
  config, params, _, folder = exports["bert_mlm"]
  assert json.loads(pathlib.Path(folder, "config.json").read_text())["architectures"] == [
      "BertForMaskedLM"]
  model, info = transformers.AutoModelForMaskedLM.from_pretrained(folder,
                                                                  output_loading_info=True)
  assert type(model).__name__ == "BertForMaskedLM"
  _assert_info_clean(info)
  assert transformers_warnings() == []
  assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
  ids, mask, types = _ids(config)
  ref = _torch_hidden(model.eval(), ids, mask, types)
  jax_model = bert.BertModel(config)
  hidden = jax_model.apply({"params": params}, ids, mask, types)
  logits = jax_model.apply({"params": params}, hidden, method=bert.BertModel.mlm_logits)
  real = mask.astype(bool)
  assert np.abs(np.asarray(hidden) - ref.hidden_states[-1].numpy())[real].max() <= 1e-5
  assert np.abs(np.asarray(logits) - ref.logits.numpy())[real].max() <= 1e-5

  # AutoModel (BertModel: a pooler, no MLM head) on a BertForMaskedLM folder: transformers reports
  # exactly what it reports for its own BertForMaskedLM.save_pretrained folder (the source), the
  # head/pooler difference inherent to the two architectures, and the same encoder states.
  base, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
  _, source_info = transformers.AutoModel.from_pretrained(sources["bert_mlm"],
                                                          output_loading_info=True)
  for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert sorted(info[key]) == sorted(source_info[key]), key
  assert set(info["missing_keys"]) <= {"pooler.dense.weight", "pooler.dense.bias"}
  assert all(k.startswith("cls.predictions.") for k in info["unexpected_keys"])
  base_hidden = _torch_hidden(base.eval(), ids, mask, types).last_hidden_state.numpy()
  assert np.abs(np.asarray(hidden) - base_hidden)[real].max() <= 1e-5


@pytest.mark.parametrize("family,pooling", [("bert", "cls"), ("sentence_transformers", "mean")])
def test_save_hf_loads_in_sentence_transformers(exports, transformers_warnings, family, pooling):
  from sentence_transformers import SentenceTransformer

  config, params, tokenizer, folder = exports[family]
  assert config.pooling == pooling
  model = SentenceTransformer(folder, device="cpu")
  assert transformers_warnings() == []
  names = [type(m).__name__ for m in model]
  assert names == ["Transformer", "Pooling", "Normalize"]
  pool_cfg = json.loads(pathlib.Path(folder, "1_Pooling", "config.json").read_text())
  assert pool_cfg["pooling_mode_cls_token"] == (pooling == "cls")
  assert pool_cfg["pooling_mode_mean_tokens"] == (pooling == "mean")
  assert model[1].get_config_dict()["pooling_mode"] == pooling

  sentences = _sentences(config.vocab_size)
  ref = model.encode(sentences, convert_to_numpy=True, batch_size=3)
  np.testing.assert_allclose(np.linalg.norm(ref, axis=-1), 1.0, atol=1e-5)
  ours = Encoder(params, config, tokenizer, pooling=pooling).encode(sentences, batch_size=4)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
  batch = tokenizer(sentences, padding=True, return_tensors="np")
  direct = bert.embed_sentences(params, config, batch["input_ids"], batch["attention_mask"],
                                batch["token_type_ids"])
  np.testing.assert_allclose(np.asarray(direct), ref, rtol=0, atol=1e-5)


def test_save_hf_folder_loads_back_bit_exact(exports):
  config, params, _, folder = exports["bert"]
  config2, params2 = convert.load_hf(folder)
  assert config2.hf_family == "sentence_transformers" and config2.pooling == "cls"
  assert config2.replace(hf_family="bert") == config
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_save_hf_refuses_existing_folder(loaded, tmp_path):
  config, params = loaded["bert"]
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  with pytest.raises(FileExistsError, match="out"):
    convert.save_hf(params, config, str(out))
  assert sorted(os.listdir(out)) == ["keep.txt"]
  assert (out / "keep.txt").read_text() == "precious"
  assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("existing", [False, True])
def test_save_hf_failure_leaves_nothing_behind(loaded, tmp_path, monkeypatch, existing):
  config, params = loaded["bert"]
  out = tmp_path / "out"
  if existing:
    out.mkdir()
    (out / "keep.txt").write_text("precious")
  before = sorted(os.listdir(tmp_path))

  def boom(*args, **kwargs):
    raise OSError("disk full (simulated)")

  monkeypatch.setattr(safetensors.numpy, "save_file", boom)
  with pytest.raises(OSError, match="simulated"):
    convert.save_hf(params, config, str(out), overwrite=existing)
  assert sorted(os.listdir(tmp_path)) == before  # no output folder, no temporary folder
  if existing:
    assert sorted(os.listdir(out)) == ["keep.txt"]


# ---------------------------------------------------------------------------------------------
# load_hf refusals
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def bert_copy(sources, tmp_path):
  folder = tmp_path / "copy"
  shutil.copytree(sources["bert"], folder)
  return folder


def _edit_weights(folder, edit):
  state = read_source(folder)
  edit(state)
  safetensors.numpy.save_file(state, str(folder / "model.safetensors"))


def _edit_config(folder, **changes):
  cfg = json.loads((folder / "config.json").read_text())
  cfg.update(changes)
  (folder / "config.json").write_text(json.dumps(cfg))


def test_refuses_missing_config(bert_copy):
  (bert_copy / "config.json").unlink()
  with pytest.raises(convert.ConversionError, match="config.json"):
    convert.load_hf(str(bert_copy))


def test_refuses_missing_weights(bert_copy):
  (bert_copy / "model.safetensors").unlink()
  with pytest.raises(convert.ConversionError, match="no weights.*model.safetensors"):
    convert.load_hf(str(bert_copy))


def test_refuses_missing_key(bert_copy):
  _edit_weights(bert_copy, lambda s: s.pop("encoder.layer.0.attention.self.value.bias"))
  with pytest.raises(convert.ConversionError,
                     match=r"missing.*encoder\.layer\.0\.attention\.self\.value\.bias"):
    convert.load_hf(str(bert_copy))


def test_refuses_unknown_key_unless_not_strict(bert_copy, loaded, caplog):
  extra = "encoder.layer.0.attention.self.rotary.weight"
  _edit_weights(bert_copy, lambda s: s.__setitem__(extra, np.ones((4, 4), np.float32)))
  with pytest.raises(convert.ConversionError, match=re.escape(extra)):
    convert.load_hf(str(bert_copy))
  with caplog.at_level(logging.WARNING, logger="bge_jax.convert"):
    config, params = convert.load_hf(str(bert_copy), strict=False)
  assert extra in caplog.text
  ref_config, ref_params = loaded["bert"]
  assert config == ref_config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert extra not in convert.to_hf_state_dict(params, config)


def test_refuses_shape_mismatch(bert_copy):
  key = "encoder.layer.0.intermediate.dense.weight"
  state = read_source(bert_copy)
  good = state[key].shape
  bad = (good[0] + 3, good[1])
  _edit_weights(bert_copy, lambda s: s.__setitem__(key, np.zeros(bad, np.float32)))
  with pytest.raises(convert.ConversionError) as err:
    convert.load_hf(str(bert_copy))
  message = str(err.value)
  assert key in message and str(bad) in message and str(good) in message


@pytest.mark.parametrize("changes,pattern", [
    (dict(model_type="roberta"), "roberta"),
    (dict(architectures=["BertForSequenceClassification"]), "BertForSequenceClassification"),
    (dict(model_type="xlm-roberta", architectures=["XLMRobertaModel"]), "xlm-roberta"),
])
def test_refuses_non_bert(bert_copy, changes, pattern):
  _edit_config(bert_copy, **changes)
  with pytest.raises(convert.ConversionError, match=pattern):
    convert.load_hf(str(bert_copy))


def test_refuses_invalid_json(bert_copy):
  (bert_copy / "config.json").write_text('{"model_type": "bert", "hidden_size": 32,')
  with pytest.raises(convert.ConversionError, match=r"config\.json.*invalid JSON"):
    convert.load_hf(str(bert_copy))


# ---------------------------------------------------------------------------------------------
# The project checkpoint
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sentence_transformers", "retromae"])
def test_project_checkpoint_round_trip_is_bit_exact(loaded, tmp_path, family):
  config, params = loaded[family]
  folder = weights.save_params(str(tmp_path / "ckpt"), params, config)
  config2, params2 = weights.load_params(folder)
  assert config2 == config
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params2), jax.tree.leaves(params)):
    a = np.asarray(a)
    assert a.dtype == np.asarray(b).dtype and np.array_equal(a, np.asarray(b)), path
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]
