"""KIVI-style KV-cache quantization: asymmetric min/max codes, bit-packed, and attention.

Format (the pure-jnp `quantize` / `dequantize` / `pack` / `unpack` below define it):
  * A group of values with minimum `lo` and maximum `hi` (over valid tokens only) gets
      scale = (hi - lo) / (2**bits - 1),  zero = lo,
      code  = clip(floor((x - zero) / scale + 0.5), 0, 2**bits - 1),
    all in float32. The division by the constant 2**bits - 1 is a multiplication by its
    float32 reciprocal (what XLA turns such a division into anyway), so every platform
    and the kernels get the same bits (it can differ from a true division by one ulp);
    scale and zero are stored in `scale_dtype`; codes are computed from the STORED
    (rounded) scale and zero, so `code * scale + zero` dequantizes consistently. A group
    with hi == lo stores scale 0 and codes 0 (dequantizes to zero: lo, exactly unless
    scale_dtype rounds it); a group with no valid token stores scale 0 and zero 0.
    bits is 2, 4 or 8.
  * Groupings of x [..., S, D]:
      axis="tokens"   per channel, `group` consecutive tokens (KIVI keys):
                      scale/zero [..., S // group, D];
      axis="channels" per token, `group` consecutive channels (KIVI values):
                      scale/zero [..., S, D // group].
  * Packing, along the last axis into uint32 words: with P = 32 // bits codes per word
    and W = D * bits // 32 words per token, bits [j*bits, (j+1)*bits) of word w hold
    channel j*W + w ("planar" layout: shifting every word right by j*bits and masking
    gives the contiguous channel slice [j*W, (j+1)*W), plane j). Equivalently, tiling
    the W words P times along the lanes puts under channel c the word c % W, to be
    shifted by (c // W) * bits: the kernels unpack a [T, W] tile of words into [T, D]
    codes with one broadcast, one per-lane shift and one mask, and pack with the
    reverse (shift each plane into place, sum the disjoint bit fields).

Kernels:
  * `quantize_pack`: Pallas version of `quantize` (grid over leading rows and token
    chunks; min/max, codes and packing of a [T, D] tile in one program).
  * `quantized_decode_attention`: decode attention over the quantized part of a cache,
    dequantizing tiles inside the kernel (same contract and chunking as
    `decode_attention.decode_attention`; the XLA epilogue is shared). Keys are grouped
    per channel over tokens (KIVI, `key_axis="tokens"`) or per token over channels like
    the values (`key_axis="channels"`: the pools of scattered tokens of a
    mixed-precision cache). The full-precision residual window of a KIVI cache is not
    part of it: run `decode_attention` over the window and combine both with
    `decode_attention.merge_partials`.

Lowering notes. Everything in the kernel bodies is elementwise work, integer shifts and
masks, reductions, `dot_general` with f32 accumulation, and 3-D broadcasts/reshapes that
only split or merge the two minor dims ([T, P, W] <-> [T, D]: the tile-and-shift unpack,
and the repeat of a group's scale over its `group` tokens or channels). Triton has no
lane slicing of register values and wants dots with K, N >= 16, so unpacking by
per-plane dots (K = W, only 8 at bits=2, D=128) is avoided in favour of those reshapes.
Codes cross the kernel boundary as int32 (a free bitcast of the uint32 words) and are
unpacked with logical shifts: Triton's lowering rejects unsigned types in places, and
int32 bit ops lower on both backends. Triton also needs power-of-two tile sizes: D,
`group` and the blocks are powers of two in the intended configurations (the kernels
require `group` to be a power of two; a D that is not one lowers but will not compile
for Triton). Both kernels export for "tpu" and "cuda" (tests/test_quant_kernels.py);
an export only runs the Pallas lowering, so what Mosaic's layout pass makes of the
minor-dim reshapes and of the W-lane code tiles is first seen on a real TPU.
`quantize_pack` divides like `quantize` does, so codes are bit-exact where the platform
divides exactly (IEEE f32 division on CPU and GPU; TPU divides through a reciprocal and
may differ by one code on rounding ties).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np

from pallas_kernels import backend
from pallas_kernels import decode_attention as da

BITS = (2, 4, 8)
AXES = ("tokens", "channels")

# Sentinels for masked min/max (finite, so no inf - inf anywhere).
_BIG = float(np.finfo(np.float32).max)

# Attention tiling (keys per inner step / blocks per grid program), as in decode_attention.
_DEFAULT_BLOCK = {"tpu": 512, "gpu": 64, "cpu": 128}
_CHUNK_BLOCKS = {"tpu": 4, "gpu": 8, "cpu": 4}
# quantize_pack: tokens per grid program.
_QUANT_BLOCK = {"tpu": 512, "gpu": 64, "cpu": 128}


# ----------------------------------------------------------------------------- checks


def _check(cond, message):
  if not cond:
    raise ValueError(message)


def _check_format(bits, group, axis=None):
  _check(isinstance(bits, int) and bits in BITS, f"bits must be one of {BITS}, got {bits!r}.")
  _check(isinstance(group, int) and not isinstance(group, bool) and group > 0,
         f"group must be a positive int, got {group!r}.")
  if axis is not None:
    _check(axis in AXES, f"axis must be one of {AXES}, got {axis!r}.")


def _words(dim: int, bits: int) -> int:
  _check(dim * bits % 32 == 0,
         f"the packed axis must hold whole uint32 words: D * bits must be a multiple of 32, "
         f"got D={dim}, bits={bits} (D must be a multiple of {32 // bits}).")
  return dim * bits // 32


def _check_grouping(shape, bits, group, axis):
  _check(len(shape) >= 2, f"x must be [..., S, D] (at least 2-D), got shape {shape}.")
  s, d = shape[-2:]
  _words(d, bits)
  if axis == "tokens":
    _check(s % group == 0, f"axis='tokens' groups {group} consecutive tokens: S must be a "
           f"multiple of group={group}, got S={s}.")
  else:
    _check(d % group == 0, f"axis='channels' groups {group} consecutive channels: D must be "
           f"a multiple of group={group}, got D={d}.")


def _check_valid(valid, shape):
  if valid is None:
    return
  _check(tuple(valid.shape) == tuple(shape[:-1]),
         f"valid must have shape x.shape[:-1] = {tuple(shape[:-1])}, got {tuple(valid.shape)}.")
  _check(valid.dtype == jnp.bool_, f"valid must be a bool mask, got dtype {valid.dtype}.")


def _scale_shape(shape, group, axis):
  *lead, s, d = shape
  return (*lead, s // group, d) if axis == "tokens" else (*lead, s, d // group)


# ------------------------------------------------------------------- the format (jnp)


def pack(codes, bits):
  """Packs integer codes [..., D] (each in [0, 2**bits)) into uint32 words [..., D*bits//32].

  Planar layout: bits [j*bits, (j+1)*bits) of word w hold the code of channel j*W + w,
  W = D * bits // 32. Bits of a code above `bits` are masked off.
  """
  _check_format(bits, 1)
  d = codes.shape[-1]
  w = _words(d, bits)
  planes = (codes.astype(jnp.uint32) & jnp.uint32(2 ** bits - 1)).reshape(
      *codes.shape[:-1], 32 // bits, w)
  shifts = (jnp.arange(32 // bits, dtype=jnp.uint32) * jnp.uint32(bits))[:, None]
  shifted = planes << shifts
  out = shifted[..., 0, :]
  for j in range(1, 32 // bits):
    out = out | shifted[..., j, :]
  return out


def unpack(words, bits, dim):
  """Inverse of `pack`: uint32 words [..., dim*bits//32] -> int32 codes [..., dim]."""
  _check_format(bits, 1)
  w = _words(dim, bits)
  _check(words.shape[-1] == w, f"words must have {w} = dim * bits // 32 entries on the last "
         f"axis for dim={dim}, bits={bits}, got shape {tuple(words.shape)}.")
  shifts = (jnp.arange(32 // bits, dtype=jnp.uint32) * jnp.uint32(bits))[:, None]
  planes = (words.astype(jnp.uint32)[..., None, :] >> shifts) & jnp.uint32(2 ** bits - 1)
  return planes.reshape(*words.shape[:-1], dim).astype(jnp.int32)


def _group_params(lo, hi, seen, levels, scale_dtype):
  """Stored (scale, zero) from f32 group minima/maxima, and their f32 values."""
  scale = jnp.where(seen, (hi - lo) * np.float32(1.0 / levels), 0.0).astype(scale_dtype)
  zero = jnp.where(seen, lo, 0.0).astype(scale_dtype)
  return scale, zero


def _codes(x, scale, zero, levels):
  """f32 codes of f32 `x` given f32 per-element scale/zero (scale 0 -> code 0)."""
  has = scale > 0
  safe = jnp.where(has, scale, 1.0)
  c = jnp.clip(jnp.floor((x - zero) / safe + 0.5), 0.0, float(levels))
  return jnp.where(has, c, 0.0)


def _expand(p, group, axis):
  """Per-group parameters [..., S/g, D] or [..., S, D/g] repeated to [..., S, D]."""
  return jnp.repeat(p, group, axis=-2 if axis == "tokens" else -1)


def quantize(x, *, bits, group, axis, valid=None, scale_dtype=None):
  """Asymmetric min/max quantization of x [..., S, D] (see the module docstring).

  Args:
    x: [..., S, D] float array.
    bits: 2, 4 or 8.
    group: group size (tokens for axis="tokens", channels for axis="channels").
    axis: "tokens" (per-channel groups of consecutive tokens, KIVI keys) or "channels"
      (per-token groups of consecutive channels, KIVI values).
    valid: optional bool [..., S]: min/max over valid tokens only; invalid tokens still
      get codes. A group without valid tokens gets scale 0 and zero 0.
    scale_dtype: dtype of scale and zero (default x.dtype).
  Returns:
    (codes uint32 [..., S, D*bits//32], scale, zero), scale/zero [..., S//group, D]
    (tokens) or [..., S, D//group] (channels).
  """
  _check_format(bits, group, axis)
  _check_grouping(x.shape, bits, group, axis)
  _check_valid(valid, x.shape)
  scale_dtype = x.dtype if scale_dtype is None else scale_dtype
  levels = 2 ** bits - 1
  *lead, s, d = x.shape
  xf = x.astype(jnp.float32)
  ok = jnp.ones(x.shape[:-1], jnp.bool_) if valid is None else valid
  if axis == "tokens":
    xg = xf.reshape(*lead, s // group, group, d)
    vg = ok.reshape(*lead, s // group, group, 1)
    red = -2
  else:
    xg = xf.reshape(*lead, s, d // group, group)
    vg = ok.reshape(*lead, s, 1, 1)
    red = -1
  lo = jnp.min(jnp.where(vg, xg, _BIG), axis=red)
  hi = jnp.max(jnp.where(vg, xg, -_BIG), axis=red)
  vg = jnp.broadcast_to(vg, xg.shape)
  seen = jnp.max(jnp.where(vg, 1.0, 0.0), axis=red) > 0
  scale, zero = _group_params(lo, hi, seen, levels, scale_dtype)
  codes = _codes(xf, _expand(scale.astype(jnp.float32), group, axis),
                 _expand(zero.astype(jnp.float32), group, axis), levels)
  return pack(codes.astype(jnp.int32), bits), scale, zero


def dequantize(codes, scale, zero, *, bits, group, axis, dtype):
  """codes [..., S, W] uint32, scale/zero per `axis` grouping -> `dtype` [..., S, D].

  Computed in float32 as `code * scale + zero`, then cast to `dtype`.
  """
  _check_format(bits, group, axis)
  _check(codes.ndim >= 2, f"codes must be [..., S, D*bits//32], got shape {tuple(codes.shape)}.")
  w = codes.shape[-1]
  d = w * 32 // bits
  want = _scale_shape(codes.shape[:-1] + (d,), group, axis)
  _check(tuple(scale.shape) == want and tuple(zero.shape) == want,
         f"scale and zero must be {want} for codes {tuple(codes.shape)} (D={d}), "
         f"group={group}, axis={axis!r}; got {tuple(scale.shape)} and {tuple(zero.shape)}.")
  c = unpack(codes, bits, d).astype(jnp.float32)
  out = (c * _expand(scale.astype(jnp.float32), group, axis)
         + _expand(zero.astype(jnp.float32), group, axis))
  return out.astype(dtype)


# -------------------------------------------------------------- in-kernel tile helpers


def _unpack_tile(words, *, bits, dim):
  """[T, W] int32 words -> [T, dim] float32 codes (planar layout: tile, shift, mask)."""
  t, w = words.shape
  planes = dim // w
  tiled = lax.broadcast_in_dim(words, (t, planes, w), (0, 2))
  shifts = lax.broadcasted_iota(jnp.int32, (t, planes, w), 1) * bits
  codes = lax.shift_right_logical(tiled, shifts) & (2 ** bits - 1)
  return codes.reshape(t, dim).astype(jnp.float32)


def _pack_tile(codes, *, bits, words):
  """[T, D] int32 codes in [0, 2**bits) -> [T, words] int32 (planar layout)."""
  t, d = codes.shape
  planes = d // words
  c3 = codes.reshape(t, planes, words)
  shifts = lax.broadcasted_iota(jnp.int32, (t, planes, words), 1) * bits
  # Disjoint bit fields: their (wrapping) int32 sum is their bitwise or.
  return jnp.sum(lax.shift_left(c3, shifts), axis=1)


def _repeat_rows(p, group):
  """[N, D] -> [N * group, D]: row n repeated `group` times."""
  n, d = p.shape
  return lax.broadcast_in_dim(p, (n, group, d), (0, 2)).reshape(n * group, d)


def _repeat_lanes(p, group):
  """[T, N] -> [T, N * group]: column n repeated `group` times."""
  t, n = p.shape
  return lax.broadcast_in_dim(p, (t, n, group), (0, 1)).reshape(t, n * group)


# ---------------------------------------------------------------------- quantize_pack


def _quantize_kernel(x_ref, valid_ref, words_ref, scale_ref, zero_ref, *, bits, group,
                     axis):
  """Refs: x [T, D], valid [T, 1] int32; out words [T, W] int32, scale/zero per grouping."""
  x = x_ref[...].astype(jnp.float32)
  t, d = x.shape
  levels = 2 ** bits - 1
  ok = valid_ref[...] > 0
  if axis == "tokens":
    n = t // group
    xg = x.reshape(n, group, d)
    vg = jnp.broadcast_to(ok.reshape(n, group, 1), xg.shape)
  else:
    n = d // group
    xg = x.reshape(t, n, group)
    vg = jnp.broadcast_to(ok.reshape(t, 1, 1), xg.shape)
  red = 1 if axis == "tokens" else 2
  lo = jnp.min(jnp.where(vg, xg, _BIG), axis=red)
  hi = jnp.max(jnp.where(vg, xg, -_BIG), axis=red)
  seen = jnp.max(jnp.where(vg, 1.0, 0.0), axis=red) > 0
  scale, zero = _group_params(lo, hi, seen, levels, scale_ref.dtype)
  scale_ref[...] = scale
  zero_ref[...] = zero
  repeat = _repeat_rows if axis == "tokens" else _repeat_lanes
  codes = _codes(x, repeat(scale.astype(jnp.float32), group),
                 repeat(zero.astype(jnp.float32), group), levels)
  words_ref[...] = _pack_tile(codes.astype(jnp.int32), bits=bits, words=words_ref.shape[-1])


def _quantize_impl(x, valid, *, target, bits, group, axis, scale_dtype, block_s):
  n, s, d = x.shape
  w = d * bits // 32
  unit = group if axis == "tokens" else 1
  if block_s is None:
    kind = target.pick(tpu="tpu", gpu="gpu", cpu="cpu")
    block_s = min(_QUANT_BLOCK[kind], backend.next_power_of_2(s))
    # TPU: at least 16 rows in every block (one bf16 tile), scale rows included.
    block_s = max(block_s, unit * (16 if target.is_tpu else 1))
  block_s = max(block_s, unit)
  sp = backend.cdiv(s, block_s) * block_s
  xp = backend.pad_axis(x, 1, sp)
  vp = backend.pad_axis(valid.astype(jnp.int32), 1, sp)[..., None]
  if axis == "tokens":
    p_shape, p_block = (n, sp // group, d), (None, block_s // group, d)
  else:
    p_shape, p_block = (n, sp, d // group), (None, block_s, d // group)
  p_spec = pl.BlockSpec(p_block, lambda i, t: (i, t, 0))
  words, scale, zero = pl.pallas_call(
      functools.partial(_quantize_kernel, bits=bits, group=group, axis=axis),
      out_shape=[jax.ShapeDtypeStruct((n, sp, w), jnp.int32),
                 jax.ShapeDtypeStruct(p_shape, scale_dtype),
                 jax.ShapeDtypeStruct(p_shape, scale_dtype)],
      grid=(n, sp // block_s),
      in_specs=[pl.BlockSpec((None, block_s, d), lambda i, t: (i, t, 0)),
                pl.BlockSpec((None, block_s, 1), lambda i, t: (i, t, 0))],
      out_specs=[pl.BlockSpec((None, block_s, w), lambda i, t: (i, t, 0)), p_spec, p_spec],
      interpret=target.interpret,
      compiler_params=backend.compiler_params(
          target, dimension_semantics=("parallel",) * 2, num_warps=4, num_stages=2),
      name="quantize_pack",
  )(xp, vp)
  ps = s // group if axis == "tokens" else s
  return words[:, :s], scale[:, :ps], zero[:, :ps]


@functools.partial(jax.jit, static_argnames=("bits", "group", "axis", "scale_dtype",
                                             "block_s", "interpret"))
def quantize_pack(x, *, bits, group, axis, valid=None, scale_dtype=None, block_s=None,
                  interpret=None):
  """Pallas kernel equal to `quantize` (same arguments and results).

  Extra args:
    block_s: tokens per grid program (power of two; raised to `group` for
      axis="tokens"); None picks per platform. S is padded to a multiple of it.
    interpret: see `backend.dispatch`.
  The kernels require `group` to be a power of two. Codes equal `quantize`'s bit for bit
  and scales/zeros are equal where division is IEEE (CPU interpreter, GPU); for a bf16
  `scale_dtype` both round the same f32 value, so they agree too.
  """
  _check_format(bits, group, axis)
  _check(group & (group - 1) == 0, f"the kernels need group to be a power of two, got {group}.")
  _check_grouping(x.shape, bits, group, axis)
  _check_valid(valid, x.shape)
  if block_s is not None:
    backend.check_block("block_s", block_s)
  scale_dtype = jnp.dtype(x.dtype if scale_dtype is None else scale_dtype)
  *lead, s, d = x.shape
  n = int(np.prod(lead, dtype=np.int64))
  ok = jnp.ones((n, s), jnp.bool_) if valid is None else valid.reshape(n, s)

  def build(target):
    return functools.partial(_quantize_impl, target=target, bits=bits, group=group,
                             axis=axis, scale_dtype=scale_dtype, block_s=block_s)

  words, scale, zero = backend.dispatch(build, x.reshape(n, s, d), ok, interpret=interpret)
  words = lax.bitcast_convert_type(words, jnp.uint32).reshape(*lead, s, -1)
  p_shape = _scale_shape(x.shape, group, axis)
  return words, scale.reshape(p_shape), zero.reshape(p_shape)


# --------------------------------------------------------- quantized decode attention


def _quant_attend_kernel(q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, kpos_ref,
                         qpos_ref, *out_refs, bits, group, key_axis, return_logits, block_k,
                         num_blocks, scale):
  """Online softmax over one chunk of quantized keys/values for a tile of query rows.

  Refs (2-D after squeezing): q [R, D], key codes [C, W] int32, key scale/zero
  [C // group, D] (key_axis="tokens") or [C, D // group] ("channels"), value codes
  [C, W] int32, value scale/zero [C, D // group], kpos [1, C], qpos [1, 1]; outputs
  out [R, D] f32, lse [R, 1] f32, (logits [R, C]).
  """
  o_ref, lse_ref = out_refs[:2]
  q = q_ref[...]
  rows, dim = q.shape
  qpos = qpos_ref[...]
  precision = da._precision(q.dtype)
  groups = block_k // group  # key-scale rows per block (key_axis="tokens")

  def body(i, carry):
    m, l, acc = carry
    start = pl.multiple_of(i * block_k, block_k)
    codes = _unpack_tile(kc_ref[pl.ds(start, block_k), :], bits=bits, dim=dim)
    if key_axis == "tokens":
      # Per-channel scales of each token group, repeated over the group's tokens.
      gstart = pl.multiple_of(i * groups, groups)
      k_scale = _repeat_rows(ks_ref[pl.ds(gstart, groups), :].astype(jnp.float32), group)
      k_zero = _repeat_rows(kz_ref[pl.ds(gstart, groups), :].astype(jnp.float32), group)
    else:
      # Per-token scales of each channel group, as for the values below.
      k_scale = _repeat_lanes(ks_ref[pl.ds(start, block_k), :].astype(jnp.float32), group)
      k_zero = _repeat_lanes(kz_ref[pl.ds(start, block_k), :].astype(jnp.float32), group)
    keys = (codes * k_scale + k_zero).astype(q.dtype)
    s = lax.dot_general(q, keys, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32) * scale
    kpos = jnp.broadcast_to(kpos_ref[:, pl.ds(start, block_k)], s.shape)
    visible = (kpos >= 0) & (kpos <= qpos)
    if return_logits:
      out_refs[2][:, pl.ds(start, block_k)] = jnp.where(visible, s, -jnp.inf)
    s = jnp.where(visible, s, da._NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    # Values: per-token scales of each channel group, repeated over the group's channels.
    codes = _unpack_tile(vc_ref[pl.ds(start, block_k), :], bits=bits, dim=dim)
    v_scale = _repeat_lanes(vs_ref[pl.ds(start, block_k), :].astype(jnp.float32), group)
    v_zero = _repeat_lanes(vz_ref[pl.ds(start, block_k), :].astype(jnp.float32), group)
    vals = (codes * v_scale + v_zero).astype(q.dtype)
    acc = alpha * acc + lax.dot_general(
        p.astype(vals.dtype), vals, (((1,), (0,)), ((), ())), precision=precision,
        preferred_element_type=jnp.float32)
    return m_new, l, acc

  init = (jnp.full((rows, 1), da._NEG, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, dim), jnp.float32))
  m, l, acc = lax.fori_loop(0, num_blocks, body, init)
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = jnp.where(seen, acc / l_safe, 0.0)
  lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), da.EMPTY_LSE)


def _attention_tiling(target, length, group, key_axis, block_k):
  tiling = backend.tile_keys(target, length, block_k, default_block=_DEFAULT_BLOCK,
                             chunk_blocks=_CHUNK_BLOCKS)
  if key_axis != "tokens":  # every scale is per token: any block will do
    return tiling
  block = max(tiling.block, group)  # whole token groups per inner step
  chunk = max(tiling.chunk, block)
  if target.is_tpu:
    # Key-scale blocks [chunk // group, D]: at least 16 rows (a bf16 tile).
    chunk = max(chunk, 16 * group)
  padded = backend.cdiv(max(length, 1), chunk) * chunk
  return backend.KeyTiling(block=block, chunk=chunk, padded=padded)


def _quant_attention_impl(q, kc, ks, kz, vc, vs, vz, key_positions, query_positions, *,
                          target, bits, group, key_axis, return_probs, block_k):
  b, k, g, d = q.shape
  s, w = kc.shape[2:]
  tiling = _attention_tiling(target, s, group, key_axis, block_k)
  rows = da._query_rows(g)
  sp, c, nc = tiling.padded, tiling.chunk, tiling.num_chunks
  qp = backend.pad_axis(q, 2, rows)
  kc, vc = (backend.pad_axis(lax.bitcast_convert_type(x, jnp.int32), 2, sp) for x in (kc, vc))
  key_rows = sp // group if key_axis == "tokens" else sp
  ks, kz = (backend.pad_axis(x, 2, key_rows) for x in (ks, kz))
  vs, vz = (backend.pad_axis(x, 2, sp) for x in (vs, vz))
  kpos = backend.pad_axis(key_positions.astype(jnp.int32), 2, sp, -1)[:, :, None, :]
  qpos = query_positions.astype(jnp.int32).reshape(b, 1, 1)

  out_shape, out_specs = da.chunk_outputs(b, k, nc, rows, d, sp, c, return_probs)
  codes_spec = pl.BlockSpec((None, None, c, w), lambda i, j, t: (i, j, t, 0))
  kparam_block = (c // group, d) if key_axis == "tokens" else (c, d // group)
  kparam_spec = pl.BlockSpec((None, None) + kparam_block, lambda i, j, t: (i, j, t, 0))
  vparam_spec = pl.BlockSpec((None, None, c, d // group), lambda i, j, t: (i, j, t, 0))
  results = pl.pallas_call(
      functools.partial(_quant_attend_kernel, bits=bits, group=group, key_axis=key_axis,
                        return_logits=return_probs, block_k=tiling.block,
                        num_blocks=tiling.blocks_per_chunk, scale=d ** -0.5),
      out_shape=out_shape,
      grid=(b, k, nc),
      in_specs=[pl.BlockSpec((None, None, rows, d), lambda i, j, t: (i, j, 0, 0)),
                codes_spec, kparam_spec, kparam_spec,
                codes_spec, vparam_spec, vparam_spec,
                pl.BlockSpec((None, None, 1, c), lambda i, j, t: (i, j, 0, t)),
                pl.BlockSpec((None, 1, 1), lambda i, j, t: (i, 0, 0))],
      out_specs=out_specs,
      interpret=target.interpret,
      compiler_params=backend.compiler_params(
          target, dimension_semantics=("parallel",) * 3, num_warps=4, num_stages=2),
      name="quantized_decode_attention",
  )(qp, kc, ks, kz, vc, vs, vz, kpos, qpos)
  logits = results[2] if return_probs else None
  return da._finish(results[0], results[1], logits, rows=g, dim=d, length=s, chunk_axis=2,
                    dtype=q.dtype)


def _check_attention_args(q, key_codes, key_scale, key_zero, value_codes, value_scale,
                          value_zero, key_positions, query_positions, bits, group, key_axis):
  _check_format(bits, group, key_axis)
  _check(group & (group - 1) == 0, f"the kernels need group to be a power of two, got {group}.")
  _check(q.ndim == 4, f"q must be 4-D [B, K, G, D], got shape {tuple(q.shape)}.")
  b, k, _, d = q.shape
  w = _words(d, bits)
  _check(key_codes.ndim == 4, f"key_codes must be [B, K, S, D*bits//32], got shape "
         f"{tuple(key_codes.shape)}.")
  s = key_codes.shape[2]
  for name, x in (("key_codes", key_codes), ("value_codes", value_codes)):
    _check(tuple(x.shape) == (b, k, s, w), f"{name} must be [B, K, S, D*bits//32] = "
           f"{(b, k, s, w)} for q {tuple(q.shape)} and bits={bits}, got {tuple(x.shape)}.")
    _check(x.dtype in (jnp.uint32, jnp.int32), f"{name} must be uint32 packed words, got "
           f"dtype {x.dtype}.")
  if key_axis == "tokens":
    _check(s % group == 0, f"keys are grouped over {group} tokens: S must be a multiple of "
           f"group={group}, got S={s}.")
  _check(d % group == 0, f"values are grouped over {group} channels: D must be a multiple "
         f"of group={group}, got D={d}.")
  key_params = (b, k, s // group, d) if key_axis == "tokens" else (b, k, s, d // group)
  for name, x, want in (("key_scale", key_scale, key_params),
                        ("key_zero", key_zero, key_params),
                        ("value_scale", value_scale, (b, k, s, d // group)),
                        ("value_zero", value_zero, (b, k, s, d // group)),
                        ("key_positions", key_positions, (b, k, s)),
                        ("query_positions", query_positions, (b,))):
    _check(tuple(x.shape) == want, f"{name} must have shape {want}, got {tuple(x.shape)}.")


@functools.partial(jax.jit, static_argnames=("bits", "group", "key_axis", "return_probs",
                                             "block_k", "interpret"))
def quantized_decode_attention(q, key_codes, key_scale, key_zero, value_codes, value_scale,
                               value_zero, key_positions, query_positions, *, bits, group,
                               key_axis="tokens", return_probs=False, block_k=None,
                               interpret=None):
  """Decode attention over KIVI-quantized slots, dequantized tile by tile in the kernel.

  Same contract as `decode_attention.decode_attention` over the dequantized cache: a slot
  is visible iff `0 <= key_position <= query_position`, scale `D ** -0.5`, f32 softmax.

  Args:
    q: [B, K, G, D] (float32 or bfloat16), query head `k*G + g` reads KV head `k`.
    key_codes: [B, K, S, D*bits//32] uint32, keys quantized with axis=`key_axis`.
    key_scale, key_zero: [B, K, S // group, D] (key_axis="tokens") or
      [B, K, S, D // group] (key_axis="channels").
    value_codes: [B, K, S, D*bits//32] uint32, values quantized with axis="channels".
    value_scale, value_zero: [B, K, S, D // group].
    key_positions: [B, K, S] int32, negative = empty slot.
    query_positions: [B] int32.
    bits: 2, 4 or 8. group: the group size of both groupings (a power of two).
    key_axis: "tokens" (KIVI keys: per channel over `group` consecutive tokens, S a
      multiple of `group`) or "channels" (per token, as the values).
    return_probs: also return each slot's softmax probability.
    block_k: keys per inner-loop step (power of two, raised to `group` for
      key_axis="tokens"); None picks per platform. Slots are padded to a multiple of the per-program chunk.
    interpret: see `backend.dispatch`.
  Returns:
    out [B, K, G, D] in q.dtype, lse [B, K, G] float32 (`EMPTY_LSE`, out 0 for a query
    that sees nothing), and with `return_probs` probs [B, K, G, S] float32.
  """
  _check_attention_args(q, key_codes, key_scale, key_zero, value_codes, value_scale,
                        value_zero, key_positions, query_positions, bits, group, key_axis)

  def build(target):
    return functools.partial(_quant_attention_impl, target=target, bits=bits, group=group,
                             key_axis=key_axis, return_probs=return_probs, block_k=block_k)

  return backend.dispatch(build, q, key_codes, key_scale, key_zero, value_codes, value_scale,
                          value_zero, key_positions, query_positions, interpret=interpret)
