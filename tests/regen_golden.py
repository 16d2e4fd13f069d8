"""The golden PartitionSpec table of bge-base: every parameter -> its mesh PartitionSpec.

The table (tests/golden/bge_base_partition_specs.json) is what `sharding.LOGICAL_AXIS_RULES`
and the model's logical axis names give every parameter of bge-base-en with all optional parts
(MLM head, RetroMAE decoder, pooler), on the (data, fsdp, tensor) mesh. tests/test_sharding.py
recomputes it and fails on any difference, so a change of the rules or of a layer's axis names is
a reviewed diff of this file rather than a silent change of how a pod run is laid out.

Regenerate after an intended change (from the repository root):

    python -m tests.regen_golden           # rewrites the file, prints what changed
    python -m tests.regen_golden --check   # exit 1 and print the differences, write nothing
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import pathlib
import sys
from typing import Any

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "bge_base_partition_specs.json"
PRESET = "bge-base-en"
REGEN_COMMAND = "python -m tests.regen_golden"


def golden_table() -> dict[str, Any]:
  """The table as it follows from the code now (a fresh copy: callers may edit it)."""
  return copy.deepcopy(_golden_table())


@functools.lru_cache(maxsize=1)
def _golden_table() -> dict[str, Any]:
  from bge_jax import config as config_lib
  from bge_jax import sharding
  from bge_jax.models import bert

  config = config_lib.preset(PRESET, add_mlm_head=True, add_decoder=True, add_pooler=True,
                             hf_family="retromae")
  abstract, logical = bert.abstract_init(config)
  return {
      "about": f"{PRESET} with MLM head, RetroMAE decoder and pooler: parameter -> shape, logical "
               f"axes, mesh PartitionSpec. Regenerate: {REGEN_COMMAND}",
      "mesh_axes": list(sharding.MESH_AXES),
      "rules": [[name, axes if axes is None or isinstance(axes, str) else list(axes)]
                for name, axes in sharding.LOGICAL_AXIS_RULES],
      "params": sharding.spec_table(abstract, logical),
  }


def differences(want: dict[str, Any], got: dict[str, Any]) -> list[str]:
  """Readable lines naming every path or header field that differs (empty when equal)."""
  lines = []
  for key in sorted(set(want) | set(got)):
    if key != "params" and want.get(key) != got.get(key):
      lines.append(f"{key}: golden {want.get(key)!r}, now {got.get(key)!r}")
  old, new = want.get("params", {}), got.get("params", {})
  for path in sorted(set(old) | set(new)):
    if path not in new:
      lines.append(f"removed {path}: {old[path]}")
    elif path not in old:
      lines.append(f"added {path}: {new[path]}")
    elif old[path] != new[path]:
      lines.append(f"changed {path}: golden {old[path]}, now {new[path]}")
  return lines


def dumps(table: dict[str, Any]) -> str:
  """JSON with one line per parameter, so that a change reads as a one-line diff."""
  head = {k: v for k, v in table.items() if k != "params"}
  lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in sorted(head.items())]
  lines.append('  "params": {')
  params = sorted(table["params"].items())
  lines += [f"    {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
            + ("," if i < len(params) - 1 else "") for i, (k, v) in enumerate(params)]
  lines += ["  }", "}"]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
  args = parser.parse_args(argv)
  got = golden_table()
  want = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
  diff = differences(want, got)
  for line in diff:
    print(line)
  if args.check:
    print(f"{GOLDEN}: {'differs' if diff else 'up to date'}")
    return 1 if diff else 0
  GOLDEN.parent.mkdir(parents=True, exist_ok=True)
  GOLDEN.write_text(dumps(got))
  print(f"wrote {GOLDEN} ({len(got['params'])} parameters, {len(diff)} differences)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
