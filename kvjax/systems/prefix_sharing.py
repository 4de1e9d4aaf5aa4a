"""BatchLLM: generation for a batch known in advance, each shared prefix prefilled once.

    result = kvjax.systems.generate_shared(model, prompts, max_new_tokens=32,
                                           memory_budget_bytes=2 << 30)

1. `prefix_tree.group_by_prefix` gives every prompt one shared prefix (the grouping that
   saves the most prefill tokens).
2. Groups are cut into slices of at most `rows_per_prefix` rows and packed, those with the
   most decode tokens per prefill token first, into waves whose cache stays within
   `memory_budget_bytes` (measured as the arrays the wave allocates). A group's prefix
   lives for exactly its wave.
3. Per wave: the groups' prefixes are prefilled once (and compressed once, given a
   method), every row's suffix is prefilled over its prefix, and decoding reads each
   prefix once per group (`SharedPrefixLayerCache`).
The tokens equal `kvjax.generate` of each prompt up to float rounding (the attention over
prefix and suffix is merged by log-sum-exp instead of one softmax).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import calibration
from kvjax import methods as methods_lib
from kvjax import validation
from kvjax.cache import kv_cache
from kvjax.cache.shared_prefix import shared_prefix_cache
from kvjax.errors import GenerationError
from kvjax.generation import context, engine, inputs, sampling
from kvjax.methods import base
from kvjax.generation.generate import (GenerationResult, _validate_sampling,
                                       check_context_length, complete, eos_ids)
from kvjax.systems.prefix_tree import PrefixGroup, group_by_prefix

FULL = methods_lib.get("full")


def check_prefill_method(owner: str, method) -> None:
  """`method` compresses a prompt once at prefill into dense layers (or is the full
  cache): what a shared prefix or a server row can hold."""
  if not method.compresses:
    return
  base.check_prefill_press(owner, method)
  if method.rescores or method.compresses_prompt or method.reads_context:
    raise GenerationError(f"{owner}: method {method.label!r} re-reads the prompt to compress "
                          f"it; use one that selects tokens in one prefill, e.g. snapkv")


@dataclasses.dataclass(frozen=True)
class Wave:
  """Rows decoded together: slices of (prefix length, member requests), each padded to
  `rows_per_prefix` rows by repeating its first member (a repeat's tokens are dropped)."""
  slices: tuple[tuple[int, tuple[int, ...]], ...]
  rows_per_prefix: int
  prefix_width: int
  suffix_width: int
  cache_bytes: int                      # the wave's cache as allocated

  @property
  def rows(self) -> int:
    return len(self.slices) * self.rows_per_prefix


@functools.lru_cache(maxsize=4096)
def wave_cache_bytes(config, slices: int, rows_per_prefix: int, prefix_width: int,
                     suffix_capacity: int) -> int:
  """Bytes of a wave's uncompressed shared-prefix cache (traced, nothing allocated)."""
  shapes = jax.eval_shape(lambda: shared_prefix_cache(
      kv_cache.init_cache(config, slices, prefix_width), rows_per_prefix, suffix_capacity))
  return kv_cache.nbytes(shapes)


def _wave(config, slices, lengths, max_new_tokens: int) -> Wave:
  rows = max(len(members) for _, members in slices)
  prefix_width = inputs.bucket(max(p for p, _ in slices))
  suffix_width = inputs.bucket(max(lengths[i] - p for p, members in slices for i in members))
  return Wave(slices=tuple(slices), rows_per_prefix=rows, prefix_width=prefix_width,
              suffix_width=suffix_width,
              cache_bytes=wave_cache_bytes(config, len(slices), rows, prefix_width,
                                           suffix_width + max_new_tokens))


def plan_waves(config, groups: Sequence[PrefixGroup], lengths: Sequence[int],
               max_new_tokens: int, rows_per_prefix: int,
               memory_budget_bytes: int | None = None) -> list[Wave]:
  """Slices and waves for `groups` (prompt `lengths` in tokens): no wave's cache exceeds
  the budget. Groups with the most decode work per prefill token go first (BatchLLM's
  order); a group with no shared prefix runs in waves of its own, where nothing is shared.
  """
  def ratio(g):
    prefill = g.prefix_length + sum(lengths[i] - g.prefix_length for i in g.members)
    return max_new_tokens * len(g.members) / prefill

  ordered = sorted(groups, key=lambda g: (g.prefix_length == 0, -ratio(g), g.members[0]))
  pending = [(g.prefix_length, g.members[i:i + rows_per_prefix])
             for g in ordered for i in range(0, len(g.members), rows_per_prefix)]
  fits = lambda wave: memory_budget_bytes is None or wave.cache_bytes <= memory_budget_bytes
  waves, current = [], []
  while pending:
    piece = pending.pop(0)
    unshared_switch = current and (current[0][0] == 0) != (piece[0] == 0)
    if current and not unshared_switch and fits(_wave(config, current + [piece], lengths,
                                                      max_new_tokens)):
      current.append(piece)
      continue
    if current:
      waves.append(_wave(config, current, lengths, max_new_tokens))
      current = []
    alone = _wave(config, [piece], lengths, max_new_tokens)
    if fits(alone):
      current = [piece]
      continue
    prefix_length, members = piece
    if len(members) == 1:
      raise GenerationError(
          f"memory_budget_bytes={memory_budget_bytes} cannot hold even request "
          f"{members[0]} alone ({alone.cache_bytes} bytes for its {prefix_length}-token "
          f"prefix and {lengths[members[0]] - prefix_length} + {max_new_tokens} tokens); "
          f"raise the budget")
    half = (len(members) + 1) // 2
    pending[:0] = [(prefix_length, members[:half]), (prefix_length, members[half:])]
  if current:
    waves.append(_wave(config, current, lengths, max_new_tokens))
  return waves


def take_rows(cache, index: np.ndarray):
  """`cache` with rows `index` (repeats allowed; scalar leaves such as `end` kept)."""
  take = lambda a: jnp.take(a, jnp.asarray(index), axis=0) if a.ndim else a
  return jax.tree_util.tree_map(take, cache)


def _run_wave(model, wave: Wave, encoded, method, keep_for, max_new_tokens, sampling_args,
              seed: int, steps) -> tuple[dict, dict]:
  """Prefills a wave's prefixes once and its rows' suffixes, then decodes every row."""
  pad = inputs.pad_id(model)
  unique = sorted({(p, members[0]) for p, members in wave.slices})
  # One prefill per distinct prefix in the wave, whatever the number of its slices.
  prefix_of = {}
  rows = []
  for p, first in unique:
    prefix = tuple(encoded[first][:p])
    if prefix not in prefix_of:
      prefix_of[prefix] = len(rows)
      rows.append(list(prefix))
  tokens, mask = inputs.left_pad(rows, pad, wave.prefix_width)
  lengths = [len(r) for r in rows]
  # The wave of requests that share nothing has empty prefixes: nothing to compress.
  compressed = method.compresses and min(lengths) > 0
  keep = keep_for(lengths) if compressed else None
  prefilled = context.prefill(model, tokens, mask, method if compressed else FULL, keep,
                              room=0, steps=steps)
  index = np.array([prefix_of[tuple(encoded[m[0]][:p])] for p, m in wave.slices])
  prefixes = take_rows(prefilled.cache, index)
  del prefilled  # only the slices' copies stay
  cache = shared_prefix_cache(prefixes, wave.rows_per_prefix,
                              wave.suffix_width + max_new_tokens)
  members = [m[i] if i < len(m) else m[0] for _, m in wave.slices
             for i in range(wave.rows_per_prefix)]
  starts = [p for p, _ in wave.slices for _ in range(wave.rows_per_prefix)]
  suffixes = [encoded[r][s:] for r, s in zip(members, starts)]
  suffix_tokens, suffix_mask = inputs.left_pad(suffixes, pad, wave.suffix_width)
  logits, cache = steps.prefill(model, jnp.asarray(suffix_tokens), jnp.asarray(suffix_mask),
                                cache, logits="last")
  cache_bytes = kv_cache.nbytes(cache)
  # Each row samples from its request's own stream (a padding row repeats its request's).
  done = complete(model, logits, cache, None, max_new_tokens=max_new_tokens, steps=steps,
                  seed=[sampling.offset_seed(seed, r) for r in members], **sampling_args)
  out = {}
  for row, request in enumerate(members):
    out.setdefault(request, (done.texts[row], done.token_ids[row]))
  wave_stats = {"rows": wave.rows, "slices": len(wave.slices),
                "rows_per_prefix": wave.rows_per_prefix, "prefix_width": wave.prefix_width,
                "suffix_width": wave.suffix_width, "planned_cache_bytes": wave.cache_bytes,
                "cache_bytes": cache_bytes, "prefixes_prefilled": len(rows),
                "prefix_tokens_prefilled": sum(lengths),
                # Padding rows (repeats of a slice's first request) are computed too.
                "suffix_tokens_prefilled": int(sum(map(len, suffixes))),
                "compressed_prefixes": compressed}
  return out, wave_stats


def generate_shared(model, prompts, max_new_tokens: int = 64, *, method=None,
                    compression_ratio=None, budget=None, memory_budget_bytes: int | None = None,
                    rows_per_prefix: int = 8, min_prefix_tokens: int = 1,
                    temperature: float = 0.0, top_p: float = 1.0,
                    seed: int = 0, eos_token_ids: Sequence[int] | None = None,
                    chat_template: bool | None = None,
                    steps: engine.CompiledSteps = engine.STEPS) -> GenerationResult:
  """Generates every prompt of an offline batch, sharing common prefixes (BatchLLM).

  prompts: list[str] or token ids (list[list[int]]). method / compression_ratio / budget:
  compress each shared prefix once (kvjax.generate's meaning; suffixes stay whole).
  memory_budget_bytes: the most bytes a wave's cache may allocate (None: no bound).
  rows_per_prefix: the most rows decoded against one prefix copy (a larger group is cut
  into several slices that share one prefill; a wave pads every slice to its largest
  with repeated rows, whose work is counted in the stats). min_prefix_tokens: the shortest
  prefix that gets a group of its own (1: any; raise it so that a few coincidentally
  equal first tokens do not cost a group its padding rows). Stop strings and streaming
  are not offered here; rows end at EOS or max_new_tokens. With temperature > 0 prompt i
  samples from its own key stream, seed + i: it draws what `kvjax.generate([prompt i],
  seed=seed + i)` draws, whichever wave and row it lands in.
  stats: prompt tokens, the tokens prefilled (and saved) by sharing, per-wave cache bytes
  (planned and measured), seconds and generated tokens per second.
  """
  compile_before = steps.compile_seconds
  start = time.perf_counter()   # grouping and planning are part of the time
  _validate_sampling(max_new_tokens, temperature, top_p, seed, None)
  validation.integer("rows_per_prefix", rows_per_prefix, 1, error=GenerationError,
                     what="rows decoded against one prefix copy")
  validation.integer("min_prefix_tokens", min_prefix_tokens, 1, error=GenerationError,
                     what="the shortest prefix that gets a group of its own")
  if memory_budget_bytes is not None:
    validation.integer("memory_budget_bytes", memory_budget_bytes, 1, error=GenerationError,
                       what="bytes a wave's cache may allocate, or None")
  if getattr(model, "placement", None) is not None:
    raise GenerationError("generate_shared runs on one device; load the model without a mesh")
  prompt_list, _ = inputs.as_batch(prompts, "prompts")
  encoded = inputs.encode(model, prompt_list, None, chat_template).prompts
  for i, tokens in enumerate(encoded):
    check_context_length(model, len(tokens) + max_new_tokens,
                         f"prompt {i} ({len(tokens)} tokens) with max_new_tokens="
                         f"{max_new_tokens}")
  method_obj = calibration.bind(method, model)
  check_prefill_method("generate_shared", method_obj)
  keep_for = lambda lengths: methods_lib.validate_compression(method_obj, lengths,
                                                              compression_ratio, budget)
  lengths = [len(t) for t in encoded]
  keep_for([max(1, n - 1) for n in lengths])  # bad ratios and budgets fail before any work
  groups = group_by_prefix(encoded, min_prefix_tokens)
  waves = plan_waves(model.config, groups, lengths, max_new_tokens, rows_per_prefix,
                     memory_budget_bytes)
  eos = sorted(eos_ids(model, eos_token_ids))
  results, wave_stats = {}, []
  sampling_args = dict(temperature=temperature, top_p=top_p, eos_token_ids=eos)
  for wave in waves:
    out, stats = _run_wave(model, wave, encoded, method_obj, keep_for, max_new_tokens,
                           sampling_args, seed, steps)
    results.update(out)
    wave_stats.append(stats)
  seconds = time.perf_counter() - start - (steps.compile_seconds - compile_before)
  texts = [results[i][0] for i in range(len(encoded))]
  token_ids = [results[i][1] for i in range(len(encoded))]
  prefilled = sum(w["prefix_tokens_prefilled"] + w["suffix_tokens_prefilled"]
                  for w in wave_stats)
  generated = sum(len(t) for t in token_ids)
  stats = {
      "batch_size": len(encoded), "prompt_tokens": lengths,
      "groups": [dataclasses.asdict(g) for g in groups],
      "prompt_tokens_total": sum(lengths), "prefilled_tokens": prefilled,
      "prefill_saved_fraction": 1 - prefilled / max(1, sum(lengths)),
      "waves": wave_stats, "memory_budget_bytes": memory_budget_bytes,
      "peak_cache_bytes": max(w["cache_bytes"] for w in wave_stats),
      "method": method_obj.label,
      "seconds": seconds, "generated_tokens": generated,
      "tokens_per_second": generated / seconds if seconds > 0 else None,
      "compile_seconds": steps.compile_seconds - compile_before,
  }
  return GenerationResult(texts=texts, token_ids=token_ids, stats=stats)
