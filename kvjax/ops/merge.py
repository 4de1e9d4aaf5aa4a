"""Merging leaving tokens into staying ones (EMS, D2O, Elastic Cache): the kernels on
GPU/TPU, their jnp references elsewhere. Shapes are the caches' [B, K, ...]; the kernels
see rows R = B * K."""

from __future__ import annotations

import jax

from kvjax.ops.dispatch import use_pallas
from pallas_kernels import merge as kernels
from pallas_kernels import reference


def _rows(x: jax.Array) -> jax.Array:
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def assign_to_centres(src_keys, centre_keys, centre_valid):
  """Each source slot's most cosine-similar valid centre: src_keys [B, K, E, D],
  centre_keys [B, K, M, D], centre_valid [B, K, M] -> (target [B, K, E] int32, -1 where
  no centre is valid; similarity [B, K, E] float32)."""
  b, k = src_keys.shape[:2]
  fn = kernels.assign_to_centres if use_pallas() else reference.assign_to_centres
  target, sim = fn(_rows(src_keys), _rows(centre_keys), _rows(centre_valid))
  return target.reshape(b, k, -1), sim.reshape(b, k, -1)


def scatter_mean(centre_keys, centre_values, centre_weights, src_keys, src_values,
                 src_weights, targets):
  """Every centre [B, K, M, D] becomes the weighted mean of itself and its sources
  [B, K, E, D] (targets [B, K, E]; weights are token counts, 0 = not merged) ->
  (keys, values [B, K, M, D], weights [B, K, M] float32)."""
  b, k, m = centre_weights.shape
  # The kernel takes values as wide as keys (not a DiffQKV model's r value heads per slot).
  same_width = centre_values.shape[-1] == centre_keys.shape[-1]
  fn = kernels.scatter_mean if use_pallas() and same_width else reference.scatter_mean
  keys, values, weights = fn(*(_rows(a) for a in (centre_keys, centre_values, centre_weights,
                                                   src_keys, src_values, src_weights,
                                                   targets)))
  return (keys.reshape(centre_keys.shape), values.reshape(centre_values.shape),
          weights.reshape(b, k, m))


unit_rows = kernels.unit_rows
