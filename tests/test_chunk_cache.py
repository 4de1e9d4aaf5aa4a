"""Cache-Craft chunk caches (kvjax/systems/chunk_cache.py): RoPE re-rotation, the attention
statistics against a numpy restatement of layer 0, the reuse formulas on hand-worked cases,
full recompute equal to a plain prefill, the store's LRU bound and persistence, and a real
model's prompt assembled from cached HotpotQA documents."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.errors import GenerationError
from kvjax.generation import engine
from kvjax.ops import rope
from kvjax.systems import chunk_cache as cc
from tiny import random_prompts, tiny_model


def _chunks(seed=0, lengths=(9, 21, 14, 17)):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 256, n).tolist() for n in lengths]


def _variant(predecessors=(), weights=(), inter=(1.0,), intra=(1.0,), token_inter=(0.0,),
             start=0, length=1):
  zeros = np.zeros((1, 1, length, 2), np.float32)
  return cc.ChunkVariant(keys=zeros, values=zeros, start=start, predecessors=tuple(predecessors),
                         predecessor_attention=np.asarray(weights, np.float32),
                         inter=np.asarray(inter, np.float32), intra=np.asarray(intra, np.float32),
                         token_inter=np.asarray(token_inter, np.float32))


# --------------------------------------------------------------------- RoPE shifting


def test_shifted_keys_equal_keys_rotated_at_the_new_position():
  cfg = tiny_model().config
  inv_freq = rope.inverse_frequencies(cfg)
  rng = np.random.default_rng(0)
  raw = jnp.asarray(rng.normal(size=(1, 6, 2, 16)), jnp.float32)
  old = jnp.asarray([[3, 4, 5, 40, 41, 42]], jnp.int32)
  delta = np.asarray([7, 7, 7, -30, -30, -30], np.int32)
  rotated = rope.apply_rope(raw, old, inv_freq)
  moved = rope.shift_rope(rotated, jnp.asarray(delta)[None, :, None], inv_freq)
  want = rope.apply_rope(raw, old + delta, inv_freq)
  np.testing.assert_allclose(moved, want, atol=2e-5)
  # And apply_rope itself against the rotate-half formula written out in numpy.
  angle = np.asarray(old[0])[:, None] * inv_freq                       # [T, D/2]
  x1, x2 = np.split(np.asarray(raw[0]), 2, axis=-1)
  c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
  np.testing.assert_allclose(rotated[0], np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1),
                             atol=1e-5)


# ------------------------------------------------------------------ the reuse formulas


def test_kendall_tau_distance_counts_swapped_pairs_of_shared_chunks():
  assert cc.kendall_tau_distance(["a", "b", "c"], ["a", "b", "c"]) == 0
  assert cc.kendall_tau_distance(["a", "b", "c"], ["c", "b", "a"]) == 1
  assert cc.kendall_tau_distance(["a", "b", "c"], ["b", "a", "c"]) == pytest.approx(1 / 3)
  # Only chunks in both lists count: x and y are ignored, one pair (a, c) is swapped.
  assert cc.kendall_tau_distance(["a", "x", "c"], ["c", "y", "a"]) == 1
  assert cc.kendall_tau_distance(["a"], ["a"]) == 0


def test_overlap_weighs_predecessors_by_attention_and_penalises_order():
  v = _variant(predecessors=("a", "b", "c"), weights=(1.0, 3.0, 6.0))
  assert cc.overlap(v, ["a", "b", "c"]) == 1
  assert cc.overlap(v, ["b", "c"]) == pytest.approx(0.9)           # a held 1 of 10
  assert cc.overlap(v, ["a"]) == pytest.approx(0.1)
  assert cc.overlap(v, ["c", "b"]) == pytest.approx(0.9 * (1 - 1))  # both kept, order flipped
  assert cc.overlap(v, ["b", "a", "c"]) == pytest.approx(1 - 1 / 3)
  assert cc.overlap(_variant(), ["z"]) == 1                          # nothing preceded it


def test_cci_and_fix_overhead():
  v = _variant(predecessors=("a", "b"), weights=(1.0, 1.0), inter=(0.2, 0.4), intra=(0.3, 0.3))
  cci = 1 / (1 + math.exp(-0.3 / 0.3))
  assert v.cci == pytest.approx(cci)
  assert cc.fix_overhead(v, ["a", "b"], 1.0) == 0
  assert cc.fix_overhead(v, ["b"], 2.0) == pytest.approx(2 * cci * 0.5)
  assert _variant(inter=(0.5,), intra=(0.0,)).cci == 1


def test_recompute_indices_take_the_most_context_dependent_tokens():
  v = _variant(token_inter=(0.1, 0.9, 0.3, 0.8, 0.0), length=5)
  assert cc.recompute_indices(v, 0.0).tolist() == []
  assert cc.recompute_indices(v, 0.2).tolist() == [1]
  assert cc.recompute_indices(v, 0.5).tolist() == [1, 2, 3]        # ceil(2.5) = 3
  assert cc.recompute_indices(v, 1.0).tolist() == [0, 1, 2, 3, 4]


# ------------------------------------------------------------- statistics of creation


def _layer0_segment_attention(model, prompt, bounds):
  """[T, n] numpy: each token's layer-0 attention (mean over query heads) summed over the
  keys of each segment, from the embedding and the layer's weights."""
  cfg = model.config
  p = model.params
  arr = lambda x: np.asarray(x[...], np.float64)
  x = arr(p["embed"]["embedding"])[prompt]                                 # [T, d]
  x = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps)
  x = x * arr(p["layers"][0]["attn_norm"]["scale"])
  q = np.einsum("td,dhk->thk", x, arr(p["layers"][0]["attn"]["q"]["kernel"]))
  k = np.einsum("td,dhk->thk", x, arr(p["layers"][0]["attn"]["k"]["kernel"]))
  inv = rope.inverse_frequencies(cfg).astype(np.float64)
  angle = np.arange(len(prompt))[:, None, None] * inv

  def rot(a):
    a1, a2 = np.split(a, 2, -1)
    return np.concatenate([a1 * np.cos(angle) - a2 * np.sin(angle),
                           a2 * np.cos(angle) + a1 * np.sin(angle)], -1)

  q, k = rot(q), rot(k)
  group = cfg.num_heads // cfg.num_kv_heads
  k = np.repeat(k, group, axis=1)
  logits = np.einsum("thd,shd->hts", q, k) / np.sqrt(cfg.head_dim)
  t = len(prompt)
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True)).mean(0)                  # [T, S]
  seg = np.searchsorted(bounds, np.arange(t), side="right") - 1
  return np.stack([probs[:, seg == j].sum(1) for j in range(len(bounds) - 1)], 1)


@pytest.mark.parametrize("layers", [1, 2])
def test_creation_statistics_match_a_numpy_restatement_of_layer0(layers):
  """Per-layer a_l and b_l against layer 0 restated in numpy; with one layer, the
  layer means (per-token inter attention, attention per predecessor) too."""
  model = tiny_model(num_layers=layers)
  chunks, question = _chunks(), [5, 6, 7]
  store = cc.ChunkStore(model)
  cc.generate_from_chunks(model, store, chunks, question, max_new_tokens=1)
  prompt = [t for c in chunks for t in c] + question
  starts = np.cumsum([0] + [len(c) for c in chunks])
  rows = _layer0_segment_attention(model, prompt, starts)
  assert len(store) == len(chunks)
  for i, c in enumerate(chunks):
    (v,) = store.variants(cc.chunk_hash(c))
    own = rows[starts[i]:starts[i + 1]]
    assert v.start == starts[i]
    assert v.predecessors == tuple(cc.chunk_hash(x) for x in chunks[:i])
    want_inter = sum(own[:, j].sum() / (len(c) * len(chunks[j])) for j in range(i))
    np.testing.assert_allclose(v.inter[0], want_inter, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(v.intra[0], own[:, i].sum() / len(c) ** 2, rtol=1e-4)
    assert v.inter.shape == v.intra.shape == (layers,)
    if layers == 1:
      np.testing.assert_allclose(v.token_inter, own[:, :i].sum(1), rtol=1e-4, atol=1e-7)
      np.testing.assert_allclose(v.predecessor_attention, own[:, :i].sum(0), rtol=1e-4)


def test_recording_in_query_blocks_equals_one_block(monkeypatch):
  model = tiny_model()
  chunks = _chunks(9, (20, 25, 15))
  whole = cc.ChunkStore(model)
  cc.prefill_chunks(model, whole, chunks, [3])
  monkeypatch.setattr(cc, "QUERY_BLOCK", 16)
  jax.clear_caches()   # the recording is traced again with the smaller block
  blocked = cc.ChunkStore(model)
  cc.prefill_chunks(model, blocked, chunks, [3])
  jax.clear_caches()
  for c in chunks:
    (a,), (b,) = whole.variants(cc.chunk_hash(c)), blocked.variants(cc.chunk_hash(c))
    for field in ("inter", "intra", "token_inter", "predecessor_attention"):
      np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------- prompts and reuse


def _full(model, chunks, question, max_new_tokens):
  prompt = [t for c in chunks for t in c] + question
  return kvjax.generate(model, [prompt], max_new_tokens=max_new_tokens).token_ids[0]


def test_full_recompute_equals_a_plain_prefill_and_stores_new_variants():
  model = tiny_model()
  chunks, question = _chunks(), [5, 6, 7]
  store = cc.ChunkStore(model)
  first = cc.generate_from_chunks(model, store, chunks, question, max_new_tokens=8)
  assert first.token_ids[0] == _full(model, chunks, question, 8)
  reordered = [chunks[2], chunks[0], chunks[3], chunks[1]]
  want = _full(model, reordered, question, 8)
  again = cc.generate_from_chunks(model, store, reordered, question, max_new_tokens=8,
                                  recompute_fraction=1.0)
  assert again.token_ids[0] == want
  assert again.stats["prefilled_tokens"] == again.stats["prompt_tokens"]
  # Each chunk was prefilled whole in a new context: a second variant of each.
  assert again.stats["chunks_reused"] == 4 and again.stats["chunks_stored"] == 4
  assert all(len(store.variants(cc.chunk_hash(c))) == 2 for c in chunks)


def test_logits_and_cache_of_full_recompute_equal_the_prefill_step():
  model = tiny_model()
  chunks, question = _chunks(1), [9, 10]
  store = cc.ChunkStore(model)
  cc.prefill_chunks(model, store, chunks, question)
  ids = [t for c in chunks[::-1] for t in c] + question
  logits, cache, _ = cc.prefill_chunks(model, store, chunks[::-1], question,
                                       recompute_fraction=1.0)
  tokens = jnp.asarray([ids])
  want_logits, want = engine.STEPS.prefill(
      model, tokens, jnp.ones_like(tokens, bool),
      kvjax.cache.kv_cache.init_cache(model.config, 1, len(ids)))
  np.testing.assert_allclose(logits, want_logits, atol=1e-4)
  for got, ref in zip(cache.layers, want.layers):
    n = len(ids)
    np.testing.assert_array_equal(got.positions[..., :n], ref.positions)
    np.testing.assert_allclose(got.keys[:, :, :n], ref.keys, atol=1e-4)
    np.testing.assert_allclose(got.values[:, :, :n], ref.values, atol=1e-4)
    assert (np.asarray(got.positions[..., n:]) < 0).all()
  assert int(cache.lengths[0]) == len(ids)


def test_same_context_reuses_everything_exactly():
  model = tiny_model()
  chunks = _chunks(2)
  store = cc.ChunkStore(model)
  cc.generate_from_chunks(model, store, chunks, [5, 6], max_new_tokens=2)
  out = cc.generate_from_chunks(model, store, chunks, [7, 8, 9], max_new_tokens=8)
  assert out.token_ids[0] == _full(model, chunks, [7, 8, 9], 8)
  assert out.stats["prefilled_tokens"] == 3
  assert all(p["fix_overhead"] == 0 for p in out.stats["chunk_plans"])


def test_moved_chunk_keys_are_rotated_to_their_new_positions():
  """Layer 0's keys depend only on the token and its position, so a reused chunk's layer-0
  keys at its new place equal a fresh prefill's there."""
  model = tiny_model()
  a, b, c = _chunks(3, (12, 20, 15))
  store = cc.ChunkStore(model)
  cc.prefill_chunks(model, store, [a, b, c], [4])
  _, cache, stats = cc.prefill_chunks(model, store, [c, a], [4], recompute_fraction=0.0)
  assert stats["prefilled_tokens"] == 1
  ids = c + a + [4]
  tokens = jnp.asarray([ids])
  _, want = engine.STEPS.prefill(model, tokens, jnp.ones_like(tokens, bool),
                                 kvjax.cache.kv_cache.init_cache(model.config, 1, len(ids)))
  np.testing.assert_allclose(cache.layers[0].keys[:, :, :len(ids)], want.layers[0].keys,
                             atol=1e-4)
  # Layer 1 keys depend on the context, which changed: reuse without recompute differs.
  assert not np.allclose(cache.layers[1].keys[:, :, :len(c)], want.layers[1].keys[:, :, :len(c)],
                         atol=1e-3)


def test_partial_recompute_follows_the_fix_overhead():
  model = tiny_model()
  chunks = _chunks(4, (10, 30, 30))
  store = cc.ChunkStore(model)
  cc.prefill_chunks(model, store, chunks, [4])
  new_order = [chunks[0], chunks[2], chunks[1]]
  _, _, stats = cc.prefill_chunks(model, store, new_order, [4], alpha=0.5)
  plans = cc.plan_chunks(store, new_order, None, 0.5)
  for p, seen in zip(plans, stats["chunk_plans"]):
    want = math.ceil(round(p.fix_overhead * p.length, 9))
    assert seen["recomputed"] == len(p.recompute) == want
    if len(p.recompute):
      top = np.argsort(-p.variant.token_inter, kind="stable")[:want]
      assert sorted(p.recompute.tolist()) == sorted(top.tolist())
  # chunks[2] lost chunks[1], which it attended to, and recomputes; chunks[1] keeps its
  # one predecessor (a new one before it does not count) and chunks[0] its empty context.
  assert stats["chunk_plans"][0]["recomputed"] == 0
  assert stats["chunk_plans"][1]["recomputed"] > 0
  assert stats["chunk_plans"][2]["recomputed"] == 0
  assert stats["prefilled_tokens"] == 1 + stats["recomputed_tokens"]


# --------------------------------------------------------------------------- the store


def test_store_evicts_least_recently_used_variants_by_bytes():
  model = tiny_model()
  chunks = _chunks(5, (16, 16, 16))
  probe = cc.ChunkStore(model)
  cc.prefill_chunks(model, probe, [chunks[0]], [1])
  one = probe.bytes
  store = cc.ChunkStore(model, max_bytes=2 * one)
  cc.prefill_chunks(model, store, [chunks[0]], [1])
  cc.prefill_chunks(model, store, [chunks[1]], [1])
  cc.prefill_chunks(model, store, [chunks[0]], [1])       # used again: chunks[1] is older
  cc.prefill_chunks(model, store, [chunks[2]], [1])
  held = {h for h, _ in store._entries}
  assert held == {cc.chunk_hash(chunks[0]), cc.chunk_hash(chunks[2])}
  assert store.bytes == 2 * one and store.stats["evicted"] == 1
  tiny = cc.ChunkStore(model, max_bytes=one - 1)
  cc.prefill_chunks(model, tiny, [chunks[0]], [1])
  assert len(tiny) == 0 and tiny.stats["too_large"] == 1


def test_store_keeps_at_most_max_variants_per_chunk():
  model = tiny_model()
  a, b, c, d = _chunks(6, (8, 8, 8, 8))
  store = cc.ChunkStore(model, max_variants=2)
  for before in (b, c, d):
    cc.prefill_chunks(model, store, [before, a], [1], recompute_fraction=1.0)
  # a was stored after b, after c and after d; the variant after b left first.
  kept = store.variants(cc.chunk_hash(a))
  assert [v.predecessors for v in kept] == [(cc.chunk_hash(c),), (cc.chunk_hash(d),)]


def test_store_persists_and_reloads(tmp_path):
  model = tiny_model()
  chunks = _chunks(7)
  store = cc.ChunkStore(model, directory=tmp_path)
  cc.generate_from_chunks(model, store, chunks, [5], max_new_tokens=1)
  files = sorted((tmp_path / store.fingerprint).iterdir())
  assert len(files) == len(chunks) and all(f.suffix == ".npz" for f in files)
  folder = tmp_path / store.fingerprint
  (folder / "broken-0.npz").write_bytes(b"not a zip")
  (folder / "empty-0.npz").write_bytes(b"")                      # a crash before fsync
  (folder / "cut-0.npz").write_bytes(files[0].read_bytes()[:100])  # truncated
  (folder / f".{files[0].name}.tmp-x").write_bytes(b"partial")   # a killed writer's file
  again = cc.ChunkStore(model, directory=tmp_path)
  assert len(again) == len(chunks) and again.stats["unreadable"] == 3
  assert sorted(folder.iterdir()) == files
  out = cc.generate_from_chunks(model, again, chunks, [5, 6], max_new_tokens=6)
  assert out.stats["prefilled_tokens"] == 2
  assert out.token_ids[0] == _full(model, chunks, [5, 6], 6)
  # Another model's store lives in another folder and is refused for this one.
  other = tiny_model(seed=1)
  assert cc.ChunkStore(other, directory=tmp_path).fingerprint != store.fingerprint
  with pytest.raises(GenerationError, match="another model"):
    cc.generate_from_chunks(other, again, chunks, [5])


def test_bfloat16_variants_survive_the_disk(tmp_path):
  model = tiny_model(dtype="bfloat16")
  chunks = _chunks(8, (12, 12))
  store = cc.ChunkStore(model, directory=tmp_path)
  cc.prefill_chunks(model, store, chunks, [1])
  again = cc.ChunkStore(model, directory=tmp_path)
  for c in chunks:
    (a,), (b,) = store.variants(cc.chunk_hash(c)), again.variants(cc.chunk_hash(c))
    assert b.keys.dtype == a.keys.dtype
    np.testing.assert_array_equal(a.keys.astype(np.float32), b.keys.astype(np.float32))


@pytest.mark.parametrize("kwargs, match", [
    (dict(chunks=[]), "chunks must be a non-empty list"),
    (dict(chunks="text"), "chunks must be a non-empty list"),
    (dict(chunks=[[1, 2], []]), r"chunks\[1\] is empty"),
    (dict(chunks=[[1, 999]]), r"chunks\[0\]"),
    (dict(recompute_fraction=1.5), "recompute_fraction"),
    (dict(alpha=-1), "alpha"),
    (dict(store="nope"), "ChunkStore"),
])
def test_bad_input_is_refused(kwargs, match):
  model = tiny_model()
  args = dict(store=cc.ChunkStore(model), chunks=[[1, 2, 3]], question=[4])
  args.update(kwargs)
  with pytest.raises(GenerationError, match=match):
    cc.generate_from_chunks(model, args.pop("store"), args.pop("chunks"), **args)
  with pytest.raises(GenerationError, match="max_bytes"):
    cc.ChunkStore(model, max_bytes=0)


def test_reuse_benchmark_reports_each_variant_against_full_prefill():
  """compare_chunk_reuse: the first pass fills the store; on the second, recompute fraction
  1 answers as the full prefill and saves nothing, fraction 0 prefills only the questions."""
  from kvjax.systems import benchmarks
  model = tiny_model()
  c = random_prompts([14, 22, 9, 30, 17], seed=12)
  first = [([c[0], c[1], c[2]], [5, 6], ["a"]), ([c[0], c[3], c[4]], [7], ["b"])]
  second = [([c[0], c[2], c[1]], [8, 9, 10], ["a"]), ([c[0], c[4], c[3]], [11], ["b"]),
            ([c[0], c[1], c[4]], [12, 13], ["c"])]
  report = benchmarks.compare_chunk_reuse(model, (first, second), max_new_tokens=4,
                                          fractions=(0.0, 1.0), repeats=1,
                                          log=lambda line: None)
  variants = report["variants"]
  assert list(variants) == ["full", "cache-craft", "fraction 0", "fraction 1"]
  assert report["chunk_variants"] == 5          # each distinct chunk stored once
  # The first pass's second prompt reuses its leading chunk (same place, same context).
  assert report["first_pass_prefill_saved_fraction"] == pytest.approx((0 + 14 / 62) / 2)
  assert report["prompt_tokens_mean"] == (47 + 62) / 2
  for name in ("full", "fraction 1"):
    assert variants[name]["answers_equal_to_full"] == 3
    assert variants[name]["prefill_saved_fraction"] == 0
  questions_only = np.mean([1 - len(q) / (sum(map(len, ch)) + len(q)) for ch, q, _ in second])
  assert variants["fraction 0"]["prefill_saved_fraction"] == pytest.approx(questions_only)
  assert 0 < variants["cache-craft"]["prefill_saved_fraction"] < questions_only
  assert variants["full"]["prefill_speedup"] == 1.0
  for v in variants.values():
    assert v["prefill_seconds_median"] > 0 and len(v["texts"]) == 3


# ------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_prompt_from_cached_hotpotqa_documents(smollm2):
  from kvjax.evaluation import data
  items = data.hotpotqa()[:2]
  docs = [f"Document: {d}\n\n" for it in items for d in it.documents]
  question = f"Question: {items[0].question}\nAnswer:"
  preamble = "Answer the question using the documents.\n\n"
  store = cc.ChunkStore(smollm2)
  cc.generate_from_chunks(smollm2, store, [preamble] + docs, question, max_new_tokens=1)
  reordered = [preamble] + docs[::-1]
  ids, q = cc.encode_chunks(smollm2, reordered, question)
  want = _full(smollm2, ids, q, 12)
  craft = cc.generate_from_chunks(smollm2, store, reordered, question, max_new_tokens=12)
  # The documents that lost predecessors recompute a share; the rest is reused.
  assert 0 < craft.stats["recomputed_tokens"] < craft.stats["chunk_tokens"] / 2
  assert craft.stats["prefill_saved_fraction"] > 0.5
  full = cc.generate_from_chunks(smollm2, store, reordered, question, max_new_tokens=12,
                                 recompute_fraction=1.0)
  assert full.token_ids[0] == want
  # Recomputed whole, the chunks are stored for this order: it is now reused exactly.
  again = cc.generate_from_chunks(smollm2, store, reordered, question, max_new_tokens=12)
  assert again.stats["recomputed_tokens"] == 0 and again.token_ids[0] == want


def test_the_model_fingerprint_is_hashed_once_per_params_object(monkeypatch):
  """Every chunk request checks the store's model: the weights are hashed once per params
  object, and other weights or another config still give another fingerprint."""
  import dataclasses
  import gc
  from kvjax import calibration
  model = tiny_model(seed=5)
  first = calibration.model_fingerprint(model)
  hashed = []
  real_ravel = calibration.jnp.ravel
  monkeypatch.setattr(calibration.jnp, "ravel", lambda x: hashed.append(1) or real_ravel(x))
  assert calibration.model_fingerprint(model) == first and not hashed
  assert calibration.model_fingerprint(dataclasses.replace(model)) == first and not hashed
  renamed = dataclasses.replace(model, config=dataclasses.replace(model.config, name="other"))
  assert calibration.model_fingerprint(renamed) != first and hashed
  copied = dataclasses.replace(model, params=jax.tree.map(jnp.copy, model.params))
  hashed.clear()
  # The same State updated in place (one array replaced) is hashed again.
  updated = tiny_model(seed=5)
  before = calibration.model_fingerprint(updated)
  scale = updated.params["final_norm"]["scale"]
  scale.set_value(scale[...] * 2)
  hashed.clear()
  assert calibration.model_fingerprint(updated) != before and hashed
  hashed.clear()
  assert calibration.model_fingerprint(copied) == first and hashed   # same weights, hashed
  other = tiny_model(seed=6)
  assert calibration.model_fingerprint(other) != first
  key = id(other.params)
  del other
  gc.collect()
  assert key not in calibration._FINGERPRINTS    # forgotten with its params
