"""ThinK's channel-pruned cache: the kept channels against a numpy restatement of the
channel scores, attention through the pruned layout against numpy attention over
zero-filled keys (prefill chunks and decode), the decode kernel against its reference,
memory against the analytic size, and every phase (chunked prefill, questions, score,
conversations, the kernel path) through it."""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

import kvjax
import method_inputs as mi
from kvjax.cache import LayerCache
from kvjax.cache.channel_pruned import ChannelPrunedLayerCache, analytic_nbytes
from kvjax.cache.kv_cache import COLUMN_SUMS, NewTokens
from kvjax.generation import context, engine, inputs
from kvjax.methods import SnapKV, ThinK, base
from pallas_kernels import channel_pruned as cp
from pallas_kernels import reference
from tiny import (assert_same_steps, decode_loops_compiled, greedy_steps,
                  jnp_and_kernel_tokens, random_prompts, tiny_model)

H, K, D, G = mi.H, mi.K, mi.D, mi.G


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _prompts(lengths=(90, 120), seed=0):
  return random_prompts(lengths, seed)


# ------------------------------------------------------------------ numpy restatement


def _np_channels(data, window, ratio):
  """Kept channels [B, K, D'] of every KV head, written from ThinK's description: score_j
  = (sum over the group's heads and the last `window` real queries of q_j^2) * (mean over
  the head's real keys of k_j^2); the floor(ratio * D) lowest-scoring channels are pruned."""
  b = data.q.shape[0]
  pruned = int(np.floor(ratio * D))
  out = np.zeros((b, K, D - pruned), np.int64)
  for row in range(b):
    for kv in range(K):
      q2 = np.zeros(D)
      for t in range(data.q.shape[1] - window, data.q.shape[1]):
        if data.qpos[row, t] < 0:
          continue
        for g in range(G):
          q2 += data.q[row, t, kv * G + g] ** 2
      real = data.kpos[row, kv] >= 0
      k2 = (data.k[row, kv][real] ** 2).mean(0)
      score = q2 * k2
      ranked = np.argsort(-score, kind="stable")
      gap = score[ranked[D - pruned - 1]] - score[ranked[D - pruned]] if pruned else 1.0
      assert gap > 1e-5 * score.max(), "near tie: pick another seed"
      out[row, kv] = np.sort(ranked[:D - pruned])
  return out


@functools.partial(jax.jit, static_argnames=("method", "keep"))
def _compact(arrays, method, keep):
  x = base.LayerInputs(config=mi.config(), layer=0, **arrays)
  cand = LayerCache(keys=x.keys, values=x.values, positions=x.key_positions,
                    end=jnp.int32(x.keys.shape[2]))
  return method.compact(cand, x, keep)


def _pruned_layer(seed, ratio=0.5, window=8, recent=8):
  data = mi.random_prefill(seed)
  method = ThinK(channel_ratio=ratio, window=window, recent=recent)
  return data, _compact(mi.layer_arrays(data), method, data.k.shape[2])


@pytest.mark.parametrize("seed,ratio,window,recent", [
    (0, 0.5, 8, 8), (1, 0.4, 32, 0), (2, 0.25, 5, 40), (3, 0.9, 48, 8)])
def test_kept_channels_and_layout_match_numpy(seed, ratio, window, recent):
  data, layer = _pruned_layer(seed, ratio, window, recent)
  assert isinstance(layer, ChannelPrunedLayerCache)
  channels = _np_channels(data, window, ratio)
  np.testing.assert_array_equal(np.asarray(layer.channels), channels)
  s = data.k.shape[2]
  assert layer.pruned_capacity == s - recent and layer.full.capacity == recent
  keys, values, positions = (np.asarray(a) for a in (layer.keys, layer.values,
                                                      layer.positions))
  full_pos = np.asarray(layer.full.positions)
  for row in range(2):
    for kv in range(K):
      slot_of = {p: i for i, p in enumerate(data.kpos[row, kv]) if p >= 0}
      real = sorted(slot_of)
      # The `recent` newest tokens stay full width, every other token is pruned, once.
      newest = real[-recent:] if recent else []
      assert sorted(p for p in full_pos[row, kv] if p >= 0) == newest
      assert sorted(p for p in positions[row, kv] if p >= 0) == real[:max(0, len(real) - recent)]
      for i, p in enumerate(positions[row, kv]):
        if p < 0:
          continue
        np.testing.assert_array_equal(keys[row, kv, i], data.k[row, kv, slot_of[p]][
            channels[row, kv]])
        np.testing.assert_array_equal(values[row, kv, i], data.v[row, kv, slot_of[p]])
      for i, p in enumerate(full_pos[row, kv]):
        if p >= 0:
          np.testing.assert_array_equal(np.asarray(layer.full.keys)[row, kv, i],
                                        data.k[row, kv, slot_of[p]])


# --------------------------------------------------------------------------- attention


def _np_attention(q, qpos, keys, values, kpos):
  """out [B, T, H, D] and column sums [B, H, S] of q [B, T, H, D] over dense float64 keys."""
  probs = mi.attention(q, keys, qpos, kpos)                       # [B, H, T, S]
  out = np.einsum("bhts,bhsd->bthd", probs, np.repeat(values, G, axis=1))
  return out, probs.sum(2)


def _zero_filled(layer):
  """The layer's slots (pruned, then full) with dropped key channels zeroed, float64."""
  keys = np.asarray(layer.keys, np.float64)
  b, k, s, _ = keys.shape
  dense = np.zeros((b, k, s, D))
  for row in range(b):
    for kv in range(k):
      dense[row, kv][:, np.asarray(layer.channels)[row, kv]] = keys[row, kv]
  f = layer.full
  cat = lambda a, c: np.concatenate([np.asarray(a, np.float64), np.asarray(c, np.float64)], 2)
  return (cat(dense, f.keys), cat(layer.values, f.values),
          np.concatenate([np.asarray(layer.positions), np.asarray(f.positions)], 2))


def _new_tokens(rng, t, start):
  """t new tokens per row at positions start[row] + arange(t) (a chunk or a decode step)."""
  pos = (np.asarray(start)[:, None] + np.arange(t)).astype(np.int32)
  return NewTokens(keys=jnp.asarray(rng.normal(size=(2, K, t, D)), jnp.float32),
                   values=jnp.asarray(rng.normal(size=(2, K, t, D)), jnp.float32),
                   positions=jnp.asarray(pos))


def _queries(rng, t):
  return mi.f32(rng.normal(size=(2, t, H, D)) * 1.5)


@pytest.mark.parametrize("pending", [True, False])
def test_prefill_chunk_attention_equals_zero_filled_numpy(pending):
  """A chunk of T = 6 queries, attended with the chunk pending (compressed prefill, with
  column sums) or appended first (questions): numpy attention over the same slots with
  the pruned slots' dropped channels zeroed."""
  data, layer = _pruned_layer(4)
  rng = np.random.default_rng(5)
  new = _new_tokens(rng, 6, data.lengths)
  q = _queries(rng, 6)
  qpos = np.array(new.positions)
  qpos[1, :2] = -1  # padding tokens: their queries see nothing, their keys are not seen
  new = new.replace(positions=jnp.asarray(qpos))
  if not pending:
    layer = layer.grow(6).append(new)
  want = frozenset({COLUMN_SUMS}) if pending else frozenset()
  out, stats = jax.jit(lambda c, q, p, n: c.attend(q, p, n, want))(
      layer, jnp.asarray(q, jnp.float32), jnp.asarray(qpos), new if pending else None)
  keys, values, kpos = _zero_filled(layer)
  if pending:
    np_new = lambda a: np.asarray(a, np.float64)
    keys = np.concatenate([keys, np_new(new.keys)], 2)
    values = np.concatenate([values, np_new(new.values)], 2)
    kpos = np.concatenate([kpos, np.asarray(new.head_positions())], 2)
  want_out, want_sums = _np_attention(q, qpos, keys, values, kpos)
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-5, atol=1e-5)
  if pending:
    np.testing.assert_allclose(np.asarray(stats.column_sums), want_sums, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("pallas", ["0", "1"])
def test_decode_attention_equals_zero_filled_numpy(pallas, monkeypatch):
  """Decode (T = 1) after two appended tokens, through the jnp path and the kernels."""
  monkeypatch.setenv("KVJAX_PALLAS", pallas)
  data, layer = _pruned_layer(6)
  rng = np.random.default_rng(7)
  layer = layer.grow(2)
  for step in range(2):
    layer = layer.append(_new_tokens(rng, 1, data.lengths + step))
  q = _queries(rng, 1)
  qpos = (data.lengths + 1)[:, None].astype(np.int32)
  out, _ = jax.jit(lambda c, q, p: c.attend(q, p))(layer, jnp.asarray(q, jnp.float32),
                                                   jnp.asarray(qpos))
  want, _ = _np_attention(q, qpos, *_zero_filled(layer))
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ kernel


def _kernel_inputs(rng, b, k, g, s, d, dk, dtype):
  q = jnp.asarray(rng.normal(size=(b, k, g, d)), dtype)
  channels = np.stack([np.sort(rng.permutation(d)[:dk]) for _ in range(b * k)])
  keys = jnp.asarray(rng.normal(size=(b, k, s, dk)), dtype)
  values = jnp.asarray(rng.normal(size=(b, k, s, d)), dtype)
  pos = np.stack([rng.permutation(s) for _ in range(b * k)]).reshape(b, k, s).astype(np.int32)
  pos[rng.random(pos.shape) < 0.2] = -1
  return q, jnp.asarray(channels.reshape(b, k, dk), jnp.int32), keys, values, jnp.asarray(pos)


@pytest.mark.parametrize("g,dk,dtype,return_probs", [
    (2, 16, jnp.float32, True), (3, 7, jnp.float32, False), (4, 16, jnp.bfloat16, True)])
def test_kernel_matches_reference(g, dk, dtype, return_probs):
  rng = np.random.default_rng(g)
  b, k, s, d = 3, 2, 100, 32
  q, channels, keys, values, pos = _kernel_inputs(rng, b, k, g, s, d, dk, dtype)
  qpos = jnp.array([70, -1, 99], jnp.int32)
  got = cp.channel_pruned_decode_attention(q, channels, keys, values, pos, qpos,
                                           return_probs=return_probs, block_k=16)
  want = reference.channel_pruned_decode_attention(q, channels, keys, values, pos, qpos)
  assert got[0].shape == (b, k, g, d) and got[0].dtype == dtype
  assert len(got) == (3 if return_probs else 2)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
  for a, e in zip(got, want):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), **tol)
  assert (np.asarray(got[0][1], np.float32) == 0).all(), "a padding query sees nothing"
  # The gathered-query reference equals dense attention over zero-filled keys.
  filled = np.zeros((b, k, s, d), np.float32)
  for row in range(b):
    for kv in range(k):
      filled[row, kv][:, np.asarray(channels)[row, kv]] = np.asarray(keys, np.float32)[row, kv]
  dense = reference.decode_attention(q, jnp.asarray(filled, dtype), values, pos, qpos)
  for a, e in zip(want, dense):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), **tol)


def test_kernel_tpu_interpreter():
  rng = np.random.default_rng(11)
  q, channels, keys, values, pos = _kernel_inputs(rng, 1, 2, 4, 200, 64, 32, jnp.float32)
  qpos = jnp.array([150], jnp.int32)
  got = cp.channel_pruned_decode_attention(q, channels, keys, values, pos, qpos,
                                           interpret=pltpu.InterpretParams())
  want = reference.channel_pruned_decode_attention(q, channels, keys, values, pos, qpos)
  for a, e in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)


_SD = jax.ShapeDtypeStruct
_PRUNED = (_SD((2, 8, 4, 128), jnp.bfloat16), _SD((2, 8, 64), jnp.int32),
           _SD((2, 8, 4096, 64), jnp.bfloat16), _SD((2, 8, 4096, 128), jnp.bfloat16),
           _SD((2, 8, 4096), jnp.int32), _SD((2,), jnp.int32))
_TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


@pytest.mark.parametrize("return_probs", [False, True])
@pytest.mark.parametrize("platform,marker", [("tpu", "tpu_custom_call"),
                                             ("cuda", "xla.gpu.triton")])
def test_kernel_exports(platform, marker, return_probs):
  fn = functools.partial(cp.channel_pruned_decode_attention, return_probs=return_probs)
  exported = jax.export.export(jax.jit(fn), platforms=[platform],
                               disabled_checks=[_TRITON])(*_PRUNED)
  assert marker in exported.mlir_module()


# ------------------------------------------------------------------------------ memory


def test_memory_matches_analytic_size():
  """SmolLM2's KV shape (3 KV heads, head_dim 64), bf16, 4K context, channel_ratio 0.5:
  the layout's bytes within 5% of the analytic size, and keys take about half."""
  b, k, s, d, recent = 1, 3, 4096, 64, 32
  rng = np.random.default_rng(0)
  dense = LayerCache(keys=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.bfloat16),
                     values=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.bfloat16),
                     positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, k, s)),
                     end=jnp.int32(s))
  kept = d - int(d * 0.5)
  channels = jnp.asarray(np.stack([np.sort(rng.permutation(d)[:kept]) for _ in range(k)])[None],
                         jnp.int32)
  layer = ChannelPrunedLayerCache.from_dense(dense, channels, recent)
  # Restated by hand: per pruned slot 32 bf16 key channels, 64 bf16 values and an int32
  # position; per recent slot full keys, values and position; the channel index; a counter.
  by_hand = 3 * 4064 * ((32 + 64) * 2 + 4) + 3 * 32 * (2 * 64 * 2 + 4) + 3 * 32 * 4 + 4
  assert analytic_nbytes(b, k, s - recent, recent, d, kept, jnp.bfloat16) == by_hand
  assert abs(layer.nbytes - by_hand) <= 0.05 * by_hand
  key_ratio = (layer.keys.nbytes + layer.full.keys.nbytes) / dense.keys.nbytes
  assert 0.49 < key_ratio < 0.51, key_ratio   # (4064 * 32 + 32 * 64) / (4096 * 64) = 0.504
  # Keys halve, values and positions stay: (64 + 128 + 4) / (128 + 128 + 4) bytes per slot.
  assert 0.74 < layer.nbytes / dense.nbytes < 0.77, layer.nbytes / dense.nbytes


def test_prefilled_bytes_match_analytic_size(model):
  prompts = _prompts()
  tokens, mask = inputs.left_pad(prompts, 0)
  width = tokens.shape[1]
  pre = context.prefill(model, tokens, mask, ThinK(recent=16), None, room=0)
  cfg = model.config
  per_layer = analytic_nbytes(2, cfg.num_kv_heads, width - 16, 16, cfg.head_dim,
                              cfg.head_dim // 2, jnp.float32)
  expected = per_layer * cfg.num_layers + 2 * 4   # + the cache's lengths
  assert abs(pre.context_cache_bytes - expected) <= 0.05 * expected
  full = context.prefill(model, tokens, mask, kvjax.methods.get("full"), None, room=0)
  # ThinK stores every slot of the padded prompt: compare with the full cache's allocation.
  assert pre.context_cache_bytes < 0.8 * full.context_cache_allocated_bytes


# -------------------------------------------------------------------------- the model


def test_no_pruning_generates_like_the_full_cache(model):
  prompts = _prompts()
  full = kvjax.generate(model, prompts, max_new_tokens=6)
  for chunk in (None, 32):
    got = kvjax.generate(model, prompts, method=ThinK(channel_ratio=0.0),
                         prefill_chunk_size=chunk, max_new_tokens=6)
    assert got.token_ids == full.token_ids


def test_over_snapkv_keeps_snapkvs_tokens(model):
  prompts = _prompts()
  tokens, mask = inputs.left_pad(prompts, 0)
  snap = context.prefill(model, tokens, mask, SnapKV(window=8), 60, room=0)
  both = context.prefill(model, tokens, mask, ThinK(press=SnapKV(window=8), recent=8), 60,
                         room=0)
  for a, b in zip(snap.cache.layers, both.cache.layers):
    assert isinstance(b, ChannelPrunedLayerCache) and b.capacity == 60
    kept = np.concatenate([np.asarray(b.positions), np.asarray(b.full.positions)], 2)
    np.testing.assert_array_equal(np.sort(kept, -1), np.sort(np.asarray(a.positions), -1))
  assert both.context_cache_bytes < 0.8 * snap.context_cache_bytes
  with pytest.raises(kvjax.KvjaxError, match="needs compression_ratio"):
    kvjax.generate(model, prompts, method=ThinK(press="snapkv"), max_new_tokens=1)


def test_decode_tokens_are_stored_full_width(model):
  prompts = _prompts((70, 80))
  tokens, mask = inputs.left_pad(prompts, 0)
  pre = context.prefill(model, tokens, mask, ThinK(recent=8), None, room=4)
  cache, plan = pre.cache, pre.decode_plan
  before = np.asarray(cache.layers[0].positions)
  assert cache.layers[0].free_slots() == 4 and kvjax.cache.free_slots(cache) == 4
  # The padded width's slots (all but the 8 newest pruned) plus the room.
  assert kvjax.cache.slots_per_head(model.config, cache) == tokens.shape[1] + 4
  for t in range(3):
    _, _, cache = engine.STEPS.decode(model, jnp.asarray([1 + t, 2 + t]), cache,
                                      jax.random.key(0), 1.0, 1.0, True, plan)
  layer = cache.layers[0]
  assert layer.free_slots() == 1
  assert set(layer.logical_axes()) == {"channels", "keys", "values", "positions", "full"}
  np.testing.assert_array_equal(np.asarray(layer.positions), before)
  full = np.asarray(layer.full.positions)
  for row, n in enumerate((70, 80)):
    assert sorted(full[row, 0][full[row, 0] >= 0]) == list(range(n - 8, n + 3))


def test_every_phase_runs_through_the_pruned_cache(model):
  """Chunked prefill, query-agnostic questions and score: exact without pruning, close
  with half the channels pruned."""
  prompts = _prompts()
  question = [[5, 6, 7, 8, 9], [10, 11, 12]]
  full = kvjax.generate(model, prompts, questions=question, max_new_tokens=3)
  exact_scores = kvjax.score(model, prompts, [[1, 2, 3, 4]] * 2)
  for ratio in (0.0, 0.5):
    method = ThinK(channel_ratio=ratio, recent=16)
    got = kvjax.generate(model, prompts, questions=question, method=method,
                         prefill_chunk_size=64, max_new_tokens=3)
    assert len(got.token_ids[0]) == 3
    if ratio == 0.0:
      assert got.token_ids == full.token_ids
    scores = kvjax.score(model, prompts, [[1, 2, 3, 4]] * 2, method=method)
    for a, e in zip(scores, exact_scores):
      assert np.isfinite(a).all()
      if ratio == 0.0:
        np.testing.assert_allclose(a, e, atol=1e-4)


def test_conversation_through_the_pruned_cache(smollm2_tokenizer):
  from tiny import tiny_chat_model
  chat = tiny_chat_model(smollm2_tokenizer, max_position_embeddings=2048)
  text = " ".join(f"Fact {i}: the code word is word{i}." for i in range(12))
  turns = ["First?", "Second?"]
  full = kvjax.converse(chat, text, turns, max_new_tokens=4)
  same = kvjax.converse(chat, text, turns, method=ThinK(channel_ratio=0.0), max_new_tokens=4)
  assert same.answers == full.answers
  half = kvjax.converse(chat, text, turns, method="think", max_new_tokens=4)
  assert len(half.answers[0]) == 2
  # ThinK stores every slot of the padded prompt: compare with the full cache's allocation.
  assert half.stats["context_cache_bytes"] < 0.8 * full.stats["context_cache_allocated_bytes"]


def test_kernel_path_generates_like_jnp(model, monkeypatch):
  prompts = _prompts((70, 80))
  method = ThinK(recent=16)
  want, got = jnp_and_kernel_tokens(model, prompts, monkeypatch, method=method,
                                    max_new_tokens=4)
  assert got == want


@pytest.mark.parametrize("build,match", [
    (lambda: ThinK(channel_ratio=1.0), r"channel_ratio=1.0 must be a number in \[0, 1\)"),
    (lambda: ThinK(channel_ratio=-0.1), r"channel_ratio=-0.1"),
    (lambda: ThinK(channel_ratio=True), r"channel_ratio=True"),
    (lambda: ThinK(channel_ratio="half"), r"channel_ratio='half'"),
    (lambda: ThinK(window=0), r"window=0 must be an integer >= 1"),
    (lambda: ThinK(recent=-1), r"recent=-1 must be an integer >= 0"),
    (lambda: ThinK(recent=2.5), r"recent=2.5"),
    (lambda: ThinK(press="h2o"), "decode-time"),
    (lambda: ThinK(press="adakv"), "head-wise"),
    (lambda: ThinK(press="kivi"), "not a quantization method"),
    (lambda: ThinK(press="full"), "the full cache"),
    (lambda: ThinK(press="nope"), "unknown method 'nope'"),
    (lambda: kvjax.methods.get("think", ratio=0.5), r"no hyperparameters \['ratio'\]"),
])
def test_think_errors(build, match):
  with pytest.raises(kvjax.KvjaxError, match=match):
    build()


def test_a_prompt_of_another_length_decodes_with_the_same_compiled_loop(model):
  """`generate` pads the pruned part with reserved slots to a multiple of 64: prompts whose
  pruned parts round alike share one compiled decode loop, and decode exactly as the
  unpadded cache does."""
  method = ThinK(press=SnapKV(window=8), recent=8)
  tokens, mask = inputs.left_pad(_prompts((70, 80)), 0)
  contexts = [context.prefill(model, tokens, mask, method, 40, room=8, reserve_multiple=m)
              for m in (64, 1)]
  for layer, unpadded in zip(contexts[0].cache.layers, contexts[1].cache.layers):
    assert unpadded.pruned_capacity == 32
    assert layer.pruned_capacity == 64 and layer.full.capacity == 8 + 8
    positions = np.asarray(layer.positions)
    assert (positions[..., 32:] == kvjax.cache.kv_cache.RESERVED_POSITION).all()
    np.testing.assert_array_equal(positions[..., :32], np.asarray(unpadded.positions))
  # Greedy decode steps over both: the reserved slots change nothing.
  assert_same_steps(*(greedy_steps(model, pre, 6)[0] for pre in contexts))

  # Budgets 36 and 46 (of the longer row): 28 and 38 pruned slots.
  assert decode_loops_compiled(model, [_prompts((n, n + 3)) for n in (70, 90)],
                               method=method, compression_ratio=0.5, max_new_tokens=6) == 1
