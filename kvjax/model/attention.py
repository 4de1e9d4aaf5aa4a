"""Grouped-query attention of new queries over a cache's slots, masked by slot positions.

These are the jnp paths (CPU, and the references the Pallas kernels are checked against).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so fully masked rows (padding queries) give a harmless uniform softmax, never NaN.
MASK_VALUE = -1e30
QUERY_BLOCK = 512


def visible(query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
  """[..., T, S] a slot at key position k is seen by a query at position q iff 0 <= k <= q."""
  kpos = key_positions[..., None, :]
  return (kpos >= 0) & (kpos <= query_positions[..., :, None])


def attend(queries: jax.Array, keys: jax.Array, values: jax.Array, query_positions: jax.Array,
           key_positions: jax.Array, column_sums: bool = False):
  """Causal attention by original positions.

  queries [B, T, H, D]; keys/values [B, K, S, D]; query_positions [B, T];
  key_positions [B, K, S] (negative = empty slot). A query at position p sees the valid slots
  with position <= p. Long query chunks are processed in blocks so memory stays
  O(block * S) instead of O(T * S).
  With column_sums, also returns [B, H, S] float32: each key's attention probability summed
  over the (non-padding) queries, the statistic accumulated-attention methods need.
  """
  t = queries.shape[1]
  if t <= QUERY_BLOCK or t % QUERY_BLOCK:
    out, sums = _attend_block(queries, keys, values, query_positions, key_positions)
    return (out, sums) if column_sums else out
  blocks = t // QUERY_BLOCK
  split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], blocks, QUERY_BLOCK, *x.shape[2:]), 1, 0)

  def block(carry, qp):
    out, sums = _attend_block(qp[0], keys, values, qp[1], key_positions)
    return carry + sums, out

  zero = jnp.zeros((queries.shape[0], queries.shape[2], keys.shape[2]), jnp.float32)
  sums, out = jax.lax.scan(block, zero, (split(queries), split(query_positions)))
  out = jnp.moveaxis(out, 0, 1).reshape(queries.shape)
  return (out, sums) if column_sums else out


def probabilities(queries: jax.Array, keys: jax.Array, query_positions: jax.Array,
                  key_positions: jax.Array) -> jax.Array:
  """[B, K, G, T, S] float32 causal softmax of queries [B, T, H, D] over keys [B, K, S, D].

  Products in the input dtype, softmax in float32, as HF does (XLA:CPU has no
  bf16 x bf16 -> f32 dot, and GPUs accumulate bf16 dots in f32 anyway). Invisible entries
  are 0, so padding queries see nothing and count nothing.
  """
  b, t, h, d = queries.shape
  k = keys.shape[1]
  grouped = queries.reshape(b, t, k, h // k, d)
  scores = jnp.einsum("btkgd,bksd->bkgts", grouped, keys).astype(jnp.float32) * (d ** -0.5)
  seen = visible(query_positions[:, None, None, :], key_positions[:, :, None, :])
  probs = jax.nn.softmax(jnp.where(seen, scores, MASK_VALUE), axis=-1)
  return jnp.where(seen, probs, 0.0)


def _attend_block(queries, keys, values, query_positions, key_positions):
  b, t, h, d = queries.shape
  probs = probabilities(queries, keys, query_positions, key_positions)
  out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(values.dtype), values)
  return out.reshape(b, t, h, d).astype(queries.dtype), probs.sum(3).reshape(b, h, -1)


def attend_flat(queries: jax.Array, keys: jax.Array, values: jax.Array,
                query_positions: jax.Array, key_positions: jax.Array, key_heads: jax.Array,
                num_kv_heads: int):
  """Attention over a head-wise (flat) cache: keys/values [B, N, D], key_positions and
  key_heads [B, N]. Query head group k sees only the slots its KV head owns.
  """
  b, t, h, d = queries.shape
  k = num_kv_heads
  g = h // k
  grouped = queries.reshape(b, t, k, g, d)
  scores = jnp.einsum("btkgd,bnd->bkgtn", grouped, keys).astype(jnp.float32) * (d ** -0.5)
  own = key_heads[:, None, :] == jnp.arange(k, dtype=key_heads.dtype)[None, :, None]
  seen = visible(query_positions[:, None, None, :], key_positions[:, None, None, :])
  seen = seen & own[:, :, None, None, :]
  probs = jax.nn.softmax(jnp.where(seen, scores, MASK_VALUE), axis=-1)
  probs = jnp.where(seen, probs, 0.0)
  out = jnp.einsum("bkgtn,bnd->btkgd", probs.astype(values.dtype), values)
  return out.reshape(b, t, h, d).astype(queries.dtype)


def attend_with_new_token(query: jax.Array, keys: jax.Array, values: jax.Array,
                          query_positions: jax.Array, key_positions: jax.Array,
                          new_key: jax.Array, new_value: jax.Array):
  """Decode attention of one new token over the cache plus its own key/value.

  The new token is kept outside the cache (a decode-time method decides which slot it
  replaces after seeing these probabilities). query [B, 1, H, D]; new_key/new_value
  [B, K, 1, D]. Returns (out [B, 1, H, D], cache probs [B, H, S], own prob [B, H]).
  """
  b, _, h, d = query.shape
  k = keys.shape[1]
  grouped = query.reshape(b, k, h // k, d)
  scale = d ** -0.5
  scores = jnp.einsum("bkgd,bksd->bkgs", grouped, keys).astype(jnp.float32) * scale
  own = jnp.einsum("bkgd,bkd->bkg", grouped, new_key[:, :, 0]).astype(jnp.float32) * scale
  seen = visible(query_positions[:, None, None, :], key_positions[:, :, None, :])[..., 0, :]
  scores = jnp.where(seen, scores, MASK_VALUE)
  top = jnp.maximum(scores.max(-1), own)
  weights = jnp.where(seen, jnp.exp(scores - top[..., None]), 0.0)
  own_weight = jnp.exp(own - top)
  total = weights.sum(-1) + own_weight
  probs, own_prob = weights / total[..., None], own_weight / total
  out = (jnp.einsum("bkgs,bksd->bkgd", probs.astype(values.dtype), values)
         + own_prob[..., None].astype(values.dtype) * new_value[:, :, 0][:, :, None, :])
  return (out.reshape(b, 1, h, d).astype(query.dtype), probs.reshape(b, h, -1),
          own_prob.reshape(b, h))
