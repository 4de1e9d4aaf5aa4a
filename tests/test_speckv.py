"""SpecKV: the lookahead pass's scores against the target's own prefill of prompt + draft,
the selection against numpy, the truncated-layer draft, and the method end to end."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import method_inputs as mi
from kvjax.cache.kv_cache import Cache, init_cache
from kvjax.errors import MethodError
from kvjax.generation import context, engine, inputs
from kvjax.methods.speckv import SpecKV
from kvjax.model.model import to_flat_params, truncated
from tiny import random_prompts, tiny_model


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=0, num_layers=4)


PROMPTS = random_prompts([90, 70], seed=1)


@dataclasses.dataclass(frozen=True)
class TailProbe:
  """Stores everything and returns, per layer, the largest attention any of each row's last
  `tail` real queries gives each slot (max over the KV head's group), the slots from
  `start` on zeroed: the same statistic computed the plain way, in one prefill."""
  tail: tuple
  compress = True

  def prepare(self, layer, layer_cache, new):
    return layer_cache.append(new), None, frozenset()

  def update(self, layer, layer_cache, step, stats):
    q, qpos = step.queries, step.new.positions
    rank = jnp.cumsum((qpos >= 0)[:, ::-1], axis=1)[:, ::-1]          # 1 = last real query
    tail = jnp.asarray(self.tail)[:, None]
    qpos = jnp.where((rank <= tail) & (qpos >= 0), qpos, -1)
    # Softmax over every visible slot: the cache holds the whole row, own tokens included.
    return mi_probs(q, layer_cache.keys, qpos, layer_cache.positions)

  def finish(self, layers, lengths):
    return tuple(layers)


def mi_probs(q, keys, qpos, kpos):
  """[B, K, S] max over the group's heads and the real queries of causal probabilities."""
  b, t, h, d = q.shape
  k = keys.shape[1]
  logits = jnp.einsum("bthd,bhsd->bhts", q.astype(jnp.float32),
                      jnp.repeat(keys.astype(jnp.float32), h // k, axis=1),
                      precision="highest") * d ** -0.5
  seen = (kpos[:, :1, None, :] >= 0) & (kpos[:, :1, None, :] <= qpos[:, None, :, None])
  seen = jnp.repeat(seen, h, axis=1)
  logits = jnp.where(seen, logits, -jnp.inf)
  probs = jnp.where((qpos >= 0)[:, None, :, None],
                    jnp.exp(logits - jnp.max(logits, -1, keepdims=True)), 0.0)
  probs = probs / jnp.maximum(probs.sum(-1, keepdims=True), 1e-30)
  return probs.max(2).reshape(b, k, h // k, -1).max(2)


def test_lookahead_pass_equals_the_prefill_of_prompt_and_draft(model):
  method = SpecKV(window=8, lookahead=5)
  tokens, mask = inputs.left_pad(PROMPTS, 0)
  draft = context.draft_fn(model, method)
  (rows, params), = method.rescoring_passes(None, tokens, mask, draft)
  drafted = draft(PROMPTS, 5)
  assert [r[8:] for r in rows] == drafted and [r[:8] for r in rows] == [p[-8:] for p in PROMPTS]
  # kvjax's way: the uncompressed prompt cache, then the rewound pass.
  steps = engine.STEPS
  _, cache = steps.prefill(model, jnp.asarray(tokens), jnp.asarray(mask),
                           init_cache(model.config, 2, tokens.shape[1]), logits="last")
  ids, ids_mask = inputs.left_pad(rows, 0)
  at = context.rewound(cache, params["rewind"])
  _, got = steps.prefill(model, jnp.asarray(ids), jnp.asarray(ids_mask), at, logits="last",
                         plan=method.rescoring_policy(),
                         method_params={"rewind": jnp.asarray(params["rewind"])})
  # The plain way: one prefill of prompt + draft, the last 13 queries' attention.
  whole, whole_mask = inputs.left_pad([p + d for p, d in zip(PROMPTS, drafted)], 0)
  _, want = steps.prefill(model, jnp.asarray(whole), jnp.asarray(whole_mask),
                          init_cache(model.config, 2, whole.shape[1]), logits="last",
                          plan=TailProbe((13, 13)))
  for layer in range(model.config.num_layers):
    g, w = np.asarray(got[layer]), np.asarray(want[layer])
    for row, n in enumerate((90, 70)):
      before = n - 8                          # prompt keys before the window
      g_row = g[row][:, cache.layers[0].positions.shape[-1] - n:][:, :before]
      w_row = w[row][:, whole.shape[1] - n - 5:][:, :before]
      np.testing.assert_allclose(g_row, w_row, rtol=2e-4, atol=1e-6)


def test_selection_is_window_plus_top_pooled_scores():
  rng = np.random.default_rng(0)
  b, k, s, keep, window = 2, 2, 30, 12, 4
  pos = np.broadcast_to(np.arange(s), (b, k, s)).astype(np.int32).copy()
  pos[1, :, :6] = -1
  pos[1, :, 6:] = np.arange(24)          # row 1: 24 tokens after 6 padding slots
  lengths = np.array([30, 24])
  layer = init_cache(mi.config(num_layers=1), b, s).layers[0].replace(
      positions=jnp.asarray(pos), end=jnp.int32(s))
  scores = rng.random((b, k, s)).astype(np.float32)
  cache = Cache(layers=(layer,), lengths=jnp.asarray(lengths, jnp.int32))
  out = SpecKV(window=window).rescored(cache, [[jnp.asarray(scores)]], (keep,))
  kept = np.asarray(out.layers[0].positions)
  for row in range(b):
    for head in range(k):
      real = pos[row, head] >= 0
      win = real & (pos[row, head] >= lengths[row] - window)
      x = np.where(win | ~real, 0.0, scores[row, head])
      pooled = np.array([x[max(0, i - 3):i + 4].max() for i in range(s)])
      cand = np.where(real & ~win, pooled, -np.inf)
      order = np.lexsort((np.arange(s), -cand))[:keep - window]
      want = sorted(set(pos[row, head][win]) | set(pos[row, head][order]))
      assert sorted(kept[row, head][kept[row, head] >= 0].tolist()) == want


def test_truncated_draft_shares_the_first_layers(model):
  two = truncated(model, 2)
  assert two.config.num_layers == 2 and two.tokenizer is model.tokenizer
  mine, theirs = to_flat_params(two), to_flat_params(model)
  assert set(mine) < set(theirs) and not any(n.startswith("layers.2.") for n in mine)
  for name, value in mine.items():
    assert np.array_equal(np.asarray(value), np.asarray(theirs[name]))
  same = truncated(model, model.config.num_layers)
  assert kvjax.generate(same, PROMPTS, max_new_tokens=4).token_ids == kvjax.generate(
      model, PROMPTS, max_new_tokens=4).token_ids
  with pytest.raises(ValueError, match="num_layers=5"):
    truncated(model, 5)


def test_end_to_end(model):
  full = kvjax.generate(model, PROMPTS, max_new_tokens=6)
  every = kvjax.generate(model, PROMPTS, method="speckv", budget=1000, max_new_tokens=6)
  assert every.token_ids == full.token_ids
  half = kvjax.generate(model, PROMPTS, method="speckv:lookahead=8", compression_ratio=0.5,
                        max_new_tokens=6)
  ratio = half.stats["context_cache_bytes"] / full.stats["context_cache_bytes"]
  assert 0.48 < ratio < 0.53 and [len(t) for t in half.token_ids] == [6, 6]


@pytest.mark.parametrize("spec, match", [
    ("speckv:lookahead=0", "lookahead"), ("speckv:kernel_size=6", "odd"),
    ("speckv:draft_fraction=0", "draft_fraction"), ("speckv:window=0", "window")])
def test_bad_hyperparameters(spec, match):
  with pytest.raises(MethodError, match=match):
    kvjax.methods.get(spec)
