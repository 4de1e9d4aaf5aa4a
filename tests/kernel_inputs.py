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


def _inner_jaxprs(eqn, branches: bool):
  """The jaxprs nested in an equation (a loop's body, a call's; with `branches`, every
  branch of a cond too)."""
  for param in eqn.params.values():
    for p in param if branches and isinstance(param, (tuple, list)) else (param,):
      inner = getattr(p, "jaxpr", p)
      if hasattr(inner, "eqns"):
        yield inner


def _count(jaxpr, hit, branches: bool) -> int:
  return sum(hit(eqn) + sum(_count(inner, hit, branches)
                            for inner in _inner_jaxprs(eqn, branches))
             for eqn in jaxpr.eqns)


def dots_reading(fn, args, shape) -> int:
  """How many dot_general operations fn(*args) traces with an operand of `shape` (nested
  jaxprs included): the form the code chose, whatever XLA later makes of it."""
  hit = lambda eqn: eqn.primitive.name == "dot_general" and any(
      tuple(v.aval.shape) == tuple(shape) for v in eqn.invars)
  return _count(jax.make_jaxpr(fn)(*args).jaxpr, hit, branches=False)


def primitive_count(fn, args, name: str) -> int:
  """How many `name` operations fn(*args) traces, counting inside every nested jaxpr (both
  branches of a cond, a loop's body)."""
  return _count(jax.make_jaxpr(fn)(*args).jaxpr, lambda eqn: eqn.primitive.name == name,
                branches=True)
