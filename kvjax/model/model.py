"""Model container: config + NNX graph definition + parameter pytree + tokenizer."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.config import ModelConfig
from kvjax.errors import CheckpointError
from kvjax.model.transformer import Transformer


@dataclasses.dataclass
class Model:
  """What kvjax.load returns. `params` is a plain pytree; `graphdef` is static."""
  config: ModelConfig
  graphdef: Any
  params: Any
  tokenizer: Any = None  # kvjax.loading.tokenizer.Tokenizer, or None (token-id prompts only)
  placement: Any = None  # kvjax.sharding.Placement when the params are sharded over a mesh

  @property
  def name(self) -> str:
    return self.config.name

  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))


def abstract_params(config: ModelConfig):
  """(graphdef, abstract state) without allocating any weights."""
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  return nnx.split(abstract)


def _flatten(tree, prefix=()) -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    if isinstance(value, Mapping):
      flat.update(_flatten(value, path))
    else:
      flat[".".join(path)] = value
  return flat


def from_flat_params(config: ModelConfig, flat: Mapping[str, Any], tokenizer=None,
                     source: str = "checkpoint") -> Model:
  """Builds a Model from canonical flat names -> arrays, validating names and shapes."""
  graphdef, state = abstract_params(config)
  pure = nnx.to_pure_dict(state)
  expected = _flatten(pure)
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise CheckpointError(
        f"{source} does not match the config: missing tensors {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''}, unexpected tensors {unexpected[:5]}"
        f"{' ...' if len(unexpected) > 5 else ''}")
  dtype = jnp.dtype(config.dtype)
  for name, spec in expected.items():
    if tuple(flat[name].shape) != tuple(spec.shape):
      raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(flat[name].shape)}, "
                            f"expected {tuple(spec.shape)}")

  def fill(tree, prefix=()):
    return {k: fill(v, prefix + (str(k),)) if isinstance(v, Mapping)
            else jnp.asarray(flat[".".join(prefix + (str(k),))], dtype)
            for k, v in tree.items()}

  nnx.replace_by_pure_dict(state, fill(pure))
  return Model(config=config, graphdef=graphdef, params=state, tokenizer=tokenizer)


def to_flat_params(model: Model) -> dict[str, jax.Array]:
  return _flatten(nnx.to_pure_dict(model.params))


def random_params(config: ModelConfig, seed: int = 0, tokenizer=None) -> Model:
  """Random weights at the config's real shapes (for speed benchmarks and tests)."""
  graphdef, state = abstract_params(config)

  @jax.jit
  def init(key):
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        (0.02 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
        if x.ndim > 1 else jnp.ones(x.shape, x.dtype) for k, x in zip(keys, leaves)])

  return Model(config=config, graphdef=graphdef, params=init(jax.random.key(seed)),
               tokenizer=tokenizer)


def truncated(model: Model, num_layers: int) -> Model:
  """The model's first `num_layers` layers with its embedding, final norm and head: a
  draft that shares the target's tokenizer and weights (no copy)."""
  if not 1 <= num_layers <= model.config.num_layers:
    raise ValueError(f"num_layers={num_layers} must be in [1, {model.config.num_layers}]")
  flat = {name: value for name, value in to_flat_params(model).items()
          if not name.startswith("layers.") or int(name.split(".")[1]) < num_layers}
  config = dataclasses.replace(model.config, num_layers=num_layers,
                               name=f"{model.config.name}[:{num_layers}]")
  draft = from_flat_params(config, flat, model.tokenizer, source="truncated draft")
  return dataclasses.replace(draft, placement=model.placement)  # same mesh as its target
