"""LoCoCo: the fusion against numpy, the chunked memory loop, training, checkpoints."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import training_runs
from kvjax import calibration, training
from kvjax.cache import init_cache
from kvjax.errors import KvjaxError, MethodError
from kvjax.generation import context as context_lib
from kvjax.generation import inputs
from kvjax.methods import base, lococo
from kvjax.methods.lococo import Compressors, LoCoCo
from kvjax.model import transformer
from kvjax.training import data as data_lib
from kvjax.training import lococo as lococo_training
from tests.tiny import random_prompts, tiny_model

KERNEL = 5


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=1)


def _compressors(config, fused, seed=0, kernel=KERNEL, mix=0.5):
  params = lococo.init_compressors(config, fused, kernel, jax.random.key(seed), mix=mix)
  return Compressors({k: np.asarray(v) for k, v in params.items()})


# ----------------------------------------------------------------- numpy restatements

def np_conv1d_same(x, weight, bias):
  """torch Conv1d(padding=(k - 1) // 2) of x [C, m] by weight [O, C, k] -> [O, m]."""
  out_channels, _, k = weight.shape
  m = x.shape[1]
  pad = (k - 1) // 2
  padded = np.pad(x, ((0, 0), (pad, pad)))
  out = np.zeros((out_channels, m))
  for o in range(out_channels):
    for t in range(m):
      out[o, t] = np.sum(weight[o] * padded[:, t:t + k]) + bias[o]
  return out


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_fusion(keys, values, hh, weight, bias, mix, fused):
  """The code's `memory_saver` fusion of one head's remaining tokens keys [m, D], values
  [m, Dv], hh [m]: (W [M_c, m], residual indices in order)."""
  x = np.concatenate([keys, values], -1).T                                 # [C, m]
  learned = np_softmax(np.maximum(np_conv1d_same(x, weight, bias), 0.0))
  residual = np.sort(np.argsort(-hh, kind="stable")[:fused])
  one_hot = np.zeros((fused, len(hh)))
  one_hot[np.arange(fused), residual] = 1.0
  return (1 - mix) * one_hot + mix * learned, residual


def np_memory_saver(keys, values, positions, hh, budget, fused, local, weight, bias, mix):
  """The code's memory_saver.forward on one head's cache (real slots, in slot order):
  the heavy hitters (top by hh before the last `local` slots, plus those) in slot order,
  then the fused slots; (keys, values, positions), a fused slot at its residual's."""
  s, heavy = len(hh), budget - fused
  chosen = np.zeros(s, bool)
  chosen[np.argsort(-hh[:s - local], kind="stable")[:heavy - local]] = True
  chosen[s - local:] = True
  kept, rest = np.flatnonzero(chosen), np.flatnonzero(~chosen)
  w, residual = np_fusion(keys[rest], values[rest], hh[rest], weight, bias, mix, fused)
  return (np.concatenate([keys[kept], w @ keys[rest]]),
          np.concatenate([values[kept], w @ values[rest]]),
          np.concatenate([positions[kept], positions[rest][residual]]))


def test_fusion_weights_match_numpy():
  """W = (1 - lambda) R_w + lambda softmax_tokens(ReLU(conv1d_same(concat(K, V)))): the
  conv with same padding, the softmax over tokens, the residual one-hot rows (top M_c by hh
  in slot order) and the mix, per (row, head), against a loop restatement."""
  rng = np.random.default_rng(0)
  b, k, m, d, dv, fused = 2, 2, 13, 4, 8, 5
  keys, values = rng.normal(size=(b, k, m, d)), rng.normal(size=(b, k, m, dv))
  hh = rng.uniform(size=(b, k, m))
  compressor = {"conv_weight": rng.normal(size=(fused, d + dv, KERNEL)) * 0.3,
                "conv_bias": rng.normal(size=(fused,)), "mix": np.float64(0.3)}
  as32 = lambda a: jnp.asarray(a, jnp.float32)
  w, residual = lococo.fusion_weights({n: as32(v) for n, v in compressor.items()},
                                      as32(keys), as32(values), as32(hh),
                                      jnp.ones((b, k, m), bool))
  for row in range(b):
    for head in range(k):
      want_w, want_res = np_fusion(keys[row, head], values[row, head], hh[row, head],
                                   compressor["conv_weight"], compressor["conv_bias"], 0.3,
                                   fused)
      np.testing.assert_array_equal(np.asarray(residual[row, head]), want_res)
      np.testing.assert_allclose(np.asarray(w[row, head]), want_w, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(np.asarray(w[row, head]).sum(-1), 1.0, rtol=1e-5)


def test_compress_memory_matches_the_codes_memory_saver():
  """Rows: all real; empty slots among the candidates (left padding kept in the memory);
  few enough real slots to fit (kept whole). Slot order is not position order, and
  `local` keeps the last slots."""
  rng = np.random.default_rng(1)
  b, k, s, d, dv = 3, 2, 20, 4, 8
  budget, fused, local = 10, 4, 2
  keys, values = rng.normal(size=(b, k, s, d)), rng.normal(size=(b, k, s, dv))
  hh = rng.uniform(size=(b, k, s))
  positions = np.stack([rng.permutation(40)[:s] for _ in range(b)])[:, None].repeat(k, 1)
  positions[1, :, [0, 1, 2, 3, 9]] = -1          # 15 real candidates: compressed
  positions[2, :, 8:] = -1                        # 8 real: kept whole
  compressor = {"conv_weight": rng.normal(size=(fused, d + dv, KERNEL)),
                "conv_bias": rng.normal(size=(fused,)), "mix": np.float64(0.6)}
  as32 = lambda a: jnp.asarray(a, jnp.float32)
  got = lococo.compress_memory({n: as32(v) for n, v in compressor.items()}, as32(keys),
                               as32(values), jnp.asarray(positions, jnp.int32), as32(hh),
                               budget, fused, local)
  got_keys, got_values, got_positions = (np.asarray(a) for a in got)
  assert got_keys.shape == (b, k, budget, d) and got_values.shape == (b, k, budget, dv)
  for row in range(b):
    for head in range(k):
      real = positions[row, head] >= 0
      if real.sum() <= budget:
        want = positions[row, head][real]
        assert got_positions[row, head].tolist() == want.tolist() + [-1] * (budget - len(want))
        np.testing.assert_allclose(got_keys[row, head, :len(want)], keys[row, head][real],
                                   rtol=1e-6)
        continue
      want_k, want_v, want_p = np_memory_saver(
          keys[row, head][real], values[row, head][real], positions[row, head][real],
          hh[row, head][real], budget, fused, local, compressor["conv_weight"],
          compressor["conv_bias"], 0.6)
      assert got_positions[row, head].tolist() == want_p.tolist(), (row, head)
      np.testing.assert_allclose(got_keys[row, head], want_k, rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(got_values[row, head], want_v, rtol=1e-4, atol=1e-4)


def test_heavy_hitter_scores_sum_each_query_group():
  rng = np.random.default_rng(2)
  sums = rng.uniform(size=(2, 4, 9)).astype(np.float32)
  x = base.LayerInputs(config=None, layer=0, queries=None, raw_queries=None,
                       query_positions=None, keys=jnp.zeros((2, 2, 9, 4)), values=None,
                       key_positions=None, lengths=None, column_sums=jnp.asarray(sums))
  got = LoCoCo(hh_keep_rate=0.5).heavy_hitter_scores(x)
  np.testing.assert_allclose(np.asarray(got), sums.reshape(2, 2, 2, 9).sum(2), rtol=1e-6)


# ----------------------------------------------------------------- the chunked memory loop

def official_memory(score, n, chunk_ends, budget, fused, local):
  """Positions of one head's memory, in slot order, after the code's loop over chunks
  ending at `chunk_ends` (each chunk joins the memory; when more than `budget`, the heavy
  hitters by `score` of each slot's position stay and the rest fuse into `fused` slots,
  each standing at its residual token's position)."""
  memory, start = [], 0
  heavy = budget - fused
  for end in chunk_ends:
    cand = memory + list(range(start, end))
    start = end
    if len(cand) <= budget:
      memory = cand
      continue
    hh = np.array([score[p] for p in cand])
    s = len(cand)
    chosen = np.zeros(s, bool)
    chosen[np.argsort(-hh[:s - local], kind="stable")[:heavy - local]] = True
    chosen[s - local:] = True
    rest = np.flatnonzero(~chosen)
    residual = np.sort(rest[np.argsort(-hh[rest], kind="stable")[:fused]])
    memory = [cand[i] for i in np.flatnonzero(chosen)] + [cand[i] for i in residual]
  return memory


@dataclasses.dataclass(frozen=True)
class TableLoCoCo(LoCoCo):
  """LoCoCo whose heavy-hitter score of a slot is a seeded random table [B, L, K, width]
  at the slot's position (fused slots: their residual's), instead of attention."""
  table_seed: int = 0

  def table(self, rows, width):
    return np.random.default_rng(self.table_seed).uniform(size=(rows, 2, 2, width))

  def context_params(self, tokenizer, tokens, mask):
    return {**super().context_params(tokenizer, tokens, mask),
            "table": self.table(*tokens.shape).astype(np.float32)}

  def heavy_hitter_scores(self, x):
    table = x.params["table"][:, x.layer]                                 # [B, K, W]
    return jnp.take_along_axis(table, jnp.clip(x.key_positions, 0, table.shape[-1] - 1),
                               axis=-1)


def _prefill(model, method, rows, keep, chunk):
  width = -(-max(len(r) for r in rows) // chunk) * chunk
  tokens, mask = inputs.left_pad(rows, 0, width)
  return context_lib.prefill(model, tokens, mask, method, keep, room=0,
                             chunk_size=chunk), width


@pytest.mark.parametrize("lengths, chunk, budget, rate, local", [
    ((96,), 16, 24, 0.5, 0),      # the code's defaults (local_len 0), M_c = 12
    ((96, 61), 16, 20, 0.6, 3),   # left padding (kept in the memory, then compressed), local
    ((50,), 8, 12, 0.25, 1),      # most slots fused
])
def test_kept_and_fused_sets_follow_the_codes_loop(model, lengths, chunk, budget, rate,
                                                   local):
  fused = lococo.fused_slots(budget, rate)
  method = TableLoCoCo(compressors=_compressors(model.config, fused), hh_keep_rate=rate,
                       local=local, table_seed=4)
  rows = random_prompts(lengths, seed=3)
  pre, width = _prefill(model, method, rows, budget, chunk)
  table = method.table(len(rows), width)
  for layer_index, layer in enumerate(pre.cache.layers):
    positions = np.asarray(layer.positions)
    assert positions.shape[-1] == budget
    for r, n in enumerate(lengths):
      pad = width - n
      ends = [e - pad for e in range(chunk, width + 1, chunk) if e - pad > 0]
      for head in range(2):
        want = official_memory(table[r, layer_index, head], n, ends, budget, fused, local)
        got = positions[r, head]
        assert got[got >= 0].tolist() == want, (r, layer_index, head)


def test_the_cache_holds_exactly_the_budget(model):
  """The cache's arrays hold M slots per layer and KV head (bytes measured from them), the
  fused keys differ from every context key, and a context within the budget keeps all."""
  cfg = model.config
  budget, fused = 16, 8
  method = LoCoCo(compressors=_compressors(cfg, fused))
  out = kvjax.generate(model, random_prompts([128], seed=5), method=method, budget=budget,
                       prefill_chunk_size=32, max_new_tokens=3)
  stats = out.stats
  assert stats["kept_tokens_per_layer"] == [budget] * cfg.num_layers
  # keys and values (float32) and positions (int32) per slot, each layer's int32 end, the
  # row's int32 length.
  per_slot = cfg.num_kv_heads * (2 * cfg.head_dim * 4 + 4)
  assert stats["context_cache_bytes"] == cfg.num_layers * (budget * per_slot + 4) + 4
  ratio = stats["context_cache_bytes"] / stats["full_context_cache_bytes"]
  assert 0.12 < ratio < 0.13, ratio     # 16 of 128 slots
  pre, _ = _prefill(model, method, random_prompts([128], seed=5), budget, 32)
  layer = pre.cache.layers[0]
  assert layer.capacity == budget and (np.asarray(layer.positions) >= 0).all()
  full, _ = _prefill(model, kvjax.methods.get("full"), random_prompts([128], seed=5), None, 32)
  context_keys = np.asarray(full.cache.layers[0].keys)[0]                # [K, 128, D]
  fused_keys = np.asarray(layer.keys)[0, :, budget - fused:]
  for head in range(cfg.num_kv_heads):
    gaps = np.abs(fused_keys[head][:, None] - context_keys[head][None]).max(-1)
    assert gaps.min() > 1e-3, "fused slots are mixtures, not copies"


def test_budget_at_least_the_prompt_equals_the_full_cache(model):
  prompts = random_prompts([40, 33], seed=9)
  full = kvjax.generate(model, prompts, max_new_tokens=5)
  method = LoCoCo(compressors=_compressors(model.config, 8))
  for kwargs in ({"budget": 40}, {"budget": 64, "prefill_chunk_size": 16}):
    out = kvjax.generate(model, prompts, method=method, max_new_tokens=5, **kwargs)
    assert out.token_ids == full.token_ids, kwargs


def test_a_budget_the_weights_cannot_fill_is_refused(model):
  method = LoCoCo(compressors=_compressors(model.config, 8))     # M_c = 8: budget 16 at 0.5
  prompt = random_prompts([64], seed=1)
  with pytest.raises(MethodError, match=r"fuse into 8 slots.*budget=20 at hh_keep_rate=0.5 "
                                        r"gives 10 fused slots.*use budget in \[16, 17\]"):
    kvjax.generate(model, prompt, method=method, budget=20, max_new_tokens=2)
  with pytest.raises(MethodError, match="fuse into 8 slots.*give a budget"):
    kvjax.generate(model, prompt, method=method, compression_ratio=0.5, max_new_tokens=2)
  with pytest.raises(MethodError, match=r"kernel_size=7, but the weights were trained with "
                                        r"kernel_size=5"):
    kvjax.generate(model, prompt, method=LoCoCo(compressors=method.compressors,
                                                kernel_size=7), budget=16, max_new_tokens=2)
  with pytest.raises(MethodError, match="local=9 exceeds the 8 heavy-hitter slots"):
    kvjax.generate(model, prompt, method=LoCoCo(compressors=method.compressors, local=9),
                   budget=16, max_new_tokens=2)
  # Another rate that leaves 8 to fuse is fine: 24 x 0.67 -> 16 heavy hitters, 8 fused.
  out = kvjax.generate(model, prompt, method=LoCoCo(compressors=method.compressors,
                                                    hh_keep_rate=0.67),
                       budget=24, max_new_tokens=2)
  assert out.stats["kept_tokens_per_layer"] == [24, 24]


# ----------------------------------------------------------------- training

SETTINGS = lococo_training.LoCoCoSettings(memory_size=16, block_size=16, kernel_size=KERNEL)


def _batch(seed=3, lengths=(64, 64)):
  tokens = np.zeros((len(lengths), max(lengths)), np.int32)
  mask = np.zeros(tokens.shape, bool)
  for row, prompt in enumerate(random_prompts(lengths, seed=seed)):
    tokens[row, :len(prompt)], mask[row, :len(prompt)] = prompt, True
  return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}


def test_gradients_reach_the_compressors_and_not_the_backbone(model):
  """4 chunks of 16 through a 16-slot memory, one row right-padded; conv weights at a
  smaller std so the softmax over tokens is not one-hot (its gradient then underflows)."""
  cfg = model.config
  params = lococo.init_compressors(cfg, SETTINGS.fused, KERNEL, jax.random.key(0),
                                   weight_std=0.05)
  batch = _batch(lengths=(64, 50))
  loss = lambda p, backbone: lococo_training.full_loss(p, backbone, batch, model.graphdef,
                                                       cfg, SETTINGS)[0]
  value, (grads, backbone_grads) = jax.value_and_grad(loss, argnums=(0, 1))(
      params, model.params)
  assert np.isfinite(float(value)) and float(value) > 0
  for name, g in grads.items():
    g = np.asarray(g)
    assert np.isfinite(g).all() and (np.abs(g) > 0).all(axis=tuple(range(1, g.ndim))).all(), \
        name    # every layer's compressor gets a gradient
  for g in jax.tree_util.tree_leaves(backbone_grads):
    assert not np.asarray(g).any()


def test_the_loss_is_the_mean_of_each_chunks_next_token_loss(model):
  """Per chunk, token i predicts i + 1 inside the chunk and the loss averages the chunks:
  with a memory larger than the text, the full model's chunk losses."""
  cfg = model.config
  batch = _batch(lengths=(64,))
  big = dataclasses.replace(SETTINGS, memory_size=128)
  params = lococo.init_compressors(cfg, big.fused, KERNEL, jax.random.key(0))
  loss, metrics = lococo_training.full_loss(params, model.params, batch, model.graphdef, cfg,
                                            big)
  logits, _ = jax.jit(lambda t, m: transformer.forward(
      model.graphdef, model.params, t, m, init_cache(cfg, 1, 64), "all"))(
          batch["tokens"], batch["mask"])
  logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)[0]
  tokens = np.asarray(batch["tokens"])[0]
  chunk_means = [np.mean([-logp[i, tokens[i + 1]] for i in range(c, c + 15)])
                 for c in range(0, 64, 16)]
  np.testing.assert_allclose(float(loss), np.mean(chunk_means), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["first_chunk_loss"]), chunk_means[0], rtol=1e-4)
  np.testing.assert_allclose(float(metrics["memory_chunks_loss"]), np.mean(chunk_means[1:]),
                             rtol=1e-4)


def test_a_tiny_run_lowers_the_loss_on_a_fixed_batch(model, tmp_path):
  data = data_lib.DataSettings(sequence_length=64, answer_tokens=8, sources=("random",))
  task = lococo_training.task(model, SETTINGS, data)
  fixed = {name: np.asarray(v) for name, v in _batch(seed=7).items()}
  task = dataclasses.replace(task, batch=lambda position, count: fixed)
  optimizer = training.OptimizerSettings(learning_rate=0.05, warmup_steps=0, total_steps=25,
                                         schedule="constant")
  loop = training.LoopSettings(batch_size=1, checkpoint_every=25, progress_bar=False)
  result = training.train(task, str(tmp_path / "run"), 25, optimizer, loop)
  memory = [record["memory_chunks_loss"] for record in result.history]
  first = [record["first_chunk_loss"] for record in result.history]
  assert first[0] == pytest.approx(first[-1], rel=1e-6)   # no memory, nothing to learn
  assert np.mean(memory[-5:]) < memory[0] - 0.02, memory
  assert result.history[-1]["mix"] != pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"memory_size": 1}, r"memory_size=1 must be an integer >= 2"),
    ({"hh_keep_rate": 1.0}, r"hh_keep_rate=1.0 must be"),
    ({"kernel_size": 4}, "kernel_size=4 must be odd"),
    ({"memory_size": 8, "hh_keep_rate": 0.95}, "leaves no slot to fuse into"),
    ({"memory_size": 8, "local": 5}, "local=5 exceeds the 4 heavy-hitter slots"),
])
def test_bad_training_settings(kwargs, match):
  with pytest.raises(KvjaxError, match=match):
    lococo_training.LoCoCoSettings(**kwargs)


# ----------------------------------------------------------------- checkpoints and models

def _save_run(tmp_path, model, step=2):
  """A run directory with one step of LoCoCo compressors for `model`, as training writes."""
  task = lococo_training.task(model, SETTINGS, data_lib.DataSettings(
      sequence_length=64, answer_tokens=8, sources=("random",)))
  return training_runs.save_initial_step(task, tmp_path / "run", step)


def test_from_checkpoint_loads_the_trained_compressors(model, tmp_path):
  run, params = _save_run(tmp_path, model)
  method = LoCoCo.from_checkpoint(run)
  assert method.checkpoint == str(run / "2")
  np.testing.assert_array_equal(method.weights()["conv_weight"],
                                np.asarray(params["conv_weight"]))
  assert method == kvjax.methods.get(f"lococo:checkpoint={run}")
  assert (method.keep_rate(), method.local_tokens()) == (0.5, 0)   # the run's
  loaded = training.load_method(run, model, method="lococo")
  out = kvjax.generate(model, random_prompts([48], seed=1), method=loaded, budget=16,
                       max_new_tokens=3)
  assert out.stats["kept_tokens_per_layer"] == [16, 16]
  with pytest.raises(MethodError, match="use budget=16"):   # the run's memory size
    kvjax.generate(model, random_prompts([48], seed=1), method=loaded, budget=24,
                   max_new_tokens=3)


def test_parameters_for_another_model_are_refused(model, tmp_path):
  run, _ = _save_run(tmp_path, model)
  method = LoCoCo.from_checkpoint(run)
  prompt = random_prompts([40], seed=1)
  deeper = tiny_model(seed=1, num_layers=3)
  with pytest.raises(MethodError, match=r"num_layers: trained for 2, this model has 3"):
    kvjax.generate(deeper, prompt, method=method, budget=16, max_new_tokens=2)
  other_weights = tiny_model(seed=2)
  with pytest.raises(MethodError, match="trained on weights with fingerprint"):
    training.load_method(run, other_weights, method="lococo")
  with pytest.raises(MethodError, match="fingerprint"):
    LoCoCo.from_checkpoint(run, fingerprint=calibration.model_fingerprint(other_weights))
  with pytest.raises(MethodError, match="trained on weights with fingerprint"):
    kvjax.generate(other_weights, prompt, method=f"lococo:checkpoint={run}", budget=16,
                   max_new_tokens=2)
  wider = tiny_model(seed=1, head_dim=8)
  wrong = _compressors(wider.config, 8)
  with pytest.raises(MethodError, match=r"conv_weight \(2, 8, 16, 5\).*needs conv_weight "
                                        r"\(2, fused, 32, odd kernel\)"):
    kvjax.generate(model, prompt, method=LoCoCo(compressors=wrong), budget=16,
                   max_new_tokens=2)


@pytest.mark.parametrize("kwargs, match", [
    ({"hh_keep_rate": 1.0}, r"hh_keep_rate=1.0 must be"),
    ({"kernel_size": 20}, "kernel_size=20 must be odd"),
    ({"local": -1}, r"local=-1 must be an integer >= 0"),
    ({"compressors": {"conv_weight": 1}}, "must be a Compressors"),
    ({"checkpoint": "/nonexistent/run"}, "no trained parameters at /nonexistent/run"),
])
def test_bad_hyperparameters(kwargs, match):
  with pytest.raises(MethodError, match=match):
    LoCoCo(**kwargs)


def test_without_weights_it_says_how_to_get_them(model):
  with pytest.raises(MethodError, match="no trained compressors"):
    kvjax.generate(model, random_prompts([20]), method="lococo", budget=8, max_new_tokens=2)
