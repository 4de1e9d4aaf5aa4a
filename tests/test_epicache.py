"""EpiCache: k-means, medoid windows and routing against numpy loops; the patched-prompt scores
against a softmax written out; block-wise prefill with eviction against a numpy selection loop
on a tiny random model (same kept sets, peak slots <= budget + block, bytes of the budget);
the sensitivity allocation against numpy; episodes end to end on a tiny chat model; errors."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache import (FlatLayerCache, LayerCache, cache_nbytes, full_cache_nbytes,
                         init_cache)
from kvjax.evaluation import sweep
from kvjax.errors import GenerationError, MethodError, KvjaxError
from kvjax.generation import engine, episodes, inputs
from kvjax.methods import epicache
from kvjax.methods.epicache import EpiCache
from tiny import random_prompts, tiny_chat_model, tiny_config, tiny_model


# ----------------------------------------------------------------------------- clustering


def _kmeans_np(x, k):
  """Lloyd's algorithm by hand: start at rows floor(i * n / k), assign each point to the
  first nearest centroid, move each non-empty cluster's centroid to its mean, until no label
  changes."""
  n = len(x)
  k = min(k, n)
  centroids = [x[(i * n) // k].copy() for i in range(k)]
  labels = [-1] * n
  for _ in range(300):
    new = []
    for p in x:
      best, best_d = 0, None
      for c in range(k):
        d = sum((p[j] - centroids[c][j]) ** 2 for j in range(len(p)))
        if best_d is None or d < best_d:
          best, best_d = c, d
      new.append(best)
    if new == labels:
      break
    labels = new
    for c in range(k):
      points = [x[i] for i in range(n) if labels[i] == c]
      if points:
        centroids[c] = np.sum(points, axis=0) / len(points)
  return np.array(centroids), np.array(labels)


def _medoids_np(x, labels, centroids, m):
  out = []
  for c, centroid in enumerate(centroids):
    cos = [(float(x[i] @ centroid / np.linalg.norm(x[i]) / np.linalg.norm(centroid)), i)
           for i in range(len(x)) if labels[i] == c]
    cos.sort(key=lambda t: (-t[0], t[1]))
    out.append(sorted(i for _, i in cos[:m]))
  return out


@pytest.mark.parametrize("seed, k, m", [(0, 4, 3), (1, 3, 8), (2, 6, 2)])
def test_kmeans_medoids_and_routing_match_numpy(seed, k, m):
  rng = np.random.default_rng(seed)
  # Three loose topics, so clusters are neither trivial nor degenerate.
  topics = rng.normal(size=(3, 6))
  x = topics[rng.integers(0, 3, 25)] + 0.7 * rng.normal(size=(25, 6))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  centroids, labels = episodes.kmeans(x, k)
  want_centroids, want_labels = _kmeans_np(x, k)
  np.testing.assert_array_equal(labels, want_labels)
  np.testing.assert_allclose(centroids, want_centroids, rtol=1e-12, atol=1e-12)
  members = episodes.medoid_windows(x, labels, centroids, m)
  assert members == _medoids_np(x, want_labels, want_centroids, m)
  for q in rng.normal(size=(10, 6)):
    q /= np.linalg.norm(q)
    dots = [sum(q[j] * c[j] for j in range(6)) for c in want_centroids]
    assert episodes.route(q, centroids) == dots.index(max(dots))


def test_kmeans_caps_clusters_at_the_number_of_windows():
  x = np.eye(3)
  centroids, labels = episodes.kmeans(x, 4)
  assert centroids.shape == (3, 3) and sorted(labels.tolist()) == [0, 1, 2]


def test_split_windows():
  text = "One is here. Two! Three? Four.\nFive."
  assert episodes.split_windows(text, 2) == ["One is here. Two!", "Three? Four.", "Five."]
  assert episodes.split_windows(text, 9) == ["One is here. Two! Three? Four. Five."]


def test_pooled_hidden_state_is_what_the_logits_read():
  """With tied embeddings the logits are final_hidden @ E^T, so the mean of the forward
  pass's logits over a row's tokens equals its mean-pooled hidden state @ E^T."""
  model = tiny_model(seed=2, tie_embeddings=True)
  rows = random_prompts([9, 5], seed=4)
  tokens = np.zeros((2, 9), np.int32)
  mask = np.zeros((2, 9), bool)
  for r, row in enumerate(rows):
    tokens[r, 9 - len(row):], mask[r, 9 - len(row):] = row, True
  pooled = np.asarray(episodes._pooled_hidden_jit(model.params, jnp.asarray(tokens),
                                                  jnp.asarray(mask), graphdef=model.graphdef))
  logits, _ = engine.STEPS.prefill(model, jnp.asarray(tokens), jnp.asarray(mask),
                                   init_cache(model.config, 2, 9), logits="all")
  logits = np.asarray(logits, np.float64)
  table = np.asarray(model.params["embed"]["embedding"][...], np.float64)
  for r in range(2):
    want = logits[r][mask[r]].mean(0)
    np.testing.assert_allclose(pooled[r] @ table.T, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- scores


def _scores_np(q, keys, kpos, qpos):
  """Per KV head and slot: the largest softmax probability any real query of its group
  gives it, the softmax over the real cached slots only."""
  b, t, h, d = q.shape
  k, s = keys.shape[1], keys.shape[2]
  g = h // k
  out = np.zeros((b, k, s))
  for row in range(b):
    for head in range(h):
      kv = head // g
      real = [j for j in range(s) if kpos[row, kv, j] >= 0]
      for i in range(t):
        if qpos[row, i] < 0 or not real:
          continue
        logits = np.array([q[row, i, head] @ keys[row, kv, j] for j in real]) / np.sqrt(d)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        for n, j in enumerate(real):
          out[row, kv, j] = max(out[row, kv, j], p[n])
  return out


def test_patched_scores_match_numpy():
  rng = np.random.default_rng(3)
  b, t, h, k, s, d = 2, 9, 4, 2, 13, 8
  q = rng.normal(size=(b, t, h, d)).astype(np.float32)
  keys = rng.normal(size=(b, k, s, d)).astype(np.float32)
  kpos = np.broadcast_to(np.arange(s), (b, k, s)).copy()
  kpos[1, 0, 4:7] = -1                      # empty slots
  qpos = np.broadcast_to(np.arange(s, s + t), (b, t)).copy()
  qpos[0, :3] = -1                          # padding queries
  got = epicache.patched_scores(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(kpos),
                                jnp.asarray(qpos), block=4)
  want = _scores_np(q, keys, kpos, qpos)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert (want[1, 0, 4:7] == 0).all()


def test_patched_scores_empty_heads_and_padded_rows():
  """A KV head with no real key scores 0 (not NaN); a row of padding queries only scores 0;
  7 queries in blocks of 3 (block padding)."""
  rng = np.random.default_rng(4)
  b, t, h, k, s, d = 3, 7, 4, 2, 11, 8
  q = rng.normal(size=(b, t, h, d)).astype(np.float32)
  keys = rng.normal(size=(b, k, s, d)).astype(np.float32)
  kpos = np.broadcast_to(np.arange(s), (b, k, s)).copy()
  kpos[1, 0, :] = -1                        # a KV head with no real key
  kpos[2, 1, ::2] = -1                      # scattered empty slots
  qpos = np.broadcast_to(np.arange(s, s + t), (b, t)).copy()
  qpos[0, :] = -1                           # padding queries only
  qpos[2, :4] = -1
  got = np.asarray(epicache.patched_scores(jnp.asarray(q), jnp.asarray(keys),
                                           jnp.asarray(kpos), jnp.asarray(qpos), block=3))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, _scores_np(q, keys, kpos, qpos), rtol=1e-5, atol=1e-6)
  assert (got[0] == 0).all() and (got[1, 0] == 0).all() and (got[2, 1, ::2] == 0).all()
  assert (got[2, 0] > 0).all()


# ----------------------------------------------------------------------------- block prefill


@dataclasses.dataclass(frozen=True)
class _Queries:
  """A test policy: the forward pass attends over the cache plus its tokens without storing
  them and hands back each layer's post-RoPE queries instead of a cache."""
  compress = True

  def prepare(self, layer, layer_cache, new):
    return layer_cache, new, frozenset()

  def update(self, layer, layer_cache, step, stats):
    return step.queries

  def finish(self, layers, lengths):
    return tuple(layers)


def _block_prefill_np(model, tokens, patched, budgets, block, system, level="uniform"):
  """The block loop with its selection in numpy: the model appends each block and gives the
  patched prompt's queries; numpy scores every cached slot (max softmax over the group and
  the patched queries, softmax over the cache) and keeps each head's budget best, the system
  positions always, in slot order. Returns (the kept positions per layer [K, budget] list,
  the peak slots per head: at "pair" level, between blocks a layer holds its fullest head
  rounded up to a multiple of its budget)."""
  steps = engine.STEPS
  cache = init_cache(model.config, 1, 0)
  ids = jnp.asarray(np.asarray(patched, np.int32)[None])
  kept_history, held, peak = [], [0] * len(budgets), 0
  for start in range(0, len(tokens), block):
    piece = np.asarray(tokens[start:start + block], np.int32)[None]
    held = [n + piece.shape[1] for n in held]
    peak = max(peak, *held)
    cache = steps.grow(cache, piece.shape[1])
    _, cache = steps.prefill(model, jnp.asarray(piece), jnp.ones(piece.shape, bool), cache)
    if all(layer.capacity <= keep for layer, keep in zip(cache.layers, budgets)):
      continue
    _, queries = steps.prefill(model, ids, jnp.ones(ids.shape, bool), cache, plan=_Queries())
    qpos = np.arange(int(cache.lengths[0]), int(cache.lengths[0]) + len(patched))[None]
    layers = []
    for layer, q, keep in zip(cache.layers, queries, budgets):
      if layer.capacity <= keep:
        layers.append(layer)
        continue
      pos = np.asarray(layer.positions)
      scores = _scores_np(np.asarray(q, np.float64), np.asarray(layer.keys, np.float64), pos,
                          qpos)
      if level == "pair":   # one ranking over (head, slot); evicted slots emptied in place
        heads, slots = pos.shape[1:]
        real = [(h, j) for h in range(heads) for j in range(slots) if pos[0, h, j] >= 0]
        order = sorted(real, key=lambda hj: (not pos[0, hj[0], hj[1]] < system,
                                             -scores[0, hj[0], hj[1]], hj[0], hj[1]))
        kept = np.full(pos.shape, -1, np.int32)
        for h, j in order[:keep * heads]:
          kept[0, h, j] = pos[0, h, j]
        layers.append(layer.replace(positions=jnp.asarray(kept)))
        continue
      index = np.zeros((1, pos.shape[1], keep), np.int32)
      for head in range(pos.shape[1]):
        order = sorted(range(pos.shape[2]), key=lambda j: (
            not 0 <= pos[0, head, j] < system, -scores[0, head, j], j))
        index[0, head] = sorted(order[:keep])
      layers.append(layer.select(jnp.asarray(index)))
    cache = cache.replace(layers=tuple(layers))
    kept_history.append([np.asarray(layer.positions)[0] for layer in cache.layers])
    if level == "pair":
      fullest = [int((pos >= 0).sum(-1).max()) for pos in kept_history[-1]]
      held = [min(n, -(-f // keep) * keep) for n, f, keep in zip(held, fullest, budgets)]
    else:
      held = [min(n, keep) for n, keep in zip(held, budgets)]
  return kept_history[-1], peak


def _kept_per_head(layer, num_kv_heads):
  """Each KV head's stored positions, sorted (dense or head-wise layer of one row)."""
  pos = np.asarray(layer.positions)[0]
  heads = (np.asarray(layer.heads)[0] if hasattr(layer, "heads")
           else np.repeat(np.arange(num_kv_heads)[:, None], pos.shape[-1], 1))
  pos, heads = pos.ravel(), heads.ravel()
  return [sorted(int(p) for p in pos[(heads == h) & (pos >= 0)]) for h in range(num_kv_heads)]


@pytest.fixture(scope="module")
def random_model():
  return tiny_model(seed=5)


@pytest.mark.parametrize("budgets, block, system", [((20, 20), 16, 3), ((14, 26), 24, 0)])
def test_block_prefill_keeps_the_numpy_sets(random_model, budgets, block, system):
  model = random_model
  tokens, patched = random_prompts([75, 11], seed=8)
  got = episodes.block_prefill(model, tokens, patched, budgets, block, system)
  want, peak = _block_prefill_np(model, tokens, patched, budgets, block, system)
  for layer, keep, kept in zip(got.cache.layers, budgets, want):
    positions = np.asarray(layer.positions)[0]
    np.testing.assert_array_equal(positions, kept)
    assert positions.shape == (model.config.num_kv_heads, keep)
    assert (positions[:, :system] == np.arange(system)).all(), "system tokens are kept"
  assert int(got.cache.lengths[0]) == len(tokens)
  assert got.peak_slots == peak <= max(budgets) + block
  if budgets[0] == budgets[1]:   # a dense cache of exactly the budget: real savings
    assert cache_nbytes(got.cache) == full_cache_nbytes(model.config, 1, budgets[0])
    assert cache_nbytes(got.cache) < 0.3 * full_cache_nbytes(model.config, 1, len(tokens))


@pytest.mark.parametrize("budgets, block, system", [((20, 20), 16, 3), ((14, 26), 24, 0)])
def test_pair_level_keeps_the_numpy_sets_head_wise(random_model, budgets, block, system):
  """The official "pair" level: one ranking over all heads of a layer, heads ragged, the
  finished cache stored head-wise with exactly budget x KV heads slots per layer."""
  model = random_model
  k = model.config.num_kv_heads
  tokens, patched = random_prompts([75, 11], seed=8)
  got = episodes.block_prefill(model, tokens, patched, budgets, block, system, level="pair")
  want, peak = _block_prefill_np(model, tokens, patched, budgets, block, system,
                                 level="pair")
  ragged = False
  for layer, keep, kept in zip(got.cache.layers, budgets, want):
    per_head = _kept_per_head(layer, k)
    assert per_head == [sorted(int(p) for p in row if p >= 0) for row in kept]
    assert sum(map(len, per_head)) == keep * k
    assert all(row[:system] == list(range(system)) for row in per_head), "system kept"
    ragged |= len({len(row) for row in per_head}) > 1
    if len({len(row) for row in per_head}) > 1:
      assert isinstance(layer, FlatLayerCache), "ragged heads are stored head-wise"
  assert ragged, "random scores should give some layer heads of different lengths"
  # Between blocks a layer holds its fullest head rounded up to a multiple of its budget
  # (few shapes to compile, memory near what the heads hold).
  assert got.peak_slots == peak <= max(budgets) * k + block
  dense = episodes.block_prefill(model, tokens, patched, budgets, block, system)
  # The same slots as the uniform level plus the head-wise layout's per-slot head ids.
  assert cache_nbytes(dense.cache) <= cache_nbytes(got.cache) <= 1.05 * cache_nbytes(
      dense.cache)


class _CountingSteps(engine.CompiledSteps):
  """Counts the context prefills (no plan) and the probes' token shapes (one executable
  each: compiled steps are keyed by argument shapes)."""

  def __init__(self):
    super().__init__()
    self.context_prefills, self.probe_shapes = 0, set()

  def prefill(self, model, tokens, token_mask, cache, logits="last", plan=None,
              method_params=None):
    if plan is None:
      self.context_prefills += 1
    else:
      self.probe_shapes.add(tokens.shape)
    return super().prefill(model, tokens, token_mask, cache, logits, plan, method_params)


@pytest.mark.parametrize("block", [100, 16])
def test_episodes_share_a_one_block_context_and_each_keeps_its_numpy_sets(random_model, block):
  """Several episodes' block prefills at once: each keeps exactly what its own numpy
  restatement keeps (so neither a shared context nor the probe's padding changes a set);
  a context within one block is read once for all episodes (a longer one per episode, so
  no block is held beside another), and patched prompts of lengths 9 and 13 (one bucket)
  compile one probe."""
  model, budgets = random_model, (20, 20)
  tokens, *patched = random_prompts([75, 9, 13, 11], seed=12)
  steps = _CountingSteps()
  got = list(episodes.block_prefill_episodes(model, tokens, patched, budgets, block, 2,
                                             steps))
  assert len(got) == 3
  for done, prompt in zip(got, patched):
    want, peak = _block_prefill_np(model, tokens, prompt, budgets, block, 2)
    for layer, kept in zip(done.cache.layers, want):
      np.testing.assert_array_equal(np.asarray(layer.positions)[0], kept)
    assert done.peak_slots == peak
  blocks = -(-len(tokens) // block)
  assert steps.context_prefills == (1 if blocks == 1 else 3 * blocks)
  assert steps.probe_shapes == {(1, 16)}


def test_block_prefill_within_budget_keeps_everything(random_model):
  tokens, patched = random_prompts([40, 6], seed=9)
  got = episodes.block_prefill(random_model, tokens, patched, (64, 64), 16)
  for layer in got.cache.layers:
    np.testing.assert_array_equal(np.asarray(layer.positions)[0],
                                  np.broadcast_to(np.arange(40), (2, 40)))


# ----------------------------------------------------------------------------- layer budgets


def _allocation_np(s, keep, alpha):
  lo, hi = min(s), max(s)
  if lo == hi:
    return [keep] * len(s)
  w = [(1 - (x - lo) / (hi - lo)) ** alpha for x in s]
  return [max(int(wi * keep * len(s) / sum(w)), max(1, keep // 4)) for wi in w]


@pytest.mark.parametrize("seed", range(4))
def test_layer_budgets_follow_the_sensitivity_allocation(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 9))
  s = tuple(float(x) for x in rng.uniform(0.3, 1.0, n))
  keep = int(rng.integers(4, 300))
  config = tiny_config(num_layers=n)
  got = EpiCache(sensitivity=s).layer_budgets(config, keep, 1000)
  assert list(got) == _allocation_np(s, keep, 1.1)
  assert min(got) >= keep // 4 and got[int(np.argmin(s))] == max(got)
  assert EpiCache(sensitivity=(0.5,) * n).layer_budgets(config, keep, 1000) == (keep,) * n
  assert EpiCache(sensitivity=s, alpha=0.0).layer_budgets(config, keep, 1000) == (keep,) * n
  assert EpiCache().layer_budgets(config, keep, 1000) == (keep,) * n


def _window_cosines_np(full, masked, window):
  out = []
  for a, b in zip(full, masked):
    sims = []
    for h in range(a.shape[0]):
      for w in range(-(-a.shape[1] // window)):
        dot = na = nb = 0.0
        for t in range(w * window, min((w + 1) * window, a.shape[1])):
          for d in range(a.shape[2]):
            x, y = float(a[h, t, d]), float(b[h, t, d])
            dot, na, nb = dot + x * y, na + x * x, nb + y * y
        sims.append(dot / np.sqrt(na * nb))
    out.append(sum(sims) / len(sims))
  return out


def test_windowed_key_similarity_matches_numpy():
  rng = np.random.default_rng(6)
  full = [rng.normal(size=(2, 23, 4)) for _ in range(3)]
  masked = [f + s * rng.normal(size=f.shape) for f, s in zip(full, (0.0, 0.3, 2.0))]
  got = episodes.windowed_key_similarity(full, masked, 10)
  np.testing.assert_allclose(got, _window_cosines_np(full, masked, 10), rtol=1e-12)
  assert got[0] == pytest.approx(1.0) and got[0] > got[1] > got[2]


def _fresh_block_keys(model, tokens, start, end, cache=None):
  """Keys of tokens[start:end] prefilled over `cache` (default: nothing) at positions
  start..end-1: what a block sees under the mask, built directly."""
  piece = np.asarray(tokens[start:end], np.int32)[None]
  if cache is None:
    cache = init_cache(model.config, 1, 0).replace(lengths=jnp.asarray([start], jnp.int32))
  seen = cache.layers[0].capacity
  cache = engine.STEPS.grow(cache, end - start)
  _, cache = engine.STEPS.prefill(model, jnp.asarray(piece), jnp.ones(piece.shape, bool), cache)
  return [np.asarray(layer.keys[0, :, seen:]) for layer in cache.layers]


def test_block_masked_keys_follow_the_mask(random_model):
  model = random_model
  tokens = random_prompts([70], seed=12)[0]
  # No sinks, no overlap: every block is read on its own, at its positions.
  full, masked = episodes.block_masked_keys(model, tokens, block=24, sinks=0, overlap=0.0)
  for start in (0, 24, 48):
    want = _fresh_block_keys(model, tokens, start, min(start + 24, 70))
    for layer, keys in enumerate(want):
      np.testing.assert_allclose(masked[layer][:, start:start + 24], keys, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(masked[0], full[0], rtol=1e-5, atol=1e-5)  # layer 0 reads no one
  assert np.abs(masked[1][:, 24:] - full[1][:, 24:]).max() > 1e-2
  # Sinks and overlap: block 1 reads the first 3 tokens and block 0's last 12 (whose keys
  # are the full cache's: block 0 is read causally from the start).
  _, masked = episodes.block_masked_keys(model, tokens, block=24, sinks=3, overlap=0.5)
  prefix = np.asarray(tokens[:24], np.int32)[None]
  _, cache = engine.STEPS.prefill(model, jnp.asarray(prefix), jnp.ones(prefix.shape, bool),
                                  init_cache(model.config, 1, 24))
  index = np.array([0, 1, 2] + list(range(12, 24)), np.int32)
  seen = cache.replace(layers=tuple(layer.select(jnp.asarray(np.broadcast_to(
      index, (1, model.config.num_kv_heads, 15)))) for layer in cache.layers))
  want = _fresh_block_keys(model, tokens, 24, 48, seen)
  for layer, keys in enumerate(want):
    np.testing.assert_allclose(masked[layer][:, 24:48], keys, rtol=1e-5, atol=1e-5)
  assert episodes.layer_sensitivity(model, tokens, block=128) == pytest.approx((1.0, 1.0))


# ----------------------------------------------------------------------------- end to end

TEXT = " ".join(f"Fact {i}: the code word for item {i} is word{i}." for i in range(30))


@pytest.fixture(scope="module")
def chat(smollm2_tokenizer):
  return tiny_chat_model(smollm2_tokenizer, max_position_embeddings=2048)


def test_episodes_end_to_end(chat):
  method = EpiCache(block_size=64, medoids=2, window=3)
  ep = episodes.prefill_episodes(chat, TEXT, method, budget=56)
  assert len(ep.windows) == 10 and len(ep.prefilled) == 4 and ep.budgets == (56, 56)
  assert all(len(m) <= 2 and m == sorted(m) for m in ep.members)
  context = inputs.encode(chat, [TEXT], ["?"], None).prompts[0]
  system = episodes.system_prefix_tokens(chat, context, True)
  assert system > 0 and ep.peak_slots <= 56 + 64
  one = full_cache_nbytes(chat.config, 1, 56)
  assert ep.device_bytes == one and ep.host_bytes == 4 * one, "episodes wait in host memory"
  for pre in ep.prefilled:
    assert pre.context_cache_bytes == one and cache_nbytes(pre.cache) == 0
    for layer in pre.cache.layers:
      positions = np.asarray(layer.positions)[0]
      assert (positions[:, :system] == np.arange(system)).all()
  question = "What is the code word for item 4?"
  dots = ep.centroids @ episodes.embed(chat, [question])[0]
  first = episodes.answer(chat, ep, question, max_new_tokens=3)
  assert first.episode == int(np.argmax(dots))
  again = episodes.answer(chat, ep, question, max_new_tokens=3)
  assert again.token_ids == first.token_ids, "an episode's cache serves every question"


def test_pair_level_answers_from_head_wise_caches(chat):
  method = EpiCache(block_size=64, medoids=2, window=3, level="pair")
  ep = episodes.prefill_episodes(chat, TEXT, method, budget=56)
  one = full_cache_nbytes(chat.config, 1, 56)
  for pre in ep.prefilled:
    assert one <= pre.context_cache_bytes <= 1.05 * one
  got = episodes.answer(chat, ep, "What is the code word for item 4?", max_new_tokens=3)
  assert len(got.token_ids) == 3
  assert method.label == "epicache:medoids=2:window=3:block_size=64:level=pair"


def test_a_budget_above_the_context_answers_as_the_full_cache(chat):
  ep = episodes.prefill_episodes(chat, TEXT, EpiCache(block_size=128), budget=4000)
  question = "What is the code word for item 7?"
  got = episodes.answer(chat, ep, question, max_new_tokens=4)
  full = kvjax.converse(chat, TEXT, [question], max_new_tokens=4)
  assert got.text == full.answers[0][0]


def test_sweep_runs_epicache_on_conversations_only(chat, tmp_path):
  config = sweep.SweepConfig(methods=("full", "epicache:block_size=128:medoids=2"),
                             ratios=(0.5,), tasks=("niah_single_2", "multiturn_niah"),
                             lengths=(384,), num_examples=1, batch_size=1, max_new_tokens=3,
                             turns=2)
  summary = sweep.run_sweep(chat, "tiny", config, tmp_path)
  cells = {(c["task"], c["method"]): c for c in summary["cells"]}
  assert ("niah_single_2", "epicache:medoids=2:block_size=128") not in cells
  assert any("conversations" in reason for reason in summary["skipped"].values())
  cell = cells[("multiturn_niah", "epicache:medoids=2:block_size=128")]
  assert cell["examples"] == 1 and 0.4 < cell["removed_fraction"] < 0.6
  assert cell["context_cache_bytes"] < 0.6 * cell["full_context_cache_bytes"]
  records = [json.loads(line) for line in (tmp_path / "examples.jsonl").read_text().splitlines()]
  episodic = [r for r in records if r["method"].startswith("epicache")]
  assert len(episodic) == 1 and len(episodic[0]["predictions"]) == 2
  assert episodic[0]["context_cache_host_bytes"] >= 2 * episodic[0]["context_cache_bytes"]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(episodes=0), "episodes"), (dict(medoids=0), "medoids"), (dict(window=-1), "window"),
    (dict(block_size=0), "block_size"), (dict(alpha=-0.5), "alpha"),
    (dict(alpha=float("nan")), "alpha"), (dict(sensitivity=(0.5, 2.0)), r"sensitivity\[1\]"),
    (dict(sensitivity=[0.5]), "tuple"), (dict(episodes=2.5), "episodes"),
    (dict(level="global"), "level")])
def test_bad_hyperparameters_raise(kwargs, match):
  with pytest.raises(MethodError, match=match):
    EpiCache(**kwargs)


def test_misuse_raises(chat, random_model):
  config = random_model.config
  with pytest.raises(MethodError, match="sensitivity has 3 values"):
    EpiCache(sensitivity=(0.1, 0.2, 0.3)).layer_budgets(config, 8, 100)
  with pytest.raises(MethodError, match="system tokens"):
    episodes.block_prefill(random_model, [1] * 30, [2] * 4, (4, 8), 8, system_tokens=4)
  with pytest.raises(MethodError, match="runs epicache"):
    episodes.prefill_episodes(chat, TEXT, "snapkv", budget=40)
  with pytest.raises(MethodError, match="compression_ratio"):
    episodes.prefill_episodes(chat, TEXT, "epicache")
  with pytest.raises(MethodError, match="chat-template prefix"):
    episodes.prefill_episodes(chat, TEXT, "epicache", budget=5)
  with pytest.raises(GenerationError):
    episodes.prefill_episodes(chat, "", "epicache", budget=40)
  with pytest.raises(KvjaxError, match="kvjax.generation.episodes"):
    kvjax.generate(chat, TEXT, method="epicache", budget=40, max_new_tokens=2)


def test_head_wise_storage_attends_as_the_ragged_dense_layer():
  """A "pair" layer stored head-wise (`_head_wise`) attends exactly as the dense layer with
  each head's evicted slots emptied: every head reads its own slots, no other head's."""
  rng = np.random.default_rng(3)
  b, k, s, d, g = 1, 2, 12, 8, 2
  keys = jnp.asarray(rng.standard_normal((b, k, s, d)), jnp.float32)
  values = jnp.asarray(rng.standard_normal((b, k, s, d)), jnp.float32)
  positions = np.broadcast_to(np.arange(s, dtype=np.int32), (b, k, s)).copy()
  positions[0, 0, [1, 4, 5, 9]] = -1          # head 0 keeps 8, head 1 keeps 11
  positions[0, 1, [7]] = -1
  dense = LayerCache(keys=keys, values=values, positions=jnp.asarray(positions),
                     end=jnp.int32(s))
  flat = episodes._head_wise(dense)
  assert isinstance(flat, FlatLayerCache) and flat.capacity == 19
  query = jnp.asarray(rng.standard_normal((b, 1, k * g, d)), jnp.float32)
  qpos = jnp.asarray([[s]], jnp.int32)
  want, _ = dense.attend(query, qpos)
  got, _ = flat.attend(query, qpos)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
