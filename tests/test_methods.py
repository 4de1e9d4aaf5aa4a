"""Compression methods against slow numpy restatements of their algorithms, plus invariants.

Each test builds one layer's inputs (B=2, one row left-padded, H=4, K=2, D=16), runs kvjax's
compaction (`compress_dense`, `compress_headwise`, `evict_and_insert`) and compares the kept
original positions, keys and values per (row, KV head) with `method_inputs`' float64 numpy
versions, written from the algorithms' descriptions, never from kvjax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import method_inputs as mi
from kvjax import methods
from kvjax.cache import compress, kv_cache
from kvjax.model import attention, rope
from tiny import tiny_model


def _dense(method, data, keep, **inputs):
  x = mi.layer_inputs(data, **inputs)
  return compress.compress_dense(method, mi.candidates(data), x, keep)


def _headwise(method, data, keep, **inputs):
  x = mi.layer_inputs(data, **inputs)
  return compress.compress_headwise(method, mi.candidates(data), x, keep,
                                    method.safeguard(keep))


def _assert_kept(out, data, index):
  """out holds, per (row, KV head), the slots `index` [B, K, keep] of the candidates."""
  np.testing.assert_array_equal(np.asarray(out.positions),
                                np.take_along_axis(data.kpos, index, -1))
  for got, source in ((out.keys, data.k), (out.values, data.v)):
    np.testing.assert_array_equal(
        np.asarray(got), np.take_along_axis(source, index[..., None], 2).astype(np.float32))


def _check_dense(method, data, keep, prio, rtol=1e-4, **inputs):
  mi.assert_separated(prio, keep, rtol)
  out = _dense(method, data, keep, **inputs)
  assert out.capacity == keep
  _assert_kept(out, data, mi.select(prio, keep))
  return out


# ----------------------------------------------------------------------------- per method


def test_streaming_llm_keeps_sinks_and_most_recent():
  data = mi.random_prefill(0)
  keep, sinks = 20, 4
  prio = mi.streaming_llm(data, keep, sinks)
  _check_dense(methods.StreamingLLM(sinks=sinks), data, keep, prio)
  expected = lambda n: list(range(sinks)) + list(range(n - (keep - sinks), n))
  out = _dense(methods.StreamingLLM(sinks=sinks), data, keep)
  for row, n in enumerate(data.lengths):
    for head in range(mi.K):
      assert np.asarray(out.positions)[row, head].tolist() == expected(int(n))


def test_attend_column_sums_match_numpy():
  data = mi.random_prefill(1)
  _, sums = attention.attend(jnp.asarray(data.q, jnp.float32), jnp.asarray(data.k, jnp.float32),
                             jnp.asarray(data.v, jnp.float32), jnp.asarray(data.qpos),
                             jnp.asarray(data.kpos), column_sums=True)
  np.testing.assert_allclose(np.asarray(sums), mi.column_sums(data), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recent_ratio,with_state", [(0.5, False), (0.25, True)])
def test_h2o_prefill_matches_numpy(recent_ratio, with_state):
  data = mi.random_prefill(2)
  keep = 22
  sums = mi.column_sums(data)
  state = (mi.f32(np.random.default_rng(20).uniform(0, 2, data.kpos.shape))
           if with_state else None)
  prio = mi.h2o(data, keep, recent_ratio, sums, state)
  out = _check_dense(methods.H2O(recent_ratio=recent_ratio), data, keep, prio,
                     column_sums=sums, slot_scores=state)
  # The kept slots carry their accumulated score into decode.
  accumulated = mi.group(sums, "sum") + (0 if state is None else state)
  index = mi.select(prio, keep)
  np.testing.assert_allclose(np.asarray(out.scores), np.take_along_axis(accumulated, index, -1),
                             rtol=1e-5, atol=1e-6)


def test_tova_prefill_matches_numpy():
  data = mi.random_prefill(3)
  keep = 25
  prio = mi.tova(data)
  out = _check_dense(methods.TOVA(), data, keep, prio)
  positions = np.asarray(out.positions)
  np.testing.assert_array_equal(positions[:, 0], positions[:, 1])  # one set for the layer


def test_knorm_matches_numpy():
  data = mi.random_prefill(4)
  _check_dense(methods.Knorm(), data, 24, mi.knorm(data))


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("gqa", ["mean", "max"])
def test_snapkv_matches_numpy(pooling, gqa):
  data = mi.random_prefill(5, lengths=(56, 37), s=56)
  keep, window, kernel = 26, 8, 5
  prio = mi.snapkv(data, keep, window, kernel, pooling, gqa)
  _check_dense(methods.SnapKV(window=window, kernel_size=kernel, pooling=pooling, gqa=gqa),
               data, keep, prio)


def test_snapkv_window_longer_than_short_row():
  """A row shorter than the window keeps all its tokens (they are all in the window)."""
  data = mi.random_prefill(6, lengths=(48, 10), s=48)
  keep, window = 20, 12
  prio = mi.snapkv(data, keep, window, 7, "max", "mean")
  out = _check_dense(methods.SnapKV(window=window), data, keep, prio)
  positions = np.asarray(out.positions)[1]
  for head in range(mi.K):
    assert set(range(10)) <= set(positions[head].tolist())


@pytest.mark.parametrize("num_layers,keep,window,context", [(6, 40, 8, 200), (5, 30, 4, 64),
                                                            (8, 24, 8, 100)])
def test_pyramidkv_layer_budgets(num_layers, keep, window, context):
  cfg = mi.config(num_layers=num_layers)
  got = np.asarray(methods.PyramidKV(window=window).layer_budgets(cfg, keep, context))
  formula = mi.pyramid_formula(num_layers, keep, window, context, 20.0)
  assert got.sum() == num_layers * keep
  assert (np.diff(got) <= 0).all()
  assert got[0] > got[-1]
  np.testing.assert_array_less(np.abs(got - formula), 1.0)
  assert got.min() >= window and got.max() <= context


def test_pyramidkv_uniform_for_short_contexts():
  cfg = mi.config(num_layers=4)
  # b = keep - window = 24; contexts shorter than 2b = 48 use a uniform budget.
  assert methods.PyramidKV(window=8).layer_budgets(cfg, 32, 40) == (32,) * 4


def test_pyramidkv_capped_pyramid_between_2b_and_2b_plus_window():
  """methods_B.md section 15 (and PyramidKV's code): uniform only when n < 2b; for
  2b <= n the top budget is capped at n - w and min = 2b - max.

  LIBRARY DISCREPANCY (expected to fail until fixed): kvjax.methods.budgets.pyramid tests
  `context_length - window < 2 * b`, so contexts in [2b, 2b + w) get a uniform budget (its
  docstring says "contexts shorter than 2b"), and the cap branch can never run.
  """
  cfg = mi.config(num_layers=4)
  keep, window, context = 20, 8, 28                      # b = 12, 2b = 24 <= 28 < 32
  got = np.asarray(methods.PyramidKV(window=window).layer_budgets(cfg, keep, context))
  formula = mi.pyramid_formula(4, keep, window, context, 20.0)  # 28, 20.7, 13.3, 12 (+0)
  assert got.sum() == 4 * keep
  np.testing.assert_array_less(np.abs(got - formula), 1.0)


def test_pyramidkv_layers_select_like_snapkv():
  data = mi.random_prefill(7, lengths=(64, 45), s=64)
  cfg = mi.config(num_layers=3)
  method = methods.PyramidKV(window=6, kernel_size=5, pooling="avg")
  budgets = method.layer_budgets(cfg, 24, 45)
  assert len(set(budgets)) == 3
  for layer, keep in enumerate(budgets):
    prio = mi.snapkv(data, keep, 6, 5, "avg", "mean")
    _check_dense(method, data, keep, prio, cfg=cfg, layer=layer)


def _assert_flat(out, data, keep, expected):
  """A FlatLayerCache holds, in segment h of each row, head h's `expected` slots in order."""
  b = data.k.shape[0]
  total = mi.K * keep
  assert out.capacity == total
  offsets = np.asarray(out.offsets)
  positions, keys, values = (np.asarray(a) for a in (out.positions, out.keys, out.values))
  heads, next_slot = np.asarray(out.heads), np.asarray(out.next_slot)
  for row in range(b):
    counts = [len(e) for e in expected[row]]
    np.testing.assert_array_equal(offsets[row], np.concatenate([[0], np.cumsum(counts)]))
    assert offsets[row, -1] == total
    np.testing.assert_array_equal(next_slot[row], offsets[row, 1:])
    for head in range(mi.K):
      seg = slice(offsets[row, head], offsets[row, head + 1])
      index = expected[row][head]
      np.testing.assert_array_equal(positions[row, seg], data.kpos[row, head, index])
      np.testing.assert_array_equal(keys[row, seg], data.k[row, head, index].astype(np.float32))
      np.testing.assert_array_equal(values[row, seg],
                                    data.v[row, head, index].astype(np.float32))
      assert (heads[row, seg] == head).all()


@pytest.mark.parametrize("press", ["snapkv", "knorm"])
def test_adakv_matches_numpy(press):
  data = mi.random_prefill(8, lengths=(56, 40), s=56)
  keep, alpha = 20, 0.3
  if press == "snapkv":
    inner = methods.SnapKV(window=6, kernel_size=5, pooling="max")
    prio = mi.snapkv(data, keep, 6, 5, "max", "mean")
  else:
    inner = methods.Knorm()
    prio = mi.knorm(data)
  method = methods.AdaKV(press=inner, alpha_safeguard=alpha)
  safeguard = int(alpha * keep)
  assert method.safeguard(keep) == safeguard == 6
  expected = mi.adakv_select(prio, keep, safeguard)
  # Precondition: the layer-wide boundary is not a float near-tie.
  for row in range(2):
    flat = prio[row].copy()
    for head in range(mi.K):
      flat[head, mi.top(flat[head], safeguard)] = np.inf
    mi.assert_separated(flat.reshape(1, 1, -1), mi.K * keep)
  out = _headwise(method, data, keep)
  _assert_flat(out, data, keep, expected)
  counts = [[len(e) for e in row] for row in expected]
  assert any(c != keep for row in counts for c in row), "budgets should differ per head"
  assert all(c >= safeguard for row in counts for c in row)


@pytest.mark.parametrize("use_covariance,use_vnorm,epsilon,n_future", [
    (True, True, 0.0, 512), (False, False, 0.0, 16), (True, False, 0.0, 16),
    (False, True, 0.01, 64)])
def test_expected_attention_matches_numpy(use_covariance, use_vnorm, epsilon, n_future):
  data = mi.random_prefill(9, q_mean=0.7)
  keep, n_sink = 24, 3
  cfg = mi.config()
  inv_freq = rope.inverse_frequencies(cfg)
  prio = mi.expected_attention(data, keep, inv_freq, n_future, n_sink, use_covariance,
                               use_vnorm, epsilon)
  method = methods.ExpectedAttention(n_future_positions=n_future, n_sink=n_sink,
                                     use_covariance=use_covariance, use_vnorm=use_vnorm,
                                     epsilon=epsilon)
  _check_dense(method, data, keep, prio, rtol=1e-3, cfg=cfg)


def test_expected_attention_average_rotation_is_rope():
  """The numpy average rotation, for one position, is exactly RoPE."""
  cfg = mi.config()
  inv_freq = rope.inverse_frequencies(cfg)
  x = np.random.default_rng(10).normal(size=(1, 1, 1, mi.D))
  rotated = mi.rope_np(x, np.asarray([[37]]), inv_freq)[0, 0, 0]
  np.testing.assert_allclose(mi.average_rotation(inv_freq, 37, 1) @ x[0, 0, 0], rotated,
                             atol=1e-12)


@pytest.mark.parametrize("history_window,recent,sinks,seed", [(8, 6, 2, 11), (32, 5, 3, 12)])
def test_scissorhands_prefill_matches_numpy(history_window, recent, sinks, seed):
  data = mi.random_prefill(seed, lengths=(48, 30))
  keep = 22
  prio = mi.scissorhands(data, keep, history_window, recent, sinks)
  method = methods.Scissorhands(history_window=history_window, recent=recent, sinks=sinks)
  out = _check_dense(method, data, keep, prio)
  history = mi.scissorhands_history(data, history_window)
  np.testing.assert_array_equal(np.asarray(out.history),
                                np.take_along_axis(history, mi.select(prio, keep), -1))


# ----------------------------------------------------------------------------- decode steps


class _DecodeState:
  """A full decode-time cache of `capacity` slots per head, in numpy (float64)."""

  def __init__(self, seed, capacity=20, seen=(40, 30), valid=(20, 17), history_window=8):
    rng = np.random.default_rng(seed)
    b = len(seen)
    self.rng = rng
    self.lengths = np.asarray(seen, np.int32)
    self.positions = np.full((b, mi.K, capacity), -1, np.int32)
    for row in range(b):
      for head in range(mi.K):
        n = seen[row]
        middle = rng.choice(np.arange(2, n - 3), valid[row] - 5, replace=False)
        picked = np.sort(np.concatenate([[0, 1], middle, np.arange(n - 3, n)]))
        slots = np.sort(rng.choice(capacity, valid[row], replace=False))
        self.positions[row, head, slots] = picked
    self.keys = mi.f32(rng.normal(size=(b, mi.K, capacity, mi.D)))
    self.values = mi.f32(rng.normal(size=(b, mi.K, capacity, mi.D)))
    self.scores = mi.f32(rng.uniform(0, 3, (b, mi.K, capacity)))
    self.history = rng.integers(0, 1 << history_window, (b, mi.K, capacity)).astype(np.uint32)

  def layer(self, with_scores, with_history):
    return kv_cache.LayerCache(
        keys=jnp.asarray(self.keys, jnp.float32), values=jnp.asarray(self.values, jnp.float32),
        positions=jnp.asarray(self.positions), end=jnp.int32(self.positions.shape[2]),
        scores=jnp.asarray(self.scores, jnp.float32) if with_scores else None,
        history=jnp.asarray(self.history, jnp.uint32) if with_history else None)


def _run_decode(method, state, numpy_step, steps=7, with_scores=False, with_history=False,
                rtol=1e-4):
  """Runs `steps` decode steps through kvjax and numpy, comparing the caches each step.

  numpy_step(state, probs, own, lengths_after) updates the state's method fields and returns
  the eviction priority [B, K, C] (protected +inf, empty -inf already applied).
  """
  layer = state.layer(with_scores, with_history)
  b = state.positions.shape[0]
  for _ in range(steps):
    new_pos = state.lengths.copy()
    after = state.lengths + 1
    q_new = mi.f32(state.rng.normal(size=(b, mi.H, mi.D)) * 1.5)
    new_key = mi.f32(state.rng.normal(size=(b, mi.K, mi.D)))
    new_value = mi.f32(state.rng.normal(size=(b, mi.K, mi.D)))
    probs, own = mi.decode_probs(q_new, state.keys, state.positions, new_key, new_pos)
    probs, own = mi.f32(probs), mi.f32(own)
    layer = compress.evict_and_insert(
        method, layer, jnp.asarray(new_key[:, :, None], jnp.float32),
        jnp.asarray(new_value[:, :, None], jnp.float32), jnp.asarray(new_pos),
        jnp.asarray(probs, jnp.float32), jnp.asarray(own, jnp.float32), jnp.asarray(after))
    prio, new_score, new_history = numpy_step(state, probs, own, after)
    mi.assert_separated(-prio, 1, rtol)
    victim = np.argmin(prio, axis=-1)                     # empty (-inf) first, lowest index
    for row in range(b):
      for head in range(mi.K):
        slot = victim[row, head]
        state.positions[row, head, slot] = new_pos[row]
        state.keys[row, head, slot] = new_key[row, head]
        state.values[row, head, slot] = new_value[row, head]
        if new_score is not None:
          state.scores[row, head, slot] = new_score[row, head]
        if new_history is not None:
          state.history[row, head, slot] = new_history[row, head]
    state.lengths = after
    np.testing.assert_array_equal(np.asarray(layer.positions), state.positions)
    np.testing.assert_array_equal(np.asarray(layer.keys), state.keys.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(layer.values), state.values.astype(np.float32))
    if with_scores:
      np.testing.assert_allclose(np.asarray(layer.scores), state.scores, rtol=1e-5, atol=1e-6)
    if with_history:
      np.testing.assert_array_equal(np.asarray(layer.history), state.history)
  return layer


def _protected_recent(state, after, recent):
  return (state.positions >= 0) & (state.positions >= after[:, None, None] - recent)


def test_h2o_decode_steps_match_numpy():
  state = _DecodeState(13)
  ratio = 0.25
  recent = int(round(state.positions.shape[2] * ratio))

  def step(state, probs, own, after):
    state.scores = state.scores + mi.group(probs, "sum")
    new = mi.group(own[..., None], "sum")[..., 0]
    prio = mi.priorities(state.scores, _protected_recent(state, after, recent), state.positions)
    return prio, new, None

  _run_decode(methods.H2O(recent_ratio=ratio), state, step, with_scores=True)


def test_tova_decode_steps_match_numpy():
  state = _DecodeState(14)

  def step(state, probs, own, after):
    score = np.broadcast_to(probs.mean(1, keepdims=True), state.positions.shape)
    return mi.priorities(score, _protected_recent(state, after, 1), state.positions), None, None

  _run_decode(methods.TOVA(), state, step)


def test_streaming_llm_decode_evicts_oldest_non_sink():
  state = _DecodeState(15)
  sinks = 2

  def step(state, probs, own, after):
    score = state.positions.astype(np.float64)
    return mi.priorities(score, mi.sinks_protected(state.positions, sinks),
                         state.positions), None, None

  layer = _run_decode(methods.StreamingLLM(sinks=sinks), state, step)
  row0 = np.sort(np.asarray(layer.positions)[0, 0])
  assert row0[:sinks].tolist() == [0, 1] and row0[-1] == state.lengths[0] - 1


def test_scissorhands_decode_steps_match_numpy():
  w, recent, sinks = 8, 4, 2
  state = _DecodeState(16, history_window=w)

  def step(state, probs, own, after):
    valid = state.positions >= 0
    threshold = 1.0 / (valid.sum(-1, keepdims=True) + 1)                 # [B, K, 1]
    low = (mi.group(probs, "mean") < threshold) & valid
    history = (state.history.astype(np.uint64) << np.uint64(1)) | low.astype(np.uint64)
    state.history = (history & np.uint64((1 << w) - 1)).astype(np.uint32)
    new = (mi.group(own[..., None], "mean")[..., 0] < threshold[..., 0]).astype(np.uint32)
    protected = (_protected_recent(state, after, recent)
                 | mi.sinks_protected(state.positions, sinks))
    prio = mi.priorities(-mi.popcount(state.history).astype(np.float64), protected,
                         state.positions)
    return prio, None, new

  _run_decode(methods.Scissorhands(history_window=w, recent=recent, sinks=sinks), state, step,
              with_history=True)


# ----------------------------------------------------------------------------- invariants

COMPRESSING = [name for name in methods.available() if name != "full"]


def _protected_np(method, data, keep):
  """[B, K, S] tokens the method must always keep, from its documented hyperparameters."""
  inner = getattr(method, "press", None)
  out = np.zeros(data.kpos.shape, bool)
  if inner is not None:
    out |= _protected_np(inner, data, keep)
  name = method.name
  if name in ("snapkv", "pyramidkv"):
    out |= mi.window_protected(data, method.window)
  elif name == "sinks_window":
    out |= mi.window_protected(data, method.window) | mi.sinks_protected(data.kpos,
                                                                         method.sinks)
  elif name == "h2o":
    out |= mi.window_protected(data, int(round(keep * method.recent_ratio)))
  elif name == "tova":
    out |= mi.window_protected(data, 1)
  elif name == "scissorhands":
    out |= mi.window_protected(data, method.recent) | mi.sinks_protected(data.kpos,
                                                                         method.sinks)
  elif name == "streaming_llm":
    out |= mi.sinks_protected(data.kpos, method.sinks)
  elif name == "expected_attention":
    out |= mi.sinks_protected(data.kpos, method.n_sink)
  return out


def _compress_any(method, data, keep):
  """(positions per row and head as lists, the raw output)."""
  sums = mi.column_sums(data) if method.needs_column_sums else None
  if method.headwise:
    out = _headwise(method, data, keep, column_sums=sums)
    offsets, positions = np.asarray(out.offsets), np.asarray(out.positions)
    kept = [[positions[r, offsets[r, h]:offsets[r, h + 1]] for h in range(mi.K)]
            for r in range(positions.shape[0])]
  else:
    out = _dense(method, data, keep, column_sums=sums)
    positions = np.asarray(out.positions)
    kept = [[positions[r, h] for h in range(mi.K)] for r in range(positions.shape[0])]
  return kept, out


@pytest.fixture(scope="module")
def long_data():
  return mi.random_prefill(17, lengths=(96, 70), s=96)


@pytest.mark.parametrize("name", COMPRESSING)
def test_invariants_budget_protection_determinism(name, long_data):
  method = methods.get(name)
  data, keep = long_data, 48
  assert method.protected_tokens(keep) < keep
  kept, out = _compress_any(method, data, keep)
  protected = _protected_np(method, data, keep)
  for row in range(2):
    for head in range(mi.K):
      got = kept[row][head]
      assert (got[:-1] < got[1:])[got[1:] >= 0].all(), "kept slots are in position order"
      assert set(data.kpos[row, head][protected[row, head]]) <= set(got.tolist())
    valid = [int((kept[row][h] >= 0).sum()) for h in range(mi.K)]
    if method.headwise:
      assert sum(valid) == mi.K * keep
      assert min(valid) >= method.safeguard(keep)
    else:
      assert valid == [keep] * mi.K
  _, again = _compress_any(method, data, keep)
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cfg = mi.config(num_layers=5)
  assert sum(method.layer_budgets(cfg, keep, 96)) == 5 * keep


@pytest.mark.parametrize("name", COMPRESSING)
@pytest.mark.parametrize("keep", [80, 96, 100])
def test_budget_at_least_length_keeps_everything(name, keep):
  data = mi.random_prefill(18, lengths=(80, 60), s=96)
  method = methods.get(name)
  kept, _ = _compress_any(method, data, keep)
  for row, n in enumerate(data.lengths):
    for head in range(mi.K):
      got = kept[row][head]
      assert got[got >= 0].tolist() == list(range(int(n)))


@pytest.mark.parametrize("name", [n for n in COMPRESSING if methods.get(n).decode_time])
def test_decode_eviction_invariants(name, long_data):
  """Each step the new token is stored, the cache stays at budget, protected slots stay."""
  method = methods.get(name)
  data, keep = long_data, 48
  _, layer = _compress_any(method, data, keep)
  rng = np.random.default_rng(19)
  lengths = data.lengths.copy()
  for _ in range(5):
    positions = np.asarray(layer.positions)
    new_key = rng.normal(size=(2, mi.K, mi.D))
    probs, own = mi.decode_probs(rng.normal(size=(2, mi.H, mi.D)), np.asarray(layer.keys),
                                 positions, new_key, lengths)
    after = lengths + 1
    args = (jnp.asarray(new_key[:, :, None], jnp.float32),
            jnp.asarray(new_key[:, :, None], jnp.float32), jnp.asarray(lengths),
            jnp.asarray(probs, jnp.float32), jnp.asarray(own, jnp.float32), jnp.asarray(after))
    new = compress.evict_and_insert(method, layer, *args)
    again = compress.evict_and_insert(method, layer, *args)
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(again)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    got = np.asarray(new.positions)
    step = mi.Prefill(raw_q=None, q=None, qpos=None, k=None, v=None, kpos=positions,
                      lengths=after)
    protected = _protected_np(method, step, keep)
    for row in range(2):
      for head in range(mi.K):
        assert lengths[row] in got[row, head]
        assert (got[row, head] >= 0).sum() == keep
        assert set(positions[row, head][protected[row, head]]) <= set(got[row, head])
        assert len(set(positions[row, head]) - set(got[row, head])) == 1
    layer, lengths = new, after


# ----------------------------------------------------------------------------- end to end

PROMPT_LENGTHS = (45, 70)
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def e2e():
  model = tiny_model()
  rng = np.random.default_rng(21)
  prompts = [rng.integers(0, 256, n).tolist() for n in PROMPT_LENGTHS]
  full = kvjax.generate(model, prompts, max_new_tokens=NEW_TOKENS).token_ids
  single = kvjax.generate(model, prompts[0], max_new_tokens=NEW_TOKENS).token_ids[0]
  return model, prompts, full, single


def _guaranteed(method, keep, length):
  """How many generated tokens must equal the full cache's when keep >= length.

  Methods that only compress the prompt keep every token and append: all of them. A
  decode-time method keeps its cache at `keep` slots: the first token comes from prefill
  and decode step i attends before evicting, so tokens 1 .. (keep - length) + 2 saw the
  whole context.
  """
  if not method.decode_time:
    return NEW_TOKENS
  return min(NEW_TOKENS, keep - length + 2)


@pytest.mark.parametrize("name", COMPRESSING)
def test_generate_without_compression_equals_full(name, e2e):
  model, prompts, full, single = e2e
  method = methods.get(name)
  got = kvjax.generate(model, prompts, method=name, compression_ratio=0.0,
                       max_new_tokens=NEW_TOKENS).token_ids
  keep = max(PROMPT_LENGTHS)
  for row, length in enumerate(PROMPT_LENGTHS):
    n = _guaranteed(method, keep, length)
    assert n >= 2
    assert got[row][:n] == full[row][:n], (row, got[row], full[row])
  length = PROMPT_LENGTHS[0]
  got = kvjax.generate(model, prompts[0], method=name, budget=length,
                       max_new_tokens=NEW_TOKENS).token_ids[0]
  n = _guaranteed(method, length, length)
  assert got[:n] == single[:n], (got, single)
