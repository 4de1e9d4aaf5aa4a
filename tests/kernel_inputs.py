"""Random inputs and tolerances shared by the kernel tests."""

import jax
import jax.numpy as jnp
import numpy as np

TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def rng(seed):
  return np.random.default_rng(seed)


def shuffled_positions(generator, shape, empty=0.2):
  """Slots holding a random permutation of positions (not in order), some empty (-1)."""
  s = shape[-1]
  rows = [generator.permutation(s) for _ in range(int(np.prod(shape[:-1])))]
  pos = np.stack(rows).reshape(shape).astype(np.int32)
  pos[generator.random(shape) < empty] = -1
  return pos


def close(actual, expected, dtype):
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             **TOL[dtype])


def first_row(tree):
  """A cache pytree cut to its first batch row (scalars, such as `end`, kept)."""
  return jax.tree.map(lambda a: a[:1] if a.ndim else a, tree)


def dots_reading(fn, args, shape) -> int:
  """How many dot_general operations fn(*args) traces with an operand of `shape` (nested
  jaxprs included): the form the code chose, whatever XLA later makes of it."""
  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        n += any(tuple(v.aval.shape) == tuple(shape) for v in eqn.invars)
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", param)
        if hasattr(inner, "eqns"):
          n += count(inner)
    return n
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def primitive_count(fn, args, name: str) -> int:
  """How many `name` operations fn(*args) traces, counting inside every nested jaxpr (both
  branches of a cond, a loop's body)."""
  def inner_jaxprs(param):
    for p in param if isinstance(param, (tuple, list)) else (param,):
      inner = getattr(p, "jaxpr", p)
      if hasattr(inner, "eqns"):
        yield inner

  def count(jaxpr):
    return sum((eqn.primitive.name == name)
               + sum(count(inner) for param in eqn.params.values()
                     for inner in inner_jaxprs(param))
               for eqn in jaxpr.eqns)
  return count(jax.make_jaxpr(fn)(*args).jaxpr)
