"""The GPU roofline check (kvjax.roofline, scripts/roofline.py, scripts/gpu_check.sh) on CPU at
tiny shapes: the report's structure and goals judged from its own numbers (no speed asserted)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from kvjax import roofline
from kvjax.benchmarking import BenchmarkError
from kvjax.config import ModelConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ModelConfig(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                   num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32,
                   max_position_embeddings=256, name="tiny")
# Every section at its smallest; window=4 so SnapKV can keep 10% of 64 tokens.
TINY_PLAN = roofline.Plan(kernel_contexts=(64,), kernel_batches=(2,), model_context=64,
                          methods=("snapkv:window=4",), decode_steps=2, repeats=1, warmup=0,
                          flash_length=32, flash_blocks=((16, 16),), sparse_lines=8,
                          decode_tilings=((16, 32),), iterations=1,
                          copy_bandwidth_bytes=1 << 20)


def _check_goal(goal, measured):
  assert goal["measured"] == measured
  want = measured >= goal["target"] if goal["comparison"] == ">=" else measured <= goal["target"]
  assert goal["passed"] is want


def test_relative_error_measures_distance_from_the_reference():
  from kvjax.benchmarking import relative_error
  ref = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
  assert relative_error(ref, ref) == 0.0
  assert relative_error(ref * 1.5, ref) == pytest.approx(0.5)
  assert relative_error(ref.astype(np.float16) + np.float16(1), ref) == pytest.approx(0.4)
  assert np.isnan(relative_error(np.full_like(ref, np.nan), ref))


def test_report_structure_and_goals_from_measurements():
  saved = []
  report = roofline.run(TINY, TINY_PLAN, save=lambda r: saved.append(json.dumps(r)))
  assert len(saved) == 5  # written after copy, decode, flash, sparse and model
  assert report["accelerator_missing"] and "no GPU present" in report["accelerator_missing"]
  assert report["copy"]["gbps"] > 0
  for name in roofline.SECTIONS:
    assert "error" not in report[name], report[name].get("traceback")

  decode = report["decode"]["rows"]
  assert [(r["context_length"], r["batch_size"]) for r in decode] == [(64, 2)]
  for r in decode:
    assert r["copy_fraction"] == pytest.approx(r["bandwidth_gbps"] / report["copy"]["gbps"])
    assert r["relative_error"] < 1e-5  # float32, interpret mode: the kernel is the reference
    assert (r["block_k"], r["key_chunk"]) == (None, None)  # the default tiling is judged
  tuning = report["decode"]["tuning"]
  assert [(r["context_length"], r["batch_size"], r["block_k"], r["key_chunk"])
          for r in tuning] == [(64, 2, 16, 32)]
  assert tuning[0]["relative_error"] < 1e-5 and tuning[0]["copy_fraction"] > 0
  quantized = report["decode"]["quantized"]
  assert [(r["context_length"], r["batch_size"], r["bits"]) for r in quantized] == [(64, 2, 4)]
  # Against the dequantize-then-attend reference, and fewer bytes than the dense cache.
  assert quantized[0]["relative_error"] < 1e-5
  assert quantized[0]["bytes_read"] < decode[0]["bytes_read"]

  flash = report["flash"]
  assert [(r["block_q"], r["block_k"]) for r in flash["rows"]] == [(16, 16)]
  for r in flash["rows"]:
    assert r["causal_flops"] == 4 * 1 * 4 * 32 * 32 * 32 / 2
    assert r["tflops"] == pytest.approx(r["causal_flops"] / r["seconds"] / 1e12)
    assert r["relative_error"] < 1e-5
  assert flash["best"]["tflops"] == max(r["tflops"] for r in flash["rows"])
  assert flash["xla_reference"]["seconds"] > 0 and flash["speedup_vs_xla_reference"] > 0

  sparse = report["sparse"]
  assert sparse["lines"] == 8 and sparse["keys_per_query"] == 16 and sparse["seconds"] > 0
  assert sparse["flash_seconds"] == flash["best"]["seconds"]   # the same shape's best
  assert sparse["speedup_vs_flash"] == pytest.approx(sparse["flash_seconds"]
                                                     / sparse["seconds"])

  model = report["model"]["rows"]
  assert [r["method"] for r in model] == ["full", "snapkv"]
  full, snap = model
  assert snap["compression_ratio"] == 0.9 and snap["keep_tokens"] == 6
  assert snap["compression_overhead_fraction"] == pytest.approx(
      snap["prefill_seconds"] / full["prefill_seconds"] - 1)
  assert snap["decode_speedup"] == pytest.approx(
      full["decode_step_seconds"] / snap["decode_step_seconds"])

  goals = report["goals"]
  fraction = [g for g in goals if g["name"] == "decode_attention_copy_fraction"]
  overhead = [g for g in goals if g["name"] == "compression_overhead_fraction"]
  assert len(fraction) == 1 and len(overhead) == 1 and len(goals) == 2
  for g, r in zip(fraction, decode):
    assert g["target"] == 0.85
    _check_goal(g, r["copy_fraction"])
  assert overhead[0]["subject"] == "snapkv" and overhead[0]["target"] == 0.05
  _check_goal(overhead[0], snap["compression_overhead_fraction"])
  text = roofline.format_report(report)
  assert "no GPU present" in text and text.count("PASS") + text.count("FAIL") == 2


def test_a_kernel_off_its_reference_is_not_judged_and_error_rows_are_reported():
  report = {"device": {"device_kind": "H200", "platform": "gpu"}, "jax_version": "0",
            "model_shape": {"name": "tiny"}, "accelerator_missing": None,
            "copy": {"gbps": 4000.0},
            "decode": {"rows": [
                {"context_length": 8192, "batch_size": 1, "copy_fraction": 0.9,
                 "bandwidth_gbps": 3600.0, "seconds": 1e-5, "relative_error": 0.3},
                {"context_length": 8192, "batch_size": 8, "copy_fraction": 0.9,
                 "bandwidth_gbps": 3600.0, "seconds": 1e-4, "relative_error": float("nan")},
                {"context_length": 32768, "batch_size": 8, "copy_fraction": 0.9,
                 "bandwidth_gbps": 3600.0, "seconds": 1e-4, "relative_error": 2e-3}],
                "tuning": [{"context_length": 8192, "batch_size": 1, "block_k": 64,
                            "key_chunk": 256, "error": "ValueError: boom"}],
                "quantized": [{"context_length": 8192, "batch_size": 1, "bits": 4,
                               "error": "OOM"}]}}
  goals = roofline.evaluate_goals(report)
  assert [g["passed"] for g in goals[:3]] == [None, None, True]
  assert "relative error 0.3 > 0.05" in goals[0]["reason"] and "nan" in goals[1]["reason"]
  report["goals"] = goals
  text = roofline.format_report(report)
  assert "tiling 64x256" in text and "FAILED: ValueError: boom" in text
  assert "quantized 4-bit kernel context   8192 batch  1: FAILED: OOM" in text


def test_goals_follow_the_numbers_and_failed_sections():
  """Goals are recomputed from whatever the sections hold; a failed section gives n/a."""
  report = {"decode": {"rows": [{"context_length": 8192, "batch_size": 8,
                                 "copy_fraction": 0.9},
                                {"context_length": 32768, "batch_size": 1,
                                 "copy_fraction": 0.7}]},
            "model": {"error": "OOM"}}
  goals = roofline.evaluate_goals(report)
  assert [g["passed"] for g in goals] == [True, False, None]
  assert goals[1]["subject"] == "context 32768, batch 1"
  assert "OOM" in goals[2]["reason"]
  report = {"model": {"rows": [{"method": "full", "compression_overhead_fraction": 0.0},
                               {"method": "snapkv", "compression_overhead_fraction": 0.04},
                               {"method": "kivi:bits=4", "compression_overhead_fraction": 0.2}]}}
  goals = roofline.evaluate_goals(report)
  assert goals[0]["passed"] is None and goals[0]["reason"] == "section not run"
  assert [(g["subject"], g["passed"]) for g in goals[1:]] == [("snapkv", True),
                                                             ("kivi:bits=4", False)]


@pytest.mark.parametrize("change,match", [
    (dict(sections=("decode", "speed")), "allowed are"),
    (dict(flash_blocks=((24, 16),)), "block_q=24 must be a power of two"),
    (dict(decode_tilings=((16, 40),)), r"decode tiling \(16, 40\): .* multiple"),
    (dict(decode_tilings=((24, 48),)), r"decode tiling \(24, 48\): block_k must be"),
    (dict(decode_tilings=((64, None),)), r"decode tiling \(64, None\)"),
    (dict(kernel_bits=(3,)), r"kernel_bits=\[3\]: each must be one of \(2, 4, 8\)"),
    (dict(kernel_batches=(0,)), "kernel_batches entry 0"),
    (dict(sparse_lines=0), "sparse_lines entry 0"),
    (dict(model_context=1000), "exceeds the model's max_position_embeddings"),
])
def test_bad_plans_fail_before_measuring(change, match):
  import dataclasses
  with pytest.raises(BenchmarkError, match=match):
    roofline.run(TINY, dataclasses.replace(TINY_PLAN, **change))


def _script(tmp_path, *flags):
  shape = tmp_path / "tiny.json"
  shape.write_text(TINY.replace(num_layers=3).to_json())
  env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"),
                         str(tmp_path / "out.json"), f"--shape={shape}", *flags],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_script_refuses_without_a_gpu_and_runs_with_allow_cpu(tmp_path):
  refused = _script(tmp_path)
  assert refused.returncode == 3
  assert "no GPU present" in refused.stdout
  assert not (tmp_path / "out.json").exists()
  done = _script(tmp_path, "--allow_cpu", "--sections=decode", "--kernel_contexts=32",
                 "--kernel_batches=1", "--iterations=1", "--copy_bandwidth_mib=1",
                 "--num_layers=1", "--decode_tilings=16x32")
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads((tmp_path / "out.json").read_text())
  assert report["model_shape"]["name"] == "tiny"
  assert report["model_shape"]["config"]["num_layers"] == 1
  assert "decode" in report and "flash" not in report and "model" not in report
  assert [g["subject"] for g in report["goals"]] == ["context 32, batch 1",
                                                     "compression methods"]
  assert report["config"]["kernel_contexts"] == ["32"]
  assert [(r["block_k"], r["key_chunk"]) for r in report["decode"]["tuning"]] == [(16, 32)]
  assert "tiling 16x32" in done.stdout
  assert "decode_attention_copy_fraction >= 0.85" in done.stdout
