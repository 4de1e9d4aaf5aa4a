"""Shard by name (kvjax.sharding): the rules' PartitionSpecs, parameters and caches placed on
8 emulated CPU devices, and sharded generate/score equal to the unsharded model's."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import kvjax
from kvjax import sharding
from kvjax.config import LatentAttention
from kvjax.generation import context, engine, episodes, inputs
from kvjax.methods import attention_gate, locret, lococo
from kvjax.methods.attention_gate import AttentionGate, GateWeights
from kvjax.methods.epicache import EpiCache
from kvjax.methods.lococo import Compressors, LoCoCo
from kvjax.methods.locret import Locret, RetainingHeads
from kvjax.cache.kv_cache import init_cache
from kvjax.model import abstract_params
from kvjax.sharding.params import path_name
from tiny import random_prompts, tiny_chat_model, tiny_config, tiny_model

# (hidden, heads, kv_heads, mlp, vocab) of the models kvjax loads, and tests/tiny.py's.
SMOLLM2 = dict(embed=576, heads=9, kv_heads=3, mlp=1536, vocab=49152)
QWEN = dict(embed=896, heads=14, kv_heads=2, mlp=4864, vocab=151936)
TINY = dict(embed=64, heads=4, kv_heads=2, mlp=128, vocab=256)
METHODS = {"full": (None, {}), "snapkv": ("snapkv", dict(compression_ratio=0.5)),
           "adakv": ("adakv", dict(compression_ratio=0.5)),
           "kivi": (kvjax.methods.get("kivi", bits=2, group_size=16, residual=16), {}),
           # Paging: 3 x 4 tokens stored of 30 and 41, their K/V in host memory.
           "sentencekv": (kvjax.methods.get("sentencekv", boundary_ids=(3, 7, 11, 13, 17),
                                            start_budget=1, recent_budget=1, window=2),
                          dict(budget=4))}


def _mesh(data, model):
  return sharding.make_mesh({"data": data, "model": model})


def _spec(leaf):
  return leaf[...].sharding.spec if hasattr(leaf, "get_value") else leaf.sharding.spec


# ------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_default_rules_shard_only_dimensions_the_mesh_axis_divides(devices):
  rules = sharding.ShardingRules()
  mesh = _mesh(1, devices)
  for dims in (SMOLLM2, QWEN, TINY):
    for name in ("heads", "kv_heads", "mlp", "vocab"):
      got = sharding.resolve(rules, mesh, ("embed", name), (dims["embed"], dims[name]))
      divides = devices > 1 and dims[name] % devices == 0
      assert got.spec == (P(None, "model") if divides else P()), (dims, name)
      assert bool(got.replicated) == (devices > 1 and not divides)
  # Batch goes over "data"; a dimension no rule names stays whole.
  rows = sharding.partition_spec(rules, _mesh(devices, 1), ("batch", "kv_heads", "slots"),
                                 (8, 3, 5))
  assert rows == (P("data") if devices > 1 else P())


def test_non_dividing_dimension_is_replicated_and_described():
  got = sharding.resolve(sharding.ShardingRules(), _mesh(2, 4),
                         ("batch", "kv_heads", "slots", "head_dim"), (4, 3, 16, 64))
  assert got.spec == P("data")
  assert got.replicated == (("kv_heads", 3, "model", 4, "does not divide"),)
  assert "kv_heads (3) replicated: does not divide model=4" in got.describe()
  # SmolLM2 on model=2: 9 query heads and 3 KV heads stay whole, the MLP and vocab shard.
  smol = sharding.resolve(sharding.ShardingRules(), _mesh(1, 2), ("heads", "head_dim", "embed"),
                          (9, 64, 576))
  assert smol.spec == P() and "heads (9) replicated" in smol.describe()


def test_rules_use_a_mesh_axis_once_and_reject_unknown_axes():
  rules = sharding.ShardingRules(embed="model")
  got = sharding.resolve(rules, _mesh(1, 4), ("embed", "heads", "head_dim"), (64, 4, 16))
  assert got.spec == P("model")
  assert got.replicated[0][:2] == ("heads", 4) and "already uses" in got.describe()
  with pytest.raises(sharding.ShardingError, match="'tensor'.*allowed"):
    sharding.ShardingRules(heads="tensor")
  with pytest.raises(sharding.ShardingError, match="shape"):
    sharding.resolve(rules, _mesh(1, 4), ("batch", "heads"), (4,))


def test_every_parameter_has_logical_axes_of_its_rank():
  configs = [tiny_config(), tiny_config(qkv_bias=True, tie_embeddings=False),
             tiny_config(qkv_bias=True, latent=LatentAttention(kv_rank=16, rope_dim=4,
                                                               query_rank=20)),
             tiny_config(qkv_bias=True, latent=LatentAttention(kv_rank=64, rope="rebuilt"))]
  names = set()
  for config in configs:
    _, params = abstract_params(config)   # shapes only
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      name = sharding.params.path_name(path)
      assert len(sharding.param_axes(name)) == leaf.ndim, name
      names.add(re.sub(r"^layers\.\d+\.", "", name))
  assert {"attn.q_down.kernel", "attn.q_up.bias", "attn.kv_down.bias", "attn.key_up.kernel",
          "attn.value_up.bias", "attn.k.bias", "lm_head.kernel"} <= names
  with pytest.raises(sharding.ShardingError, match="'layers.0.attn.gate.kernel'.*PARAM_AXES"):
    sharding.param_axes("layers.0.attn.gate.kernel")


# ------------------------------------------------------------------------- placement


@pytest.fixture(scope="module")
def model():
  return tiny_model(num_layers=1)   # one layer: half the compile time of each step


def test_shard_model_places_parameters_by_the_rules(model):
  sharded = sharding.shard_model(model, "data:2,model:4")
  assert sharded.placement.mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  layer = sharded.params["layers"][0]
  assert _spec(layer["attn"]["q"]["kernel"]) == P(None, "model")      # 4 heads / 4
  assert _spec(layer["attn"]["k"]["kernel"]) == P()                   # 2 KV heads: whole
  assert _spec(layer["attn"]["o"]["kernel"]) == P("model")
  assert _spec(layer["mlp"]["down"]["kernel"]) == P("model")
  assert _spec(sharded.params["embed"]["embedding"]) == P("model")
  assert _spec(layer["attn_norm"]["scale"]) == P()
  assert len(layer["attn"]["q"]["kernel"][...].sharding.device_set) == 8
  assert model.placement is None   # the loaded model itself is untouched
  two = sharding.shard_model(model, "model:2")
  assert _spec(two.params["layers"][0]["attn"]["k"]["kernel"]) == P(None, "model")
  text = sharding.describe(sharded)
  assert "kv_heads (2) replicated: does not divide model=4" in text and "cache.keys" in text


@pytest.mark.parametrize("name, key_field, want", [
    ("full", "keys", P("data", "model")), ("snapkv", "keys", P("data", "model")),
    ("adakv", "keys", P("data")),                       # flat: all heads' slots in one axis
    ("kivi", "key_codes", P("data", "model"))])
def test_caches_shard_like_the_keys_they_hold(model, name, key_field, want):
  sharded = sharding.shard_model(model, "data:2,model:2")
  method = kvjax.methods.get(METHODS[name][0] or "full") if name != "kivi" else METHODS[name][0]
  tokens, mask = inputs.left_pad(random_prompts([40, 33], seed=2), 0)
  pre = context.prefill(sharded, tokens, mask, method, None if name in ("full", "kivi") else 16,
                        room=8)
  key = lambda cache: (getattr(cache.layers[0].quantized, key_field) if name == "kivi"
                       else getattr(cache.layers[0], key_field))
  assert key(pre.cache).sharding.spec == want
  assert pre.cache.lengths.sharding.spec == P("data")
  # A decode step returns the cache where it found it.
  _, _, cache = engine.STEPS.decode(sharded, jnp.zeros((2,), jnp.int32), pre.cache,
                                    jax.random.key(0), 1.0, 1.0, True, plan=pre.decode_plan)
  assert key(cache).sharding.spec == want and len(key(cache).sharding.device_set) == 4


def test_load_places_a_saved_model_and_checks_the_mesh_first(model, tmp_path):
  from checkpoints_conversion import orbax_io
  path = orbax_io.save(model, tmp_path / "tiny")
  loaded = kvjax.load(path, mesh="data:2,model:4")
  assert _spec(loaded.params["layers"][0]["attn"]["q"]["kernel"]) == P(None, "model")
  assert kvjax.load(path).placement is None
  with pytest.raises(sharding.ShardingError, match="unknown axis 'tensor'"):
    kvjax.load(tmp_path / "does-not-exist", mesh="tensor:2")


def test_checkpoint_saved_on_one_mesh_restores_into_another_meshs_shards(model, tmp_path):
  from checkpoints_conversion import orbax_io
  tokens, mask = inputs.left_pad(random_prompts([12, 9], seed=6), 0)
  cache = lambda m: init_cache(m.config, 2, 16)
  want, _ = engine.STEPS.prefill(model, jnp.asarray(tokens), jnp.asarray(mask),
                                 cache(model))
  path = orbax_io.save(sharding.shard_model(model, "data:2,model:4"), tmp_path / "sharded")
  for spec in ("model:2", "data:8", "data:4,model:2"):
    placement = sharding.Placement(sharding.make_mesh(spec))
    # Restored straight into the shards the target mesh's rules give.
    restored = orbax_io.load(path, placement=placement)
    for path_, x in jax.tree_util.tree_flatten_with_path(restored.params)[0]:
      name = path_name(path_)
      assert x.sharding == placement.sharding(sharding.param_axes(name), x.shape), name
    loaded = kvjax.load(path, mesh=spec)
    got, _ = engine.STEPS.prefill(loaded, jnp.asarray(tokens), jnp.asarray(mask),
                                  cache(loaded))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------- sharded equals unsharded


@pytest.fixture(scope="module")
def unsharded_tokens(model):
  prompts = random_prompts([30, 41], seed=3)
  return prompts, {name: kvjax.generate(model, prompts, method=method, max_new_tokens=6,
                                        **kwargs).token_ids
                   for name, (method, kwargs) in METHODS.items()}


@pytest.mark.parametrize("mesh", ["data:2,model:4", "data:8", "model:2"])
@pytest.mark.parametrize("name", list(METHODS))
def test_sharded_generate_gives_the_unsharded_tokens(model, unsharded_tokens, mesh, name):
  prompts, want = unsharded_tokens
  sharded = sharding.shard_model(model, mesh)
  method, kwargs = METHODS[name]
  batch = prompts * (4 if mesh == "data:8" else 1)    # 8 rows for data:8
  got = kvjax.generate(sharded, batch, method=method, max_new_tokens=6, **kwargs).token_ids
  assert got == want[name] * (len(batch) // len(prompts))


# Every other family that has landed (merging, channels, mixed precision, prompt selection,
# trained selectors, quantization with a low-rank residual, cross-layer), one or two methods
# each, on the mesh that shards the sequence (model:4 does not divide 2 KV heads) and the one
# that shards the heads. Trained methods get random weights of the model's shapes.
def _family_methods(config):
  half = dict(compression_ratio=0.5)
  heads = locret.init_heads(config, 16, jax.random.key(0))
  return {
      "d2o": ("d2o", half), "kvmerger": ("kvmerger", half), "razor": ("razor", {}),
      "think": ("think", {}), "mikv": ("mikv", half), "zipvl": ("zipvl", {}),
      "specpc": ("specpc", half),
      "gear": (kvjax.methods.get("gear", group_size=16), {}),
      "locret": (Locret(heads=RetainingHeads({k: 50 * np.asarray(v) for k, v in heads.items()}),
                        stabilizers=8, local=4), half),
      "attention_gate": (AttentionGate(gates=GateWeights({
          k: np.asarray(v) for k, v in attention_gate.init_gates(
              config, 2, 8, 0.0, jax.random.key(1)).items()})), {}),
      "lococo": (LoCoCo(compressors=Compressors({k: np.asarray(v) for k, v in
                                                 lococo.init_compressors(
                                                     config, 8, 5, jax.random.key(2),
                                                     mix=0.5).items()})), dict(budget=16))}


FAMILIES = list(_family_methods(tiny_config(num_layers=1)))
CROSS_LAYER = {"minicache": ("minicache", {}), "xkv": ("xkv", {})}


@pytest.fixture(scope="module")
def two_layer_model():
  return tiny_model(num_layers=2)   # cross-layer methods pair or share adjacent layers


@pytest.mark.parametrize("mesh", ["data:2,model:4", "model:2"])
@pytest.mark.parametrize("name", FAMILIES + list(CROSS_LAYER))
def test_every_family_generates_the_unsharded_tokens_sharded(model, two_layer_model, mesh,
                                                             name, monkeypatch):
  if name in CROSS_LAYER:
    model, (method, kwargs) = two_layer_model, CROSS_LAYER[name]
  else:
    method, kwargs = _family_methods(model.config)[name]
  prompts = random_prompts([30, 41], seed=3)
  want = kvjax.generate(model, prompts, method=method, max_new_tokens=6, **kwargs)
  sharded = sharding.shard_model(model, mesh)
  prefilled = []
  prefill = context.prefill
  monkeypatch.setattr(context, "prefill", lambda *a, **k: prefilled.append(prefill(*a, **k))
                      or prefilled[-1])
  got = kvjax.generate(sharded, prompts, method=method, max_new_tokens=6, **kwargs)
  assert got.token_ids == want.token_ids
  assert got.stats["cache_bytes"] == want.stats["cache_bytes"]
  # The compressed cache came out of the prefill laid out as its layout's axes say, and
  # split over the mesh (not left whole on every device).
  cache = prefilled[0].cache
  leaves = jax.tree_util.tree_leaves(cache)
  rules = jax.tree_util.tree_leaves(sharded.placement.cache_shardings(cache))
  assert len(leaves) == len(rules)
  for leaf, rule in zip(leaves, rules):
    assert leaf.sharding.is_equivalent_to(rule, leaf.ndim), (leaf.shape, leaf.sharding, rule)
  assert any(not leaf.sharding.is_fully_replicated for leaf in leaves)


TEXT = " ".join(f"Fact {i}: the code word for item {i} is word{i}." for i in range(30))


@pytest.fixture(scope="module")
def chat(smollm2_tokenizer):
  return tiny_chat_model(smollm2_tokenizer, max_position_embeddings=2048)


@pytest.mark.parametrize("name", ["kvzip", "compresskv"])
def test_methods_that_prompt_the_model_with_text_run_sharded(chat, name):
  """KVzip's repeat prompt and CompressKV's needle calibration run on the sharded model."""
  prompts, questions = [TEXT, TEXT[:300]], ["Item 4?", "Item 2?"]
  kwargs = dict(questions=questions, method=name, compression_ratio=0.5, max_new_tokens=5)
  want = kvjax.generate(chat, prompts, **kwargs).token_ids
  assert kvjax.generate(sharding.shard_model(chat, "data:2,model:4"), prompts,
                        **kwargs).token_ids == want


def test_epicache_episodes_wait_sharded_in_host_memory(chat):
  method = EpiCache(block_size=64, medoids=2, window=3)
  question = "What is the code word for item 4?"
  want = episodes.answer(chat, episodes.prefill_episodes(chat, TEXT, method, budget=56),
                         question, max_new_tokens=4)
  sharded = sharding.shard_model(chat, "model:2")
  ep = episodes.prefill_episodes(sharded, TEXT, method, budget=56)
  keys = ep.prefilled[0].cache.layers[0].keys
  assert keys.sharding.spec == P(None, "model") and keys.sharding.memory_kind == "pinned_host"
  got = episodes.answer(sharded, ep, question, max_new_tokens=4)
  assert (got.episode, got.token_ids) == (want.episode, want.token_ids)


@pytest.mark.parametrize("method, kwargs", [(None, {}), ("snapkv", dict(compression_ratio=0.5))])
def test_sharded_score_equals_unsharded(model, method, kwargs):
  contexts = random_prompts([25, 31], seed=4)
  continuations = random_prompts([5, 3], seed=5)
  want = kvjax.score(model, contexts, continuations, method=method, **kwargs)
  got = kvjax.score(sharding.shard_model(model, "data:2,model:4"), contexts, continuations,
                    method=method, **kwargs)
  for a, b in zip(want, got):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_a_batch_the_data_axis_does_not_divide_is_refused(model):
  sharded = sharding.shard_model(model, "data:2,model:4")
  with pytest.raises(sharding.ShardingError, match="3 rows does not divide.*'data' axis of 2"):
    kvjax.generate(sharded, random_prompts([5, 6, 7]), max_new_tokens=2)
  with pytest.raises(sharding.ShardingError, match="1 rows does not divide"):
    kvjax.score(sharded, [1, 2, 3], [4])


# ------------------------------------------------------------------------- --mesh


@pytest.mark.parametrize("spec, words", [
    ("data:2,tensor:4", "unknown axis 'tensor'"), ("data:3", "needs 3 devices"),
    ("data:2,model:8", "needs 16 devices"), ("model:two", "'two'.*positive integer"),
    ("data:0", "positive integer"), ("data:2.5", "positive integer"),
    ("data:2,data:2", "given twice"), ("model4", "not axis:size"), ("", "empty")])
def test_mesh_spec_errors_name_the_bad_part(spec, words):
  with pytest.raises(sharding.ShardingError, match=words):
    sharding.parse_mesh_spec(spec, device_count=8)


def test_mesh_spec_sizes_and_smaller_meshes():
  assert sharding.parse_mesh_spec("model:4,data:2", 8) == {"data": 2, "model": 4}
  assert sharding.parse_mesh_spec("model:2", 8) == {"data": 1, "model": 2}
  mesh = sharding.make_mesh("model:2")
  assert dict(zip(mesh.axis_names, mesh.devices.shape)) == {"data": 1, "model": 2}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


def test_generate_script_runs_on_a_mesh(smollm2_tokenizer, tmp_path):
  from checkpoints_conversion import orbax_io
  from tests.test_training import ROOT, _env
  from tiny import tiny_chat_model
  chat = tiny_chat_model(smollm2_tokenizer)
  path = orbax_io.save(chat, tmp_path / "tiny")
  prompts = ["Hello there", "Second prompt"]
  want = kvjax.generate(chat, prompts, max_new_tokens=4, chat_template=False).token_ids
  out = tmp_path / "result.json"
  script = [sys.executable, str(ROOT / "scripts" / "generate.py"), f"--model={path}",
            *[f"--prompt={p}" for p in prompts], "--max_new_tokens=4", "--chat_template=off"]
  run = subprocess.run(script + ["--mesh=data:2,model:4", f"--json_out={out}"], env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert json.loads(out.read_text())["token_ids"] == want
  bad = subprocess.run(script + ["--mesh=data:3"], env=_env(), capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2 and "error: mesh spec 'data:3' needs 3 devices" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_training_on_a_sharded_model_matches_one_device(tmp_path, monkeypatch):
  """`scripts/train.py --mesh`: the frozen backbone sharded by the rules, the trainable
  parameters replicated, each micro-batch's rows split over the data axis (data
  parallel); the loss curve is the one-device run's (float tolerance)."""
  from kvjax import training
  from kvjax.training import data as data_lib
  from kvjax.training import locret as locret_training
  from kvjax.training import loop
  placed = []
  place = loop.place_batch
  monkeypatch.setattr(loop, "place_batch", lambda *a: placed.append(place(*a)) or placed[-1])
  model = tiny_model(seed=4)
  data = data_lib.DataSettings(sequence_length=32, answer_tokens=4, sources=("random",))
  optimizer = training.OptimizerSettings(learning_rate=1e-3, warmup_steps=0, total_steps=3,
                                         schedule="constant")
  curves = []
  settings = training.LoopSettings(batch_size=2, checkpoint_every=2, progress_bar=False)
  sharded = sharding.shard_model(model, _mesh(2, 2))
  for name, m in (("one", model), ("mesh", sharded), ("resumed", sharded)):
    task = locret_training.task(m, locret_training.LocretSettings(hidden=8), data)
    if name == "resumed":   # killed after step 2, restarted from its checkpoint
      training.train(task, tmp_path / name, 3, optimizer, settings, stop_after=2)
    result = training.train(task, tmp_path / name, 3, optimizer, settings)
    curves.append([h["loss"] for h in result.history])
  assert any("model" in tuple(_spec(leaf)) for leaf in jax.tree_util.tree_leaves(task.frozen))
  np.testing.assert_allclose(curves[1], curves[0], rtol=1e-5)
  np.testing.assert_allclose(curves[2], curves[0], rtol=1e-5)
  # 3 + 3 + 2 + 1 micro-batches placed (the restart recomputes only step 3).
  assert len(placed) == 9 and all(not hasattr(x, "sharding") for x in placed[0].values())
  for rows in placed[3:]:   # the sharded runs': 2 rows, one per data shard
    assert {_spec(x) for x in rows.values()} == {P(None, "data")}
  one_row = training.LoopSettings(batch_size=1, progress_bar=False)
  with pytest.raises(kvjax.KvjaxError, match="batch_size=1 does not divide.*'data' axis of 2"):
    training.train(task, tmp_path / "odd", 3, optimizer, one_row)
