"""launch/bench.py and launch/gpu_bench.py: their batches, measures and a smoke run.

The benchmarks' numbers are only as good as their inputs and meters: the synthetic RetroMAE
batches must satisfy RetroMAE's batch invariants (the same checker as the parity tests), the
memory meter must see an allocation of known size and not invent one, and the interleaving must
alternate.
"""

import argparse
import json

import numpy as np
import pytest

from test_retromae import assert_batch_invariants


@pytest.fixture(scope="module")
def bench():
  from launch import bench
  return bench


@pytest.fixture(scope="module")
def gpu_bench():
  from launch import gpu_bench
  return gpu_bench


def test_bench_retromae_batch_meets_spec(bench):
  batch = bench.retromae_batch(np.random.RandomState(0), 6, 24, vocab=300)
  assert_batch_invariants(batch)
  real = batch["encoder_attention_mask"]
  assert real.sum(1).min() < 24 == real.sum(1).max(), "rows must be ragged, one full"
  # Within the collator's bound, which the benchmark's sparse MLM head relies on.
  assert (batch["encoder_labels"] != -100).sum(1).max() <= bench.s1_predictions(24)


def test_full_length_retromae_batch_meets_spec():
  """launch/gpu_bench.py's stage-1 batch: every row full."""
  from bge_jax.data.masking import max_predictions
  from bge_jax.testing import batches

  batch = batches.retromae_batch(np.random.RandomState(0), 3, 16, vocab=300)
  assert_batch_invariants(batch)
  assert (batch["encoder_attention_mask"] == 1).all()
  assert (batch["encoder_labels"] != -100).sum(1).max() <= max_predictions(16, 0.3)
  pairs = batches.pair_batch(np.random.RandomState(0), 4, 300, q_len=8, p_len=16)
  assert pairs["passage_input_ids"].shape == (4, 16) and pairs["query_attention_mask"].all()


def test_pair_batch_is_ragged_right_padded(bench):
  batch = bench.pair_batch(np.random.RandomState(0), 16, vocab=300)
  for side, length in (("query", bench.Q_LEN), ("passage", bench.P_LEN)):
    ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
    assert ids.shape == mask.shape == (16, length)
    n = mask.sum(1)
    assert (mask == (np.arange(length)[None] < n[:, None])).all()
    assert (ids[mask == 0] == 0).all() and (ids[mask == 1] > 0).all()
    assert n.max() == length and n.min() < length


def test_peak_rss_growth_sees_an_allocation(bench):
  size = 96 * 2**20

  def allocate():
    a = np.ones(size // 8)  # touched pages, freed on return
    return float(a[::4096].sum())

  grown = bench.peak_rss_growth(allocate)
  if grown is None:
    pytest.skip("/proc/self/clear_refs is not writable here")
  # Other threads of the process (XLA's pools, pytest-xdist's channel) may free or the kernel may
  # reclaim a few MiB while fn runs: CI once measured 0.898 * size. The lower bound still tells
  # the allocation from nothing (the next line: < 16 MiB).
  assert 0.75 * size <= grown <= 1.5 * size, grown
  assert bench.peak_rss_growth(lambda: None) < 16 * 2**20


def test_interleaved_alternates_order(bench):
  calls = []
  times = bench.interleaved({"jax": lambda: calls.append("j"), "torch": lambda: calls.append("t")}, 3)
  assert calls == ["j", "t", "t", "j", "j", "t"]
  assert {k: len(v) for k, v in times.items()} == {"jax": 3, "torch": 3}


def test_gpu_bench_shrink(gpu_bench):
  # 3/4 on a multiple of 8 while there is one, else halving; always smaller, never 0.
  assert [gpu_bench._shrink(n) for n in (96, 64, 8, 4, 1)] == [72, 48, 4, 2, 1]


@pytest.mark.slow
def test_gpu_bench_smoke_runs_on_cpu(gpu_bench, tmp_path):
  out = tmp_path / "smoke"
  assert gpu_bench.main(["--smoke", "--stages", "2", "--out", str(out)]) == 0
  result = json.loads(out.with_suffix(".json").read_text())
  (row,) = result["rows"]
  assert row["stage"] == "stage2" and row["rows"] == 8
  assert np.isfinite(row["final_loss"]) and row["step_s_median"] > 0
  assert row["model_flops_per_step"] > 0
  assert (row["mfu"] is None) == (row["peak_flops"] is None)
  assert "| stage2 | tiny | 8 x 16+64 |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_gpu_bench_checks_the_fused_kernel_before_timing_it(gpu_bench, tmp_path, monkeypatch,
                                                             capsys):
  """--attention-impl pallas: the kernel is checked against plain attention first (through the
  interpreter on CPU) and the step is timed; a check that finds large errors stops the run."""
  from bge_jax.testing import attention

  out = tmp_path / "pallas"
  assert gpu_bench.main(["--smoke", "--stages", "2", "--attention-impl", "pallas",
                         "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert printed.count("[attention kernel]") == 2 and "FAILED" not in printed
  assert "attention pallas" in out.with_suffix(".md").read_text()
  monkeypatch.setattr(attention, "check_kernel", lambda **_: {"out": 0.5, "dq": 0.0})
  assert gpu_bench.main(["--smoke", "--stages", "2", "--attention-impl", "pallas"]) == 1
  assert "FAILED" in capsys.readouterr().out


def test_gradcache_bench_shows_the_fused_kernels_smaller_step(bench, tmp_path):
  """The stage-2 step with attention dropout needs less memory through the fused kernel than
  through the explicit path, which keeps the [B, H, L, L] probabilities for the backward."""
  out = tmp_path / "gc.json"
  bench.main(["gradcache", "--preset", "tiny", "--batches", "16", "--chunks", "0",
              "--q-len", "16", "--p-len", "128", "--attention-impls", "default,pallas",
              "--out", str(out)])
  rows = {r["attention_impl"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {None, "pallas"}
  # Tiny: 2 layers x [16, 4, 128, 128] float32 probabilities (4 MiB each) and their masks.
  assert rows["pallas"]["step_bytes"] < rows[None]["step_bytes"] - 8 * 2**20, rows
  assert "| 16 | off | pallas |" in out.with_suffix(".md").read_text()


def test_gemm_cases_are_a_layers_three_orientations(bench):
  cases = bench.gemm_cases("bge-small-en", 1024)
  # x [1024, 384] . W [384, 1536]; g [1024, 1536] . W^T; x^T . g: one FLOP count, three forms.
  assert cases[:3] == [("FFN in", (1024, 384, 1536), "NN"), ("FFN in", (1024, 1536, 384), "NT"),
                       ("FFN in", (384, 1024, 1536), "TN")]
  assert {np.prod(mkn) for _, mkn, _ in cases[:3]} == {1024 * 384 * 1536}


@pytest.mark.slow
def test_gemm_runs_each_library_in_its_own_pinned_process(bench, tmp_path):
  out = tmp_path / "gemm"
  bench.main(["gemm", "--preset", "tiny", "--tokens", "64", "--threads", "1",
              "--dtypes", "float32,bfloat16-f32acc", "--repeats", "2", "--out", str(out)])
  result = json.loads(out.with_suffix(".json").read_text())
  assert len(result["rows"]) == 2 * len(bench.gemm_cases("tiny", 64))
  for row in result["rows"]:
    assert row["threads"] == 1  # the child saw one usable core
    for lib in ("jax", "torch"):
      assert row["gflops"][lib] == pytest.approx(2 * np.prod(row["mkn"]) / row["median_s"][lib] / 1e9)
    assert row["ratio_jax_over_torch"] == pytest.approx(row["median_s"]["jax"] / row["median_s"]["torch"])
  assert "| 1 | bfloat16-f32acc | FFN in | TN | 64 x 64 x 128 |" in out.with_suffix(".md").read_text()


def test_data_tokenizer_settings_alternate_and_take_medians(bench, monkeypatch):
  """`data --tokenizer-threads`: each setting's environment, one child process per setting and
  round with the order alternating, medians whose throughputs follow from the median times."""
  assert bench.tokenizer_env("off") == {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": None}
  assert bench.tokenizer_env("2") == {"TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": "2"}
  assert bench.tokenizer_env("auto") == {"TOKENIZERS_PARALLELISM": None, "RAYON_NUM_THREADS": None}
  for bad in ("0", "two", ""):
    with pytest.raises(ValueError, match="--tokenizer-threads"):
      bench.tokenizer_env(bad)
  with pytest.raises(SystemExit):  # refused by the parser, before any data is generated
    bench.main(["data", "--tokenizer-threads", "off,0", "--dir", "/nonexistent/never-made"])

  calls = []

  def fake_run(cmd, **kwargs):  # a child: batch time 0.1 s per round number, CPU twice that
    setting = cmd[cmd.index("--tokenizer-threads") + 1]
    calls.append(setting)
    t = 0.1 * sum(c == setting for c in calls)
    out = dict(rows=10, queries=30, shards_opened=1, tokenizer_pool_threads=0, batch_s=t,
               batch_cpu_s=2 * t, examples_per_s=30 / t, examples_per_cpu_s=15 / t,
               tokenizer_threads=setting, load_1min=1.0)
    return type("Done", (), {"returncode": 0, "stdout": json.dumps(out) + "\n", "stderr": ""})

  monkeypatch.setattr(bench.subprocess, "run", fake_run)
  args = argparse.Namespace(
      rounds=4, quiet=True, tokenizer="tok", batch_size=30, group_size=2, query_max_length=8,
      passage_max_length=16, steps=1, processes=1)
  measured = bench._batch_rounds("folder", ["off", "2"], args)
  assert calls == ["off", "2", "2", "off", "off", "2", "2", "off"]
  m = bench._medians(measured["2"])
  assert m["batch_s"] == pytest.approx(0.25) and m["examples_per_s"] == pytest.approx(30 / 0.25)
  assert m["examples_per_cpu_s"] == pytest.approx(30 / 0.5)
  assert m["examples_per_s_range"] == pytest.approx([30 / 0.4, 30 / 0.1])
  assert (m["rows"], m["queries"], m["tokenizer_threads"]) == (10, 30, "2")


@pytest.mark.slow
def test_data_bench_runs_the_tokenizer_on_the_threads_asked(bench, tmp_path):
  """End to end on 2,000 pairs: the `2` child's tokenizer starts a pool of 2 Rust threads, the
  `off` child none (TOKENIZERS_PARALLELISM and RAYON_NUM_THREADS reach the tokenizer)."""
  out = tmp_path / "data"
  bench.main(["data", "--rows", "2000", "--files", "2", "--workers", "1", "--batch-size", "8",
              "--group-size", "2", "--steps", "1", "--processes", "2", "--tokenizer-threads",
              "off,2", "--quiet", "--dir", str(tmp_path / "work"), "--out", str(out)])
  run = json.loads(out.with_suffix(".json").read_text())["runs"][0]
  assert {k: v["tokenizer_pool_threads"] for k, v in run["tokenizer"].items()} == {"off": 0, "2": 2}
  assert run["batch_s"] == run["tokenizer"]["off"]["batch_s"]  # the main table: the first setting
  assert "| 2,000 | 2 | 2 |" in out.with_suffix(".md").read_text()
