"""A layer's token-wise tail (norm, MLP, residual) runs in pieces of tokens on CPU
(`kvjax.ops.pieces.token_chunked`): the same numbers as whole, up to float rounding."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.generation import engine
from kvjax.ops import pieces
from kvjax.ops import sharded
from tests.tiny import random_prompts, tiny_model


def _token_wise(w, traced_shapes):
  def fn(y):
    traced_shapes.append(y.shape)
    return jnp.tanh(y @ w) * y + y
  return fn


@pytest.mark.parametrize("b,t,chunk,piece", [
    (1, 10, 4, (1, 4, 8)),      # 3 pieces of 4 tokens, the last padded by 2
    (3, 7, 5, (3, 2, 8)),       # 21 tokens: 4 pieces of 3 rows x 2 tokens, the last padded
    (2, 6, 12, None),           # 12 tokens fit one piece: whole
    (4, 1, 1, None),            # one token per row (a decode step): never split
])
def test_pieces_give_what_the_whole_gives(monkeypatch, b, t, chunk, piece):
  monkeypatch.setattr(pieces, "CHUNK_TOKENS", chunk)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, t, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
  shapes = []
  fn = _token_wise(w, shapes)
  chunked = jax.jit(lambda x: pieces.token_chunked(fn, x))
  np.testing.assert_allclose(chunked(x), fn(x), rtol=1e-6, atol=1e-6)
  if piece is None:
    assert shapes == [(b, t, 8), (b, t, 8)]
  else:
    assert piece in shapes
  # The CPU program loops over the pieces; one lowered for a GPU runs the tail whole.
  assert (" while(" in chunked.lower(x).compile().as_text()) == (piece is not None)
  assert "while" not in chunked.trace(x).lower(lowering_platforms=("cuda",)).as_text()
  # Differentiable under jit, as training runs the model's layers.
  loss = lambda f: jax.jit(jax.grad(lambda x: (f(x) ** 2).sum()))
  np.testing.assert_allclose(loss(lambda x: pieces.token_chunked(fn, x))(x),
                             loss(fn)(x), rtol=1e-5, atol=1e-5)


def test_a_model_on_a_mesh_runs_the_tail_whole(monkeypatch):
  """Under a placement each piece would repeat the tail's collectives: whole instead."""
  monkeypatch.setattr(pieces, "CHUNK_TOKENS", 4)
  x = jnp.ones((2, 16, 8), jnp.float32)
  shapes = []
  fn = _token_wise(jnp.eye(8), shapes)
  with sharded.kernels_on(object()):   # any placement
    text = jax.jit(lambda x: pieces.token_chunked(fn, x)).lower(x).compile().as_text()
  assert shapes == [(2, 16, 8)] and "while" not in text


@contextlib.contextmanager
def _fresh_executables():
  """engine.STEPS emptied (everything traced and compiled again), then its executables
  restored and jax's trace caches dropped, so that no later test gets a program traced
  with this test's settings. Yields {executable name: number of while loops}."""
  saved = engine.STEPS._executables.copy()
  engine.STEPS.clear()
  jax.clear_caches()
  loops = {}
  try:
    yield loops
    for key, executable in engine.STEPS._executables.items():
      loops[key[0]] = loops.get(key[0], 0) + executable.as_text().count(" while(")
  finally:
    engine.STEPS.clear()
    engine.STEPS._executables.update(saved)
    jax.clear_caches()


def test_model_in_pieces_matches_the_model_whole(monkeypatch):
  """The tiny model's log-probs of a continuation and its greedy tokens, with the layers'
  tails in pieces of about 16 tokens (3 rows of prompts bucketed to 64 tokens), against the
  same model whole; the layers' prefill programs loop over the pieces."""
  model = tiny_model(seed=1)
  prompts = random_prompts([40, 31, 36], seed=2)
  continuations = random_prompts([24, 30, 27], seed=3)
  run = lambda: (kvjax.score(model, prompts, continuations),
                 kvjax.generate(model, prompts, max_new_tokens=6).token_ids)
  with _fresh_executables() as whole_loops:
    whole_scores, whole_tokens = run()
  monkeypatch.setattr(pieces, "CHUNK_TOKENS", 16)
  with _fresh_executables() as loops:
    scores, tokens = run()
  assert loops["prefill_layer"] > whole_loops["prefill_layer"] == 0
  for got, want in zip(scores, whole_scores):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert tokens == whole_tokens
