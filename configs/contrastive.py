"""Stage 2, contrastive fine-tuning on unlabeled pairs. `--config configs/contrastive.py:<preset>`.

In-batch negatives over the global batch (group_size 1: each query's positive plus every other
passage of the batch). Defaults follow FlagEmbedding: temperature 0.02, CLS pooling + L2
normalisation, query 32 / passage 128 tokens, the lr for the initial model's size (unset
`optimizer.lr`, `bge_jax.config.fine_tuning_lr`: small 3e-5, base 2e-5, large 1e-5). Initialise
from the stage-1 export (`model.init_from=<workdir>/export/hf`) or any Hugging Face BERT. Big
batches: set `loss.gradcache_chunk` (exact gradients, memory of one chunk) and/or
`model.remat_policy`.
"""

from configs.common import contrastive_config


def get_config(arg: str = "bge-small-en"):
  c = contrastive_config("contrastive", arg)
  c.data.group_size = 1
  c.num_epochs = 1.0
  return c
