"""Fields every stage shares: model, tokenizer, mesh, optimizer, checkpoints, logging."""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder


def base_config() -> ConfigDict:
  c = ConfigDict()
  c.stage = ""
  c.seed = 0
  # A folder with tokenizer files; empty = the tokenizer of model.init_from.
  c.tokenizer = ""

  c.model = ConfigDict()
  # Shape preset when training from scratch: tiny, bge-{small,base,large}-{zh,en}.
  c.model.preset = "bge-small-en"
  # Initial weights: a Hugging Face / sentence-transformers folder, a .safetensors/.bin file with
  # config.json beside it (e.g. FlagEmbedding's RetroMAE state), or a bge-jax checkpoint.
  # Empty = from scratch. A checkpoint in the workdir always wins (auto-resume).
  c.model.init_from = ""
  c.model.vocab_size = -1  # from scratch: -1 = the tokenizer's size
  # Overrides of the model config (unset = the preset's / the source's value).
  c.model.dtype = placeholder(str)  # compute dtype: float32 | bfloat16
  c.model.param_dtype = placeholder(str)
  c.model.remat_policy = placeholder(str)  # none | full | dots | dots_no_batch
  c.model.attention_impl = placeholder(str)  # xla | cudnn
  c.model.hidden_dropout = placeholder(float)
  c.model.attention_dropout = placeholder(float)
  c.model.decoder_query_stream = placeholder(str)  # fe | rm (RetroMAE only)
  c.model.max_position_embeddings = placeholder(int)

  # Global batch over all devices and processes; grad accumulation splits it in micro-batches.
  c.batch_size = 32
  c.grad_accum_steps = 1
  c.num_train_steps = -1  # > 0 wins over num_epochs
  c.num_epochs = 1.0
  c.dropout = True  # dropout during training (HF default rates 0.1)

  c.optimizer = ConfigDict()
  c.optimizer.lr = 2e-5
  c.optimizer.weight_decay = 0.01
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.warmup_ratio = 0.1
  c.optimizer.warmup_steps = -1  # >= 0 wins over warmup_ratio
  c.optimizer.schedule = "linear"  # linear decay to 0 | constant
  c.optimizer.clip_norm = 1.0

  c.mesh = ConfigDict()
  c.mesh.data = -1  # -1 = all devices left after fsdp x tensor
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.checkpoint = ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3

  c.log_every_steps = 10
  c.export = True
  return c
