"""The full (uncompressed) KV cache.

A layer's cache holds, per (batch, kv_head), `capacity` slots. Each slot has a post-RoPE key,
a value and the original token position it came from (-1 = empty). Attention masks by these
positions (valid and causal), so padding, compaction and reordering of slots need no other
bookkeeping. Compressed caches (later) reuse this layout with smaller capacities.
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
  end: jax.Array         # int32 scalar: next slot to write (slots >= end are empty)

  @property
  def capacity(self) -> int:
    return self.keys.shape[2]


@struct.dataclass
class Cache:
  layers: tuple[LayerCache, ...]
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


def full_cache_nbytes(config: ModelConfig, batch: int, capacity: int, dtype=None) -> int:
  """Bytes of an uncompressed cache with `capacity` slots (without allocating it)."""
  shapes = jax.eval_shape(lambda: init_cache(config, batch, capacity, dtype))
  return cache_nbytes(shapes)


def write(layer: LayerCache, keys: jax.Array, values: jax.Array,
          positions: jax.Array) -> LayerCache:
  """Appends `chunk` new slots at `end`. keys/values: [B, K, chunk, D]; positions: [B, chunk].

  The caller guarantees end + chunk <= capacity (checked on the host before jit, since
  dynamic_update_slice would silently clamp).
  """
  start = (0, 0, layer.end, 0)
  head_positions = jnp.broadcast_to(positions[:, None, :],
                                    keys.shape[:3]).astype(jnp.int32)
  return LayerCache(
      keys=jax.lax.dynamic_update_slice(layer.keys, keys.astype(layer.keys.dtype), start),
      values=jax.lax.dynamic_update_slice(layer.values, values.astype(layer.values.dtype), start),
      positions=jax.lax.dynamic_update_slice(layer.positions, head_positions, start[:3]),
      end=layer.end + keys.shape[2])
