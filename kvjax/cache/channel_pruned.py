"""The channel-pruned layer cache (ThinK): context keys stored at D' of D channels.

Slots are split in two parts, each sized to what it holds (the pruned part padded with
reserved slots where `generate` rounds it, `reserve`):
  * pruned: per (batch row, KV head) the kept key channels `channels [B, K, D']` (int32,
    ascending), the context keys at those channels only `[B, K, S, D']`, full values
    `[B, K, S, D]` and positions `[B, K, S]`;
  * full: a dense full-width `LayerCache` with the most recent `recent` context keys and
    every token appended later (question and decode tokens are stored at full width, as
    ThinK does), with room grown for them.
Bytes therefore shrink with the kept channels: keys D'/D of the dense ones, values and
positions as dense, plus B * K * D' int32 channel indices per layer.

Attention reads each part through one function and merges them exactly by log-sum-exp
(`kvjax.ops.channel_pruned`): the pruned part's logits are q[channels] . k_pruned scaled by
the full head dim, equal to what zero-filled keys would give, without storing or reading
the zeros. Decode on GPU/TPU runs the channel-pruned kernel for the pruned part (the query
gathered to D' channels in XLA, keys read at D') and the dense decode kernel for the full
part; prefill chunks, questions and statistics run the jnp path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.cache.kv_cache import (COLUMN_SUMS, PROBS, RESERVED_POSITION, LayerCache, NewTokens,
                                  PerHeadSlots, Stats, pad_slots)
from kvjax.ops import channel_pruned as pruned_ops


@struct.dataclass
class ChannelPrunedLayerCache(PerHeadSlots):
  channels: jax.Array    # [B, K, D'] int32: the key channels each KV head kept, ascending
  keys: jax.Array        # [B, K, S, D'] context keys (post-RoPE) at those channels
  values: jax.Array      # [B, K, S, D]
  positions: jax.Array   # [B, K, S] int32, EMPTY_POSITION where unused (RESERVED_POSITION
                         # where `reserve` padded it)
  full: LayerCache       # full-width slots: the recent context keys, then appended tokens

  @property
  def state(self):  # per-slot method state is not kept for pruned slots
    return None

  @property
  def pruned_capacity(self) -> int:
    return self.keys.shape[2]

  @property
  def capacity(self) -> int:
    return self.pruned_capacity + self.full.capacity

  def free_slots(self) -> int:
    return self.full.free_slots()

  def slot_positions(self) -> jax.Array:
    """Pruned slots first, then the full-width ones (`positions` holds only the former)."""
    return jnp.concatenate([self.positions, self.full.positions], axis=2)

  def logical_axes(self) -> dict:
    slot = ("batch", "kv_heads", "slots")
    return {"channels": ("batch", "kv_heads", "kept_channels"),
            "keys": slot + ("kept_channels",), "values": slot + ("head_dim",),
            "positions": slot, "full": self.full.logical_axes()}

  @classmethod
  def from_dense(cls, dense: LayerCache, channels: jax.Array, recent: int
                 ) -> "ChannelPrunedLayerCache":
    """Splits a dense cache: per head the `recent` slots with the largest positions stay
    full width (fewer when it has fewer slots; empty slots sort first, so they land there
    only when a head holds fewer than `recent` tokens), the others keep `channels`."""
    s = dense.capacity
    r = min(recent, s)
    order = jnp.argsort(dense.positions, axis=-1, stable=True).astype(jnp.int32)
    old = _select(dense, order[..., :s - r])
    index = channels[:, :, None, :].astype(jnp.int32)
    return cls(channels=channels.astype(jnp.int32),
               keys=jnp.take_along_axis(old.keys, index, axis=-1), values=old.values,
               positions=old.positions, full=_select(dense, order[..., s - r:]))

  def zero_filled(self) -> LayerCache:
    """Both parts as one dense full-width cache (pruned slots first), the dropped key
    channels set to zero. Only for re-scoring during chunked prefill: the zeros are the
    channels the previous chunk pruned, so a new channel choice cannot bring them back."""
    b, k, s, dk = self.keys.shape
    d = self.values.shape[-1]
    at = (jnp.arange(b)[:, None, None, None], jnp.arange(k)[None, :, None, None],
          jnp.arange(s)[None, None, :, None], self.channels[:, :, None, :])
    keys = jnp.zeros((b, k, s, d), self.keys.dtype).at[at].set(self.keys)
    f = self.full
    return LayerCache(keys=jnp.concatenate([keys, f.keys], axis=2),
                      values=jnp.concatenate([self.values, f.values], axis=2),
                      positions=self.slot_positions(),
                      end=jnp.int32(self.capacity))

  def attend(self, queries, query_positions, pending: NewTokens | None = None,
             want: frozenset = frozenset()):
    if PROBS in want:
      raise NotImplementedError("the channel-pruned layout returns no decode probabilities "
                                "(decode-time methods cannot run over it)")
    full = self.full if pending is None else self.full.candidates(pending)
    parts = (self.channels, self.keys, self.values, self.positions, full.keys, full.values,
             full.positions)
    if queries.shape[1] == 1 and pending is None and not want:
      return pruned_ops.decode(queries, query_positions, *parts), Stats()
    out = pruned_ops.attend(queries, query_positions, *parts,
                            column_sums=COLUMN_SUMS in want)
    return (out[0], Stats(column_sums=out[1])) if COLUMN_SUMS in want else (out, Stats())

  def append(self, new: NewTokens) -> "ChannelPrunedLayerCache":
    """New tokens go to the full-width part."""
    return self.replace(full=self.full.append(new))

  def candidates(self, new: NewTokens) -> LayerCache:
    """Dense candidates for re-scoring in chunked prefill: `zero_filled` plus the chunk."""
    return self.zero_filled().candidates(new)

  def select(self, index):
    raise NotImplementedError("a channel-pruned cache is compacted through its dense "
                              "candidates")

  def grow(self, room: int) -> "ChannelPrunedLayerCache":
    return self.replace(full=self.full.grow(room))

  def reserve_for(self, room: int, multiple: int) -> int:
    """The reserved slots (`reserve`) that round the pruned part, which appends never
    reach, up to a multiple of `multiple` (`kv_cache.reserve_rooms`)."""
    del room
    return (-self.pruned_capacity) % multiple

  def reserve(self, slots: int) -> "ChannelPrunedLayerCache":
    """`slots` more reserved pruned slots per head (RESERVED_POSITION, never attended;
    appends go to the full part), only there to give the pruned part a capacity that
    contexts of other lengths share (`kv_cache.reserve_rooms`)."""
    if slots == 0:
      return self
    return self.replace(keys=pad_slots(self.keys, slots), values=pad_slots(self.values, slots),
                        positions=pad_slots(self.positions, slots, RESERVED_POSITION))


def _select(dense: LayerCache, index: jax.Array) -> LayerCache:
  """dense.select(index) without state; an empty index gives a cache with no slots."""
  if index.shape[-1]:
    return dense.replace(state=None).select(index)
  return LayerCache(keys=dense.keys[:, :, :0], values=dense.values[:, :, :0],
                    positions=dense.positions[:, :, :0], end=jnp.int32(0))


def analytic_nbytes(batch: int, kv_heads: int, pruned_slots: int, full_slots: int,
                    head_dim: int, kept_channels: int, dtype) -> int:
  """What a channel-pruned layer should hold: pruned keys at D' channels, full values and
  an int32 position per pruned slot, full-width keys, values and positions for the rest,
  the channel index, and the full part's fill counter."""
  itemsize = jnp.dtype(dtype).itemsize
  heads = batch * kv_heads
  pruned = heads * pruned_slots * ((kept_channels + head_dim) * itemsize + 4)
  full = heads * full_slots * (2 * head_dim * itemsize + 4)
  return pruned + full + heads * kept_channels * 4 + 4
