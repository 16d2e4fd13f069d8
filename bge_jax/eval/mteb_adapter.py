"""mteb (>= 2.26) adapter: evaluate a bge-jax `Encoder` on MTEB tasks, including local ones.

Needs the optional extra: `pip install "bge-jax[eval]"`. Importing this module never fails;
constructing `MTEBEncoder` or `local_sts_task(...)` without mteb raises ImportError.

  import mteb
  from bge_jax import Encoder
  from bge_jax.eval import mteb_adapter

  model = mteb_adapter.MTEBEncoder(
      Encoder.from_hf(path), query_instruction=mteb_adapter.BGE_QUERY_INSTRUCTION_EN)
  task = mteb_adapter.local_sts_task("../shared/data/en/stsbenchmark.train-dev.tsv", split="dev")
  result = mteb.evaluate(model, [task], cache=None)  # offline: the task reads a local file
  print(mteb_adapter.main_score(result))

Instructions follow BGE's evaluation (FlagEmbedding's MTEB / C-MTEB scripts): the query
instruction is prepended to the queries of retrieval-type tasks (task types in
`RETRIEVAL_TASK_TYPES`), never to documents, and symmetric tasks (STS, classification,
clustering, pair classification, ...) get none.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from bge_jax.weights import is_run_workdir
from bge_jax.eval.sts import read_sts

try:
  import mteb
except ImportError as e:  # the optional extra is not installed
  mteb = None
  AbsEncoder = AbsTaskSTS = AbsTaskRetrieval = object  # type: ignore[misc,assignment]
  _MTEB_ERROR: ImportError | None = e
else:  # mteb is there: an API mismatch below should fail loudly, not look like "not installed"
  from datasets import Dataset, DatasetDict
  from mteb.abstasks import AbsTaskRetrieval, AbsTaskSTS
  from mteb.abstasks.task_metadata import TaskMetadata
  from mteb.models import ModelMeta
  from mteb.models.abs_encoder import AbsEncoder
  from mteb.models.model_meta import ScoringFunction
  _MTEB_ERROR = None

BGE_QUERY_INSTRUCTION_EN = "Represent this sentence for searching relevant passages: "
BGE_QUERY_INSTRUCTION_ZH = "为这个句子生成表示以用于检索相关文章："
RETRIEVAL_TASK_TYPES = ("Retrieval", "Reranking")


def _require_mteb() -> None:
  if mteb is None:
    raise ImportError("mteb is not installed; pip install 'bge-jax[eval]' (mteb>=2.26)"
                      ) from _MTEB_ERROR


def bge_instructions(query_instruction: str | None) -> dict[str, str]:
  """BGE's mapping: {task type: query instruction} for retrieval-type tasks; {} without one."""
  if not query_instruction:
    return {}
  return dict.fromkeys(RETRIEVAL_TASK_TYPES, query_instruction)


def _prompt_type_name(prompt_type: Any) -> str | None:
  return None if prompt_type is None else str(getattr(prompt_type, "value", prompt_type))


class MTEBEncoder(AbsEncoder):
  """A bge-jax `Encoder` as an mteb encoder (subclass of `mteb.models.abs_encoder.AbsEncoder`).

  Attributes:
    model: the wrapped `bge_jax.Encoder`.
    instructions: {task name or task type: instruction}; see `instruction_for`.
    mteb_model_meta: `ModelMeta.create_empty(...)` with the name, embedding size and cosine
      similarity filled in.
  """

  def __init__(self, encoder: Any, *, query_instruction: str | None = None,
               instructions_by_task_type: Mapping[str, str] | None = None,
               name: str = "bge-jax", revision: str | None = None, batch_size: int = 256,
               max_length: int = 512):
    """Wraps `encoder`.

    Args:
      encoder: a `bge_jax.Encoder` (anything with `encode(texts, batch_size, max_length,
        instruction)` and `dim`).
      query_instruction: BGE's query instruction; used for the queries of retrieval-type tasks
        (`RETRIEVAL_TASK_TYPES`) when `instructions_by_task_type` is None.
      instructions_by_task_type: replaces that default: {task type or task name: instruction}.
      name: model name in mteb's results; mteb wants "org/model" ("local/" is prefixed if not).
      revision: recorded in the results (e.g. a checkpoint step).
      batch_size, max_length: encoding settings. mteb's `encode_kwargs["batch_size"]` only sizes
        its DataLoader: the adapter gathers all texts of a call and encodes them in
        length-sorted batches of `batch_size`.
    """
    _require_mteb()
    self.model = encoder
    self.batch_size = batch_size
    self.max_length = max_length
    self.instructions = (dict(instructions_by_task_type) if instructions_by_task_type is not None
                         else bge_instructions(query_instruction))
    config = getattr(encoder, "config", None)
    self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
        name=name if "/" in name else f"local/{name}",
        revision=revision,
        embed_dim=int(encoder.dim),
        max_tokens=getattr(config, "max_position_embeddings", None),
        similarity_fn_name=ScoringFunction.COSINE,
        framework=["JAX"],
        use_instructions=bool(self.instructions),
        open_weights=True,
    ))

  def instruction_for(self, task_metadata: Any, prompt_type: Any = None) -> str | None:
    """The instruction of one encode call.

    None for documents; otherwise the entry of `instructions` for the task's name, else for its
    type. So with BGE's default mapping, queries of retrieval-type tasks get the instruction;
    a symmetric task (prompt_type None on both sides) gets one only if mapped explicitly.
    """
    if _prompt_type_name(prompt_type) == "document":
      return None
    for key in (getattr(task_metadata, "name", None), getattr(task_metadata, "type", None)):
      if key is not None and key in self.instructions:
        return self.instructions[key]
    return None

  def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
             prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
    """Embeds the texts of mteb's DataLoader (batches of dicts with "text") -> [N, D] float32."""
    del hf_split, hf_subset
    texts: list[str] = []
    for batch in inputs:
      column = batch["text"]
      texts.extend([column] if isinstance(column, str) else column)
    show = kwargs.get("show_progress_bar")
    return self.model.encode(texts, batch_size=self.batch_size, max_length=self.max_length,
                             instruction=self.instruction_for(task_metadata, prompt_type),
                             show_progress=bool(show) if show is not None else None)


class LocalSTSTask(AbsTaskSTS):
  """Base of mteb STS tasks over a local file (`read_sts` formats): offline, no download.

  Subclasses mteb's `AbsTaskSTS` and overrides only `load_data`. mteb reads a task's
  `metadata` from its class (it drops instance attributes of that name when unloading data), so
  make tasks with `local_sts_task(...)`, which builds a subclass carrying the metadata, or
  subclass this with a class-level `metadata` yourself.
  """

  def __init__(self, path: str | os.PathLike, split: str | None = "dev", *,
               limit: int | None = None, **kwargs: Any):
    _require_mteb()
    if "metadata" not in vars(type(self)):
      raise TypeError("LocalSTSTask has no metadata of its own; use local_sts_task(path, ...)")
    self.path = os.fspath(path)
    self.split = split
    self.limit = limit
    super().__init__(**kwargs)

  def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
    """Reads the local file instead of downloading from the Hugging Face hub."""
    del num_proc, kwargs
    if self.data_loaded:
      return
    s1, s2, scores = read_sts(self.path, self.split)
    if self.limit is not None:
      s1, s2, scores = s1[:self.limit], s2[:self.limit], scores[:self.limit]
    self.dataset = DatasetDict({self.metadata.eval_splits[0]: Dataset.from_dict(
        {"sentence1": s1, "sentence2": s2, "score": [float(x) for x in scores]})})
    self.data_loaded = True


def local_sts_task(path: str | os.PathLike, split: str | None = "dev", *,
                   limit: int | None = None, name: str = "LocalSTSBenchmark",
                   lang: str = "eng-Latn", min_score: float = 0,
                   max_score: float = 5) -> LocalSTSTask:
  """An mteb STS task over `read_sts(path, split)`'s pairs (the first `limit` when given).

  Args:
    path, split: as `read_sts`; the mteb split is named `split` ("test" when None).
    limit: keep only the first `limit` pairs.
    name: the task name in mteb's results.
    lang: mteb language code ("cmn-Hans" for the Chinese STS-B).
    min_score, max_score: the gold score range (mteb rescales to [0, 1]; Spearman is unchanged).

  Returns:
    An instance of a fresh `LocalSTSTask` subclass whose class-level `metadata` has type "STS"
    and main score `cosine_spearman`.
  """
  _require_mteb()
  metadata = TaskMetadata(
      name=name,
      dataset={"path": os.fspath(path), "revision": "local"},
      description=f"STS pairs read from the local file {os.fspath(path)}.",
      type="STS",
      category="t2t",
      modalities=["text"],
      eval_splits=[split or "test"],
      eval_langs=[lang],
      main_score="cosine_spearman",
  )
  task_class = type(name.replace("-", "_").replace(".", "_"), (LocalSTSTask,),
                    {"metadata": metadata, "min_score": min_score, "max_score": max_score,
                     "__module__": __name__})
  return task_class(path, split, limit=limit)


class LocalRetrievalTask(AbsTaskRetrieval):
  """Base of mteb retrieval tasks over a local BEIR folder (`load_beir` layout): offline.

  Subclasses mteb's `AbsTaskRetrieval` and overrides only `load_data`, filling mteb's v2 split
  data (corpus / queries datasets, relevant_docs). As `bge_jax.eval.evaluate_retrieval` does,
  only queries with a relevant (score > 0) judgement are evaluated, and a document's text is its
  title and text joined by a space, so both evaluators see the same inputs. Make tasks with
  `local_retrieval_task(folder, ...)` (metadata must be a class attribute).
  """

  def __init__(self, folder: str | os.PathLike, split: str = "test", **kwargs: Any):
    _require_mteb()
    if "metadata" not in vars(type(self)):
      raise TypeError("LocalRetrievalTask has no metadata of its own; use local_retrieval_task()")
    self.folder = os.fspath(folder)
    self.split = split
    super().__init__(**kwargs)

  def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
    """Reads the BEIR folder instead of downloading from the Hugging Face hub."""
    del num_proc, kwargs
    if self.data_loaded:
      return
    from bge_jax.eval.retrieval import _doc_text, load_beir

    queries, corpus, qrels = load_beir(self.folder, self.split)
    judged = {q: dict(j) for q, j in qrels.items() if any(v > 0 for v in j.values())}
    self.dataset = {"default": {self.metadata.eval_splits[0]: {
        "corpus": Dataset.from_dict({"id": list(corpus),
                                     "text": [_doc_text(d) for d in corpus.values()]}),
        "queries": Dataset.from_dict({"id": list(judged), "text": [queries[q] for q in judged]}),
        "relevant_docs": {q: {d: int(v) for d, v in j.items()} for q, j in judged.items()},
        "top_ranked": None,
    }}}
    self.data_loaded = True


def local_retrieval_task(folder: str | os.PathLike, split: str = "test", *,
                         name: str = "LocalRetrieval", lang: str = "eng-Latn"
                         ) -> LocalRetrievalTask:
  """An mteb retrieval task (main score nDCG@10) over a BEIR folder's `split` judgements.

  Queries get the model's query instruction (`MTEBEncoder(query_instruction=...)`), documents
  none, as BGE evaluates retrieval.
  """
  _require_mteb()
  metadata = TaskMetadata(
      name=name,
      dataset={"path": os.fspath(folder), "revision": "local"},
      description=f"BEIR-layout retrieval data read from the local folder {os.fspath(folder)}.",
      type="Retrieval",
      category="t2t",
      modalities=["text"],
      eval_splits=[split],
      eval_langs=[lang],
      main_score="ndcg_at_10",
  )
  task_class = type(name.replace("-", "_").replace(".", "_"), (LocalRetrievalTask,),
                    {"metadata": metadata, "__module__": __name__})
  return task_class(folder, split)


# ---------------------------------------------------------------------------------------------
# Models to evaluate: exported folders, bge-jax params folders, and runs still training.
# ---------------------------------------------------------------------------------------------

def load_encoder(path: str | os.PathLike, pooling: str | None = None,
                 normalize: bool | None = None, *, step: int | None = None,
                 tokenizer: Any = None, dtype: str = "float32") -> Any:
  """A `bge_jax.Encoder` for any model path this example evaluates, computing in `dtype`
  (float32 by default, whatever compute dtype a training run recorded).

  * a trainer workdir (`is_run_workdir`): its newest committed checkpoint (or `step`), with the
    run's model config (pooling and normalisation of the loss) and tokenizer;
  * a bge-jax params folder, a Hugging Face or sentence-transformers folder (e.g. a run's
    `export/hf`): as `Encoder.from_hf`.

  pooling / normalize None: the model's own (a sentence-transformers folder's declared pooling,
  the run's `loss.pooling`, else CLS with normalisation, BGE's).
  """
  from bge_jax import convert, weights
  from bge_jax.encoder import Encoder

  path = os.fspath(path)
  if is_run_workdir(path):
    return Encoder.from_run(path, pooling, normalize, step=step, tokenizer=tokenizer,
                            dtype=dtype)
  if step is not None:
    raise convert.ConversionError(f"{path}: step={step} is for trainer workdirs (with "
                                  "run_info.json and checkpoints/); this is not one.")
  if os.path.isdir(path) and weights.is_checkpoint(path):
    declared = weights.load_config(path)
    own_pooling, own_normalize = declared.pooling, declared.normalize
  else:
    own_pooling, own_normalize = convert.resolve(path)[2:4]
  return Encoder.from_hf(path, pooling=pooling or own_pooling or "cls",
                         normalize=(own_normalize if own_normalize is not None else True)
                         if normalize is None else normalize, tokenizer=tokenizer,
                         dtype=dtype)


def main_score(result: Any, task_name: str | None = None) -> float:
  """The main score of a task in an `mteb.evaluate` result (its first split and subset)."""
  for task_result in result.task_results:
    if task_name is None or task_result.task_name == task_name:
      split_scores = next(iter(task_result.scores.values()))
      return float(split_scores[0]["main_score"])
  raise KeyError(f"no result for task {task_name!r}")
