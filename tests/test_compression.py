"""Compression through the model on tiny random weights: memory, modes, chunking, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache import FlatLayerCache, LayerCache
from kvjax.generation import context as context_lib
from kvjax.methods import AdaKV, Knorm, PyramidKV, SinksWindow, SnapKV
from tiny import jnp_and_kernel_tokens, reserved_and_unreserved, tiny_model

PROMPTS = [list(np.random.default_rng(1).integers(1, 256, 120)),
           list(np.random.default_rng(2).integers(1, 256, 97))]


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _slot_bytes(cfg, headwise=False):
  """Bytes of one slot of one KV head: key + value (float32) + position (+ owner head)."""
  return 2 * cfg.head_dim * 4 + 4 + (4 if headwise else 0)


@pytest.mark.parametrize("method", [SnapKV(window=8), PyramidKV(window=8),
                                    AdaKV(press=SnapKV(window=8))], ids=lambda m: m.label)
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_cache_bytes_follow_the_ratio(model, method, ratio):
  result = kvjax.generate(model, PROMPTS, method=method, compression_ratio=ratio,
                          max_new_tokens=3)
  stats = result.stats
  measured, full = stats["context_cache_bytes"], stats["full_context_cache_bytes"]
  cfg = model.config
  # Stated metadata: the head-wise layout also stores each slot's owner head and, per row,
  # the segment offsets and append pointers; every layout stores the slot positions.
  headwise = method.headwise
  expected = (1 - ratio) * full * _slot_bytes(cfg, headwise) / _slot_bytes(cfg)
  assert abs(measured - expected) <= 0.05 * expected, (measured, expected, full)
  kept = stats["kept_tokens_per_layer"]
  assert sum(kept) == cfg.num_layers * int(max(len(p) for p in PROMPTS) * (1 - ratio))
  if method.name == "pyramidkv":
    assert kept[0] > kept[-1]


def test_pyramid_layers_have_their_own_capacities(model):
  method = PyramidKV(window=8)
  result = kvjax.generate(model, PROMPTS, method=method, compression_ratio=0.5,
                          max_new_tokens=2)
  kept = result.stats["kept_tokens_per_layer"]
  assert len(set(kept)) == model.config.num_layers  # really different arrays per layer
  assert sum(kept) == model.config.num_layers * 60


def _compressed_cache(model, method, ratio=0.5, room=0):
  from kvjax.generation import inputs
  tokens, mask = inputs.left_pad(PROMPTS, 0)
  keep = kvjax.methods.validate_compression(method, [len(p) for p in PROMPTS], ratio)
  return context_lib.prefill(model, tokens, mask, method, keep, room), keep


def test_headwise_cache_is_flat_with_uneven_heads(model):
  pre, keep = _compressed_cache(model, AdaKV(press=SnapKV(window=4), alpha_safeguard=0.1))
  k = model.config.num_kv_heads
  for layer in pre.cache.layers:
    assert isinstance(layer, FlatLayerCache)
    assert layer.keys.shape[1] == k * keep   # no per-head padding
    counts = np.diff(np.asarray(layer.offsets), axis=1)
    assert (counts.sum(1) == k * keep).all()
  uneven = [np.diff(np.asarray(layer.offsets), axis=1) for layer in pre.cache.layers]
  assert any((c != keep).any() for c in uneven), "AdaKV should move budget between heads"


def test_kept_slots_hold_their_original_keys(model):
  """Keys kept by compression are the very keys a full prefill computed at those positions."""
  from kvjax.generation import inputs
  tokens, mask = inputs.left_pad(PROMPTS, 0)
  full = context_lib.prefill(model, tokens, mask, kvjax.methods.get(), None, 0)
  pre, _ = _compressed_cache(model, SnapKV(window=4))
  for f, c in zip(full.cache.layers, pre.cache.layers):
    fpos, cpos = np.asarray(f.positions), np.asarray(c.positions)
    for b in range(2):
      for h in range(model.config.num_kv_heads):
        for slot, p in enumerate(cpos[b, h]):
          if p >= 0:
            src = np.flatnonzero(fpos[b, h] == p)[0]
            np.testing.assert_allclose(np.asarray(c.keys)[b, h, slot],
                                       np.asarray(f.keys)[b, h, src], rtol=1e-6)


@pytest.mark.parametrize("method", ["h2o", "tova", "scissorhands", "streaming_llm"])
def test_decode_time_methods_stay_at_budget(model, method):
  result = kvjax.generate(model, PROMPTS[0], method=method, budget=48, max_new_tokens=40)
  assert result.stats["generated_tokens"] == [40]
  # No room added for generated tokens: the 48 slots, then reserved ones (never filled:
  # test_decode_loop.py) up to a shared capacity (generate.ROOM_MULTIPLE).
  assert result.stats["cache_capacity_tokens"] == 64


def test_streaming_llm_keeps_sinks_and_recent_during_decode(model):
  from kvjax.generation import engine
  from kvjax.generation import inputs
  method = kvjax.methods.StreamingLLM(sinks=4)
  tokens, mask = inputs.left_pad([PROMPTS[0]], 0)
  pre = context_lib.prefill(model, tokens, mask, method, 32, 0)
  cache, tok = pre.cache, np.asarray(pre.logits.argmax(-1), np.int32)
  for _ in range(10):
    tok, _, cache = engine.STEPS.decode(model, tok, cache, jax.random.key(0), 1.0, 1.0, True,
                                        pre.decode_plan)
  seen = int(cache.lengths[0])
  for layer in cache.layers:
    kept = np.sort(np.asarray(layer.positions)[0, 0])
    np.testing.assert_array_equal(kept, list(range(4)) + list(range(seen - 28, seen)))


def test_query_agnostic_compresses_only_the_context(model):
  question = list(np.random.default_rng(3).integers(1, 256, 9))
  result = kvjax.generate(model, PROMPTS[0], questions=question, method="snapkv",
                          compression_ratio=0.5, max_new_tokens=4)
  stats = result.stats
  assert stats["kept_tokens_per_layer"][0] == 60
  assert stats["room_tokens"] >= 9 + 4
  # Question-aware: the question inside the compressed prompt gives a different cache.
  aware = kvjax.generate(model, PROMPTS[0] + question, method="snapkv", compression_ratio=0.5,
                         max_new_tokens=4)
  assert aware.stats["kept_tokens_per_layer"][0] == int(129 * 0.5)


def test_one_compressed_context_serves_several_questions(model):
  questions = [list(np.random.default_rng(s).integers(1, 256, 6 + s)) for s in range(3)]
  shared = kvjax.generate(model, PROMPTS[0], questions=questions, method="snapkv",
                          compression_ratio=0.5, max_new_tokens=5)
  for i, q in enumerate(questions):
    alone = kvjax.generate(model, PROMPTS[0], questions=q, method="snapkv",
                           compression_ratio=0.5, max_new_tokens=5)
    assert shared.token_ids[i] == alone.token_ids[0]
  # The context was compressed once: the context cache has batch 1.
  one = kvjax.generate(model, PROMPTS[0], questions=questions[0], method="snapkv",
                       compression_ratio=0.5, max_new_tokens=5)
  assert shared.stats["context_cache_bytes"] == one.stats["context_cache_bytes"]


def test_chunked_prefill_without_eviction_equals_one_shot(model):
  one = kvjax.generate(model, PROMPTS, max_new_tokens=6)
  chunked = kvjax.generate(model, PROMPTS, max_new_tokens=6, prefill_chunk_size=32)
  assert one.token_ids == chunked.token_ids
  keep_all = kvjax.generate(model, PROMPTS, method="snapkv", compression_ratio=0.0,
                            max_new_tokens=6, prefill_chunk_size=32)
  assert one.token_ids == keep_all.token_ids


def test_chunked_prefill_compresses_between_chunks(model):
  """Each chunk's step receives at most the budget and adds one chunk: peak = budget + chunk."""
  from kvjax.generation import engine, inputs
  method = SnapKV(window=8)
  tokens, mask = inputs.left_pad(PROMPTS, 0, 128)
  capacities = []
  original = engine.STEPS.prefill

  def spy(model_, tokens_, mask_, cache, logits="last", plan=None, method_params=None):
    capacities.append(max(layer.capacity for layer in cache.layers) + tokens_.shape[1])
    return original(model_, tokens_, mask_, cache, logits, plan)

  engine.STEPS.prefill = spy
  try:
    pre = context_lib.prefill(model, tokens, mask, method, 40, 0, chunk_size=32)
  finally:
    engine.STEPS.prefill = original
  assert max(capacities) <= 40 + 32
  assert all(layer.capacity == 40 for layer in pre.cache.layers)
  result = kvjax.generate(model, PROMPTS, method=method, budget=40, max_new_tokens=4,
                          prefill_chunk_size=32)
  assert result.stats["kept_tokens_per_layer"] == [40, 40]


def test_score_reads_through_the_compressed_cache(model):
  cont = list(np.random.default_rng(4).integers(1, 256, 12))
  full = kvjax.score(model, PROMPTS[0], cont)
  kept_all = kvjax.score(model, PROMPTS[0], cont, method="snapkv", compression_ratio=0.0)
  np.testing.assert_allclose(full, kept_all, atol=1e-5)
  compressed = kvjax.score(model, PROMPTS[0], cont, method="knorm", compression_ratio=0.75)
  assert np.isfinite(compressed).all() and not np.allclose(full, compressed, atol=1e-3)


def test_composition_objects(model):
  method = SinksWindow(press=Knorm(), sinks=2, window=8)
  pre, keep = _compressed_cache(model, method)
  seen = np.asarray(pre.cache.lengths)
  for layer in pre.cache.layers:
    assert isinstance(layer, LayerCache)
    for b in range(2):
      kept = set(np.asarray(layer.positions)[b, 0].tolist())
      assert {0, 1} <= kept and set(range(seen[b] - 8, seen[b])) <= kept
  per_layer = kvjax.methods.PerLayer(press=SnapKV(window=8), weights=(3.0, 1.0))
  assert per_layer.layer_budgets(model.config, 60, 120) == (90, 30)
  # A layer never gets less than its window plus one slot: the excess moves to the others.
  tight = kvjax.methods.PerLayer(press=SnapKV(window=32), weights=(3.0, 1.0))
  assert tight.layer_budgets(model.config, 60, 120) == (87, 33)
  result = kvjax.generate(model, PROMPTS, method=per_layer, compression_ratio=0.5,
                          max_new_tokens=2)
  assert result.stats["kept_tokens_per_layer"] == [90, 30]


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="snapkv"), "needs compression_ratio"),
    (dict(method="snapkv", compression_ratio=1.0), r"\[0, 1\)"),
    (dict(method=SnapKV(window=8), budget=40, prefill_chunk_size=0), "prefill_chunk_size=0"),
])
def test_compression_errors(model, kwargs, match):
  with pytest.raises(kvjax.KvjaxError, match=match):
    kvjax.generate(model, PROMPTS, max_new_tokens=2, **kwargs)


def test_adakv_chunked_prefill_keeps_headwise_budgets(model):
  """Head-wise budgets across prefill chunks: each chunk is scored with the kept slots (a
  flat cache read back per head), the layer total stays exact and heads stay uneven; with
  a budget covering the context, chunking changes nothing."""
  from kvjax.generation import inputs
  tokens, mask = inputs.left_pad(PROMPTS, 0, 128)
  method = AdaKV(press=SnapKV(window=8))
  pre = context_lib.prefill(model, tokens, mask, method, 40, room=0, chunk_size=32)
  k = model.config.num_kv_heads
  for layer in pre.cache.layers:
    assert isinstance(layer, FlatLayerCache) and layer.capacity == k * 40
    counts = np.diff(np.asarray(layer.offsets), axis=1)
    assert (counts.sum(1) == k * 40).all() and (counts != 40).any()
    assert (counts >= method.safeguard(40)).all()
    # Every kept slot holds a real position of its row, each at most once per head.
    positions, heads = np.asarray(layer.positions), np.asarray(layer.heads)
    for row, n in enumerate(mask.sum(1)):
      for head in range(k):
        kept = positions[row][(heads[row] == head) & (positions[row] >= 0)]
        assert len(set(kept.tolist())) == len(kept) and kept.max() < n
  whole = kvjax.generate(model, PROMPTS, max_new_tokens=4)
  chunked = kvjax.generate(model, PROMPTS, method=method, budget=min(len(p) for p in PROMPTS),
                           prefill_chunk_size=32, max_new_tokens=4)
  shortest = int(np.argmin([len(p) for p in PROMPTS]))
  assert chunked.token_ids[shortest] == whole.token_ids[shortest]


def test_a_headwise_context_of_another_length_decodes_with_the_same_compiled_loop(
    model, monkeypatch):
  """`generate` pads a head-wise layer with reserved slots (in its last head's segment) to
  a multiple of 64 slots per head: prompts of other lengths share one compiled decode
  loop, and generate what the unpadded cache generates."""
  method = AdaKV(press=SnapKV(window=8))
  rng = np.random.default_rng(5)
  prompts = [rng.integers(1, 256, n).tolist() for n in (100, 112)]
  (loops, padded), (exact_loops, exact) = reserved_and_unreserved(
      model, prompts, FlatLayerCache, monkeypatch, method=method, compression_ratio=0.5,
      max_new_tokens=8)
  # 50 and 56 kept slots per head (on average), plus 64 of room: both 128 once reserved.
  assert (loops, exact_loops) == (1, 2)
  assert [r.stats["cache_capacity_tokens"] for r in padded] == [128, 128]
  assert [r.stats["cache_capacity_tokens"] for r in exact] == [50 + 64, 56 + 64]
  assert [r.token_ids for r in padded] == [r.token_ids for r in exact]


@pytest.mark.parametrize("press", ["h2o", "tova", "scissorhands", "streaming_llm"])
def test_adakv_around_decode_time_scorers(model, press):
  """Head-wise budgets around a decode-time scorer: every decode token overwrites a slot of
  its own head's segment, so segment sizes (the head-wise budgets) never change, every slot
  stays with its head, and the newest token is in every head."""
  from kvjax.generation import engine, inputs
  method = AdaKV(press=kvjax.methods.get(press, **({"recent": 8, "sinks": 2}
                                                   if press == "scissorhands" else {})))
  question = [5, 6, 7]
  result = kvjax.generate(model, PROMPTS, questions=[question, question], method=method,
                          budget=40, max_new_tokens=12)
  assert result.stats["generated_tokens"] == [12, 12]
  assert result.stats["room_tokens"] == 16   # the question's room only: decode evicts
  tokens, mask = inputs.left_pad(PROMPTS, 0, 128)
  pre = context_lib.prefill(model, tokens, mask, method, 40, room=0)
  cache, offsets = pre.cache, [np.asarray(layer.offsets) for layer in pre.cache.layers]
  token = jnp.asarray([1, 2])
  for step in range(6):
    token, _, cache = engine.STEPS.decode(model, token, cache, jax.random.key(0), 1.0, 1.0,
                                          True, pre.decode_plan)
    for layer, before in zip(cache.layers, offsets):
      np.testing.assert_array_equal(np.asarray(layer.offsets), before)
      positions, heads = np.asarray(layer.positions), np.asarray(layer.heads)
      lengths = np.asarray(cache.lengths)
      for row in range(2):
        for head in range(model.config.num_kv_heads):
          mine = positions[row][heads[row] == head]
          assert lengths[row] - 1 in mine, "the new token is stored in every head"
          valid = mine[mine >= 0]
          assert len(set(valid.tolist())) == len(valid) and valid.max() < lengths[row]


@pytest.mark.parametrize("build,match", [
    (lambda: kvjax.methods.get("snapkv", windw=3), r"no hyperparameters \['windw'\]"),
    (lambda: SnapKV(kernel_size=4), "kernel_size=4 must be odd"),
    (lambda: SnapKV(pooling="median"), "pooling='median'"),
    (lambda: kvjax.methods.get("h2o", recent_ratio=2.0), r"recent_ratio=2.0.*\[0, 1\]"),
    (lambda: AdaKV(press="nope"), "unknown method 'nope'"),
    (lambda: kvjax.methods.Scissorhands(history_window=40), r"history_window=40.*\[1, 32\]"),
])
def test_method_hyperparameter_errors(build, match):
  with pytest.raises(kvjax.KvjaxError, match=match):
    build()


def test_methods_are_hashable_and_listed():
  names = kvjax.methods.available()
  for name in ["streaming_llm", "h2o", "tova", "knorm", "snapkv", "pyramidkv", "adakv",
               "expected_attention", "scissorhands"]:
    assert name in names
    method = kvjax.methods.get(name)
    assert hash(method) == hash(kvjax.methods.get(name))


@pytest.mark.parametrize("method", [None, SnapKV(window=8), AdaKV(press=SnapKV(window=8)),
                                    kvjax.methods.H2O()],
                         ids=lambda m: "full" if m is None else m.label)
def test_pallas_kernels_in_the_model_match_the_jnp_path(model, method, monkeypatch):
  """The model's kernel path (decode attention, window scores, compaction; interpreted on
  CPU) generates the same tokens as the jnp path."""
  kwargs = {} if method is None else dict(method=method, compression_ratio=0.5)
  monkeypatch.setenv("KVJAX_PALLAS", "0")
  plain, pallas = jnp_and_kernel_tokens(model, PROMPTS, monkeypatch, max_new_tokens=6,
                                        **kwargs)
  assert plain == pallas


@pytest.mark.parametrize("method", [SinksWindow(press=kvjax.methods.H2O(), sinks=2, window=8),
                                    SinksWindow(press=AdaKV(press=Knorm()), sinks=2, window=8),
                                    kvjax.methods.PerLayer(press=kvjax.methods.TOVA(),
                                                           weights=(1.0, 2.0))],
                         ids=lambda m: m.label)
def test_wrappers_compose_with_every_phase(model, method):
  """Wrapped decode-time, accumulating and head-wise methods run prefill, question and decode."""
  question = list(np.random.default_rng(5).integers(1, 256, 7))
  result = kvjax.generate(model, PROMPTS, questions=[question, question], method=method,
                          compression_ratio=0.5, max_new_tokens=12)
  assert result.stats["generated_tokens"] == [12, 12]
  assert sum(result.stats["kept_tokens_per_layer"]) == model.config.num_layers * 60
