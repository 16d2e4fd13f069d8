"""The model card (README.md) of a stages-2/3 export: what was trained, on what, how far, how well,
and how to load it.

Built from the run's own records in its workdir, so the card states what happened rather than
what was asked for: run_info.json (origin of the weights, steps, per-dataset rows and batches,
written at the run's start) and metrics.jsonl (the last logged training metrics and the latest
value of every eval/* metric), plus the run's config (loss, lengths, instructions, Matryoshka
dimensions). A missing record leaves its section out and says so; it never fails an export.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Sequence

from bge_jax.config import BertConfig

log = logging.getLogger(__name__)

TRAIN_KEYS = ("loss", "contrastive_loss", "distill_loss", "accuracy", "positive_score",
              "negative_score")


def matryoshka_dims(config: Any) -> list[int]:
  """config.loss.matryoshka_dims as a list of ints ([] when absent or empty); a comma-separated
  string or a sequence."""
  loss = config.get("loss", None) if hasattr(config, "get") else None
  value = loss.get("matryoshka_dims", ()) if loss is not None else ()
  if isinstance(value, str):
    value = [v for v in value.replace(" ", "").split(",") if v]
  return [int(v) for v in (value or ())]


def _read_json(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    log.warning("model card: cannot read %s (%s); its facts are left out", path, e)
    return None


def final_metrics(workdir: str) -> tuple[dict[str, Any] | None, dict[str, tuple[int, float]]]:
  """(the last logged training row of metrics.jsonl, {eval key: (step, value)} latest per key)."""
  from bge_jax.train.metrics import read_metrics

  try:
    rows = read_metrics(workdir)
  except (OSError, ValueError) as e:
    log.warning("model card: cannot read the metrics of %s (%s)", workdir, e)
    return None, {}
  train = None
  evals: dict[str, tuple[int, float]] = {}
  for row in rows:
    if "loss" in row:
      train = row
    for k, v in row.items():
      if k.startswith("eval/"):
        evals[k] = (int(row["step"]), float(v))
  return train, evals


def _cell(text: Any) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def _instruction(text: str | None) -> str:
  return f"`{text}`" if text else "none"


def render(config: Any, model_config: BertConfig, workdir: str, *, lr: float,
           prompts: Mapping[str, str]) -> str:
  """The card's Markdown. `lr` is the run's peak learning rate (resolved when the config left it
  unset); `prompts` the sentence-transformers prompts written beside the card."""
  from bge_jax.train.state import warmup_steps

  info = _read_json(os.path.join(workdir, "run_info.json")) or {}
  train, evals = final_metrics(workdir)
  d, loss = config.data, config.loss
  dims = matryoshka_dims(config)
  stage = config.stage
  origin = info.get("origin") or (config.model.init_from or f"scratch ({config.model.preset})")
  vectors = "L2-normalised" if model_config.normalize else "unnormalised"
  lines = [
      "---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
      "tags:", "- sentence-transformers", "- feature-extraction", "- sentence-similarity",
      "- bge", "- bge-jax", "---", "",
      f"# BGE-style embedding model ({stage})", "",
      f"A BERT sentence-embedding model ({model_config.num_layers} layers, hidden "
      f"{model_config.hidden_size}, {model_config.num_params(include_heads=False):,} parameters): "
      f"{model_config.hidden_size}-dimensional {vectors} vectors from "
      f"{model_config.pooling.upper() if model_config.pooling == 'cls' else 'mean'} pooling, "
      f"trained with bge-jax's stage `{stage}` (contrastive InfoNCE, the BGE recipe: Xiao et al. "
      "2023, arXiv:2309.07597).", "",
      "## Training", "",
      "| | |", "|---|---|",
      f"| base model | {_cell(origin)} |",
      f"| stage | `{stage}` (bge-jax `configs/{stage}.py`) |",
  ]
  steps = info.get("total_steps")
  if steps is not None:
    epochs = (f"{config.num_train_steps} steps set" if config.num_train_steps > 0
              else f"{config.num_epochs:g} epochs")
    lines.append(f"| steps | {steps} ({epochs}; global batch {config.batch_size}) |")
  else:
    lines.append("| steps | unknown (no run_info.json) |")
  warmup = (f"{warmup_steps(config.optimizer.to_dict(), int(steps))} warmup steps"
            if steps is not None else "warmup")
  lines += [
      f"| optimizer | AdamW, peak lr {lr:g}, {warmup}, "
      f"{config.optimizer.schedule} schedule, weight decay {config.optimizer.weight_decay:g} |",
      f"| loss | InfoNCE, temperature {loss.temperature:g}, group size {d.group_size} (1 positive "
      f"+ {d.group_size - 1} negatives), in-batch negatives "
      f"{'on' if loss.in_batch_negatives else 'off'}"
      + (", distillation from teacher scores" if d.get("use_teacher_scores", False) else "")
      + " |",
      f"| max lengths | query {d.query_max_length}, passage {d.passage_max_length} tokens |",
      f"| query instruction | {_cell(_instruction(d.query_instruction))} |",
      f"| passage instruction | {_cell(_instruction(d.passage_instruction))} |",
  ]
  if dims:
    lines.append(f"| Matryoshka dimensions | {', '.join(map(str, dims))} (the first k features, "
                 "re-normalised, were trained to work alone) |")
  lines.append("")
  datasets: Sequence[Mapping[str, Any]] = info.get("datasets") or ()
  lines += ["### Data", ""]
  if datasets:
    total = sum(int(x["rows"]) for x in datasets)
    lines += [f"{len(datasets)} dataset{'s' if len(datasets) != 1 else ''}, {total:,} rows; each "
              f"batch from one dataset ({d.get('sampling', 'proportional')} sampling).", "",
              "| dataset | rows | global batch | batches per epoch |", "|---|---|---|---|"]
    lines += [f"| {_cell(x['name'])} | {int(x['rows']):,} | {x['global_batch']} | "
              f"{x['batches_per_epoch']} |" for x in datasets]
  elif info.get("data"):
    lines.append(_cell(info["data"]))
  else:
    lines.append("Not recorded (no run_info.json).")
  lines += ["", "## Results", ""]
  if train is not None:
    shown = ", ".join(f"{k} {train[k]:.4f}" for k in TRAIN_KEYS if k in train)
    lines.append(f"Training metrics at step {train['step']} (the last logged): {shown}.")
  else:
    lines.append("No training metrics were logged.")
  if evals:
    lines += ["", "| evaluation | step | value |", "|---|---|---|"]
    lines += [f"| {_cell(k[len('eval/'):])} | {step} | {value:.4f} |"
              for k, (step, value) in sorted(evals.items())]
  else:
    lines += ["", "No evaluation ran during training (config.eval)."]
  query, document = prompts.get("query", ""), prompts.get("document", "")
  pooling_code = ("out.last_hidden_state[:, 0]" if model_config.pooling == "cls" else
                  "(out.last_hidden_state * mask).sum(1) / mask.sum(1)")
  lines += [
      "", "## Usage", "",
      "The folder is a transformers `BertModel` and a sentence-transformers model; "
      "`config_sentence_transformers.json` holds the training instructions as the prompts "
      f"`query` ({_instruction(query)}) and `document` ({_instruction(document)}).", "",
      "sentence-transformers:", "", "```python",
      "from sentence_transformers import SentenceTransformer",
      "model = SentenceTransformer(\"path/to/this/folder\")",
      "queries = model.encode([\"a question\"], prompt_name=\"query\")",
      "passages = model.encode([\"a passage\"], prompt_name=\"document\")",
      "scores = model.similarity(queries, passages)", "```", "",
      "transformers:", "", "```python", "import torch",
      "from transformers import AutoModel, AutoTokenizer",
      "tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/folder\")",
      "model = AutoModel.from_pretrained(\"path/to/this/folder\").eval()",
      f"batch = tokenizer([{json.dumps(query)} + \"a question\"], padding=True, truncation=True,",
      f"                  max_length={d.query_max_length}, return_tensors=\"pt\")",
      "with torch.no_grad():", "  out = model(**batch)",
      "mask = batch[\"attention_mask\"].unsqueeze(-1).float()",
      f"vectors = {pooling_code}",
  ]
  if model_config.normalize:
    lines.append("vectors = torch.nn.functional.normalize(vectors, dim=-1)")
  lines += [
      "```", "", "bge-jax:", "", "```python", "from bge_jax import Encoder",
      f"encoder = Encoder.from_hf(\"path/to/this/folder\", pooling={model_config.pooling!r}, "
      f"normalize={model_config.normalize})",
      f"queries = encoder.encode([\"a question\"], instruction={query!r})",
      f"passages = encoder.encode([\"a passage\"]{f', instruction={document!r}' if document else ''})",
      "```", "",
  ]
  if dims:
    lines += [f"Matryoshka: the vectors may be cut to their first k dimensions, k in "
              f"{{{', '.join(map(str, dims))}}}: `SentenceTransformer(..., truncate_dim=k)` or "
              "`Encoder.from_hf(..., truncate_dim=k)`.", ""]
  return "\n".join(lines)
