"""Side-by-side speed against Hugging Face transformers on the same weights.

Used by `scripts/benchmark.py --baseline=transformers` and callable the same way:

    from kvjax import benchmarking_baseline as baseline
    report = baseline.run("transformers", "smollm2-135m", context_lengths=[512],
                          batch_sizes=[1], decode_steps=8, repeats=2, warmup=1)
    print(baseline.format_table(report))

Both libraries load the same file (a registry GGUF through transformers' GGUF loader, or a
Hugging Face directory), run float32, and generate greedily from the same random prompts
(no padding). Every run is one end-to-end generation: prefill, the first token on the host,
then `decode_steps` more greedy tokens. Repeats are interleaved (kvjax runs, then
transformers runs, the order flipping every round) so a noisy machine slows both alike;
each speed ratio is the median of the per-repeat ratios of paired runs. Compressed kvjax
caches are timed too, but transformers runs only its full cache, so their ratios are against
that. torch, transformers (and gguf/accelerate for GGUF files) are optional: they are
imported only here, only when a baseline is asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import os
import pathlib
import statistics
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.benchmarking import (BenchmarkError, MethodCase, _check_count, _method_info,
                                _prompt, check_plan, device_info)
from kvjax.cache import cache_nbytes
from kvjax.evaluation import report as report_lib
from kvjax.generation import context, engine
from kvjax.loading import assets
from kvjax.loading import load as load_lib

BASELINES = ("transformers",)
# OMP_WAIT_POLICY as it was when import_transformers first imported torch in this process
# (libgomp reads it then); empty if torch was imported elsewhere first.
_POLICY_AT_TORCH_IMPORT = {}
# (JSON key, table name) of each timed quantity; ratios are paired per repeat.
TIMES = (("prefill_seconds", "prefill"), ("time_to_first_token_seconds", "time_to_first_token"),
         ("decode_step_seconds", "decode_step"), ("generate_seconds", "generate"))
RATIO_DEFINITION = ("kvjax speed / transformers speed (= transformers time / kvjax time) of "
                    "the paired runs of each repeat; the reported value is the median of the "
                    "per-repeat ratios. Compressed kvjax caches are divided by transformers' "
                    "full cache: transformers runs only its full cache (a DynamicCache) here.")
TIMING_DEFINITION = {
    "prefill_seconds": "one forward pass over the prompt until its last-position logits and "
                       "the cache are ready (kvjax: compression included)",
    "time_to_first_token_seconds": "prefill plus the greedy first token on the host",
    "decode_step_seconds": "(generate - time to first token) / decode_steps: one greedy "
                           "token per row per step",
    "generate_seconds": "the whole run: prefill, first token and decode_steps more tokens",
    "compile_seconds": "kvjax only: compiling this shape's steps, over all its runs; never "
                       "inside the timings",
}


# scripts/benchmark.py flags only one of its modes reads: True = only with --baseline,
# False = only without it.
MODE_FLAGS = {"torch_threads": True, "plot_out": True, "ops": True, "shape": False,
              "prefill_chunk_size": False, "hbm_bandwidth_gbps": False,
              "copy_bandwidth_mib": False}


def check_flags(baseline, given: Sequence[str]) -> None:
  """A flag the chosen mode would ignore is an error, not silently dropped."""
  for name in given:
    if MODE_FLAGS[name] and baseline is None:
      raise BenchmarkError(f"--{name} applies only with --baseline={list(BASELINES)}")
    if not MODE_FLAGS[name] and baseline is not None:
      raise BenchmarkError(f"--{name} does not apply with --baseline={baseline!r} (the "
                           f"side-by-side run loads --model in both libraries, unchunked)")


def check_baseline(name) -> str:
  if not isinstance(name, str) or name.strip().lower() not in BASELINES:
    raise BenchmarkError(f"baseline={name!r} is not supported; allowed: {list(BASELINES)}")
  return name.strip().lower()


@contextlib.contextmanager
def pinned_torch_threads(torch, threads: int):
  """torch's intra-op thread count set to `threads` inside, restored after."""
  before = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    yield
  finally:
    torch.set_num_threads(before)


def check_torch_threads(value) -> int:
  """None -> os.cpu_count() (the cores XLA's CPU client uses too)."""
  return _check_count((os.cpu_count() or 1) if value is None else value, "torch_threads")


def import_transformers(omp_wait_policy: str | None = None):
  """(torch, transformers), or an error saying what to install.

  omp_wait_policy: OMP_WAIT_POLICY for torch's OpenMP threads, set (unless the environment
  sets it) before torch is first imported. libgomp reads it once, when it is loaded: a
  process that has imported torch (or another library with libgomp) already keeps the
  policy it had (`omp_wait_policy()` reports what is known).
  """
  if "torch" not in sys.modules:
    if omp_wait_policy is not None:
      os.environ.setdefault("OMP_WAIT_POLICY", omp_wait_policy)
    _POLICY_AT_TORCH_IMPORT["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
  try:
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
  except ImportError as e:
    raise BenchmarkError(f"baseline='transformers' needs the optional packages torch and "
                         f"transformers (and gguf + accelerate for GGUF files), e.g. "
                         f"pip install 'kvjax[test]'; import failed: {e}") from e
  return torch, transformers


def omp_wait_policy() -> dict:
  """For a report: the OMP_WAIT_POLICY torch's OpenMP threads run under (None: unset,
  libgomp's default, which spins a while after each op) and whether that is known, i.e.
  `import_transformers` first imported torch and saw it; if not, the environment's value
  now, which libgomp may not have read."""
  known = "omp_wait_policy" in _POLICY_AT_TORCH_IMPORT
  return {"omp_wait_policy": _POLICY_AT_TORCH_IMPORT["omp_wait_policy"] if known
                             else os.environ.get("OMP_WAIT_POLICY"),
          "omp_wait_policy_known": known}


def _gguf_of(source) -> pathlib.Path | None:
  """The GGUF file behind a registry name or a .gguf path (None: not a GGUF source)."""
  text = os.fspath(source)
  if text.lower() in load_lib.MODELS:
    return assets.fetch(load_lib.MODELS[text.lower()])
  path = pathlib.Path(text).expanduser()
  return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def load_transformers(source, torch_device: str = "cpu"):
  """The transformers model of a kvjax source, float32, in eval mode.

  source: a registry name or .gguf file (transformers' GGUF loader dequantizes the same file
  kvjax converts), or a Hugging Face directory (config.json + safetensors).
  """
  torch, transformers = import_transformers()
  gguf = _gguf_of(source)
  path = pathlib.Path(os.fspath(source)).expanduser()
  if gguf is not None:
    where = dict(pretrained_model_name_or_path=gguf.parent, gguf_file=gguf.name)
  elif path.is_dir() and (path / "config.json").is_file():
    where = dict(pretrained_model_name_or_path=path)
  else:
    raise BenchmarkError(f"transformers cannot load model {os.fspath(source)!r}: give a "
                         f"registry name, a .gguf file or a Hugging Face directory "
                         f"(config.json + *.safetensors)")
  hf = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
  return hf.to(torch_device).eval()


# --- One end-to-end generation per library ------------------------------------------------

@dataclasses.dataclass
class Run:
  """One timed generation: seconds since its start, and the greedy tokens [B, steps + 1]."""
  prefill: float
  first_token: float
  total: float
  tokens: np.ndarray

  def times(self) -> dict:
    steps = self.tokens.shape[1] - 1
    return {"prefill_seconds": self.prefill, "time_to_first_token_seconds": self.first_token,
            "decode_step_seconds": (self.total - self.first_token) / steps,
            "generate_seconds": self.total}


def run_kvjax(model, tokens: np.ndarray, mask: np.ndarray, method, keep, room: int,
              decode_steps: int, steps: engine.CompiledSteps = engine.STEPS):
  """(Run, facts) of kvjax: `context.prefill` then `steps.decode_loop`, as `generate` does.

  Compilation (tracked by `steps`) is subtracted from every span. The only kvjax timing in
  this module.
  """
  compile_start = steps.compile_seconds
  start = time.perf_counter()
  pre = context.prefill(model, tokens, mask, method, keep, room, steps=steps)
  jax.block_until_ready((pre.logits, pre.cache))
  prefill_end = time.perf_counter()
  compiled = steps.compile_seconds - compile_start
  first = np.asarray(pre.logits).argmax(-1)  # on the host: no small jit compiled here
  first_end = time.perf_counter()
  key = jax.random.key(0)  # greedy decoding ignores it
  # One compiled loop of all the steps, as generate decodes (no EOS: nothing stops early).
  generated, _, cache, _, _ = steps.decode_loop(
      model, jnp.asarray(first, jnp.int32), pre.cache, key, 1, decode_steps, 1.0, 1.0, True,
      [], decode_steps, plan=pre.decode_plan)
  end = time.perf_counter()
  total_compiled = steps.compile_seconds - compile_start
  run = Run(prefill=prefill_end - start - compiled, first_token=first_end - start - compiled,
            total=end - start - total_compiled,
            tokens=np.concatenate([first[:, None], generated], axis=1))
  facts = {"cache_bytes": cache_nbytes(cache), "context_cache_bytes": pre.context_cache_bytes,
           "compile_seconds": total_compiled}
  return run, facts


def _cache_keyword(hf_model) -> str:
  # transformers 5.2x renamed forward's past_key_values to cache (the old name warns).
  names = inspect.signature(hf_model.forward).parameters
  return "cache" if "cache" in names else "past_key_values"


def run_transformers(hf_model, tokens: np.ndarray, decode_steps: int):
  """(Run, cache bytes) of transformers: one forward of the prompt into a DynamicCache, then
  one forward per token; greedy argmax, under torch.inference_mode."""
  torch, transformers = import_transformers()
  device = next(hf_model.parameters()).device
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  keyword = _cache_keyword(hf_model)
  with torch.inference_mode():
    ids = torch.from_numpy(np.asarray(tokens, np.int64)).to(device)
    sync()
    start = time.perf_counter()
    cache = transformers.DynamicCache(config=hf_model.config)
    # logits_to_keep=1: only the last position's logits, as generate (and kvjax) compute.
    logits = hf_model(input_ids=ids, use_cache=True, logits_to_keep=1,
                      **{keyword: cache}).logits[:, -1]
    sync()
    prefill_end = time.perf_counter()
    next_tokens = logits.argmax(-1)
    first = next_tokens.cpu().numpy()
    first_end = time.perf_counter()
    generated = []
    for _ in range(decode_steps):
      logits = hf_model(input_ids=next_tokens[:, None], use_cache=True,
                        **{keyword: cache}).logits[:, -1]
      next_tokens = logits.argmax(-1)
      generated.append(next_tokens)
    sync()
    end = time.perf_counter()
    rows = [first] + [t.cpu().numpy() for t in generated]
  run = Run(prefill=prefill_end - start, first_token=first_end - start, total=end - start,
            tokens=np.stack(rows, axis=1).astype(np.int32))
  return run, _dynamic_cache_nbytes(cache)


def _dynamic_cache_nbytes(cache) -> int | None:
  layers = getattr(cache, "layers", None)
  if not layers:
    return None
  return int(sum(t.nelement() * t.element_size() for layer in layers
                 for t in (layer.keys, layer.values) if t is not None))


# --- Paired rows --------------------------------------------------------------------------

def first_mismatch(ours: np.ndarray, theirs: np.ndarray) -> dict | None:
  """The first (row, index) where two [B, N] token arrays differ, or None."""
  for row, (a, b) in enumerate(zip(ours, theirs)):
    differ = np.flatnonzero(a != b)
    if differ.size:
      i = int(differ[0])
      return {"row": row, "index": i, "kvjax": int(a[i]), "transformers": int(b[i])}
  return None


def _matching_prefix(ours: np.ndarray, theirs: np.ndarray) -> int:
  """Tokens both libraries agree on from the start, over every row (the fewest)."""
  same = np.cumprod(ours == theirs, axis=1).sum(1)
  return int(same.min())


def _summary(runs: Sequence[Run], batch_size: int, context_length: int) -> dict:
  times = {name: [r.times()[name] for r in runs] for name, _ in TIMES}
  medians = {name: statistics.median(values) for name, values in times.items()}
  return {**medians,
          "prefill_tokens_per_second": batch_size * context_length / medians["prefill_seconds"],
          "decode_tokens_per_second": batch_size / medians["decode_step_seconds"],
          "times": times}


def paired_ratios(ours: dict, theirs: dict) -> tuple[dict, dict]:
  """(median ratios, per-repeat ratios) of kvjax speed / transformers speed per quantity."""
  per_repeat = {label: [t / o for o, t in zip(ours["times"][name], theirs["times"][name])]
                for name, label in TIMES}
  return {label: statistics.median(r) for label, r in per_repeat.items()}, per_repeat


@dataclasses.dataclass
class _Case(MethodCase):
  runs: list = dataclasses.field(default_factory=list)


def _cases(method_objs, context_length, decode_steps, compression_ratio, budget):
  # The shared ratio/budget goes only to methods that take one (a quantizer keeps all).
  return [_Case.build(m, context_length, decode_steps,
                      *((compression_ratio, budget) if m.needs_budget else (None, None)))
          for m in method_objs]


def measure_shape(model, hf_model, context_length: int, batch_size: int, method_objs,
                  decode_steps: int, repeats: int, warmup: int, seed: int = 0,
                  compression_ratio=None, budget=None) -> list[dict]:
  """Rows for one (context length, batch size): the full cache first, then each method."""
  cases = _cases(method_objs, context_length, decode_steps, compression_ratio, budget)
  tokens, mask, _ = _prompt(model.config, context_length, batch_size, None, seed)
  theirs, their_bytes = [], None
  for round_index in range(warmup + repeats):
    timed = round_index >= warmup
    # The order flips every round, so neither library always runs on a warmer machine.
    for library in ("kvjax", "transformers")[::1 if round_index % 2 == 0 else -1]:
      if library == "transformers":
        run, their_bytes = run_transformers(hf_model, tokens, decode_steps)
        if timed:
          theirs.append(run)
        continue
      for case in cases:
        run, case.facts = run_kvjax(model, tokens, mask, case.method, case.keep, case.room,
                                    decode_steps)
        case.compile_seconds += case.facts["compile_seconds"]
        if timed:
          case.runs.append(run)

  their_summary = {"method": "full", "cache": "DynamicCache", "cache_bytes": their_bytes,
                   **_summary(theirs, batch_size, context_length)}
  rows = []
  for case in cases:
    summary = _summary(case.runs, batch_size, context_length)
    summary.update(compile_seconds=case.compile_seconds, cache_bytes=case.facts["cache_bytes"],
                   context_cache_bytes=case.facts["context_cache_bytes"])
    ratios, per_repeat = paired_ratios(summary, their_summary)
    full = not case.method.compresses
    ours_tokens, their_tokens = case.runs[-1].tokens, theirs[-1].tokens
    mismatch = first_mismatch(ours_tokens, their_tokens) if full else None
    rows.append({
        "method": case.method.label, "compression_ratio": case.compression_ratio,
        "budget": case.budget, "keep_tokens": case.keep, "context_length": context_length,
        "batch_size": batch_size, "decode_steps": decode_steps, "room_tokens": case.room,
        "repeats": repeats, "warmup": warmup,
        "compared_with": "transformers full cache",
        "kvjax": summary, "transformers": their_summary,
        "speed_ratios": ratios, "speed_ratios_per_repeat": per_repeat,
        # Only the full cache must give transformers' tokens; a compressed one may drift.
        "tokens_match": (mismatch is None) if full else None,
        "first_mismatch": mismatch,
        "matching_prefix_tokens": _matching_prefix(ours_tokens, their_tokens),
        "kvjax_tokens": ours_tokens.tolist(), "transformers_tokens": their_tokens.tolist(),
    })
  return rows


def _check_same_model(config, hf_model) -> None:
  hf = hf_model.config
  ours = (config.vocab_size, config.num_layers, config.hidden_size)
  theirs = (hf.vocab_size, hf.num_hidden_layers, hf.hidden_size)
  if ours != theirs:
    raise BenchmarkError(f"the kvjax and transformers models differ: (vocab, layers, hidden) "
                         f"{ours} vs {theirs}; load both from the same source")
  if config.dtype != "float32":
    raise BenchmarkError(f"the side-by-side benchmark runs float32 in both libraries; got "
                         f"kvjax dtype={config.dtype!r} (drop --dtype or pass float32)")


def compare(model, hf_model, context_lengths: Sequence[int], batch_sizes: Sequence[int],
            decode_steps: int = 32, repeats: int = 3, warmup: int = 2, methods=None,
            compression_ratio=None, budget=None, seed: int = 0, torch_threads=None,
            source: str | None = None, log=None) -> dict:
  """Times kvjax against an already loaded transformers model; returns the JSON-ready report.

  methods: names or method objects; the full cache is always measured first, and it alone
  is run by transformers (and checked for identical greedy tokens). torch_threads: torch's
  intra-op threads for the run (default os.cpu_count()); restored afterwards.
  """
  torch, transformers = import_transformers()
  threads = check_torch_threads(torch_threads)
  repeats = _check_count(repeats, "repeats")
  warmup = _check_count(warmup, "warmup", minimum=0)
  _check_same_model(model.config, hf_model)
  method_objs = check_plan(model.config, context_lengths, batch_sizes, decode_steps,
                           methods=methods, compression_ratio=compression_ratio, budget=budget)
  with pinned_torch_threads(torch, threads):
    results = []
    for c in context_lengths:
      for b in batch_sizes:
        if log:
          log(f"measuring context_length={c} batch_size={b}: kvjax "
              f"{', '.join(m.label for m in method_objs)} and transformers full, interleaved")
        rows = measure_shape(model, hf_model, c, b, method_objs, decode_steps, repeats,
                             warmup, seed, compression_ratio, budget)
        for row in rows:
          if row["tokens_match"] is False and log:
            log(f"WARNING: TOKENS DIFFER at context_length={c} batch_size={b} (full cache): "
                f"first mismatch {row['first_mismatch']}")
        results.extend(rows)
    used_threads = torch.get_num_threads()
  full_rows = [r for r in results if r["tokens_match"] is not None]
  device = next(hf_model.parameters()).device
  return {
      "device": device_info(),
      "jax_version": jax.__version__,
      "torch_version": torch.__version__,
      "transformers_version": transformers.__version__,
      "baseline": "transformers",
      "threads": {"torch_threads": used_threads, "torch_device": str(device),
                  "cpu_count": os.cpu_count(), **omp_wait_policy(),
                  "xla": "XLA's CPU client sizes its own thread pool to the machine's cores"},
      "model": {"name": model.config.name, "source": source, "num_params": model.num_params(),
                "config": model.config.to_dict()},
      "transformers_model": {"class": type(hf_model).__name__, "dtype": str(hf_model.dtype),
                             "attn_implementation": getattr(hf_model.config,
                                                            "_attn_implementation", None)},
      "methods": [_method_info(m, compression_ratio, budget) for m in method_objs],
      "baseline_method": "full",
      "compression_ratio": compression_ratio,
      "budget": budget,
      "decode_steps": decode_steps,
      "repeats": repeats,
      "warmup": warmup,
      "seed": seed,
      "prompts": "random token ids, no padding (the same for both libraries)",
      "ratio_definition": RATIO_DEFINITION,
      "compressed_rows_compared_with": "transformers' full cache (the only cache it runs here)",
      "timing_definition": TIMING_DEFINITION,
      "tokens_match": all(r["tokens_match"] for r in full_rows),
      "results": results,
  }


def run(baseline, source, context_lengths: Sequence[int], batch_sizes: Sequence[int],
        decode_steps: int = 32, repeats: int = 3, warmup: int = 2, methods=None,
        compression_ratio=None, budget=None, seed: int = 0, torch_threads=None,
        dtype: str | None = None, log=None) -> dict:
  """Loads `source` in kvjax and in the baseline library, then `compare`s them.

  Arguments are checked before anything is loaded or timed.
  """
  check_baseline(baseline)
  check_torch_threads(torch_threads)
  import_transformers()
  if dtype not in (None, "float32"):
    raise BenchmarkError(f"the side-by-side benchmark runs float32 in both libraries; got "
                         f"dtype={dtype!r}")
  model = load_lib.load(source, dtype="float32")
  check_plan(model.config, context_lengths, batch_sizes, decode_steps, methods=methods,
             compression_ratio=compression_ratio, budget=budget)
  platform = jax.default_backend()
  torch, _ = import_transformers()
  torch_device = "cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu"
  if log:
    log(f"loading {source} in transformers ({torch_device}, float32)")
  hf_model = load_transformers(source, torch_device)
  return compare(model, hf_model, context_lengths, batch_sizes, decode_steps, repeats, warmup,
                 methods, compression_ratio, budget, seed, torch_threads, os.fspath(source),
                 log)


# --- Printing and plotting ----------------------------------------------------------------

def _host_line(device: dict) -> str:
  host = device.get("host_cpu") or {}  # absent from reports written before it was recorded
  extensions = ", ".join(host.get("vector_extensions", [])) or "none recorded"
  return (f"host {host.get('model') or 'unknown CPU'}, {host.get('cores') or '?'} cores "
          f"({extensions})")


def format_table(report: dict) -> str:
  """One line per (context, batch, method): both libraries' medians and the paired ratios."""
  device, threads = report["device"], report["threads"]
  lines = [
      f"device {device['device_kind']} ({device['platform']}), jax {report['jax_version']}, "
      f"torch {report['torch_version']} ({threads['torch_device']}, torch_threads="
      f"{threads['torch_threads']}), transformers {report['transformers_version']}",
      _host_line(device),
      f"model {report['model']['name']} ({report['model']['num_params'] / 1e6:.1f}M params, "
      f"float32), {report['decode_steps']} decode steps, {report['repeats']} repeats after "
      f"{report['warmup']} warmup, interleaved",
  ]
  header = (f"{'method':<16} {'ctx':>6} {'batch':>5} | {'prefill tok/s kv/hf':>19} {'x':>5} | "
            f"{'TTFT ms kv/hf':>15} {'x':>5} | {'decode ms/step kv/hf':>20} {'x':>5} | "
            f"{'generate s kv/hf':>17} {'x':>5} | {'compile s':>9} | tokens")
  lines += [header, "-" * len(header)]
  for r in report["results"]:
    ours, theirs, x = r["kvjax"], r["transformers"], r["speed_ratios"]
    if r["tokens_match"] is None:
      tokens = f"(compressed: {r['matching_prefix_tokens']} leading agree)"
    elif r["tokens_match"]:
      tokens = "match"
    else:
      m = r["first_mismatch"]
      tokens = f"MISMATCH at row {m['row']} token {m['index']}"
    lines.append(
        f"{r['method']:<16} {r['context_length']:>6} {r['batch_size']:>5} | "
        f"{ours['prefill_tokens_per_second']:>9.0f}/{theirs['prefill_tokens_per_second']:<9.0f}"
        f" {x['prefill']:>5.2f} | "
        f"{ours['time_to_first_token_seconds'] * 1e3:>7.1f}/"
        f"{theirs['time_to_first_token_seconds'] * 1e3:<7.1f} {x['time_to_first_token']:>5.2f} | "
        f"{ours['decode_step_seconds'] * 1e3:>9.2f}/{theirs['decode_step_seconds'] * 1e3:<10.2f}"
        f" {x['decode_step']:>5.2f} | "
        f"{ours['generate_seconds']:>8.3f}/{theirs['generate_seconds']:<8.3f} "
        f"{x['generate']:>5.2f} | {ours['compile_seconds']:>9.1f} | {tokens}")
  lines.append("x: kvjax speed / transformers speed, median of the per-repeat paired ratios "
               "(> 1: kvjax faster); compressed rows are against transformers' full cache")
  if not report["tokens_match"]:
    lines.append("WARNING: the full cache's greedy tokens differ from transformers' (see "
                 "first_mismatch in the JSON)")
  return "\n".join(lines)


def write_plot(report: dict, path) -> str:
  """PNG: prefill seconds and decode ms/step against context length, one line per library,
  method and batch size (transformers: its full cache only)."""
  fig, axes = report_lib._figure(1, 2, width=5.0, height=3.6)  # headless, saved atomically
  lines = {}
  for r in report["results"]:
    for library in ("kvjax", "transformers"):
      if library == "transformers" and r["method"] != report["baseline_method"]:
        continue  # the same transformers runs again
      method = r["method"] if library == "kvjax" else "full"
      lines.setdefault((library, method, r["batch_size"]), []).append(
          (r["context_length"], r[library]["prefill_seconds"],
           r[library]["decode_step_seconds"] * 1e3))
  for (library, method, batch), points in lines.items():
    xs, prefill, decode = zip(*sorted(points))
    name = f"{library} {method}" if library == "kvjax" else library
    style = dict(label=f"{name}, batch {batch}", marker="o", markersize=4,
                 linestyle="-" if library == "kvjax" else "--")
    axes[0, 0].plot(xs, prefill, **style)
    axes[0, 1].plot(xs, decode, **style)
  for ax, title in zip(axes.flat, ("prefill (s)", "decode (ms/step)")):
    ax.set_xlabel("context length (tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
  fig.suptitle(f"{report['model']['name']}: kvjax vs transformers, float32 "
               f"(torch_threads={report['threads']['torch_threads']})", fontsize=10)
  axes[0, 1].legend(fontsize=7)
  return report_lib._save(fig, path)
