"""The offload tier (kvjax.cache.page_buffer, kvjax.systems.offload): the in-jit eviction
policies against kvjax.systems.paging's simulations and a slow restatement on synthetic
page selections, prefetch bookkeeping, and offloaded decoding through the buffer equal to
on-device Quest decoding token for token (every policy, buffers from one frame to more
than the whole cache; a tiny random model and SmolLM2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache import page_buffer as pb
from kvjax.errors import KvjaxError, MethodError
from kvjax.systems import offload, paging
from tiny import random_prompts, tiny_model

B, K, P, PS, D = 1, 2, 12, 2, 3


def _host(seed=0, rows=B):
  """Distinct keys/values per (row, head, slot) so every page read can be checked."""
  rng = np.random.default_rng(seed)
  keys = rng.normal(size=(rows, K, P * PS, D)).astype(np.float32)
  return keys, keys * 10 + 1


def _selections(steps, per_step, seed, pages=P):
  """[steps, B, K, per_step] page requests: a drifting hot set plus random pages
  (repeats within a step allowed, as with gqa="query")."""
  rng = np.random.default_rng(seed)
  out = np.zeros((steps, B, K, per_step), np.int32)
  for s in range(steps):
    for k in range(K):
      hot = [(s // 3 + j) % pages for j in range(2)]
      rest = rng.integers(0, pages, per_step - 2)
      out[s, 0, k] = rng.permutation(np.concatenate([hot, rest]))
  return out


@jax.jit
def _serve(buf, keys, values, requests, safe):
  buf, k, v = pb.serve_requests(buf, keys, values, requests, safe)
  return pb.end_step(buf), k, v


def _run(config, selections, bits=None, prior=None, seed=0):
  """Feeds each step's requests through the jnp buffer; checks every page read; returns
  the final buffer. selections [steps, rows, K, R]."""
  rows = selections.shape[1]
  keys, values = _host(seed, rows)
  buf = pb.init_buffer(rows, K, P, D, D, jnp.float32, PS, config, selections.shape[-1],
                       prior=prior)
  for s, req in enumerate(selections):
    safe = None if bits is None else jnp.asarray(bits[s])
    buf, got_k, got_v = _serve(buf, jnp.asarray(keys), jnp.asarray(values), jnp.asarray(req),
                               safe)
    slots = (req[..., None] * PS + np.arange(PS)).reshape(rows, K, -1)
    want = np.take_along_axis(keys, slots[..., None], axis=2)
    np.testing.assert_array_equal(np.asarray(got_k), want)
    np.testing.assert_array_equal(np.asarray(got_v), want * 10 + 1)
  return buf


def _trace(selections, k):
  return [int(p) for step in selections[:, 0, k] for p in step]


def _resident(buf, k, row=0) -> set:
  frames = np.asarray(buf.frame_page)[row, k]
  table = np.asarray(buf.page_frame)[row, k]
  for f, page in enumerate(frames):   # the page table and the frames agree
    if page >= 0:
      assert table[page] == f
  assert (table >= 0).sum() == (frames >= 0).sum()
  return {int(p) for p in frames if p >= 0}


@pytest.mark.parametrize("frames", [1, 3, 5, 12])
def test_lru_matches_paging_lru(frames):
  sel = _selections(14, 5, seed=frames)
  buf = _run(pb.BufferConfig(device_pages=frames), sel)
  c = pb.counters(buf)
  want = [paging.lru(_trace(sel, k), frames) for k in range(K)]
  assert c["faults"] == sum(r.faults for r in want)
  assert c["hits"] == sum(r.hits for r in want)
  for k in range(K):   # LRU holds the last `frames` distinct pages requested
    recent = []
    for page in reversed(_trace(sel, k)):
      if page not in recent:
        recent.append(page)
    assert _resident(buf, k) == set(recent[:frames])


@pytest.mark.parametrize("frames, victims", [(2, 0), (3, 2), (4, 3)])
def test_hybrid_matches_paging_hybrid_lsm(frames, victims):
  sel = _selections(12, 5, seed=10 + frames)
  rng = np.random.default_rng(frames)
  prior = rng.integers(0, 5, (B, K, P)) / 4          # exact in float32
  config = pb.BufferConfig(device_pages=frames, policy="hybrid", victim_pages=victims,
                           prior_weight=0.5, recency_window=8)
  c = pb.counters(_run(config, sel, prior=jnp.asarray(prior, jnp.float32)))
  want = [paging.hybrid_lsm(_trace(sel, k), frames, list(prior[0, k]), 0.5, victims, window=8)
          for k in range(K)]
  assert c["faults"] == sum(r.faults for r in want)
  assert c["victim_hits"] == sum(r.victim_hits for r in want)
  assert c["hits"] == sum(r.hits for r in want)


def _predictions_numpy(trace_steps, bits, frames, tolerance, window):
  """Slow restatement of the "predictions" policy for one row and head: (faults, regrets,
  fallbacks). bits[s][p]: page p predicted safe at step s; a page the step still requests
  later is not safe (the same-step rule)."""
  resident, last = {}, {}      # page -> frame ; page -> last use
  evicted_safe, regrets = {}, 0
  faults = n_regrets = fallbacks = 0
  clock = 0
  for s, step in enumerate(trace_steps):
    if s > 0 and s % window == 0:
      regrets //= 2
    for i, page in enumerate(step):
      if page in resident:
        last[page] = clock
      else:
        faults += 1
        if page in evicted_safe:
          if s - evicted_safe.pop(page) <= window:
            regrets += 1
            n_regrets += 1
        if len(resident) == frames:
          fallback = regrets > tolerance
          safe = [] if fallback else [p for p in resident
                                      if bits[s][p] and p not in step[i + 1:]]
          pool = safe or list(resident)
          victim = min(pool, key=lambda p: last[p])
          del resident[victim]
          if safe:
            evicted_safe[victim] = s
          fallbacks += fallback
        resident[page] = True
        last[page] = clock
      clock += 1
  return faults, n_regrets, fallbacks


@pytest.mark.parametrize("frames, tolerance", [(2, 0), (4, 1), (4, 100), (6, 0)])
def test_predictions_match_a_slow_restatement(frames, tolerance):
  sel = _selections(20, 4, seed=frames + tolerance)
  rng = np.random.default_rng(frames)
  bits = rng.random((20, B, K, P)) < 0.5
  config = pb.BufferConfig(device_pages=frames, policy="predictions", tolerance=tolerance,
                           regret_window=3)
  c = pb.counters(_run(config, sel, bits=bits))
  want = np.array([_predictions_numpy([list(st) for st in sel[:, 0, k]], bits[:, 0, k], frames,
                                      tolerance, 3) for k in range(K)]).sum(0)
  assert (c["faults"], c["regrets"], c["fallbacks"]) == tuple(want)
  if tolerance == 0:
    assert c["regrets"] > 0 and c["fallbacks"] > 0   # the fallback was exercised


def test_predictions_without_safe_pages_are_lru_and_good_bits_beat_it():
  sel = _selections(12, 5, seed=3)
  none_safe = np.zeros((12, B, K, P), bool)
  c = pb.counters(_run(pb.BufferConfig(device_pages=3, policy="predictions"), sel,
                       bits=none_safe))
  assert c["faults"] == sum(paging.lru(_trace(sel, k), 3).faults for k in range(K))
  # A loop over 4 pages with 3 frames, two pages a step: LRU faults on every request;
  # predicting safe the page read just before the step (of the resident pages it comes
  # back last, and this step does not read it) keeps the other two.
  loop = np.tile(np.arange(4, dtype=np.int32), 6).reshape(12, 1, 1, 2).repeat(K, 2)
  lru = pb.counters(_run(pb.BufferConfig(device_pages=3), loop))
  assert lru["faults"] == lru["hits"] + lru["faults"]
  marked = np.zeros((12, B, K, P), bool)
  for s in range(1, len(loop)):
    marked[s, :, :, loop[s - 1, 0, 0, -1]] = True
  good = pb.counters(_run(pb.BufferConfig(device_pages=3, policy="predictions",
                                          tolerance=100), loop, bits=marked))
  assert good["faults"] < lru["faults"]
  assert good["faults"] == _predictions_numpy([list(s) for s in loop[:, 0, 0]], marked[:, 0, 0],
                                              3, 100, 8)[0] * K


@pytest.mark.parametrize("policy", pb.PREDICTED)
def test_a_page_the_step_reads_again_is_not_evicted_between_its_reads(policy):
  # Two frames. Step 0 reads a, b, a (two faults). Step 1 reads a, c, a with page a
  # predicted safe (its bit is about after the step) and b not: the fault on c must
  # evict b, not a, which the step reads again right after (without the same-step rule
  # it evicted a and faulted on it again: 4 faults and a regret). Every row and head has
  # its own pages (a, b, c) = (3m, 3m + 1, 3m + 2), so the rule must read the requests of
  # the row and head it evicts in.
  rows = 2
  label = np.arange(rows * K).reshape(1, rows, K, 1) * 3
  pattern = np.array([[0, 1, 0], [0, 2, 0]], np.int32).reshape(2, 1, 1, 3)
  steps = (pattern + label).astype(np.int32)
  bits = np.zeros((2, rows, K, P), bool)
  for b in range(rows):
    for k in range(K):
      bits[1, b, k, label[0, b, k, 0]] = True
  config = pb.BufferConfig(device_pages=2, policy=policy, tolerance=100)
  buf = _run(config, steps, bits=bits)
  c = pb.counters(buf)
  assert (c["faults"], c["hits"], c["regrets"]) == (3 * rows * K, 3 * rows * K, 0)
  for b in range(rows):
    for k in range(K):
      m = int(label[0, b, k, 0])
      assert _resident(buf, k, b) == {m, m + 2}
      assert _predictions_numpy([list(s) for s in steps[:, b, k]], bits[:, b, k], 2, 100,
                                8)[0] == 3
  # The page's bit applies once the step is done with it: a fault after its last read
  # of the step evicts it (LRU would evict b).
  pattern = np.array([[0, 1, 1], [1, 0, 2]], np.int32).reshape(2, 1, 1, 3)
  buf = _run(config, (pattern + label).astype(np.int32), bits=bits)
  assert pb.counters(buf)["faults"] == 3 * rows * K
  for b in range(rows):
    for k in range(K):
      m = int(label[0, b, k, 0])
      assert _resident(buf, k, b) == {m + 1, m + 2}


def test_prefetch_installs_missing_pages_and_counts_their_hits():
  keys, values = _host(1)
  config = pb.BufferConfig(device_pages=4, prefetch=2)
  buf = pb.init_buffer(B, K, P, D, D, jnp.float32, PS, config, 2)
  buf, *_ = _serve(buf, keys, values, jnp.asarray([[[0, 1], [0, 1]]], jnp.int32), None)
  # Candidates: page 1 is resident (skipped), 5 and 7 fit the limit of 2, 9 does not;
  # head 1 asks for nothing (-1).
  cands = jnp.asarray([[[1, 5, 7, 9], [-1, -1, -1, -1]]], jnp.int32)
  buf = pb.prefetch_pages(buf, keys, values, cands, 2)
  assert _resident(buf, 0) == {0, 1, 5, 7} and _resident(buf, 1) == {0, 1}
  frames = np.asarray(buf.frame_page)[0, 0]
  frame = int(np.where(frames == 7)[0][0])
  np.testing.assert_array_equal(np.asarray(buf.keys)[0, 0, frame * PS:(frame + 1) * PS],
                                keys[0, 0, 7 * PS:8 * PS])
  buf, got, _ = _serve(buf, keys, values, jnp.asarray([[[7, 5], [7, 0]]], jnp.int32), None)
  np.testing.assert_array_equal(np.asarray(got)[0, 0, :PS], keys[0, 0, 7 * PS:8 * PS])
  c = pb.counters(buf)
  # Head 0: 7 and 5 hit (both prefetched); head 1: 7 faults, 0 hits.
  assert (c["prefetches"], c["prefetch_hits"]) == (2, 2)
  assert (c["hits"], c["faults"]) == (3, 4 + 1)


# ------------------------------------------------------------------ decoding


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=0, num_layers=4)


PROMPTS = random_prompts([150, 120], seed=1)
NEW = 14


@pytest.fixture(scope="module")
def on_device(model):
  return kvjax.generate(model, PROMPTS, method="quest:offload=False", compression_ratio=0.5,
                        max_new_tokens=NEW).token_ids


@pytest.mark.parametrize("policy, frames, prefetch, victims", [
    ("lru", 1, 0, 0),               # far below a step's 10 requests: faults every step
    ("lru", 64, 2, 0),              # more frames than pages: only cold faults
    ("predictions", 3, 1, 0),
    ("learned", 3, 1, 2),           # the trained predictor's bits, prefetch, victims
    ("hybrid", 2, 0, 2),
    ("hybrid", 8, 2, 3)])
def test_offloaded_decoding_equals_on_device(model, on_device, policy, frames, prefetch,
                                             victims):
  out = offload.offloaded_generate(model, PROMPTS, NEW, compression_ratio=0.5,
                                   device_pages=frames, policy=policy, prefetch=prefetch,
                                   victim_pages=victims)
  assert out.token_ids == on_device
  s = out.stats
  cfg = model.config
  paged_layers, rows, pages = cfg.num_layers - 2, 2, 5
  groups = cfg.num_heads // cfg.num_kv_heads
  # Every decode step reads `pages` pages per query head in every paged layer.
  assert s["requests"] == (s["decode_steps"] * paged_layers * rows * cfg.num_kv_heads
                           * groups * pages)
  assert s["hits"] + s["faults"] + s["victim_hits"] == s["requests"]
  assert s["host_bytes"] > 0 and s["buffer_bytes"] > 0
  pages_total = 160 // 16 + 64 // 16      # context pages + decode room
  if frames == 1:
    assert s["faults"] >= s["decode_steps"] * paged_layers * rows * cfg.num_kv_heads
  if frames >= pages_total:     # each page faults at most once per row and head
    assert s["faults"] <= paged_layers * rows * cfg.num_kv_heads * pages_total
    assert s["prefetch_hits"] > 0
  if prefetch:
    assert s["prefetches"] > 0
  else:
    assert s["prefetches"] == 0


def test_the_method_option_gives_the_same_tokens_and_reports_the_tier(model, on_device):
  spec = "quest:device_pages=4:eviction=predictions:prefetch=1"
  out = kvjax.generate(model, PROMPTS, method=spec, compression_ratio=0.5, max_new_tokens=NEW)
  assert out.token_ids == on_device
  stats = out.stats["method_stats"]
  assert (stats["device_pages"], stats["eviction"], stats["prefetch"]) == (4, "predictions", 1)
  cfg = model.config
  frames = 2 * 2 * cfg.num_kv_heads * 4 * 16 * cfg.head_dim * 4 * 2  # layers, rows, K and V
  assert frames < stats["buffer_bytes"] < frames * 1.2               # plus the page table
  plain = kvjax.generate(model, PROMPTS, method="quest", compression_ratio=0.5,
                         max_new_tokens=NEW)
  # The buffer, less the int32 real page count of each plain paged layer (`rounded_reads`;
  # a buffered layer reads its exact count).
  paged_layers = cfg.num_layers - 2
  assert out.stats["context_cache_bytes"] - plain.stats["context_cache_bytes"] == stats[
      "buffer_bytes"] - 4 * paged_layers
  assert out.stats["context_cache_host_bytes"] == plain.stats["context_cache_host_bytes"]
  # generate reports the tier's counters after decoding, as offloaded_generate does.
  counters = out.stats["decode_method_stats"]
  assert counters["requests"] > 0 and counters["prefetches"] > 0
  assert counters["hits"] + counters["faults"] + counters["victim_hits"] == counters["requests"]
  same = offload.offloaded_generate(model, PROMPTS, NEW, compression_ratio=0.5, device_pages=4,
                                    policy="predictions", prefetch=1)
  assert {k: same.stats[k] for k in counters} == counters
  assert plain.stats["decode_method_stats"]["requests"] == 0     # no buffer, nothing counted


def test_compare_offload_reports_every_variant(model):
  report = offload.compare_offload(model, PROMPTS[:1], 6, compression_ratio=0.5,
                                   device_pages=3, policies=["lru", "hybrid"], repeats=1)
  v = report["variants"]
  assert set(v) == {"on_device", "offloaded", "buffer_lru", "buffer_hybrid"}
  assert report["all_tokens_identical"]
  assert v["on_device"]["host_bytes"] == 0 and v["offloaded"]["host_bytes"] > 0
  assert v["offloaded"]["device_bytes"] < v["buffer_lru"]["device_bytes"] < v["on_device"][
      "device_bytes"]
  for name in ("buffer_lru", "buffer_hybrid"):
    assert v[name]["requests"] == v["offloaded"]["requests"] > 0
    assert v[name]["host_pages_read"] == v[name]["faults"] + v[name]["prefetches"]
    assert 0 < v[name]["fault_rate"] < 1
    assert v[name]["decode_tokens_per_second"] > 0 and v[name]["speed_vs_on_device"] > 0


@pytest.mark.parametrize("spec, match", [
    ("quest:device_pages=-1", "device_pages"), ("quest:eviction=fifo", "eviction"),
    ("quest:prefetch=-2", "prefetch"), ("quest:victim_pages=1.5", "victim_pages"),
    ("quest:device_pages=4:offload=false", "offload=True")])
def test_bad_tier_options(spec, match):
  with pytest.raises(MethodError, match=match):
    kvjax.methods.get(spec)


def test_bad_buffer_and_benchmark_arguments(model):
  with pytest.raises(pb.BufferError, match=r"device_pages=0 must be an integer in \[1,"):
    pb.BufferConfig(device_pages=0)
  with pytest.raises(pb.BufferError, match="policy"):
    pb.BufferConfig(device_pages=2, policy="mru")
  with pytest.raises(pb.BufferError, match="prior_weight"):
    pb.BufferConfig(device_pages=2, prior_weight=1.5)
  with pytest.raises(KvjaxError, match="policies"):
    offload.compare_offload(model, PROMPTS, 4, policies="lru")
  with pytest.raises(KvjaxError, match="max_new_tokens"):
    offload.offloaded_generate(model, PROMPTS, 0)


@pytest.mark.slow
def test_smollm2_offloaded_equals_on_device(smollm2):
  prompt = ("The history of the printing press begins in the fifteenth century, when "
            "Johannes Gutenberg combined movable type, oil-based inks and a screw press. ") * 6
  want = kvjax.generate(smollm2, prompt, method="quest:offload=False", budget=48,
                        max_new_tokens=5, chat_template=False).token_ids
  out = offload.offloaded_generate(smollm2, prompt, 5, budget=48, device_pages=4,
                                   policy="predictions", prefetch=2, chat_template=False)
  assert out.token_ids == want
  assert out.stats["faults"] > 0 and out.stats["hits"] > 0
