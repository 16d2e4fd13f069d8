"""Hard-negative mining (FlagEmbedding's `hn_mine`): exact inner-product top-k in JAX, sampling.

For every training row `{"query", "pos", "neg"?}` the corpus (a candidate pool, or else every
`pos`/`neg` passage of the rows) is searched with the query's embedding, the neighbours ranked
`[start, end)` are kept, the row's positives and the query text itself are dropped, and
`negative_number` of the rest are sampled as the row's new `"neg"`. Rows left short (a small
corpus, a narrow range) are topped up with random corpus passages that are neither positives
nor already chosen.

Differences from the PyTorch original, on purpose:

* The search is exact (no faiss): `exact_top_k` scores the corpus block by block in float32 at
  HIGHEST matmul precision, keeps a running top-k, and shards the corpus blocks over the devices
  of a mesh. Ties go to the lower corpus index, so a mining run is reproducible bit for bit.
* The corpus is deduplicated in first-seen order (not `list(set(...))`), and every row draws
  from its own generator seeded with `(seed, row index)`: the same inputs and seed give the same
  negatives, whatever the device count.
* Top-ups never pick a positive or the query (the original samples the whole corpus, a source
  of false negatives). Sampled negatives keep their rank order, hardest first; top-ups follow.
* A row's `neg_scores` (teacher scores of the old negatives) are dropped: they no longer match.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 8192
DEFAULT_QUERY_BATCH = 256
_INDEX_FILL = np.iinfo(np.int32).max


class MiningInputError(ValueError):
  """A bad training or candidate-pool row; the message starts with `file:line` (or `rows[i]`)."""


@dataclasses.dataclass(frozen=True)
class MiningStats:
  """What a mining run did, for the command's summary line."""
  rows: int
  corpus_size: int
  range_for_sampling: tuple[int, int]
  negative_number: int
  topped_up: int  # rows that needed random top-up passages
  short: int  # rows left with fewer than `negative_number` negatives (corpus too small)


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
  if mesh is None:
    return None
  if isinstance(mesh, str):
    if mesh != "auto":
      raise ValueError(f"mesh={mesh!r}; pass a jax Mesh, 'auto' or None")
    if jax.device_count() == 1:
      return None
    from bge_jax import sharding
    mesh = sharding.make_mesh()
  return mesh if mesh.size > 1 else None


def exact_top_k(queries: np.ndarray, corpus: np.ndarray, k: int, *,
                block_size: int = DEFAULT_BLOCK_SIZE,
                query_batch_size: int = DEFAULT_QUERY_BATCH,
                mesh: Mesh | str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact inner-product top-k: (scores [Q, k] float32, indices [Q, k] int64), best first.

  The corpus is scored `block_size` rows at a time against `query_batch_size` queries (so the
  score buffer is [query_batch_size, block_size] whatever the corpus size), each block's top-k
  merged into a running top-k. With a mesh of several devices (or `mesh="auto"` when JAX sees
  more than one) the corpus is split into contiguous shards, one per device, each device keeps
  its shard's top-k and a final merge picks the global one: the result is identical to the
  single-device path. Equal scores rank the lower corpus index first. `k` must not exceed the
  corpus size.
  """
  queries = np.asarray(queries, np.float32)
  corpus = np.asarray(corpus, np.float32)
  if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
    raise ValueError(f"queries {queries.shape} and corpus {corpus.shape} must be [Q, D] and "
                     "[N, D] with the same D")
  n, dim = corpus.shape
  if not 1 <= k <= n:
    raise ValueError(f"k={k}; it must be between 1 and the corpus size {n}")
  if block_size < 1 or query_batch_size < 1:
    raise ValueError(f"block_size={block_size}, query_batch_size={query_batch_size}; both >= 1")
  for name, x in (("queries", queries), ("corpus", corpus)):
    if not np.isfinite(x).all():
      raise ValueError(f"{name} holds NaN or inf values")
  num_q = queries.shape[0]
  if num_q == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)

  # The block and query-batch shapes depend on the data sizes only, never on the device count,
  # so every path runs the same matmul shapes.
  block = min(block_size, _round_up(n, 8))
  q_batch = min(query_batch_size, _round_up(num_q, 8))
  mesh = _resolve_mesh(mesh)
  shards = mesh.size if mesh is not None else 1
  padded = np.zeros((_round_up(n, block * shards), dim), np.float32)
  padded[:n] = corpus
  n_valid = jnp.int32(n)
  if mesh is None:
    corpus_dev = jax.device_put(padded)
    search = _single_fn(k, block)
  else:
    corpus_dev = jax.device_put(padded, NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names))))
    search = _sharded_fn(mesh, k, block)

  scores = np.empty((num_q, k), np.float32)
  indices = np.empty((num_q, k), np.int64)
  q_pad = np.zeros((q_batch, dim), np.float32)
  for start in range(0, num_q, q_batch):
    stop = min(start + q_batch, num_q)
    q_pad[:stop - start] = queries[start:stop]
    q_pad[stop - start:] = 0.0
    s, i = search(q_pad, corpus_dev, n_valid)
    scores[start:stop] = np.asarray(s)[:stop - start]
    indices[start:stop] = np.asarray(i)[:stop - start]
  return scores, indices


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


def read_rows(path: str) -> list[dict]:
  """Training rows of a FlagEmbedding JSONL file, each checked (errors name `path:line`)."""
  rows = []
  for lineno, row in _jsonl(path):
    check_row(row, f"{path}:{lineno}")
    rows.append(row)
  if not rows:
    raise MiningInputError(f"{path}: no rows (expected JSONL lines {{\"query\", \"pos\", ...}})")
  return rows


def read_candidate_pool(path: str) -> list[str]:
  """The `"text"` of every row of a JSONL candidate pool (errors name `path:line`)."""
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
  """Writes `rows` as JSONL to `path` atomically: to a temporary file beside it, then renamed,
  so `path` holds either its old content or all the rows, and no temporary file is left."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    # mkstemp makes the file 0600: give it the mode an ordinary open() would (or the old file's).
    if os.path.exists(path):
      mode = os.stat(path).st_mode & 0o777
    else:
      umask = os.umask(0)
      os.umask(umask)
      mode = 0o666 & ~umask
    os.fchmod(fd, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


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
                n_corpus: int, number: int) -> tuple[list[int], int]:
  """`number` corpus indices: sampled from `candidates` (kept in rank order), then random top-ups.

  Returns (indices, how many are top-ups). Top-ups avoid `excluded` and the chosen ones; when
  fewer eligible passages exist than are needed, all of them are taken.
  """
  if len(candidates) > number:
    chosen = candidates[np.sort(rng.choice(len(candidates), number, replace=False))].tolist()
  else:
    chosen = candidates.tolist()
  need = number - len(chosen)
  if need <= 0:
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
                    show_progress: bool | None = None) -> tuple[list[dict], MiningStats]:
  """`mine_hard_negatives`, also returning a `MiningStats`."""
  del use_gpu_for_searching  # the search runs on whatever JAX runs on
  start, end = parse_range(range_for_sampling)
  if negative_number < 1:
    raise ValueError(f"negative_number={negative_number}; it must be >= 1")
  if seed < 0:
    raise ValueError(f"seed={seed}; it must be >= 0")
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

  queries = [row["query"] for row in rows]
  log.info("encoding the corpus (%d passages)", len(corpus))
  p_vecs = encoder.encode(corpus, batch_size=batch_size, max_length=max_length,
                          show_progress=show_progress)
  log.info("encoding the queries (%d rows)", len(queries))
  q_vecs = encoder.encode(queries, batch_size=batch_size, max_length=max_length,
                          instruction=query_instruction, show_progress=show_progress)
  k = min(end, len(corpus))
  log.info("exact top-%d search over %d passages", k, len(corpus))
  _, neighbours = exact_top_k(q_vecs, p_vecs, k, block_size=block_size, mesh=mesh)

  out, topped_up, short = [], 0, 0
  for i, row in enumerate(rows):
    excluded = {position[t] for t in (*row["pos"], row["query"]) if t in position}
    ranked = neighbours[i, start:end]
    candidates = ranked[~np.isin(ranked, np.fromiter(excluded, np.int64, len(excluded)))]
    rng = np.random.default_rng([seed, i])
    picked, extra = _sample_row(rng, candidates, excluded, len(corpus), negative_number)
    topped_up += extra > 0
    short += len(picked) < negative_number
    new = {key: value for key, value in row.items() if key != "neg_scores"}
    new["neg"] = [corpus[j] for j in picked]
    out.append(new)
  if short:
    log.warning("%d of %d rows have fewer than %d negatives: the corpus has too few passages "
                "besides their positives", short, len(rows), negative_number)
  return out, MiningStats(len(rows), len(corpus), (start, end), negative_number, topped_up, short)


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
                        show_progress: bool | None = None) -> list[dict]:
  """New rows with `"neg"` replaced by mined hard negatives (FlagEmbedding's `hn_mine`).

  Args:
    rows: FlagEmbedding training rows `{"query": str, "pos": [str], "neg"?: [str], ...}`.
    encoder: an `Encoder` (anything with `encode(texts, batch_size=, max_length=,
      instruction=, show_progress=)` returning [N, D] embeddings).
    candidate_pool: the corpus to mine from: a list of texts or a JSONL file of `{"text"}`
      rows. Default: every `pos` and `neg` passage of `rows`. Deduplicated in first-seen order.
    range_for_sampling: ranks `[start, end)` of the query's neighbours to sample from
      (`(10, 210)` or `"10-210"`); skipping the top ranks avoids false negatives.
    negative_number: negatives per row.
    query_instruction: prepended to every query (not to passages) before encoding.
    use_gpu_for_searching: accepted for compatibility and ignored.
    seed: row `i` samples with `numpy.random.default_rng([seed, i])`.
    batch_size, max_length: for `encoder.encode`.
    mesh: for `exact_top_k`; `"auto"` shards the search over all devices when there are several.
    block_size: corpus rows scored at a time per device.
    show_progress: `encoder.encode`'s progress bar (None: for long inputs).

  Returns:
    One dict per row with all of its fields, `"neg"` replaced (sampled neighbours in rank order,
    then random top-ups when the range held too few) and a stale `"neg_scores"` dropped.
  """
  return mine_with_stats(
      rows, encoder, candidate_pool=candidate_pool, range_for_sampling=range_for_sampling,
      negative_number=negative_number, query_instruction=query_instruction,
      use_gpu_for_searching=use_gpu_for_searching, seed=seed, batch_size=batch_size,
      max_length=max_length, mesh=mesh, block_size=block_size, show_progress=show_progress)[0]


__all__ = ["MiningInputError", "MiningStats", "exact_top_k", "check_row", "read_rows",
           "read_candidate_pool", "parse_range", "mine_hard_negatives", "mine_with_stats"]
