"""Stages-2/3 exports: sentence-transformers prompts (loading with prompt_name="query" gives
bge-jax's vectors with the instruction) and the model card, checked against a real tiny run."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from bge_jax import Encoder, convert
from bge_jax.model_card import matryoshka_dims

QUERY = "Represent this sentence for searching relevant passages: "
PASSAGE = "passage: "
QUERIES = ["how do tides work", "what is a prime number"]
PASSAGES = ["The moon's gravity pulls the oceans.", "A prime has exactly two divisors."]


def test_sentence_transformers_prompts_match_encoder_instructions(minilm_path, tmp_path):
  """all-MiniLM-L6-v2 saved with prompts: sentence-transformers' encode(prompt_name=...) and
  encode_query/encode_document give Encoder.encode(instruction=...)'s vectors within 1e-5."""
  from sentence_transformers import SentenceTransformer

  config, params = convert.load_hf(minilm_path)
  out = convert.save_hf(params, config, str(tmp_path / "st"), tokenizer=minilm_path,
                        prompts={"query": QUERY, "document": PASSAGE})
  saved = json.loads((tmp_path / "st" / convert.ST_CONFIG_FILE).read_text())
  assert saved["prompts"] == {"query": QUERY, "document": PASSAGE}
  assert saved["default_prompt_name"] is None and saved["similarity_fn_name"] == "cosine"

  st = SentenceTransformer(out, device="cpu")
  assert st.prompts["query"] == QUERY and st.default_prompt_name is None
  enc = Encoder.from_hf(out, pooling=config.pooling, normalize=True)
  ours_q = enc.encode(QUERIES, instruction=QUERY)
  ours_p = enc.encode(PASSAGES, instruction=PASSAGE)
  np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), ours_q, atol=1e-5)
  np.testing.assert_allclose(st.encode_query(QUERIES), ours_q, atol=1e-5)
  np.testing.assert_allclose(st.encode_document(PASSAGES), ours_p, atol=1e-5)
  # No default prompt: a plain encode adds none (the instruction changes the vectors).
  plain = st.encode(QUERIES)
  np.testing.assert_allclose(plain, enc.encode(QUERIES), atol=1e-5)
  assert np.abs(plain - ours_q).max() > 1e-2

  with pytest.raises(ValueError, match="default_prompt_name='passage' is not one of"):
    convert.save_hf(params, config, str(tmp_path / "bad"), prompts={"query": QUERY},
                    default_prompt_name="passage")
  assert not (tmp_path / "bad").exists()  # nothing left behind


def test_matryoshka_dims_read_from_any_config_form():
  from ml_collections import ConfigDict

  assert matryoshka_dims(ConfigDict({"loss": {"temperature": 0.02}})) == []
  assert matryoshka_dims(ConfigDict({"loss": {"matryoshka_dims": ()}})) == []
  assert matryoshka_dims(ConfigDict({"loss": {"matryoshka_dims": (16, 32)}})) == [16, 32]
  assert matryoshka_dims(ConfigDict({"loss": {"matryoshka_dims": "16, 32"}})) == [16, 32]


@pytest.mark.slow
def test_model_card_and_prompts_of_a_real_run(tmp_path):
  """A 6-step stage-3 run over two datasets with instructions and an STS eval: the export's
  README.md states the origin, steps, per-dataset rows and batches, the last logged training
  metrics and the final eval as metrics.jsonl holds them, the instructions and how to load; the
  exported prompts reproduce bge-jax's instruction vectors in sentence-transformers."""
  from sentence_transformers import SentenceTransformer

  from conftest import make_tokenizer
  from test_train_contrastive import make_rows, tiny

  from bge_jax.train.loop import train
  from bge_jax.train.metrics import read_metrics

  a, b = make_rows(tmp_path / "a.jsonl", 70, seed=1), make_rows(tmp_path / "b.jsonl", 40, seed=2)
  tok = make_tokenizer(tmp_path / "tok")
  sts = tmp_path / "sts.tsv"
  sts.write_text("alpha beta gamma\talpha beta gamma delta\t5\nriver city\tpaper music\t0\n"
                 "ocean light\tocean light stone\t4\nmarket garden\tsearch index\t1\n")
  c = tiny("finetune", a, tok, 6, dropout=False, **{
      "data.group_size": 2, "data.query_instruction": "find: ",
      "data.passage_instruction": "doc: ", "eval.sts": str(sts)})
  c.data.train = f"{a},{b}"
  workdir = tmp_path / "run"
  train(c, str(workdir))

  export = workdir / "export" / "hf"
  card = (export / "README.md").read_text()
  rows = read_metrics(str(workdir))
  last = [r for r in rows if "loss" in r][-1]
  final_eval = [r for r in rows if "eval/sts/sts" in r][-1]
  assert last["step"] == 6 and final_eval["step"] == 6
  assert card.startswith("---\nlibrary_name: sentence-transformers\n")
  assert "# BGE-style embedding model (finetune)" in card
  assert "| base model | scratch (tiny" in card
  assert "| steps | 6 (6 steps set; global batch 16) |" in card
  assert "| optimizer | AdamW, peak lr 0.001, 2 warmup steps, linear schedule, weight decay 0 |" \
      in card
  assert "group size 2 (1 positive + 1 negatives)" in card
  assert "| query instruction | `find: ` |" in card and "| passage instruction | `doc: ` |" in card
  assert "2 datasets, 110 rows; each batch from one dataset (proportional sampling)." in card
  assert f"| {a} | 70 | 16 | 4 |" in card and f"| {b} | 40 | 16 | 2 |" in card
  assert f"Training metrics at step 6 (the last logged): loss {last['loss']:.4f}, " in card
  assert f"accuracy {last['accuracy']:.4f}" in card
  assert f"| sts/sts | 6 | {final_eval['eval/sts/sts']:.4f} |" in card
  assert "prompt_name=\"query\"" in card and "instruction='find: '" in card
  assert "Matryoshka" not in card
  assert re.search(r"\d+ layers, hidden 64, [\d,]+ parameters", card)

  saved = json.loads((export / convert.ST_CONFIG_FILE).read_text())
  assert saved["prompts"] == {"query": "find: ", "document": "doc: "}
  st = SentenceTransformer(str(export), device="cpu")
  enc = Encoder.from_hf(str(export), pooling=c.loss.pooling)
  texts = ["alpha beta gamma", "river mountain city ocean"]
  np.testing.assert_allclose(st.encode(texts, prompt_name="query"),
                             enc.encode(texts, instruction="find: "), atol=1e-5)
  np.testing.assert_allclose(st.encode(texts, prompt_name="document"),
                             enc.encode(texts, instruction="doc: "), atol=1e-5)
  # The same run's card for a config with Matryoshka dimensions (a tuple, or the string form).
  from bge_jax import model_card

  c.loss.matryoshka_dims = (16, 32) if "matryoshka_dims" in c.loss else "16,32"
  with_dims = model_card.render(c, enc.config, str(workdir), lr=1e-3,
                                prompts=saved["prompts"])
  assert "| Matryoshka dimensions | 16, 32 (the first k features" in with_dims
  assert "truncate_dim=k" in with_dims
