"""Layers that share storage across layers: MiniCache (a pair of adjacent layers stores one
unit direction per token and head, each layer its own magnitudes and the originals of its
few outlier tokens) and xKV (a group of adjacent layers shares one low-rank token basis,
each layer its own coefficients).

The first layer of a pair or group owns the shared part; the others hold none and borrow
it while they attend. The model asks the cache for each layer's view (`view_layer`:
`borrow`) and hands back what the layer owns (`own_layer`: `release`), so the directions
exist once in the cache pytree: that is where the memory goes. Tokens appended after the
merge (questions, generated text) go to each layer's own dense `tail`.

Decode (one query per row, no statistics that need every slot's probability) does not
rebuild the layer's dense cache: the shared slots go through a fused attention
(`kvjax.ops.cross_layer`: xKV absorbs the value coefficients, and its Pallas kernel rebuilds
key tiles inside the attention where the jnp path rebuilds the keys; MiniCache scales
logits and outputs by the norms and attends its retained slots exactly beside them), the
tail through the dense decode attention, and the two partials merge by log-sum-exp: one
softmax over every slot. Prefill chunks, questions and statistics read the rebuilt keys and
values like a dense cache (`dense`: the shared slots first, then the tail).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.cache.kv_cache import (COLUMN_SUMS, PROBS, RESERVED_POSITION, LayerCache,
                                  NewTokens, PerHeadSlots, Stats, map_state, pad_slots)
from kvjax.ops import attention as attention_ops
from kvjax.ops import cross_layer as cross_layer_ops
from kvjax.ops import rope

# Statistics only the rebuilt dense slots give (every slot's probability).
_DENSE_STATS = frozenset({COLUMN_SUMS, PROBS})


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


class SharesLayers(PerHeadSlots):
  """What layers with a shared part have in common: `shared` (owned when `source` < 0,
  else borrowed from layer `source` while attending), the slots rebuilt by `rebuilt`
  ([B, K, S, D] keys and values) at `positions`, and a dense `tail` for later tokens."""

  @property
  def shared_slots(self) -> int:
    return self.positions.shape[2]

  @property
  def capacity(self) -> int:
    return self.shared_slots + self.tail.capacity

  def borrow(self, layers: tuple):
    if self.source < 0:
      return self
    return self.replace(shared=layers[self.source].shared)

  def release(self):
    return self if self.source < 0 else self.replace(shared=None)

  def _check_shared(self):
    if self.shared is None:
      raise ValueError("a layer that borrows its shared part must attend through its cache "
                       "view (cross_layer.view_layer)")

  def dense(self) -> LayerCache:
    """The rebuilt slots followed by the tail (one dense layer: what prefill reads)."""
    self._check_shared()
    keys, values = self.rebuilt()
    n = self.shared_slots
    state = None if self.tail.state is None else map_state(
        lambda s: jnp.concatenate([jnp.zeros(s.shape[:2] + (n,) + s.shape[3:], s.dtype), s],
                                  axis=2), self.tail.state)
    return LayerCache(keys=jnp.concatenate([keys.astype(self.tail.keys.dtype), self.tail.keys],
                                           axis=2),
                      values=jnp.concatenate([values.astype(self.tail.values.dtype),
                                              self.tail.values], axis=2),
                      positions=jnp.concatenate([self.positions, self.tail.positions], axis=2),
                      end=self.tail.end + n, state=state)

  def slot_positions(self) -> jax.Array:
    return jnp.concatenate([self.positions, self.tail.positions], axis=2)

  def free_slots(self) -> int:
    return self.tail.free_slots()

  def append(self, new: NewTokens):
    return self.replace(tail=self.tail.append(new))

  def grow(self, room: int):
    return self.replace(tail=self.tail.grow(room))

  def reserve_for(self, room: int, multiple: int) -> int:
    """The reserved slots (`reserve`) that round the shared slots, which appends never
    reach (they go to the tail, grown by the room), up to a multiple of `multiple`
    (`kv_cache.reserve_rooms`): as many for every layer of a pair or group."""
    del room
    return (-self.shared_slots) % multiple

  def reserve(self, slots: int):
    """`slots` more reserved shared slots per head (RESERVED_POSITION: never attended), in
    the layer's own per-slot parts and in the shared part where it owns it: only there to
    give the layers sizes that contexts of other lengths share."""
    if slots == 0:
      return self
    return self.shared_reserved(slots).replace(
        positions=pad_slots(self.positions, slots, RESERVED_POSITION))

  def attend(self, queries, query_positions, pending=None, want=frozenset()):
    if (pending is not None or queries.shape[1] > 1 or want & _DENSE_STATS
        or not self.shared_slots):
      return self.dense().attend(queries, query_positions, pending, want)
    # Decode: the shared slots fused (`decode_shared`), the tail dense, merged by lse.
    self._check_shared()
    out, lse = self.decode_shared(queries, query_positions)
    tail = self.tail
    if tail.capacity:
      grouped = (queries.shape[0], tail.keys.shape[1], -1, queries.shape[-1])
      tail_out, tail_lse = attention_ops.decode(queries, tail.keys, tail.values,
                                                query_positions, tail.positions)
      out, _ = attention_ops.merge_partials(out.reshape(grouped).astype(jnp.float32), lse,
                                            tail_out.reshape(grouped).astype(jnp.float32),
                                            tail_lse)
    return out.reshape(queries.shape).astype(queries.dtype), Stats()

  def candidates(self, new: NewTokens) -> LayerCache:
    return self.dense().candidates(new)


@struct.dataclass
class MergedLayerCache(SharesLayers):
  """One layer of a MiniCache pair: its magnitudes and retained outliers; the pair's unit
  directions (`shared`) when it owns them. A slot's key is its norm times the direction,
  except at retained slots, whose original key is stored; values likewise, with their own
  norms and retained slots."""
  key_norms: jax.Array      # [B, K, S]
  value_norms: jax.Array    # [B, K, S]
  positions: jax.Array      # [B, K, S] int32
  retained_keys: Retained
  retained_values: Retained
  tail: LayerCache          # tokens appended after the merge
  shared: Directions | None = None
  source: int = struct.field(pytree_node=False, default=-1)  # owner's layer index; -1: self
  # The share of slots the retained entries stand for: reserved slots get entries for
  # their share too (none: index -1), so that contexts whose slots round alike hold as many.
  retain_fraction: float = struct.field(pytree_node=False, default=0.0)

  def shared_reserved(self, slots: int) -> "MergedLayerCache":
    """Norms (and owned directions) with `slots` more zero slots (`reserve`), and the
    retained entries with as many more as `retain_fraction` gives those slots."""
    pad = lambda x: pad_slots(x, slots)
    shared = None if self.shared is None else Directions(keys=pad(self.shared.keys),
                                                         values=pad(self.shared.values))
    have = self.retained_keys.index.shape[2]
    more = max(0, math.ceil(self.retain_fraction * (self.shared_slots + slots)) - have)
    retained = lambda r: Retained(index=pad_slots(r.index, more, -1),
                                  vectors=pad_slots(r.vectors, more))
    return self.replace(key_norms=pad(self.key_norms), value_norms=pad(self.value_norms),
                        shared=shared, retained_keys=retained(self.retained_keys),
                        retained_values=retained(self.retained_values))

  def rebuilt(self):
    dtype = self.tail.keys.dtype
    return (rebuild(self.key_norms, self.shared.keys, self.retained_keys, dtype),
            rebuild(self.value_norms, self.shared.values, self.retained_values, dtype))

  def decode_shared(self, queries, query_positions):
    """(out [B, 1, H, D], lse [B, K, G]) of one query per row over the shared slots."""
    slots = cross_layer_ops.MergedSlots(
        key_norms=self.key_norms, value_norms=self.value_norms,
        key_directions=self.shared.keys, value_directions=self.shared.values,
        key_index=self.retained_keys.index, key_vectors=self.retained_keys.vectors,
        value_index=self.retained_values.index, value_vectors=self.retained_values.vectors)
    return cross_layer_ops.merged_decode(queries, slots, self.positions, query_positions)

  def logical_axes(self) -> dict:
    slot = ("batch", "kv_heads", "slots")
    retained = {"index": slot, "vectors": slot + ("head_dim",)}
    return {"key_norms": slot, "value_norms": slot, "positions": slot,
            "retained_keys": retained, "retained_values": retained,
            "tail": self.tail.logical_axes(),
            "shared": {"keys": slot + ("head_dim",), "values": slot + ("head_dim",)}}


@struct.dataclass
class Basis:
  """xKV's token-side factors shared by a group of layers: keys [B, S, r_k] and values
  [B, S, r_v] (U * Sigma of the group's truncated SVD)."""
  keys: jax.Array
  values: jax.Array


def undo_rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
  """Pre-RoPE keys from post-RoPE x [B, K, S, D] at positions [B, K, S] (the inverse
  rotation; RoPE is orthogonal, so this is exact up to float error)."""
  return rope.apply_rope(x.transpose(0, 2, 1, 3), positions[:, 0], inv_freq,
                         inverse=True).transpose(0, 2, 1, 3)


@struct.dataclass
class LowRankLayerCache(SharesLayers):
  """One layer of an xKV group: its coefficients ([B, r, K * D] slices of the group's
  right factors) for pre-RoPE keys and for values; keys are rotated back to their
  positions when rebuilt. The group's basis (`shared`) when it owns it."""
  key_coefficients: jax.Array    # [B, r_k, K * D]
  value_coefficients: jax.Array  # [B, r_v, K * D]
  positions: jax.Array           # [B, K, S] int32 (the same for every head)
  tail: LayerCache
  shared: Basis | None = None
  source: int = struct.field(pytree_node=False, default=-1)
  inv_freq: tuple = struct.field(pytree_node=False, default=())

  def shared_reserved(self, slots: int) -> "LowRankLayerCache":
    """The owned basis with `slots` more zero rows (`reserve`); coefficients are per rank,
    not per slot."""
    if self.shared is None:
      return self
    pad = lambda x: jnp.pad(x, [(0, 0), (0, slots), (0, 0)])
    return self.replace(shared=Basis(keys=pad(self.shared.keys), values=pad(self.shared.values)))

  def rebuilt(self):
    b, k, s = self.positions.shape
    expand = lambda basis, coefficients: jnp.einsum(
        "bsr,brc->bsc", basis.astype(jnp.float32), coefficients.astype(jnp.float32)
    ).reshape(b, s, k, -1)
    keys = rope.apply_rope(expand(self.shared.keys, self.key_coefficients),
                           self.positions[:, 0], jnp.asarray(self.inv_freq, jnp.float32))
    values = expand(self.shared.values, self.value_coefficients)
    valid = (self.positions >= 0)[..., None]
    return (jnp.where(valid, keys.transpose(0, 2, 1, 3), 0),
            jnp.where(valid, values.transpose(0, 2, 1, 3), 0))

  def decode_shared(self, queries, query_positions):
    """(out [B, 1, H, D], lse [B, K, G]) of one query per row over the shared slots (a
    basis row is one token: its position is the same for every head)."""
    slots = cross_layer_ops.LowRankSlots(
        key_basis=self.shared.keys, value_basis=self.shared.values,
        key_coefficients=self.key_coefficients, value_coefficients=self.value_coefficients)
    return cross_layer_ops.lowrank_decode(queries, slots, self.positions[:, 0],
                                          self.inv_freq, query_positions)

  def logical_axes(self) -> dict:
    slot = ("batch", "kv_heads", "slots")
    return {"key_coefficients": ("batch", "rank", "kv_heads_head_dim"),
            "value_coefficients": ("batch", "rank", "kv_heads_head_dim"),
            "positions": slot, "tail": self.tail.logical_axes(),
            "shared": {"keys": ("batch", "slots", "rank"),
                       "values": ("batch", "slots", "rank")}}
