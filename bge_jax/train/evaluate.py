"""Evaluation inside a training run: the `config.eval` tasks on the current params, logged as
eval/*."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from bge_jax.config import BertConfig

log = logging.getLogger("bge_jax.train")


def make_evaluator(config: Any, tokenizer: Any) -> Callable[[Any, BertConfig], dict[str, float]] | None:
  """`(params, model_config) -> {"eval/<task>/<metric>": value}` from `config.eval`, or None
  when it names no task.

  Tasks (read once, here, so a bad file fails before training starts):
  * config.eval.tasks: "TYPE:PATH,..." tasks of the evaluation registry (`bge_jax.eval.tasks`:
    retrieval, reranking, sts, pair_classification, classification, clustering), each logged
    as `eval/<name>/<metric>` for every metric of its type (name: the file or folder name without
    extension; STS files read split `config.eval.sts_split` where they have a split column).
  * config.eval.sts (comma-separated STS files): `eval/sts/<name>` (Spearman), and
    config.eval.retrieval (comma-separated BEIR folders): `eval/<name>/<metric>`: the
    original keys, kept with their metric names.
  Retrieval and reranking queries get `config.eval.query_instruction`; texts are encoded with
  `config.eval.batch_size` and `config.eval.max_length`.

  Matryoshka (`config.loss.matryoshka_dims`, a list of widths): every metric is also computed on
  the embeddings cut to each width (re-normalised when the model normalises) and logged with a
  `/dim_<d>` suffix, e.g. `eval/sts/stsb/dim_64`; the unsuffixed metrics are the full width.
  Cost: one evaluation per width plus the full one.

  The returned function has a `metric_names` attribute: the tuple of keys it returns, known
  before training (e.g. to check `checkpoint.keep_best` early).
  """
  e = config.get("eval")
  if e is None:
    return None
  from bge_jax.eval import tasks

  entries: list[tuple[Callable[[str], str], tasks.Task]] = []
  for path in _split(e.get("sts", "")):
    task = tasks.load_task("sts", path, split=e.sts_split or None)
    entries.append((lambda metric, n=task.name: f"eval/sts/{n}" if metric == "spearman" else "",
                    task))
  for path in _split(e.get("retrieval", "")):
    entries.append((_named(tasks.task_name(path)), tasks.load_task("retrieval", path)))
  for type_name, path in tasks.parse_specs(e.get("tasks", ""), "eval.tasks"):
    options = {"split": e.sts_split or None} if type_name == "sts" else {}
    task = tasks.load_task(type_name, path, **options)
    entries.append((_named(task.name), task))
  if not entries:
    return None
  _check_unique_names(entries)
  dims = _matryoshka_dims(config)
  settings = tasks.EvalSettings(batch_size=e.batch_size, max_length=e.max_length,
                                query_instruction=e.query_instruction or None)

  def evaluate(params: Any, model_config: BertConfig) -> dict[str, float]:
    from bge_jax.encoder import Encoder

    model = model_config.replace(add_mlm_head=False, add_decoder=False)
    out: dict[str, float] = {}
    for dim in (None, *dims):
      if dim is not None and dim > model.hidden_size:
        raise ValueError(f"loss.matryoshka_dims has {dim}, wider than the model's hidden_size "
                         f"{model.hidden_size}")
      enc = Encoder(params, model, tokenizer, pooling=model_config.pooling,
                    normalize=model_config.normalize, truncate_dim=dim)
      suffix = "" if dim is None else f"/dim_{dim}"
      for key_of, task in entries:
        for metric, value in tasks.evaluate_task(enc, task, settings).items():
          if key := key_of(metric):
            out[key + suffix] = float(value)
    return out

  evaluate.metric_names = tuple(
      key_of(metric) + ("" if dim is None else f"/dim_{dim}")
      for dim in (None, *dims) for key_of, task in entries for metric in task.kind.mteb_metrics
      if key_of(metric))
  return evaluate


def _split(value: str) -> list[str]:
  return [p.strip() for p in (value or "").split(",") if p.strip()]


def _named(name: str) -> Callable[[str], str]:
  return lambda metric: f"eval/{name}/{metric}"


def _check_unique_names(entries: Sequence[tuple[Callable[[str], str], Any]]) -> None:
  """Two tasks logging the same metric name (e.g. retrieval and reranking tasks on files of the
  same name: both have ndcg@10) would overwrite each other: refused."""
  seen: dict[str, str] = {}
  for key_of, task in entries:
    for metric in task.kind.mteb_metrics:  # every metric the type reports
      key = key_of(metric)
      if key and key in seen:
        raise ValueError(f"config.eval: two tasks log {key!r} ({seen[key]} and {task.source}); "
                         "rename one file or folder")
      seen[key] = task.source


def _matryoshka_dims(config: Any) -> tuple[int, ...]:
  loss = config.get("loss")
  dims = loss.get("matryoshka_dims") if loss is not None else None
  if not dims:
    return ()
  if isinstance(dims, str) or not all(isinstance(d, int) and d >= 1 for d in dims):
    raise ValueError(f"loss.matryoshka_dims={dims!r}; expected a list of widths >= 1")
  return tuple(sorted(set(dims), reverse=True))
