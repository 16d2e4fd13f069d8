"""Hard-negative mining (FlagEmbedding's `hn_mine`): exact inner-product top-k in JAX, sampling.

For every training row `{"query", "pos", "neg"?}` the corpus (a candidate pool, or else every
`pos`/`neg` passage of the rows) is searched with the query's embedding, the neighbours ranked
`[start, end)` are kept, the row's positives and the query text itself are dropped, and
`negative_number` of the rest are sampled as the row's new `"neg"`. Rows left short (a small
corpus, a narrow range) are topped up with random corpus passages that are neither positives
nor already chosen.

False-negative control (`ScoreLimits`, sentence-transformers' `mine_hard_negatives` rules):
`max_score` skips candidates scoring above it against the query, `margin` (ST's
`absolute_margin`) those scoring within it of the query's positive, `relative_margin` those
above `pos - |pos| * relative_margin`; with a row of several positives, its lowest positive
score counts (as ST). ST then returns rows with fewer negatives (or drops them); here a row is
topped up from passages ranked past `end` when the rank-`end - 1` score keeps the limits (so
every top-up provably keeps them too), and otherwise stays short.

Several processes (`jax.distributed`): every process reads the rows and the corpus texts;
process p embeds and searches only its contiguous slice of the corpus (whole `chunk_size`
chunks, `corpus_split`), embeds only its slice of the queries (and of the positives missing
from a candidate pool) the same way, the query slices are gathered (`gather_split`) so every
process searches its corpus rows with every query, and the per-process top-k lists are
gathered and merged (`merge_top_k`) `QUERY_CHUNK` queries at a time. Each text is encoded in
the same chunk whatever the process count and equal scores keep the lower index first, so the
negatives are those of one process, bit for bit. With P processes, N passages, Q queries and D
dims, per process:

* memory: corpus embeddings N/P x D x 4 bytes (the term that outgrows a host: 3 KiB per
  passage at D = 768), all query embeddings Q x D x 4 (gathered: every process holds them),
  the texts (every process reads them all), a [P, QUERY_CHUNK, D] query-gather buffer and a
  [P, QUERY_CHUNK, end] merge buffer;
* time: encoding N/P passages and Q/P queries (encoding time / P), Q x N/P x D multiply-adds
  of search, and receiving Q x D x 4 bytes of query embeddings and P x Q x end x 12 bytes of
  top-k lists.

Differences from the PyTorch original, on purpose:

* The search is exact (no faiss): `CorpusIndex` scores the corpus block by block in float32 at
  HIGHEST matmul precision, keeps a running top-k, and shards the corpus blocks over the local
  devices. Ties go to the lower corpus index, so a mining run is reproducible bit for bit.
* The corpus is deduplicated in first-seen order (not `list(set(...))`), and every row draws
  from its own generator seeded with `(seed, row index)`: the same inputs and seed give the same
  negatives, whatever the device or process count.
* Top-ups never pick a positive or the query (the original samples the whole corpus, a source
  of false negatives). Sampled negatives keep their rank order, hardest first; top-ups follow.
* A row's `neg_scores` (teacher scores of the old negatives) are dropped: they no longer match.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bge_jax.data.files import atomic_file

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 8192
DEFAULT_QUERY_BATCH = 256
# Corpus passages per encode call (the unit of the split across processes).
DEFAULT_CHUNK_SIZE = 65536
# Queries searched (and, across processes, merged) at a time: bounds the [P, chunk, k] gather.
QUERY_CHUNK = 4096
_INDEX_FILL = np.iinfo(np.int32).max


class MiningInputError(ValueError):
  """A bad training or candidate-pool row; the message starts with `file:line` (or `rows[i]`)."""


# --------------------------------------------------------------------------------------------
# Exact top-k.


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _scan_top_k(queries: jax.Array, blocks: jax.Array, base: jax.Array, n_valid: jax.Array,
                k: int) -> tuple[jax.Array, jax.Array]:
  """Running top-k of `queries @ blocks.T` over `blocks` [nb, B, D]; `base` = index of row 0.

  Each block's own top-min(k, B) is merged with the running top-k by a stable `lax.top_k` over
  `[running, block]`: the running entries come from lower corpus indices and both lists are
  sorted by (score desc, index asc), so equal scores keep the lower index first.
  """
  num_blocks, block, _ = blocks.shape
  k_block = min(k, block)
  offsets = jnp.arange(block, dtype=jnp.int32)

  def step(carry, xs):
    best_s, best_i = carry
    rows, b = xs
    # `+ 0.0` turns -0.0 into +0.0, so zero scores tie as in numpy.
    s = lax.dot_general(queries, rows, (((1,), (1,)), ((), ())),
                        precision=lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32) + 0.0
    idx = base + b * block + offsets
    s = jnp.where((idx < n_valid)[None, :], s, -jnp.inf)
    bs, bpos = lax.top_k(s, k_block)
    bi = idx[bpos]
    cs = jnp.concatenate([best_s, bs], axis=1)
    ci = jnp.concatenate([best_i, bi], axis=1)
    ts, tpos = lax.top_k(cs, k)
    return (ts, jnp.take_along_axis(ci, tpos, axis=1)), None

  q = queries.shape[0]
  init = (jnp.full((q, k), -jnp.inf, jnp.float32), jnp.full((q, k), _INDEX_FILL, jnp.int32))
  (scores, indices), _ = lax.scan(step, init, (blocks, jnp.arange(num_blocks, dtype=jnp.int32)))
  return scores, indices


@functools.lru_cache(maxsize=32)
def _single_fn(k: int, block: int):
  def search(queries, corpus, n_valid):
    blocks = corpus.reshape(-1, block, corpus.shape[-1])
    return _scan_top_k(queries, blocks, jnp.int32(0), n_valid, k)
  return jax.jit(search)


@functools.lru_cache(maxsize=32)
def _sharded_fn(mesh: Mesh, k: int, block: int):
  """Each device scans its contiguous corpus shard; the per-shard top-k are gathered and merged."""
  axes = tuple(mesh.axis_names)

  def local(queries, corpus, n_valid):
    base = lax.axis_index(axes).astype(jnp.int32) * corpus.shape[0]
    blocks = corpus.reshape(-1, block, corpus.shape[-1])
    s, i = _scan_top_k(queries, blocks, base, n_valid, k)
    # Tiled gathers concatenate in device order, i.e. in corpus order: the stable merge below
    # keeps the lower index first on ties, as the single-device scan does.
    s = lax.all_gather(s, axes, axis=1, tiled=True)
    i = lax.all_gather(i, axes, axis=1, tiled=True)
    ts, tpos = lax.top_k(s, k)
    return ts, jnp.take_along_axis(i, tpos, axis=1)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(axes),
                                                           PartitionSpec()),
                               out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False))


def _resolve_mesh(mesh: Mesh | str | None) -> Mesh | None:
  """`"auto"`: every local device (each process searches its own corpus rows; processes are
  merged by `merge_top_k`), None when there is one."""
  if mesh is None:
    return None
  if isinstance(mesh, str):
    if mesh != "auto":
      raise ValueError(f"mesh={mesh!r}; pass a jax Mesh, 'auto' or None")
    if jax.local_device_count() == 1:
      return None
    from bge_jax import sharding
    mesh = sharding.make_mesh(devices=jax.local_devices())
  return mesh if mesh.size > 1 else None


def search_shapes(num_corpus: int, num_queries: int, block_size: int = DEFAULT_BLOCK_SIZE,
                  query_batch_size: int = DEFAULT_QUERY_BATCH) -> tuple[int, int]:
  """(corpus block, query batch) for a search of `num_queries` over `num_corpus` passages.

  They depend on the data sizes only, never on the device or process count, so every way of
  splitting a search runs the same matmul shapes (and gives the same scores bit for bit).
  """
  if block_size < 1 or query_batch_size < 1:
    raise ValueError(f"block_size={block_size}, query_batch_size={query_batch_size}; both >= 1")
  return (min(block_size, _round_up(max(num_corpus, 1), 8)),
          min(query_batch_size, _round_up(max(num_queries, 1), 8)))


def _check_finite(name: str, x: np.ndarray) -> None:
  if not np.isfinite(x).all():
    raise ValueError(f"{name} holds NaN or inf values")


class CorpusIndex:
  """Corpus vectors [N, D] placed once on the local devices, searched by exact inner product.

  `index_offset` is the global index of row 0 (a process holding rows [lo, hi) of a corpus
  split across processes passes lo); returned indices are global. With a mesh of several
  devices the rows are split into contiguous shards, one per device, and the per-device top-k
  merged on device (`mesh="auto"`: every local device). Memory: N x D float32 on the devices
  (split among them), plus a [query batch, block] score buffer per device.
  """

  def __init__(self, corpus: np.ndarray, *, block: int = DEFAULT_BLOCK_SIZE,
               mesh: Mesh | str | None = None, index_offset: int = 0):
    corpus = np.asarray(corpus, np.float32)
    if corpus.ndim != 2:
      raise ValueError(f"corpus {corpus.shape} must be [N, D]")
    _check_finite("corpus", corpus)
    self.size, self.dim = corpus.shape
    self.block, self.index_offset = block, index_offset
    self.mesh = _resolve_mesh(mesh)
    if self.size == 0:
      self._corpus = None
      return
    shards = self.mesh.size if self.mesh is not None else 1
    padded = np.zeros((_round_up(self.size, block * shards), self.dim), np.float32)
    padded[:self.size] = corpus
    if self.mesh is None:
      self._corpus = jax.device_put(padded)
    else:
      self._corpus = jax.device_put(
          padded, NamedSharding(self.mesh, PartitionSpec(tuple(self.mesh.axis_names))))

  def search(self, queries: np.ndarray, k: int, *,
             query_batch_size: int = DEFAULT_QUERY_BATCH,
             show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k] float32, global indices [Q, k] int64), best first, lower index first on
    ties. `k` may exceed this index's rows: the missing entries score -inf with index
    `np.iinfo(np.int32).max` (they sort after every real passage in `merge_top_k`)."""
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"queries {queries.shape} must be [Q, {self.dim}]")
    _check_finite("queries", queries)
    num_q = queries.shape[0]
    scores = np.full((num_q, k), -np.inf, np.float32)
    indices = np.full((num_q, k), _INDEX_FILL, np.int64)
    k_here = min(k, self.size)
    if num_q == 0 or k_here == 0:
      return scores, indices
    if self.mesh is None:
      search = _single_fn(k_here, self.block)
    else:
      search = _sharded_fn(self.mesh, k_here, self.block)
    n_valid = jnp.int32(self.size)
    q_pad = np.zeros((query_batch_size, self.dim), np.float32)
    starts = range(0, num_q, query_batch_size)
    if show_progress:
      from tqdm.auto import tqdm
      starts = tqdm(starts, desc="search", unit="batch")
    for start in starts:
      stop = min(start + query_batch_size, num_q)
      q_pad[:stop - start] = queries[start:stop]
      q_pad[stop - start:] = 0.0
      s, i = search(q_pad, self._corpus, n_valid)
      scores[start:stop, :k_here] = np.asarray(s)[:stop - start]
      indices[start:stop, :k_here] = np.asarray(i)[:stop - start] + self.index_offset
    return scores, indices


def merge_top_k(scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The top-k of several top-k lists: `scores`/`indices` [P, Q, k_p], list p from corpus rows
  below those of list p+1 (processes in order). A stable sort on the score keeps equal scores in
  list order, i.e. lower corpus index first, as one search over the whole corpus does."""
  s = np.concatenate(list(scores), axis=1)
  i = np.concatenate(list(indices), axis=1)
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


def exact_top_k(queries: np.ndarray, corpus: np.ndarray, k: int, *,
                block_size: int = DEFAULT_BLOCK_SIZE,
                query_batch_size: int = DEFAULT_QUERY_BATCH,
                mesh: Mesh | str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact inner-product top-k: (scores [Q, k] float32, indices [Q, k] int64), best first.

  The corpus is scored `block_size` rows at a time against `query_batch_size` queries (so the
  score buffer is [query_batch_size, block_size] whatever the corpus size), each block's top-k
  merged into a running top-k. With a mesh of several devices (or `mesh="auto"` when this
  process sees more than one) the corpus is split into contiguous shards, one per device, each
  device keeps its shard's top-k and a final merge picks the global one: the result is identical
  to the single-device path. Equal scores rank the lower corpus index first. `k` must not exceed
  the corpus size.
  """
  queries = np.asarray(queries, np.float32)
  corpus = np.asarray(corpus, np.float32)
  if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
    raise ValueError(f"queries {queries.shape} and corpus {corpus.shape} must be [Q, D] and "
                     "[N, D] with the same D")
  n = corpus.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f"k={k}; it must be between 1 and the corpus size {n}")
  block, q_batch = search_shapes(n, queries.shape[0], block_size, query_batch_size)
  _check_finite("queries", queries)
  index = CorpusIndex(corpus, block=block, mesh=mesh)
  return index.search(queries, k, query_batch_size=q_batch)


# --------------------------------------------------------------------------------------------
# Inputs, and the output file.


def _type_name(value: Any) -> str:
  if value is None:
    return "null"
  return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
          dict: "object"}.get(type(value), type(value).__name__)


def check_row(row: Any, where: str) -> None:
  """Raises `MiningInputError("{where}: ...")` unless `row` is a usable training row."""
  if not isinstance(row, dict):
    raise MiningInputError(f"{where}: expected a JSON object with \"query\" and \"pos\", got "
                           f"a JSON {_type_name(row)}")
  if "query" not in row:
    raise MiningInputError(f"{where}: missing field \"query\" (a string)")
  if not isinstance(row["query"], str):
    raise MiningInputError(f"{where}: field \"query\" is a JSON {_type_name(row['query'])}, "
                           "expected a string")
  if "pos" not in row:
    raise MiningInputError(f"{where}: missing field \"pos\" (a list of passages)")
  for field in ("pos", "neg"):
    if field not in row:
      continue
    value = row[field]
    if not isinstance(value, list):
      hint = " (wrap a single passage as [\"...\"])" if isinstance(value, str) else ""
      raise MiningInputError(f"{where}: field \"{field}\" is a JSON {_type_name(value)}, "
                             f"expected a list of strings{hint}")
    for j, text in enumerate(value):
      if not isinstance(text, str):
        raise MiningInputError(f"{where}: field \"{field}\"[{j}] is a JSON {_type_name(text)}, "
                               "expected a string")
  if not row["pos"]:
    raise MiningInputError(f"{where}: field \"pos\" is empty; a training row needs a positive")


def _jsonl(path: str) -> Iterator[tuple[int, Any]]:
  """(line number, parsed value) for the non-blank lines of a JSONL file."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise MiningInputError(f"{path}:{lineno}: not UTF-8 text (byte {e.start})") from None
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        raise MiningInputError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") \
            from None


def fe_row(row: Any) -> dict:
  """A `pairs.PairRow` as a FlagEmbedding JSON row (fields that are None or empty left out)."""
  out: dict[str, Any] = {"query": row.query, "pos": list(row.pos)}
  if row.neg:
    out["neg"] = list(row.neg)
  for key in ("pos_scores", "neg_scores"):
    if getattr(row, key) is not None:
      out[key] = list(getattr(row, key))
  for key in ("prompt", "type"):
    if getattr(row, key) is not None:
      out[key] = getattr(row, key)
  return out


def read_rows(path: str) -> list[dict]:
  """Training rows of a FlagEmbedding JSONL file, each checked (errors name `path:line`), or of
  a prepared pairs folder (`bge_jax.data.prepared`, validated when prepared; the fields of
  `pairs.PairRow` only)."""
  from bge_jax.data import prepared
  if prepared.is_prepared(path):
    return [fe_row(row) for row in prepared.open_prepared_pairs(path)]
  rows = []
  for lineno, row in _jsonl(path):
    check_row(row, f"{path}:{lineno}")
    rows.append(row)
  if not rows:
    raise MiningInputError(f"{path}: no rows (expected JSONL lines {{\"query\", \"pos\", ...}})")
  return rows


def read_candidate_pool(path: str) -> list[str]:
  """The `"text"` of every row of a JSONL candidate pool (errors name `path:line`), or the texts
  of a prepared text folder (`bge_jax.data.prepared`)."""
  from bge_jax.data import prepared
  if prepared.is_prepared(path):
    part = prepared.open_prepared_texts(path)
    return part.get_many(range(len(part)))
  texts = []
  for lineno, row in _jsonl(path):
    if not isinstance(row, dict) or "text" not in row:
      got = "no field \"text\"" if isinstance(row, dict) else f"a JSON {_type_name(row)}"
      raise MiningInputError(f"{path}:{lineno}: expected an object {{\"text\": ...}}, got {got}")
    if not isinstance(row["text"], str):
      raise MiningInputError(f"{path}:{lineno}: field \"text\" is a JSON "
                             f"{_type_name(row['text'])}, expected a string")
    texts.append(row["text"])
  if not texts:
    raise MiningInputError(f"{path}: the candidate pool has no rows")
  return texts


def write_rows(path: str, rows: Iterable[dict]) -> None:
  """Writes `rows` as JSONL to `path` atomically (`files.atomic_file`)."""
  with atomic_file(path) as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def parse_range(spec: str | Sequence[int]) -> tuple[int, int]:
  """`"10-210"` or `(10, 210)` -> (start, end), checked: 0 <= start < end."""
  if isinstance(spec, str):
    parts = spec.split("-")
    try:
      start, end = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
      start = end = None
    if start is None:
      raise ValueError(f"range {spec!r}: expected START-END, e.g. 10-210")
  else:
    start, end = (int(x) for x in spec)
  if not 0 <= start < end:
    raise ValueError(f"range {start}-{end}: need 0 <= START < END")
  return start, end


def _unique(texts: Iterable[str]) -> list[str]:
  return list(dict.fromkeys(texts))


# --------------------------------------------------------------------------------------------
# Mining.


def _sample_row(rng: np.random.Generator, candidates: np.ndarray, excluded: set[int],
                n_corpus: int, number: int, top_up: bool = True) -> tuple[list[int], int]:
  """`number` corpus indices: sampled from `candidates` (kept in rank order), then random top-ups.

  Returns (indices, how many are top-ups). Top-ups avoid `excluded` and the chosen ones; when
  fewer eligible passages exist than are needed (or `top_up` is False), the row stays short.
  """
  if len(candidates) > number:
    chosen = candidates[np.sort(rng.choice(len(candidates), number, replace=False))].tolist()
  else:
    chosen = candidates.tolist()
  need = number - len(chosen)
  if need <= 0 or not top_up:
    return chosen, 0
  taken = excluded | set(chosen)
  eligible_count = n_corpus - len(taken)
  if eligible_count <= 4 * need or n_corpus <= 4096:
    eligible = np.setdiff1d(np.arange(n_corpus), np.fromiter(taken, np.int64, len(taken)))
    extra = eligible[rng.permutation(len(eligible))[:need]].tolist()
  else:  # rejection sampling: at least 3/4 of the corpus is eligible
    extra = []
    while len(extra) < need:
      for j in rng.integers(0, n_corpus, size=2 * need).tolist():
        if j not in taken:
          taken.add(j)
          extra.append(j)
          if len(extra) == need:
            break
  return chosen + extra, len(extra)


@dataclasses.dataclass(frozen=True)
class ScoreLimits:
  """Which candidates are too close to the query to be negatives (sentence-transformers'
  `mine_hard_negatives` rules, the same comparisons in float32):

  * `max_score`: a candidate scoring `s > max_score` against the query is skipped.
  * `margin` (ST's `absolute_margin`): skipped when `s + margin > pos`, where `pos` is the
    query's score with its positive, the lowest one when a row has several (ST's choice).
  * `relative_margin`: skipped when `s > pos - |pos| * relative_margin`.
  """
  max_score: float | None = None
  margin: float | None = None
  relative_margin: float | None = None

  def __post_init__(self):
    for name in ("max_score", "margin", "relative_margin"):
      value = getattr(self, name)
      if value is not None and not np.isfinite(value):
        raise ValueError(f"{name}={value}; it must be a finite number")

  @property
  def active(self) -> bool:
    return any(v is not None for v in (self.max_score, self.margin, self.relative_margin))

  @property
  def need_positive_score(self) -> bool:
    return self.margin is not None or self.relative_margin is not None

  def violations(self, scores: np.ndarray, pos: np.ndarray | float) -> dict[str, np.ndarray]:
    """Rule name -> bool mask of `scores` the rule skips (`pos` broadcasts against them)."""
    scores = np.asarray(scores, np.float32)
    pos = np.asarray(pos, np.float32)
    out = {}
    if self.max_score is not None:
      out["max_score"] = scores > np.float32(self.max_score)
    if self.margin is not None:
      out["margin"] = scores + np.float32(self.margin) > pos
    if self.relative_margin is not None:
      out["relative_margin"] = scores > pos - np.abs(pos) * np.float32(self.relative_margin)
    return out


@dataclasses.dataclass(frozen=True)
class MiningStats:
  """What a mining run did, for the command's summary line."""
  rows: int
  corpus_size: int
  range_for_sampling: tuple[int, int]
  negative_number: int
  topped_up: int  # rows that needed random top-up passages
  short: int  # rows left with fewer than `negative_number` negatives
  # Candidates in the rank range (not a positive or the query) skipped by each score limit;
  # a candidate breaking two limits counts under both.
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  candidates: int = 0  # candidates in the rank range, positives and queries removed
  processes: int = 1


def corpus_split(n: int, chunk_size: int, process_index: int,
                 process_count: int) -> tuple[int, int]:
  """Rows [lo, hi) of n texts (the corpus, the queries, the positives outside the corpus) that
  one process embeds: whole chunks of `chunk_size` texts, contiguous, in process order (every
  process gets ~n / count, a process none when there are fewer chunks than processes)."""
  chunks = -(-n // chunk_size)
  lo = process_index * chunks // process_count
  hi = (process_index + 1) * chunks // process_count
  return min(lo * chunk_size, n), min(hi * chunk_size, n)


def _gather(x: np.ndarray) -> np.ndarray:
  """[P, ...]: `x` of every process, in process order (a process-local array when P = 1)."""
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x))


def encode_chunks(encoder: Any, texts: Sequence[str], lo: int, hi: int, chunk_size: int,
                   show_progress: bool, *, desc: str = "encode corpus",
                   **encode_kwargs: Any) -> np.ndarray:
  """[hi - lo, D] float32 embeddings of texts[lo:hi], encoded `chunk_size` texts per call on
  chunk boundaries of the whole list, so that a text's batch (hence its embedding, bit for bit)
  does not depend on how the list is split across processes (`corpus_split`). `encode_kwargs`
  go to `encoder.encode` (batch_size, max_length, instruction); `desc` names the progress bar
  shown over several chunks."""
  parts = []
  starts = range(lo, hi, chunk_size)
  if show_progress and len(starts) > 1:
    from tqdm.auto import tqdm
    starts = tqdm(starts, desc=desc, unit="chunk")
  for start in starts:
    parts.append(encoder.encode(texts[start:min(start + chunk_size, hi)],
                                show_progress=show_progress and len(starts) == 1,
                                **encode_kwargs))
  if not parts:
    return np.zeros((0, encoder.dim), np.float32)
  return np.concatenate(parts).astype(np.float32, copy=False)


def gather_split(local: np.ndarray, n: int, chunk_size: int,
                 piece: int = QUERY_CHUNK) -> np.ndarray:
  """[n, ...]: the rows of an array split across processes as `corpus_split(n, chunk_size, p,
  P)` splits them (`local`: this process's rows), whole and in order, on every process.

  The slices are gathered `piece` rows at a time, each padded to the longest slice, so the
  gather's buffer (on every local device too) is [P, piece, ...] whatever n; the result is a
  host array of n rows per process. One process: `local` itself.
  """
  processes = jax.process_count()
  if processes == 1:
    return local
  bounds = [corpus_split(n, chunk_size, p, processes) for p in range(processes)]
  lo, hi = bounds[jax.process_index()]
  if local.shape[0] != hi - lo:
    raise ValueError(f"this process holds {local.shape[0]} rows; its slice is {lo}-{hi}")
  longest = max(b - a for a, b in bounds)
  piece = max(1, min(piece, longest))
  out = np.empty((n, *local.shape[1:]), local.dtype)
  buffer = np.zeros((piece, *local.shape[1:]), local.dtype)
  for j in range(0, longest, piece):
    part = local[j:j + piece]
    buffer[:len(part)] = part
    buffer[len(part):] = 0
    got = _gather(buffer)
    for p, (a, b) in enumerate(bounds):
      rows = max(0, min(piece, b - a - j))
      out[a + j:a + j + rows] = got[p, :rows]
  return out


def _positive_scores(rows: Sequence[dict], q_vecs: np.ndarray, local: np.ndarray, lo: int,
                     position: dict[str, int], encoder: Any, chunk_size: int,
                     show_progress: bool, encode_kwargs: dict[str, Any]) -> np.ndarray:
  """[rows] float32: each query's lowest score with its positives (`q_vecs`: every query's
  embedding, [rows, D]). A positive in the corpus is scored by the process holding its
  embedding (`local`, corpus rows from `lo`); the positives outside the corpus (a candidate
  pool), deduplicated in first-seen order, are split across processes as the corpus is
  (`corpus_split`, `encode_chunks`) and scored by the process that encoded them. Every other
  process contributes +inf for a pair, and the processes take the minimum."""
  hi = lo + len(local)
  row_of, corpus_index, missing = [], [], {}
  for i, row in enumerate(rows):
    for text in row["pos"]:
      row_of.append(i)
      j = position.get(text)
      if j is None:
        j = -1 - missing.setdefault(text, len(missing))
      corpus_index.append(j)
  row_of = np.asarray(row_of, np.int64)
  corpus_index = np.asarray(corpus_index, np.int64)
  pair_scores = np.full(len(row_of), np.inf, np.float32)
  own = (corpus_index >= lo) & (corpus_index < hi)
  pair_scores[own] = np.einsum("nd,nd->n", q_vecs[row_of[own]], local[corpus_index[own] - lo])
  if missing:
    m_lo, m_hi = corpus_split(len(missing), chunk_size, jax.process_index(), jax.process_count())
    log.info("encoding %d positives missing from the corpus%s", len(missing),
             f"; this process: {m_lo}-{m_hi}" if jax.process_count() > 1 else "")
    extra = encode_chunks(encoder, list(missing), m_lo, m_hi, chunk_size, show_progress,
                          desc="encode positives", **encode_kwargs)
    m = -1 - corpus_index
    out = (corpus_index < 0) & (m >= m_lo) & (m < m_hi)
    pair_scores[out] = np.einsum("nd,nd->n", q_vecs[row_of[out]], extra[m[out] - m_lo])
  pair_scores = _gather(pair_scores).min(axis=0)
  best = np.full(len(rows), np.inf, np.float32)
  np.minimum.at(best, row_of, pair_scores)
  return best


def mine_with_stats(rows: Sequence[dict], encoder: Any, *,
                    candidate_pool: str | Sequence[str] | None = None,
                    range_for_sampling: str | Sequence[int] = (10, 210),
                    negative_number: int = 15,
                    query_instruction: str | None = None,
                    use_gpu_for_searching: Any = None,
                    seed: int = 0,
                    batch_size: int = 256,
                    max_length: int = 512,
                    mesh: Mesh | str | None = "auto",
                    block_size: int = DEFAULT_BLOCK_SIZE,
                    show_progress: bool | None = None,
                    max_score: float | None = None,
                    margin: float | None = None,
                    relative_margin: float | None = None,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[list[dict], MiningStats]:
  """`mine_hard_negatives`, also returning a `MiningStats`."""
  del use_gpu_for_searching  # the search runs on whatever JAX runs on
  start, end = parse_range(range_for_sampling)
  limits = ScoreLimits(max_score, margin, relative_margin)
  if negative_number < 1:
    raise ValueError(f"negative_number={negative_number}; it must be >= 1")
  if seed < 0:
    raise ValueError(f"seed={seed}; it must be >= 0")
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}; it must be >= 1")
  for i, row in enumerate(rows):
    check_row(row, f"rows[{i}]")
  if not rows:
    return [], MiningStats(0, 0, (start, end), negative_number, 0, 0)

  if candidate_pool is None:
    corpus = _unique(t for row in rows for t in (*row["pos"], *row.get("neg", ())))
  else:
    texts = read_candidate_pool(candidate_pool) if isinstance(candidate_pool, str) \
        else list(candidate_pool)
    for j, t in enumerate(texts):
      if not isinstance(t, str):
        raise TypeError(f"candidate_pool[{j}] is {type(t).__name__}, expected str")
    corpus = _unique(texts)
    if not corpus:
      raise ValueError("the candidate pool is empty")
  position = {t: j for j, t in enumerate(corpus)}
  n = len(corpus)
  processes, me = jax.process_count(), jax.process_index()
  lo, hi = corpus_split(n, chunk_size, me, processes)
  if show_progress is None:
    show_progress = max(n, len(rows)) > 4 * batch_size
  show_progress = show_progress and me == 0
  encode_kwargs = dict(batch_size=batch_size, max_length=max_length)

  log.info("encoding the corpus (%d passages%s)", n,
           f"; this process: {lo}-{hi}" if processes > 1 else "")
  local = encode_chunks(encoder, corpus, lo, hi, chunk_size, show_progress, **encode_kwargs)
  q_lo, q_hi = corpus_split(len(rows), chunk_size, me, processes)
  log.info("encoding the queries (%d rows%s)", len(rows),
           f"; this process: {q_lo}-{q_hi}" if processes > 1 else "")
  q_vecs = encode_chunks(encoder, [row["query"] for row in rows], q_lo, q_hi, chunk_size,
                         show_progress, desc="encode queries", instruction=query_instruction,
                         **encode_kwargs)
  # Every process searches its corpus rows with every query: the slices are gathered.
  q_vecs = gather_split(q_vecs, len(rows), chunk_size)
  pos_scores = (_positive_scores(rows, q_vecs, local, lo, position, encoder, chunk_size,
                                 show_progress, encode_kwargs)
                if limits.need_positive_score else None)

  k = min(end, n)
  block, q_batch = search_shapes(n, min(len(rows), QUERY_CHUNK), block_size)
  index = CorpusIndex(local, block=block, mesh=mesh, index_offset=lo)
  log.info("exact top-%d search over %d passages%s", k, n,
           f" ({processes} processes)" if processes > 1 else "")

  out, topped_up, short, candidates_total = [], 0, 0, 0
  skipped = {name: 0 for name in limits.violations(np.zeros(0), 0.0)}
  chunks = range(0, len(rows), QUERY_CHUNK)
  if show_progress and len(chunks) > 1:
    from tqdm.auto import tqdm
    chunks = tqdm(chunks, desc="search", unit="chunk")
  for q0 in chunks:
    q1 = min(q0 + QUERY_CHUNK, len(rows))
    scores, neighbours = index.search(q_vecs[q0:q1], k, query_batch_size=q_batch)
    if processes > 1:
      scores, neighbours = merge_top_k(_gather(scores), _gather(neighbours), k)
    for i in range(q0, q1):
      row = rows[i]
      excluded = {position[t] for t in (*row["pos"], row["query"]) if t in position}
      ranked, ranked_scores = neighbours[i - q0, start:k], scores[i - q0, start:k]
      keep = ~np.isin(ranked, np.fromiter(excluded, np.int64, len(excluded)))
      candidates_total += int(keep.sum())
      top_up = True
      if limits.active:
        pos = pos_scores[i] if pos_scores is not None else np.float32(0)
        broken = np.zeros_like(keep)
        for name, bad in limits.violations(ranked_scores, pos).items():
          skipped[name] += int((bad & keep).sum())
          broken |= bad
        keep &= ~broken
        # Top-ups are passages ranked k or lower: each scores at most the rank-(k-1) score, so
        # they all keep the limits when it does (and none is drawn otherwise).
        last = scores[i - q0, k - 1:k]
        top_up = k < n and not any(v.any() for v in limits.violations(last, pos).values())
        excluded = excluded | set(neighbours[i - q0, :k].tolist())
      rng = np.random.default_rng([seed, i])
      picked, extra = _sample_row(rng, ranked[keep], excluded, n, negative_number, top_up)
      topped_up += extra > 0
      short += len(picked) < negative_number
      new = {key: value for key, value in row.items() if key != "neg_scores"}
      new["neg"] = [corpus[j] for j in picked]
      out.append(new)
  if short:
    log.warning("%d of %d rows have fewer than %d negatives: too few passages in the corpus "
                "%s", short, len(rows), negative_number,
                "besides their positives" if not limits.active else
                "pass the score limits (widen --range or loosen the limits)")
  return out, MiningStats(len(rows), n, (start, end), negative_number, topped_up, short,
                          skipped, candidates_total, processes)


def mine_hard_negatives(rows: Sequence[dict], encoder: Any, *,
                        candidate_pool: str | Sequence[str] | None = None,
                        range_for_sampling: str | Sequence[int] = (10, 210),
                        negative_number: int = 15,
                        query_instruction: str | None = None,
                        use_gpu_for_searching: Any = None,
                        seed: int = 0,
                        batch_size: int = 256,
                        max_length: int = 512,
                        mesh: Mesh | str | None = "auto",
                        block_size: int = DEFAULT_BLOCK_SIZE,
                        show_progress: bool | None = None,
                        max_score: float | None = None,
                        margin: float | None = None,
                        relative_margin: float | None = None,
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[dict]:
  """New rows with `"neg"` replaced by mined hard negatives (FlagEmbedding's `hn_mine`).

  Args:
    rows: FlagEmbedding training rows `{"query": str, "pos": [str], "neg"?: [str], ...}`.
    encoder: an `Encoder` (anything with `encode(texts, batch_size=, max_length=,
      instruction=, show_progress=)` returning [N, D] embeddings, and `dim`).
    candidate_pool: the corpus to mine from: a list of texts or a JSONL file of `{"text"}`
      rows. Default: every `pos` and `neg` passage of `rows`. Deduplicated in first-seen order.
    range_for_sampling: ranks `[start, end)` of the query's neighbours to sample from
      (`(10, 210)` or `"10-210"`); skipping the top ranks avoids false negatives.
    negative_number: negatives per row.
    query_instruction: prepended to every query (not to passages) before encoding.
    use_gpu_for_searching: accepted for compatibility and ignored.
    seed: row `i` samples with `numpy.random.default_rng([seed, i])`.
    batch_size, max_length: for `encoder.encode`.
    mesh: for the search; `"auto"` shards it over this process's devices when there are several.
    block_size: corpus rows scored at a time per device.
    show_progress: progress bars (None: for long inputs; process 0 only).
    max_score, margin, relative_margin: false-negative limits (`ScoreLimits`): candidates
      too close to the query, or to its positive's score, are not sampled. With a limit set,
      random top-ups come only from passages ranked past `end` and only when the rank
      `end - 1` score keeps the limits (then every such passage does); else the row stays short.
    chunk_size: texts (corpus passages, queries, positives outside the corpus) encoded per
      `encoder.encode` call; in a multi-process run (`jax.distributed`) each process embeds
      whole chunks of its own (`corpus_split`) and searches its corpus chunks with every
      query (the query embeddings are gathered), the per-process top-k are merged, and every
      process returns the rows: those of one process. Per process this holds N/P corpus and
      all Q query embeddings and encodes N/P passages and Q/P queries (module docstring).

  Returns:
    One dict per row with all of its fields, `"neg"` replaced (sampled neighbours in rank order,
    then random top-ups when the range held too few) and a stale `"neg_scores"` dropped.
  """
  return mine_with_stats(
      rows, encoder, candidate_pool=candidate_pool, range_for_sampling=range_for_sampling,
      negative_number=negative_number, query_instruction=query_instruction,
      use_gpu_for_searching=use_gpu_for_searching, seed=seed, batch_size=batch_size,
      max_length=max_length, mesh=mesh, block_size=block_size, show_progress=show_progress,
      max_score=max_score, margin=margin, relative_margin=relative_margin,
      chunk_size=chunk_size)[0]


__all__ = ["MiningInputError", "MiningStats", "ScoreLimits", "CorpusIndex", "exact_top_k",
           "merge_top_k", "corpus_split", "encode_chunks", "gather_split", "check_row", "fe_row",
           "read_rows", "read_candidate_pool", "parse_range", "write_rows",
           "mine_hard_negatives", "mine_with_stats"]
