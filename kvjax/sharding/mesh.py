"""Meshes from a spec such as "data:2,model:4" (the --mesh flag)."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from kvjax.sharding.rules import MESH_AXES, ShardingError

EXAMPLE = "data:2,model:4"


def parse_mesh_spec(spec: str, device_count: int | None = None) -> dict[str, int]:
  """'data:2,model:4' -> {'data': 2, 'model': 4}, checked: known axis names, each once,
  positive integer sizes whose product divides the device count (a smaller mesh uses the
  first devices). "data" and "model" are always present (size 1 when not given)."""
  device_count = jax.device_count() if device_count is None else device_count
  if not isinstance(spec, str):
    raise ShardingError(f"mesh spec must be a string of axis:size pairs such as {EXAMPLE!r}; "
                        f"got {spec!r:.80}")
  if not spec.strip():
    raise ShardingError(f"mesh spec {spec!r} is empty; give axis:size pairs such as "
                        f"{EXAMPLE!r} (axes: {', '.join(MESH_AXES)})")
  sizes = {}
  for item in spec.split(","):
    name, sep, size = (part.strip() for part in item.partition(":"))
    if not sep:
      raise ShardingError(f"mesh spec {spec!r}: {item.strip()!r} is not axis:size, e.g. "
                          f"{EXAMPLE!r}")
    if name not in MESH_AXES:
      raise ShardingError(f"mesh spec {spec!r}: unknown axis {name!r}; allowed: "
                          f"{', '.join(MESH_AXES)}")
    if name in sizes:
      raise ShardingError(f"mesh spec {spec!r}: axis {name!r} is given twice")
    if not size.isdigit() or int(size) < 1:
      raise ShardingError(f"mesh spec {spec!r}: size {size!r} of axis {name!r} must be a "
                          f"positive integer")
    sizes[name] = int(size)
  total = math.prod(sizes.values())
  if device_count % total:
    raise ShardingError(f"mesh spec {spec!r} needs {total} devices, which does not divide "
                        f"the {device_count} devices there are; use a product of sizes "
                        f"that divides {device_count}")
  ordered = {"data": sizes.pop("data", 1)}
  if "fsdp" in sizes:
    ordered["fsdp"] = sizes.pop("fsdp")
  ordered["model"] = sizes.pop("model", 1)
  return ordered


def auto_axes(mesh: Mesh) -> Mesh:
  """The mesh with Auto axis types: jax.make_mesh's default Explicit axes would make every
  jnp op on a sharded array pick its output sharding by type, which compression code does
  not do; with Auto, jit and XLA's propagation place intermediates."""
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def make_mesh(spec, devices=None) -> Mesh:
  """A Mesh (Auto axes) from a spec string, a {axis: size} dict, or a Mesh as it is."""
  if isinstance(spec, Mesh):
    return auto_axes(spec)
  every_process = devices is None
  devices = jax.devices() if devices is None else list(devices)
  if isinstance(spec, dict):
    spec = ",".join(f"{name}:{size}" for name, size in spec.items())
  sizes = parse_mesh_spec(spec, len(devices))
  if jax.process_count() > 1 and math.prod(sizes.values()) != len(devices):
    # Processes outside the mesh would hold no shard and still run every step.
    whose = (f"of a {jax.process_count()}-process run; a multi-process mesh spans every "
             f"process's devices" if every_process else
             "given (a mesh of one process's devices in a multi-process run uses them all)")
    raise ShardingError(f"mesh spec {spec!r} covers {math.prod(sizes.values())} of the "
                        f"{len(devices)} devices {whose}")
  grid = np.asarray(devices[:math.prod(sizes.values())]).reshape(tuple(sizes.values()))
  return Mesh(grid, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))
