"""kvjax.benchmarking and scripts/benchmark.py on tiny random models (speed is not asserted)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from kvjax import benchmarking
from kvjax.cache import full_cache_nbytes
from kvjax.config import ModelConfig
from kvjax.model import random_params

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**changes) -> ModelConfig:
  base = ModelConfig(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     max_position_embeddings=128, name="tiny")
  return base.replace(**changes)


def expected_cache_bytes(config, batch, capacity, itemsize):
  # Per layer: keys + values [B, K, S, D], int32 positions [B, K, S], int32 end; int32 lengths [B].
  kv = 2 * batch * config.num_kv_heads * capacity * config.head_dim * itemsize
  positions = batch * config.num_kv_heads * capacity * 4
  return config.num_layers * (kv + positions + 4) + batch * 4


@pytest.mark.parametrize("dtype,itemsize,tied", [
    ("float32", 4, False), ("float32", 4, True), ("bfloat16", 2, False)])
def test_measure_reports_sizes_and_timings(dtype, itemsize, tied):
  config = tiny_config(dtype=dtype, tie_embeddings=tied)
  model = random_params(config, seed=1)
  row = benchmarking.measure(model, context_length=16, batch_size=2, decode_steps=4,
                             repeats=2, warmup=1)
  for key in ("prefill_seconds", "prefill_seconds_min", "prefill_tokens_per_second",
              "decode_step_seconds", "decode_step_seconds_min", "decode_tokens_per_second",
              "cache_bytes", "weight_bytes", "weight_bytes_read_per_step",
              "decode_bytes_per_step", "decode_bandwidth_gbps", "decode_bandwidth_gbps_best"):
    assert row[key] > 0, key
  assert row["prefill_seconds_min"] <= row["prefill_seconds"]
  assert row["decode_step_seconds_min"] <= row["decode_step_seconds"]
  assert (row["context_length"], row["batch_size"], row["decode_steps"]) == (16, 2, 4)
  assert row["cache_capacity_tokens"] == 20
  assert row["cache_bytes"] == expected_cache_bytes(config, 2, 20, itemsize)
  assert row["cache_bytes"] == full_cache_nbytes(config, 2, 20)
  assert row["weight_bytes"] == model.num_params() * itemsize
  embedding = 0 if tied else config.vocab_size * config.hidden_size * itemsize
  assert row["weight_bytes_read_per_step"] == row["weight_bytes"] - embedding
  assert row["decode_bytes_per_step"] == row["weight_bytes_read_per_step"] + row["cache_bytes"]
  assert np.isclose(row["decode_tokens_per_second"], 2 / row["decode_step_seconds"])
  assert np.isclose(row["decode_bandwidth_gbps"],
                    row["decode_bytes_per_step"] / row["decode_step_seconds"] / 1e9)


@pytest.mark.parametrize("dtype,itemsize", [("float32", 4), ("bfloat16", 2)])
def test_expected_cache_bytes_formula(dtype, itemsize):
  config = tiny_config(dtype=dtype, num_layers=3, num_kv_heads=1, num_heads=2)
  assert full_cache_nbytes(config, 3, 40) == expected_cache_bytes(config, 3, 40, itemsize)


def test_run_report_fractions_and_table():
  model = random_params(tiny_config())
  report = benchmarking.run(model, [8, 12], [1], decode_steps=2, repeats=1, warmup=0,
                            hbm_bandwidth_gbps=100.0, copy_bandwidth_bytes=1 << 20)
  assert set(report) >= {"device", "jax_version", "model", "method", "copy_bandwidth_gbps",
                         "hbm_bandwidth_gbps", "results"}
  assert report["method"]["name"] == "full"
  assert report["model"]["config"]["num_layers"] == 2
  assert [r["context_length"] for r in report["results"]] == [8, 12]
  for r in report["results"]:
    assert np.isclose(r["hbm_fraction"], r["decode_bandwidth_gbps"] / 100.0)
    assert np.isclose(r["copy_fraction"],
                      r["decode_bandwidth_gbps"] / report["copy_bandwidth_gbps"])
  table = benchmarking.format_table(report)
  assert "decode tok/s" in table and len(table.splitlines()) == 6


def test_copy_bandwidth_is_positive():
  assert benchmarking.measure_copy_bandwidth(nbytes=1 << 20, iterations=2, repeats=1) > 0


@pytest.mark.parametrize("name,params", [
    ("llama-3.1-8b", 8_030_261_248), ("qwen2.5-7b", 7_615_616_512),
    ("smollm2-135m", 134_515_008)])
def test_named_shapes_have_published_parameter_counts(name, params):
  config = benchmarking.named_shape(name)
  assert config.dtype == "bfloat16"
  assert benchmarking.abstract_param_count(config) == params


def test_named_shape_details_and_dtype():
  llama = benchmarking.named_shape("Llama-3.1-8B", "float32")
  assert llama.dtype == "float32"
  assert (llama.rope_theta, llama.max_position_embeddings) == (500000.0, 131072)
  assert llama.rope_scaling.factor == 8.0
  assert llama.rope_scaling.original_max_position_embeddings == 8192
  qwen = benchmarking.named_shape("qwen2.5-7b")
  assert qwen.qkv_bias and not qwen.tie_embeddings and qwen.num_kv_heads == 4


def test_named_shape_from_json_file(tmp_path):
  path = tmp_path / "small.json"
  path.write_text(tiny_config(name="").to_json())
  config = benchmarking.named_shape(str(path))
  assert config.name == "small" and config.dtype == "float32"
  assert benchmarking.named_shape(path, "bfloat16").dtype == "bfloat16"


def test_bad_inputs_name_the_value():
  with pytest.raises(benchmarking.BenchmarkError, match="'gpt-5'.*llama-3.1-8b"):
    benchmarking.named_shape("gpt-5")
  model = random_params(tiny_config())
  with pytest.raises(benchmarking.BenchmarkError, match=r"120 \+ decode_steps=9 = 129.*<= 128"):
    benchmarking.measure(model, 120, 1, 9)
  for kwargs, pattern in [(dict(context_length=0), "context_length=0"),
                          (dict(batch_size=-1), "batch_size=-1"),
                          (dict(decode_steps=0), "decode_steps=0"),
                          (dict(repeats=0), "repeats=0"),
                          (dict(warmup=-1), "warmup=-1"),
                          (dict(batch_size=True), "batch_size=True")]:
    args = dict(context_length=8, batch_size=1, decode_steps=2, repeats=1, warmup=0) | kwargs
    with pytest.raises(benchmarking.BenchmarkError, match=pattern):
      benchmarking.measure(model, **args)
  with pytest.raises(benchmarking.BenchmarkError, match="'x' must be a positive integer"):
    benchmarking.parse_sizes(["512", "x"], "--context_lengths")
  with pytest.raises(benchmarking.BenchmarkError, match="'0' must be a positive integer"):
    benchmarking.parse_sizes(["0"], "--batch_sizes")
  assert benchmarking.parse_sizes(["512", " 2048"], "--context_lengths") == [512, 2048]
  with pytest.raises(benchmarking.BenchmarkError, match="hbm_bandwidth_gbps=-3"):
    benchmarking.run(model, [8], [1], decode_steps=2, hbm_bandwidth_gbps=-3)
  with pytest.raises(ValueError, match="compression_ratio=0.5"):  # "full" cannot compress
    benchmarking.run(model, [8], [1], decode_steps=2, compression_ratio=0.5)


def _script(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_script_writes_json(tmp_path):
  shape = tmp_path / "tiny.json"
  shape.write_text(tiny_config().to_json())
  out = tmp_path / "out" / "bench.json"
  proc = _script(f"--shape={shape}", "--context_lengths=8,16", "--batch_sizes=1,2",
                 "--decode_steps=3", "--warmup=1", "--repeats=1", "--copy_bandwidth_mib=1",
                 f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "prefill tok/s" in proc.stdout
  report = json.loads(out.read_text())
  assert report["device"]["platform"] == "cpu" and report["jax_version"]
  assert report["model"]["name"] == "tiny" and report["model"]["source"] == f"shape:{shape}"
  assert report["method"]["name"] == "full" and report["config"]["decode_steps"] == 3
  assert [(r["context_length"], r["batch_size"]) for r in report["results"]] == [
      (8, 1), (8, 2), (16, 1), (16, 2)]
  config = tiny_config()
  for r in report["results"]:
    assert r["cache_bytes"] == expected_cache_bytes(config, r["batch_size"],
                                                    r["context_length"] + 3, 4)
    assert r["decode_tokens_per_second"] > 0 and r["hbm_fraction"] > 0


def test_script_rejects_too_long_context(tmp_path):
  shape = tmp_path / "tiny.json"
  shape.write_text(tiny_config().to_json())
  proc = _script(f"--shape={shape}", "--context_lengths=100", "--decode_steps=32",
                 "--copy_bandwidth_mib=1")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "context_length=100 + decode_steps=32 = 132" in proc.stderr
