"""Pallas kernels on a sharded model: each device runs the kernel on its own shard.

XLA's partitioner cannot split a Pallas kernel (a custom call): on a mesh it would gather
the whole cache onto every device and run the kernel there. A sharded model's compiled
steps (kvjax.generation.engine) therefore trace under `kernels_on(placement)`, and the ops
wrap their kernels with `per_shard`: `jax.shard_map` over the placement's mesh, rows split
like the batch and KV heads like the cache's KV-head axis (when the rules shard it; the
query heads of a KV head go with it). Attention is independent per row and KV head, so the
shards need no communication and the result is the unsharded kernel's.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import PartitionSpec

# The placement (kvjax.sharding.Placement) of the model whose step is being traced.
_PLACEMENT = contextvars.ContextVar("kvjax_kernel_placement", default=None)


@contextlib.contextmanager
def kernels_on(placement):
  """While tracing a step of a model on `placement` (None: one device, nothing to do)."""
  token = _PLACEMENT.set(placement)
  try:
    yield
  finally:
    _PLACEMENT.reset(token)


def current_placement():
  return _PLACEMENT.get()


def _mesh_axes(placement, rows: int, kv_heads: int | None):
  """(mesh axis of the rows, of the KV heads) as the rules place a cache of this shape:
  None where the dimension stays whole."""
  axes, shape = ("batch",), (rows,)
  if kv_heads is not None:
    axes, shape = axes + ("kv_heads",), shape + (kv_heads,)
  spec = tuple(placement.resolve(axes, shape).spec) + (None, None)
  return spec[0], spec[1] if kv_heads is not None else None


def per_shard(kernel, layouts, out_layouts):
  """`kernel` run per shard of the current placement's mesh (as it is without one).

  layouts: one string per argument, a letter per leading dimension: "b" rows (split like
  the batch), "k" KV heads (split like the cache's), "h" query heads (split with their KV
  heads: head k*G + g belongs to KV head k), "." whole; dimensions after the string stay
  whole. out_layouts: the same for the output, or a tuple of them for a tuple of outputs.
  """
  placement = _PLACEMENT.get()
  if placement is None:
    return kernel

  def run(*args):
    rows = args[0].shape[0]
    k_sizes = [x.shape[i] for x, layout in zip(args, layouts) for i, c in enumerate(layout)
               if c == "k"]
    row_axis, head_axis = _mesh_axes(placement, rows, k_sizes[0] if k_sizes else None)
    letters = {"b": row_axis, "k": head_axis, "h": head_axis, ".": None}
    spec = lambda layout: PartitionSpec(*(letters[c] for c in layout))
    outs = out_layouts if isinstance(out_layouts, tuple) else (out_layouts,)
    out_specs = tuple(spec(layout) for layout in outs)
    return jax.shard_map(kernel, mesh=placement.mesh,
                         in_specs=tuple(spec(layout) for layout in layouts),
                         out_specs=out_specs if isinstance(out_layouts, tuple) else out_specs[0],
                         check_vma=False)(*args)

  return run
