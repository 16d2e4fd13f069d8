"""Fields every stage shares: model, tokenizer, mesh, optimizer, checkpoints, logging."""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from bge_jax.config import preset_lr


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
  # config.json beside it (e.g. FlagEmbedding's RetroMAE state), a bge-jax params folder, or another
  # run's workdir (the params of its newest checkpoint, e.g. a stage-1 run stopped early).
  # Empty = from scratch. A checkpoint in the workdir always wins (auto-resume).
  c.model.init_from = ""
  c.model.vocab_size = -1  # from scratch: -1 = the tokenizer's size
  # Overrides of the model config (unset = the preset's / the source's value).
  # Compute dtype: float32 | bfloat16; unset = bfloat16 on GPU/TPU (float32 params), float32 on CPU.
  c.model.dtype = placeholder(str)
  c.model.param_dtype = placeholder(str)
  c.model.remat_policy = placeholder(str)  # none | full | dots | dots_no_batch
  # xla | cudnn (jax.nn.dot_product_attention) | pallas (GPU: fused attention with dropout)
  c.model.attention_impl = placeholder(str)
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
  # A step with a NaN/inf loss or gradient: False = stop (the last good checkpoint is kept; every
  # checkpoint is written after a check); True = drop that step's update, go on, and count it
  # (metric `nonfinite_steps`). A step whose update leaves a parameter NaN/inf counts as such.
  c.skip_nonfinite_updates = False
  # With skip_nonfinite_updates: more skipped updates than this in a row stop the run like a
  # NaN/inf step without it (FloatingPointError, the last good checkpoint kept).
  c.max_consecutive_nonfinite_steps = 10

  c.optimizer = ConfigDict()
  c.optimizer.lr = 2e-5
  # FlagEmbedding's --weight_decay is the HF Trainer's, default 0.0 (its RetroMAE and fine-tuning
  # examples pass none).
  c.optimizer.weight_decay = 0.0
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
  # Keep the export of the step with the best value of this metric in <workdir>/best/ (beside
  # export/), with best.json naming the step and value: a val/* (data.validation_fraction or
  # data.validation) or eval/* (config.eval) name, e.g. "val/loss", "eval/sts/stsb"; empty = off.
  c.checkpoint.keep_best = ""
  c.checkpoint.keep_best_mode = "auto"  # auto (min for a name with "loss", else max) | min | max

  c.log_every_steps = 10
  # Dense peak TFLOP/s of one device, for the logged MFU; 0 = the detected accelerator's (H100,
  # H200, A100, TPUs; none on CPU, where only model_tflops_per_sec is logged).
  c.peak_tflops = 0.0
  c.export = True

  # Evaluation during training (logged as eval/*): before the first step, every `every_steps`
  # (0 = only at the end) and at the end. Comma-separated files / folders; empty = none.
  c.eval = ConfigDict()
  c.eval.every_steps = 0
  c.eval.sts = ""  # STS-B TSV (split column) or s1<TAB>s2<TAB>score files
  c.eval.sts_split = "dev"
  c.eval.retrieval = ""  # BEIR folders: queries.jsonl, corpus.jsonl, qrels/test.tsv
  # Registry tasks, "TYPE:PATH,...": retrieval, reranking, sts, pair_classification,
  # classification, clustering (docs/tools.md); logged as eval/<name>/<metric>.
  c.eval.tasks = ""
  c.eval.query_instruction = ""
  c.eval.max_length = 128
  c.eval.batch_size = 128
  return c


def contrastive_config(stage: str, arg: str) -> ConfigDict:
  """Shared defaults of stages 2 and 3 (FlagEmbedding's fine-tuning defaults)."""
  c = base_config()
  c.stage = stage
  c.model.preset = arg or "bge-small-en"
  # Unset: FlagEmbedding's lr for the initial model's size, chosen when the run starts
  # (`bge_jax.config.fine_tuning_lr`, logged): the preset's own from scratch, else by the layers
  # and hidden size of model.init_from's model (whatever the preset's name).
  c.optimizer.lr = placeholder(float)
  preset_lr(c.model.preset)  # an unknown preset fails here, at config time
  c.batch_size = 32

  c.data = ConfigDict()
  c.data.train = ""  # comma-separated files/folders/globs; each one is a dataset
  # Validation loss (val/*, at every evaluation): rows of each dataset held out of training
  # (chosen by the data size alone), or files in data.train's format; not both. 0 / "" = none.
  c.data.validation_fraction = 0.0
  c.data.validation_rule = 2  # how held-out rows are chosen (bge_jax.data.holdout.held_out)
  c.data.validation = ""
  # Dataset mixing (one dataset per batch): the global batch of each data.train dataset,
  # comma-separated in the same order (empty = batch_size for each; each distinct size compiles
  # the step once), the passes over each dataset per epoch (empty = 1 each), and the sampling:
  # proportional (to each dataset's batches per epoch) | round_robin (datasets in turn).
  c.data.batch_sizes = ""
  c.data.weights = ""
  c.data.sampling = "proportional"
  # FlagEmbedding's small-dataset merging (--small_threshold, --drop_threshold): datasets of
  # data.train with fewer rows than small_threshold that sit in the same folder become one dataset
  # (batch: the least of theirs); such a merged set with fewer than drop_threshold rows is dropped.
  # 0 = off (FlagEmbedding's defaults). `bge_jax.data.small_datasets`.
  c.data.small_threshold = 0
  c.data.drop_threshold = 0
  c.data.kind = "auto"  # auto | flag (query/pos/neg JSONL) | pairs (JSONL or TSV)
  c.data.on_error = "raise"  # raise | skip (bad rows counted and reported)
  c.data.group_size = 8
  c.data.query_max_length = 32
  c.data.passage_max_length = 128
  c.data.query_instruction = ""
  c.data.passage_instruction = ""
  c.data.no_in_batch_datasets = ""  # datasets (as given in data.train) scored within their group
  c.data.use_teacher_scores = False  # distil from pos_scores / neg_scores when present
  c.data.prefetch = 2
  # Packing: several texts per row (block-diagonal attention), so padding is not computed.
  # Rows per process = pack_rows_fraction x the texts (0 = sized from the first 16 batches of
  # every process, plus 5%). A batch that does not fit takes more rows on one process (another
  # compiled step, logged); with several processes it stops the run and names this key.
  # Unset = on wherever it gives the padded batch's loss: not with grad_accum_steps > 1 or
  # per-dataset batch sizes (`bge_jax.data.pairs.use_packing`); True/False force it.
  c.data.pack = placeholder(bool)
  c.data.pack_rows_fraction = 0.0

  c.loss = ConfigDict()
  c.loss.temperature = 0.02
  c.loss.pooling = "cls"
  c.loss.normalize = True
  c.loss.in_batch_negatives = True
  c.loss.gradcache_chunk = 0  # > 0: GradCache chunk size (rows); must divide the batch
  # Distillation form with data.use_teacher_scores (FlagEmbedding's --kd_loss_type): kl_div =
  # the contrastive loss + cross-entropy of the group's scores against softmax(teacher scores);
  # m3_kd_loss = teacher-weighted cross-entropies over the global scores, no separate term.
  c.loss.distill_type = "kl_div"
  # Matryoshka (FlagEmbedding's --mrl_dims, sentence-transformers' MatryoshkaLoss): the loss is
  # sum_d w_d x loss(embeddings cut to their first d dims, re-normalised); empty = off. List the
  # full dimension too to keep training it, e.g. (384, 96). Weights: one per dim, empty = 1 each.
  c.loss.matryoshka_dims = ()
  c.loss.matryoshka_weights = ()
  # False-negative control: a passage with the same text as a query's positive (anywhere in the
  # global batch) is not scored as its negative. Off by default, as FlagEmbedding.
  c.loss.mask_duplicate_positives = False

  if c.model.preset == "tiny":
    c.batch_size = 16
    c.log_every_steps = 5
  return c
