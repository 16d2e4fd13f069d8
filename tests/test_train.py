"""The trainer end to end on stage 1 (RetroMAE): loss goes down, resume continues exactly, exports."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bge_jax import config_files
from conftest import REPO, make_corpus, make_tokenizer


def load_config(name: str, arg: str = ""):
  return config_files.load(f"{name}:{arg}")


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return make_corpus(root / "train.jsonl", 256), make_tokenizer(root / "tok")


def tiny_retromae(corpus, tokenizer, steps, **kw):
  c = load_config("retromae", "tiny")
  c.tokenizer = str(tokenizer)
  c.data.train = str(corpus)
  c.data.max_length = 48
  c.model.max_position_embeddings = 64
  c.batch_size = 8
  c.num_train_steps = steps
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 2
  c.log_every_steps = 1
  c.checkpoint.every_steps = 1000
  return override(c, **kw)


def override(c, **kw):
  """Sets dotted keys ("optimizer.lr") on a ConfigDict, as --config.optimizer.lr would."""
  from bge_jax import config_files
  return config_files.set_keys(c, kw)


def losses(workdir):
  from bge_jax.train.metrics import read_metrics
  return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


def test_loss_falls_and_exports(corpus_and_tokenizer, tmp_path):
  from bge_jax import convert
  from bge_jax.train.loop import train

  corpus, tok = corpus_and_tokenizer
  workdir = tmp_path / "run"
  train(tiny_retromae(corpus, tok, 40, **{"optimizer.lr": 5e-3}), str(workdir))
  curve = losses(workdir)
  first, last = np.mean([curve[s] for s in range(1, 6)]), np.mean([curve[s] for s in range(36, 41)])
  assert last < 0.8 * first, (first, last)

  rows = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
  for key in ("loss", "encoder_loss", "decoder_loss", "encoder_accuracy", "lr", "grad_norm",
              "tokens_per_sec"):
    assert key in rows[-1]
  assert os.listdir(workdir / "tb"), "TensorBoard event files are written"

  export = workdir / "export" / "hf"
  config, params = convert.load_hf(str(export))
  assert config.hf_family == "bert_mlm" and config.add_mlm_head
  full_config, full = convert.load_hf(str(export / convert.RETROMAE_STATE_FILE))
  assert full_config.hf_family == "retromae" and "decoder" in full
  from transformers import AutoTokenizer
  assert (AutoTokenizer.from_pretrained(str(export)).get_vocab()
          == AutoTokenizer.from_pretrained(str(tok)).get_vocab())


def test_resume_matches_uninterrupted(corpus_and_tokenizer, tmp_path):
  """Save at step 3, lose everything after it, rerun: steps 4-6 equal the uninterrupted run bit
  for bit, and metrics.jsonl drops the lost timeline's rows 4-6 before logging them again.
  (SIGKILL / SIGTERM / corrupt-checkpoint resumes of launch/train.py: tests/test_reliability.py.)"""
  from bge_jax.train.loop import train

  corpus, tok = corpus_and_tokenizer
  straight = tmp_path / "straight"
  train(tiny_retromae(corpus, tok, 6, export=False), str(straight))

  resumed = tmp_path / "resumed"
  train(tiny_retromae(corpus, tok, 6, export=False, **{"checkpoint.every_steps": 3,
                                                        "checkpoint.keep": 5}), str(resumed))
  shutil.rmtree(resumed / "checkpoints" / "6")  # as if killed after the step-3 save
  train(tiny_retromae(corpus, tok, 6, export=False, **{"checkpoint.every_steps": 3,
                                                        "checkpoint.keep": 5}), str(resumed))
  rows = [json.loads(r) for r in (resumed / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  a, b = losses(straight), losses(resumed)
  assert [b[s] for s in range(1, 7)] == [a[s] for s in range(1, 7)]


def test_resume_with_another_process_count_warns(corpus_and_tokenizer, tmp_path, caplog):
  from bge_jax.train.loop import train

  corpus, tok = corpus_and_tokenizer
  run = tmp_path / "run"
  train(tiny_retromae(corpus, tok, 2, export=False, **{"checkpoint.every_steps": 2}), str(run))
  info = json.loads((run / "run_info.json").read_text())
  assert info["processes"] == 1
  (run / "run_info.json").write_text(json.dumps(dict(info, processes=2)))  # as if 2 hosts ran it
  with caplog.at_level(logging.WARNING, logger="bge_jax.train"):
    # 3 steps instead of 2 changes the lr schedule: a change the resume must be told to accept.
    train(tiny_retromae(corpus, tok, 3, export=False, **{"checkpoint.every_steps": 2}), str(run),
          accept_config_changes=True)
  warned = [r.getMessage() for r in caplog.records if "processes" in r.getMessage()]
  assert len(warned) == 1 and "at step 2 with 1 processes; the run so far had 2" in warned[0]
  assert "resume with 2 processes" in warned[0]
  assert json.loads((run / "run_info.json").read_text())["processes"] == 1


@pytest.mark.parametrize("backend,dtype,expected", [
    ("cpu", None, "float32"), ("gpu", None, "bfloat16"), ("tpu", None, "bfloat16"),
    ("gpu", "float32", "float32"), ("cpu", "bfloat16", "bfloat16")])
def test_compute_dtype_defaults_to_bf16_on_accelerators(corpus_and_tokenizer, monkeypatch,
                                                         backend, dtype, expected):
  from bge_jax.train import init

  corpus, tok = corpus_and_tokenizer
  config = tiny_retromae(corpus, tok, 1)
  if dtype is not None:
    config.model.dtype = dtype
  monkeypatch.setattr(init.jax, "default_backend", lambda: backend)
  model_config, _, _ = init.model_config_and_weights(config, init.load_tokenizer(config))
  assert model_config.dtype == expected and model_config.param_dtype == "float32"


@pytest.mark.parametrize("backend,expected", [("cpu", "float32"), ("gpu", "bfloat16")])
def test_init_from_a_checkpoint_takes_the_platforms_compute_dtype(
    corpus_and_tokenizer, tmp_path, monkeypatch, backend, expected):
  """A checkpoint's config records the compute dtype of the run that saved it (bf16 from a GPU
  run); a run initialised from it follows its own platform's default, not that record."""
  import jax

  from bge_jax import weights
  from bge_jax.config import preset
  from bge_jax.models import bert
  from bge_jax.train import init

  corpus, tok = corpus_and_tokenizer
  config = tiny_retromae(corpus, tok, 1)
  saved = preset("tiny", vocab_size=len(init.load_tokenizer(config)), dtype="bfloat16",
                 add_mlm_head=True, add_decoder=True, hf_family="retromae")
  params, _ = bert.init(saved, jax.random.key(0))
  config.model.init_from = weights.save_params(str(tmp_path / "ckpt"), params, saved)
  monkeypatch.setattr(init.jax, "default_backend", lambda: backend)
  model_config, loaded, _ = init.model_config_and_weights(config, init.load_tokenizer(config))
  assert model_config.dtype == expected and loaded is not None


def test_the_pallas_attention_kernel_is_gpu_only(corpus_and_tokenizer, tmp_path, monkeypatch,
                                                 caplog):
  """model.attention_impl='pallas' set off GPU is refused naming the key; one recorded in an
  init_from checkpoint (a GPU run's) gives way to the default there, and is kept on GPU."""
  import jax

  from bge_jax import weights
  from bge_jax.config import preset
  from bge_jax.models import bert
  from bge_jax.train import init

  corpus, tok = corpus_and_tokenizer
  config = tiny_retromae(corpus, tok, 1)
  config.model.attention_impl = "pallas"
  with pytest.raises(init.ConfigError, match="model.attention_impl='pallas' is a GPU"):
    init.model_config_and_weights(config, init.load_tokenizer(config))
  monkeypatch.setattr(init.jax, "default_backend", lambda: "gpu")
  assert init.model_config_and_weights(
      config, init.load_tokenizer(config))[0].attention_impl == "pallas"

  config = tiny_retromae(corpus, tok, 1)
  saved = preset("tiny", vocab_size=len(init.load_tokenizer(config)), attention_impl="pallas",
                 add_mlm_head=True, add_decoder=True, hf_family="retromae")
  config.model.init_from = weights.save_params(
      str(tmp_path / "ckpt"), bert.init(saved, jax.random.key(0))[0], saved)
  assert init.model_config_and_weights(
      config, init.load_tokenizer(config))[0].attention_impl == "pallas"
  monkeypatch.setattr(init.jax, "default_backend", lambda: "cpu")
  with caplog.at_level(logging.INFO, logger="bge_jax.train"):
    model_config, loaded, _ = init.model_config_and_weights(config, init.load_tokenizer(config))
  assert model_config.attention_impl is None and loaded is not None
  assert any("attention_impl='pallas' (GPU only)" in r.getMessage() for r in caplog.records)


def test_a_step_larger_than_the_device_is_refused_before_it_runs(corpus_and_tokenizer, tmp_path,
                                                                 monkeypatch, caplog):
  """Where the device reports a memory limit (GPU, TPU), a compiled step that XLA says needs more
  is refused with both sizes and the config keys that shrink it, before any step runs; one
  within 5% of the limit trains with a warning."""
  from bge_jax import memory
  from bge_jax.train.loop import train

  corpus, tok = corpus_and_tokenizer
  needs, peak_bytes = [], memory.peak_bytes
  monkeypatch.setattr(memory, "peak_bytes", lambda c: needs.append(peak_bytes(c)) or needs[-1])
  monkeypatch.setattr(memory, "device_limit", lambda device=None: 2**20)  # a 1 MiB device
  with pytest.raises(MemoryError) as e:
    train(tiny_retromae(corpus, tok, 2, export=False), str(tmp_path / "run"))
  msg = str(e.value)
  assert re.search(r"the train step needs \d+\.\d MiB per device .* of the device's "
                   r"1\.0 MiB: it cannot run", msg), msg
  for key in ("config.batch_size (now 8)", "config.model.remat_policy='full'",
              "config.loss.gradcache_chunk", "config.mesh.fsdp"):
    assert key in msg, (key, msg)
  assert not (tmp_path / "run" / "metrics.jsonl").exists()
  ckpts = tmp_path / "run" / "checkpoints"
  assert not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir())
  # The same run on a device 3% larger than the step trains, with a warning.
  assert needs[0] > 2**20
  monkeypatch.setattr(memory, "device_limit", lambda device=None: int(needs[0] / 0.97))
  with caplog.at_level(logging.WARNING, logger="bge_jax.train"):
    train(tiny_retromae(corpus, tok, 2, export=False), str(tmp_path / "run"))
  assert sorted(losses(tmp_path / "run")) == [1, 2]
  assert "close to the limit, it may run out of memory; if it does, lower config.batch_size" \
      in caplog.text


def test_process_count_check_is_quiet_when_unchanged_or_unknown(tmp_path, caplog):
  from bge_jax.train.run_info import warn_if_processes_changed

  with caplog.at_level(logging.WARNING, logger="bge_jax.train"):
    warn_if_processes_changed(str(tmp_path), 5)  # no run_info.json
    (tmp_path / "run_info.json").write_text('{"processes": 1}')
    warn_if_processes_changed(str(tmp_path), 5)
    (tmp_path / "run_info.json").write_text('{"processes": 1')  # torn
    warn_if_processes_changed(str(tmp_path), 5)
  assert not caplog.records


def test_grad_accumulation_matches_full_batch(corpus_and_tokenizer, tmp_path):
  """Without dropout, 2 micro-batches give the same first update as the whole batch."""
  from bge_jax.train.loop import train

  corpus, tok = corpus_and_tokenizer
  one = tmp_path / "one"
  two = tmp_path / "two"
  common = dict(export=False, dropout=False, batch_size=16)
  train(tiny_retromae(corpus, tok, 2, **common), str(one))
  train(tiny_retromae(corpus, tok, 2, grad_accum_steps=2, **common), str(two))
  a, b = losses(one), losses(two)
  # Step 1's reported loss is the micro-batch mean; per-micro token counts differ, so compare
  # the update through step 2's loss, which depends on step 1's gradient.
  np.testing.assert_allclose(b[2], a[2], rtol=2e-2)


def test_cli_errors_name_the_key(corpus_and_tokenizer, tmp_path):
  corpus, tok = corpus_and_tokenizer
  base = [sys.executable, str(REPO / "launch" / "train.py"),
          f"--config={REPO / 'configs' / 'retromae.py'}:tiny", f"--workdir={tmp_path / 'w'}",
          f"--config.tokenizer={tok}", f"--config.data.train={corpus}"]
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
  bad_key = subprocess.run(base + ["--config.optimizer.lrr=1"], capture_output=True, text=True,
                           env=env, timeout=300)
  assert bad_key.returncode != 0
  assert "lrr" in bad_key.stderr and "lr" in bad_key.stderr
  bad_len = subprocess.run(base + ["--config.data.max_length=4096"], capture_output=True,
                           text=True, env=env, timeout=300)
  assert bad_len.returncode == 2
  assert "config.data.max_length" in bad_len.stderr and "Traceback" not in bad_len.stderr


def test_overlong_texts_error_names_the_line_or_are_skipped(corpus_and_tokenizer, tmp_path):
  from bge_jax.train.loop import train

  _, tok = corpus_and_tokenizer
  corpus = tmp_path / "mixed.jsonl"
  rows = [{"text": "alpha beta gamma."}] * 20
  rows[6] = {"text": " ".join(["river"] * 100)}
  corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  with pytest.raises(ValueError, match=r"mixed\.jsonl:7: .*102 tokens.*max_length=48"):
    train(tiny_retromae(corpus, tok, 1, **{"data.overlong": "error"}), str(tmp_path / "a"))
  assert not (tmp_path / "a" / "checkpoints").exists() or not os.listdir(tmp_path / "a" / "checkpoints")
  train(tiny_retromae(corpus, tok, 1, export=False, **{"data.overlong": "skip"}), str(tmp_path / "b"))
  info = json.loads((tmp_path / "b" / "run_info.json").read_text())
  assert "19 texts" in info["data"] and "1 overlong texts skipped" in info["data"]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["minilm", "retromae_state"])
def test_init_from_pretrained_keeps_weights(source, corpus_and_tokenizer, tmp_path, request):
  """lr=0 for one step: the export must hold the source's tensors bit-exactly, plus new parts."""
  from bge_jax import convert
  from bge_jax.train.loop import train
  from conftest import make_hf_folder

  corpus, tok = corpus_and_tokenizer
  if source == "minilm":
    init, tokenizer = request.getfixturevalue("minilm_path"), ""
  else:
    init, tokenizer = str(make_hf_folder(tmp_path, "retromae", seed=3)), str(tok)
  c = tiny_retromae(corpus, tok, 1, **{"optimizer.lr": 0.0, "model.init_from": init})
  c.tokenizer = tokenizer
  c.model.max_position_embeddings = None
  c.data.max_length = 32  # the random RetroMAE source has 40 positions
  train(c, str(tmp_path / "run"))
  src = convert.to_hf_state_dict(*reversed(convert.load_hf(init)))
  out_config, out = convert.load_hf(str(tmp_path / "run" / "export" / "hf" / convert.RETROMAE_STATE_FILE))
  exported = convert.to_hf_state_dict(out, out_config)
  prefix = "" if source == "retromae_state" else "lm.bert."
  compared = 0
  for key, value in src.items():
    np.testing.assert_array_equal(exported[prefix + key], value, err_msg=key)
    compared += 1
  assert compared == len(src)
  assert any(k.startswith("c_head.") for k in exported) and "lm.cls.predictions.bias" in exported


@pytest.mark.slow
def test_bge_small_shaped_step_runs(corpus_and_tokenizer, tmp_path, minilm_path):
  """Two stage-1 steps at bge-small-en shapes (12 x 384, vocab 30522) with per-layer remat."""
  from bge_jax.train.loop import train

  corpus, _ = corpus_and_tokenizer
  c = tiny_retromae(corpus, minilm_path, 2, export=False,
                    **{"model.remat_policy": "full"})
  c.model.preset = "bge-small-en"
  c.model.max_position_embeddings = None
  c.data.max_length = 64
  train(c, str(tmp_path / "small"))
  info = json.loads((tmp_path / "small" / "run_info.json").read_text())
  assert info["model"]["num_layers"] == 12 and info["model"]["hidden_size"] == 384
  assert info["num_params"] > 33_000_000
  curve = losses(tmp_path / "small")
  assert sorted(curve) == [1, 2] and all(np.isfinite(v) for v in curve.values())


def test_clip_by_global_norm_matches_optax():
  """`state.clip_by_global_norm` (one scalar multiply, so XLA fuses it into Adam's moment
  updates) against `optax.clip_by_global_norm`: the same state, the same clipped gradients
  within float32 rounding above the threshold, the gradients unchanged below it, NaN for a NaN
  norm; and the whole AdamW chain of `make_optimizer` keeps optax's state structure."""
  import jax
  import jax.numpy as jnp
  import optax

  from bge_jax.train import state as state_lib

  rs = np.random.RandomState(0)
  grads = {"a": {"kernel": jnp.asarray(rs.randn(40, 30), jnp.float32)},
           "b": {"bias": jnp.asarray(rs.randn(30), jnp.float32)}}
  norm = float(optax.global_norm(grads))
  for max_norm in (norm / 7, norm * 2):
    ours, ref = state_lib.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(ref.init(grads))
    got = jax.jit(ours.update)(grads, ours.init(grads))[0]
    want = ref.update(grads, ref.init(grads))[0]
    for g, w, x in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(grads)):
      if max_norm > norm:
        np.testing.assert_array_equal(np.asarray(g), np.asarray(x))
      else:
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=0)
    if max_norm < norm:
      assert abs(float(optax.global_norm(got)) - max_norm) < 1e-5 * max_norm
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
  clipped = state_lib.clip_by_global_norm(1.0).update(bad, optax.EmptyState())[0]
  assert all(np.isnan(np.asarray(g)).all() for g in jax.tree.leaves(clipped))
  opt = {"lr": 1e-3, "warmup_steps": 1, "weight_decay": 0.01, "clip_norm": 1.0}
  tx, _ = state_lib.make_optimizer(opt, 10)
  reference = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.constant_schedule(1e-3), weight_decay=0.01, mask=state_lib.decay_mask))
  assert jax.tree.structure(tx.init(grads)) == jax.tree.structure(reference.init(grads))
