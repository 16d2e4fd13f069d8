"""Merging small datasets for same-dataset batches (FlagEmbedding's `--small_threshold` and
`--drop_threshold`).

A contrastive batch is drawn from one dataset (`pairs.ContrastiveBatcher`), so a dataset with
fewer rows than its global batch gives no batch at all. FlagEmbedding's same-dataset sampler
(`AbsEmbedderSameDatasetTrainDataset` in FlagEmbedding/abc/finetune/embedder/AbsDataset.py,
FlagEmbedding >= 1.3; https://github.com/FlagOpen/FlagEmbedding) handles many small files so:
for each folder of `--train_data`, every .json/.jsonl file directly in it is a dataset; the files
with fewer than `small_threshold` rows are concatenated into one dataset, whose batch size is the
least of theirs, kept when it holds at least `drop_threshold` rows and dropped otherwise (a file
named on its own with fewer than `small_threshold` rows is dropped). Both thresholds default to
0: nothing is small, nothing merged.

Here a dataset is a `data.train` spec (`merge_small_datasets`):
  * small: fewer than `small_threshold` rows as read (bad rows skipped; before
    `data.validation_fraction` holds any out), as FlagEmbedding counts a file's rows;
  * grouped by the folder the spec sits in, `folder_of(spec)`: `data/a.jsonl`, `data/b*.jsonl`
    and the folder `data/sts` all sit in `data`; and by how they are scored: a dataset without
    in-batch negatives (`data.no_in_batch_datasets`, a `*no_in_batch_neg` name) is merged only
    with others without them (FlagEmbedding's flag is the folder's, the same for all its files);
  * each group of two or more becomes one dataset named `merged_name(folder, k, flag)` at the
    position of its first member, its rows the members' in order; a group of one keeps its name;
  * a group whose rows together are fewer than `drop_threshold` is dropped;
  * the merged dataset's batch size is the least of its members' (`data.batch_sizes`;
    FlagEmbedding's `min` of the files' batch sizes); members must share one `data.weights`.
A merge and a drop each log one line naming the datasets. The result is a pure function of the
datasets and the options, so the batch schedule stays a function of (seed, step).

Difference from FlagEmbedding: it drops a small file named on its own in `--train_data` whatever
`drop_threshold`; here every spec sits in a folder, so such a file is a group of one, kept when it
has at least `drop_threshold` rows. FlagEmbedding's `--train_data dir` (each file a dataset) is
`data.train=dir/a.jsonl,dir/b.jsonl,...` here (a folder spec is one dataset).

Cost: merging concatenates the members' row lists (O(rows of the small datasets)) once, at start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from bge_jax.data.pairs import PairSource
from bge_jax.data.sources import DataError

log = logging.getLogger(__name__)

_LISTED = 8  # datasets named in a log line before "+N more"


class Merged(NamedTuple):
  """The datasets after merging and dropping, and what was done.

  datasets: (name, source) pairs, in order.
  batch_sizes, weights: aligned with `datasets` (None where None was given).
  no_in_batch_datasets: the given names less those merged or dropped (a merged dataset carries
    the flag in its source's `no_in_batch_neg`).
  merges: (new name, member names) per merged group.
  dropped: the names of the datasets dropped.
  """

  datasets: list[tuple[str, Any]]
  batch_sizes: list[int] | None
  weights: list[float] | None
  no_in_batch_datasets: tuple[str, ...]
  merges: list[tuple[str, tuple[str, ...]]]
  dropped: list[str]


def folder_of(spec: str) -> str:
  """The folder a data spec sits in, as written: `dirname(normpath(spec))`, "." when none."""
  return os.path.dirname(os.path.normpath(os.path.expanduser(str(spec)))) or "."


def merged_name(folder: str, count: int, no_in_batch: bool) -> str:
  """The name of the dataset merged from `count` small datasets of `folder`."""
  return f"{folder}/[{count} small datasets{', no_in_batch_neg' if no_in_batch else ''}]"


def _listing(names: Sequence[str], sizes: Sequence[int]) -> str:
  shown = ", ".join(f"{n} {k}" for n, k in zip(names[:_LISTED], sizes[:_LISTED]))
  return shown + (f", +{len(names) - _LISTED} more" if len(names) > _LISTED else "")


def check_thresholds(small_threshold: Any, drop_threshold: Any) -> tuple[int, int]:
  """Both thresholds as ints >= 0 (ValueError naming the config key otherwise)."""
  out = []
  for key, value in (("small_threshold", small_threshold), ("drop_threshold", drop_threshold)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"config.data.{key}={value!r}: give a number of rows >= 0 (0 = off, "
                       "FlagEmbedding's default)")
    out.append(int(value))
  return out[0], out[1]


def merge_small_datasets(datasets: Sequence[tuple[str, Any]], *, small_threshold: int,
                         drop_threshold: int = 0, batch_sizes: Sequence[int] | None = None,
                         weights: Sequence[float] | None = None,
                         no_in_batch_datasets: Sequence[str] = ()) -> Merged:
  """Merges the small datasets of each folder into one and drops merged ones still too small.

  Args:
    datasets: (name, source) pairs, names as written in data.train (a spec); sources are
      `PairSource`s (a prepared dataset may be kept or dropped, not merged).
    small_threshold: a dataset with fewer rows is small (0: none is).
    drop_threshold: a group of small datasets with fewer rows together is dropped.
    batch_sizes, weights: per dataset, aligned with `datasets` (None: all the same).
    no_in_batch_datasets: names of datasets scored within their own group only.

  Returns:
    `Merged` (see the module docstring for the rule).

  Raises:
    ValueError: a bad threshold, members of a merge with different weights, or every dataset
      dropped.
    DataError: a prepared (lazily read) dataset would be merged.
  """
  small_threshold, drop_threshold = check_thresholds(small_threshold, drop_threshold)
  names = [str(n) for n, _ in datasets]
  sources = [s for _, s in datasets]
  sizes = None if batch_sizes is None else [int(b) for b in batch_sizes]
  w = None if weights is None else [float(x) for x in weights]
  for what, values in (("batch_sizes", sizes), ("weights", w)):
    if values is not None and len(values) != len(names):
      raise ValueError(f"{what} has {len(values)} entries for {len(names)} datasets")
  named = frozenset(no_in_batch_datasets)
  if small_threshold == 0:
    if drop_threshold:
      log.warning("config.data.drop_threshold=%d has no effect with data.small_threshold=0 (no "
                  "dataset is small): set data.small_threshold too", drop_threshold)
    return Merged(list(zip(names, sources)), sizes, w, tuple(no_in_batch_datasets), [], [])

  flags = [n in named or bool(getattr(s, "no_in_batch_neg", False))
           for n, s in zip(names, sources)]
  groups: dict[tuple[str, bool], list[int]] = {}
  for i, src in enumerate(sources):
    if len(src) < small_threshold:
      key = (os.path.abspath(folder_of(names[i])), flags[i])
      groups.setdefault(key, []).append(i)

  out, out_sizes, out_w = [], [], []
  merges: list[tuple[str, tuple[str, ...]]] = []
  dropped: list[str] = []
  for i, (name, src) in enumerate(zip(names, sources)):
    members = groups.get((os.path.abspath(folder_of(name)), flags[i]), [])
    if len(src) >= small_threshold:
      members = [i]
    elif members[0] != i:
      continue  # merged into (or dropped with) the group's first member
    rows = sum(len(sources[j]) for j in members)
    member_names = [names[j] for j in members]
    if len(src) < small_threshold and rows < drop_threshold:
      dropped.extend(member_names)
      log.warning("data.drop_threshold=%d: dropped %d small dataset%s of %s (fewer than "
                  "data.small_threshold=%d rows each; %d rows together): %s", drop_threshold,
                  len(members), "s" if len(members) != 1 else "", folder_of(name),
                  small_threshold, rows, _listing(member_names, [len(sources[j]) for j in members]))
      continue
    if len(members) > 1:
      lazy = [names[j] for j in members if not isinstance(sources[j], PairSource)]
      if lazy:
        raise DataError(
            f"{lazy[0]} is a prepared dataset with {len(sources[names.index(lazy[0])])} rows, "
            f"fewer than config.data.small_threshold={small_threshold}, so it would be merged "
            f"with {', '.join(n for n in member_names if n != lazy[0])}; a prepared dataset is "
            "read lazily and is not merged: prepare the small datasets of "
            f"{folder_of(name)} together (launch/prepare_data.py), or lower "
            "data.small_threshold below its rows")
      if w is not None and len({w[j] for j in members}) > 1:
        raise ValueError(
            f"config.data.weights: the small datasets {member_names} are merged into one "
            f"(data.small_threshold={small_threshold}) but have weights "
            f"{[w[j] for j in members]}; give them the same weight")
      merged = merged_name(folder_of(name), len(members), flags[i])
      src = PairSource.concat([sources[j] for j in members], no_in_batch_neg=flags[i])
      merges.append((merged, tuple(member_names)))
      log.info("data.small_threshold=%d: merged %d small datasets of %s into %r (%d rows): %s",
               small_threshold, len(members), folder_of(name), merged, rows,
               _listing(member_names, [len(sources[j]) for j in members]))
      name = merged
    out.append((name, src))
    if sizes is not None:
      out_sizes.append(min(sizes[j] for j in members))
    if w is not None:
      out_w.append(w[members[0]])
  if not out:
    raise ValueError(f"config.data.drop_threshold={drop_threshold}: every dataset of "
                     f"data.train is small (fewer than data.small_threshold={small_threshold} "
                     "rows) and dropped; lower data.drop_threshold or data.small_threshold")
  gone = set(names) - {n for n, _ in out}  # unknown names stay, for the batcher to refuse
  return Merged(out, None if sizes is None else out_sizes, None if w is None else out_w,
                tuple(n for n in no_in_batch_datasets if n not in gone), merges, dropped)
