"""bge_jax.sweep and launch/sweep.py: expansion (grid, zip, get_sweep), run names, printed
commands (parsed back by train.py's own flag machinery), refusals, --collect over fake workdirs,
and a real 2-run sweep."""

import json
import os
import shlex

import pytest

from bge_jax import sweep
from conftest import REPO, make_corpus, make_tokenizer
from launch import sweep as sweep_cli

CONTRASTIVE = f"{REPO / 'configs' / 'contrastive.py'}:tiny"


def parse_train_command(line: str):
  """The ConfigDict and workdir that launch/train.py's flags make of a printed command."""
  from absl import flags
  from ml_collections import config_flags

  argv = shlex.split(line)
  assert argv[0] == "python" and argv[1].endswith(os.path.join("launch", "train.py"))
  values = flags.FlagValues()
  train_argv = ["train.py"] + argv[2:]
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=train_argv)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  values(train_argv)
  return values.config, values.workdir


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections' loader
def test_grid_multiplies_and_commands_parse_back(capsys, tmp_path):
  code = sweep_cli.main(["--config", CONTRASTIVE, "--workdir", str(tmp_path),
                         "--grid", "optimizer.lr=1e-5,3e-5,1e-4",
                         "--grid", "loss.temperature=0.01,0.05",
                         "--set", "num_train_steps=7", "--set", "data.train=/data/pairs.jsonl"])
  assert code == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 6
  seen = set()
  for line in lines:
    config, workdir = parse_train_command(line)
    assert config.num_train_steps == 7 and config.data.train == "/data/pairs.jsonl"
    assert isinstance(config.optimizer.lr, float) and isinstance(config.loss.temperature, float)
    name = os.path.basename(workdir)
    assert os.path.dirname(workdir) == str(tmp_path)
    assert name == f"lr={config.optimizer.lr!r},temperature={config.loss.temperature!r}"
    seen.add((config.optimizer.lr, config.loss.temperature))
  assert seen == {(lr, t) for lr in (1e-5, 3e-5, 1e-4) for t in (0.01, 0.05)}
  # Untouched keys keep the config's values (the tiny contrastive preset's).
  assert config.batch_size == 16 and config.data.group_size == 1


def test_zip_moves_together_and_crosses_the_grid():
  runs = sweep.expand(CONTRASTIVE, grid=["loss.normalize=true,false"],
                      zips=["optimizer.lr=1e-5,3e-5", "batch_size=8,32"])
  assert len(runs) == 4
  pairs = {(r.overrides["optimizer.lr"], r.overrides["batch_size"]) for r in runs}
  assert pairs == {(1e-5, 8), (3e-5, 32)}
  assert {r.overrides["loss.normalize"] for r in runs} == {True, False}
  assert all(isinstance(r.overrides["batch_size"], int) for r in runs)
  assert runs[0].name == "normalize=True,lr=1e-05,batch_size=8"


def test_get_sweep_beside_the_config(tmp_path):
  cfg = tmp_path / "swept.py"
  cfg.write_text(
      "import itertools\n"
      "from ml_collections import ConfigDict\n"
      "def get_config(arg=''):\n"
      "  c = ConfigDict()\n"
      "  c.seed = 0\n"
      "  c.model = ConfigDict({'preset': arg or 'tiny'})\n"
      "  c.optimizer = ConfigDict({'lr': 1e-3, 'b1': 0.9})\n"
      "  c.data = ConfigDict({'train': ''})\n"
      "  return c\n"
      "def get_sweep(arg):\n"
      "  return [{'optimizer.lr': lr, 'seed': s}\n"
      "          for lr, s in itertools.product([1e-3, 3e-3], [0, 1])]\n")
  runs = sweep.expand(f"{cfg}:small", grid=["data.train=a.jsonl,dir/b.jsonl"])
  assert len(runs) == 8
  assert runs[0].name == "lr=0.001,seed=0,train=a.jsonl"
  assert runs[-1].name == "lr=0.003,seed=1,train=b.jsonl"
  assert runs[-1].overrides == {"optimizer.lr": 0.003, "seed": 1, "data.train": "dir/b.jsonl"}
  assert len(sweep.expand(f"{cfg}:small", use_config_sweep=False)) == 1
  # A key swept by get_sweep and by the command line is refused.
  with pytest.raises(sweep.SweepError, match=r"set by two sweep axes"):
    sweep.expand(str(cfg), grid=["seed=3,4"])


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections' loader
def test_a_bundled_config_name_prints_its_file(capsys, tmp_path):
  assert sweep_cli.main(["--config", "contrastive:tiny", "--workdir", str(tmp_path),
                         "--grid", "seed=1,2"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and "contrastive.py:tiny" in lines[0]  # train.py reads files only
  config, _ = parse_train_command(lines[1])
  assert config.model.preset == "tiny" and config.seed == 2


def test_names_disambiguate_and_stay_short():
  short = sweep._short_keys(["optimizer.lr", "eval.batch_size", "batch_size", "seed"])
  assert short == {"optimizer.lr": "lr", "eval.batch_size": "eval.batch_size",
                   "batch_size": "batch_size", "seed": "seed"}
  long_value = "x" * 300
  name = sweep.run_name({"data.train": long_value}, {"data.train": "train"})
  assert len(name) == sweep.MAX_NAME
  assert name != sweep.run_name({"data.train": long_value + "y"}, {"data.train": "train"})
  assert sweep.run_name({"tokenizer": "a b/c d"}, {"tokenizer": "tokenizer"}) == "tokenizer=c-d"
  assert sweep.run_name({}, {}) == "default"


@pytest.mark.parametrize("argv, needle", [
    (["--grid", "optimizer.lrr=1,2"],
     "'optimizer.lrr' is not a config key; did you mean optimizer.lr"),
    (["--grid", "batch_size=8,1.5"], "batch_size=1.5 does not fit the field's type int"),
    (["--grid", "loss.normalize=yes"], "is not a boolean"),
    (["--zip", "batch_size=8,16", "--zip", "seed=1"], "--zip keys need the same number of values"),
    (["--grid", "seed=1,1"], "are both named 'seed=1'"),
    (["--grid", "seed=1", "--zip", "seed=2"], "--zip seed: the key is swept twice"),
    (["--grid", "seed"], "expected KEY=V1,V2"),
    (["--grid", "seed=1,,2"], "empty value"),
    (["--set", "seed=1", "--grid", "seed=2,3"], "--set ['seed']: also swept"),
])
def test_refusals_are_one_error_line(capsys, tmp_path, argv, needle):
  code = sweep_cli.main(["--config", CONTRASTIVE, "--workdir", str(tmp_path)] + argv)
  err = capsys.readouterr().err
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert needle in lines[0], lines[0]


def _fake_run(workdir, rows, total=None, partial=False):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
    if partial:
      f.write('{"step": 9, "loss": 0.')  # a run killed mid-line
  if total is not None:
    with open(os.path.join(workdir, "run_info.json"), "w") as f:
      json.dump({"total_steps": total}, f)


def test_collect_reads_the_final_metrics(capsys, tmp_path):
  args = ["--config", CONTRASTIVE, "--workdir", str(tmp_path),
          "--grid", "optimizer.lr=1e-5,2e-5,3e-5"]
  _fake_run(tmp_path / "lr=1e-05",
            [{"step": 0, "eval/sts_spearman": 0.5}, {"step": 5, "loss": 2.0, "lr": 1e-5},
             {"step": 10, "loss": 1.25, "lr": 0.0}, {"step": 10, "eval/sts_spearman": 0.75}],
            total=10)
  _fake_run(tmp_path / "lr=2e-05", [{"step": 5, "loss": 3.5}], total=10, partial=True)
  out_file = tmp_path / "table.md"
  assert sweep_cli.main(args + ["--collect", "--out", str(out_file)]) == 0
  table = capsys.readouterr().out
  assert out_file.read_text() == table
  lines = table.strip().splitlines()
  assert lines[0] == "| run | lr | step | loss | eval/sts_spearman |"
  assert lines[1] == "|---|---|---|---|---|"
  assert lines[2] == "| lr=1e-05 | 1e-05 | 10 (done) | 1.25 | 0.75 |"
  assert lines[3] == "| lr=2e-05 | 2e-05 | 5/10 | 3.5 | — |"
  assert lines[4] == "| lr=3e-05 | 3e-05 | not started | — | — |"
  assert sweep_cli.main(args + ["--collect", "--metrics", "lr,loss"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0] == "| run | lr | step | lr | loss |"
  assert lines[2].endswith("| 0 | 1.25 |")


@pytest.mark.slow
def test_run_two_tiny_runs_then_collect(capsys, tmp_path, monkeypatch):
  """Two 2-step RetroMAE runs through train.py subprocesses, then the table of their losses."""
  corpus = make_corpus(tmp_path / "train.jsonl", 64)
  tokenizer = make_tokenizer(tmp_path / "tok")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")  # one device each
  monkeypatch.setenv("BGE_JAX_COMPILATION_CACHE", str(tmp_path / "xla-cache"))
  workdir = tmp_path / "sweep"
  args = ["--config", f"{REPO / 'configs' / 'retromae.py'}:tiny", "--workdir", str(workdir),
          "--grid", "optimizer.lr=1e-3,3e-3",
          "--set", f"tokenizer={tokenizer}", "--set", f"data.train={corpus}",
          "--set", "data.max_length=32", "--set", "model.max_position_embeddings=32",
          "--set", "num_train_steps=2", "--set", "batch_size=4", "--set", "log_every_steps=1",
          "--set", "export=False", "--set", "model.preset=tiny",
          # No warmup: ceil(0.1 x 2) = 1 warmup step would run step 1 at lr 0, and the logged
          # step-2 loss would not depend on the lr.
          "--set", "optimizer.warmup_steps=0"]
  assert sweep_cli.main(args + ["--run"]) == 0
  out = capsys.readouterr().out
  assert "[sweep 1/2] lr=0.001" in out and "[sweep 2/2] lr=0.003" in out
  rows = [line for line in out.splitlines() if line.startswith("| lr=")]
  assert len(rows) == 2 and all("| 2 (done) |" in row for row in rows), out
  losses = [float(row.split("|")[-2]) for row in rows]
  assert all(0 < x < 50 for x in losses) and losses[0] != losses[1]
  for name in ("lr=0.001", "lr=0.003"):
    config = json.loads((workdir / name / "config.json").read_text())
    assert config["optimizer"]["lr"] == float(name.split("=")[1])
