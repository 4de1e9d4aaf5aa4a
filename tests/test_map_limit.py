"""A sweep drops compiled code before the process runs out of memory mappings."""

import jax
import jax.numpy as jnp

from kvjax.generation import map_limit
from kvjax.generation import engine


def _compile_many(n):
  functions = [jax.jit(lambda x, i=i: jnp.sin(x * i) + i) for i in range(n)]
  for i, f in enumerate(functions):
    f(jnp.ones((i + 1,))).block_until_ready()


def test_compiled_code_is_unmapped_past_the_share(monkeypatch):
  cleared = []
  monkeypatch.setattr(engine.STEPS, "clear", lambda: cleared.append(1))
  _compile_many(60)
  before = map_limit.mappings()
  assert map_limit.release_if_near_limit(share=0.0)
  # About three mappings per compiled module: most of the 60 modules' are gone.
  assert before - map_limit.mappings() > 60 and cleared == [1]


def test_below_the_share_or_without_proc_nothing_is_dropped(monkeypatch):
  cleared = []
  monkeypatch.setattr(engine.STEPS, "clear", lambda: cleared.append(1))
  monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append(2))
  assert not map_limit.release_if_near_limit(share=1.0)
  monkeypatch.setattr(map_limit, "mappings", lambda: None)
  assert not map_limit.release_if_near_limit(share=0.0)
  monkeypatch.setattr(map_limit, "mappings", lambda: 40_000)
  monkeypatch.setattr(map_limit, "_limit", lambda: 65_530)
  assert map_limit.release_if_near_limit() and cleared == [2, 1]
  assert cleared and not map_limit.release_if_near_limit(share=0.7)
