"""KV caches: full, compressed per layer, and compressed per head.

A layer's cache holds slots. Each slot has a post-RoPE key, a value and the original token
position it came from (-1 = empty). Attention masks by these positions (valid and causal), so
padding, compaction and reordering of slots need no other bookkeeping.

Two layouts, both sized to what they keep (no masked-but-allocated entries):
- `LayerCache`: [batch, kv_heads, capacity, head_dim]. Every head of a layer keeps the same
  number of slots; layers may differ (each layer is its own pytree), which covers the full
  cache, uniform budgets and layer-wise schedules (PyramidKV).
- `FlatLayerCache`: [batch, slots, head_dim] with all heads' slots in one axis. Head h owns
  the contiguous segment [offsets[b, h], offsets[b, h + 1]); segment lengths differ per head
  and per row, while their sum is fixed. This is the head-wise budget layout (AdaKV).
Per-slot method state (accumulated attention, low-attention history) rides along.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.config import ModelConfig

EMPTY_POSITION = -1


@struct.dataclass
class LayerCache:
  keys: jax.Array        # [batch, kv_heads, capacity, head_dim], post-RoPE
  values: jax.Array      # [batch, kv_heads, capacity, head_dim]
  positions: jax.Array   # [batch, kv_heads, capacity] int32, EMPTY_POSITION where unused
  end: jax.Array         # int32 scalar: next slot to append to (slots >= end are empty)
  scores: jax.Array | None = None   # [batch, kv_heads, capacity] float32 method state
  history: jax.Array | None = None  # [batch, kv_heads, capacity] uint32 bit history

  @property
  def capacity(self) -> int:
    return self.keys.shape[2]


@struct.dataclass
class FlatLayerCache:
  keys: jax.Array        # [batch, slots, head_dim], post-RoPE
  values: jax.Array      # [batch, slots, head_dim]
  positions: jax.Array   # [batch, slots] int32, EMPTY_POSITION where unused
  heads: jax.Array       # [batch, slots] int32: the KV head owning each slot
  offsets: jax.Array     # [batch, kv_heads + 1] int32: segment bounds per head
  next_slot: jax.Array   # [batch, kv_heads] int32: where each head appends next
  scores: jax.Array | None = None   # [batch, slots] float32 method state

  @property
  def capacity(self) -> int:
    return self.keys.shape[1]


@struct.dataclass
class Cache:
  layers: tuple
  lengths: jax.Array     # [batch] int32: tokens seen per sequence = position of the next token

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]


def init_layer_cache(batch: int, kv_heads: int, capacity: int, head_dim: int,
                     dtype) -> LayerCache:
  return LayerCache(
      keys=jnp.zeros((batch, kv_heads, capacity, head_dim), dtype),
      values=jnp.zeros((batch, kv_heads, capacity, head_dim), dtype),
      positions=jnp.full((batch, kv_heads, capacity), EMPTY_POSITION, jnp.int32),
      end=jnp.zeros((), jnp.int32))


def init_cache(config: ModelConfig, batch: int, capacity: int, dtype=None) -> Cache:
  """An empty full cache with `capacity` slots in every layer."""
  dtype = dtype or jnp.dtype(config.dtype)
  layer = lambda: init_layer_cache(batch, config.num_kv_heads, capacity, config.head_dim, dtype)
  return Cache(layers=tuple(layer() for _ in range(config.num_layers)),
               lengths=jnp.zeros((batch,), jnp.int32))


def cache_nbytes(cache) -> int:
  """Bytes actually held by a cache pytree: the sum of its leaves' sizes."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree_util.tree_leaves(cache)))


def slots_per_head(config: ModelConfig, cache: Cache) -> int:
  """The largest layer capacity, in slots per KV head (a head-wise layer holds all heads)."""
  return max(layer.capacity // (1 if isinstance(layer, LayerCache) else config.num_kv_heads)
             for layer in cache.layers)


def free_slots(cache: Cache) -> int:
  """Tokens that can still be appended to every row, layer and head of `cache`."""
  free = []
  for layer in cache.layers:
    if isinstance(layer, FlatLayerCache):
      # Each head appends at the end of its own segment.
      free.append(int(jnp.min(layer.offsets[:, 1:] - layer.next_slot)))
    else:
      free.append(layer.capacity - int(layer.end))
  return min(free)


def full_cache_nbytes(config: ModelConfig, batch: int, capacity: int, dtype=None) -> int:
  """Bytes of an uncompressed cache with `capacity` slots (without allocating it)."""
  shapes = jax.eval_shape(lambda: init_cache(config, batch, capacity, dtype))
  return cache_nbytes(shapes)


def write(layer: LayerCache, keys: jax.Array, values: jax.Array,
          positions: jax.Array) -> LayerCache:
  """Appends `chunk` new slots at `end`. keys/values: [B, K, chunk, D]; positions: [B, chunk].

  The caller guarantees end + chunk <= capacity (checked on the host before jit, since
  dynamic_update_slice would silently clamp). New slots start with zero method state.
  """
  start = (0, 0, layer.end, 0)
  head_positions = jnp.broadcast_to(positions[:, None, :],
                                    keys.shape[:3]).astype(jnp.int32)
  update = lambda state: (None if state is None else jax.lax.dynamic_update_slice(
      state, jnp.zeros(keys.shape[:3], state.dtype), start[:3]))
  return LayerCache(
      keys=jax.lax.dynamic_update_slice(layer.keys, keys.astype(layer.keys.dtype), start),
      values=jax.lax.dynamic_update_slice(layer.values, values.astype(layer.values.dtype), start),
      positions=jax.lax.dynamic_update_slice(layer.positions, head_positions, start[:3]),
      end=layer.end + keys.shape[2], scores=update(layer.scores),
      history=update(layer.history))


def write_flat(layer: FlatLayerCache, keys: jax.Array, values: jax.Array,
               positions: jax.Array) -> FlatLayerCache:
  """Appends `chunk` tokens at the end of every head's segment.

  keys/values [B, K, chunk, D]; positions [B, chunk]. The caller guarantees each segment has
  room (segments are allocated with the same spare slots for every head).
  """
  b, k, chunk, _ = keys.shape
  slots = layer.next_slot[:, :, None] + jnp.arange(chunk, dtype=jnp.int32)  # [B, K, chunk]
  rows = jnp.arange(b)[:, None, None]
  head_positions = jnp.broadcast_to(positions[:, None, :], (b, k, chunk)).astype(jnp.int32)
  scores = layer.scores
  if scores is not None:
    scores = scores.at[rows, slots].set(0.0)
  return layer.replace(
      keys=layer.keys.at[rows, slots].set(keys.astype(layer.keys.dtype)),
      values=layer.values.at[rows, slots].set(values.astype(layer.values.dtype)),
      positions=layer.positions.at[rows, slots].set(head_positions),
      next_slot=layer.next_slot + chunk, scores=scores)


def append_room(layer, room: int):
  """The same layer cache with `room` more empty slots per head for later tokens."""
  if room == 0:
    return layer
  if isinstance(layer, LayerCache):
    pad = lambda x, value: None if x is None else jnp.pad(
        x, [(0, 0), (0, 0), (0, room)] + [(0, 0)] * (x.ndim - 3), constant_values=value)
    return layer.replace(keys=pad(layer.keys, 0), values=pad(layer.values, 0),
                         positions=pad(layer.positions, EMPTY_POSITION),
                         scores=pad(layer.scores, 0), history=pad(layer.history, 0))
  # Head-wise: each head's segment grows by `room` at its end.
  b, n, _ = layer.keys.shape
  k = layer.next_slot.shape[1]
  new_offsets = layer.offsets + room * jnp.arange(k + 1, dtype=jnp.int32)
  # Old slot i of head h moves right by room * h.
  shift = room * layer.heads
  dest = jnp.arange(n, dtype=jnp.int32)[None, :] + shift
  rows = jnp.arange(b)[:, None]
  new_n = n + room * k
  move = lambda x, fill: None if x is None else jnp.full(
      (b, new_n) + x.shape[2:], fill, x.dtype).at[rows, dest].set(x)
  new_heads = segment_heads(new_offsets, new_n)
  return FlatLayerCache(
      keys=move(layer.keys, 0), values=move(layer.values, 0),
      positions=move(layer.positions, EMPTY_POSITION), heads=new_heads, offsets=new_offsets,
      next_slot=layer.next_slot + room * jnp.arange(k, dtype=jnp.int32),
      scores=move(layer.scores, 0))


def segment_heads(offsets: jax.Array, slots: int) -> jax.Array:
  """[B, slots] owner head of every slot given segment offsets [B, K + 1]."""
  index = jnp.arange(slots, dtype=jnp.int32)
  return (index[None, :, None] >= offsets[:, None, 1:]).sum(-1).astype(jnp.int32)
