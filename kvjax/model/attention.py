"""Grouped-query attention of new queries over a cache's slots, masked by slot positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so fully masked rows (padding queries) give a harmless uniform softmax, never NaN.
MASK_VALUE = -1e30
QUERY_BLOCK = 512


def attend(queries: jax.Array, keys: jax.Array, values: jax.Array, query_positions: jax.Array,
           key_positions: jax.Array) -> jax.Array:
  """Causal attention by original positions.

  queries [B, T, H, D]; keys/values [B, K, S, D]; query_positions [B, T];
  key_positions [B, K, S] (negative = empty slot). A query at position p sees the valid slots
  with position <= p. Long query chunks are processed in blocks so memory stays
  O(block * S) instead of O(T * S).
  """
  t = queries.shape[1]
  if t <= QUERY_BLOCK or t % QUERY_BLOCK:
    return _attend_block(queries, keys, values, query_positions, key_positions)
  blocks = t // QUERY_BLOCK
  split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], blocks, QUERY_BLOCK, *x.shape[2:]), 1, 0)
  out = jax.lax.map(
      lambda qp: _attend_block(qp[0], keys, values, qp[1], key_positions),
      (split(queries), split(query_positions)))
  return jnp.moveaxis(out, 0, 1).reshape(queries.shape)


def _attend_block(queries, keys, values, query_positions, key_positions):
  b, t, h, d = queries.shape
  k = keys.shape[1]
  grouped = queries.reshape(b, t, k, h // k, d)
  # Products in the input dtype, softmax in float32, as HF does (XLA:CPU has no
  # bf16 x bf16 -> f32 dot, and GPUs accumulate bf16 dots in f32 anyway).
  scores = jnp.einsum("btkgd,bksd->bkgts", grouped, keys).astype(jnp.float32) * (d ** -0.5)
  kpos = key_positions[:, :, None, None, :]
  visible = (kpos >= 0) & (kpos <= query_positions[:, None, None, :, None])
  probs = jax.nn.softmax(jnp.where(visible, scores, MASK_VALUE), axis=-1)
  out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(values.dtype), values)
  return out.reshape(b, t, h, d).astype(queries.dtype)
