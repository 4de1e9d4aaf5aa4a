"""Next-token selection: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from kvjax import validation


def _per_row(key: jax.Array) -> bool:
  """[B] typed keys (one per row), as opposed to one key (typed, or a legacy uint32[2])."""
  return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
           greedy: bool) -> jax.Array:
  """logits [B, V] -> token ids [B]. temperature/top_p are traced so changing them is free.

  `key` is one key for the batch, or [B] keys, one per row: a row then draws exactly what
  one key draws for a batch of that row alone, whatever else is in the batch (the server's
  requests sample as `generate` does for each prompt alone)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = top_p_filter(logits.astype(jnp.float32) / temperature, top_p)
  if _per_row(key):
    draw = lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0]
    return jax.vmap(draw)(key, filtered).astype(jnp.int32)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def step_key(key: jax.Array, step: jax.Array) -> jax.Array:
  """The key of sampling step `step`: fold_in(key, step), row by row for [B] keys and
  steps ([B] or one for all)."""
  if _per_row(key):
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


def key_of(seed: int) -> jax.Array:
  """The sampling key of an int64 seed. jax.random.key keeps only a seed's low 32 bits
  (without x64), so seeds 2**32 apart would share a stream: the high half is folded in.
  Seeds whose high half is a sign extension (-2**32 <= seed < 2**32) keep jax's key."""
  high = int(seed) >> 32
  key = jax.random.key(int(seed) & 0xFFFFFFFF)
  return key if high in (0, -1) else jax.random.fold_in(key, high & 0xFFFFFFFF)


def keys_of(seed: int | Sequence[int]) -> jax.Array:
  """key_of(seed), or [B] keys, one per row, for a sequence of seeds."""
  if isinstance(seed, (list, tuple)):
    return jnp.stack([key_of(s) for s in seed])
  return key_of(seed)
