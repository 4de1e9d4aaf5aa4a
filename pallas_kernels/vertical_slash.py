"""Vertical-slash sparse attention for prefill (LoopServe's, after MInference's pattern).

Each query head attends only over its chosen lines: vertical lines (key positions every
query of the head reads) and slash lines (offsets o: query position p reads key position
p - o), each key once, causal. Semantics are `reference.vertical_slash_attention`'s.

What runs where:
  * XLA scatters each KV head's keys and values into position order (slot p holds key
    position p; positions are below S, one prompt's cache), padded by one query tile on
    both sides, gathers each head's vertical keys (at most `max_vertical`, a dense block)
    and lists its slash offsets (at most `max_slash`).
  * The kernel, grid (B, H, query tiles), runs an online softmax first over the tile's
    vertical block (one product), then over the slash offsets one at a time: for offset o
    the tile's keys are the contiguous positions [p0 - o, p0 - o + tile) of the
    position-ordered keys (p0 the tile's first position), one row-wise product each. It
    reads tile x (vertical + slash) keys per head, never tile x S.
  * Contract: a row's real queries hold consecutive positions in row order (a prefill
    chunk continuing a sequence after left padding: kvjax's prefill). A query out of that
    line sees its vertical lines only.
  * TPU holds a KV head's position-ordered keys, values and slash mask in VMEM, double-
    buffered: about 2 KiB per position at D = 128 bfloat16 (the [P, 1] mask is lane-
    padded), so S up to ~7K in 16 MiB of scoped VMEM (not yet run on a TPU; longer
    prompts want the keys in HBM with manual copies). GPU reads them from global memory.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backend
from pallas_kernels.decode_attention import (_NEG, key_block, online_softmax_result,
                                             online_softmax_start, online_softmax_step)
from pallas_kernels.flash_attention import check_prefill_args

# Queries per program (rows; one head per program).
_BLOCK_Q = {"tpu": 128, "gpu": 64, "cpu": 32}
_NUM_WARPS = 4
_NUM_STAGES = 2
# A vertical line's position where there is none: no query reaches it.
_NO_LINE = jnp.iinfo(jnp.int32).max


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _slash_step(carry, s, seen, vals):
  """One key per row (a slash offset) folded into the online softmax: s, seen [R, 1]."""
  m, l, acc = carry
  s = jnp.where(seen, s, _NEG)
  m_new = jnp.maximum(m, s)
  p = jnp.where(seen, jnp.exp(s - m_new), 0.0)
  alpha = jnp.exp(m - m_new)
  return m_new, alpha * l + p, alpha * acc + p * vals.astype(jnp.float32)


def _kernel(start_ref, count_ref, offset_ref, q_ref, qpos_ref, vk_ref, vv_ref, vpos_ref,
            k_ref, v_ref, ok_ref, o_ref, *, block_q, block_v, front, scale):
  """Refs (squeezed): start [1, tiles] int32 (each tile's first row's index into the
  position-ordered keys at offset 0), count [1, 1] (the head's slash lines), offset
  [1, ns] int32 (its chosen offsets first), q [R, D], qpos [R, 1], vertical keys/values
  [NV, D] and positions [1, NV] (_NO_LINE: none), position-ordered keys/values [P, D] and
  ok [P, 1] (1: a key there that no vertical line has)."""
  tile = pl.program_id(2)
  q = q_ref[...]
  qpos = qpos_ref[...]
  precision = _precision(q.dtype)

  def vertical_block(i, carry):
    # block_v lines at a time: one product per block, not one [R, NV] tile (shared memory).
    at = pl.multiple_of(i * block_v, block_v)
    s, vpos, vals = key_block(q, vk_ref, vv_ref, vpos_ref, at, block_v, scale, precision)
    full_qpos = jnp.broadcast_to(qpos, s.shape)
    return online_softmax_step(carry, s, (vpos <= full_qpos) & (full_qpos >= 0), vals,
                               precision)

  carry = lax.fori_loop(0, vk_ref.shape[0] // block_v, vertical_block,
                        online_softmax_start(block_q, q.shape[-1]))

  first = start_ref[0, tile]
  # Position each row holds if it is in line with the tile's first row.
  in_line = lax.broadcasted_iota(jnp.int32, (block_q, 1), 0) + (first - front)
  qf = q.astype(jnp.float32)
  last = k_ref.shape[0] - block_q

  def slash_line(j, carry):
    o = offset_ref[0, j]
    begin = first - o
    at = jnp.minimum(jnp.maximum(begin, 0), last)
    keys = k_ref[pl.ds(at, block_q), :].astype(jnp.float32)
    logits = jnp.sum(qf * keys, axis=1, keepdims=True) * scale
    ok = ok_ref[pl.ds(at, block_q), :]
    seen = ((ok > 0) & (qpos == in_line) & (qpos >= 0) & (in_line - o >= 0)
            & (at == begin))
    return _slash_step(carry, logits, seen, v_ref[pl.ds(at, block_q), :])

  m, l, acc = lax.fori_loop(0, count_ref[0, 0], slash_line, carry)
  out, _ = online_softmax_result(m, l, acc)
  o_ref[...] = out.astype(o_ref.dtype)


def _impl(queries, keys, values, query_positions, key_positions, vertical, slash, *, target,
          max_vertical, max_slash, block_q):
  b, t, h, d = queries.shape
  k, s = keys.shape[1], keys.shape[2]
  g = h // k
  kind = target.pick(tpu="tpu", gpu="gpu", cpu="cpu")
  r = block_q or min(_BLOCK_Q[kind], max(backend.next_power_of_2(t), 16))
  nt = backend.cdiv(t, r)
  tp, dp = nt * r, backend.lane_dim(target, d)
  # Position-ordered keys, one tile of padding before and after (slash keys of a tile's
  # first rows start before position 0; a last tile's padding rows run past S): the slot
  # of each position is scattered once and keys and values gathered by it (a position no
  # slot holds reads slot 0, masked).
  front, positions = r, s + 2 * r
  rows, kvs = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
  where = jnp.where((key_positions >= 0) & (key_positions < s), key_positions + front,
                    positions)
  slot_at = jnp.full((b, k, positions), -1, jnp.int32).at[rows, kvs, where].set(
      jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), key_positions.shape), mode="drop")
  held = slot_at >= 0
  by_position = lambda a: backend.pad_axis(
      jnp.take_along_axis(a, jnp.maximum(slot_at, 0)[..., None], 2), 3, dp)
  pk, pv = by_position(keys), by_position(values)

  # Vertical lines: the chosen key positions (held ones only), a dense block per head,
  # attended block_v lines at a time (padded to a multiple of it).
  block_v = {"tpu": 128, "gpu": min(64, max(16, backend.next_power_of_2(max_vertical))),
             "cpu": min(32, backend.next_power_of_2(max_vertical))}[kind]
  nv = backend.cdiv(max_vertical, block_v) * block_v
  chosen, vpos = lax.top_k(vertical.astype(jnp.float32), max_vertical)  # [B, H, max_vertical]
  per_kv = lambda a: a.reshape(b, k, g * max_vertical)
  take = lambda a: jnp.take_along_axis(a, per_kv(vpos + front)[..., None], 2).reshape(
      b, h, max_vertical, dp)
  vk, vv = take(pk), take(pv)
  vheld = jnp.take_along_axis(held, per_kv(vpos + front), 2).reshape(b, h, max_vertical)
  vline = jnp.where((chosen > 0) & vheld, vpos, _NO_LINE).astype(jnp.int32)
  vk, vv = backend.pad_axis(vk, 2, nv), backend.pad_axis(vv, 2, nv)
  vline = backend.pad_axis(vline, 2, nv, _NO_LINE)

  # Slash lines: the chosen offsets, first (top_k of a mask keeps them first, in index
  # order), and how many; their keys must not be on a vertical line.
  schosen, offsets = lax.top_k(slash.astype(jnp.float32), max_slash)    # [B, H, max_slash]
  counts = jnp.sum(schosen > 0, axis=-1, dtype=jnp.int32)[:, :, None, None]
  on_vertical = jnp.pad(vertical, ((0, 0), (0, 0), (front, positions - front - s)))
  ok = (jnp.repeat(held, g, axis=1) & ~on_vertical).astype(jnp.int32)[..., None]

  # Each tile's first row's index at offset 0: where its row's line of positions puts it
  # (a row's real queries are consecutive; padding rows follow the line).
  qpos = backend.pad_axis(query_positions.astype(jnp.int32), 1, tp, -1)
  line = jnp.max(jnp.where(qpos >= 0, qpos - jnp.arange(tp), -tp), axis=1)     # [B]
  line = jnp.where(jnp.any(qpos >= 0, axis=1), line, 0)
  start = (line[:, None] + jnp.arange(nt) * r + front).astype(jnp.int32)[:, None, :]

  q = backend.pad_axis(backend.pad_axis(queries.transpose(0, 2, 1, 3), 3, dp), 2, tp)
  smem = dict(memory_space=pltpu.SMEM) if target.is_tpu else {}
  # lax.div: a program id is never negative, and floor division does not lower on TPU.
  kv_of = lambda i, j, u: (i, lax.div(j, g), 0, 0)
  out = pl.pallas_call(
      functools.partial(_kernel, block_q=r, block_v=block_v, front=front, scale=d ** -0.5),
      out_shape=jax.ShapeDtypeStruct((b, h, tp, dp), queries.dtype),
      grid=(b, h, nt),
      in_specs=[pl.BlockSpec((None, 1, nt), lambda i, j, u: (i, 0, 0), **smem),
                pl.BlockSpec((None, None, 1, 1), lambda i, j, u: (i, j, 0, 0), **smem),
                pl.BlockSpec((None, None, 1, max_slash), lambda i, j, u: (i, j, 0, 0), **smem),
                pl.BlockSpec((None, None, r, dp), lambda i, j, u: (i, j, u, 0)),
                pl.BlockSpec((None, r, 1), lambda i, j, u: (i, u, 0)),
                pl.BlockSpec((None, None, nv, dp), lambda i, j, u: (i, j, 0, 0)),
                pl.BlockSpec((None, None, nv, dp), lambda i, j, u: (i, j, 0, 0)),
                pl.BlockSpec((None, None, 1, nv), lambda i, j, u: (i, j, 0, 0)),
                pl.BlockSpec((None, None, positions, dp), kv_of),
                pl.BlockSpec((None, None, positions, dp), kv_of),
                pl.BlockSpec((None, None, positions, 1), lambda i, j, u: (i, j, 0, 0))],
      out_specs=pl.BlockSpec((None, None, r, dp), lambda i, j, u: (i, j, u, 0)),
      interpret=target.interpret,
      compiler_params=backend.compiler_params(
          target, dimension_semantics=("parallel",) * 3, num_warps=_NUM_WARPS,
          num_stages=_NUM_STAGES),
      name="vertical_slash_attention",
  )(start, counts, offsets.astype(jnp.int32)[:, :, None, :], q, qpos[:, :, None], vk, vv,
    vline[:, :, None, :], pk, pv, ok)
  return out[:, :, :t, :d].transpose(0, 2, 1, 3)


def _check(cond, message):
  if not cond:
    raise ValueError(message)


@functools.partial(jax.jit, static_argnames=("max_vertical", "max_slash", "block_q",
                                             "interpret"))
def vertical_slash_attention(queries, keys, values, query_positions, key_positions, vertical,
                             slash, max_vertical: int, max_slash: int, *, block_q=None,
                             interpret=None):
  """Causal attention of every query over its head's chosen lines only.

  Args:
    queries: [B, T, H, D] post-RoPE; head `k*G + g` reads KV head `k`.
    keys, values: [B, K, S, D]; key_positions [B, K, S] int32 (negative: empty), every
      position below S (one prompt).
    query_positions: [B, T] int32 (negative: padding, output 0); a row's real queries at
      consecutive positions (see the module's contract).
    vertical: [B, H, S] bool, the chosen key positions; slash: [B, H, S] bool, the chosen
      offsets (query position - key position).
    max_vertical, max_slash: lines attended per head (the first chosen ones by index when
      a head chose more; choose at most these).
    block_q: queries per program, a power of two; None picks per platform.
    interpret: see `backend.dispatch`.
  Returns:
    [B, T, H, D] in the queries' dtype: `reference.vertical_slash_attention`.
  """
  check_prefill_args(queries, keys, values, query_positions, key_positions)
  b, h, s = queries.shape[0], queries.shape[2], keys.shape[2]
  _check(vertical.shape == (b, h, s) and slash.shape == (b, h, s),
         f"vertical and slash must be {(b, h, s)}, got {vertical.shape} and {slash.shape}")
  for name, value in (("max_vertical", max_vertical), ("max_slash", max_slash)):
    _check(isinstance(value, int) and 1 <= value <= s,
           f"{name}={value!r} must be an int in [1, S={s}]")
  if block_q is not None:
    backend.check_block("block_q", block_q)

  def build(target):
    return functools.partial(_impl, target=target, max_vertical=max_vertical,
                             max_slash=max_slash, block_q=block_q)

  return backend.dispatch(build, queries, keys, values, query_positions, key_positions,
                          vertical.astype(bool), slash.astype(bool), interpret=interpret)
