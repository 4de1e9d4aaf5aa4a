"""Layers that share storage (MiniCache): a pair of adjacent layers stores one unit
direction per token and head, each layer its own magnitudes and the originals of its few
outlier tokens.

The first layer of a pair owns the shared directions; the second holds none and borrows
them while it attends. The model asks the cache for each layer's view (`view_layer`:
`borrow`) and hands back what the layer owns (`own_layer`: `release`), so the directions
exist once in the cache pytree: that is where the memory goes. Tokens appended after the
merge (questions, generated text) go to each layer's own dense `tail`.

A slot's key is rebuilt as magnitude * direction (the direction is unit length), except at
the retained slots, whose original key is stored; values likewise, with their own
magnitudes and retained slots. Attention reads the rebuilt keys and values like a dense
cache (merged slots first, then the tail).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.cache.kv_cache import LayerCache, NewTokens, PerHeadSlots, map_state


def view_layer(layers: tuple, index: int):
  """Layer `index` as it attends: layers that share storage borrow it from their source."""
  layer = layers[index]
  borrow = getattr(layer, "borrow", None)
  return layer if borrow is None else borrow(layers)


def own_layer(layer):
  """What a layer stores in the cache: borrowed storage is handed back."""
  release = getattr(layer, "release", None)
  return layer if release is None else release()


@struct.dataclass
class Directions:
  """Unit directions shared by a pair of layers: keys and values [B, K, S, D]."""
  keys: jax.Array
  values: jax.Array


@struct.dataclass
class Retained:
  """One layer's outlier slots, stored exactly: index [B, K, R] int32 (slot, -1 = none)
  and the original vectors [B, K, R, D]."""
  index: jax.Array
  vectors: jax.Array


def rebuild(norms: jax.Array, directions: jax.Array, retained: Retained, dtype) -> jax.Array:
  """[B, K, S, D]: norms [B, K, S] x unit directions, retained slots restored."""
  out = (norms[..., None].astype(jnp.float32) * directions.astype(jnp.float32)).astype(dtype)
  b, k, r = retained.index.shape
  s = out.shape[2]
  rows, heads = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
  slot = jnp.where(retained.index >= 0, retained.index, s)
  return out.at[rows, heads, slot].set(retained.vectors.astype(dtype), mode="drop")


@struct.dataclass
class MergedLayerCache(PerHeadSlots):
  """One layer of a merged pair: its magnitudes, retained outliers and tail; the pair's
  directions when it owns them (or while it borrows them to attend)."""
  key_norms: jax.Array      # [B, K, S]
  value_norms: jax.Array    # [B, K, S]
  positions: jax.Array      # [B, K, S] int32
  retained_keys: Retained
  retained_values: Retained
  tail: LayerCache          # tokens appended after the merge
  directions: Directions | None = None
  source: int = struct.field(pytree_node=False, default=-1)  # owner's layer index; -1: self

  @property
  def merged_slots(self) -> int:
    return self.positions.shape[2]

  @property
  def capacity(self) -> int:
    return self.merged_slots + self.tail.capacity

  def borrow(self, layers: tuple) -> "MergedLayerCache":
    if self.source < 0:
      return self
    return self.replace(directions=layers[self.source].directions)

  def release(self) -> "MergedLayerCache":
    return self if self.source < 0 else self.replace(directions=None)

  def dense(self) -> LayerCache:
    """The rebuilt keys and values of the merged slots followed by the tail (one dense
    layer: what attention reads)."""
    if self.directions is None:
      raise ValueError("a merged layer that borrows its directions must attend through "
                       "its cache view (kv_cache.Cache.layer_view)")
    dtype = self.tail.keys.dtype
    keys = rebuild(self.key_norms, self.directions.keys, self.retained_keys, dtype)
    values = rebuild(self.value_norms, self.directions.values, self.retained_values, dtype)
    state = None if self.tail.state is None else map_state(
        lambda s: jnp.concatenate([jnp.zeros(s.shape[:2] + (self.merged_slots,) + s.shape[3:],
                                             s.dtype), s], axis=2), self.tail.state)
    return LayerCache(keys=jnp.concatenate([keys, self.tail.keys], axis=2),
                      values=jnp.concatenate([values, self.tail.values], axis=2),
                      positions=jnp.concatenate([self.positions, self.tail.positions], axis=2),
                      end=self.tail.end + self.merged_slots, state=state)

  def slot_positions(self) -> jax.Array:
    return jnp.concatenate([self.positions, self.tail.positions], axis=2)

  def free_slots(self) -> int:
    return self.tail.free_slots()

  def logical_axes(self) -> dict:
    slot = ("batch", "kv_heads", "slots")
    retained = {"index": slot, "vectors": slot + ("head_dim",)}
    return {"key_norms": slot, "value_norms": slot, "positions": slot,
            "retained_keys": retained, "retained_values": retained,
            "tail": self.tail.logical_axes(),
            "directions": {"keys": slot + ("head_dim",), "values": slot + ("head_dim",)}}

  def append(self, new: NewTokens) -> "MergedLayerCache":
    return self.replace(tail=self.tail.append(new))

  def grow(self, room: int) -> "MergedLayerCache":
    return self.replace(tail=self.tail.grow(room))

  def attend(self, queries, query_positions, pending=None, want=frozenset()):
    return self.dense().attend(queries, query_positions, pending, want)

  def candidates(self, new: NewTokens) -> LayerCache:
    return self.dense().candidates(new)
