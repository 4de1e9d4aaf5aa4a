"""Quest: the page bounds and the decode over the chosen pages against numpy, bounds kept
up to date by appends, the layout's bytes against arithmetic, and the method end to end (a
budget of the whole context gives the full cache's tokens, dense first layers, errors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_inputs
import kvjax
from kvjax.cache import page_buffer as pb
from kvjax.cache.kv_cache import LayerCache, NewTokens, cache_nbytes, host_nbytes
from kvjax.cache.paged import PagedLayerCache, analytic_nbytes, logit_bounds, page_bounds
from kvjax.errors import MethodError
from kvjax.generation import context, inputs
from tiny import random_prompts, tiny_model

B, K, G, D, PS = 2, 2, 3, 8, 4


def _dense(seed, s=22, empty_front=(0, 5)):
  rng = np.random.default_rng(seed)
  pos = np.broadcast_to(np.arange(s), (B, K, s)).astype(np.int32).copy()
  for row, n in enumerate(empty_front):
    pos[row, :, :n] = -1
  keys = rng.normal(size=(B, K, s, D)).astype(np.float32)
  values = rng.normal(size=(B, K, s, D)).astype(np.float32)
  return LayerCache(keys=jnp.asarray(keys), values=jnp.asarray(values),
                    positions=jnp.asarray(pos), end=jnp.int32(s)), keys, values, pos


def _decode_numpy(q, keys, values, pos, pages, newest_page, gqa):
  """out [B, H, D]: per query head (or KV head, reduced by `gqa`), the `pages` pages with
  the highest sum_c max(q_c max_c, q_c min_c) / sqrt(D) (ties to the lower page, the newest
  page always in), then softmax attention over their non-empty slots."""
  s = keys.shape[2]
  n_pages = -(-s // PS)
  out = np.zeros((B, K * G, D))
  for row in range(B):
    for kv in range(K):
      bounds = np.full((G, n_pages), -np.inf)
      for p in range(n_pages):
        sl = slice(p * PS, (p + 1) * PS)
        real = pos[row, kv, sl] >= 0
        if not real.any():
          continue
        hi, lo = keys[row, kv, sl][real].max(0), keys[row, kv, sl][real].min(0)
        for g in range(G):
          qq = q[row, kv * G + g]
          bounds[g, p] = np.maximum(qq * hi, qq * lo).sum() / np.sqrt(D)
      if gqa != "query":
        bounds = np.broadcast_to(bounds.max(0) if gqa == "max" else bounds.sum(0),
                                 bounds.shape)
      for g in range(G):
        b = bounds[g].copy()
        b[newest_page] = np.inf
        chosen = np.lexsort((np.arange(n_pages), -b))[:pages]
        slots = np.concatenate([np.arange(p * PS, min((p + 1) * PS, s)) for p in chosen])
        slots = slots[pos[row, kv, slots] >= 0]
        logits = keys[row, kv, slots] @ q[row, kv * G + g] / np.sqrt(D)
        w = np.exp(logits - logits.max())
        out[row, kv * G + g] = (w / w.sum()) @ values[row, kv, slots]
  return out


def test_bounds_bound_every_logit_and_match_numpy():
  dense, keys, _, pos = _dense(0, s=24)
  hi, lo = page_bounds(dense.keys, dense.positions, PS)
  rng = np.random.default_rng(1)
  q = rng.normal(size=(B, 1, K * G, D)).astype(np.float32)
  bound = np.asarray(logit_bounds(jnp.asarray(q), hi, lo))              # [B, K, G, P]
  for row in range(B):
    for kv in range(K):
      for p in range(24 // PS):
        real = pos[row, kv, p * PS:(p + 1) * PS] >= 0
        for g in range(G):
          if not real.any():
            assert bound[row, kv, g, p] == -np.inf
            continue
          logits = keys[row, kv, p * PS:(p + 1) * PS][real] @ q[row, 0, kv * G + g] / np.sqrt(D)
          assert bound[row, kv, g, p] >= logits.max() - 1e-5
          if real.sum() == 1:
            np.testing.assert_allclose(bound[row, kv, g, p], logits.max(), rtol=1e-5)


@pytest.mark.parametrize("layout", ["exact", "rounded", "rounded_offloaded"])
@pytest.mark.parametrize("gqa", ["query", "max", "sum"])
@pytest.mark.parametrize("pages", [1, 2, 4])
def test_decode_over_chosen_pages_matches_numpy(gqa, pages, layout):
  """Also with the pages rounded up (`rounded_reads`: 4 ranked, the first `pages` read and
  attended; offloaded, only they are copied from the host)."""
  dense, keys, values, pos = _dense(2)
  paged = PagedLayerCache.from_dense(dense, PS, pages, gqa)
  if layout != "exact":
    paged = paged.rounded_reads(4)
    assert (paged.pages, paged.pages_read) == (4, pages)
  if layout == "rounded_offloaded":
    paged = paged.offload()
  assert paged.capacity == 24 and int(paged.dense.end) == 22
  rng = np.random.default_rng(3)
  q = rng.normal(size=(B, 1, K * G, D)).astype(np.float32)
  out, _ = paged.attend(jnp.asarray(q), jnp.full((B, 1), 30, jnp.int32))
  pad = lambda a, v: np.concatenate([a, np.full(a.shape[:2] + (2,) + a.shape[3:], v, a.dtype)],
                                    axis=2)
  want = _decode_numpy(q[:, 0], pad(keys, 0), pad(values, 0), pad(pos, -1), pages, 21 // PS,
                       gqa)
  np.testing.assert_allclose(np.asarray(out)[:, 0], want, rtol=1e-4, atol=1e-5)
  if layout == "rounded_offloaded":   # the host copies: the ranked pages' first `pages`
    ranked = paged.selected_slots(jnp.asarray(q))[..., ::PS] // PS          # [B, K, g, 4]
    got, _ = paged._read_pages(ranked)
    got = np.asarray(got).reshape(B, K, ranked.shape[2], 4, PS, D)
    padded = pad(keys, 0)
    for row, kv, g, j in np.ndindex(B, K, ranked.shape[2], 4):
      page = int(ranked[row, kv, g, j])
      want_page = padded[row, kv, page * PS:(page + 1) * PS] if j < pages else 0
      np.testing.assert_array_equal(got[row, kv, g, j], want_page)


def test_all_pages_is_dense_attention():
  dense, *_ = _dense(4)
  q = jnp.asarray(np.random.default_rng(5).normal(size=(B, 1, K * G, D)), jnp.float32)
  qpos = jnp.full((B, 1), 30, jnp.int32)
  want, _ = dense.attend(q, qpos)
  got, _ = PagedLayerCache.from_dense(dense, PS, 6).attend(q, qpos)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_appends_keep_the_bounds_of_a_fresh_build():
  dense, *_ = _dense(6, s=10)
  paged = PagedLayerCache.from_dense(dense, PS, 2).grow(9)
  assert paged.capacity % PS == 0 and paged.capacity >= 19
  rng = np.random.default_rng(7)
  for t, first in [(3, 10), (1, 13), (1, 14)]:
    new = NewTokens(keys=jnp.asarray(rng.normal(size=(B, K, t, D)), jnp.float32),
                    values=jnp.asarray(rng.normal(size=(B, K, t, D)), jnp.float32),
                    positions=jnp.asarray(np.tile(np.arange(first, first + t), (B, 1)),
                                          jnp.int32))
    paged = paged.append(new)
  hi, lo = page_bounds(paged.dense.keys, paged.dense.positions, PS)
  np.testing.assert_array_equal(np.asarray(paged.page_max), np.asarray(hi))
  np.testing.assert_array_equal(np.asarray(paged.page_min), np.asarray(lo))
  assert int(paged.dense.end) == 15


@pytest.mark.parametrize("gqa", ["query", "max"])
@pytest.mark.parametrize("tier", ["device", "host", "buffer"])
def test_cpu_decode_at_batch_one_reads_the_gathered_pages_through_dots(gqa, tier):
  # The pages a step gathers are computed in its program: the CPU reference reads them
  # through dots at batch 1 too (SmolLM2 decode steps 1.5x faster at 700 tokens, 2.5x at
  # 2K, than products summed over D and S, which XLA:CPU fused with the gather), and row 0
  # of a batch-1 step equals row 0 of the batch-2 step (dots there already).
  dense, *_ = _dense(10, s=40)
  pages = 3
  caches = [PagedLayerCache.from_dense(c, PS, pages, gqa)
            for c in (dense, kernel_inputs.first_row(dense))]
  if tier != "device":
    caches = [c.offload() for c in caches]
  if tier == "buffer":
    caches = [pb.buffered(c, pb.BufferConfig(device_pages=4), groups=G) for c in caches]
  q = jnp.asarray(np.random.default_rng(11).normal(size=(B, 1, K * G, D)), jnp.float32)
  qpos = jnp.full((B, 1), 45, jnp.int32)
  decode = lambda cache, q, qpos: cache.attend(q, qpos)[0]
  gathered = (1, K * G if gqa == "query" else K, pages * PS, D)   # [1, heads read, slots, D]
  assert kernel_inputs.dots_reading(decode, (caches[1], q[:1], qpos[:1]), gathered) == 2
  both, alone = decode(caches[0], q, qpos), decode(caches[1], q[:1], qpos[:1])
  np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(both[0]), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=0, num_layers=4)


PROMPTS = random_prompts([150, 120], seed=1)


def test_budget_of_the_whole_context_is_the_full_cache(model):
  full = kvjax.generate(model, PROMPTS, max_new_tokens=8)
  out = kvjax.generate(model, PROMPTS, method="quest", budget=1000, max_new_tokens=8)
  assert out.token_ids == full.token_ids
  # Whole pages of context, and decoding well past them.
  prompts = random_prompts([64, 64], seed=2)
  full = kvjax.generate(model, prompts, max_new_tokens=24)
  for budget in (64, 1000):
    out = kvjax.generate(model, prompts, method="quest", budget=budget, max_new_tokens=24)
    assert out.token_ids == full.token_ids
  half = kvjax.generate(model, PROMPTS, method="quest", compression_ratio=0.5, max_new_tokens=8)
  stats = half.stats["method_stats"]
  cfg = model.config
  offloaded = 2 * 2 * cfg.num_kv_heads * 160 * cfg.head_dim * 4 * 2   # layers, rows, K and V
  assert stats == {"pages_per_step": 5, "page_size": 16, "tokens_read_per_step": 80,
                   "dense_layers": 2, "host_bytes": offloaded}
  assert half.stats["context_cache_host_bytes"] == offloaded
  assert half.stats["kept_tokens_per_layer"] == [150] * 4   # nothing is evicted
  on_device = kvjax.generate(model, PROMPTS, method="quest:offload=False",
                             compression_ratio=0.5, max_new_tokens=8)
  assert on_device.token_ids == half.token_ids
  assert on_device.stats["method_stats"]["host_bytes"] == 0
  assert (on_device.stats["context_cache_bytes"] - half.stats["context_cache_bytes"]
          == offloaded)


def test_bytes_are_the_dense_cache_plus_bounds(model):
  tokens, mask = inputs.left_pad(PROMPTS, 0)
  pre = context.prefill(model, tokens, mask, kvjax.methods.get("quest:offload=False"), 75, 0)
  layers = pre.cache.layers
  assert [type(layer).__name__ for layer in layers] == ["LayerCache"] * 2 + [
      "PagedLayerCache"] * 2
  cfg = model.config
  dense = [np.asarray(layer.positions).shape[-1] for layer in layers[:2]]
  assert dense == [150, 150]                    # the prompt's bucket padding is cut
  want = sum(analytic_nbytes(2, cfg.num_kv_heads, 160, cfg.head_dim, 16, jnp.float32,
                             rounded_reads=True) for _ in layers[2:])
  got = sum(layer.nbytes for layer in layers[2:])
  assert got == want
  assert cache_nbytes(pre.cache) == pre.context_cache_bytes


@pytest.mark.parametrize("spec", ["quest", "quest:device_pages=4"])
def test_prompts_of_other_lengths_share_one_compiled_decode_loop(model, monkeypatch, spec):
  """Paged layers rounded up with reserved pages (`reserve_for`): contexts of 130 and 150
  tokens (144 and 160 paged slots, 208 and 224 with the room) share one compiled decode
  loop at a budget of 48 tokens, and generate what the unreserved cache generates."""
  from tiny import reserved_and_unreserved
  prompts = [random_prompts((n, n - 7), seed=4) for n in (130, 150)]
  (loops, padded), (exact_loops, exact) = reserved_and_unreserved(
      model, prompts, PagedLayerCache, monkeypatch, method=spec, budget=48, max_new_tokens=24)
  assert (loops, exact_loops) == (1, 2)
  assert [r.token_ids for r in padded] == [r.token_ids for r in exact]
  assert padded[0].stats["cache_capacity_tokens"] == padded[1].stats["cache_capacity_tokens"]
  full = kvjax.generate(model, prompts[1], max_new_tokens=24)
  assert padded[1].token_ids != full.token_ids       # 3 of 10 pages read: not the full cache


def test_budgets_whose_pages_round_alike_share_one_compiled_decode_loop(model, monkeypatch):
  """A compression ratio's budgets over contexts of 130 and 150 tokens read 9 and 10 pages
  of 8 slots: both rank 12 (`rounded_reads`) and read their own count, in one compiled
  decode loop (two unrounded), and generate what the unrounded cache generates."""
  from tiny import generated_counting_loops
  prompts = [random_prompts((n, n - 7), seed=4) for n in (130, 150)]
  kwargs = dict(method="quest:page_size=8", compression_ratio=0.5, max_new_tokens=24)
  loops, rounded = generated_counting_loops(model, prompts, **kwargs)
  monkeypatch.setattr(PagedLayerCache, "rounded_reads", lambda self, multiple: self)
  exact_loops, exact = generated_counting_loops(model, prompts, **kwargs)
  assert (loops, exact_loops) == (1, 2)
  assert [r.token_ids for r in rounded] == [r.token_ids for r in exact]
  assert [r.stats["method_stats"]["pages_per_step"] for r in rounded] == [9, 10]
  assert [r.stats["method_stats"]["pages_per_step"] for r in exact] == [9, 10]


@pytest.mark.parametrize("spec, match", [
    ("quest:page_size=0", "page_size"), ("quest:min_pages=0", "min_pages"),
    ("quest:gqa=mean", "gqa"), ("quest:skip_layers=-1", "skip_layers")])
def test_bad_hyperparameters(spec, match):
  with pytest.raises(MethodError, match=match):
    kvjax.methods.get(spec)


def test_rounded_reads_refuse_a_buffer_and_a_second_rounding():
  dense, *_ = _dense(6)
  rounded = PagedLayerCache.from_dense(dense, PS, 2).rounded_reads(4)
  assert (rounded.pages, rounded.pages_read) == (4, 2)
  # At most the layer's 6 pages less one, so it stays paged.
  assert PagedLayerCache.from_dense(dense, PS, 5).rounded_reads(4).pages == 5
  with pytest.raises(ValueError, match="not rounded yet"):
    rounded.rounded_reads(4)
  with pytest.raises(pb.BufferError, match="rounded reads"):
    pb.buffered(rounded.offload(), pb.BufferConfig(device_pages=2))


def test_offloaded_pages_live_on_the_host_and_decode_alike():
  dense, *_ = _dense(8, s=40)
  paged = PagedLayerCache.from_dense(dense, PS, 3, "max")
  moved = paged.offload()
  assert moved.dense.keys.sharding.memory_kind == "pinned_host"
  assert moved.dense.positions.sharding.memory_kind == "device"
  kv = 2 * B * K * 40 * D * 4
  assert host_nbytes(moved) == kv and moved.nbytes == paged.nbytes - kv
  rng = np.random.default_rng(9)
  new = NewTokens(keys=jnp.asarray(rng.normal(size=(B, K, 1, D)), jnp.float32),
                  values=jnp.asarray(rng.normal(size=(B, K, 1, D)), jnp.float32),
                  positions=jnp.full((B, 1), 40, jnp.int32))
  q = jnp.asarray(rng.normal(size=(B, 1, K * G, D)), jnp.float32)

  @jax.jit
  def step(cache, new, q):
    cache = cache.grow(4).append(new)
    return cache, cache.attend(q, jnp.full((B, 1), 40, jnp.int32))[0]

  c1, want = step(paged, new, q)
  c2, got = step(moved, new, q)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert c2.dense.keys.sharding.memory_kind == "pinned_host"
  np.testing.assert_array_equal(np.asarray(c2.dense.keys), np.asarray(c1.dense.keys))
