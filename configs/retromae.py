"""Stage 1, RetroMAE pre-training. `--config configs/retromae.py:<preset>`.

<preset> is a model shape (tiny, bge-small-en, bge-base-zh, ...; default bge-small-en) used when
training from scratch; with model.init_from the source's shape is used. Defaults follow
FlagEmbedding: encoder mask ratio 0.3, decoder 0.5, max length 512, lr 2e-5 from a pretrained
BERT (use ~1e-4 from scratch, as the original RetroMAE recipe).
"""

from ml_collections import ConfigDict

from configs.common import base_config


def get_config(arg: str = "bge-small-en"):
  c = base_config()
  c.stage = "retromae"
  c.model.preset = arg or "bge-small-en"

  c.data = ConfigDict()
  c.data.train = ""  # comma-separated JSONL/txt files, folders, globs, tfds:NAME[:SPLIT]
  # Validation loss (val/*, at every evaluation): texts held out of training (chosen by the data
  # size alone), or text files/folders/globs; not both. 0 / "" = none.
  c.data.validation_fraction = 0.0
  c.data.validation_rule = 2  # how held-out texts are chosen (bge_jax.data.holdout.held_out)
  c.data.validation = ""
  c.data.field = "text"  # or several, comma-separated: "pos,neg" reads FlagEmbedding rows' passages
  c.data.dedupe = False  # keep each identical text once
  c.data.on_error = "raise"  # raise | skip (bad rows are counted and reported)
  c.data.max_length = 512
  c.data.mode = "truncate"  # truncate (FlagEmbedding) | concatenate (original RetroMAE blocks)
  # Texts longer than max_length: truncate (FlagEmbedding) | error (file:line) | skip (counted)
  c.data.overlong = "truncate"
  c.data.encoder_mlm_probability = 0.3
  c.data.decoder_mlm_probability = 0.5
  c.data.prefetch = 2

  if arg == "tiny":
    c.data.max_length = 128
    c.batch_size = 8
    c.optimizer.lr = 1e-3
    c.log_every_steps = 5
  return c
