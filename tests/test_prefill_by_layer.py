"""The uncompressed prefill, and the compressing prefill of a method whose every layer does
the same work, run one compiled layer per call (kvjax.generation.engine), also when only
the budgets differ (by layer, as PyramidKV's, or by prompt length) and the method may rank
with its budget traced.

They must give exactly what the whole forward pass compiled as one program gives (logits
and cache), reuse one executable for every layer, and leave the one-program path to the
cases they cannot serve (plans whose work differs by layer, shared storage, layers of
different shapes).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cache import kv_cache
from kvjax.cache.kv_cache import Cache, init_cache
from kvjax.config import LatentAttention
from kvjax.generation import context, engine, inputs
from kvjax.methods.plan import CompressionPlan, PlanSet, RankedLayer
import kvjax
from tests.tiny import assert_same_tree, random_prompts, tiny_model

MODELS = {
    "llama": dict(num_layers=3),
    "qwen2, tied": dict(num_layers=3, qkv_bias=True, tie_embeddings=True),
    "latent": dict(num_layers=3, latent=LatentAttention(kv_rank=8, rope_dim=4)),
    "bfloat16": dict(num_layers=3, dtype="bfloat16"),
}


def _one_program(model, tokens, mask, cache, logits):
  return engine._prefill_jit(model.params, tokens, mask, cache, None, graphdef=model.graphdef,
                             logits=logits, plan=None)


def _assert_same(got, want, exact: bool):
  if exact:
    return assert_same_tree(got, want)
  got_leaves, got_tree = jax.tree_util.tree_flatten(got)
  want_leaves, want_tree = jax.tree_util.tree_flatten(want)
  assert got_tree == want_tree
  for g, w in zip(got_leaves, want_leaves):
    if not jnp.issubdtype(g.dtype, jnp.floating):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    else:
      # bfloat16: the one program may keep float32 across a fused layer boundary that
      # the layer-by-layer path rounds to bfloat16 (XLA's excess precision).
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                 rtol=0.02, atol=0.05)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("logits", ["last", "all"])
def test_layer_by_layer_equals_one_program(name, logits):
  model = tiny_model(seed=2, **MODELS[name])
  prompts = random_prompts([21, 9, 30], seed=4)
  tokens, mask = (jnp.asarray(a) for a in inputs.left_pad(prompts, 0, 32))
  steps = engine.CompiledSteps()
  # A first chunk, then a second one over the filled cache (a chunked prefill).
  for piece in (slice(0, 16), slice(16, 32)):
    if piece.start == 0:
      cache = init_cache(model.config, 3, 40)
      reference_cache = init_cache(model.config, 3, 40)
    assert engine._runs_by_layer(model, cache, None)
    got = steps.prefill(model, tokens[:, piece], mask[:, piece], cache, logits=logits)
    want = _one_program(model, tokens[:, piece], mask[:, piece], reference_cache, logits)
    _assert_same(got, want, exact=name != "bfloat16")
    cache, reference_cache = got[1], want[1]
  assert {key[0] for key in steps._executables} == {"prefill_embed", "prefill_layer",
                                                     "prefill_logits"}


def test_one_executable_serves_every_layer():
  model = tiny_model(num_layers=6)
  steps = engine.CompiledSteps()
  tokens = jnp.asarray(random_prompts([24], seed=1))
  steps.prefill(model, tokens, jnp.ones(tokens.shape, bool), init_cache(model.config, 1, 32))
  names = sorted(key[0] for key in steps._executables)
  assert names == ["prefill_embed", "prefill_layer", "prefill_logits"]


def test_generate_matches_the_one_program_prefill(monkeypatch):
  """End to end: greedy tokens with the layer-by-layer prefill are the one program's."""
  model = tiny_model(seed=5)
  prompts = random_prompts([40, 17], seed=6)
  got = kvjax.generate(model, prompts, max_new_tokens=8).token_ids
  monkeypatch.setattr(engine, "_runs_by_layer", lambda *args: False)
  want = kvjax.generate(model, prompts, max_new_tokens=8).token_ids
  assert got == want


@dataclasses.dataclass(frozen=True)
class _Borrowing:
  """A layer that attends through another layer's storage (as MiniCache's do)."""
  inner: object

  def borrow(self, layers):
    return self.inner


@dataclasses.dataclass(frozen=True)
class _Pyramid(kvjax.methods.PyramidKV):
  """A subclass that says nothing: it may score differently by layer or budget."""


@pytest.mark.parametrize("differ", [False, True])
def test_layers_of_a_few_kinds_grow_one_per_call(differ):
  """A cache whose layers are of at most `GROW_KINDS_BY_LAYER` kinds (shapes, room and
  reserve) grows one layer per call, an executable per kind; one whose layers all differ
  grows as one program. Both give what growing each layer eagerly gives."""
  config = tiny_model(num_layers=6).config
  base = init_cache(config, 2, 8)
  rng = np.random.default_rng(0)
  layers = tuple(init_cache(config, 2, 8 + (i if differ else 0)).layers[i]
                 for i in range(config.num_layers))
  layers = tuple(layer.replace(keys=jnp.asarray(rng.normal(size=layer.keys.shape),
                                                layer.keys.dtype)) for layer in layers)
  cache = base.replace(layers=layers)
  steps = engine.CompiledSteps()
  got = steps.grow(cache, 5, reserve_multiple=16)
  names = [key[0] for key in steps._executables]
  assert names == (["grow"] if differ else ["grow_layer"]), names
  rooms = kv_cache.grow_rooms(cache, 5)
  want = kv_cache.grow_by(cache, rooms, kv_cache.reserve_rooms(cache, rooms, 16))
  assert [layer.capacity for layer in got.layers] == [layer.capacity for layer in want.layers]
  assert all(layer.capacity % 16 == 0 for layer in got.layers)
  for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                                 strict=True):
    np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf))


def test_the_one_program_serves_what_one_layer_cannot():
  model = tiny_model(num_layers=2)
  cache = init_cache(model.config, 1, 32)
  assert engine._runs_by_layer(model, cache, None)
  snapkv = kvjax.methods.get("snapkv")
  assert engine._runs_by_layer(model, cache, CompressionPlan(snapkv, budgets=(8, 8)))
  # Budgets that differ by layer pass only for a method that may rank with its budget
  # traced, with the default top-k (PyramidKV, SnapKV; not H2O where float32 would round
  # its window otherwise, not a subclass that does not say it is layerwise, not a
  # quantizer behind it), no room before the filler slots it cuts, and a largest budget
  # that leaves a candidate out; nor do several plans at once.
  pyramidkv = kvjax.methods.get("pyramidkv")
  pyramid = CompressionPlan(pyramidkv, budgets=(8, 12))
  assert engine._runs_by_layer(model, cache, pyramid)
  assert engine._runs_by_layer(model, init_cache(model.config, 1, 0), pyramid, tokens=13)
  assert not engine._runs_by_layer(model, init_cache(model.config, 1, 0), pyramid, tokens=12)
  assert engine._runs_by_layer(model, cache, CompressionPlan(snapkv, budgets=(8, 12)))
  h2o = kvjax.methods.get("h2o", recent_ratio=0.3)
  assert not h2o.traces_budget(95) and h2o.traces_budget(96)
  assert engine._runs_by_layer(model, init_cache(model.config, 1, 200),
                               CompressionPlan(h2o, budgets=(96, 100)))
  assert not engine._runs_by_layer(model, init_cache(model.config, 1, 200),
                                   CompressionPlan(h2o, budgets=(95, 96)))
  assert not engine._runs_by_layer(model, cache, CompressionPlan(_Pyramid(), budgets=(8, 12)))
  # KIVI ranks as its press does (it quantizes the ranked selection); GEAR does not.
  quantized = kvjax.methods.get("kivi", press="pyramidkv")
  assert engine._runs_by_layer(model, cache, CompressionPlan(quantized, budgets=(8, 12)))
  gear = kvjax.methods.get("gear", press="pyramidkv")
  assert not engine._runs_by_layer(model, cache, CompressionPlan(gear, budgets=(8, 12)))
  assert not engine._runs_by_layer(model, cache, dataclasses.replace(pyramid, room=4))
  assert not engine._runs_by_layer(model, cache, PlanSet((None, pyramid)))
  assert not engine._runs_by_layer(dataclasses.replace(model, placement=object()), cache, None)
  uneven = Cache(layers=(cache.layers[0], cache.layers[1].grow(16)), lengths=cache.lengths)
  assert not engine._runs_by_layer(model, uneven, None)
  shared = Cache(layers=(cache.layers[0], _Borrowing(cache.layers[0])), lengths=cache.lengths)
  assert not engine._runs_by_layer(model, shared, None)
  # Layers of different shapes still prefill, as one program.
  steps = engine.CompiledSteps()
  tokens = jnp.asarray(random_prompts([10], seed=2))
  logits, out = steps.prefill(model, tokens, jnp.ones(tokens.shape, bool), uneven)
  assert [key[0] for key in steps._executables] == ["prefill"]
  assert [layer.capacity for layer in out.layers] == [32, 48]
  assert np.isfinite(np.asarray(logits)).all()


def test_a_bad_logits_value_is_refused_before_the_cache_is_donated():
  model = tiny_model(num_layers=2)
  cache = init_cache(model.config, 1, 32)
  tokens = jnp.asarray(random_prompts([8], seed=3))
  with pytest.raises(ValueError, match=r"logits='first'; allowed: 'all', 'last'"):
    engine.CompiledSteps().prefill(model, tokens, jnp.ones(tokens.shape, bool), cache,
                                   logits="first")
  assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(cache))


def test_models_with_equal_graphs_share_executables():
  """Keys hash the graph definition once per object, yet two loads of one architecture
  (equal graph definitions, distinct objects) still share compiled steps, also after the
  memo of hashes is emptied."""
  steps = engine.CompiledSteps()
  tokens = jnp.asarray(random_prompts([12], seed=4))

  def compiles(model) -> bool:
    before = steps.compile_seconds
    steps.prefill(model, tokens, jnp.ones(tokens.shape, bool), init_cache(model.config, 1, 16))
    return steps.compile_seconds > before

  first, second = tiny_model(seed=0), tiny_model(seed=1)
  assert first.graphdef is not second.graphdef and first.graphdef == second.graphdef
  assert compiles(first)
  assert not compiles(second)
  engine._STATICS.clear()
  assert not compiles(first)
  assert compiles(tiny_model(num_layers=3))


LAYERWISE = [name for name in kvjax.methods.available()
             if kvjax.methods.get(name).layerwise_prefill]


def test_the_methods_that_compress_layer_by_layer():
  # A method joins this list only with the test below passing for it.
  assert LAYERWISE == ["adakv", "cake", "d2o", "elastic_cache", "ems", "expected_attention",
                       "gear", "h2o", "kivi", "knorm", "kvmerger", "lazy_eviction", "mikv",
                       "mpcache", "per_layer", "pyramidkv", "scissorhands", "sentencekv",
                       "sinks_window", "snapkv", "streaming_llm", "think", "tova"]
  # A storage method is when its press is; a wrapper or subclass is not unless it says so.
  assert kvjax.methods.get("kivi", press="snapkv").layerwise_prefill
  assert not kvjax.methods.MiKV(press=_Pyramid()).layerwise_prefill
  assert not _Pyramid.layerwise_prefill
  assert not kvjax.methods.AdaKV(press=_Pyramid()).layerwise_prefill
  assert not kvjax.methods.get("kvcrush", press="snapkv").layerwise_prefill
  # MPCache's skipped layers stay dense: their work differs by layer.
  assert not kvjax.methods.get("mpcache", skip_layers=1).layerwise_prefill


# KIVI whose budget of 10 quantizes 8 slots (kivi's TINY_ARGS keep all 10 in the residual
# window), over SnapKV and over PyramidKV.
QUANTIZING = "kivi:group_size=4:residual=2+snapkv"
QUANTIZING_PYRAMID = "kivi:group_size=4:residual=2+pyramidkv:window=4"
# The layerwise methods that compact by the default top-k (the merging ones do not), and
# those that rank as it does, then store their own way (KIVI over one of them, SentenceKV,
# MPCache: `compact_ranked` and `ranked_cut`).
RANKING = ["expected_attention", "h2o", "knorm", "lazy_eviction", "mpcache", "per_layer",
           "pyramidkv", "scissorhands", "sentencekv", "sinks_window", "snapkv",
           "streaming_llm", "tova", "pyramidkv:window=4", "per_layer:weights=1,2,3+knorm",
           "sinks_window:window=2+h2o",
           "kivi+snapkv", "kivi+pyramidkv", QUANTIZING, QUANTIZING_PYRAMID]
# Layer budgets that differ (the rest give every layer one budget).
DIFFERING = ["pyramidkv:window=4", "per_layer:weights=1,2,3+knorm",
             QUANTIZING_PYRAMID]


# Layer budgets settled from the whole context by `finalize` (every token kept until then),
# data dependent: CAKE's differ by layer whatever the prefill's plan.
SETTLED_AFTER = ["cake", "d2o"]


# Quantizers' groups fit the tiny head_dim of 16; their residual leaves groups to quantize.
# SentenceKV's sentence ends are token ids the tiny prompts hold; its protection fits.
TINY_ARGS = {"gear": dict(group_size=16, residual=16),
             "kivi": dict(bits=2, group_size=16, residual=16),
             "sentencekv": dict(boundary_ids=(3, 7, 11, 13), start_budget=2, recent_budget=2,
                                window=4)}


@pytest.mark.parametrize("chunk_size", [None, 16])
@pytest.mark.parametrize("name", LAYERWISE + ["kivi+snapkv", "think+knorm", "kivi+pyramidkv",
                                              "mikv+snapkv", "adakv+h2o", "pyramidkv:window=4",
                                              "per_layer:weights=1,2,3+knorm",
                                              "sinks_window:window=2+h2o", QUANTIZING,
                                              QUANTIZING_PYRAMID])
def test_compressing_layer_by_layer_equals_one_program(name, chunk_size, monkeypatch):
  """A compressing prefill of a layerwise method runs one compiled layer for every layer
  and gives exactly the one program's logits and cache (one chunk, and chunked), also
  when its layers' budgets differ (PyramidKV with a window that leaves room to rank)."""
  model = tiny_model(seed=3, num_layers=3)
  prompts = random_prompts([29, 12, 32], seed=5)
  tokens, mask = inputs.left_pad(prompts, 0, 32)
  storage, _, press = name.partition("+")
  method = kvjax.methods.get(storage, **TINY_ARGS.get(storage, {}),
                             **({"press": press} if press else {}))
  steps = engine.CompiledSteps()
  got = context.prefill(model, tokens, mask, method, keep=10, room=4, chunk_size=chunk_size,
                        steps=steps)
  names = [key[0] for key in steps._executables]
  if name in (QUANTIZING, QUANTIZING_PYRAMID):
    assert any(int(layer.end) > 0 for layer in got.cache.layers), "nothing quantized"
  if name not in SETTLED_AFTER:
    assert (len(set(got.budgets)) > 1) == (name in DIFFERING), got.budgets
  # A method compacting by the default top-k ranks at a rounded budget, then cuts.
  ranks = method.compacts_ranked
  assert ranks == (name in RANKING), name
  assert ("first_slots" in names) == ranks
  if name in DIFFERING and chunk_size is not None:
    # Layers of different sizes after the first chunk: the second runs as one program.
    assert names.count("compress_layer") == 1 and "prefill" in names, names
  else:
    # One compiled layer per chunk shape (the second chunk sees a compressed cache).
    assert names.count("compress_layer") == (1 if chunk_size is None else 2), names
    assert "prefill" not in names
  monkeypatch.setattr(engine, "_layer_plan", lambda *args: None)
  one = engine.CompiledSteps()
  want = context.prefill(model, tokens, mask, method, keep=10, room=4, chunk_size=chunk_size,
                         steps=one)
  assert "compress_layer" not in [key[0] for key in one._executables]
  _assert_same((got.logits, got.cache), (want.logits, want.cache), exact=True)
  assert got.budgets == want.budgets


# Protection that fits every budget below (else `fitted` makes each budget another method).
@pytest.mark.parametrize("name,args", [("h2o", {}), ("snapkv", dict(window=4)),
                                       ("lazy_eviction", dict(recent=4))])
def test_budgets_that_round_alike_share_one_compiled_layer(name, args, monkeypatch):
  """Prompts whose budgets round to one `RANK_MULTIPLE` (another prompt length in a
  bucket) compact by one compiled layer, each with its own budget traced, and keep what
  the one program with the budget compiled in keeps."""
  monkeypatch.setattr(engine, "RANK_MULTIPLE", 8)
  model = tiny_model(seed=3, num_layers=3)
  tokens, mask = inputs.left_pad(random_prompts([29, 12, 32], seed=5), 0, 32)
  method = kvjax.methods.get(name, **args)
  steps = engine.CompiledSteps()
  for keep in (9, 12, 16):   # all ranked at 16 of 32 candidates
    got = context.prefill(model, tokens, mask, method, keep=keep, room=0, steps=steps)
    assert got.budgets == (keep,) * 3
    assert [layer.capacity for layer in got.cache.layers] == [keep] * 3
    with monkeypatch.context() as one_program:
      one_program.setattr(engine, "_layer_plan", lambda *args: None)
      want = context.prefill(model, tokens, mask, method, keep=keep, room=0,
                             steps=engine.CompiledSteps())
    _assert_same((got.logits, got.cache), (want.logits, want.cache), exact=True)
  names = [key[0] for key in steps._executables]
  assert names.count("compress_layer") == 1, names
  assert names.count("first_slots") == 3, names   # the cut is per budget (a copy)


@pytest.mark.parametrize("chunk_size", [None, 8])
@pytest.mark.parametrize("spec", ["cake:window=4", "cake", "d2o", "quest:page_size=4"])
def test_a_prefill_that_reads_no_budget_compiles_once_for_every_budget(spec, chunk_size,
                                                                       monkeypatch):
  """CAKE, D2O and Quest keep every token until `finalize` (`Method.budget_free_prefill`):
  contexts compressed to three budgets (other prompt lengths at one ratio) share the
  compiled prefill of one, and keep exactly what the prefill compiled with each budget
  keeps, chunked too, and where `fitted` shrinks CAKE's 32-token window (three forms,
  compiled apart) or CAKE evicts between chunks (caches of each budget's shapes)."""
  kv_cache.forget_capacities()
  model = tiny_model(seed=3, num_layers=3)
  tokens, mask = inputs.left_pad(random_prompts([29, 12, 32], seed=5), 0, 32)
  method = kvjax.methods.get(spec)
  steps = engine.CompiledSteps()
  prefills = lambda compiled: [key[0] for key in compiled._executables
                               if key[0] in ("compress_layer", "prefill")]
  for keep in (12, 16, 20):
    got = context.prefill(model, tokens, mask, method, keep=keep, room=4,
                          chunk_size=chunk_size, steps=steps)
    with monkeypatch.context() as budgeted:
      budgeted.setattr(type(method), "budget_free_prefill", lambda self: None)
      own = engine.CompiledSteps()
      want = context.prefill(model, tokens, mask, method, keep=keep, room=4,
                             chunk_size=chunk_size, steps=own)
    _assert_same((got.logits, got.cache), (want.logits, want.cache), exact=True)
    assert got.budgets == want.budgets and got.method_stats == want.method_stats
  shared = spec != "cake" and not (spec.startswith("cake") and chunk_size)
  assert (len(prefills(steps)) == len(prefills(own))) == shared, prefills(steps)
  if spec != "quest:page_size=4":   # Quest's first layers stay dense: one program
    assert "compress_layer" in prefills(own)


@dataclasses.dataclass(frozen=True)
class _D2OChild(kvjax.methods.D2O):
  """A subclass that says nothing: its compact may read the budget."""


@dataclasses.dataclass(frozen=True)
class _RankingFree(kvjax.methods.SnapKV):
  def budget_free_prefill(self):
    return self


def test_a_budget_free_prefill_is_declared_by_each_class_and_never_ranks():
  assert kvjax.methods.D2O(keep=8).budget_free_prefill() == kvjax.methods.D2O()
  assert _D2OChild(keep=8).budget_free_prefill() is None      # not inherited
  plan = CompressionPlan(_D2OChild(keep=8), budgets=(8, 8))
  assert engine._budget_free(plan) is plan
  # An unfitted Quest compiles its budget's pages in: `finalize` reads them from its layers.
  assert kvjax.methods.Quest().budget_free_prefill() is None
  assert kvjax.methods.Quest(keep=40).budget_free_prefill() == kvjax.methods.Quest()
  with pytest.raises(TypeError, match="ranking"):   # it would rank at a budget of 0
    engine._budget_free(CompressionPlan(_RankingFree(), budgets=(8, 8)))


def test_a_budget_is_compiled_in_where_it_cannot_be_traced(monkeypatch):
  h2o = kvjax.methods.get("h2o", recent_ratio=0.3)   # 95 x 0.3 rounds otherwise in float32
  ranked = engine._layer_plan(CompressionPlan(h2o, budgets=(96, 96)), 200)
  assert isinstance(ranked, RankedLayer) and ranked.budgets == (128,)
  static = engine._layer_plan(CompressionPlan(h2o, budgets=(95, 95)), 200)
  assert type(static) is CompressionPlan and static.budgets == (95,)
  # Rounded up, yet below the candidates (a layer ranks fewer slots than it has).
  near = engine._layer_plan(CompressionPlan(h2o, budgets=(96, 96)), 100)
  assert near.budgets == (99,)
  # Every candidate kept: nothing to rank (compact pads).
  assert type(engine._layer_plan(CompressionPlan(h2o, budgets=(96, 96)), 96)) is \
      CompressionPlan
  # End to end: H2O at 0.3 with 95 slots (compiled in) and 96 (traced) keeps what the one
  # program keeps.
  monkeypatch.setattr(engine, "RANK_MULTIPLE", 8)
  model = tiny_model(seed=3, num_layers=2)
  tokens, mask = inputs.left_pad(random_prompts([150, 131], seed=6), 0, 160)
  for keep, ranks in ((95, False), (96, True)):
    steps = engine.CompiledSteps()
    got = context.prefill(model, tokens, mask, h2o, keep=keep, room=0, steps=steps)
    assert ("first_slots" in [key[0] for key in steps._executables]) == ranks
    with monkeypatch.context() as one_program:
      one_program.setattr(engine, "_layer_plan", lambda *args: None)
      want = context.prefill(model, tokens, mask, h2o, keep=keep, room=0,
                             steps=engine.CompiledSteps())
    _assert_same((got.logits, got.cache), (want.logits, want.cache), exact=True)
  # KVCrush cuts its tiers on the host: were it layerwise, it would not rank traced.
  crush = kvjax.methods.get("kvcrush", press="snapkv")
  assert not crush.traces_budget(96)


@dataclasses.dataclass(frozen=True)
class _ScoredByState(kvjax.methods.base.Method):
  """Scores are the candidates' state: priorities set by the test, the state kept too."""
  name: ClassVar[str] = "scored_by_state"

  def score(self, x):
    return x.slot_state


def test_ranking_once_keeps_what_compacting_to_each_budget_keeps():
  """`compact_ranked` at a largest budget, cut to `keep`, equals `compact(keep)` leaf by
  leaf, for every keep from 1 to the largest: few distinct scores (ties everywhere),
  protected (+inf) slots, and left padding (empty slots, -inf) up to a whole row."""
  rng = np.random.default_rng(0)
  b, k, s, d = 3, 2, 24, 4
  method = _ScoredByState()
  for trial in range(4):
    scores = rng.integers(0, 3, (b, k, s)).astype(np.float32)
    scores[rng.random((b, k, s)) < 0.2] = np.inf
    positions = np.broadcast_to(np.arange(s, dtype=np.int32), (b, k, s)).copy()
    for row, pad in enumerate([0, int(rng.integers(1, s)), s if trial == 0 else 5]):
      positions[row, :, :pad] = -1
    cand = kvjax.cache.kv_cache.LayerCache(
        keys=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.float32),
        values=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.float32),
        positions=jnp.asarray(positions), end=jnp.int32(s), state=jnp.asarray(scores))
    x = kvjax.methods.base.LayerInputs(
        config=None, layer=0, queries=None, raw_queries=None, query_positions=None,
        keys=cand.keys, values=cand.values, key_positions=cand.positions,
        lengths=jnp.full((b,), s, jnp.int32), slot_state=cand.state)
    largest = 9 + trial
    ranked = jax.jit(lambda keep: method.compact_ranked(cand, x, largest, keep))
    for keep in range(1, largest + 1):
      got = ranked(jnp.int32(keep))   # traced, as the engine passes it
      # Past `keep` the slots read as empty before the cut.
      assert (np.asarray(got.positions)[..., keep:] == -1).all()
      _assert_same(got.first_slots(keep), method.compact(cand, x, keep), exact=True)


@dataclasses.dataclass(frozen=True)
class _KnormThenLayerZero(kvjax.methods.Knorm):
  """Knorm by layer, then a cache-wide step: later layers drop what layer 0 did not keep."""
  name: ClassVar[str] = "knorm_then_layer_zero"
  layerwise_prefill: ClassVar[bool] = True

  def cache_step(self, layers, lengths):
    first = layers[0].positions
    return (layers[0],) + tuple(
        layer.replace(positions=jnp.where(
            (layer.positions[..., :, None] == first[..., None, :]).any(-1),
            layer.positions, -1))
        for layer in layers[1:])


def test_compressing_layer_by_layer_keeps_the_cache_wide_step(monkeypatch):
  model = tiny_model(seed=3, num_layers=3)
  tokens, mask = inputs.left_pad(random_prompts([29, 12, 32], seed=5), 0, 32)
  steps = engine.CompiledSteps()
  got = context.prefill(model, tokens, mask, _KnormThenLayerZero(), keep=10, room=0,
                        steps=steps)
  assert "compress_layer" in [key[0] for key in steps._executables]
  plain = context.prefill(model, tokens, mask, kvjax.methods.Knorm(), keep=10, room=0,
                          steps=steps)
  dropped = (np.asarray(got.cache.layers[2].positions) == -1).sum()
  assert dropped > (np.asarray(plain.cache.layers[2].positions) == -1).sum()
  monkeypatch.setattr(engine, "_layer_plan", lambda *args: None)
  want = context.prefill(model, tokens, mask, _KnormThenLayerZero(), keep=10, room=0,
                         steps=engine.CompiledSteps())
  _assert_same((got.logits, got.cache), (want.logits, want.cache), exact=True)
