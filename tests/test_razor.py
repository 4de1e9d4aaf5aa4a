"""RazorAttention: the calibration's echo/induction scores and head ranking against numpy,
the compressed layout (retrieval heads whole, other heads sinks + compensation + window)
against a numpy restatement, the per-model calibration file, and every phase through it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import method_inputs as mi
from kvjax.cache import LayerCache
from kvjax.cache.kv_cache import FlatLayerCache
from kvjax.generation import context, inputs
from kvjax import calibration
from kvjax.methods import RazorAttention, base, razor
from tiny import random_prompts, tiny_config, tiny_model

K, G = mi.K, mi.G


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("KVJAX_CACHE", str(tmp_path))


# ---------------------------------------------------------------------------- calibration


def _np_head_scores(q, k, period):
  """[2, K] float64: per query head the mean over pairs (i, j = i - m * period >= 1) of
  P[i, j] (echo) and P[i, j + 1] (induction), then the max over each KV head's group."""
  t = q.shape[1]
  qpos = np.arange(t)[None].astype(np.int32)
  kpos = np.broadcast_to(qpos[:, None, :], (1, k.shape[1], t))
  probs = mi.attention(q, k, qpos, kpos)[0]                                # [H, T, T]
  echo, induction, count = np.zeros(q.shape[2]), np.zeros(q.shape[2]), 0
  for i in range(t):
    for j in range(i - period, 0, -period):
      echo += probs[:, i, j]
      induction += probs[:, i, j + 1]
      count += 1
  scores = np.stack([echo, induction]) / count
  return scores.reshape(2, k.shape[1], -1).max(-1)


@pytest.mark.parametrize("t,period,block", [(41, 10, 16), (61, 20, 256), (33, 8, 8)])
def test_head_scores_match_numpy(t, period, block):
  rng = np.random.default_rng(t)
  q = mi.f32(rng.normal(size=(1, t, mi.H, mi.D)) * 1.5)
  k = mi.f32(rng.normal(size=(1, K, t, mi.D)))
  got = calibration.head_scores(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), period,
                          block)
  np.testing.assert_allclose(np.asarray(got), _np_head_scores(q, k, period), rtol=1e-4,
                             atol=1e-7)


def test_retrieval_heads_rank_all_pairs():
  rng = np.random.default_rng(0)
  echo, induction = rng.random((10, 4)), rng.random((10, 4))
  heads = razor.retrieval_heads({"echo": echo.tolist(), "induction": induction.tolist()},
                                0.05, 0.2)
  want = np.zeros((10, 4), bool)
  want.reshape(-1)[np.argsort(-echo.reshape(-1))[:2]] = True        # round(0.05 * 40) = 2
  want.reshape(-1)[np.argsort(-induction.reshape(-1))[:8]] = True   # round(0.2 * 40) = 8
  assert heads == tuple(int(sum(1 << h for h in range(4) if want[l, h])) for l in range(10))
  assert razor.retrieval_heads({"echo": echo.tolist(), "induction": induction.tolist()},
                               0.0, 0.0) == (0,) * 10


def test_calibration_is_stored_and_reused(model, monkeypatch, tmp_path):
  first = calibration.calibration(model, period=30)
  assert len(first["echo"]) == model.config.num_layers
  assert np.isfinite(first["echo"]).all() and first["period"] == 30
  files = list((tmp_path / "razor").glob("*.json"))
  assert len(files) == 1
  monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: pytest.fail("recalibrated"))
  assert calibration.calibration(model, period=30) == first
  # Other weights are another model: calibrated again.
  monkeypatch.undo()
  monkeypatch.setenv("KVJAX_CACHE", str(tmp_path))
  other = tiny_model(seed=1)
  assert calibration.calibration(other, period=30)["echo"] != first["echo"]
  assert len(list((tmp_path / "razor").glob("*.json"))) == 2


def test_an_induction_head_is_found():
  """A layer-1 head wired to attend to the token after the previous occurrence of the
  current token (keys carry the previous token's identity, queries the current one's)
  outscores every other head on induction."""
  rng = np.random.default_rng(3)
  period, t = 12, 49
  ids = rng.permutation(40)[:period]
  seq = np.concatenate([[50], np.tile(ids, 4)])
  one_hot = np.eye(64)[seq][:, :mi.D]                                     # [T, D]
  previous = np.concatenate([np.zeros((1, mi.D)), one_hot[:-1]])
  q = rng.normal(size=(1, t, mi.H, mi.D)) * 0.1
  k = rng.normal(size=(1, K, t, mi.D)) * 0.1
  q[0, :, 3] = one_hot * 30.0        # query head 3 (KV head 1): "my token"
  k[0, 1] = previous * 1.0           # KV head 1's keys: "the token before me"
  scores = np.asarray(calibration.head_scores(jnp.asarray(q, jnp.float32),
                                        jnp.asarray(k, jnp.float32), period, 16))
  # Attention splits over the earlier copies, so a perfect head scores about 1/copies.
  assert scores[1, 1] > 0.15 and scores[1, 1] > 4 * scores[1, 0]
  assert scores[1, 1] > 4 * scores[0, 1], "its echo score stays low"


# ------------------------------------------------------------------------------- layout


@functools.partial(jax.jit, static_argnames=("method",))
def _compact(arrays, method):
  x = base.LayerInputs(config=mi.config(), layer=0, **arrays)
  cand = LayerCache(keys=x.keys, values=x.values, positions=x.key_positions,
                    end=jnp.int32(x.keys.shape[2]), state=x.slot_state)
  return method.compact(cand, x, x.keys.shape[2])


def _np_razor(data, tokens, retrieval, local, sinks):
  """Per row and head: {position: (key, value, tokens)} of what the head keeps."""
  out = []
  for row in range(data.k.shape[0]):
    heads = []
    for kv in range(K):
      real = [i for i in np.argsort(data.kpos[row, kv]) if data.kpos[row, kv, i] >= 0]
      entry = lambda i: (data.k[row, kv, i], data.v[row, kv, i], tokens[row, kv, i])
      if retrieval[kv] or len(real) <= local:
        heads.append({int(data.kpos[row, kv, i]): entry(i) for i in real})
        continue
      keep = real[:sinks] + real[len(real) - (local - sinks - 1):]
      dropped = [i for i in real if i not in keep]
      w = tokens[row, kv, dropped]
      comp = ((w[:, None] * data.k[row, kv, dropped]).sum(0) / w.sum(),
              (w[:, None] * data.v[row, kv, dropped]).sum(0) / w.sum(), w.sum())
      slots = {int(data.kpos[row, kv, i]): entry(i) for i in keep}
      slots[int(data.kpos[row, kv, min(dropped)])] = comp
      heads.append(slots)
    out.append(heads)
  return out


@pytest.mark.parametrize("seed,mask,local,sinks", [(0, 1, 20, 4), (1, 2, 12, 0), (2, 0, 40, 2),
                                                   (3, 3, 10, 4)])
def test_layout_matches_numpy(seed, mask, local, sinks):
  data = mi.random_prefill(seed)
  tokens = np.random.default_rng(seed).integers(1, 4, data.kpos.shape).astype(np.float64)
  method = RazorAttention(heads=(mask,), local_capacity=local, sinks=sinks)
  layer = _compact(mi.layer_arrays(data, slot_state=tokens - 1), method)
  assert isinstance(layer, FlatLayerCache)
  retrieval = [(mask >> h) & 1 == 1 for h in range(K)]
  s = data.k.shape[2]
  assert layer.capacity == sum(s if r else local for r in retrieval)
  want = _np_razor(data, tokens, retrieval, local, sinks)
  keys, values = np.asarray(layer.keys, np.float64), np.asarray(layer.values, np.float64)
  pos, heads, state = (np.asarray(a) for a in (layer.positions, layer.heads, layer.state))
  for row in range(2):
    for kv in range(K):
      mine = (heads[row] == kv) & (pos[row] >= 0)
      assert sorted(pos[row][mine]) == sorted(want[row][kv]), (row, kv)
      for i in np.flatnonzero(mine):
        key, value, n = want[row][kv][int(pos[row, i])]
        np.testing.assert_allclose(keys[row, i], key, atol=1e-5)
        np.testing.assert_allclose(values[row, i], value, atol=1e-5)
        assert state[row, i] == n - 1


# --------------------------------------------------------------------------- the model


def test_registry_name_calibrates_and_generates(model):
  prompts = random_prompts((90, 120))
  by_name = kvjax.generate(model, prompts, method="razor:local_capacity=24", max_new_tokens=5)
  bound = calibration.bind("razor:local_capacity=24", model)
  assert bound.heads and len(bound.heads) == model.config.num_layers
  explicit = kvjax.generate(model, prompts, method=bound, max_new_tokens=5)
  assert by_name.token_ids == explicit.token_ids
  full = kvjax.generate(model, prompts, max_new_tokens=5)
  assert by_name.stats["context_cache_bytes"] < 0.75 * full.stats["context_cache_bytes"]
  # Local capacity above the context: every head keeps everything.
  wide = kvjax.generate(model, prompts, method="razor:local_capacity=500", max_new_tokens=5)
  assert wide.token_ids == full.token_ids


def test_every_phase_runs_through_razor(model):
  prompts = random_prompts((90, 120))
  method = RazorAttention(heads=(1, 2), local_capacity=24)
  tokens, mask = inputs.left_pad(prompts, 0)
  pre = context.prefill(model, tokens, mask, method, None, room=0, chunk_size=16)
  for layer, bits in zip(pre.cache.layers, (1, 2)):
    # One retrieval head (120 tokens at most) and one local head (24): capacities do not
    # compound from chunk to chunk.
    assert layer.capacity == 120 + 24, layer.capacity
    pos, heads, state = (np.asarray(a) for a in (layer.positions, layer.heads, layer.state))
    for row, n in enumerate((90, 120)):
      for kv in range(2):
        mine = (heads[row] == kv) & (pos[row] >= 0)
        counted = (1 + state[row][mine]).sum()
        if (bits >> kv) & 1:
          assert mine.sum() == n and counted == n
        else:      # sinks + compensation + window, the compensation counting the rest
          assert mine.sum() == 24 and counted == n
  got = kvjax.generate(model, prompts, questions=[[5, 6, 7], [8, 9]], method=method,
                       prefill_chunk_size=32, max_new_tokens=3)
  assert len(got.token_ids[0]) == 3
  scores = kvjax.score(model, prompts, [[1, 2, 3]] * 2, method=method)
  assert all(np.isfinite(s).all() for s in scores)


def test_conversation_through_razor(smollm2_tokenizer, monkeypatch, tmp_path):
  from tiny import tiny_chat_model
  chat = tiny_chat_model(smollm2_tokenizer, max_position_embeddings=2048)
  text = " ".join(f"Fact {i}: the code word is word{i}." for i in range(12))
  turns = ["First?", "Second?"]
  full = kvjax.converse(chat, text, turns, max_new_tokens=4)
  method = RazorAttention(heads=(0,) * chat.config.num_layers, local_capacity=32)
  got = kvjax.converse(chat, text, turns, method=method, max_new_tokens=4)
  assert len(got.answers[0]) == 2
  assert got.stats["context_cache_bytes"] < 0.5 * full.stats["context_cache_bytes"]


@pytest.mark.parametrize("build,match", [
    (lambda: RazorAttention(heads=(1, -2)), "per-layer bitmasks"),
    (lambda: RazorAttention(heads="x"), "per-layer bitmasks"),
    (lambda: kvjax.methods.get("razor:heads=3,1"), None),
    (lambda: RazorAttention(local_capacity=5, sinks=4), r"local_capacity=5 must be an integer >= sinks \+ 2 = 6"),
    (lambda: RazorAttention(echo_ratio=2.0), "echo_ratio=2.0"),
])
def test_razor_errors(build, match):
  if match is None:          # the command line's form parses: per-layer masks 3 and 1
    assert build().heads == (3, 1)
    return
  with pytest.raises(kvjax.KvjaxError, match=match):
    build()


def test_heads_from_another_model_are_refused(model):
  with pytest.raises(kvjax.KvjaxError, match="calibrated for another model"):
    kvjax.generate(model, random_prompts((50,)), method=RazorAttention(heads=(1,)),
                   max_new_tokens=1)
  with pytest.raises(kvjax.KvjaxError, match="calibrated for another model"):
    kvjax.generate(model, random_prompts((50,)), method=RazorAttention(heads=(8, 1)),
                   max_new_tokens=1)
  with pytest.raises(kvjax.KvjaxError, match="calibrated for another model"):
    kvjax.generate(model, random_prompts((50,)), method=RazorAttention(heads=(1, 1, 1)),
                   max_new_tokens=1)


def test_bytes_match_the_analytic_size():
  """SmolLM2's KV shape (3 KV heads, head_dim 64), bf16, 4K tokens, one retrieval head:
  the layout's bytes within 5% of the slots it must hold."""
  b, k, s, d = 1, 3, 4096, 64
  rng = np.random.default_rng(0)
  cand = LayerCache(keys=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.bfloat16),
                    values=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.bfloat16),
                    positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, k, s)),
                    end=jnp.int32(s), state=jnp.zeros((b, k, s), jnp.float32))
  x = base.LayerInputs(config=tiny_config(num_heads=9, num_kv_heads=3, head_dim=d), layer=0,
                       queries=None, raw_queries=None, query_positions=None, keys=cand.keys,
                       values=cand.values, key_positions=cand.positions,
                       lengths=jnp.asarray([s]))
  layer = RazorAttention(heads=(2,)).compact(cand, x, s)
  slots = s + 2 * 256
  # By hand: per slot a bf16 key and value, an int32 position and owner head, a float32
  # token count; offsets and next-slot counters per head.
  by_hand = slots * (2 * d * 2 + 4 + 4 + 4) + (k + 1) * 4 + k * 4
  assert abs(layer.nbytes - by_hand) <= 0.05 * by_hand, (layer.nbytes, by_hand)
  full = 2 * k * s * d * 2
  assert layer.nbytes / full < 0.42   # a third of the heads whole, the rest 256 of 4096


def test_a_context_of_another_length_decodes_with_the_same_compiled_loop(model, monkeypatch):
  """Razor cuts its retrieval heads to the real context (`trims_padding`), so `generate`
  reserves slots without a budget: prompts whose layers round alike share one compiled
  decode loop, and generate what the unpadded cache generates."""
  from tiny import reserved_and_unreserved
  prompts = [random_prompts((n,), seed=3) for n in (90, 100)]
  (loops, padded), (exact_loops, exact) = reserved_and_unreserved(
      model, prompts, FlatLayerCache, monkeypatch,
      method=RazorAttention(heads=(1, 2), local_capacity=24), max_new_tokens=8)
  # One retrieval head (90 or 100 slots) and one local one (24) per layer, 64 of room per
  # head: 242 or 252 slots per layer, both 256 once reserved.
  assert (loops, exact_loops) == (1, 2)
  assert [r.stats["cache_capacity_tokens"] for r in padded] == [128, 128]
  assert [r.stats["cache_capacity_tokens"] for r in exact] == [121, 126]
  assert [r.token_ids for r in padded] == [r.token_ids for r in exact]
