"""Decode attention over cross-layer caches: each layer's slots are rebuilt tile by tile
inside the kernel from what the layers share; no [S, D] array of keys or values is written.

xKV (`lowrank_decode_attention`; the cache is `kvjax.cache.cross_layer.LowRankLayerCache`).
A group of layers shares token-side factors, a basis for pre-RoPE keys Uk [B, S, r_k] and
one for values Uv [B, S, r_v]; each layer keeps coefficients Ck [B, r_k, K * D] and
Cv [B, r_v, K * D] (its slice of V_r^T, heads side by side). Slot t of KV head h holds
  k[t] = RoPE(Uk[t] Ck[:, h], pos[t]),      v[t] = Uv[t] Cv[:, h].
  * Keys: per tile of T slots the kernel rebuilds every head's pre-RoPE keys
    ([T, r_k] @ [r_k, D]), rotates them to the slots' positions and takes the logits.
    RoPE's rotate-half acts on the output columns, so rot(Uk Ck) = Uk rot(Ck): the wrapper
    rotates the coefficients once per call (a copy of the small factor, not per slot) and
    the kernel forms k = (Uk Ck) * cos + (Uk rot(Ck)) * sin with two dots and no lane
    shuffle (the halves of a D = 64 vector are sub-tile slices).
  * Values are ABSORBED, never rebuilt: sum_t p[t] v[t] = (sum_t p[t] Uv[t]) Cv[:, h], so
    the online softmax accumulates p @ Uv (rank r_v per query row) and each grid program
    multiplies its normalised accumulator by the value coefficients once, at the end.
  * All heads of a batch row share one program: the basis is the same for every head, so
    it is read once per row, r_k + r_v numbers per slot (a dense layer reads 2 K D). The
    query rows of all heads are stacked and each head's logits are selected into its
    rows (the row-heads pattern of `decode_attention_flat`); the value coefficients are
    applied per head the same way. One position per slot serves every head (a basis row
    is one token of the group).

MiniCache (`merged_decode_attention`; `MergedLayerCache`). A pair of layers shares unit
directions of keys and values [B, K, S, D]; each layer keeps per-slot norms and its R
retained slots per head, stored exactly (keys and values retained separately: an index
[B, K, R] and the vectors [B, K, R, D] each). Slot t holds k[t] = |k_t| dir_k[t] unless t
is a retained key slot (then the stored key); values likewise.
  * the kernel, grid (batch, KV head, chunk): per tile it rebuilds keys and values as norm
    times direction and runs the online softmax, over the slots with NEITHER part
    retained: the wrapper passes the slot positions with every retained slot set empty.
  * XLA, `retained_slots`: the slots with a retained key or value (at most 2R per head),
    each with its exact key and value (the stored vector where retained, norm times
    direction gathered where not), attended densely (`exact_partial`) and merged with the
    kernel's partial by log-sum-exp: exactly one softmax over all slots.
  Why retained slots are not handled inside the kernel: a tile cannot find its retained
  slots without testing every retained index against it (no scatter or sort lowers in
  Mosaic or Triton), O(R S) per head and step with R = 5% of S by default: quadratic in
  the context, as GEAR's key picks would be (`pallas_kernels.gear`). Why masking and not a
  correction after the kernel (subtracting a retained slot's rebuilt share): retained
  slots are the ones whose rebuilt vector is farthest off, so a rebuilt logit can dominate
  the softmax and subtracting exp(logit) from the sum would cancel catastrophically.
  Masking is exact; it costs a per-step copy of the positions with the retained slots set
  empty (4 bytes per slot and head read and 4 written, next to the 4 D + 8 bytes of bf16
  directions, norms and positions the kernel reads: about 3% at D = 64), O(R log R)
  lookups of which key entries are also value entries, and O(R D) gathers.

Both return (out, lse) so a layer's dense tail merges in by `merge_partials`, as with
`decode_attention` and `gear`. Lowering notes: 2-D ops, f32 accumulation, masks from
iotas and tensors, positions read as a [1, C] row (masks) and, for RoPE, a [C, 1]
column; on GPU the feature axis and ranks are padded to powers of two >= 16 (Triton's
dot and load rules: zero columns and rows change no product), which copies the basis per
call when a rank is not one (xKV's ranks are fractions of the columns: keep them powers
of two on GPU to avoid it). Exports for "tpu" and "cuda" run in
tests/test_cross_layer_kernels.py; what Mosaic's layout passes and a Triton compile make
of the kernels is first seen on a real TPU or GPU (none was available when they were
written), and so are good block sizes (the defaults below are not measured).
"""

import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend
from pallas_kernels import decode_attention as da

_HI = lax.Precision.HIGHEST
_F32 = jnp.float32
# Triton dots need K, N >= 16: ranks are padded to this (and a power of two) on GPU.
_GPU_MIN_RANK = 16
# xKV rebuilds K heads' keys per tile: smaller tiles than plain decode attention.
_LOWRANK_BLOCK = {"tpu": 256, "gpu": 32, "cpu": 128}
_LOWRANK_CHUNK_BLOCKS = {"tpu": 4, "gpu": 16, "cpu": 4}
_MERGED_BLOCK = {"tpu": 512, "gpu": 64, "cpu": 128}
_MERGED_CHUNK_BLOCKS = {"tpu": 4, "gpu": 8, "cpu": 4}


class LowRankSlots(NamedTuple):
  """One xKV layer's shared slots: the group's basis and the layer's coefficients."""
  key_basis: jax.Array           # [B, S, r_k]
  value_basis: jax.Array         # [B, S, r_v]
  key_coefficients: jax.Array    # [B, r_k, K * D] (pre-RoPE keys)
  value_coefficients: jax.Array  # [B, r_v, K * D]


class MergedSlots(NamedTuple):
  """One MiniCache layer's shared slots: the pair's directions, the layer's norms and its
  retained slots (index -1 = no slot)."""
  key_norms: jax.Array         # [B, K, S]
  value_norms: jax.Array       # [B, K, S]
  key_directions: jax.Array    # [B, K, S, D] unit
  value_directions: jax.Array  # [B, K, S, D] unit
  key_index: jax.Array         # [B, K, R_k] int32 slot
  key_vectors: jax.Array       # [B, K, R_k, D]
  value_index: jax.Array       # [B, K, R_v] int32 slot
  value_vectors: jax.Array     # [B, K, R_v, D]


# ----------------------------------------------------------------------------- checks


def _check(cond, message):
  if not cond:
    raise ValueError(message)


def _check_shapes(want: dict, got: dict, context: str):
  for name, shape in want.items():
    _check(tuple(got[name].shape) == shape,
           f"{name} must have shape {shape} for {context}; got {tuple(got[name].shape)}.")


def check_lowrank_args(q, slots: LowRankSlots, key_positions, inv_freq, query_positions):
  """Validates an xKV decode attention call (shared with the reference)."""
  _check(q.ndim == 4, f"q must be 4-D [B, K, G, D], got shape {tuple(q.shape)}.")
  b, k, _, d = q.shape
  _check(d % 2 == 0, f"RoPE rotates pairs of channels: D must be even, got D={d}.")
  _check(slots.key_basis.ndim == 3 and slots.value_basis.ndim == 3,
         f"the bases must be [B, S, r], got {tuple(slots.key_basis.shape)} and "
         f"{tuple(slots.value_basis.shape)}.")
  s, rk, rv = slots.key_basis.shape[1], slots.key_basis.shape[2], slots.value_basis.shape[2]
  _check_shapes({"key_basis": (b, s, rk), "value_basis": (b, s, rv),
                 "key_coefficients": (b, rk, k * d), "value_coefficients": (b, rv, k * d),
                 "key_positions": (b, s), "inv_freq": (d // 2,), "query_positions": (b,)},
                dict(slots._asdict(), key_positions=key_positions, inv_freq=inv_freq,
                     query_positions=query_positions),
                f"q {tuple(q.shape)}, {s} slots, ranks {rk} and {rv}")


def check_merged_args(q, slots: MergedSlots, key_positions, query_positions):
  """Validates a MiniCache decode attention call (shared with the reference)."""
  _check(q.ndim == 4, f"q must be 4-D [B, K, G, D], got shape {tuple(q.shape)}.")
  b, k, _, d = q.shape
  _check(slots.key_norms.ndim == 3, f"key_norms must be [B, K, S], got "
         f"{tuple(slots.key_norms.shape)}.")
  s = slots.key_norms.shape[2]
  rk, rv = slots.key_index.shape[-1], slots.value_index.shape[-1]
  _check_shapes({"key_norms": (b, k, s), "value_norms": (b, k, s),
                 "key_directions": (b, k, s, d), "value_directions": (b, k, s, d),
                 "key_index": (b, k, rk), "key_vectors": (b, k, rk, d),
                 "value_index": (b, k, rv), "value_vectors": (b, k, rv, d),
                 "key_positions": (b, k, s), "query_positions": (b,)},
                dict(slots._asdict(), key_positions=key_positions,
                     query_positions=query_positions),
                f"q {tuple(q.shape)} and {s} slots")


# ------------------------------------------------------------- XLA-side pieces (jnp)


def rotate_half(x):
  """RoPE's rotate-half of the last axis: [x1, x2] -> [-x2, x1]."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def _entry_of(index, slots):
  """For each slot of `slots` [B, K, N], the entry of `index` [B, K, R] that holds it, -1
  where none does (or the slot is -1). `index` holds distinct slots or -1 (O(R log R))."""
  r = index.shape[-1]
  if r == 0:
    return jnp.full(slots.shape, -1, jnp.int32)
  keyed = jnp.where(index >= 0, index, jnp.iinfo(jnp.int32).max)
  order = jnp.argsort(keyed, axis=-1)
  ordered = jnp.take_along_axis(keyed, order, axis=-1)
  at = jnp.minimum(jax.vmap(jax.vmap(jnp.searchsorted))(ordered, slots), r - 1)
  hit = (jnp.take_along_axis(ordered, at, axis=-1) == slots) & (slots >= 0)
  return jnp.where(hit, jnp.take_along_axis(order, at, axis=-1), -1).astype(jnp.int32)


def _take_slots(x, index):
  """x [B, K, S, ...] at slots index [B, K, N] (any slot where index < 0)."""
  at = jnp.maximum(index, 0).reshape(index.shape + (1,) * (x.ndim - 3))
  return jnp.take_along_axis(x, at, axis=2)


def _rebuilt_at(norms, directions, index, dtype):
  """norm x direction [B, K, N, D] at slots `index`, rounded to `dtype` as the kernel's
  tiles are (float32 result)."""
  return (_take_slots(norms, index)[..., None].astype(_F32)
          * _take_slots(directions, index).astype(_F32)).astype(dtype).astype(_F32)


def retained_slots(slots: MergedSlots, key_positions, dtype):
  """The slots with a retained key or value, each with its exact key and value, and the
  positions the kernel reads (those slots set empty).

  Returns (keys, values [B, K, R_k + R_v, D] float32, their positions [B, K, R_k + R_v],
  kernel positions [B, K, S]). The key entries come first (their value is the retained one
  when the slot is also a value entry, else norm x direction); then the value entries
  (their key rebuilt), empty (-1) where the slot is already a key entry.
  """
  ki, vi = slots.key_index.astype(jnp.int32), slots.value_index.astype(jnp.int32)
  value_of_key = _entry_of(vi, ki)
  key_of_value = _entry_of(ki, vi)
  f32 = lambda x: x.astype(_F32)
  key_entry_values = jnp.where((value_of_key >= 0)[..., None],
                               f32(_take_slots(slots.value_vectors, value_of_key)),
                               _rebuilt_at(slots.value_norms, slots.value_directions, ki, dtype))
  keys = jnp.concatenate(
      [f32(slots.key_vectors), _rebuilt_at(slots.key_norms, slots.key_directions, vi, dtype)],
      axis=2)
  values = jnp.concatenate([key_entry_values, f32(slots.value_vectors)], axis=2)
  position_at = lambda index: jnp.where(index >= 0, _take_slots(key_positions, index), -1)
  positions = jnp.concatenate(
      [position_at(ki), jnp.where(key_of_value >= 0, -1, position_at(vi))], axis=2)
  b, k, s = key_positions.shape
  rows, heads = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
  drop = lambda index: jnp.where(index >= 0, index, s)   # -1: no slot, out of range
  masked = key_positions.astype(jnp.int32)
  for index in (ki, vi):
    masked = masked.at[rows, heads, drop(index)].set(-1, mode="drop")
  return keys, values, positions.astype(jnp.int32), masked


def exact_partial(q, keys, values, key_positions, query_positions):
  """(out [B, K, G, D] float32, lse [B, K, G]) of q [B, K, G, D] over a few dense slots
  keys/values [B, K, N, D] (float32 in XLA; `EMPTY_LSE` and 0 where none is visible)."""
  logits = jnp.einsum("bkgd,bknd->bkgn", q.astype(_F32), keys.astype(_F32),
                      precision=_HI) * q.shape[-1] ** -0.5
  seen = ((key_positions >= 0)
          & (key_positions <= query_positions[:, None, None]))[:, :, None, :]
  m = jnp.max(jnp.where(seen, logits, da.EMPTY_LSE), axis=-1, keepdims=True)
  p = jnp.where(seen, jnp.exp(logits - m), 0.0)
  total = p.sum(-1)
  any_seen = total > 0
  safe = jnp.where(any_seen, total, 1.0)
  out = jnp.einsum("bkgn,bknd->bkgd", p, values.astype(_F32), precision=_HI) / safe[..., None]
  return out, jnp.where(any_seen, m[..., 0] + jnp.log(safe), da.EMPTY_LSE)


# --------------------------------------------------------------------- xKV: kernel


def _dot(a, b):
  """a [M, N] @ b [N, P] in float32 at the highest precision."""
  return lax.dot_general(a.astype(_F32), b.astype(_F32), (((1,), (0,)), ((), ())),
                         precision=_HI, preferred_element_type=_F32)


def _lowrank_kernel(q_ref, kb_ref, vb_ref, kc_ref, kr_ref, vc_ref, freq_ref, kpos_ref,
                    kcol_ref, heads_ref, qpos_ref, o_ref, lse_ref, *, block_k, num_blocks,
                    scale, num_heads):
  """Online softmax over one chunk of an xKV layer's slots, all heads of a batch row.

  Refs (after squeezing): q [R, D] (every head's query rows stacked); key/value basis
  [C, r_k] / [C, r_v]; key coefficients, rotated key coefficients [K, r_k, D] and value
  coefficients [K, r_v, D]; freq [1, D] (RoPE's inverse frequencies, both halves); kpos
  [1, C] and kcol [C, 1] (the slots' positions as a row and a column); heads [R, 1] (each
  row's KV head, -2 for padding rows); qpos [1, 1]; out [R, D] f32, lse [R, 1] f32.
  """
  q = q_ref[...]
  rows = q.shape[0]
  qpos = qpos_ref[...]
  precision = da._precision(q.dtype)
  heads = jnp.broadcast_to(heads_ref[...], (rows, block_k))
  freq = freq_ref[...]

  def body(i, carry):
    start = pl.multiple_of(i * block_k, block_k)
    basis = kb_ref[pl.ds(start, block_k), :]
    angle = jnp.maximum(kcol_ref[pl.ds(start, block_k), :], 0).astype(_F32) * freq
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    s = jnp.zeros((rows, block_k), _F32)
    for h in range(num_heads):
      keys = _dot(basis, kc_ref[h]) * cos + _dot(basis, kr_ref[h]) * sin   # [T, D]
      logits = lax.dot_general(q, keys.astype(q.dtype), (((1,), (1,)), ((), ())),
                               precision=precision, preferred_element_type=_F32)
      s = jnp.where(heads == h, logits, s)
    kpos = jnp.broadcast_to(kpos_ref[:, pl.ds(start, block_k)], s.shape)
    visible = (kpos >= 0) & (kpos <= qpos) & (heads >= 0)
    vals = vb_ref[pl.ds(start, block_k), :].astype(_F32)        # absorbed: p @ Uv
    return da.online_softmax_step(carry, s * scale, visible, vals, _HI)

  m, l, acc = lax.fori_loop(0, num_blocks, body,
                            da.online_softmax_start(rows, vb_ref.shape[-1]))
  absorbed, lse = da.online_softmax_result(m, l, acc)             # [R, r_v]
  heads = jnp.broadcast_to(heads_ref[...], o_ref.shape)
  out = jnp.zeros(o_ref.shape, _F32)
  for h in range(num_heads):   # the value coefficients, once per program
    out = jnp.where(heads == h, _dot(absorbed, vc_ref[h]), out)
  o_ref[...] = out
  lse_ref[...] = lse


def _head_major(coefficients, k, d, rank):
  """[B, r, K * D] -> [B, K, rank, D] (zero rows past r)."""
  b, r, _ = coefficients.shape
  return backend.pad_axis(coefficients.reshape(b, r, k, d).transpose(0, 2, 1, 3), 2, rank)


def _lowrank_impl(q, slots: LowRankSlots, key_positions, inv_freq, query_positions, *,
                  target, block_k):
  b, k, g, d = q.shape
  s = slots.key_basis.shape[1]
  h = k * g
  tiling = backend.tile_keys(target, s, block_k, default_block=_LOWRANK_BLOCK,
                             chunk_blocks=_LOWRANK_CHUNK_BLOCKS)
  rows, dp = da._query_rows(h), backend.lane_dim(target, d)
  sp, c, nc = tiling.padded, tiling.chunk, tiling.num_chunks
  rank = lambda r: (max(_GPU_MIN_RANK, backend.next_power_of_2(r)) if target.is_gpu
                    else max(r, 1))
  rk, rv = rank(slots.key_basis.shape[-1]), rank(slots.value_basis.shape[-1])
  pad_d = lambda x: backend.pad_axis(x, 3, dp)
  kc = _head_major(slots.key_coefficients, k, d, rk)
  kc, kr = pad_d(kc), pad_d(rotate_half(kc))    # rotated before D is padded
  vc = pad_d(_head_major(slots.value_coefficients, k, d, rv))
  kb = backend.pad_axis(backend.pad_axis(slots.key_basis, 2, rk), 1, sp)
  vb = backend.pad_axis(backend.pad_axis(slots.value_basis, 2, rv), 1, sp)
  inv_freq = inv_freq.astype(_F32)
  freq = backend.pad_axis(jnp.concatenate([inv_freq, inv_freq]), 0, dp)[None, :]
  pos = backend.pad_axis(key_positions.astype(jnp.int32), 1, sp, -1)
  # Padding rows own head -2: no head's logits land there and they see nothing.
  row_heads = backend.pad_axis(jnp.arange(h, dtype=jnp.int32) // g, 0, rows, -2)[:, None]
  qp = backend.pad_axis(backend.pad_axis(q.reshape(b, h, d), 2, dp), 1, rows)
  qpos = query_positions.astype(jnp.int32).reshape(b, 1, 1)

  whole = lambda x: pl.BlockSpec((None,) + x.shape[1:], lambda i, t: (i,) + (0,) * (x.ndim - 1))
  out = pl.pallas_call(
      functools.partial(_lowrank_kernel, block_k=tiling.block,
                        num_blocks=tiling.blocks_per_chunk, scale=d ** -0.5, num_heads=k),
      out_shape=[jax.ShapeDtypeStruct((b, nc, rows, dp), _F32),
                 jax.ShapeDtypeStruct((b, nc, rows, 1), _F32)],
      grid=(b, nc),
      in_specs=[whole(qp),
                pl.BlockSpec((None, c, rk), lambda i, t: (i, t, 0)),
                pl.BlockSpec((None, c, rv), lambda i, t: (i, t, 0)),
                whole(kc), whole(kr), whole(vc),
                pl.BlockSpec((1, dp), lambda i, t: (0, 0)),
                pl.BlockSpec((None, 1, c), lambda i, t: (i, 0, t)),
                pl.BlockSpec((None, c, 1), lambda i, t: (i, t, 0)),
                pl.BlockSpec((rows, 1), lambda i, t: (0, 0)),
                pl.BlockSpec((None, 1, 1), lambda i, t: (i, 0, 0))],
      out_specs=[pl.BlockSpec((None, None, rows, dp), lambda i, t: (i, t, 0, 0)),
                 pl.BlockSpec((None, None, rows, 1), lambda i, t: (i, t, 0, 0))],
      interpret=target.interpret,
      compiler_params=backend.compiler_params(
          target, dimension_semantics=("parallel",) * 2, num_warps=4, num_stages=2),
      name="lowrank_decode_attention",
  )(qp, kb, vb, kc, kr, vc, freq, pos[:, None, :], pos[:, :, None], row_heads, qpos)
  out, lse = da._finish(out[0], out[1], None, rows=h, dim=d, length=s, chunk_axis=1,
                        dtype=q.dtype)
  return out.reshape(b, k, g, d), lse.reshape(b, k, g)


@functools.partial(jax.jit, static_argnames=("block_k", "interpret"))
def lowrank_decode_attention(q, slots: LowRankSlots, key_positions, inv_freq,
                             query_positions, *, block_k=None, interpret=None):
  """Decode attention over one xKV layer's shared slots, keys rebuilt tile by tile inside
  the kernel and the value coefficients absorbed (applied once to p @ Uv, see the module
  docstring).

  Same contract as `decode_attention.decode_attention` over the keys
  RoPE(Uk Ck, pos) and values Uv Cv: a slot is visible iff `0 <= position <=
  query_position`, scale `D ** -0.5`, float32 softmax.

  Args:
    q: [B, K, G, D] post-RoPE queries (float32 or bfloat16); query head `k*G + g` reads
      KV head `k`.
    slots: `LowRankSlots` of S > 0 slots.
    key_positions: [B, S] int32, one per slot for every head; negative = empty slot.
    inv_freq: [D // 2] float32 RoPE inverse frequencies (rotate-half layout).
    query_positions: [B] int32.
    block_k: slots per inner-loop step (power of two); None picks per platform.
    interpret: see `backend.dispatch`.
  Returns:
    out [B, K, G, D] in q.dtype, lse [B, K, G] float32 (`EMPTY_LSE`, out 0 for a query
    that sees nothing).
  """
  check_lowrank_args(q, slots, key_positions, inv_freq, query_positions)
  _check(slots.key_basis.shape[1] > 0, "the layer has no shared slots: skip them instead "
         "of attending to them.")

  def build(target):
    return functools.partial(_lowrank_impl, target=target, block_k=block_k)

  return backend.dispatch(build, q, slots, key_positions, inv_freq, query_positions,
                          interpret=interpret)


# ---------------------------------------------------------------- MiniCache: kernel


def _merged_kernel(q_ref, kn_ref, vn_ref, kd_ref, vd_ref, kpos_ref, qpos_ref, o_ref, lse_ref,
                   *, block_k, num_blocks, scale):
  """Online softmax over one chunk of a MiniCache layer's slots for one KV head.

  Refs (2-D after squeezing): q [R, D]; key/value norms [C, 1]; key/value directions
  [C, D]; kpos [1, C] (retained slots already empty); qpos [1, 1]; out [R, D] f32,
  lse [R, 1] f32.
  """
  q = q_ref[...]
  qpos = qpos_ref[...]
  precision = da._precision(q.dtype)

  def body(i, carry):
    tile = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
    rebuilt = lambda n_ref, d_ref: (n_ref[tile, :].astype(_F32)
                                    * d_ref[tile, :].astype(_F32)).astype(q.dtype)
    keys, vals = rebuilt(kn_ref, kd_ref), rebuilt(vn_ref, vd_ref)
    s = lax.dot_general(q, keys, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=_F32) * scale
    kpos = jnp.broadcast_to(kpos_ref[:, tile], s.shape)
    visible = (kpos >= 0) & (kpos <= qpos)
    return da.online_softmax_step(carry, s, visible, vals, precision)

  m, l, acc = lax.fori_loop(0, num_blocks, body,
                            da.online_softmax_start(q.shape[0], q.shape[1]))
  o_ref[...], lse_ref[...] = da.online_softmax_result(m, l, acc)


def _merged_impl(q, key_norms, value_norms, key_directions, value_directions,
                 kernel_positions, query_positions, *, target, block_k):
  b, k, g, d = q.shape
  s = key_norms.shape[2]
  tiling = backend.tile_keys(target, s, block_k, default_block=_MERGED_BLOCK,
                             chunk_blocks=_MERGED_CHUNK_BLOCKS)
  rows, dp = da._query_rows(g), backend.lane_dim(target, d)
  sp, c, nc = tiling.padded, tiling.chunk, tiling.num_chunks
  qp = backend.pad_axis(backend.pad_axis(q, 3, dp), 2, rows)
  column = lambda x: backend.pad_axis(x, 2, sp)[..., None]      # [B, K, S, 1]: free
  direction = lambda x: backend.pad_axis(backend.pad_axis(x, 3, dp), 2, sp)
  kpos = backend.pad_axis(kernel_positions.astype(jnp.int32), 2, sp, -1)[:, :, None, :]
  qpos = query_positions.astype(jnp.int32).reshape(b, 1, 1)

  chunk = lambda last: pl.BlockSpec((None, None, c, last), lambda i, j, t: (i, j, t, 0))
  out_shape, out_specs = da.chunk_outputs(b, k, nc, rows, dp, sp, c, False)
  results = pl.pallas_call(
      functools.partial(_merged_kernel, block_k=tiling.block,
                        num_blocks=tiling.blocks_per_chunk, scale=d ** -0.5),
      out_shape=out_shape,
      grid=(b, k, nc),
      in_specs=[pl.BlockSpec((None, None, rows, dp), lambda i, j, t: (i, j, 0, 0)),
                chunk(1), chunk(1), chunk(dp), chunk(dp),
                pl.BlockSpec((None, None, 1, c), lambda i, j, t: (i, j, 0, t)),
                pl.BlockSpec((None, 1, 1), lambda i, j, t: (i, 0, 0))],
      out_specs=out_specs,
      interpret=target.interpret,
      compiler_params=backend.compiler_params(
          target, dimension_semantics=("parallel",) * 3, num_warps=4, num_stages=2),
      name="merged_decode_attention",
  )(qp, column(key_norms), column(value_norms), direction(key_directions),
    direction(value_directions), kpos, qpos)
  # float32: the retained slots' partial merges in before the output is rounded.
  return da._finish(results[0], results[1], None, rows=g, dim=d, length=s, chunk_axis=2,
                    dtype=_F32)


@functools.partial(jax.jit, static_argnames=("block_k", "interpret"))
def merged_decode_attention(q, slots: MergedSlots, key_positions, query_positions, *,
                            block_k=None, interpret=None):
  """Decode attention over one MiniCache layer's shared slots: the kernel rebuilds the
  unretained slots tile by tile (norm x direction), XLA attends the retained ones exactly,
  and the two merge by log-sum-exp (see the module docstring).

  Same contract as `decode_attention.decode_attention` over `kvjax.cache.cross_layer.
  rebuild`'s keys and values.

  Args:
    q: [B, K, G, D] post-RoPE queries (float32 or bfloat16).
    slots: `MergedSlots` of S > 0 slots per head.
    key_positions: [B, K, S] int32, negative = empty slot.
    query_positions: [B] int32.
    block_k, interpret: as in `lowrank_decode_attention`.
  Returns:
    out [B, K, G, D] in q.dtype, lse [B, K, G] float32.
  """
  check_merged_args(q, slots, key_positions, query_positions)
  _check(slots.key_norms.shape[2] > 0, "the layer has no shared slots: skip them instead "
         "of attending to them.")
  keys, values, positions, masked = retained_slots(slots, key_positions, q.dtype)

  def build(target):
    return functools.partial(_merged_impl, target=target, block_k=block_k)

  out, lse = backend.dispatch(build, q, slots.key_norms, slots.value_norms,
                              slots.key_directions, slots.value_directions, masked,
                              query_positions, interpret=interpret)
  if positions.shape[-1]:
    out, lse = da.merge_partials(out, lse, *exact_partial(q, keys, values, positions,
                                                          query_positions))
  return out.astype(q.dtype), lse
