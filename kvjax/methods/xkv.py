"""xKV: groups of adjacent layers share one low-rank token basis of their keys and values."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.cross_layer import Basis, LowRankLayerCache, undo_rope
from kvjax.cache.kv_cache import Cache, LayerCache, init_layer_cache
from kvjax.errors import MethodError
from kvjax.methods import base, registry
from kvjax.ops import rope


def truncated_svd(x: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """x [B, S, C] ~ basis [B, S, r] @ coefficients [B, r, C]: the rank-r truncated SVD
  (basis = U_r Sigma_r, coefficients = V_r^T), in float32."""
  u, sigma, vt = jnp.linalg.svd(x.astype(jnp.float32), full_matrices=False)
  return u[..., :rank] * sigma[:, None, :rank], vt[:, :rank]


def merge_group(layers: tuple[LayerCache, ...], *, first: int, key_rank: int,
                value_rank: int, inv_freq: tuple) -> tuple[LowRankLayerCache, ...]:
  """One xKV group (layers first, first + 1, ...): the truncated SVD of the layers'
  pre-RoPE keys side by side ([B, S, G * K * D], heads flattened), and of their values."""
  # `first` only names the owner the others borrow from: set outside the compiled merge,
  # so that every group of one shape shares it.
  owner, *borrowers = _merged(layers, key_rank=key_rank, value_rank=value_rank,
                              inv_freq=inv_freq)
  return (owner, *(layer.replace(source=first) for layer in borrowers))


@functools.partial(jax.jit, static_argnames=("key_rank", "value_rank", "inv_freq"))
def _merged(layers: tuple[LayerCache, ...], *, key_rank: int, value_rank: int,
            inv_freq: tuple) -> tuple[LowRankLayerCache, ...]:
  b, k, s, d = layers[0].keys.shape
  freq = np.asarray(inv_freq, np.float32)
  side_by_side = lambda xs: jnp.concatenate(
      [x.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b, s, k * d) for x in xs], axis=-1)
  keys = side_by_side([undo_rope(layer.keys, layer.positions, freq) for layer in layers])
  values = side_by_side([layer.values for layer in layers])
  key_basis, key_coefficients = truncated_svd(keys, key_rank)
  value_basis, value_coefficients = truncated_svd(values, value_rank)
  dtype = layers[0].keys.dtype
  shared = Basis(keys=key_basis.astype(dtype), values=value_basis.astype(dtype))
  tail = init_layer_cache(b, k, 0, d, dtype)
  width = k * d
  return tuple(
      LowRankLayerCache(
          key_coefficients=key_coefficients[:, :, j * width:(j + 1) * width].astype(dtype),
          value_coefficients=value_coefficients[:, :, j * width:(j + 1) * width].astype(dtype),
          positions=layer.positions, tail=tail, shared=shared if j == 0 else None,
          source=-1 if j == 0 else 0, inv_freq=inv_freq)
      for j, layer in enumerate(layers))


def layer_groups(num_layers: int, group: int) -> list[tuple[int, ...]]:
  """Consecutive groups of `group` layers (the last one smaller when it does not divide)."""
  return [tuple(range(start, min(start + group, num_layers)))
          for start in range(0, num_layers, group)]


@registry.register
@dataclasses.dataclass(frozen=True)
class XKV(base.CrossLayer):
  """xKV (Chang et al., 2025; abdelfattah-lab/xKV): every `group` adjacent layers
  concatenate their pre-RoPE keys along the feature axis ([S, G * K * D], heads flattened)
  and take one truncated SVD; the token-side factor U_r Sigma_r [S, r] is stored once for
  the group and each layer keeps its [r, K * D] slice of V_r^T (values likewise, without
  RoPE). Decoding rebuilds a layer's keys as basis @ coefficients, rotates them back to
  their positions and attends with the exact later tokens (the tail). Real savings: the
  factors are what the cache holds (the official code's `FakeLayerMergingCache` writes the
  reconstruction back instead).

  Ranks are fractions of the group's G * K * D columns: `key_rank` 0.125 and `value_rank`
  0.1875 are the paper's xKV-4 setting for Llama-3.1-8B (r_k 512, r_v 768 of 4096 columns)
  with its `group` of 4. Exact SVD in float32 (jnp.linalg.svd) once after the whole context
  (`finalize`), so chunked prefill and conversations work unchanged. Every token is kept.
  Decode absorbs the value coefficients (out = (p U_v) C_v, values never rebuilt); the
  Pallas kernel (`pallas_kernels.cross_layer.lowrank_decode_attention`, GPU/TPU) also
  rebuilds and rotates keys tile by tile inside the attention, while the jnp path (CPU)
  rebuilds the layer's keys each step. Prefill chunks and questions read the rebuilt layer.
  """
  name: ClassVar[str] = "xkv"
  group: int = 4
  key_rank: float = 0.125
  value_rank: float = 0.1875

  def __post_init__(self):
    base.check_int("group", self.group, 1)
    base.check_number("key_rank", self.key_rank, 0, 1, what="a fraction of the columns")
    base.check_number("value_rank", self.value_rank, 0, 1, what="a fraction of the columns")
    if self.key_rank <= 0 or self.value_rank <= 0:
      raise MethodError(f"xkv key_rank={self.key_rank}, value_rank={self.value_rank} must be "
                        f"> 0 (a fraction of the group's G * K * D columns)")

  def ranks(self, columns: int, slots: int) -> tuple[int, int]:
    top = min(columns, slots)
    rank = lambda fraction: max(1, min(top, round(fraction * columns)))
    return rank(self.key_rank), rank(self.value_rank)

  def finalize(self, cache: Cache, config=None) -> Cache:
    if config is None:
      raise MethodError("xkv needs the model's config to undo RoPE (finalize(cache, config))")
    layers = self.dense_layers(cache)
    inv_freq = tuple(float(f) for f in rope.inverse_frequencies(config))
    for members in layer_groups(len(layers), self.group):
      b, k, s, d = layers[members[0]].keys.shape
      key_rank, value_rank = self.ranks(len(members) * k * d, s)
      merged = merge_group(tuple(layers[i] for i in members), first=members[0],
                           key_rank=key_rank, value_rank=value_rank, inv_freq=inv_freq)
      for i, layer in zip(members, merged):
        layers[i] = layer
    return cache.replace(layers=tuple(layers))
