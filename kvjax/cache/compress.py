"""Compaction of a layer's candidate slots to its budget, and decode-time slot eviction.

Top-k and sorting run in XLA; moving the kept keys and values is the gather kernel's job.
Kept slots stay in their original slot order, so positions stay sorted after a one-shot
compression and order-dependent scorers (pooling) see neighbours as neighbours.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache.kv_cache import (EMPTY_POSITION, FlatLayerCache, LayerCache, append_room,
                                  segment_heads)
from kvjax.methods.base import PROTECTED, LayerInputs, Method
from kvjax.model import kernels


@dataclasses.dataclass(frozen=True)
class CompressionPlan:
  """How a forward call treats the cache (hashable: a static jit argument).

  compress=True: each layer attends over its kept slots plus the chunk, then keeps
  budgets[layer] slots per KV head and adds `room` empty slots per head for later tokens.
  compress=False: tokens are appended (or, for decode-time methods, overwrite a slot).
  """
  method: Method
  budgets: tuple[int, ...]
  room: int = 0
  compress: bool = True


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

  compress = True

  @property
  def needs_column_sums(self) -> bool:
    return any(p is not None and p.method.needs_column_sums for p in self.plans)


def candidates(layer: LayerCache, keys, values, positions) -> LayerCache:
  """The cache's slots followed by a new chunk (keys/values [B, K, T, D], positions [B, T])."""
  b, k, t, _ = keys.shape
  chunk_positions = jnp.broadcast_to(positions[:, None, :], (b, k, t)).astype(jnp.int32)
  extend = lambda state: None if state is None else jnp.concatenate(
      [state, jnp.zeros((b, k, t), state.dtype)], axis=2)
  return LayerCache(
      keys=jnp.concatenate([layer.keys, keys.astype(layer.keys.dtype)], axis=2),
      values=jnp.concatenate([layer.values, values.astype(layer.values.dtype)], axis=2),
      positions=jnp.concatenate([layer.positions, chunk_positions], axis=2),
      end=jnp.int32(layer.capacity + t), scores=extend(layer.scores),
      history=extend(layer.history))


def priorities(method: Method, x: LayerInputs, keep: int) -> jax.Array:
  """[B, K, S] float32: method scores, protected slots +inf, empty slots -inf."""
  prio = method.score(x).astype(jnp.float32)
  prio = jnp.where(method.protected(x.key_positions, x.lengths, keep), PROTECTED, prio)
  return jnp.where(x.key_positions >= 0, prio, -jnp.inf)


def _state_like(method: Method, x: LayerInputs):
  scores, history = method.prefill_state(x)
  if method.state == "scores" and scores is None:
    scores = jnp.zeros(x.key_positions.shape, jnp.float32)
  if method.state == "history" and history is None:
    history = jnp.zeros(x.key_positions.shape, jnp.uint32)
  return scores, history


def compress_dense(method: Method, cand: LayerCache, x: LayerInputs, keep: int) -> LayerCache:
  """Keeps the `keep` highest-priority slots of every KV head: capacity becomes `keep`."""
  scores, history = _state_like(method, x)
  cand = cand.replace(scores=scores, history=history)
  s = cand.capacity
  if keep >= s:  # everything fits: keep it all, with empty slots up to the budget
    return append_room(cand.replace(end=jnp.int32(s)), keep - s).replace(end=jnp.int32(keep))
  _, index = jax.lax.top_k(priorities(method, x, keep), keep)
  index = jnp.sort(index, axis=-1)                               # [B, K, keep]
  b, k, _, d = cand.keys.shape
  gather = lambda a: kernels.gather_slots(a.reshape(b * k, s, d),
                                          index.reshape(b * k, keep)).reshape(b, k, keep, d)
  take = lambda a: None if a is None else jnp.take_along_axis(a, index, axis=-1)
  return LayerCache(keys=gather(cand.keys), values=gather(cand.values),
                    positions=take(cand.positions), end=jnp.int32(keep),
                    scores=take(cand.scores), history=take(cand.history))


def compress_headwise(method, cand: LayerCache, x: LayerInputs, keep: int,
                      safeguard: int) -> FlatLayerCache:
  """AdaKV: the layer keeps num_kv_heads * keep slots, shared among heads by score.

  Each head first keeps its `safeguard` best slots; the rest go to the best priorities over
  all heads. The result is flat: head h's kept slots form segment h, in slot order.
  """
  b, k, s, d = cand.keys.shape
  prio = priorities(method, x, keep)
  if keep >= s:
    cand = append_room(cand, keep - s)
    prio = jnp.pad(prio, [(0, 0), (0, 0), (0, keep - s)], constant_values=-jnp.inf)
    s = keep
  if safeguard > 0:
    _, best = jax.lax.top_k(prio, safeguard)
    rows, heads = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
    prio = prio.at[rows, heads, best].max(PROTECTED)
  total = k * keep
  _, chosen = jax.lax.top_k(prio.reshape(b, k * s), total)
  selected = jnp.zeros((b, k * s), bool).at[jnp.arange(b)[:, None], chosen].set(True)
  selected = selected.reshape(b, k, s)
  counts = selected.sum(-1, dtype=jnp.int32)                             # [B, K]
  offsets = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(counts, axis=1)], 1)
  rank = jnp.cumsum(selected, axis=-1, dtype=jnp.int32) - 1              # order within head
  dest = jnp.where(selected, offsets[:, :-1, None] + rank, total)        # [B, K, S]
  source = jnp.arange(k * s, dtype=jnp.int32).reshape(1, k, s)
  index = jnp.full((b, total), -1, jnp.int32).at[
      jnp.arange(b)[:, None], dest.reshape(b, -1)].set(
          jnp.broadcast_to(source, (b, k, s)).reshape(b, -1), mode="drop")
  flat = lambda a: a.reshape(b, k * s, *a.shape[3:])
  positions = jnp.take_along_axis(flat(cand.positions), jnp.maximum(index, 0), axis=1)
  scores, _ = _state_like(method, x)
  return FlatLayerCache(
      keys=kernels.gather_slots(flat(cand.keys), index),
      values=kernels.gather_slots(flat(cand.values), index),
      positions=jnp.where(index >= 0, positions, EMPTY_POSITION),
      heads=segment_heads(offsets, total), offsets=offsets, next_slot=offsets[:, 1:],
      scores=None if scores is None else jnp.take_along_axis(flat(scores), jnp.maximum(
          index, 0), axis=1))


def evict_and_insert(method: Method, layer: LayerCache, new_key, new_value, new_position,
                     probs, own_prob, lengths) -> LayerCache:
  """One decode step of a decode-time method: the new token overwrites the lowest-priority
  slot of each KV head (empty slots first), so the cache never grows.

  new_key/new_value [B, K, 1, D]; new_position [B]; probs [B, H, S] and own_prob [B, H]:
  the new query's attention; lengths [B]: tokens seen including the new one.
  """
  scores, history, new_score, new_history = method.decode_scores(
      layer.scores, layer.history, probs, own_prob, layer.positions, lengths)
  prio = method.eviction_priority(scores, history, probs, layer.positions, lengths,
                                  layer.capacity).astype(jnp.float32)
  prio = jnp.where(method.protected(layer.positions, lengths, layer.capacity), PROTECTED, prio)
  prio = jnp.where(layer.positions >= 0, prio, -jnp.inf)
  # A masked token (position < 0: a row that already finished) changes nothing: its write
  # goes out of bounds and is dropped, and the method state keeps its old values.
  valid = new_position >= 0                                               # [B]
  victim = jnp.where(valid[:, None], jnp.argmin(prio, axis=-1), layer.capacity)  # [B, K]
  b, k = victim.shape
  rows, heads = jnp.arange(b)[:, None], jnp.arange(k)[None, :]
  keep_old = lambda new, old: None if new is None else jnp.where(
      valid.reshape((b,) + (1,) * (new.ndim - 1)), new, old)
  scores, history = keep_old(scores, layer.scores), keep_old(history, layer.history)
  put = lambda a, v: None if a is None else a.at[rows, heads, victim].set(v, mode="drop")
  return layer.replace(
      keys=put(layer.keys, new_key[:, :, 0].astype(layer.keys.dtype)),
      values=put(layer.values, new_value[:, :, 0].astype(layer.values.dtype)),
      positions=put(layer.positions, jnp.broadcast_to(new_position[:, None], (b, k))),
      scores=put(scores, new_score if new_score is not None else 0.0),
      history=put(history, new_history if new_history is not None else jnp.uint32(0)))
