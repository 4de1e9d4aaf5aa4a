"""Next-token selection: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
           greedy: bool) -> jax.Array:
  """logits [B, V] -> token ids [B]. temperature/top_p are traced so changing them is free."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits.astype(jnp.float32) / temperature
  return jax.random.categorical(key, top_p_filter(scaled, top_p), axis=-1).astype(jnp.int32)


def top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """Keeps the smallest set of tokens whose probability mass reaches top_p (at least one)."""
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = mass_before < top_p
  keep = jnp.zeros_like(keep_sorted).at[
      jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)
