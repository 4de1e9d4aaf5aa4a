"""Chooses between the Pallas kernels (GPU/TPU) and their jnp paths (CPU) for the model.

KVJAX_PALLAS=1 forces the kernels (in interpret mode on CPU, for tests); =0 forces jnp.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp


def use_pallas() -> bool:
  forced = os.environ.get("KVJAX_PALLAS")
  if forced is not None:
    return forced not in ("0", "false", "")
  return jax.default_backend() in ("gpu", "tpu")


def window_column_sums(x, window: int) -> jax.Array:
  """[B, H, S]: attention of the chunk's last `window` queries summed per key slot."""
  window = min(window, x.queries.shape[1])
  if use_pallas():
    from pallas_kernels import window_scores
    q = jnp.swapaxes(x.queries[:, -window:], 1, 2)  # [B, H, W, D]
    return window_scores.window_scores(q, x.keys, x.key_positions,
                                       x.query_positions[:, -window:], pooling="none").sums
  from kvjax.methods import base
  return base.window_attention(x, window).sum(2)


def gather_slots(src: jax.Array, indices: jax.Array) -> jax.Array:
  """src [R, M, D], indices [R, N] (negative = empty) -> [R, N, D]."""
  if use_pallas():
    from pallas_kernels import compaction
    return compaction.gather_slots(src, indices)
  picked = jnp.take_along_axis(src, jnp.maximum(indices, 0)[..., None], axis=1)
  return jnp.where(indices[..., None] >= 0, picked, 0).astype(src.dtype)


def _grouped(query, num_kv_heads):
  b, _, h, d = query.shape
  return query.reshape(b, num_kv_heads, h // num_kv_heads, d)


def decode_attend(query, keys, values, query_positions, key_positions):
  """One new token (query [B, 1, H, D]) over a dense cache -> [B, 1, H, D]."""
  from pallas_kernels import decode_attention
  out, _ = decode_attention.decode_attention(_grouped(query, keys.shape[1]), keys, values,
                                             key_positions, query_positions[:, 0])
  return out.reshape(query.shape).astype(query.dtype)


def decode_attend_flat(query, keys, values, query_positions, key_positions, key_heads,
                       num_kv_heads):
  """One new token over a head-wise (flat) cache -> [B, 1, H, D]."""
  from pallas_kernels import decode_attention
  out, _ = decode_attention.decode_attention_flat(
      _grouped(query, num_kv_heads), keys, values, key_positions, key_heads,
      query_positions[:, 0])
  return out.reshape(query.shape).astype(query.dtype)


def decode_attend_with_new_token(query, keys, values, query_positions, key_positions,
                                 new_key, new_value):
  """The kernel over the cache, merged by log-sum-exp with the new token's own key.

  Same contract as attention.attend_with_new_token: (out, cache probs [B, H, S], own [B, H]).
  """
  from pallas_kernels import decode_attention
  b, _, h, d = query.shape
  k = keys.shape[1]
  grouped = _grouped(query, k)
  out, lse, probs = decode_attention.decode_attention(grouped, keys, values, key_positions,
                                                      query_positions[:, 0], return_probs=True)
  own_logit = jnp.einsum("bkgd,bkd->bkg", grouped.astype(jnp.float32),
                         new_key[:, :, 0].astype(jnp.float32)) * (d ** -0.5)
  total = jnp.logaddexp(lse, own_logit)
  cache_weight, own = jnp.exp(lse - total), jnp.exp(own_logit - total)
  merged = (out.astype(jnp.float32) * cache_weight[..., None]
            + own[..., None] * new_value[:, :, 0][:, :, None, :].astype(jnp.float32))
  return (merged.reshape(b, 1, h, d).astype(query.dtype),
          (probs * cache_weight[..., None]).reshape(b, h, -1), own.reshape(b, h))
