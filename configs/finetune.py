"""Stage 3, fine-tuning on labeled data with hard negatives and query instructions.

`--config configs/finetune.py:<preset>`. FlagEmbedding defaults: group size 8 (1 positive + 7
hard negatives, drawn again each epoch, repeated when a row has too few), temperature 0.02,
query instruction (en: "Represent this sentence for searching relevant passages: ", zh: see
`bge_jax.data.pairs.INSTRUCTIONS`; a row's "prompt" wins), query 32 / passage 128 tokens,
the lr for the initial model's size (`bge_jax.config.fine_tuning_lr`). Mine hard negatives first
with `launch/mine.py`.
"""

from configs.common import contrastive_config


def get_config(arg: str = "bge-small-en"):
  c = contrastive_config("finetune", arg)
  c.data.group_size = 8
  c.data.query_instruction = ("为这个句子生成表示以用于检索相关文章："
                              if arg.endswith("-zh") else
                              "Represent this sentence for searching relevant passages: ")
  c.num_epochs = 5.0
  return c
