"""KV caches: immutable pytrees of layer caches that all speak one small protocol.

A layer's cache holds slots. Each slot has a post-RoPE key, a value, the original token
position it came from (-1 = empty) and, optionally, per-slot method state (an opaque pytree
whose leaves have the slot axes of `positions`). Attention masks by positions (valid and
causal), so padding, compaction and reordering of slots need no other bookkeeping.

The layer-cache protocol (what the model and the compression policies call):
  attend(queries, query_positions, pending, want) -> (out [B, T, H, D], Stats)
      attention over the cache's slots plus `pending` new tokens not yet stored (None
      when they were appended first); `want` names the statistics to return.
  append(new: NewTokens) -> layer        store new tokens in free slots
  candidates(new) -> LayerCache          the slots plus new tokens, dense (for scoring)
  select(index [B, K, keep]) -> layer    keep the slots `index` (compaction)
  grow(room) -> layer                    `room` more empty slots per head
  free_slots() -> int, slots_per_head(num_kv_heads) -> int (host side)
  slot_positions() -> int32 [B, K, S] (flat: [B, N])  every slot's original token position
      (EMPTY_POSITION where empty), in the slot order of `candidates` / `dequantized`
  nbytes, logical_axes()

Layouts here: `LayerCache` (dense [B, K, S, D]: uniform and layer-wise budgets),
`FlatLayerCache` (all heads' slots in one axis: head-wise budgets) and `LatentLayerCache`
(one latent per token: multi-head latent attention). Quantized and other
layouts implement the same protocol in their own modules.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.config import ModelConfig
from kvjax.ops import attention as attention_ops
from kvjax.ops import rope
from kvjax.ops.host import host_array

EMPTY_POSITION = -1
# An empty slot no decode-time eviction writes: a row's filler in a layer whose slot count
# a batch shares (its row keeps fewer there), so the row stays at its own budget.
RESERVED_POSITION = -2


@struct.dataclass
class NewTokens:
  """A chunk's new keys/values (post-RoPE), their positions (negative = padding) and, where
  the caller has them, their token ids (a cache that indexes text needs them)."""
  keys: jax.Array        # [B, K, T, D]
  values: jax.Array      # [B, K, T, D]
  positions: jax.Array   # [B, T] int32
  tokens: jax.Array | None = None   # [B, T] int32

  def head_positions(self) -> jax.Array:
    b, k, t, _ = self.keys.shape
    return jnp.broadcast_to(self.positions[:, None, :], (b, k, t)).astype(jnp.int32)


@struct.dataclass
class Stats:
  """Attention statistics a layer cache returns when asked (None when not asked).

  column_sums [B, H, S (+ T)]: each slot's probability summed over the queries (cache slots,
    then the pending tokens when there are any).
  probs [B, H, S]: decode only, the new query's probability of every cache slot.
  pending_probs [B, H]: decode only, the new query's probability of its own (pending) token.
  queries: (queries [B, T, H, D], positions [B, T]) appended without compressing (decode,
    questions): the step's own queries, for methods that keep them (LoopServe).
  layer: the layer cache as it stands after attending, when attending changed it (an
    offload tier's page buffer, kvjax.cache.page_buffer; SentenceKV's open-sentence query
    sum): the append policy and compression plans keep it.
  """
  column_sums: jax.Array | None = None
  probs: jax.Array | None = None
  pending_probs: jax.Array | None = None
  queries: tuple | None = None
  layer: Any = None


COLUMN_SUMS, PROBS, QUERIES = "column_sums", "probs", "queries"


def map_state(fn, state):
  """Applies fn to every leaf of a per-slot state pytree (None stays None)."""
  return None if state is None else jax.tree_util.tree_map(fn, state)


HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")


def _on_host(x) -> bool:
  sharding = getattr(x, "sharding", None)
  return getattr(sharding, "memory_kind", None) in HOST_MEMORY_KINDS


def nbytes(tree) -> int:
  """Device bytes held by a pytree: the sum of its leaves' sizes, leaves offloaded to host
  memory left out (`host_nbytes` counts those)."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree_util.tree_leaves(tree) if not _on_host(x)))


def host_nbytes(tree) -> int:
  """Bytes of a pytree's leaves that live in host memory (offloaded pages)."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree_util.tree_leaves(tree) if _on_host(x)))



def pad_slots(x: jax.Array, slots: int, value=0) -> jax.Array:
  """x [B, K, S, ...] with `slots` more along the slot axis, filled with `value`."""
  return jnp.pad(x, [(0, 0), (0, 0), (0, slots)] + [(0, 0)] * (x.ndim - 3),
                 constant_values=value)


class PerHeadSlots:
  """What layouts whose `capacity` counts slots per KV head share."""

  @property
  def nbytes(self) -> int:
    return nbytes(self)

  def slots_per_head(self, num_kv_heads: int) -> int:
    del num_kv_heads
    return self.capacity


@jax.jit
def _fill(positions: jax.Array):
  """(the most real slots any row and head holds, whether an empty slot precedes a real
  one anywhere)."""
  real = positions >= 0
  return jnp.max(real.sum(-1)), jnp.any(~real[..., :-1] & real[..., 1:])


_live_first = jax.jit(lambda layer, capacity: layer.live_first(capacity), static_argnums=1)


@struct.dataclass
class LayerCache(PerHeadSlots):
  """Dense layout: every KV head of a layer has `capacity` slots."""
  keys: jax.Array        # [batch, kv_heads, capacity, head_dim], post-RoPE
  values: jax.Array      # [batch, kv_heads, capacity, head_dim]
  positions: jax.Array   # [batch, kv_heads, capacity] int32, EMPTY_POSITION where unused
  end: jax.Array         # int32 scalar: next slot to append to (slots >= end are empty)
  state: Any = None      # per-slot method state, leaves [batch, kv_heads, capacity, ...]

  @property
  def capacity(self) -> int:
    return self.keys.shape[2]

  def slot_positions(self) -> jax.Array:
    return self.positions

  def free_slots(self) -> int:
    return self.capacity - int(self.end)

  def logical_axes(self) -> dict:
    slot = ("batch", "kv_heads", "slots")
    return {"keys": slot + ("head_dim",), "values": slot + ("head_dim",),
            "positions": slot, "end": (), "state": slot}

  def append(self, new: NewTokens) -> "LayerCache":
    """Writes the chunk at `end`. The caller guarantees end + T <= capacity (checked on the
    host before jit, since dynamic_update_slice would silently clamp). New slots start
    with zero state."""
    keys = new.keys
    start = (0, 0, self.end, 0)
    put_state = lambda s: jax.lax.dynamic_update_slice(
        s, jnp.zeros(keys.shape[:3] + s.shape[3:], s.dtype), start[:3] + (0,) * (s.ndim - 3))
    return LayerCache(
        keys=jax.lax.dynamic_update_slice(self.keys, keys.astype(self.keys.dtype), start),
        values=jax.lax.dynamic_update_slice(self.values, new.values.astype(self.values.dtype),
                                            start),
        positions=jax.lax.dynamic_update_slice(self.positions, new.head_positions(),
                                               start[:3]),
        end=self.end + keys.shape[2], state=map_state(put_state, self.state))

  def attend(self, queries, query_positions, pending: NewTokens | None = None,
             want: frozenset = frozenset()):
    if pending is None:
      if queries.shape[1] == 1 and COLUMN_SUMS not in want:
        out, _ = attention_ops.decode(queries, self.keys, self.values, query_positions,
                                      self.positions)
        return out, Stats()
      out = attention_ops.attend(queries, self.keys, self.values, query_positions,
                                 self.positions, column_sums=COLUMN_SUMS in want)
      return (out[0], Stats(column_sums=out[1])) if COLUMN_SUMS in want else (out, Stats())
    if queries.shape[1] == 1:
      # Decode with the new token held outside the cache: a decode-time method decides
      # which slot it replaces after seeing these probabilities.
      out, lse, probs = attention_ops.decode(queries, self.keys, self.values, query_positions,
                                             self.positions, return_probs=True)
      out, probs, own = attention_ops.with_pending_token(queries, out, lse, probs,
                                                         pending.keys, pending.values)
      return out, Stats(probs=probs, pending_probs=own)
    cand = self.candidates(pending)
    return cand.attend(queries, query_positions, None, want)

  def candidates(self, new: NewTokens) -> "LayerCache":
    """The cache's slots followed by the chunk; new slots get zero state."""
    t = new.keys.shape[2]
    extend = lambda s: jnp.concatenate(
        [s, jnp.zeros(s.shape[:2] + (t,) + s.shape[3:], s.dtype)], axis=2)
    return LayerCache(
        keys=jnp.concatenate([self.keys, new.keys.astype(self.keys.dtype)], axis=2),
        values=jnp.concatenate([self.values, new.values.astype(self.values.dtype)], axis=2),
        positions=jnp.concatenate([self.positions, new.head_positions()], axis=2),
        end=jnp.int32(self.capacity + t), state=map_state(extend, self.state))

  def select(self, index: jax.Array) -> "LayerCache":
    """Keeps slots `index` [B, K, keep] (in that order): capacity becomes keep."""
    keep = index.shape[-1]
    gather = lambda a: attention_ops.gather_head_slots(a, index)
    take = lambda a: jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 3)),
                                         axis=2)
    return LayerCache(keys=gather(self.keys), values=gather(self.values),
                      positions=take(self.positions), end=jnp.int32(keep),
                      state=map_state(take, self.state))

  def first_slots(self, n: int) -> "LayerCache":
    """Every head's first `n` slots: capacity n, `end` at most n."""
    cut = lambda a: a[:, :, :n]
    return LayerCache(keys=cut(self.keys), values=cut(self.values),
                      positions=cut(self.positions), end=jnp.minimum(self.end, n),
                      state=map_state(cut, self.state))

  def live_first(self, capacity: int | None = None) -> "LayerCache":
    """Every row's and head's live slots moved to the front, in slot order, then the
    capacity cut to `capacity` (unchanged when None); jit-safe. Live slots past `capacity`
    are dropped: the caller sizes it to the most any head holds, or accepts the loss."""
    order = jnp.argsort(self.positions < 0, axis=-1, stable=True)
    return self.select(order if capacity is None else order[..., :capacity])

  def trimmed(self) -> "LayerCache":
    """Host side: capacity cut to the most real tokens any row and head holds, each head's
    real slots first, in slot order: a prompt padded to a bucket width stores no padding
    slots after this, and a shorter row of a left-padded batch never has padding before
    its real slots (methods that keep the first slots as sinks read real tokens).
    Compiled once per shape (a handful of eager ops, each compiled anew at every new
    prompt length, cost more than the work), with one host read of the counts."""
    n, gap = (int(a) for a in jax.device_get(_fill(self.positions)))
    # Real slots already first everywhere (no empty slot before a real one): nothing to do.
    if n == self.capacity and not gap:
      return self
    return _live_first(self, n)

  def grow(self, room: int) -> "LayerCache":
    return self._extended(room, EMPTY_POSITION)

  def reserve(self, slots: int) -> "LayerCache":
    """`slots` more reserved slots per head (RESERVED_POSITION) at the end: never attended
    and never chosen by a decode-time eviction, only there to give the layer a shared
    capacity (appends past `end` may still fill them, as any slot past it)."""
    return self._extended(slots, RESERVED_POSITION)

  def _extended(self, slots: int, position: int) -> "LayerCache":
    """`slots` more slots per head at the end, their positions `position`, the rest zero."""
    if slots == 0:
      return self
    return self.replace(keys=pad_slots(self.keys, slots), values=pad_slots(self.values, slots),
                        positions=pad_slots(self.positions, slots, position),
                        state=map_state(lambda s: pad_slots(s, slots), self.state))

  def scoring_view(self):
    """(positions [B, K, S], owned [B, K, S] bool or None): the slots as a decode-time
    method scores them, per KV head."""
    return self.positions, None

  def state_view(self):
    """The per-slot state with leaves [B, K, S, ...] (as `scoring_view` lays slots out)."""
    return self.state

  def with_state_view(self, state) -> "LayerCache":
    return self.replace(state=state)

  def overwrite(self, victim: jax.Array, new: NewTokens, new_state=None) -> "LayerCache":
    """One decode token per row written over slot victim [B, K] of every head (an index of
    `capacity` or more drops the write). new_state: the new slots' state, leaves [B, K]."""
    b, k = victim.shape
    rows, heads = jnp.arange(b)[:, None], jnp.arange(k)[None, :]
    put = lambda a, v: a.at[rows, heads, victim].set(v.astype(a.dtype), mode="drop")
    state = self.state
    if state is not None:
      fill = new_state if new_state is not None else map_state(
          lambda s: jnp.zeros(s.shape[:2] + s.shape[3:], s.dtype), state)
      state = jax.tree_util.tree_map(put, state, fill)
    return self.replace(
        keys=put(self.keys, new.keys[:, :, 0]), values=put(self.values, new.values[:, :, 0]),
        positions=put(self.positions, jnp.broadcast_to(new.positions[:, :1], (b, k))),
        state=state)


@struct.dataclass
class FlatLayerCache:
  """Head-wise layout: [batch, slots, head_dim] with all heads' slots in one axis.

  Head h owns the contiguous segment [offsets[b, h], offsets[b, h + 1]); segment lengths
  differ per head and per row while their sum is fixed (AdaKV's head-wise budgets).
  """
  keys: jax.Array        # [batch, slots, head_dim], post-RoPE
  values: jax.Array      # [batch, slots, head_dim]
  positions: jax.Array   # [batch, slots] int32, EMPTY_POSITION where unused
  heads: jax.Array       # [batch, slots] int32: the KV head owning each slot
  offsets: jax.Array     # [batch, kv_heads + 1] int32: segment bounds per head
  next_slot: jax.Array   # [batch, kv_heads] int32: where each head appends next
  state: Any = None      # per-slot method state, leaves [batch, slots, ...]

  @property
  def capacity(self) -> int:
    return self.keys.shape[1]

  @property
  def num_kv_heads(self) -> int:
    return self.next_slot.shape[1]

  def slot_positions(self) -> jax.Array:
    return self.positions

  @property
  def nbytes(self) -> int:
    return nbytes(self)

  def slots_per_head(self, num_kv_heads: int) -> int:
    return self.capacity // num_kv_heads

  def free_slots(self) -> int:
    # Each head appends at the end of its own segment.
    return int(jnp.min(self.offsets[:, 1:] - self.next_slot))

  def logical_axes(self) -> dict:
    slot = ("batch", "slots")
    return {"keys": slot + ("head_dim",), "values": slot + ("head_dim",), "positions": slot,
            "heads": slot, "offsets": ("batch", None), "next_slot": ("batch", "kv_heads"),
            "state": slot}

  def append(self, new: NewTokens) -> "FlatLayerCache":
    """Appends the chunk at the end of every head's segment (each has room: segments are
    grown with the same spare slots for every head)."""
    b, k, chunk, _ = new.keys.shape
    slots = self.next_slot[:, :, None] + jnp.arange(chunk, dtype=jnp.int32)  # [B, K, chunk]
    rows = jnp.arange(b)[:, None, None]
    put_state = lambda s: s.at[rows, slots].set(0)
    return self.replace(
        keys=self.keys.at[rows, slots].set(new.keys.astype(self.keys.dtype)),
        values=self.values.at[rows, slots].set(new.values.astype(self.values.dtype)),
        positions=self.positions.at[rows, slots].set(new.head_positions()),
        next_slot=self.next_slot + chunk, state=map_state(put_state, self.state))

  def attend(self, queries, query_positions, pending: NewTokens | None = None,
             want: frozenset = frozenset()):
    k = self.num_kv_heads
    if pending is not None and queries.shape[1] == 1:
      # Decode with the new token held outside the cache (decode-time eviction).
      out, lse, probs = attention_ops.decode(queries, self.keys, self.values, query_positions,
                                             self.positions, return_probs=True,
                                             key_heads=self.heads, num_kv_heads=k)
      out, probs, own = attention_ops.with_pending_token(queries, out, lse, probs,
                                                         pending.keys, pending.values)
      return out, Stats(probs=probs, pending_probs=own)
    if pending is not None:
      return self.candidates(pending).attend(queries, query_positions, None, want)
    if COLUMN_SUMS in want:
      out, sums = attention_ops.attend_flat(queries, self.keys, self.values, query_positions,
                                            self.positions, self.heads, k, column_sums=True)
      return out, Stats(column_sums=sums)
    return attention_ops.attend_flat(queries, self.keys, self.values, query_positions,
                                     self.positions, self.heads, k), Stats()

  def _owned(self) -> jax.Array:
    """[B, K, N]: slot n belongs to KV head k."""
    return self.heads[:, None, :] == jnp.arange(self.num_kv_heads, dtype=jnp.int32)[:, None]

  def scoring_view(self):
    """Every head sees all N slots, the other heads' as empty (position -1)."""
    owned = self._owned()
    return jnp.where(owned, self.positions[:, None, :], EMPTY_POSITION), owned

  def state_view(self):
    k = self.num_kv_heads
    return map_state(lambda s: jnp.broadcast_to(s[:, None], (s.shape[0], k) + s.shape[1:]),
                     self.state)

  def with_state_view(self, state) -> "FlatLayerCache":
    """Keeps each slot's owner-head row of a [B, K, N, ...] state."""
    own = lambda s: jnp.take_along_axis(
        s, self.heads.reshape(self.heads.shape[:1] + (1,) + self.heads.shape[1:]
                              + (1,) * (s.ndim - 3)), axis=1)[:, 0]
    return self.replace(state=map_state(own, state))

  def overwrite(self, victim: jax.Array, new: NewTokens, new_state=None) -> "FlatLayerCache":
    """One decode token per row and head written over flat slot victim [B, K] (each head's
    victim lies in its own segment; an index of `capacity` or more drops the write)."""
    b, k = victim.shape
    rows = jnp.arange(b)[:, None]
    put = lambda a, v: a.at[rows, victim].set(v.astype(a.dtype), mode="drop")
    state = self.state
    if state is not None:
      fill = new_state if new_state is not None else map_state(
          lambda s: jnp.zeros((b, k) + s.shape[2:], s.dtype), state)
      state = jax.tree_util.tree_map(put, state, fill)
    return self.replace(
        keys=put(self.keys, new.keys[:, :, 0]), values=put(self.values, new.values[:, :, 0]),
        positions=put(self.positions, jnp.broadcast_to(new.positions[:, :1], (b, k))),
        state=state)

  def candidates(self, new: NewTokens) -> LayerCache:
    """Dense [B, K, N + T] candidates: head h's segment right-aligned against the chunk
    (so the chunk's first tokens neighbour the head's latest kept ones), empty slots
    before it."""
    b, n, _ = self.keys.shape
    k = self.num_kv_heads
    lengths = self.next_slot - self.offsets[:, :-1]                          # [B, K]
    slot = jnp.arange(n, dtype=jnp.int32)[None, None, :]
    source = self.offsets[:, :-1, None] + slot - (n - lengths[:, :, None])   # [B, K, N]
    index = jnp.where(slot >= n - lengths[:, :, None], source, -1).reshape(b, k * n)
    gather = lambda a: attention_ops.gather_slots(a, index).reshape(b, k, n, a.shape[-1])
    take = lambda a, fill: jnp.where(
        index.reshape(b, k, n, *(1,) * (a.ndim - 2)) >= 0,
        jnp.take_along_axis(a, jnp.maximum(index, 0).reshape(
            (b, k * n) + (1,) * (a.ndim - 2)), axis=1).reshape((b, k, n) + a.shape[2:]), fill)
    dense = LayerCache(keys=gather(self.keys), values=gather(self.values),
                       positions=take(self.positions, EMPTY_POSITION), end=jnp.int32(n),
                       state=map_state(lambda s: take(s, 0), self.state))
    return dense.candidates(new)

  def select(self, index):
    raise NotImplementedError("a head-wise cache is compacted through its dense candidates")

  def grow(self, room: int) -> "FlatLayerCache":
    """Each head's segment grows by `room` empty slots at its end."""
    if room == 0:
      return self
    b, n, _ = self.keys.shape
    k = self.num_kv_heads
    new_offsets = self.offsets + room * jnp.arange(k + 1, dtype=jnp.int32)
    dest = jnp.arange(n, dtype=jnp.int32)[None, :] + room * self.heads  # slot i of head h
    rows = jnp.arange(b)[:, None]                                        # moves by room * h
    new_n = n + room * k
    move = lambda x, fill: jnp.full((b, new_n) + x.shape[2:], fill, x.dtype).at[
        rows, dest].set(x)
    return FlatLayerCache(
        keys=move(self.keys, 0), values=move(self.values, 0),
        positions=move(self.positions, EMPTY_POSITION),
        heads=segment_heads(new_offsets, new_n), offsets=new_offsets,
        next_slot=self.next_slot + room * jnp.arange(k, dtype=jnp.int32),
        state=map_state(lambda s: move(s, 0), self.state))

  def reserve_for(self, room: int, multiple: int) -> int:
    """The reserved slots (`reserve`) that round the capacity after `grow(room)` up to a
    multiple of `multiple` slots per head (`reserve_rooms`; none for a multiple of 1)."""
    k = self.num_kv_heads
    return 0 if multiple == 1 else (-(self.capacity + k * room)) % (k * multiple)

  def reserve(self, slots: int) -> "FlatLayerCache":
    """`slots` more reserved slots (RESERVED_POSITION: never attended, never chosen by a
    decode-time eviction) at the end of the last head's segment, only there to give the
    layer a capacity that contexts of other lengths share (appends past that head's room
    may still fill them, as any slot past it)."""
    if slots == 0:
      return self
    pad = lambda a, fill=0: jnp.pad(a, [(0, 0), (0, slots)] + [(0, 0)] * (a.ndim - 2),
                                    constant_values=fill)
    k = self.num_kv_heads
    return self.replace(keys=pad(self.keys), values=pad(self.values),
                        positions=pad(self.positions, RESERVED_POSITION),
                        heads=pad(self.heads, k - 1), offsets=self.offsets.at[:, -1].add(slots),
                        state=map_state(pad, self.state))

  def trimmed(self) -> "FlatLayerCache":
    """Host side: each head's segment shrunk to the most tokens that head holds in any row
    (its real slots first, in slot order): what a data-dependent selection, sized for the
    worst case under jit, really needs."""
    pos, heads = host_array(self.positions), host_array(self.heads)
    b, k = pos.shape[0], self.num_kv_heads
    real = [[np.flatnonzero((heads[row] == h) & (pos[row] >= 0)) for h in range(k)]
            for row in range(b)]
    size = np.array([max(len(real[row][h]) for row in range(b)) for h in range(k)])
    offsets = np.concatenate([[0], np.cumsum(size)]).astype(np.int32)
    total = int(offsets[-1])
    index = np.full((b, total), -1, np.int32)
    counts = np.zeros((b, k), np.int32)
    for row in range(b):
      for h in range(k):
        index[row, offsets[h]:offsets[h] + len(real[row][h])] = real[row][h]
        counts[row, h] = len(real[row][h])
    index = jnp.asarray(index)
    take = lambda a, fill: jnp.where(
        index.reshape(index.shape + (1,) * (a.ndim - 2)) >= 0,
        jnp.take_along_axis(a, jnp.maximum(index, 0).reshape(index.shape + (1,) * (a.ndim - 2)),
                            axis=1), jnp.asarray(fill, a.dtype))
    offsets = jnp.broadcast_to(jnp.asarray(offsets), (b, k + 1))
    return FlatLayerCache(
        keys=take(self.keys, 0), values=take(self.values, 0),
        positions=take(self.positions, EMPTY_POSITION), heads=segment_heads(offsets, total),
        offsets=offsets, next_slot=offsets[:, :-1] + jnp.asarray(counts),
        state=map_state(lambda st: take(st, 0), self.state))

  @classmethod
  def from_priorities(cls, cand: LayerCache, priorities: jax.Array,
                      total: int) -> "FlatLayerCache":
    """The `total` slots of highest priorities [B, K, S] over all heads of a row (ties to the
    lower head and slot), as `from_selection` lays them out."""
    b, k, s = priorities.shape
    _, chosen = jax.lax.top_k(priorities.reshape(b, k * s), total)
    selected = jnp.zeros((b, k * s), bool).at[jnp.arange(b)[:, None], chosen].set(True)
    return cls.from_selection(cand, selected.reshape(b, k, s), total)

  @classmethod
  def from_selection(cls, cand: LayerCache, selected: jax.Array,
                     total: int) -> "FlatLayerCache":
    """The selected slots [B, K, S] bool of dense candidates (exactly `total` per row),
    head h's kept slots forming segment h in slot order."""
    b, k, s, _ = cand.keys.shape
    counts = selected.sum(-1, dtype=jnp.int32)                            # [B, K]
    offsets = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(counts, axis=1)], 1)
    rank = jnp.cumsum(selected, axis=-1, dtype=jnp.int32) - 1             # order within head
    dest = jnp.where(selected, offsets[:, :-1, None] + rank, total)       # [B, K, S]
    source = jnp.arange(k * s, dtype=jnp.int32).reshape(1, k, s)
    index = jnp.full((b, total), -1, jnp.int32).at[
        jnp.arange(b)[:, None], dest.reshape(b, -1)].set(
            jnp.broadcast_to(source, (b, k, s)).reshape(b, -1), mode="drop")
    flat = lambda a: a.reshape((b, k * s) + a.shape[3:])
    take = lambda a: jnp.take_along_axis(
        flat(a), jnp.maximum(index, 0).reshape((b, total) + (1,) * (a.ndim - 3)), axis=1)
    positions = take(cand.positions)
    return cls(keys=attention_ops.gather_slots(flat(cand.keys), index),
               values=attention_ops.gather_slots(flat(cand.values), index),
               positions=jnp.where(index >= 0, positions, EMPTY_POSITION),
               heads=segment_heads(offsets, total), offsets=offsets, next_slot=offsets[:, 1:],
               state=map_state(take, cand.state))


# The latent cache of multi-head latent attention (MLA, an X-EcoMLA student,
# `ModelConfig.latent`). Per layer a token caches one vector instead of its K key and value
# heads: the latent c = W_down x (kv_rank numbers) and, with decoupled RoPE, the rotated
# shared key k_rope (rope_dim numbers) beside it. With decoupled RoPE every query head folds
# its key up-projection into its query (q' = [W_uk^T q_nope; q_rope]) and attends over the
# latents themselves, which serve as keys and as values (the value up-projection is applied
# to the output): multi-query attention of width kv_rank + rope_dim over one slot axis.
# With rebuilt RoPE (`rebuilt`) the keys are up-projected per KV head and rotated before
# attention, as in the original model. The layout is the dense one with one head and
# values that ARE the keys: every protocol step runs on that view; only the latent is
# stored.


@struct.dataclass
class LatentLayerCache(PerHeadSlots):
  """One layer's cached latents: [batch, 1, capacity, width] (width = kv_rank + rope_dim;
  the axis of one is the dense layout's head axis)."""
  latent: jax.Array      # [batch, 1, capacity, width]
  positions: jax.Array   # [batch, 1, capacity] int32, EMPTY_POSITION where unused
  end: jax.Array         # int32 scalar: next slot to append to
  state: Any = None      # per-slot method state, leaves [batch, 1, capacity, ...]

  @classmethod
  def empty(cls, batch: int, capacity: int, width: int, dtype) -> "LatentLayerCache":
    return cls(latent=jnp.zeros((batch, 1, capacity, width), dtype),
               positions=jnp.full((batch, 1, capacity), EMPTY_POSITION, jnp.int32),
               end=jnp.zeros((), jnp.int32))

  @property
  def capacity(self) -> int:
    return self.latent.shape[2]

  def dense(self) -> LayerCache:
    """The dense one-head view: keys and values are the latents."""
    return LayerCache(keys=self.latent, values=self.latent, positions=self.positions,
                      end=self.end, state=self.state)

  @classmethod
  def of(cls, view: LayerCache) -> "LatentLayerCache":
    return cls(latent=view.keys, positions=view.positions, end=view.end, state=view.state)

  def slot_positions(self) -> jax.Array:
    return self.positions

  def free_slots(self) -> int:
    return self.capacity - int(self.end)

  def logical_axes(self) -> dict:
    slot = ("batch", None, "slots")
    return {"latent": slot + ("latent",), "positions": slot, "end": (), "state": slot}

  def append(self, new: NewTokens) -> "LatentLayerCache":
    return self.of(self.dense().append(new))

  def candidates(self, new: NewTokens) -> LayerCache:
    return self.dense().candidates(new)

  def select(self, index: jax.Array) -> "LatentLayerCache":
    return self.of(self.dense().select(index))

  def grow(self, room: int) -> "LatentLayerCache":
    return self.of(self.dense().grow(room))

  def live_first(self, capacity: int | None = None) -> "LatentLayerCache":
    return self.of(self.dense().live_first(capacity))

  def trimmed(self) -> "LatentLayerCache":
    return self.of(self.dense().trimmed())

  def attend(self, queries, query_positions, pending: NewTokens | None = None,
             want: frozenset = frozenset()):
    """queries [B, T, H, width] (absorbed, see the module docstring) -> (the probability-
    weighted latents [B, T, H, width], Stats). One decode token reads each latent once
    (`decode_attention_shared`); everything else attends through the dense view."""
    if pending is None and queries.shape[1] == 1 and COLUMN_SUMS not in want:
      out, _ = attention_ops.decode_shared(queries, self.latent, query_positions,
                                           self.positions)
      return out, Stats()
    return self.dense().attend(queries, query_positions, pending, want)

  def rebuilt(self, key_up, key_bias, value_up, value_bias, inv_freq) -> LayerCache:
    """Rebuilt RoPE: the dense layer of every KV head's keys RoPE(c W_uk + b_k), rotated to
    the slots' positions, and values c W_uv + b_v (key_up/value_up [r, K, D], biases
    [K, D] or None); exact at full rank. Rebuilt per call (as xKV's CPU path)."""
    c = self.latent[:, 0]                                                   # [B, S, r]
    keys = jnp.einsum("bsr,rkd->bskd", c, key_up)
    values = jnp.einsum("bsr,rkd->bskd", c, value_up)
    keys = keys if key_bias is None else keys + key_bias
    values = values if value_bias is None else values + value_bias
    keys = jnp.swapaxes(rope.apply_rope(keys, self.positions[:, 0], inv_freq), 1, 2)
    return LayerCache(keys=keys, values=jnp.swapaxes(values, 1, 2),
                      positions=jnp.broadcast_to(self.positions, keys.shape[:3]), end=self.end)


@struct.dataclass
class Cache:
  layers: tuple
  lengths: jax.Array     # [batch] int32: tokens seen per sequence = position of the next token

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]


def init_layer_cache(batch: int, kv_heads: int, capacity: int, head_dim: int,
                     dtype, value_dim: int | None = None) -> LayerCache:
  """An empty dense layer; values are `value_dim` wide (DiffQKV: r value heads side by
  side), `head_dim` by default."""
  return LayerCache(
      keys=jnp.zeros((batch, kv_heads, capacity, head_dim), dtype),
      values=jnp.zeros((batch, kv_heads, capacity, value_dim or head_dim), dtype),
      positions=jnp.full((batch, kv_heads, capacity), EMPTY_POSITION, jnp.int32),
      end=jnp.zeros((), jnp.int32))


def init_cache(config: ModelConfig, batch: int, capacity: int, dtype=None) -> Cache:
  """An empty full cache with `capacity` slots in every layer."""
  return _init_cache(config, batch, capacity, None if dtype is None else jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _init_cache(config: ModelConfig, batch: int, capacity: int, dtype) -> Cache:
  # One compiled call fills every layer: eager jnp.zeros per leaf costs a dispatch each
  # (about 0.1 s for 30 layers, a fifth of a 512-token prefill).
  dtype = dtype or jnp.dtype(config.dtype)
  layer = lambda: init_layer_cache(batch, config.num_kv_heads, capacity, config.head_dim, dtype,
                                   config.values_per_key_head * config.head_dim)
  if config.latent is not None:  # multi-head latent attention: one latent per token
    layer = lambda: LatentLayerCache.empty(batch, capacity, config.latent.cached_width, dtype)
  return Cache(layers=tuple(layer() for _ in range(config.num_layers)),
               lengths=jnp.zeros((batch,), jnp.int32))


def cache_nbytes(cache) -> int:
  """Bytes actually held by a cache pytree: the sum of its leaves' sizes."""
  return nbytes(cache)


def slots_per_head(config: ModelConfig, cache: Cache) -> int:
  """The largest layer capacity, in slots per KV head."""
  return max(layer.slots_per_head(config.num_kv_heads) for layer in cache.layers)


def free_slots(cache: Cache) -> int:
  """Tokens that can still be appended to every row, layer and head of `cache`."""
  return min(layer.free_slots() for layer in cache.layers)


def grow(cache: Cache, room: int, multiple: int = 1) -> Cache:
  """The cache with at least `room` more empty slots per head in every layer
  (`grow_rooms`)."""
  return grow_by(cache, grow_rooms(cache, room, multiple))


# A compiled decode step holds one set of kernels per distinct layer shape (XLA:CPU shares
# the kernels of layers of equal shapes), so dense layers whose capacities differ are
# rounded to at most this many capacities: PyramidKV 0.5 at 2K tokens (SmolLM2, 30
# budgets 64 apart) compiled its decode loop in 5.7 s with 30 capacities and in 3.9-4.1 s
# with 8 (the same tokens).
MAX_CAPACITIES = 8


def capacity_step(cache: Cache, room: int, multiple: int = 1) -> int:
  """What `grow_rooms` rounds dense capacities up to a multiple of: `multiple`, or, when
  that leaves more than MAX_CAPACITIES distinct capacities, the multiple of it that is
  at least an eighth of the largest capacity (so at most MAX_CAPACITIES remain, and each
  layer gains less than a step: under an eighth of the largest plus `multiple`).
  multiple 1 asks for exact capacities: kept."""
  return _capacity_step({layer.capacity + room for layer in cache.layers
                         if type(layer) is LayerCache}, multiple)


def _capacity_step(needed: set[int], multiple: int) -> int:
  if multiple <= 1 or len({-(-n // multiple) for n in needed}) <= MAX_CAPACITIES:
    return multiple
  per_shape = -(-max(needed) // MAX_CAPACITIES)
  return -(-per_shape // multiple) * multiple


# Methods whose sizes come from the data (CAKE's, D2O's and KVzip's per-layer slot counts,
# SentenceKV's sentence tables) would compile their selections and decode loop anew for
# every prompt: they round each size up with `shared_size` (padding with reserved slots or
# empty entries) and report the padding apart (`shape_padding`).
SHAPE_MULTIPLE = 16


def shared_size(n: int, multiple: int = SHAPE_MULTIPLE) -> int:
  """`n` rounded up to a multiple of `multiple`, or, for a larger n of b bits, of 2^(b - 3):
  at most `multiple` - 1 or a quarter more, four sizes per doubling."""
  step = max(multiple, 1 << max(n.bit_length() - 3, 0))
  return -(-n // step) * step


def shared_capacity(slots: int, largest: int) -> int:
  """A layer's `slots` rounded up by `shared_size`, at most max(slots, largest) (the slots
  it was chosen from)."""
  return min(shared_size(slots), max(slots, largest))


# Rounding alone still gives a new prompt's 30 layers a new set of capacities most of the
# time, and a new set compiles the whole decode loop again (D2O, SmolLM2, 500 tokens: 14.7
# s of a second prompt's 17.7 s). A layer's budget moves little from prompt to prompt, so
# `shared_capacities` takes a set of capacities allocated before when it holds every
# layer's rounded count with at most SHAPE_REUSE_SLACK more slots in all (or grows one to
# hold them within that slack): after a few prompts new ones meet a compiled decode loop.
SHAPE_REUSE_SLACK = 0.25
_REMEMBERED_SETS = 8      # capacity sets per key, most recently used kept
_REMEMBERED_KEYS = 64     # keys (method, layer shapes), most recently used kept
_allocated: dict = {}     # key -> [capacity tuple, ...], most recently used last


def shared_capacities(key, slots, largest) -> tuple[int, ...]:
  """Per layer, `slots` rounded up by `shared_capacity` (at most max(slots, largest)), or
  a set of capacities allocated before under `key` (hashable: the method and the layers'
  shapes) that holds each layer's rounded count within those bounds and has at most
  SHAPE_REUSE_SLACK more slots in all: the one with the fewest slots, else the union of
  the rounded counts with as many remembered sets as stay within those limits. The
  choice is remembered under `key`. Extra slots are reserved padding, so outputs are
  those of the rounded counts (up to float rounding of sums over more slots); with
  SHAPE_REUSE_SLACK 0 every prompt gets its own rounded counts."""
  rounded = tuple(shared_capacity(int(n), int(m)) for n, m in zip(slots, largest, strict=True))
  bound = tuple(max(int(n), int(m)) for n, m in zip(slots, largest))
  most = sum(rounded) * (1 + SHAPE_REUSE_SLACK)
  fits = lambda sizes: sum(sizes) <= most and all(
      r <= c <= b for r, c, b in zip(rounded, sizes, bound))
  remembered = _allocated.pop(key, [])
  held = [sizes for sizes in remembered if fits(sizes)]
  # Else the union of as many remembered sets as fit (those that gain the fewest slots
  # first): new prompts then converge on one set that holds them all.
  grown = rounded
  for sizes in sorted(remembered, key=lambda sizes: sum(map(max, rounded, sizes)) - sum(sizes)):
    union = tuple(map(max, grown, sizes))
    grown = union if fits(union) else grown
  chosen = min(held, key=sum) if held else grown
  remembered = [sizes for sizes in remembered if sizes != chosen] + [chosen]
  _allocated[key] = remembered[-_REMEMBERED_SETS:]
  while len(_allocated) > _REMEMBERED_KEYS:
    del _allocated[next(iter(_allocated))]
  return chosen


def forget_capacities() -> None:
  """Forgets every capacity set `shared_capacities` remembers (the next prompt of each
  method gets its own rounded counts)."""
  _allocated.clear()


def shape_padding(layer: LayerCache | FlatLayerCache) -> int:
  """Host side: the slots every row and head of a dense layer (every row of a head-wise
  one) leaves reserved (RESERVED_POSITION): its padding to a shared capacity."""
  return int((host_array(layer.positions) == RESERVED_POSITION).sum(-1).min())


def shape_padding_nbytes(cache: Cache) -> int:
  """Host side: bytes of the dense and head-wise layers' `shape_padding` slots."""
  total = 0
  for layer in cache.layers:
    if type(layer) is LayerCache:
      per_slot = (layer.keys, layer.values, layer.positions, layer.state)
    elif type(layer) is FlatLayerCache:
      per_slot = (layer.keys, layer.values, layer.positions, layer.heads, layer.state)
    else:
      continue
    leaves = jax.tree_util.tree_leaves(per_slot)
    total += shape_padding(layer) * sum(leaf.nbytes // layer.capacity for leaf in leaves)
  return total


def grow_rooms(cache: Cache, room: int, multiple: int = 1) -> tuple[int, ...]:
  """The empty slots per head each layer gets for at least `room`: a dense layer
  (LayerCache) up to a capacity that is a multiple of `capacity_step` (`multiple`, or a
  coarser step where the dense capacities differ), another layout `room` rounded up to a
  multiple of `multiple` (its capacity is not its slots per head alone)."""
  step = capacity_step(cache, room, multiple)
  return tuple(room + (-(layer.capacity + room)) % step if type(layer) is LayerCache
               else -(-room // multiple) * multiple for layer in cache.layers)


def reserve_rooms(cache: Cache, rooms: tuple[int, ...], multiple: int) -> tuple:
  """The reserved slots per head (`reserve`) each layer gets: a dense layer past its room
  rooms[i] for a capacity that is a multiple of `capacity_step` (`multiple`, or a coarser
  step where the dense capacities differ); a layout with parts whose sizes follow the
  context's (a head-wise layer, ThinK's pruned part, KIVI's quantized one, MiKV's pools,
  the shared slots of MiniCache and xKV) what its `reserve_for(room, multiple)` says (an
  int of slots, or what its `reserve` takes; 0 for none); other layouts none."""
  step = _capacity_step({layer.capacity + r for layer, r in zip(cache.layers, rooms)
                         if type(layer) is LayerCache}, multiple)

  def reserve(layer, room):
    if type(layer) is LayerCache:
      return (-(layer.capacity + room)) % step
    reserve_for = getattr(layer, "reserve_for", None)
    return 0 if reserve_for is None else reserve_for(room, multiple)

  return tuple(reserve(layer, r) for layer, r in zip(cache.layers, rooms))


def grow_by(cache: Cache, rooms: tuple[int, ...], reserves: tuple | None = None) -> Cache:
  """The cache with rooms[i] more empty slots per head in layer i, then reserves[i]
  reserved ones (what the layouts `reserve_rooms` gives any reserve)."""
  reserves = reserves or (0,) * len(rooms)
  return cache.replace(layers=tuple(
      grow_layer(layer, r, v) for layer, r, v in zip(cache.layers, rooms, reserves, strict=True)))


def grow_layer(layer, room: int, reserve=0):
  """One layer with `room` more empty slots per head, then `reserve` reserved ones (what
  its `reserve` takes; 0 for none)."""
  grown = layer.grow(room)
  return grown.reserve(reserve) if reserve else grown


@functools.lru_cache(maxsize=256)
def full_cache_nbytes(config: ModelConfig, batch: int, capacity: int, dtype=None) -> int:
  """Bytes of an uncompressed cache with `capacity` slots (without allocating it)."""
  shapes = jax.eval_shape(lambda: init_cache(config, batch, capacity, dtype))
  return cache_nbytes(shapes)


def segment_heads(offsets: jax.Array, slots: int) -> jax.Array:
  """[B, slots] owner head of every slot given segment offsets [B, K + 1]."""
  index = jnp.arange(slots, dtype=jnp.int32)
  return (index[None, :, None] >= offsets[:, None, 1:]).sum(-1).astype(jnp.int32)
