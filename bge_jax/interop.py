"""Moving models between Hugging Face folders and bge-jax params folders.

The jobs behind conversion/convert.py, staged in a temporary folder and checked against PyTorch.
`hf_to_jax` and `jax_to_hf` report on stdout (`read:`, `check:`, `wrote:` lines), refuse with
`convert.ConversionError` and raise `CheckFailed` when `check=True` measures a difference above
`tol`. The output is written to a temporary folder beside OUT (and checked there) and renamed
into place only when complete, so a failure leaves neither OUT nor a temporary folder behind; the
folder of a conversion that was killed (`.OUT.tmp-PID@HOST-*`) is removed by the next conversion
into the same OUT (`files.atomic_output_dir`).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np

from bge_jax import convert, weights
from bge_jax.config import BertConfig
from bge_jax.data import files
from bge_jax.models import bert

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_TOL = 1e-4
TORCH_PIN = "torch==2.13.0"

# Mixed lengths (so padding is exercised) and scripts; CJK maps to [UNK] in English vocabularies.
CHECK_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "BGE maps queries and passages into one vector space, so retrieval is a dot product.",
    "Represent this sentence for searching relevant passages: how does JAX compile a function?",
    "为这个句子生成表示以用于检索相关文章：北京的天气",
    "ok",
)


class CheckFailed(Exception):
  """`check=True` measured a difference above the tolerance (nothing was written)."""


# ---------------------------------------------------------------------------------------------
# hf-to-jax
# ---------------------------------------------------------------------------------------------

def hf_to_jax(src: str, out: str, *, check: bool = False, tol: float = DEFAULT_TOL,
              overwrite: bool = False, ignore_unknown: bool = False,
              dtype: str = "float32") -> str:
  """Hugging Face folder/file -> bge-jax params folder at `out`; returns its absolute path."""
  if check:
    _require_torch()
  if os.path.isdir(src) and weights.is_checkpoint(src):
    raise convert.ConversionError(
        f"SRC {src} is a bge-jax params folder ({weights.META_FILE}); use `jax-to-hf` to export "
        "it to Hugging Face.")
  _require_source(src, "a Hugging Face folder, a sentence-transformers folder, or a "
                       ".safetensors/.bin file with config.json beside it")
  out = _require_output(out, src, overwrite, weights.is_checkpoint, "bge-jax params folder")
  try:
    config, params = convert.load_hf(src, strict=not ignore_unknown, param_dtype=dtype)
  except (convert.ConversionError, OSError):
    raise
  except Exception as e:  # a corrupt file: safetensors / torch.load errors
    raise convert.ConversionError(
        f"{src}: cannot read the weights ({type(e).__name__}: {e}); re-download or re-export "
        "the file.") from e
  weights_file = convert.resolve(src)[0]  # not `weights`: that is the module
  tokenizer = weights.tokenizer_folder(src)
  _say(f"read: {os.path.abspath(weights_file)}: {_describe(config)}; tokenizer: "
       f"{tokenizer or 'none (no vocab.txt / tokenizer.json beside the weights)'}")

  def write(tmp: str) -> None:
    _lift(tmp, lambda d: weights.save_params(d, params, config, tokenizer=tokenizer))
    if check:
      written_config, written_params = weights.load_params(tmp)
      _check(lambda: _torch_from_source(src, config), written_params, written_config,
             weights.tokenizer_dir(tmp), "the tokenizer copied to OUT/tokenizer", tol)

  files.atomic_output_dir(out, write, overwrite=overwrite)
  parts = "bge_jax.json, params/ " + dtype + (", tokenizer/" if tokenizer else "")
  _say(f"wrote: {out}: bge-jax params folder ({parts})")
  return out


# ---------------------------------------------------------------------------------------------
# jax-to-hf
# ---------------------------------------------------------------------------------------------

def jax_to_hf(src: str, out: str, *, check: bool = False, tol: float = DEFAULT_TOL,
              overwrite: bool = False, sentence_transformers: bool = True,
              pooling: str | None = None, max_seq_length: int | None = None,
              step: int | None = None) -> str:
  """bge-jax params folder, or a training run's workdir (its newest checkpoint, or `step`) ->
  Hugging Face (+ sentence-transformers) folder at `out`."""
  if check:
    _require_torch()
  _require_source(src, "a bge-jax params folder (bge_jax.json + params/) or a training "
                       "run's workdir (run_info.json + checkpoints/)")
  run = os.path.isdir(src) and weights.is_run_workdir(src)
  if step is not None and not run:
    raise convert.ConversionError(f"--step {step} is for a training run's workdir "
                                  f"(run_info.json + checkpoints/); SRC {src} is not one.")
  if not run and (not os.path.isdir(src) or not weights.is_checkpoint(src)):
    raise convert.ConversionError(
        f"SRC {src} is neither a bge-jax params folder (no {weights.META_FILE}) nor a training "
        "run's workdir (run_info.json + checkpoints/); for a Hugging Face folder or file use "
        "`hf-to-jax`.")
  params_dir = os.path.join(src, "params")
  if not run and not os.path.isdir(params_dir):
    raise convert.ConversionError(
        f"{params_dir}: missing (the orbax params tree of the checkpoint); the checkpoint is "
        "incomplete, re-create it with `hf-to-jax` or take another training checkpoint.")
  out = _require_output(out, src, overwrite, lambda d: os.path.isfile(
      os.path.join(d, "config.json")), "Hugging Face folder (config.json)")
  if run and max_seq_length is None:  # the run's own export: its passage length (stages 2, 3)
    run_data = convert.read_json(os.path.join(src, "config.json")).get("data", {})
    if run_data.get("passage_max_length"):
      max_seq_length = int(run_data["passage_max_length"])
  try:
    if run:
      step, config, params = weights.load_run_params(src, step)
      params_dir = os.path.join(src, "checkpoints", str(step))
    else:
      config, params = weights.load_params(src)
  except convert.ConversionError:
    raise
  except Exception as e:  # orbax: corrupt or partial params/
    raise convert.ConversionError(
        f"{params_dir}: cannot restore the params ({type(e).__name__}: {e}); the checkpoint is "
        "damaged, re-create it.") from e
  _validate_params(params, config, src, os.path.join(src, "run_info.json") if run else None,
                   params_dir)
  if pooling is not None:
    config = config.replace(pooling=pooling)
  tokenizer = weights.tokenizer_folder(src)
  what = f"training run, step {step}" if run else "bge-jax params folder"
  _say(f"read: {os.path.abspath(src)}: {what}, {_describe(config)}; tokenizer: "
       f"{os.path.abspath(tokenizer) if tokenizer else 'none (no tokenizer/ folder)'}")

  def write(tmp: str) -> None:
    _lift(tmp, lambda d: convert.save_hf(params, config, d, tokenizer=tokenizer,
                                         sentence_transformers=sentence_transformers,
                                         max_seq_length=max_seq_length))
    if check:
      _check(lambda: _torch_from_folder(tmp), params, config,
             tmp if tokenizer else None, "the tokenizer copied to OUT", tol)

  files.atomic_output_dir(out, write, overwrite=overwrite)
  arch = "BertForMaskedLM" if config.add_mlm_head else "BertModel"
  parts = [f"config.json + model.safetensors ({arch})"]
  if config.add_decoder:
    parts.append(f"{convert.RETROMAE_STATE_FILE} (FlagEmbedding RetroMAE state)")
  if tokenizer:
    parts.append("tokenizer files")
  if sentence_transformers:
    parts.append(f"sentence-transformers modules ({config.pooling} pooling"
                 + (", Normalize)" if config.normalize else ")"))
  _say(f"wrote: {out}: {', '.join(parts)}")
  return out


def _validate_params(params: Any, config: BertConfig, src: str, meta: str | None = None,
                     params_dir: str | None = None) -> None:
  """Refuses params whose tree or shapes differ from what `config` (`meta`: bge_jax.json, or a
  run's run_info.json) describes."""
  def flat(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf))
            for path, leaf in leaves}

  want, got = flat(bert.abstract_init(config)[0]), flat(params)
  meta = meta or os.path.join(src, weights.META_FILE)
  fix = (f"{meta} does not describe {params_dir or os.path.join(src, 'params')}; restore the "
         "matching config.")
  missing = sorted(set(want) - set(got))
  if missing:
    raise convert.ConversionError(f"{src}: params lack {len(missing)} entries the config "
                                  f"implies: {convert._short(missing)}; {fix}")
  unknown = sorted(set(got) - set(want))
  if unknown:
    raise convert.ConversionError(f"{src}: params hold {len(unknown)} unknown entries: "
                                  f"{convert._short(unknown)}; {fix}")
  for path in sorted(want):
    if want[path] != got[path]:
      raise convert.ConversionError(
          f"{src}: params/{path} has shape {got[path]}, the config expects {want[path]}; {fix}")


# ---------------------------------------------------------------------------------------------
# --check: PyTorch (transformers) vs bge-jax
# ---------------------------------------------------------------------------------------------

def _require_torch() -> Any:
  """The torch module; refuses, saying how to install it, before anything is read or written."""
  try:
    import torch
  except ImportError as e:
    raise convert.ConversionError(
        f"--check runs the PyTorch model and needs torch, which is not installed: pip install "
        f"{TORCH_PIN} (or run without --check).") from e
  return torch


def _torch_from_folder(folder: str):
  """transformers.AutoModel of a Hugging Face folder, float32, eval mode."""
  import torch
  import transformers

  hf_logging = transformers.utils.logging
  verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
  hf_logging.set_verbosity_error()  # the expected "unused cls.*" / "new pooler" notes
  hf_logging.disable_progress_bar()
  try:
    model, info = transformers.AutoModel.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True)
  finally:
    hf_logging.set_verbosity(verbosity)
    if bar:
      hf_logging.enable_progress_bar()
  _require_loaded(info.get("missing_keys", ()), folder)
  return model.eval()


def _torch_from_source(src: str, config: BertConfig):
  """The PyTorch BertModel of an hf-to-jax SRC, including single files and RetroMAE states."""
  import torch
  import transformers

  weights_file, cfg_path = convert.resolve(src)[:2]
  if os.path.isdir(src) and config.hf_family != "retromae":
    return _torch_from_folder(os.path.dirname(weights_file))
  # A lone weight file (maybe not named model.safetensors) or a RetroMAE state: build the
  # BertModel from config.json and load the encoder's tensors with their prefix stripped.
  hf_config = transformers.AutoConfig.from_pretrained(os.path.dirname(cfg_path))
  model = transformers.AutoModel.from_config(hf_config).float()
  if weights_file.endswith(".safetensors"):
    from safetensors.torch import load_file
    state = load_file(weights_file)
  elif weights_file.endswith(".index.json"):
    state = {k: torch.from_numpy(np.asarray(v, np.float32))
             for k, v in convert.read_state_dict(weights_file).items()}
  else:
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
  prefix = {"retromae": "lm.bert.", "bert_mlm": "bert."}.get(config.hf_family, "")
  state = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
  missing, _ = model.load_state_dict(state, strict=False)
  _require_loaded(missing, weights_file)
  return model.eval()


def _require_loaded(missing: Sequence[str], source: str) -> None:
  # The pooler (BertModel's tanh head) is optional; our embeddings never use it.
  missing = [k for k in missing if not k.startswith("pooler.") and not k.endswith("_ids")]
  if missing:
    raise CheckFailed(f"check failed: PyTorch could not load {len(missing)} encoder tensor(s) "
                      f"from {source}: {convert._short(sorted(missing))}")


def _sample_batch(config: BertConfig, tokenizer_folder: str | None,
                  label: str) -> tuple[np.ndarray, np.ndarray, str]:
  """(input_ids, attention_mask, description): tokenised sample sentences, else random ids."""
  note = "no tokenizer"
  if tokenizer_folder:
    try:
      from transformers import AutoTokenizer
      tok = AutoTokenizer.from_pretrained(tokenizer_folder)
      enc = tok(list(CHECK_SENTENCES), padding=True, truncation=True, return_tensors="np",
                max_length=min(64, config.max_position_embeddings))
      ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
      if ids.max() < config.vocab_size:
        return ids, mask, f"{len(ids)} sample sentences tokenised by {label}"
      note = f"tokenizer ids reach {ids.max()} >= vocab_size {config.vocab_size}"
    except Exception as e:  # a folder with tokenizer files transformers cannot load
      note = f"tokenizer unusable: {type(e).__name__}"
  rng = np.random.RandomState(0)
  length = min(16, config.max_position_embeddings)
  lengths = np.array([length, max(length - 3, 1), max(length // 2, 1), min(2, length)])
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  ids = rng.randint(1, config.vocab_size, size=mask.shape).astype(np.int32)
  ids[mask == 0] = config.pad_token_id
  return ids, mask, f"{len(ids)} rows of random token ids ({note})"


@functools.partial(jax.jit, static_argnums=0)
def _encoder_forward(config: BertConfig, params: Any, input_ids: Any, attention_mask: Any) -> Any:
  return bert.BertModel(config).apply({"params": params}, input_ids, attention_mask)


def _check(load_torch: Callable[[], Any], params: Any, config: BertConfig,
           tokenizer_folder: str | None, tokenizer_label: str, tol: float) -> None:
  """Prints max |delta| of hidden states and pooled embeddings; raises CheckFailed above `tol`."""
  import torch

  ids, mask, what = _sample_batch(config, tokenizer_folder, tokenizer_label)
  _say(f"check: PyTorch transformers.AutoModel (torch {torch.__version__}) vs bge-jax on {what}")
  model = load_torch()
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long(),
                token_type_ids=torch.zeros(ids.shape, dtype=torch.long)).last_hidden_state.numpy()

  # Only the encoder runs, under one jit keyed by its shapes: both directions of a round trip
  # (and repeated checks of one model) compile once.
  encoder = config.replace(add_pooler=False, add_mlm_head=False, add_decoder=False,
                           hf_family="bert", pooling="cls", normalize=False)
  encoder_params = {k: v for k, v in params.items() if k == "embeddings" or k.startswith("layers_")}
  hidden = _encoder_forward(encoder, encoder_params, ids, mask)
  pooled = bert.pool(hidden, mask, config.pooling)
  pooled = np.asarray(bert.l2_normalize(pooled) if config.normalize else pooled, np.float32)
  hidden = np.asarray(hidden, np.float32)
  ref_pooled = ref[:, 0] if config.pooling == "cls" else (
      (ref * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1))
  if config.normalize:
    ref_pooled = ref_pooled / np.maximum(np.linalg.norm(ref_pooled, axis=-1, keepdims=True), 1e-12)
  real = mask.astype(bool)
  d_hidden = float(np.abs(hidden[real] - ref[real]).max())
  d_pooled = float(np.abs(pooled - ref_pooled).max())
  how = f"{config.pooling}{', normalized' if config.normalize else ''}"
  _say(f"check: last hidden state max |Δ| = {d_hidden:.2e} over {int(real.sum())} real tokens "
       f"(tol {tol:.1e})")
  _say(f"check: pooled embedding ({how}) max |Δ| = {d_pooled:.2e} (tol {tol:.1e})")
  if not (d_hidden <= tol and d_pooled <= tol):  # NaN fails too
    raise CheckFailed(
        f"check failed: max |Δ| hidden {d_hidden:.2e}, pooled {d_pooled:.2e} > tol {tol:.1e}; "
        "nothing was written. Reduced-precision params (--dtype bfloat16/float16) need a looser "
        "--tol such as 5e-2.")
  _say("check: passed")


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------

def _require_source(src: str, what: str) -> None:
  if not os.path.exists(src):
    raise convert.ConversionError(f"SRC {src}: no such file or folder; pass {what}.")


def _require_output(out: str, src: str, overwrite: bool, is_previous: Callable[[str], bool],
                    kind: str) -> str:
  """Absolute OUT, refusing an existing OUT (unless --overwrite of a previous output) or SRC."""
  out = os.path.abspath(out)
  real_out, real_src = os.path.realpath(out), os.path.realpath(src)
  if os.path.commonpath([real_out, real_src]) == real_out:
    raise convert.ConversionError(
        f"OUT {out} is SRC or contains it; choose an output folder outside the source.")
  if os.path.lexists(out):
    if not overwrite:
      raise convert.ConversionError(
          f"OUT {out} already exists; pass --overwrite to replace it, or choose another folder.")
    if os.path.islink(out) or not os.path.isdir(out):
      raise convert.ConversionError(
          f"OUT {out} exists and is not a folder; --overwrite replaces folders only, remove it "
          "yourself or choose another path.")
    if os.listdir(out) and not is_previous(out):
      raise convert.ConversionError(
          f"OUT {out} exists and is not a {kind}; --overwrite only replaces a previous output, "
          "remove the folder yourself if you mean it.")
  return out


def _lift(tmp: str, write: Callable[[str], str]) -> None:
  """Runs a writer that takes a fresh folder path, then moves what it wrote up into `tmp`."""
  staged = write(os.path.join(tmp, "staged"))
  for name in os.listdir(staged):
    os.rename(os.path.join(staged, name), os.path.join(tmp, name))
  os.rmdir(staged)


def _describe(config: BertConfig) -> str:
  parts = ["encoder"] + [name for name, on in (
      ("pooler", config.add_pooler), ("mlm_head", config.add_mlm_head),
      ("decoder (RetroMAE)", config.add_decoder)) if on]
  layers = f"{config.num_layers} layer" + ("s" if config.num_layers != 1 else "")
  return (f"family {config.hf_family}, {layers}, hidden {config.hidden_size}, "
          f"{config.num_heads} heads, vocab {config.vocab_size}, params {config.param_dtype}; "
          f"parts: {', '.join(parts)}; pooling {config.pooling}"
          + (" + normalize" if config.normalize else ""))


def _say(line: str) -> None:
  print(line, file=sys.stdout, flush=True)
