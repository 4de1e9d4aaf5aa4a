"""GEAR decode attention: the jnp reference (kvjax's CPU path) against attention over the
dense reconstruction put(deq(Q), S) + A B^T, the Pallas kernel (interpret mode) against
the reference, the layer cache's decode against its dense path on both, argument errors,
and TPU/CUDA export checks.

Parts are made by the GEAR cache's own compression (`compress_block`) from random data
with empty slots; a decode part is several one-group blocks side by side, a prompt part
one block of whole groups (not a power of two of them).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

import kernel_inputs
from kernel_inputs import close

from kvjax.cache import LayerCache, NewTokens
from kvjax.cache import gear as gear_cache
from kvjax.cache.gear import GearLayerCache
from pallas_kernels import decode_attention as da
from pallas_kernels import gear as gk
from pallas_kernels import quantization as qz
from pallas_kernels import reference

_compress = jax.jit(gear_cache.compress_block, static_argnames=(
    "bits", "group", "rank", "loops", "outlier_ratio", "dtype"))
_reference = jax.jit(reference.gear_decode_attention, static_argnames=("bits", "group"))
_key_outlier_logits = jax.jit(gk.key_outlier_logits, static_argnames=("bits", "group"))


def _close(actual, expected, dtype):
  """f32: kernel_inputs' bound. bf16: the kernel rounds the rebuilt keys and values to
  bf16 before its dots (the reference stays in f32), so the bound scales with them."""
  if dtype == jnp.float32:
    return close(actual, expected, dtype)
  expected = np.asarray(expected, np.float32)
  np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=1e-2,
                             atol=1e-2 * max(1.0, float(np.abs(expected).max())))


def _data(rng, shape):
  """Normal values with a different offset and spread per channel (like real keys)."""
  d = shape[-1]
  return rng.normal(size=shape) * rng.uniform(0.2, 3.0, d) + rng.normal(size=d)


def _part(rng, b, k, d, *, blocks, n, bits, group, rank, ratio, dtype=jnp.float32,
          empty=0.2):
  """A GearBlocks of `blocks` blocks of n slots, each compressed on its own; slot
  positions are a shuffled 0..S-1 with a fraction `empty` of empty slots."""
  s = blocks * n
  pos = kernel_inputs.shuffled_positions(rng, (b, k, s), empty)
  pieces = []
  for j in range(blocks):
    sl = slice(j * n, (j + 1) * n)
    keys = jnp.asarray(_data(rng, (b, k, n, d)), dtype)
    values = jnp.asarray(_data(rng, (b, k, n, d)), dtype)
    pieces.append(_compress(keys, values, jnp.asarray(pos[:, :, sl]), bits=bits, group=group,
                            rank=rank, loops=2, outlier_ratio=ratio, dtype=dtype))
  return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=2), *pieces)


@functools.partial(jax.jit, static_argnames=("bits", "group"))
def _dense_attention(q, part, qpos, *, bits, group):
  """The slow definition: rebuild every slot, then dense decode attention (float32)."""
  keys, values = gear_cache.reconstruct(part, bits=bits, group=group, dtype=jnp.float32)
  out, lse, _ = reference.decode_attention(q.astype(jnp.float32), keys, values,
                                           part.quantized.positions, qpos)
  return out, lse


# name: (blocks, n slots per block, group, rank, outlier ratio, D)
SHAPES = {
    "prompt": (1, 96, 16, 4, 0.05, 32),      # one block of 6 groups
    "decode": (5, 16, 16, 2, 0.1, 32),       # five one-group blocks
    "odd_rank": (3, 32, 16, 3, 0.15, 32),    # rank 3, 6 value picks per token
    "plain": (2, 32, 32, 0, 0.0, 64),        # rank 0, no outliers: KIVI
}


@pytest.mark.parametrize("name,g", [("prompt", 3), ("decode", 3), ("odd_rank", 1),
                                    ("plain", 2)])
def test_reference_equals_attention_over_the_reconstruction(name, g):
  blocks, n, group, rank, ratio, d = SHAPES[name]
  rng = kernel_inputs.rng(len(name) * 7 + g)
  b, k, bits = 3, 2, 2
  part = _part(rng, b, k, d, blocks=blocks, n=n, bits=bits, group=group, rank=rank,
               ratio=ratio)
  s = blocks * n
  q = jnp.asarray(_data(rng, (b, k, g, d)), jnp.float32)
  qpos = jnp.array([s - 1, s // 2, -1], jnp.int32)   # all, about half, nothing visible
  got = _reference(q, gear_cache.kernel_part(part),
                                        part.quantized.positions, qpos, bits=bits,
                                        group=group)
  want = _dense_attention(q, part, qpos, bits=bits, group=group)
  assert got[0].shape == (b, k, g, d) and got[1].shape == (b, k, g)
  for a, e in zip(got, want):
    close(a, e, jnp.float32)
  np.testing.assert_array_equal(np.asarray(got[0][2]), 0.0)
  np.testing.assert_array_equal(np.asarray(got[1][2]), np.float32(da.EMPTY_LSE))
  if rank or ratio:   # the corrections matter: KIVI's base alone gives another output
    q_parts = [getattr(part.quantized, f) for f in ("key_codes", "key_scale", "key_zero",
                                                     "value_codes", "value_scale",
                                                     "value_zero")]
    base = reference.quantized_decode_attention(q, *q_parts, part.quantized.positions, qpos,
                                                bits=bits, group=group)
    assert np.abs(np.asarray(got[0]) - np.asarray(base[0]))[:2].max() > 1e-2


def test_repeated_picks_count_once():
  """Blocks where a vector's top and bottom picks overlap (a channel with ties, a block
  with fewer valid slots than picks, a token with equal channels): the reference still
  equals the reconstruction, whose put writes each repeated entry once."""
  rng = kernel_inputs.rng(3)
  b, k, n, d, g, group = 2, 1, 16, 32, 2, 16
  keys = _data(rng, (b, k, n, d))
  values = _data(rng, (b, k, n, d))
  keys[0, 0, :, 3] = 1.5                   # a constant channel: every pick is a tie
  keys[0, 0, :8, 5] = -0.25                # ties in the bottom half of a channel
  keys[0, 0, 2, 5] = 4.0
  values[1, 0, 4, :] = 0.75                # a constant token
  pos = np.tile(np.arange(n, dtype=np.int32), (b, k, 1))
  pos[1, :, 3:] = -1                       # 3 valid slots, 2 * 4 picks per channel
  part = _compress(jnp.asarray(keys, jnp.float32), jnp.asarray(values, jnp.float32),
                   jnp.asarray(pos), bits=2, group=group, rank=2, loops=2, outlier_ratio=0.5,
                   dtype=jnp.float32)
  idx = np.asarray(part.key_outliers.indices)
  assert not np.asarray(gk.unique_picks(jnp.asarray(idx))).all(), "no repeated pick made"
  q = jnp.asarray(_data(rng, (b, k, g, d)), jnp.float32)
  qpos = jnp.array([n, n], jnp.int32)
  kernel_part = gear_cache.kernel_part(part)
  got = _reference(q, kernel_part, part.quantized.positions, qpos,
                                        bits=2, group=group)
  want = _dense_attention(q, part, qpos, bits=2, group=group)
  for a, e in zip(got, want):
    close(a, e, jnp.float32)
  # Counting the repeats twice would be wrong here (so this case tests the de-duplication).
  b_, k_, nb, _, picks = idx.shape
  tokens = jnp.asarray(idx.reshape(b, k, -1))
  channels = jnp.asarray(np.broadcast_to(np.arange(d)[:, None], idx.shape).reshape(b, k, -1))
  base = gk.base_at(kernel_part.key_codes, kernel_part.key_scale, kernel_part.key_zero, tokens,
                    channels, bits=2, group=group, axis="tokens")
  delta = np.asarray(kernel_part.key_outlier_values).reshape(b, k, -1) - np.asarray(base)
  naive = np.zeros((b, k, g, n), np.float32)
  for r in range(b):
    for j, (t, c) in enumerate(zip(np.asarray(tokens)[r, 0], np.asarray(channels)[r, 0])):
      naive[r, 0, :, t] += np.asarray(q)[r, 0, :, c] * delta[r, 0, j]
  deduped = np.asarray(_key_outlier_logits(q, kernel_part, bits=2, group=group))
  assert np.abs(naive - deduped).max() > 1e-2


# ----------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("name,g,dtype", [
    ("prompt", 3, jnp.float32), ("decode", 4, jnp.float32), ("odd_rank", 1, jnp.float32),
    ("plain", 2, jnp.float32), ("prompt", 3, jnp.bfloat16), ("decode", 2, jnp.bfloat16)])
def test_kernel_matches_reference(name, g, dtype):
  blocks, n, group, rank, ratio, d = SHAPES[name]
  rng = kernel_inputs.rng(len(name) * 13 + g)
  b, k, bits = 3, 2, 2 if name != "odd_rank" else 4
  part = _part(rng, b, k, d, blocks=blocks, n=n, bits=bits, group=group, rank=rank,
               ratio=ratio, dtype=dtype)
  s = blocks * n
  q = jnp.asarray(_data(rng, (b, k, g, d)), dtype)
  qpos = jnp.array([s, -1, s // 3], jnp.int32)
  args = (q, gear_cache.kernel_part(part), part.quantized.positions, qpos)
  # block_k 16, chunk 64: S = 80 or 96 is padded and spans two chunks.
  got = gk.gear_decode_attention(*args, bits=bits, group=group, block_k=16)
  want = _reference(*args, bits=bits, group=group)
  assert got[0].shape == (b, k, g, d) and got[0].dtype == dtype
  for a, e in zip(got, want):
    assert np.isfinite(np.asarray(a, np.float32)).all()
    _close(a, e, dtype)
  np.testing.assert_array_equal(np.asarray(got[0][1], np.float32), 0.0)
  np.testing.assert_array_equal(np.asarray(got[1][1]), np.float32(da.EMPTY_LSE))


def test_kernel_default_blocks_tpu_interpreter():
  """TPU semantics (block shapes, DMA) on the TPU interpreter with TPU block sizes: a
  decode part of one-group blocks, eight blocks per tile."""
  rng = kernel_inputs.rng(29)
  b, k, g, d, group = 1, 1, 4, 32, 16
  part = _part(rng, b, k, d, blocks=16, n=group, bits=4, group=group, rank=2, ratio=0.1)
  q = jnp.asarray(_data(rng, (b, k, g, d)), jnp.float32)
  args = (q, gear_cache.kernel_part(part), part.quantized.positions,
          jnp.array([200], jnp.int32))
  got = gk.gear_decode_attention(*args, bits=4, group=group,
                                 interpret=pltpu.InterpretParams())
  want = _reference(*args, bits=4, group=group)
  for a, e in zip(got, want):
    close(a, e, jnp.float32)


# ------------------------------------------------------------------------ layer cache


@jax.jit
def _decode_layer(keys, values, positions, new):
  """A GEAR layer with a prompt block, two flushed decode groups and a residual window."""
  b, k, s, _ = keys.shape
  dense = LayerCache(keys=keys, values=values, positions=positions, end=jnp.int32(s))
  layer = GearLayerCache.from_dense(dense, bits=2, group=32, window=16, rank=4,
                                    decode_rank=2, loops=3, outlier_ratio=0.05).grow(80)
  t = new.shape[2]
  return layer.append(NewTokens(keys=new, values=new[..., ::-1],
                                positions=jnp.broadcast_to(s + jnp.arange(t), (b, t))))


@pytest.mark.parametrize("pallas", ["0", "1"])
def test_layer_decode_equals_its_dense_attention(pallas, monkeypatch):
  """GearLayerCache.attend at decode (parts merged by log-sum-exp) == attention over
  `dequantized()`, on the jnp path and through the kernel."""
  rng = kernel_inputs.rng(41)
  b, k, s, h, d = 2, 2, 200, 6, 64
  positions = np.tile(np.arange(s, dtype=np.int32), (b, k, 1))
  positions[1, :, :13] = -1                 # row 1 is left-padded
  layer = _decode_layer(jnp.asarray(_data(rng, (b, k, s, d)), jnp.float32),
                        jnp.asarray(_data(rng, (b, k, s, d)), jnp.float32),
                        jnp.asarray(positions), jnp.asarray(_data(rng, (b, k, 70, d)),
                                                            jnp.float32))
  assert layer.prompt.capacity == 160 and int(layer.end) == 64
  assert 16 <= int(layer.residual.end) < 48
  query = jnp.asarray(_data(rng, (b, 1, h, d)), jnp.float32)
  qpos = jnp.array([[269], [150]], jnp.int32)
  monkeypatch.setenv("KVJAX_PALLAS", "0")   # read while tracing: one jit per setting
  want = jax.jit(lambda layer, q: layer.dequantized().attend(q, qpos)[0])(layer, query)
  monkeypatch.setenv("KVJAX_PALLAS", pallas)
  got = jax.jit(lambda layer, q: layer.attend(q, qpos)[0])(layer, query)
  assert got.shape == query.shape
  close(got, want, jnp.float32)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the form chosen for XLA:CPU")
def test_cpu_reference_takes_dots_over_the_dequantized_base_at_batch_one():
  """As KIVI's CPU path (test_quant_kernels): at batch 1 the dequantized base is read
  through dots, not products summed over D and S that would dequantize it once per
  query of a group (GEAR at 2K tokens: 52 ms per decode step with dots, 59 without)."""
  blocks, n, group, rank, ratio, d = SHAPES["plain"]
  rng = kernel_inputs.rng(53)
  part = _part(rng, 1, 2, d, blocks=blocks, n=n, bits=2, group=group, rank=rank,
               ratio=ratio)
  q = jnp.asarray(_data(rng, (1, 2, 3, d)), jnp.float32)
  qpos = jnp.full((1,), blocks * n, jnp.int32)
  reference_fn = functools.partial(reference.gear_decode_attention, bits=2, group=group)
  args = (q, gear_cache.kernel_part(part), part.quantized.positions, qpos)
  # The dequantized keys and values [B, K, S, D] (the low-rank terms read other shapes).
  assert kernel_inputs.dots_reading(reference_fn, args, (1, 2, blocks * n, d)) == 2


# ----------------------------------------------------------------------------- errors


def test_rejects_bad_arguments():
  rng = kernel_inputs.rng(0)
  b, k, g, d, group = 1, 2, 2, 32, 16
  part = gear_cache.kernel_part(_part(rng, b, k, d, blocks=2, n=16, bits=2, group=group,
                                      rank=2, ratio=0.1))
  q = jnp.asarray(_data(rng, (b, k, g, d)), jnp.float32)
  pos, qpos = jnp.zeros((b, k, 32), jnp.int32), jnp.zeros((b,), jnp.int32)
  call = functools.partial(gk.gear_decode_attention, q, bits=2, group=group)
  with pytest.raises(ValueError, match=r"key_codes must have shape \(1, 2, 32, 4\)"):
    call(part, pos, qpos, bits=4)
  with pytest.raises(ValueError, match=r"key_a must have shape \(1, 2, 32, 2\)"):
    call(part._replace(key_a=part.key_a[:, :, :16]), pos, qpos)
  with pytest.raises(ValueError, match=r"key_positions must have shape \(1, 2, 32\)"):
    call(part, pos[..., :-1], qpos)
  with pytest.raises(ValueError, match="equal blocks of whole groups"):
    call(part, pos, qpos, group=32)
  with pytest.raises(ValueError, match="blocks of 48 slots: the kernel needs a power of two"):
    three = jax.tree_util.tree_map(lambda a: jnp.concatenate([a] * 3, axis=2), part)
    call(three._replace(key_b=three.key_b[:, :, :2], value_b=three.value_b[:, :, :2],
                        key_outlier_values=three.key_outlier_values[:, :, :2],
                        key_outlier_indices=three.key_outlier_indices[:, :, :2]),
         jnp.zeros((b, k, 96), jnp.int32), qpos)
  with pytest.raises(ValueError, match="key_codes must be uint32 packed words"):
    call(part._replace(key_codes=part.key_codes.astype(jnp.float32)), pos, qpos)


# ----------------------------------------------------------------------------- exports

B, K, G, D, GROUP, PROMPT = 2, 8, 4, 128, 64, 4032   # a prompt of 63 groups
_BF = jnp.bfloat16
_SD = jax.ShapeDtypeStruct


def _part_structs(slots, blocks, rank, key_picks, value_picks, bits=2):
  w = D * bits // 32
  return gk.GearPart(
      key_codes=_SD((B, K, slots, w), jnp.uint32), key_scale=_SD((B, K, slots // GROUP, D), _BF),
      key_zero=_SD((B, K, slots // GROUP, D), _BF),
      value_codes=_SD((B, K, slots, w), jnp.uint32),
      value_scale=_SD((B, K, slots, D // GROUP), _BF),
      value_zero=_SD((B, K, slots, D // GROUP), _BF),
      key_outlier_values=_SD((B, K, blocks, D, key_picks), _BF),
      key_outlier_indices=_SD((B, K, blocks, D, key_picks), jnp.int32),
      value_outlier_values=_SD((B, K, slots, value_picks), _BF),
      value_outlier_indices=_SD((B, K, slots, value_picks), jnp.int32),
      key_a=_SD((B, K, slots, rank), _BF), key_b=_SD((B, K, blocks, D, rank), _BF),
      value_a=_SD((B, K, slots, rank), _BF), value_b=_SD((B, K, blocks, D, rank), _BF))


def _structs(slots, blocks, rank, key_picks, value_picks):
  return (_SD((B, K, G, D), _BF), _part_structs(slots, blocks, rank, key_picks, value_picks),
          _SD((B, K, slots), jnp.int32), _SD((B,), jnp.int32))


EXPORTS = {
    # GEAR's defaults at head_dim 128: the prompt block (rank 4, 41 + 41 key picks per
    # channel, 2 + 2 value picks per token) and 32 decode blocks of one group (rank 2).
    "prompt": _structs(PROMPT, 1, 4, 82, 4),
    "decode": _structs(32 * GROUP, 32, 2, 2, 4),
    "odd_rank": _structs(8 * GROUP, 8, 3, 2, 6),
}
_TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
_MARKER = {"tpu": "tpu_custom_call", "cuda": "xla.gpu.triton"}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_gear_kernel_export(name, platform):
  fn = functools.partial(gk.gear_decode_attention, bits=2, group=GROUP)
  exported = jax.export.export(jax.jit(fn), platforms=[platform],
                               disabled_checks=[_TRITON])(*EXPORTS[name])
  # The real compiled kernel, not the CPU interpreter picked by jax.default_backend().
  assert _MARKER[platform] in exported.mlir_module()


def test_unpacking_helpers_agree():
  """`base_at` reads the same base as `dequantize` at arbitrary entries (both groupings)."""
  rng = kernel_inputs.rng(5)
  x = jnp.asarray(_data(rng, (2, 3, 64, 32)), jnp.float32)
  for axis, bits in (("tokens", 2), ("channels", 4)):
    codes, scale, zero = qz.quantize(x, bits=bits, group=16, axis=axis)
    full = np.asarray(qz.dequantize(codes, scale, zero, bits=bits, group=16, axis=axis,
                                    dtype=jnp.float32))
    tokens = jnp.asarray(rng.integers(0, 64, (2, 3, 50)), jnp.int32)
    channels = jnp.asarray(rng.integers(0, 32, (2, 3, 50)), jnp.int32)
    at = jax.jit(functools.partial(gk.base_at, bits=bits, group=16, axis=axis))
    got = np.asarray(at(codes, scale, zero, tokens, channels))
    want = np.take_along_axis(full.reshape(2, 3, -1),
                              np.asarray(tokens * 32 + channels), axis=2)
    # Equal up to XLA contracting code * scale + zero into one fused multiply-add.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
