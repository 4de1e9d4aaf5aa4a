"""ThinK: query-driven key-channel pruning, stored at the kept channels only."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.cache.channel_pruned import ChannelPrunedLayerCache
from kvjax.methods import base, registry, storage


def kept_channels(head_dim: int, channel_ratio: float) -> int:
  """D' = D - floor(channel_ratio * D): ThinK prunes `int(head_dim * ratio)` channels."""
  return head_dim - int(head_dim * float(channel_ratio))


def channel_scores(queries, query_positions, keys, key_positions, window: int):
  """[B, K, D] float32 score of every key channel j of every KV head:
  sum over the head's query group and the chunk's last `window` non-padding queries of
  q_ij^2, times the mean over the head's non-empty slots of k_tj^2 (post-RoPE both).

  ThinK's score is mean_i q_ij^2 * mean_t k_tj^2 per query head; summing q^2 over a KV
  head's group chooses one channel set per KV head (what GQA storage needs), and a sum
  instead of a mean over the window only scales every channel of a head alike.
  """
  b, _, h, d = queries.shape
  k = keys.shape[1]
  q = queries[:, -window:].astype(jnp.float32)
  seen = (query_positions[:, -window:] >= 0)[:, :, None, None]
  q2 = jnp.where(seen, q * q, 0.0).sum(1).reshape(b, k, h // k, d).sum(2)     # [B, K, D]
  valid = (key_positions >= 0)[..., None]
  keys = keys.astype(jnp.float32)
  k2 = jnp.where(valid, keys * keys, 0.0).sum(2) / jnp.maximum(valid.sum(2), 1)
  return q2 * k2


@registry.register
@dataclasses.dataclass(frozen=True)
class ThinK(storage.PressedStorage):
  """ThinK: per KV head, prune the `channel_ratio` fraction of key channels with the least
  query-key energy (scored with the last `window` queries of the prefill), storing the
  context keys at the kept channels only; the last `recent` context keys and every later
  token stay full width. Values are untouched.

  Channels pruned per head: floor(channel_ratio * head_dim), ThinK's `int(d * ratio)`,
  so D' = D - floor(channel_ratio * D) are kept (at least 1, as channel_ratio < 1), as an
  ascending index. Defaults: channel_ratio 0.5 (the paper sweeps 0.4-0.6, its scripts use
  0.4), window 32 and recent 32 as in ThinK's code. `press`: a token-selecting method
  applied first (ThinK over SnapKV, as in the paper), whose kept tokens are then scored
  and pruned; it then needs a compression_ratio or budget. Chunked prefill re-scores the
  channels at every chunk over the kept slots (see `ChannelPrunedLayerCache.zero_filled`).
  """
  name: ClassVar[str] = "think"
  family: ClassVar[str] = "channels"
  channel_ratio: float = 0.5
  window: int = 32
  recent: int = 32
  press: base.Method | str | None = None

  def __post_init__(self):
    base.check_number("channel_ratio", self.channel_ratio, 0, 1, high_open=True,
                      what="the fraction of key channels pruned")
    base.check_int("window", self.window, 1)
    base.check_int("recent", self.recent, 0)
    self.resolve_press()

  def select_channels(self, x: base.LayerInputs, keys, key_positions) -> jax.Array:
    """[B, K, D'] int32 ascending: each KV head's top-D' channels by `channel_scores`."""
    d = keys.shape[-1]
    scores = channel_scores(x.queries, x.query_positions, keys, key_positions, self.window)
    _, index = jax.lax.top_k(scores, kept_channels(d, self.channel_ratio))
    return jnp.sort(index, axis=-1).astype(jnp.int32)

  def compact(self, cand, x, keep):
    """Selects tokens with the press (if any), scores the channels over the kept slots
    (ThinK scores after token eviction) and stores all but the `recent` newest slots at
    the chosen channels."""
    kept = self.kept(cand, x, keep)
    channels = self.select_channels(x, kept.keys, kept.positions)
    return ChannelPrunedLayerCache.from_dense(kept, channels, self.recent)
