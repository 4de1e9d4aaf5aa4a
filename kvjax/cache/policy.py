"""What the model asks of a cache policy, and the policy of the uncompressed cache.

An attention block projects q/k/v, applies RoPE and then, for its layer:
  layer_cache, pending, want = policy.prepare(layer, layer_cache, new)
  out, stats = layer_cache.attend(queries, positions, pending, want)
  layer_cache = policy.update(layer, layer_cache, step, stats)
and after the last layer `policy.finish(layers, lengths)` builds the cache (or caches) the
forward pass returns: the place for cache-wide (cross-layer) steps. A policy may also have
`begin(layers, tokens)`, run on the cache's layers before the first layer for a chunk of
`tokens` tokens (`begin`: the identity for a policy without one). Policies are frozen,
hashable objects (static under jit); compression policies live with the methods.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from kvjax.cache.kv_cache import Cache, NewTokens
from kvjax.cache.quantized import flush_ahead
from kvjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LayerStep:
  """One layer's view of a forward chunk, for a policy's update."""
  config: ModelConfig
  queries: jax.Array       # [B, T, H, D] post-RoPE
  raw_queries: jax.Array   # [B, T, H, D] pre-RoPE
  new: NewTokens
  lengths: jax.Array       # [B] tokens seen after this chunk
  params: Any = None       # the policy's traced parameters (trained selectors)


@dataclasses.dataclass(frozen=True)
class Append:
  """The uncompressed cache: new tokens are stored, then attended with everything else."""

  def begin(self, layers: tuple, tokens: int) -> tuple:
    # Every layer appends the chunk: residual windows flush all layers at once.
    return flush_ahead(layers, tokens)

  def prepare(self, layer: int, layer_cache, new: NewTokens):
    del layer
    return layer_cache.append(new), None, frozenset()

  def update(self, layer: int, layer_cache, step: LayerStep, stats):
    del layer, step
    # A layer that changed while attending (an offload tier's buffer, SentenceKV's query
    # sum) is kept.
    return layer_cache if stats.layer is None else stats.layer

  def finish(self, layers: tuple, lengths: jax.Array) -> Cache:
    return Cache(layers=tuple(layers), lengths=lengths)


APPEND = Append()


def begin(policy, layers: tuple, tokens: int) -> tuple:
  """`policy.begin(layers, tokens)`, or the layers as they are for a policy without one."""
  step = getattr(policy, "begin", None)
  return layers if step is None else step(layers, tokens)
