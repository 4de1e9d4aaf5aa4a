"""Rotary position embeddings in the Hugging Face (rotate-half) layout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig, RopeScaling


def inverse_frequencies(config: ModelConfig, dim: int | None = None) -> np.ndarray:
  """[dim // 2] float32 inverse frequencies of `dim` rotated dimensions (head_dim by
  default), with Llama-3.1 scaling if configured."""
  dim = config.head_dim if dim is None else dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if config.rope_scaling is not None:
    inv_freq = _llama3_scale(inv_freq, config.rope_scaling)
  return inv_freq.astype(np.float32)


def _llama3_scale(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
  # Long wavelengths are slowed by `factor`, short ones kept, and the band between blended.
  low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  blended = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(medium, blended, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray,
               inverse: bool = False) -> jax.Array:
  """Rotates x [B, T, heads, D] by positions [B, T] (negative positions are padding);
  inverse=True undoes that rotation."""
  angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  return _rotate(x, angles[:, :, None, :], inverse)


def shift_rope(x: jax.Array, offsets: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Moves already-rotated keys x [..., D] by `offsets` positions (broadcastable to
  x.shape[:-1], any sign): a key rotated for position p becomes the key for p + offset,
  since rotations by angles a and b compose to a + b."""
  angles = jnp.asarray(offsets, jnp.float32)[..., None] * inv_freq
  return _rotate(x, angles, inverse=False)


# XLA:CPU fuses cos and sin into each element that reads them, so a prefill chunk's
# rotation computed them once per head and dimension, not once per token: for 2K tokens
# and 9 query heads 4.1 ms instead of 1.0 ms, and one SmolLM2 prefill layer took 5-8%
# longer. From this many angles on (batch included), when lowered for CPU, the tables come
# out of a conditional whose two branches compute the same tables: XLA writes a
# conditional's results to memory before their readers run (`lax.optimization_barrier`
# does not stop the fusion: XLA:CPU drops it first). On a CPU mesh the predicate, read
# from one angle, costs one scalar all-reduce per call.
MATERIALISED_ANGLES = 1024


def _cos_sin(angles: jax.Array) -> tuple[jax.Array, jax.Array]:
  fused = lambda a: (jnp.cos(a), jnp.sin(a))
  # A symbolic size (shape-polymorphic export) keeps the fused form.
  if not isinstance(angles.size, int) or angles.size < MATERIALISED_ANGLES:
    return fused(angles)
  materialised = lambda a: jax.lax.cond(jnp.isfinite(a.reshape(-1)[0]), fused, fused, a)
  return jax.lax.platform_dependent(angles, cpu=materialised, default=fused)


def _rotate(x: jax.Array, angles: jax.Array, inverse: bool) -> jax.Array:
  """The rotate-half rotation of x [..., D] by angles [..., D/2] (broadcast)."""
  cos, sin = _cos_sin(angles)
  if inverse:
    sin = -sin
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
