"""MiniCache: the merged pair against a numpy restatement (SLERP, norms, retained
outliers), the shared directions stored once, bytes against the analytic size, and every
phase (chunked prefill, questions, score, conversations) through the merged layers."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache import LayerCache
from kvjax.cache.cross_layer import MergedLayerCache
from kvjax.generation import context, inputs
from kvjax.methods import MiniCache
from kvjax.methods.minicache import merge_pair, merged_pairs
from tiny import random_prompts, tiny_model


@pytest.fixture(scope="module")
def model():
  return tiny_model(num_layers=4)


def _dense(rng, b=2, k=2, s=40, d=16, empty=5):
  """Two layers' dense caches over the same tokens; row 1 left-padded by `empty` slots."""
  pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, k, s)).copy()
  pos[1, :, :empty] = -1
  pos[1, :, empty:] -= empty
  layers = []
  base = rng.normal(size=(b, k, s, d))
  for _ in range(2):   # the second layer: the first one's directions, perturbed
    keys = base * rng.uniform(0.5, 2, (b, k, s, 1)) + 0.4 * rng.normal(size=(b, k, s, d))
    values = rng.normal(size=(b, k, s, d))
    keys[pos < 0], values[pos < 0] = 0, 0
    layers.append(LayerCache(keys=jnp.asarray(keys, jnp.float32),
                             values=jnp.asarray(values, jnp.float32),
                             positions=jnp.asarray(pos), end=jnp.int32(s)))
  return layers


def _np_slerp(a, b, t):
  ua = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  ub = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  angle = np.arccos(np.clip((ua * ub).sum(-1), -1, 1))
  with np.errstate(invalid="ignore", divide="ignore"):   # empty (zero) slots: unused
    e = (np.sin((1 - t) * angle)[..., None] * ua + np.sin(t * angle)[..., None] * ub) / np.sin(
        angle)[..., None]
    return e / np.linalg.norm(e, axis=-1, keepdims=True), angle


def _np_rebuilt(x, other, pos, t, retain, first):
  """What a layer's keys (or values) read back: |x| times the pair's SLERP direction,
  the `retain` valid slots per head with the largest angle restored exactly."""
  direction, angle = _np_slerp(*((x, other) if first else (other, x)), t)
  out = np.linalg.norm(x, axis=-1, keepdims=True) * direction
  for row in range(x.shape[0]):
    for kv in range(x.shape[1]):
      valid = np.flatnonzero(pos[row, kv] >= 0)
      top = valid[np.argsort(-angle[row, kv, valid], kind="stable")[:retain]]
      gaps = np.sort(angle[row, kv, valid])[::-1]
      assert gaps[retain - 1] - gaps[retain] > 1e-6, "near tie: change the seed"
      out[row, kv, top] = x[row, kv, top]
  return out


@pytest.mark.parametrize("seed,t,retain", [(0, 0.6, 3), (1, 0.5, 1), (2, 0.3, 8)])
def test_merged_pair_matches_numpy(seed, t, retain):
  a, b = _dense(np.random.default_rng(seed))
  la, lb = merge_pair(a, b, t=t, retain=retain, first=3)
  assert la.source == -1 and lb.source == 3 and lb.shared is None
  lb = lb.borrow((None, None, None, la))
  pos = np.asarray(a.positions)
  for layer, x, other, first in ((la, a, b, True), (lb, b, a, False)):
    dense = layer.dense()
    for got, name in ((dense.keys, "keys"), (dense.values, "values")):
      xs, os_ = (np.asarray(getattr(c, name), np.float64) for c in (x, other))
      want = _np_rebuilt(xs, os_, pos, t, retain, first)
      real = pos >= 0
      np.testing.assert_allclose(np.asarray(got, np.float64)[real], want[real], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(dense.positions), pos)


def test_identical_layers_and_full_retention_are_exact():
  a, b = _dense(np.random.default_rng(4))
  real = np.asarray(a.positions) >= 0
  la, lb = merge_pair(a, a, t=0.6, retain=1, first=0)
  np.testing.assert_allclose(np.asarray(la.dense().keys)[real], np.asarray(a.keys)[real],
                             atol=1e-5)
  la, lb = merge_pair(a, b, t=0.6, retain=40, first=0)
  lb = lb.borrow((la,))
  np.testing.assert_array_equal(np.asarray(lb.dense().keys)[real], np.asarray(b.keys)[real])


def test_bytes_match_the_analytic_size_and_directions_are_stored_once():
  """SmolLM2's KV shape (3 KV heads, head_dim 64), bf16, 4K tokens, retain 0.05."""
  b, k, s, d = 1, 3, 4096, 64
  rng = np.random.default_rng(0)
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, k, s))
  dense = [LayerCache(keys=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.bfloat16),
                      values=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.bfloat16),
                      positions=pos, end=jnp.int32(s)) for _ in range(2)]
  retain = math.ceil(0.05 * s)
  la, lb = merge_pair(*dense, t=0.6, retain=retain, first=0)
  # By hand: the shared directions (keys and values, bf16) once; per layer bf16 key and
  # value norms and int32 positions per slot, retained keys and values (an int32 index and
  # a bf16 vector each) and an empty tail (its int32 counter).
  by_hand = 2 * k * s * d * 2 + 2 * (k * s * (2 + 2 + 4) + 2 * k * retain * (4 + d * 2) + 4)
  got = la.nbytes + lb.nbytes
  assert abs(got - by_hand) <= 0.05 * by_hand, (got, by_hand)
  full = dense[0].nbytes + dense[1].nbytes
  assert 0.55 < got / full < 0.6, got / full     # half, plus norms and 5% outliers


def test_generation_through_merged_layers(model):
  prompts = random_prompts((90, 120))
  full = kvjax.generate(model, prompts, max_new_tokens=6)
  exact = kvjax.generate(model, prompts, method=MiniCache(retain=1.0, start=0.0),
                         max_new_tokens=6)
  assert exact.token_ids == full.token_ids
  merged = kvjax.generate(model, prompts, method=MiniCache(start=0.0), max_new_tokens=6)
  assert merged.stats["context_cache_bytes"] < 0.75 * full.stats["context_cache_bytes"]
  tokens, mask = inputs.left_pad(prompts, 0)
  pre = context.prefill(model, tokens, mask, MiniCache(start=0.0), None, room=3)
  layers = pre.cache.layers
  assert all(isinstance(layer, MergedLayerCache) for layer in layers)
  assert [layer.shared is None for layer in layers] == [False, True, False, True]
  assert layers[1].free_slots() == 3
  assert merged_pairs(4, 0.5) == [(2, 3)] and merged_pairs(5, 0.0) == [(0, 1), (2, 3)]


def test_every_phase_runs_through_minicache(model):
  prompts = random_prompts((90, 120))
  method = MiniCache(start=0.0)
  one = kvjax.generate(model, prompts, questions=[[5, 6, 7], [8, 9]], method=method,
                       max_new_tokens=4)
  chunked = kvjax.generate(model, prompts, questions=[[5, 6, 7], [8, 9]], method=method,
                           prefill_chunk_size=32, max_new_tokens=4)
  assert chunked.token_ids == one.token_ids
  scores = kvjax.score(model, prompts, [[1, 2, 3]] * 2, method=method)
  exact = kvjax.score(model, prompts, [[1, 2, 3]] * 2)
  for a, e in zip(scores, exact):
    assert np.isfinite(a).all() and not np.allclose(a, e, atol=1e-6)
  kept = kvjax.score(model, prompts, [[1, 2, 3]] * 2, method=MiniCache(retain=1.0, start=0.0))
  for a, e in zip(kept, exact):
    np.testing.assert_allclose(a, e, atol=1e-4)


def test_conversation_through_minicache(smollm2_tokenizer):
  from tiny import tiny_chat_model
  chat = tiny_chat_model(smollm2_tokenizer, max_position_embeddings=2048)
  text = " ".join(f"Fact {i}: the code word is word{i}." for i in range(12))
  turns = ["First?", "Second?"]
  full = kvjax.converse(chat, text, turns, max_new_tokens=4)
  same = kvjax.converse(chat, text, turns, method=MiniCache(retain=1.0, start=0.0),
                        max_new_tokens=4)
  assert same.answers == full.answers
  merged = kvjax.converse(chat, text, turns, method=MiniCache(start=0.0), max_new_tokens=4)
  assert len(merged.answers[0]) == 2
  # The bucket padding of the prompt is trimmed before the merge: compare with the full
  # cache of the context itself.
  assert merged.stats["context_cache_bytes"] < 0.7 * full.stats["context_cache_bytes"]


@pytest.mark.parametrize("build,match", [
    (lambda: MiniCache(t=1.5), r"t=1.5"), (lambda: MiniCache(retain=-0.1), r"retain=-0.1"),
    (lambda: MiniCache(start=1.0), r"start=1.0"),
    (lambda: kvjax.methods.get("adakv", press="minicache"), "cross_layer method"),
])
def test_minicache_errors(build, match):
  with pytest.raises(kvjax.KvjaxError, match=match):
    build()


def test_a_context_of_another_length_decodes_with_the_same_compiled_loop(model, monkeypatch):
  """A merged pair's shared slots are cut to the real context (`trims_padding`), so
  `generate` rounds them with reserved ones, and their retained entries with as many more
  as the retain fraction gives them: prompts of other lengths share one compiled decode
  loop, and generate what the unpadded cache generates."""
  from kvjax.cache.cross_layer import SharesLayers
  from tiny import reserved_and_unreserved
  prompts = [random_prompts((n, n - 7), seed=4) for n in (100, 110)]
  (loops, padded), (exact_loops, exact) = reserved_and_unreserved(
      model, prompts, SharesLayers, monkeypatch, method=MiniCache(start=0.0), max_new_tokens=8)
  # 100 or 110 shared slots with 5 or 6 retained per head: 128 and 7 once reserved.
  assert (loops, exact_loops) == (1, 2)
  assert [r.token_ids for r in padded] == [r.token_ids for r in exact]
  assert padded[0].stats["cache_capacity_tokens"] == padded[1].stats["cache_capacity_tokens"]


def test_pairs_of_one_shape_share_one_compiled_merge():
  """`first` names the owner outside the compiled merge: the pairs of a deep model (seven
  in SmolLM2) compile one merge, not one each."""
  from kvjax.methods import minicache
  a, b = _dense(np.random.default_rng(0))
  minicache._merged.clear_cache()
  pairs = [merge_pair(a, b, t=0.6, retain=2, first=first) for first in (0, 2, 4)]
  assert minicache._merged._cache_size() == 1
  assert [(x.source, y.source) for x, y in pairs] == [(-1, 0), (-1, 2), (-1, 4)]
