"""Jitted prefill and decode steps, compiled ahead of time once per shape.

Compiling explicitly (lower().compile()) keeps compile time out of the measured prefill and
decode times, and the per-shape executables are reused across calls.
"""

from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp

from kvjax.cache import kv_cache
from kvjax.generation import sampling
from kvjax.model import transformer
from kvjax.ops.dispatch import use_pallas


def _prefill(params, tokens, token_mask, cache, method_params, *, graphdef, logits, plan):
  return transformer.forward(graphdef, params, tokens, token_mask, cache, logits, plan,
                             method_params)


def _decode(params, tokens, active, cache, key, temperature, top_p, method_params, *, graphdef,
            greedy, plan):
  # Inactive rows (finished ones, in a multi-turn conversation) write nothing a later token
  # could see: their token is masked like padding.
  logits, cache = transformer.forward(graphdef, params, tokens[:, None], active[:, None],
                                      cache, "last", plan, method_params)
  next_tokens = sampling.sample(logits, key, temperature, top_p, greedy)
  return next_tokens, logits, cache


_prefill_jit = jax.jit(_prefill, static_argnames=("graphdef", "logits", "plan"),
                      donate_argnames=("cache",))
# Compressing changes the cache's shapes, so its input buffers could not be reused anyway.
_compress_jit = jax.jit(_prefill, static_argnames=("graphdef", "logits", "plan"))
_decode_jit = jax.jit(_decode, static_argnames=("graphdef", "greedy", "plan"),
                     donate_argnames=("cache",))


_grow_jit = jax.jit(kv_cache.grow, static_argnames=("room",))


def _signature(tree):
  return tuple((x.shape, str(x.dtype)) if hasattr(x, "shape") else x
               for x in jax.tree_util.tree_leaves(tree)), jax.tree_util.tree_structure(tree)


class CompiledSteps:
  """Caches compiled executables by argument shapes; records compile seconds.

  At most `max_executables` are kept, least recently used first out: a long sweep or
  test session compiles hundreds of (method, shape) steps, and each executable holds its
  machine code in memory for as long as it is cached.
  """

  def __init__(self, max_executables: int = 96):
    self._executables = collections.OrderedDict()
    self.max_executables = max_executables
    self.compile_seconds = 0.0

  def _get(self, name, jitted, static, args):
    # Whether kernels are used is read while tracing, so it is part of the key.
    key = (name, tuple(sorted(static.items(), key=lambda kv: kv[0])), _signature(args),
           use_pallas())
    if key in self._executables:
      self._executables.move_to_end(key)
    else:
      start = time.perf_counter()
      self._executables[key] = jitted.lower(*args, **static).compile()
      self.compile_seconds += time.perf_counter() - start
      while len(self._executables) > self.max_executables:
        self._executables.popitem(last=False)
    return self._executables[key]

  def clear(self) -> None:
    """Drops every cached executable (compile seconds keep counting)."""
    self._executables.clear()

  def prefill(self, model, tokens, token_mask, cache, logits="last", plan=None,
              method_params=None):
    args = (model.params, tokens, token_mask, cache, method_params)
    jitted = _compress_jit if plan is not None and plan.compress else _prefill_jit
    return self._get("prefill", jitted,
                     dict(graphdef=model.graphdef, logits=logits, plan=plan), args)(*args)

  def decode(self, model, tokens, cache, key, temperature, top_p, greedy, plan=None,
             active=None, method_params=None):
    """One token per row; `active` [B] bool (default all) masks rows that are done."""
    active = jnp.ones(tokens.shape, bool) if active is None else jnp.asarray(active, bool)
    args = (model.params, tokens, active, cache, key, jnp.float32(temperature),
            jnp.float32(top_p), method_params)
    return self._get("decode", _decode_jit, dict(graphdef=model.graphdef, greedy=greedy,
                                                 plan=plan), args)(*args)

  def grow(self, cache, room: int):
    """The cache with `room` more empty slots per head (for question and generated tokens)."""
    if room == 0:
      return cache
    return self._get("grow", _grow_jit, dict(room=room), (cache,))(cache)


# One process-wide cache of executables; keys include the model's graph definition.
STEPS = CompiledSteps()
