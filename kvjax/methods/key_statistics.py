"""Attention-free scorers: key norms (Knorm) and Expected Attention."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.methods import base, registry
from kvjax.ops import rope


@registry.register
@dataclasses.dataclass(frozen=True)
class Knorm(base.Method):
  """Keeps the keys with the smallest L2 norm (they tend to draw the most attention).

  RoPE preserves norms, so post-RoPE keys score like pre-RoPE ones. No protected tokens,
  as in kvpress; wrap with SinksWindow for chat use.
  """
  name: ClassVar[str] = "knorm"
  layerwise_prefill: ClassVar[bool] = True

  def score(self, x):
    return -jnp.linalg.norm(x.keys.astype(jnp.float32), axis=-1)


def average_rotation(inv_freq: np.ndarray, start: jax.Array, count: int) -> jax.Array:
  """[B, D, D] mean of the RoPE rotation matrices for positions start .. start + count - 1.

  Rotate-half convention: R_p = diag(cos_p) + diag(sin_p) P, with P x = rotate_half(x).
  """
  half = inv_freq.shape[0]
  offsets = jnp.arange(count, dtype=jnp.float32)
  angles = (start[:, None].astype(jnp.float32) + offsets)[..., None] * inv_freq  # [B, n, D/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, -1).mean(1)                       # [B, D]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, -1).mean(1)
  eye = jnp.eye(half)
  zero = jnp.zeros((half, half))
  rotate_half = jnp.block([[zero, -eye], [eye, zero]])                           # [D, D]
  return cos[:, :, None] * jnp.eye(2 * half) + sin[:, :, None] * rotate_half


@registry.register
@dataclasses.dataclass(frozen=True)
class ExpectedAttention(base.Method):
  """Expected Attention (kvpress): the attention future queries are expected to pay.

  Future pre-RoPE queries are modelled as a Gaussian fitted to the chunk's own queries
  (the first `n_sink` tokens left out), rotated by the mean RoPE rotation of the next
  `n_future_positions` positions. Per key: z = mu.k / sqrt(d) + k^T Sigma k / (2 d), softmax
  over keys, mean over each group's query heads, times ||v|| when use_vnorm. Sinks are kept.
  """
  name: ClassVar[str] = "expected_attention"
  layerwise_prefill: ClassVar[bool] = True
  n_future_positions: int = 512
  n_sink: int = 4
  use_covariance: bool = True
  use_vnorm: bool = True
  epsilon: float = 0.0

  def __post_init__(self):
    base.check_int("n_future_positions", self.n_future_positions, 1)
    base.check_int("n_sink", self.n_sink, 0)

  def protected_tokens(self, keep):
    return self.n_sink

  def fitted(self, keep):
    """Under a budget of at most n_sink, the sinks shrink to budget - 1."""
    shrunk = base.shrink_protection(keep, n_sink=(self.n_sink, 0))
    return dataclasses.replace(self, **shrunk) if shrunk else self

  def protected(self, key_positions, lengths, keep):
    return base.sink_mask(key_positions, self.n_sink)

  def score(self, x):
    q = x.raw_queries.astype(jnp.float32)                            # [B, T, H, D]
    b, t, h, d = q.shape
    k = x.keys.shape[1]
    use = ((x.query_positions >= self.n_sink)[..., None, None]).astype(jnp.float32)
    count = jnp.maximum(use.sum(1), 1.0)                              # [B, 1, 1]
    mean = (q * use).sum(1) / count                                   # [B, H, D]
    rotation = average_rotation(rope.inverse_frequencies(x.config), x.lengths,
                                self.n_future_positions)              # [B, D, D]
    rotated_mean = jnp.einsum("bij,bhj->bhi", rotation, mean)
    keys = jnp.repeat(x.keys.astype(jnp.float32), h // k, axis=1)     # [B, H, S, D]
    logits = jnp.einsum("bhd,bhsd->bhs", rotated_mean, keys) / np.sqrt(d)
    if self.use_covariance:
      centred = (q - mean[:, None]) * use
      cov = jnp.einsum("bthi,bthj->bhij", centred, centred) / count[..., None]
      cov = jnp.einsum("bij,bhjk,blk->bhil", rotation, cov, rotation)
      logits += jnp.einsum("bhsi,bhij,bhsj->bhs", keys, cov, keys) / d / 2
    candidates = (x.key_positions >= self.n_sink)
    candidates = jnp.repeat(candidates, h // k, axis=1)
    probs = jax.nn.softmax(jnp.where(candidates, logits, -1e30), axis=-1)
    scores = base.reduce_groups(jnp.where(candidates, probs, 0.0), k, "mean")
    if self.use_vnorm:
      scores = (scores + self.epsilon) * jnp.linalg.norm(x.values.astype(jnp.float32), axis=-1)
    return scores
