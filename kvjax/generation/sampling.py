"""Next-token selection: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from kvjax import validation


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
           greedy: bool) -> jax.Array:
  """logits [B, V] -> token ids [B]. temperature/top_p are traced so changing them is free.

  `key` is one key for the batch, or [B] keys, one per row: a row then draws exactly what
  one key draws for a batch of that row alone, whatever else is in the batch (the server's
  requests sample as `generate` does for each prompt alone)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = top_p_filter(logits.astype(jnp.float32) / temperature, top_p)
  if key.ndim == 1:
    draw = lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0]
    return jax.vmap(draw)(key, filtered).astype(jnp.int32)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def step_key(key: jax.Array, step: jax.Array) -> jax.Array:
  """The key of sampling step `step`: fold_in(key, step), row by row for [B] keys and
  steps ([B] or one for all)."""
  if key.ndim == 1:
    return jax.vmap(jax.random.fold_in)(key, jnp.broadcast_to(step, key.shape))
  return jax.random.fold_in(key, step)


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


def offset_seed(seed: int, offset: int) -> int:
  """seed + offset wrapped into the int64 seeds jax.random.key takes: the seed of the
  `offset`-th request of a batch or server seeded with `seed`."""
  span = validation.INT64_MAX - validation.INT64_MIN + 1
  return (seed + offset - validation.INT64_MIN) % span + validation.INT64_MIN


def keys_of(seed: int | Sequence[int]) -> jax.Array:
  """jax.random.key(seed), or [B] keys, one per row, for a sequence of seeds."""
  if isinstance(seed, (list, tuple)):
    return jnp.stack([jax.random.key(s) for s in seed])
  return jax.random.key(seed)
