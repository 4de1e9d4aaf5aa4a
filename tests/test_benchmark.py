"""kvjax.benchmarking and scripts/benchmark.py on tiny random models (speed is not asserted)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from kvjax import benchmarking, methods
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
  # The process held the weights and the cache while prefilling, so its peak resident
  # memory (Linux) covers both.
  assert row["prefill_peak_rss_bytes"] >= row["weight_bytes"] + row["cache_bytes"]


def test_peak_rss_sees_a_new_allocation():
  """In a fresh process: a test worker that ran other files frees memory in the background,
  so its resident size can fall below the reset mark while the block is allocated (seen
  under pytest-xdist)."""
  if not benchmarking.reset_peak_rss():
    pytest.skip("no /proc/self/clear_refs (not Linux)")
  code = ("import numpy as np\n"
          "from kvjax import benchmarking\n"
          "assert benchmarking.reset_peak_rss()\n"
          "before = benchmarking.peak_rss()\n"
          "block = np.ones(64 << 20, np.uint8)  # 64 MiB, touched\n"
          "print(benchmarking.peak_rss() - before, block.nbytes)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout.split()
  grew, nbytes = int(out[0]), int(out[1])
  assert grew >= nbytes * 0.9


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
  assert [m["label"] for m in report["methods"]] == ["full"]
  table = benchmarking.format_table(report)
  assert "decode tok/s" in table and "ctx cache MiB" in table
  assert "decode-attention kernel: not measured" in table


def test_copy_bandwidth_is_bytes_moved_over_the_best_time(monkeypatch):
  """With a scripted clock, the bandwidth is exactly 2 * nbytes (read + write) over the best
  repeat's time per iteration."""
  import types
  # perf_counter pairs (start, end) per repeat: 8 ms, 3 ms and 5 ms for 4 iterations each.
  ticks = iter([10.0, 10.008, 20.0, 20.003, 30.0, 30.005])
  monkeypatch.setattr(benchmarking, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
  nbytes = 1 << 20
  got = benchmarking.measure_copy_bandwidth(nbytes=nbytes, iterations=4, repeats=3)
  assert next(ticks, None) is None  # one start and one end per repeat, nothing else timed
  assert got == pytest.approx(2 * nbytes / (0.003 / 4) / 1e9, rel=1e-9)  # 2.796 GB/s


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


def _script(*args, **env_overrides):
  # This checkout's kvjax first, whatever the environment installed (an editable install of
  # another checkout would otherwise run instead).
  path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path, **env_overrides)
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


def test_script_benchmarks_each_mesh_with_per_device_bytes(tmp_path):
  shape = tmp_path / "tiny.json"
  shape.write_text(tiny_config().to_json())
  out = tmp_path / "meshes.json"
  # No forced device count from the test environment: --cpu_devices makes the 4.
  proc = _script(f"--shape={shape}", "--cpu_devices=4", "--meshes=data:1",
                 "--meshes=data:2,model:2", "--context_lengths=16", "--batch_sizes=4",
                 "--decode_steps=2", "--warmup=0", "--repeats=1", "--copy_bandwidth_mib=1",
                 f"--json_out={out}", XLA_FLAGS="")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "cache MiB/device" in proc.stdout
  runs = json.loads(out.read_text())["meshes"]
  assert [(r["mesh"], r["devices"]) for r in runs] == [("data:1", 1), ("data:2,model:2", 4)]
  one, four = (r["report"]["results"][0] for r in runs)
  assert one["cache_bytes_per_device"] == one["cache_bytes"]
  assert one["weight_bytes_per_device"] == one["weight_bytes"]
  # Rows over data and the tiny model's 2 KV heads over model: a quarter of the cache each
  # (and the [B] lengths, split over data only).
  assert four["cache_bytes"] == one["cache_bytes"]
  assert one["cache_bytes"] / 4 < four["cache_bytes_per_device"] < one["cache_bytes"] / 4 + 64
  assert four["weight_bytes_per_device"] < one["weight_bytes"]
  both = _script(f"--shape={shape}", "--mesh=data:2", "--meshes=data:1", XLA_FLAGS="")
  assert both.returncode == 2 and "give --mesh='data:2' or --meshes, not both" in both.stderr


def test_script_rejects_too_long_context(tmp_path):
  shape = tmp_path / "tiny.json"
  shape.write_text(tiny_config().to_json())
  proc = _script(f"--shape={shape}", "--context_lengths=100", "--decode_steps=32",
                 "--copy_bandwidth_mib=1")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "context_length=100 + decode_steps=32 = 132" in proc.stderr


def _methods_report(**kwargs):
  model = random_params(tiny_config(), seed=2)
  args = dict(decode_steps=2, repeats=1, warmup=1, copy_bandwidth_bytes=1 << 20,
              methods=[methods.SnapKV(window=8), "h2o"], compression_ratio=0.5) | kwargs
  return benchmarking.run(model, [64], [1], **args)


def test_run_compares_methods_with_the_full_baseline():
  report = _methods_report()
  rows = report["results"]
  assert [r["method"] for r in rows] == ["full", "snapkv", "h2o"]
  assert [m["label"] for m in report["methods"]] == ["full", "snapkv", "h2o"]
  assert report["method"]["name"] == "snapkv" and report["baseline_method"] == "full"
  full, snapkv, h2o = rows
  assert full["keep_tokens"] is None and full["compression_ratio"] is None
  assert (full["compression_overhead_fraction"], full["decode_speedup"]) == (0.0, 1.0)
  assert full["cache_capacity_tokens"] == 66 and full["room_tokens"] == 2
  # SnapKV keeps 32 slots plus room for the decode steps; H2O evicts while decoding.
  assert (snapkv["keep_tokens"], snapkv["room_tokens"], snapkv["cache_capacity_tokens"]) == (
      32, 2, 34)
  assert (h2o["keep_tokens"], h2o["room_tokens"], h2o["cache_capacity_tokens"]) == (32, 0, 32)
  assert snapkv["kept_tokens_per_layer"] == [32, 32]
  for r in (snapkv, h2o):
    assert r["compression_ratio"] == 0.5
    assert abs(r["context_cache_ratio"] - 0.5) < 0.03, r["context_cache_ratio"]
    assert np.isclose(r["context_cache_ratio_to_full"],
                      r["context_cache_bytes"] / full["context_cache_bytes"])
    assert r["cache_ratio"] < 0.6
    for key in ("compression_overhead_fraction", "compression_overhead_seconds",
                "decode_speedup", "decode_tokens_per_second", "prefill_seconds"):
      assert np.isfinite(r[key]), key
    assert np.isclose(r["decode_speedup"],
                      full["decode_step_seconds"] / r["decode_step_seconds"])
    assert np.isclose(r["compression_overhead_fraction"],
                      r["prefill_seconds"] / full["prefill_seconds"] - 1)
  assert json.loads(json.dumps(report))  # JSON-ready as is

  kernel = report["decode_attention_kernel"]
  assert kernel == {"measured": False, "reason": benchmarking.KERNEL_CPU_REASON,
                    "scope": "one layer's cache", "rows": []}
  goals = report["goals"]
  assert {g["name"] for g in goals} == {g.name for g in benchmarking.GOALS}
  (bandwidth,) = [g for g in goals if g["name"] == "decode_attention_hbm_fraction"]
  assert bandwidth["measured"] is None and bandwidth["met"] is None
  assert bandwidth["reason"] == "CPU: Pallas kernel runs only in interpret mode"
  for name, target in [("decode_step_speedup", 5.0), ("compression_overhead_fraction", 0.05)]:
    entries = [g for g in goals if g["name"] == name]
    assert [g["subject"] for g in entries] == ["snapkv", "h2o"]
    for g in entries:
      assert g["target"] == target and np.isfinite(g["measured"])
      assert g["at_goal_setting"] is False and g["met"] is None
      assert isinstance(g["passes_target"], bool)
      assert g["measured_at"]["context_length"] == 64
      assert "not the goal's setting" in g["reason"]
  table = benchmarking.format_table(report)
  assert "speedup" in table and "overhead" in table and "snapkv" in table
  assert "NOT the goal's setting" in table
  assert "not measured: CPU: Pallas kernel runs only in interpret mode" in table


def _llama_report(kernel_rows):
  """A synthetic report at the goal's shape: one row at 32K x 8, one larger elsewhere."""
  config = benchmarking.named_shape("llama-3.1-8b").to_dict()

  def row(method, context, batch, speedup, overhead):
    return {"method": method, "context_length": context, "batch_size": batch,
            "compression_ratio": None if method == "full" else 0.9, "budget": None,
            "decode_speedup": speedup, "compression_overhead_fraction": overhead}

  results = [row("full", 32768, 8, 1.0, 0.0), row("snapkv", 32768, 8, 6.0, 0.02),
             row("full", 65536, 8, 1.0, 0.0), row("snapkv", 65536, 8, 2.0, 0.5)]
  methods_info = [{"label": "full"}, {"label": "snapkv"}]
  return {"model": {"name": "llama-3.1-8b", "config": config}, "methods": methods_info,
          "results": results, "compression_ratio": 0.9, "budget": None,
          "decode_attention_kernel": {"measured": True, "reason": None, "rows": kernel_rows}}


def test_goals_use_the_rows_at_the_goal_setting():
  kernel_rows = [{"context_length": 32768, "batch_size": 8, "slots": s, "cache": c,
                  "copy_fraction": f}
                 for s, c, f in [(32768, "full", 0.85), (3277, "compressed", 0.6)]]
  goals = benchmarking.evaluate_goals(_llama_report(kernel_rows))
  by_name = {}
  for g in goals:
    by_name.setdefault(g["name"], []).append(g)
  (speedup,) = by_name["decode_step_speedup"]
  assert speedup["measured"] == 6.0 and speedup["at_goal_setting"] and speedup["met"] is True
  assert speedup["measured_at"]["context_length"] == 32768 and speedup["reason"] is None
  (overhead,) = by_name["compression_overhead_fraction"]
  assert overhead["measured"] == 0.02 and overhead["met"] is True
  full, compressed = by_name["decode_attention_hbm_fraction"]
  assert (full["met"], compressed["met"]) == (True, False)
  assert compressed["subject"] == "compressed cache (3277 slots)"


def test_goals_on_another_shape_are_not_met_or_missed():
  report = _llama_report([])
  report["model"]["config"] = dict(report["model"]["config"], num_layers=2)
  report["decode_attention_kernel"] = {"measured": False, "reason": "no GPU", "rows": []}
  goals = benchmarking.evaluate_goals(report)
  (speedup,) = [g for g in goals if g["name"] == "decode_step_speedup"]
  # Largest row instead, labelled as off the setting.
  assert speedup["measured"] == 2.0 and speedup["measured_at"]["context_length"] == 65536
  assert not speedup["at_goal_setting"] and speedup["met"] is None
  assert speedup["passes_target"] is False
  (bandwidth,) = [g for g in goals if g["name"] == "decode_attention_hbm_fraction"]
  assert bandwidth["reason"] == "no GPU" and bandwidth["met"] is None


def test_only_full_reports_goals_as_unmeasured():
  model = random_params(tiny_config())
  report = benchmarking.run(model, [8], [1], decode_steps=2, repeats=1, warmup=0,
                            copy_bandwidth_bytes=1 << 20)
  for g in report["goals"]:
    assert g["measured"] is None and g["met"] is None and g["reason"]


def test_kernel_microbenchmark_runs_interpreted():
  row = benchmarking.measure_decode_attention_kernel(tiny_config(), batch_size=2, slots=40,
                                                     iterations=1, repeats=1)
  # keys + values [2, 2, 40, 16] float32 and int32 positions [2, 2, 40].
  assert row["bytes_read"] == 2 * (2 * 2 * 40 * 16 * 4) + 2 * 2 * 40 * 4
  assert row["seconds"] > 0 and row["bandwidth_gbps"] > 0
  assert (row["kv_heads"], row["query_heads_per_kv_head"], row["head_dim"]) == (2, 2, 16)
  assert row["relative_error"] < 1e-5  # against reference.decode_attention (float32)


def test_quantized_kernel_microbenchmark_refuses_less_than_a_group():
  with pytest.raises(benchmarking.BenchmarkError, match="slots=20 holds no whole quantization"
                                                        " group of 32"):
    benchmarking.measure_decode_attention_kernel(tiny_config(), batch_size=1, slots=20,
                                                 iterations=1, repeats=1, bits=4)


def test_quantized_kernel_microbenchmark_counts_packed_bytes():
  row = benchmarking.measure_decode_attention_kernel(tiny_config(), batch_size=2, slots=40,
                                                     iterations=1, repeats=1, bits=4, group=16)
  # 32 whole-group slots of [2, 2] heads: 4-bit codes (16 channels in 2 words per token),
  # float32 scale + zero per 16 keys and channel and per token and 16 channels, positions.
  slots = 2 * 2 * 32
  assert row["slots"] == 32 and row["bits"] == 4
  assert row["relative_error"] < 1e-5  # against the dequantize-then-attend reference
  assert row["bytes_read"] == (2 * slots * 2 * 4 + 2 * (slots // 16 * 16 + slots) * 4
                               + slots * 4)
  assert row["seconds"] > 0 and row["bandwidth_gbps"] > 0


def test_kernel_section_off_cpu_times_full_and_compressed_sizes(monkeypatch):
  calls = []

  def fake(config, batch_size, slots, **kwargs):
    calls.append((batch_size, slots))
    return {"batch_size": batch_size, "slots": slots, "bytes_read": 1000, "seconds": 1e-6,
            "bandwidth_gbps": 1.0}

  monkeypatch.setattr(benchmarking, "kernel_unmeasured_reason", lambda: None)
  monkeypatch.setattr(benchmarking, "measure_decode_attention_kernel", fake)
  report = _methods_report(methods=[methods.SnapKV(window=8)], warmup=0)
  assert calls == [(1, 32), (1, 64)]
  kernel = report["decode_attention_kernel"]
  assert kernel["measured"] and [r["cache"] for r in kernel["rows"]] == ["compressed", "full"]
  assert np.isclose(kernel["rows"][0]["copy_fraction"], 1.0 / report["copy_bandwidth_gbps"])
  entries = [g for g in report["goals"] if g["name"] == "decode_attention_hbm_fraction"]
  assert len(entries) == 2 and all(g["met"] is None and g["measured"] > 0 for g in entries)
  assert "decode-attention kernel alone" in benchmarking.format_table(report)


def test_chunked_prefill_with_a_method():
  model = random_params(tiny_config())
  row = benchmarking.measure(model, 20, 1, 2, repeats=1, warmup=0,
                             method=methods.SnapKV(window=4), compression_ratio=0.5,
                             prefill_chunk_size=8)
  assert row["keep_tokens"] == 10 and row["prefill_chunk_size"] == 8
  assert row["cache_capacity_tokens"] == 12


def test_bad_methods_name_the_value():
  with pytest.raises(benchmarking.BenchmarkError, match="'bogus' is not a method; available"):
    benchmarking.build_methods(["full", "bogus"], what="--methods")
  with pytest.raises(benchmarking.BenchmarkError, match=r"lists \['snapkv'\] more than once"):
    benchmarking.build_methods("snapkv,full,snapkv")
  with pytest.raises(benchmarking.BenchmarkError, match="names no compression method"):
    benchmarking.build_methods(["full"], {"window": 4})
  with pytest.raises(benchmarking.BenchmarkError, match="'window' must look like name=value"):
    benchmarking.parse_method_args(["window"])
  assert benchmarking.parse_method_args(["window=4", "pooling=avg"]) == {
      "window": 4, "pooling": "avg"}
  built = benchmarking.build_methods(["h2o", "knorm"])
  assert [m.label for m in built] == ["full", "h2o", "knorm"]
  with pytest.raises(ValueError, match="has no hyperparameters"):
    benchmarking.build_methods(["h2o", "knorm"], {"recent_ratio": 0.25})
  config = tiny_config()
  # Head-wise budgets with chunked prefill are supported (no longer an error).
  checked = benchmarking.check_plan(config, [64], [1], 2, methods=["adakv"],
                                    compression_ratio=0.1, prefill_chunk_size=8)
  assert [m.label for m in checked] == ["full", "adakv(snapkv)"]


def test_script_compares_methods(tmp_path):
  shape = tmp_path / "tiny.json"
  shape.write_text(tiny_config().to_json())
  out = tmp_path / "bench.json"
  kivi = "kivi:bits=4:group_size=16:residual=16"
  proc = _script(f"--shape={shape}", f"--methods=snapkv,h2o,{kivi}", "--compression_ratio=0.5",
                 "--context_lengths=96", "--decode_steps=2", "--warmup=0", "--repeats=1",
                 "--copy_bandwidth_mib=1", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "goals at the llama-3.1-8b shape" in proc.stdout and "speedup" in proc.stdout
  report = json.loads(out.read_text())
  assert [r["method"] for r in report["results"]] == ["full", "snapkv", "h2o", kivi]
  assert report["config"]["methods"] == ["snapkv", "h2o", kivi]
  assert [r["keep_tokens"] for r in report["results"]] == [None, 48, 48, None]
  # The quantized cache is measured against the full one in the same run: its bytes (4-bit
  # codes, f32 scale and zero per 16 values, a 16-token window) and its decode step time.
  quantized = report["results"][3]
  assert 0.2 < quantized["context_cache_ratio_to_full"] < 0.6
  assert quantized["decode_step_seconds"] > 0 and quantized["decode_speedup"] > 0
  (bandwidth,) = [g for g in report["goals"] if g["name"] == "decode_attention_hbm_fraction"]
  assert bandwidth["met"] is None and "interpret mode" in bandwidth["reason"]


def test_script_rejects_bad_method_names(tmp_path):
  shape = tmp_path / "tiny.json"
  shape.write_text(tiny_config().to_json())
  proc = _script(f"--shape={shape}", "--methods=full,snapkv,snapvk", "--compression_ratio=0.5")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: --methods entry 'snapvk' is not a method; available: [" in proc.stderr


def test_host_cpu_reads_the_model_and_vector_extensions(tmp_path):
  x86 = tmp_path / "x86"
  x86.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse2 avx2 fma "
                 "avx512f amx_tile amx_bf16\n\nprocessor\t: 1\nmodel name\t: Other\n"
                 "flags\t\t: fpu\n")
  host = benchmarking.host_cpu(str(x86))
  assert host["model"] == "Some Xeon"
  assert host["vector_extensions"] == ["avx2", "fma", "avx512f", "amx_tile", "amx_bf16"]
  arm = tmp_path / "arm"
  arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\n")
  assert benchmarking.host_cpu(str(arm)) == {"model": None, "cores": os.cpu_count(),
                                               "vector_extensions": ["asimd", "sve"]}
  assert benchmarking.host_cpu(str(tmp_path / "missing"))["model"] is None
  assert "host_cpu" in benchmarking.device_info()
