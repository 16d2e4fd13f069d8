#!/usr/bin/env python
"""Command line: Hugging Face / sentence-transformers / RetroMAE weights <-> bge-jax checkpoint.

  python conversion/convert.py hf-to-jax SRC OUT [--check] [--ignore-unknown] [--overwrite]
                                                 [--dtype float32] [--tol 1e-4]
  python conversion/convert.py jax-to-hf SRC OUT [--check] [--no-sentence-transformers]
                                                 [--pooling cls|mean] [--max-seq-length N]
                                                 [--overwrite] [--tol 1e-4]

Thin over `bge_jax.convert_cli` (see `--help` for the formats).
"""

import os
import sys

try:
  from bge_jax import convert_cli
except ImportError:  # a source checkout that was not pip-installed: use the package beside us
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from bge_jax import convert_cli

if __name__ == "__main__":
  sys.exit(convert_cli.main(prog=os.path.basename(sys.argv[0])))
