"""The three-stage demo on the embedded corpus (Python standard-library names and docstrings).

`--config configs/demo.py:<stage>[,<root>]`, stage = retromae | contrastive | finetune; root is the
folder `launch/quickstart.py` prepared (default runs/quickstart):

  <root>/data/passages.jsonl   docstrings, the stage-1 corpus
  <root>/data/pairs.jsonl      {"query": name, "pos": [docstring]} train pairs (stage 2)
  <root>/data/mined.jsonl      the same rows with hard negatives mined by the stage-2 model (stage 3)
  <root>/data/heldout/         held-out pairs as a BEIR folder (evaluated before, during, after)
  <root>/data/heldout_passages.jsonl, heldout_pairs.jsonl
                               the same held-out pairs as stage 1 / stages 2-3 validation data
  <root>/tokenizer/            WordPiece trained on the train split

A tiny BERT (hidden 64, 2 layers) so that each stage trains in a minute or two on two CPU cores.
Dropout is off: at hidden size 64 the 0.1 dropout noise swamps the contrastive signal (stage 2
from this stage 1 stays at chance, loss ln(64), for 200 steps with it; it learns without it).
Every stage logs, at each evaluation (before the first step, every eval.every_steps, at the end),
its validation loss on the held-out pairs (val/*: stage 3's negatives for them are drawn from the
held-out passages, as they have none mined) and their retrieval (eval/heldout/*), and keeps the
best step's export in <workdir>/best/ (stage 1 by val/loss, stages 2-3 by held-out nDCG@10).
The stages chain: stage 2 starts from stage 1's export, stage 3 from stage 2's. The quickstart
runs all three; with its data in place, each stage also runs alone, e.g.

  python launch/train.py --config configs/demo.py:contrastive --workdir runs/quickstart/stage2
"""

import os

from configs import contrastive, finetune, retromae

STAGES = ("retromae", "contrastive", "finetune")  # in the order they run
TITLES = {"retromae": "stage 1: RetroMAE pre-training from scratch",
          "contrastive": "stage 2: contrastive, unlabeled pairs, in-batch negatives",
          "finetune": "stage 3: hard negatives + query instruction"}
MINED = "finetune"  # trains on negatives mined with the model of the stage before
# Queries are identifiers ("json.dumps"); the instruction marks them as such (stage 3, as BGE).
QUERY_INSTRUCTION = "Find the documentation of this Python name: "


def get_config(arg: str = "retromae"):
  stage, _, root = arg.partition(",")
  if stage not in STAGES:
    raise ValueError(f"configs/demo.py:{arg}: the stage must be one of {STAGES}")
  root = root or "runs/quickstart"
  data = os.path.join(root, "data")
  if stage == "retromae":
    c = retromae.get_config("tiny")
    c.data.train = os.path.join(data, "passages.jsonl")
    c.data.validation = os.path.join(data, "heldout_passages.jsonl")
    c.checkpoint.keep_best = "val/loss"
    c.data.max_length = 128
    c.batch_size = 32
    c.num_train_steps = 200
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 20
  else:
    c = (contrastive if stage == "contrastive" else finetune).get_config("tiny")
    previous = "stage1" if stage == "contrastive" else "stage2"
    c.model.init_from = os.path.join(root, previous, "export", "hf")
    c.data.passage_max_length = 128
    c.data.query_max_length = 32
    c.loss.temperature = 0.05
    # Mean pooling: with CLS this tiny model's embeddings collapse (all cosines ~0.999 after
    # stage 1) and contrastive training barely escapes; mean pooling learns steadily.
    c.loss.pooling = "mean"
    c.optimizer.warmup_steps = 10
    c.data.validation = os.path.join(data, "heldout_pairs.jsonl")
    c.checkpoint.keep_best = "eval/heldout/ndcg@10"
    if stage == "contrastive":
      c.data.train = os.path.join(data, "pairs.jsonl")
      c.batch_size = 64
      c.num_train_steps = 200
      c.optimizer.lr = 1e-3
    else:
      c.data.train = os.path.join(data, "mined.jsonl")
      c.data.group_size = 4
      c.data.query_instruction = QUERY_INSTRUCTION
      c.eval.query_instruction = QUERY_INSTRUCTION
      c.batch_size = 32
      c.num_train_steps = 100
      c.optimizer.lr = 3e-4
  c.dropout = False
  c.tokenizer = os.path.join(root, "tokenizer")
  c.log_every_steps = 10
  c.checkpoint.every_steps = 100
  c.eval.retrieval = os.path.join(data, "heldout")
  c.eval.every_steps = c.num_train_steps // 4
  c.eval.max_length = 128
  return c
