"""Generation semantics on tiny random models: decode vs prefill, batching, sampling, stops."""

import importlib

import jax
import numpy as np
import pytest
from flax import struct
from hypothesis import given, settings
from hypothesis import strategies as st

import kvjax
from kvjax.cache import LayerCache, init_cache, kv_cache
from kvjax.generation import engine, sampling
from tiny import tiny_chat_model, tiny_model

# The module (kvjax.generation.generate is also the name of its function).
generate_lib = importlib.import_module("kvjax.generation.generate")


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _prefill_all(model, tokens):
  tokens = np.asarray(tokens, np.int32)[None]
  cache = init_cache(model.config, 1, 64)
  logits, _ = engine.STEPS.prefill(model, tokens, np.ones(tokens.shape, bool), cache, "all")
  return np.asarray(logits[0])


def test_decode_logits_equal_prefill_logits(model):
  tokens = np.random.default_rng(0).integers(0, 256, 20)
  expected = _prefill_all(model, tokens)
  cache = init_cache(model.config, 1, 64)
  logits, cache = engine.STEPS.prefill(model, tokens[None, :12].astype(np.int32),
                                       np.ones((1, 12), bool), cache, "last")
  np.testing.assert_allclose(np.asarray(logits[0]), expected[11], atol=1e-5, rtol=1e-5)
  for t in range(12, 20):
    _, logits, cache = engine.STEPS.decode(model, np.asarray([tokens[t]], np.int32), cache,
                                           jax.random.key(0), 1.0, 1.0, True)
    np.testing.assert_allclose(np.asarray(logits[0]), expected[t], atol=1e-5, rtol=1e-5)


def test_batch_equals_each_prompt_alone(model):
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(0, 256, n)) for n in (5, 23, 14)]
  batched = kvjax.generate(model, prompts, max_new_tokens=10)
  for i, prompt in enumerate(prompts):
    alone = kvjax.generate(model, prompt, max_new_tokens=10)
    assert alone.token_ids[0] == batched.token_ids[i]
  assert len(set(map(tuple, batched.token_ids))) == 3  # distinct rows, not a broadcast bug


def test_sampling_is_seeded(model):
  prompt = list(range(10))
  run = lambda seed: kvjax.generate(model, prompt, max_new_tokens=12, temperature=1.5,
                                    top_p=0.95, seed=seed).token_ids[0]
  assert run(3) == run(3)
  assert run(3) != run(4)
  greedy = kvjax.generate(model, prompt, max_new_tokens=12).token_ids[0]
  assert run(3) != greedy


def test_top_p_filter_keeps_smallest_nucleus():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 50)).astype(np.float32) * 3
  for top_p in (0.1, 0.5, 0.9, 1.0):
    kept = np.isfinite(np.asarray(sampling.top_p_filter(logits, np.float32(top_p))))
    for row, keep in zip(logits, kept):
      probs = np.exp(row - row.max())
      probs /= probs.sum()
      order = np.argsort(-probs)
      mass_before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
      expected = np.zeros(50, bool)
      expected[order[mass_before < top_p]] = True
      np.testing.assert_array_equal(keep, expected)


def test_score_equals_log_softmax_of_one_prefill(model):
  rng = np.random.default_rng(3)
  context, continuation = list(rng.integers(0, 256, 17)), list(rng.integers(0, 256, 9))
  got = kvjax.score(model, context, continuation)
  logits = _prefill_all(model, context + continuation)
  logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                 keepdims=True)) \
      - logits.max(-1, keepdims=True)
  expected = [logprobs[len(context) - 1 + j, tok] for j, tok in enumerate(continuation)]
  np.testing.assert_allclose(got, expected, atol=1e-4)


def test_question_appended_after_prompt_matches_one_prompt(model):
  rng = np.random.default_rng(4)
  context, question = list(rng.integers(0, 256, 30)), list(rng.integers(0, 256, 7))
  split = kvjax.generate(model, context, questions=question, max_new_tokens=8)
  joined = kvjax.generate(model, context + question, max_new_tokens=8)
  assert split.token_ids == joined.token_ids
  assert split.stats["question_tokens"] == [7]


def test_several_questions_over_one_context(model):
  context = list(range(40))
  result = kvjax.generate(model, context, questions=[[1, 2, 3], [9, 8, 7, 6]], max_new_tokens=5)
  assert len(result.token_ids) == 2
  assert result.token_ids[1] == kvjax.generate(model, context + [9, 8, 7, 6],
                                               max_new_tokens=5).token_ids[0]


def test_eos_stops_a_row_and_max_new_tokens_bounds_length(model):
  prompt = list(range(12))
  free = kvjax.generate(model, prompt, max_new_tokens=9).token_ids[0]
  assert len(free) == 9
  stopped = kvjax.generate(model, prompt, max_new_tokens=9, eos_token_ids=[free[3]])
  assert stopped.token_ids[0] == free[:free.index(free[3])]


def test_stats_measure_the_cache(model):
  result = kvjax.generate(model, [list(range(30))] * 2, max_new_tokens=4)
  stats = result.stats
  cfg = model.config
  per_layer = lambda slots: (2 * 2 * cfg.num_kv_heads * slots * cfg.head_dim * 4
                             + 2 * cfg.num_kv_heads * slots * 4 + 4)
  slots = stats["cache_capacity_tokens"]
  assert stats["cache_bytes"] == cfg.num_layers * per_layer(slots) + 2 * 4
  room, width = stats["room_tokens"], stats["prompt_width_tokens"]
  assert room >= 4 and width >= 30 and slots == width + room
  # A full run: the allocation (prompt bucket padding and room included) is the full
  # cache's allocation, and the context's cache is exactly the full cache of 30 tokens.
  assert stats["full_cache_bytes"] == stats["cache_bytes"]
  assert stats["context_cache_bytes"] == stats["full_context_cache_bytes"] == (
      cfg.num_layers * per_layer(30) + 2 * 4)
  assert stats["context_cache_allocated_bytes"] == cfg.num_layers * per_layer(width) + 2 * 4
  assert stats["prefill_seconds"] > 0 and stats["decode_tokens_per_second"] > 0


def test_stats_of_a_compressed_run_name_padding_and_room(model):
  stats = kvjax.generate(model, [list(range(1, 31))] * 2, method="snapkv", budget=10,
                         max_new_tokens=4).stats
  cfg = model.config
  per_layer = lambda slots: (2 * 2 * cfg.num_kv_heads * slots * cfg.head_dim * 4
                             + 2 * cfg.num_kv_heads * slots * 4 + 4)
  assert stats["context_cache_bytes"] == stats["context_cache_allocated_bytes"] == (
      cfg.num_layers * per_layer(10) + 2 * 4)
  assert stats["full_context_cache_bytes"] == cfg.num_layers * per_layer(30) + 2 * 4
  # The room is what 4 new tokens need; the compressed layers are rounded up to a
  # capacity of 64 slots, the full cache's room to 64 slots.
  assert stats["room_tokens"] == 4 and stats["cache_capacity_tokens"] == 64
  assert stats["cache_bytes"] == cfg.num_layers * per_layer(64) + 2 * 4
  assert stats["full_cache_bytes"] == cfg.num_layers * per_layer(
      stats["prompt_width_tokens"] + 64) + 2 * 4


@pytest.fixture(scope="module")
def text_model(smollm2_tokenizer):
  """Tiny random weights with SmolLM2's real tokenizer and chat template."""
  return tiny_chat_model(smollm2_tokenizer)


def test_stop_strings_and_streaming(text_model):
  prompt = "Once upon a time"
  free = kvjax.generate(text_model, prompt, max_new_tokens=24, chat_template=False)
  text = free.texts[0]
  stop = next(text[i:i + 3] for i in range(4, len(text) - 3) if text[i:i + 3].strip())
  pieces = []
  stopped = kvjax.generate(text_model, prompt, max_new_tokens=24, chat_template=False,
                           stop=stop, stream=lambda row, piece: pieces.append((row, piece)))
  assert stopped.texts[0] == text[:text.index(stop)]
  assert "".join(p for _, p in pieces) == stopped.texts[0]
  assert {r for r, _ in pieces} <= {0}


def test_chat_template_is_applied_by_default(text_model):
  tok = text_model.tokenizer
  question = "What is the capital of France?"
  chat = kvjax.generate(text_model, question, max_new_tokens=2)
  plain = kvjax.generate(text_model, question, max_new_tokens=2, chat_template=False)
  rendered = tok.apply_chat_template([{"role": "user", "content": question}])
  assert chat.stats["prompt_tokens"] == [len(tok.encode(rendered, add_special_tokens=False))]
  assert plain.stats["prompt_tokens"] == [len(tok.encode(question))]


def test_compiled_steps_evict_the_least_recently_used():
  model = tiny_model()
  # Two shapes' uncompressed prefills (embedding, layer, logits: three executables each).
  steps = engine.CompiledSteps(max_executables=6)

  def compiles(n) -> bool:
    before = steps.compile_seconds
    steps.prefill(model, jax.numpy.ones((1, n), "int32"), jax.numpy.ones((1, n), bool),
                  init_cache(model.config, 1, 32))
    return steps.compile_seconds > before

  assert compiles(4) and compiles(8)
  assert not compiles(4)          # cached; 4 is now the most recently used
  assert compiles(16)             # a third shape: 8, the least recently used, goes
  assert len(steps._executables) == 6
  assert not compiles(4) and not compiles(16)
  assert compiles(8)              # was evicted: compiled again
  steps.clear()
  assert not steps._executables


def test_a_different_max_new_tokens_reuses_the_compiled_steps(model):
  """Room is rounded to a multiple, so a new max_new_tokens (within it) compiles nothing."""
  prompt = [list(range(1, 40))]
  kvjax.generate(model, prompt, max_new_tokens=5)
  compiled = engine.STEPS.compile_seconds
  result = kvjax.generate(model, prompt, max_new_tokens=30)
  assert engine.STEPS.compile_seconds == compiled
  assert len(result.token_ids[0]) == 30
  assert kvjax.generate(model, prompt, max_new_tokens=5).token_ids == \
      [result.token_ids[0][:5]]


@struct.dataclass
class _OtherLayout(LayerCache):
  """A layout that is not the dense LayerCache itself (its slots per head may not be its
  capacity), for the room rule of `kv_cache.grow`."""


def test_grow_rounds_a_dense_layers_capacity_and_another_layouts_room(model):
  dense = init_cache(model.config, 1, 10)
  capacities = lambda cache: [layer.capacity for layer in cache.layers]
  assert capacities(kv_cache.grow(dense, 4)) == [14, 14]
  assert capacities(kv_cache.grow(dense, 4, 16)) == [16, 16]
  assert capacities(kv_cache.grow(dense, 7, 16)) == [32, 32]   # 17 slots needed
  assert capacities(kv_cache.grow(init_cache(model.config, 1, 12), 4, 16)) == [16, 16]
  other = dense.replace(layers=tuple(_OtherLayout(**vars(layer)) for layer in dense.layers))
  assert capacities(kv_cache.grow(other, 4, 16)) == [26, 26]   # 10 + 16 (4 rounded up)


@pytest.mark.parametrize("n, want", [(1, 16), (16, 16), (17, 32), (25, 32), (64, 64), (65, 80),
                                     (100, 112), (128, 128), (129, 160), (1025, 1280)])
def test_data_dependent_sizes_round_to_shared_sizes(n, want):
  # A multiple of 16, or of 2^(bits - 3) for n of `bits` bits: at most 15 or a quarter more.
  assert kv_cache.shared_size(n) == want


def test_shared_capacities_stay_near_the_slots_kept():
  """High compression of a long prompt (128 of 32K slots) pads little; a layer never
  exceeds what it chose from, and takes few capacities per doubling."""
  assert kv_cache.shared_capacity(128, 32768) == 128
  assert kv_cache.shared_capacity(300, 32768) == 320
  assert kv_cache.shared_capacity(700, 704) == 704
  sizes = {kv_cache.shared_capacity(n, 10 ** 6) for n in range(1, 4097)}
  assert all(n <= kv_cache.shared_capacity(n, 10 ** 6) <= max(n + 15, n * 5 // 4)
             for n in range(1, 4097))
  assert len(sizes) == 4 + 4 * 6   # 16-64, then 4 per doubling up to 4096


def test_capacity_sets_are_reused_within_the_slack():
  """A method's later prompt takes a capacity set allocated before when it holds every
  layer's rounded count within the slack, grows one when their union stays within it,
  and otherwise keeps its own rounded counts; keys never share sets."""
  slack = kv_cache.SHAPE_REUSE_SLACK
  largest = [1024] * 3
  first = kv_cache.shared_capacities("m", [100, 200, 300], largest)
  assert first == (112, 224, 320)                      # the rounded counts (shared_capacity)
  # Smaller counts the first set holds within the slack: that set, not (96, 192, 320).
  assert kv_cache.shared_capacities("m", [90, 190, 300], largest) == first
  # Another key, or after forgetting: its own rounded counts.
  assert kv_cache.shared_capacities("other", [90, 190, 300], largest) == (96, 192, 320)
  # A layer over the set: the union, which stays within the slack (not the rounded counts
  # (96, 256, 320)).
  grown = kv_cache.shared_capacities("m", [90, 250, 280], largest)
  assert grown == (112, 256, 320)
  # The grown set now holds both; the smaller first set is still preferred where it holds.
  assert kv_cache.shared_capacities("m", [100, 240, 300], largest) == grown
  assert kv_cache.shared_capacities("m", [100, 200, 290], largest) == first
  # Counts whose union with every set passes the slack keep their own rounded counts.
  small = [16, 16, 16]
  assert sum(first) > (1 + slack) * 3 * 16
  assert kv_cache.shared_capacities("m", small, largest) == (16, 16, 16)
  # A set past a layer's bound (what the layer chose from) is never taken.
  assert kv_cache.shared_capacities("m", [100, 200, 300], [1024, 200, 1024]) == (112, 200, 320)
  kv_cache.forget_capacities()
  assert kv_cache.shared_capacities("m", [90, 190, 300], largest) == (96, 192, 320)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 600), min_size=4, max_size=4), min_size=1, max_size=12),
       st.lists(st.integers(1, 700), min_size=4, max_size=4))
def test_reused_capacities_hold_the_counts_within_bounds_and_slack(prompts, largest):
  kv_cache.forget_capacities()
  for slots in prompts:
    rounded = [kv_cache.shared_capacity(n, m) for n, m in zip(slots, largest)]
    got = kv_cache.shared_capacities("m", slots, largest)
    assert all(r <= g <= max(n, m) for r, g, n, m in zip(rounded, got, slots, largest))
    assert sum(got) <= (1 + kv_cache.SHAPE_REUSE_SLACK) * sum(rounded)
  kv_cache.forget_capacities()


def test_remembered_sets_and_keys_are_least_recently_used_first():
  largest = [10 ** 6] * 3
  first = kv_cache.shared_capacities("m", [100, 200, 300], largest)
  def others(count):
    for i in range(count):   # each larger than the sets before: a set of its own
      kv_cache.shared_capacities("m", [1000 * (i + 1)] * 3, largest)
  others(kv_cache._REMEMBERED_SETS - 1)
  assert kv_cache.shared_capacities("m", [90, 190, 300], largest) == first   # still held
  others(kv_cache._REMEMBERED_SETS)
  assert kv_cache.shared_capacities("m", [90, 190, 300], largest) == (96, 192, 320)  # forgotten
  kv_cache.forget_capacities()
  first = kv_cache.shared_capacities("m", [100, 200, 300], largest)
  others(1)
  for _ in range(kv_cache._REMEMBERED_SETS):        # a set taken again is remembered once
    kv_cache.shared_capacities("m", [1000] * 3, largest)
  assert kv_cache.shared_capacities("m", [90, 190, 300], largest) == first
  kv_cache.forget_capacities()
  first = kv_cache.shared_capacities("m", [100, 200, 300], largest)
  for i in range(kv_cache._REMEMBERED_KEYS - 1):
    kv_cache.shared_capacities(("k", i), [100, 200, 300], largest)
  assert kv_cache.shared_capacities("m", [90, 190, 300], largest) == first   # used last now
  for i in range(kv_cache._REMEMBERED_KEYS - 1):
    kv_cache.shared_capacities(("j", i), [100, 200, 300], largest)
  assert "m" in kv_cache._allocated                 # the 63 keys used before it went first
  kv_cache.shared_capacities(("j", "last"), [100, 200, 300], largest)
  assert kv_cache.shared_capacities("m", [90, 190, 300], largest) == (96, 192, 320)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 600), min_size=4, max_size=4),
       st.lists(st.lists(st.floats(0.6, 1.1), min_size=4, max_size=4), min_size=1, max_size=8),
       st.lists(st.integers(1, 700), min_size=4, max_size=4))
def test_capacities_are_the_smallest_set_given_before_that_holds_them(base, scales, largest):
  """Prompts near one another (at most _REMEMBERED_SETS: nothing forgotten): each gets the
  smallest set given before that holds its counts within bounds and slack, else a set
  grown from one given before exactly when such a union stays within them, else its own
  rounded counts."""
  kv_cache.forget_capacities()
  prompts = [[max(1, int(n * s)) for n, s in zip(base, scale)] for scale in scales]
  given_back = []
  for slots in prompts:
    rounded = [kv_cache.shared_capacity(n, m) for n, m in zip(slots, largest)]
    bound = [max(n, m) for n, m in zip(slots, largest)]
    most = (1 + kv_cache.SHAPE_REUSE_SLACK) * sum(rounded)
    fits = lambda sizes: sum(sizes) <= most and all(
        r <= c <= b for r, c, b in zip(rounded, sizes, bound))
    got = kv_cache.shared_capacities("m", slots, largest)
    assert fits(got)
    held = [sizes for sizes in given_back if fits(sizes)]
    if held:       # a set given before that holds these counts: the smallest such
      assert got in held and sum(got) == min(map(sum, held))
    else:          # grown to hold one given before, where that stays within the slack
      unions = [tuple(map(max, rounded, sizes)) for sizes in given_back]
      grows = any(fits(u) and u != tuple(rounded) for u in unions)
      assert (got != tuple(rounded)) == grows
    given_back.append(got)


def test_differing_dense_capacities_round_to_a_few_shapes(model):
  """Layers whose capacities differ (PyramidKV's budgets) are rounded to at most
  MAX_CAPACITIES capacities, each a multiple of the asked multiple, none short of what it
  needs and none more than an eighth of the largest (plus the multiple) over it; equal
  layers, multiple 1 and other layouts keep the plain rule."""
  needs = list(range(10, 310, 10))   # 30 layers, 10 .. 300 slots each
  cache = init_cache(model.config, 1, 4).replace(
      layers=tuple(init_cache(model.config, 1, n - 5).layers[0] for n in needs))
  grown = [g.capacity for g in kv_cache.grow(cache, 5, 16).layers]
  assert len(set(grown)) <= kv_cache.MAX_CAPACITIES < len(set(needs))
  for need, got in zip(needs, grown):
    assert got % 16 == 0 and need <= got < need + 300 / 8 + 16, (need, got)
  assert [g.capacity for g in kv_cache.grow(cache, 5).layers] == needs   # exact
  # Few capacities: the plain multiple, however large the largest.
  few = cache.replace(layers=tuple(init_cache(model.config, 1, n).layers[0]
                                   for n in (10, 20, 1090, 2000)))
  assert [g.capacity for g in kv_cache.grow(few, 4, 16).layers] == [16, 32, 1104, 2016]
  other = cache.replace(layers=tuple(_OtherLayout(**vars(g)) for g in cache.layers))
  assert [g.capacity for g in kv_cache.grow(other, 5, 16).layers] == [
      n - 5 + 16 for n in needs]


def test_pyramid_budgets_decode_alike_in_shared_capacities(model, monkeypatch):
  """PyramidKV's layers keep different budgets; rounded to one shared capacity
  (MAX_CAPACITIES 1) their extra empty slots change no token and no kept count."""
  prompt = np.random.default_rng(3).integers(1, 256, 90).tolist()
  run = lambda: kvjax.generate(model, prompt, method="pyramidkv:window=4",
                               compression_ratio=0.5, max_new_tokens=8)
  grown = []
  grow = engine.STEPS.grow
  monkeypatch.setattr(engine.STEPS, "grow", lambda *a, **k: grown.append(grow(*a, **k)) or
                      grown[-1])
  monkeypatch.setattr(generate_lib, "ROOM_MULTIPLE", 1)
  exact = run()
  monkeypatch.setattr(generate_lib, "ROOM_MULTIPLE", 16)
  monkeypatch.setattr(kv_cache, "MAX_CAPACITIES", 1)
  shared = run()
  kept = exact.stats["kept_tokens_per_layer"]
  assert len(set(kept)) > 1 and shared.stats["kept_tokens_per_layer"] == kept
  capacities = [[layer.capacity for layer in cache.layers] for cache in grown]
  assert capacities[0] == [n + 8 for n in kept] and len(set(capacities[1])) == 1
  # The smaller layers grew to the largest one's capacity: more bytes, the same context.
  assert shared.stats["cache_bytes"] > exact.stats["cache_bytes"]
  assert shared.stats["context_cache_bytes"] == exact.stats["context_cache_bytes"]
  assert shared.token_ids == exact.token_ids


def test_a_compressed_context_of_another_length_decodes_with_the_same_compiled_loop(
    model, monkeypatch):
  """A compressed dense layer's capacity is rounded up (generate.ROOM_MULTIPLE) and a
  decode plan holds no budgets, so another prompt length (other kept counts) compiles its
  compressing prefill but not the decode loop; the extra empty slots change no token."""
  rng = np.random.default_rng(5)
  prompts = [rng.integers(1, 256, n).tolist() for n in (100, 110)]
  decode_loops = lambda: {key for key in engine.STEPS._executables if key[0] == "decode_loop"}
  run = lambda prompt, new=8: kvjax.generate(model, prompt, method="snapkv",
                                             compression_ratio=0.5, max_new_tokens=new)
  first = run(prompts[0])
  known = decode_loops()
  second = run(prompts[1])
  assert first.stats["kept_tokens_per_layer"] == [50, 50]
  assert second.stats["kept_tokens_per_layer"] == [55, 55]
  assert first.stats["cache_capacity_tokens"] == second.stats["cache_capacity_tokens"] == 64
  assert decode_loops() <= known
  # Another max_new_tokens whose room fits the same capacity compiles nothing at all.
  compiled = engine.STEPS.compile_seconds
  longer = run(prompts[1], 9)
  assert engine.STEPS.compile_seconds == compiled
  assert longer.token_ids[0][:8] == second.token_ids[0]
  monkeypatch.setattr(generate_lib, "ROOM_MULTIPLE", 1)
  exact = run(prompts[1])
  assert exact.stats["cache_capacity_tokens"] == 55 + 8
  assert exact.token_ids == second.token_ids
