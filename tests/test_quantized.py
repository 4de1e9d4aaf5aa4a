"""KIVI's quantized cache: the layout's split and flushes against a numpy restatement,
memory against the analytic size, every phase (chunked prefill, questions, score,
conversations) through it, and the kernel path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache import LayerCache, NewTokens
from kvjax.cache.gear import GearLayerCache
from kvjax.cache.quantized import QuantizedLayerCache, analytic_nbytes, flush_ahead
from kvjax.generation import context, conversation, engine, inputs
from kvjax.methods import GEAR, KIVI, PyramidKV, SnapKV
from kvjax.model import transformer
from kernel_inputs import primitive_count
from tiny import (assert_same_steps, decode_loops_compiled, greedy_steps,
                  jnp_and_kernel_tokens, random_prompts, tiny_model)

# head_dim 32 so group 32 and 2-bit packing (16 codes per word) fit the tiny model.
D = 32


@pytest.fixture(scope="module")
def model():
  return tiny_model(head_dim=D)


def _prompts(lengths=(150, 200), seed=0):
  return random_prompts(lengths, seed)


def _np_quantize(x, valid, bits, group, axis):
  """Numpy KIVI quantize -> dequantize of x [S, D] (valid [S]): asymmetric min/max per
  group along tokens (per channel) or channels (per token); empty groups dequantize to 0."""
  levels = 2 ** bits - 1
  out = np.zeros_like(x)
  if axis == "tokens":
    blocks = [(slice(i, i + group), slice(None)) for i in range(0, x.shape[0], group)]
    reduce_axis = 0
  else:
    blocks = [(slice(None), slice(j, j + group)) for j in range(0, x.shape[1], group)]
    reduce_axis = 1
  for rows, cols in blocks:
    block = x[rows, cols]
    mask = np.broadcast_to(valid[rows][:, None], block.shape)
    if not mask.any():
      continue
    big = np.where(mask, block, np.inf).min(reduce_axis, keepdims=True)
    small = np.where(mask, block, -np.inf).max(reduce_axis, keepdims=True)
    lo = np.where(np.isfinite(big), big, 0.0)
    hi = np.where(np.isfinite(small), small, 0.0)
    scale = (hi - lo) / levels
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.where(scale > 0, np.clip(np.floor((block - lo) / safe + 0.5), 0, levels), 0)
    out[rows, cols] = codes * scale + lo
  return out


def _expected_bytes(b, k, n_quant, n_residual, d, bits, group, itemsize):
  """Bytes of one KIVI layer, restated: packed codes for keys and values, a scale and a zero
  per group (keys: `group` slots x 1 channel; values: 1 slot x `group` channels), an int32
  position per slot and head in both parts, the residual's keys and values at full width,
  and the two fill counters."""
  slots = b * k * n_quant
  codes = 2 * slots * d * bits // 8
  key_params = 2 * (slots // group) * d * itemsize
  value_params = 2 * slots * (d // group) * itemsize
  residual = b * k * n_residual * 2 * d * itemsize
  positions = 4 * (slots + b * k * n_residual)
  return codes + key_params + value_params + residual + positions + 2 * 4


def _full_cache(model, prompts):
  tokens, mask = inputs.left_pad(prompts, 0)
  return context.prefill(model, tokens, mask, kvjax.methods.get("full"), None, room=0), mask


@pytest.mark.parametrize("bits", [2, 4])
def test_prefill_split_and_codes_match_numpy(model, bits):
  prompts = _prompts()
  full, mask = _full_cache(model, prompts)
  tokens, _ = inputs.left_pad(prompts, 0)
  method = KIVI(bits=bits, group_size=32, residual=64)
  pre = context.prefill(model, tokens, mask, method, None, room=0)
  width = tokens.shape[1]
  n_quant = (width - 64) // 32 * 32
  for layer, dense in zip(pre.cache.layers, full.cache.layers):
    assert isinstance(layer, QuantizedLayerCache)
    assert layer.quantized.capacity == n_quant and layer.residual.capacity == width - n_quant
    got = layer.dequantized()
    keys, values = np.asarray(dense.keys, np.float64), np.asarray(dense.values, np.float64)
    positions = np.asarray(dense.positions)
    np.testing.assert_array_equal(np.asarray(got.positions), positions)
    # The residual window is exact; the quantized part is KIVI's quantize -> dequantize.
    np.testing.assert_array_equal(np.asarray(got.keys)[:, :, n_quant:], keys[:, :, n_quant:])
    for row in range(2):
      for head in range(model.config.num_kv_heads):
        valid = positions[row, head, :n_quant] >= 0
        for got_x, x, axis in ((got.keys, keys, "tokens"), (got.values, values, "channels")):
          want = _np_quantize(x[row, head, :n_quant], valid, bits, 32, axis)
          have = np.asarray(got_x, np.float64)[row, head, :n_quant][valid]
          np.testing.assert_allclose(have, want[valid], rtol=1e-5, atol=1e-5)


def test_decode_flushes_group_by_group_and_loses_nothing(model):
  prompts = _prompts((90, 100))
  window, group = 32, 32
  method = KIVI(bits=4, group_size=group, residual=window)
  steps = 70
  result = kvjax.generate(model, prompts, method=method, max_new_tokens=steps)
  assert result.stats["generated_tokens"] == [steps, steps]
  # Replay: prefill, then decode the same tokens, checking the layout after every step.
  tokens, mask = inputs.left_pad(prompts, 0)
  pre = context.prefill(model, tokens, mask, method, None, room=80)
  cache, plan = pre.cache, pre.decode_plan
  flushed_at = []
  for t in range(steps - 1):
    next_tokens = jnp.asarray([result.token_ids[r][t] for r in range(2)])
    _, _, cache = engine.STEPS.decode(model, next_tokens, cache, jax.random.key(0), 1.0, 1.0,
                                      True, plan)
    layer = cache.layers[0]
    fill, end = int(layer.residual.end), int(layer.end)
    assert window <= fill < window + group and end % group == 0
    flushed_at.append(end)
    lengths = np.asarray(cache.lengths)
    positions = np.concatenate([np.asarray(layer.quantized.positions),
                                np.asarray(layer.residual.positions)], axis=2)
    for row in range(2):
      for head in range(model.config.num_kv_heads):
        kept = positions[row, head][positions[row, head] >= 0]
        assert sorted(kept.tolist()) == list(range(lengths[row])), "every token kept once"
        newest = np.asarray(layer.residual.positions)[row, head][:fill]
        assert newest.max() == lengths[row] - 1 and len(newest) >= window
  assert len(set(flushed_at)) > 1, "decode must have flushed at least one group"


# Groups of 32 and (unless told) residual windows of 32 tokens: a residual of 63 tokens
# flushes its oldest group on the next append, one of 58 does not.
_LAYOUTS = {
    "kivi": lambda dense, bits, window: QuantizedLayerCache.from_dense(dense, bits, 32, window),
    "gear": lambda dense, bits, window: GearLayerCache.from_dense(
        dense, bits=bits, group=32, window=window, rank=4, decode_rank=2, loops=3,
        outlier_ratio=0.05),
}


def _layer(kind, tokens, bits=2, seed=0, window=32):
  """A layer of `kind` from `tokens` dense slots [2, 2, tokens, D], with room for 8 more."""
  rng = np.random.default_rng(seed)
  dense = LayerCache(
      keys=jnp.asarray(rng.normal(size=(2, 2, tokens, D)), jnp.float32),
      values=jnp.asarray(rng.normal(size=(2, 2, tokens, D)), jnp.float32),
      positions=jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (2, 2, tokens)),
      end=jnp.int32(tokens))
  return _LAYOUTS[kind](dense, bits, window).grow(8)


def _chunk(seed, start, n):
  """n new tokens [2, 2, n, D] at positions start, start + 1, ... in both rows."""
  rng = np.random.default_rng(seed)
  return NewTokens(keys=jnp.asarray(rng.normal(size=(2, 2, n, D)), jnp.float32),
                   values=jnp.asarray(rng.normal(size=(2, 2, n, D)), jnp.float32),
                   positions=jnp.broadcast_to(start + jnp.arange(n, dtype=jnp.int32), (2, n)))


def _token(seed, position):
  """One new token [2, 2, 1, D] at `position` in both rows."""
  return _chunk(seed, position, 1)


@pytest.mark.parametrize("kind", ["kivi", "gear"])
def test_flushing_ahead_then_appending_one_token_equals_appending(kind):
  """Layers of one family (two flushing, one not), one of another family (4 bits), two
  without a window (a full group waiting flushes, 31 tokens do not) and a dense layer:
  flush_ahead then a one-token append leaves every layer as the append alone does (the
  same group flushed, encoded with the other layers' in one call)."""
  full_group = _layer(kind, 95, seed=5, window=0).append(_token(8, 95))
  layers = (_layer(kind, 95, seed=0), _layer(kind, 90, seed=1), _layer(kind, 95, seed=2),
            _layer(kind, 95, bits=4, seed=3), _layer(kind, 95, seed=4, window=0), full_group,
            _layer("kivi", 90).residual)
  assert [int(c.residual.end) for c in layers[:6]] == [63, 58, 63, 63, 31, 32]
  ends = [int(c.end) for c in layers[:6]]
  new = _token(9, 96)
  ahead = jax.jit(lambda c: flush_ahead(c, 1))(layers)
  assert [int(c.end) - end for c, end in zip(ahead, ends)] == [32, 0, 32, 32, 0, 32]
  assert [c.flushed_ahead for c in ahead[:6]] == [True] * 6
  for got_layer, want_layer in zip(ahead, layers):
    got, want = got_layer.append(new), want_layer.append(new)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      if kind == "kivi" or a.dtype != jnp.float32:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      else:  # GEAR's factors: QR and products over a larger batch
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  # A chunk of more tokens is flushed by its append (it may push out new tokens too).
  assert flush_ahead(layers, 2) is layers
  # A begin again before the appends (a policy skipping a layer's append) is refused.
  with pytest.raises(kvjax.KvjaxError, match=r"layers \[0, 1, 2, 3, 4, 5\] were flushed ahead"):
    flush_ahead(ahead, 1)


@pytest.mark.parametrize("kind", ["kivi", "gear"])
def test_without_a_window_a_decode_step_flushes_past_tokens_only(kind):
  """Without a window (GEAR's streaming buffer): one-token appends fill the residual to a
  whole group, which the step then attends exactly; the next one-token append compresses
  that group, as a chunk of both tokens would, and keeps its own token exact. A chunk
  compresses every whole group, its own tokens included."""
  layer = _layer(kind, 95, window=0)      # 64 compressed, 31 waiting
  start = int(layer.end)
  filled = layer.append(_token(1, 95))
  assert (int(filled.end), int(filled.residual.end)) == (start, 32)
  np.testing.assert_array_equal(np.asarray(filled.residual.keys[:, :, 31]),
                                np.asarray(_token(1, 95).keys[:, :, 0]))
  step = filled.append(_token(2, 96))
  assert (int(step.end), int(step.residual.end)) == (start + 32, 1)
  np.testing.assert_array_equal(np.asarray(step.residual.keys[:, :, 0]),
                                np.asarray(_token(2, 96).keys[:, :, 0]))
  np.testing.assert_array_equal(np.asarray(step.residual.positions[:, :, 0]), 96)
  # The group stored is the full residual before the step (tokens 64..95), encoded.
  group = jax.jit(lambda c: c.encode_group(*c.oldest_group()))(filled)
  rewritten = step.replace(end=jnp.int32(start)).write_group(group).replace(end=step.end)
  for got, want in zip(jax.tree.leaves(step), jax.tree.leaves(rewritten)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # The same two tokens as one chunk: the group its first token completes is compressed
  # after writing, and its second token waits alone.
  first, second = _token(1, 95), _token(2, 96)
  pair = NewTokens(keys=jnp.concatenate([first.keys, second.keys], axis=2),
                   values=jnp.concatenate([first.values, second.values], axis=2),
                   positions=jnp.concatenate([first.positions, second.positions], axis=1))
  chunk = layer.append(pair)
  assert (int(chunk.end), int(chunk.residual.end)) == (start + 32, 1)
  for got, want in zip(jax.tree.leaves(chunk), jax.tree.leaves(step)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("kind", ["kivi", "gear"])
@pytest.mark.parametrize("window", [0, 32])
def test_a_chunk_of_free_slots_tokens_fits_and_one_more_would_not(kind, window):
  """free_slots is exact for a chunk when the compressed room is what bounds it (a long
  residual after earlier flushes), also with a full group waiting without a window: a
  chunk of free_slots() tokens keeps every position once, and one token more would push
  out a group the compressed storage has no room for (its write would be clamped over
  the last group)."""
  layer = _layer(kind, 95, window=window).grow(96).append(_chunk(0, 95, 64))
  states = [layer, layer.append(_token(1, 159))]
  if window == 0:
    assert int(states[1].residual.end) == 32   # a full group waiting
  for layer in states:
    free = layer.free_slots()
    assert free < layer.residual.free_slots()  # the compressed room bounds it
    start = int(np.asarray(layer.slot_positions()).max()) + 1
    got = layer.append(_chunk(2, start, free))
    kept = np.asarray(got.slot_positions())[0, 0]
    assert int(got.end) <= got.flushed_capacity
    assert sorted(kept[kept >= 0].tolist()) == list(range(start + free))
    over = layer.append(_chunk(3, start, free + 1))
    assert int(over.end) > over.flushed_capacity


class _WithoutBegin:
  """A policy's steps without its `begin`: every layer flushes inside its own append."""

  def __init__(self, policy):
    self.policy = policy

  def prepare(self, *args):
    return self.policy.prepare(*args)

  def update(self, *args):
    return self.policy.update(*args)

  def finish(self, *args):
    return self.policy.finish(*args)


@pytest.mark.parametrize("method,keep", [
    (KIVI(bits=2, group_size=32, residual=32), None),
    (GEAR(group_size=32), None),   # GEAR's default: no window
    (GEAR(group_size=32, residual=32), None),
    (KIVI(bits=2, group_size=32, residual=32, press=PyramidKV(window=8)), 40),
], ids=["kivi", "gear-no-window", "gear", "pyramidkv-kivi"])
def test_decode_steps_with_and_without_flushing_ahead_agree(model, method, keep):
  """56 decode steps (flushes included; per-layer budgets under PyramidKV) give the same
  logits and caches whether the plan flushes ahead or each layer flushes in its append."""
  tokens, mask = inputs.left_pad(_prompts((90, 100)), 0)
  pre = context.prefill(model, tokens, mask, method, keep, room=64)
  if keep is not None:  # the layers fill their windows out of step
    assert len({int(layer.residual.end) for layer in pre.cache.layers}) > 1
  steps = {name: jax.jit(lambda cache, tok, policy=policy: transformer.forward(
      model.graphdef, model.params, tok[:, None], jnp.ones((2, 1), bool), cache, "last",
      policy)) for name, policy in (("ahead", pre.decode_plan),
                                    ("in-append", _WithoutBegin(pre.decode_plan)))}
  caches = {name: pre.cache for name in steps}
  for t in range(56):
    tok = jnp.asarray([(7 * t + 3) % 256, (11 * t + 5) % 256], jnp.int32)
    logits = {}
    for name, step in steps.items():
      logits[name], caches[name] = step(caches[name], tok)
    np.testing.assert_allclose(np.asarray(logits["ahead"]), np.asarray(logits["in-append"]),
                               rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(caches["ahead"]), jax.tree.leaves(caches["in-append"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  ends = [int(layer.end) for layer in caches["ahead"].layers]
  assert all(end > int(layer.end) for end, layer in zip(ends, pre.cache.layers)), (
      "every layer must have flushed a group")


@pytest.mark.parametrize("method", [KIVI(bits=2, group_size=32, residual=32),
                                    GEAR(group_size=32, residual=32), GEAR(group_size=32)],
                         ids=["kivi", "gear", "gear-no-window"])
def test_a_decode_step_encodes_every_layers_group_in_one_call(method):
  """The packing shifts a decode step traces do not grow with the layers: one encoding for
  all layers (30 per-layer GEAR(residual=64) compressions cost 6-8 s of SmolLM2's decode
  loop compile; for GEAR's default, without a window, XLA compiled it in 20.6 s with
  them and 16.1 s without)."""
  counts = []
  for layers in (2, 4):
    model = tiny_model(head_dim=D, num_layers=layers)
    tokens, mask = inputs.left_pad(_prompts((90, 100)), 0)
    pre = context.prefill(model, tokens, mask, method, None, room=8)
    step = lambda cache: transformer.forward(model.graphdef, model.params,
                                             jnp.ones((2, 1), jnp.int32), jnp.ones((2, 1), bool),
                                             cache, "last", pre.decode_plan)
    counts.append(primitive_count(step, (pre.cache,), "shift_left"))
  assert counts[0] == counts[1] > 0


def test_memory_matches_analytic_size():
  """KIVI 2/4-bit and SnapKV + KIVI-4 at SmolLM2's KV shape (3 KV heads, head_dim 64), bf16,
  4K context: the layout's bytes within 5% of codes + scales + zeros + residual + slot
  positions, and the byte ratios against the full bf16 cache."""
  b, k, s, d = 1, 3, 4096, 64
  rng = np.random.default_rng(0)
  dense = LayerCache(keys=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.bfloat16),
                     values=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.bfloat16),
                     positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, k, s)),
                     end=jnp.int32(s))
  full = dense.nbytes
  ratios = {}
  for bits, kept in ((2, s), (4, s), (4, s // 2)):
    layer = QuantizedLayerCache.from_dense(dense.select(jnp.broadcast_to(
        jnp.arange(kept), (b, k, kept))), bits, 32, 128)
    n_quant = (kept - 128) // 32 * 32
    assert layer.nbytes == _expected_bytes(b, k, n_quant, kept - n_quant, d, bits, 32, 2)
    assert layer.nbytes == analytic_nbytes(b, k, n_quant, kept - n_quant, d, bits, 32,
                                           jnp.bfloat16)
    ratios[(bits, kept)] = layer.nbytes / full
  # Against the full bf16 cache (16 bits per value + a 4-byte position per slot and head:
  # 260 bytes per slot and head at D=64): 2-bit codes + a bf16 scale and zero per 32 values
  # = 3 bits per value (48 B) + a position (4 B) = 52 B for 3968 slots, the newest 128 at
  # 260 B: 0.225. Below 0.2 would need larger groups or no per-slot positions.
  assert 0.20 < ratios[(2, s)] < 0.24
  assert 0.33 < ratios[(4, s)] < 0.36
  # SnapKV at 0.5 + KIVI-4: half the tokens at about a third of the bytes each.
  assert 0.16 < ratios[(4, s // 2)] < 0.19


def test_every_phase_reads_through_the_quantized_cache(model):
  """Chunked prefill, query-agnostic questions, score and conversations with KIVI; 8-bit
  codes stay close to the full cache."""
  prompts = _prompts()
  method = KIVI(bits=8, group_size=32, residual=32)
  question = [[5, 6, 7, 8, 9], [10, 11, 12]]
  full = kvjax.generate(model, prompts, questions=question, max_new_tokens=3)
  for chunk in (None, 64):
    got = kvjax.generate(model, prompts, questions=question, method=method,
                         prefill_chunk_size=chunk, max_new_tokens=3)
    assert got.token_ids == full.token_ids
  exact = kvjax.score(model, prompts, [[1, 2, 3, 4]] * 2)
  approx = kvjax.score(model, prompts, [[1, 2, 3, 4]] * 2, method=method)
  for a, e in zip(approx, exact):
    np.testing.assert_allclose(a, e, atol=0.05)
  # A conversation reuses the quantized cache turn after turn (flushing as it grows).
  turns = [[[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]]
  pre = context.prefill(model, *inputs.left_pad(prompts, 0), method, None, room=0)
  room = conversation.turn_room(turns, 40)
  chat = conversation.run_turns(model, pre, turns, 40, room)
  full_pre = context.prefill(model, *inputs.left_pad(prompts, 0), kvjax.methods.get("full"),
                             None, room=2 * room)
  full_chat = conversation.run_turns(model, full_pre, turns, 40, room)
  assert [len(t) for row in chat["token_ids"] for t in row] == [40] * 4
  for row in range(2):
    assert chat["token_ids"][row][0][:3] == full_chat["token_ids"][row][0][:3]
  coarse = kvjax.score(model, prompts, [[1, 2, 3, 4]] * 2, method=KIVI(bits=2, residual=32))
  assert max(np.abs(c - e).max() for c, e in zip(coarse, exact)) > max(
      np.abs(a - e).max() for a, e in zip(approx, exact)), "2-bit must cost more than 8-bit"


def test_snapkv_then_kivi_keeps_snapkv_tokens(model):
  prompts = _prompts()
  tokens, mask = inputs.left_pad(prompts, 0)
  snap = context.prefill(model, tokens, mask, SnapKV(window=8), 100, room=0)
  both = context.prefill(model, tokens, mask, KIVI(bits=4, residual=32, press=SnapKV(window=8)),
                         100, room=0)
  for a, b in zip(snap.cache.layers, both.cache.layers):
    np.testing.assert_array_equal(np.asarray(b.dequantized().positions),
                                  np.asarray(a.positions))
  n_quant = (100 - 32) // 32 * 32
  per_layer = _expected_bytes(2, model.config.num_kv_heads, n_quant, 100 - n_quant, D, 4, 32,
                              4)
  expected = per_layer * model.config.num_layers + 2 * 4   # + the cache's lengths
  assert both.context_cache_bytes == expected
  assert both.context_cache_bytes < 0.5 * snap.context_cache_bytes


@pytest.mark.parametrize("lengths", [(70, 80), (20, 30)], ids=["quantized", "window-only"])
def test_kernel_path_generates_like_jnp(model, monkeypatch, lengths):
  """Also with prompts shorter than the residual window (an empty quantized part)."""
  prompts = _prompts(lengths)
  method = KIVI(bits=4, group_size=32, residual=32)
  want, got = jnp_and_kernel_tokens(model, prompts, monkeypatch, method=method,
                                    max_new_tokens=4)
  assert got == want


@pytest.mark.parametrize("build,match", [
    (lambda: KIVI(bits=3), r"bits=3"),
    (lambda: KIVI(group_size=24), "power of two"),
    (lambda: KIVI(press="h2o"), "decode-time"),
    (lambda: KIVI(press="adakv"), "head-wise"),
    (lambda: KIVI(press="think"), "not a channels method"),
    (lambda: KIVI(press="kivi"), "not a quantization method"),
    (lambda: kvjax.methods.get("sinks_window", press="kivi"), "wraps token-selecting"),
    (lambda: kvjax.methods.AdaKV(press="mikv"), "wraps token-selecting"),
])
def test_kivi_errors(build, match):
  with pytest.raises(kvjax.KvjaxError, match=match):
    build()


def test_a_ratio_for_a_method_that_keeps_every_token_is_an_error(model):
  with pytest.raises(kvjax.KvjaxError, match="keeps every token.*press"):
    kvjax.generate(model, _prompts(), method="kivi", compression_ratio=0.5, max_new_tokens=2)


def test_a_prompt_of_another_length_decodes_with_the_same_compiled_loop(model):
  """`generate` pads the quantized part with empty groups to a multiple of 64 slots: prompts
  whose quantized parts round alike share one compiled decode loop, decode exactly as the
  unpadded cache does, and later flushes fill the padding as room."""
  method = KIVI(bits=4, group_size=32, residual=32, press=SnapKV(window=8))
  tokens, mask = inputs.left_pad(_prompts((150, 160)), 0)
  # Budget 100: 64 quantized slots and 36 in the residual; room 8 adds one group (96).
  contexts = [context.prefill(model, tokens, mask, method, 100, room=8, reserve_multiple=m)
              for m in (64, 1)]
  for layer, unpadded in zip(contexts[0].cache.layers, contexts[1].cache.layers):
    assert unpadded.quantized.capacity == 96 and layer.quantized.capacity == 128
    assert layer.residual.capacity == unpadded.residual.capacity == 32 + 32 - 1 + 8
    positions = np.asarray(layer.quantized.positions)
    assert (positions[..., 64:] == kvjax.cache.kv_cache.EMPTY_POSITION).all()
    np.testing.assert_array_equal(positions[..., :96], np.asarray(unpadded.quantized.positions))
  # Greedy decode steps over both: the residual (36 tokens) flushes a group at step 28,
  # into slots [64, 96), which both hold; the padded cache's next flush (step 59) fills
  # the padding [96, 128) as room.
  (got, padded_cache), (want, exact_cache) = (greedy_steps(model, pre, n)
                                              for pre, n in zip(contexts, (62, 50)))
  assert_same_steps(got, want)
  assert int(exact_cache.layers[0].end) == 96
  padded = padded_cache.layers[0]
  assert int(padded.end) == 128
  positions = np.asarray(padded.quantized.positions)
  assert (positions[..., 96:] > positions[..., 64:96].max(-1, keepdims=True)).all(), (
      "the second flush wrote the next group into the padding")

  # Budgets 136 and 171 (of the longer row): 96 and 128 quantized slots, 160 and 192 after
  # a room of 64 (two groups), both 192 once padded.
  assert decode_loops_compiled(model, [_prompts((n, n + 3)) for n in (270, 340)],
                               method=method, compression_ratio=0.5, max_new_tokens=6) == 1
