"""C-MTP pair filtering: score every (query, positive) pair with an embedding model, keep the good.

C-Pack (arXiv 2309.07597, section 3.1) builds C-MTP (unlabeled) from web (title, passage) pairs
and drops the pairs a third-party embedding model scores under a threshold (0.43 with
Text2Vec-Chinese). E5 (arXiv 2212.03533, section 3.1, "consistency-based filter") keeps a pair
when its passage ranks in the top k for its query among a pool of random passages (k = 2 among
1M passages). Both rules are here, alone or together (a pair is kept when it passes every rule
set):

* `threshold`: keep when cos(query, positive) >= threshold.
* `top_k` with `sample_size`: keep when the positive's rank, 1 + the number of sample passages
  scoring strictly above it (equal scores rank behind the positive), is at most `top_k`. The
  sample is the distinct positives of `sample_size` rows drawn without replacement with
  `numpy.random.default_rng(seed)` (every row when there are no more: the whole corpus); a
  row's own positives never count against it.

A pair is one positive of a row: a FlagEmbedding row with several positives keeps the ones that
pass (their `pos_scores` with them, its negatives untouched) and is dropped when none does.
Queries get the row's `prompt` when it has one, else `query_instruction` (FlagEmbedding's
convention: instructions on queries, not passages). Scores are inner products of the encoder's
embeddings: cosine similarities for a normalising `Encoder` (the default).

Cost: rows are read, encoded and decided `chunk_rows` at a time (`score_rows` is a generator),
so memory is O(chunk_rows) plus the sample's embeddings (sample passages x D x 4 bytes, split
over the local devices, and kept on the host too when the sample is every row's positives,
which are then not encoded twice) plus the input source (a prepared dataset is read lazily; a JSONL
`PairSource` is held in memory). Time: encoding every query and positive once, plus (top-k
rule) an exact search of each query against the sample: O(rows x sample x D) multiply-adds.
The score distribution is a fixed 2000-bin histogram over [-1, 1] (`ScoreHistogram`), so its
quantiles are exact to half a bin (0.0005) at any size.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Sequence

import numpy as np

from bge_jax import mine
from bge_jax.data.pairs import PairRow

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_SIZE = 1_000_000  # E5's pool of random passages
DEFAULT_CHUNK_ROWS = 8192
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


@dataclasses.dataclass(frozen=True)
class FilterRule:
  """What a pair must pass (module docstring); None turns a rule off."""
  threshold: float | None = None
  top_k: int | None = None
  sample_size: int = DEFAULT_SAMPLE_SIZE
  seed: int = 0

  def __post_init__(self):
    if self.threshold is None and self.top_k is None:
      raise ValueError("no rule: set threshold (cosine) and/or top_k (consistency)")
    if self.threshold is not None and not np.isfinite(self.threshold):
      raise ValueError(f"threshold={self.threshold}; it must be a finite number")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k={self.top_k}; it must be >= 1")
    if self.sample_size < 1:
      raise ValueError(f"sample_size={self.sample_size}; it must be >= 1")
    if self.seed < 0:
      raise ValueError(f"seed={self.seed}; it must be >= 0")


@dataclasses.dataclass(frozen=True)
class RowResult:
  """One row's pairs: `scores`, `ranks` and `keep` are aligned with `row.pos`."""
  index: int  # the row's index in the source
  row: PairRow
  scores: np.ndarray  # float32 [n_pos]: cos(query, positive)
  ranks: np.ndarray | None  # int64 [n_pos] (top-k rule): the rank; top_k + 1 means "> top_k"
  keep: np.ndarray  # bool [n_pos]

  def kept(self) -> dict | None:
    """The row as FlagEmbedding JSON with only its kept positives; None when none is kept."""
    if not self.keep.any():
      return None
    row = self.row
    return mine.fe_row(row._replace(
        pos=tuple(p for p, k in zip(row.pos, self.keep) if k),
        pos_scores=None if row.pos_scores is None else
        tuple(s for s, k in zip(row.pos_scores, self.keep) if k)))

  def dropped(self, where: str | None = None) -> dict | None:
    """The dropped pairs of the row with their scores (and ranks), for inspection; None when
    every pair is kept."""
    drop = ~self.keep
    if not drop.any():
      return None
    out: dict[str, Any] = {"query": self.row.query,
                           "pos": [p for p, d in zip(self.row.pos, drop) if d],
                           "score": [round(float(s), 6) for s in self.scores[drop]]}
    if self.ranks is not None:
      out["rank"] = self.ranks[drop].tolist()
    if where is not None:
      out["source"] = where
    return out


class ScoreHistogram:
  """Counts of pair scores in `bins` equal bins over [-1, 1] (scores outside are counted in the
  end bins; `low`/`high` keep the exact extremes), kept and dropped apart."""

  def __init__(self, bins: int = 2000):
    self.bins = bins
    self.counts = {True: np.zeros(bins, np.int64), False: np.zeros(bins, np.int64)}
    self.low, self.high, self.total = np.inf, -np.inf, 0.0

  @property
  def width(self) -> float:
    return 2.0 / self.bins

  def add(self, scores: np.ndarray, keep: np.ndarray) -> None:
    if scores.size == 0:
      return
    b = np.clip(((scores.astype(np.float64) + 1.0) / self.width).astype(np.int64), 0,
                self.bins - 1)
    for flag in (True, False):
      self.counts[flag] += np.bincount(b[keep == flag], minlength=self.bins)
    self.low = min(self.low, float(scores.min()))
    self.high = max(self.high, float(scores.max()))
    self.total += float(scores.astype(np.float64).sum())

  @property
  def n(self) -> int:
    return int(self.counts[True].sum() + self.counts[False].sum())

  def quantiles(self, qs: Sequence[float] = QUANTILES) -> dict[str, float]:
    """q -> the score at rank ceil(q * n) (numpy's `inverted_cdf`), as its bin's centre (within
    half a bin); q = 0 and 1 are the exact minimum and maximum."""
    n = self.n
    if n == 0:
      return {}
    cum = np.cumsum(self.counts[True] + self.counts[False])
    out = {}
    for q in qs:
      if q <= 0:
        value = self.low
      elif q >= 1:
        value = self.high
      else:
        b = int(np.searchsorted(cum, max(1, int(np.ceil(q * n)))))
        value = min(max(-1.0 + (b + 0.5) * self.width, self.low), self.high)
      out[f"{q:g}"] = round(float(value), 6)
    return out

  def summary(self) -> dict[str, Any]:
    return {"quantiles": self.quantiles(), "mean": round(self.total / max(self.n, 1), 6),
            "bin_width": self.width}


def draw_sample(source: Sequence[PairRow], sample_size: int, seed: int) -> list[str]:
  """The consistency rule's passages: the distinct positives (first-seen order) of
  `sample_size` rows drawn without replacement with `default_rng(seed)`, in row order; all rows
  when there are no more than `sample_size`."""
  n = len(source)
  if sample_size >= n:
    picks = range(n)
  else:
    picks = np.sort(np.random.default_rng(seed).choice(n, sample_size, replace=False)).tolist()
  return list(dict.fromkeys(t for row in _read(source, picks) for t in row.pos))


def _read(source: Sequence[PairRow], indices: Sequence[int]) -> list[PairRow]:
  """Rows by index; one batched read per shard for a prepared dataset (`__getitems__`)."""
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None:
    return list(getitems(list(indices)))
  return [source[i] for i in indices]


def _ranks(scores: np.ndarray, pair_row: np.ndarray, found_s: np.ndarray, found_i: np.ndarray,
           excluded: list[np.ndarray], top_k: int) -> np.ndarray:
  """Each pair's rank among the sample from its query's top list: 1 + the passages (not one of
  the row's own positives) scoring strictly above the positive; top_k + 1 when top_k or more do.

  Exact: the list holds the top top_k + (row's positives in the sample) passages, or all of them,
  so when fewer than top_k of its other passages score above the positive, one scores at most the
  positive, and so does every passage below the list."""
  ranks = np.empty(len(scores), np.int64)
  for m, (s, r) in enumerate(zip(scores, pair_row)):
    other = ~np.isin(found_i[r], excluded[r]) if len(excluded[r]) else True
    above = int(((found_s[r] > s) & other).sum())
    ranks[m] = min(above, top_k) + 1
  return ranks


def score_rows(source: Sequence[PairRow], encoder: Any, rule: FilterRule, *,
               query_instruction: str | None = None, batch_size: int = 256,
               max_length: int = 512, chunk_rows: int = DEFAULT_CHUNK_ROWS,
               mesh: Any = "auto", block_size: int = mine.DEFAULT_BLOCK_SIZE,
               show_progress: bool | None = None) -> Iterator[RowResult]:
  """Every row's pair scores and decisions, in row order (a generator: O(chunk_rows) memory).

  Args:
    source: rows (`pairs.PairSource`, a prepared dataset, or any sequence of `PairRow`).
    encoder: an `Encoder` (or anything with `encode(texts, batch_size=, max_length=,
      show_progress=) -> [N, D]`).
    rule: the `FilterRule`.
    query_instruction: prepended to queries of rows without their own `prompt`.
    batch_size, max_length: for `encoder.encode`.
    chunk_rows: rows encoded and decided at a time.
    mesh, block_size: the top-k rule's search (`mine.CorpusIndex`): "auto" splits the sample
      over this process's devices.
    show_progress: a progress bar over the rows (None: when there is more than one chunk).
  """
  if chunk_rows < 1:
    raise ValueError(f"chunk_rows={chunk_rows}; it must be >= 1")
  n = len(source)
  index = position = known = None
  if rule.top_k is not None and n:
    sample = draw_sample(source, rule.sample_size, rule.seed)
    log.info("consistency sample: %d passages from %d rows", len(sample),
             min(rule.sample_size, n))
    show = show_progress if show_progress is not None else len(sample) > 4 * batch_size
    vectors = mine.encode_chunks(encoder, sample, 0, len(sample), mine.DEFAULT_CHUNK_SIZE,
                                  show, batch_size=batch_size, max_length=max_length)
    position = {t: j for j, t in enumerate(sample)}
    block, _ = mine.search_shapes(len(sample), 1, block_size)
    index = mine.CorpusIndex(vectors, block=block, mesh=mesh)
    # A sample of every row holds every positive: their embeddings are reused, not recomputed.
    known = vectors if rule.sample_size >= n else None
    del vectors
  starts = range(0, n, chunk_rows)
  bar = None
  if show_progress or (show_progress is None and len(starts) > 1):
    from tqdm.auto import tqdm
    bar = tqdm(total=n, desc="filter", unit="row")
  try:
    for c0 in starts:
      rows = _read(source, range(c0, min(c0 + chunk_rows, n)))
      queries = [(r.prompt if r.prompt is not None else query_instruction or "") + r.query
                 for r in rows]
      passages = [p for r in rows for p in r.pos]
      pair_row = np.repeat(np.arange(len(rows)), [len(r.pos) for r in rows])
      kwargs = dict(batch_size=batch_size, max_length=max_length, show_progress=False)
      q = np.asarray(encoder.encode(queries, **kwargs), np.float32)
      if known is not None:
        p = known[[position[t] for t in passages]]
      else:
        p = np.asarray(encoder.encode(passages, **kwargs), np.float32)
      scores = np.einsum("nd,nd->n", q[pair_row], p)
      keep = np.ones(len(scores), bool)
      if rule.threshold is not None:
        keep &= scores >= np.float32(rule.threshold)
      ranks = None
      if index is not None:
        excluded = [np.asarray(sorted({position[t] for t in r.pos if t in position}), np.int64)
                    for r in rows]
        k = min(rule.top_k + max(len(e) for e in excluded), index.size)
        q_batch = mine.search_shapes(index.size, len(rows))[1]
        found_s, found_i = index.search(q, k, query_batch_size=q_batch)
        ranks = _ranks(scores, pair_row, found_s, found_i, excluded, rule.top_k)
        keep &= ranks <= rule.top_k
      bounds = np.concatenate([[0], np.cumsum([len(r.pos) for r in rows])])
      for j, row in enumerate(rows):
        a, b = bounds[j], bounds[j + 1]
        yield RowResult(c0 + j, row, scores[a:b], None if ranks is None else ranks[a:b],
                        keep[a:b])
      if bar is not None:
        bar.update(len(rows))
  finally:
    if bar is not None:
      bar.close()


@dataclasses.dataclass
class FilterSummary:
  """Counts and the score distribution of a filtering run (`add` each `RowResult`)."""
  rule: FilterRule
  rows: int = 0
  pairs: int = 0
  kept_rows: int = 0
  kept_pairs: int = 0
  failed_threshold: int = 0  # pairs under the threshold (whatever their rank)
  failed_top_k: int = 0  # pairs ranked below top_k (whatever their score)
  histogram: ScoreHistogram = dataclasses.field(default_factory=ScoreHistogram)

  def add(self, result: RowResult) -> None:
    self.rows += 1
    self.pairs += len(result.keep)
    self.kept_rows += bool(result.keep.any())
    self.kept_pairs += int(result.keep.sum())
    if self.rule.threshold is not None:
      self.failed_threshold += int((result.scores < np.float32(self.rule.threshold)).sum())
    if result.ranks is not None:
      self.failed_top_k += int((result.ranks > self.rule.top_k).sum())
    self.histogram.add(result.scores, result.keep)

  def to_json(self) -> dict[str, Any]:
    rule = {"threshold": self.rule.threshold, "top_k": self.rule.top_k}
    if self.rule.top_k is not None:
      rule.update(sample_size=self.rule.sample_size, seed=self.rule.seed)
    return {"rule": rule, "rows": self.rows, "pairs": self.pairs, "kept_rows": self.kept_rows,
            "dropped_rows": self.rows - self.kept_rows, "kept_pairs": self.kept_pairs,
            "dropped_pairs": self.pairs - self.kept_pairs,
            "failed_threshold": self.failed_threshold, "failed_top_k": self.failed_top_k,
            "scores": self.histogram.summary()}

  def line(self) -> str:
    pct = 100.0 * self.kept_pairs / max(self.pairs, 1)
    q = self.histogram.quantiles((0.05, 0.5, 0.95))
    return (f"kept {self.kept_pairs} of {self.pairs} pairs ({pct:.1f}%), {self.kept_rows} of "
            f"{self.rows} rows; scores p5/p50/p95 {q.get('0.05')}/{q.get('0.5')}/{q.get('0.95')}")


def plot_scores(summary: FilterSummary, out_path: str, *, title: str | None = None,
                bins: int = 100, dpi: int = 100) -> str:
  """The pair scores' distribution as a PNG (kept and dropped stacked, the threshold marked),
  written atomically (`plots.save_png`); returns the path."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  from bge_jax.train.plots import save_png

  hist = summary.histogram
  group = max(1, hist.bins // bins)
  edges = np.linspace(-1.0, 1.0, hist.bins // group + 1)
  fig = Figure(figsize=(7.0, 4.0), dpi=dpi, layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  bottom = np.zeros(len(edges) - 1)
  for flag, label, color in ((True, "kept", "C0"), (False, "dropped", "C3")):
    counts = hist.counts[flag][:len(bottom) * group].reshape(-1, group).sum(axis=1)
    ax.bar(edges[:-1], counts, width=np.diff(edges), bottom=bottom, align="edge", color=color,
           label=f"{label} ({int(counts.sum())})")
    bottom += counts
  if summary.rule.threshold is not None:
    ax.axvline(summary.rule.threshold, color="k", linestyle="--", linewidth=1,
               label=f"threshold {summary.rule.threshold:g}")
  if np.isfinite(hist.low):
    pad = 0.05
    ax.set_xlim(max(-1.0, hist.low - pad), min(1.0, hist.high + pad))
  ax.set_xlabel("cos(query, positive)")
  ax.set_ylabel("pairs")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small")
  ax.set_title(title or ("pair scores" + (f" (top-{summary.rule.top_k} rule)"
                                          if summary.rule.top_k is not None else "")))
  return save_png(fig, out_path)


def filter_pairs(source: Sequence[PairRow], encoder: Any, rule: FilterRule,
                 **kwargs: Any) -> tuple[list[dict], FilterSummary]:
  """In memory: (the kept rows as FlagEmbedding JSON, the `FilterSummary`); `score_rows`'s
  keyword arguments."""
  kept, summary = [], FilterSummary(rule)
  for result in score_rows(source, encoder, rule, **kwargs):
    summary.add(result)
    row = result.kept()
    if row is not None:
      kept.append(row)
  return kept, summary


__all__ = ["FilterRule", "RowResult", "ScoreHistogram", "FilterSummary", "draw_sample",
           "score_rows", "filter_pairs", "plot_scores"]
