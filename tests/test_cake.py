"""CAKE: the per-slot indicator and preference terms against numpy, the budget arithmetic
against hand-worked cases, the cascade against a literal simulation of the official code's
layer-by-layer re-eviction, the host-side eviction against numpy, and the method end to end
(real per-layer savings, a row keeps what it keeps alone, chunked prefill, errors)."""

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import method_inputs as mi
from kvjax.cache.kv_cache import Cache, LayerCache
from kvjax.errors import MethodError
from kvjax.generation import context, inputs
from kvjax.methods import base, cake
from kvjax.methods.cake import CAKE, adjust_budgets, cascade_budgets
from tiny import padded_and_exact, random_prompts, tiny_model


def _state_numpy(data: mi.Prefill, window: int, gamma: float, kernel: int) -> np.ndarray:
  """[B, K, S, 3] from the definitions: A = the last `window` queries' attention; over its
  real rows, the indicator mean + gamma * var (ddof 1) on keys before the window, avg-pooled
  and group-averaged; entropy and variance of those keys summed over each group's heads."""
  probs = mi.attention(data.q, data.k, data.qpos, data.kpos)[:, :, -window:]  # [B, H, W, S]
  b, h, _, s = probs.shape
  out = np.zeros((b, mi.K, s, 3))
  for row in range(b):
    real = data.qpos[row, -window:] >= 0
    a = probs[row][:, real]                                          # [H, n, S]
    n = a.shape[1]
    before = (data.kpos[row, 0] >= 0) & (data.kpos[row, 0] < data.lengths[row] - window)
    mean = a.mean(1)
    var = a.var(1, ddof=1) if n > 1 else np.zeros_like(mean)
    indicator = np.where(before, mean + gamma * var, 0.0)
    entropy = np.where(before, -(a * np.log(a + 1e-10)).sum(1), 0.0)
    shift = np.where(before, var, 0.0)
    pooled = mi.pool(indicator[None], kernel, "avg")[0]
    for kv in range(mi.K):
      heads = slice(kv * mi.G, (kv + 1) * mi.G)
      out[row, kv, :, 0] = pooled[heads].mean(0)
      out[row, kv, :, 1] = entropy[heads].sum(0)
      out[row, kv, :, 2] = shift[heads].sum(0)
  return out


def test_state_matches_numpy():
  data = mi.random_prefill(3, lengths=(40, 29, 6), s=40)
  method = CAKE(window=8, gamma=50.0)
  x = base.LayerInputs(config=mi.config(), layer=0, **mi.layer_arrays(data))
  got = np.asarray(method.prefill_state(x))
  want = _state_numpy(data, 8, 50.0, 5)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
  assert (want[2] == 0).all() and (want[0, :, -8:, 1:] == 0).all()  # row 2 is all window
  assert (want[:2, :, :, 1] > 0).any() and (want[:2, :, :, 0] > 0).any()


@pytest.mark.parametrize("shares, total, cap, want", [
    # truncated [10, 0, 50]; capped [10, 0, 30]; the excess 20 split over the two below it.
    ([10.7, 0.2, 50.9], 60, 30, [20, 10, 30]),
    # 15 of 20: the shortfall 5 split evenly, the first layers get the remainder.
    ([5.0, 5.0, 5.0], 20, 30, [7, 7, 6]),
    # capped [30, 30, 1] + excess 20 on the last -> 81; 31 taken back from the layers
    # above 1: 10 each, the first one 11.
    ([40.0, 40.0, 1.0], 50, 30, [19, 20, 11]),
    # 3 over 2, but no layer is above 1: nothing can be lowered.
    ([1.0, 1.0, 1.0], 2, 30, [1, 1, 1]),
])
def test_adjust_budgets_hand_worked(shares, total, cap, want):
  assert adjust_budgets(shares, total, cap).tolist() == want


def _code_cascade(preferences, indicators, total, cap, cascading=True):
  """The official code's procedure, literally: after layer m, shares over layers 0..m
  (truncate, cap, spread the excess, fix the total), then every layer seen is cut by top-k of
  its *current* indicator to min(share, what it still holds). Returns each layer's kept
  indices into its original keys."""
  def adjust(shares):
    b = [int(v) for v in shares]
    excess = sum(max(v - cap, 0) for v in b)
    b = [min(v, cap) for v in b]
    def spread(amount, ok, sign):
      idx = [i for i in range(len(b)) if ok(b[i])]
      if amount and idx:
        for j, i in enumerate(idx):
          b[i] += sign * (amount // len(idx) + (1 if j < amount % len(idx) else 0))
    spread(excess, lambda v: v < cap, 1)
    diff = total - sum(b)
    if diff > 0:
      spread(diff, lambda v: v < cap, 1)
    elif diff < 0:
      spread(-diff, lambda v: v > 1, -1)
    return b

  held = [np.arange(len(ind)) for ind in indicators]
  n = len(preferences)
  for m in range(n) if cascading else [n - 1]:
    shares = [p / sum(preferences[:m + 1]) * total for p in preferences[:m + 1]]
    for layer, share in enumerate(adjust(shares)):
      share = min(share, cap, len(held[layer]))
      scores = indicators[layer][held[layer]]
      held[layer] = held[layer][np.argsort(-scores, kind="stable")[:share]]
  return [np.sort(h) for h in held]


@pytest.mark.parametrize("cascading", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_cascade_matches_the_codes_re_eviction(seed, cascading):
  rng = np.random.default_rng(seed)
  n, cap = 6, 40
  preferences = rng.gamma(0.7, size=n) * 100
  indicators = [rng.random(cap) for _ in range(n)]
  total = int(rng.integers(n, n * cap + 10))
  budgets = cascade_budgets(preferences, total, cap, cascading)
  if total >= n * cap:   # the row fits its budget (the code would not evict either)
    assert budgets.tolist() == [cap] * n
    return
  want = _code_cascade(preferences, indicators, total, cap, cascading)
  assert budgets.tolist() == [len(w) for w in want]
  if not cascading:
    assert budgets.sum() == total or (budgets == cap).any()
  assert budgets.sum() <= max(total, 1) + n and (budgets <= cap).all()


def test_cascade_only_ever_lowers_a_layer():
  # Steps: [17]; [16.06, 0.94] -> [17, 0]; [11.56, 0.68, 4.76] -> [12, 1, 4]. Layer 1 lost
  # its token at step 1 and does not get it back; allocating once gives it 1.
  assert cascade_budgets([17.0, 1.0, 7.0], 17, 18).tolist() == [12, 0, 4]
  assert cascade_budgets([17.0, 1.0, 7.0], 17, 18, cascading=False).tolist() == [12, 1, 4]


def _synthetic_cache(seed, lengths, layers=3, s=24, window=4):
  rng = np.random.default_rng(seed)
  b = len(lengths)
  out = []
  for _ in range(layers):
    pos = np.full((b, mi.K, s), -1, np.int32)
    for row, n in enumerate(lengths):
      pos[row, :, s - n:] = np.arange(n)
    state = rng.random((b, mi.K, s, 3)).astype(np.float32)
    state[..., 1:] *= rng.random((1, 1, 1, 1)) * 3      # layers differ in preference
    state = np.where((pos >= 0)[..., None], state, 0)
    out.append(LayerCache(keys=jnp.asarray(rng.normal(size=(b, mi.K, s, 8)), jnp.float32),
                          values=jnp.asarray(rng.normal(size=(b, mi.K, s, 8)), jnp.float32),
                          positions=jnp.asarray(pos), end=jnp.int32(s),
                          state=jnp.asarray(state)))
  return Cache(layers=tuple(out), lengths=jnp.asarray(lengths, jnp.int32))


def test_eviction_keeps_window_and_top_indicator_per_row():
  lengths, window, keep = (24, 17, 6), 4, 9
  cache = _synthetic_cache(0, lengths, window=window)
  method = CAKE(window=window).fitted(keep)
  budgets = method.layer_token_budgets(cache)                          # [L, B]
  out = method.finalize(cache)
  stats, content = method.cache_stats(out), out.lengths.nbytes
  for layer, (before, after) in enumerate(zip(cache.layers, out.layers)):
    pos, state = np.asarray(before.positions), np.asarray(before.state, np.float64)
    kept = np.asarray(after.positions)
    # The most any row keeps, padded in front with reserved slots to a multiple of 16 (the
    # step for counts up to 64), never above the 24 slots.
    exact = (budgets[layer] + np.minimum(window, lengths)).max()
    assert after.capacity == min(-(-exact // 16) * 16, 24) and after.capacity > exact - 16
    assert (kept[:, :, :after.capacity - exact] == -2).all()
    assert not (kept[:, :, after.capacity - exact] == -2).all()
    assert stats["slots_per_layer"][layer] == exact
    assert stats["allocated_slots_per_layer"][layer] == after.capacity
    content += sum(a.nbytes * exact // after.capacity
                   for a in (after.keys, after.values, after.positions)) + after.end.nbytes
    assert after.state is None
    for row, n in enumerate(lengths):
      for head in range(mi.K):
        real = pos[row, head] >= 0
        win = real & (pos[row, head] >= n - min(window, n))
        cand = real & ~win
        order = np.argsort(-np.where(cand, state[row, head, :, 0], -np.inf), kind="stable")
        want = set(pos[row, head][win]) | set(pos[row, head][order[:budgets[layer, row]]])
        got = kept[row, head][kept[row, head] >= 0]
        assert sorted(got.tolist()) == got.tolist() and set(got.tolist()) == want
  assert len({layer.capacity for layer in out.layers}) < len(out.layers)   # shared
  assert method.content_nbytes(out) == content < kvjax.cache.cache_nbytes(out)
  # Budgets per row from the rows' own preferences, summing to the total or capped.
  for row, n in enumerate(lengths):
    state = [np.asarray(layer.state, np.float64)[row] for layer in cache.layers]
    pref = [s[..., 1].sum() * s[..., 2].sum() for s in state]
    want = cascade_budgets(pref, (keep - window) * 3, n - window)
    assert budgets[:, row].tolist() == want.tolist()


def test_reserved_slots_in_front_leave_decode_priorities_unchanged():
  """Decode pools the new query's attention in slot order: reserved slots (attention 0)
  in front read as the zero padding before slot 0, so the kept slots and the room's tokens
  after them score as in an exactly sized layer; between the two (padding at the back,
  before the room) they would not."""
  rng = np.random.default_rng(3)
  kept, room, pad, window = 10, 6, 5, 3
  positions = np.concatenate([np.sort(rng.choice(40, kept, replace=False)),
                              40 + np.arange(room)])[None, None].repeat(mi.K, 1)   # [1, K, S]
  probs = rng.random((1, mi.H, kept + room)).astype(np.float32)
  lengths = jnp.asarray([40 + room])
  method = CAKE(window=window)
  priority = lambda pos, p: np.asarray(method.eviction_priority(
      None, jnp.asarray(p), jnp.asarray(pos, jnp.int32), lengths, 0))
  exact = priority(positions, probs)
  reserved = np.full((1, mi.K, pad), -2)
  zeros = np.zeros((1, mi.H, pad), np.float32)
  front = priority(np.concatenate([reserved, positions], -1),
                   np.concatenate([zeros, probs], -1))
  np.testing.assert_allclose(front[..., pad:], exact, rtol=1e-6)
  back = priority(np.concatenate([positions[..., :kept], reserved, positions[..., kept:]], -1),
                  np.concatenate([probs[..., :kept], zeros, probs[..., kept:]], -1))
  assert not np.allclose(np.delete(back, np.s_[kept:kept + pad], -1), exact)


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=0)


def test_generate_saves_memory_with_layer_budgets(model):
  prompts = random_prompts([90, 70], seed=1)
  full = kvjax.generate(model, prompts, max_new_tokens=4)
  out = kvjax.generate(model, prompts, method="cake", compression_ratio=0.5, max_new_tokens=4)
  ratio = out.stats["context_cache_bytes"] / full.stats["context_cache_bytes"]
  assert 0.45 < ratio < 0.55
  slots = out.stats["method_stats"]["slots_per_layer"]
  assert [len(t) for t in out.token_ids] == [4, 4]
  tokens, mask = inputs.left_pad(prompts, 0)
  pre = context.prefill(model, tokens, mask, kvjax.methods.get("cake"), 45, 0)
  real = [(np.asarray(layer.positions)[:, 0] >= 0).sum(1) for layer in pre.cache.layers]
  assert slots == [int(r.max()) for r in real] and slots[0] != slots[1]
  assert out.stats["kept_tokens_per_layer"] == [int(round(r.mean())) for r in real]


def test_shape_padding_changes_nothing_but_the_allocation(model, monkeypatch):
  """Layers padded to shared capacities decode exactly as exactly sized ones: with rows
  keeping different counts, a question and generated tokens past the window. (Where the
  padding goes is pinned by the eviction test above and the priority test: padding at the
  back changes this run's tokens too rarely to be caught here.)"""
  prompts = random_prompts([120, 96], seed=6)
  kwargs = dict(method="cake:window=8", compression_ratio=0.6, max_new_tokens=24,
                questions=random_prompts([20, 12], seed=7))
  padded, exact = padded_and_exact(model, prompts, cake, monkeypatch, **kwargs)
  assert padded.stats["kept_tokens_per_layer"] == exact.stats["kept_tokens_per_layer"]
  slots, allocated = (padded.stats["method_stats"][k]
                      for k in ("slots_per_layer", "allocated_slots_per_layer"))
  assert slots == exact.stats["method_stats"]["slots_per_layer"] != allocated
  assert all(a >= s for a, s in zip(allocated, slots))


def test_reused_capacity_sets_change_nothing_but_the_allocation(model, monkeypatch):
  """Capacities past the rounded counts (a set taken from an earlier prompt,
  `kv_cache.shared_capacities`) decode as exactly sized ones too."""
  prompts = random_prompts([120, 96], seed=6)
  kwargs = dict(method="cake:window=8", compression_ratio=0.6, max_new_tokens=24,
                questions=random_prompts([20, 12], seed=7))
  padded_and_exact(model, prompts, cake, monkeypatch, reused=True, **kwargs)


def test_budget_of_the_whole_context_is_the_full_cache(model):
  prompts = random_prompts([90, 70], seed=4)
  full = kvjax.generate(model, prompts, max_new_tokens=6)
  for budget in (90, 1000):
    out = kvjax.generate(model, prompts, method="cake", budget=budget, max_new_tokens=6)
    assert out.token_ids == full.token_ids


def test_batched_decode_equals_each_row_alone(model):
  """Rows keep different counts per layer; a row's reserved slots stay unwritten, so its
  decode-time evictions are the ones it makes alone."""
  prompts = random_prompts([120, 120, 90], seed=5)
  both = kvjax.generate(model, prompts, method="cake", budget=48, max_new_tokens=14)
  for row, prompt in enumerate(prompts):
    alone = kvjax.generate(model, [prompt], method="cake", budget=48, max_new_tokens=14)
    assert both.token_ids[row] == alone.token_ids[0]


def test_batched_questions_pool_as_each_row_alone(model):
  """With a short window the question and generated tokens leave it and are pooled with
  the kept slots before them: a row's reserved slots come before its kept ones (as the
  zero padding before slot 0), so its kept slots meet its question as they do alone
  (until 2026-12-06 the reserved filler lay between them, and every row here differed)."""
  prompts = random_prompts([120, 100, 80], seed=10)
  questions = random_prompts([10, 6, 8], seed=20)
  kwargs = dict(method="cake:window=4", budget=40, max_new_tokens=30)
  both = kvjax.generate(model, prompts, questions=questions, **kwargs)
  for row, (prompt, question) in enumerate(zip(prompts, questions)):
    alone = kvjax.generate(model, [prompt], questions=[question], **kwargs)
    assert both.token_ids[row] == alone.token_ids[0], row


def test_a_row_keeps_what_it_keeps_alone(model):
  prompts = random_prompts([90, 50], seed=2)
  method = kvjax.methods.get("cake")
  tokens, mask = inputs.left_pad(prompts, 0)
  both = context.prefill(model, tokens, mask, method, 40, 0).cache
  for row, prompt in enumerate(prompts):
    t, m = inputs.left_pad([prompt], 0)
    alone = context.prefill(model, t, m, method, 40, 0).cache
    for a, b in zip(both.layers, alone.layers):
      got, want = np.asarray(a.positions)[row], np.asarray(b.positions)[0]
      for head in range(got.shape[0]):
        assert sorted(got[head][got[head] >= 0]) == sorted(want[head][want[head] >= 0])


def test_chunked_prefill_bounds_memory_and_decodes(model):
  prompts = random_prompts([120], seed=3)
  out = kvjax.generate(model, prompts, method="cake", compression_ratio=0.75,
                       prefill_chunk_size=32, max_new_tokens=20)
  assert len(out.token_ids[0]) == 20
  slots = out.stats["method_stats"]["slots_per_layer"]
  assert sum(slots) == model.config.num_layers * 30     # 120 * 0.25 each on average


@pytest.mark.parametrize("spec, match", [
    ("cake:window=0", "window"), ("cake:tau1=0", "tau1"), ("cake:gamma=-1", "gamma"),
    ("cake:kernel_size=4", "odd"), ("cake:cascading=2", "cascading")])
def test_bad_hyperparameters(spec, match):
  with pytest.raises(MethodError, match=match):
    kvjax.methods.get(spec)


@pytest.mark.parametrize("wrapper", ["adakv", "per_layer", "sinks_window"])
@pytest.mark.parametrize("press", ["cake", "kvzip", "speckv", "specpc"])
def test_wrappers_refuse_methods_that_select_otherwise(wrapper, press):
  with pytest.raises(MethodError, match=f"{press}.*(on its own|prompt method)"):
    kvjax.methods.get(f"{wrapper}:press={press}")


def test_unfitted_finalize_refuses():
  with pytest.raises(MethodError, match="fitted"):
    CAKE().finalize(_synthetic_cache(1, (24,)))
