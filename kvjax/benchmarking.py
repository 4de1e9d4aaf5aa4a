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

import collections
import dataclasses
import math
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

from kvjax import calibration
from kvjax import methods as methods_lib
from kvjax.cache import cache_nbytes, full_cache_nbytes, slots_per_head
from kvjax.config import ModelConfig, RopeScaling
from kvjax.errors import KvjaxError
from kvjax.generation import context, engine
from pallas_kernels import decode_attention as decode_kernels
from pallas_kernels import quantization as quant_kernels
from pallas_kernels import reference as kernel_reference


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
    config = ModelConfig.from_json(path.read_text(), source=path)
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


def parse_method_args(items: Sequence[str] | None) -> dict:
  """['window=32', 'press=knorm'] -> {'window': 32, 'press': 'knorm'} (--method_arg values)."""
  from kvjax.cli import parse_value  # the same value parsing as the other scripts
  hyperparameters = {}
  for item in items or []:
    name, sep, value = str(item).partition("=")
    if not sep or not name.strip():
      raise BenchmarkError(f"--method_arg={item!r} must look like name=value")
    hyperparameters[name.strip()] = parse_value(value)
  return hyperparameters


def build_methods(methods, hyperparameters: dict | None = None,
                  what: str = "methods") -> list[methods_lib.Method]:
  """Method objects for a benchmark, the full-cache baseline first (added when missing).

  methods: names (a list, or one comma-separated string) and/or method objects.
  hyperparameters: applied to every named method other than "full".
  what: how error messages name the argument (e.g. "--methods").
  """
  if methods is None or isinstance(methods, (str, methods_lib.Method)):
    methods = ["full" if methods is None else methods]
  entries = []
  for entry in methods:
    if isinstance(entry, str):
      entries += [part.strip() for part in entry.split(",")] if "," in entry else [entry.strip()]
    else:
      entries.append(entry)
  if not entries:
    raise BenchmarkError(f"{what} is empty; give at least one of {methods_lib.available()}")
  built = []
  for entry in entries:
    if isinstance(entry, methods_lib.Method):
      built.append(entry)
      continue
    name = entry.split(":")[0] if isinstance(entry, str) else None
    if name is None or name.lower() not in methods_lib.available():
      raise BenchmarkError(f"{what} entry {entry!r} is not a method; available: "
                           f"{methods_lib.available()} (hyperparameters as "
                           f"'name:key=value', e.g. 'kivi:bits=4')")
    if entry.lower() == "full":
      built.append(methods_lib.get("full"))
    else:
      built.append(methods_lib.get(entry, **(hyperparameters or {})))
  if hyperparameters and all(not m.compresses for m in built):
    raise BenchmarkError(f"method hyperparameters {sorted(hyperparameters)} were given but "
                         f"{what} names no compression method: {entries}")
  labels = [m.label for m in built]
  repeated = sorted({label for label in labels if labels.count(label) > 1})
  if repeated:
    raise BenchmarkError(f"{what} lists {repeated} more than once: {labels}")
  baseline = [m for m in built if not m.compresses] or [methods_lib.get("full")]
  return baseline[:1] + [m for m in built if m.compresses]


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


def relative_error(out, ref) -> float:
  """||out - ref|| / ||ref|| in float32: a timed kernel's output against its jnp reference,
  recorded next to its speed so that a kernel computing something else on that device is
  seen (bf16 operands land near 1e-3 to 1e-2; NaN stays NaN)."""
  out, ref = (jnp.asarray(x, jnp.float32) for x in (out, ref))
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def _prompt(config: ModelConfig, context_length: int, batch_size: int, chunk: int | None,
            seed: int):
  """Random left-padded prompts [B, W] (W a multiple of the chunk), mask, first decode tokens."""
  rng = np.random.default_rng(seed)
  width = context_length if chunk is None else -(-context_length // chunk) * chunk
  tokens = np.zeros((batch_size, width), np.int32)
  tokens[:, width - context_length:] = rng.integers(0, config.vocab_size,
                                                    (batch_size, context_length))
  mask = np.zeros((batch_size, width), bool)
  mask[:, width - context_length:] = True
  first_tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch_size,)), jnp.int32)
  return tokens, mask, first_tokens


def emulate_cpu_devices(count) -> None:
  """Splits the CPU into `count` devices (for meshes on a CPU machine); before anything
  touches a device."""
  count = _check_count(count, "cpu_devices")
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError as error:
    raise BenchmarkError(f"cpu_devices={count} must be set before JAX starts its backends: "
                         f"{error}") from None
  if jax.default_backend() != "cpu" or jax.device_count() != count:
    raise BenchmarkError(f"cpu_devices={count} splits a CPU backend, but JAX has "
                         f"{jax.device_count()} {jax.default_backend()} devices (XLA_FLAGS="
                         f"{os.environ.get('XLA_FLAGS', '')!r} may force another count)")


def bytes_per_device(tree) -> int:
  """The most bytes of `tree`'s arrays that any one device holds (all of them on one
  device; on a mesh, each leaf's shard, or its whole value where it is replicated)."""
  held = collections.Counter()
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array):
      shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
      for device in leaf.sharding.device_set:
        held[device] += shard
  return max(held.values(), default=0)


def _time_prefill_and_decode(model, tokens, mask, first_tokens, method, keep, room, chunk,
                             decode_steps):
  """One run: (prefill seconds, decode seconds, cache facts), compile time excluded.

  `context.prefill` does the work generate does: the full cache (keep None) is allocated at
  its final capacity (context + room) and prefilled chunk by chunk; a method compresses to
  its budgets and then gets `room` slots. All of that is prefill time.
  """
  steps = engine.STEPS
  chunk_size = None if chunk is None or chunk == tokens.shape[1] else chunk
  compile_before = steps.compile_seconds
  rss_reset = reset_peak_rss()
  start = time.perf_counter()
  pre = context.prefill(model, tokens, mask, method, keep, room, chunk_size=chunk_size,
                        steps=steps)
  _block((pre.logits, pre.cache))
  prefill = time.perf_counter() - start - (steps.compile_seconds - compile_before)
  cache, plan = pre.cache, pre.decode_plan
  facts = {"cache_bytes": cache_nbytes(cache), "cache_bytes_per_device": bytes_per_device(cache),
           "context_cache_bytes": pre.context_cache_bytes,
           "capacity": slots_per_head(model.config, cache), "budgets": pre.budgets,
           "prefill_peak_rss_bytes": peak_rss() if rss_reset else None}

  key = jax.random.key(0)  # greedy decoding ignores it
  compile_before = steps.compile_seconds
  start = time.perf_counter()
  # All steps in one compiled loop (no EOS: random weights must not stop early), as
  # generate decodes.
  _, ran, cache, next_tokens, _ = steps.decode_loop(
      model, first_tokens, cache, key, 1, decode_steps, 1.0, 1.0, True, [], decode_steps,
      plan=plan)
  _block((next_tokens, cache))
  decode = time.perf_counter() - start - (steps.compile_seconds - compile_before)
  if ran != decode_steps:
    raise RuntimeError(f"the decode loop ran {ran} of {decode_steps} steps")
  return prefill, decode, facts


@dataclasses.dataclass
class MethodCase:
  """One method's setup at one context length (and, in subclasses, its timings so far)."""
  method: methods_lib.Method
  compression_ratio: float | None
  budget: int | None
  keep: int | None
  room: int
  compile_seconds: float = 0.0
  facts: dict | None = None

  @classmethod
  def build(cls, method, context_length: int, decode_steps: int, compression_ratio, budget):
    """The validated budget (keep) and the room for decode_steps generated tokens: none
    for a decode-time method, which evicts as it decodes. The ratio and budget are kept
    only where they apply (keep is None for the full cache)."""
    method = methods_lib.get(method)
    keep = methods_lib.validate_compression(method, context_length, compression_ratio,
                                            budget)
    room = 0 if keep is not None and method.decode_time else decode_steps
    return cls(method, compression_ratio if keep is not None else None,
               budget if keep is not None else None, keep, room)


@dataclasses.dataclass
class _Case(MethodCase):
  prefill_times: list = dataclasses.field(default_factory=list)
  decode_times: list = dataclasses.field(default_factory=list)


def measure_methods(model, context_length: int, batch_size: int, methods, decode_steps: int = 32,
                    repeats: int = 3, warmup: int = 2, seed: int = 0,
                    prefill_chunk_size: int | None = None) -> list[dict]:
  """Times several methods on the same prompts, their runs interleaved round-robin.

  methods: (method, compression_ratio, budget) triples. Interleaving (warmup runs of every
  method, then one timed run of each in turn, `repeats` times) spreads drifts in machine
  speed (clocks, other load) over all methods alike, so their differences (compression
  overhead, decode speedup) are not skewed by when each happened to run. Returns one row
  per method, as `measure` describes.
  """
  config = model.config
  check_lengths(config, context_length, batch_size, decode_steps)
  repeats = _check_count(repeats, "repeats")
  warmup = _check_count(warmup, "warmup", minimum=0)
  context.check_chunk_size(prefill_chunk_size)
  cases = [_Case.build(calibration.bind(method, model), context_length, decode_steps,
                       compression_ratio, budget)
           for method, compression_ratio, budget in methods]
  tokens, mask, first_tokens = _prompt(config, context_length, batch_size,
                                       prefill_chunk_size, seed)

  for run_index in range(warmup + repeats):
    for case in cases:
      compile_before = engine.STEPS.compile_seconds
      prefill, decode, case.facts = _time_prefill_and_decode(
          model, tokens, mask, first_tokens, case.method, case.keep, case.room,
          prefill_chunk_size, decode_steps)
      case.compile_seconds += engine.STEPS.compile_seconds - compile_before
      if run_index >= warmup:
        case.prefill_times.append(prefill)
        case.decode_times.append(decode / decode_steps)

  weights = weight_nbytes(model)
  weights_per_device = bytes_per_device(model.params)
  placement = getattr(model, "placement", None)
  devices = 1 if placement is None else placement.mesh.devices.size
  weights_read = weight_nbytes_read_per_decode_step(model)
  full_context = full_cache_nbytes(config, batch_size, context_length)
  peak = _peak_bytes_in_use()
  rows = []
  for case in cases:
    facts = case.facts
    # Attention reads every slot of the cache (keys, values, positions, method state).
    step_bytes = weights_read + facts["cache_bytes"]
    prefill_s = statistics.median(case.prefill_times)
    step_s = statistics.median(case.decode_times)
    rows.append({
        "method": case.method.label,
        "compression_ratio": case.compression_ratio,
        "budget": case.budget,
        "keep_tokens": case.keep,
        "kept_tokens_per_layer": list(facts["budgets"]) if facts["budgets"] else None,
        "prefill_chunk_size": prefill_chunk_size,
        "context_length": context_length,
        "batch_size": batch_size,
        "decode_steps": decode_steps,
        "room_tokens": case.room,
        "cache_capacity_tokens": facts["capacity"],
        "repeats": repeats,
        "warmup": warmup,
        "prefill_seconds": prefill_s,
        "prefill_seconds_min": min(case.prefill_times),
        "prefill_tokens_per_second": batch_size * context_length / prefill_s,
        "decode_step_seconds": step_s,
        "decode_step_seconds_min": min(case.decode_times),
        "decode_tokens_per_second": batch_size / step_s,
        "context_cache_bytes": facts["context_cache_bytes"],
        "full_context_cache_bytes": full_context,
        "context_cache_ratio": facts["context_cache_bytes"] / full_context,
        "cache_bytes": facts["cache_bytes"],
        # On a mesh (a sharded model): what the fullest device holds; else the same.
        "cache_bytes_per_device": facts["cache_bytes_per_device"],
        "devices": devices,
        "weight_bytes": weights,
        "weight_bytes_per_device": weights_per_device,
        "weight_bytes_read_per_step": weights_read,
        "decode_bytes_per_step": step_bytes,
        "decode_bandwidth_gbps": step_bytes / step_s / 1e9,
        "decode_bandwidth_gbps_best": step_bytes / min(case.decode_times) / 1e9,
        "compile_seconds": case.compile_seconds,
        "device_peak_bytes_in_use": peak,
        # Process peak RSS during the last timed prefill (weights included; CPU memory).
        "prefill_peak_rss_bytes": facts["prefill_peak_rss_bytes"],
    })
  return rows


def measure(model, context_length: int, batch_size: int, decode_steps: int = 32,
            repeats: int = 3, warmup: int = 2, seed: int = 0, method=None,
            compression_ratio=None, budget=None, prefill_chunk_size: int | None = None) -> dict:
  """Times prefill (and compression) of random prompts and greedy decode steps.

  The full cache holds context_length + decode_steps slots. A compression method keeps its
  budget of the context and gets decode_steps empty slots for the generated tokens, except a
  decode-time method (h2o, tova, ...), which evicts as it decodes and gets none. Times are
  the median (and min) over `repeats` runs after `warmup` untimed runs; compilation is
  never timed.

  method / compression_ratio / budget: as in `kvjax.generate`; default the full cache.
  prefill_chunk_size: prefill (and compress) the prompt in chunks of this many tokens.
  """
  (row,) = measure_methods(model, context_length, batch_size,
                           [(method, compression_ratio, budget)], decode_steps, repeats,
                           warmup, seed, prefill_chunk_size)
  return row


def reset_peak_rss() -> bool:
  """Resets this process's resident-set high-water mark (Linux /proc/self/clear_refs);
  False where that is not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss() -> int | None:
  """This process's resident-set high-water mark in bytes since start or the last
  `reset_peak_rss` (VmHWM), None where /proc is missing. It includes the weights and
  everything else alive, so it bounds what a step needs from above."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


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


# Recorded because results differ by host: transformers' prefill ran about twice as fast on
# an AVX-512/AMX host (kvjax 0.62-0.77x its speed there) as on an earlier, unrecorded one
# (kvjax 1.06-1.64x there).
VECTOR_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile",
                     "amx_bf16", "asimd", "sve")


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> dict:
  """{"model", "cores", "vector_extensions"} of the host CPU: "model" is None where
  `cpuinfo` cannot be read (off Linux) or names none (ARM); "cores" counts logical CPUs."""
  model, flags = None, set()
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
          model = value.strip()
        elif key in ("flags", "Features") and not flags:
          flags = set(value.split())
  except OSError:
    pass
  return {"model": model, "cores": os.cpu_count(),
          "vector_extensions": [name for name in VECTOR_EXTENSIONS if name in flags]}


def device_info() -> dict:
  device = jax.devices()[0]
  return {"platform": device.platform, "device_kind": device.device_kind,
          "device_count": jax.device_count(), "host_cpu": host_cpu()}


# --- Decode-attention kernel microbenchmark -------------------------------------------------

KERNEL_CPU_REASON = "CPU: Pallas kernel runs only in interpret mode"


def kernel_unmeasured_reason() -> str | None:
  """Why the decode-attention kernel cannot be timed here (None: it can)."""
  if jax.default_backend() == "cpu":
    return KERNEL_CPU_REASON
  return None


def measure_decode_attention_kernel(config: ModelConfig, batch_size: int, slots: int,
                                    iterations: int = 10, repeats: int = 3, seed: int = 0,
                                    interpret=None, bits: int | None = None,
                                    group: int = 32, block_k: int | None = None,
                                    key_chunk: int | None = None) -> dict:
  """Times the jitted Pallas decode-attention kernel alone over one layer's dense cache.

  Shapes follow `config` (KV heads, query heads per KV head, head dim, dtype); every one of
  the `slots` slots is visible. Bytes read = keys + values + key positions. The time is the
  best over `repeats` rounds of one jitted loop of `iterations` calls, each call's query
  the previous call's output: per call, the kernel and its merge epilogue as a decode step
  runs them, without a Python dispatch each (which alone takes longer than the kernel at
  small shapes). interpret: passed to the kernel (None: compiled on GPU/TPU, interpreted on
  CPU, where the time means nothing). block_k, key_chunk: the dense kernel's tiling (None:
  its platform default). bits: time the quantized (KIVI) kernel instead, over keys and
  values quantized to `bits` with groups of `group` (slots rounded down to whole groups);
  bytes read are then the packed codes, scales, zeros and positions, the bytes that kernel
  really streams. The row's relative_error compares one call with the jnp reference.
  """
  batch_size = _check_count(batch_size, "batch_size")
  slots = _check_count(slots, "slots")
  iterations = _check_count(iterations, "iterations")
  repeats = _check_count(repeats, "repeats")
  if bits is not None and key_chunk is not None:
    raise BenchmarkError(f"key_chunk={key_chunk} applies to the dense kernel only (bits="
                         f"{bits} times the quantized one)")
  if bits is not None and slots < group:
    raise BenchmarkError(f"slots={slots} holds no whole quantization group of {group} "
                         f"(the quantized kernel times whole groups only)")
  dtype = jnp.dtype(config.dtype)
  b, k, d = batch_size, config.num_kv_heads, config.head_dim
  g = config.num_heads // k
  q_key, k_key, v_key = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(q_key, (b, k, g, d), dtype)
  keys = jax.random.normal(k_key, (b, k, slots, d), dtype)
  values = jax.random.normal(v_key, (b, k, slots, d), dtype)
  key_positions = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (b, k, slots))
  query_positions = jnp.full((b,), slots, jnp.int32)
  if bits is None:
    cache = _block((keys, values, key_positions, query_positions))
    streamed = cache[:3]

    def attend(q, cache):
      return decode_kernels.decode_attention(q, *cache, block_k=block_k, key_chunk=key_chunk,
                                             interpret=interpret)[0]

    def expected():
      return kernel_reference.decode_attention(q, *cache)[0]
  else:
    slots = slots // group * group
    keys, values, key_positions = (x[:, :, :slots] for x in (keys, values, key_positions))
    key_parts = quant_kernels.quantize(keys, bits=bits, group=group, axis="tokens")
    value_parts = quant_kernels.quantize(values, bits=bits, group=group, axis="channels")
    cache = _block(key_parts + value_parts + (key_positions, query_positions))
    streamed = cache[:-1]

    def attend(q, cache):
      return quant_kernels.quantized_decode_attention(q, *cache, bits=bits, group=group,
                                                      block_k=block_k,
                                                      interpret=interpret)[0]

    def expected():
      return kernel_reference.quantized_decode_attention(q, *cache, bits=bits,
                                                         group=group)[0]

  error = relative_error(_block(attend(q, cache)), expected())

  @jax.jit
  def loop(q, cache):
    # The output [B, K, G, D] is the next query: no call can be hoisted or skipped.
    return jax.lax.fori_loop(0, iterations, lambda _, x: attend(x, cache).astype(x.dtype), q)

  _block(loop(q, cache))  # compile
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    _block(loop(q, cache))
    best = min(best, (time.perf_counter() - start) / iterations)
  nbytes = sum(x.nbytes for x in streamed)
  return {"batch_size": b, "slots": slots, "kv_heads": k, "query_heads_per_kv_head": g,
          "head_dim": d, "dtype": str(dtype), "bits": bits, "block_k": block_k,
          "key_chunk": key_chunk, "iterations": iterations, "bytes_read": int(nbytes),
          "seconds": best,
          "bandwidth_gbps": nbytes / best / 1e9, "relative_error": error}


def _kernel_section(config, context_lengths, batch_sizes, keeps, copy_gbps, reference,
                    log=None, quantized=()) -> dict:
  """Kernel rows for every (context, batch) at the full and the compressed cache sizes, and
  the quantized kernel at the full size for every (bits, group) in `quantized`."""
  reason = kernel_unmeasured_reason()
  rows = []
  if reason is None:
    try:
      for c in context_lengths:
        for b in batch_sizes:
          for slots in sorted({c} | set(keeps.get(c, ()))):
            if log:
              log(f"timing the decode-attention kernel: batch_size={b} slots={slots}")
            row = measure_decode_attention_kernel(config, b, slots)
            row.update(context_length=c, cache="full" if slots == c else "compressed",
                       copy_fraction=row["bandwidth_gbps"] / copy_gbps,
                       hbm_fraction=row["bandwidth_gbps"] / reference)
            rows.append(row)
          for bits, group in quantized:
            if log:
              log(f"timing the quantized decode kernel: bits={bits} batch_size={b} slots={c}")
            row = measure_decode_attention_kernel(config, b, c, bits=bits, group=group)
            row.update(context_length=c, cache=f"quantized {bits}-bit",
                       copy_fraction=row["bandwidth_gbps"] / copy_gbps,
                       hbm_fraction=row["bandwidth_gbps"] / reference)
            rows.append(row)
    except ImportError as e:  # the kernel module is missing or broken
      reason, rows = f"pallas_kernels.decode_attention is not importable: {e}", []
  return {"measured": reason is None, "reason": reason, "scope": "one layer's cache",
          "rows": rows}


# --- Goals --------------------------------------------------------------------------------

# The goals, all at one setting: random weights at the Llama-3.1-8B shape, a 32K
# context, batch 8, compression_ratio 0.9.
GOAL_SETTING = {"shape": "llama-3.1-8b", "context_length": 32768, "batch_size": 8,
                "compression_ratio": 0.9}
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class Goal:
  name: str
  description: str
  target: float
  comparison: str  # ">=" or "<="
  row_field: str   # where a row holds the measured value

  def passes(self, value: float) -> bool:
    return value >= self.target if self.comparison == ">=" else value <= self.target


GOALS = (
    Goal("decode_step_speedup", "decode step time of the full cache / that of the compressed "
         "cache (whole model step)", 5.0, ">=", "decode_speedup"),
    Goal("decode_attention_hbm_fraction", "decode-attention kernel bandwidth (keys + values + "
         "positions read) / measured copy bandwidth", 0.8, ">=", "copy_fraction"),
    Goal("compression_overhead_fraction", "(prefill with compression - full-cache prefill) / "
         "full-cache prefill", 0.05, "<=", "compression_overhead_fraction"),
)


def _is_goal_shape(config: dict) -> bool:
  shape = SHAPES[GOAL_SETTING["shape"]]
  return all(config.get(f) == getattr(shape, f) for f in _SHAPE_FIELDS)


def _goal_ratio(ratio) -> bool:
  return ratio is not None and abs(ratio - GOAL_SETTING["compression_ratio"]) < 1e-9


def _at_goal_size(row) -> bool:
  return (row["context_length"], row["batch_size"]) == (GOAL_SETTING["context_length"],
                                                        GOAL_SETTING["batch_size"])


def _pick(rows, at_setting):
  """The rows at the goal's setting, else the largest (context x batch) rows."""
  matching = [r for r in rows if at_setting(r)]
  if matching:
    return matching, True
  size = lambda r: (r["context_length"] * r["batch_size"], r["context_length"])
  largest = max(size(r) for r in rows)
  return [r for r in rows if size(r) == largest], False


def _goal_entry(goal, subject, value, measured_at, at_setting, reason=None) -> dict:
  passes = None if value is None else bool(goal.passes(value))
  if reason is None and not at_setting:
    reason = "not the goal's setting: measured at " + _describe_setting(measured_at)
  return {"name": goal.name, "description": goal.description, "target": goal.target,
          "comparison": goal.comparison, "subject": subject, "measured": value,
          "measured_at": measured_at, "at_goal_setting": at_setting,
          "met": passes if at_setting else None, "passes_target": passes, "reason": reason}


def _describe_setting(s) -> str:
  if not s:
    return "-"
  text = f"{s['model']}, context {s['context_length']}, batch {s['batch_size']}"
  if s.get("slots") is not None:
    text += f", {s['slots']} slots"
  if s.get("compression_ratio") is not None:
    text += f", compression_ratio {s['compression_ratio']}"
  if s.get("budget") is not None:
    text += f", budget {s['budget']}"
  return text


def evaluate_goals(report: dict) -> list[dict]:
  """One entry per goal and subject (method, or kernel cache size), measured against target.

  `met` is only decided at the goal's setting (GOAL_SETTING); elsewhere it is None and
  `passes_target` says how the measured value compares, labelled by `at_goal_setting`.
  """
  model_name = report["model"]["name"] or "unnamed model"
  shape_ok = _is_goal_shape(report["model"]["config"])
  entries = []
  full_label = report["methods"][0]["label"]
  compressed = [m["label"] for m in report["methods"][1:]]
  for goal in GOALS:
    if goal.name == "decode_attention_hbm_fraction":
      kernel = report["decode_attention_kernel"]
      if not kernel["measured"] or not kernel["rows"]:
        entries.append(_goal_entry(goal, "kernel", None, None, False,
                                   kernel["reason"] or "no kernel rows"))
        continue
      ratio_ok = _goal_ratio(report["compression_ratio"])
      rows, at = _pick(kernel["rows"], lambda r: shape_ok and _at_goal_size(r) and (
          r["cache"] == "full" or ratio_ok))
      for r in rows:
        where = {"model": model_name, "context_length": r["context_length"],
                 "batch_size": r["batch_size"], "slots": r["slots"],
                 "compression_ratio": report["compression_ratio"] if r["cache"] != "full"
                 else None, "budget": report["budget"] if r["cache"] != "full" else None}
        entries.append(_goal_entry(goal, f"{r['cache']} cache ({r['slots']} slots)",
                                   r[goal.row_field], where, at))
      continue
    if not compressed:
      entries.append(_goal_entry(goal, None, None, None, False,
                                 f"no compression method was measured, only {full_label!r}"))
      continue
    for label in compressed:
      method_rows = [r for r in report["results"] if r["method"] == label]
      rows, at = _pick(method_rows, lambda r: shape_ok and _at_goal_size(r)
                       and _goal_ratio(r["compression_ratio"]) and r["budget"] is None)
      r = rows[0]
      where = {"model": model_name, "context_length": r["context_length"],
               "batch_size": r["batch_size"], "compression_ratio": r["compression_ratio"],
               "budget": r["budget"]}
      entries.append(_goal_entry(goal, label, r[goal.row_field], where, at))
  return entries


# --- The whole run ------------------------------------------------------------------------

class _ConfigOnly:
  """Stands in for a model where only `.config` is read (budget checks before loading)."""

  def __init__(self, config):
    self.config = config


def check_plan(config: ModelConfig, context_lengths: Sequence[int],
               batch_sizes: Sequence[int], decode_steps: int,
               hbm_bandwidth_gbps: float | None = None, method=None, compression_ratio=None,
               budget=None, methods=None, prefill_chunk_size: int | None = None):
  """Validates a whole run() before anything is allocated or timed.

  Returns the method objects, the full-cache baseline first (see `build_methods`).
  """
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
  method_objs = build_methods(method if methods is None else methods)
  compressing = method_objs[1:]
  context.check_chunk_size(prefill_chunk_size)
  for c in context_lengths:
    if not compressing:  # ratio/budget with only the full cache is an error, as in generate
      methods_lib.validate_compression(method_objs[0], c, compression_ratio, budget)
    for m in compressing:
      if not m.needs_budget:
        continue
      keep = methods_lib.validate_compression(m, c, compression_ratio, budget)
      if keep is not None:
        context.layer_budgets(_ConfigOnly(config), m, keep, c)
  return method_objs


def _method_info(m, compression_ratio, budget) -> dict:
  return {"name": m.name, "label": m.label, "hyperparameters": dataclasses.asdict(m),
          "compression_ratio": compression_ratio if m.needs_budget else None,
          "budget": budget if m.needs_budget else None}


def run(model, context_lengths: Sequence[int], batch_sizes: Sequence[int],
        decode_steps: int = 32, repeats: int = 3, warmup: int = 2,
        hbm_bandwidth_gbps: float | None = None, copy_bandwidth_bytes: int = 256 << 20,
        method=None, compression_ratio=None, budget=None, seed: int = 0,
        source: str | None = None, log=None, methods=None,
        prefill_chunk_size: int | None = None) -> dict:
  """Benchmarks every (context length, batch size, method); returns the JSON-ready report.

  methods: names or method objects (default: `method` alone); the full cache is always
  measured too, first, as the baseline. compression_ratio / budget apply to the others.
  Rows carry, against the full cache at the same context and batch: compression overhead
  (extra prefill time), decode speedup and cache ratios. On GPU/TPU the Pallas
  decode-attention kernel is also timed alone; `goals` compares everything with the issue's
  targets (see GOALS, GOAL_SETTING).
  hbm_bandwidth_gbps: the device's peak (or separately measured) bandwidth. Each row's
  hbm_fraction is against it when given, else against the measured copy bandwidth;
  copy_fraction is always against the measured copy bandwidth.
  log: optional callable(str) for progress lines.
  """
  method_objs = check_plan(model.config, context_lengths, batch_sizes, decode_steps,
                           hbm_bandwidth_gbps, method, compression_ratio, budget, methods,
                           prefill_chunk_size)
  copy_gbps = measure_copy_bandwidth(copy_bandwidth_bytes)
  reference = hbm_bandwidth_gbps or copy_gbps
  results = []
  keeps = {}
  for c in context_lengths:
    for b in batch_sizes:
      if log:
        log(f"measuring context_length={c} batch_size={b}: "
            f"{', '.join(m.label for m in method_objs)} (runs interleaved)")
      # The ratio/budget applies to the methods that select tokens.
      cases = [(m, compression_ratio, budget) if m.needs_budget else (m, None, None)
               for m in method_objs]
      rows = measure_methods(model, c, b, cases, decode_steps, repeats, warmup, seed,
                             prefill_chunk_size)
      baseline = rows[0]
      for row in rows:
        if row["keep_tokens"] is not None:
          keeps.setdefault(c, set()).add(row["keep_tokens"])
        row["copy_fraction"] = row["decode_bandwidth_gbps"] / copy_gbps
        row["hbm_fraction"] = row["decode_bandwidth_gbps"] / reference
        overhead = row["prefill_seconds"] - baseline["prefill_seconds"]
        row["compression_overhead_seconds"] = overhead
        row["compression_overhead_fraction"] = overhead / baseline["prefill_seconds"]
        row["decode_speedup"] = baseline["decode_step_seconds"] / row["decode_step_seconds"]
        row["cache_ratio"] = row["cache_bytes"] / baseline["cache_bytes"]
        row["context_cache_ratio_to_full"] = (row["context_cache_bytes"]
                                              / baseline["context_cache_bytes"])
        results.append(row)
  quantized = sorted({(m.bits, m.group_size) for m in method_objs
                      if isinstance(m, methods_lib.KIVI)})
  kernel = _kernel_section(model.config, context_lengths, batch_sizes, keeps, copy_gbps,
                           reference, log, quantized)
  infos = [_method_info(m, compression_ratio, budget) for m in method_objs]
  report = {
      "device": device_info(),
      "jax_version": jax.__version__,
      "model": {"name": model.config.name, "source": source, "num_params": model.num_params(),
                "config": model.config.to_dict()},
      # The first compression method (or the full cache), as single-method reports had it.
      "method": infos[1] if len(infos) > 1 else infos[0],
      "methods": infos,
      "baseline_method": infos[0]["label"],
      "compression_ratio": compression_ratio,
      "budget": budget,
      "prefill_chunk_size": prefill_chunk_size,
      "copy_bandwidth_gbps": copy_gbps,
      "hbm_bandwidth_gbps": hbm_bandwidth_gbps,
      "hbm_fraction_reference": "hbm_bandwidth_gbps" if hbm_bandwidth_gbps else
                                "copy_bandwidth_gbps",
      "results": results,
      "decode_attention_kernel": kernel,
      "goal_setting": dict(GOAL_SETTING),
  }
  report["goals"] = evaluate_goals(report)
  return report


# --- Printing -----------------------------------------------------------------------------

def _fmt(value, spec: str, width: int) -> str:
  return ("-" if value is None else format(value, spec)).rjust(width)


def format_goals(report: dict) -> str:
  """The goals section: target, measured value, where it was measured, met or not."""
  s = report["goal_setting"]
  lines = [f"goals at the {s['shape']} shape, context {s['context_length']}, batch "
           f"{s['batch_size']}, compression_ratio {s['compression_ratio']} (met is n/a for "
           f"values measured elsewhere):"]
  name = None
  for g in report["goals"]:
    if g["name"] != name:
      name = g["name"]
      lines.append(f"  {g['name']} {g['comparison']} {g['target']:g}: {g['description']}")
    subject = g["subject"] or "-"
    if g["measured"] is None:
      lines.append(f"    {subject:<28} not measured: {g['reason']}")
    elif g["at_goal_setting"]:
      lines.append(f"    {subject:<28} {g['measured']:>9.3f}  {'MET' if g['met'] else 'NOT MET'}")
    else:
      verdict = "would pass" if g["passes_target"] else "would miss"
      lines.append(f"    {subject:<28} {g['measured']:>9.3f}  met n/a, {verdict}: NOT the "
                   f"goal's setting ({_describe_setting(g['measured_at'])})")
  return "\n".join(lines)


def _mib(nbytes):
  return None if nbytes is None else nbytes / (1 << 20)


def format_mesh_table(runs: list[dict]) -> str:
  """One line per mesh, method, context length and batch size of a --meshes run."""
  head = (f"{'mesh':>16} {'devices':>7} {'method':>14} {'context':>7} {'batch':>5} "
          f"{'cache MiB/device':>16} {'weights MiB/device':>18} {'prefill s':>9} "
          f"{'decode ms/step':>14}")
  lines = [head, "-" * len(head)]
  for run in runs:
    for r in run["report"]["results"]:
      lines.append(f"{run['mesh']:>16} {run['devices']:>7} {r['method']:>14} "
                   f"{r['context_length']:>7} {r['batch_size']:>5} "
                   f"{_mib(r['cache_bytes_per_device']):>16.3f} "
                   f"{_mib(r['weight_bytes_per_device']):>18.3f} "
                   f"{r['prefill_seconds']:>9.3f} {1e3 * r['decode_step_seconds']:>14.2f}")
  return "\n".join(lines)


def format_table(report: dict) -> str:
  """Fixed-width tables of a run() report: per-method rows, the kernel, then the goals."""
  mib = 1 << 20
  device = report["device"]
  methods = report.get("methods") or [report["method"]]
  compression = (f"compression_ratio {report['compression_ratio']}"
                 if report.get("compression_ratio") is not None else
                 f"budget {report['budget']}" if report.get("budget") is not None else "")
  weights = report["results"][0]["weight_bytes"] / mib if report["results"] else 0.0
  lines = [
      f"device {device['device_kind']} ({device['platform']}), jax {report['jax_version']}, "
      f"model {report['model']['name']} ({report['model']['num_params'] / 1e6:.1f}M params, "
      f"{report['model']['config']['dtype']}, {weights:.1f} MiB weights)",
      f"methods {', '.join(m['label'] for m in methods)} (baseline {methods[0]['label']})"
      + (f", {compression}" if compression else ""),
      f"copy bandwidth {report['copy_bandwidth_gbps']:.1f} GB/s"
      + (f", given HBM bandwidth {report['hbm_bandwidth_gbps']:.1f} GB/s"
         if report["hbm_bandwidth_gbps"] else ""),
  ]
  header = (f"{'method':<18} {'context':>7} {'batch':>5} {'prefill s':>9} "
            f"{'prefill tok/s':>13} {'overhead':>8} {'decode ms/step':>14} "
            f"{'decode tok/s':>12} {'speedup':>7} {'ctx cache MiB':>13} {'ratio':>6} "
            f"{'GB/s':>7} {'frac':>6} {'peak RSS MiB':>12}")
  lines += [header, "-" * len(header)]
  for r in report["results"]:
    lines.append(
        f"{r.get('method', 'full'):<18} {r['context_length']:>7} {r['batch_size']:>5} "
        f"{r['prefill_seconds']:>9.4f} {r['prefill_tokens_per_second']:>13.0f} "
        f"{_fmt(r.get('compression_overhead_fraction'), '+.1%', 8)} "
        f"{r['decode_step_seconds'] * 1e3:>14.2f} {r['decode_tokens_per_second']:>12.1f} "
        f"{_fmt(r.get('decode_speedup'), '.2f', 6)}x "
        f"{r.get('context_cache_bytes', r['cache_bytes']) / mib:>13.2f} "
        f"{_fmt(r.get('context_cache_ratio_to_full'), '.3f', 6)} "
        f"{r['decode_bandwidth_gbps']:>7.1f} {r['hbm_fraction']:>6.3f} "
        f"{_fmt(_mib(r.get('prefill_peak_rss_bytes')), '.0f', 12)}")
  lines.append("overhead: extra prefill time vs the full cache; speedup: full decode step "
               "time / this one; ratio: context cache bytes / the full cache's; frac: "
               f"decode bytes per step / time vs {report['hbm_fraction_reference']}; peak "
               "RSS: the process's resident memory peak during prefill (weights included)")
  kernel = report.get("decode_attention_kernel")
  if kernel is not None:
    if not kernel["measured"]:
      lines.append(f"decode-attention kernel: not measured ({kernel['reason']})")
    else:
      lines.append(f"decode-attention kernel alone, {kernel['scope']}:")
      lines.append(f"  {'cache':<10} {'context':>7} {'batch':>5} {'slots':>7} {'MiB read':>9} "
                   f"{'us':>9} {'GB/s':>8} {'copy frac':>9} {'hbm frac':>8}")
      for k in kernel["rows"]:
        lines.append(f"  {k['cache']:<10} {k['context_length']:>7} {k['batch_size']:>5} "
                     f"{k['slots']:>7} {k['bytes_read'] / mib:>9.2f} {k['seconds'] * 1e6:>9.1f} "
                     f"{k['bandwidth_gbps']:>8.1f} {k['copy_fraction']:>9.3f} "
                     f"{k['hbm_fraction']:>8.3f}")
  if report.get("goals"):
    lines.append(format_goals(report))
  return "\n".join(lines)
