"""The GEAR layer cache: KIVI codes plus sparse outliers plus low-rank residual factors.

Slots are split in three parts, each sized to what it holds:
  * prompt: the prefilled context's oldest whole groups, compressed as ONE block with the
    prefill rank (GEAR compresses the prompt at the end of prefill);
  * decode: later tokens, compressed `group` at a time with the decode rank, one block per
    flushed group (GEAR's streaming buffer, compressed every n_b tokens);
  * residual: the newest tokens in full precision (a dense `LayerCache`), between `window`
    and `window + group - 1` of them (without a window, 1 to `group` at a decode step's
    attention), flushed group by group exactly like KIVI's (`kvjax.cache.quantized`).
A block (`GearBlocks`) of n slots stores what `kvjax.ops.gear` describes: KIVI's packed
codes, scales and zeros of the outlier-free block (a `QuantizedKV`), the outliers (keys:
per channel over the block's tokens; values: per token over channels; values + int32
indices) and the rank-r factors A [n, r], B [d, r] of the remaining residual, for keys and
for values. Every one of them is an array of the pytree, so `nbytes` counts them all.

Decode attention never rebuilds the cache: each compressed part gives a partial
attention (out, log-sum-exp) straight from its stored pieces (`kvjax.ops.gear.
decode_attention`: logits q . deq(Qk) + the key outliers' exact correction (the base holds
the vector mean where an outlier is put back, so the correction is value - base there) +
(q Bk) Ak^T; output p . put(deq(Qv), Sv) + (p Av) Bv^T; a fused Pallas kernel on GPU/TPU,
its jnp reference on CPU, which dequantizes the base codes as KIVI's CPU path does, but
forms no low-rank term per slot), the residual window gives one through the dense decode
attention, and the partials are merged by log-sum-exp, which is exactly one softmax over
every slot. Prefill chunks, questions and statistics read the dense reconstruction
put(deq(Q), S) + A B^T of every slot (`dequantized`), through the dense layout's attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.cache import quantized
from kvjax.cache.kv_cache import EMPTY_POSITION, LayerCache, NewTokens, Stats, pad_slots
from kvjax.cache.quantized import QuantizedKV, quantize_slots
from kvjax.ops import attention as attention_ops
from kvjax.ops import gear as gear_ops
from kvjax.ops import quantization as quant_ops


@struct.dataclass
class Outliers:
  values: jax.Array    # [..., V, 2 * count] in the cache dtype: largest `count`, then smallest
  indices: jax.Array   # [..., V, 2 * count] int32: where each value sits in its vector


@struct.dataclass
class LowRank:
  a: jax.Array         # [B, K, S, r]: each block's n rows of A, blocks one after another
  b: jax.Array         # [B, K, blocks, D, r]


@struct.dataclass
class GearBlocks:
  """S slots per KV head in equal blocks of n = S / blocks consecutive slots (n a multiple
  of the quantization group); each block has its own outliers and low-rank factors."""
  quantized: QuantizedKV
  key_outliers: Outliers     # [B, K, blocks, D, 2 * count]: per channel over the block
  value_outliers: Outliers   # [B, K, S, 2 * count]: per token over the channels
  key_factors: LowRank
  value_factors: LowRank

  @property
  def capacity(self) -> int:
    return self.quantized.capacity

  @property
  def blocks(self) -> int:
    return self.key_factors.b.shape[2]


# Which leaves of GearBlocks are indexed by slot along axis 2 (the rest by block, or by
# key-quantization group, which for the decode part's one-group blocks is the same).
_PER_SLOT = GearBlocks(
    quantized=QuantizedKV(key_codes=True, key_scale=False, key_zero=False, value_codes=True,
                          value_scale=True, value_zero=True, positions=True),
    key_outliers=Outliers(values=False, indices=False),
    value_outliers=Outliers(values=True, indices=True),
    key_factors=LowRank(a=True, b=False), value_factors=LowRank(a=True, b=False))


def compress_block(keys, values, positions, *, bits: int, group: int, rank: int, loops: int,
                   outlier_ratio: float, dtype) -> GearBlocks:
  """GEAR of one block of dense slots [B, K, n, D] (n a multiple of group): a GearBlocks
  with one block. Empty slots (position < 0) are no outliers, widen no quantization range
  and are zero in the residual that the low-rank factors fit."""
  b, k, n, d = keys.shape
  valid = positions >= 0
  rank = min(rank, n, d)
  parts = {}
  for name, x, axis in (("key", keys, "tokens"), ("value", values, "channels")):
    count = gear_ops.outlier_count(n if axis == "tokens" else d, outlier_ratio)
    filled, out_values, out_index = gear_ops.extract_outliers(x, valid, count, axis)
    parts[name] = (x.astype(jnp.float32), filled, Outliers(out_values.astype(dtype), out_index))
  q = quantize_slots(parts["key"][1], parts["value"][1], positions, bits, group, dtype)
  base = {"key": quant_ops.dequantize(q.key_codes, q.key_scale, q.key_zero, bits=bits,
                                      group=group, axis="tokens", dtype=jnp.float32),
          "value": quant_ops.dequantize(q.value_codes, q.value_scale, q.value_zero, bits=bits,
                                        group=group, axis="channels", dtype=jnp.float32)}
  factors = {}
  for name, axis in (("key", "tokens"), ("value", "channels")):
    x, _, sparse = parts[name]
    # The residual left by what is stored (rounded scales and outlier values).
    approx = gear_ops.put_outliers(base[name], sparse.values, sparse.indices, axis)
    residual = jnp.where(valid[..., None], x - approx, 0.0)
    a, bt = gear_ops.power_iteration(residual, rank, loops)
    factors[name] = LowRank(a=jnp.where(valid[..., None], a, 0.0).astype(dtype),
                            b=bt[:, :, None].astype(dtype))
  key_out = parts["key"][2]
  return GearBlocks(
      quantized=q,
      key_outliers=Outliers(key_out.values[:, :, None], key_out.indices[:, :, None]),
      value_outliers=parts["value"][2], key_factors=factors["key"],
      value_factors=factors["value"])


def empty_blocks(batch: int, kv_heads: int, head_dim: int, *, bits: int, group: int,
                 rank: int, outlier_ratio: float, dtype) -> GearBlocks:
  """A part with no slots, shaped for blocks of `group` slots (the decode part)."""
  shapes = jax.eval_shape(lambda: compress_block(
      jnp.zeros((batch, kv_heads, group, head_dim), dtype),
      jnp.zeros((batch, kv_heads, group, head_dim), dtype),
      jnp.zeros((batch, kv_heads, group), jnp.int32), bits=bits, group=group, rank=rank,
      loops=1, outlier_ratio=outlier_ratio, dtype=dtype))
  return jax.tree_util.tree_map(
      lambda s: jnp.zeros(s.shape[:2] + (0,) + s.shape[3:], s.dtype), shapes)


def reconstruct(part: GearBlocks, *, bits: int, group: int, dtype):
  """Dense keys and values [B, K, S, D] in `dtype`: put(deq(Q), S) + A B^T per block."""
  q = part.quantized
  b, k, s = q.positions.shape
  nb = part.blocks
  out = []
  for name, axis in (("key", "tokens"), ("value", "channels")):
    codes, scale, zero = (getattr(q, f"{name}_{p}") for p in ("codes", "scale", "zero"))
    x = quant_ops.dequantize(codes, scale, zero, bits=bits, group=group, axis=axis,
                             dtype=jnp.float32)
    d = x.shape[-1]
    sparse = getattr(part, f"{name}_outliers")
    factors = getattr(part, f"{name}_factors")
    if s == 0:
      out.append(x.astype(dtype))
      continue
    blocks = x.reshape(b, k, nb, s // nb, d)
    if axis == "tokens":   # per channel within each block
      blocks = gear_ops.put_outliers(blocks, sparse.values, sparse.indices, axis)
    else:                  # per token: no block structure needed
      blocks = gear_ops.put_outliers(x, sparse.values, sparse.indices, axis).reshape(
          blocks.shape)
    a = factors.a.reshape(b, k, nb, s // nb, -1)
    blocks = blocks + gear_ops.low_rank(a, factors.b)
    out.append(blocks.reshape(b, k, s, d).astype(dtype))
  return tuple(out)


def kernel_part(part: GearBlocks) -> gear_ops.GearPart:
  """The arrays of a part as the GEAR decode attention takes them."""
  q = part.quantized
  return gear_ops.GearPart(
      key_codes=q.key_codes, key_scale=q.key_scale, key_zero=q.key_zero,
      value_codes=q.value_codes, value_scale=q.value_scale, value_zero=q.value_zero,
      key_outlier_values=part.key_outliers.values,
      key_outlier_indices=part.key_outliers.indices,
      value_outlier_values=part.value_outliers.values,
      value_outlier_indices=part.value_outliers.indices,
      key_a=part.key_factors.a, key_b=part.key_factors.b,
      value_a=part.value_factors.a, value_b=part.value_factors.b)


def _write(full: GearBlocks, part: GearBlocks, start, group: int) -> GearBlocks:
  """`part` (one block of `group` slots) written at slot `start` of `full`."""
  put = lambda per_slot, f, p: jax.lax.dynamic_update_slice_in_dim(
      f, p, start if per_slot else start // group, 2)
  return jax.tree_util.tree_map(put, _PER_SLOT, full, part)


def _pad(part: GearBlocks, groups: int, group: int) -> GearBlocks:
  """`groups` more empty blocks of `group` slots."""
  def pad(per_slot, a, fill=0):
    n = groups * group if per_slot else groups
    return pad_slots(a, n, fill)
  padded = jax.tree_util.tree_map(pad, _PER_SLOT, part)
  positions = pad(True, part.quantized.positions, EMPTY_POSITION)
  return padded.replace(quantized=padded.quantized.replace(positions=positions))


@struct.dataclass
class GearLayerCache(quantized.ResidualWindow):
  prompt: GearBlocks       # the prefill context's compressed slots (one block)
  decode: GearBlocks       # flushed decode groups (one block each)
  end: jax.Array           # int32 scalar: decode slots filled (a multiple of group)
  residual: LayerCache     # the full-precision recent window
  bits: int = struct.field(pytree_node=False, default=2)
  group: int = struct.field(pytree_node=False, default=64)
  window: int = struct.field(pytree_node=False, default=0)
  decode_rank: int = struct.field(pytree_node=False, default=2)
  loops: int = struct.field(pytree_node=False, default=3)
  outlier_ratio: float = struct.field(pytree_node=False, default=0.02)
  flushed_ahead: bool = struct.field(pytree_node=False, default=False)

  @property
  def state(self):  # per-slot method state is not kept for compressed slots
    return None

  @property
  def capacity(self) -> int:
    return self.prompt.capacity + self.decode.capacity + self.residual.capacity

  def slot_positions(self) -> jax.Array:
    return jnp.concatenate([self.prompt.quantized.positions, self.decode.quantized.positions,
                            self.residual.positions], axis=2)

  @property
  def flushed_capacity(self) -> int:
    return self.decode.capacity

  def logical_axes(self) -> dict:
    slot = ("batch", "kv_heads", "slots")
    block = ("batch", "kv_heads", "blocks")
    part = {"quantized": {"key_codes": slot + ("packed",), "key_scale": slot + ("head_dim",),
                          "key_zero": slot + ("head_dim",), "value_codes": slot + ("packed",),
                          "value_scale": slot + ("groups",), "value_zero": slot + ("groups",),
                          "positions": slot},
            "key_outliers": {"values": block + ("head_dim", "outliers"),
                             "indices": block + ("head_dim", "outliers")},
            "value_outliers": {"values": slot + ("outliers",), "indices": slot + ("outliers",)},
            "key_factors": {"a": slot + ("rank",), "b": block + ("head_dim", "rank")},
            "value_factors": {"a": slot + ("rank",), "b": block + ("head_dim", "rank")}}
    return {"prompt": part, "decode": part, "end": (), "residual": self.residual.logical_axes()}

  @classmethod
  def from_dense(cls, dense: LayerCache, *, bits: int, group: int, window: int, rank: int,
                 decode_rank: int, loops: int, outlier_ratio: float) -> "GearLayerCache":
    """Compresses all but the newest slots of a dense cache whose slots [0, capacity) are
    filled in order (a prefilled or compacted cache): the oldest whole groups beyond the
    `window` newest slots form the prompt block (rank `rank`)."""
    b, k, s, d = dense.keys.shape
    n = max(0, (s - window) // group * group)
    dtype = dense.keys.dtype
    options = dict(bits=bits, group=group, outlier_ratio=outlier_ratio, dtype=dtype)
    if n:
      prompt = compress_block(dense.keys[:, :, :n], dense.values[:, :, :n],
                              dense.positions[:, :, :n], rank=rank, loops=loops, **options)
    else:
      prompt = empty_blocks(b, k, d, rank=rank, **options)
    residual = LayerCache(keys=dense.keys[:, :, n:], values=dense.values[:, :, n:],
                          positions=dense.positions[:, :, n:], end=jnp.int32(s - n))
    return cls(prompt=prompt, decode=empty_blocks(b, k, d, rank=decode_rank, **options),
               end=jnp.int32(0), residual=residual, bits=bits, group=group, window=window,
               decode_rank=decode_rank, loops=loops, outlier_ratio=outlier_ratio)

  def dequantized(self) -> LayerCache:
    """All parts as one dense full-precision cache (prompt, decode groups, residual)."""
    r = self.residual
    fmt = dict(bits=self.bits, group=self.group, dtype=r.keys.dtype)
    pk, pv = reconstruct(self.prompt, **fmt)
    dk, dv = reconstruct(self.decode, **fmt)
    return LayerCache(keys=jnp.concatenate([pk, dk, r.keys], axis=2),
                      values=jnp.concatenate([pv, dv, r.values], axis=2),
                      positions=self.slot_positions(), end=jnp.int32(self.capacity))

  def attend(self, queries, query_positions, pending: NewTokens | None = None,
             want: frozenset = frozenset()):
    if pending is not None or want or queries.shape[1] > 1:
      # Prefill chunks, questions and statistics: the dense reconstruction.
      return self.dequantized().attend(queries, query_positions, pending, want)
    # Decode: one partial attention per part, merged by log-sum-exp (one softmax).
    parts = [gear_ops.decode_attention(queries, kernel_part(part), part.quantized.positions,
                                       query_positions, bits=self.bits, group=self.group)
             for part in (self.prompt, self.decode) if part.capacity]
    r = self.residual
    if r.capacity:
      parts.append(attention_ops.decode(queries, r.keys, r.values, query_positions,
                                        r.positions))
    b, _, h, d = queries.shape
    shape = (b, r.keys.shape[1], h // r.keys.shape[1], d)
    out, lse = parts[0][0].reshape(shape).astype(jnp.float32), parts[0][1]
    for part_out, part_lse in parts[1:]:
      out, lse = attention_ops.merge_partials(
          out, lse, part_out.reshape(shape).astype(jnp.float32), part_lse)
    return out.reshape(queries.shape).astype(queries.dtype), Stats()

  def group_encoding(self) -> tuple:
    return (self.bits, self.group, self.decode_rank, self.loops, self.outlier_ratio)

  def encode_group(self, keys, values, positions) -> GearBlocks:
    """Slots [B, K, group, D] compressed as one decode block (decode rank)."""
    return compress_block(keys, values, positions, bits=self.bits, group=self.group,
                          rank=self.decode_rank, loops=self.loops,
                          outlier_ratio=self.outlier_ratio, dtype=keys.dtype)

  def write_group(self, part: GearBlocks) -> "GearLayerCache":
    """One encoded block written into the decode part at `end`."""
    return self.replace(decode=_write(self.decode, part, self.end, self.group))

  def candidates(self, new: NewTokens) -> LayerCache:
    return self.dequantized().candidates(new)

  def select(self, index):
    raise NotImplementedError("a GEAR cache is compacted through its dense candidates")

  def grow(self, room: int) -> "GearLayerCache":
    """Room for `room` more tokens: in the residual (a chunk lands there first) and, for
    the groups those tokens will push out, in the decode part."""
    if room == 0:
      return self
    g = self.group
    return self.replace(decode=_pad(self.decode, -(-room // g), g),
                        residual=self.grown_residual(room))


def analytic_nbytes(batch: int, kv_heads: int, prompt_slots: int, decode_slots: int,
                    residual_slots: int, head_dim: int, *, bits: int, group: int, rank: int,
                    decode_rank: int, outlier_ratio: float, dtype) -> int:
  """What a GEAR layer should hold: KIVI's codes, scales, zeros, positions, residual window
  and counters (`quantized.analytic_nbytes`), plus per block of n slots, for keys and
  values each: outliers (a value and an int32 index each; keys 2 * ceil(ratio * n / 2) per
  channel, values 2 * ceil(ratio * head_dim / 2) per slot) and the factors A [n, r] and
  B [head_dim, r], r = min(rank, n, head_dim)."""
  itemsize = jnp.dtype(dtype).itemsize
  total = quantized.analytic_nbytes(batch, kv_heads, prompt_slots + decode_slots,
                                    residual_slots, head_dim, bits, group, dtype)
  value_count = 2 * gear_ops.outlier_count(head_dim, outlier_ratio)
  for n, blocks, r in ((prompt_slots, 1 if prompt_slots else 0, rank),
                       (group, decode_slots // group, decode_rank)):
    r = min(r, n, head_dim)
    key_count = 2 * gear_ops.outlier_count(n, outlier_ratio)
    per_block = ((key_count * head_dim + value_count * n) * (itemsize + 4)
                 + 2 * (n + head_dim) * r * itemsize)
    total += batch * kv_heads * blocks * per_block
  return total
