"""The conversion command line: round trips per family, --check, refusals, atomic writes, MiniLM."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO, make_hf_folder
from conversion import convert as convert_cmd

SCRIPT = REPO / "conversion" / "convert.py"
FAMILIES = ("bert", "bert_mlm", "sentence_transformers", "retromae")
DELTA = re.compile(r"^check: (last hidden state|pooled embedding).* max \|Δ\| = (\S+)", re.M)
BUFFER = re.compile(r"embeddings\.(position_ids|token_type_ids)$")


@pytest.fixture
def hf_folder(tmp_path, capsys):
  """make_hf_folder, with its save_pretrained progress output swallowed."""
  def make(family: str, seed: int):
    path = make_hf_folder(tmp_path, family, seed=seed)
    capsys.readouterr()
    return path
  return make


def cli(*argv) -> int:
  return convert_cmd.main([str(a) for a in argv])


def deltas(stdout: str) -> dict[str, float]:
  return {name: float(value) for name, value in DELTA.findall(stdout)}


def assert_clean(out) -> None:
  """No OUT, and no temporary folder beside it."""
  assert not os.path.lexists(out)
  if out.parent.exists():
    assert not [p.name for p in out.parent.iterdir() if ".tmp-" in p.name]


def assert_refused(capsys, code: int, out, *needles: str) -> str:
  """Exit 2, exactly one `error:` line on stderr naming each needle, nothing left behind."""
  captured = capsys.readouterr()
  assert code == 2, captured
  lines = [line for line in captured.err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
  assert "Traceback" not in captured.err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  if out is not None:
    assert_clean(out)
  return lines[0]


def source_state(src) -> dict[str, np.ndarray]:
  """The tensors of a make_hf_folder source, buffers left out."""
  if str(src).endswith(".bin"):
    import torch
    state = {k: v.numpy() for k, v in torch.load(src, weights_only=True).items()}
  else:
    state = load_file(os.path.join(src, "model.safetensors"))
  return {k: v for k, v in state.items() if not BUFFER.search(k)}


def add_tokenizer(folder, vocab_size: int) -> None:
  """A BertTokenizer vocabulary of exactly vocab_size entries (words of the check sentences)."""
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "quick", "brown", "fox", "ok",
           "dog", ".", ",", ":", "a", "is", "one", "how", "does", "jax"]
  words += [f"tok{i}" for i in range(vocab_size - len(words))]
  (folder / "vocab.txt").write_text("\n".join(words) + "\n")
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "BertTokenizer", "do_lower_case": True}))


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_with_check_is_bit_exact(tmp_path, hf_folder, capsys, family):
  src = hf_folder(family, 3)
  ckpt, hf = tmp_path / "out" / "ckpt", tmp_path / "out" / "hf"

  assert cli("hf-to-jax", src, ckpt, "--check") == 0
  stdout = capsys.readouterr().out
  assert re.search(rf"^read: .*family {family}, ", stdout, re.M), stdout
  assert set(deltas(stdout)) == {"last hidden state", "pooled embedding"}
  assert max(deltas(stdout).values()) < 1e-4
  assert "check: passed" in stdout and f"wrote: {ckpt}: bge-jax params folder" in stdout
  meta = json.loads((ckpt / "bge_jax.json").read_text())
  assert meta["format"] == "bge-jax/params" and meta["config"]["hf_family"] == family
  assert (ckpt / "params").is_dir() and not (ckpt / "tokenizer").exists()

  assert cli("jax-to-hf", ckpt, hf, "--check") == 0
  stdout = capsys.readouterr().out
  assert max(deltas(stdout).values()) < 1e-4 and "check: passed" in stdout
  assert_clean(tmp_path / "out" / "none")  # no temporary folders beside the outputs

  exported = load_file(hf / "model.safetensors")
  arch = json.loads((hf / "config.json").read_text())["architectures"]
  original = source_state(src)
  if family == "retromae":
    assert arch == ["BertForMaskedLM"]
    # The HF folder holds the encoder + MLM head in BertForMaskedLM naming (lm.X -> X) ...
    assert any(k.startswith("cls.predictions.transform.") for k in exported)
    for key, value in exported.items():
      assert value.dtype == original[f"lm.{key}"].dtype
      np.testing.assert_array_equal(value, original[f"lm.{key}"], err_msg=key)
    # ... and the full FlagEmbedding state (decoder c_head.* included) sits beside it.
    full = load_file(hf / "retromae_state.safetensors")
    assert set(full) == set(original)
    for key, value in original.items():
      np.testing.assert_array_equal(full[key], value, err_msg=key)
    return
  assert arch == ["BertForMaskedLM" if family == "bert_mlm" else "BertModel"]
  encoder = {k for k in original if re.search(r"(^|\.)(embeddings|encoder|pooler)\.", k)}
  assert encoder <= set(exported), sorted(encoder - set(exported))
  assert set(exported) <= set(original), sorted(set(exported) - set(original))
  for key, value in exported.items():
    assert value.dtype == original[key].dtype
    np.testing.assert_array_equal(value, original[key], err_msg=key)
  if family == "sentence_transformers":  # the source's mean pooling + Normalize survive
    pooling = json.loads((hf / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    assert (hf / "2_Normalize").is_dir()
  else:  # CLS pooling + Normalize by default
    pooling = json.loads((hf / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_cls_token"] and (hf / "2_Normalize").is_dir()


def test_tokenizer_travels_and_feeds_the_check(tmp_path, hf_folder, capsys):
  src = hf_folder("bert", 1)
  vocab_size = json.loads((src / "config.json").read_text())["vocab_size"]
  add_tokenizer(src, vocab_size)
  ckpt, hf = tmp_path / "out" / "ckpt", tmp_path / "out" / "hf"

  assert cli("hf-to-jax", src, ckpt, "--check") == 0
  stdout = capsys.readouterr().out
  assert "sample sentences tokenised by" in stdout and "check: passed" in stdout
  assert "tokenizer/" in stdout.splitlines()[-1]
  assert (ckpt / "tokenizer" / "vocab.txt").read_text() == (src / "vocab.txt").read_text()

  assert cli("jax-to-hf", ckpt, hf, "--check", "--pooling", "mean",
             "--max-seq-length", "32") == 0
  stdout = capsys.readouterr().out
  assert "sample sentences tokenised by" in stdout and "mean, normalized" in stdout
  assert (hf / "vocab.txt").is_file() and (hf / "tokenizer_config.json").is_file()
  assert json.loads((hf / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
  assert json.loads((hf / "sentence_bert_config.json").read_text())["max_seq_length"] == 32


def test_single_file_source_and_plain_hf_export(tmp_path, hf_folder, capsys):
  src = hf_folder("bert", 2)
  os.rename(src / "model.safetensors", src / "weights.safetensors")
  ckpt, hf = tmp_path / "out" / "ckpt", tmp_path / "out" / "hf"
  assert cli("hf-to-jax", src / "weights.safetensors", ckpt, "--check") == 0
  assert "check: passed" in capsys.readouterr().out
  assert cli("jax-to-hf", ckpt, hf, "--no-sentence-transformers") == 0
  assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]


def test_check_failure_writes_nothing(tmp_path, hf_folder, capsys):
  src = hf_folder("bert", 4)
  out = tmp_path / "out" / "ckpt"
  assert cli("hf-to-jax", src, out, "--check", "--dtype", "bfloat16") == 1
  captured = capsys.readouterr()
  assert "last hidden state" in captured.out
  assert captured.err.startswith("error: check failed") and "--tol" in captured.err
  assert_clean(out)
  # A looser tolerance accepts the bfloat16 params, stored as bfloat16.
  assert cli("hf-to-jax", src, out, "--check", "--dtype", "bfloat16", "--tol", "0.1") == 0
  assert json.loads((out / "bge_jax.json").read_text())["config"]["param_dtype"] == "bfloat16"


def test_overwrite_replaces_previous_output_only(tmp_path, hf_folder, capsys):
  src = hf_folder("bert", 5)
  out = tmp_path / "out" / "ckpt"
  assert cli("hf-to-jax", src, out) == 0
  before = (out / "bge_jax.json").read_text()
  line = assert_refused(capsys, cli("hf-to-jax", src, out), None, str(out), "--overwrite")
  assert "already exists" in line and (out / "bge_jax.json").read_text() == before
  assert cli("hf-to-jax", src, out, "--overwrite") == 0
  assert_clean(tmp_path / "out" / "none")
  capsys.readouterr()

  other = tmp_path / "out" / "notes"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  assert_refused(capsys, cli("hf-to-jax", src, other, "--overwrite"), None, str(other),
                 "not a bge-jax params folder")
  assert (other / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# Refusals: exit 2, one `error:` line naming the thing, nothing written
# ---------------------------------------------------------------------------------------------

def _edit_safetensors(folder, edit) -> None:
  path = folder / "model.safetensors"
  state = load_file(path)
  edit(state)
  save_file(state, path, metadata={"format": "pt"})


def test_refuses_missing_source(tmp_path, capsys):
  out = tmp_path / "out" / "x"
  assert_refused(capsys, cli("hf-to-jax", tmp_path / "nope", out), out, "nope",
                 "no such file or folder")
  assert_refused(capsys, cli("jax-to-hf", tmp_path / "nope", out), out, "nope",
                 "no such file or folder")


@pytest.mark.parametrize("case", ["no_config", "no_weights", "unknown_key", "missing_key",
                                  "shape", "not_bert"])
def test_refuses_bad_hf_sources(tmp_path, hf_folder, capsys, case):
  src = hf_folder("bert", 6)
  out = tmp_path / "out" / "ckpt"
  if case == "no_config":
    (src / "config.json").unlink()
    needles = (str(src), "config.json")
  elif case == "no_weights":
    (src / "model.safetensors").unlink()
    needles = (str(src), "no weights", "model.safetensors")
  elif case == "unknown_key":
    _edit_safetensors(src, lambda s: s.update({"classifier.weight": np.ones((2, 3), np.float32)}))
    needles = ("classifier.weight", "--ignore-unknown")
  elif case == "missing_key":
    _edit_safetensors(src, lambda s: s.pop("encoder.layer.0.output.dense.bias"))
    needles = ("missing", "encoder.layer.0.output.dense.bias")
  elif case == "shape":
    hidden = json.loads((src / "config.json").read_text())["hidden_size"]
    _edit_safetensors(src, lambda s: s.update(
        {"embeddings.LayerNorm.weight": np.ones((hidden + 1,), np.float32)}))
    needles = ("embeddings.LayerNorm.weight", f"({hidden + 1},)", f"({hidden},)")
  else:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="roberta", architectures=["RobertaModel"])
    (src / "config.json").write_text(json.dumps(cfg))
    needles = ("config.json", "model_type='roberta'", "BERT only")
  assert_refused(capsys, cli("hf-to-jax", src, out, "--check"), out, *needles)


def test_ignore_unknown_drops_with_a_warning(tmp_path, hf_folder, capsys):
  src = hf_folder("bert", 6)
  _edit_safetensors(src, lambda s: s.update({"classifier.weight": np.ones((2, 3), np.float32)}))
  out = tmp_path / "out" / "ckpt"
  assert cli("hf-to-jax", src, out, "--ignore-unknown") == 0
  err = capsys.readouterr().err
  assert err.startswith("warning: ") and "classifier.weight" in err


def test_refuses_bad_checkpoints(tmp_path, hf_folder, capsys):
  src = hf_folder("bert_mlm", 7)
  ckpt = tmp_path / "ckpt"
  assert cli("hf-to-jax", src, ckpt) == 0
  capsys.readouterr()
  out = tmp_path / "out" / "hf"

  # An HF folder given to jax-to-hf, and a checkpoint given to hf-to-jax.
  assert_refused(capsys, cli("jax-to-hf", src, out), out, str(src), "bge_jax.json", "hf-to-jax")
  assert_refused(capsys, cli("hf-to-jax", ckpt, out), out, str(ckpt), "jax-to-hf")

  # bge_jax.json that does not describe params/: both shapes and the entry are named.
  meta = json.loads((ckpt / "bge_jax.json").read_text())
  size = meta["config"]["intermediate_size"]
  meta["config"]["intermediate_size"] = size + 8
  (ckpt / "bge_jax.json").write_text(json.dumps(meta))
  assert_refused(capsys, cli("jax-to-hf", ckpt, out), out, "layers_0/intermediate/bias",
                 f"({size},)", f"({size + 8},)", "bge_jax.json")
  meta["config"].update(intermediate_size=size, num_layers=meta["config"]["num_layers"] + 1)
  (ckpt / "bge_jax.json").write_text(json.dumps(meta))
  assert_refused(capsys, cli("jax-to-hf", ckpt, out), out, "lack", "layers_")
  meta["config"]["num_layers"] -= 1
  (ckpt / "bge_jax.json").write_text(json.dumps(meta))

  # A failure in the middle of writing (a tokenizer/ folder without files) leaves nothing.
  (ckpt / "tokenizer").mkdir()
  assert_refused(capsys, cli("jax-to-hf", ckpt, out), out, "tokenizer", "no tokenizer files")
  (ckpt / "tokenizer").rmdir()

  # No params/ at all.
  os.rename(ckpt / "params", tmp_path / "params.moved")
  assert_refused(capsys, cli("jax-to-hf", ckpt, out), out, str(ckpt / "params"), "missing")
  os.rename(tmp_path / "params.moved", ckpt / "params")
  assert cli("jax-to-hf", ckpt, out) == 0


def test_refuses_output_inside_out_of_source(tmp_path, hf_folder, capsys):
  src = hf_folder("bert", 1)
  assert_refused(capsys, cli("hf-to-jax", src, src, "--overwrite"), None, "is SRC")
  assert (src / "config.json").is_file()


def test_check_without_torch_says_how_to_install(tmp_path, hf_folder, capsys, monkeypatch):
  src = hf_folder("bert", 1)
  out = tmp_path / "out" / "ckpt"
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  assert_refused(capsys, cli("hf-to-jax", src, out, "--check"), out, "torch==2.13.0", "--check")
  assert_refused(capsys, cli("jax-to-hf", src, out, "--check"), out, "torch==2.13.0")


def test_usage_errors_and_help(capsys):
  assert_refused(capsys, cli(), None, "required")
  assert_refused(capsys, cli("jax-to-hf", "a", "b", "--pooling", "max"), None, "--pooling",
                 "--help")
  assert cli("--help") == 0
  top = capsys.readouterr().out
  for needle in ("hf-to-jax", "jax-to-hf", "bge_jax.json", "params/", "tokenizer/", "orbax",
                 "sentence-transformers", "RetroMAE", "exit status"):
    assert needle in top, needle
  assert cli("hf-to-jax", "--help") == 0
  sub = capsys.readouterr().out
  for needle in ("--check", "--ignore-unknown", "--overwrite", "--dtype", "--tol", "bge_jax.json"):
    assert needle in sub, needle
  assert cli("jax-to-hf", "--help") == 0
  sub = capsys.readouterr().out
  for needle in ("--no-sentence-transformers", "--pooling", "--check", "params/"):
    assert needle in sub, needle


def test_script_runs_as_a_subprocess_from_any_cwd(tmp_path, hf_folder):
  src = hf_folder("bert_mlm", 2)
  env = {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "HF_HUB_OFFLINE": "1"}
  env.pop("PYTHONPATH", None)
  assert src == tmp_path / "bert_mlm-2"  # ../bert_mlm-2, seen from workdir below
  workdir = tmp_path / "elsewhere"
  workdir.mkdir()
  ok = subprocess.run([sys.executable, str(SCRIPT), "hf-to-jax", "../bert_mlm-2", "ckpt"],
                      cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr
  assert "wrote: " in ok.stdout and (workdir / "ckpt" / "bge_jax.json").is_file()
  bad = subprocess.run([sys.executable, str(SCRIPT), "jax-to-hf", "ckpt", "ckpt/../ckpt"],
                       cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
  assert "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------------------------
# Real weights
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_all_minilm_l6_v2_round_trip(tmp_path, capsys, minilm_path):
  from sentence_transformers import SentenceTransformer

  ckpt, hf = tmp_path / "ckpt", tmp_path / "hf"
  assert cli("hf-to-jax", minilm_path, ckpt, "--check") == 0
  stdout = capsys.readouterr().out
  print(stdout)
  assert "family sentence_transformers, 6 layers, hidden 384" in stdout
  assert "sample sentences tokenised by" in stdout
  assert max(deltas(stdout).values()) < 1e-4
  assert cli("jax-to-hf", ckpt, hf, "--check", "--max-seq-length", "256") == 0
  stdout = capsys.readouterr().out
  print(stdout)
  assert max(deltas(stdout).values()) < 1e-4 and "mean pooling, Normalize" in stdout

  texts = ["A man is eating food.", "The new movie is awesome", "这是一个测试句子"]
  theirs = SentenceTransformer(minilm_path, device="cpu")
  ours = SentenceTransformer(str(hf), device="cpu")
  assert ours[1].pooling_mode == "mean" and ours.max_seq_length == 256
  np.testing.assert_allclose(ours.encode(texts), theirs.encode(texts), atol=1e-6)
