"""The method interface: frozen dataclasses of hyperparameters plus pure scoring hooks.

A method is hashable (static under jit). For each layer, at the end of a prefill chunk, the
model hands the method a `LayerInputs` (the chunk's queries, every candidate slot's key,
value and position, attention statistics) and the method returns a priority per slot; kvjax
keeps the top `budget` slots per KV head (or per layer across heads, for head-wise methods)
and compacts them into a smaller cache. Decode-time methods also score every decode step
and overwrite their lowest-priority slot with the new token, so the cache stays at budget.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig
from kvjax.errors import MethodError

PROTECTED = jnp.inf   # priority of slots that must be kept (sinks, recent window)


@dataclasses.dataclass(frozen=True)
class LayerInputs:
  """What a scorer sees for one layer at the end of a prefill chunk (arrays, not static)."""
  config: ModelConfig
  layer: int
  queries: jax.Array          # [B, T, H, D] the chunk's queries after RoPE
  raw_queries: jax.Array      # [B, T, H, D] the same before RoPE
  query_positions: jax.Array  # [B, T] int32, negative for padding
  keys: jax.Array             # [B, K, S, D] candidates: kept slots then the chunk, post-RoPE
  values: jax.Array           # [B, K, S, D]
  key_positions: jax.Array    # [B, K, S] int32, negative for empty slots
  lengths: jax.Array          # [B] tokens seen after this chunk
  column_sums: jax.Array | None = None  # [B, H, S] chunk attention summed over queries
  slot_scores: jax.Array | None = None  # [B, K, S] accumulated method state (zeros for new)
  slot_history: jax.Array | None = None  # [B, K, S] uint32 method state


@dataclasses.dataclass(frozen=True)
class Method:
  """Base of all methods.

  Class attributes say what the method needs and does:
    compresses: False only for the full cache.
    headwise: budgets are shared by the KV heads of a layer (flat per-head cache layout).
    decode_time: keeps evicting during decode so the cache never grows past its budget.
    needs_column_sums: scoring reads the chunk's attention summed over its queries.
    state: per-slot state carried in the cache: None, "scores" or "history".
  """
  name: ClassVar[str] = ""
  compresses: ClassVar[bool] = True
  headwise: ClassVar[bool] = False
  decode_time: ClassVar[bool] = False
  needs_column_sums: ClassVar[bool] = False
  state: ClassVar[str | None] = None

  def layer_budgets(self, config: ModelConfig, keep: int, context_length: int
                    ) -> tuple[int, ...]:
    """Kept slots per layer (per KV head on average) for a mean budget of `keep`."""
    del context_length
    return (keep,) * config.num_layers

  def protected_tokens(self, keep: int) -> int:
    """How many slots per head the method always keeps (sinks + window); must be <= keep."""
    del keep
    return 0

  def protected(self, key_positions: jax.Array, lengths: jax.Array, keep: int) -> jax.Array:
    """[B, K, S] bool: slots kept regardless of score."""
    del lengths, keep
    return jnp.zeros(key_positions.shape, bool)

  def score(self, x: LayerInputs) -> jax.Array:
    """[B, K, S] float32 priority: higher is kept. Empty slots are masked by the caller."""
    raise NotImplementedError(f"{type(self).__name__} does not score prefill slots")

  def prefill_state(self, x: LayerInputs):
    """(scores [B, K, S] float32 | None, history [B, K, S] uint32 | None): the per-slot
    state to carry in the cache for the `state` this method declares."""
    del x
    return None, None

  def accumulate(self, slot_scores, column_sums):
    """Per-slot scores after more queries attended (needs_column_sums methods)."""
    del column_sums
    return slot_scores

  def safeguard(self, keep: int) -> int:
    """Head-wise methods: slots every head keeps before the layer's shared top-k."""
    del keep
    return 0

  @property
  def label(self) -> str:
    """Name shown in results, e.g. adakv(snapkv)."""
    return self.name

  # Decode-time hooks (decode_time methods only).
  def decode_scores(self, scores, history, probs, own_prob, key_positions, lengths):
    """Updates per-slot state after one decode step.

    probs [B, H, S]: the new query's attention over the cache slots; own_prob [B, H]: its
    attention to itself. Returns (slot scores, slot history, new token's score, new token's
    history); any of them may be None when the method keeps no such state.
    """
    raise NotImplementedError

  def eviction_priority(self, scores, history, probs, key_positions, lengths, capacity):
    """[B, K, S] priority of the cached slots for this step (lowest is overwritten)."""
    raise NotImplementedError


def window_mask(key_positions: jax.Array, lengths: jax.Array, window: int) -> jax.Array:
  """Slots among the last `window` positions of each row."""
  return (key_positions >= 0) & (key_positions >= lengths[:, None, None] - window)


def sink_mask(key_positions: jax.Array, sinks: int) -> jax.Array:
  """Slots holding the first `sinks` positions."""
  return (key_positions >= 0) & (key_positions < sinks)


def reduce_groups(x: jax.Array, num_kv_heads: int, how: str = "mean") -> jax.Array:
  """[B, H, S] per query head -> [B, K, S] per KV head."""
  b, h, s = x.shape
  grouped = x.reshape(b, num_kv_heads, h // num_kv_heads, s)
  if how == "mean":
    return grouped.mean(2)
  if how == "max":
    return grouped.max(2)
  if how == "sum":
    return grouped.sum(2)
  raise ValueError(f"gqa={how!r}; allowed: 'mean', 'max', 'sum'")


def pool1d(x: jax.Array, kernel_size: int, pooling: str) -> jax.Array:
  """Centred 1-D pooling along the last axis, stride 1, padding kernel_size // 2.

  "avg" counts the zero padding (torch avg_pool1d's default), "max" ignores it.
  """
  if pooling == "none" or kernel_size == 1:
    return x
  pad = kernel_size // 2
  if pooling == "max":
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) * (x.ndim - 1) + (kernel_size,),
                                 (1,) * x.ndim, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
  if pooling == "avg":
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1,) * (x.ndim - 1) + (kernel_size,),
                                   (1,) * x.ndim, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
    return summed / kernel_size
  raise ValueError(f"pooling={pooling!r}; allowed: 'max', 'avg', 'none'")


def window_attention(x: LayerInputs, window: int) -> jax.Array:
  """[B, H, W, S] softmax of the chunk's last `window` queries over all candidate slots.

  Only W x S, not T x S, in float32. Padding queries give all-zero rows.
  """
  from kvjax.model import attention
  q = x.queries[:, -window:].astype(jnp.float32)
  probs = attention.probabilities(q, x.keys.astype(jnp.float32), x.query_positions[:, -window:],
                                  x.key_positions)                # [B, K, G, W, S]
  b, k, g, w, s = probs.shape
  return probs.reshape(b, k * g, w, s)


def check_choice(name: str, value, allowed) -> None:
  if value not in allowed:
    raise MethodError(f"{name}={value!r}; allowed: {list(allowed)}")


def check_fraction(name: str, value, low_open: bool = False) -> None:
  ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and (
      (0 < value <= 1) if low_open else (0 <= value <= 1))
  if not ok:
    raise MethodError(f"{name}={value!r} must be a number in {'(0, 1]' if low_open else '[0, 1]'}")


def check_int(name: str, value, low: int, high: int | None = None) -> None:
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low
  if ok and high is not None:
    ok = value <= high
  if not ok:
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise MethodError(f"{name}={value!r} must be an integer {bound}")
