"""MiniCache: adjacent layers of the deeper half share one direction per token and head."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.cache.cross_layer import Directions, MergedLayerCache, Retained
from kvjax.cache.kv_cache import Cache, LayerCache, init_layer_cache
from kvjax.methods import base, registry
from kvjax.ops import merge as merge_ops


def slerp(a: jax.Array, b: jax.Array, t: float):
  """(unit direction [..., D], angle [...] in [0, pi]) between the directions of a and b
  (float32): SLERP at t from a's direction toward b's, linear interpolation where the
  angle is ~0 (parallel vectors), renormalised to unit length."""
  ua, ub = merge_ops.unit_rows(a), merge_ops.unit_rows(b)
  angle = jnp.arccos(jnp.clip((ua * ub).sum(-1), -1.0, 1.0))
  sin = jnp.sin(angle)[..., None]
  # sin ~ 0 at angle ~ 0 (parallel: linear interpolation is exact) and at angle ~ pi
  # (opposite: SLERP is undefined and the linear mix cancels toward zero; such a token has
  # the largest angle of all, so the `retain` outliers keep it whenever they can).
  parallel = sin < 1e-6
  safe = jnp.where(parallel, 1.0, sin)
  curved = (jnp.sin((1 - t) * angle)[..., None] * ua + jnp.sin(t * angle)[..., None] * ub) / safe
  straight = (1 - t) * ua + t * ub
  return merge_ops.unit_rows(jnp.where(parallel, straight, curved)), angle


def _retained(x: jax.Array, angle: jax.Array, valid: jax.Array, count: int) -> Retained:
  """The `count` valid slots per head with the largest angle, stored exactly."""
  _, index = jax.lax.top_k(jnp.where(valid, angle, -jnp.inf), count)
  index = jnp.sort(index, axis=-1)
  ok = jnp.take_along_axis(valid, index, axis=-1)
  vectors = jnp.take_along_axis(x, index[..., None], axis=2)
  return Retained(index=jnp.where(ok, index, -1).astype(jnp.int32),
                  vectors=jnp.where(ok[..., None], vectors, 0).astype(x.dtype))


def merge_pair(a: LayerCache, b: LayerCache, *, t: float, retain: int, first: int,
               fraction: float = 0.0) -> tuple[MergedLayerCache, MergedLayerCache]:
  """Layers `first` (a) and `first + 1` (b) of one pair, sharing directions: SLERP per token
  and head of keys (and, separately, values), each layer's norms kept, the `retain` slots
  per head with the largest angle between the layers stored exactly in both. `fraction`:
  the share of slots `retain` stands for, which sizes the retained entries of reserved
  slots (`MergedLayerCache.retain_fraction`)."""
  # `first` only names the owner b borrows from: set outside the compiled merge, so that
  # every pair of one shape shares it.
  owner, borrower = _merged(a, b, t=t, retain=retain)
  return (owner.replace(retain_fraction=fraction),
          borrower.replace(source=first, retain_fraction=fraction))


@functools.partial(jax.jit, static_argnames=("t", "retain"))
def _merged(a: LayerCache, b: LayerCache, *, t: float, retain: int
            ) -> tuple[MergedLayerCache, MergedLayerCache]:
  valid = a.positions >= 0
  key_dir, key_angle = slerp(a.keys, b.keys, t)
  value_dir, value_angle = slerp(a.values, b.values, t)
  dtype = a.keys.dtype
  directions = Directions(keys=key_dir.astype(dtype), values=value_dir.astype(dtype))
  norm = lambda x: jnp.sqrt((x.astype(jnp.float32) ** 2).sum(-1)).astype(dtype)
  empty_tail = init_layer_cache(a.keys.shape[0], a.keys.shape[1], 0, a.keys.shape[3], dtype)

  def layer(x: LayerCache, owns: bool) -> MergedLayerCache:
    return MergedLayerCache(
        key_norms=norm(x.keys), value_norms=norm(x.values), positions=x.positions,
        retained_keys=_retained(x.keys, key_angle, valid, retain),
        retained_values=_retained(x.values, value_angle, valid, retain),
        tail=empty_tail, shared=directions if owns else None,
        source=-1 if owns else 0)

  return layer(a, True), layer(b, False)


def merged_pairs(num_layers: int, start: float) -> list[tuple[int, int]]:
  """(l, l + 1) pairs from layer floor(start * L) up (the last layer alone if odd)."""
  first = int(start * num_layers)
  return [(l, l + 1) for l in range(first, num_layers - 1, 2)]


@registry.register
@dataclasses.dataclass(frozen=True)
class MiniCache(base.CrossLayer):
  """MiniCache (Liu et al., NeurIPS 2024): from the middle depth up, each pair of adjacent
  layers (l, l + 1) stores one direction per token and KV head, the SLERP (at `t`) of the
  two layers' unit keys (and, separately, values), plus each layer's own magnitudes; the
  `retain` fraction of tokens per head whose two layers' vectors are farthest apart (the
  largest angle, as KVCache-Factory and the paper intend; xKV's re-implementation keeps
  the closest by mistake) are stored exactly in both layers. Real savings: the paired
  layers keep one [S, D] direction tensor between them plus per-layer norms and outliers
  (`kvjax.cache.cross_layer`); tokens after the context (questions, answers) stay exact.

  The merge runs once, after the whole context is prefilled (`finalize`): chunked prefill
  and conversations work unchanged. Every token is kept (no budget; compose with eviction
  is not offered: both layers of a pair would need the same kept tokens). Defaults: t=0.6,
  retain=0.05, pairs from L/2 (the paper's).
  """
  name: ClassVar[str] = "minicache"
  t: float = 0.6
  retain: float = 0.05
  start: float = 0.5

  def __post_init__(self):
    base.check_fraction("t", self.t)
    base.check_fraction("retain", self.retain)
    base.check_number("start", self.start, 0, 1, high_open=True,
                      what="the fraction of the depth where merging starts")

  def finalize(self, cache: Cache, config=None) -> Cache:
    del config
    layers = self.dense_layers(cache)
    for first, second in merged_pairs(len(layers), self.start):
      a, b = layers[first], layers[second]
      retain = math.ceil(self.retain * a.capacity)
      layers[first], layers[second] = merge_pair(a, b, t=self.t, retain=retain, first=first,
                                                 fraction=self.retain)
    return cache.replace(layers=tuple(layers))

  def cache_stats(self, cache):
    return {"merged_pairs": merged_pairs(len(cache.layers), self.start)}
