"""Locret: retaining heads, causal importance labels, the chunked top-B loop, checkpoints."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import training_runs
from kvjax import calibration, training
from kvjax.cache.kv_cache import init_cache
from kvjax.errors import MethodError
from kvjax.generation import context as context_lib
from kvjax.generation import inputs
from kvjax.methods import locret
from kvjax.methods.locret import Locret, RetainingHeads
from kvjax.model import to_flat_params, transformer
from kvjax.ops import rope
from kvjax.training import locret as locret_training
from tests.tiny import random_prompts, tiny_model


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=1)


def _heads(config, hidden=16, seed=0):
  params = locret.init_heads(config, hidden, jax.random.key(seed))
  # Scaled up so scores differ clearly between tokens (no near-ties in top-k).
  return RetainingHeads({k: 50 * np.asarray(v) for k, v in params.items()})


# ----------------------------------------------------------------- numpy restatements

def _silu(x):
  return x / (1 + np.exp(-x))


def _rms_norm(x, scale, eps):
  return scale * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))


def _rotate(x, positions, inv_freq):
  """HF rotate-half RoPE of x [T, heads, D] at positions [T]."""
  angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
  cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
  x1, x2 = np.split(x, 2, axis=-1)
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _layer0_qkv(model, tokens):
  """Layer 0's pre-RoPE q [T, H, D], k [T, K, D], v [T, K, D] of one token row, in numpy."""
  flat = {k: np.asarray(v, np.float64) for k, v in to_flat_params(model).items()}
  x = flat["embed.embedding"][tokens]
  h = _rms_norm(x, flat["layers.0.attn_norm.scale"], model.config.rms_norm_eps)
  proj = lambda name: np.einsum("td,dhk->thk", h, flat[f"layers.0.attn.{name}.kernel"])
  return proj("q"), proj("k"), proj("v")


def _probe(model, tokens, mask, answer_index):
  return locret_training.features_and_labels(
      model.graphdef, model.config, model.params, jnp.asarray(tokens), jnp.asarray(mask),
      jnp.asarray(answer_index))


def test_retaining_head_matches_numpy(model):
  """R(x) = W2 silu(W1 [q; k; v]) on layer 0's pre-RoPE projections, against numpy."""
  cfg = model.config
  tokens = np.asarray(random_prompts([20], seed=4)[0], np.int32)[None]
  features, _ = _probe(model, tokens, np.ones_like(tokens, bool), np.array([[19]], np.int32))
  q, k, v = _layer0_qkv(model, tokens[0])
  want = np.concatenate([q.reshape(20, -1), k.reshape(20, -1), v.reshape(20, -1)], -1)
  assert features.shape == (cfg.num_layers, 1, 20, locret.feature_size(cfg))
  np.testing.assert_allclose(np.asarray(features[0, 0]), want, rtol=1e-4, atol=1e-4)
  heads = _heads(cfg).params
  got = locret.retaining_scores(heads["w1"][0], heads["w2"][0], features[0])
  want_scores = _silu(want @ heads["w1"][0].astype(np.float64)) @ heads["w2"][0]
  np.testing.assert_allclose(np.asarray(got[0]), want_scores, rtol=1e-4, atol=1e-3)


def test_labels_match_numpy_causal_importance(model):
  """CIS[h, j] = max over answer queries and the query group of h of q . k / sqrt(d)
  (post-RoPE), per row: a full row and a shorter right-padded one."""
  cfg = model.config
  rows = random_prompts([24, 24], seed=6)
  tokens = np.asarray(rows, np.int32)
  mask = np.ones_like(tokens, bool)
  mask[1, 15:] = False
  answer_index = np.array([[18, 19, 20, 21, 22, 23], [10, 11, 12, 13, 14, -1]], np.int32)
  _, labels = _probe(model, tokens, mask, answer_index)
  inv_freq = rope.inverse_frequencies(cfg).astype(np.float64)
  group = cfg.num_heads // cfg.num_kv_heads
  for row, n in enumerate([24, 15]):
    q, k, _ = _layer0_qkv(model, tokens[row, :n])
    q, k = _rotate(q, np.arange(n), inv_freq), _rotate(k, np.arange(n), inv_freq)
    asked = [a for a in answer_index[row] if a >= 0]
    for h in range(cfg.num_kv_heads):
      logits = np.einsum("agd,td->agt", q[asked][:, h * group:(h + 1) * group], k[:, h])
      want = (logits / np.sqrt(cfg.head_dim)).max(axis=(0, 1))
      np.testing.assert_allclose(np.asarray(labels[0, row, h, :n]), want, rtol=1e-4,
                                 atol=1e-3)


def test_gradients_reach_the_heads_and_not_the_backbone(model):
  cfg = model.config
  tokens = np.asarray(random_prompts([32, 32], seed=8), np.int32)
  batch = {"tokens": jnp.asarray(tokens), "mask": jnp.ones(tokens.shape, bool),
           "context": jnp.arange(32)[None].repeat(2, 0) < 26,
           "answer_index": jnp.asarray(np.tile(np.arange(26, 32), (2, 1)), jnp.int32)}
  heads = locret.init_heads(cfg, 16, jax.random.key(0))
  settings = locret_training.LocretSettings(hidden=16)
  loss = lambda h, backbone: locret_training.full_loss(h, backbone, batch, model.graphdef,
                                                       cfg, settings)[0]
  value, (head_grads, backbone_grads) = jax.value_and_grad(loss, argnums=(0, 1))(
      heads, model.params)
  assert np.isfinite(float(value)) and float(value) > 0
  for name, g in head_grads.items():
    g = np.asarray(g)
    assert np.isfinite(g).all() and np.abs(g).max() > 0, name
  for g in jax.tree_util.tree_leaves(backbone_grads):
    assert not np.asarray(g).any()


def test_loss_matches_numpy(model):
  """SmoothL1 averaged over each (layer, head) row's context tokens, then over rows, plus
  0.0025 x the per-layer mean squared step between neighbours, summed over layers."""
  rng = np.random.default_rng(0)
  L, B, K, T, F = 2, 2, 2, 10, 6
  features = rng.normal(size=(L, B, T, F)).astype(np.float32)
  labels = rng.normal(size=(L, B, K, T)).astype(np.float32) * 3
  context = np.arange(T)[None] < np.array([[8], [5]])
  heads = {"w1": rng.normal(size=(L, F, 4)).astype(np.float32),
           "w2": rng.normal(size=(L, 4, K)).astype(np.float32)}
  loss, metrics = locret_training.locret_loss(heads, jnp.asarray(features),
                                              jnp.asarray(labels), jnp.asarray(context),
                                              locret_training.LocretSettings())
  pred = np.stack([np.swapaxes(_silu(features[l] @ heads["w1"][l]) @ heads["w2"][l], 1, 2)
                   for l in range(L)])
  main, smooth = [], 0.0
  for l in range(L):
    steps = []
    for b in range(B):
      n = context[b].sum()
      for h in range(K):
        d = np.abs(pred[l, b, h, :n] - labels[l, b, h, :n])
        main.append(np.where(d < 1, 0.5 * d * d, d - 0.5).mean())
        steps += list((pred[l, b, h, 1:n] - pred[l, b, h, :n - 1]) ** 2)
    smooth += np.mean(steps)
  np.testing.assert_allclose(float(metrics["smooth_l1"]), np.mean(main), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["smoothness"]), smooth, rtol=1e-5)
  np.testing.assert_allclose(float(loss), np.mean(main) + 0.0025 * smooth, rtol=1e-5)


# ----------------------------------------------------------------- the chunked top-B loop

def official_kept(score, n, chunk_ends, budget, stabilizers, local):
  """Kept positions of one KV head after Locret's prefill loop (infer.py `generate`),
  restated: over the chunks of [0, n - local) ending at `chunk_ends`, the kept tokens
  plus the chunk are ranked by score, the last `stabilizers` of them (in position order)
  first unless the chunk is the last, and the top `budget` kept; then the last `local`
  tokens are appended."""
  kept, start = [], 0
  ends = sorted({min(e, n - local) for e in chunk_ends if e > 0} | {n - local})
  ends = [e for e in ends if e > 0]
  for i, end in enumerate(ends):
    candidates = kept + list(range(start, end))
    scores = np.array([score[p] for p in candidates])
    if i < len(ends) - 1 and stabilizers:
      scores[-stabilizers:] = np.inf
    top = np.argsort(-scores, kind="stable")[:min(budget, len(candidates))]
    kept = sorted(candidates[j] for j in top)
    start = end
  return kept + list(range(max(n - local, 0), n))


@dataclasses.dataclass(frozen=True)
class TableLocret(Locret):
  """Locret whose tokens' scores come from a seeded random table [B, L, K, width] indexed
  by position, instead of trained heads (the tiny model: 2 layers of 2 KV heads)."""
  table_seed: int = 0

  def table(self, rows, width):
    return np.random.default_rng(self.table_seed).normal(size=(rows, 2, 2, width))

  def layer_budgets(self, config, keep, context_length):
    return (keep,) * config.num_layers

  def context_params(self, tokenizer, tokens, mask):
    return {"heads": None, "context_lengths": np.asarray(mask).sum(1).astype(np.int32),
            "table": self.table(*tokens.shape).astype(np.float32)}

  def new_token_scores(self, x):
    table = x.params["table"][:, x.layer]                                # [B, K, W]
    index = jnp.clip(x.query_positions, 0, table.shape[-1] - 1)[:, None, :]
    return jnp.take_along_axis(table, jnp.broadcast_to(index, index.shape[:1] + (
        table.shape[1],) + index.shape[2:]), axis=-1)


def _kept(model, method, rows, keep, chunk):
  width = -(-max(len(r) for r in rows) // chunk) * chunk
  tokens, mask = inputs.left_pad(rows, 0, width)
  pre = context_lib.prefill(model, tokens, mask, method, keep, room=0, chunk_size=chunk)
  kept = [[[sorted(p[p >= 0].tolist()) for p in row] for row in np.asarray(layer.positions)]
          for layer in pre.cache.layers]
  return kept, width, pre


@pytest.mark.parametrize("lengths, chunk, keep, stabilizers, local", [
    ((96,), 16, 40, 12, 6),          # length a multiple of the chunk: the code's boundaries
    ((96, 71), 16, 30, 20, 5),       # left padding: each row's chunks end where kvjax's do
    ((96,), 32, 24, 40, 8),          # stabilizers shrink to fit B (fitted)
    ((50,), 8, 20, 12, 10),          # the tail spans two chunks
])
def test_kept_set_equals_the_chunked_top_b_loop(model, lengths, chunk, keep, stabilizers,
                                                local):
  method = TableLocret(stabilizers=stabilizers, local=local, table_seed=3)
  rows = random_prompts(lengths, seed=2)
  kept, width, _ = _kept(model, method, rows, keep, chunk)
  fitted = method.fitted(keep)
  table = method.table(len(rows), width)
  for r, n in enumerate(lengths):
    pad = width - n
    ends = [e - pad for e in range(chunk, width + 1, chunk)]   # kvjax's chunks, row positions
    for layer in range(2):
      for head in range(2):
        score = table[r, layer, head, :n]   # position p's score sits at its own index p
        want = official_kept(score, n, ends, keep - fitted.local, fitted.stabilizers,
                             fitted.local)
        assert kept[layer][r][head] == want, (r, layer, head)
  if lengths == (96,) and chunk == 16:   # the official start-aligned loop gives the same
    official_ends = list(range(chunk, 96 - local, chunk))
    assert kept[0][0][0] == official_kept(table[0, 0, 0, :96], 96, official_ends,
                                          keep - local, stabilizers, local)


def test_budget_at_least_the_prompt_equals_the_full_cache(model):
  heads = _heads(model.config)
  prompts = random_prompts([40, 33], seed=9)
  full = kvjax.generate(model, prompts, max_new_tokens=6)
  for kwargs in ({"budget": 40}, {"budget": 64, "prefill_chunk_size": 16},
                 {"compression_ratio": 0.0}):
    out = kvjax.generate(model, prompts, method=Locret(heads=heads, stabilizers=8, local=4),
                         max_new_tokens=6, **kwargs)
    assert out.token_ids == full.token_ids, kwargs
  kept, _, _ = _kept(model, Locret(heads=heads, stabilizers=8, local=4), prompts, 40, 16)
  for layer in kept:
    assert layer[0] == [list(range(40))] * 2 and layer[1] == [list(range(33))] * 2


def test_the_cache_really_shrinks_and_keeps_the_tail(model):
  heads = _heads(model.config)
  prompt = random_prompts([128], seed=10)
  method = Locret(heads=heads, stabilizers=16, local=8)
  out = kvjax.generate(model, prompt, method=method, budget=32, prefill_chunk_size=32,
                       max_new_tokens=4)
  stats = out.stats
  assert stats["kept_tokens_per_layer"] == [32, 32]
  ratio = stats["context_cache_bytes"] / stats["full_context_cache_bytes"]
  assert 0.24 <= ratio <= 0.26, ratio   # 32 of 128 slots, the scores dropped after prefill
  kept, _, pre = _kept(model, method, prompt, 32, 32)
  assert all(layer.state is None for layer in pre.cache.layers)
  for layer in kept:
    for head in layer[0]:
      assert len(head) == 32 and head[-8:] == list(range(120, 128))
  # Deterministic, and the heads decide: other weights keep other tokens.
  assert _kept(model, method, prompt, 32, 32)[0] == kept
  other = Locret(heads=_heads(model.config, seed=5), stabilizers=16, local=8)
  assert _kept(model, other, prompt, 32, 32)[0] != kept


def test_scores_are_computed_once_per_token(model):
  """A kept token's stored score is the one it got when its chunk was read."""
  heads = _heads(model.config)
  prompt = random_prompts([64], seed=11)
  method = Locret(heads=heads, stabilizers=4, local=4)
  tokens, mask = inputs.left_pad(prompt, 0, 64)
  plan = context_lib._compression_plan(model, method, 24, mask)
  cache = init_cache(model.config, 1, 0)
  params = jax.tree_util.tree_map(jnp.asarray, method.context_params(None, tokens, mask))
  full_features, _ = locret_training.features_and_labels(
      model.graphdef, model.config, model.params, jnp.asarray(tokens), jnp.asarray(mask),
      jnp.array([[63]], jnp.int32))
  for start in (0, 16):   # the first two chunks see the same prefix as a full read
    _, cache = transformer.forward(model.graphdef, model.params,
                                   jnp.asarray(tokens[:, start:start + 16]),
                                   jnp.asarray(mask[:, start:start + 16]), cache, "last", plan,
                                   params)
  layer = cache.layers[1]
  positions, state = np.asarray(layer.positions)[0], np.asarray(layer.state)[0]
  want = np.asarray(locret.retaining_scores(heads.params["w1"][1], heads.params["w2"][1],
                                            full_features[1])[0])        # [T, K]
  for h in range(2):
    live = positions[h] >= 0
    assert live.sum() == 24 - 4   # before the last chunk: B = keep - local
    np.testing.assert_allclose(state[h][live], want[positions[h][live], h], rtol=1e-3,
                               atol=1e-3)


# ----------------------------------------------------------------- checkpoints and models

def _save_run(tmp_path, model, hidden=16, step=3):
  """A run directory with one step of Locret heads for `model`, as training writes it."""
  task = locret_training.task(model, locret_training.LocretSettings(hidden=hidden))
  return training_runs.save_initial_step(task, tmp_path / "run", step)


def test_from_checkpoint_loads_the_trained_heads(model, tmp_path):
  run, params = _save_run(tmp_path, model)
  method = Locret.from_checkpoint(run)
  assert method.checkpoint == str(run / "3")
  np.testing.assert_array_equal(method.weights()["w1"], np.asarray(params["w1"]))
  assert method == kvjax.methods.get(f"locret:checkpoint={run}")
  assert hash(method) == hash(Locret.from_checkpoint(run / "3"))
  loaded = training.load_method(run, model, stabilizers=8, local=4)
  out = kvjax.generate(model, random_prompts([48], seed=1), method=loaded, budget=16,
                       max_new_tokens=3)
  assert out.stats["kept_tokens_per_layer"] == [16, 16]


def test_parameters_for_another_model_are_refused(model, tmp_path):
  run, _ = _save_run(tmp_path, model)
  method = Locret.from_checkpoint(run, stabilizers=4, local=2)
  prompt = random_prompts([40], seed=1)
  deeper = tiny_model(seed=1, num_layers=3)
  with pytest.raises(MethodError, match=r"num_layers: trained for 2, this model has 3"):
    kvjax.generate(deeper, prompt, method=method, budget=16, max_new_tokens=2)
  renamed = tiny_model(seed=1, name="other-model")
  with pytest.raises(MethodError, match=r"name: trained for '', this model has 'other-model'"):
    kvjax.generate(renamed, prompt, method=method, budget=16, max_new_tokens=2)
  # Same architecture and name, other weights: the fingerprint tells them apart.
  other_weights = tiny_model(seed=2)
  with pytest.raises(MethodError, match="trained on weights with fingerprint"):
    training.load_method(run, other_weights)
  with pytest.raises(MethodError, match="fingerprint"):
    Locret.from_checkpoint(run, fingerprint=calibration.model_fingerprint(other_weights))
  # ... and wherever the method meets the model (generate binds it).
  with pytest.raises(MethodError, match="trained on weights with fingerprint"):
    kvjax.generate(other_weights, prompt, method=method, budget=16, max_new_tokens=2)
  with pytest.raises(MethodError, match="trained on weights with fingerprint"):
    kvjax.generate(other_weights, prompt, method=f"locret:checkpoint={run}", budget=16,
                   max_new_tokens=2)
  # In-memory heads of the wrong shape name what they needed.
  wrong = _heads(tiny_model(seed=1, num_kv_heads=1).config)
  with pytest.raises(MethodError, match=r"w2 \(2, 16, 1\).*needs w1 \(2, 128, hidden\)"):
    kvjax.generate(model, prompt, method=Locret(heads=wrong, local=2, stabilizers=2),
                   budget=16, max_new_tokens=2)


@pytest.mark.parametrize("kwargs, match", [
    ({"stabilizers": -1}, r"stabilizers=-1 must be an integer >= 0"),
    ({"local": 1.5}, r"local=1.5 must be an integer >= 0"),
    ({"heads": {"w1": 1}}, "must be a RetainingHeads"),
    ({"checkpoint": "/nonexistent/run"}, "no trained parameters at /nonexistent/run"),
    ({"checkpoint": 3}, "must be a path"),
])
def test_bad_hyperparameters(kwargs, match):
  with pytest.raises(MethodError, match=match):
    Locret(**kwargs)


def test_without_weights_it_says_how_to_get_them(model):
  with pytest.raises(MethodError, match="no trained retaining heads"):
    kvjax.generate(model, random_prompts([20])[0:1], method="locret", budget=8,
                   max_new_tokens=2)


def test_fitted_leaves_room_for_the_scores():
  method = Locret()
  assert method.fitted(6000) is method
  small = method.fitted(40)
  assert (small.local, small.stabilizers) == (39, 0)
  assert Locret(local=4).fitted(40).stabilizers == 35
  for keep in (1, 2, 5, 40):
    fitted = method.fitted(keep)
    assert fitted.protected_tokens(keep) <= max(keep - 1, 1)
    assert fitted.local + fitted.stabilizers <= max(keep - 1, 0)
