"""Compression policies: how a forward call applies a method to each layer's cache.

A plan is hashable (a static jit argument) and implements the policy protocol of
`kvjax.cache.policy` (prepare, update, finish), so the model runs any method without
knowing it. Top-k and sorting run in XLA; moving kept keys and values is the cache
layout's job (a gather kernel for the dense layouts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache.kv_cache import (COLUMN_SUMS, PROBS, QUERIES, RESERVED_POSITION, Cache, LayerCache,
                                  NewTokens)
from kvjax.cache.policy import LayerStep
from kvjax.cache.quantized import flush_ahead
from kvjax.methods.base import PROTECTED, LayerInputs, Method
from kvjax.ops import attention as attention_ops


def _with_state(method: Method, layer_cache):
  """The layer cache with the method's state (new, zero state when it had none)."""
  if layer_cache.state is not None or method.init_state((1, 1, 1)) is None:
    return layer_cache
  return layer_cache.replace(state=method.init_state(layer_cache.slot_positions().shape))


def layer_inputs(layer: int, cand: LayerCache, step: LayerStep, column_sums) -> LayerInputs:
  """What a scorer sees: the chunk's queries and every candidate slot."""
  return LayerInputs(
      config=step.config, layer=layer, queries=step.queries, raw_queries=step.raw_queries,
      query_positions=step.new.positions, keys=cand.keys, values=cand.values,
      key_positions=cand.positions, lengths=step.lengths, column_sums=column_sums,
      slot_state=cand.state, params=step.params)


@dataclasses.dataclass(frozen=True)
class MethodAttention:
  """A layer cache whose compressing prefill chunk is attended by the method's own
  `prefill_attention` (the plan wraps it in `prepare` and unwraps it in `update`)."""
  layer: object
  method: Method

  def attend(self, queries, query_positions, pending=None, want=frozenset()):
    return self.method.prefill_attention(self.layer, queries, query_positions, pending, want)


@dataclasses.dataclass(frozen=True)
class CompressionPlan:
  """How a forward call treats the cache.

  compress=True: each layer attends over its kept slots plus the chunk, then the method
  compacts them to budgets[layer] slots per KV head and `room` empty slots per head are
  added for later tokens. compress=False: tokens are appended (or, for decode-time
  methods, each decode token overwrites a slot so the cache stays at its budget).
  """
  method: Method
  budgets: tuple[int, ...]
  room: int = 0
  compress: bool = True

  def _evicting(self, tokens: int) -> bool:
    """Whether a chunk of `tokens` tokens overwrites slots (a decode-time method's step)."""
    return not self.compress and self.method.decode_time and tokens == 1

  def begin(self, layers: tuple, tokens: int) -> tuple:
    # Appending layers (not compressing, not evicting) flush their residual windows at once.
    if self.compress or self._evicting(tokens):
      return layers
    return flush_ahead(layers, tokens)

  def prepare(self, layer: int, layer_cache, new: NewTokens):
    if self.compress:
      layer_cache = _with_state(self.method, layer_cache)
      if self.method.attends_prefill:
        layer_cache = MethodAttention(layer_cache, self.method)
      return layer_cache, new, frozenset(self.method.needs)
    if self._evicting(new.keys.shape[2]):
      return layer_cache, new, frozenset({PROBS})
    # Appended queries keep accumulating the state of methods that count attention (those
    # that override `accumulate`; merging methods keep state but count no attention).
    accumulate = (COLUMN_SUMS in self.method.needs and layer_cache.state is not None
                  and type(self.method).accumulate is not Method.accumulate)
    want = ({COLUMN_SUMS} if accumulate else set()) | (self.method.needs & {QUERIES})
    return layer_cache.append(new), None, frozenset(want)

  def update(self, layer: int, layer_cache, step: LayerStep, stats):
    if isinstance(layer_cache, MethodAttention):
      layer_cache = layer_cache.layer
    if stats.layer is not None:   # attending stepped the layer (offload buffer, SentenceKV)
      layer_cache = stats.layer
    if self.compress:
      cand = layer_cache.candidates(step.new)
      x = layer_inputs(layer, cand, step, stats.column_sums)
      return self._compact(layer, cand, x).grow(self.room)
    if self._evicting(step.new.keys.shape[2]):
      return evict_and_insert(self.method, layer_cache, step.new, stats.probs,
                              stats.pending_probs, step.lengths, self.budgets[layer])
    if stats.column_sums is not None:
      layer_cache = layer_cache.with_state_view(
          self.method.accumulate(layer_cache.state_view(), stats.column_sums))
    if stats.queries is not None:
      layer_cache = layer_cache.with_state_view(
          self.method.observe_queries(layer_cache.state_view(), *stats.queries))
    return layer_cache

  def _compact(self, layer: int, cand, x: LayerInputs):
    return self.method.compact(cand, x, self.budgets[layer])

  def finish(self, layers: tuple, lengths: jax.Array) -> Cache:
    if self.compress:
      layers = self.method.cache_step(tuple(layers), lengths)
    return Cache(layers=tuple(layers), lengths=lengths)


@dataclasses.dataclass(frozen=True, eq=False)
class RankedLayer(CompressionPlan):
  """A one-layer compressing plan (budgets: the layers' largest, rounded up) run with the
  layer's own budget `keep` as a traced value (`Method.compact_ranked`). The engine
  compiles with `keep` None (equality and hash are over CompressionPlan's fields, which
  leave `keep` out; it never equals a CompressionPlan) and sets it inside the compiled
  layer that serves every layer (kvjax.generation.engine)."""
  keep: jax.Array | None = None

  def _compact(self, layer: int, cand, x: LayerInputs):
    return self.method.compact_ranked(cand, x, self.budgets[layer], self.keep)


@dataclasses.dataclass(frozen=True)
class PlanSet:
  """Several ways to compress one context that is prefilled once (a method/ratio sweep).

  A forward call from an empty cache with a PlanSet attends over the chunk once (every
  plan would see the same hidden states: compression only changes what is stored) and
  returns one cache per entry: the uncompressed chunk for None, else the plan's
  compression of it. Valid for a single prefill chunk only.
  """
  plans: tuple[CompressionPlan | None, ...]
  room: int = 0  # empty slots per head appended to the uncompressed (None) caches

  compress = True  # a PlanSet always compresses (its input buffers cannot be donated)

  def prepare(self, layer: int, layer_cache, new: NewTokens):
    del layer
    needs = frozenset().union(*(p.method.needs for p in self.plans if p is not None))
    return layer_cache, new, needs

  def update(self, layer: int, layer_cache, step: LayerStep, stats):
    caches = []
    for plan in self.plans:
      if plan is None:
        caches.append(layer_cache.candidates(step.new).grow(self.room))
        continue
      own = _with_state(plan.method, layer_cache)
      cand = own.candidates(step.new)
      x = layer_inputs(layer, cand, step, stats.column_sums)
      caches.append(plan.method.compact(cand, x, plan.budgets[layer]).grow(plan.room))
    return tuple(caches)

  def finish(self, layers: tuple, lengths: jax.Array) -> tuple[Cache, ...]:
    out = []
    for i, plan in enumerate(self.plans):
      plan_layers = tuple(layer[i] for layer in layers)
      if plan is not None:
        plan_layers = plan.method.cache_step(plan_layers, lengths)
      out.append(Cache(layers=plan_layers, lengths=lengths))
    return tuple(out)


def evict_and_insert(method: Method, layer, new: NewTokens, probs, own_prob, lengths,
                     budget: int):
  """One decode step of a decode-time method: the new token overwrites the lowest-priority
  slot of each KV head (empty slots first), so the cache never grows.

  new: one token per row (keys/values [B, K, 1, D], positions [B, 1]); probs [B, H, S] and
  own_prob [B, H]: the new query's attention; lengths [B]: tokens seen including the new
  one; budget: the layer's prefill budget (protected windows are sized from it, not from
  the capacity, which also holds the question's room). The layer shows the method its slots
  per KV head (`scoring_view`): a head-wise layer shows every head all slots, the other
  heads' as empty and never chosen, so each head's segment keeps its size.
  """
  positions, owned = layer.scoring_view()
  old_state = layer.state_view()
  state, new_state = method.decode_scores(old_state, probs, own_prob, positions, lengths)
  prio = method.eviction_priority(state, probs, positions, lengths, budget).astype(jnp.float32)
  prio = jnp.where(method.protected(positions, lengths, budget), PROTECTED, prio)
  # Empty slots are filled first; reserved ones (another row's share) never.
  prio = jnp.where(positions >= 0, jnp.minimum(prio, jnp.finfo(jnp.float32).max),
                   jnp.where(positions == RESERVED_POSITION, jnp.inf, -jnp.inf))
  if owned is not None:  # another head's slot must lose even to a protected one
    prio = jnp.where(owned, prio, jnp.inf)
  # A masked token (position < 0: a row that already finished) changes nothing: its write
  # goes out of bounds and is dropped, and the method state keeps its old values.
  valid = new.positions[:, 0] >= 0                                         # [B]
  victim = jnp.where(valid[:, None], jnp.argmin(prio, axis=-1), layer.capacity)  # [B, K]
  # Written in place after the attention's reads, whatever the method's priorities read.
  victim = attention_ops.after_reading(victim, probs.reshape(victim.shape + (-1,))[..., 0])
  if state is not None:
    keep_old = lambda new_s, old_s: jnp.where(
        valid.reshape((-1,) + (1,) * (new_s.ndim - 1)), new_s, old_s)
    state = jax.tree_util.tree_map(keep_old, state, old_state)
  layer, new_state = method.absorb(layer.with_state_view(state), victim, valid, new_state)
  return layer.overwrite(victim, new, new_state)
