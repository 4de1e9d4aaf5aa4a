"""Merging leaving tokens into staying ones (EMS, D2O, Elastic Cache): the kernels on
GPU/TPU, their jnp references elsewhere. Shapes are the caches' [B, K, ...]; the kernels
see rows R = B * K (per shard of a sharded model: its rows and KV heads)."""

from __future__ import annotations

import jax

from kvjax.ops.dispatch import use_pallas
from kvjax.ops.sharded import per_shard
from pallas_kernels import merge as kernels
from pallas_kernels import reference


def _rows(x: jax.Array) -> jax.Array:
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _on_rows(fn):
  """fn over [R, ...] rows as a function of [B, K, ...] arrays (each row on its own)."""
  def run(*args):
    b, k = args[0].shape[:2]
    return tuple(x.reshape((b, k) + x.shape[1:]) for x in fn(*(_rows(a) for a in args)))
  return run


def assign_to_centres(src_keys, centre_keys, centre_valid):
  """Each source slot's most cosine-similar valid centre: src_keys [B, K, E, D],
  centre_keys [B, K, M, D], centre_valid [B, K, M] -> (target [B, K, E] int32, -1 where
  no centre is valid; similarity [B, K, E] float32)."""
  if use_pallas():
    fn = per_shard(_on_rows(kernels.assign_to_centres), ("bk",) * 3, ("bk", "bk"))
  else:
    fn = _on_rows(reference.assign_to_centres)
  return fn(src_keys, centre_keys, centre_valid)


def scatter_mean(centre_keys, centre_values, centre_weights, src_keys, src_values,
                 src_weights, targets):
  """Every centre [B, K, M, D] becomes the weighted mean of itself and its sources
  [B, K, E, D] (targets [B, K, E]; weights are token counts, 0 = not merged) ->
  (keys, values [B, K, M, D], weights [B, K, M] float32)."""
  args = (centre_keys, centre_values, centre_weights, src_keys, src_values, src_weights,
          targets)
  # The kernel takes values as wide as keys (not a DiffQKV model's r value heads per slot).
  if use_pallas() and centre_values.shape[-1] == centre_keys.shape[-1]:
    return per_shard(_on_rows(kernels.scatter_mean), ("bk",) * 7, ("bk",) * 3)(*args)
  return _on_rows(reference.scatter_mean)(*args)


unit_rows = kernels.unit_rows
