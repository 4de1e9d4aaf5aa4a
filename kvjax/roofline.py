"""The GPU roofline check: how close kvjax's kernels and decode step come to the hardware.

One run (scripts/roofline.py, scripts/gpu_check.sh) measures, in order of cost:
  copy:   the device's achievable memory bandwidth (`benchmarking.measure_copy_bandwidth`);
  decode: the Pallas decode-attention kernel alone at each (context, batch), as a fraction
          of that bandwidth (goal >= DECODE_FRACTION_GOAL);
  flash:  the prefill flash-attention kernel's TFLOP/s (causal FLOPs 4*B*H*T*T*D/2) for a
          few block sizes, next to XLA running the jnp reference;
  sparse: the vertical-slash sparse prefill kernel (LoopServe) at the flash shape, with
          `sparse_lines` vertical and slash lines per head, against the dense flash kernel;
  model:  the decode step (and prefill) of the full cache vs compression methods on random
          weights at the model shape, runs interleaved (`benchmarking.measure_methods`),
          and each method's compression overhead, prefill / full prefill - 1
          (goal <= OVERHEAD_GOAL).
A section that fails records its error and the others still run; the report is written
after every section, so a run cut short keeps what it measured. `goals` compares each
measured number with its target.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from kvjax import benchmarking
from kvjax.benchmarking import BenchmarkError, Goal
from kvjax.config import ModelConfig
from kvjax.model import random_params
from pallas_kernels import flash_attention as flash_kernels
from pallas_kernels import quantization as quant_kernels
from pallas_kernels import vertical_slash as sparse_kernels
from pallas_kernels import reference

DECODE_FRACTION_GOAL = 0.85
# Above this relative error against the jnp reference a kernel computes something else
# (bf16 operands give 1e-3 to 1e-2): its speed is then not judged against a goal.
MAX_RELATIVE_ERROR = 0.05
OVERHEAD_GOAL = 0.05
GOALS = (
    Goal("decode_attention_copy_fraction", "Pallas decode-attention kernel bandwidth (keys + "
         "values + positions read) / measured copy bandwidth", DECODE_FRACTION_GOAL, ">=",
         "copy_fraction"),
    Goal("compression_overhead_fraction", "prefill seconds with compression / full-cache "
         "prefill seconds - 1", OVERHEAD_GOAL, "<=", "compression_overhead_fraction"),
)
SECTIONS = ("decode", "flash", "sparse", "model")
NO_ACCELERATOR = ("no GPU present: jax.default_backend() is {backend!r} (devices: {devices}). "
                  "The roofline check measures nothing useful here; run it on a GPU, or pass "
                  "--allow_cpu to exercise it in interpret mode at tiny shapes.")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one check measures. Defaults: the issue's Llama-3.1-8B setting on an H200.

  Attributes:
    kernel_contexts, kernel_batches: decode-kernel cache lengths and batch sizes.
    model_context, model_batch: the whole-model comparison's prompt length and batch.
    methods: compression methods compared with the full cache (registry names, e.g.
      "kivi:bits=4"); compression_ratio applies to those that select tokens.
    decode_steps, repeats, warmup: as in `benchmarking.measure_methods`.
    flash_length, flash_batch: prefill length (queries = keys) and batch of the flash kernel.
    flash_blocks: (block_q, block_k) pairs to time; (None, None) is the platform default.
    sparse_lines: vertical and slash lines per head of the sparse prefill kernel (each
      kind; LoopServe's max_lines).
    kernel_bits: also time the quantized (KIVI) decode kernel at each (context, batch) for
      these bit widths (groups of 32; rows under "quantized", bytes = the packed cache).
    decode_tilings: extra (block_k, key_chunk) pairs of the decode kernel to time at every
      (context, batch) next to its default tiling (tuning rows; the goal judges the default).
    iterations: kernel calls per timing round (the best of 3 rounds is kept). The decode
      kernel's calls run inside one jitted loop, whose fixed cost per round (about 240 us
      on an H200) is spread over them: 100 keeps it near 2 us per call.
    copy_bandwidth_bytes: array size of the copy-bandwidth measurement.
    sections: which of SECTIONS to run (copy bandwidth always runs).
  """
  kernel_contexts: Sequence[int] = (8192, 32768)
  kernel_batches: Sequence[int] = (1, 8)
  model_context: int = 8192
  model_batch: int = 1
  methods: Sequence[str] = ("snapkv", "kivi:bits=4")
  compression_ratio: float = 0.9
  decode_steps: int = 16
  repeats: int = 3
  warmup: int = 1
  flash_length: int = 8192
  flash_batch: int = 1
  flash_blocks: Sequence[tuple] = ((None, None), (64, 64), (128, 64))
  sparse_lines: int = 1024
  decode_tilings: Sequence[tuple] = ()
  kernel_bits: Sequence[int] = (4,)
  iterations: int = 100
  copy_bandwidth_bytes: int = 1 << 30
  sections: Sequence[str] = SECTIONS


def accelerator_missing() -> str | None:
  """The message to print when no GPU (or TPU) backs jax here, else None."""
  backend = jax.default_backend()
  if backend in ("gpu", "tpu"):
    return None
  return NO_ACCELERATOR.format(backend=backend, devices=[d.device_kind for d in jax.devices()])


def check_plan(config: ModelConfig, plan: Plan) -> None:
  """Fails before anything is allocated or timed."""
  unknown = sorted(set(plan.sections) - set(SECTIONS))
  if unknown or not plan.sections:
    raise BenchmarkError(f"sections={list(plan.sections)}: allowed are {list(SECTIONS)}")
  benchmarking.parse_sizes(plan.kernel_contexts, "kernel_contexts")
  benchmarking.parse_sizes(plan.kernel_batches, "kernel_batches")
  benchmarking.parse_sizes([plan.flash_length, plan.flash_batch, plan.iterations,
                            plan.sparse_lines], "flash_length/flash_batch/iterations/sparse_lines")
  power_of_two = lambda v: isinstance(v, int) and v > 0 and not v & (v - 1)
  for q, k in plan.flash_blocks:
    for name, value in (("block_q", q), ("block_k", k)):
      if value is not None and not power_of_two(value):
        raise BenchmarkError(f"flash block {name}={value!r} must be a power of two")
  for block_k, key_chunk in plan.decode_tilings:
    if not (power_of_two(block_k) and isinstance(key_chunk, int) and key_chunk > 0
            and key_chunk % block_k == 0):
      raise BenchmarkError(f"decode tiling ({block_k!r}, {key_chunk!r}): block_k must be a "
                           f"power of two and key_chunk a positive multiple of it")
  bad_bits = [b for b in plan.kernel_bits if b not in quant_kernels.BITS]
  if bad_bits:
    raise BenchmarkError(f"kernel_bits={list(plan.kernel_bits)}: each must be one of "
                         f"{quant_kernels.BITS}")
  if "model" in plan.sections:
    benchmarking.check_plan(config, [plan.model_context], [plan.model_batch],
                            plan.decode_steps, methods=["full", *plan.methods],
                            compression_ratio=plan.compression_ratio)


def _timed(call, iterations: int, rounds: int = 3) -> float:
  """Best mean seconds per call over `rounds` rounds of `iterations` calls (compiled first)."""
  jax.block_until_ready(call())
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(iterations):
      out = call()
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / iterations)
  return best


def causal_flops(batch: int, heads: int, length: int, head_dim: int) -> float:
  """FLOPs of causal attention of `length` queries over as many keys: two matmuls of
  2*T*T*D each per head, half of them under the diagonal."""
  return 4 * batch * heads * length * length * head_dim / 2


def measure_decode_kernel(config: ModelConfig, plan: Plan, copy_gbps: float,
                          log=None) -> dict:
  """The default tiling's row per (context, batch), the plan's other tilings as tuning
  rows and the quantized kernel's rows (each of those records its error if it fails)."""
  def measured(c, b, **kernel):
    row = benchmarking.measure_decode_attention_kernel(config, b, c,
                                                       iterations=plan.iterations, **kernel)
    return {**row, "context_length": c, "copy_fraction": row["bandwidth_gbps"] / copy_gbps}

  def variant(c, b, **kernel):
    try:
      return measured(c, b, **kernel)
    except Exception as e:  # noqa: BLE001 - one variant failing must not stop the rest
      return {"context_length": c, "batch_size": b, **kernel, "error": _error(e)}

  rows, tuning, quantized = [], [], []
  for c in plan.kernel_contexts:
    for b in plan.kernel_batches:
      if log:
        log(f"decode kernel: context {c}, batch {b}")
      rows.append(measured(c, b))
      tuning += [variant(c, b, block_k=k, key_chunk=n) for k, n in plan.decode_tilings]
      quantized += [variant(c, b, bits=bits) for bits in plan.kernel_bits]
  return {"rows": rows, "tuning": tuning, "quantized": quantized}


def _flash_inputs(config: ModelConfig, batch: int, length: int, seed: int):
  """One layer's causal prefill: `length` queries over their own keys, slots in position
  order (as prefill writes them), random data."""
  b, t, h, k, d = batch, length, config.num_heads, config.num_kv_heads, config.head_dim
  dtype = jnp.dtype(config.dtype)
  qk, kk, vk = jax.random.split(jax.random.key(seed), 3)
  positions = jnp.arange(t, dtype=jnp.int32)
  return jax.block_until_ready((
      jax.random.normal(qk, (b, t, h, d), dtype), jax.random.normal(kk, (b, k, t, d), dtype),
      jax.random.normal(vk, (b, k, t, d), dtype), jnp.broadcast_to(positions, (b, t)),
      jnp.broadcast_to(positions, (b, k, t))))


_reference_attention = jax.jit(reference.attention)


def measure_flash_kernel(config: ModelConfig, batch: int, length: int, blocks=(None, None),
                         iterations: int = 10, seed: int = 0, interpret=None) -> dict:
  """Times the flash kernel on one layer's causal prefill (see `_flash_inputs`)."""
  args = _flash_inputs(config, batch, length, seed)
  block_q, block_k = blocks
  call = lambda: flash_kernels.flash_attention(*args, block_q=block_q, block_k=block_k,
                                               interpret=interpret)
  error = benchmarking.relative_error(call(), _reference_attention(*args))
  seconds = _timed(call, iterations)
  flops = causal_flops(batch, config.num_heads, length, config.head_dim)
  return {"batch_size": batch, "length": length, "heads": config.num_heads,
          "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
          "dtype": str(jnp.dtype(config.dtype)), "block_q": block_q, "block_k": block_k,
          "causal_flops": flops, "seconds": seconds, "tflops": flops / seconds / 1e12,
          "relative_error": error}


def measure_flash(config: ModelConfig, plan: Plan, seed: int = 0, log=None) -> dict:
  rows = []
  for blocks in plan.flash_blocks:
    if log:
      log(f"flash kernel: length {plan.flash_length}, batch {plan.flash_batch}, "
          f"blocks {blocks}")
    try:
      rows.append(measure_flash_kernel(config, plan.flash_batch, plan.flash_length,
                                       tuple(blocks), plan.iterations, seed))
    except Exception as e:  # noqa: BLE001 - one block size failing must not hide the rest
      rows.append({"block_q": blocks[0], "block_k": blocks[1], "error": _error(e)})
  timed = [r for r in rows if "error" not in r]
  best = max(timed, key=lambda r: r["tflops"]) if timed else None
  # XLA on the jnp reference at the same shape: the baseline the kernel should beat.
  if log:
    log("flash baseline: XLA on reference.attention")
  try:
    args = _flash_inputs(config, plan.flash_batch, plan.flash_length, seed)
    seconds = _timed(lambda: _reference_attention(*args), max(1, plan.iterations // 5))
    flops = causal_flops(plan.flash_batch, config.num_heads, plan.flash_length,
                         config.head_dim)
    baseline = {"seconds": seconds, "tflops": flops / seconds / 1e12}
  except Exception as e:  # noqa: BLE001
    baseline = {"error": _error(e)}
  return {"rows": rows, "best": best, "xla_reference": baseline,
          "speedup_vs_xla_reference": (baseline["seconds"] / best["seconds"]
                                       if best and "seconds" in baseline else None)}


def measure_sparse(config: ModelConfig, plan: Plan, flash: dict | None, seed: int = 0,
                   interpret=None) -> dict:
  """Times the vertical-slash kernel on the flash inputs: per head, `sparse_lines` vertical
  lines spread evenly over the prompt and the `sparse_lines` nearest diagonals (a local
  window), next to the flash kernel's best time at that shape (when it ran)."""
  args = _flash_inputs(config, plan.flash_batch, plan.flash_length, seed)
  b, t, h = plan.flash_batch, plan.flash_length, config.num_heads
  lines = min(plan.sparse_lines, t)
  spread = jnp.zeros((t,), bool).at[jnp.linspace(0, t - 1, lines).astype(jnp.int32)].set(True)
  vertical = jnp.broadcast_to(spread, (b, h, t))
  slash = jnp.broadcast_to(jnp.arange(t) < lines, (b, h, t))
  seconds = _timed(lambda: sparse_kernels.vertical_slash_attention(
      *args, vertical, slash, lines, lines, interpret=interpret), plan.iterations)
  best = (flash or {}).get("best")
  return {"batch_size": b, "length": t, "lines": lines, "seconds": seconds,
          # Keys a query reads at most: its lines (the dense causal prefill: T / 2 on average).
          "keys_per_query": 2 * lines,
          "flash_seconds": best["seconds"] if best else None,
          "speedup_vs_flash": best["seconds"] / seconds if best else None}


def measure_model(config: ModelConfig, plan: Plan, copy_gbps: float | None, seed: int = 0,
                  log=None) -> list[dict]:
  """Full cache vs each method at (model_context, model_batch), runs interleaved. Adds to
  each row its decode speedup and compression overhead against the full cache, and the
  decode step's bytes per second as a fraction of the copy bandwidth."""
  methods = benchmarking.build_methods(["full", *plan.methods], what="methods")
  cases = [(m, plan.compression_ratio, None) if m.needs_budget else (m, None, None)
           for m in methods]
  if log:
    log(f"model: random weights at {config.name or 'the given shape'}")
  model = random_params(config, seed)
  if log:
    log(f"model: {', '.join(m.label for m in methods)} at context {plan.model_context}, "
        f"batch {plan.model_batch} (runs interleaved)")
  rows = benchmarking.measure_methods(model, plan.model_context, plan.model_batch, cases,
                                      plan.decode_steps, plan.repeats, plan.warmup, seed)
  base = rows[0]
  for row in rows:
    row["decode_speedup"] = base["decode_step_seconds"] / row["decode_step_seconds"]
    row["compression_overhead_fraction"] = (row["prefill_seconds"] / base["prefill_seconds"]
                                            - 1)
    row["copy_fraction"] = row["decode_bandwidth_gbps"] / copy_gbps if copy_gbps else None
  return rows


def _goal(goal: Goal, subject: str, measured, reason: str | None = None) -> dict:
  return {"name": goal.name, "description": goal.description, "target": goal.target,
          "comparison": goal.comparison, "subject": subject, "measured": measured,
          "passed": None if measured is None else bool(goal.passes(measured)),
          "reason": reason if measured is None else None}


def evaluate_goals(report: dict) -> list[dict]:
  """Each goal next to the number it is judged on (from the report's sections)."""
  fraction, overhead = GOALS
  entries = []
  decode = report.get("decode")
  if not decode or "rows" not in decode:
    entries.append(_goal(fraction, "decode kernel", None, _missing(decode)))
  else:
    for r in decode["rows"]:
      subject = f"context {r['context_length']}, batch {r['batch_size']}"
      error = r.get("relative_error", 0.0)
      if not error <= MAX_RELATIVE_ERROR:  # NaN too: a wrong kernel's speed is not judged
        entries.append(_goal(fraction, subject, None, f"the kernel's output is off its "
                             f"reference (relative error {error:.2g} > "
                             f"{MAX_RELATIVE_ERROR})"))
      else:
        entries.append(_goal(fraction, subject, r[fraction.row_field]))
  model = report.get("model")
  if not model or "rows" not in model:
    entries.append(_goal(overhead, "compression methods", None, _missing(model)))
  else:
    for r in model["rows"][1:]:
      entries.append(_goal(overhead, r["method"], r[overhead.row_field]))
  return entries


def _missing(section) -> str:
  if section is None:
    return "section not run"
  return f"section failed: {section.get('error', 'no rows')}"


def _error(e: Exception) -> str:
  return f"{type(e).__name__}: {e}"


def run(config: ModelConfig, plan: Plan = Plan(), seed: int = 0,
        log: Callable[[str], None] | None = None,
        save: Callable[[dict], None] | None = None) -> dict:
  """Runs the check; returns the JSON-ready report (and hands it to `save` after each
  section). Sections that fail hold {"error", "traceback"} instead of rows."""
  check_plan(config, plan)
  start = time.perf_counter()
  report = {
      "device": benchmarking.device_info(),
      "jax_version": jax.__version__,
      "accelerator_missing": accelerator_missing(),
      "model_shape": {"name": config.name, "config": config.to_dict()},
      "plan": dataclasses.asdict(plan),
      "goals": [],
  }

  def section(name, measure):
    t0 = time.perf_counter()
    try:
      result = measure()
    except Exception as e:  # noqa: BLE001 - keep the other sections' numbers
      result = {"error": _error(e), "traceback": traceback.format_exc(limit=8)}
      if log:
        log(f"{name} failed: {result['error']}")
    result["seconds_spent"] = time.perf_counter() - t0
    report[name] = result
    report["goals"] = evaluate_goals(report)
    report["seconds_spent"] = time.perf_counter() - start
    if save:
      save(report)
    return result

  if log:
    log(f"copy bandwidth ({plan.copy_bandwidth_bytes >> 20} MiB)")
  copy = section("copy", lambda: {
      "gbps": benchmarking.measure_copy_bandwidth(plan.copy_bandwidth_bytes)})
  copy_gbps = copy.get("gbps")
  if "decode" in plan.sections:
    def decode():
      if copy_gbps is None:
        raise BenchmarkError("no copy bandwidth to compare with (that section failed)")
      return measure_decode_kernel(config, plan, copy_gbps, log)
    section("decode", decode)
  if "flash" in plan.sections:
    section("flash", lambda: measure_flash(config, plan, seed, log))
  if "sparse" in plan.sections:
    if log:
      log(f"sparse prefill kernel: length {plan.flash_length}, {plan.sparse_lines} lines")
    section("sparse", lambda: measure_sparse(config, plan, report.get("flash"), seed))
  if "model" in plan.sections:
    section("model", lambda: {"rows": measure_model(config, plan, copy_gbps, seed, log)})
  return report


def format_report(report: dict) -> str:
  """A short text summary: the sections' key numbers, then every goal with PASS/FAIL."""
  d = report["device"]
  lines = [f"device {d['device_kind']} ({d['platform']}), jax {report['jax_version']}, "
           f"shape {report['model_shape']['name']}"]
  if report["accelerator_missing"]:
    lines.append("WARNING: " + report["accelerator_missing"])
  copy = report.get("copy", {})
  lines.append(f"copy bandwidth: {copy['gbps']:.1f} GB/s" if "gbps" in copy
               else f"copy bandwidth: failed ({copy.get('error')})")
  for name in SECTIONS:
    sec = report.get(name)
    if sec is not None and "error" in sec:
      lines.append(f"{name}: FAILED: {sec['error']}")
  for r in report.get("decode", {}).get("rows", []):
    lines.append(f"decode kernel  context {r['context_length']:>6} batch {r['batch_size']:>2}: "
                 f"{r['bandwidth_gbps']:8.1f} GB/s = {r['copy_fraction']:.3f} of copy, "
                 f"{r['seconds'] * 1e6:.1f} us (error {r['relative_error']:.1e})")
  tuning = report.get("decode", {}).get("tuning", [])
  for r in tuning:
    lines.append(f"  tiling {r['block_k']}x{r['key_chunk']:<6} context {r['context_length']:>6} "
                 f"batch {r['batch_size']:>2}: " + (
                     f"FAILED: {r['error']}" if "error" in r else
                     f"{r['bandwidth_gbps']:8.1f} GB/s = {r['copy_fraction']:.3f} of copy"))
  for r in report.get("decode", {}).get("quantized", []):
    lines.append(f"quantized {r['bits']}-bit kernel context {r['context_length']:>6} batch "
                 f"{r['batch_size']:>2}: " + (
                     f"FAILED: {r['error']}" if "error" in r else
                     f"{r['bandwidth_gbps']:8.1f} GB/s = {r['copy_fraction']:.3f} of copy, "
                     f"{r['seconds'] * 1e6:.1f} us (error {r['relative_error']:.1e})"))
  flash = report.get("flash", {})
  for r in flash.get("rows", []):
    blocks = f"{r['block_q'] or 'default'}x{r['block_k'] or 'default'}"
    lines.append(f"flash kernel   blocks {blocks:<16} " + (
        f"FAILED: {r['error']}" if "error" in r else
        f"{r['seconds'] * 1e3:8.2f} ms = {r['tflops']:.1f} TFLOP/s "
        f"(error {r['relative_error']:.1e})"))
  ref = flash.get("xla_reference")
  if ref and "tflops" in ref:
    lines.append(f"flash baseline XLA on the jnp reference: {ref['seconds'] * 1e3:.2f} ms = "
                 f"{ref['tflops']:.1f} TFLOP/s")
  sparse = report.get("sparse", {})
  if "seconds" in sparse:
    speedup = sparse["speedup_vs_flash"]
    lines.append(f"sparse prefill {sparse['lines']} + {sparse['lines']} lines: "
                 f"{sparse['seconds'] * 1e3:.2f} ms" + (
                     f" ({speedup:.2f}x the dense flash kernel)" if speedup else ""))
  for r in report.get("model", {}).get("rows", []):
    lines.append(f"model {r['method']:<14} prefill {r['prefill_seconds']:8.3f} s "
                 f"(overhead {r['compression_overhead_fraction']:+.1%}), decode "
                 f"{r['decode_step_seconds'] * 1e3:7.2f} ms/step (speedup "
                 f"{r['decode_speedup']:.2f}x)")
  lines.append("goals:")
  for g in report["goals"]:
    verdict = ("n/a: " + g["reason"] if g["passed"] is None else
               "PASS" if g["passed"] else "FAIL")
    measured = "-" if g["measured"] is None else f"{g['measured']:.3f}"
    lines.append(f"  {g['name']} {g['comparison']} {g['target']:g} [{g['subject']}]: "
                 f"{measured} {verdict}")
  return "\n".join(lines)
