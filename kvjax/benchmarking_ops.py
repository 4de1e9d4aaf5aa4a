"""Op-level speed against torch on the CPU: where a side-by-side prefill spends its time.

`scripts/benchmark.py --baseline=transformers --ops` times, at a model's shapes, kvjax's
CPU prefill attention (`reference.attention`, the blocked jnp attention) against torch's
causal `scaled_dot_product_attention`, and a prefill-sized matrix product (tokens x hidden
times hidden x intermediate, the MLP's) in XLA against torch's, on the same random float32
inputs. Repeats are interleaved (the order flips every round); each speed ratio is the
median of the per-repeat ratios torch time / kvjax time (> 1: kvjax faster).

torch's OpenMP threads run with OMP_WAIT_POLICY=PASSIVE here (unless the environment sets
it): libgomp's default keeps its workers spinning after each torch op, and on 2 cores they
took the cores from the XLA op timed next. One 512 x 576 x 1536 float32 product in XLA took
7.5 ms right after a torch product against 5.5 ms alone (2048 rows: 29.8 against 21.8 ms);
with PASSIVE 5.5 and 20.7 ms, and torch's own times unchanged (5.2 and 19.4-19.9 ms).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import benchmarking_baseline as baseline
from kvjax.benchmarking import BenchmarkError, _check_count, device_info
from kvjax.loading import load as load_lib
from pallas_kernels import reference

OPS = ("attention", "product")
OMP_WAIT_POLICY = "PASSIVE"
# Flags of a generating run that --ops has no use for: given, they are an error.
UNUSED_FLAGS = ("method", "methods", "method_arg", "compression_ratio", "budget",
                "decode_steps", "dtype")


def check_flags(given) -> None:
  """--ops times two ops alone: a generation flag given with it would be ignored."""
  for name in given:
    if name in UNUSED_FLAGS:
      raise BenchmarkError(f"--{name} does not apply with --ops (it times float32 attention "
                           f"and a product alone: no method, no decoding)")


def _interleaved(ours, theirs, repeats: int, warmup: int) -> tuple[list, list]:
  """Per-repeat seconds of two callables, run in alternating order."""
  times = {"ours": [], "theirs": []}
  for round_index in range(warmup + repeats):
    pair = [("ours", ours), ("theirs", theirs)][::1 if round_index % 2 == 0 else -1]
    for name, call in pair:
      start = time.perf_counter()
      call()
      if round_index >= warmup:
        times[name].append(time.perf_counter() - start)
  return times["ours"], times["theirs"]


def _row(op, context_length, batch_size, shape, flops, ours, theirs, difference) -> dict:
  ours_median, theirs_median = statistics.median(ours), statistics.median(theirs)
  return {"op": op, "context_length": context_length, "batch_size": batch_size,
          "shape": shape, "flops": flops,
          "kvjax_seconds": ours_median, "torch_seconds": theirs_median,
          "times": {"kvjax": ours, "torch": theirs},
          "speed_ratio": statistics.median(t / o for o, t in zip(ours, theirs)),
          "gflops_per_second": {"kvjax": flops / ours_median / 1e9,
                                "torch": flops / theirs_median / 1e9},
          "max_abs_difference": difference}


def measure_ops(config, context_length: int, batch_size: int, repeats: int, warmup: int,
                seed: int = 0) -> list[dict]:
  """One row per op of `OPS` at (context length, batch size) for the model `config`."""
  torch, _ = baseline.import_transformers(omp_wait_policy=OMP_WAIT_POLICY)
  rng = np.random.default_rng(seed)
  b, t, h, k, d = (batch_size, context_length, config.num_heads, config.num_kv_heads,
                   config.head_dim)
  q = rng.standard_normal((b, t, h, d), dtype=np.float32)
  keys, values = (rng.standard_normal((b, k, t, d), dtype=np.float32) for _ in range(2))
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
  key_positions = np.broadcast_to(positions[:, None], (b, k, t)).copy()
  args = [jnp.asarray(a) for a in (q, keys, values, positions, key_positions)]
  attention = jax.jit(reference.attention).lower(*args).compile()
  tq, tk, tv = (torch.from_numpy(a) for a in (q.transpose(0, 2, 1, 3), keys, values))

  def torch_attention():
    return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                            enable_gqa=True)

  with torch.inference_mode():
    ours, theirs = _interleaved(lambda: attention(*args).block_until_ready(), torch_attention,
                                repeats, warmup)
    difference = float(np.abs(np.asarray(attention(*args))
                              - torch_attention().transpose(1, 2).numpy()).max())
  # Causal: two products (q.k and p.v) over half the [T, T] logits per head.
  rows = [_row("attention", t, b, {"queries": [b, t, h, d], "keys": [b, k, t, d]},
               2 * b * h * t * t * d, ours, theirs, difference)]

  x = rng.standard_normal((b * t, config.hidden_size), dtype=np.float32)
  w = rng.standard_normal((config.hidden_size, config.intermediate_size), dtype=np.float32)
  jx, jw = jnp.asarray(x), jnp.asarray(w)
  product = jax.jit(jnp.dot).lower(jx, jw).compile()
  tx, tw = torch.from_numpy(x), torch.from_numpy(w)
  with torch.inference_mode():
    ours, theirs = _interleaved(lambda: product(jx, jw).block_until_ready(), lambda: tx @ tw,
                                repeats, warmup)
    difference = float(np.abs(np.asarray(product(jx, jw)) - (tx @ tw).numpy()).max())
  rows.append(_row("product", t, b, {"x": list(x.shape), "w": list(w.shape)},
                   2 * x.shape[0] * w.shape[0] * w.shape[1], ours, theirs, difference))
  return rows


def run(source, context_lengths, batch_sizes, repeats: int = 5, warmup: int = 2,
        seed: int = 0, torch_threads=None, log=None) -> dict:
  """The JSON-ready report of `measure_ops` at every (context length, batch size), at the
  shapes of the model `source` (its config only: `load_config`)."""
  torch, _ = baseline.import_transformers(omp_wait_policy=OMP_WAIT_POLICY)
  threads = baseline.check_torch_threads(torch_threads)
  repeats = _check_count(repeats, "repeats")
  warmup = _check_count(warmup, "warmup", minimum=0)
  config = load_lib.load_config(source, dtype="float32")
  with baseline.pinned_torch_threads(torch, threads):
    rows = []
    for c in context_lengths:
      for b in batch_sizes:
        if log:
          log(f"measuring ops at context_length={c} batch_size={b}: kvjax and torch, "
              f"interleaved")
        rows.extend(measure_ops(config, c, b, repeats, warmup, seed))
  return {"device": device_info(), "jax_version": jax.__version__,
          "torch_version": torch.__version__, "torch_threads": threads,
          "torch_openmp": baseline.omp_wait_policy(),
          "model": {"name": config.name, "source": str(source), "config": config.to_dict()},
          "ops": {"attention": "kvjax pallas_kernels.reference.attention (float32, causal) "
                               "vs torch scaled_dot_product_attention(is_causal=True, "
                               "enable_gqa=True)",
                  "product": "[batch x context, hidden] @ [hidden, intermediate], float32: "
                             "jnp.dot under jit vs torch's @"},
          "repeats": repeats, "warmup": warmup, "seed": seed,
          "ratio_definition": "median over repeats of torch seconds / kvjax seconds of the "
                              "paired runs (> 1: kvjax faster)",
          "results": rows}


def format_table(report: dict) -> str:
  lines = [f"{baseline._host_line(report['device'])}, jax {report['jax_version']}, torch "
           f"{report['torch_version']} (torch_threads={report['torch_threads']}, "
           f"OMP_WAIT_POLICY={report['torch_openmp']['omp_wait_policy']})",
           f"{'op':10s} {'ctx':>6s} {'batch':>5s} | {'kvjax ms':>9s} {'torch ms':>9s} "
           f"{'x':>5s} | {'GFLOP/s kv/torch':>17s} | max |diff|"]
  for r in report["results"]:
    g = r["gflops_per_second"]
    lines.append(f"{r['op']:10s} {r['context_length']:>6d} {r['batch_size']:>5d} | "
                 f"{1000 * r['kvjax_seconds']:>9.2f} {1000 * r['torch_seconds']:>9.2f} "
                 f"{r['speed_ratio']:>5.2f} | {g['kvjax']:>8.0f}/{g['torch']:<8.0f} | "
                 f"{r['max_abs_difference']:.1e}")
  lines.append("x: kvjax speed / torch speed, median of the per-repeat paired ratios")
  return "\n".join(lines)
