"""The stage interface: no code outside the stage modules and their registry names a stage.

A stage is chosen by `config.stage` and known to the trainer, AOT compilation, FLOPs and the
benchmarks only through `bge_jax.train.stages` (model parts, loss, batcher, abstract batch, step
FLOPs, export). Adding a stage is then one module and a registry line; this test fails when a
branch on a stage's name appears anywhere else in the package or the command lines.
"""

import pathlib
import re

from bge_jax.train.stages import STAGE_NAMES, get_stage

REPO = pathlib.Path(__file__).resolve().parents[1]
STAGE_MODULES = {"bge_jax/retromae.py", "bge_jax/contrastive.py", "bge_jax/train/stages.py"}
# "retromae" is also the name of FlagEmbedding's RetroMAE weight-naming family (lm.bert.*,
# c_head.*): a property of checkpoint files, read and written by the conversion modules.
NAMING_FAMILY = {"retromae": {"bge_jax/config.py", "bge_jax/convert.py", "bge_jax/interop.py"}}


def test_no_stage_name_outside_the_stage_modules():
  offenders = []
  files = sorted(REPO.glob("bge_jax/**/*.py")) + sorted(REPO.glob("launch/*.py"))
  assert len(files) > 30
  for path in files:
    rel = path.relative_to(REPO).as_posix()
    if rel in STAGE_MODULES:
      continue
    text = path.read_text()
    for name in STAGE_NAMES:
      if rel in NAMING_FAMILY.get(name, ()):
        continue
      for match in re.finditer(rf"""["']{name}["']""", text):
        line = text.count("\n", 0, match.start()) + 1
        offenders.append(f"{rel}:{line}: {text.splitlines()[line - 1].strip()}")
  assert not offenders, "stage names outside the stage modules:\n" + "\n".join(offenders)


def test_every_stage_implements_the_interface():
  for name in STAGE_NAMES:
    stage = get_stage(name)
    assert stage.name == name
    for method in ("model_config", "loss_fn", "batcher", "abstract_batch", "step_flops",
                   "export"):
      assert callable(getattr(stage, method, None)), (name, method)
