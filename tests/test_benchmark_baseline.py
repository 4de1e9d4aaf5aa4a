"""scripts/benchmark.py --baseline=transformers on a tiny random Llama (speed is not asserted)."""

import json
import os
import statistics
import sys

import numpy as np
import pytest

from hf_models import save_tiny
from kvjax import benchmarking, benchmarking_baseline as baseline, benchmarking_ops
from test_benchmark import _script

CONTEXTS, BATCHES, STEPS, REPEATS = (16, 32), (1, 2), 3, 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  # A wider init than the default spreads the logits: varied greedy tokens, no near-ties.
  return save_tiny("llama", tmp_path_factory.mktemp("baseline") / "tiny",
                   initializer_range=0.2)


@pytest.fixture(scope="module")
def side_by_side(tiny_dir):
  out, plot = tiny_dir.parent / "bench.json", tiny_dir.parent / "plot.png"
  proc = _script(f"--model={tiny_dir}", "--baseline=transformers", "--torch_threads=1",
                 f"--context_lengths={','.join(map(str, CONTEXTS))}",
                 f"--batch_sizes={','.join(map(str, BATCHES))}", "--methods=snapkv:window=4",
                 "--compression_ratio=0.5", f"--decode_steps={STEPS}", "--warmup=0",
                 f"--repeats={REPEATS}", f"--json_out={out}", f"--plot_out={plot}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text()), plot


def test_report_structure(side_by_side, tiny_dir):
  stdout, report, _ = side_by_side
  assert report["device"]["platform"] == "cpu" and report["jax_version"]
  assert report["torch_version"] and report["transformers_version"]
  assert report["baseline"] == "transformers" and report["config"]["baseline"] == "transformers"
  assert report["threads"]["torch_threads"] == 1 and report["threads"]["cpu_count"] >= 1
  # The side-by-side leaves torch's OpenMP policy as the environment has it.
  assert report["threads"]["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY")
  assert report["threads"]["omp_wait_policy_known"] is True
  assert report["model"]["source"] == str(tiny_dir) and report["model"]["config"]["dtype"] == (
      "float32")
  assert [m["label"] for m in report["methods"]] == ["full", "snapkv"]
  assert "full cache" in report["ratio_definition"]
  assert "full cache" in report["compressed_rows_compared_with"]
  assert [(r["context_length"], r["batch_size"], r["method"]) for r in report["results"]] == [
      (c, b, m) for c in CONTEXTS for b in BATCHES for m in ("full", "snapkv")]
  for r in report["results"]:
    b, c = r["batch_size"], r["context_length"]
    for library in ("kvjax", "transformers"):
      side = r[library]
      for name, _ in baseline.TIMES:
        assert len(side["times"][name]) == REPEATS and side[name] > 0, (library, name)
        assert side[name] == statistics.median(side["times"][name])
      assert np.isclose(side["prefill_tokens_per_second"], b * c / side["prefill_seconds"])
      assert np.isclose(side["decode_tokens_per_second"], b / side["decode_step_seconds"])
      assert side["time_to_first_token_seconds"] >= side["prefill_seconds"]
    assert r["kvjax"]["compile_seconds"] >= 0 and r["kvjax"]["cache_bytes"] > 0
    assert r["transformers"]["method"] == "full" and r["transformers"]["cache_bytes"] > 0
  assert report["results"][0]["kvjax"]["compile_seconds"] > 0
  assert "decode ms/step kv/hf" in stdout and "match" in stdout
  host = report["device"]["host_cpu"]
  assert f"{host['cores']} cores" in stdout and "\nhost " in stdout


def test_table_of_a_report_written_before_the_host_was_recorded(side_by_side):
  _, report, _ = side_by_side
  old = dict(report, device={k: v for k, v in report["device"].items() if k != "host_cpu"})
  assert "host unknown CPU, ? cores (none recorded)" in baseline.format_table(old)


def test_full_cache_tokens_match_transformers(side_by_side):
  _, report, _ = side_by_side
  full = [r for r in report["results"] if r["method"] == "full"]
  assert report["tokens_match"] is True
  seen = set()
  for r in full:
    assert r["tokens_match"] is True and r["first_mismatch"] is None
    assert r["kvjax_tokens"] == r["transformers_tokens"]
    assert np.shape(r["kvjax_tokens"]) == (r["batch_size"], STEPS + 1)
    assert r["matching_prefix_tokens"] == STEPS + 1
    seen |= set(np.ravel(r["kvjax_tokens"]).tolist())
  assert len(seen) > 3  # real greedy paths, not one repeated token


def test_ratios_are_medians_of_paired_repeats(side_by_side):
  _, report, _ = side_by_side
  for r in report["results"]:
    for name, label in baseline.TIMES:
      ours, theirs = r["kvjax"]["times"][name], r["transformers"]["times"][name]
      paired = [t / o for o, t in zip(ours, theirs)]
      assert np.allclose(r["speed_ratios_per_repeat"][label], paired)
      assert np.isclose(r["speed_ratios"][label], statistics.median(paired))


def test_compressed_rows_are_kvjax_against_the_full_transformers_cache(side_by_side):
  _, report, _ = side_by_side
  rows = report["results"]
  for full, snapkv in zip(rows[::2], rows[1::2]):
    assert snapkv["method"] == "snapkv" and snapkv["compression_ratio"] == 0.5
    assert snapkv["keep_tokens"] == full["context_length"] // 2
    assert snapkv["tokens_match"] is None and snapkv["compared_with"] == (
        "transformers full cache")
    assert snapkv["transformers"] == full["transformers"]  # the same transformers runs
    assert snapkv["kvjax"]["context_cache_bytes"] < full["kvjax"]["context_cache_bytes"]


def test_plot_is_written(side_by_side):
  _, _, plot = side_by_side
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mismatch_is_reported_loudly():
  ours = np.array([[1, 2, 3], [4, 5, 6]])
  theirs = np.array([[1, 2, 3], [4, 9, 6]])
  assert baseline.first_mismatch(ours, ours) is None
  assert baseline.first_mismatch(ours, theirs) == {"row": 1, "index": 1, "kvjax": 5,
                                                   "transformers": 9}


def test_bad_arguments_name_the_value(tiny_dir, monkeypatch):
  with pytest.raises(benchmarking.BenchmarkError, match=r"baseline='vllm'.*\['transformers'\]"):
    baseline.run("vllm", tiny_dir, [16], [1])
  for threads in (0, -2, 1.5):
    with pytest.raises(benchmarking.BenchmarkError, match=f"torch_threads={threads}"):
      baseline.run("transformers", tiny_dir, [16], [1], torch_threads=threads)
  with pytest.raises(benchmarking.BenchmarkError, match="float32.*'bfloat16'"):
    baseline.run("transformers", tiny_dir, [16], [1], dtype="bfloat16")
  with pytest.raises(benchmarking.BenchmarkError, match="--plot_out applies only with"):
    baseline.check_flags(None, ["plot_out"])
  with pytest.raises(benchmarking.BenchmarkError, match="--shape does not apply"):
    baseline.check_flags("transformers", ["shape"])

  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(benchmarking.BenchmarkError, match="optional packages torch and "
                     "transformers.*torch"):
    baseline.run("transformers", tiny_dir, [16], [1])


def test_script_rejects_an_unknown_baseline(tiny_dir):
  proc = _script(f"--model={tiny_dir}", "--baseline=vllm", "--context_lengths=16")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "baseline='vllm' is not supported; allowed: ['transformers']" in proc.stderr


def test_ops_side_by_side(tiny_dir, tmp_path):
  """--ops: kvjax's CPU attention (unblocked at 16 tokens, blocked at 80) and a product
  against torch's on the same inputs; outputs agree, ratios are paired medians."""
  out = tmp_path / "ops.json"
  proc = _script(f"--model={tiny_dir}", "--baseline=transformers", "--ops", "--torch_threads=1",
                 "--context_lengths=16,80", "--batch_sizes=1,2", "--repeats=2", "--warmup=0",
                 f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  config = report["model"]["config"]
  assert report["torch_threads"] == 1 and "host_cpu" in report["device"]
  # torch's OpenMP workers sleep between ops (PASSIVE) unless the environment chose.
  assert report["torch_openmp"] == {
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
      "omp_wait_policy_known": True}
  rows = report["results"]
  assert [(r["op"], r["context_length"], r["batch_size"]) for r in rows] == [
      (op, c, b) for c in (16, 80) for b in (1, 2) for op in benchmarking_ops.OPS]
  for r in rows:
    ours, theirs = r["times"]["kvjax"], r["times"]["torch"]
    assert len(ours) == len(theirs) == 2 and min(ours + theirs) > 0
    assert r["speed_ratio"] == statistics.median(t / o for o, t in zip(ours, theirs))
    assert r["max_abs_difference"] < 1e-4, r
    b, t = r["batch_size"], r["context_length"]
    if r["op"] == "attention":
      assert r["flops"] == 2 * b * config["num_heads"] * t * t * config["head_dim"]
    else:
      assert r["flops"] == 2 * b * t * config["hidden_size"] * config["intermediate_size"]
  assert "kvjax speed / torch speed" in proc.stdout and "attention" in proc.stdout
  assert f"OMP_WAIT_POLICY={report['torch_openmp']['omp_wait_policy']}" in proc.stdout


def test_ops_keeps_the_environments_openmp_policy(tiny_dir, tmp_path):
  out = tmp_path / "ops.json"
  proc = _script(f"--model={tiny_dir}", "--baseline=transformers", "--ops", "--torch_threads=1",
                 "--context_lengths=16", "--batch_sizes=1", "--repeats=1", "--warmup=0",
                 f"--json_out={out}", OMP_WAIT_POLICY="ACTIVE")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(out.read_text())["torch_openmp"] == {"omp_wait_policy": "ACTIVE",
                                                         "omp_wait_policy_known": True}


def test_ops_needs_the_baseline_and_takes_no_plot(tiny_dir):
  proc = _script(f"--model={tiny_dir}", "--ops", "--context_lengths=16")
  assert proc.returncode != 0 and "--ops applies only with --baseline" in proc.stderr
  proc = _script(f"--model={tiny_dir}", "--baseline=transformers", "--ops",
                 "--context_lengths=16", "--plot_out=x.png")
  assert proc.returncode != 0 and "--plot_out does not apply with --ops" in proc.stderr


@pytest.mark.parametrize("flag", ["--methods=snapkv", "--compression_ratio=0.5",
                                  "--decode_steps=4", "--dtype=bfloat16"])
def test_ops_rejects_the_flags_of_a_generating_run(tiny_dir, flag):
  proc = _script(f"--model={tiny_dir}", "--baseline=transformers", "--ops",
                 "--context_lengths=16", flag)
  name = flag[2:].split("=")[0]
  assert proc.returncode != 0 and f"--{name} does not apply with --ops" in proc.stderr, (
      proc.stderr[-2000:])
