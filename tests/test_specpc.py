"""SpecPC: the token choice against a literal restatement of the official code's steps, the
draft's recorded attention against numpy, and the method end to end."""

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import method_inputs as mi
from kvjax.cache.kv_cache import LayerCache, NewTokens
from kvjax.cache.policy import LayerStep
from kvjax.errors import MethodError
from kvjax.generation import context, inputs
from kvjax.methods.specpc import AttentionRecorder, SpecPC, select_tokens
from tiny import random_prompts, tiny_model


def _code_steps(scores, budget, window, kernel, neighbors):
  """specpc_select_input_token_indices, step by step in plain Python: centred zero-padded
  max-pool; top `budget` by score (ties to the lower index); each index followed by its
  neighbours nearest first (clamped); the window prepended; first occurrences kept; cut to
  the budget; sorted."""
  n = len(scores)
  if budget >= n:
    return list(range(n))
  left = (kernel - 1) // 2
  padded = [0.0] * left + list(scores) + [0.0] * (kernel - 1 - left)
  pooled = [max(padded[i:i + kernel]) for i in range(n)]
  ranked = sorted(range(n), key=lambda i: (-pooled[i], i))[:budget]
  offsets = list(range(-((neighbors - 1) // 2), neighbors - 1 - (neighbors - 1) // 2 + 1))
  offsets.sort(key=abs)                       # stable: -1 before 1
  expanded = [min(max(i + o, 0), n - 1) for i in ranked for o in offsets] if neighbors else ranked
  order, seen = [], set()
  for i in list(range(n - min(window, n), n)) + expanded:
    if i not in seen:
      seen.add(i)
      order.append(i)
  return sorted(order[:budget])


@pytest.mark.parametrize("n, budget, window, kernel, neighbors", [
    (100, 30, 8, 6, 6), (100, 30, 8, 7, 0), (64, 20, 4, 32, 32), (50, 60, 8, 5, 5),
    (80, 12, 16, 3, 4)])
def test_token_choice_matches_the_codes_steps(n, budget, window, kernel, neighbors):
  rng = np.random.default_rng(n + budget)
  scores = rng.random(n) ** 4
  got = select_tokens(scores, budget, window, kernel, neighbors).tolist()
  assert got == _code_steps(scores.tolist(), budget, window, kernel, neighbors)
  assert len(got) == min(budget, n)
  if budget < n and window <= budget:
    assert got[-window:] == list(range(n - window, n))
  elif budget < n:   # a window above the budget: its oldest tokens (the code's order)
    assert got == list(range(n - window, n - window + budget))


def test_recorder_matches_numpy():
  data = mi.random_prefill(4, lengths=(40, 30), s=40)
  cfg = mi.config()
  layer = LayerCache(keys=jnp.asarray(data.k, jnp.float32), values=jnp.asarray(data.v, jnp.float32),
                     positions=jnp.asarray(data.kpos), end=jnp.int32(40))
  new = NewTokens(keys=jnp.asarray(data.k, jnp.float32), values=jnp.asarray(data.v, jnp.float32),
                  positions=jnp.asarray(data.qpos))
  step = LayerStep(config=cfg, queries=jnp.asarray(data.q, jnp.float32),
                   raw_queries=jnp.asarray(data.raw_q, jnp.float32), new=new,
                   lengths=jnp.asarray(data.lengths))
  _, got = AttentionRecorder(window=10, first_layer=0).update(1, layer, step, None)
  probs = mi.attention(data.q, data.k, data.qpos, data.kpos)[:, :, -10:]   # [B, H, 10, S]
  want = (probs * np.linspace(0, 1, 10)[:, None]).max(axis=(1, 2))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
  assert AttentionRecorder(window=10, first_layer=2).update(1, layer, step, None)[1] is None


def test_scores_take_the_max_over_passes_and_layers():
  positions = np.array([[-1, 0, 1, 2], [0, 1, 2, 3]])
  passes = [[np.array([[9, 1, 2, 3], [1, 2, 3, 4.]]), np.array([[0, 5, 0, 0], [0, 0, 0, 9.]])],
            [np.array([[0, 0, 7, 0, 8], [3, 0, 0, 0, 8.]])]]        # a decode pass: one more slot
  got = SpecPC.prompt_scores(passes, positions)
  assert [g.tolist() for g in got] == [[5, 7, 3], [3, 2, 3, 9]]


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=0, num_layers=4)


PROMPTS = random_prompts([150, 120], seed=1)


def test_end_to_end(model):
  full = kvjax.generate(model, PROMPTS, max_new_tokens=6)
  every = kvjax.generate(model, PROMPTS, method="specpc", budget=1000, max_new_tokens=6)
  assert every.token_ids == full.token_ids
  half = kvjax.generate(model, PROMPTS, method="specpc", compression_ratio=0.5,
                        max_new_tokens=6)
  ratio = half.stats["context_cache_bytes"] / full.stats["context_cache_bytes"]
  assert 0.48 < ratio < 0.52 and [len(t) for t in half.token_ids] == [6, 6]
  tokens, mask = inputs.left_pad(PROMPTS, 0)
  kept, kept_mask = context.compressed_prompt(model, SpecPC(lookahead=3), tokens, mask, 40,
                                              chunk_size=32)
  assert kept.shape[1] == 64 and kept_mask.sum(1).tolist() == [40, 40]
  for row, prompt in zip(kept, PROMPTS):
    chosen = row[-40:].tolist()
    assert chosen[-39:] == prompt[-39:]      # the window shrunk to the budget - 1
    it = iter(prompt)
    assert all(token in it for token in chosen)   # a subsequence of the prompt


@pytest.mark.parametrize("spec, match", [
    ("specpc:lookahead=0", "lookahead"), ("specpc:kernel_size=0", "kernel_size"),
    ("specpc:draft_fraction=1.5", "draft_fraction"), ("specpc:window=-1", "window")])
def test_bad_hyperparameters(spec, match):
  with pytest.raises(MethodError, match=match):
    kvjax.methods.get(spec)
