"""MHA -> GQA head merging by PCA of calibration caches: the calibration statistics against
numpy, the conversion exact where the PCA loses nothing (group 1; duplicated heads), the
value reconstruction error equal to the PCA's residual, the checkpoint round trip through
orbax and kvjax.load, and compression methods on the converted model."""

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.calibration import kv_heads
from kvjax.generation import context, inputs
from kvjax.model import from_flat_params, to_flat_params
from kvjax.ops import rope
from checkpoints_conversion import orbax_io
from tiny import random_prompts, tiny_model


@pytest.fixture(scope="module")
def model():
  return tiny_model(qkv_bias=True, num_heads=4, num_kv_heads=4)


def _batches(seed=0):
  tokens, mask = inputs.left_pad(random_prompts((90, 120, 64), seed), 0)
  return [(tokens, mask)]


def _continuation_logprobs(model):
  prompts = random_prompts((90, 120, 64), seed=7)
  return np.concatenate(kvjax.score(model, [p[:50] for p in prompts],
                                    [p[50:60] for p in prompts]))


def _unrotate(keys, positions, inv_freq):
  """Pre-RoPE keys [B, K, S, D] (float64) from post-RoPE ones."""
  angles = -np.maximum(positions, 0)[..., None] * inv_freq
  cos, sin = np.cos(angles), np.sin(angles)
  half = keys.shape[-1] // 2
  k1, k2 = keys[..., :half], keys[..., half:]
  return np.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], -1)


def test_calibration_grams_match_numpy(model):
  (tokens, mask), = _batches()
  grams = kv_heads.calibration_grams(model, [(tokens, mask)], 2)
  full = context.prefill(model, tokens, mask, kvjax.methods.get("full"), None, room=0)
  inv_freq = rope.inverse_frequencies(model.config).astype(np.float64)
  for layer, (value_gram, key_gram) in zip(full.cache.layers, grams):
    pos = np.asarray(layer.positions)
    real = pos >= 0
    keys = _unrotate(np.asarray(layer.keys, np.float64), pos, inv_freq)
    values = np.asarray(layer.values, np.float64)
    for j in range(2):
      v = np.concatenate([values[:, i][real[:, i]] for i in (2 * j, 2 * j + 1)], -1)
      np.testing.assert_allclose(value_gram[j], v.T @ v, rtol=1e-4, atol=1e-3)
      half = keys.shape[-1] // 2
      z = np.stack([keys[:, i][real[:, i]][:, :half] + 1j * keys[:, i][real[:, i]][:, half:]
                    for i in (2 * j, 2 * j + 1)], -1)                       # [N, d/2, g]
      want = np.einsum("nfi,nfj->fij", z, np.conj(z))
      np.testing.assert_allclose(key_gram[j], want, rtol=1e-4, atol=1e-3)


def test_group_one_is_exact(model):
  merged = kv_heads.compress_kv_heads(model, _batches(), 1)
  np.testing.assert_allclose(_continuation_logprobs(merged), _continuation_logprobs(model),
                             atol=1e-4)


def test_duplicated_heads_merge_exactly(model):
  """Pairs of KV heads that carry the same information (identical values; keys equal up to
  a fixed complex phase per RoPE pair) are rank-deficient exactly as the PCA assumes:
  merging them changes nothing."""
  flat = {k: np.array(v) for k, v in to_flat_params(model).items()}
  half = model.config.head_dim // 2
  alpha = np.random.default_rng(0).uniform(0, 2 * np.pi, half)   # one phase per RoPE pair

  def turned(x):
    """x's RoPE pairs multiplied by e^(j alpha): a complex multiple of the same key, which
    only a complex (per pair) PCA merges exactly."""
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(alpha) - x2 * np.sin(alpha),
                           x2 * np.cos(alpha) + x1 * np.sin(alpha)], -1)

  for layer in range(model.config.num_layers):
    wk, wv = flat[f"layers.{layer}.attn.k.kernel"], flat[f"layers.{layer}.attn.v.kernel"]
    bk, bv = flat[f"layers.{layer}.attn.k.bias"], flat[f"layers.{layer}.attn.v.bias"]
    wk[:, 1], wk[:, 3], bk[1], bk[3] = turned(wk[:, 0]), wk[:, 2], turned(bk[0]), bk[2]
    wv[:, 1], wv[:, 3], bv[1], bv[3] = wv[:, 0], wv[:, 2], bv[0], bv[2]
  twins = from_flat_params(model.config, {k: jnp.asarray(v) for k, v in flat.items()})
  merged = kv_heads.compress_kv_heads(twins, _batches(), 2)
  assert merged.config.num_kv_heads == 2
  np.testing.assert_allclose(_continuation_logprobs(merged), _continuation_logprobs(twins),
                             atol=1e-4)
  one = kv_heads.compress_kv_heads(twins, _batches(), 4)   # 2 distinct heads into 1: lossy
  assert one.config.num_kv_heads == 1
  assert np.abs(_continuation_logprobs(one) - _continuation_logprobs(twins)).max() > 1e-3


def test_value_error_is_the_pca_residual(model):
  """The merged values read back through U_i^T differ from the original values by exactly
  the discarded eigenvalues of the calibration Gram (measured on the calibration tokens;
  layer 0, whose inputs the conversion does not change)."""
  batches = _batches()
  grams = kv_heads.calibration_grams(model, batches, 2)
  merged = kv_heads.merge_kv_heads(model, grams, 2)
  (tokens, mask), = batches
  original = context.prefill(model, tokens, mask, kvjax.methods.get("full"), None, room=0)
  converted = context.prefill(merged, tokens, mask, kvjax.methods.get("full"), None, room=0)
  d = model.config.head_dim
  for layer in (0,):
    real = np.asarray(original.cache.layers[layer].positions)[:, 0] >= 0
    v = np.asarray(original.cache.layers[layer].values, np.float64)
    v_new = np.asarray(converted.cache.layers[layer].values, np.float64)
    for j in range(2):
      group = np.concatenate([v[:, 2 * j][real], v[:, 2 * j + 1][real]], -1)   # [N, 2d]
      eigenvalues, vectors = np.linalg.eigh(grams[layer][0][j])
      u = vectors[:, np.argsort(-eigenvalues)[:d]]
      np.testing.assert_allclose(v_new[:, j][real], group @ u, atol=1e-3)
      residual = ((group - group @ u @ u.T) ** 2).sum()
      np.testing.assert_allclose(residual, np.sort(eigenvalues)[:d].sum(), rtol=1e-3)


def test_checkpoint_round_trip_and_methods_on_top(model, tmp_path):
  merged = kv_heads.compress_kv_heads(model, _batches(), 2)
  path = orbax_io.save(merged, tmp_path / "kv2")
  loaded = kvjax.load(str(path))
  assert loaded.config == merged.config and loaded.config.num_kv_heads == 2
  np.testing.assert_allclose(_continuation_logprobs(loaded), _continuation_logprobs(merged),
                             atol=1e-5)
  prompts = random_prompts((90, 120))
  full = kvjax.generate(model, prompts, max_new_tokens=3)
  half = kvjax.generate(loaded, prompts, max_new_tokens=3)
  # Besides keys, values and positions: int32 lengths (one per row) and a counter per layer.
  fixed = 2 * 4 + model.config.num_layers * 4
  assert half.stats["context_cache_bytes"] - fixed == (
      full.stats["context_cache_bytes"] - fixed) // 2
  snap = kvjax.generate(loaded, prompts, method="snapkv", compression_ratio=0.5,
                        max_new_tokens=3)
  assert snap.stats["context_cache_bytes"] < 0.3 * full.stats["context_cache_bytes"]


def test_group_must_divide_the_kv_heads(model):
  with pytest.raises(kvjax.KvjaxError, match="group=3 must divide num_kv_heads=4"):
    kv_heads.compress_kv_heads(model, _batches(), 3)


def _turned_key_twins(model):
  """The model with KV heads 1 and 3 given the keys of heads 0 and 2 turned by a fixed
  phase per RoPE pair (values untouched: every value head stays distinct)."""
  flat = {k: np.array(v) for k, v in to_flat_params(model).items()}
  half = model.config.head_dim // 2
  alpha = np.random.default_rng(1).uniform(0, 2 * np.pi, half)
  turned = lambda x: np.concatenate([
      x[..., :half] * np.cos(alpha) - x[..., half:] * np.sin(alpha),
      x[..., half:] * np.cos(alpha) + x[..., :half] * np.sin(alpha)], -1)
  for layer in range(model.config.num_layers):
    wk, bk = flat[f"layers.{layer}.attn.k.kernel"], flat[f"layers.{layer}.attn.k.bias"]
    wk[:, 1], wk[:, 3], bk[1], bk[3] = turned(wk[:, 0]), turned(wk[:, 2]), turned(bk[0]), \
        turned(bk[2])
  return from_flat_params(model.config, {k: jnp.asarray(v) for k, v in flat.items()})


def test_key_heads_only_merge_keeps_every_value_head(model, tmp_path):
  """DiffQKV from a pretrained model: key heads merged, value heads and the output
  projection untouched; exact where the key PCA loses nothing; the checkpoint reloads."""
  twins = _turned_key_twins(model)
  merged = kv_heads.compress_kv_heads(twins, _batches(), 2, values=False)
  cfg = merged.config
  assert (cfg.num_kv_heads, cfg.num_value_heads, cfg.num_heads) == (2, 4, 4)
  before, after = to_flat_params(twins), to_flat_params(merged)
  for name in ("layers.1.attn.v.kernel", "layers.1.attn.v.bias", "layers.1.attn.o.kernel"):
    np.testing.assert_array_equal(after[name], before[name])
  assert after["layers.1.attn.k.kernel"].shape == (cfg.hidden_size, 2, cfg.head_dim)
  np.testing.assert_allclose(_continuation_logprobs(merged), _continuation_logprobs(twins),
                             atol=1e-4)
  lossy = kv_heads.compress_kv_heads(model, _batches(), 2, values=False)
  assert np.abs(_continuation_logprobs(lossy) - _continuation_logprobs(model)).max() > 1e-3
  loaded = kvjax.load(str(orbax_io.save(lossy, tmp_path / "k2v4")))
  assert loaded.config == lossy.config
  np.testing.assert_allclose(_continuation_logprobs(loaded), _continuation_logprobs(lossy),
                             atol=1e-5)
  with pytest.raises(kvjax.KvjaxError, match="already has num_value_heads=4"):
    kv_heads.compress_kv_heads(loaded, _batches(), 2)
