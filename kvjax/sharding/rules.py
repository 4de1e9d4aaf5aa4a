"""Logical axes -> mesh axes: one rules object, and the PartitionSpec it gives an array.

An array's dimensions carry logical names (batch, kv_heads, embed, ...). The rules map a
name to a mesh axis ("data", "model", "fsdp") or to None (replicated). A dimension is
sharded only when its size divides the mesh axis's size; otherwise it is replicated and
the placement says so (SmolLM2's 3 KV heads on model=2, Qwen2.5's 2 on model=4).
"""

from __future__ import annotations

import dataclasses

from kvjax.errors import KvjaxError
from jax.sharding import PartitionSpec

MESH_AXES = ("data", "model", "fsdp")


class ShardingError(KvjaxError):
  """A mesh spec, a mesh or a batch does not fit the sharding rules."""


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Which mesh axis each logical axis shards over (None: replicated).

  Defaults: rows over "data"; query heads, KV heads, the MLP's hidden units and the
  vocabulary over "model" (tensor parallel); the model width (`embed`) replicated: set
  embed="fsdp" (with an "fsdp" mesh axis) to shard weights along it as well. Logical axes
  not named here (head_dim, slots, packed, groups, latent, rank, ...) are replicated. A
  mesh axis the mesh does not have counts as size 1.
  """
  batch: str | None = "data"
  heads: str | None = "model"
  kv_heads: str | None = "model"
  mlp: str | None = "model"
  vocab: str | None = "model"
  embed: str | None = None

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is not None and value not in MESH_AXES:
        raise ShardingError(f"ShardingRules.{field.name}={value!r}; allowed: one of "
                            f"{MESH_AXES} or None (replicated)")

  def mesh_axis(self, logical: str | None) -> str | None:
    if logical is None or logical not in _RULE_NAMES:
      return None
    return getattr(self, logical)


_RULE_NAMES = frozenset(f.name for f in dataclasses.fields(ShardingRules))
DEFAULT_RULES = ShardingRules()


@dataclasses.dataclass(frozen=True)
class AxisPlacement:
  """An array's PartitionSpec, and the dimensions a rule wanted sharded but could not be:
  (logical axis, size, mesh axis, mesh axis size, why)."""
  spec: PartitionSpec
  replicated: tuple[tuple[str, int, str, int, str], ...] = ()

  def describe(self) -> str:
    if not self.replicated:
      return f"{self.spec}"
    notes = "; ".join(f"{name} ({size}) replicated: {why} {axis}={axis_size}"
                      for name, size, axis, axis_size, why in self.replicated)
    return f"{self.spec} ({notes})"


def resolve(rules: ShardingRules, mesh, axes, shape) -> AxisPlacement:
  """The placement of an array of `shape` whose dimensions are named `axes`.

  `axes` may be shorter than `shape` (trailing dimensions are replicated: method state
  with extra axes). A dimension is sharded over its rule's mesh axis only when its size
  is a multiple of that axis's size and no earlier dimension took the same mesh axis.
  """
  axes = tuple(axes)
  shape = tuple(shape)
  if len(axes) > len(shape):
    raise ShardingError(f"logical axes {axes} name {len(axes)} dimensions but the array "
                        f"has shape {shape}")
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  spec, replicated, used = [], [], set()
  for name, size in zip(axes + (None,) * (len(shape) - len(axes)), shape):
    axis = rules.mesh_axis(name)
    axis_size = sizes.get(axis, 1)
    if axis is None or axis_size == 1:
      spec.append(None)
    elif axis in used:
      spec.append(None)
      replicated.append((name, size, axis, axis_size, "an earlier dimension already uses"))
    elif size % axis_size:
      spec.append(None)
      replicated.append((name, size, axis, axis_size, "does not divide"))
    else:
      spec.append(axis)
      used.add(axis)
  while spec and spec[-1] is None:
    spec.pop()
  return AxisPlacement(PartitionSpec(*spec), tuple(replicated))


def partition_spec(rules: ShardingRules, mesh, axes, shape) -> PartitionSpec:
  """The PartitionSpec of `resolve` (never shards a dimension its mesh axis does not
  divide)."""
  return resolve(rules, mesh, axes, shape).spec
