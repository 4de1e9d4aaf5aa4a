"""Speed and memory benchmarks: prefill and decode timings, cache and weight bytes, bandwidth.

Used by scripts/benchmark.py and callable the same way from a notebook:

    from kvjax import benchmarking
    from kvjax.model import random_params
    model = random_params(benchmarking.named_shape("llama-3.1-8b"))
    row = benchmarking.measure(model, context_length=2048, batch_size=1)
    copy_gbps = benchmarking.measure_copy_bandwidth()

Decode is memory bound: a step reads every weight that takes part plus the whole cache, so
bytes per step / step time, compared with what a plain array copy achieves on the same device,
says how close the decode step is to the hardware limit.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import pathlib
import statistics
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import methods as methods_lib
from kvjax.cache import cache_nbytes, init_cache
from kvjax.config import ModelConfig, RopeScaling
from kvjax.errors import KvjaxError
from kvjax.generation import engine


class BenchmarkError(KvjaxError):
  """Invalid benchmark arguments (sizes, lengths, shape names)."""


# Random-weight configurations at real models' shapes (published Hugging Face configs).
SHAPES = {
    "llama-3.1-8b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        rms_norm_eps=1e-5, tie_embeddings=False, name="llama-3.1-8b"),
    "qwen2.5-7b": ModelConfig(
        architecture="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_embeddings=False, qkv_bias=True, name="qwen2.5-7b"),
    "smollm2-135m": ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True, name="smollm2-135m"),
}
DEFAULT_SHAPE_DTYPE = "bfloat16"


def available_shapes() -> list[str]:
  return sorted(SHAPES)


def named_shape(name: str, dtype: str | None = None) -> ModelConfig:
  """The config of a named shape, or of a JSON ModelConfig file (kvjax's to_json format).

  dtype: parameter and cache dtype; default bfloat16 for named shapes, the file's own dtype
  for a JSON file.
  """
  if not isinstance(name, (str, os.PathLike)):
    raise BenchmarkError(f"shape={name!r} must be a name {available_shapes()} or a path to "
                         f"a JSON ModelConfig file")
  text = os.fspath(name)
  if text.lower() in SHAPES:
    config = SHAPES[text.lower()].replace(dtype=dtype or DEFAULT_SHAPE_DTYPE)
  else:
    path = pathlib.Path(text).expanduser()
    if not path.is_file():
      raise BenchmarkError(f"unknown shape {text!r}; allowed: {available_shapes()} or a path "
                           f"to a JSON ModelConfig file")
    config = ModelConfig.from_json(path.read_text())
    if dtype is not None:
      config = config.replace(dtype=dtype)
    if not config.name:
      config = config.replace(name=path.stem)
  return config


def abstract_param_count(config: ModelConfig) -> int:
  """Parameter count from shapes alone (nothing is allocated)."""
  from kvjax.model import abstract_params
  _, state = abstract_params(config)
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state))


def weight_nbytes(model) -> int:
  return cache_nbytes(model.params)  # sums the leaves' sizes: works for any pytree


def weight_nbytes_read_per_decode_step(model) -> int:
  """Weights a decode step streams from memory.

  An untied input embedding is only gathered (batch rows), not read whole; a tied one is read
  whole by the output projection.
  """
  total = weight_nbytes(model)
  if model.config.tie_embeddings:
    return total
  embedding = nnx.to_pure_dict(model.params)["embed"]["embedding"]
  return total - embedding.size * np.dtype(embedding.dtype).itemsize


def _check_count(value, name: str, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise BenchmarkError(f"{name}={value!r} must be an integer >= {minimum}")
  return int(value)


def parse_sizes(values: Sequence, name: str) -> list[int]:
  """['512', '2048'] -> [512, 2048]; every entry must be a positive integer."""
  if not values:
    raise BenchmarkError(f"{name} is empty; give at least one positive integer")
  sizes = []
  for value in values:
    try:
      number = int(str(value).strip())
    except ValueError:
      number = None
    if number is None or number < 1:
      raise BenchmarkError(f"{name} entry {value!r} must be a positive integer")
    sizes.append(number)
  return sizes


def check_lengths(config: ModelConfig, context_length, batch_size, decode_steps) -> None:
  _check_count(context_length, "context_length")
  _check_count(batch_size, "batch_size")
  _check_count(decode_steps, "decode_steps")
  total = context_length + decode_steps
  limit = config.max_position_embeddings
  if total > limit:
    raise BenchmarkError(
        f"context_length={context_length} + decode_steps={decode_steps} = {total} positions "
        f"exceeds the model's max_position_embeddings={limit}; allowed: context_length + "
        f"decode_steps <= {limit}")


def _block(tree):
  return jax.block_until_ready(tree)


def _time_prefill_and_decode(model, tokens, mask, first_tokens, capacity, decode_steps):
  """One run: (prefill seconds, decode seconds, cache bytes), compile time excluded."""
  steps = engine.STEPS
  cache = _block(init_cache(model.config, tokens.shape[0], capacity))
  compile_before = steps.compile_seconds
  start = time.perf_counter()
  _, cache = _block(steps.prefill(model, tokens, mask, cache, logits="last"))
  prefill = time.perf_counter() - start - (steps.compile_seconds - compile_before)
  nbytes = cache_nbytes(cache)

  key = jax.random.key(0)  # greedy decoding ignores it
  next_tokens = first_tokens
  compile_before = steps.compile_seconds
  start = time.perf_counter()
  # Steps chain on device; one sync at the end, as a serving loop without host logic would.
  for _ in range(decode_steps):
    next_tokens, _, cache = steps.decode(model, next_tokens, cache, key, 1.0, 1.0, True)
  _block((next_tokens, cache))
  decode = time.perf_counter() - start - (steps.compile_seconds - compile_before)
  return prefill, decode, nbytes


def measure(model, context_length: int, batch_size: int, decode_steps: int = 32,
            repeats: int = 3, warmup: int = 2, seed: int = 0) -> dict:
  """Times prefill of random prompts and greedy decode steps; reports bytes and bandwidth.

  The cache holds context_length + decode_steps slots. Times are the median (and min) over
  `repeats` runs after `warmup` untimed runs; compilation is never timed.
  """
  config = model.config
  check_lengths(config, context_length, batch_size, decode_steps)
  repeats = _check_count(repeats, "repeats")
  warmup = _check_count(warmup, "warmup", minimum=0)
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch_size, context_length)),
                       jnp.int32)
  first_tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch_size,)), jnp.int32)
  mask = jnp.ones((batch_size, context_length), bool)
  capacity = context_length + decode_steps
  compile_before = engine.STEPS.compile_seconds

  prefill_times, decode_times = [], []
  for run in range(warmup + repeats):
    prefill, decode, cache_bytes = _time_prefill_and_decode(model, tokens, mask, first_tokens,
                                                            capacity, decode_steps)
    if run >= warmup:
      prefill_times.append(prefill)
      decode_times.append(decode / decode_steps)

  weights = weight_nbytes(model)
  weights_read = weight_nbytes_read_per_decode_step(model)
  # Attention reads every slot of the cache (keys, values, positions) each step.
  step_bytes = weights_read + cache_bytes
  prefill_s, step_s = statistics.median(prefill_times), statistics.median(decode_times)
  return {
      "context_length": context_length,
      "batch_size": batch_size,
      "decode_steps": decode_steps,
      "cache_capacity_tokens": capacity,
      "repeats": repeats,
      "warmup": warmup,
      "prefill_seconds": prefill_s,
      "prefill_seconds_min": min(prefill_times),
      "prefill_tokens_per_second": batch_size * context_length / prefill_s,
      "decode_step_seconds": step_s,
      "decode_step_seconds_min": min(decode_times),
      "decode_tokens_per_second": batch_size / step_s,
      "cache_bytes": cache_bytes,
      "weight_bytes": weights,
      "weight_bytes_read_per_step": weights_read,
      "decode_bytes_per_step": step_bytes,
      "decode_bandwidth_gbps": step_bytes / step_s / 1e9,
      "decode_bandwidth_gbps_best": step_bytes / min(decode_times) / 1e9,
      "compile_seconds": engine.STEPS.compile_seconds - compile_before,
      "device_peak_bytes_in_use": _peak_bytes_in_use(),
  }


def _peak_bytes_in_use() -> int | None:
  """The device allocator's running peak (None where the backend keeps no statistics)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - some backends raise instead of returning None
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def measure_copy_bandwidth(nbytes: int = 256 << 20, iterations: int = 10,
                           repeats: int = 3) -> float:
  """Achievable memory bandwidth in GB/s: the best time of `x + 1` over an nbytes float32 array.

  Each pass reads and writes nbytes, so it moves 2 * nbytes.
  """
  nbytes = _check_count(nbytes, "nbytes", minimum=4)
  iterations = _check_count(iterations, "iterations")
  repeats = _check_count(repeats, "repeats")
  # Donated, so the add runs in place: a fresh output buffer per call would time the
  # allocator (page faults on CPU, about 10x slower there) instead of memory.
  add_one = jax.jit(lambda x: x + 1, donate_argnums=0)
  x = _block(jnp.zeros((nbytes // 4,), jnp.float32))
  moved = 2 * x.nbytes
  x = _block(add_one(x))  # compile and touch the memory once
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iterations):
      x = add_one(x)
    _block(x)
    best = min(best, (time.perf_counter() - start) / iterations)
  return moved / best / 1e9


def device_info() -> dict:
  device = jax.devices()[0]
  return {"platform": device.platform, "device_kind": device.device_kind,
          "device_count": jax.device_count()}


def check_plan(config: ModelConfig, context_lengths: Sequence[int],
               batch_sizes: Sequence[int], decode_steps: int,
               hbm_bandwidth_gbps: float | None = None, method=None, compression_ratio=None,
               budget=None):
  """Validates a whole run() before anything is allocated or timed; returns the method."""
  if not context_lengths or not batch_sizes:
    raise BenchmarkError(f"context_lengths={list(context_lengths)} and batch_sizes="
                         f"{list(batch_sizes)} must each name at least one size")
  if hbm_bandwidth_gbps is not None and (isinstance(hbm_bandwidth_gbps, bool) or not (
      isinstance(hbm_bandwidth_gbps, numbers.Real) and hbm_bandwidth_gbps > 0)):
    raise BenchmarkError(f"hbm_bandwidth_gbps={hbm_bandwidth_gbps!r} must be a positive "
                         f"number (GB/s)")
  for c in context_lengths:
    for b in batch_sizes:
      check_lengths(config, c, b, decode_steps)
  method_obj = methods_lib.get(method)
  for c in context_lengths:
    methods_lib.validate_compression(method_obj, c, compression_ratio, budget)
  return method_obj


def run(model, context_lengths: Sequence[int], batch_sizes: Sequence[int],
        decode_steps: int = 32, repeats: int = 3, warmup: int = 2,
        hbm_bandwidth_gbps: float | None = None, copy_bandwidth_bytes: int = 256 << 20,
        method=None, compression_ratio=None, budget=None, seed: int = 0,
        source: str | None = None, log=None) -> dict:
  """Benchmarks every (context length, batch size) pair; returns the JSON-ready report.

  hbm_bandwidth_gbps: the device's peak (or separately measured) bandwidth. Each row's
  hbm_fraction is against it when given, else against the measured copy bandwidth;
  copy_fraction is always against the measured copy bandwidth.
  log: optional callable(str) for progress lines.
  """
  method_obj = check_plan(model.config, context_lengths, batch_sizes, decode_steps,
                          hbm_bandwidth_gbps, method, compression_ratio, budget)
  # Compression methods plug in here once they land; today every row uses the full cache.

  copy_gbps = measure_copy_bandwidth(copy_bandwidth_bytes)
  reference = hbm_bandwidth_gbps or copy_gbps
  results = []
  for c in context_lengths:
    for b in batch_sizes:
      if log:
        log(f"measuring context_length={c} batch_size={b}")
      row = measure(model, c, b, decode_steps, repeats, warmup, seed)
      row["copy_fraction"] = row["decode_bandwidth_gbps"] / copy_gbps
      row["hbm_fraction"] = row["decode_bandwidth_gbps"] / reference
      results.append(row)
  return {
      "device": device_info(),
      "jax_version": jax.__version__,
      "model": {"name": model.config.name, "source": source, "num_params": model.num_params(),
                "config": model.config.to_dict()},
      "method": {"name": method_obj.name, "hyperparameters": dataclasses.asdict(method_obj),
                 "compression_ratio": compression_ratio, "budget": budget},
      "copy_bandwidth_gbps": copy_gbps,
      "hbm_bandwidth_gbps": hbm_bandwidth_gbps,
      "hbm_fraction_reference": "hbm_bandwidth_gbps" if hbm_bandwidth_gbps else
                                "copy_bandwidth_gbps",
      "results": results,
  }


def format_table(report: dict) -> str:
  """A fixed-width table of a run() report."""
  mib = 1 << 20
  device = report["device"]
  lines = [
      f"device {device['device_kind']} ({device['platform']}), jax {report['jax_version']}, "
      f"model {report['model']['name']} ({report['model']['num_params'] / 1e6:.1f}M params, "
      f"{report['model']['config']['dtype']}), method {report['method']['name']}",
      f"copy bandwidth {report['copy_bandwidth_gbps']:.1f} GB/s"
      + (f", given HBM bandwidth {report['hbm_bandwidth_gbps']:.1f} GB/s"
         if report["hbm_bandwidth_gbps"] else ""),
  ]
  header = (f"{'context':>8} {'batch':>5} {'prefill s':>10} {'prefill tok/s':>13} "
            f"{'decode ms/step':>14} {'decode tok/s':>12} {'cache MiB':>10} "
            f"{'weights MiB':>11} {'GB/s':>8} {'frac':>6}")
  lines += [header, "-" * len(header)]
  for r in report["results"]:
    lines.append(
        f"{r['context_length']:>8} {r['batch_size']:>5} {r['prefill_seconds']:>10.4f} "
        f"{r['prefill_tokens_per_second']:>13.0f} {r['decode_step_seconds'] * 1e3:>14.2f} "
        f"{r['decode_tokens_per_second']:>12.1f} {r['cache_bytes'] / mib:>10.2f} "
        f"{r['weight_bytes'] / mib:>11.1f} {r['decode_bandwidth_gbps']:>8.1f} "
        f"{r['hbm_fraction']:>6.3f}")
  return "\n".join(lines)
