"""Logical axes of every model parameter, from its path (one table)."""

from __future__ import annotations

import fnmatch

import jax

from kvjax.sharding.rules import ShardingError

# Path pattern ("." separated, * = a layer index) -> the logical axis of each dimension.
# key_up / value_up have the query heads (decoupled RoPE) or the KV heads (rebuilt) as
# their head axis: "heads" here, and the concrete size decides whether it shards.
PARAM_AXES = {
    "embed.embedding": ("vocab", "embed"),
    "final_norm.scale": (None,),
    "lm_head.kernel": ("embed", "vocab"),
    "layers.*.attn_norm.scale": (None,),
    "layers.*.mlp_norm.scale": (None,),
    "layers.*.attn.q.kernel": ("embed", "heads", "head_dim"),
    "layers.*.attn.q.bias": ("heads", "head_dim"),
    "layers.*.attn.k.kernel": ("embed", "kv_heads", "head_dim"),
    "layers.*.attn.k.bias": ("kv_heads", "head_dim"),
    # DiffQKV: value heads are grouped by KV head, r per head.
    "layers.*.attn.v.kernel": ("embed", "kv_heads", "head_dim"),
    "layers.*.attn.v.bias": ("kv_heads", "head_dim"),
    "layers.*.attn.o.kernel": ("heads", "head_dim", "embed"),
    # Multi-head latent attention (LatentAttentionLayer).
    "layers.*.attn.q_down.kernel": ("embed", "query_rank"),
    "layers.*.attn.q_up.kernel": ("query_rank", "heads", "head_dim"),
    "layers.*.attn.q_up.bias": ("heads", "head_dim"),
    "layers.*.attn.kv_down.kernel": ("embed", "latent"),
    "layers.*.attn.kv_down.bias": ("latent",),
    "layers.*.attn.key_up.kernel": ("latent", "heads", "head_dim"),
    "layers.*.attn.key_up.bias": ("heads", "head_dim"),
    "layers.*.attn.value_up.kernel": ("latent", "heads", "head_dim"),
    "layers.*.attn.value_up.bias": ("heads", "head_dim"),
    "layers.*.mlp.gate.kernel": ("embed", "mlp"),
    "layers.*.mlp.up.kernel": ("embed", "mlp"),
    "layers.*.mlp.down.kernel": ("mlp", "embed"),
}


def path_name(path) -> str:
  """'layers.0.attn.q.kernel' for a parameter's tree path (an nnx Variable's trailing
  `.value` left out)."""
  parts = []
  for key in path:
    part = getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))
    parts.append(str(part))
  if parts and parts[-1] == "value":
    parts.pop()
  return ".".join(parts)


def param_axes(name: str) -> tuple:
  """The logical axes of the parameter called `name` (e.g. 'layers.3.attn.k.kernel')."""
  for pattern, axes in PARAM_AXES.items():
    if fnmatch.fnmatchcase(name, pattern):
      return axes
  raise ShardingError(f"parameter {name!r} has no logical axes; add its path to "
                      f"kvjax.sharding.params.PARAM_AXES")


def params_logical_axes(params):
  """A pytree like `params` whose leaves are each parameter's logical axes (a tuple)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: param_axes(path_name(path)),
                                          params)
