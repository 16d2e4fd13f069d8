"""Model merging (bge_jax.merge, launch/merge.py): averages, weights from examples, exports, refusals.

References are computed another way: the weighted average with numpy over the HF state dicts
read back from the model files, the example losses with `contrastive.loss` on a batch built here
(not `merge.examples_batch`) and softmax(-loss / 5) in numpy; the merged export is read with
transformers' AutoModel.
"""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from bge_jax import contrastive, convert, merge, weights
from bge_jax import config as config_lib
from bge_jax.models import bert
from conftest import make_tokenizer
from launch import merge as merge_cli

# The reference loss compiles at LLVM -O0 (as tests/test_contrastive.py): same float32 semantics.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
# The tiny preset with one layer and a vocabulary the test tokenizer fits in (fast compiles).
CONFIG = config_lib.preset("tiny", num_layers=1, vocab_size=64, max_position_embeddings=64)
EXAMPLES = [
    {"query": "alpha beta gamma", "pos": ["alpha beta gamma delta model"],
     "neg": ["river mountain city", "music paper science", "stone bridge"]},
    {"query": "search index query", "pos": ["search index query passage"],
     "neg": ["forest music", "light stone bridge market"]},
    {"query": "dense sparse rank", "pos": ["dense sparse rank score batch"],
     "neg": ["ocean forest", "graph river", "cloud light", "garden city"]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Three tiny models (seeds 0, 1, 2): two HF folders and one bge-jax params folder."""
  root = tmp_path_factory.mktemp("merge")
  tok = make_tokenizer(root / "tokenizer")
  paths, params = [], []
  for seed in range(3):
    p, _ = bert.init(CONFIG, jax.random.key(seed))
    p = weights.to_numpy(p)
    # Spread the values beyond init's 0.02 so models differ clearly in their losses.
    p = jax.tree.map(lambda x, s=seed: x * np.float32(1 + 3 * s), p)
    params.append(p)
    if seed < 2:
      paths.append(convert.save_hf(p, CONFIG, str(root / f"hf{seed}"), tokenizer=str(tok)))
    else:
      paths.append(weights.save_params(str(root / "ckpt2"), p, CONFIG, tokenizer=str(tok)))
  return root, tok, paths, params


def _state_dict(path: str) -> dict[str, np.ndarray]:
  if weights.is_checkpoint(path):
    config, params = weights.load_params(path)
    return convert.to_hf_state_dict(weights.to_numpy(params), config)
  return load_file(os.path.join(path, "model.safetensors"))


def test_average_equals_numpy_weighted_average_of_state_dicts(tiny):
  _, _, paths, _ = tiny
  models = merge.load_models(paths)
  assert [m.config.num_layers for m in models] == [1, 1, 1]
  weights = [5.0, 3.0, 2.0]  # normalised to 0.5, 0.3, 0.2
  merged = merge.average([m.params for m in models], weights)
  got = convert.to_hf_state_dict(merged, models[0].config)
  dicts = [_state_dict(p) for p in paths]
  assert set(got) == set(dicts[0])
  for key, value in got.items():
    want = sum(w / 10.0 * d[key].astype(np.float64) for w, d in zip(weights, dicts))
    assert value.dtype == np.float32
    np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7, err_msg=key)
  # Not a copy of one input.
  assert not np.allclose(got["embeddings.word_embeddings.weight"],
                         dicts[0]["embeddings.word_embeddings.weight"])


def test_average_keeps_bfloat16_and_refuses_bad_weights():
  a = {"w": np.array([1.0, 2.0], jax.numpy.bfloat16)}
  b = {"w": np.array([3.0, 4.0], jax.numpy.bfloat16)}
  out = merge.average([a, b], [1, 3])
  assert out["w"].dtype == a["w"].dtype
  np.testing.assert_array_equal(out["w"].astype(np.float32), [2.5, 3.5])
  with pytest.raises(merge.MergeError, match="2 weight"):
    merge.average([a, b, a], [1, 1])
  with pytest.raises(merge.MergeError, match=">= 0"):
    merge.average([a, b], [1, -1])
  with pytest.raises(merge.MergeError, match="sum to 0"):
    merge.average([a, b], [0, 0])


def _reference_batch(tokenizer, group: int):
  """The examples' batch built by hand: [pos, first G-1 negatives] per query, padded longest."""
  queries = [e["query"] for e in EXAMPLES]
  passages = [t for e in EXAMPLES for t in [e["pos"][0]] + e["neg"][:group - 1]]
  q = tokenizer(queries, padding=True, return_tensors="np")
  p = tokenizer(passages, padding=True, return_tensors="np")
  return {"query_input_ids": q["input_ids"], "query_attention_mask": q["attention_mask"],
          "passage_input_ids": p["input_ids"], "passage_attention_mask": p["attention_mask"]}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_weights_from_examples_is_softmax_of_separate_losses(tiny, tmp_path, pooling):
  from transformers import AutoTokenizer

  _, tok_dir, _, params = tiny
  tokenizer = AutoTokenizer.from_pretrained(tok_dir)
  config = CONFIG.replace(pooling=pooling)
  group = 3  # fewest negatives of a row (2) + 1
  batch = _reference_batch(tokenizer, group)
  reference = jax.jit(lambda p: contrastive.loss(p, config, batch, temperature=0.02,
                                                 group_size=group, pooling=pooling,
                                                 normalize=True)["loss"],
                      compiler_options=FAST_COMPILE)
  losses = np.array([float(reference(p)) for p in params])
  assert np.ptp(losses) > 0.05, losses  # the models really differ on the examples
  want = np.exp(-losses / 5.0) / np.exp(-losses / 5.0).sum()

  got = merge.weights_from_examples(params, config, tokenizer, EXAMPLES, temperature=5.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(merge.example_losses(params, config, tokenizer, EXAMPLES), losses,
                             rtol=1e-5, atol=1e-5)
  # The same rows from a JSONL file (FlagEmbedding format) give the same weights.
  path = tmp_path / "few.jsonl"
  path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
  np.testing.assert_allclose(merge.weights_from_examples(params, config, tokenizer, str(path)),
                             want, rtol=1e-5)


def test_cli_examples_writes_hf_folder_loadable_by_automodel(tiny, tmp_path, capsys):
  import torch
  from transformers import AutoModel

  root, _, paths, params = tiny
  examples = tmp_path / "few.jsonl"
  examples.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
  out = tmp_path / "merged"
  assert merge_cli.main(["--models", *paths, "--examples", str(examples), "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  weights = [float(line.split()[0]) for line in printed.splitlines()
             if line.startswith("  ") and "loss" in line]
  assert len(weights) == 3 and abs(sum(weights) - 1) < 1e-5, printed

  model = AutoModel.from_pretrained(out).eval()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  dicts = [_state_dict(p) for p in paths]
  key = "encoder.layer.0.attention.self.query.weight"
  want = sum(w * d[key].astype(np.float64) for w, d in zip(weights, dicts))
  np.testing.assert_allclose(state[key], want, rtol=1e-4, atol=1e-6)  # weights printed to 6 dp
  # sentence-transformers files: CLS pooling + Normalize, as the first model.
  modules = json.loads((out / "modules.json").read_text())
  assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
  assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"]
  with torch.no_grad():  # the merged model runs
    ids = torch.tensor([[2, 6, 7, 3]])
    assert torch.isfinite(model(input_ids=ids).last_hidden_state).all()


def test_cli_weights_jax_format_roundtrip(tiny, tmp_path, capsys):
  _, _, paths, params = tiny
  out = tmp_path / "merged_ckpt"
  assert merge_cli.main(["--models", paths[0], paths[2], "--weights", "1", "3", "--out",
                         str(out), "--format", "jax"]) == 0
  assert "0.250000" in capsys.readouterr().out
  config, merged = weights.load_params(str(out))
  assert weights.tokenizer_dir(str(out)) is not None
  got = weights.to_numpy(merged)["layers_0"]["intermediate"]["kernel"]
  want = (0.25 * params[0]["layers_0"]["intermediate"]["kernel"].astype(np.float64)
          + 0.75 * params[2]["layers_0"]["intermediate"]["kernel"])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_mismatched_models_are_refused_naming_tensor_and_files(tiny, tmp_path, capsys):
  root, tok, paths, _ = tiny
  other_config = CONFIG.replace(intermediate_size=96)
  p, _ = bert.init(other_config, jax.random.key(5))
  other = convert.save_hf(weights.to_numpy(p), other_config, str(tmp_path / "other"),
                          tokenizer=str(tok))
  with pytest.raises(merge.MergeError) as e:
    merge.load_models([paths[0], other])
  msg = str(e.value)
  assert "layers_0/intermediate/bias" in msg and "(96,)" in msg and "(128,)" in msg
  assert paths[0] in msg and other in msg
  # A missing layer is named too.
  deeper = CONFIG.replace(num_layers=2)
  p2, _ = bert.init(deeper, jax.random.key(6))
  deep = convert.save_hf(weights.to_numpy(p2), deeper, str(tmp_path / "deep"))
  with pytest.raises(merge.MergeError, match="layers_1/.* is in .*deep but not in .*hf0"):
    merge.load_models([paths[0], deep])
  # The CLI: exit 2, one error line, no output.
  out = tmp_path / "never"
  assert merge_cli.main(["--models", paths[0], other, "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: cannot merge: tensor layers_0/"), err
  assert not out.exists() and not [q for q in tmp_path.iterdir() if ".tmp-" in q.name]
  # An existing output is refused before anything loads.
  assert merge_cli.main(["--models", *paths[:2], "--out", str(tmp_path / "other")]) == 2
  assert "exists" in capsys.readouterr().err


def test_minilm_merge_keeps_mean_pooling_and_refuses_a_tiny_partner(minilm_path, tiny, tmp_path,
                                                                    capsys):
  _, _, paths, _ = tiny
  # MiniLM with a perturbed copy of itself: a same-architecture pair, as LM-Cocktail merges.
  config, params = convert.load_hf(minilm_path)
  rng = np.random.RandomState(0)
  noisy = jax.tree.map(lambda x: x + rng.normal(0, 0.01, x.shape).astype(x.dtype), params)
  noisy_path = convert.save_hf(noisy, config, str(tmp_path / "noisy"), tokenizer=minilm_path)
  out = tmp_path / "merged"
  assert merge_cli.main(["--models", minilm_path, noisy_path, "--weights", "0.6", "0.4",
                         "--out", str(out)]) == 0
  capsys.readouterr()
  pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
  assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
  merged_config, merged = convert.load_hf(str(out))
  assert merged_config.pooling == "mean" and merged_config.hidden_size == 384
  key = ("layers_5", "output", "kernel")
  want = (0.6 * params[key[0]][key[1]][key[2]].astype(np.float64)
          + 0.4 * noisy[key[0]][key[1]][key[2]])
  np.testing.assert_allclose(merged[key[0]][key[1]][key[2]], want, rtol=1e-6, atol=1e-7)
  assert os.path.isfile(out / "tokenizer.json") or os.path.isfile(out / "vocab.txt")

  with pytest.raises(merge.MergeError, match="embeddings/.*shape"):
    merge.load_models([minilm_path, paths[0]])
