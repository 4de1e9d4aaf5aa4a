"""Decode attention over layers that share storage (xKV's low-rank groups, MiniCache's
merged pairs): the fused Pallas kernels of `pallas_kernels.cross_layer` on GPU/TPU, their
jnp references elsewhere. Neither forms a layer's [S, D] keys and values (xKV's CPU path
rebuilds the keys, which RoPE needs, but absorbs the value coefficients).

Shapes: query [B, 1, H, D] (post-RoPE, one token per row), query positions [B, 1]; the
results are (out [B, 1, H, D], lse [B, K, G]) for a log-sum-exp merge with the layer's
dense tail (`attention.merge_partials`).
"""

from __future__ import annotations

import jax.numpy as jnp

from kvjax.ops.dispatch import use_pallas
from kvjax.ops.sharded import per_shard
from pallas_kernels import cross_layer as kernels
from pallas_kernels import reference
from pallas_kernels.cross_layer import LowRankSlots, MergedSlots

__all__ = ["LowRankSlots", "MergedSlots", "lowrank_decode", "merged_decode"]


def _grouped(query, num_kv_heads: int):
  b, _, h, d = query.shape
  return query.reshape(b, num_kv_heads, h // num_kv_heads, d)


def lowrank_decode(query, slots: LowRankSlots, key_positions, inv_freq, query_positions):
  """One xKV layer's S > 0 shared slots (key_positions [B, S]: one per token, for every
  head; inv_freq [D // 2] the model's RoPE frequencies)."""
  k = slots.key_coefficients.shape[-1] // query.shape[-1]
  if use_pallas():
    # Rows only: the coefficients hold all heads side by side on their last axis [B, r,
    # K * D], and every head reads the same basis; inv_freq is whole.
    fn = per_shard(kernels.lowrank_decode_attention, ("b", "b", "b", "", "b"), ("b", "b"))
  else:
    fn = reference.lowrank_decode_attention
  out, lse = fn(_grouped(query, k), slots, key_positions, jnp.asarray(inv_freq, jnp.float32),
                query_positions[:, 0])
  return out.reshape(query.shape).astype(query.dtype), lse


def merged_decode(query, slots: MergedSlots, key_positions, query_positions):
  """One MiniCache layer's S > 0 shared slots (key_positions [B, K, S])."""
  grouped, qpos = _grouped(query, key_positions.shape[1]), query_positions[:, 0]
  if use_pallas():
    # Every leaf of the slots is [B, K, ...] (retained indices count within their head):
    # passed one by one so that each splits by rows and KV heads.
    kernel = lambda q, kpos, qp, *leaves: kernels.merged_decode_attention(
        q, MergedSlots(*leaves), kpos, qp)
    out, lse = per_shard(kernel, ("bk", "bk", "b") + ("bk",) * len(slots), ("bk", "bk"))(
        grouped, key_positions, qpos, *slots)
  else:
    out, lse = reference.merged_decode_attention(grouped, slots, key_positions, qpos)
  return out.reshape(query.shape).astype(query.dtype), lse
