"""Observation-window attention statistics without writing the [W, S] attention matrix.

SnapKV / PyramidKV / AdaKV / H2O-style scorers need, per query head, the column sums of
the softmax attention of the last W queries over all S slots, pooled along S, then
reduced over the G query heads of each KV head.

What runs where (three kernels; XLA only merges tiny per-chunk log-sum-exps):
  1. `_lse_kernel`, grid (B, H, chunks): online log-sum-exp of every window query over
     one chunk of keys. XLA merges the chunks' lse ([B, H, chunks, W] values).
  2. `_stats_kernel`, grid (B, H, chunks): recomputes the logits of a chunk, turns them
     into probabilities with the final lse, and writes their column sums and population
     variances over the valid window rows ([B, H, S] each).
  3. `_pool_kernel`, grid (B, K, S blocks): 1-D pooling of the sums along S (each block
     reads its two neighbours as halo through clamped BlockSpecs) and the GQA reduction
     over the G heads of the KV head, writing scores [B, K, S].
"""

import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend
from pallas_kernels.decode_attention import EMPTY_LSE

POOLINGS = ("max", "avg", "none")
GQA_REDUCTIONS = ("mean", "max", "sum")

_DEFAULT_BLOCK = {"tpu": 512, "gpu": 64, "cpu": 128}
_CHUNK_BLOCKS = {"tpu": 4, "gpu": 8, "cpu": 4}
# Pooling tile: a [P, P] band per head and neighbour block, so keep P small on GPU.
_POOL_BLOCK = {"tpu": 128, "gpu": 64, "cpu": 32}
_NEG = -1e30


class WindowScores(NamedTuple):
  """sums/variances [B, H, S] of the window attention per slot; scores [B, K, S] pooled."""
  sums: jax.Array
  variances: jax.Array
  scores: jax.Array


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _logits_and_mask(q, k_ref, kpos_ref, qpos, start, block_k, scale):
  keys = k_ref[pl.ds(start, block_k), :]
  s = lax.dot_general(q, keys, (((1,), (1,)), ((), ())), precision=_precision(q.dtype),
                      preferred_element_type=jnp.float32) * scale
  kpos = jnp.broadcast_to(kpos_ref[:, pl.ds(start, block_k)], s.shape)
  visible = (kpos >= 0) & (kpos <= jnp.broadcast_to(qpos, s.shape))
  return s, visible


def _lse_kernel(q_ref, k_ref, kpos_ref, qpos_ref, lse_ref, *, block_k, num_blocks, scale):
  """Refs: q [W, D], k [C, D], kpos [1, C], qpos [W, 1]; out lse [W, 1] of this chunk."""
  q = q_ref[...]
  qpos = qpos_ref[...]

  def body(i, carry):
    m, l = carry
    start = pl.multiple_of(i * block_k, block_k)
    s, visible = _logits_and_mask(q, k_ref, kpos_ref, qpos, start, block_k, scale)
    s = jnp.where(visible, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    return m_new, jnp.exp(m - m_new) * l + jnp.sum(p, axis=1, keepdims=True)

  rows = q.shape[0]
  m, l = lax.fori_loop(0, num_blocks, body, (jnp.full((rows, 1), _NEG, jnp.float32),
                                             jnp.zeros((rows, 1), jnp.float32)))
  seen = l > 0
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), EMPTY_LSE)


def _stats_kernel(q_ref, k_ref, kpos_ref, qpos_ref, lse_ref, sums_ref, var_ref, *,
                  block_k, num_blocks, scale):
  """Refs: q [W, D], k [C, D], kpos [1, C], qpos [W, 1], lse [W, 1]; out sums/var [1, C]."""
  q = q_ref[...]
  qpos = qpos_ref[...]
  lse = lse_ref[...]
  # Padding queries see no slot, so their rows are all zero; only the count needs them.
  n = jnp.sum((qpos >= 0).astype(jnp.float32), axis=0, keepdims=True)  # [1, 1]
  inv_n = jnp.where(n > 0, 1.0 / jnp.maximum(n, 1.0), 0.0)

  def body(i, carry):
    start = pl.multiple_of(i * block_k, block_k)
    s, visible = _logits_and_mask(q, k_ref, kpos_ref, qpos, start, block_k, scale)
    p = jnp.exp(jnp.where(visible, s - lse, -jnp.inf))
    total = jnp.sum(p, axis=0, keepdims=True)
    mean = total * inv_n
    # E[p^2] - E[p]^2 in f32; p is in [0, 1], so cancellation stays far below 1e-6.
    var = jnp.maximum(jnp.sum(p * p, axis=0, keepdims=True) * inv_n - mean * mean, 0.0)
    sums_ref[:, pl.ds(start, block_k)] = total
    var_ref[:, pl.ds(start, block_k)] = var
    return carry

  lax.fori_loop(0, num_blocks, body, 0)


def _pool_kernel(prev_ref, cur_ref, next_ref, out_ref, *, pooling, radius, gqa, groups,
                 block, num_blocks):
  """Refs: sums of blocks c-1, c, c+1 (clamped), each [G, P]; out scores [1, P].

  Pooled value at slot i = reduce over |i - j| <= radius of sums[j], out-of-range j as 0:
  the sums are >= 0 and every window holds its centre, so 0 is neutral for "max" too.
  The band reduction yields a column [P, 1]; one diagonal select-sum turns it into a row.
  """
  c = pl.program_id(2)
  rows = lax.broadcasted_iota(jnp.int32, (block, block), 0)  # output slot in block
  cols = lax.broadcasted_iota(jnp.int32, (block, block), 1)  # input slot in block
  combine = jnp.maximum if pooling == "max" else jnp.add
  reduce = jnp.max if pooling == "max" else jnp.sum

  def pooled_column(g):
    acc = None
    for ref, shift in ((prev_ref, -1), (cur_ref, 0), (next_ref, 1)):
      # Global input index; neighbours outside [0, num_blocks) are clamped copies: drop.
      j = cols + (c + shift) * block
      dist = cols + shift * block - rows
      keep = (dist <= radius) & (dist >= -radius) & (j >= 0) & (j < num_blocks * block)
      x = jnp.broadcast_to(ref[pl.ds(g, 1), :], (block, block))
      part = reduce(jnp.where(keep, x, 0.0), axis=1, keepdims=True)
      acc = part if acc is None else combine(acc, part)
    return acc / (2 * radius + 1) if pooling == "avg" else acc

  def gqa_reduce(parts):
    acc = parts[0]
    for part in parts[1:]:
      acc = jnp.maximum(acc, part) if gqa == "max" else acc + part
    return acc / groups if gqa == "mean" else acc

  if pooling == "none":
    out_ref[...] = gqa_reduce([cur_ref[pl.ds(g, 1), :] for g in range(groups)])
    return
  col = gqa_reduce([pooled_column(g) for g in range(groups)])
  out_ref[...] = jnp.sum(jnp.where(rows == cols, jnp.broadcast_to(col, (block, block)), 0.0),
                         axis=0, keepdims=True)


def _impl(q, keys, key_positions, query_positions, *, target, pooling, kernel_size, gqa,
          block_k):
  b, h, w, d = q.shape
  k, s = keys.shape[1], keys.shape[2]
  g = h // k
  radius = kernel_size // 2 if pooling != "none" else 0
  tiling = backend.tile_keys(target, s, block_k, default_block=_DEFAULT_BLOCK,
                             chunk_blocks=_CHUNK_BLOCKS)
  # The pooling halo comes from the two neighbouring blocks, so a block holds the radius.
  pool_block = max(target.pick(**_POOL_BLOCK), backend.next_power_of_2(radius))
  chunk = max(tiling.chunk, pool_block)
  sp = backend.cdiv(s, chunk) * chunk
  nc = sp // tiling.chunk
  c = tiling.chunk
  # Triton dots need M >= 16 and power-of-two tiles; padding queries have position -1.
  rows = max(16, backend.next_power_of_2(w))
  dp = backend.lane_dim(target, d)

  qp = backend.pad_axis(backend.pad_axis(q, 3, dp), 2, rows)
  kp = backend.pad_axis(backend.pad_axis(keys, 3, dp), 2, sp)
  kpos = backend.pad_axis(key_positions.astype(jnp.int32), 2, sp, -1)[:, :, None, :]
  qpos = backend.pad_axis(query_positions.astype(jnp.int32), 1, rows, -1)[:, :, None]
  scale = d ** -0.5
  params = functools.partial(backend.compiler_params, target, num_warps=4, num_stages=2)
  static = dict(block_k=tiling.block, num_blocks=tiling.blocks_per_chunk, scale=scale)

  q_spec = pl.BlockSpec((None, None, rows, dp), lambda i, j, t: (i, j, 0, 0))
  # lax.div, not `//`: jnp's floor division lowers for TPU through a chip-version query
  # that fails when exporting from a CPU host (indices are >= 0, so they agree).
  k_spec = pl.BlockSpec((None, None, c, dp), lambda i, j, t: (i, lax.div(j, g), t, 0))
  kpos_spec = pl.BlockSpec((None, None, 1, c), lambda i, j, t: (i, lax.div(j, g), 0, t))
  qpos_spec = pl.BlockSpec((None, rows, 1), lambda i, j, t: (i, 0, 0))
  lse_c = pl.pallas_call(
      functools.partial(_lse_kernel, **static),
      out_shape=jax.ShapeDtypeStruct((b, h, nc, rows, 1), jnp.float32),
      grid=(b, h, nc),
      in_specs=[q_spec, k_spec, kpos_spec, qpos_spec],
      out_specs=pl.BlockSpec((None, None, None, rows, 1), lambda i, j, t: (i, j, t, 0, 0)),
      interpret=target.interpret,
      compiler_params=params(dimension_semantics=("parallel",) * 3),
      name="window_lse",
  )(qp, kp, kpos, qpos)
  # Merge the chunks' lse (tiny: [B, H, chunks, W]).
  lse_c = lse_c[..., 0]
  m = jnp.max(lse_c, axis=2)
  lse = m + jnp.log(jnp.sum(jnp.exp(lse_c - m[:, :, None]), axis=2))
  lse = jnp.where(m <= EMPTY_LSE / 2, EMPTY_LSE, lse)[..., None]

  row_spec = pl.BlockSpec((None, None, 1, c), lambda i, j, t: (i, j, 0, t))
  stat_shape = jax.ShapeDtypeStruct((b, h, 1, sp), jnp.float32)
  sums, variances = pl.pallas_call(
      functools.partial(_stats_kernel, **static),
      out_shape=[stat_shape, stat_shape],
      grid=(b, h, nc),
      in_specs=[q_spec, k_spec, kpos_spec, qpos_spec,
                pl.BlockSpec((None, None, rows, 1), lambda i, j, t: (i, j, 0, 0))],
      out_specs=[row_spec, row_spec],
      interpret=target.interpret,
      compiler_params=params(dimension_semantics=("parallel",) * 3),
      name="window_stats",
  )(qp, kp, kpos, qpos, lse)

  p = pool_block
  npb = sp // p
  grouped = sums.reshape(b, k, g, sp)
  scores = pl.pallas_call(
      functools.partial(_pool_kernel, pooling=pooling, radius=radius, gqa=gqa, groups=g,
                        block=p, num_blocks=npb),
      out_shape=jax.ShapeDtypeStruct((b, k, 1, sp), jnp.float32),
      grid=(b, k, npb),
      in_specs=[
          pl.BlockSpec((None, None, g, p), lambda i, j, t: (i, j, 0, jnp.maximum(t - 1, 0))),
          pl.BlockSpec((None, None, g, p), lambda i, j, t: (i, j, 0, t)),
          pl.BlockSpec((None, None, g, p),
                       lambda i, j, t: (i, j, 0, jnp.minimum(t + 1, npb - 1)))],
      out_specs=pl.BlockSpec((None, None, 1, p), lambda i, j, t: (i, j, 0, t)),
      interpret=target.interpret,
      compiler_params=params(dimension_semantics=("parallel",) * 3),
      name="window_pool",
  )(grouped, grouped, grouped)
  return WindowScores(sums[:, :, 0, :s], variances[:, :, 0, :s], scores[:, :, 0, :s])


def _validate(q, keys, key_positions, query_positions, pooling, kernel_size, gqa):
  if pooling not in POOLINGS:
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
  if gqa not in GQA_REDUCTIONS:
    raise ValueError(f"gqa must be one of {GQA_REDUCTIONS}, got {gqa!r}.")
  if pooling != "none" and (not isinstance(kernel_size, int) or kernel_size <= 0
                            or kernel_size % 2 == 0):
    raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}.")
  if q.ndim != 4 or keys.ndim != 4:
    raise ValueError(f"q must be [B, H, W, D] and keys [B, K, S, D], got {q.shape} and "
                     f"{keys.shape}.")
  b, h, w, d = q.shape
  k, s = keys.shape[1], keys.shape[2]
  if keys.shape != (b, k, s, d) or h % k:
    raise ValueError(f"keys must be [B, K, S, D] with B={b}, D={d} and K dividing H={h}, "
                     f"got {keys.shape}.")
  if key_positions.shape != (b, k, s):
    raise ValueError(f"key_positions must be {(b, k, s)}, got {key_positions.shape}.")
  if query_positions.shape != (b, w):
    raise ValueError(f"query_positions must be {(b, w)}, got {query_positions.shape}.")


@functools.partial(jax.jit, static_argnames=("pooling", "kernel_size", "gqa", "block_k",
                                             "interpret"))
def _window_scores(q, keys, key_positions, query_positions, *, pooling, kernel_size, gqa,
                   block_k, interpret):
  def build(target):
    return functools.partial(_impl, target=target, pooling=pooling,
                             kernel_size=kernel_size, gqa=gqa, block_k=block_k)

  return backend.dispatch(build, q, keys, key_positions, query_positions,
                          interpret=interpret)


def window_scores(q, keys, key_positions, query_positions, *, pooling="max",
                  kernel_size=7, gqa="mean", block_k=None, interpret=None) -> WindowScores:
  """Attention statistics of an observation window of W queries over S slots.

  `A[h, i, j]` is the softmax over the visible slots j of query i (visible iff
  `0 <= key_position <= query_position`), normalised over all S slots, 0 elsewhere.

  Args:
    q: [B, H, W, D] the last W queries (post-RoPE); head `k*G + g` reads KV head `k`.
    keys: [B, K, S, D]; key_positions: [B, K, S] int32 (negative = empty slot).
    query_positions: [B, W] int32; a negative entry is a padding query (contributes
      nothing and is not counted).
    pooling: "max" (max over the window, out-of-range ignored), "avg" (window sum /
      kernel_size, zero padding counted) or "none"; pools along the slot index axis.
    kernel_size: odd window width (stride 1, centred); ignored for "none".
    gqa: "mean", "max" or "sum" over the G query heads of each KV head.
    block_k: keys per inner-loop step (power of two); None picks per platform.
    interpret: see `backend.dispatch`.
  Returns:
    WindowScores(sums [B, H, S] f32 = sum over valid rows of A, variances [B, H, S] f32 =
    population variance over valid rows (0 if none), scores [B, K, S] f32).
  """
  _validate(q, keys, key_positions, query_positions, pooling, kernel_size, gqa)
  return _window_scores(q, keys, key_positions, query_positions, pooling=pooling,
                        kernel_size=kernel_size, gqa=gqa, block_k=block_k,
                        interpret=interpret)
