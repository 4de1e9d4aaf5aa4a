"""MPCache: the static scores and the two-level clustered decode against numpy, and the
method end to end (real savings, everything selected equals the full cache, chunked
prefill, errors)."""

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import method_inputs as mi
from kvjax.cache.kv_cache import LayerCache
from kvjax.cache.paged import ClusterSelection, PagedLayerCache
from kvjax.errors import MethodError
from kvjax.generation import context, inputs
from kvjax.methods import base
from kvjax.methods.mpcache import MPCache
from tiny import random_prompts, tiny_model

B, K, G, D, PS = 2, 2, 2, 8, 4


def test_static_scores_match_numpy():
  data = mi.random_prefill(5, lengths=(40, 31), s=40)
  x = base.LayerInputs(config=mi.config(), layer=0, **mi.layer_arrays(data))
  got = np.asarray(MPCache(static_window=0.25).score(x))
  probs = mi.attention(data.q, data.k, data.qpos, data.kpos)[:, :, -10:]   # 0.25 of 40
  want = probs.mean(1).max(1)                                              # [B, S]
  np.testing.assert_allclose(got, np.broadcast_to(want[:, None], got.shape), rtol=1e-5,
                             atol=1e-7)


def _two_level_numpy(q, keys, values, pos, alpha, clusters, pages, newest_page):
  """Per query head: page max/min over non-empty slots; clusters of 2 pages scored by
  sum q (alpha max + (1 - alpha) min); the first, the newest and the `clusters` best
  clusters (ties to the lower index) allow their pages; pages scored the same way,
  disallowed ones just above empty ones; the first, the newest and the best up to `pages`;
  softmax attention over their non-empty slots."""
  s = keys.shape[2]
  n = s // PS
  out = np.zeros((B, K * G, D))
  for row in range(B):
    for kv in range(K):
      real = pos[row, kv] >= 0
      def score(qq, slots):
        ok = slots[real[slots]]
        if not len(ok):
          return -np.inf
        hi, lo = keys[row, kv, ok].max(0), keys[row, kv, ok].min(0)
        return float(qq @ (alpha * hi + (1 - alpha) * lo))
      for g in range(G):
        qq = q[row, kv * G + g]
        coarse = np.array([score(qq, np.arange(c * 2 * PS, (c + 1) * 2 * PS))
                           for c in range(n // 2)])
        coarse[0] = coarse[newest_page // 2] = np.inf
        chosen = np.lexsort((np.arange(n // 2), -coarse))[:min(clusters + 2, n // 2)]
        fine = np.array([score(qq, np.arange(p * PS, (p + 1) * PS)) for p in range(n)])
        for p in range(n):
          if p // 2 not in chosen and fine[p] > -np.inf:
            fine[p] = -1e30
        fine[0] = fine[newest_page] = np.inf
        top = np.lexsort((np.arange(n), -fine))[:pages]
        slots = np.concatenate([np.arange(p * PS, (p + 1) * PS) for p in top])
        slots = slots[real[slots]]
        logits = keys[row, kv, slots] @ qq / np.sqrt(D)
        w = np.exp(logits - logits.max())
        out[row, kv * G + g] = (w / w.sum()) @ values[row, kv, slots]
  return out


@pytest.mark.parametrize("rounded", [False, True])
@pytest.mark.parametrize("clusters, pages", [(1, 3), (2, 4), (0, 2)])
def test_two_level_decode_matches_numpy(clusters, pages, rounded):
  """Also with both counts rounded up (`rounded_reads`: 4 pages and 4 clusters ranked, of
  6 clusters all, the real counts chosen; no cluster besides the first and newest stays
  none)."""
  rng = np.random.default_rng(clusters * 10 + pages)
  s = 45
  pos = np.broadcast_to(np.arange(s), (B, K, s)).astype(np.int32).copy()
  pos[1, :, :7] = -1
  keys = rng.normal(size=(B, K, s, D)).astype(np.float32)
  values = rng.normal(size=(B, K, s, D)).astype(np.float32)
  dense = LayerCache(keys=jnp.asarray(keys), values=jnp.asarray(values),
                     positions=jnp.asarray(pos), end=jnp.int32(s))
  paged = PagedLayerCache.from_dense(dense, PS, pages, "query",
                                     ClusterSelection(0.6, clusters))
  assert paged.capacity == 48                       # whole clusters of 2 pages
  if rounded:
    paged = paged.rounded_reads(4)
    assert (paged.pages, paged.clustering.clusters) == (4, 0 if clusters == 0 else 4)
    assert (paged.pages_read, paged.clusters_chosen) == (pages, clusters)
  q = rng.normal(size=(B, 1, K * G, D)).astype(np.float32)
  out, _ = paged.attend(jnp.asarray(q), jnp.full((B, 1), 60, jnp.int32))
  pad = lambda a, v: np.concatenate([a, np.full(a.shape[:2] + (3,) + a.shape[3:], v, a.dtype)],
                                    axis=2)
  want = _two_level_numpy(q[:, 0], pad(keys, 0), pad(values, 0), pad(pos, -1), 0.6, clusters,
                          pages, (s - 1) // PS)
  np.testing.assert_allclose(np.asarray(out)[:, 0], want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=0, num_layers=4)


PROMPTS = random_prompts([300, 220], seed=1)


def test_end_to_end(model):
  full = kvjax.generate(model, PROMPTS, max_new_tokens=6)
  every = kvjax.generate(model, PROMPTS, method="mpcache:first_ratio=1.0:dynamic_ratio=1.0",
                         budget=2000, max_new_tokens=6)
  assert every.token_ids == full.token_ids
  half = kvjax.generate(model, PROMPTS, method="mpcache", compression_ratio=0.5,
                        max_new_tokens=6)
  ratio = half.stats["context_cache_bytes"] / full.stats["context_cache_bytes"]
  assert 0.5 < ratio < 0.6                   # kept half, whole clusters, page bounds
  assert half.stats["method_stats"] == {"tokens_read_per_step": 64,
                                        "first_level_clusters": 4, "dense_layers": 0}
  chunked = kvjax.generate(model, PROMPTS, method="mpcache", compression_ratio=0.5,
                           max_new_tokens=6, prefill_chunk_size=128)
  assert [len(t) for t in chunked.token_ids] == [6, 6]


def test_contexts_whose_counts_round_alike_share_one_compiled_decode_loop(model,
                                                                         monkeypatch):
  """A compression ratio's budgets over contexts of 260, 300 and 340 tokens read 3, 4 and
  4 halves and choose 2, 2 and 3 clusters: rounded up (`rounded_reads`), they share one
  compiled decode loop (three unrounded), and generate what unrounded caches generate."""
  from tiny import generated_counting_loops
  prompts = [random_prompts((n, n - 7), seed=4) for n in (260, 300, 340)]
  kwargs = dict(method="mpcache", compression_ratio=0.5, max_new_tokens=24)
  loops, rounded = generated_counting_loops(model, prompts, **kwargs)
  monkeypatch.setattr(PagedLayerCache, "rounded_reads", lambda self, *args: self)
  exact_loops, exact = generated_counting_loops(model, prompts, **kwargs)
  assert (loops, exact_loops) == (1, 3)
  assert [r.token_ids for r in rounded] == [r.token_ids for r in exact]
  for results in (rounded, exact):
    stats = [r.stats["method_stats"] for r in results]
    assert [s["tokens_read_per_step"] for s in stats] == [48, 64, 64]
    assert [s["first_level_clusters"] for s in stats] == [4, 4, 5]


def test_static_stage_keeps_the_top_scores_shared_by_heads(model):
  tokens, mask = inputs.left_pad(PROMPTS[:1], 0)
  pre = context.prefill(model, tokens, mask, MPCache(skip_layers=1), 100, 0)
  first, second = pre.cache.layers[0], pre.cache.layers[1]
  assert type(first).__name__ == "LayerCache" and isinstance(second, PagedLayerCache)
  for layer in (first, second.dense):
    pos = np.asarray(layer.positions)[0]
    real = [sorted(p[p >= 0].tolist()) for p in pos]
    assert all(r == real[0] for r in real) and len(real[0]) == 100


@pytest.mark.parametrize("spec, match", [
    ("mpcache:cluster_size=31", "even"), ("mpcache:alpha=1.5", "alpha"),
    ("mpcache:static_window=0", "static_window"), ("mpcache:gqa=mean", "gqa")])
def test_bad_hyperparameters(spec, match):
  with pytest.raises(MethodError, match=match):
    kvjax.methods.get(spec)
