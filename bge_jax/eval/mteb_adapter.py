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

Every task type of the evaluation registry (`bge_jax.eval.tasks`) has an in-memory mteb
counterpart: `local_task(task)` holds the same data as a loaded `Task`, so mteb's number and
`tasks.evaluate_task`'s can be compared (`launch/eval.py --check-mteb`). `named_task(name)` is
an mteb task by name (C-MTEB, MTEB English) whose data is already in the local Hugging Face
cache, or raises `NotCached`.

Instructions follow BGE's evaluation (FlagEmbedding's MTEB / C-MTEB scripts): the query
instruction is prepended to the queries of retrieval-type tasks (task types in
`RETRIEVAL_TASK_TYPES`), never to documents, and symmetric tasks (STS, classification,
clustering, pair classification, ...) get none.
"""

from __future__ import annotations

import contextlib
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
    from bge_jax.eval.retrieval import load_beir, mteb_retrieval_dataset

    self.dataset = mteb_retrieval_dataset(*load_beir(self.folder, self.split),
                                          split=self.metadata.eval_splits[0])
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


def in_memory_task(base: type, *, name: str, task_type: str, main_score: str, eval_split: str,
                   dataset: Any, lang: str = "eng-Latn", attrs: Mapping[str, Any] | None = None,
                   seed: int = 42) -> Any:
  """An instance of a fresh subclass of the mteb task class `base` whose data is `dataset`.

  The registry's task modules build their mteb counterparts with this (`TaskType.to_mteb`):
  the subclass carries class-level `TaskMetadata` (mteb reads it from the class), overrides only
  `load_data` (no hub download), and sets `attrs` (protocol settings such as
  `n_experiments`) as class attributes.

  Args:
    base: an mteb abstract task (`AbsTaskSTS`, `AbsTaskRetrieval`, `AbsTaskClassification`, ...).
    name: the task name in mteb's results.
    task_type: mteb's type ("STS", "Retrieval", "Reranking", "Classification", ...).
    main_score: the key of mteb's scores reported as the main score.
    eval_split: the split evaluated (classification also needs a "train" split in `dataset`).
    dataset: what `load_data` assigns to `self.dataset`, in `base`'s layout.
    lang: mteb language code.
    seed: the task's seed (mteb's default 42): classifier, undersampling and k-means seeds.
  """
  _require_mteb()
  metadata = TaskMetadata(
      name=name,
      dataset={"path": f"local/{name}", "revision": "local"},
      description=f"In-memory {task_type} task built by bge_jax.eval.",
      type=task_type,
      category="t2c" if task_type in ("Classification", "Clustering") else "t2t",
      modalities=["text"],
      eval_splits=[eval_split],
      eval_langs=[lang],
      main_score=main_score,
  )

  def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
    del num_proc, kwargs
    if not self.data_loaded:
      self.dataset = dataset
      self.data_loaded = True

  class_name = "".join(c if c.isalnum() else "_" for c in name)
  task_class = type(class_name, (base,), {"metadata": metadata, "load_data": load_data,
                                          "__module__": __name__, **(attrs or {})})
  return task_class(seed=seed)


def local_task(task: Any) -> Any:
  """The mteb task holding the data of a loaded registry `Task` (`TaskType.to_mteb`)."""
  _require_mteb()
  return task.kind.to_mteb(task.data, task.name)


class NotCached(LookupError):
  """A named mteb task whose data is not in the local Hugging Face cache (offline)."""


@contextlib.contextmanager
def _offline():
  """Hugging Face hub and datasets offline for the block (their flags are read at import, so
  the module constants are switched, then restored)."""
  import datasets.config
  import huggingface_hub.constants

  saved = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
           datasets.config.HF_DATASETS_OFFLINE)
  huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
  datasets.config.HF_DATASETS_OFFLINE = True
  try:
    yield
  finally:
    (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
     datasets.config.HF_DATASETS_OFFLINE) = saved


def named_task(name: str) -> Any:
  """The mteb task `name` (e.g. "T2Reranking", "STSBenchmark") with its data loaded from the
  local Hugging Face datasets cache, never the network (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are
  set for the load).

  Raises:
    KeyError: mteb knows no task of that name.
    NotCached: its data is not in the local cache (the message says what to download where).
  """
  _require_mteb()
  try:
    task = mteb.get_task(name)
  except Exception as e:  # mteb raises KeyError or ValueError with close matches
    raise KeyError(f"mteb has no task {name!r} ({e})") from None
  with _offline():
    try:
      task.load_data()
    except Exception as e:  # datasets raises ConnectionError / FileNotFoundError / ValueError
      raise NotCached(f"mteb task {name}: its data is not in the local cache ({type(e).__name__}"
                      f"); download {task.metadata.dataset.get('path')} with network access "
                      "first (e.g. run mteb once online)") from None
  return task


def scores(result: Any, task_name: str | None = None) -> dict[str, Any]:
  """Every score of a task in an `mteb.evaluate` result (its first split and subset)."""
  for task_result in result.task_results:
    if task_name is None or task_result.task_name == task_name:
      return dict(next(iter(task_result.scores.values()))[0])
  raise KeyError(f"no result for task {task_name!r}")


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
