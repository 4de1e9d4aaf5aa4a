"""Mixed-precision caches (MiKV, ZipVL): the split, the balancer and ZipVL's adaptive count
against numpy restatements; no token dropped; bytes against the analytic size; every
phase (chunked prefill, questions, score, conversations, decode) through the layout; the
kernel path; errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import method_inputs as mi
from kvjax.cache import LayerCache, kv_cache
from kvjax.cache.mixed import (SLOT_BUCKET, MixedPrecisionLayerCache, dequantize_pool,
                               mixed_nbytes)
from kvjax.generation import context, engine, inputs
from kvjax.methods import H2O, MiKV, ZipVL, base
from kvjax.methods.mixed_precision import balancer
from tiny import (assert_same_steps, decode_loops_compiled, greedy_steps,
                  jnp_and_kernel_tokens, random_prompts, tiny_chat_model, tiny_model)

D = 32   # tiny model head_dim: 2-bit codes pack 16 per uint32 word


@pytest.fixture(scope="module")
def model():
  return tiny_model(head_dim=D)


def _prompts(lengths=(150, 200), seed=0):
  return random_prompts(lengths, seed)


def _compact_fn(arrays, *, method, keep, layer):
  x = base.LayerInputs(config=mi.config(), layer=layer, **arrays)
  cand = kv_cache.LayerCache(keys=x.keys, values=x.values, positions=x.key_positions,
                             end=jnp.int32(x.keys.shape[2]), state=x.slot_state)
  return method.compact(cand, x, keep)


_compact = jax.jit(_compact_fn, static_argnames=("method", "keep", "layer"))


def _inputs(data, **kw):
  return base.LayerInputs(config=mi.config(), layer=0, **mi.layer_arrays(data, **kw))


def _pool_positions(pool, row, head):
  p = np.asarray(pool.positions)[row, head]
  return np.sort(p[p >= 0])


# ------------------------------------------------------------------ numpy restatements


@pytest.mark.parametrize("press", ["h2o", "snapkv", "knorm"])
def test_mikv_split_is_the_press_top_budget(press):
  data = mi.random_prefill(3)
  keep = 20
  sums = mi.column_sums(data)
  expected = {"h2o": lambda: mi.h2o(data, keep, 0.5, sums),
              "snapkv": lambda: mi.snapkv(data, keep, 32, 7, "max", "mean"),
              "knorm": lambda: mi.knorm(data)}[press]()
  mi.assert_separated(expected, keep)
  kept = mi.select(expected, keep)
  layer = _compact(mi.layer_arrays(data, column_sums=sums), method=MiKV(press=press),
                   keep=keep, layer=0)
  assert isinstance(layer, MixedPrecisionLayerCache)
  for row in range(2):
    for head in range(mi.K):
      valid = data.kpos[row, head] >= 0
      want_high = np.sort(data.kpos[row, head][kept[row, head]])
      want_high = want_high[want_high >= 0]
      high = _pool_positions(layer.high, row, head)
      low = _pool_positions(layer.low, row, head)
      np.testing.assert_array_equal(high, want_high)
      np.testing.assert_array_equal(np.sort(np.concatenate([high, low])),
                                    np.sort(data.kpos[row, head][valid]))
      assert int(layer.important[row, head]) == len(want_high)


def _np_balancer(data):
  q = np.where(data.qpos[:, :, None, None] >= 0, np.abs(data.q), 0.0).max(1)   # [B, H, D]
  q = q.reshape(q.shape[0], mi.K, mi.G, -1).max(2)
  k = np.where(data.kpos[..., None] >= 0, np.abs(data.k), 0.0).max(2)           # [B, K, D]
  return np.where((q > 0) & (k > 0), np.sqrt(q / np.where(k > 0, k, 1)), 1.0)


def test_balancer_and_balanced_keys_match_numpy():
  data = mi.random_prefill(5)
  data.k[:, :, :, 3] *= 25.0        # an outlier key channel
  data.k[:, 1, :, 7] = 0.0          # a channel with no key magnitude: balance 1
  b = _np_balancer(data)
  got = np.asarray(balancer(jnp.asarray(data.q, jnp.float32), jnp.asarray(data.qpos),
                            jnp.asarray(data.k, jnp.float32), jnp.asarray(data.kpos)))
  np.testing.assert_allclose(got, b, rtol=1e-5)
  assert (got[:, 1, 7] == 1).all()
  method = MiKV(press="knorm", high_bits=8, low_bits=2)
  layer = _compact(mi.layer_arrays(data), method=method, keep=16, layer=0)
  np.testing.assert_allclose(np.asarray(layer.balance), b, rtol=1e-5)
  for pool, bits in ((layer.low, 2), (layer.high, 8)):
    stored, _ = dequantize_pool(pool, bits, mi.D, jnp.float32)
    stored = np.asarray(stored, np.float64)
    scale = np.asarray(pool.key_scale, np.float64)                        # [B, K, S, 1]
    pos = np.asarray(pool.positions)
    for row in range(2):
      for head in range(mi.K):
        for slot in np.flatnonzero(pos[row, head] >= 0):
          src = np.flatnonzero(data.kpos[row, head] == pos[row, head, slot])[0]
          k = data.k[row, head, src]
          # Round to nearest: within half a step of k * b.
          err = np.abs(stored[row, head, slot] - k * b[row, head])
          assert (err <= scale[row, head, slot, 0] / 2 * (1 + 1e-4) + 1e-6).all()
          # Logits: (q / b) . stored == q . k up to the same rounding, for every query.
          qs = data.q[row][:, head * mi.G:(head + 1) * mi.G]               # [T, G, D]
          exact = qs @ k
          got_logits = (qs / b[row, head]) @ stored[row, head, slot]
          bound = (np.abs(qs / b[row, head]).sum(-1) * scale[row, head, slot, 0] / 2
                   * (1 + 1e-4) + 1e-4)
          assert (np.abs(got_logits - exact) <= bound).all()


def _np_zipvl_counts(data, rows, tau, max_ratio):
  """[B, K] smallest p reaching tau of the normalized probe mass (probes: given rows)."""
  b = data.q.shape[0]
  out = np.zeros((b, mi.K), np.int64)
  for r in range(b):
    q = data.q[r:r + 1, rows[r]]
    qpos = data.qpos[r:r + 1, rows[r]]
    probs = mi.attention(q, data.k[r:r + 1], qpos, data.kpos[r:r + 1])[0]   # [H, P, S]
    for head in range(mi.K):
      kpos = data.kpos[r, head]
      mass = probs[head * mi.G:(head + 1) * mi.G].sum((0, 1))
      seen = ((kpos[None, :] >= 0) & (kpos[None, :] <= qpos[0][:, None])).sum(0)
      score = np.where(seen > 0, mass / np.maximum(seen, 1), 0.0)[kpos >= 0]
      ranked = np.sort(score)[::-1]
      total = ranked.sum()
      p = next(i + 1 for i in range(len(ranked)) if ranked[:i + 1].sum() >= tau * total
               or i == len(ranked) - 1)
      n = len(ranked)
      out[r, head] = min(p, max(1, math.floor(max_ratio * n)))
  return out


@pytest.mark.parametrize("tau,max_ratio", [(0.5, 1.0), (0.8, 1.0), (0.9, 0.3)])
def test_zipvl_important_count_matches_numpy(tau, max_ratio):
  data = mi.random_prefill(7, lengths=(48, 40), q_scale=3.0)
  method = ZipVL(tau=tau, probe=0.1, max_ratio=max_ratio)
  x = _inputs(data)
  rows = np.asarray(method.probe_rows(x))
  recent = math.ceil(0.1 * 48)
  for r in range(2):
    assert list(rows[r, -recent:]) == list(range(48 - recent, 48))
    random = rows[r, :-recent]
    assert len(set(random)) == len(random) == recent and (random < 48 - recent).all()
    assert (data.qpos[r, random] >= 0).all()
  want = _np_zipvl_counts(data, rows, tau, max_ratio)
  layer = _compact(mi.layer_arrays(data), method=method, keep=48, layer=0)
  np.testing.assert_array_equal(np.asarray(layer.important), want)
  # The high pool holds each head's top `capacity` tokens (the tau-set and the bucket's
  # slack), the low pool the rest: every token once.
  score = np.asarray(method.importance(x))
  capacity = min(-(-want.max() // SLOT_BUCKET) * SLOT_BUCKET,
                 max(max(1, math.floor(max_ratio * n)) for n in (48, 40)))
  for r in range(2):
    for head in range(mi.K):
      valid = data.kpos[r, head] >= 0
      top = mi.top(np.where(valid, score[r, head], -np.inf), min(capacity, valid.sum()))
      np.testing.assert_array_equal(_pool_positions(layer.high, r, head),
                                    np.sort(data.kpos[r, head][top]))
      both = np.concatenate([_pool_positions(layer.high, r, head),
                             _pool_positions(layer.low, r, head)])
      np.testing.assert_array_equal(np.sort(both), np.sort(data.kpos[r, head][valid]))


# ------------------------------------------------------------------ layout and memory


def _all_positions(layer):
  return np.concatenate([np.asarray(layer.high.positions), np.asarray(layer.low.positions),
                         np.asarray(layer.recent.positions)], axis=2)


@pytest.mark.parametrize("method", [MiKV(), ZipVL(tau=0.9)], ids=["mikv", "zipvl"])
def test_no_token_dropped_through_prefill_and_decode(model, method):
  prompts = _prompts((90, 120))
  keep = 60 if method.needs_budget else None
  tokens, mask = inputs.left_pad(prompts, 0)
  pre = context.prefill(model, tokens, mask, method, keep, room=16)
  cache = pre.cache
  for step in range(3):
    if step:
      _, _, cache = engine.STEPS.decode(model, jnp.asarray([5, 6]), cache, jax.random.key(0),
                                        1.0, 1.0, True, pre.decode_plan)
    lengths = np.asarray(cache.lengths)
    for layer in cache.layers:
      assert isinstance(layer, MixedPrecisionLayerCache) and layer.state is None
      positions = _all_positions(layer)
      for row in range(2):
        for head in range(model.config.num_kv_heads):
          kept = positions[row, head][positions[row, head] >= 0]
          assert sorted(kept.tolist()) == list(range(lengths[row])), "every token once"
          recent = np.asarray(layer.recent.positions)[row, head]
          assert sorted(recent[recent >= 0].tolist()) == list(
              range(len(prompts[row]), lengths[row])), "decode tokens at full precision"
  # Bytes: the layout's leaves equal the analytic size of the pools it holds.
  for layer in pre.cache.layers:
    expected = mixed_nbytes(2, model.config.num_kv_heads, layer.high.capacity,
                            layer.low.capacity, layer.recent.capacity, D, method.high_bits,
                            method.low_bits, D, jnp.float32)
    assert abs(layer.nbytes - expected) <= 0.05 * expected
  stats = pre.method_stats
  assert len(stats["important_ratio_per_layer"]) == model.config.num_layers
  if method.needs_budget:   # MiKV: the budget is the important set
    assert stats["high_precision_slots_per_layer"] == [keep] * model.config.num_layers
    np.testing.assert_allclose(stats["important_ratio_per_layer"],
                               np.mean([keep / 90, keep / 120]))


def test_prefill_many_equals_one_prefill_each(model):
  """A sweep's shared prefill (PlanSet) gives each mixed method the cache its own prefill
  gives, finalized (the budget-free ZipVL and KIVI included)."""
  tokens, mask = inputs.left_pad(_prompts((90, 120)), 0)
  variants = [(MiKV(), 60), (ZipVL(tau=0.9), None), (kvjax.methods.KIVI(residual=32), None)]
  many = context.prefill_many(model, tokens, mask, variants, room=16)
  for (method, keep), got in zip(variants, many):
    one = context.prefill(model, tokens, mask, method, keep, room=16)
    full = kvjax.cache.full_cache_nbytes(model.config, 2, 120)
    assert got.context_cache_bytes == one.context_cache_bytes < 0.6 * full
    for a, b in zip(jax.tree_util.tree_leaves(got.cache), jax.tree_util.tree_leaves(one.cache)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _dense(b, k, s, d, seed=0):
  rng = np.random.default_rng(seed)
  return LayerCache(keys=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.bfloat16),
                    values=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.bfloat16),
                    positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, k, s)),
                    end=jnp.int32(s))


def test_memory_matches_analytic_size_and_byte_ratios():
  """SmolLM2's KV shape (3 KV heads, head_dim 64), bf16, a 4K context split at the
  important fraction: measured bytes within 5% of the analytic size, and the ratios."""
  b, k, s, d = 1, 3, 4096, 64
  dense = _dense(b, k, s, d)
  full = dense.nbytes
  balance = jnp.ones((b, k, d), jnp.float32)
  ratios = {}
  for high_bits, low_bits, n_high in ((8, 2, s // 2), (16, 2, s // 2), (4, 2, 1229)):
    index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, k, s))
    layer = MixedPrecisionLayerCache.from_split(
        dense, index[..., :n_high], index[..., n_high:], balance,
        jnp.full((b, k), n_high), high_bits=high_bits, low_bits=low_bits, group=d)
    expected = mixed_nbytes(b, k, n_high, s - n_high, 0, d, high_bits, low_bits, d,
                            jnp.bfloat16)
    assert abs(layer.nbytes - expected) <= 0.05 * expected
    ratios[(high_bits, low_bits)] = layer.nbytes / full
  drop_half = dense.select(jnp.broadcast_to(jnp.arange(s // 2), (b, k, s // 2))).nbytes / full
  # Per slot: 8-bit codes 128 B + bf16 scale/zero 8 B, 2-bit 32 + 8 B, full 256 B, + 4 B
  # of position each: (140 + 44) / 2 / 260 = 0.354 of the full bf16 cache.
  assert 0.34 < ratios[(8, 2)] < 0.37
  # Full-precision important half plus the 2-bit rest: more than dropping the half.
  assert drop_half < ratios[(16, 2)] < 0.6 < 1
  # ZipVL 4/2 with 30% important: 0.3 * 76 + 0.7 * 44 = 53.6 of 260 B.
  assert 0.2 < ratios[(4, 2)] < 0.215


def test_mikv_bytes_between_dropping_and_full(model):
  prompts = _prompts((200, 200))
  tokens, mask = inputs.left_pad(prompts, 0)
  full = kvjax.cache.full_cache_nbytes(model.config, 2, 200)
  dropped = context.prefill(model, tokens, mask, H2O(), 100, room=0).context_cache_bytes
  mixed = {bits: context.prefill(model, tokens, mask, MiKV(high_bits=bits, low_bits=2), 100,
                                 room=0) for bits in (8, 16)}
  size = {bits: pre.context_cache_bytes for bits, pre in mixed.items()}
  assert size[8] < size[16] < full
  # 16/2 keeps what H2O keeps at the same precision plus the dropped half at 2 bits.
  assert dropped < size[16]
  assert mixed[8].method_stats["high_precision_slots_per_layer"] == [100, 100]


def test_balancer_lowers_key_error_with_outlier_channels():
  rng = np.random.default_rng(1)
  b, k, s, d = 1, 2, 64, 32
  keys = rng.normal(size=(b, k, s, d))
  keys[..., [2, 17]] *= 30.0                      # planted outlier channels
  queries = rng.normal(size=(b, s, 2 * k, d))
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, k, s))
  dense = LayerCache(keys=jnp.asarray(keys, jnp.float32),
                     values=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.float32),
                     positions=positions, end=jnp.int32(s))
  index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, k, s))
  errors = {}
  for on in (True, False):
    bal = (balancer(jnp.asarray(queries, jnp.float32), positions[:, 0], dense.keys, positions)
           if on else jnp.ones((b, k, d), jnp.float32))
    layer = MixedPrecisionLayerCache.from_split(
        dense, index[..., :0], index, bal, jnp.zeros((b, k)), high_bits=8, low_bits=2,
        group=d)
    got = np.asarray(layer.dequantized().keys, np.float64)
    logits_err = np.abs(np.einsum("bthd,bksd->bts", queries, got - keys))
    errors[on] = (np.sqrt(((got - keys) ** 2).mean()), logits_err.mean())
  assert errors[True][0] < errors[False][0]
  assert errors[True][1] < errors[False][1]


# ------------------------------------------------------------------ every phase


def test_chunked_prefill_and_questions(model):
  prompts = _prompts()
  question = [[5, 6, 7, 8, 9], [10, 11, 12]]
  full = kvjax.generate(model, prompts, questions=question, max_new_tokens=3)
  # 16/8 bits: the 8-bit half is close enough to give the full cache's greedy tokens. H2O
  # keeps per-slot state, so chunks also carry the press's state through the layout.
  near_full = MiKV(press="h2o", high_bits=16, low_bits=8)
  for chunk in (None, 64):
    got = kvjax.generate(model, prompts, questions=question, method=near_full,
                         compression_ratio=0.5, prefill_chunk_size=chunk, max_new_tokens=3)
    assert got.token_ids == full.token_ids, chunk
  # The same chunked prefill (compiled steps reused): every token kept, once.
  tokens, mask = inputs.left_pad(prompts, 0, 256)
  pre = context.prefill(model, tokens, mask, near_full, 100, room=0, chunk_size=64)
  for layer in pre.cache.layers:
    positions = _all_positions(layer)
    for row, n in enumerate((150, 200)):
      for head in range(model.config.num_kv_heads):
        kept = positions[row, head][positions[row, head] >= 0]
        assert sorted(kept.tolist()) == list(range(n))


def test_zipvl_chunked_prefill(model):
  """ZipVL re-splits stored tokens plus each chunk; the host trims its pools between
  chunks, so capacities stay near the context length instead of compounding (each jit
  split allocates ceil(max_ratio * S) high and S low slots: x1.6 per chunk untrimmed)."""
  prompts = _prompts()
  question = [[5, 6, 7, 8, 9], [10, 11, 12]]
  full = kvjax.generate(model, prompts, questions=question, max_new_tokens=3)
  near_full = ZipVL(high_bits=16, low_bits=8)
  got = kvjax.generate(model, prompts, questions=question, method=near_full,
                       prefill_chunk_size=64, max_new_tokens=3)
  assert got.token_ids == full.token_ids
  tokens, mask = inputs.left_pad(prompts, 0, 256)
  seen = []   # the slots per head each chunk's compiled step receives

  class Spy:
    def prefill(self, model, tokens, mask, cache, **kw):
      seen.append(max((layer.capacity for layer in cache.layers), default=0))
      return engine.STEPS.prefill(model, tokens, mask, cache, **kw)

    def grow(self, cache, room, *args):
      return engine.STEPS.grow(cache, room, *args)

  pre = context.prefill(model, tokens, mask, ZipVL(), None, room=0, chunk_size=64,
                        steps=Spy())
  assert len(seen) == 4 and max(seen) <= 200 + 2 * SLOT_BUCKET, seen
  one = context.prefill(model, tokens, mask, ZipVL(), None, room=0)
  for layer, whole in zip(pre.cache.layers, one.cache.layers):
    assert layer.high.capacity + layer.low.capacity <= 200 + 2 * SLOT_BUCKET
    assert layer.high.capacity <= whole.high.capacity + SLOT_BUCKET
    positions = _all_positions(layer)
    for row, n in enumerate((150, 200)):
      for head in range(model.config.num_kv_heads):
        kept = positions[row, head][positions[row, head] >= 0]
        assert sorted(kept.tolist()) == list(range(n)), "every token once"
        assert 1 <= int(layer.important[row, head]) <= math.floor(0.6 * n), "max_ratio cap"
    assert layer.high.capacity <= -(-math.floor(0.6 * 200) // SLOT_BUCKET) * SLOT_BUCKET
  chosen = pre.method_stats["important_ratio_per_layer"]
  stored = pre.method_stats["high_precision_ratio_per_layer"]
  assert len(chosen) == model.config.num_layers and 0 < min(chosen) and max(chosen) <= 0.6
  assert all(c <= s for c, s in zip(chosen, stored)), "the tau-set is stored at high bits"


def test_score_mikv_closer_to_full_than_dropping(model):
  prompts = _prompts((180, 200), seed=3)
  continuation = [_prompts((8,), seed=4)[0]] * 2
  exact = kvjax.score(model, prompts, continuation)
  dropped = kvjax.score(model, prompts, continuation, method="h2o", compression_ratio=0.5)
  mixed = kvjax.score(model, prompts, continuation, method=MiKV(press="h2o"),
                      compression_ratio=0.5)
  err = lambda got: np.mean([np.abs(g - e).mean() for g, e in zip(got, exact)])
  assert err(mixed) < err(dropped)
  zipvl = kvjax.score(model, prompts, continuation, method=ZipVL())
  assert err(zipvl) < err(dropped)


def test_converse_over_a_mixed_cache(smollm2_tokenizer):
  chat = tiny_chat_model(smollm2_tokenizer, head_dim=D, max_position_embeddings=2048)
  ctx = " ".join(f"Fact {i}: the code word is word{i}." for i in range(30))
  result = kvjax.converse(chat, [ctx, ctx[:200]], [["First?", "Second?"], ["A?", "B?"]],
                          method=MiKV(), compression_ratio=0.5, max_new_tokens=4)
  assert [len(row) for row in result.answers] == [2, 2]
  assert result.stats["turn_cache_bytes"] == sorted(result.stats["turn_cache_bytes"])
  assert result.stats["method"] == "mikv"   # defaults: press h2o, 8/2 bits
  assert MiKV(high_bits=16, press="snapkv").label == "mikv:press=snapkv:high_bits=16"


def _random_mixed_layer(seed, *, high_bits, low_bits, group, dtype, b=2, k=2, s=48, d=D,
                        n_high=16, room=4):
  """A mixed layer split from random dense slots (shuffled positions), with empty pool
  slots, a balance far from 1, and two decode tokens already in its recent part."""
  rng = np.random.default_rng(seed)
  spread = rng.uniform(0.2, 3.0, d)   # channels of different ranges, like real keys
  dense = lambda shape: jnp.asarray(rng.normal(size=shape) * spread, dtype)
  positions = np.stack([rng.permutation(s) for _ in range(b * k)]).reshape(b, k, s)
  cand = LayerCache(keys=dense((b, k, s, d)), values=dense((b, k, s, d)),
                    positions=jnp.asarray(positions, jnp.int32), end=jnp.int32(s))
  order = np.stack([rng.permutation(s) for _ in range(b * k)]).reshape(b, k, s)
  high, low = np.sort(order[..., :n_high], -1), order[..., n_high:].copy()
  high[0, 1, -5:] = -1     # empty slots in each pool
  low[1, 0, :7] = -1
  low[0, 0, :] = -1        # a (row, head) whose low pool is empty
  balance = jnp.asarray(rng.uniform(0.25, 4.0, (b, k, d)), jnp.float32)
  layer = MixedPrecisionLayerCache.from_split(
      cand, jnp.asarray(high, jnp.int32), jnp.asarray(low, jnp.int32), balance,
      jnp.full((b, k), n_high, jnp.int32), high_bits=high_bits, low_bits=low_bits,
      group=group).grow(room)
  new = kv_cache.NewTokens(keys=dense((b, k, 2, d)), values=dense((b, k, 2, d)),
                           positions=jnp.asarray([[s, s + 1]] * b, jnp.int32))
  return layer.append(new)


@pytest.mark.parametrize("high_bits,low_bits,group,dtype", [
    (16, 2, D, jnp.float32), (8, 4, 16, jnp.float32), (8, 2, D, jnp.float32),
    (4, 2, 8, jnp.float32), (16, 8, 16, jnp.float32), (4, 2, D, jnp.bfloat16)])
@pytest.mark.parametrize("kernels", [False, True], ids=["jnp", "kernel"])
def test_decode_equals_dequantize_then_attend(monkeypatch, high_bits, low_bits, group, dtype,
                                              kernels):
  """The decode path (one softmax over the pools read in place, the balance folded into
  the query) equals dense attention over the dequantized slots: GQA groups of 3, two
  rows, empty slots, every bit width, one group or several per token, a query position
  that hides part of the cache; on the jnp path and through the kernels."""
  layer = _random_mixed_layer(high_bits * 10 + low_bits, high_bits=high_bits,
                              low_bits=low_bits, group=group, dtype=dtype)
  b, k, d = layer.balance.shape
  rng = np.random.default_rng(1)
  queries = jnp.asarray(rng.normal(size=(b, 1, 3 * k, d)), dtype)
  query_positions = jnp.asarray([[49], [30]], jnp.int32)   # row 1 sees part of the cache
  decode = lambda c, q: c.attend(q, query_positions)[0]
  dense = lambda c, q: c.dequantized().attend(q, query_positions)[0]
  want = jax.jit(dense)(layer, queries)                     # jnp, before any monkeypatch
  if kernels:
    monkeypatch.setenv("KVJAX_PALLAS", "1")
  got = jax.jit(decode)(layer, queries)
  assert got.shape == queries.shape and got.dtype == dtype
  assert np.isfinite(np.asarray(got, np.float32)).all()
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=tol, atol=tol)


@pytest.mark.parametrize("method,ratio", [(MiKV(high_bits=16, low_bits=4), 0.5),
                                          (ZipVL(), None)], ids=["mikv16/4", "zipvl"])
def test_kernel_path_generates_like_jnp(model, monkeypatch, method, ratio):
  prompts = _prompts((70, 80))
  want, got = jnp_and_kernel_tokens(model, prompts, monkeypatch, method=method,
                                    compression_ratio=ratio, max_new_tokens=4)
  assert got == want


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("build,match", [
    (lambda: MiKV(high_bits=3), r"high_bits=3"),
    (lambda: MiKV(low_bits=16), r"low_bits=16"),
    (lambda: MiKV(high_bits=4, low_bits=4), "below high_bits"),
    (lambda: MiKV(group_size=24), "power of two"),
    (lambda: MiKV(balance="yes"), "balance"),
    (lambda: MiKV(press="adakv"), "head-wise"),
    (lambda: MiKV(press="kivi"), "own compaction"),
    (lambda: MiKV(press="full"), "full cache"),
    (lambda: MiKV(press="nope"), "unknown method"),
    (lambda: ZipVL(tau=0), r"tau=0"),
    (lambda: ZipVL(tau=1.5), r"tau=1.5"),
    (lambda: ZipVL(probe=0.7), r"probe=0.7"),
    (lambda: ZipVL(max_ratio=0.0), r"max_ratio=0.0"),
    (lambda: ZipVL(seed=-1), r"seed=-1"),
])
def test_errors(build, match):
  with pytest.raises(kvjax.KvjaxError, match=match):
    build()


def test_errors_at_use(model):
  prompts = _prompts((40, 50))
  with pytest.raises(kvjax.KvjaxError, match="needs compression_ratio"):
    kvjax.generate(model, prompts, method="mikv", max_new_tokens=1)
  with pytest.raises(kvjax.KvjaxError, match="head_dim is 32"):
    kvjax.generate(model, prompts, method=MiKV(group_size=64), compression_ratio=0.5,
                   max_new_tokens=1)
  assert {"mikv", "zipvl"} <= set(kvjax.methods.available())
  assert MiKV().needs_budget and not ZipVL().needs_budget


def test_a_prompt_of_another_length_decodes_with_the_same_compiled_loop(model):
  """`generate` pads both pools with reserved slots to a multiple of 64: prompts whose pools
  round alike share one compiled decode loop, and decode exactly as the unpadded cache."""
  method = MiKV(press=H2O())
  tokens, mask = inputs.left_pad(_prompts((150, 160)), 0)
  # Budget 70: pools of 70 and 90 slots (the low one trimmed to 96), reserved up to 128.
  contexts = [context.prefill(model, tokens, mask, method, 70, room=8, reserve_multiple=m)
              for m in (64, 1)]
  for layer, unpadded in zip(contexts[0].cache.layers, contexts[1].cache.layers):
    assert (unpadded.high.capacity, unpadded.low.capacity) == (70, 96)
    assert (layer.high.capacity, layer.low.capacity) == (128, 128)
    assert layer.recent.capacity == unpadded.recent.capacity == 8
    for pool, want in ((layer.high, unpadded.high), (layer.low, unpadded.low)):
      positions = np.asarray(pool.positions)
      n = want.capacity
      assert (positions[..., n:] == kv_cache.RESERVED_POSITION).all()
      np.testing.assert_array_equal(positions[..., :n], np.asarray(want.positions))
  assert_same_steps(*(greedy_steps(model, pre, 6)[0] for pre in contexts))

  # Budgets 71 and 81 (of the longer row): pools of (71, 80) and (81, 96) slots, both
  # (128, 128) once reserved.
  assert decode_loops_compiled(model, [_prompts((n, n + 3)) for n in (140, 160)],
                               method=method, compression_ratio=0.5, max_new_tokens=6) == 1
