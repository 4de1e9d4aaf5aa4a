"""GEAR: outliers and power iteration against numpy restatements, the reconstruction error
ordering (KIVI > + outliers > + low rank), the layout's shapes and bytes against the
analytic size, decode flushes, every phase (chunked prefill, questions, score,
conversations) through the cache, the kernel path, and hyperparameter errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache import LayerCache
from kvjax.cache import gear as gear_cache
from kvjax.cache.gear import GearLayerCache, analytic_nbytes
from kvjax.cache.quantized import QuantizedLayerCache
from kvjax.generation import context, engine, inputs
from kvjax.methods import GEAR, KIVI, SnapKV
from kvjax.ops import gear as gear_ops
from test_quantized import _np_quantize
from tiny import jnp_and_kernel_tokens, random_prompts, tiny_chat_model, tiny_model

# head_dim 64: GEAR's group 64 and 2-bit packing fit, like SmolLM2's heads.
D = 64


@pytest.fixture(scope="module")
def model():
  return tiny_model(head_dim=D)


def _prompts(lengths=(150, 200), seed=0):
  return random_prompts(lengths, seed)


def _planted(rng, n, d, outliers=12):
  """Smooth low-rank-ish data plus noise plus a few large outliers."""
  x = rng.normal(size=(n, 3)) @ rng.normal(size=(3, d)) + 0.3 * rng.normal(size=(n, d))
  rows, cols = rng.integers(0, n, outliers), rng.integers(0, d, outliers)
  x[rows, cols] += rng.choice([-1, 1], outliers) * rng.uniform(8, 15, outliers)
  return x


# ----------------------------------------------------------------------------- numpy GEAR


def _np_outliers(x, valid, count, axis):
  """float64 restatement: per vector (keys: channel over tokens; values: token over
  channels) the `count` largest and `count` smallest valid entries, replaced by the mean
  of the vector's valid entries. Returns (filled, {(vector, index): value})."""
  v = x.T.copy() if axis == "tokens" else x.copy()
  m = np.broadcast_to(valid[None, :] if axis == "tokens" else valid[:, None], v.shape)
  picked = {}
  for i in range(v.shape[0]):
    idx = np.flatnonzero(m[i])
    if idx.size == 0 or count == 0:
      continue
    vals = v[i, idx]
    top = idx[np.argsort(-vals, kind="stable")[:count]]
    bottom = idx[np.argsort(vals, kind="stable")[:count]]
    mean = vals.mean()
    for j in np.concatenate([top, bottom]):
      picked[(i, int(j))] = v[i, j]
    v[i, np.concatenate([top, bottom])] = mean
  return (v.T if axis == "tokens" else v), picked


def _np_power_iteration(r, rank, loops, p0):
  """GEAR's power iteration in float64 from start p0 [d, rank]: QR at the last loop."""
  p = p0.astype(np.float64)
  q = None
  for i in range(loops):
    if i == loops - 1:
      p = np.linalg.qr(p)[0]
    q = r @ p
    if i == loops - 1:
      q = np.linalg.qr(q)[0]
    p = r.T @ q
  return q, p


def _start(d, rank):
  return np.asarray(jax.random.uniform(jax.random.key(gear_ops.START_SEED), (d, rank),
                                       jnp.float32), np.float64)


def _np_gear(x, valid, axis, *, bits, group, rank, loops, ratio):
  """float64 GEAR of one block x [n, d]: outliers out, KIVI quantize, outliers back,
  low-rank fit of the residual (empty rows zero)."""
  length = x.shape[0] if axis == "tokens" else x.shape[1]
  filled, picked = _np_outliers(x, valid, gear_ops.outlier_count(length, ratio), axis)
  approx = _np_quantize(filled, valid, bits, group, axis)
  for (i, j), value in picked.items():
    if axis == "tokens":
      approx[j, i] = value
    else:
      approx[i, j] = value
  residual = np.where(valid[:, None], x - approx, 0.0)
  if rank:
    a, b = _np_power_iteration(residual, rank, loops, _start(x.shape[1], rank))
    approx = approx + a @ b.T
  return approx


def _jnp_gear(x, valid, axis, *, bits, group, rank, loops, ratio):
  """The layer cache's compress_block -> reconstruct of x [n, d] as keys or values."""
  xs = jnp.asarray(x, jnp.float32)[None, None]
  positions = jnp.where(jnp.asarray(valid), jnp.arange(x.shape[0]), -1)[None, None]
  part = gear_cache.compress_block(xs, xs, positions.astype(jnp.int32), bits=bits,
                                   group=group, rank=rank, loops=loops, outlier_ratio=ratio,
                                   dtype=jnp.float32)
  keys, values = gear_cache.reconstruct(part, bits=bits, group=group, dtype=jnp.float32)
  return np.asarray(keys if axis == "tokens" else values, np.float64)[0, 0]


@pytest.mark.parametrize("axis", ["tokens", "channels"])
def test_outliers_match_numpy(axis):
  rng = np.random.default_rng(1)
  n, d = 48, 32
  x = _planted(rng, n, d)
  valid = np.ones(n, bool)
  valid[:5] = False           # left padding
  valid[20] = False           # a masked decode step
  x[~valid] = 100.0           # empty slots must never be picked nor enter a mean
  count = gear_ops.outlier_count(n if axis == "tokens" else d, 0.1)
  want_filled, want = _np_outliers(x, valid, count, axis)
  filled, values, index = gear_ops.extract_outliers(jnp.asarray(x, jnp.float32),
                                                    jnp.asarray(valid), count, axis)
  filled, values, index = (np.asarray(a) for a in (filled, values, index))
  assert values.shape == index.shape == ((d if axis == "tokens" else n), 2 * count)
  got = {}
  for i in range(index.shape[0]):
    if axis == "channels" and not valid[i]:
      continue   # an empty token has no outliers to compare
    for j, value in zip(index[i], values[i]):
      got[(i, int(j))] = value
  assert set(got) == set(want)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-6)
  np.testing.assert_allclose(filled[valid], want_filled[valid], rtol=1e-5, atol=1e-5)
  # Putting the outliers back restores x exactly where they were.
  restored = np.asarray(gear_ops.put_outliers(jnp.asarray(filled), jnp.asarray(values),
                                              jnp.asarray(index), axis))
  for (i, j) in want:
    at = (j, i) if axis == "tokens" else (i, j)
    assert restored[at] == np.float32(x[at])


def test_outlier_count_rounds_up():
  assert gear_ops.outlier_count(64, 0.02) == 1        # 0.64 -> 1 of each side
  assert gear_ops.outlier_count(4096, 0.02) == 41     # 40.96 -> 41
  assert gear_ops.outlier_count(100, 0.02) == 1       # exactly 1, not ceil(1 + ulp) = 2
  assert gear_ops.outlier_count(64, 0.0) == 0
  assert gear_ops.outlier_count(8, 0.5) == 2


def test_full_rank_recovers_the_residual():
  rng = np.random.default_rng(2)
  for n, d in ((40, 16), (12, 32)):
    r = rng.normal(size=(n, d))
    a, b = gear_ops.power_iteration(jnp.asarray(r, jnp.float32), min(n, d), 3)
    got = np.asarray(gear_ops.low_rank(a, b), np.float64)
    assert np.linalg.norm(got - r) <= 1e-5 * np.linalg.norm(r)
    qa, qb = _np_power_iteration(r, min(n, d), 3, _start(d, min(n, d)))
    np.testing.assert_allclose(qa @ qb.T, r, atol=1e-9)


def test_power_iteration_is_near_svd_and_deterministic():
  """A matrix with a clear spectral gap: the rank-4 error is within 5% of the optimal
  (truncated SVD) error, in numpy and in jnp; repeated calls give the same bits."""
  rng = np.random.default_rng(3)
  n, d, rank = 200, 64, 4
  u, _ = np.linalg.qr(rng.normal(size=(n, d)))
  v, _ = np.linalg.qr(rng.normal(size=(d, d)))
  sigma = np.concatenate([[40, 30, 20, 15], np.linspace(1.0, 0.1, d - 4)])
  m = (u * sigma) @ v.T
  optimal = np.sqrt((sigma[rank:] ** 2).sum())
  a, b = gear_ops.power_iteration(jnp.asarray(m, jnp.float32), rank, 3)
  err = np.linalg.norm(m - np.asarray(gear_ops.low_rank(a, b), np.float64))
  qa, qb = _np_power_iteration(m, rank, 3, _start(d, rank))
  np_err = np.linalg.norm(m - qa @ qb.T)
  assert optimal <= np_err <= 1.05 * optimal
  assert optimal * 0.999 <= err <= 1.05 * optimal
  np.testing.assert_allclose(err, np_err, rtol=1e-4)
  a2, b2 = gear_ops.power_iteration(jnp.asarray(m, jnp.float32), rank, 3)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
  np.testing.assert_array_equal(np.asarray(b), np.asarray(b2))
  # Without a gap it is still a projection: no worse than dropping D altogether.
  noise = rng.normal(size=(n, d))
  a, b = gear_ops.power_iteration(jnp.asarray(noise, jnp.float32), rank, 3)
  assert np.linalg.norm(noise - np.asarray(gear_ops.low_rank(a, b))) < np.linalg.norm(noise)


@pytest.mark.parametrize("axis", ["tokens", "channels"])
def test_compression_matches_numpy_and_each_term_helps(axis):
  """The layer cache's compress -> reconstruct equals the float64 restatement, and the
  error falls strictly: KIVI alone > + outliers > + low rank."""
  rng = np.random.default_rng(4)
  n, d = 128, 64
  x = _planted(rng, n, d, outliers=40)
  valid = np.ones(n, bool)
  valid[:7] = False
  x[~valid] = 0.0
  errors = []
  for rank, ratio in ((0, 0.0), (0, 0.02), (4, 0.02)):
    opts = dict(bits=2, group=32, rank=rank, loops=3, ratio=ratio)
    want = _np_gear(x, valid, axis, **opts)
    got = _jnp_gear(x, valid, axis, **opts)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-3 * np.abs(x).max())
    errors.append(np.linalg.norm((x - got)[valid]))
    assert np.linalg.norm((x - want)[valid]) == pytest.approx(errors[-1], rel=1e-3)
  kivi, sparse, full = errors
  assert kivi > 1.2 * sparse and sparse > 1.05 * full, errors


# ----------------------------------------------------------------------------- layout


def _dense(rng, b, k, s, d, dtype):
  return LayerCache(keys=jnp.asarray(rng.normal(size=(b, k, s, d)), dtype),
                    values=jnp.asarray(rng.normal(size=(b, k, s, d)), dtype),
                    positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, k, s)),
                    end=jnp.int32(s))


def test_without_corrections_gear_is_kivi():
  """rank 0 and no outliers: exactly KIVI's codes and reconstruction."""
  rng = np.random.default_rng(5)
  dense = _dense(rng, 2, 2, 200, D, jnp.bfloat16)
  gear = GearLayerCache.from_dense(dense, bits=2, group=64, window=32, rank=0, decode_rank=0,
                                   loops=3, outlier_ratio=0.0)
  kivi = QuantizedLayerCache.from_dense(dense, 2, 64, 32)
  for a, b in zip(jax.tree_util.tree_leaves(gear.prompt.quantized),
                  jax.tree_util.tree_leaves(kivi.quantized)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree_util.tree_leaves(gear.dequantized()),
                  jax.tree_util.tree_leaves(kivi.dequantized())):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_layout_shapes_and_memory_match_analytic_size():
  """At SmolLM2's KV shape (3 KV heads, head_dim 64), bf16, 4K context, GEAR's defaults:
  every stored piece has its analytic shape, the bytes are within 5% of the analytic
  size, and the ratio to the full bf16 cache is what codes + outliers + factors cost.
  Then 150 decode tokens: two flushed groups (decode rank) and the rest waiting."""
  b, k, s, d = 1, 3, 4096, 64
  rng = np.random.default_rng(0)
  dense = _dense(rng, b, k, s, d, jnp.bfloat16)
  full = dense.nbytes
  method = GEAR()
  opts = dict(bits=method.bits, group=method.group_size, rank=method.rank,
              decode_rank=method.decode_rank, outlier_ratio=method.outlier_ratio)
  layer = GearLayerCache.from_dense(dense, window=method.residual, loops=method.loops, **opts)
  p = layer.prompt
  assert p.quantized.key_codes.shape == (b, k, s, d * 2 // 32)
  assert p.quantized.key_scale.shape == (b, k, s // 64, d)
  assert p.quantized.value_scale.shape == (b, k, s, 1)
  assert p.key_outliers.values.shape == p.key_outliers.indices.shape == (b, k, 1, d, 2 * 41)
  assert p.value_outliers.values.shape == (b, k, s, 2)
  assert p.key_outliers.indices.dtype == jnp.int32 == p.value_outliers.indices.dtype
  assert p.key_outliers.values.dtype == jnp.bfloat16
  assert p.key_factors.a.shape == p.value_factors.a.shape == (b, k, s, 4)
  assert p.key_factors.b.shape == p.value_factors.b.shape == (b, k, 1, d, 4)
  assert layer.decode.capacity == 0 and layer.residual.capacity == 0
  expected = analytic_nbytes(b, k, s, 0, 0, d, dtype=jnp.bfloat16, **opts)
  assert abs(layer.nbytes - expected) <= 0.05 * expected
  ratio = layer.nbytes / full
  kivi = QuantizedLayerCache.from_dense(dense, 2, 64, 0).nbytes / full
  print(f"\nGEAR-2 defaults at 4K, bf16: {ratio:.4f} of full (KIVI-2, group 64: {kivi:.4f})")
  # 2-bit codes (0.125) + scales and zeros (0.031) + int32 positions (0.016) + outliers
  # (0.077) + rank-4 factors (0.063) of the 2 bytes per value of the full cache.
  assert 0.29 < ratio < 0.32 and 0.16 < kivi < 0.175
  # Decode: 150 tokens, 2 groups of 64 flushed and compressed with rank 2, 22 waiting.
  grown = layer.grow(150)
  new = _dense(rng, b, k, 150, d, jnp.bfloat16)
  grown = grown.append(kvjax.cache.NewTokens(keys=new.keys, values=new.values,
                                             positions=(s + jnp.arange(150))[None]))
  assert int(grown.end) == 128 and int(grown.residual.end) == 22
  dec = grown.decode
  assert dec.key_factors.a.shape == (b, k, 192, 2) and dec.key_factors.b.shape == (b, k, 3, d, 2)
  assert dec.key_outliers.values.shape == (b, k, 3, d, 2)
  expected = analytic_nbytes(b, k, s, 192, grown.residual.capacity, d, dtype=jnp.bfloat16,
                             **opts)
  assert abs(grown.nbytes - expected) <= 0.05 * expected


# ----------------------------------------------------------------------------- decode


_dequantized = jax.jit(lambda layer: layer.dequantized())
_compress = jax.jit(gear_cache.compress_block, static_argnames=(
    "bits", "group", "rank", "loops", "outlier_ratio", "dtype"))


def _slice_block(part, start, g):
  """Block [start, start + g) of a part's slots (a one-block GearBlocks)."""
  take = lambda per_slot, a: a[:, :, start:start + g] if per_slot else a[:, :, start // g:
                                                                          start // g + 1]
  return jax.tree_util.tree_map(take, gear_cache._PER_SLOT, part)


def test_decode_flushes_group_by_group_and_loses_nothing(model):
  prompts = _prompts((90, 100))
  window, group = 32, 32
  method = GEAR(group_size=group, residual=window)
  steps = 70
  result = kvjax.generate(model, prompts, method=method, max_new_tokens=steps)
  assert result.stats["generated_tokens"] == [steps, steps]
  tokens, mask = inputs.left_pad(prompts, 0)
  pre = context.prefill(model, tokens, mask, method, None, room=80)
  cache, plan = pre.cache, pre.decode_plan
  flushed_at = []
  for t in range(steps - 1):
    before = cache.layers[0]
    old_end = int(before.end)
    residual = jax.tree_util.tree_map(np.asarray, before.residual)  # (decode donates cache)
    next_tokens = jnp.asarray([result.token_ids[r][t] for r in range(2)])
    _, _, cache = engine.STEPS.decode(model, next_tokens, cache, jax.random.key(0), 1.0, 1.0,
                                      True, plan)
    layer = cache.layers[0]
    fill, end = int(layer.residual.end), int(layer.end)
    assert window <= fill < window + group and end % group == 0
    if end > old_end:  # the oldest residual group was compressed with the decode rank
      want = _compress(
          jnp.asarray(residual.keys[:, :, :group]), jnp.asarray(residual.values[:, :, :group]),
          jnp.asarray(residual.positions[:, :, :group]), bits=2, group=group, rank=2, loops=3,
          outlier_ratio=0.02, dtype=jnp.float32)
      got = _slice_block(layer.decode, old_end, group)
      for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        if a.dtype == jnp.int32:
          np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
          np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
      assert np.abs(np.asarray(got.key_factors.a)).max() > 0   # a low-rank term is stored
    flushed_at.append(end)
    lengths = np.asarray(cache.lengths)
    positions = np.asarray(layer.slot_positions())
    for row in range(2):
      for head in range(model.config.num_kv_heads):
        kept = positions[row, head][positions[row, head] >= 0]
        assert sorted(kept.tolist()) == list(range(lengths[row])), "every token kept once"
        newest = np.asarray(layer.residual.positions)[row, head][:fill]
        assert newest.max() == lengths[row] - 1 and len(newest) >= window
    # The newest window is read exactly.
    dense = _dequantized(layer)
    np.testing.assert_array_equal(np.asarray(dense.keys)[:, :, -layer.residual.capacity:],
                                  np.asarray(layer.residual.keys))
  assert len(set(flushed_at)) > 2, "decode must have flushed groups"


# ----------------------------------------------------------------------------- phases


def test_every_phase_reads_through_the_gear_cache(model):
  """Chunked prefill and query-agnostic questions at 8 bits generate the full cache's
  tokens; chunked prefill stays close to compressing once; at 2 bits GEAR's log-probs are
  closer to the full cache's than KIVI-2's."""
  prompts = _prompts()
  question = [[5, 6, 7, 8, 9], [10, 11, 12]]
  full = kvjax.generate(model, prompts, questions=question, max_new_tokens=3)
  fine = GEAR(bits=8, group_size=32, residual=32)
  got = kvjax.generate(model, prompts, questions=question, method=fine, prefill_chunk_size=64,
                       max_new_tokens=3)
  assert got.token_ids == full.token_ids
  # Chunked prefill recompresses earlier chunks: close to one-shot compression, not equal.
  tokens, mask = inputs.left_pad(prompts, 0)
  once = context.prefill(model, tokens, mask, fine, None, room=0).cache
  chunked = context.prefill(model, tokens, mask, fine, None, room=0, chunk_size=64).cache
  for a, b in zip(once.layers, chunked.layers):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    dense = _dequantized(a)
    valid = np.asarray(dense.positions) >= 0     # empty slots hold no meaningful values
    x, y = np.asarray(dense.keys)[valid], np.asarray(_dequantized(b).keys)[valid]
    assert 0 < np.linalg.norm(x - y) < 0.02 * np.linalg.norm(x)
  continuation = [[1, 2, 3, 4, 5, 6]] * 2
  exact = kvjax.score(model, prompts, continuation)
  errors = {}
  for name, m in (("gear", GEAR()), ("kivi", KIVI(bits=2, group_size=64, residual=0))):
    approx = kvjax.score(model, prompts, continuation, method=m)
    errors[name] = np.mean([np.abs(a - e).mean() for a, e in zip(approx, exact)])
  assert errors["gear"] < errors["kivi"], errors


@pytest.fixture(scope="module")
def chat_model(smollm2_tokenizer):
  return tiny_chat_model(smollm2_tokenizer, head_dim=D, max_position_embeddings=2048)


def test_converse_keeps_a_gear_context(chat_model):
  context_text = " ".join(f"Fact {i}: the code word is word{i}." for i in range(40))
  result = kvjax.converse(chat_model, context_text, ["First?", "Second?"],
                          method=GEAR(group_size=32, residual=32), max_new_tokens=3)
  assert len(result.answers[0]) == 2
  stats = result.stats
  assert stats["turn_cache_bytes"] == sorted(stats["turn_cache_bytes"])
  full = kvjax.converse(chat_model, context_text, ["First?"], max_new_tokens=1)
  assert stats["context_cache_bytes"] < 0.6 * full.stats["context_cache_bytes"]


def test_snapkv_then_gear_keeps_snapkv_tokens(model):
  prompts = _prompts()
  tokens, mask = inputs.left_pad(prompts, 0)
  snap = context.prefill(model, tokens, mask, SnapKV(window=8), 100, room=0)
  method = GEAR(group_size=32, residual=32, press=SnapKV(window=8))
  assert method.needs_budget and method.needs == SnapKV().needs
  both = context.prefill(model, tokens, mask, method, 100, room=0)
  for a, b in zip(snap.cache.layers, both.cache.layers):
    np.testing.assert_array_equal(np.asarray(b.slot_positions()), np.asarray(a.positions))
  k = model.config.num_kv_heads
  per_layer = analytic_nbytes(2, k, 64, 0, 36, D, bits=2, group=32, rank=4, decode_rank=2,
                              outlier_ratio=0.02, dtype=jnp.float32)
  expected = per_layer * model.config.num_layers + 2 * 4   # + the cache's lengths
  assert abs(both.context_cache_bytes - expected) <= 0.05 * expected
  assert both.context_cache_bytes < 0.6 * snap.context_cache_bytes


def test_kernel_path_generates_like_jnp(model, monkeypatch):
  prompts = _prompts((70, 80))
  method = GEAR(bits=4, group_size=32, residual=16)
  want, got = jnp_and_kernel_tokens(model, prompts, monkeypatch, method=method,
                                    max_new_tokens=4)
  assert got == want


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("build,match", [
    (lambda: GEAR(bits=3), r"bits=3"),
    (lambda: GEAR(group_size=24), "power of two"),
    (lambda: GEAR(rank=-1), r"rank=-1 must be an integer >= 0"),
    (lambda: GEAR(decode_rank=65), r"decode_rank=65 must be an integer in \[0, 64\]"),
    (lambda: GEAR(loops=0), r"loops=0 must be an integer >= 1"),
    (lambda: GEAR(outlier_ratio=0.7), r"outlier_ratio=0.7 must be a number in \[0, 0.5\]"),
    (lambda: GEAR(outlier_ratio=math.nan), r"outlier_ratio=nan"),
    (lambda: GEAR(outlier_ratio="0.1"), r"outlier_ratio='0.1'"),
    (lambda: GEAR(residual=-4), r"residual=-4 must be an integer >= 0"),
    (lambda: GEAR(press="h2o"), "decode-time"),
    (lambda: GEAR(press="adakv"), "head-wise"),
    (lambda: kvjax.methods.get("gear", rank=1.5), r"rank=1.5"),
])
def test_gear_errors(build, match):
  with pytest.raises(kvjax.KvjaxError, match=match):
    build()


def test_gear_errors_against_the_model(model):
  small = tiny_model(head_dim=16)
  with pytest.raises(kvjax.KvjaxError, match="head_dim is 16"):
    kvjax.generate(small, _prompts((70,)), method="gear", max_new_tokens=1)
  with pytest.raises(kvjax.KvjaxError, match=r"rank=80 must be in \[0, head_dim=64\]"):
    kvjax.generate(model, _prompts((70,)), method=GEAR(rank=80), max_new_tokens=1)
  with pytest.raises(kvjax.KvjaxError, match="compression_ratio"):
    kvjax.generate(model, _prompts((70,)), method=GEAR(press="snapkv"), max_new_tokens=1)
