"""Attention-Gate: the gate, in-context eviction in training, the loss, the kept cache."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kvjax
import training_runs
from kvjax import calibration, training
from kvjax.cache import init_cache
from kvjax.cache.kv_cache import FlatLayerCache
from kvjax.errors import KvjaxError, MethodError
from kvjax.generation import context as context_lib
from kvjax.generation import inputs
from kvjax.methods import attention_gate as gate_method
from kvjax.methods.attention_gate import AttentionGate, GateWeights
from kvjax.model import to_flat_params, transformer
from kvjax.ops import rope
from kvjax.training import attention_gate as gate_training
from kvjax.training import checkpoint as checkpoint_lib
from kvjax.training import data as data_lib
from kvjax.training import locret as locret_training
from kvjax.training import optim
from tests.tiny import random_prompts, tiny_model

SMALL = gate_training.AttentionGateSettings(gate_heads=2, gate_dim=8)


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=1)


def _gates(config, keep_logit=0.0, sharpness=20.0, seed=0) -> dict:
  """Random gates whose flags differ clearly between tokens (W_o scaled up)."""
  gates = gate_method.init_gates(config, 2, 8, keep_logit, jax.random.key(seed))
  return {name: np.asarray(value) * (sharpness if name == "wo" else 1.0)
          for name, value in gates.items()}


def _layer(gates, layer):
  return {name: np.asarray(value[layer], np.float64) for name, value in gates.items()}


# ----------------------------------------------------------------- numpy restatements

def _rms_norm(x, scale=1.0, eps=1e-5):
  return scale * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))


def _rotate(x, positions, inv_freq):
  """HF rotate-half RoPE of x [T, heads, D] at positions [T]."""
  angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
  cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
  x1, x2 = np.split(x, 2, axis=-1)
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def np_gate_logits(gate, features, positions):
  """[T, K] one layer's gate on one row, token by token: RMS-normalised features, a causal
  attention per MHA' head over the real tokens up to t, W_o, the bias (padding rows 0)."""
  x = _rms_norm(np.asarray(features, np.float64), eps=gate_method.NORM_EPS)
  t, g = len(positions), gate["wq"].shape[1]
  out = np.zeros((t, gate["bias"].shape[0]))
  for i in range(t):
    if positions[i] < 0:
      continue
    seen = [j for j in range(t) if 0 <= positions[j] <= positions[i]]
    mixed = []
    for head in range(g):
      q = x[i] @ gate["wq"][:, head]
      k = x[seen] @ gate["wk"][:, head]
      v = x[seen] @ gate["wv"][:, head]
      mixed.append(_softmax(k @ q / np.sqrt(len(q))) @ v)
    out[i] = np.einsum("ge,gek->k", np.stack(mixed), gate["wo"]) + gate["bias"]
  return out


def np_gated_attention(q, k, v, positions, keep):
  """[T, H, D]: query i of head h sees key j iff 0 <= pos j <= pos i and (KV head h // G
  keeps j, or j is i itself); q [T, H, D], k/v [T, K, D] post-RoPE, keep [K, T]."""
  t, h, d = q.shape
  group = h // k.shape[1]
  out = np.zeros((t, h, d))
  for i in range(t):
    if positions[i] < 0:
      continue
    for head in range(h):
      kv = head // group
      seen = [j for j in range(t) if 0 <= positions[j] <= positions[i]
              and (keep[kv, j] or positions[j] == positions[i])]
      p = _softmax(np.array([q[i, head] @ k[j, kv] for j in seen]) / np.sqrt(d))
      out[i, head] = p @ v[seen, kv]
  return out


def np_forward(model, tokens, keep):
  """[T, V] logits of one unpadded row through the whole model in numpy, each layer l's
  attention masked by keep [L, K, T]."""
  cfg = model.config
  w = {k: np.asarray(v, np.float64) for k, v in to_flat_params(model).items()}
  inv_freq = rope.inverse_frequencies(cfg).astype(np.float64)
  positions = np.arange(len(tokens))
  x = w["embed.embedding"][tokens]
  for layer in range(cfg.num_layers):
    p = lambda name: w[f"layers.{layer}.{name}"]
    h = _rms_norm(x, p("attn_norm.scale"), cfg.rms_norm_eps)
    proj = lambda name: np.einsum("td,dhk->thk", h, p(f"attn.{name}.kernel"))
    q, k = _rotate(proj("q"), positions, inv_freq), _rotate(proj("k"), positions, inv_freq)
    att = np_gated_attention(q, k, proj("v"), positions, keep[layer])
    x = x + np.einsum("thk,hkd->td", att, p("attn.o.kernel"))
    h = _rms_norm(x, p("mlp_norm.scale"), cfg.rms_norm_eps)
    gate = h @ p("mlp.gate.kernel")
    x = x + (gate * _sigmoid(gate) * (h @ p("mlp.up.kernel"))) @ p("mlp.down.kernel")
  return _rms_norm(x, w["final_norm.scale"], cfg.rms_norm_eps) @ w["lm_head.kernel"]


def _layer0_features(model, tokens):
  """Layer 0's gate inputs [T, F]: pre-RoPE q, k, v of one row, in numpy."""
  w = {k: np.asarray(v, np.float64) for k, v in to_flat_params(model).items()}
  h = _rms_norm(w["embed.embedding"][tokens], w["layers.0.attn_norm.scale"],
                model.config.rms_norm_eps)
  parts = [np.einsum("td,dhk->thk", h, w[f"layers.0.attn.{n}.kernel"]).reshape(len(tokens), -1)
           for n in ("q", "k", "v")]
  return np.concatenate(parts, -1)


def _forward(model, gates, tokens, mask, sinks=0):
  return gate_training.gated_forward(model.graphdef, model.config, model.params,
                                     jax.tree_util.tree_map(jnp.asarray, gates),
                                     jnp.asarray(tokens), jnp.asarray(mask), 0.5, sinks)


# ----------------------------------------------------------------- the gate and training

def test_gate_matches_numpy(model):
  """MHA' + W_o + bias on random features with a left-padded row, and the gate the model's
  layer 0 runs in training (features read back from post-RoPE q and k) against numpy."""
  cfg = model.config
  gates = _gates(cfg, keep_logit=0.3)
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 12, 128)).astype(np.float32) * 3
  positions = np.array([np.arange(12), np.r_[[-1] * 4, np.arange(8)]], np.int32)
  got = gate_method.gate_logits(jax.tree_util.tree_map(jnp.asarray, _layer(gates, 1)),
                                jnp.asarray(features), jnp.asarray(positions))
  for row in range(2):
    want = np_gate_logits(_layer(gates, 1), features[row], positions[row])
    real = positions[row] >= 0
    np.testing.assert_allclose(np.asarray(got[row])[real], want[real], rtol=1e-4, atol=1e-4)
  tokens = np.asarray(random_prompts([20], seed=4), np.int32)
  _, probs, _ = _forward(model, gates, tokens, np.ones_like(tokens, bool))
  want = _sigmoid(np_gate_logits(_layer(gates, 0), _layer0_features(model, tokens[0]),
                                 np.arange(20)))
  np.testing.assert_allclose(np.asarray(probs[0, 0]), want, rtol=1e-4, atol=1e-5)


def test_masked_attention_matches_numpy():
  """Query i of KV head h's group sees key j < i only where h keeps j, itself always;
  padding (position -1) is never seen."""
  rng = np.random.default_rng(1)
  b, t, h, k, d = 2, 10, 4, 2, 8
  q = rng.normal(size=(b, t, h, d)).astype(np.float32)
  keys = rng.normal(size=(b, k, t, d)).astype(np.float32)
  values = rng.normal(size=(b, k, t, d)).astype(np.float32)
  positions = np.array([np.arange(t), np.r_[[-1] * 3, np.arange(t - 3)]], np.int32)
  keep = rng.random((b, k, t)) < 0.5
  got = np.asarray(gate_training.gated_attention(
      jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values), jnp.asarray(positions),
      jnp.asarray(keep, jnp.float32)))
  for row in range(b):
    want = np_gated_attention(q[row], keys[row].transpose(1, 0, 2),
                              values[row].transpose(1, 0, 2), positions[row], keep[row])
    real = positions[row] >= 0
    np.testing.assert_allclose(got[row][real], want[real], rtol=1e-5, atol=1e-5)


def test_an_evicted_attention_sink_keeps_the_gradient_bounded():
  """An evicted key 100 nats ahead of the kept ones (an attention sink): the forward pass is
  the softmax over the kept keys, and the straight-through gradient of its weight is finite
  and at most 1 (exp(100) unbounded would overflow)."""
  logits = jnp.array([100.0, 1.0, 0.5, -1.0])
  seen = jnp.array([True, True, True, False])
  weights = jnp.array([0.0, 1.0, 1.0, 1.0])
  probs = gate_method.masked_softmax(logits, seen, weights)
  np.testing.assert_allclose(np.asarray(probs), [0, *np.asarray(_softmax(np.array([1.0, 0.5]))),
                                                 0], rtol=1e-6)
  grad = jax.grad(lambda w: gate_method.masked_softmax(logits, seen, w)[1])(weights)
  assert np.isfinite(np.asarray(grad)).all() and 0 < -float(grad[0]) <= 1


def test_training_forward_evicts_in_context_as_numpy(model):
  """The whole masked forward pass (layer 1 reads what layer 0's eviction left) equals a
  numpy model whose attention is masked by the flags the gates returned."""
  gates = _gates(model.config, seed=2)
  tokens = np.asarray(random_prompts([24], seed=5), np.int32)
  logits, _, keep = _forward(model, gates, tokens, np.ones_like(tokens, bool))
  keep = np.asarray(keep)[:, 0].transpose(0, 2, 1)                         # [L, K, T]
  assert set(np.unique(keep)) == {0.0, 1.0}          # straight-through: exactly hard forward
  rates = keep.mean((1, 2))
  assert np.all((rates > 0.2) & (rates < 0.8)), rates   # both layers really evict
  want = np_forward(model, tokens[0], keep.astype(bool))
  np.testing.assert_allclose(np.asarray(logits[0]), want, rtol=1e-3, atol=1e-3)
  plain, _ = transformer.forward(model.graphdef, model.params, jnp.asarray(tokens),
                                 jnp.ones(tokens.shape, bool), init_cache(model.config, 1, 24))
  assert np.abs(np.asarray(plain - logits)).max() > 0.1   # the masks changed the outputs


def test_gates_that_keep_everything_leave_the_model_unchanged(model):
  tokens = np.asarray(random_prompts([30, 30], seed=6), np.int32)
  mask = np.ones_like(tokens, bool)
  mask[1, 22:] = False
  logits, _, keep = _forward(model, _gates(model.config, keep_logit=30.0), tokens, mask)
  assert np.asarray(keep).min() == 1.0
  plain, _ = transformer.forward(model.graphdef, model.params, jnp.asarray(tokens),
                                 jnp.asarray(mask), init_cache(model.config, 2, 30))
  np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(plain)[mask], rtol=1e-5,
                             atol=1e-4)


def test_sinks_are_kept_whatever_the_gate_says(model):
  """Gates that evict everything: training keeps exactly the first `sinks` real tokens of
  each row (a right-padded row's too), with no gradient to their flags; inference keeps
  them too, and with sinks=0 nothing but what the gate flags."""
  gates = _gates(model.config, keep_logit=-30.0)
  tokens = np.asarray(random_prompts([20, 20], seed=14), np.int32)
  mask = np.ones_like(tokens, bool)
  mask[1, 2:] = False
  _, _, keep = _forward(model, gates, tokens, mask, sinks=3)
  want = np.zeros((2, 20))
  want[0, :3], want[1, :2] = 1, 1
  np.testing.assert_array_equal(np.asarray(keep), np.broadcast_to(want[None, :, :, None],
                                                                  keep.shape))
  sink_flags = lambda g: (lambda keep: keep[:, 0, :3].sum() + keep[:, 1, :2].sum())(
      _forward(model, g, tokens, mask, sinks=3)[2])
  grads = jax.grad(sink_flags)(jax.tree_util.tree_map(jnp.asarray, gates))
  assert not any(np.asarray(g).any() for g in grads.values())
  for sinks, kept_positions in ((3, [0, 1, 2]), (0, [])):
    kept, _, _, _ = _kept(model, AttentionGate(gates=GateWeights(gates), sinks=sinks),
                          random_prompts([20], seed=15))
    assert kept == [[[kept_positions] * 2]] * 2     # [layer][row][KV head]


def test_diffqkv_values_and_query_biases(model):
  """Wider values (DiffQKV: 2 value heads per key head) and q/k/v biases: gates that keep
  everything leave training's forward pass unchanged, and the cache keeps every token."""
  wide = tiny_model(seed=1, num_heads=8, num_kv_heads=2, num_value_heads=4, qkv_bias=True)
  gates = _gates(wide.config, keep_logit=30.0)
  tokens = np.asarray(random_prompts([24], seed=13), np.int32)
  mask = np.ones_like(tokens, bool)
  logits, _, _ = _forward(wide, gates, tokens, mask)
  plain, _ = transformer.forward(wide.graphdef, wide.params, jnp.asarray(tokens),
                                 jnp.asarray(mask), init_cache(wide.config, 1, 24))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), rtol=1e-5, atol=1e-4)
  method = AttentionGate(gates=GateWeights(gates))
  assert (kvjax.generate(wide, tokens.tolist(), method=method, max_new_tokens=4).token_ids
          == kvjax.generate(wide, tokens.tolist(), max_new_tokens=4).token_ids)


def test_loss_matches_numpy():
  """LM cross entropy over real (token, next token) pairs plus lambda x (eviction rate -
  target)^2, the rate over real tokens' flags of every layer and head."""
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
  tokens = rng.integers(0, 11, (2, 6)).astype(np.int32)
  mask = np.arange(6)[None] < np.array([[6], [4]])
  keep = (rng.random((3, 2, 6, 2)) < 0.3).astype(np.float32)
  settings = dataclasses.replace(SMALL, target_eviction=0.25, eviction_weight=3.0)
  loss, metrics = gate_training.attention_gate_loss(
      jnp.asarray(logits), jnp.asarray(keep), jnp.asarray(tokens), jnp.asarray(mask), settings)
  nll = []
  for row, n in enumerate([6, 4]):
    for t in range(n - 1):
      logp = logits[row, t] - np.log(np.exp(logits[row, t]).sum())
      nll.append(-logp[tokens[row, t + 1]])
  evicted = np.concatenate([1 - keep[:, row, :n].ravel() for row, n in enumerate([6, 4])])
  np.testing.assert_allclose(float(metrics["lm_loss"]), np.mean(nll), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["eviction_rate"]), evicted.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(loss), np.mean(nll) + 3.0 * (evicted.mean() - 0.25) ** 2,
                             rtol=1e-5)


def test_gradients_reach_every_gate_and_not_the_backbone(model):
  tokens = np.asarray(random_prompts([28, 28], seed=7), np.int32)
  mask = np.ones_like(tokens, bool)
  mask[0, 20:] = False
  batch = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}
  gates = jax.tree_util.tree_map(jnp.asarray, _gates(model.config, keep_logit=0.5))
  loss = lambda g, backbone: gate_training.full_loss(g, backbone, batch, model.graphdef,
                                                     model.config, SMALL)[0]
  value, (gate_grads, backbone_grads) = jax.value_and_grad(loss, argnums=(0, 1))(
      gates, model.params)
  assert np.isfinite(float(value))
  for name, g in gate_grads.items():
    g = np.asarray(g)
    assert np.isfinite(g).all() and np.abs(g).max() > 0, name
    assert np.abs(g).reshape(len(g), -1).max(1).min() > 0, name     # every layer's gate
  for g in jax.tree_util.tree_leaves(backbone_grads):
    assert not np.asarray(g).any()


def test_training_reduces_the_loss_and_reaches_the_target_rate(model, tmp_path):
  """A fixed batch, fixed seed: from gates that keep everything (eviction 0) to the 0.5
  target, with a lower total loss."""
  data = data_lib.DataSettings(sequence_length=48, answer_tokens=8, sources=("random",))
  task = gate_training.task(model, SMALL, data)
  fixed = task.batch(0, 2)
  task = dataclasses.replace(task, batch=lambda position, count: fixed)
  steps = 40
  result = training.train(task, tmp_path / "run", steps,
                          optim.OptimizerSettings(learning_rate=1e-2, total_steps=steps,
                                                  schedule="constant"),
                          training.LoopSettings(batch_size=2, checkpoint_every=steps,
                                                progress_bar=False))
  first, last = result.history[0], result.history[-1]
  assert first["eviction_rate"] == 0.0 and abs(last["eviction_rate"] - 0.5) < 0.1, last
  assert last["loss"] < 0.8 * first["loss"], (first, last)
  assert all(np.isfinite(h["loss"]) for h in result.history)


# ----------------------------------------------------------------- inference

def _kept(model, method, rows, chunk=None, room=0):
  width = inputs.bucket(max(len(r) for r in rows))
  if chunk:
    width = -(-width // chunk) * chunk
  tokens, mask = inputs.left_pad(rows, 0, width)
  pre = context_lib.prefill(model, tokens, mask, kvjax.methods.get(method), None, room=room,
                            chunk_size=chunk)
  kept = []
  for layer in pre.cache.layers:
    assert isinstance(layer, FlatLayerCache)
    pos, heads = np.asarray(layer.positions), np.asarray(layer.heads)
    kept.append([[sorted(pos[r][(heads[r] == h) & (pos[r] >= 0)].tolist())
                  for h in range(model.config.num_kv_heads)] for r in range(len(rows))])
  return kept, pre, tokens, mask


def test_kept_set_equals_the_numpy_flags(model):
  """One prefill chunk: a KV head keeps exactly the tokens its gate (restated in numpy on the
  layer's unmasked projections) flags above the threshold, and the first 2 (sinks), in
  every layer and row."""
  gates = _gates(model.config)
  rows = random_prompts([40, 27], seed=8)
  kept, _, tokens, mask = _kept(model, AttentionGate(gates=GateWeights(gates), sinks=2), rows)
  features, _ = locret_training.features_and_labels(
      model.graphdef, model.config, model.params, jnp.asarray(tokens), jnp.asarray(mask),
      jnp.zeros((2, 1), jnp.int32) - 1)
  positions = np.where(mask, np.cumsum(mask, 1) - 1, -1)
  evicted = 0
  for layer in range(model.config.num_layers):
    for r in range(2):
      real = positions[r] >= 0
      probs = _sigmoid(np_gate_logits(_layer(gates, layer), np.asarray(features[layer, r]),
                                      positions[r]))[real]
      assert np.abs(probs - 0.5).min() > 1e-4       # no flag within rounding of the threshold
      for h in range(2):
        want = positions[r][real][(probs[:, h] > 0.5) | (positions[r][real] < 2)].tolist()
        assert kept[layer][r][h] == want, (layer, r, h)
        evicted += real.sum() - len(want)
  assert evicted > 0


def test_chunked_prefill_gates_each_chunk(model):
  """Chunks of 16: layer 0 (whose inputs do not depend on attention) keeps what its gate
  flags when MHA' reads one chunk at a time; tokens kept earlier stay kept."""
  gates = _gates(model.config, seed=3)
  rows = random_prompts([44], seed=9)
  kept, _, tokens, mask = _kept(model, AttentionGate(gates=GateWeights(gates), sinks=0),
                               rows, chunk=16)
  features = _layer0_features(model, tokens[0][mask[0]])
  n, pad = len(rows[0]), tokens.shape[1] - len(rows[0])
  want = [[], []]
  for start in range(0, tokens.shape[1], 16):
    chunk = [p for p in range(start - pad, start - pad + 16) if p >= 0]
    if not chunk:
      continue
    probs = _sigmoid(np_gate_logits(_layer(gates, 0), features[chunk], np.array(chunk)))
    for h in range(2):
      want[h] += [p for p, v in zip(chunk, probs[:, h]) if v > 0.5]
  assert kept[0][0] == want and 0 < sum(map(len, want)) < 2 * n


def test_cache_bytes_follow_the_kept_counts(model):
  """The measured context cache is each layer's kept slots (keys, values, position, owner
  head) plus its segment table, and smaller than the full cache by what was evicted."""
  cfg = model.config
  prompt = random_prompts([96], seed=10)
  method = AttentionGate(gates=GateWeights(_gates(cfg, seed=4)))
  out = kvjax.generate(model, prompt, method=method, max_new_tokens=3)
  kept, _, _, _ = _kept(model, method, prompt)
  stats = out.stats
  per_slot = 2 * cfg.head_dim * 4 + 4 + 4                  # f32 key + value, position, head
  table = (cfg.num_kv_heads + 1) * 4 + cfg.num_kv_heads * 4  # offsets, next_slot
  counts = [[len(h) for h in layer[0]] for layer in kept]
  lengths = 4                                             # the cache's lengths [B] int32
  assert stats["context_cache_bytes"] == sum(per_slot * sum(c) + table for c in counts) + lengths
  assert stats["method_stats"]["kept_tokens_per_head"] == [[c] for c in counts]
  assert len({c for layer in counts for c in layer}) > 1    # heads keep different numbers
  kept_fraction = sum(map(sum, counts)) / (96 * cfg.num_layers * cfg.num_kv_heads)
  assert stats["method_stats"]["kept_fraction"] == pytest.approx(kept_fraction)
  ratio = stats["context_cache_bytes"] / stats["full_context_cache_bytes"]
  assert ratio == pytest.approx(kept_fraction, abs=0.03) and ratio < 0.8
  assert stats["kept_tokens_per_layer"] == [round(sum(c) / len(c)) for c in counts]


@pytest.mark.parametrize("chunk", [None, 16])
def test_a_gate_that_keeps_everything_is_the_full_cache(model, chunk):
  method = AttentionGate(gates=GateWeights(_gates(model.config, keep_logit=30.0)))
  prompts = random_prompts([40, 33], seed=11)
  kept, _, _, _ = _kept(model, method, prompts, chunk)
  for layer in kept:
    assert layer == [[list(range(40))] * 2, [list(range(33))] * 2]
  full = kvjax.generate(model, prompts, max_new_tokens=6)
  out = kvjax.generate(model, prompts, method=method, max_new_tokens=6,
                       prefill_chunk_size=chunk)
  assert out.token_ids == full.token_ids
  assert out.stats["method_stats"]["kept_fraction"] == 1.0


def test_the_threshold_trades_tokens(model):
  gates = GateWeights(_gates(model.config, seed=5))
  prompt = random_prompts([64], seed=12)
  kept = lambda threshold: _kept(model, AttentionGate(gates=gates, threshold=threshold),
                                 prompt)[1].method_stats["kept_fraction"]
  assert kept(0.2) > kept(None) > kept(0.8)
  defaults = AttentionGate(gates=gates)                        # weights without metadata
  assert (defaults.gate_threshold(), defaults.gate_sinks()) == (0.5, 4)


# ----------------------------------------------------------------- checkpoints and models

def _save_run(tmp_path, model, step=3, settings=SMALL):
  """A run directory with one step of gates for `model`, as training writes it."""
  task = gate_training.task(model, settings)
  return training_runs.save_initial_step(task, tmp_path / "run", step)


def test_from_checkpoint_loads_the_trained_gates(model, tmp_path):
  run, params = _save_run(tmp_path, model,
                          settings=dataclasses.replace(SMALL, threshold=0.6, sinks=2))
  method = AttentionGate.from_checkpoint(run)
  assert method.checkpoint == str(run / "3")
  assert (method.gate_threshold(), method.gate_sinks()) == (0.6, 2)   # the run's
  assert AttentionGate.from_checkpoint(run, sinks=0).gate_sinks() == 0
  np.testing.assert_array_equal(method.weights()["wq"], np.asarray(params["wq"]))
  assert method == kvjax.methods.get(f"attention_gate:checkpoint={run}")
  assert hash(method) == hash(AttentionGate.from_checkpoint(run / "3"))
  loaded = training.load_method(run, model, method="attention_gate")
  assert loaded == method
  out = kvjax.generate(model, random_prompts([48], seed=1), method=loaded, max_new_tokens=3)
  # Fresh gates keep every token (bias keep_logit = 2).
  assert out.stats["kept_tokens_per_layer"] == [48, 48]


def test_parameters_for_another_model_are_refused(model, tmp_path):
  run, _ = _save_run(tmp_path, model)
  method = AttentionGate.from_checkpoint(run)
  prompt = random_prompts([40], seed=1)
  with pytest.raises(MethodError, match=r"num_layers: trained for 2, this model has 3"):
    kvjax.generate(tiny_model(seed=1, num_layers=3), prompt, method=method, max_new_tokens=2)
  with pytest.raises(MethodError, match=r"name: trained for '', this model has 'other-model'"):
    kvjax.generate(tiny_model(seed=1, name="other-model"), prompt, method=method,
                   max_new_tokens=2)
  other_weights = tiny_model(seed=2)
  with pytest.raises(MethodError, match="trained on weights with fingerprint"):
    training.load_method(run, other_weights, method="attention_gate")
  with pytest.raises(MethodError, match="fingerprint"):
    AttentionGate.from_checkpoint(run, fingerprint=calibration.model_fingerprint(other_weights))
  with pytest.raises(MethodError, match="trained on weights with fingerprint"):
    kvjax.generate(other_weights, prompt, method=f"attention_gate:checkpoint={run}",
                   max_new_tokens=2)
  wrong = GateWeights(_gates(tiny_model(seed=1, num_kv_heads=1).config))
  with pytest.raises(MethodError, match=r"wo \(2, 2, 8, 1\).*needs wq/wk/wv \(2, 128, heads"):
    kvjax.generate(model, prompt, method=AttentionGate(gates=wrong), max_new_tokens=2)


def test_a_locret_run_is_not_a_gate(model, tmp_path):
  task = locret_training.task(model, locret_training.LocretSettings(hidden=8))
  params = task.init_params(jax.random.key(0))
  run = checkpoint_lib.RunCheckpoints(tmp_path / "locret", every=1)
  run.save(1, params, optax.adamw(1e-3).init(params), jax.random.key(0),
           {"step": 1, "examples": 0, "history": []}, {**task.meta, "step": 1})
  run.close()
  with pytest.raises(MethodError, match="holds 'locret' parameters, not attention_gate's"):
    AttentionGate.from_checkpoint(tmp_path / "locret")


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold": 1.5}, r"threshold=1.5 must be a number in \[0, 1\)"),
    ({"threshold": float("nan")}, r"threshold=nan"),
    ({"sinks": -1}, r"sinks=-1 must be an integer >= 0"),
    ({"gates": {"wq": 1}}, "must be a GateWeights"),
    ({"checkpoint": "/nonexistent/run"}, "no trained parameters at /nonexistent/run"),
    ({"checkpoint": 3}, "must be a path"),
])
def test_bad_hyperparameters(kwargs, match):
  with pytest.raises(MethodError, match=match):
    AttentionGate(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"target_eviction": 1.0}, r"target_eviction=1.0 must be a number in \[0, 1\)"),
    ({"gate_heads": 0}, r"gate_heads=0 must be an integer >= 1"),
    ({"sinks": 1.5}, r"sinks=1.5 must be an integer >= 0"),
    ({"gate_dim": 2.5}, r"gate_dim=2.5 must be an integer >= 1"),
    ({"eviction_weight": -1.0}, r"eviction_weight=-1.0 must be a finite number >= 0"),
    ({"threshold": 0.0}, r"threshold=0.0 must be a number in \(0, 1\)"),
    ({"keep_logit": float("inf")}, r"keep_logit=inf must be a finite number"),
])
def test_bad_training_settings(kwargs, match):
  with pytest.raises(KvjaxError, match=match):
    gate_training.AttentionGateSettings(**kwargs)


def test_without_weights_or_with_a_ratio_it_says_what_to_do(model):
  prompt = random_prompts([20])
  with pytest.raises(MethodError, match="no trained gates"):
    kvjax.generate(model, prompt, method="attention_gate", max_new_tokens=2)
  method = AttentionGate(gates=GateWeights(_gates(model.config)))
  with pytest.raises(MethodError, match=r"compression_ratio=0.5 / budget=None would be "
                                        r"ignored"):
    kvjax.generate(model, prompt, method=method, compression_ratio=0.5, max_new_tokens=2)


def test_train_script_trains_the_gates(model, tmp_path):
  from checkpoints_conversion import orbax_io
  from tests.test_training import ROOT, _env
  model_dir = orbax_io.save(model, tmp_path / "model")
  out = subprocess.run(
      [sys.executable, str(ROOT / "scripts" / "train.py"), f"--model={model_dir}",
       "--method=attention_gate", f"--workdir={tmp_path / 'run'}", "--steps=4",
       "--sources=random", "--sequence_length=32", "--answer_tokens=4", "--gate_heads=2",
       "--gate_dim=8", "--target_eviction=0.3", "--learning_rate=0.01", "--noprogress_bar"],
      env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "attention_gate: 4 steps" in out.stdout and "eviction rate" in out.stdout
  method = AttentionGate.from_checkpoint(tmp_path / "run")
  assert method.metadata()["loss"]["target_eviction"] == 0.3
  assert method.gate_threshold() == 0.5


def test_a_context_of_another_length_decodes_with_the_same_compiled_loop(model, monkeypatch):
  """Each head is cut to the tokens its gates keep (`trims_padding`), so `generate`
  reserves slots in the last head's segment without a budget: prompts whose kept slots
  round alike share one compiled decode loop, and generate what the unpadded cache
  generates."""
  from tests.tiny import reserved_and_unreserved
  method = AttentionGate(gates=GateWeights(_gates(model.config, seed=4)))
  prompts = [random_prompts([n], seed=10) for n in (90, 100)]
  (loops, padded), (exact_loops, exact) = reserved_and_unreserved(
      model, prompts, FlatLayerCache, monkeypatch, method=method, max_new_tokens=6)
  kept = [r.stats["method_stats"]["kept_tokens_per_head"] for r in padded]
  assert kept[0] != kept[1]
  assert (loops, exact_loops) == (1, 2)
  assert [r.token_ids for r in padded] == [r.token_ids for r in exact]
