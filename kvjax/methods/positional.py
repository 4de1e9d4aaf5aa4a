"""StreamingLLM: attention sinks plus a window of the most recent tokens."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.methods import base, registry


@registry.register
@dataclasses.dataclass(frozen=True)
class StreamingLLM(base.Method):
  """Keeps the first `sinks` tokens and the most recent `budget - sinks` tokens.

  Keys keep their original positions (the LongBench-style baseline), so no re-rotation.
  As a decode-time method it evicts the oldest non-sink slot for every new token.
  """
  name: ClassVar[str] = "streaming_llm"
  layerwise_prefill: ClassVar[bool] = True
  decode_time: ClassVar[bool] = True
  sinks: int = 4

  def __post_init__(self):
    base.check_int("sinks", self.sinks, 0)

  def protected_tokens(self, keep):
    return self.sinks

  def fitted(self, keep):
    """Under a budget of at most `sinks`, the sinks shrink to budget - 1 (the newest token
    keeps the last slot)."""
    shrunk = base.shrink_protection(keep, sinks=(self.sinks, 0))
    return dataclasses.replace(self, **shrunk) if shrunk else self

  def protected(self, key_positions, lengths, keep):
    return base.sink_mask(key_positions, self.sinks)

  def score(self, x):
    return x.key_positions.astype(jnp.float32)  # newest first

  def decode_scores(self, state, probs, own_prob, key_positions, lengths):
    return None, None

  def eviction_priority(self, state, probs, key_positions, lengths, budget):
    return key_positions.astype(jnp.float32)
