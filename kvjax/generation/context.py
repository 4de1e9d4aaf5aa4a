"""Prefill of a context into a (compressed) cache, in one chunk or several.

Shared by generate, score and the benchmark. With a compression method each chunk is
attended together with the slots kept so far and then compacted to the layer budgets, so
peak cache memory is budget + chunk however long the context is; a rescoring method
(KVzip) holds the full context's cache until its passes have scored it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import validation
from kvjax.cache import cache_nbytes, full_cache_nbytes, init_cache
from kvjax.cache.kv_cache import EMPTY_POSITION, host_nbytes
from kvjax.methods.plan import CompressionPlan, PlanSet
from kvjax.errors import MethodError
from kvjax.generation import engine, inputs
from kvjax.model.model import truncated
from kvjax.sharding.distributed import host_array


@dataclasses.dataclass
class PrefilledContext:
  logits: object              # [B, V] next-token logits after the context
  cache: object               # the cache, with `room` empty slots per head appended,
                              # rounded by prefill's capacity_multiple (see `room`)
  context_cache_bytes: int    # bytes of the context's cache before room: measured from the
                              # compressed arrays (a method's shape padding left out,
                              # Method.content_nbytes); for the full cache, what its longest
                              # context holds (the prompt bucket's padding left out)
  decode_plan: CompressionPlan | None   # what later forward calls pass as `plan`
  budgets: tuple[int, ...] | None       # kept slots per layer (per head on average)
  method_stats: dict = dataclasses.field(default_factory=dict)  # Method.cache_stats
  context_cache_allocated_bytes: int = 0  # the context's cache as allocated: the full
                                          # cache's padded prompt width; for a compressed
                                          # one its finalized arrays (Method.content_nbytes
                                          # may leave shape padding out of the other)
  context_cache_host_bytes: int = 0       # what an offloaded layout keeps in host memory
                                          # (context_cache_bytes counts device bytes)
  room: int = 0               # empty slots per head asked for: the full cache's rounded up
                              # to prefill's capacity_multiple, a compressed one's as given


def layer_budgets(model, method, keep: int, context_length: int) -> tuple[int, ...]:
  """The per-layer budgets of the method fitted to a mean budget `keep` (its protected
  tokens shrunk to fit, `Method.fitted`), checked against its protection."""
  method = method.fitted(keep)
  budgets = tuple(int(b) for b in method.layer_budgets(model.config, keep, context_length))
  if len(budgets) != model.config.num_layers:
    raise MethodError(f"method {method.label!r} gave {len(budgets)} layer budgets for a model "
                      f"with {model.config.num_layers} layers")
  for layer, b in enumerate(budgets):
    protected = method.protected_tokens(b)
    if b < 1 or protected > b:
      raise MethodError(f"layer {layer} of method {method.label!r} gets a budget of {b} "
                        f"tokens but always keeps {protected}; raise the budget")
  return budgets


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def check_chunk_size(chunk_size) -> None:
  if chunk_size is not None:
    validation.integer("prefill_chunk_size", chunk_size, 1, error=MethodError,
                       what="tokens per prefill chunk, or None")


def prefill(model, tokens: np.ndarray, mask: np.ndarray, method, keep: int | None,
            room: int, chunk_size: int | None = None,
            steps: engine.CompiledSteps = engine.STEPS,
            method_params=None, capacity_multiple: int = 1,
            reserve_multiple: int = 1) -> PrefilledContext:
  """Prefills left-padded `tokens` [B, T] (width a multiple of chunk_size when chunked).

  keep: tokens kept per layer and KV head (None: all of them; a method that needs no
  budget, such as a quantizer, still stores the context its own way). method_params: the
  method's parameter pytree (trained selectors), traced rather than compiled in. room:
  empty slots per head for later tokens, rounded up to a multiple of `capacity_multiple`
  (`kv_cache.grow_rooms`): in the full cache, the room itself; in a compressed cache's
  dense layers, kept slots and room together (its other layouts, the room).
  reserve_multiple: a compressed cache whose decode plan holds no budgets, or reads
  them as data (`engine.traces_budgets`), gets reserved slots, which eviction never
  fills, up to a multiple of it (`kv_cache.reserve_rooms`): in its dense layers past the
  room, in a head-wise layer's last segment, in a channel-pruned layer's pruned part, in
  a mixed-precision layer's pools, in a cross-layer pair's or group's shared slots, and,
  as empty groups that later flushes may fill, in a quantized layer's quantized part
  (`generate` asks it of budgeted methods and those that `trims_padding`). Prompts whose
  kept slots round alike then share one compiled decode loop, and the cache still stays
  at its budget plus room (not a method that `pads_shapes`: its capacities are its own).
  """
  check_chunk_size(chunk_size)
  rows, width = tokens.shape
  chunk = width if chunk_size is None else chunk_size
  if width % chunk:
    raise ValueError(f"token width {width} is not a multiple of the chunk size {chunk}")
  rescoring = method.rescores and keep is not None
  full_room = round_up(room, capacity_multiple)
  if method.compresses_prompt and keep is not None:
    # The target reads only the tokens a draft chose (SpecPC), into a full cache.
    tokens, mask = compressed_prompt(model, method, tokens, mask, keep, chunk_size, steps)
    rows, width = tokens.shape
    chunk = width if chunk_size is None else chunk_size
    plan, cache = None, init_cache(model.config, rows, width + full_room)
  elif rescoring:
    # Prefilled uncompressed, then scored over that cache and compressed once (KVzip).
    final_plan = _compression_plan(model, method, keep, mask)
    passes = final_plan.method.rescoring_passes(model.tokenizer, tokens, mask,
                                                draft_fn(model, final_plan.method, steps))
    plan, cache = None, init_cache(model.config, rows, width)
  elif method.compresses and (keep is not None or not method.needs_budget):
    plan = _compression_plan(model, method, width if keep is None else keep, mask)
    cache = init_cache(model.config, rows, 0)
    if method.reads_context and method_params is None:
      # Read from the whole context once; every chunk's policy sees them (SentenceKV).
      method_params = jax.tree_util.tree_map(
          jnp.asarray, plan.method.context_params(model.tokenizer, tokens, mask))
  else:
    plan = None
    # The full cache is allocated at its final size at once: growing it afterwards would
    # briefly need two copies of the largest cache there is.
    cache = init_cache(model.config, rows, width + full_room)
  logits = None
  for start in range(0, width, chunk):
    piece = slice(start, start + chunk)
    if not mask[:, piece].any():
      continue  # all padding (left padding of a chunked prompt): nothing to see or keep
    if logits is not None and plan is not None:
      cache = plan.method.between_chunks(cache)
    logits, cache = steps.prefill(model, jnp.asarray(tokens[:, piece]),
                                  jnp.asarray(mask[:, piece]), cache, logits="last", plan=plan,
                                  method_params=method_params)
  if rescoring:
    cache = _rescored(model, final_plan, passes, cache, steps)
    return _prefilled(model, logits, cache, final_plan, mask, room, steps, capacity_multiple)
  return _prefilled(model, logits, cache, plan, mask, room, steps, capacity_multiple,
                    reserve_multiple)


def _rescored(model, plan: CompressionPlan, passes, cache, steps: engine.CompiledSteps):
  """The full `cache` of a context compressed by a rescoring method's `passes` over it."""
  method = plan.method
  policy = method.rescoring_policy()
  scores = []
  for rows, params in passes:
    ids, ids_mask = inputs.left_pad(rows, 0)
    at = cache if "rewind" not in params else rewound(cache, params["rewind"])
    _, layer_scores = steps.prefill(model, jnp.asarray(ids), jnp.asarray(ids_mask), at,
                                    logits="last", plan=policy,
                                    method_params=jax.tree_util.tree_map(jnp.asarray, params))
    scores.append(layer_scores)
  return method.rescored(cache, scores, plan.budgets)


def rewound(cache, rewind):
  """The full `cache` without each row's last rewind [B] tokens (their slots read as empty),
  so a pass that re-reads them puts them back at their positions, seen once."""
  lengths = cache.lengths - jnp.asarray(rewind, jnp.int32)
  forget = lambda layer: layer.replace(positions=jnp.where(
      layer.positions >= lengths[:, None, None], EMPTY_POSITION, layer.positions))
  return cache.replace(layers=tuple(forget(layer) for layer in cache.layers), lengths=lengths)


def draft_fn(model, method, steps: engine.CompiledSteps = engine.STEPS):
  """`draft(rows, n)` for a method with a draft model (its `draft_layers` of the target),
  else None: each token row's greedy continuation of n tokens by the draft."""
  layers = method.draft_layers(model.config.num_layers)
  if layers is None:
    return None
  draft = truncated(model, layers)

  def continuations(rows, n: int) -> list[list[int]]:
    ids, ids_mask = inputs.left_pad(rows, 0)
    logits, cache = steps.prefill(draft, jnp.asarray(ids), jnp.asarray(ids_mask),
                                  init_cache(draft.config, len(rows), ids.shape[1] + n),
                                  logits="last")
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    out = [host_array(token)]
    for _ in range(n - 1):
      token, logits, cache = steps.decode(draft, token, cache, jax.random.key(0), 1.0, 1.0,
                                          True)
      out.append(host_array(token))
    return np.stack(out, 1).tolist()

  return continuations


def compressed_prompt(model, method, tokens: np.ndarray, mask: np.ndarray, keep: int,
                      chunk_size: int | None = None,
                      steps: engine.CompiledSteps = engine.STEPS):
  """(tokens, mask) left-padded: each row's `keep` tokens chosen by a prompt-compressing
  method from its draft's recorded attention over the prompt and `lookahead` - 1 decode
  steps (the width a multiple of chunk_size when chunked)."""
  method = method.fitted(keep)
  draft = truncated(model, method.draft_layers(model.config.num_layers))
  recorder = method.recorder(draft.config.num_layers)
  rows, width = tokens.shape
  logits, (cache, recorded) = steps.prefill(
      draft, jnp.asarray(tokens), jnp.asarray(mask),
      init_cache(draft.config, rows, width + method.lookahead), logits="last", plan=recorder)
  prompt = host_array(cache.layers[0].positions)[:, 0]   # before decode donates the cache
  passes = [recorded]
  token = jnp.argmax(logits, -1).astype(jnp.int32)
  for step in range(method.lookahead - 1):
    token, _, (cache, recorded) = steps.decode(draft, token, cache, jax.random.key(step), 1.0,
                                               1.0, True, plan=recorder)
    passes.append(recorded)
  contexts = [np.asarray(t)[np.asarray(m, bool)].tolist() for t, m in zip(tokens, mask)]
  kept = method.compressed_rows(contexts, method.prompt_scores(passes, prompt), keep)
  longest = max(len(row) for row in kept)
  multiple = chunk_size or 1
  return inputs.left_pad(kept, 0, round_up(longest, multiple))


def _compression_plan(model, method, keep: int, mask: np.ndarray) -> CompressionPlan:
  """The plan that compresses a context (mask [B, T]) to the layer budgets of the method
  fitted to `keep` (protected tokens shrunk where they would not fit)."""
  budgets = layer_budgets(model, method, keep, int(mask.sum(1).max()))
  return CompressionPlan(method.fitted(keep), budgets, room=0, compress=True)


def _prefilled(model, logits, cache, plan: CompressionPlan | None, mask: np.ndarray,
               room: int, steps: engine.CompiledSteps,
               capacity_multiple: int = 1, reserve_multiple: int = 1) -> PrefilledContext:
  """A prefilled context: a compressed cache (plan) gets `room` appended now (rounded by
  `capacity_multiple`, see `prefill`); an uncompressed one (plan None) already has it.
  The full cache's context bytes are those of its longest context (mask [B, T]), its
  allocation those of the padded width T."""
  if plan is None:
    rows, width = mask.shape
    room = round_up(room, capacity_multiple)   # what prefill allocated
    return PrefilledContext(
        logits=logits, cache=cache, room=room, decode_plan=None, budgets=None,
        context_cache_bytes=full_cache_nbytes(model.config, rows, int(mask.sum(1).max())),
        context_cache_allocated_bytes=full_cache_nbytes(model.config, rows, width))
  # The method's host-side step (data-dependent re-packing) before bytes are measured.
  cache = plan.method.finalize(cache, model.config)
  measured, allocated = plan.method.content_nbytes(cache), cache_nbytes(cache)
  # Budgets only steer a decode step that evicts: other methods' decode plans leave them
  # out, so that one compiled decode loop serves contexts of every length.
  decode_time = plan.method.decode_time
  decode_plan = dataclasses.replace(plan, method=plan.method.decoding(), compress=False,
                                    budgets=plan.budgets if decode_time else ())
  if plan.method.pads_shapes or (decode_plan.budgets
                                 and not engine.traces_budgets(decode_plan)):
    reserve_multiple = 1   # its own shared capacities (D2O, CAKE), or budgets compiled in
  return PrefilledContext(logits=logits,
                          cache=steps.grow(cache, room, model.placement, capacity_multiple,
                                           reserve_multiple),
                          room=room,
                          context_cache_bytes=measured, context_cache_allocated_bytes=allocated,
                          context_cache_host_bytes=host_nbytes(cache),
                          decode_plan=decode_plan,
                          budgets=plan.method.kept_budgets(cache, plan.budgets),
                          method_stats=plan.method.cache_stats(cache))


# prefill_many keeps the caches of one prefill's variants under about this many bytes:
# every variant's cache is alive at once at the end of the shared forward pass.
MANY_CACHE_BYTES = 2 << 30


def prefill_many(model, tokens: np.ndarray, mask: np.ndarray, variants, room: int,
                 steps: engine.CompiledSteps = engine.STEPS,
                 max_cache_bytes: int = MANY_CACHE_BYTES) -> list[PrefilledContext]:
  """Every result of `iter_prefill_many` in a list (all caches alive at once)."""
  return list(iter_prefill_many(model, tokens, mask, variants, room, steps, max_cache_bytes))


def iter_prefill_many(model, tokens: np.ndarray, mask: np.ndarray, variants, room: int,
                      steps: engine.CompiledSteps = engine.STEPS,
                      max_cache_bytes: int = MANY_CACHE_BYTES):
  """Prefills a context once and compresses it several ways (a method/ratio sweep),
  yielding one PrefilledContext per variant, in order.

  variants: a list of (method, keep); a method that does not compress, or keep None for one
  that needs a budget, gives the uncompressed cache. Compression never changes the hidden
  states of a one-chunk prefill, so each compressed result is bit-identical to
  `prefill(model, tokens, mask, method, keep, room)` (the uncompressed one equal up to float
  rounding: its attention skips the room's empty slots) while the model runs once instead of
  len(variants) times. Variants whose caches together would exceed max_cache_bytes (as
  estimated by the dense size of each one's largest layer budget plus room, method state
  not counted) are split over several prefills; a caller that drops each result before
  asking for the next holds one group's caches at a time, so memory stays bounded however
  many variants a sweep has.
  """
  if any((method.rescores or method.compresses_prompt or method.reads_context)
         and keep is not None
         or method.attends_prefill and (keep is not None or not method.needs_budget)
         for method, keep in variants):
    # Their compression needs more forward passes over each one's cache, the context's
    # token ids as parameters of its own, or an attention of its own: one by one.
    for method, keep in variants:
      yield prefill(model, tokens, mask, method, keep, room, steps=steps)
    return
  rows, width = tokens.shape
  # As in `prefill`: a method that needs no budget (a quantizer) still compresses.
  plans = tuple(None if not method.compresses or (keep is None and method.needs_budget)
                else _compression_plan(model, method, width if keep is None else keep, mask)
                for method, keep in variants)
  sizes = [full_cache_nbytes(model.config, rows,
                             (width if plan is None else max(plan.budgets)) + room)
           for plan in plans]
  host_mask = np.asarray(mask)
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  for group in _groups(sizes, max_cache_bytes):
    group_plans = tuple(plans[i] for i in group)
    logits, caches = steps.prefill(model, tokens, mask, init_cache(model.config, rows, 0),
                                   logits="last", plan=PlanSet(group_plans, room=room))
    # Handed out one by one, so a cache the caller has dropped is not held here.
    caches = list(caches)
    for plan in group_plans:
      yield _prefilled(model, logits, caches.pop(0), plan, host_mask, room, steps)


def _groups(sizes: list[int], limit: int) -> list[list[int]]:
  """Consecutive index groups whose sizes sum to at most `limit` (one item at least)."""
  groups, total = [[]], 0
  for i, size in enumerate(sizes):
    if groups[-1] and total + size > limit:
      groups.append([])
      total = 0
    groups[-1].append(i)
    total += size
  return groups


def tile_rows(cache, copies: int):
  """A batch-1 cache repeated for `copies` rows (one compressed context, several questions)."""
  if copies == 1:
    return cache
  return jax.tree_util.tree_map(lambda a: jnp.repeat(a, copies, axis=0) if a.ndim else a, cache)
