"""An embedded default corpus: Python standard-library names and their docstrings.

Every machine with Python has it, so the demo needs no download. `stdlib_pairs()` gives
(title, passage) pairs such as ("json.dumps", "Serialize obj to a JSON formatted str. ...") —
the same shape as the title-paragraph pairs of BGE's unlabeled stage-2 data; the passages alone
are a small pre-training corpus.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import re
import sys
import warnings

# Modules with side effects on import, GUI toolkits, test suites and platform-specific ones.
_SKIP = re.compile(r"^(_|test|idlelib|tkinter|turtle|turtledemo|antigravity|this|lib2to3|ensurepip|"
                   r"venv|msvcrt|winreg|winsound|nt|_winapi|pydoc_data|xxsubtype|crypt|nis|spwd|"
                   r"ossaudiodev|curses)")


def _clean(doc: str, max_chars: int) -> str:
  text = " ".join(inspect.cleandoc(doc).split())
  if len(text) > max_chars:
    cut = text.rfind(". ", 0, max_chars)
    text = text[:cut + 1] if cut > max_chars // 3 else text[:max_chars]
  return text


def stdlib_pairs(min_chars: int = 40, max_chars: int = 600) -> list[tuple[str, str]]:
  """(qualified name, docstring) for stdlib modules and their public functions and classes.

  Deterministic for a given Python build: modules and members in sorted order, duplicates
  (re-exported objects) kept once under their first name.
  """
  names = sorted(n for n in getattr(sys, "stdlib_module_names", ()) if not _SKIP.match(n))
  pairs: list[tuple[str, str]] = []
  seen: set[str] = set()
  for name in names:
    try:
      with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
          contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        module = importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - a module this platform lacks is simply absent
      continue
    candidates = [(name, module)]
    for attr in sorted(getattr(module, "__all__", None) or dir(module)):
      if attr.startswith("_"):
        continue
      obj = getattr(module, attr, None)
      if (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)) and \
          getattr(obj, "__module__", name) == name:
        candidates.append((f"{name}.{attr}", obj))
    for title, obj in candidates:
      doc = inspect.getdoc(obj) if not inspect.ismodule(obj) else obj.__doc__
      if not doc:
        continue
      passage = _clean(doc, max_chars)
      if len(passage) < min_chars or passage in seen:
        continue
      seen.add(passage)
      pairs.append((title, passage))
  return pairs


def split_pairs(pairs: list[tuple[str, str]], eval_fraction: float = 0.1, seed: int = 0):
  """(train, held-out) split, deterministic."""
  import random
  order = list(range(len(pairs)))
  random.Random(seed).shuffle(order)
  n_eval = int(len(pairs) * eval_fraction)
  held = set(order[:n_eval])
  return ([p for i, p in enumerate(pairs) if i not in held],
          [p for i, p in enumerate(pairs) if i in held])


def write_texts(pairs: list[tuple[str, str]], path: str) -> str:
  """Passages as a `{"text"}` JSONL file (the stage-1 input format)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    for _, passage in pairs:
      f.write(json.dumps({"text": passage}) + "\n")
  return path
