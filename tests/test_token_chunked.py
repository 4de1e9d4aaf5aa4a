"""A layer's token-wise tail (norm, MLP, residual) runs in pieces of tokens on CPU
(`transformer.token_chunked`): the same numbers as whole, up to float rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.generation import engine
from kvjax.model import transformer
from tests.tiny import random_prompts, tiny_model


def _token_wise(w, traced_shapes):
  def fn(y):
    traced_shapes.append(y.shape)
    return jnp.tanh(y @ w) * y + y
  return fn


@pytest.mark.parametrize("b,t,chunk,piece", [
    (1, 10, 4, (1, 4, 8)),      # 3 pieces of 4 tokens, the last padded by 2
    (3, 7, 5, (3, 2, 8)),       # 21 tokens: 5 pieces of 3 rows x 2 tokens
    (2, 6, 12, None),           # 12 tokens fit one piece: whole
    (4, 1, 1, None),            # one token per row (a decode step): never split
])
def test_pieces_give_what_the_whole_gives(monkeypatch, b, t, chunk, piece):
  monkeypatch.setattr(transformer, "CHUNK_TOKENS", chunk)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, t, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
  shapes = []
  fn = _token_wise(w, shapes)
  got = jax.jit(lambda x: transformer.token_chunked(fn, x))(x)
  np.testing.assert_allclose(got, fn(x), rtol=1e-6, atol=1e-6)
  if piece is None:
    assert shapes == [(b, t, 8), (b, t, 8)]
  else:
    assert piece in shapes
  # Differentiable (training runs the model's layers through it).
  loss = lambda f: lambda x: (f(x) ** 2).sum()
  np.testing.assert_allclose(jax.grad(loss(lambda x: transformer.token_chunked(fn, x)))(x),
                             jax.grad(loss(fn))(x), rtol=1e-5, atol=1e-5)


def test_model_in_pieces_matches_the_model_whole(monkeypatch):
  """The tiny model's log-probs of a continuation and its greedy tokens, with the layers'
  tails in pieces of 16 tokens (3 rows of up to 40), against the same model whole."""
  model = tiny_model(seed=1)
  prompts = random_prompts([40, 31, 36], seed=2)
  continuations = random_prompts([24, 30, 27], seed=3)
  run = lambda: (kvjax.score(model, prompts, continuations),
                 kvjax.generate(model, prompts, max_new_tokens=6).token_ids)
  whole_scores, whole_tokens = run()
  monkeypatch.setattr(transformer, "CHUNK_TOKENS", 16)
  # Traced and compiled again, not served from the executables compiled whole.
  monkeypatch.setattr(engine, "STEPS", engine.CompiledSteps())
  jax.clear_caches()
  scores, tokens = run()
  for got, want in zip(scores, whole_scores):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert tokens == whole_tokens
