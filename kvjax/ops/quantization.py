"""KV quantization (KIVI's format): the Pallas kernels on GPU/TPU, their jnp definitions on CPU.

The format (min/max codes, bit-packing, scale and zero shapes) is defined in
`pallas_kernels.quantization`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kvjax.ops.dispatch import use_pallas
from kvjax.ops.sharded import per_shard
from pallas_kernels import decode_attention as decode_kernels
from pallas_kernels import quantization as kernels
from pallas_kernels import reference

FULL_PRECISION = 16


def quantize(x, *, bits: int, group: int, axis: str, valid=None, scale_dtype=None):
  """x [..., S, D] -> (codes uint32 [..., S, D * bits // 32], scale, zero)."""
  # An empty part (a prompt shorter than the residual window) has nothing to launch.
  if not (use_pallas() and x.shape[-2] > 0):
    return kernels.quantize(x, bits=bits, group=group, axis=axis, valid=valid,
                            scale_dtype=scale_dtype)
  pack = lambda x, valid=None: kernels.quantize_pack(x, bits=bits, group=group, axis=axis,
                                                     valid=valid, scale_dtype=scale_dtype)
  # Every [S, D] slice is quantized on its own: the leading axes (a cache's [B, K]) split.
  lead = "bk"[:x.ndim - 2]
  if not lead:
    return pack(x, valid)
  args = (x,) if valid is None else (x, valid)
  return per_shard(pack, (lead,) * len(args), (lead,) * 3)(*args)


def dequantize(codes, scale, zero, *, bits: int, group: int, axis: str, dtype):
  return kernels.dequantize(codes, scale, zero, bits=bits, group=group, axis=axis, dtype=dtype)


def decode_attention(query, key_codes, key_scale, key_zero, value_codes, value_scale,
                     value_zero, key_positions, query_positions, *, bits: int, group: int):
  """One query token per row (query [B, 1, H, D]) over quantized slots [B, K, S]:
  (out [B, 1, H, D], lse [B, K, G]); dequantized inside the kernel on GPU/TPU."""
  b, _, h, d = query.shape
  k = key_positions.shape[1]
  grouped = query.reshape(b, k, h // k, d)
  if use_pallas():
    kernel = functools.partial(kernels.quantized_decode_attention, bits=bits, group=group)
    out, lse = per_shard(kernel, ("bk",) * 8 + ("b",), ("bk", "bk"))(
        grouped, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
        key_positions, query_positions[:, 0])
  else:
    out, lse, _ = reference.quantized_decode_attention(
        grouped, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
        key_positions, query_positions[:, 0], bits=bits, group=group, upcast=False)
  return out.reshape(query.shape).astype(query.dtype), lse


class DecodePart(NamedTuple):
  """One set of slots a decode query reads (see `union_decode_attention`).

  query [B, K, G, D] float32: the query this part is read with (divided by the balance
  when the keys were stored times it). At `bits=16` keys/values are dense [B, K, S, D];
  otherwise uint32 codes [B, K, S, D * bits // 32] quantized per token
  (axis="channels"), with a scale and a zero [B, K, S, D // group] for each.
  """
  query: jax.Array
  keys: jax.Array
  values: jax.Array
  positions: jax.Array          # [B, K, S] int32, negative = empty
  bits: int = FULL_PRECISION
  group: int = 0
  key_scale: Any = None
  key_zero: Any = None
  value_scale: Any = None
  value_zero: Any = None


def _dense_kv(part: DecodePart):
  """(keys, values) [B, K, S, D] float32 of a part, dequantized if need be."""
  if part.bits == FULL_PRECISION:
    return part.keys.astype(jnp.float32), part.values.astype(jnp.float32)
  deq = lambda c, s, z: dequantize(c, s, z, bits=part.bits, group=part.group,
                                   axis="channels", dtype=jnp.float32)
  return (deq(part.keys, part.key_scale, part.key_zero),
          deq(part.values, part.value_scale, part.value_zero))


def _part_kernel(part: DecodePart, query_positions, dtype):
  """(out [B, K, G, D] float32, lse [B, K, G]) of one part through a decode kernel: the
  dequantizing one where its group is a power of two, else the dense one."""
  q = part.query.astype(dtype)
  # Every array of a part is [B, K, ...]: each shard reads its rows and KV heads.
  if part.bits != FULL_PRECISION and part.group & (part.group - 1) == 0:
    kernel = functools.partial(kernels.quantized_decode_attention, bits=part.bits,
                               group=part.group, key_axis="channels")
    out, lse = per_shard(kernel, ("bk",) * 8 + ("b",), ("bk", "bk"))(
        q, part.keys, part.key_scale, part.key_zero, part.values, part.value_scale,
        part.value_zero, part.positions, query_positions)
  else:
    keys, values = _dense_kv(part)
    out, lse = per_shard(decode_kernels.decode_attention, ("bk",) * 4 + ("b",), ("bk", "bk"))(
        q, keys.astype(dtype), values.astype(dtype), part.positions, query_positions)
  return out.astype(jnp.float32), lse


def union_decode_attention(parts, query_positions, dtype):
  """One query per row over the union of several slot sets, as one softmax.

  parts: `DecodePart`s (their S may differ; empty ones are skipped); query_positions
  [B]; dtype: the model's (kernels read their queries in it). Returns (out [B, K, G, D]
  float32, lse [B, K, G]). GPU/TPU: one decode kernel per part (quantized parts
  dequantized inside it), merged by log-sum-exp; CPU: the parts dequantized, then one
  softmax over all their logits.
  """
  parts = [p for p in parts if p.positions.shape[2]]
  if not parts:
    raise ValueError("union_decode_attention needs at least one part with slots")
  if use_pallas():
    out, lse = _part_kernel(parts[0], query_positions, dtype)
    for part in parts[1:]:
      out, lse = decode_kernels.merge_partials(out, lse,
                                               *_part_kernel(part, query_positions, dtype))
    return out, lse
  dense = [_dense_kv(p) for p in parts]
  return reference.union_decode_attention([p.query.astype(jnp.float32) for p in parts],
                                          [k for k, _ in dense], [v for _, v in dense],
                                          [p.positions for p in parts], query_positions)
