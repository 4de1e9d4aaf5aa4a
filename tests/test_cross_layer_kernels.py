"""Fused decode attention over cross-layer caches (xKV's low-rank groups, MiniCache's merged
pairs): each jnp reference against the old dense path (the cache's own `rebuilt` keys and
values, then plain decode attention), each Pallas kernel (interpret mode) against its
reference, TPU/CUDA exports, and the tiny model decoding through the fused path against
the dense path.

The inputs make the parts that are easy to get wrong matter: slot positions up to 100
(RoPE turns keys far from their pre-RoPE values) and retained slots with large vectors,
keys and values retained at partly overlapping slots; each reference test asserts that
skipping RoPE (or the retained keys, or the retained values) changes the output by far
more than its tolerance.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

import kernel_inputs
from kernel_inputs import close

from kvjax.cache import cross_layer as cache
from kvjax.cache.kv_cache import init_layer_cache
from kvjax.generation import context, engine, inputs
from kvjax.methods import XKV, MiniCache
from pallas_kernels import cross_layer as cl
from pallas_kernels import decode_attention as da
from pallas_kernels import reference
from tiny import random_prompts, tiny_model

_lowrank_reference = jax.jit(reference.lowrank_decode_attention)
_merged_reference = jax.jit(reference.merged_decode_attention)


def _close(actual, expected, dtype):
  """f32: kernel_inputs' bound. bf16: the kernels round rebuilt keys (and MiniCache's
  values) to bf16 before their dots, the references stay in f32: a bound that scales."""
  if dtype == jnp.float32:
    return close(actual, expected, dtype)
  expected = np.asarray(expected, np.float32)
  np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=2e-2,
                             atol=2e-2 * max(1.0, float(np.abs(expected).max())))


def _normal(rng, shape, dtype=jnp.float32, scale=1.0):
  return jnp.asarray(scale * rng.normal(size=shape), dtype)


def _inv_freq(d):
  return jnp.asarray(1.0 / 10000.0 ** (np.arange(0, d, 2) / d), jnp.float32)


def _query_positions(s, b):
  """Rows that see every slot, about half of them, and nothing (a padding query)."""
  return jnp.asarray(([s - 1, s // 2, -1] * b)[:b], jnp.int32)


def _dense_out(q, keys, values, positions, qpos):
  """Plain decode attention (the dense path's) over rebuilt keys/values, float32."""
  out, lse, _ = reference.decode_attention(q.astype(jnp.float32), keys.astype(jnp.float32),
                                           values.astype(jnp.float32), positions, qpos)
  return out, lse


# ------------------------------------------------------------------------------- xKV

# name: (B, K, G, D, S, r_k, r_v)
LOWRANK = {
    "gqa": (3, 2, 3, 16, 100, 5, 7),        # S spans two 64-slot chunks, padded
    "mha": (2, 3, 1, 32, 40, 12, 3),
    "wide": (1, 2, 4, 16, 70, 16, 16),
}


def _lowrank(rng, name, dtype=jnp.float32):
  b, k, g, d, s, rk, rv = LOWRANK[name]
  slots = cl.LowRankSlots(key_basis=_normal(rng, (b, s, rk), dtype),
                          value_basis=_normal(rng, (b, s, rv), dtype),
                          key_coefficients=_normal(rng, (b, rk, k * d), dtype, 0.5),
                          value_coefficients=_normal(rng, (b, rv, k * d), dtype, 0.5))
  pos = jnp.asarray(kernel_inputs.shuffled_positions(rng, (b, s)))
  return _normal(rng, (b, k, g, d), dtype), slots, pos, _query_positions(s, b)


@functools.partial(jax.jit, static_argnames=("inv_freq",))
def _lowrank_dense(q, slots, pos, qpos, inv_freq):
  """The old path: `LowRankLayerCache.rebuilt` (basis @ coefficients, RoPE), then plain
  attention."""
  b, k, _, d = q.shape
  layer = cache.LowRankLayerCache(
      key_coefficients=slots.key_coefficients, value_coefficients=slots.value_coefficients,
      positions=jnp.broadcast_to(pos[:, None], (b, k, pos.shape[1])),
      tail=init_layer_cache(b, k, 0, d, jnp.float32),
      shared=cache.Basis(keys=slots.key_basis, values=slots.value_basis), inv_freq=inv_freq)
  keys, values = layer.rebuilt()
  return _dense_out(q, keys, values, layer.positions, qpos)


@pytest.mark.parametrize("name", sorted(LOWRANK))
def test_lowrank_reference_equals_the_dense_path(name):
  rng = kernel_inputs.rng(len(name))
  q, slots, pos, qpos = _lowrank(rng, name)
  d = q.shape[-1]
  inv_freq = _inv_freq(d)
  got = _lowrank_reference(q, slots, pos, inv_freq, qpos)
  want = _lowrank_dense(q, slots, pos, qpos, tuple(float(f) for f in inv_freq))
  assert got[0].shape == q.shape and got[1].shape == q.shape[:3]
  for a, e in zip(got, want):
    close(a, e, jnp.float32)
  if q.shape[0] > 2:   # row 2 queries at -1: sees nothing
    np.testing.assert_array_equal(np.asarray(got[0][2]), 0.0)
  # Without RoPE the keys would give another output (so the comparison checks it).
  unrotated = _lowrank_dense(q, slots, pos, qpos, (0.0,) * (d // 2))
  assert np.abs(np.asarray(unrotated[0]) - np.asarray(want[0])).max() > 1e-2


def _check_kernel_output(got, want, q, dtype):
  """A kernel's (out, lse) against its reference's: shape, dtype, finite, close; a row
  whose query sits at position -1 (row 2, when there is one) sees nothing."""
  assert got[0].shape == q.shape and got[0].dtype == dtype
  for a, e in zip(got, want):
    assert np.isfinite(np.asarray(a, np.float32)).all()
    _close(a, e, dtype)
  if q.shape[0] > 2:   # row 2 queries at -1
    np.testing.assert_array_equal(np.asarray(got[0][2], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(got[1][2]), np.float32(da.EMPTY_LSE))


@pytest.mark.parametrize("name,dtype", [("gqa", jnp.float32), ("mha", jnp.float32),
                                        ("wide", jnp.float32), ("gqa", jnp.bfloat16)])
def test_lowrank_kernel_matches_reference(name, dtype):
  rng = kernel_inputs.rng(len(name) + 5)
  q, slots, pos, qpos = _lowrank(rng, name, dtype)
  inv_freq = _inv_freq(q.shape[-1])
  # block_k 16, chunks of 64: S = 100 or 70 is padded and spans two chunks.
  got = cl.lowrank_decode_attention(q, slots, pos, inv_freq, qpos, block_k=16)
  want = _lowrank_reference(q, slots, pos, inv_freq, qpos)
  _check_kernel_output(got, want, q, dtype)


def test_lowrank_kernel_tpu_interpreter():
  """TPU semantics (block shapes, DMA) on the TPU interpreter with TPU block sizes."""
  rng = kernel_inputs.rng(17)
  b, k, g, d, s, rk, rv = 1, 2, 2, 16, 150, 4, 6
  slots = cl.LowRankSlots(_normal(rng, (b, s, rk)), _normal(rng, (b, s, rv)),
                          _normal(rng, (b, rk, k * d)), _normal(rng, (b, rv, k * d)))
  pos = jnp.asarray(kernel_inputs.shuffled_positions(rng, (b, s)))
  args = (_normal(rng, (b, k, g, d)), slots, pos, _inv_freq(d), jnp.array([120], jnp.int32))
  got = cl.lowrank_decode_attention(*args, interpret=pltpu.InterpretParams())
  for a, e in zip(got, _lowrank_reference(*args)):
    close(a, e, jnp.float32)


# ------------------------------------------------------------------------- MiniCache

# name: (B, K, G, D, S, R_k, R_v, shared): `shared` of the value slots are key slots too.
MERGED = {
    "gqa": (3, 2, 3, 16, 100, 6, 5, 2),
    "mha": (2, 3, 1, 32, 40, 3, 4, 3),
    "wide": (1, 2, 4, 16, 70, 8, 8, 0),
    "none": (2, 2, 2, 16, 50, 0, 0, 0),       # nothing retained
}


def _retained(rng, pos, count, prefer=None, shared=0):
  """[B, K, count] distinct valid slots per head (the first `shared` taken from `prefer`),
  sorted, one entry replaced by -1 (no slot) where there are at least 3."""
  b, k, _ = pos.shape
  index = np.full((b, k, count), -1, np.int32)
  for row in range(b):
    for head in range(k):
      valid = np.flatnonzero(pos[row, head] >= 0)
      first = [] if prefer is None else [int(x) for x in prefer[row, head] if x >= 0][:shared]
      rest = rng.permutation(np.setdiff1d(valid, first))[:count - len(first)]
      picked = np.sort(np.concatenate([first, rest]).astype(np.int32))
      if count >= 3:
        picked[count // 2] = -1
      index[row, head, :len(picked)] = picked
  return index


def _merged(rng, name, dtype=jnp.float32):
  b, k, g, d, s, rk, rv, shared = MERGED[name]
  pos = kernel_inputs.shuffled_positions(rng, (b, k, s))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  ki = _retained(rng, pos, rk)
  vi = _retained(rng, pos, rv, ki, shared)
  if shared:
    assert any(set(ki[r, h]) & set(vi[r, h]) - {-1} for r in range(b) for h in range(k))
  slots = cl.MergedSlots(
      key_norms=jnp.asarray(rng.uniform(0.5, 3.0, (b, k, s)), dtype),
      value_norms=jnp.asarray(rng.uniform(0.5, 3.0, (b, k, s)), dtype),
      key_directions=jnp.asarray(unit(rng.normal(size=(b, k, s, d))), dtype),
      value_directions=jnp.asarray(unit(rng.normal(size=(b, k, s, d))), dtype),
      key_index=jnp.asarray(ki), key_vectors=_normal(rng, (b, k, rk, d), dtype, 3.0),
      value_index=jnp.asarray(vi), value_vectors=_normal(rng, (b, k, rv, d), dtype, 3.0))
  return _normal(rng, (b, k, g, d), dtype), slots, jnp.asarray(pos), _query_positions(s, b)


def _merged_layer(slots, pos):
  b, k, _, d = slots.key_directions.shape
  return cache.MergedLayerCache(
      key_norms=slots.key_norms, value_norms=slots.value_norms, positions=pos,
      retained_keys=cache.Retained(slots.key_index, slots.key_vectors),
      retained_values=cache.Retained(slots.value_index, slots.value_vectors),
      tail=init_layer_cache(b, k, 0, d, jnp.float32),
      shared=cache.Directions(keys=slots.key_directions, values=slots.value_directions))


@jax.jit
def _merged_dense(q, slots, pos, qpos):
  """The old path: `MergedLayerCache.rebuilt` (norm x direction, retained slots put
  back), then plain attention."""
  keys, values = _merged_layer(slots, pos).rebuilt()
  return _dense_out(q, keys, values, pos, qpos)


def _without(slots, part):
  """The slots with every `part` ("key" or "value") retention dropped."""
  index = getattr(slots, f"{part}_index")
  return slots._replace(**{f"{part}_index": jnp.full_like(index, -1)})


@pytest.mark.parametrize("name", sorted(MERGED))
def test_merged_reference_equals_the_dense_path(name):
  rng = kernel_inputs.rng(len(name) + 40)
  q, slots, pos, qpos = _merged(rng, name)
  got = _merged_reference(q, slots, pos, qpos)
  want = _merged_dense(q, slots, pos, qpos)
  assert got[0].shape == q.shape and got[1].shape == q.shape[:3]
  for a, e in zip(got, want):
    close(a, e, jnp.float32)
  # Dropping the retained keys, or values, would give another output.
  for part in ("key", "value"):
    if getattr(slots, f"{part}_index").shape[-1]:
      other = _merged_dense(q, _without(slots, part), pos, qpos)
      assert np.abs(np.asarray(other[0]) - np.asarray(want[0])).max() > 1e-2, part


@pytest.mark.parametrize("name,dtype", [("gqa", jnp.float32), ("mha", jnp.float32),
                                        ("wide", jnp.float32), ("none", jnp.float32),
                                        ("gqa", jnp.bfloat16)])
def test_merged_kernel_matches_reference(name, dtype):
  rng = kernel_inputs.rng(len(name) + 60)
  q, slots, pos, qpos = _merged(rng, name, dtype)
  got = cl.merged_decode_attention(q, slots, pos, qpos, block_k=16)
  want = _merged_reference(q, slots, pos, qpos)
  _check_kernel_output(got, want, q, dtype)


def test_retained_slots_are_each_attended_once():
  """The slots the kernel skips are exactly those with a retained part, and the XLA side
  holds each of them once with its exact key and value."""
  rng = kernel_inputs.rng(7)
  _, slots, pos, _ = _merged(rng, "gqa")
  keys, values, positions, masked = cl.retained_slots(slots, pos, jnp.float32)
  ref_keys, ref_values = _merged_layer(slots, pos).rebuilt()
  pos, masked, positions = (np.asarray(x) for x in (pos, masked, positions))
  ki, vi = np.asarray(slots.key_index), np.asarray(slots.value_index)
  rk = ki.shape[-1]
  for r in range(pos.shape[0]):
    for h in range(pos.shape[1]):
      retained = (set(ki[r, h]) | set(vi[r, h])) - {-1}
      skipped = set(np.flatnonzero((pos[r, h] >= 0) & (masked[r, h] < 0)))
      assert skipped == retained
      entries = [j for j in range(positions.shape[-1]) if positions[r, h, j] >= 0]
      slot_of = lambda j: ki[r, h, j] if j < rk else vi[r, h, j - rk]
      assert sorted(slot_of(j) for j in entries) == sorted(retained)
      for j in entries:
        t = slot_of(j)
        assert positions[r, h, j] == pos[r, h, t]
        np.testing.assert_allclose(keys[r, h, j], ref_keys[r, h, t], atol=1e-6)
        np.testing.assert_allclose(values[r, h, j], ref_values[r, h, t], atol=1e-6)


def test_merged_kernel_tpu_interpreter():
  """TPU semantics on the TPU interpreter with TPU block sizes."""
  rng = kernel_inputs.rng(19)
  q, slots, pos, _ = _merged(rng, "wide")
  args = (q, slots, pos, jnp.array([60], jnp.int32))
  got = cl.merged_decode_attention(*args, interpret=pltpu.InterpretParams())
  for a, e in zip(got, _merged_reference(*args)):
    close(a, e, jnp.float32)


# ----------------------------------------------------------------------------- errors


def test_rejects_bad_arguments():
  rng = kernel_inputs.rng(0)
  q, slots, pos, qpos = _lowrank(rng, "mha")
  inv_freq = _inv_freq(q.shape[-1])
  with pytest.raises(ValueError, match=r"key_coefficients must have shape \(2, 12, 96\)"):
    cl.lowrank_decode_attention(q, slots._replace(
        key_coefficients=slots.key_coefficients[..., :64]), pos, inv_freq, qpos)
  with pytest.raises(ValueError, match=r"key_positions must have shape \(2, 40\)"):
    cl.lowrank_decode_attention(q, slots, pos[:, :-1], inv_freq, qpos)
  with pytest.raises(ValueError, match=r"inv_freq must have shape \(16,\)"):
    cl.lowrank_decode_attention(q, slots, pos, inv_freq[:-1], qpos)
  q, slots, pos, qpos = _merged(rng, "mha")
  with pytest.raises(ValueError, match=r"value_vectors must have shape \(2, 3, 4, 32\)"):
    cl.merged_decode_attention(q, slots._replace(value_vectors=slots.value_vectors[:, :, :2]),
                               pos, qpos)
  with pytest.raises(ValueError, match=r"key_positions must have shape \(2, 3, 40\)"):
    cl.merged_decode_attention(q, slots, pos[:, :, :-1], qpos)


# ----------------------------------------------------------------------------- exports

_SD = jax.ShapeDtypeStruct
_BF = jnp.bfloat16


def _lowrank_structs(b, k, g, d, s, rk, rv):
  return (_SD((b, k, g, d), _BF),
          cl.LowRankSlots(_SD((b, s, rk), _BF), _SD((b, s, rv), _BF),
                          _SD((b, rk, k * d), _BF), _SD((b, rv, k * d), _BF)),
          _SD((b, s), jnp.int32), _SD((d // 2,), jnp.float32), _SD((b,), jnp.int32))


def _merged_structs(b, k, g, d, s, r):
  return (_SD((b, k, g, d), _BF),
          cl.MergedSlots(_SD((b, k, s), _BF), _SD((b, k, s), _BF), _SD((b, k, s, d), _BF),
                         _SD((b, k, s, d), _BF), _SD((b, k, r), jnp.int32),
                         _SD((b, k, r, d), _BF), _SD((b, k, r), jnp.int32),
                         _SD((b, k, r, d), _BF)),
          _SD((b, k, s), jnp.int32), _SD((b,), jnp.int32))


EXPORTS = {
    # SmolLM2 (3 KV heads x 3 queries, D = 64) at 4K tokens: xKV's default ranks for a
    # group of 4 (96 and 144: not powers of two), MiniCache retaining 5%.
    "lowrank_smollm2": (cl.lowrank_decode_attention, _lowrank_structs(2, 3, 3, 64, 4096, 96, 144)),
    "merged_smollm2": (cl.merged_decode_attention, _merged_structs(2, 3, 3, 64, 4096, 205)),
    # Llama-3.1-8B's heads (8 x 4, D = 128): xKV-4's ranks 512 / 768, a 4032-slot prompt.
    "lowrank_llama": (cl.lowrank_decode_attention, _lowrank_structs(1, 8, 4, 128, 4032, 512, 768)),
    "merged_llama": (cl.merged_decode_attention, _merged_structs(1, 8, 4, 128, 4032, 202)),
}
_TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
_MARKER = {"tpu": "tpu_custom_call", "cuda": "xla.gpu.triton"}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_cross_layer_kernel_export(name, platform):
  fn, structs = EXPORTS[name]
  exported = jax.export.export(jax.jit(fn), platforms=[platform],
                               disabled_checks=[_TRITON])(*structs)
  # The real compiled kernel, not the CPU interpreter picked by jax.default_backend().
  assert _MARKER[platform] in exported.mlir_module()


# ------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def model():
  return tiny_model(num_layers=4)


def _dense_attend(self, queries, query_positions, pending=None, want=frozenset()):
  return self.dense().attend(queries, query_positions, pending, want)


def _no_dense(self):
  raise AssertionError("decode rebuilt a layer's dense keys and values")


def _decode_logits(model, prefilled, tokens):
  """Logits [steps, B, V] of decoding the given tokens (the same whatever is sampled),
  traced afresh (jit would otherwise replay a trace made under another attention), from a
  copy of the prefilled cache (a decode step donates its cache)."""
  jax.clear_caches()
  steps = engine.CompiledSteps()
  cache, out = jax.tree_util.tree_map(jnp.copy, prefilled.cache), []
  for token in tokens:
    _, logits, cache = steps.decode(model, jnp.asarray(token, jnp.int32), cache,
                                    jax.random.key(0), 1.0, 1.0, True,
                                    plan=prefilled.decode_plan)
    out.append(np.asarray(logits, np.float32))
  jax.clear_caches()
  return np.stack(out)


@pytest.mark.parametrize("pallas", ["0", "1"])
@pytest.mark.parametrize("method", [XKV(group=2), MiniCache(start=0.0)], ids=["xkv", "minicache"])
def test_model_decode_fused_equals_dense(model, method, pallas, monkeypatch):
  """Decoding through the fused path (the jnp references, or the kernels interpreted)
  gives the dense path's logits; the fused run never rebuilds a layer."""
  prompts = random_prompts((45, 60), seed=3)
  tokens, mask = inputs.left_pad(prompts, 0)
  prefilled = context.prefill(model, tokens, mask, method, None, room=3,
                              steps=engine.CompiledSteps())
  assert all(isinstance(layer, cache.SharesLayers) for layer in prefilled.cache.layers)
  fed = [[7, 11], [23, 5], [101, 64]]
  with monkeypatch.context() as patch:
    patch.setattr(cache.SharesLayers, "attend", _dense_attend)
    want = _decode_logits(model, prefilled, fed)
  monkeypatch.setenv("KVJAX_PALLAS", pallas)
  with monkeypatch.context() as patch:
    patch.setattr(cache.SharesLayers, "dense", _no_dense)
    got = _decode_logits(model, prefilled, fed)
  scale = float(np.abs(want).max())
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
