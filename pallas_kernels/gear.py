"""GEAR decode attention: one pass over KIVI codes, sparse outliers and low-rank factors.

A GEAR part (`GearPart`; the format is `kvjax.ops.gear`'s, the cache `kvjax.cache.gear`)
holds S slots per KV head in `blocks` equal blocks of n = S / blocks consecutive slots,
each block stored as
  K = put(deq(Qk), Sk) + Ak Bk^T,      V = put(deq(Qv), Sv) + Av Bv^T,
with KIVI codes (keys per channel over `group` tokens, values per token over `group`
channels, `pallas_kernels.quantization`), outliers Sk (per channel: 2c token indices
within the block and their values; the first c are the largest, the last c the smallest)
and Sv (per token: 2c' channel indices and values), A [n, r] per slot and B [D, r] per
block. `put` REPLACES the base at an outlier entry: the base holds the quantized vector
mean there (`kvjax.ops.gear.extract_outliers`), not a residual to add to. So for slot t
of block j, query q and probabilities p:
  q . K[t] = q . deq(Qk)[t] + sum_{c: t in Sk[j, c]} q[c] (Sk value - deq(Qk)[t, c])
             + (q Bk[j]) . Ak[t]
  sum_t p[t] V[t] = sum_t p[t] put(deq(Qv), Sv)[t] + sum_j (p_j Av_j) Bv[j]^T.
A pick counts once: the top and bottom lists of a vector overlap only when it has ties
or fewer than 2c valid entries (put writes the same value twice there); `unique_picks`
drops the repeats from the key sum.

What runs where:
  * XLA, `key_outlier_logits`: the key outlier sum above, as a [B, K, G, S] float32 logit
    correction (a gather of the base at the picks and a scatter-add of 2c * D products
    per block: O(picks)). The kernel reads it as G' = pow2(G) float32 rows per slot (at
    least 8 on TPU): at D = 128 and G = 4, 16 bytes per slot next to the 64 of the 2-bit
    key and value codes (32 on TPU). It cannot move into the kernel without a quadratic
    cost: a key tile would have to test every pick of every channel of its block against
    its slots (a channel's picks land anywhere in the block, and a kernel can neither
    scatter nor sort them into tiles: no scatter, top-k or sort lowers in Mosaic or
    Triton), i.e. 2c * D * tile work per tile, O(ratio * n^2 * D) per step for a prompt
    block of n slots: at 4K tokens and ratio 0.02 (41 + 41 picks per channel) about 80
    times the work of dequantizing the block.
  * the kernel, `gear_decode_attention`: per tile of T slots it unpacks and dequantizes
    the keys, adds the tile's low-rank keys A_tile B^T, takes q . k, adds the logit
    correction, then dequantizes the values, puts the value outliers in (a select per
    pick: a token's picks are channels of its own row, so this is local to the tile)
    and adds A_tile B^T; an online softmax over the tiles, chunks of slots per grid
    program merged by log-sum-exp (as `decode_attention`). No [S, D] array of
    reconstructed keys or values is ever written.

Low rank per tile: when blocks are smaller than a tile (a decode part's one-group
blocks), the tile's A [T, r] is spread block-diagonally to [T, L], L = (T / n) * rp, and
the tile's blocks' B^T stacked to [L, D], so one dot gives A_tile B^T for every block of
the tile. Keys and values share one rank r (GEAR's), rp = r, or at least 16 on GPU
(Triton dots need K >= 16): the wrapper stacks B^T with zero rows (a per-block copy,
small), and A is widened inside the kernel (no per-slot copy). A rank that is not a power
of two (or 0) is padded to one with zero columns of A and B in XLA (a per-slot copy), and
so is a value pick count (index -1, which matches no channel).

Lowering notes: as `pallas_kernels.quantization` (int32 codes, tile-and-shift unpack,
repeats of group parameters by broadcast and minor-dim reshape); the spread of A is the
same tile-and-mask pattern; the logit correction's G' rows are repeated to the kernel's
query rows by a broadcast and a major-dim reshape; block-index arithmetic uses shifts
(Mosaic lowers signed // and % only with a TPU attached). Value picks are read as
[T, 1] columns of the picks' ref. Exports for "tpu" and "cuda" run in
tests/test_gear_kernel.py; what Mosaic's layout pass and a Triton compile make of the
kernel is first seen on a real TPU or GPU (none was available when it was written).
"""

import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend
from pallas_kernels import decode_attention as da
from pallas_kernels import quantization as qz

_HI = lax.Precision.HIGHEST
# Triton dots need K, N >= 16: the low-rank dots' rank axis is padded to this on GPU.
_GPU_MIN_RANK = 16


class GearPart(NamedTuple):
  """One GEAR part of S slots per KV head in `blocks` blocks (a pytree of arrays)."""
  key_codes: jax.Array              # [B, K, S, D * bits // 32] uint32, axis="tokens"
  key_scale: jax.Array              # [B, K, S // group, D]
  key_zero: jax.Array               # [B, K, S // group, D]
  value_codes: jax.Array            # [B, K, S, D * bits // 32] uint32, axis="channels"
  value_scale: jax.Array            # [B, K, S, D // group]
  value_zero: jax.Array             # [B, K, S, D // group]
  key_outlier_values: jax.Array     # [B, K, blocks, D, 2c]: c largest, then c smallest
  key_outlier_indices: jax.Array    # [B, K, blocks, D, 2c] int32 token within the block
  value_outlier_values: jax.Array   # [B, K, S, 2c']
  value_outlier_indices: jax.Array  # [B, K, S, 2c'] int32 channel
  key_a: jax.Array                  # [B, K, S, r]
  key_b: jax.Array                  # [B, K, blocks, D, r]
  value_a: jax.Array                # [B, K, S, r]
  value_b: jax.Array                # [B, K, blocks, D, r]

  @property
  def slots(self) -> int:
    return self.key_codes.shape[2]

  @property
  def blocks(self) -> int:
    return self.key_b.shape[2]


# ------------------------------------------------------------- XLA-side pieces (jnp)


def base_at(codes, scale, zero, tokens, channels, *, bits, group, axis):
  """deq(Q) at entries (tokens [B, K, P], channels [B, K, P]) of codes [B, K, S, W]:
  float32 [B, K, P], computed as `dequantize` does (code * scale + zero in float32)."""
  b, k, s, w = codes.shape
  words = jnp.take_along_axis(codes.reshape(b, k, s * w), tokens * w + channels % w, axis=2)
  shift = ((channels // w) * bits).astype(jnp.uint32)
  code = ((words.astype(jnp.uint32) >> shift) & jnp.uint32(2 ** bits - 1)).astype(jnp.float32)
  rows, cols = (tokens // group, channels) if axis == "tokens" else (tokens, channels // group)

  def param(p):
    m = p.shape[-1]
    flat = p.reshape(b, k, -1)
    return jnp.take_along_axis(flat, rows * m + cols, axis=2).astype(jnp.float32)

  return code * param(scale) + param(zero)


def unique_picks(indices):
  """[..., 2c] bool: False for a bottom pick (the last c) that repeats a top pick.

  Each list comes from one `top_k`, so it has no repeats of its own."""
  c = indices.shape[-1] // 2
  top, bottom = indices[..., :c], indices[..., c:]
  repeat = jnp.any(bottom[..., :, None] == top[..., None, :], axis=-1)
  return jnp.concatenate([jnp.ones(top.shape, jnp.bool_), ~repeat], axis=-1)


def key_outlier_logits(q, part: GearPart, *, bits, group):
  """[B, K, G, S] float32: what the key outliers change in q . deq(Qk) (unscaled).

  q [B, K, G, D]. For each pick (block j, channel c, token t): q[c] * (value -
  deq(Qk)[t, c]), repeats counted once, summed per slot by a scatter-add."""
  b, k, g, d = q.shape
  s, nb = part.slots, part.blocks
  idx = part.key_outlier_indices.astype(jnp.int32)
  picks = idx.shape[-1]
  if s == 0 or picks == 0:
    return jnp.zeros((b, k, g, s), jnp.float32)
  n = s // nb
  tokens = (idx + (jnp.arange(nb, dtype=jnp.int32) * n)[:, None, None]).reshape(b, k, -1)
  channels = jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32)[:, None], idx.shape)
  channels = channels.reshape(b, k, -1)
  base = base_at(part.key_codes, part.key_scale, part.key_zero, tokens, channels,
                 bits=bits, group=group, axis="tokens")
  delta = jnp.where(unique_picks(idx).reshape(b, k, -1),
                    part.key_outlier_values.reshape(b, k, -1).astype(jnp.float32) - base,
                    0.0)
  q_at = jnp.broadcast_to(q.astype(jnp.float32)[:, :, :, None, :, None],
                          (b, k, g, nb, d, picks)).reshape(b, k, g, -1)
  rows = (jnp.arange(b)[:, None, None, None], jnp.arange(k)[None, :, None, None],
          jnp.arange(g)[None, None, :, None])
  return jnp.zeros((b, k, g, s), jnp.float32).at[rows + (tokens[:, :, None, :],)].add(
      q_at * delta[:, :, None, :])


# ----------------------------------------------------------------------------- checks


def _check(cond, message):
  if not cond:
    raise ValueError(message)


def check_args(q, part: GearPart, key_positions, query_positions, bits, group):
  """Validates a GEAR decode attention call (shared with the reference)."""
  qz._check_format(bits, group)
  _check(q.ndim == 4, f"q must be 4-D [B, K, G, D], got shape {tuple(q.shape)}.")
  b, k, _, d = q.shape
  w = qz._words(d, bits)
  s, nb = part.slots, part.blocks
  _check(d % group == 0, f"values are grouped over {group} channels: D must be a multiple "
         f"of group={group}, got D={d}.")
  _check(nb > 0 and s % nb == 0 and (s // nb) % group == 0,
         f"the part's {s} slots must be {nb} equal blocks of whole groups of {group} slots "
         f"(key_b has {nb} blocks).")
  r = part.key_a.shape[-1]
  rv = part.value_a.shape[-1]
  ck = part.key_outlier_indices.shape[-1]
  cv = part.value_outlier_indices.shape[-1]
  want = {"key_codes": (b, k, s, w), "value_codes": (b, k, s, w),
          "key_scale": (b, k, s // group, d), "key_zero": (b, k, s // group, d),
          "value_scale": (b, k, s, d // group), "value_zero": (b, k, s, d // group),
          "key_outlier_values": (b, k, nb, d, ck), "key_outlier_indices": (b, k, nb, d, ck),
          "value_outlier_values": (b, k, s, cv), "value_outlier_indices": (b, k, s, cv),
          "key_a": (b, k, s, r), "key_b": (b, k, nb, d, r),
          "value_a": (b, k, s, rv), "value_b": (b, k, nb, d, rv)}
  for name, shape in want.items():
    got = tuple(getattr(part, name).shape)
    _check(got == shape, f"{name} must have shape {shape} for q {tuple(q.shape)}, "
           f"{s} slots, {nb} blocks, bits={bits}, group={group}; got {got}.")
  for name in ("key_codes", "value_codes"):
    _check(getattr(part, name).dtype in (jnp.uint32, jnp.int32),
           f"{name} must be uint32 packed words, got dtype {getattr(part, name).dtype}.")
  _check(ck % 2 == 0, f"key outliers come in top/bottom pairs: 2c per channel, got {ck}.")
  _check(tuple(key_positions.shape) == (b, k, s),
         f"key_positions must have shape {(b, k, s)}, got {tuple(key_positions.shape)}.")
  _check(tuple(query_positions.shape) == (b,),
         f"query_positions must have shape {(b,)}, got {tuple(query_positions.shape)}.")


# ----------------------------------------------------------------------------- kernel


def _spread(a, *, rank, rank_lanes, lanes, block_slots):
  """A tile [T, rank] -> [T, lanes]: lane l holds A[:, l % rank_lanes] for the slots of
  the tile's (l // rank_lanes)-th block, 0 elsewhere (rank, rank_lanes and block_slots
  are powers of two, rank <= rank_lanes)."""
  t = a.shape[0]
  tiled = lax.broadcast_in_dim(a, (t, lanes // rank, rank), (0, 2)).reshape(t, lanes)
  # Powers of two: shifts and masks (Mosaic's signed // and % need a TPU to lower).
  lane = lax.broadcasted_iota(jnp.int32, (t, lanes), 1)
  keep = (lane & (rank_lanes - 1)) < rank
  if block_slots is not None:
    row = lax.broadcasted_iota(jnp.int32, (t, lanes), 0)
    block_shift = block_slots.bit_length() - 1
    lane_shift = rank_lanes.bit_length() - 1
    keep = keep & (lax.shift_right_logical(row, block_shift)
                   == lax.shift_right_logical(lane, lane_shift))
  return jnp.where(keep, tiled, 0.0)


def _gear_kernel(q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, kbias_ref, ka_ref,
                 kb_ref, va_ref, vb_ref, vov_ref, voi_ref, kpos_ref, qpos_ref, o_ref, lse_ref,
                 *, bits, group, block_k, num_blocks, scale, rank, rank_lanes, block_slots,
                 value_picks):
  """Online softmax over one chunk of a GEAR part for a tile of query rows.

  Refs (2-D after squeezing): q [R, D]; key codes [C, W] int32, key scale/zero
  [C // group, D]; value codes [C, W] int32, value scale/zero [C, D // group]; key logit
  correction [G', C] f32 (G' divides R); key/value A [C, rank]; key/value B^T stacked
  [(C / block_slots or 1) * rank_lanes, D]; value outlier values/indices [C, picks];
  kpos [1, C], qpos [1, 1]; outputs out [R, D] f32, lse [R, 1] f32.
  block_slots: slots per low-rank block when blocks are smaller than a tile, else None
  (the whole chunk lies in one block).
  """
  q = q_ref[...]
  rows, dim = q.shape
  qpos = qpos_ref[...]
  precision = da._precision(q.dtype)
  groups = block_k // group
  lanes = rank_lanes * (1 if block_slots is None else block_k // block_slots)
  spread = functools.partial(_spread, rank=rank, rank_lanes=rank_lanes, lanes=lanes,
                             block_slots=block_slots)
  bias_rows = kbias_ref.shape[0]

  def low_rank(a_ref, b_ref, i, start):
    """This tile's A B^T [T, D] float32."""
    if block_slots is None:
      bt = b_ref[...]
    else:
      bt = b_ref[pl.ds(pl.multiple_of(i * lanes, lanes), lanes), :]
    a = spread(a_ref[pl.ds(start, block_k), :].astype(jnp.float32))
    return lax.dot_general(a, bt.astype(jnp.float32), (((1,), (0,)), ((), ())),
                           precision=_HI, preferred_element_type=jnp.float32)

  def body(i, carry):
    start = pl.multiple_of(i * block_k, block_k)
    gstart = pl.multiple_of(i * groups, groups)
    codes = qz._unpack_tile(kc_ref[pl.ds(start, block_k), :], bits=bits, dim=dim)
    k_scale = qz._repeat_rows(ks_ref[pl.ds(gstart, groups), :].astype(jnp.float32), group)
    k_zero = qz._repeat_rows(kz_ref[pl.ds(gstart, groups), :].astype(jnp.float32), group)
    keys = (codes * k_scale + k_zero + low_rank(ka_ref, kb_ref, i, start)).astype(q.dtype)
    s = lax.dot_general(q, keys, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)
    bias = kbias_ref[:, pl.ds(start, block_k)]
    if rows > bias_rows:   # the correction's rows repeated over the kernel's query rows
      bias = lax.broadcast_in_dim(bias, (rows // bias_rows, bias_rows, block_k),
                                  (1, 2)).reshape(rows, block_k)
    s = (s + bias) * scale
    kpos = jnp.broadcast_to(kpos_ref[:, pl.ds(start, block_k)], s.shape)
    visible = (kpos >= 0) & (kpos <= qpos)
    codes = qz._unpack_tile(vc_ref[pl.ds(start, block_k), :], bits=bits, dim=dim)
    v_scale = qz._repeat_lanes(vs_ref[pl.ds(start, block_k), :].astype(jnp.float32), group)
    v_zero = qz._repeat_lanes(vz_ref[pl.ds(start, block_k), :].astype(jnp.float32), group)
    vals = codes * v_scale + v_zero
    channel = lax.broadcasted_iota(jnp.int32, vals.shape, 1)
    for j in range(value_picks):   # put: the outlier replaces the base
      at = jnp.broadcast_to(voi_ref[pl.ds(start, block_k), pl.ds(j, 1)], vals.shape)
      value = jnp.broadcast_to(vov_ref[pl.ds(start, block_k), pl.ds(j, 1)].astype(
          jnp.float32), vals.shape)
      vals = jnp.where(channel == at, value, vals)
    vals = (vals + low_rank(va_ref, vb_ref, i, start)).astype(q.dtype)
    return da.online_softmax_step(carry, s, visible, vals, precision)

  m, l, acc = lax.fori_loop(0, num_blocks, body, da.online_softmax_start(rows, dim))
  out, lse = da.online_softmax_result(m, l, acc)
  o_ref[...] = out
  lse_ref[...] = lse


def _pad_last(x, size, value=0):
  return backend.pad_axis(x, x.ndim - 1, size, value)


def _stacked_bt(bmat, rank_lanes, blocks):
  """B [B, K, nb, D, r] -> B^T of each block stacked [B, K, blocks * rank_lanes, D]
  (zero rows for the padded ranks and blocks)."""
  b, k, nb, d, _ = bmat.shape
  bt = backend.pad_axis(jnp.swapaxes(bmat, -1, -2), 3, rank_lanes)   # [B, K, nb, rl, D]
  bt = bt.reshape(b, k, nb * rank_lanes, d)
  return backend.pad_axis(bt, 2, blocks * rank_lanes)


def _gear_impl(q, part: GearPart, key_positions, query_positions, *, target, bits, group,
               block_k):
  b, k, g, d = q.shape
  s, nb = part.slots, part.blocks
  n = s // nb
  multi = nb > 1
  tiling = qz._attention_tiling(target, s, max(group, n) if multi else group, "tokens",
                                  block_k)
  rows = da._query_rows(g)
  sp, c, nc = tiling.padded, tiling.chunk, tiling.num_chunks
  # The logit correction's rows: a power of two dividing `rows` (8, one f32 tile, on TPU).
  bias_rows = min(rows, max(8 if target.is_tpu else 1, backend.next_power_of_2(g)))
  bias = key_outlier_logits(q, part, bits=bits, group=group)
  bias = backend.pad_axis(backend.pad_axis(bias, 2, bias_rows), 3, sp)
  qp = backend.pad_axis(q, 2, rows)
  kc, vc = (backend.pad_axis(lax.bitcast_convert_type(x, jnp.int32), 2, sp)
            for x in (part.key_codes, part.value_codes))
  ks, kz = (backend.pad_axis(x, 2, sp // group) for x in (part.key_scale, part.key_zero))
  vs, vz = (backend.pad_axis(x, 2, sp) for x in (part.value_scale, part.value_zero))
  kpos = backend.pad_axis(key_positions.astype(jnp.int32), 2, sp, -1)[:, :, None, :]
  qpos = query_positions.astype(jnp.int32).reshape(b, 1, 1)
  # Value picks: a power of two of them (>= 1); padding picks have index -1 (no channel).
  picks = backend.next_power_of_2(max(1, part.value_outlier_indices.shape[-1]))
  vov = backend.pad_axis(_pad_last(part.value_outlier_values, picks), 2, sp)
  voi = backend.pad_axis(_pad_last(part.value_outlier_indices.astype(jnp.int32), picks, -1),
                         2, sp)
  # Ranks: key and value factors share one (zero-padded) rank, a power of two >= 1.
  rank = backend.next_power_of_2(max(1, part.key_a.shape[-1], part.value_a.shape[-1]))
  rank_lanes = max(rank, _GPU_MIN_RANK) if target.is_gpu else rank
  ka, va = (backend.pad_axis(_pad_last(a, rank), 2, sp) for a in (part.key_a, part.value_a))
  stacked_blocks = sp // n if multi else 1
  kb, vb = (_stacked_bt(_pad_last(x, rank), rank_lanes, stacked_blocks)
            for x in (part.key_b, part.value_b))
  b_rows = (c // n if multi else 1) * rank_lanes
  b_index = (lambda i, j, t: (i, j, t, 0)) if multi else (lambda i, j, t: (i, j, 0, 0))

  w = kc.shape[-1]
  chunk = lambda last: pl.BlockSpec((None, None, c, last), lambda i, j, t: (i, j, t, 0))
  kparam_spec = pl.BlockSpec((None, None, c // group, d), lambda i, j, t: (i, j, t, 0))
  b_spec = pl.BlockSpec((None, None, b_rows, d), b_index)
  out_shape, out_specs = da.chunk_outputs(b, k, nc, rows, d, sp, c, False)
  results = pl.pallas_call(
      functools.partial(_gear_kernel, bits=bits, group=group, block_k=tiling.block,
                        num_blocks=tiling.blocks_per_chunk, scale=d ** -0.5, rank=rank,
                        rank_lanes=rank_lanes, block_slots=n if multi else None,
                        value_picks=picks),
      out_shape=out_shape,
      grid=(b, k, nc),
      in_specs=[pl.BlockSpec((None, None, rows, d), lambda i, j, t: (i, j, 0, 0)),
                chunk(w), kparam_spec, kparam_spec,
                chunk(w), chunk(d // group), chunk(d // group),
                pl.BlockSpec((None, None, bias_rows, c), lambda i, j, t: (i, j, 0, t)),
                chunk(rank), b_spec, chunk(rank), b_spec,
                chunk(picks), chunk(picks),
                pl.BlockSpec((None, None, 1, c), lambda i, j, t: (i, j, 0, t)),
                pl.BlockSpec((None, 1, 1), lambda i, j, t: (i, 0, 0))],
      out_specs=out_specs,
      interpret=target.interpret,
      compiler_params=backend.compiler_params(
          target, dimension_semantics=("parallel",) * 3, num_warps=4, num_stages=2),
      name="gear_decode_attention",
  )(qp, kc, ks, kz, vc, vs, vz, bias, ka, kb, va, vb, vov, voi, kpos, qpos)
  return da._finish(results[0], results[1], None, rows=g, dim=d, length=s, chunk_axis=2,
                    dtype=q.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group", "block_k", "interpret"))
def gear_decode_attention(q, part: GearPart, key_positions, query_positions, *, bits, group,
                          block_k=None, interpret=None):
  """Decode attention over one GEAR part, reconstructed tile by tile inside the kernel.

  Same contract as `decode_attention.decode_attention` over the part's reconstruction
  put(deq(Q), S) + A B^T: a slot is visible iff `0 <= key_position <= query_position`,
  scale `D ** -0.5`, float32 softmax.

  Args:
    q: [B, K, G, D] (float32 or bfloat16), query head `k*G + g` reads KV head `k`.
    part: a `GearPart` of S slots (S > 0) in blocks of n slots (n a multiple of `group`,
      and a power of two when there is more than one block).
    key_positions: [B, K, S] int32, negative = empty slot.
    query_positions: [B] int32.
    bits: 2, 4 or 8. group: the quantization group of both groupings (a power of two).
    block_k: slots per inner-loop step (power of two, raised to `group` and to n when
      there are several blocks); None picks per platform. Slots are padded to a multiple
      of the per-program chunk.
    interpret: see `backend.dispatch`.
  Returns:
    out [B, K, G, D] in q.dtype, lse [B, K, G] float32 (`EMPTY_LSE`, out 0 for a query
    that sees nothing).
  """
  check_args(q, part, key_positions, query_positions, bits, group)
  _check(group & (group - 1) == 0, f"the kernels need group to be a power of two, got {group}.")
  _check(part.slots > 0, "the part has no slots: skip it instead of attending to it.")
  n = part.slots // part.blocks
  _check(part.blocks == 1 or n & (n - 1) == 0, f"blocks of {n} slots: the kernel needs a "
         f"power of two when a part has several blocks ({part.blocks}).")

  def build(target):
    return functools.partial(_gear_impl, target=target, bits=bits, group=group,
                             block_k=block_k)

  return backend.dispatch(build, q, part, key_positions, query_positions,
                          interpret=interpret)
