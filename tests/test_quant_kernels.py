"""KIVI quantization: the jnp format against a numpy restatement, the Pallas kernels against
the jnp format and the attention reference, plus TPU/CUDA export checks.

Numerics run in interpret mode on CPU at small shapes (S not a multiple of the block,
several chunks per row); export tests lower at realistic shapes without executing.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

import kernel_inputs
from kernel_inputs import close, shuffled_positions

from pallas_kernels import decode_attention as da
from pallas_kernels import quantization as qz
from pallas_kernels import reference

def _data(rng, shape, dtype=jnp.float32):
  """Normal values with a different offset and spread per channel (like real keys)."""
  d = shape[-1]
  x = rng.normal(size=shape) * rng.uniform(0.2, 3.0, d) + rng.normal(size=d)
  return jnp.asarray(x, dtype)


def _equal(actual, expected):
  """Exact equality; floats (bf16 included) compared through float32, which is exact."""
  a, e = np.asarray(actual), np.asarray(expected)
  if np.issubdtype(a.dtype, np.floating) or a.dtype == jnp.bfloat16:
    a, e = a.astype(np.float32), e.astype(np.float32)
  np.testing.assert_array_equal(a, e)


def _expand(p, group, axis):
  return np.repeat(np.asarray(p, np.float32), group, axis=-2 if axis == "tokens" else -1)


# ------------------------------------------------------------- numpy restatement


def _numpy_quantize(x, *, bits, group, axis, valid, scale_dtype):
  """The quantizer written from its definition with loops over groups (no kvjax code)."""
  x = np.asarray(x, np.float32)
  *lead, s, d = x.shape
  xs = x.reshape(-1, s, d)
  vs = np.ones(xs.shape[:2], bool) if valid is None else np.asarray(valid).reshape(-1, s)
  levels = 2 ** bits - 1
  n = xs.shape[0]
  if axis == "tokens":
    members = [(slice(t * group, (t + 1) * group), slice(c, c + 1), (t, c))
               for t in range(s // group) for c in range(d)]
    p_shape = (n, s // group, d)
  else:
    members = [(slice(t, t + 1), slice(c * group, (c + 1) * group), (t, c))
               for t in range(s) for c in range(d // group)]
    p_shape = (n, s, d // group)
  scale = np.zeros(p_shape, scale_dtype)
  zero = np.zeros(p_shape, scale_dtype)
  codes = np.zeros((n, s, d), np.int64)
  for r in range(n):
    for rows, cols, at in members:
      block = xs[r, rows, cols]
      ok = np.broadcast_to(vs[r, rows][:, None], block.shape)
      if ok.any():
        lo, hi = block[ok].min(), block[ok].max()
        # The module's one rounding convention: / levels is * float32(1 / levels).
        sc = np.float32(np.float32(hi - lo) * np.float32(1.0 / levels))
        z = lo
      else:
        sc, z = np.float32(0), np.float32(0)
      scale[(r,) + at] = sc
      zero[(r,) + at] = z
      sc32 = np.float32(scale[(r,) + at])
      z32 = np.float32(zero[(r,) + at])
      if sc32 > 0:
        c = np.floor((block - z32) / sc32 + np.float32(0.5))
        codes[r, rows, cols] = np.clip(c, 0, levels)
  # Planar packing: bits [j*bits, (j+1)*bits) of word w hold channel j*W + w.
  w = d * bits // 32
  words = np.zeros((n, s, w), np.uint64)
  for j in range(32 // bits):
    words |= codes[:, :, j * w:(j + 1) * w].astype(np.uint64) << np.uint64(j * bits)
  words = words.astype(np.uint32)
  return (words.reshape(*lead, s, w), scale.reshape(*lead, *p_shape[1:]),
          zero.reshape(*lead, *p_shape[1:]))


# ------------------------------------------------------------------------- format


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
  rng = kernel_inputs.rng(bits)
  codes = rng.integers(0, 2 ** bits, (3, 5, 64)).astype(np.int32)
  words = qz.pack(jnp.asarray(codes), bits)
  assert words.dtype == jnp.uint32 and words.shape == (3, 5, 64 * bits // 32)
  got = qz.unpack(words, bits, 64)
  assert got.dtype == jnp.int32
  _equal(got, codes)
  # The layout: field j of word w is channel j*W + w.
  w = 64 * bits // 32
  raw = np.asarray(words).astype(np.uint64)
  for j in range(32 // bits):
    _equal((raw >> np.uint64(j * bits)) & np.uint64(2 ** bits - 1),
           codes[..., j * w:(j + 1) * w])
  # And random words unpack then pack back to themselves.
  words = jnp.asarray(rng.integers(0, 2 ** 32, (4, w), dtype=np.uint64).astype(np.uint32))
  _equal(qz.pack(qz.unpack(words, bits, 64), bits), words)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("axis", ["tokens", "channels"])
def test_quantize_error_within_half_a_step(axis, bits, masked):
  rng = kernel_inputs.rng(bits + 10 * masked)
  x = _data(rng, (2, 3, 64, 32))
  valid = jnp.asarray(rng.random((2, 3, 64)) < 0.7) if masked else None
  codes, scale, zero = qz.quantize(x, bits=bits, group=16, axis=axis, valid=valid)
  assert codes.shape == (2, 3, 64, 32 * bits // 32) and codes.dtype == jnp.uint32
  want_shape = (2, 3, 4, 32) if axis == "tokens" else (2, 3, 64, 2)
  assert scale.shape == zero.shape == want_shape and scale.dtype == jnp.float32
  deq = np.asarray(qz.dequantize(codes, scale, zero, bits=bits, group=16, axis=axis,
                                 dtype=jnp.float32))
  s, z, xn = _expand(scale, 16, axis), _expand(zero, 16, axis), np.asarray(x)
  bound = s / 2 * (1 + 1e-5) + 1e-6 * (np.abs(xn) + np.abs(z) + s * (2 ** bits - 1))
  ok = np.ones(xn.shape[:-1], bool) if valid is None else np.asarray(valid)
  err = np.abs(deq - xn)
  assert (err <= bound)[ok].all(), float(np.max((err - bound)[ok]))
  assert (s > 0).all() or masked
  if masked:
    # Invalid tokens do not widen the range: changing them changes no parameter and no
    # valid token's code.
    moved = jnp.where(valid[..., None], x, 1e3)
    codes2, scale2, zero2 = qz.quantize(moved, bits=bits, group=16, axis=axis, valid=valid)
    _equal(scale2, scale)
    _equal(zero2, zero)
    u1, u2 = (np.asarray(qz.unpack(c, bits, 32)) for c in (codes, codes2))
    _equal(u1[ok], u2[ok])


def test_quantize_bf16_error_bound():
  rng = kernel_inputs.rng(5)
  x = _data(rng, (2, 64, 32), jnp.bfloat16)
  for axis in ("tokens", "channels"):
    codes, scale, zero = qz.quantize(x, bits=4, group=16, axis=axis)
    assert scale.dtype == zero.dtype == jnp.bfloat16
    deq = np.asarray(qz.dequantize(codes, scale, zero, bits=4, group=16, axis=axis,
                                   dtype=jnp.float32))
    s, z, xn = _expand(scale, 16, axis), _expand(zero, 16, axis), np.asarray(x, np.float32)
    # Stored bf16 zero and scale are rounded (2**-8 relative): the step can be off by that.
    bound = s / 2 + 2.0 ** -8 * (np.abs(z) + 15 * s) + 1e-6
    assert (np.abs(deq - xn) <= bound).all()


@pytest.mark.parametrize("axis", ["tokens", "channels"])
def test_quantize_constant_and_empty_groups(axis):
  rng = kernel_inputs.rng(3)
  x = np.array(_data(rng, (1, 32, 32)))
  valid = np.ones((1, 32), bool)
  if axis == "tokens":
    x[0, 0:16, 5] = 0.75  # one constant group (tokens 0..15 of channel 5)
    valid[0, 16:32] = False  # second token group: no valid token
  else:
    x[0, 3, 0:16] = -1.25  # one constant group (channels 0..15 of token 3)
    valid[0, 7] = False  # token 7: no valid token in any of its groups
  for fn in (qz.quantize, functools.partial(qz.quantize_pack, block_s=16)):
    codes, scale, zero = fn(jnp.asarray(x), bits=2, group=16, axis=axis,
                            valid=jnp.asarray(valid))
    scale, zero = np.asarray(scale), np.asarray(zero)
    deq = np.asarray(qz.dequantize(codes, scale, zero, bits=2, group=16, axis=axis,
                                   dtype=jnp.float32))
    unpacked = np.asarray(qz.unpack(codes, 2, 32))
    if axis == "tokens":
      assert scale[0, 0, 5] == 0 and zero[0, 0, 5] == np.float32(0.75)
      assert (unpacked[0, 0:16, 5] == 0).all() and (deq[0, 0:16, 5] == np.float32(0.75)).all()
      assert (scale[0, 1] == 0).all() and (zero[0, 1] == 0).all()
      assert (deq[0, 16:] == 0).all()
    else:
      assert scale[0, 3, 0] == 0 and zero[0, 3, 0] == np.float32(-1.25)
      assert (unpacked[0, 3, 0:16] == 0).all() and (deq[0, 3, 0:16] == np.float32(-1.25)).all()
      assert (scale[0, 7] == 0).all() and (zero[0, 7] == 0).all() and (deq[0, 7] == 0).all()
    assert np.isfinite(deq).all()


@pytest.mark.parametrize("axis,bits,masked,scale_dtype", [
    ("tokens", 2, True, np.float32), ("tokens", 4, False, np.float32),
    ("channels", 2, False, np.float32), ("channels", 4, True, np.float32),
    ("tokens", 4, True, jnp.bfloat16), ("channels", 2, True, jnp.bfloat16),
    ("tokens", 8, False, np.float32)])
def test_quantize_matches_numpy_restatement(axis, bits, masked, scale_dtype):
  rng = kernel_inputs.rng(bits + 3 * masked)
  x = _data(rng, (2, 48, 32))
  valid = rng.random((2, 48)) < 0.6 if masked else None
  got = qz.quantize(x, bits=bits, group=16, axis=axis,
                    valid=None if valid is None else jnp.asarray(valid),
                    scale_dtype=scale_dtype)
  want = _numpy_quantize(x, bits=bits, group=16, axis=axis, valid=valid,
                         scale_dtype=scale_dtype)
  assert got[1].dtype == jnp.dtype(scale_dtype)
  for a, e in zip(got, want):
    assert a.shape == e.shape and a.dtype == e.dtype
    _equal(a, e)


# ------------------------------------------------------------------ quantize_pack


@pytest.mark.parametrize("axis,bits,dtype,masked,block_s", [
    ("tokens", 2, jnp.float32, True, 32),  # 3 token groups of 16 per 2 chunks: padding
    ("tokens", 4, jnp.bfloat16, False, None),
    ("channels", 2, jnp.bfloat16, True, 16),  # S = 40: last chunk padded
    ("channels", 4, jnp.float32, False, None),
])
def test_quantize_pack_matches_jnp(axis, bits, dtype, masked, block_s):
  rng = kernel_inputs.rng(bits * 7 + masked)
  s = 48 if axis == "tokens" else 40
  x = _data(rng, (2, 3, s, 64), dtype)
  valid = jnp.asarray(rng.random((2, 3, s)) < 0.7) if masked else None
  got = qz.quantize_pack(x, bits=bits, group=16, axis=axis, valid=valid, block_s=block_s)
  want = qz.quantize(x, bits=bits, group=16, axis=axis, valid=valid)
  for a, e in zip(got, want):
    assert a.shape == e.shape and a.dtype == e.dtype
    _equal(a, e)


def test_quantize_pack_tpu_interpreter():
  rng = kernel_inputs.rng(23)
  x = _data(rng, (2, 64, 128), jnp.bfloat16)
  valid = jnp.asarray(rng.random((2, 64)) < 0.8)
  for axis in ("tokens", "channels"):
    got = qz.quantize_pack(x, bits=4, group=32, axis=axis, valid=valid, scale_dtype=jnp.float32,
                           interpret=pltpu.InterpretParams())
    want = qz.quantize(x, bits=4, group=32, axis=axis, valid=valid, scale_dtype=jnp.float32)
    for a, e in zip(got, want):
      _equal(a, e)


# --------------------------------------------------------- quantized attention


def _quantized_cache(rng, b, k, s, d, *, bits, group, dtype, key_axis="tokens"):
  keys, values = _data(rng, (b, k, s, d), dtype), _data(rng, (b, k, s, d), dtype)
  kq = qz.quantize(keys, bits=bits, group=group, axis=key_axis)
  vq = qz.quantize(values, bits=bits, group=group, axis="channels")
  return kq + vq


@pytest.mark.parametrize("g,bits,dtype,return_probs", [
    (1, 2, jnp.float32, True), (4, 4, jnp.float32, False),
    (4, 2, jnp.bfloat16, True), (1, 4, jnp.bfloat16, False)])
def test_quantized_attention_matches_reference(g, bits, dtype, return_probs):
  rng = kernel_inputs.rng(g * 10 + bits)
  b, k, s, d, group = 3, 2, 96, 32, 16  # chunk 64 at block 16: S padded to 128
  q = _data(rng, (b, k, g, d), dtype)
  cache = _quantized_cache(rng, b, k, s, d, bits=bits, group=group, dtype=dtype)
  pos = shuffled_positions(rng, (b, k, s))
  pos[2, 1] = -1  # a head with no slot at all
  pos, qpos = jnp.asarray(pos), jnp.array([70, -1, 95], jnp.int32)  # row 1 sees nothing
  got = qz.quantized_decode_attention(q, *cache, pos, qpos, bits=bits, group=group,
                                      return_probs=return_probs, block_k=16)
  want = reference.quantized_decode_attention(q, *cache, pos, qpos, bits=bits, group=group)
  assert got[0].shape == (b, k, g, d) and got[0].dtype == dtype
  assert len(got) == (3 if return_probs else 2)
  for a, e in zip(got, want):
    assert np.isfinite(np.asarray(a, np.float32)).all()
    close(a, e, dtype)
  assert (np.asarray(got[0][1], np.float32) == 0).all()
  assert (np.asarray(got[0][2, 1], np.float32) == 0).all()
  np.testing.assert_array_equal(got[1][1], np.float32(da.EMPTY_LSE))
  if return_probs:
    assert got[2].shape == (b, k, g, s)
    assert (np.asarray(got[2])[np.asarray(pos)[:, :, None, :].repeat(g, 2) < 0] == 0).all()


@pytest.mark.parametrize("g,bits,dtype,group,return_probs", [
    (3, 8, jnp.float32, 32, True), (4, 2, jnp.float32, 8, False),
    (1, 4, jnp.bfloat16, 16, True), (3, 2, jnp.bfloat16, 32, False)])
def test_per_token_keys_match_reference(g, bits, dtype, group, return_probs):
  """key_axis="channels" (the mixed-precision pools): keys grouped per token like the
  values; S need not be a multiple of the group (90 slots, groups of up to 32 channels)."""
  rng = kernel_inputs.rng(g * 100 + bits)
  b, k, s, d = 3, 2, 90, 32
  q = _data(rng, (b, k, g, d), dtype)
  cache = _quantized_cache(rng, b, k, s, d, bits=bits, group=group, dtype=dtype,
                           key_axis="channels")
  pos = shuffled_positions(rng, (b, k, s))
  pos[0, 1] = -1  # a head with no slot at all
  pos, qpos = jnp.asarray(pos), jnp.array([89, 40, -1], jnp.int32)  # row 2 sees nothing
  got = qz.quantized_decode_attention(q, *cache, pos, qpos, bits=bits, group=group,
                                      key_axis="channels", return_probs=return_probs,
                                      block_k=16)
  want = reference.quantized_decode_attention(q, *cache, pos, qpos, bits=bits, group=group,
                                              key_axis="channels")
  assert got[0].shape == (b, k, g, d) and got[0].dtype == dtype
  for a, e in zip(got, want):
    assert np.isfinite(np.asarray(a, np.float32)).all()
    close(a, e, dtype)
  assert (np.asarray(got[0][0, 1], np.float32) == 0).all()
  np.testing.assert_array_equal(got[1][2], np.float32(da.EMPTY_LSE))
  # The reference itself: per-token keys dequantized, then dense attention.
  keys = qz.dequantize(*cache[:3], bits=bits, group=group, axis="channels", dtype=dtype)
  assert keys.shape == (b, k, s, d)
  close(want[0], reference.decode_attention(q, keys, qz.dequantize(
      *cache[3:], bits=bits, group=group, axis="channels", dtype=dtype), pos, qpos)[0], dtype)


@pytest.mark.parametrize("key_axis", qz.AXES)
def test_quantized_attention_default_blocks_tpu_interpreter(key_axis):
  """TPU semantics (block shapes, DMA) on the TPU interpreter with TPU block sizes."""
  rng = kernel_inputs.rng(29)
  b, k, g, s, d, group = 1, 2, 4, 256, 32, 16
  q = _data(rng, (b, k, g, d), jnp.float32)
  cache = _quantized_cache(rng, b, k, s, d, bits=4, group=group, dtype=jnp.float32,
                           key_axis=key_axis)
  pos, qpos = jnp.asarray(shuffled_positions(rng, (b, k, s))), jnp.array([180], jnp.int32)
  got = qz.quantized_decode_attention(q, *cache, pos, qpos, bits=4, group=group,
                                      key_axis=key_axis, return_probs=True,
                                      interpret=pltpu.InterpretParams())
  want = reference.quantized_decode_attention(q, *cache, pos, qpos, bits=4, group=group,
                                              key_axis=key_axis)
  for a, e in zip(got, want):
    close(a, e, jnp.float32)


def test_quantized_part_merged_with_residual_window():
  """KIVI decode: quantized slots through this kernel, the full-precision residual window
  through `decode_attention`, merged by log-sum-exp == attention over both together."""
  rng = kernel_inputs.rng(31)
  b, k, g, s, r, d, group = 3, 2, 4, 96, 24, 32, 16
  q = _data(rng, (b, k, g, d), jnp.float32)
  cache = _quantized_cache(rng, b, k, s, d, bits=2, group=group, dtype=jnp.float32)
  res_k, res_v = _data(rng, (b, k, r, d)), _data(rng, (b, k, r, d))
  pos = np.stack([rng.permutation(s + r) for _ in range(b * k)]).reshape(b, k, s + r)
  pos = pos.astype(np.int32)
  pos[0, :, :s] = -1  # row 0: nothing quantized yet, only the window
  pos[1, :, s + 4:] = -1  # row 1: a partly filled window
  qpos = jnp.array([s + r, s + r, 60], jnp.int32)
  pos = jnp.asarray(pos)
  out_q, lse_q = qz.quantized_decode_attention(q, *cache, pos[..., :s], qpos, bits=2,
                                               group=group, block_k=16)
  out_r, lse_r = da.decode_attention(q, res_k, res_v, pos[..., s:], qpos, block_k=16)
  out, lse = da.merge_partials(out_q, lse_q, out_r, lse_r)
  keys = jnp.concatenate([qz.dequantize(*cache[:3], bits=2, group=group, axis="tokens",
                                        dtype=jnp.float32), res_k], axis=2)
  values = jnp.concatenate([qz.dequantize(*cache[3:], bits=2, group=group, axis="channels",
                                          dtype=jnp.float32), res_v], axis=2)
  want_out, want_lse, _ = reference.decode_attention(q, keys, values, pos, qpos)
  close(out, want_out, jnp.float32)
  close(lse, want_lse, jnp.float32)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the form chosen for XLA:CPU")
def test_cpu_decode_over_dequantized_slots_takes_dots_at_batch_one():
  """At batch 1 XLA:CPU runs one query over a stored cache fastest as products summed
  over D and S, but into those it fuses a dequantization and computes it again for every
  query of a group (KIVI-2 at 2K tokens: 50 ms per decode step with dots, 83 without): the
  quantized reference, kvjax's CPU path, reads its keys and values through dots; the
  stored cache keeps its form."""
  rng = kernel_inputs.rng(47)
  b, k, g, s, d = 1, 2, 3, 64, 64
  keys, values = _data(rng, (b, k, s, d)), _data(rng, (b, k, s, d))
  q = _data(rng, (b, k, g, d))
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, k, s))
  qpos = jnp.full((b,), s, jnp.int32)
  codes = (qz.quantize(keys, bits=2, group=32, axis="tokens")
           + qz.quantize(values, bits=2, group=32, axis="channels"))
  quantized = functools.partial(reference.quantized_decode_attention, bits=2, group=32)
  slots = (b, k, s, d)
  assert kernel_inputs.dots_reading(quantized, (q, *codes, pos, qpos), slots) == 2
  assert kernel_inputs.dots_reading(reference.decode_attention,
                                    (q, keys, values, pos, qpos), slots) == 0


# -------------------------------------------------------------------- validation


def test_format_rejects_bad_arguments():
  x = jnp.ones((2, 32, 32), jnp.float32)
  cases = [
      (dict(bits=3, group=16, axis="tokens"), r"bits must be one of \(2, 4, 8\), got 3"),
      (dict(bits=2, group=0, axis="tokens"), "group must be a positive int, got 0"),
      (dict(bits=2, group=16, axis="heads"), "axis must be one of"),
      (dict(bits=2, group=24, axis="tokens"), "S must be a multiple of group=24, got S=32"),
      (dict(bits=2, group=64, axis="channels"), "D must be a multiple of group=64, got D=32"),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      qz.quantize(x, **kwargs)
  with pytest.raises(ValueError, match="D \\* bits must be a multiple of 32, got D=12"):
    qz.quantize(jnp.ones((32, 12)), bits=2, group=4, axis="channels")
  with pytest.raises(ValueError, match=r"valid must have shape x.shape\[:-1\] = \(2, 32\)"):
    qz.quantize(x, bits=2, group=16, axis="tokens", valid=jnp.ones((2, 31), bool))
  with pytest.raises(ValueError, match="valid must be a bool mask"):
    qz.quantize(x, bits=2, group=16, axis="tokens", valid=jnp.ones((2, 32), jnp.int32))
  # Any group dividing S works in jnp; the kernels need a power of two.
  assert qz.quantize(jnp.ones((24, 32)), bits=2, group=12, axis="tokens")[1].shape == (2, 32)
  with pytest.raises(ValueError, match="group to be a power of two, got 12"):
    qz.quantize_pack(jnp.ones((24, 32)), bits=2, group=12, axis="tokens")
  with pytest.raises(ValueError, match="words must have 2 = dim \\* bits // 32"):
    qz.unpack(jnp.zeros((4, 3), jnp.uint32), 2, 32)


def test_attention_rejects_bad_arguments():
  rng = kernel_inputs.rng(0)
  b, k, g, s, d = 1, 2, 2, 32, 32
  q = _data(rng, (b, k, g, d))
  cache = _quantized_cache(rng, b, k, s, d, bits=4, group=16, dtype=jnp.float32)
  pos, qpos = jnp.zeros((b, k, s), jnp.int32), jnp.zeros((b,), jnp.int32)
  call = functools.partial(qz.quantized_decode_attention, q)
  with pytest.raises(ValueError, match=r"key_codes must be \[B, K, S, D\*bits//32\] = "
                     r"\(1, 2, 32, 8\) for q \(1, 2, 2, 32\) and bits=8"):
    call(*cache, pos, qpos, bits=8, group=16)
  with pytest.raises(ValueError, match=r"key_scale must have shape \(1, 2, 4, 32\)"):
    call(*cache, pos, qpos, bits=4, group=8)
  with pytest.raises(ValueError, match="S must be a multiple of group=64, got S=32"):
    call(*cache, pos, qpos, bits=4, group=64)
  with pytest.raises(ValueError, match=r"key_positions must have shape \(1, 2, 32\)"):
    call(*cache, pos[..., :-1], qpos, bits=4, group=16)
  with pytest.raises(ValueError, match="bits must be one of"):
    call(*cache, pos, qpos, bits=1, group=16)
  bad = (cache[0].astype(jnp.float32),) + cache[1:]
  with pytest.raises(ValueError, match="key_codes must be uint32 packed words"):
    call(*bad, pos, qpos, bits=4, group=16)
  with pytest.raises(ValueError, match="axis must be one of .* got 'heads'"):
    call(*cache, pos, qpos, bits=4, group=16, key_axis="heads")
  # Per-token keys want the values' [B, K, S, D // group] scales.
  with pytest.raises(ValueError, match=r"key_scale must have shape \(1, 2, 32, 2\)"):
    call(*cache, pos, qpos, bits=4, group=16, key_axis="channels")


# ---------------------------------------------------------------------- exports

B, K, G, S, D, GROUP = 2, 8, 4, 4096, 128, 32
_BF = jnp.bfloat16
_SD = jax.ShapeDtypeStruct


def _attention_structs(bits):
  w = D * bits // 32
  return (_SD((B, K, G, D), _BF),
          _SD((B, K, S, w), jnp.uint32), _SD((B, K, S // GROUP, D), _BF),
          _SD((B, K, S // GROUP, D), _BF),
          _SD((B, K, S, w), jnp.uint32), _SD((B, K, S, D // GROUP), _BF),
          _SD((B, K, S, D // GROUP), _BF),
          _SD((B, K, S), jnp.int32), _SD((B,), jnp.int32))


def _per_token_structs(bits):
  """Keys and values quantized per token over the whole head (MiKV/ZipVL's default)."""
  w, params = D * bits // 32, _SD((B, K, S, 1), _BF)
  return (_SD((B, K, G, D), _BF), _SD((B, K, S, w), jnp.uint32), params, params,
          _SD((B, K, S, w), jnp.uint32), params, params, _SD((B, K, S), jnp.int32),
          _SD((B,), jnp.int32))


EXPORTS = {}
for _bits in (2, 4):
  EXPORTS[f"attention_bits{_bits}"] = (
      functools.partial(qz.quantized_decode_attention, bits=_bits, group=GROUP),
      _attention_structs(_bits))
  for _axis in qz.AXES:
    EXPORTS[f"quantize_{_axis}_bits{_bits}"] = (
        functools.partial(qz.quantize_pack, bits=_bits, group=GROUP, axis=_axis),
        (_SD((B, K, S, D), _BF), _SD((B, K, S), jnp.bool_)))
for _bits in qz.BITS:
  EXPORTS[f"attention_per_token_keys_bits{_bits}"] = (
      functools.partial(qz.quantized_decode_attention, bits=_bits, group=D,
                        key_axis="channels"),
      _per_token_structs(_bits))
EXPORTS["attention_probs_bits2"] = (
    functools.partial(qz.quantized_decode_attention, bits=2, group=GROUP, return_probs=True),
    _attention_structs(2))


def _with_valid(fn):
  return lambda x, valid: fn(x, valid=valid)


_TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
_MARKER = {"tpu": "tpu_custom_call", "cuda": "xla.gpu.triton"}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_quant_kernels_export(name, platform):
  fn, structs = EXPORTS[name]
  if name.startswith("quantize"):
    fn = _with_valid(fn)
  exported = jax.export.export(jax.jit(fn), platforms=[platform],
                               disabled_checks=[_TRITON])(*structs)
  # The real compiled kernel, not the CPU interpreter picked by jax.default_backend().
  assert _MARKER[platform] in exported.mlir_module()
