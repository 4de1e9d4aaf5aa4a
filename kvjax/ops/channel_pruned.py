"""Attention over a channel-pruned cache (ThinK): the kernel on GPU/TPU, jnp elsewhere.

A layer holds two parts per KV head: pruned slots (keys at the channels `channels
[B, K, D']` only, full values) and full-width slots (keys and values [B, K, N, D]). Each
part is attended on its own and the two are merged exactly by log-sum-exp
(`merge_partials`), which is one softmax over the union: the pruned part's logits are
q[channels] . k_pruned * D ** -0.5 (the full head dim's scale), the full part's the
ordinary q . k * D ** -0.5.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from kvjax.ops import attention as attention_ops
from kvjax.ops.dispatch import use_pallas
from kvjax.ops.sharded import per_shard
from pallas_kernels import channel_pruned as kernels
from pallas_kernels import reference
from pallas_kernels.decode_attention import merge_partials


def decode(query, query_positions, channels, pruned_keys, pruned_values, pruned_positions,
           keys, values, positions):
  """One new token per row (query [B, 1, H, D]) over both parts -> out [B, 1, H, D].

  Pruned part: the channel-pruned decode kernel on GPU/TPU (the query gathered in XLA,
  keys read at D' channels), its jnp reference on CPU; full part: the dense decode
  attention; merged by log-sum-exp.
  """
  b, _, h, d = query.shape
  k = pruned_keys.shape[1]
  grouped = query.reshape(b, k, h // k, d)
  out_f, lse_f = attention_ops.decode(query, keys, values, query_positions, positions)
  if pruned_keys.shape[2] == 0:
    return out_f
  if use_pallas():
    out_p, lse_p = per_shard(kernels.channel_pruned_decode_attention, ("bk",) * 5 + ("b",),
                             ("bk", "bk"))(grouped, channels, pruned_keys, pruned_values,
                                           pruned_positions, query_positions[:, 0])
  else:
    out_p, lse_p, _ = reference.channel_pruned_decode_attention(
        grouped, channels, pruned_keys, pruned_values, pruned_positions,
        query_positions[:, 0], upcast=False)
  out, _ = merge_partials(out_p.astype(jnp.float32), lse_p,
                          out_f.reshape(grouped.shape).astype(jnp.float32), lse_f)
  return out.reshape(query.shape).astype(query.dtype)


def attend(queries, query_positions, channels, pruned_keys, pruned_values, pruned_positions,
           keys, values, positions, column_sums=False):
  """T queries [B, T, H, D] over both parts (jnp) -> out [B, T, H, D] and, with
  column_sums, [B, H, S + N] float32: each slot's probability summed over the queries
  (pruned slots first). Long chunks run in blocks of `reference.QUERY_BLOCK` queries."""
  parts = (channels, pruned_keys, pruned_values, pruned_positions, keys, values, positions)
  t = queries.shape[1]
  block = reference.QUERY_BLOCK
  if t <= block or t % block:
    out, sums = _attend_block(queries, query_positions, *parts)
    return (out, sums) if column_sums else out
  blocks = t // block
  split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], blocks, block, *x.shape[2:]), 1, 0)

  def step(carry, qp):
    out, sums = _attend_block(qp[0], qp[1], *parts)
    return carry + sums, out

  b, _, h, _ = queries.shape
  zero = jnp.zeros((b, h, pruned_keys.shape[2] + keys.shape[2]), jnp.float32)
  sums, out = lax.scan(step, zero, (split(queries), split(query_positions)))
  out = jnp.moveaxis(out, 0, 1).reshape(queries.shape)
  return (out, sums) if column_sums else out


def _attend_block(queries, query_positions, channels, pruned_keys, pruned_values,
                  pruned_positions, keys, values, positions):
  b, t, h, d = queries.shape
  k = keys.shape[1]
  q = reference.group_heads(queries, k)
  seen = lambda kpos: reference.visible(query_positions[:, None, None, :], kpos[:, :, None, :])
  partials = []
  if pruned_keys.shape[2]:
    partials.append(reference.channel_pruned_attention(
        q, channels, pruned_keys, pruned_values, seen(pruned_positions)))
  if keys.shape[2]:
    partials.append(reference.grouped_attention(q, keys, values, seen(positions)))
  if len(partials) == 1:
    out, lse = partials[0][:2]
  else:
    out, lse = merge_partials(partials[0][0], partials[0][1], partials[1][0], partials[1][1])
  # Each part's probabilities renormalised to the union's softmax, summed over queries.
  sums = jnp.concatenate([(p * jnp.exp(l - lse)[..., None]).sum(3) for _, l, p in partials],
                         axis=-1)
  out = jnp.moveaxis(out, 3, 1).reshape(b, t, h, d).astype(queries.dtype)
  return out, sums.reshape(b, h, -1)
