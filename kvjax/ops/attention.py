"""Attention over slot caches: each function runs a Pallas kernel or its jnp reference.

Shapes: queries [B, T, H, D] (post-RoPE); dense keys/values [B, K, S, D] with key
positions [B, K, S]; flat (head-wise) keys/values [B, N, D] with positions and owner heads
[B, N]. Negative positions are empty slots; a slot is visible to a query iff
0 <= key position <= query position. DiffQKV models store r value heads per key head,
values [..., r * D]; the kernels take one value head per key head, so those run the jnp
references.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.ops.dispatch import use_pallas
from kvjax.ops.sharded import per_shard
from pallas_kernels import compaction, flash_attention, reference, vertical_slash as vs_kernels
from pallas_kernels import window_scores
from pallas_kernels import decode_attention as decode_kernels
from pallas_kernels.decode_attention import EMPTY_LSE, merge_partials

__all__ = ["EMPTY_LSE", "attend", "attend_flat", "decode", "decode_over_prefix", "decode_shared",
           "gather_slots", "gather_head_slots", "group_heads",
           "merge_partials", "probabilities", "vertical_slash", "visible", "window_column_sums",
           "with_pending_token"]

visible = reference.visible
probabilities = reference.probabilities
group_heads = reference.group_heads


def _kernels_for(queries, values) -> bool:
  """Whether the Pallas kernels serve these shapes (one value head per key head)."""
  return use_pallas() and values.shape[-1] == queries.shape[-1]


def attend(queries, keys, values, query_positions, key_positions, column_sums=False):
  """Causal attention of T queries over a dense cache -> out [B, T, H, D] (and, with
  column_sums, each slot's probability summed over the queries, [B, H, S] float32)."""
  if _kernels_for(queries, values) and not column_sums:
    return per_shard(flash_attention.flash_attention, ("b.h", "bk", "bk", "b", "bk"),
                     "b.h")(queries, keys, values, query_positions, key_positions)
  return reference.attention(queries, keys, values, query_positions, key_positions,
                             column_sums)


def attend_flat(queries, keys, values, query_positions, key_positions, key_heads,
                num_kv_heads, column_sums=False):
  """Causal attention of T queries over a flat (head-wise) cache -> [B, T, H, D] (and, with
  column_sums, [B, H, N]: each slot's probability summed over the queries; only the slot's
  own head group sees it)."""
  if queries.shape[1] == 1 and _kernels_for(queries, values) and not column_sums:
    return decode(queries, keys, values, query_positions, key_positions,
                  key_heads=key_heads, num_kv_heads=num_kv_heads)[0]
  return reference.attention_flat(queries, keys, values, query_positions, key_positions,
                                  key_heads, num_kv_heads, column_sums)


def _grouped(query, num_kv_heads):
  b, _, h, d = query.shape
  return query.reshape(b, num_kv_heads, h // num_kv_heads, d)


def decode(query, keys, values, query_positions, key_positions, return_probs=False,
           key_heads=None, num_kv_heads=None, stored=True):
  """One new token per row over a dense cache (keys [B, K, S, D]) or, given key_heads
  [B, N] and num_kv_heads, a flat head-wise one (keys [B, N, D]).

  query [B, 1, H, D] -> (out [B, 1, H, D], lse [B, K, G]) and, with return_probs, the
  probabilities [B, K, G, S] float32 (zero for slots of other heads).

  stored=False: keys and values are computed in the same program (gathered, dequantized),
  so the dense CPU reference reads them through dots at batch 1 too: XLA:CPU's fused pass
  over such keys was up to 2.5x slower (`reference._one_query_logits`); the flat layout
  and the kernels ignore it.
  """
  k = keys.shape[1] if key_heads is None else num_kv_heads
  grouped = _grouped(query, k)
  qpos = query_positions[:, 0]
  if key_heads is None:
    args, kernel = (grouped, keys, values, key_positions, qpos), decode_kernels.decode_attention
    ref = functools.partial(reference.decode_attention, stored=stored)
    layouts = ("bk",) * 4 + ("b",)
  else:
    args, kernel, ref = ((grouped, keys, values, key_positions, key_heads, qpos),
                         decode_kernels.decode_attention_flat, reference.decode_attention_flat)
    layouts = ("b",) * 6   # a flat cache's slot axis mixes heads: rows split only
  if _kernels_for(query, values):
    head = layouts[0]
    result = per_shard(functools.partial(kernel, return_probs=return_probs), layouts,
                       (head,) * (3 if return_probs else 2))(*args)
  else:
    result = ref(*args, upcast=False)
    result = result if return_probs else result[:2]
  return (result[0].reshape(query.shape).astype(query.dtype),) + tuple(result[1:])


def decode_shared(query, keys, query_positions, key_positions):
  """`decode` whose keys are also its values (MLA latents, keys [B, K, S, D]): the Pallas
  kernel reads each slot once; the reference attends with values = keys.
  -> (out [B, 1, H, D], lse [B, K, G])."""
  grouped = _grouped(query, keys.shape[1])
  qpos = query_positions[:, 0]
  if use_pallas():
    out, lse = per_shard(decode_kernels.decode_attention_shared, ("bk", "bk", "bk", "b"),
                         ("bk", "bk"))(grouped, keys, key_positions, qpos)
  else:
    out, lse = reference.decode_attention(grouped, keys, keys, key_positions, qpos,
                                          upcast=False)[:2]
  return out.reshape(query.shape).astype(query.dtype), lse


# A query position every slot of a shared prefix precedes: the suffix's tokens come after it.
_AFTER_EVERY_PREFIX = 2 ** 30


def decode_over_prefix(query, keys, values, key_positions):
  """One new token per row over a prefix that groups of R rows share (BatchLLM).

  query [G * R, 1, H, D] (rows g * R .. g * R + R - 1 share prefix g); keys/values
  [G, K, P, D], key_positions [G, K, P]. The group's R rows become R times the query
  heads of one row, so each prefix is read once for the whole group by the decode
  kernel. No causal mask: every prefix slot precedes the rows' tokens.
  -> (out [G * R, K, H // K, D] float32 (D: the values' width), lse [G * R, K, H // K]),
  ready for `merge_partials` with the rows' own attention. DiffQKV values (several value
  heads per key head) are read once per row.
  """
  rows, _, h, d = query.shape
  g, k = keys.shape[:2]
  r, per_kv = rows // g, h // k
  after = jnp.full((rows,), _AFTER_EVERY_PREFIX, jnp.int32)
  if values.shape[-1] != d:
    # DiffQKV (several value heads per key head): the reference maps query heads to value
    # heads by their order, which folding rows would break; attend per row instead.
    repeat = lambda x: jnp.repeat(x, r, axis=0)
    out, lse = reference.decode_attention(_grouped(query, k), repeat(keys), repeat(values),
                                          repeat(key_positions), after, upcast=False)[:2]
    return out.astype(jnp.float32), lse
  folded = query.reshape(g, r, k, per_kv, d).transpose(0, 2, 1, 3, 4).reshape(
      g, k, r * per_kv, d)
  if _kernels_for(query, values):
    out, lse = decode_kernels.decode_attention(folded, keys, values, key_positions, after[:g])
  else:
    out, lse = reference.decode_attention(folded, keys, values, key_positions, after[:g],
                                          upcast=False)[:2]
  unfold = lambda x: jnp.swapaxes(x.reshape((g, k, r, per_kv) + x.shape[3:]), 1, 2).reshape(
      (rows, k, per_kv) + x.shape[3:])
  return unfold(out.astype(jnp.float32)), unfold(lse)


def with_pending_token(query, out, lse, probs, new_key, new_value):
  """Adds a token held outside the cache (its own key and value) to a decode attention.

  query [B, 1, H, D]; out [B, 1, H, D], lse [B, K, G] and probs [B, K, G, S] from `decode`
  over the cache; new_key/new_value [B, K, 1, D]. Returns (out [B, 1, H, D], cache probs
  [B, H, S], the new token's own probability [B, H]), merged by log-sum-exp.
  """
  b, _, h, d = query.shape
  k = new_key.shape[1]
  grouped = _grouped(query, k)
  own_logit = jnp.einsum("bkgd,bkd->bkg", grouped.astype(jnp.float32),
                         new_key[:, :, 0].astype(jnp.float32)) * (d ** -0.5)
  own_out = reference.weighted_values(jnp.ones(grouped.shape[:3] + (1,), jnp.float32),
                                      new_value, d, lambda p, v: p * v[:, :, None, 0])
  merged, total = merge_partials(out.reshape(grouped.shape).astype(jnp.float32), lse,
                                 own_out.astype(jnp.float32), own_logit)
  cache_weight = jnp.exp(lse - total)
  probs = after_reading(probs * cache_weight[..., None], merged[..., :1])
  return (merged.reshape(b, 1, h, d).astype(query.dtype), probs.reshape(b, h, -1),
          jnp.exp(own_logit - total).reshape(b, h))


def after_reading(x, read):
  """`x` unchanged (for x >= +0 or NaN, of a float or signed dtype), made to depend on
  `read` (broadcastable to x) as data: max(x, s - 1), s read's sign bits. A decode-time
  eviction overwrites cache slots in place; XLA orders that write after the reads of the
  same buffers (the attention's) only through data dependencies, and otherwise copies the
  buffers first (each layer's values and positions twice per step: about 20% of a
  2K-slot SmolLM2 H2O step). So the attention's probabilities depend on its output, and
  the written slot on the probabilities, each row (and head) on its own: a dependency
  across rows would be a collective when rows are sharded."""
  sign = jax.lax.shift_right_logical(
      jax.lax.bitcast_convert_type(read.astype(jnp.float32), jnp.int32), 31)
  return jnp.maximum(x, (sign - 1).astype(x.dtype))


def vertical_slash(queries, keys, values, query_positions, key_positions, vertical, slash,
                   max_vertical: int, max_slash: int, query_block: int):
  """[B, T, H, D]: causal attention of every query over its head's chosen vertical lines
  (vertical [B, H, S] by key position) and slash lines (slash [B, H, S] by offset), at
  most max_vertical / max_slash of each (`reference.vertical_slash_attention`); key
  positions below S (one prompt's cache). The kernel where kernels run (a row's real
  queries at consecutive positions, as a prefill chunk's are); else the jnp gathers,
  `query_block` queries at a time (their memory is block x lines x D per head)."""
  if _kernels_for(queries, values):
    kernel = functools.partial(vs_kernels.vertical_slash_attention, max_vertical=max_vertical,
                               max_slash=max_slash)
    return per_shard(kernel, ("b.h", "bk", "bk", "b", "bk", "bh", "bh"), "b.h")(
        queries, keys, values, query_positions, key_positions, vertical, slash)
  t = queries.shape[1]
  block = min(query_block, t)
  padded = -(-t // block) * block
  q = jnp.pad(queries, ((0, 0), (0, padded - t), (0, 0), (0, 0)))
  qpos = jnp.pad(query_positions, ((0, 0), (0, padded - t)), constant_values=-1)
  split = lambda a: jnp.moveaxis(a.reshape((a.shape[0], -1, block) + a.shape[2:]), 1, 0)
  out = jax.lax.map(lambda qp: reference.vertical_slash_attention(
      qp[0], keys, values, qp[1], key_positions, vertical, slash, max_vertical, max_slash),
      (split(q), split(qpos)))                                  # [n, B, block, H, D]
  return jnp.moveaxis(out, 0, 1).reshape(queries.shape[0], padded, *queries.shape[2:])[:, :t]


def window_column_sums(queries, keys, query_positions, key_positions, window: int):
  """[B, H, S]: attention of the last `window` queries summed per key slot."""
  window = min(window, queries.shape[1])
  q, qpos = queries[:, -window:], query_positions[:, -window:]
  if use_pallas():
    sums = lambda *a: window_scores.window_scores(*a, pooling="none").sums
    return per_shard(sums, ("bh", "bk", "bk", "b"), "bh")(jnp.swapaxes(q, 1, 2), keys,
                                                          key_positions, qpos)
  probs = reference.probabilities(q.astype(jnp.float32), keys.astype(jnp.float32), qpos,
                                  key_positions)                  # [B, K, G, W, S]
  b, k, g, w, s = probs.shape
  return probs.sum(3).reshape(b, k * g, s)


def gather_slots(src: jax.Array, indices: jax.Array) -> jax.Array:
  """src [R, M, D], indices [R, N] (negative = empty) -> [R, N, D]."""
  if use_pallas():
    # Rows only: callers pass [B * K, M, D] or flat [B, K * M, D] (their head axis folded
    # away); every row gathers on its own.
    return per_shard(compaction.gather_slots, ("b", "b"), "b")(src, indices)
  return reference.gather_slots(src, indices)


def gather_head_slots(src: jax.Array, indices: jax.Array) -> jax.Array:
  """src [B, K, M, D], indices [B, K, N] (negative = empty) -> [B, K, N, D]: each head's
  slots. Unlike gather_slots on folded rows, a sharded cache's KV heads stay split (each
  shard gathers its rows' and heads' slots)."""
  def folded(src, indices):
    b, k, m, d = src.shape
    n = indices.shape[-1]
    gather = compaction.gather_slots if use_pallas() else reference.gather_slots
    return gather(src.reshape(b * k, m, d), indices.reshape(b * k, n)).reshape(b, k, n, d)
  if use_pallas():
    return per_shard(folded, ("bk", "bk"), "bk")(src, indices)
  return folded(src, indices)
