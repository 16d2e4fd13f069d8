"""`Encoder`: texts -> sentence embeddings with the HF tokenizer, bucketed shapes, one jit per bucket."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np

from bge_jax import convert, weights
from bge_jax.config import BertConfig
from bge_jax.contrastive import check_truncate_dim, truncate_embeddings
from bge_jax.models import bert

log = logging.getLogger(__name__)

# Padded lengths: 4 per octave (steps of 1/4 of the power of two below), never finer than 4
# tokens. Padding is pure waste on the encoder's compute: powers of two alone cost 1.9x the real
# tokens of STS-B sentences (~10 tokens pad to 16), this grid 1.3x, for a few more compiled
# shapes (at most 24 up to 512 tokens; a corpus uses a handful). See README "Benchmarks".
MIN_BUCKET = 4
BUCKETS_PER_OCTAVE = 4
# Batches dispatched ahead of the one whose result is fetched (0 = fetch each batch at once).
PIPELINE_DEPTH = 2


def length_buckets(max_length: int, smallest: int = MIN_BUCKET,
                   per_octave: int = BUCKETS_PER_OCTAVE) -> tuple[int, ...]:
  """Padded lengths used for batches, capped by `max_length` (always the last one).

  From `smallest`, each step adds a `per_octave`-th of the power of two at or below the current
  length (at least `smallest`): 4, 8, ..., 32, 40, 48, 56, 64, 80, ... for the defaults, so a
  batch pads by at most 1/per_octave of its length past the first octave.
  """
  out, n = [], smallest
  while n < max_length:
    out.append(n)
    n += max(smallest, (1 << (n.bit_length() - 1)) // per_octave)
  out.append(max_length)
  return tuple(out)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


def padded_rows(n: int, batch_size: int) -> int:
  """Rows of a padded batch of n texts: the next power of two, at most batch_size."""
  return min(batch_size, 1 << (n - 1).bit_length())


def batch_shape(lengths: Sequence[int], batch_size: int, buckets: Sequence[int],
                pack: bool) -> tuple[int, int, list[list[int]] | None]:
  """(rows, length, bins) that `Encoder.encode` computes for one batch of texts of these token
  lengths. Packed (`pack` and every text >= 2 tokens): `packing.smallest_shape` with at most the
  padded rows; bins says which texts share a row. Padded (bins None): one text per row, a
  power-of-two row count up to `batch_size`, the bucket of the longest text."""
  from bge_jax.data import packing
  rows = padded_rows(len(lengths), batch_size)
  if pack and min(lengths) >= 2:
    return packing.smallest_shape(lengths, tuple(buckets), rows)
  return rows, bucket_for(max(lengths), buckets), None


def default_devices() -> tuple[jax.Device, ...]:
  """Where an Encoder computes by default: every local accelerator (GPU, TPU), each batch's rows
  split among them; on CPU one device, since CPU devices share the host's cores (and tests fake
  several of them)."""
  devices = jax.local_devices()
  return tuple(devices) if jax.default_backend() != "cpu" else tuple(devices[:1])


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _encoding_config(config: BertConfig, overrides: dict[str, Any], caller: str) -> BertConfig:
  """A saved config for encoding: float32 compute unless `overrides` say otherwise (the saved
  dtype is the training run's, bf16 on accelerators), then `overrides`; errors name `caller`."""
  try:
    return config.replace(**{"dtype": "float32", **overrides})
  except (TypeError, ValueError) as e:
    raise ValueError(f"{caller}: {e}") from e


def _load_tokenizer(folder: str):
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(folder)
  except (OSError, ValueError) as e:
    raise convert.ConversionError(
        f"{folder}: no usable tokenizer ({e}). Put tokenizer files (tokenizer.json or vocab.txt "
        "with tokenizer_config.json) there, or pass tokenizer= to the Encoder.") from e


def _truncated(vectors: jax.Array, config: BertConfig, truncate_dim: int | None) -> jax.Array:
  """Un-normalised vectors [N, E] -> the encoder's output: cut to `truncate_dim` (None: all E)
  and L2-normalised when config.normalize."""
  if truncate_dim is None:
    return bert.l2_normalize(vectors) if config.normalize else vectors
  return truncate_embeddings(vectors, truncate_dim, config.normalize)


@functools.lru_cache(maxsize=16)
def _jitted_embed(config: BertConfig, truncate_dim: int | None = None):
  """One jitted embedding function per (config, truncate_dim), shared by Encoders (e.g.
  evaluation during training builds a new Encoder each time; its shapes stay compiled)."""
  def embed(params, input_ids, attention_mask):
    vectors = bert.embed_sentences(params, config, input_ids, attention_mask, normalize=False)
    return _truncated(vectors, config, truncate_dim)
  return jax.jit(embed)


@functools.lru_cache(maxsize=16)
def _jitted_embed_packed(config: BertConfig, truncate_dim: int | None = None):
  """Packed rows -> the embeddings of the texts that `text_slot` names (`bge_jax.data.packing`)."""
  def embed(params, input_ids, segment_ids, position_ids, text_slot):
    slots = bert.packed_slot_vectors(params, config, input_ids, segment_ids, position_ids,
                                     pooling=config.pooling)
    return _truncated(bert.texts_from_slots(slots, text_slot, False), config, truncate_dim)
  return jax.jit(embed)


class Encoder:
  """Sentence embeddings from a BERT: `Encoder.from_hf(path).encode(texts)` -> [N, D] numpy.

  Batching: texts are tokenised once, sorted by length and cut into batches of `batch_size`.
  By default (`pack=True`) each batch's texts are packed several to a row (block-diagonal
  attention, per-text positions and pooling: the same embeddings, within float rounding, as one
  text per row) into the fewest tokens that a power-of-two row count times a length bucket
  (`length_buckets`: 4, 8, ..., 32, 40, 48, ... max_length) allows; with `pack=False` each text
  has its own row, padded to its batch's bucket. Either way a whole corpus compiles a handful of
  shapes, not one per batch. Batches are dispatched ahead of their results (host packing
  overlaps device compute). Results come back in input order.

  Devices (`devices`, default `default_devices()`: every local GPU/TPU, one CPU device): the
  params are replicated on each, and each batch's rows are split among them (data parallel;
  the row count is rounded up to a multiple of the devices with filler rows).

  `truncate_dim` (Matryoshka, sentence-transformers' `truncate_dim`): vectors [N, truncate_dim],
  the first truncate_dim features of the pooled vector, L2-re-normalised when `normalize` (unlike
  sentence-transformers, which cuts after its Normalize module and leaves the cut vectors
  shorter than 1). None: all hidden_size features.
  """

  def __init__(self, params: Any, config: BertConfig, tokenizer: Any, *,
               pooling: str = "cls", normalize: bool = True,
               devices: Sequence[jax.Device] | None = None, truncate_dim: int | None = None):
    if pooling not in ("cls", "mean"):
      raise ValueError(f"pooling={pooling!r}; use 'cls' or 'mean'")
    self.truncate_dim = (None if truncate_dim is None
                         else check_truncate_dim(truncate_dim, config.hidden_size))
    self.config = config.replace(pooling=pooling, normalize=normalize)
    self.devices = tuple(devices) if devices is not None else default_devices()
    if not self.devices:
      raise ValueError("devices is empty; give at least one (default: default_devices())")
    mesh = jax.sharding.Mesh(np.asarray(self.devices), ("batch",))
    self._rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # On the devices once: numpy leaves would be copied to them again at every batch.
    self.params = jax.device_put(params, self._replicated)
    self.tokenizer = tokenizer
    self._embed = _jitted_embed(self.config, self.truncate_dim)
    self._embed_packed = _jitted_embed_packed(self.config, self.truncate_dim)

  @classmethod
  def from_hf(cls, path: str, pooling: str = "cls", normalize: bool = True, *,
              tokenizer: Any = None, devices: Sequence[jax.Device] | None = None,
              truncate_dim: int | None = None, **config_overrides: Any) -> "Encoder":
    """From a Hugging Face / sentence-transformers folder, a bge-jax params folder, or a
    training run's workdir (`from_run`: its newest checkpoint).

    truncate_dim: Matryoshka vectors of this width (see the class docstring; every loader
    takes it). config_overrides: BertConfig fields, e.g. dtype="bfloat16" for faster, less
    exact encoding on an accelerator (default float32, the numbers of the PyTorch model).
    """
    if os.path.isdir(path) and weights.is_checkpoint(path):
      return cls.from_checkpoint(path, pooling, normalize, tokenizer=tokenizer, devices=devices,
                                 truncate_dim=truncate_dim, **config_overrides)
    if os.path.isdir(path) and weights.is_run_workdir(path):
      return cls.from_run(path, pooling, normalize, tokenizer=tokenizer, devices=devices,
                          truncate_dim=truncate_dim, **config_overrides)
    config, params = convert.load_hf(path, **config_overrides)
    if config.hf_family == "sentence_transformers" and config.pooling != pooling:
      log.warning("%s declares %s pooling; encoding with pooling=%r as requested.",
                  path, config.pooling, pooling)
    if tokenizer is None:
      tokenizer = _load_tokenizer(weights.tokenizer_folder(path) or (
          path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))))
    return cls(params, config, tokenizer, pooling=pooling, normalize=normalize, devices=devices,
               truncate_dim=truncate_dim)

  @classmethod
  def from_checkpoint(cls, path: str, pooling: str = "cls", normalize: bool = True, *,
                      tokenizer: Any = None, devices: Sequence[jax.Device] | None = None,
                      truncate_dim: int | None = None, **config_overrides: Any) -> "Encoder":
    """From a bge-jax params folder. It computes in float32 unless `config_overrides` say
    otherwise (dtype="bfloat16"): the checkpoint's config records the compute dtype its
    training run used (bf16 on accelerators), and encodings should not depend on where the
    same weights were saved (a checkpoint and its HF export encode alike)."""
    config, params = weights.load_params(path)
    config = _encoding_config(config, config_overrides, f"Encoder.from_checkpoint({path!r})")
    if tokenizer is None:
      folder = weights.tokenizer_dir(path)
      if folder is None:
        raise convert.ConversionError(
            f"{path}: the checkpoint has no tokenizer/ folder; pass tokenizer=.")
      tokenizer = _load_tokenizer(folder)
    return cls(params, config, tokenizer, pooling=pooling, normalize=normalize, devices=devices,
               truncate_dim=truncate_dim)

  @classmethod
  def from_run(cls, path: str, pooling: str | None = None, normalize: bool | None = None, *,
               step: int | None = None, tokenizer: Any = None,
               devices: Sequence[jax.Device] | None = None, truncate_dim: int | None = None,
               **config_overrides: Any) -> "Encoder":
    """From a training run's workdir (run_info.json + checkpoints/), finished or still running:
    the params of its newest committed checkpoint (or `step`), with the run's tokenizer.
    pooling / normalize None: the run's own (its loss's). Computes in float32 unless
    `config_overrides` say otherwise, like `from_checkpoint`."""
    step, config, params = weights.load_run_params(path, step)
    config = _encoding_config(config, config_overrides, f"Encoder.from_run({path!r})")
    if pooling is not None and pooling != config.pooling:
      log.warning("%s (step %d) trained with %s pooling; encoding with pooling=%r as requested.",
                  path, step, config.pooling, pooling)
    if tokenizer is None:
      tokenizer = _load_tokenizer(weights.run_tokenizer_folder(path))
    return cls(params, config, tokenizer, pooling=pooling or config.pooling,
               normalize=config.normalize if normalize is None else normalize, devices=devices,
               truncate_dim=truncate_dim)

  @property
  def dim(self) -> int:
    """The width of `encode`'s vectors: truncate_dim, or the hidden size."""
    return self.truncate_dim or self.config.hidden_size

  def tokenize(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return self.tokenizer(list(texts), truncation=True, max_length=max_length, padding=False,
                          return_attention_mask=False, return_token_type_ids=False)["input_ids"]

  def encode(self, texts: str | Sequence[str], batch_size: int = 256, max_length: int = 512,
             instruction: str | None = None, show_progress: bool | None = None,
             pack: bool = True) -> np.ndarray:
    """[N, D] float32 embeddings in input order; `instruction` is prepended to every text.

    `max_length` is capped at the model's max_position_embeddings. `show_progress=None`
    shows a progress bar when there is more than a few batches of work. `pack=False` gives
    every text its own padded row (see the class docstring).
    """
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size}; it must be >= 1")
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    if instruction:
      texts = [instruction + t for t in texts]
    max_length = min(max_length, self.config.max_position_embeddings)
    ids = self.tokenize(texts, max_length)
    buckets = length_buckets(max_length, MIN_BUCKET, BUCKETS_PER_OCTAVE)
    order = np.argsort([-len(x) for x in ids], kind="stable")
    out = np.zeros((len(texts), self.dim), np.float32)
    starts = range(0, len(order), batch_size)
    if show_progress is None:
      show_progress = len(starts) > 4
    if show_progress:
      from tqdm.auto import tqdm
      starts = tqdm(starts, desc="encode", unit="batch")
    pad = self.tokenizer.pad_token_id or 0
    # Dispatch is asynchronous: the host builds batch i+1 while the device computes batch i,
    # and a result is fetched only PIPELINE_DEPTH batches later, so the two overlap.
    pending: list[tuple[np.ndarray, jax.Array]] = []
    depth = PIPELINE_DEPTH
    for start in starts:
      rows = order[start:start + batch_size]
      texts_ids = [ids[i] for i in rows]
      n_rows, length, bins = batch_shape([len(x) for x in texts_ids], batch_size, buckets, pack)
      n_rows = _round_up(n_rows, len(self.devices))  # every device gets as many rows
      if bins is None:
        vectors = self._dispatch_padded(texts_ids, n_rows, length, pad)
      else:
        vectors = self._dispatch_packed(texts_ids, n_rows, length, bins, batch_size, pad)
      pending.append((rows, vectors))
      if len(pending) > depth:
        done_rows, vectors = pending.pop(0)
        out[done_rows] = np.asarray(vectors)[:len(done_rows)]
    for done_rows, vectors in pending:
      out[done_rows] = np.asarray(vectors)[:len(done_rows)]
    return out

  def _dispatch_padded(self, texts_ids: list[list[int]], n_rows: int, length: int,
                       pad: int) -> jax.Array:
    """One text per row of `length`; rows past the texts are fillers."""
    input_ids = np.full((n_rows, length), pad, np.int32)
    mask = np.zeros((n_rows, length), np.int32)
    for r, x in enumerate(texts_ids):
      input_ids[r, :len(x)] = x
      mask[r, :len(x)] = 1
    mask[len(texts_ids):, 0] = 1  # filler rows: one visible token keeps their softmax finite
    input_ids, mask = jax.device_put((input_ids, mask), self._rows)
    return self._embed(self.params, input_ids=input_ids, attention_mask=mask)

  def _dispatch_packed(self, texts_ids: list[list[int]], n_rows: int, length: int,
                       bins: list[list[int]], batch_size: int, pad: int) -> jax.Array:
    """Texts packed by `bins` into n_rows rows of `length`; the output has the padded path's
    rows, texts first (filler rows repeat text 0), so both paths return the same shape."""
    from bge_jax.data import packing
    packed = packing.fill(bins, texts_ids, n_rows, length, pad)
    n = len(texts_ids)
    text_slot = np.zeros((padded_rows(n, batch_size),), np.int32)
    text_slot[:n] = packed["text_slot"]
    rows = jax.device_put((packed["input_ids"], packed["segment_ids"], packed["position_ids"]),
                          self._rows)
    return self._embed_packed(self.params, *rows, jax.device_put(text_slot, self._replicated))
