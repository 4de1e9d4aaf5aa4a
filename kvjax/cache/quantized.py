"""The quantized layer cache (KIVI): bit-packed codes plus a full-precision recent window.

Slots are split in two parts, each sized to what it holds:
  * quantized: keys quantized per channel in groups of `group` consecutive slots (outlier
    channels keep their own scale), values per slot in groups of `group` channels; codes
    of `bits` bits packed into uint32 words, plus a scale and a zero point per group;
  * residual: the most recent tokens in full precision (a dense `LayerCache`), between
    `window` and `window + group - 1` of them once the context is longer than `window`
    (without a window, between 1 and `group` at a decode step's attention).
Appending a chunk writes to the residual, then, while it holds `window + group` tokens,
quantizes its oldest `group` and moves them to the quantized part ("flushed group by
group"), so the newest `window` tokens are always exact. A one-token append (a decode
step) flushes first, while the residual holds `waiting_limit` tokens, so the group it
flushes never holds the new token: without a window that is a full group, attended exactly
at the step that filled it and quantized at the next, as GEAR's streaming buffer does
(KIVI too attends its full-precision tokens before quantizing them). The model flushes
every layer's group in one call before its first layer: `flush_ahead`. Each slot keeps its
original position, so the same causal masks apply and eviction can run before quantization
(SnapKV + KIVI).
Attention reads both parts and merges them by log-sum-exp (a dequantizing Pallas kernel
on GPU/TPU, dequantize + the jnp reference on CPU).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.cache.kv_cache import (EMPTY_POSITION, LayerCache, NewTokens, PerHeadSlots, Stats,
                                  pad_slots)
from kvjax.errors import KvjaxError
from kvjax.ops import attention as attention_ops
from kvjax.ops import quantization as quant_ops


@struct.dataclass
class QuantizedKV:
  """The quantized part: S slots per KV head (S a multiple of `group`)."""
  key_codes: jax.Array     # [B, K, S, D * bits // 32] uint32
  key_scale: jax.Array     # [B, K, S // group, D]
  key_zero: jax.Array      # [B, K, S // group, D]
  value_codes: jax.Array   # [B, K, S, D * bits // 32] uint32
  value_scale: jax.Array   # [B, K, S, D // group]
  value_zero: jax.Array    # [B, K, S, D // group]
  positions: jax.Array     # [B, K, S] int32, EMPTY_POSITION where unused

  @property
  def capacity(self) -> int:
    return self.positions.shape[2]


def quantize_slots(keys, values, positions, bits: int, group: int, scale_dtype) -> QuantizedKV:
  """Quantizes dense slots [B, K, S, D] (S a multiple of group); empty slots do not widen
  any group's range."""
  valid = positions >= 0
  kc, ks, kz = quant_ops.quantize(keys, bits=bits, group=group, axis="tokens", valid=valid,
                                  scale_dtype=scale_dtype)
  vc, vs, vz = quant_ops.quantize(values, bits=bits, group=group, axis="channels",
                                  valid=valid, scale_dtype=scale_dtype)
  return QuantizedKV(key_codes=kc, key_scale=ks, key_zero=kz, value_codes=vc, value_scale=vs,
                     value_zero=vz, positions=positions.astype(jnp.int32))


class ResidualWindow(PerHeadSlots):
  """A full-precision `residual` window in front of compressed storage (KIVI, GEAR).

  Fields the layout has: `residual` (a dense LayerCache), `end` (compressed slots filled,
  a multiple of `group`), static `window`, `group` and `flushed_ahead` (see
  `flush_ahead`); `flushed_capacity` is how many slots the compressed storage for flushed
  groups holds, `encode_group(keys, values, positions)` compresses one group of dense slots
  [B, K, group, D] (any B: `flush_ahead` encodes every layer's group in one call) and
  `write_group(part)` returns the layout with that part stored at `end`.
  """

  @property
  def waiting_limit(self) -> int:
    """The most tokens the residual holds between appends: window + group - 1, or, without
    a window, a full group (it waits, exact, until the next one-token append compresses
    it)."""
    return max(self.window, 1) + self.group - 1

  def free_slots(self) -> int:
    # A chunk of n tokens flushes ceil((residual.end + n - (window + group - 1)) / group)
    # groups, which fit while n <= flushed_free + window + group - 1 - residual.end: exact
    # for chunks, one short for a one-token append onto a full group waiting without a
    # window (the safe side).
    flushed_free = self.flushed_capacity - int(self.end)
    below_flush = self.window + self.group - 1 - int(self.residual.end)
    return max(0, min(self.residual.free_slots(), flushed_free + below_flush))

  def oldest_group(self):
    """(keys, values, positions) of the residual's oldest `group` slots."""
    r, g = self.residual, self.group
    return r.keys[:, :, :g], r.values[:, :, :g], r.positions[:, :, :g]

  def flushed(self, part):
    """The layout with `part` (the oldest group, encoded) stored and the residual shifted
    past it."""
    g = self.group
    r = self.residual
    shift = lambda a, fill: jnp.concatenate(
        [a[:, :, g:], jnp.full(a.shape[:2] + (g,) + a.shape[3:], fill, a.dtype)], axis=2)
    residual = r.replace(keys=shift(r.keys, 0), values=shift(r.values, 0),
                         positions=shift(r.positions, EMPTY_POSITION), end=r.end - g)
    return self.write_group(part).replace(end=self.end + g, residual=residual)

  def append(self, new: NewTokens):
    """One token: flushes the oldest group first if the residual holds `waiting_limit`
    tokens (unless `flush_ahead` did), then writes. A chunk: writes, then flushes the
    oldest whole groups while the residual holds window + group tokens."""
    flush = lambda c: c.flushed(c.encode_group(*c.oldest_group()))
    if new.keys.shape[2] == 1:
      cache = self if self.flushed_ahead else jax.lax.while_loop(
          lambda c: c.residual.end >= self.waiting_limit, flush, self)
      return cache.replace(residual=cache.residual.append(new), flushed_ahead=False)
    cache = self.replace(residual=self.residual.append(new), flushed_ahead=False)
    return jax.lax.while_loop(lambda c: c.residual.end >= self.window + self.group, flush,
                              cache)

  def grown_residual(self, room: int) -> LayerCache:
    """The residual with room for a `room`-token chunk on top of the up to
    `waiting_limit` tokens it may hold before flushing."""
    return self.residual.grow(max(0, self.waiting_limit - self.residual.capacity) + room)


def flush_ahead(layers: tuple, tokens: int) -> tuple:
  """Every ResidualWindow layer ready for a one-token append, its flush done here.

  Before a chunk of `tokens` = 1, each such layer whose residual holds `waiting_limit`
  tokens flushes its oldest group now: the group the append would flush first (it never
  holds the new token, so every attend sees the same state), so all such layers are
  marked `flushed_ahead` and their append skips the flush. The groups of all layers that
  encode alike are encoded in one call, so XLA compiles the encoding once, not once per
  layer (GEAR without a window used to encode in each of SmolLM2's 30 layers: its decode
  loop's XLA compile took 20.6 s, now 16.1 s). Layers of other kinds and chunks of other
  lengths (the append flushes as many groups as they push out) are left as they are.
  """
  # A mark left from the previous step: some layer's append was skipped after a begin, so
  # the group flushed ahead was never followed by its token.
  marked = [i for i, layer in enumerate(layers) if getattr(layer, "flushed_ahead", False)]
  if marked:
    raise KvjaxError(f"layers {marked} were flushed ahead and not appended to since: a "
                     "policy's begin must be followed by an append to every layer")
  if tokens != 1:
    return layers
  families = {}
  for i, layer in enumerate(layers):
    if isinstance(layer, ResidualWindow):
      # Layers of equal shapes (equal budgets) fill in step: a family flushes together, so
      # its encoding runs one step in `group`, not whenever one of its layers flushes.
      shapes = tuple((a.shape, a.dtype) for a in jax.tree.leaves(layer))
      families.setdefault((type(layer), layer.group_encoding(), shapes), []).append(i)
  out = list(layers)
  for members in families.values():
    family = [layers[i] for i in members]
    flags = [c.residual.end >= c.waiting_limit for c in family]

    def encode(family):
      # Every layer's oldest group as rows of one batch, encoded in one call.
      stacked = [jnp.concatenate(parts, axis=0) for parts in
                 zip(*(c.oldest_group() for c in family))]
      return family[0].encode_group(*stacked)

    # Encoded only at the steps where some layer of the family flushes.
    shapes = jax.eval_shape(encode, family)
    parts = jax.lax.cond(jnp.any(jnp.stack(flags)), encode,
                         lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                         family)
    rows = family[0].residual.keys.shape[0]
    take = lambda start: jax.tree.map(
        lambda a: jax.lax.dynamic_slice_in_dim(a, start, rows), parts)
    for n, (i, layer, flag) in enumerate(zip(members, family, flags)):
      # The layer's rows start at n * rows, carried into the loop as a value XLA cannot
      # fold (end >= 0, so min(end, 0) is 0): every layer's slicing then compiles to the
      # same kernels, where constant starts compiled one slice per layer and leaf (GEAR
      # over SmolLM2's 30 layers: 330 slice kernels in its decode loop).
      start = jnp.minimum(layer.end, 0) + n * rows
      # A loop run 0 or 1 times updates the layer in place (it is a loop carry).
      _, layer, _ = jax.lax.while_loop(
          lambda c: c[0], lambda c: (False, c[1].flushed(take(c[2])), c[2]),
          (flag, layer, start))
      out[i] = layer.replace(flushed_ahead=True)
  return tuple(out)


@struct.dataclass
class QuantizedLayerCache(ResidualWindow):
  quantized: QuantizedKV
  end: jax.Array           # int32 scalar: quantized slots filled (a multiple of group)
  residual: LayerCache     # the full-precision recent window
  bits: int = struct.field(pytree_node=False, default=2)
  group: int = struct.field(pytree_node=False, default=32)
  window: int = struct.field(pytree_node=False, default=128)
  flushed_ahead: bool = struct.field(pytree_node=False, default=False)

  @property
  def state(self):  # per-slot method state is not kept for quantized slots
    return None

  @property
  def capacity(self) -> int:
    return self.quantized.capacity + self.residual.capacity

  @property
  def flushed_capacity(self) -> int:
    return self.quantized.capacity

  def slot_positions(self) -> jax.Array:
    return jnp.concatenate([self.quantized.positions, self.residual.positions], axis=2)

  def logical_axes(self) -> dict:
    slot = ("batch", "kv_heads", "slots")
    return {"quantized": {"key_codes": slot + ("packed",), "key_scale": slot + ("head_dim",),
                          "key_zero": slot + ("head_dim",), "value_codes": slot + ("packed",),
                          "value_scale": slot + ("groups",), "value_zero": slot + ("groups",),
                          "positions": slot},
            "end": (), "residual": self.residual.logical_axes()}

  @classmethod
  def from_dense(cls, dense: LayerCache, bits: int, group: int, window: int
                 ) -> "QuantizedLayerCache":
    """Quantizes all but the newest slots of a dense cache whose slots [0, capacity) are
    filled in order (a prefilled or compacted cache): the oldest whole groups beyond the
    `window` newest slots go to the quantized part."""
    s = dense.capacity
    n_quant = max(0, (s - window) // group * group)
    dtype = dense.keys.dtype
    part = quantize_slots(dense.keys[:, :, :n_quant], dense.values[:, :, :n_quant],
                          dense.positions[:, :, :n_quant], bits, group, dtype)
    residual = LayerCache(keys=dense.keys[:, :, n_quant:], values=dense.values[:, :, n_quant:],
                          positions=dense.positions[:, :, n_quant:],
                          end=jnp.int32(s - n_quant))
    return cls(quantized=part, end=jnp.int32(n_quant), residual=residual, bits=bits,
               group=group, window=window)

  @classmethod
  def from_dense_prefix(cls, dense: LayerCache, n: jax.Array, bits: int, group: int,
                        window: int) -> "QuantizedLayerCache":
    """`from_dense` of the first `n` slots (traced, at most dense.capacity), at the shapes
    of the whole: `first_slots(n)` of the result is `from_dense` of those slots (groups
    are quantized on their own, so the groups past `n`'s are left out as empty)."""
    s = dense.capacity
    n_quant = jnp.maximum(0, (n - window) // group * group)
    held = min(s, window + group - 1)   # the most a residual of n <= s slots holds
    first = max(0, (s - window) // group * group)
    quantized = jnp.arange(first) < n_quant
    part = quantize_slots(dense.keys[:, :, :first], dense.values[:, :, :first],
                          jnp.where(quantized, dense.positions[:, :, :first], EMPTY_POSITION),
                          bits, group, dense.keys.dtype)
    rest = lambda a: jax.lax.dynamic_slice_in_dim(pad_slots(a, held), n_quant, held, 2)
    residual = LayerCache(
        keys=rest(dense.keys), values=rest(dense.values),
        positions=jnp.where(jnp.arange(held) < n - n_quant, rest(dense.positions),
                            EMPTY_POSITION),
        end=(n - n_quant).astype(jnp.int32))
    return cls(quantized=part, end=n_quant.astype(jnp.int32), residual=residual, bits=bits,
               group=group, window=window)

  def first_slots(self, n: int) -> "QuantizedLayerCache":
    """The layout `from_dense` gives `n` slots, cut from one `from_dense_prefix` built
    for `n` (or more) slots."""
    g = self.group
    n_quant = max(0, (n - self.window) // g * g)
    q = self.quantized
    cut = lambda a, m: a[:, :, :m]
    part = QuantizedKV(
        key_codes=cut(q.key_codes, n_quant), key_scale=cut(q.key_scale, n_quant // g),
        key_zero=cut(q.key_zero, n_quant // g), value_codes=cut(q.value_codes, n_quant),
        value_scale=cut(q.value_scale, n_quant), value_zero=cut(q.value_zero, n_quant),
        positions=cut(q.positions, n_quant))
    return self.replace(quantized=part, residual=self.residual.first_slots(n - n_quant))

  def dequantized(self) -> LayerCache:
    """Both parts as one dense full-precision cache (quantized slots first)."""
    q = self.quantized
    dtype = self.residual.keys.dtype
    keys = quant_ops.dequantize(q.key_codes, q.key_scale, q.key_zero, bits=self.bits,
                                group=self.group, axis="tokens", dtype=dtype)
    values = quant_ops.dequantize(q.value_codes, q.value_scale, q.value_zero, bits=self.bits,
                                  group=self.group, axis="channels", dtype=dtype)
    r = self.residual
    return LayerCache(keys=jnp.concatenate([keys, r.keys], axis=2),
                      values=jnp.concatenate([values, r.values], axis=2),
                      positions=self.slot_positions(), end=jnp.int32(self.capacity))

  def attend(self, queries, query_positions, pending: NewTokens | None = None,
             want: frozenset = frozenset()):
    if pending is not None or want or queries.shape[1] > 1:
      # Prefill chunks and statistics: attention over the dequantized slots.
      return self.dequantized().attend(queries, query_positions, pending, want)
    q = self.quantized
    out_q, lse_q = quant_ops.decode_attention(
        queries, q.key_codes, q.key_scale, q.key_zero, q.value_codes, q.value_scale,
        q.value_zero, q.positions, query_positions, bits=self.bits, group=self.group)
    r = self.residual
    out_r, lse_r = attention_ops.decode(queries, r.keys, r.values, query_positions,
                                        r.positions)
    b, _, h, d = queries.shape
    k = r.keys.shape[1]
    shape = (b, k, h // k, d)
    out, _ = attention_ops.merge_partials(out_q.reshape(shape).astype(jnp.float32), lse_q,
                                          out_r.reshape(shape).astype(jnp.float32), lse_r)
    return out.reshape(queries.shape).astype(queries.dtype), Stats()

  def group_encoding(self) -> tuple:
    return (self.bits, self.group, self.quantized.key_scale.dtype)

  def encode_group(self, keys, values, positions) -> QuantizedKV:
    """Slots [B, K, group, D] quantized (the part `write_group` stores)."""
    return quantize_slots(keys, values, positions, self.bits, self.group,
                          self.quantized.key_scale.dtype)

  def write_group(self, part: QuantizedKV) -> "QuantizedLayerCache":
    """One encoded group written into the quantized part at `end`."""
    g = self.group
    q = self.quantized
    at = lambda old, new, start: jax.lax.dynamic_update_slice_in_dim(old, new, start, 2)
    return self.replace(quantized=QuantizedKV(
        key_codes=at(q.key_codes, part.key_codes, self.end),
        key_scale=at(q.key_scale, part.key_scale, self.end // g),
        key_zero=at(q.key_zero, part.key_zero, self.end // g),
        value_codes=at(q.value_codes, part.value_codes, self.end),
        value_scale=at(q.value_scale, part.value_scale, self.end),
        value_zero=at(q.value_zero, part.value_zero, self.end),
        positions=at(q.positions, part.positions, self.end)))

  def candidates(self, new: NewTokens) -> LayerCache:
    return self.dequantized().candidates(new)

  def select(self, index):
    raise NotImplementedError("a quantized cache is compacted through its dense candidates")

  def grow(self, room: int) -> "QuantizedLayerCache":
    """Room for `room` more tokens: in the residual (a chunk lands there first) and, for
    the groups those tokens will push out, in the quantized part."""
    if room == 0:
      return self
    return self.replace(quantized=self._quantized_grown(-(-room // self.group)),
                        residual=self.grown_residual(room))

  def reserve_for(self, room: int, multiple: int) -> int:
    """The slots (`reserve`) that round the quantized part after `grow(room)` up to a
    multiple of `multiple` and of `group` (`kv_cache.reserve_rooms`); the residual's
    capacity after a grow, `waiting_limit + room`, is the same for every context."""
    g = self.group
    step = math.lcm(g, multiple)
    return (-(self.quantized.capacity + -(-room // g) * g)) % step

  def reserve(self, slots: int) -> "QuantizedLayerCache":
    """`slots` (a multiple of `group`) more empty quantized slots per head, only there to
    give the quantized part a capacity that contexts of other lengths share
    (`kv_cache.reserve_rooms`). Flushed groups may fill them, as any slot past `end`."""
    if slots % self.group:
      raise ValueError(f"reserved slots {slots} must be a multiple of group {self.group}")
    return self.replace(quantized=self._quantized_grown(slots // self.group))

  def _quantized_grown(self, groups: int) -> QuantizedKV:
    """The quantized part with `groups` more empty groups of slots."""
    q = self.quantized
    slots = groups * self.group
    return QuantizedKV(
        key_codes=pad_slots(q.key_codes, slots), key_scale=pad_slots(q.key_scale, groups),
        key_zero=pad_slots(q.key_zero, groups), value_codes=pad_slots(q.value_codes, slots),
        value_scale=pad_slots(q.value_scale, slots), value_zero=pad_slots(q.value_zero, slots),
        positions=pad_slots(q.positions, slots, EMPTY_POSITION))


def analytic_nbytes(batch: int, kv_heads: int, quantized_slots: int, residual_slots: int,
                    head_dim: int, bits: int, group: int, dtype) -> int:
  """What a quantized layer should hold: codes, scales and zeros, the residual window in
  full precision, and one int32 position per slot and head (plus the fill counters)."""
  itemsize = jnp.dtype(dtype).itemsize
  slots = batch * kv_heads * quantized_slots
  codes = 2 * slots * head_dim * bits // 8
  params = 2 * (slots // group * head_dim + slots * (head_dim // group)) * itemsize
  residual = batch * kv_heads * residual_slots * (2 * head_dim * itemsize + 4)
  return codes + params + residual + 4 * slots + 2 * 4

