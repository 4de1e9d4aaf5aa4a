"""Attention-driven eviction that continues during decode: H2O, TOVA, Scissorhands.

These methods score with the attention probabilities of every step, so they keep the cache
at its budget during generation: each decode step overwrites the lowest-priority slot with
the new token (slot overwrite, no compaction), whose original position is stored with it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.methods import base, budgets, registry
from kvjax.ops import attention as attention_ops


@registry.register
@dataclasses.dataclass(frozen=True)
class H2O(base.Method):
  """Heavy hitters: accumulated attention (summed over every query so far) plus recent tokens.

  recent_ratio: fraction of the budget held by the most recent tokens (H2O's default splits
  the budget evenly between heavy hitters and recent tokens). GQA: a KV head's score is the
  sum over its query heads.
  """
  name: ClassVar[str] = "h2o"
  layerwise_prefill: ClassVar[bool] = True
  decode_time: ClassVar[bool] = True
  needs: ClassVar[frozenset] = frozenset({"column_sums"})
  recent_ratio: float = 0.5

  def __post_init__(self):
    base.check_fraction("recent_ratio", self.recent_ratio)

  def recent(self, keep):
    return budgets.share(keep, self.recent_ratio)

  def traces_budget(self, keep):
    return budgets.shares_alike(keep, self.recent_ratio)

  def protected_tokens(self, keep):
    return self.recent(keep)

  def protected(self, key_positions, lengths, keep):
    return base.window_mask(key_positions, lengths, self.recent(keep))

  def init_state(self, shape):
    return jnp.zeros(shape, jnp.float32)  # accumulated attention per slot

  def accumulate(self, state, column_sums):
    k = state.shape[1]
    return state + base.reduce_groups(column_sums, k, "sum")

  def score(self, x):
    state = x.slot_state if x.slot_state is not None else self.init_state(
        x.key_positions.shape)
    return self.accumulate(state, x.column_sums)

  def prefill_state(self, x):
    return self.score(x)

  def decode_scores(self, state, probs, own_prob, key_positions, lengths):
    k = state.shape[1]
    new = base.reduce_groups(own_prob[..., None], k, "sum")[..., 0]
    return self.accumulate(state, probs), new

  def eviction_priority(self, state, probs, key_positions, lengths, budget):
    return state


@registry.register
@dataclasses.dataclass(frozen=True)
class TOVA(base.Method):
  """Token Omission Via Attention: drop the token the current query attends to least,
  averaged over all query heads of the layer (one kept set shared by every KV head).

  The newest token is always kept (as kvpress does), so each decode step evicts one cached
  slot in its favour.
  """
  name: ClassVar[str] = "tova"
  layerwise_prefill: ClassVar[bool] = True
  decode_time: ClassVar[bool] = True

  def protected_tokens(self, keep):
    return 1

  def protected(self, key_positions, lengths, keep):
    return base.window_mask(key_positions, lengths, 1)

  @staticmethod
  def _layer_mean(probs, k):
    mean = probs.mean(1, keepdims=True)                       # [B, 1, S]
    return jnp.broadcast_to(mean, (probs.shape[0], k, probs.shape[2]))

  def score(self, x):
    probs = base.window_attention(x, 1)[:, :, 0]              # last query: [B, H, S]
    return self._layer_mean(probs, x.keys.shape[1])

  def decode_scores(self, state, probs, own_prob, key_positions, lengths):
    return None, None

  def eviction_priority(self, state, probs, key_positions, lengths, budget):
    return self._layer_mean(probs, key_positions.shape[1])


def _popcount(x: jax.Array) -> jax.Array:
  return jax.lax.population_count(x).astype(jnp.int32)


@registry.register
@dataclasses.dataclass(frozen=True)
class Scissorhands(base.Method):
  """Persistence of importance: evict the tokens most often attended below uniform.

  Each slot keeps a bit history of the last `history_window` steps (1 = the KV head's mean
  attention over its query heads was below 1/n, n = visible tokens). Priority is minus the
  number of such steps; the last `recent` tokens and the first `sinks` tokens are protected.
  At the end of prefill the history comes from the prompt's last `history_window` queries.
  One slot is replaced per decode step (the paper's amortised drop of m slots at once picks
  the same victims in order; kvjax's slot overwrite needs no batch drop).
  """
  name: ClassVar[str] = "scissorhands"
  layerwise_prefill: ClassVar[bool] = True
  decode_time: ClassVar[bool] = True
  history_window: int = 32
  recent: int = 32
  sinks: int = 4

  def __post_init__(self):
    base.check_int("history_window", self.history_window, 1, 32)
    base.check_int("recent", self.recent, 1)
    base.check_int("sinks", self.sinks, 0)

  def protected_tokens(self, keep):
    return self.recent + self.sinks

  def fitted(self, keep):
    """Under a budget of at most recent + sinks, both shrink in proportion to budget - 1
    (at least 1 recent token)."""
    shrunk = base.shrink_protection(keep, sinks=(self.sinks, 0), recent=(self.recent, 1))
    return dataclasses.replace(self, **shrunk) if shrunk else self

  def protected(self, key_positions, lengths, keep):
    return (base.window_mask(key_positions, lengths, self.recent)
            | base.sink_mask(key_positions, self.sinks))

  def _mask(self):
    return jnp.uint32((1 << self.history_window) - 1)

  def _low_bits(self, x: base.LayerInputs) -> jax.Array:
    """[B, K, S] uint32 history bits from the chunk's last queries (newest = bit 0)."""
    rows = min(self.history_window, x.queries.shape[1])
    probs = base.window_attention(x, rows)                    # [B, H, W, S]
    b, h, w, s = probs.shape
    k = x.keys.shape[1]
    qpos = x.query_positions[:, -rows:]
    seen = attention_ops.visible(qpos[:, None, :], x.key_positions[:, :1])[:, 0]  # [B, W, S]
    count = seen.sum(-1).astype(jnp.float32)                  # visible tokens per row
    group_mean = probs.reshape(b, k, h // k, w, s).mean(2)    # [B, K, W, S]
    low = (group_mean < 1.0 / jnp.maximum(count, 1)[:, None, :, None]) & seen[:, None]
    shifts = jnp.arange(w - 1, -1, -1, dtype=jnp.uint32)      # oldest row -> highest bit
    return (low.astype(jnp.uint32) << shifts[None, None, :, None]).sum(2).astype(jnp.uint32)

  def init_state(self, shape):
    return jnp.zeros(shape, jnp.uint32)  # low-attention bit history per slot

  def prefill_state(self, x):
    rows = min(self.history_window, x.queries.shape[1])
    old = x.slot_state if x.slot_state is not None else self.init_state(x.key_positions.shape)
    return ((old << jnp.uint32(rows)) | self._low_bits(x)) & self._mask()

  def score(self, x):
    return -_popcount(self.prefill_state(x)).astype(jnp.float32)

  def decode_scores(self, history, probs, own_prob, key_positions, lengths):
    k = key_positions.shape[1]
    # Visible tokens per head (equal for every head of a dense layer; per head for AdaKV).
    seen_count = (key_positions >= 0).sum(-1).astype(jnp.float32) + 1            # [B, K]
    threshold = (1.0 / seen_count)[:, :, None]
    low = base.reduce_groups(probs, k, "mean") < threshold
    low = low & (key_positions >= 0)
    history = ((history << jnp.uint32(1)) | low.astype(jnp.uint32)) & self._mask()
    own_low = base.reduce_groups(own_prob[..., None], k, "mean")[..., 0] < threshold[..., 0]
    return history, own_low.astype(jnp.uint32)

  def eviction_priority(self, history, probs, key_positions, lengths, budget):
    return -_popcount(history).astype(jnp.float32)
