"""The trainer on stages 2 and 3: loss falls, GradCache changes memory not results, exports load."""

import json
import random
import re
import types

import numpy as np
import pytest

from conftest import WORDS, make_tokenizer
from test_train import load_config, losses, override


def make_rows(path, n, seed=0, negatives=3):
  """FlagEmbedding rows: the positive repeats the query's words, negatives use other words."""
  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(n):
      words = rng.sample(WORDS, 4)
      others = [w for w in WORDS if w not in words]
      row = {"query": " ".join(words[:3]),
             "pos": [" ".join(words + rng.sample(others, 3))],
             "neg": [" ".join(rng.sample(others, 7)) for _ in range(negatives)]}
      f.write(json.dumps(row) + "\n")
  return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pairs")
  return make_rows(root / "train.jsonl", 256), make_tokenizer(root / "tok")


def tiny(stage, rows, tok, steps, **kw):
  c = load_config(stage, "tiny")
  c.tokenizer = str(tok)
  c.data.train = str(rows)
  c.data.query_max_length = 8
  c.data.passage_max_length = 16
  c.model.max_position_embeddings = 32
  c.batch_size = 16
  c.num_train_steps = steps
  c.optimizer.warmup_steps = 2
  c.log_every_steps = 1
  return override(c, **kw)


def test_stage2_loss_falls_and_exports_sentence_transformers(data, tmp_path):
  from sentence_transformers import SentenceTransformer

  from bge_jax import Encoder
  from bge_jax.train.loop import train

  rows, tok = data
  workdir = tmp_path / "s2"
  sts = tmp_path / "sts.tsv"
  sts.write_text("alpha beta gamma\talpha beta gamma delta\t5\nriver city\tpaper music\t0\n"
                 "ocean light\tocean light stone\t4\nmarket garden\tsearch index\t1\n")
  # tau 0.05 and no dropout: a from-scratch tiny model at tau 0.02 first collapses to chance.
  train(tiny("contrastive", rows, tok, 40, dropout=False,
             **{"optimizer.lr": 1e-3, "loss.temperature": 0.05, "eval.sts": str(sts),
                "eval.every_steps": 20, "peak_tflops": 0.5}), str(workdir))
  evals = {r["step"]: r["eval/sts/sts"] for r in
           (json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines())
           if "eval/sts/sts" in r}
  assert sorted(evals) == [0, 20, 40] and all(-1 <= v <= 1 for v in evals.values())
  # Model FLOPs are logged every step; MFU against config.peak_tflops per device (8 devices).
  import jax
  logged = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in logged if "loss" in r]
  assert all(r["model_tflops_per_sec"] > 0 for r in logged)
  np.testing.assert_allclose([r["mfu"] for r in logged],
                             [r["model_tflops_per_sec"] / (0.5 * jax.device_count()) for r in logged],
                             rtol=1e-6)
  curve = losses(workdir)
  first, last = np.mean([curve[s] for s in range(1, 4)]), np.mean([curve[s] for s in range(38, 41)])
  assert first > 2.5 and last < 0.5 * first, (first, last)  # chance is ln(16) = 2.77
  export = workdir / "export" / "hf"
  st = SentenceTransformer(str(export), device="cpu")
  pooling = json.loads((export / "1_Pooling" / "config.json").read_text())
  assert pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_mean_tokens"]
  assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize"]
  texts = ["alpha beta gamma", "river mountain city ocean"]
  ours = Encoder.from_hf(str(export), pooling="cls").encode(texts)
  np.testing.assert_allclose(st.encode(texts), ours, atol=1e-5)


def test_stage3_hard_negatives_with_gradcache_matches_plain(data, tmp_path):
  """Group size 4, instruction on queries; GradCache chunk 4 gives the same losses (no dropout)."""
  from bge_jax.train.loop import train

  rows, tok = data
  common = {"data.group_size": 4, "dropout": False, "export": False}
  train(tiny("finetune", rows, tok, 3, **common), str(tmp_path / "plain"))
  train(tiny("finetune", rows, tok, 3, **common, **{"loss.gradcache_chunk": 4}),
        str(tmp_path / "cached"))
  # Packed (rows sized from the first batches) and GradCache together: the same losses again.
  train(tiny("finetune", rows, tok, 3, **common, **{"loss.gradcache_chunk": 4, "data.pack": True}),
        str(tmp_path / "packed"))
  a, b, c = (losses(tmp_path / name) for name in ("plain", "cached", "packed"))
  np.testing.assert_allclose([b[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], rtol=1e-5)
  np.testing.assert_allclose([c[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], rtol=1e-5)
  info = json.loads((tmp_path / "cached" / "run_info.json").read_text())
  assert info["stage"] == "finetune"


def test_no_negatives_at_all_is_refused(data):
  """in_batch_negatives=False with groups of one passage: every query's loss would be 0."""
  from bge_jax import contrastive
  from bge_jax.train.init import load_tokenizer

  rows, tok = data
  config = tiny("contrastive", rows, tok, 1, **{"loss.in_batch_negatives": False})
  model = types.SimpleNamespace(max_position_embeddings=32)
  with pytest.raises(ValueError, match=r"config\.loss\.in_batch_negatives=False with "
                                       r"config\.data\.group_size=1 .* loss is 0"):
    contrastive.CONTRASTIVE.batcher(config, load_tokenizer(config), model, 0, 1)
  ok = override(config, **{"data.group_size": 2})
  contrastive.CONTRASTIVE.batcher(ok, load_tokenizer(ok), model, 0, 1)


def test_pack_refusals(data):
  """data.pack refuses grad accumulation; sizing rows for several processes needs them running
  (or an explicit fraction); there a batch that does not fit stops with the key to raise."""
  from bge_jax import contrastive
  from bge_jax.train.init import load_tokenizer

  rows, tok = data
  config = tiny("finetune", rows, tok, 3, **{"data.group_size": 4, "data.pack": True})
  tokenizer = load_tokenizer(config)
  stage = contrastive.FINETUNE
  model = types.SimpleNamespace(max_position_embeddings=32)
  with pytest.raises(ValueError, match=r"for 2 processes needs them running .* pass "
                                       r"config\.data\.pack_rows_fraction"):
    stage.batcher(config, tokenizer, model, 0, 2)  # one real process: no all-gather to do
  with pytest.raises(ValueError, match=r"grad_accum_steps=2"):
    stage.batcher(override(config.copy_and_resolve_references(), grad_accum_steps=2), tokenizer,
                  model, 0, 1)
  small = override(config, **{"data.pack_rows_fraction": 0.125})
  batcher = stage.batcher(small, tokenizer, model, 1, 2)
  assert batcher.pack_rows == {"query": 8, "passage": 8}  # 1/8 of 8 and 32, 8 devices
  with pytest.raises(ValueError, match=r"step 0 .*more than the 8 allowed; raise "
                                       r"data\.pack_rows_fraction.*2 processes .* cannot grow"
                                       r".* data\.pack_rows_fraction of at least 1\.0 "):
    batcher(0)
  with pytest.raises(ValueError, match="one process only"):
    batcher.enable_packing(batcher.pack_rows, grow_multiple=8)


def _rows_of_length(path, n, words: tuple[int, int], seed=0):
  """FlagEmbedding rows whose passages have words[0]..words[1] words."""
  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(n):
      text = lambda: " ".join(rng.sample(WORDS, rng.randint(*words)))  # noqa: E731
      f.write(json.dumps({"query": " ".join(rng.sample(WORDS, 3)), "pos": [text()],
                          "neg": [text()]}) + "\n")
  return path


def test_packed_batches_that_outgrow_their_rows_grow_on_one_process(data, tmp_path, caplog,
                                                                    monkeypatch):
  """With one process, a batch needing more packed rows than budgeted gets more (another
  compiled step) instead of stopping the run: the losses stay the padded run's."""
  import logging

  from bge_jax import contrastive
  from bge_jax.data import packing
  from bge_jax.train.init import load_tokenizer
  from bge_jax.train.loop import train

  _, tok = data
  # Two datasets (a batch comes from one): short passages pack ~3 to a row, long ones 1.
  rows = ",".join(str(_rows_of_length(tmp_path / f"{name}.jsonl", 64, words, seed))
                  for seed, (name, words) in enumerate([("short", (1, 2)), ("long", (9, 12))]))
  common = {"data.group_size": 2, "dropout": False, "export": False}
  config = tiny("finetune", rows, tok, 4, **common)
  probe = contrastive.FINETUNE.batcher(config, load_tokenizer(config), types.SimpleNamespace(
      max_position_embeddings=32), 0, 1)
  need = [probe.packed_rows_needed([s])["passage"] for s in range(4)]
  budget = packing.rows_for(32, min(need) / 32, multiple=8)  # some steps fit, some do not
  assert max(need) > budget, (need, budget)
  caplog.set_level(logging.WARNING)
  train(tiny("finetune", rows, tok, 4, **common, **{
      "data.pack": True, "data.pack_rows_fraction": budget / 32}), str(tmp_path / "packed"))
  assert "compiling the train step for new batch shapes" in caplog.text
  assert re.search(r"that step needs \d+\.\d MiB per device \(the first one: \d+\.\d MiB",
                   caplog.text)
  assert "more than the {'query': " in caplog.text  # the batcher's warning names the budget
  train(tiny("finetune", rows, tok, 4, **common), str(tmp_path / "padded"))
  a, b = losses(tmp_path / "padded"), losses(tmp_path / "packed")
  np.testing.assert_allclose([b[s] for s in range(1, 5)], [a[s] for s in range(1, 5)], rtol=1e-5)

  # On a device with room for the first step's shapes only (a GPU sized to the budget), a step
  # compiled for new shapes is refused with its size and the packing keys; the checkpoints of
  # the steps before it stay.
  from bge_jax import memory
  limits = iter([None])  # the first compiled step: no limit reported; then a 1 MiB device
  monkeypatch.setattr(memory, "device_limit", lambda device=None: next(limits, 2**20))
  with pytest.raises(MemoryError) as e:
    train(tiny("finetune", rows, tok, 4, **common, **{
        "data.pack": True, "data.pack_rows_fraction": budget / 32, "checkpoint.every_steps": 1}),
        str(tmp_path / "small_device"))
  msg = str(e.value)
  assert re.search(r"compiled for a new packed batch shape .* needs \d+\.\d MiB per device "
                   r".* of the device's 1\.0 MiB: it cannot run", msg), msg
  assert "config.batch_size (now 16)" in msg and "checkpoints saved so far are kept" in msg
  saved = sorted(int(p.name) for p in (tmp_path / "small_device" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert saved and saved == list(range(1, len(saved) + 1)) and len(saved) < 4, saved


def test_stage2_from_stage1_export(data, tmp_path):
  """Stage 2 initialised from a BertForMaskedLM folder keeps the encoder, drops the MLM head."""
  from bge_jax import convert
  from bge_jax.train.loop import train
  from conftest import make_hf_folder

  rows, tok = data
  src = make_hf_folder(tmp_path, "bert_mlm", seed=5)
  c = tiny("contrastive", rows, tok, 1, **{"optimizer.lr": 0.0, "model.init_from": str(src)})
  c.model.max_position_embeddings = None
  train(c, str(tmp_path / "run"))
  src_config, src_params = convert.load_hf(str(src))
  out_config, out_params = convert.load_hf(str(tmp_path / "run" / "export" / "hf"))
  assert out_config.hf_family == "sentence_transformers" and not out_config.add_mlm_head
  for key in src_params["embeddings"]:
    for leaf in src_params["embeddings"][key]:
      np.testing.assert_array_equal(out_params["embeddings"][key][leaf],
                                    src_params["embeddings"][key][leaf])
  np.testing.assert_array_equal(out_params["layers_0"]["query"]["kernel"],
                                src_params["layers_0"]["query"]["kernel"])


def test_packed_process_shards_assemble_the_global_batch(data):
  """Two processes' packed shards, concatenated as make_array_from_process_local_data does,
  give the loss of the two padded shards concatenated: text slots point into the global rows."""
  import jax

  from bge_jax import contrastive
  from bge_jax.config import preset
  from bge_jax.models import bert
  from bge_jax.train.init import load_tokenizer

  rows, tok = data
  config = tiny("finetune", rows, tok, 3, **{"data.group_size": 2, "data.pack": True,
                                              "data.pack_rows_fraction": 0.75})
  tokenizer = load_tokenizer(config)
  model = preset("tiny", vocab_size=len(tokenizer), max_position_embeddings=32)
  shards = [contrastive.CONTRASTIVE.batcher(config, tokenizer, model, i, 2) for i in range(2)]
  assert shards[1].pack_rows == {"query": 8, "passage": 16}  # 0.75 of 8 and 16, 8 devices
  packed = [b(1) for b in shards]
  padded = [b.padded(1) for b in shards]
  assert packed[1]["passage_text_slot"].min() >= 16 * (16 // 2)  # after process 0's rows

  def glue(parts):
    return {k: np.concatenate([p[k] for p in parts]) if np.ndim(parts[0][k]) else parts[0][k]
            for k in parts[0]}

  params, _ = bert.init(model, jax.random.key(0))
  kw = dict(temperature=0.02, group_size=2)
  want = float(contrastive.loss(params, model, glue(padded), **kw)["loss"])
  got = float(contrastive.loss(params, model, glue(packed), **kw)["loss"])
  assert abs(got - want) <= 1e-5 * abs(want), (got, want)
  assert shards[0].real_tokens(packed[0]) == shards[0].real_tokens(padded[0])


def test_micro_batches_keep_whole_examples():
  """split_micro_batches: micro-batch i holds examples i, i+k, ... with all their rows (a query
  and its group of passages), and 0-d flags in every micro-batch."""
  from bge_jax.train.state import split_micro_batches

  n, g, k = 6, 3, 2
  batch = {"query_input_ids": np.arange(n)[:, None] * np.ones((1, 4), int),
           "passage_input_ids": np.repeat(np.arange(n), g)[:, None] * np.ones((1, 5), int),
           "teacher_scores": np.arange(n * g, dtype=float).reshape(n, g),
           "in_batch_negatives": np.asarray(1, np.int32)}
  micro = split_micro_batches(batch, k)
  for i in range(k):
    queries = np.asarray(micro["query_input_ids"][i][:, 0])
    np.testing.assert_array_equal(queries, np.arange(i, n, k))
    # Each query's g passages follow it, in order: the loss's reshape (b, g, d) finds its group.
    np.testing.assert_array_equal(np.asarray(micro["passage_input_ids"][i][:, 0]),
                                  np.repeat(queries, g))
    np.testing.assert_array_equal(micro["teacher_scores"][i], batch["teacher_scores"][i::k])
    assert int(micro["in_batch_negatives"][i]) == 1
  # One row per example (a RetroMAE batch): the rows i, i+k, ... as before.
  rows = split_micro_batches({"x": np.arange(8)}, 2)["x"]
  np.testing.assert_array_equal(rows, [[0, 2, 4, 6], [1, 3, 5, 7]])
  with pytest.raises(ValueError, match="does not split into 4 micro-batches"):
    split_micro_batches(batch, 4)


def test_grad_accumulation_in_stage3_matches_the_micro_batches_losses(data, tmp_path):
  """Stage 3 with grad_accum_steps=2 runs (the batch's 0-d flag split too) and keeps each query
  with its own hard negatives: scored within groups only, the losses are the whole batch's; with
  in-batch negatives the step's loss is the mean of the micro-batches' `contrastive.loss`."""
  import jax
  import optax

  from bge_jax import contrastive
  from bge_jax.config import preset
  from bge_jax.models import bert
  from bge_jax.train import state as state_lib
  from bge_jax.train.loop import train

  rows, tok = data
  common = {"data.group_size": 4, "dropout": False, "export": False,
            "data.no_in_batch_datasets": str(rows)}  # group-only scores: a per-query loss
  train(tiny("finetune", rows, tok, 3, **common), str(tmp_path / "one"))
  train(tiny("finetune", rows, tok, 3, grad_accum_steps=2, **common), str(tmp_path / "two"))
  a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
  np.testing.assert_allclose([b[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], rtol=1e-5)

  model = preset("tiny", vocab_size=64, max_position_embeddings=32)
  params, _ = bert.init(model, jax.random.key(0))
  rng = np.random.RandomState(0)
  n, g, k = 8, 3, 2
  batch = {"query_input_ids": rng.randint(5, 64, (n, 6)).astype(np.int32),
           "query_attention_mask": np.ones((n, 6), np.int32),
           "passage_input_ids": rng.randint(5, 64, (n * g, 10)).astype(np.int32),
           "passage_attention_mask": np.ones((n * g, 10), np.int32),
           "in_batch_negatives": np.asarray(1, np.int32)}
  kw = dict(temperature=0.05, group_size=g)
  loss_fn = lambda p, bt, r: contrastive.loss(p, model, bt, **kw)  # noqa: E731
  step = state_lib.make_train_step(loss_fn, optax.sgd(0.0), optax.constant_schedule(0.0), k)
  _, metrics = jax.jit(step)(state_lib.init_state(params, optax.sgd(0.0)), batch,
                             jax.random.key(0))
  want = []
  for i in range(k):  # the micro-batch by hand: queries i, i+k, ... and their passages
    q = np.arange(i, n, k)
    p = (q[:, None] * g + np.arange(g)).ravel()
    part = {key: (v[p] if key.startswith("passage") else v[q]) if v.ndim else v
            for key, v in batch.items()}
    want.append(float(contrastive.loss(params, model, part, **kw)["loss"]))
  assert abs(float(metrics["loss"]) - np.mean(want)) <= 1e-5 * abs(np.mean(want))


def test_a_run_workdir_initialises_the_next_stage(data, tmp_path, capsys):
  """model.init_from=<a stage-1 run's workdir>: the params of its newest checkpoint and its
  tokenizer, the same weights its export holds (a run stopped before exporting still serves)."""
  import jax

  from bge_jax import convert
  from bge_jax.train.loop import train
  from conftest import make_corpus
  from test_train import tiny_retromae

  rows, tok = data
  s1 = tmp_path / "s1"
  train(tiny_retromae(make_corpus(tmp_path / "corpus.jsonl", 64), tok, 2), str(s1))
  c = tiny("contrastive", rows, tok, 1, **{"optimizer.lr": 0.0, "model.init_from": str(s1),
                                           "tokenizer": ""})
  c.model.max_position_embeddings = None
  train(c, str(tmp_path / "s2"))
  assert f"from {s1} (training run, step 2, retromae, " in capsys.readouterr().out
  _, exported = convert.load_hf(str(s1 / "export" / "hf"))
  _, out = convert.load_hf(str(tmp_path / "s2" / "export" / "hf"))
  for part in ("embeddings", "layers_0", "layers_1"):
    for a, b in zip(jax.tree.leaves(out[part]), jax.tree.leaves(exported[part])):
      np.testing.assert_array_equal(a, b)


def test_jax_to_hf_exports_a_run_like_its_own_export(data, tmp_path, capsys):
  """`conversion/convert.py jax-to-hf <workdir>` writes what the run's export wrote (the same
  safetensors and sentence-transformers files); --step takes an earlier checkpoint."""
  import jax
  from safetensors.numpy import load_file

  from bge_jax import Encoder
  from bge_jax.train.loop import train
  from conversion import convert as convert_cmd

  rows, tok = data
  run = tmp_path / "run"
  train(tiny("contrastive", rows, tok, 3, **{"checkpoint.every_steps": 2, "checkpoint.keep": 5}),
        str(run))
  ours = tmp_path / "hf"
  assert convert_cmd.main(["jax-to-hf", str(run), str(ours)]) == 0
  assert "training run, step 3" in capsys.readouterr().out
  export = run / "export" / "hf"
  a, b = load_file(ours / "model.safetensors"), load_file(export / "model.safetensors")
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
               "tokenizer.json"):
    assert json.loads((ours / name).read_text()) == json.loads((export / name).read_text()), name
  # Encoder.from_hf (mine.py, eval.py) reads the run too: its embeddings are the export's.
  texts = ["alpha beta gamma", "river city paper music", "ocean"]
  np.testing.assert_allclose(Encoder.from_hf(str(run)).encode(texts),
                             Encoder.from_hf(str(export)).encode(texts), rtol=0, atol=1e-6)
  # launch/merge.py too: the run's encoder weights and its tokenizer.
  from bge_jax import merge
  merged_in, exported = merge.load_model(str(run)), merge.load_model(str(export))
  assert merged_in.tokenizer == str(tok) and merged_in.config == exported.config
  for x, y in zip(jax.tree.leaves(merged_in.params), jax.tree.leaves(exported.params)):
    np.testing.assert_array_equal(x, y)
  earlier_encoder = Encoder.from_run(str(run), step=2)
  assert earlier_encoder.config.pooling == "cls" and earlier_encoder.config.dtype == "float32"
  earlier = tmp_path / "hf2"
  assert convert_cmd.main(["jax-to-hf", str(run), str(earlier), "--step", "2"]) == 0
  c = load_file(earlier / "model.safetensors")
  assert any(not np.array_equal(c[k], a[k]) for k in a)  # step 2's weights, not step 3's
  capsys.readouterr()
  assert convert_cmd.main(["jax-to-hf", str(run), str(tmp_path / "hf3"), "--step", "5"]) == 2
  assert "no step 5; the run has steps [2, 3]" in capsys.readouterr().err
  assert convert_cmd.main(["jax-to-hf", str(ours), str(tmp_path / "hf4"), "--step", "2"]) == 2
  assert "--step 2 is for a training run's workdir" in capsys.readouterr().err
  assert not (tmp_path / "hf3").exists() and not (tmp_path / "hf4").exists()
