"""Validation data of a run: rows held out of the training data (never trained on), or given files.

Two ways, per stage data config (`configs/retromae.py`, `configs/common.py`):

  data.validation_fraction = f   round(f * n) rows of each training dataset (stage 1: of the texts)
                                 are held out: chosen by a permutation seeded by n alone, so the
                                 choice is the same on every process, every resume and every
                                 config.seed (runs of a sweep validate on the same rows); the
                                 trainer's batcher reads the other rows only.
  data.validation = SPEC         files in data.train's format (comma-separated; stages 2-3: one
                                 dataset each), read as validation data only.

The trainer evaluates the stage's loss on full global batches of these rows (`HeldOutBatches`):
the same batch geometry as training, so a contrastive validation loss has as many in-batch
negatives as the training loss. Rows that do not fill a last global batch are not used.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

_TAG = 0x76616C  # the held-out choice's own random stream ("val")


def held_out(n: int, fraction: float) -> np.ndarray:
  """Sorted indices of the round(fraction * n) rows of n held out; a function of (n, fraction)."""
  count = int(round(fraction * n))
  return np.sort(np.random.default_rng([_TAG, n]).permutation(n)[:count])


class Rows(Sequence):
  """The rows `indices` of a `TextSource` (stage 1) with what `TextBatcher` uses of it: `len`,
  `[i]`, `__getitems__`, `locate` (the original file:line), `summary`, `shard`. (A source with
  a `subset` method makes its own: `PairSource` a copy of the rows, `PreparedPairs` a view.)"""

  def __init__(self, source: Any, indices: np.ndarray, what: str):
    self.source, self.indices, self.what = source, np.asarray(indices, np.int64), what

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]

  def __getitems__(self, idx: Sequence[int]) -> list:
    rows = [int(self.indices[i]) for i in idx]
    if hasattr(self.source, "__getitems__"):
      return self.source.__getitems__(rows)
    return [self.source[i] for i in rows]

  def __iter__(self) -> Iterator:
    return (self.source[int(i)] for i in self.indices)

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
  """Refuses a validation_fraction out of [0, 1) and both ways at once (ValueError naming the key)."""
  fraction = float(data.get("validation_fraction", 0.0) or 0.0)
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"config.data.validation_fraction={fraction} must be in [0, 1): the "
                      "fraction of the training rows held out for the validation loss.")
  if fraction and data.get("validation", ""):
    raise ValueError("config.data.validation and config.data.validation_fraction are both set; "
                      "validate on the given files or on held-out training rows, not both.")


def split(source: Any, data: Any, name: str = "") -> tuple[Any, Rows | None]:
  """(training rows, held-out rows or None) of one dataset by data.validation_fraction."""
  check_keys(data)
  fraction = float(data.get("validation_fraction", 0.0) or 0.0)
  if not fraction:
    return source, None
  n = len(source)
  rows = held_out(n, fraction)
  of = f" of {name!r}" if name else ""
  if len(rows) == 0 or len(rows) == n:
    raise ValueError(f"config.data.validation_fraction={fraction} holds out {len(rows)} of the "
                      f"{n} rows{of}: it must leave some rows for validation and some for "
                      "training.")
  train = np.setdiff1d(np.arange(n), rows, assume_unique=True)
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
