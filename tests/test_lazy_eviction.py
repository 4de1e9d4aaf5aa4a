"""LazyEviction against a slow numpy restatement of its docstring, plus hand-made scenarios.

The restatement below is written from `kvjax.methods.lazy_eviction.LazyEviction`'s
docstring (activation at threshold / n, t_last = max(last activation, own position),
MRI = the largest gap, ranks frozen at window boundaries with the recent window unranked,
unranked slots after every ranked one), never from its code. tests/test_methods.py leaves
this method out of its generic prefill test (it has no restatement there); the same checks
are made here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import method_inputs as mi
from kvjax import methods
from kvjax.cache import kv_cache
from kvjax.errors import MethodError
from kvjax.generation import context, engine, inputs
from kvjax.methods import base, plan
from kvjax.methods.lazy_eviction import LazyEviction
from tiny import random_prompts, tiny_model

_EXECUTABLES = {}
FIELDS = ("last", "mri", "rank")


def _run_compiled(fn, static: dict, args: tuple):
  """fn(*args, **static) through a cached executable (one compile per method and shape)."""
  leaves, tree = jax.tree_util.tree_flatten(args)
  key = (fn, tuple(sorted(static.items())), tree,
         tuple((x.shape, str(x.dtype)) for x in leaves))
  if key not in _EXECUTABLES:
    _EXECUTABLES[key] = jax.jit(fn, static_argnames=tuple(static)).lower(
        *args, **static).compile(compiler_options={"xla_backend_optimization_level": 0})
  return _EXECUTABLES[key](*args)


def _evict_fn(layer, new_key, new_value, new_position, probs, own, lengths, *, method, budget):
  new = kv_cache.NewTokens(keys=new_key, values=new_value, positions=new_position[:, None])
  return plan.evict_and_insert(method, layer, new, probs, own, lengths, budget)


def _compress_fn(arrays, *, method, keep, config):
  x = base.LayerInputs(config=config, layer=0, **arrays)
  cand = kv_cache.LayerCache(keys=x.keys, values=x.values, positions=x.key_positions,
                             end=jnp.int32(x.keys.shape[2]), state=x.slot_state)
  return method.compact(cand, x, keep), base.priorities(method, x, keep)


def _as_state(state: dict):
  return {f: jnp.asarray(np.asarray(state[f], np.int32)) for f in FIELDS}


# ----------------------------------------------------------------------------- numpy


def _aggregate(probs_heads: np.ndarray, gqa: str) -> float:
  return float(probs_heads.mean() if gqa == "mean" else probs_heads.max())


def _activated(value: float, share: float) -> bool:
  # Precondition: no float32-vs-float64 near-tie at the threshold (change the seed if so).
  assert abs(value - share) > 1e-5 * share, f"near-tie at the threshold ({value} vs {share})"
  return value >= share


def np_prefill_state(data: mi.Prefill, method: LazyEviction, old=None) -> dict:
  """[B, K, S] last / mri / rank after the prompt's last `recent` queries, one by one."""
  b, t = data.qpos.shape
  s = data.k.shape[2]
  rows = min(method.recent, t)
  probs = mi.attention(data.q[:, -rows:], data.k, data.qpos[:, -rows:], data.kpos)
  state = {f: np.zeros((b, mi.K, s), np.int64) if old is None else old[f].astype(np.int64)
           for f in FIELDS}
  for row in range(b):
    for kv in range(mi.K):
      kpos = data.kpos[row, kv]
      for i in range(rows):
        qp = data.qpos[row, t - rows + i]
        seen = (kpos >= 0) & (kpos <= qp)
        if qp < 0 or not seen.any():
          continue
        share = method.threshold / seen.sum()
        for slot in np.flatnonzero(seen):
          value = _aggregate(probs[row, kv * mi.G:(kv + 1) * mi.G, i, slot], method.gqa)
          if _activated(value, share):
            born_or_last = max(state["last"][row, kv, slot], kpos[slot])
            state["mri"][row, kv, slot] = max(state["mri"][row, kv, slot], qp - born_or_last)
            state["last"][row, kv, slot] = qp
      for slot in range(s):
        state["rank"][row, kv, slot] = _np_rank(state, row, kv, slot, kpos[slot],
                                                data.lengths[row], method.recent)
  return state


def _np_rank(state, row, kv, slot, position, length, recent) -> int:
  """A boundary's rank: 0 for an empty slot or one of the `recent` newest, else e + 1."""
  if position < 0 or position >= length - recent:
    return 0
  return max(state["last"][row, kv, slot], position) + state["mri"][row, kv, slot] + 1


class NpCache:
  """A decode-time cache in numpy with LazyEviction's state per slot."""

  def __init__(self, seed, capacity=20, seen=(40, 30), valid=(20, 17)):
    rng = np.random.default_rng(seed)
    b = len(seen)
    self.rng = rng
    self.lengths = np.asarray(seen, np.int32)
    self.positions = np.full((b, mi.K, capacity), -1, np.int32)
    self.state = {f: np.zeros((b, mi.K, capacity), np.int64) for f in FIELDS}
    for row in range(b):
      for head in range(mi.K):
        n = seen[row]
        picked = np.sort(rng.choice(n, valid[row], replace=False))
        slots = np.sort(rng.choice(capacity, valid[row], replace=False))
        self.positions[row, head, slots] = picked
        for slot, pos in zip(slots, picked):
          # Some slots never activated (all zero), some ranked at an earlier boundary.
          last = 0 if rng.random() < 0.3 else int(rng.integers(pos, n))
          mri = int(rng.integers(0, max(last, pos) + 1))
          self.state["last"][row, head, slot] = last
          self.state["mri"][row, head, slot] = mri
          if rng.random() < 0.6:
            self.state["rank"][row, head, slot] = max(last, pos) + mri + 1
    self.keys = mi.f32(rng.normal(size=(b, mi.K, capacity, mi.D)))
    self.values = mi.f32(rng.normal(size=(b, mi.K, capacity, mi.D)))

  def layer(self):
    as32 = lambda a: jnp.asarray(np.asarray(a, np.float32))
    return kv_cache.LayerCache(keys=as32(self.keys), values=as32(self.values),
                               positions=jnp.asarray(self.positions),
                               end=jnp.int32(self.positions.shape[2]),
                               state=_as_state(self.state))

  def step(self, method, probs, new_pos, new_key, new_value, after):
    """One decode step of the restatement; returns the eviction priorities [B, K, C]."""
    b, k, c = self.positions.shape
    prio = np.zeros((b, k, c))
    st = self.state
    for row in range(b):
      t = after[row] - 1
      for kv in range(k):
        kpos = self.positions[row, kv]
        share = method.threshold / ((kpos >= 0).sum() + 1)
        for slot in np.flatnonzero(kpos >= 0):
          value = _aggregate(probs[row, kv * mi.G:(kv + 1) * mi.G, slot], method.gqa)
          if _activated(value, share):
            born_or_last = max(st["last"][row, kv, slot], kpos[slot])
            st["mri"][row, kv, slot] = max(st["mri"][row, kv, slot], t - born_or_last)
            st["last"][row, kv, slot] = t
        if after[row] % method.window == 0:
          for slot in range(c):
            st["rank"][row, kv, slot] = _np_rank(st, row, kv, slot, kpos[slot], after[row],
                                                 method.recent)
        for slot in range(c):
          pos = kpos[slot]
          live = max(st["last"][row, kv, slot], pos) + st["mri"][row, kv, slot]
          prio[row, kv, slot] = (
              -np.inf if pos < 0 else np.inf if pos >= after[row] - method.recent
              else st["rank"][row, kv, slot] - 1 if st["rank"][row, kv, slot] > 0
              else 2 * after[row] + 1 + live)
        victim = int(np.argmin(prio[row, kv]))  # empties first, ties to the lowest slot
        self.positions[row, kv, victim] = new_pos[row]
        self.keys[row, kv, victim] = new_key[row, kv]
        self.values[row, kv, victim] = new_value[row, kv]
        st["last"][row, kv, victim] = t
        st["mri"][row, kv, victim] = 0
        st["rank"][row, kv, victim] = 0
    self.lengths = after
    return prio


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("gqa, threshold, seed", [("mean", 1.0, 3), ("max", 1.5, 4)])
def test_decode_steps_match_numpy(gqa, threshold, seed):
  """Ten steps over two window boundaries per row: same cache, same state, same victims."""
  cache = NpCache(seed)
  method = LazyEviction(threshold=threshold, window=3, recent=4, gqa=gqa)
  layer = cache.layer()
  b, _, capacity = cache.positions.shape
  ranked_victims = 0
  for _ in range(10):
    new_pos = cache.lengths.copy()
    after = cache.lengths + 1
    q_new = mi.f32(cache.rng.normal(size=(b, mi.H, mi.D)) * 2.0)
    new_key = mi.f32(cache.rng.normal(size=(b, mi.K, mi.D)))
    new_value = mi.f32(cache.rng.normal(size=(b, mi.K, mi.D)))
    probs, own = mi.decode_probs(q_new, cache.keys, cache.positions, new_key, new_pos)
    probs, own = mi.f32(probs), mi.f32(own)
    as32 = lambda a: jnp.asarray(np.asarray(a, np.float32))
    args = (layer, as32(new_key[:, :, None]), as32(new_value[:, :, None]),
            jnp.asarray(new_pos), as32(probs), as32(own), jnp.asarray(after))
    layer = _run_compiled(_evict_fn, dict(method=method, budget=capacity), args)
    prio = cache.step(method, probs, new_pos, new_key, new_value, after)
    ranked_victims += int((np.isfinite(prio.min(-1)) & (prio.min(-1) < 2 * after[:, None])).sum())
    np.testing.assert_array_equal(np.asarray(layer.positions), cache.positions)
    np.testing.assert_array_equal(np.asarray(layer.keys), cache.keys.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(layer.values), cache.values.astype(np.float32))
    for f in FIELDS:
      np.testing.assert_array_equal(np.asarray(layer.state[f]), cache.state[f], err_msg=f)
  assert ranked_victims > 0, "the steps must evict by frozen ranks, not only empty slots"


def test_priority_tiers_and_the_recent_window():
  """Ranked slots by their frozen rank, then unranked ones by live e; recent ones never."""
  method = LazyEviction(window=100, recent=2)
  positions = jnp.asarray([[[0, 1, 2, 3, 4, 5]]], jnp.int32)
  state = {"last": jnp.asarray([[[9, 0, 0, 0, 0, 0]]], jnp.int32),
           "mri": jnp.asarray([[[1, 0, 0, 0, 0, 0]]], jnp.int32),
           "rank": jnp.asarray([[[0, 0, 6, 0, 5, 0]]], jnp.int32)}
  lengths = jnp.asarray([10], jnp.int32)
  prio = np.asarray(method.eviction_priority(state, None, positions, lengths, 6))[0, 0]
  # Ranked: slot 2 -> 5, slot 4 -> 4. Unranked after 2 * 10 + 1 = 21: e = 10, 1, 3, 5.
  np.testing.assert_array_equal(prio, [31, 22, 5, 24, 4, 26])
  # The recent window (the last 2 positions of the row) is protected.
  assert not np.asarray(method.protected(positions, lengths, 6)).any()
  assert np.asarray(method.protected(positions, jnp.asarray([6]), 6))[0, 0].tolist() == \
      [False] * 4 + [True, True]


# ----------------------------------------------------------------------------- state moves


def test_state_follows_its_slot_through_evict_and_insert():
  """Slots in scrambled order, each with its own state: after a step without activations
  (not a boundary) every survivor keeps its state, and the victim (the lowest rank) holds the
  new token with a fresh state; at the next step (a boundary) an activated slot's state is
  updated where that token now lives."""
  capacity, budget = 8, 8
  method = LazyEviction(window=2, recent=2, threshold=1.0)
  slot_positions = np.asarray([5, 2, 7, 0, 6, 3, 1, 4], np.int32)
  last = np.asarray([6, 4, 0, 3, 0, 0, 2, 5])
  mri = np.asarray([1, 2, 0, 3, 0, 0, 1, 4])
  rank = np.asarray([8, 7, 0, 0, 0, 4, 5, 10])  # lowest: slot 5 (position 3)
  state = {"last": last, "mri": mri, "rank": rank}
  positions = jnp.asarray(np.broadcast_to(slot_positions, (1, mi.K, capacity)))
  layer = kv_cache.LayerCache(
      keys=jnp.asarray(np.arange(capacity, dtype=np.float32)[None, None, :, None]
                       * np.ones((1, mi.K, 1, mi.D), np.float32)),
      values=jnp.zeros((1, mi.K, capacity, mi.D)), positions=positions,
      end=jnp.int32(capacity),
      state={f: jnp.asarray(np.broadcast_to(state[f], (1, mi.K, capacity)), jnp.int32)
             for f in FIELDS})
  zeros = jnp.zeros((1, mi.H, capacity))
  own = jnp.ones((1, mi.H))

  def step(layer, probs, new_position):
    new = jnp.full((1, mi.K, 1, mi.D), 100.0 + new_position)
    return _run_compiled(_evict_fn, dict(method=method, budget=budget),
                         (layer, new, new, jnp.asarray([new_position], jnp.int32), probs, own,
                          jnp.asarray([new_position + 1], jnp.int32)))

  out = step(layer, zeros, 8)                                  # lengths 9: no boundary
  got_pos = np.asarray(out.positions)[0, 0]
  assert got_pos[5] == 8 and np.asarray(out.keys)[0, 0, 5, 0] == 108.0
  for f in FIELDS:
    got = np.asarray(out.state[f])[0, 0]
    expected = state[f].copy()
    expected[5] = {"last": 8, "mri": 0, "rank": 0}[f]
    np.testing.assert_array_equal(got, expected, err_msg=f)
  # Next step (lengths 10, a boundary): position 2 (slot 1) is attended to by every head.
  probs = np.zeros((1, mi.H, capacity), np.float32)
  probs[0, :, 1] = 0.9
  out = step(out, jnp.asarray(probs), 9)
  by_position = {int(p): {f: int(np.asarray(out.state[f])[0, 0, s]) for f in FIELDS}
                 for s, p in enumerate(np.asarray(out.positions)[0, 0])}
  # Position 2: last 4 -> 9, mri max(2, 9 - 4) = 5, rank 9 + 5 + 1 = 15 at the boundary.
  assert by_position[2] == {"last": 9, "mri": 5, "rank": 15}
  # Position 5 (last 6, mri 1) re-ranked 8; the victim is the lowest rank of this boundary:
  # position 1 (last 2, mri 1: rank 4); 8 and 9 are the recent window: unranked.
  assert 1 not in by_position and by_position[9] == {"last": 9, "mri": 0, "rank": 0}
  assert by_position[5] == {"last": 6, "mri": 1, "rank": 8}
  assert by_position[8]["rank"] == 0


# ----------------------------------------------------------------------------- prefill


def _compress(method, data, keep, old=None):
  arrays = mi.layer_arrays(data)
  arrays["slot_state"] = None if old is None else _as_state(old)
  out, prio = _run_compiled(_compress_fn, dict(method=method, keep=keep, config=mi.config()),
                            (arrays,))
  return out, np.asarray(prio)


@pytest.mark.parametrize("case", ["default", "small"])
def test_prefill_is_snapkv_with_the_window_history_as_state(case):
  """Kept slots are SnapKV's (window = recent), and their state is the restated activation
  history of the prompt's last `recent` queries, ranked at the end of the prompt."""
  if case == "default":
    method, keep = LazyEviction(), 48
    data = mi.random_prefill(17, lengths=(96, 70, 40), s=96)
    old = None
  else:
    method, keep = LazyEviction(recent=6, window=4, threshold=0.8, kernel_size=3,
                                pooling="avg", gqa="max"), 20
    data = mi.random_prefill(11, lengths=(48, 33))
    # State from an earlier chunk: activations before this chunk's last `recent` queries.
    rng = np.random.default_rng(5)
    old = {}
    first_query = data.lengths[:, None, None] - method.recent
    born = np.maximum(data.kpos, 0)
    old["last"] = np.where((rng.random(data.kpos.shape) < 0.5) & (born < first_query),
                           rng.integers(born, np.maximum(first_query, born + 1)), 0)
    old["mri"] = rng.integers(0, 5, data.kpos.shape)
    old["rank"] = rng.integers(0, 40, data.kpos.shape)
  prio = mi.snapkv(data, keep, method.recent, method.kernel_size, method.pooling, method.gqa)
  mi.assert_separated(prio, keep)
  out, got = _compress(method, data, keep, old)
  finite = np.isfinite(prio)
  np.testing.assert_array_equal(np.isposinf(got), np.isposinf(prio))
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(prio))
  np.testing.assert_allclose(got[finite], prio[finite], rtol=0,
                             atol=1e-6 * np.abs(prio[finite]).max())
  index = mi.select(prio, keep)
  np.testing.assert_array_equal(np.asarray(out.positions), np.take_along_axis(data.kpos, index, -1))
  np.testing.assert_array_equal(np.asarray(out.keys),
                                np.take_along_axis(data.k, index[..., None], 2).astype(np.float32))
  expected = np_prefill_state(data, method, old)
  for f in FIELDS:
    np.testing.assert_array_equal(np.asarray(out.state[f]),
                                  np.take_along_axis(expected[f], index, -1), err_msg=f)
  kept = np.asarray(out.positions)
  for row, n in enumerate(data.lengths):
    for head in range(mi.K):
      valid = kept[row, head][kept[row, head] >= 0]
      assert set(range(max(n - method.recent, 0), n)) <= set(valid.tolist())
      if n <= keep:
        assert valid.tolist() == list(range(n))
      else:
        assert len(valid) == keep
  # Some kept slots were activated and ranked: the test sees more than the all-zero state.
  assert (np.asarray(out.state["mri"]) > 0).any() and (np.asarray(out.state["rank"]) > 0).any()


# ----------------------------------------------------------------------------- scenario


@pytest.mark.parametrize("window, capacity", [(1, 8), (4, 10)])
def test_a_recurring_token_stays_and_a_finished_one_goes(window, capacity):
  """A token attended every 4 steps stays; of two tokens silent since the same step, the one
  whose MRI is short (finished) goes before the one whose long MRI says it may come back,
  which stays while silent within its MRI. A plain recency rule would tie those two and,
  the long-MRI token sitting in the lower slot, evict it first."""
  method = LazyEviction(window=window, recent=2, threshold=1.0)
  start = capacity                                  # positions 0 .. capacity - 1 are cached
  recurring, long_gap, short_gap = 0, 1, 2          # positions (= slots at the start)
  last = np.zeros(capacity, np.int64)
  mri = np.zeros(capacity, np.int64)
  last[recurring], mri[recurring] = start - 1, 4    # attended at t = start - 1 + 4k
  last[long_gap], mri[long_gap] = start - 2, 20     # may come back until t = start + 18
  last[short_gap], mri[short_gap] = start - 2, 2    # finished from t = start + 1
  state = {"last": last[None, None], "mri": mri[None, None],
           "rank": np.zeros((1, 1, capacity), np.int64)}
  positions = np.arange(capacity, dtype=np.int32)
  for slot in range(capacity):                      # ranked at the end of the prompt
    state["rank"][0, 0, slot] = _np_rank(state, 0, 0, slot, positions[slot], start,
                                         method.recent)
  layer = kv_cache.LayerCache(
      keys=jnp.zeros((1, mi.K, capacity, mi.D)), values=jnp.zeros((1, mi.K, capacity, mi.D)),
      positions=jnp.asarray(np.broadcast_to(positions, (1, mi.K, capacity))),
      end=jnp.int32(capacity),
      state={f: jnp.asarray(np.broadcast_to(state[f], (1, mi.K, capacity)), jnp.int32)
             for f in FIELDS})
  new = jnp.zeros((1, mi.K, 1, mi.D))
  gone = {}
  for t in range(start, start + 40):
    held = np.asarray(layer.positions)[0]                           # [K, C]
    probs = np.zeros((1, mi.H, capacity), np.float32)
    if (t - (start - 1)) % 4 == 0:
      for head in range(mi.H):
        probs[0, head, np.flatnonzero(held[head // mi.G] == recurring)] = 0.6
    layer = _run_compiled(_evict_fn, dict(method=method, budget=capacity),
                          (layer, new, new, jnp.asarray([t], jnp.int32), jnp.asarray(probs),
                           jnp.zeros((1, mi.H)), jnp.asarray([t + 1], jnp.int32)))
    held = np.asarray(layer.positions)[0]
    assert (held == recurring).any(-1).all(), f"the recurring token was evicted at t={t}"
    for pos in (long_gap, short_gap):
      if pos not in gone and not (held == pos).any(-1).all():
        gone[pos] = t
  assert short_gap in gone
  assert long_gap in gone, "a token silent far past its MRI must go"
  assert gone[long_gap] > start + 18 >= gone[short_gap], gone  # kept while within its MRI


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=0)


PROMPTS = [[t + 1 for t in p] for p in random_prompts([60, 45], seed=2, vocab=255)]


def test_generate_with_a_ratio_keeps_the_budget(model):
  result = kvjax.generate(model, PROMPTS, method="lazy_eviction", compression_ratio=0.5,
                          max_new_tokens=40)
  keep = 30                                                     # int(60 * 0.5)
  assert [len(t) for t in result.token_ids] == [40, 40]
  assert result.stats["kept_tokens_per_layer"] == [keep] * model.config.num_layers
  # No room (it evicts instead): its 30 slots, then reserved ones (never filled) up to a
  # shared capacity (generate.ROOM_MULTIPLE).
  assert result.stats["cache_capacity_tokens"] == 64
  assert result.stats["context_cache_bytes"] < result.stats["cache_bytes"]
  assert (result.stats["protected_tokens_configured"], result.stats["protected_tokens"]) == (
      32, 29)                                                   # recent shrunk to fit 30


def test_decode_holds_the_budget_and_evicts_by_frozen_ranks(model):
  """Step by step on the tiny model: every layer keeps exactly `keep` slots per head, the
  recent window and the new token are always there, and each evicted token is the lowest
  frozen rank of the cache it left whenever a ranked unprotected slot existed."""
  method, keep, steps = LazyEviction(window=4, recent=6), 30, 24
  tokens, mask = inputs.left_pad(PROMPTS, 0)
  pre = context.prefill(model, tokens, mask, method, keep, room=0)
  cache, ids = pre.cache, jnp.argmax(pre.logits, -1).astype(jnp.int32)
  lengths = np.asarray([len(p) for p in PROMPTS])
  generated = [np.asarray(ids)]
  ranked_evictions = 0
  for i in range(steps):
    before = [(np.asarray(layer.positions), np.asarray(layer.state["rank"]))
              for layer in cache.layers]
    ids, _, cache = engine.STEPS.decode(model, ids, cache, jax.random.key(i), 1.0, 1.0, True,
                                        pre.decode_plan)
    generated.append(np.asarray(ids))
    lengths = lengths + 1
    for layer, (old_pos, old_rank) in zip(cache.layers, before):
      positions = np.asarray(layer.positions)
      assert layer.capacity == keep
      for row in range(len(PROMPTS)):
        for head in range(model.config.num_kv_heads):
          held = positions[row, head]
          assert (held >= 0).all() and len(set(held.tolist())) == keep
          assert set(range(lengths[row] - method.recent, lengths[row])) <= set(held.tolist())
          (victim,) = np.flatnonzero(held != old_pos[row, head])
          assert held[victim] == lengths[row] - 1                # the new token
          if lengths[row] % method.window == 0:
            continue  # a boundary: the ranks were refrozen from this step's attention
          eligible = (old_rank[row, head] > 0) & (old_pos[row, head] < lengths[row]
                                                  - method.recent)
          if eligible.any():
            lowest = np.flatnonzero(eligible)[np.argmin(old_rank[row, head][eligible])]
            assert victim == lowest, (i, row, head)
            ranked_evictions += 1
  assert ranked_evictions > 0
  result = kvjax.generate(model, PROMPTS, method=method, compression_ratio=0.5,
                          max_new_tokens=steps + 1)
  np.testing.assert_array_equal(np.stack(generated, 1), np.asarray(result.token_ids))


def test_generate_without_compression_equals_full(model):
  """A budget that holds the whole prompt: the first tokens equal the full cache's (decode
  step i attends before it evicts, so tokens up to keep - length + 2 saw everything)."""
  full = kvjax.generate(model, PROMPTS, max_new_tokens=6).token_ids
  got = kvjax.generate(model, PROMPTS, method="lazy_eviction", compression_ratio=0.0,
                       max_new_tokens=6)
  assert got.stats["kept_tokens_per_layer"] == [60] * model.config.num_layers
  for row, prompt in enumerate(PROMPTS):
    n = min(6, 60 - len(prompt) + 2)
    assert got.token_ids[row][:n] == full[row][:n]


# ----------------------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize("kwargs, words", [
    (dict(threshold=-0.5), "threshold=-0.5"),
    (dict(threshold=float("inf")), "threshold=inf"),
    (dict(window=0), "window=0"),
    (dict(window=2.5), "window=2.5"),
    (dict(recent=0), "recent=0"),
    (dict(kernel_size=4), "kernel_size=4"),
    (dict(pooling="mean"), "pooling='mean'"),
    (dict(gqa="sum"), "gqa='sum'"),
])
def test_bad_hyperparameters_name_the_value(kwargs, words):
  with pytest.raises(MethodError, match=words):
    LazyEviction(**kwargs)
  spec = ":".join(f"{k}={v}" for k, v in kwargs.items())
  with pytest.raises(MethodError):
    methods.get(f"lazy_eviction:{spec}")


def test_registered_with_defaults_and_fitted():
  method = methods.get("lazy_eviction")
  assert isinstance(method, LazyEviction) and method.decode_time
  assert (method.threshold, method.window, method.recent) == (1.0, 32, 32)
  assert method.fitted(48) is method
  assert method.fitted(10) == LazyEviction(recent=9)
  assert method.fitted(1).protected_tokens(1) == 1
  assert methods.get("lazy_eviction:window=8:recent=4") == LazyEviction(window=8, recent=4)
