"""xKV: the rebuilt keys and values against a numpy restatement (undo RoPE, truncated SVD of
the group side by side, rotate back), the factors stored once per group, bytes against the
analytic size, and every phase through the low-rank layers."""

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache import LayerCache
from kvjax.cache.cross_layer import LowRankLayerCache, view_layer
from kvjax.generation import context, inputs
from kvjax.methods import XKV
from kvjax.methods.xkv import layer_groups, merge_group
from test_minicache import _dense
from tiny import random_prompts, tiny_model


@pytest.fixture(scope="module")
def model():
  return tiny_model(num_layers=4)


def _rotate(x, positions, inv_freq, sign):
  """Rotate-half RoPE of x [B, K, S, D] by sign * positions [B, K, S] (float64)."""
  angles = sign * np.maximum(positions, 0)[..., None] * inv_freq
  cos, sin = np.cos(angles), np.sin(angles)
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _np_group(layers, key_rank, value_rank, inv_freq):
  """Per layer (keys, values) [B, K, S, D] as xKV reads them back."""
  pos = np.asarray(layers[0].positions)
  b, k, s, d = layers[0].keys.shape
  flat = lambda x: x.transpose(0, 2, 1, 3).reshape(b, s, k * d)
  keys = np.concatenate([flat(_rotate(np.asarray(l.keys, np.float64), pos, inv_freq, -1))
                         for l in layers], -1)
  values = np.concatenate([flat(np.asarray(l.values, np.float64)) for l in layers], -1)

  def low_rank(x, r):
    out = np.zeros_like(x)
    for row in range(b):
      u, sigma, vt = np.linalg.svd(x[row], full_matrices=False)
      assert sigma[r - 1] - sigma[r] > 1e-6 * sigma[0], "near-degenerate rank: change seed"
      out[row] = (u[:, :r] * sigma[:r]) @ vt[:r]
    return out

  keys, values = low_rank(keys, key_rank), low_rank(values, value_rank)
  unflat = lambda x, j: x[..., j * k * d:(j + 1) * k * d].reshape(b, s, k, d).transpose(0, 2, 1, 3)
  return [(_rotate(unflat(keys, j), pos, inv_freq, 1), unflat(values, j))
          for j in range(len(layers))]


@pytest.mark.parametrize("seed,key_rank,value_rank", [(0, 8, 12), (1, 3, 20), (2, 30, 1)])
def test_group_matches_numpy(seed, key_rank, value_rank):
  rng = np.random.default_rng(seed)
  layers = _dense(rng) + _dense(rng)[:1]             # a group of three layers
  inv_freq = tuple(1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16))
  merged = merge_group(tuple(layers), first=5, key_rank=key_rank, value_rank=value_rank,
                       inv_freq=inv_freq)
  assert [m.source for m in merged] == [-1, 5, 5]
  assert merged[0].shared is not None and merged[1].shared is None
  want = _np_group(layers, key_rank, value_rank, np.asarray(inv_freq))
  real = np.asarray(layers[0].positions) >= 0
  lookup = (None,) * 5 + (merged[0],)
  for layer, (keys, values) in zip(merged, want):
    dense = layer.borrow(lookup).dense()
    np.testing.assert_allclose(np.asarray(dense.keys, np.float64)[real], keys[real], atol=2e-4)
    np.testing.assert_allclose(np.asarray(dense.values, np.float64)[real], values[real],
                               atol=2e-4)
    assert (np.asarray(dense.keys)[~real] == 0).all()


def test_bytes_match_the_analytic_size():
  """SmolLM2's KV shape (3 KV heads, head_dim 64), bf16, 4K tokens, the default group of
  4 and ranks 0.125 / 0.1875 of the 768 columns (96 and 144)."""
  b, k, s, d = 1, 3, 4096, 64
  rng = np.random.default_rng(0)
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, k, s))
  layers = tuple(LayerCache(keys=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.bfloat16),
                            values=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.bfloat16),
                            positions=pos, end=jnp.int32(s)) for _ in range(4))
  assert XKV().ranks(4 * k * d, s) == (96, 144)
  merged = merge_group(layers, first=0, key_rank=96, value_rank=144,
                       inv_freq=tuple(np.ones(32) * 0.01))
  # By hand: the basis once (S x (96 + 144) bf16); per layer its coefficients
  # ((96 + 144) x 192 bf16), int32 positions per slot and head, an empty tail's counter.
  by_hand = s * 240 * 2 + 4 * (240 * 192 * 2 + k * s * 4 + 4)
  got = sum(m.nbytes for m in merged)
  assert abs(got - by_hand) <= 0.05 * by_hand, (got, by_hand)
  full = sum(l.nbytes for l in layers)
  # The basis: 240 of 4 x 2 x 192 = 1536 values per token (0.156); positions and the
  # coefficients add about 0.04.
  assert 0.18 < got / full < 0.22, got / full


def test_generation_through_low_rank_layers(model):
  prompts = random_prompts((90, 120))
  full = kvjax.generate(model, prompts, max_new_tokens=6)
  exact = kvjax.generate(model, prompts, method=XKV(key_rank=1.0, value_rank=1.0),
                         max_new_tokens=6)
  assert exact.token_ids == full.token_ids
  tokens, mask = inputs.left_pad(prompts, 0)
  pre = context.prefill(model, tokens, mask, XKV(group=3), None, room=2)
  layers = pre.cache.layers
  assert all(isinstance(layer, LowRankLayerCache) for layer in layers)
  assert [layer.source for layer in layers] == [-1, 0, 0, -1]
  assert view_layer(layers, 2).shared is layers[0].shared
  assert layers[1].free_slots() == 2
  assert layer_groups(4, 3) == [(0, 1, 2), (3,)]
  low = kvjax.generate(model, prompts, method="xkv", max_new_tokens=6)
  assert low.stats["context_cache_bytes"] < 0.5 * full.stats["context_cache_bytes"]


def test_every_phase_runs_through_xkv(model, smollm2_tokenizer):
  prompts = random_prompts((90, 120))
  method = XKV(group=2)
  one = kvjax.generate(model, prompts, questions=[[5, 6, 7], [8, 9]], method=method,
                       max_new_tokens=4)
  chunked = kvjax.generate(model, prompts, questions=[[5, 6, 7], [8, 9]], method=method,
                           prefill_chunk_size=32, max_new_tokens=4)
  assert chunked.token_ids == one.token_ids
  exact = kvjax.score(model, prompts, [[1, 2, 3]] * 2)
  kept = kvjax.score(model, prompts, [[1, 2, 3]] * 2, method=XKV(key_rank=1.0, value_rank=1.0))
  for a, e in zip(kept, exact):
    np.testing.assert_allclose(a, e, atol=1e-4)
  from tiny import tiny_chat_model
  chat = tiny_chat_model(smollm2_tokenizer, max_position_embeddings=2048)
  text = " ".join(f"Fact {i}: the code word is word{i}." for i in range(12))
  full = kvjax.converse(chat, text, ["First?", "Second?"], max_new_tokens=4)
  same = kvjax.converse(chat, text, ["First?", "Second?"], max_new_tokens=4,
                        method=XKV(key_rank=1.0, value_rank=1.0))
  assert same.answers == full.answers


@pytest.mark.parametrize("build,match", [
    (lambda: XKV(group=0), r"group=0"), (lambda: XKV(key_rank=0.0), r"key_rank=0.0"),
    (lambda: XKV(value_rank=1.5), r"value_rank=1.5"),
    (lambda: kvjax.methods.get("kivi", press="xkv"), "cross_layer method"),
])
def test_xkv_errors(build, match):
  with pytest.raises(kvjax.KvjaxError, match=match):
    build()


def test_a_context_of_another_length_decodes_with_the_same_compiled_loop(model, monkeypatch):
  """A group's basis rows are cut to the real context (`trims_padding`), so `generate`
  rounds them with reserved ones (the owner's basis rows zero, every member's positions
  reserved): prompts of other lengths share one compiled decode loop, and generate what
  the unpadded cache generates."""
  from kvjax.cache.cross_layer import SharesLayers
  from tiny import reserved_and_unreserved
  prompts = [random_prompts((n, n - 7), seed=4) for n in (90, 100)]
  (loops, padded), (exact_loops, exact) = reserved_and_unreserved(
      model, prompts, SharesLayers, monkeypatch, method=XKV(key_rank=0.5, value_rank=0.5),
      max_new_tokens=8)
  # 90 or 100 shared slots, both 128 once reserved.
  assert (loops, exact_loops) == (1, 2)
  assert [r.token_ids for r in padded] == [r.token_ids for r in exact]
  assert padded[0].stats["cache_capacity_tokens"] == padded[1].stats["cache_capacity_tokens"]


def test_groups_of_one_shape_share_one_compiled_merge():
  """`first` names the owner outside the compiled merge: the groups of a deep model (seven
  of four in SmolLM2) compile one merge, not one each."""
  from kvjax.methods import xkv
  layers = tuple(_dense(np.random.default_rng(0)))
  xkv._merged.clear_cache()
  inv_freq = tuple(1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16))
  groups = [merge_group(layers, first=first, key_rank=4, value_rank=4, inv_freq=inv_freq)
            for first in (0, 2, 4)]
  assert xkv._merged._cache_size() == 1
  assert [[m.source for m in group] for group in groups] == [[-1, 0], [-1, 2], [-1, 4]]
