"""The mixed-precision layer cache (MiKV, ZipVL): no token dropped, two precisions.

Every context token is stored exactly once per (row, KV head), in one of two pools, each
sized to what it holds:
  * high: the important tokens, at full precision (`high_bits=16`: the model's dtype) or
    as `high_bits` codes;
  * low: every other context token, as `low_bits` codes.
Codes are per token (`axis="channels"`, groups of `group` channels), since a pool holds
scattered tokens and per-channel groups need consecutive ones. Per-token keys suffer from
channel outliers, so quantized pools store keys balanced, `k * balance` (MiKV's outlier
balancer, [B, K, D] per layer and KV head; ones when off), and attention reads them with
queries `q / balance`: q.k is unchanged while the outlier channels are flattened.
  * recent: a dense full-precision `LayerCache` for tokens appended after the prefill
    (questions and decode tokens). Both methods choose their important set once, from the
    prefill; later tokens have no importance yet and are few, so they stay exact instead
    of being quantized one by one (KIVI's group flushes would need consecutive tokens).
Each slot keeps its original position, so attention masks exactly as the dense layout
does. Decode reads the parts as one softmax over their union
(`quant_ops.union_decode_attention`), the balance folded into the query once: on GPU/TPU
each quantized pool goes through the dequantizing decode kernel (per-token key codes) and
the dense parts through the dense one, merged by log-sum-exp; on CPU the pools are
dequantized and all logits come from dot products. Prefill chunks, questions and
statistics attend over the dequantized slots.

Per-slot method state (a press's accumulated scores during chunked prefill) spans
[high, low, recent] in that order, the order of `dequantized()` and `candidates()`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.cache.kv_cache import (EMPTY_POSITION, RESERVED_POSITION, LayerCache, NewTokens,
                                  PerHeadSlots, Stats, map_state, pad_slots)
from kvjax.ops import quantization as quant_ops
from kvjax.ops.host import host_array

FULL_PRECISION = quant_ops.FULL_PRECISION  # "bits" of slots kept in the model's dtype
SLOT_BUCKET = 16   # pools are trimmed to a multiple of this many slots (fewer recompiles)


@struct.dataclass
class Pool:
  """S slots per KV head at one precision. At 16 bits keys/values are dense [B, K, S, D]
  (keys not balanced); otherwise uint32 codes [B, K, S, D * bits // 32] of balanced keys
  and of values, with a scale and a zero per token and channel group [B, K, S, D // group]."""
  keys: jax.Array
  values: jax.Array
  positions: jax.Array          # [B, K, S] int32, EMPTY_POSITION where unused
  key_scale: Any = None
  key_zero: Any = None
  value_scale: Any = None
  value_zero: Any = None

  @property
  def capacity(self) -> int:
    return self.positions.shape[2]

  def take(self, index: jax.Array) -> "Pool":
    """Slots `index` [B, K, N] (every leaf has the slot axis 2)."""
    return jax.tree_util.tree_map(
        lambda a: jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 3)),
                                      axis=2), self)

  def reserved(self, slots: int) -> "Pool":
    """`slots` more reserved slots per head (RESERVED_POSITION, never attended)."""
    padded = jax.tree_util.tree_map(lambda a: pad_slots(a, slots), self)
    return padded.replace(positions=pad_slots(self.positions, slots, RESERVED_POSITION))


def quantize_pool(keys, values, positions, balance, bits: int, group: int) -> Pool:
  """A pool of dense slots [B, K, S, D]: kept as they are at 16 bits, else keys times
  `balance` [B, K, D] and values quantized per token; empty slots widen no range."""
  if bits == FULL_PRECISION:
    return Pool(keys=keys, values=values, positions=positions.astype(jnp.int32))
  b, k, s, d = keys.shape
  dtype = keys.dtype
  if s == 0:  # an empty pool: the right shapes, nothing to quantize
    codes = jnp.zeros((b, k, 0, d * bits // 32), jnp.uint32)
    param = jnp.zeros((b, k, 0, d // group), dtype)
    return Pool(keys=codes, values=codes, positions=positions.astype(jnp.int32),
                key_scale=param, key_zero=param, value_scale=param, value_zero=param)
  valid = positions >= 0
  balanced = keys.astype(jnp.float32) * balance[:, :, None, :]
  kc, ks, kz = quant_ops.quantize(balanced, bits=bits, group=group, axis="channels",
                                  valid=valid, scale_dtype=dtype)
  vc, vs, vz = quant_ops.quantize(values, bits=bits, group=group, axis="channels",
                                  valid=valid, scale_dtype=dtype)
  return Pool(keys=kc, values=vc, positions=positions.astype(jnp.int32), key_scale=ks,
              key_zero=kz, value_scale=vs, value_zero=vz)


def dequantize_pool(pool: Pool, bits: int, group: int, dtype):
  """(keys as stored -- balanced when quantized --, values) [B, K, S, D] in `dtype`."""
  if bits == FULL_PRECISION:
    return pool.keys.astype(dtype), pool.values.astype(dtype)
  keys = quant_ops.dequantize(pool.keys, pool.key_scale, pool.key_zero, bits=bits,
                              group=group, axis="channels", dtype=jnp.float32)
  values = quant_ops.dequantize(pool.values, pool.value_scale, pool.value_zero, bits=bits,
                                group=group, axis="channels", dtype=dtype)
  return keys, values


@struct.dataclass
class MixedPrecisionLayerCache(PerHeadSlots):
  high: Pool               # important tokens (high_bits)
  low: Pool                # the other context tokens (low_bits)
  recent: LayerCache       # tokens appended after prefill, full precision
  balance: jax.Array       # [B, K, D] float32: quantized pools hold keys * balance
  important: jax.Array     # [B, K] int32: tokens the method chose as important (stats)
  state: Any = None        # per-slot method state over [high, low, recent] (prefill only)
  high_bits: int = struct.field(pytree_node=False, default=8)
  low_bits: int = struct.field(pytree_node=False, default=2)
  group: int = struct.field(pytree_node=False, default=32)

  @property
  def capacity(self) -> int:
    return self.high.capacity + self.low.capacity + self.recent.capacity

  def slot_positions(self) -> jax.Array:
    return jnp.concatenate([self.high.positions, self.low.positions, self.recent.positions],
                           axis=2)

  def free_slots(self) -> int:
    return self.recent.free_slots()

  def logical_axes(self) -> dict:
    slot = ("batch", "kv_heads", "slots")

    def pool_axes(pool, bits):
      last = "head_dim" if bits == FULL_PRECISION else "packed"
      axes = {"keys": slot + (last,), "values": slot + (last,), "positions": slot}
      if bits != FULL_PRECISION:
        axes.update({name: slot + ("groups",) for name in
                     ("key_scale", "key_zero", "value_scale", "value_zero")})
      return axes

    return {"high": pool_axes(self.high, self.high_bits),
            "low": pool_axes(self.low, self.low_bits), "recent": self.recent.logical_axes(),
            "balance": ("batch", "kv_heads", "head_dim"), "important": ("batch", "kv_heads"),
            "state": slot}

  def _pool_kv(self, pool: Pool, bits: int, dtype, unbalance: bool):
    keys, values = dequantize_pool(pool, bits, self.group, dtype)
    if bits != FULL_PRECISION and unbalance:
      keys = keys / self.balance[:, :, None, :]
    return keys.astype(dtype), values

  def dequantized(self) -> LayerCache:
    """Every slot as one dense full-precision cache ([high, low, recent]), keys divided by
    the balance again (for prefill chunks, questions and scoring)."""
    dtype = self.recent.keys.dtype
    hk, hv = self._pool_kv(self.high, self.high_bits, dtype, True)
    lk, lv = self._pool_kv(self.low, self.low_bits, dtype, True)
    r = self.recent
    return LayerCache(keys=jnp.concatenate([hk, lk, r.keys], axis=2),
                      values=jnp.concatenate([hv, lv, r.values], axis=2),
                      positions=self.slot_positions(), end=jnp.int32(self.capacity),
                      state=self.state)

  def attend(self, queries, query_positions, pending: NewTokens | None = None,
             want: frozenset = frozenset()):
    if pending is not None or want or queries.shape[1] > 1:
      return self.dequantized().attend(queries, query_positions, pending, want)
    # Decode: one softmax over the union of the parts, no dense copy of a pool.
    b, _, h, d = queries.shape
    k = self.balance.shape[1]
    q = queries.astype(jnp.float32).reshape(b, k, h // k, d)
    balanced = q / self.balance[:, :, None, :]   # quantized keys are stored times balance
    parts = [quant_ops.DecodePart(q if bits == FULL_PRECISION else balanced, pool.keys,
                                  pool.values, pool.positions, bits, self.group,
                                  pool.key_scale, pool.key_zero, pool.value_scale,
                                  pool.value_zero)
             for pool, bits in ((self.high, self.high_bits), (self.low, self.low_bits))]
    r = self.recent
    parts.append(quant_ops.DecodePart(q, r.keys, r.values, r.positions))
    out, _ = quant_ops.union_decode_attention(parts, query_positions[:, 0], queries.dtype)
    return out.reshape(queries.shape).astype(queries.dtype), Stats()

  def append(self, new: NewTokens) -> "MixedPrecisionLayerCache":
    """New tokens go to the full-precision recent part (the host checks its room). Method
    state, if still kept, gets zeros for them."""
    state = self.state
    if state is not None:
      start = self.high.capacity + self.low.capacity + self.recent.end
      t = new.keys.shape[2]
      state = map_state(lambda s: jax.lax.dynamic_update_slice_in_dim(
          s, jnp.zeros(s.shape[:2] + (t,) + s.shape[3:], s.dtype), start, 2), state)
    return self.replace(recent=self.recent.append(new), state=state)

  def candidates(self, new: NewTokens) -> LayerCache:
    return self.dequantized().candidates(new)

  def select(self, index):
    raise NotImplementedError("a mixed-precision cache is compacted through its dense "
                              "candidates")

  def grow(self, room: int) -> "MixedPrecisionLayerCache":
    if room == 0:
      return self
    return self.replace(recent=self.recent.grow(room),
                        state=map_state(lambda s: pad_slots(s, room), self.state))

  def reserve_for(self, room: int, multiple: int):
    """(high, low): the reserved slots (`reserve`) that round each pool, which appends
    never reach, up to a multiple of `multiple` (`kv_cache.reserve_rooms`); 0 where
    neither needs any, or while per-slot state (laid out over the pools) is kept."""
    del room
    pads = ((-self.high.capacity) % multiple, (-self.low.capacity) % multiple)
    return pads if any(pads) and self.state is None else 0

  def reserve(self, slots: tuple[int, int]) -> "MixedPrecisionLayerCache":
    """`slots` = (high, low) more reserved slots per head in each pool, only there to give
    the pools capacities that contexts of other lengths share."""
    if self.state is not None:
      raise ValueError("a mixed-precision layer with per-slot state cannot be reserved")
    high, low = slots
    return self.replace(high=self.high.reserved(high), low=self.low.reserved(low))

  @classmethod
  def from_split(cls, cand: LayerCache, high_index, low_index, balance, important, *,
                 high_bits: int, low_bits: int, group: int, state=None
                 ) -> "MixedPrecisionLayerCache":
    """Stores dense candidates split into slots high_index [B, K, H] and low_index
    [B, K, L] (an index < 0 is an empty slot); `state`: the candidates' method state."""
    b, k, _, d = cand.keys.shape

    def part(index, bits):
      safe = jnp.maximum(index, 0)
      take = lambda a: jnp.take_along_axis(a, safe[..., None], axis=2)
      positions = jnp.where(index >= 0, jnp.take_along_axis(cand.positions, safe, axis=2),
                            EMPTY_POSITION)
      return quantize_pool(take(cand.keys), take(cand.values), positions, balance, bits,
                           group)

    if state is not None:
      index = jnp.maximum(jnp.concatenate([high_index, low_index], axis=2), 0)
      state = map_state(lambda s: jnp.take_along_axis(
          s, index.reshape(index.shape + (1,) * (s.ndim - 3)), axis=2), state)
    recent = LayerCache(keys=jnp.zeros((b, k, 0, d), cand.keys.dtype),
                        values=jnp.zeros((b, k, 0, d), cand.values.dtype),
                        positions=jnp.zeros((b, k, 0), jnp.int32), end=jnp.int32(0))
    return cls(high=part(high_index, high_bits), low=part(low_index, low_bits), recent=recent,
               balance=balance.astype(jnp.float32), important=important.astype(jnp.int32),
               state=state, high_bits=high_bits, low_bits=low_bits, group=group)

  def trimmed(self) -> "MixedPrecisionLayerCache":
    """Host side, after prefill: each pool keeps its filled slots first and only as many
    slots as its fullest (row, head) needs, rounded up to SLOT_BUCKET; method state is
    dropped (decode does not read it). Reads the positions, so not under jit."""
    def trim(pool):
      valid = host_array(pool.positions) >= 0
      need = int(valid.sum(-1).max()) if valid.size else 0
      size = min(pool.capacity, -(-need // SLOT_BUCKET) * SLOT_BUCKET)
      if size == pool.capacity and valid[..., :need].all():
        return pool
      order = np.argsort(~valid, axis=-1, kind="stable")[..., :size]  # filled slots first
      return pool.take(jnp.asarray(order, jnp.int32))

    return self.replace(high=trim(self.high), low=trim(self.low), state=None)


def mixed_nbytes(batch: int, kv_heads: int, high_slots: int, low_slots: int,
                 recent_slots: int, head_dim: int, high_bits: int, low_bits: int, group: int,
                 dtype) -> int:
  """Analytic bytes of a mixed layer: per slot, codes (or full keys/values) plus a scale
  and a zero per token and channel group for keys and values, and an int32 position; the
  recent part in full precision; the balance (float32) and the important counts."""
  itemsize = jnp.dtype(dtype).itemsize

  def pool(slots, bits):
    if bits == FULL_PRECISION:
      per_slot = 2 * head_dim * itemsize
    else:
      per_slot = 2 * head_dim * bits // 8 + 4 * (head_dim // group) * itemsize
    return batch * kv_heads * slots * (per_slot + 4)

  recent = batch * kv_heads * recent_slots * (2 * head_dim * itemsize + 4) + 4
  return (pool(high_slots, high_bits) + pool(low_slots, low_bits) + recent
          + batch * kv_heads * (head_dim * 4 + 4))
