"""KVzip: the reconstruction scores against a numpy restatement, the repeat prompts and their
chunks, the global ranking against numpy, and the method end to end (real savings, budget >=
length equals the full cache, chunked prefill, conversation, the sweep's path, errors)."""

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache.kv_cache import EMPTY_POSITION, RESERVED_POSITION, cache_nbytes
from kvjax.errors import MethodError
from kvjax.generation import context, inputs
from kvjax.methods import kvzip
from kvjax.methods.kvzip import KVzip
from tiny import padded_and_exact, random_prompts, tiny_chat_model, tiny_model


def _softmax_scores(q, keys, kpos, new_keys, qpos, start, end, sinks):
  """Straight from the definition: per row, KV head and slot, the largest probability any
  real query of the group gives it, each softmax over the allowed slots and the causal
  repeat tokens."""
  b, t, h, d = q.shape
  k, s = keys.shape[1], keys.shape[2]
  g = h // k
  out = np.zeros((b, k, s))
  for row in range(b):
    for head in range(h):
      kv = head // g
      allowed = [j for j in range(s) if kpos[row, kv, j] >= 0 and (
          kpos[row, kv, j] < sinks or start[row] <= kpos[row, kv, j] < end[row])]
      for i in range(t):
        if qpos[row, i] < 0:
          continue
        own = [u for u in range(t) if 0 <= qpos[row, u] <= qpos[row, i]]
        logits = np.array([q[row, i, head] @ keys[row, kv, j] for j in allowed] +
                          [q[row, i, head] @ new_keys[row, kv, u] for u in own]) / np.sqrt(d)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        for n, j in enumerate(allowed):
          out[row, kv, j] = max(out[row, kv, j], p[n])
  return out


def test_reconstruction_scores_match_numpy():
  rng = np.random.default_rng(0)
  b, t, h, k, s, d = 2, 11, 4, 2, 13, 8
  q = rng.normal(size=(b, t, h, d)).astype(np.float32)
  keys = rng.normal(size=(b, k, s, d)).astype(np.float32)
  new_keys = rng.normal(size=(b, k, t, d)).astype(np.float32)
  kpos = np.broadcast_to(np.arange(s), (b, k, s)).copy()
  kpos[1, :, :3] = -1                                  # row 1: empty slots
  qpos = np.broadcast_to(np.arange(s, s + t), (b, t)).copy()
  qpos[0, :2] = -1                                     # row 0: left padding
  start, end, sinks = np.array([5, 3]), np.array([11, 13]), 2
  got = kvzip.reconstruction_scores(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(kpos),
                                    jnp.asarray(new_keys), jnp.asarray(qpos),
                                    jnp.asarray(start), jnp.asarray(end), sinks, block=4)
  want = _softmax_scores(q, keys, kpos, new_keys, qpos, start, end, sinks)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert (want[:, :, 2:5][0] == 0).all() and (want[0, :, 11:] == 0).all()


def test_repeat_passes_chunk_the_context(smollm2_tokenizer):
  tok = smollm2_tokenizer
  long, short = list(range(100, 140)), list(range(200, 210))
  tokens, mask = inputs.left_pad([long, short], 0, 48)
  passes = KVzip(chunk_size=16).rescoring_passes(tok, tokens, mask)
  assert len(passes) == 3
  suffix = kvzip.repeat_suffix(tok)
  first = tok.encode(kvzip.REPEAT_FIRST, add_special_tokens=False)
  later = tok.encode(kvzip.REPEAT_NEXT, add_special_tokens=False)
  assert "assistant" in tok.decode(suffix, skip_special_tokens=False)
  rows, params = passes[0]
  assert rows == [first + suffix + long[:16], first + suffix + short]
  np.testing.assert_array_equal(params["start"], [0, 0])
  np.testing.assert_array_equal(params["end"], [16, 10])
  rows, params = passes[2]
  assert rows == [later + long[24:32] + suffix + long[32:], []]
  np.testing.assert_array_equal(params["start"], [32, 32])
  np.testing.assert_array_equal(params["end"], [40, 32])


def _dense_layer(positions, k=2, d=4, seed=0):
  from kvjax.cache.kv_cache import LayerCache
  b, s = positions.shape
  rng = np.random.default_rng(seed)
  pos = np.broadcast_to(positions[:, None, :], (b, k, s)).astype(np.int32)
  return LayerCache(keys=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.float32),
                    values=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.float32),
                    positions=jnp.asarray(pos), end=jnp.int32(s))


@pytest.mark.parametrize("layerwise", [False, True])
def test_ranking_matches_numpy(layerwise):
  """Kept (layer, head, position) sets from given scores, against a direct ranking; a row
  keeps what it would keep alone, whatever its batch mates (a shorter row, a row with fewer
  real entries than its quota)."""
  from kvjax.cache.kv_cache import Cache
  rng = np.random.default_rng(1)
  n, b, k, s, keep, sinks = 3, 3, 2, 10, 3, 1
  positions = np.broadcast_to(np.arange(s), (b, s)).copy()
  positions[1, :4] = -1                                 # row 1 is shorter
  positions[2, :8] = -1                                 # row 2: 12 entries, quota 18
  positions[1:] = np.where(positions[1:] >= 0, positions[1:] - positions[1:].min(
      axis=1, where=positions[1:] >= 0, initial=s)[:, None], -1)
  cache = Cache(layers=tuple(_dense_layer(positions, k, seed=i) for i in range(n)),
                lengths=jnp.asarray((positions >= 0).sum(1), jnp.int32))
  scores = [tuple(jnp.asarray(rng.uniform(size=(b, k, s)), jnp.float32) for _ in range(n))
            for _ in range(2)]
  out = KVzip(sinks=sinks, layerwise=layerwise).rescored(cache, scores, (keep,) * n)
  best = np.max([[np.asarray(x) for x in p] for p in scores], axis=0)      # [L, B, K, S]
  pos = np.broadcast_to(positions[None, :, None, :], best.shape)
  best = np.where(pos < sinks, 1.0, best)
  kept = {}                                             # (row, layer) -> {(head, position)}
  for row in range(b):
    real = [(-best[l, row, h, j], l, h, j) for l in range(n) for h in range(k)
            for j in range(s) if positions[row, j] >= 0]
    for l in range(n):
      in_layer = sorted(e for e in real if e[1] == l)
      picked = in_layer[:k * keep] if layerwise else [
          e for e in sorted(real)[:n * k * keep] if e[1] == l]
      kept[row, l] = {(h, int(positions[row, j])) for _, _, h, j in picked}
  for l, layer in enumerate(out.layers):
    want_slots = k * keep if layerwise else max(len(kept[row, l]) for row in range(b))
    # Global ranking: padded to a shared size, 16 (or all k * s = 20 candidates past 16).
    capacity = want_slots if layerwise else 16 if want_slots <= 16 else k * s
    assert layer.positions.shape[1] == capacity
    for row in range(b):
      heads, slot_pos = np.asarray(layer.heads[row]), np.asarray(layer.positions[row])
      got = {(int(h_), int(p)) for h_, p in zip(heads, slot_pos) if p >= 0}
      assert got == kept[row, l], (l, row)
      # The row's filler (where another row keeps more) is empty, the padding reserved.
      assert (slot_pos == RESERVED_POSITION).sum() == capacity - want_slots, (l, row)
      assert ((slot_pos >= 0) | (slot_pos == EMPTY_POSITION)).sum() == want_slots, (l, row)
  slots = [max(len(kept[row, l]) for row in range(b)) for l in range(n)]
  # A flat slot's bytes: float32 keys and values of head_dim 4, int32 position and head.
  per_slot = b * (2 * 4 * 4 + 2 * 4)
  if not layerwise:
    assert max(slots) < 16 and out.layers[0].keys.shape[-1] == 4
    method = KVzip(sinks=sinks)
    assert method.cache_stats(out) == {"slots_per_layer": slots,
                                       "allocated_slots_per_layer": [16] * n}
    assert method.content_nbytes(out) == cache_nbytes(out) - per_slot * sum(16 - c for c in slots)
  if not layerwise:
    counts = [[len(kept[row, l]) for l in range(n)] for row in range(b)]
    assert sum(counts[2]) == 12 and sum(counts[0]) == n * k * keep
    assert len({tuple(c) for c in counts}) > 1


@pytest.fixture(scope="module")
def chat(smollm2_tokenizer):
  return tiny_chat_model(smollm2_tokenizer, max_position_embeddings=4096)


TEXTS = [" ".join(f"Fact {i}: the code word is word{i}." for i in range(n)) for n in (12, 30)]


def test_kvzip_end_to_end(chat):
  full = kvjax.generate(chat, TEXTS, max_new_tokens=4)
  half = kvjax.generate(chat, TEXTS, method="kvzip", compression_ratio=0.5, max_new_tokens=4)
  assert [len(t) for t in half.token_ids] == [4, 4]
  assert half.stats["context_cache_bytes"] < 0.65 * full.stats["context_cache_bytes"]
  slots = half.stats["method_stats"]["slots_per_layer"]
  assert len(slots) == chat.config.num_layers and len(set(slots)) > 1
  k = chat.config.num_kv_heads
  assert half.stats["kept_tokens_per_layer"] == [n // k for n in slots]
  everything = kvjax.generate(chat, TEXTS, method="kvzip", budget=4000, max_new_tokens=4)
  assert everything.token_ids == full.token_ids
  chunked = kvjax.generate(chat, TEXTS, method="kvzip:chunk_size=64", compression_ratio=0.5,
                           max_new_tokens=4, prefill_chunk_size=128)
  assert [len(t) for t in chunked.token_ids] == [4, 4]
  layerwise = kvjax.generate(chat, TEXTS[1], method=KVzip(layerwise=True),
                             compression_ratio=0.5, max_new_tokens=2)
  assert layerwise.stats["context_cache_bytes"] < 0.65 * kvjax.generate(
      chat, TEXTS[1], max_new_tokens=2).stats["context_cache_bytes"]


def test_shape_padding_changes_nothing_but_the_allocation(chat, monkeypatch):
  """Layers padded to shared sizes with reserved slots decode exactly as exactly sized ones,
  with rows keeping different counts and a question each."""
  kwargs = dict(method="kvzip", compression_ratio=0.4, max_new_tokens=12,
                questions=["Which code word comes first?", "And the last?"])
  padded, exact = padded_and_exact(chat, TEXTS, kvzip, monkeypatch, **kwargs)
  assert padded.stats["kept_tokens_per_layer"] == exact.stats["kept_tokens_per_layer"]
  slots, allocated = (padded.stats["method_stats"][k]
                      for k in ("slots_per_layer", "allocated_slots_per_layer"))
  assert slots == exact.stats["method_stats"]["slots_per_layer"] != allocated


def test_reused_capacity_sets_change_nothing_but_the_allocation(chat, monkeypatch):
  kwargs = dict(method="kvzip", compression_ratio=0.4, max_new_tokens=12,
                questions=["Which code word comes first?", "And the last?"])
  padded_and_exact(chat, TEXTS, kvzip, monkeypatch, reused=True, **kwargs)


def test_sweep_path_prefills_kvzip_on_its_own(chat):
  tokens, mask = inputs.left_pad([chat.tokenizer.encode(t) for t in TEXTS], 0)
  method = kvjax.methods.get("kvzip")
  many = context.prefill_many(chat, tokens, mask, [(method, 40), (kvjax.methods.get("full"),
                                                                  None)], room=4)
  alone = context.prefill(chat, tokens, mask, method, 40, room=4)
  np.testing.assert_array_equal(many[0].logits, alone.logits)
  assert many[0].context_cache_bytes == alone.context_cache_bytes
  for a, b in zip(many[0].cache.layers, alone.cache.layers):
    np.testing.assert_array_equal(a.positions, b.positions)


def test_conversation_over_a_kvzip_cache(chat):
  out = kvjax.converse(chat, TEXTS[1], ["First?", "Second?"], method="kvzip",
                       compression_ratio=0.5, max_new_tokens=3)
  assert len(out.answers[0]) == 2


def test_errors():
  with pytest.raises(MethodError, match="tokenizer"):
    kvjax.generate(tiny_model(), random_prompts((30,)), method="kvzip", compression_ratio=0.5,
                   max_new_tokens=2)
  with pytest.raises(MethodError, match="chunk_size=4"):
    KVzip(chunk_size=4)
  with pytest.raises(MethodError, match="sinks=-1"):
    KVzip(sinks=-1)
  with pytest.raises(kvjax.KvjaxError):
    kvjax.methods.get("kvzip", layerwise="yes")


def test_kernel_path_gives_the_same_tokens(chat, monkeypatch):
  from tiny import jnp_and_kernel_tokens
  want, got = jnp_and_kernel_tokens(chat, TEXTS, monkeypatch, method="kvzip",
                                    compression_ratio=0.5, max_new_tokens=3)
  assert got == want
