"""The package imports its public names lazily (PEP 562): a module that needs no JAX, such as the
data preparation that launch/prepare_data.py runs in spawned worker processes, does not pay for
importing jax and flax, and the public API (API.md) is unchanged."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

PUBLIC = ("BertConfig", "Encoder", "convert", "preset", "sharding", "weights")


def _run(code: str) -> None:
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]


def test_data_preparation_workers_do_not_import_jax():
  """What a spawned worker of launch/prepare_data.py imports: the launcher's module level (as
  multiprocessing's spawn runs it, `__mp_main__`) and bge_jax.data.prepare."""
  _run("import runpy, sys\n"
       "runpy.run_path('launch/prepare_data.py', run_name='__mp_main__')\n"
       "import bge_jax, bge_jax.data.prepare\n"
       "heavy = sorted({'jax', 'flax', 'optax', 'orbax', 'torch', 'transformers'} & set(sys.modules))\n"
       "assert not heavy, heavy")


def test_public_names_resolve_on_first_use():
  _run("import sys\n"
       "import bge_jax\n"
       "assert 'jax' not in sys.modules\n"
       "from bge_jax import Encoder, BertConfig, preset, convert, sharding, weights\n"
       "import bge_jax.config, bge_jax.encoder\n"
       "assert Encoder is bge_jax.encoder.Encoder and BertConfig is bge_jax.config.BertConfig\n"
       "assert preset is bge_jax.config.preset and convert.__name__ == 'bge_jax.convert'\n"
       "assert sharding.__name__ == 'bge_jax.sharding' and weights.__name__ == 'bge_jax.weights'\n"
       "assert preset('tiny').hidden_size > 0\n")


def test_the_package_namespace():
  import bge_jax
  assert bge_jax.__all__ == list(PUBLIC) and bge_jax.__version__
  assert set(PUBLIC) <= set(dir(bge_jax))
  namespace: dict = {}
  exec("from bge_jax import *", namespace)  # noqa: S102
  assert set(PUBLIC) <= set(namespace)
  with pytest.raises(AttributeError, match="has no attribute 'Encodr'"):
    bge_jax.Encodr  # noqa: B018
  with pytest.raises(ImportError):
    exec("from bge_jax import Encodr", {})  # noqa: S102
