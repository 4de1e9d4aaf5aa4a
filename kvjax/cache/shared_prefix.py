"""A layer cache whose rows share prefixes (BatchLLM): each prefix is stored once.

Rows come in G groups of R consecutive rows; group g's rows share the prefix slots
`prefix` row g ([G, K, P, D], prefilled once, possibly compressed) and each row keeps its
own suffix (the rest of its prompt, then its generated tokens) in `suffix` ([G * R, K,
S, D]). A decode step reads each prefix once for its whole group (`decode_over_prefix`)
and each row's suffix as usual, and merges the two attentions by log-sum-exp. New tokens
are appended to the suffix; the prefix never changes. Compression policies do not act on
this layout (a prefix is compressed before it is shared, see kvjax.systems).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.cache.kv_cache import (Cache, LayerCache, NewTokens, PerHeadSlots, Stats,
                                  init_layer_cache)
from kvjax.errors import MethodError
from kvjax.ops import attention as attention_ops


@struct.dataclass
class SharedPrefixLayerCache(PerHeadSlots):
  prefix: LayerCache     # [G, K, P, D]: one prefix per group
  suffix: LayerCache     # [G * R, K, S, D]: every row's own tokens

  @property
  def rows_per_prefix(self) -> int:
    return self.suffix.keys.shape[0] // self.prefix.keys.shape[0]

  @property
  def capacity(self) -> int:
    return self.prefix.capacity + self.suffix.capacity

  def free_slots(self) -> int:
    return self.suffix.free_slots()

  def logical_axes(self) -> dict:
    return {"prefix": self.prefix.logical_axes(), "suffix": self.suffix.logical_axes()}

  def rows_prefix(self) -> LayerCache:
    """The prefix repeated for every row ([G * R, K, P, D]): what an unshared cache holds."""
    repeat = lambda x: jnp.repeat(x, self.rows_per_prefix, axis=0)
    return self.prefix.replace(keys=repeat(self.prefix.keys), values=repeat(self.prefix.values),
                               positions=repeat(self.prefix.positions), state=None)

  def slot_positions(self) -> jax.Array:
    return jnp.concatenate([self.rows_prefix().positions, self.suffix.positions], axis=2)

  def dense(self) -> LayerCache:
    """Every row's prefix and suffix slots in one dense layer (materialised per row)."""
    prefix = self.rows_prefix()
    return LayerCache(keys=jnp.concatenate([prefix.keys, self.suffix.keys], axis=2),
                      values=jnp.concatenate([prefix.values, self.suffix.values], axis=2),
                      positions=self.slot_positions(),
                      end=self.prefix.capacity + self.suffix.end)

  def append(self, new: NewTokens) -> "SharedPrefixLayerCache":
    return self.replace(suffix=self.suffix.append(new))

  def grow(self, room: int) -> "SharedPrefixLayerCache":
    return self.replace(suffix=self.suffix.grow(room))

  def attend(self, queries, query_positions, pending: NewTokens | None = None,
             want: frozenset = frozenset()):
    if pending is not None or want:
      raise MethodError("a shared-prefix cache stores every new token and returns no "
                        "attention statistics; compress the prefix before sharing it")
    if queries.shape[1] > 1:
      # A prompt's suffix: prefilled once per row through the materialised prefix.
      return self.dense().attend(queries, query_positions)
    b, _, h, _ = queries.shape
    prefix_out, prefix_lse = attention_ops.decode_over_prefix(
        queries, self.prefix.keys, self.prefix.values, self.prefix.positions)
    own_out, own_lse = attention_ops.decode(queries, self.suffix.keys, self.suffix.values,
                                            query_positions, self.suffix.positions)
    out, _ = attention_ops.merge_partials(prefix_out, prefix_lse,
                                          own_out.reshape(prefix_out.shape), own_lse)
    return out.reshape(b, 1, h, -1).astype(queries.dtype), Stats()

  def candidates(self, new: NewTokens):
    raise MethodError("compression policies do not act on a shared-prefix cache")

  def select(self, index):
    raise MethodError("compression policies do not act on a shared-prefix cache")



def shared_prefix_cache(prefixes: Cache, rows_per_prefix: int, suffix_capacity: int) -> Cache:
  """The cache of G groups of `rows_per_prefix` rows: group g shares row g of `prefixes`
  (a prefilled cache with dense layers) and every row has `suffix_capacity` empty slots of
  its own per head. Each row continues at its prefix's length."""
  layers = []
  for index, prefix in enumerate(prefixes.layers):
    if not isinstance(prefix, LayerCache):
      raise MethodError(f"layer {index} of the prefix cache is a {type(prefix).__name__}; "
                        f"prefixes are shared from dense layers (LayerCache) only")
    g, k, _, d = prefix.keys.shape
    suffix = init_layer_cache(g * rows_per_prefix, k, suffix_capacity, d, prefix.keys.dtype,
                              prefix.values.shape[-1])
    layers.append(SharedPrefixLayerCache(prefix=prefix.replace(state=None), suffix=suffix))
  return Cache(layers=tuple(layers),
               lengths=jnp.repeat(prefixes.lengths, rows_per_prefix, axis=0))
