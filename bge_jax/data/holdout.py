"""Validation data of a run: rows held out of the training data (never trained on), or given files.

Two ways, per stage data config (`configs/retromae.py`, `configs/common.py`):

  data.validation_fraction = f   round(f * n) rows of each training dataset (stage 1: of the texts)
                                 are held out: chosen by a random stream seeded by n alone
                                 (`held_out`), so the choice is the same on every process, every
                                 resume and every config.seed (runs of a sweep validate on the
                                 same rows); the trainer's batcher reads the other rows only.
  data.validation = SPEC         files in data.train's format (comma-separated; stages 2-3: one
                                 dataset each), read as validation data only.

The trainer evaluates the stage's loss on full global batches of these rows (`HeldOutBatches`):
the same batch geometry as training, so a contrastive validation loss has as many in-batch
negatives as the training loss. Rows that do not fill a last global batch are not used.

Memory: the split costs O(k) for k held-out rows, not O(n): `held_out` draws the k rows without
a permutation of all n, and the training rows are `Complement(n, held)`, "every row but the
held-out ones", which maps a training position to its row by a binary search over the k
held-out rows (16 bytes a held-out row). Measured at n = 100M, f = 0.001 (docs/benchmarks.md):
+5.6 MiB peak resident memory, 0.02 s, where rule 1 and an array of the training rows took
+2,672 MiB peak (764 MiB kept) and 15.6 s in every process. An in-memory source
(`pairs.PairSource`) still copies its training rows; a prepared dataset
(`prepared.PreparedPairs`) keeps the complement as is.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

_TAG = 0x76616C  # the held-out choice's own random stream ("val")
RULE = 2  # data.validation_rule: how the held-out rows are chosen (`held_out`)
_OVERDRAW = (1.05, 1024)  # draws per batch: factor x the expected draws + margin


def held_out(n: int, fraction: float, rule: int = RULE) -> np.ndarray:
  """Sorted int64 indices of the k = round(fraction * n) rows of n held out: a function of
  (n, fraction, rule) alone.

  rule 2 (the default): the first k distinct values of x_t mod n, t = 0, 1, ..., where x_t are
    the 64-bit outputs of numpy's PCG64 seeded by (_TAG, n): a uniformly random k-subset (up to
    a bias of n / 2**64 per row), drawn in O(k) memory and expected O(k log(1 / (1 - f)) / f)
    draws (at most 1.39 k for f <= 0.5), in batches whose sizes do not change the result.
    (`Generator.choice(n, k, replace=False)` also avoids a permutation of all rows, by Floyd's
    algorithm, but only for k <= n / 50: above it shuffles an n-row array.)
  rule 1 (bge-jax before rule 2; `data.validation_rule=1` resumes such a run): the first k of a
    permutation of all n rows seeded by (_TAG, n); O(n) memory (8 bytes a row).
  """
  count = int(round(fraction * n))
  if rule == 1:
    return np.sort(np.random.default_rng([_TAG, n]).permutation(n)[:count])
  if rule != RULE:
    raise ValueError(f"config.data.validation_rule={rule}: use {RULE} (or 1, the rule of "
                     "bge-jax before it, to resume a run that started with it)")
  if count >= n:
    return np.arange(n, dtype=np.int64)
  bits = np.random.PCG64([_TAG, n])
  chosen = np.zeros(0, np.int64)  # sorted
  while len(chosen) < count:
    need, free = count - len(chosen), n - len(chosen)
    expected = -free * np.log1p(-need / free)  # draws to find `need` new rows among `free`
    size = int(expected * _OVERDRAW[0]) + _OVERDRAW[1]
    draws = (bits.random_raw(size) % np.uint64(n)).astype(np.int64)
    values, first = np.unique(draws, return_index=True)
    new = ~np.isin(values, chosen, assume_unique=True)
    values = values[new][np.argsort(first[new])][:need]  # new rows in stream order
    chosen = np.sort(np.concatenate([chosen, values]))
  return chosen


class Complement:
  """The rows of range(n) that are not in `held` (sorted, distinct), in increasing order, as an
  index map holding no n-sized array: O(k) memory for k held rows.

      c = Complement(n, held)
      len(c)                 # n - k (or a part's length)
      c[i]                   # -> int: the i-th row not held (negative i from the end)
      c[int array]           # -> int64 array of its shape, O(m log k) for m positions
      c[a:b:s]               # -> a Complement of those positions (O(1); `Rows.shard`)
      c.searchsorted(rows)   # how many of its rows are < each row (np.searchsorted, side left)
      np.asarray(c)          # every row: O(n - k) memory (in-memory sources and tests only)

  Position q of the complement is row q + #{j : held[j] - j <= q} (held[j] - j rows are not
  held below held[j]): one searchsorted over the k held rows.
  """

  def __init__(self, n: int, held: np.ndarray, positions: range | None = None):
    self.n, self.held = int(n), np.asarray(held, np.int64)
    if self.held.size and (np.any(np.diff(self.held) <= 0) or self.held[0] < 0
                           or self.held[-1] >= self.n):
      raise ValueError(f"Complement: the held rows must be strictly increasing in [0, {n})")
    self._gaps = self.held - np.arange(len(self.held))  # rows not held below each held row
    self.positions = range(self.n - len(self.held)) if positions is None else positions

  def __len__(self) -> int:
    return len(self.positions)

  def _rows(self, q: np.ndarray) -> np.ndarray:
    return q + np.searchsorted(self._gaps, q, side="right")

  def __getitem__(self, i):
    if isinstance(i, slice):
      part = Complement.__new__(Complement)
      part.n, part.held, part._gaps = self.n, self.held, self._gaps
      part.positions = self.positions[i]
      return part
    idx = np.asarray(i, np.int64)
    m = len(self)
    if idx.size and (idx.min() < -m or idx.max() >= m):
      bad = int(idx[(idx < -m) | (idx >= m)].reshape(-1)[0])
      raise IndexError(f"position {bad} out of range for {m} rows not held out")
    idx = np.where(idx < 0, idx + m, idx)
    rows = self._rows(self.positions.start + self.positions.step * idx)
    return int(rows) if rows.ndim == 0 else rows

  def __iter__(self) -> Iterator[int]:
    for lo in range(0, len(self), 1 << 16):
      yield from self[np.arange(lo, min(len(self), lo + (1 << 16)))].tolist()

  def searchsorted(self, rows, side: str = "left"):
    """How many of this map's rows are < each of `rows` (np.searchsorted, side "left")."""
    if side != "left" or self.positions.step < 0:
      raise ValueError("Complement.searchsorted: side='left' on an increasing map only")
    r = np.clip(np.asarray(rows, np.int64), 0, self.n)
    below = r - np.searchsorted(self.held, r, side="left")  # complement rows < r
    start, step = self.positions.start, self.positions.step
    at = np.clip(-((start - below) // step), 0, len(self))  # ceil((below - start) / step)
    return int(at) if at.ndim == 0 else at

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy  # always a new array
    return self[np.arange(len(self))].astype(dtype or np.int64, copy=False)

  def __repr__(self) -> str:
    return f"Complement(n={self.n}, held={len(self.held)} rows, positions={self.positions})"


class Rows(Sequence):
  """The rows `indices` of a `TextSource` (stage 1) with what `TextBatcher` uses of it: `len`,
  `[i]`, `__getitems__`, `locate` (the original file:line), `summary`, `shard`. (A source with
  a `subset` method makes its own: `PairSource` a copy of the rows, `PreparedPairs` a view.)"""

  def __init__(self, source: Any, indices: np.ndarray | Complement, what: str):
    if not isinstance(indices, Complement):
      indices = np.asarray(indices, np.int64)
    self.source, self.indices, self.what = source, indices, what

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]

  def __getitems__(self, idx: Sequence[int]) -> list:
    rows = np.asarray(self.indices[np.asarray(idx, np.int64)]).tolist()
    if hasattr(self.source, "__getitems__"):
      return self.source.__getitems__(rows)
    return [self.source[i] for i in rows]

  def __iter__(self) -> Iterator:
    return (self.source[int(i)] for i in self.indices)  # a Complement yields in chunks

  @property
  def origins(self) -> tuple[str, ...]:
    return self.source.origins

  def locate(self, i: int) -> str:
    return self.source.locate(int(self.indices[int(i)]))

  def shard(self, index: int, count: int) -> Rows:
    """Every `count`-th row from `index` (one process's part, as `TextSource.shard`)."""
    if len(self.indices[index::count]) == 0:
      raise ValueError(f"the {self.what} ({len(self)} rows) leave nothing for process {index} "
                        f"of {count}; hold out more rows or use fewer processes.")
    return Rows(self.source, self.indices[index::count], self.what)

  def summary(self) -> str:
    return f"{self.what}: {len(self)} of {self.source.summary()}"


def check_keys(data: Any) -> None:
  """Refuses a validation_fraction out of [0, 1), an unknown validation_rule and both ways at
  once (ValueError naming the key)."""
  fraction = float(data.get("validation_fraction", 0.0) or 0.0)
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"config.data.validation_fraction={fraction} must be in [0, 1): the "
                      "fraction of the training rows held out for the validation loss.")
  rule = data.get("validation_rule", RULE)
  if rule not in (1, RULE):
    raise ValueError(f"config.data.validation_rule={rule!r}: use {RULE} (or 1, the rule of "
                     "bge-jax before it, to resume a run that started with it)")
  if fraction and data.get("validation", ""):
    raise ValueError("config.data.validation and config.data.validation_fraction are both set; "
                      "validate on the given files or on held-out training rows, not both.")


def split(source: Any, data: Any, name: str = "") -> tuple[Any, Rows | None]:
  """(training rows, held-out rows or None) of one dataset by data.validation_fraction (rows
  chosen by data.validation_rule, `held_out`). The training rows are `Complement(n, held)`: a
  source with a `subset` method gets it as is (`PreparedPairs` keeps it, `PairSource` copies
  its rows), any other is wrapped in `Rows`. O(k) memory for k held-out rows."""
  check_keys(data)
  fraction = float(data.get("validation_fraction", 0.0) or 0.0)
  if not fraction:
    return source, None
  n = len(source)
  rows = held_out(n, fraction, int(data.get("validation_rule", RULE)))
  of = f" of {name!r}" if name else ""
  if len(rows) == 0 or len(rows) == n:
    raise ValueError(f"config.data.validation_fraction={fraction} holds out {len(rows)} of the "
                      f"{n} rows{of}: it must leave some rows for validation and some for "
                      "training.")
  train = Complement(n, rows)
  if hasattr(source, "subset"):  # a source that makes its own (PairSource)
    return source.subset(train), source.subset(rows)
  return (Rows(source, train, f"training rows{of} (validation_fraction={fraction} held out)"),
          Rows(source, rows, f"held-out validation rows{of}"))


class HeldOutBatches:
  """Process-local batches of the validation rows: `num_batches` full global batches, batch `i`
  a pure function of i (the same at every evaluation, masks and negatives included).

  `num_batches` is this process's count; the trainer uses the least over processes.
  """

  def __init__(self, batch: Callable[[int], dict[str, np.ndarray]], num_batches: int,
               description: str):
    self.batcher = batch  # the batcher of the validation rows (batch i = its step i)
    self.num_batches, self._description = int(num_batches), description

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self.num_batches:
      raise IndexError(f"validation batch {index} of {self.num_batches}")
    return self.batcher(index)

  def describe(self) -> str:
    return f"validation: {self.num_batches} batches; {self._description}"


def too_few(rows: int, global_batch: int, what: str) -> ValueError:
  """The error of validation data smaller than one global batch."""
  return ValueError(
      f"the validation data has {rows} {what}, fewer than one global batch ({global_batch}): "
      "the validation loss is computed on full batches of the training geometry. Raise "
      "config.data.validation_fraction, give a larger config.data.validation, or lower "
      "config.batch_size.")
