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
