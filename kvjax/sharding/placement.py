"""Placing a model's parameters, its caches and its batches on a mesh by the rules.

Parameters get NamedShardings from their logical axes (kvjax.sharding.params); a cache
shards like the keys it holds, through each layout's `logical_axes()`; token rows shard
over the batch rule's axis. The jitted steps then run on these arrays as they are (jit
and XLA insert the collectives), and constrain the cache they return to the same layout,
so every step sees the cache where the previous one left it.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kvjax.cache.kv_cache import Cache, init_cache
from kvjax.sharding import mesh as mesh_lib
from kvjax.sharding.params import param_axes, path_name
from kvjax.sharding.rules import (DEFAULT_RULES, AxisPlacement, ShardingError, ShardingRules,
                                  resolve)


@dataclasses.dataclass(frozen=True)
class Placement:
  """A mesh and the rules that map logical axes onto it (hashable: a static jit argument)."""
  mesh: Mesh
  rules: ShardingRules = DEFAULT_RULES

  def resolve(self, axes, shape) -> AxisPlacement:
    return resolve(self.rules, self.mesh, axes, shape)

  def sharding(self, axes, shape) -> NamedSharding:
    return NamedSharding(self.mesh, self.resolve(axes, shape).spec)

  @property
  def batch_axis_size(self) -> int:
    sizes = dict(zip(self.mesh.axis_names, self.mesh.devices.shape))
    return sizes.get(self.rules.batch, 1)

  def param_shardings(self, params):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: self.sharding(param_axes(path_name(path)), x.shape), params)

  def cache_shardings(self, cache):
    """NamedShardings shaped like `cache` (a Cache): every leaf by its layout's logical
    axes; a layer without `logical_axes` is replicated."""
    return cache.replace(layers=tuple(self._layer_shardings(layer) for layer in cache.layers),
                         lengths=self.sharding(("batch",), cache.lengths.shape))

  def _layer_shardings(self, layer):
    axes = layer.logical_axes() if hasattr(layer, "logical_axes") else {}
    return jax.tree_util.tree_map_with_path(
        lambda path, x: self.sharding(_axes_at(axes, path), x.shape), layer)

  def rows_sharding(self, shape) -> NamedSharding:
    """Arrays whose first axis is the batch (tokens, masks, active flags)."""
    return self.sharding(("batch",), shape)

  def put_param(self, name: str, array, axes: tuple | None = None):
    """The parameter called `name` (e.g. 'layers.0.attn.q.kernel'; a host array as a
    loader reads it) straight into its shards: each device receives only its part (all of
    it where the rules replicate it). `axes`: its logical axes, when the caller has them."""
    axes = param_axes(name) if axes is None else axes
    return _device_put(array, self.sharding(axes, array.shape))

  def put_axes(self, x, axes: tuple):
    """`x` split as the rules place its logical `axes` (e.g. (None, "batch"))."""
    return _device_put(x, self.sharding(axes, x.shape))

  def put_rows(self, x):
    return _device_put(x, self.rows_sharding(x.shape))

  def put_cache(self, cache):
    if not isinstance(cache, Cache):
      return self.put_replicated(cache)
    return _device_put(cache, self.cache_shardings(cache))

  def constrain_cache(self, cache):
    """Inside jit: the cache pinned to its rules' layout (anything else left to XLA)."""
    if not isinstance(cache, Cache):
      return cache
    return jax.lax.with_sharding_constraint(cache, self.cache_shardings(cache))

  def put_replicated(self, tree):
    """Leaves not yet on this mesh, replicated over it (arrays already on it stay)."""
    replicated = NamedSharding(self.mesh, PartitionSpec())

    def put(x):
      sharding = getattr(x, "sharding", None)
      if isinstance(sharding, NamedSharding) and sharding.mesh == self.mesh:
        return x
      return _device_put(x, replicated)

    return jax.tree_util.tree_map(put, tree)


def _device_put(tree, shardings):
  """jax.device_put, also onto a mesh that spans processes. There JAX splits only host data
  (or uncommitted arrays) over devices it does not hold: an array this process holds
  whole (every process holds the same value, kvjax.sharding.distributed) goes through
  its host copy."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, sharding):
    if not (isinstance(x, jax.Array) and x.is_fully_addressable
            and not sharding.is_fully_addressable):
      return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)

  return jax.tree_util.tree_map(put, tree, shardings)


def _axes_at(axes, path) -> tuple:
  """The logical axes of the leaf at `path` in a layer cache, from its logical_axes()
  dict: the walk stops at the first tuple (method state: a prefix of the leaf's axes)."""
  for key in path:
    if not isinstance(axes, dict):
      break
    axes = axes.get(getattr(key, "name", getattr(key, "key", getattr(key, "idx", None))))
  return axes if isinstance(axes, tuple) else ()


def placement_of(model) -> Placement | None:
  return getattr(model, "placement", None)


def make_placement(mesh, rules: ShardingRules | None = None) -> Placement:
  """A Placement on `mesh` (a Mesh or a spec) by `rules` (default ShardingRules()), both
  checked before anything is placed."""
  if rules is not None and not isinstance(rules, ShardingRules):
    raise ShardingError(f"rules={rules!r:.80} must be a kvjax.sharding.ShardingRules")
  return Placement(mesh_lib.make_mesh(mesh), rules or DEFAULT_RULES)


def shard_model(model, mesh, rules: ShardingRules | None = None):
  """The model with its parameters placed on `mesh` (a Mesh or a spec such as
  "data:2,model:4") by `rules` (default ShardingRules()); generate, score and the steps
  then run sharded. The parameters are copied; `model` itself is unchanged."""
  placement = make_placement(mesh, rules)
  params = _device_put(model.params, placement.param_shardings(model.params))
  return dataclasses.replace(model, params=params, placement=placement)


def check_batch(model, rows: int, what: str = "batch") -> None:
  """Refuses a batch the data axis does not divide (it would run replicated, without
  the data parallelism the mesh asks for): pad the batch or use a smaller data axis."""
  check_rows(placement_of(model), rows, f"{what} of {rows} rows")


def check_rows(placement, rows: int, what: str) -> None:
  """`check_batch` for a placement (None: one device, anything goes); `what` names the
  rows in the error, e.g. "batch_size=6"."""
  if placement is None:
    return
  size = placement.batch_axis_size
  if rows % size:
    raise ShardingError(f"{what} does not divide the mesh's {placement.rules.batch!r} axis "
                        f"of {size} devices; give a multiple of {size} rows (pad the batch) "
                        f"or a mesh with a smaller {placement.rules.batch!r} axis")


def describe(model) -> str:
  """Where the model's parameters and its full cache go: the mesh, the rules, and every
  dimension a rule would shard that stays replicated (and why)."""
  placement = placement_of(model)
  if placement is None:
    return "not sharded (one device)"
  mesh = ", ".join(f"{n}={s}" for n, s in zip(placement.mesh.axis_names,
                                               placement.mesh.devices.shape))
  lines = [f"mesh: {mesh}", f"rules: {placement.rules}"]
  notes = collections.defaultdict(list)
  for path, x in jax.tree_util.tree_flatten_with_path(model.params)[0]:
    name = path_name(path)
    for note in placement.resolve(param_axes(name), x.shape).replicated:
      where = re.sub(r"^layers\.\d+\.", "layers.*.", name)
      if where not in notes[note]:
        notes[note].append(where)
  cache = jax.eval_shape(lambda: init_cache(model.config, placement.batch_axis_size, 1))
  for layer in cache.layers[:1]:
    axes = layer.logical_axes()
    for path, x in jax.tree_util.tree_flatten_with_path(layer)[0]:
      for note in placement.resolve(_axes_at(axes, path), x.shape).replicated:
        where = "cache." + path_name(path)
        if where not in notes[note]:
          notes[note].append(where)
  for (name, size, axis, axis_size, why), where in notes.items():
    lines.append(f"{name} ({size}) replicated: {why} {axis}={axis_size} "
                 f"({', '.join(where)})")
  if not notes:
    lines.append("every dimension a rule names is sharded")
  return "\n".join(lines)
