"""Flash attention for prefill: T queries over a dense slot cache, causal by positions.

Conventions are reference.py's: queries [B, T, H, D] post-RoPE, keys/values [B, K, S, D],
query head `k*G + g` reads KV head `k`, a slot is visible iff `0 <= key_pos <= query_pos`,
scale `D ** -0.5`, float32 online softmax, a query that sees nothing gets output 0.

What runs where:
  * XLA folds the G query heads of each KV head into rows (row `t*G + g` of a
    [B, K, T*G, D] array), so one program reads a KV head's keys once for all its heads,
    and computes, per row tile, the range [lo, hi) of key blocks that hold a slot some row
    of the tile can see: a block's smallest non-empty position against the tile's largest
    query position, made monotone with a prefix/suffix min. Causal prefill over slots in
    position order thus skips the compute of every block above the diagonal and of left
    padding and empty slots at the end (on TPU a program's whole key chunk is still
    copied into VMEM, so skipped blocks there cost their transfer).
  * The kernel, grid (B, K, row tiles, key chunks), runs the online softmax over the key
    blocks of [lo, hi) that fall in its chunk (a `fori_loop` with those bounds read as
    scalars: SMEM on TPU, a scalar load on Triton) and writes the normalised output and
    its log-sum-exp.
  * GPU and CPU use one chunk (the whole cache; the loop does the skipping). TPU splits the
    keys into chunks so a program's K/V blocks fit VMEM; XLA then merges the chunks by
    their log-sum-exp, as the decode kernel does.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backend
from pallas_kernels.decode_attention import (key_block, merge_stacked, online_softmax_result,
                                             online_softmax_start, online_softmax_step)

# Rows ((query, head) pairs) per program and keys per inner-loop step. GPU: 128 x 128 tiles,
# 231-233 TFLOP/s against 215-217 for 128 x 64 on an H200 (8K, Llama-3.1-8B heads, three runs
# of the roofline check: docs/results/perf/gpu_check_h200*.json); TPU: MXU-sized tiles.
_BLOCK_Q = {"tpu": 256, "gpu": 128, "cpu": 32}
_BLOCK_K = {"tpu": 512, "gpu": 128, "cpu": 32}
# Key blocks per grid program (None: the whole cache). TPU: 2048 keys, K+V double-buffered
# 2 MiB at D = 128 bf16.
_CHUNK_BLOCKS = {"tpu": 4, "gpu": None, "cpu": None}
_NUM_WARPS = 8
_NUM_STAGES = 2
# Stands for "no visible slot" in a block's minimum position.
_NO_SLOT = jnp.iinfo(jnp.int32).max


def _precision(dtype):
  # f32 inputs: full f32 products (Triton would otherwise use TF32).
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _flash_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, kpos_ref, qpos_ref, o_ref, lse_ref,
                  *, block_k, blocks_per_chunk, scale):
  """Online softmax of a row tile over the key blocks of [lo, hi) in this chunk.

  Refs (squeezed): lo/hi [1, row tiles] int32 (first / past-last key block to visit, over the
  whole cache), q [R, D], k/v [C, D], kpos [1, C], qpos [R, 1]; out [R, D], lse [R, 1].
  """
  first = pl.program_id(3) * blocks_per_chunk
  tile = pl.program_id(2)
  lo = jnp.clip(lo_ref[0, tile] - first, 0, blocks_per_chunk)
  hi = jnp.clip(hi_ref[0, tile] - first, 0, blocks_per_chunk)
  q = q_ref[...]
  rows = q.shape[0]
  precision = _precision(q.dtype)
  qpos = qpos_ref[...]

  def body(i, carry):
    start = pl.multiple_of(i * block_k, block_k)
    s, kpos, vals = key_block(q, k_ref, v_ref, kpos_ref, start, block_k, scale, precision)
    visible = (kpos >= 0) & (kpos <= jnp.broadcast_to(qpos, s.shape))
    return online_softmax_step(carry, s, visible, vals, precision)

  m, l, acc = lax.fori_loop(lo, hi, body, online_softmax_start(rows, v_ref.shape[-1]))
  out, lse = online_softmax_result(m, l, acc)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def block_ranges(row_positions, key_positions, block_rows, block_k):
  """(lo, hi) [B, K, row tiles] int32: the key blocks a row tile must visit.

  row_positions [B, R'] (R' a multiple of block_rows, -1 for padding rows); key_positions
  [B, K, S'] (S' a multiple of block_k, negative = empty). Every block outside [lo, hi)
  holds no slot that any row of the tile sees; blocks inside may still be masked whole.
  """
  b, k, sp = key_positions.shape
  kmin = jnp.where(key_positions >= 0, key_positions, _NO_SLOT)
  kmin = jnp.min(kmin.reshape(b, k, sp // block_k, block_k), axis=-1)     # [B, K, NKB]
  qmax = jnp.max(row_positions.reshape(b, -1, block_rows), axis=-1)      # [B, NR]
  # Prefix/suffix minima are monotone, so "no block before j / after j is visible" is a
  # count: lo = leading blocks all above the tile, hi = NKB - trailing ones.
  prefix = lax.cummin(kmin, axis=2)
  suffix = lax.cummin(kmin, axis=2, reverse=True)
  above = lambda mins: mins[:, :, None, :] > qmax[:, None, :, None]     # [B, K, NR, NKB]
  lo = jnp.sum(above(prefix), axis=-1, dtype=jnp.int32)
  hi = kmin.shape[-1] - jnp.sum(above(suffix), axis=-1, dtype=jnp.int32)
  return lo, hi


def _impl(queries, keys, values, query_positions, key_positions, *, target, block_q,
          block_k, key_chunk):
  b, t, h, d = queries.shape
  k, s = keys.shape[1], keys.shape[2]
  g = h // k
  kind = target.pick(tpu="tpu", gpu="gpu", cpu="cpu")
  floor = 128 if target.is_tpu else 16
  rows = t * g
  # Power-of-two tiles (Triton), at least 16 rows (Triton dots need M >= 16).
  r = block_q or min(_BLOCK_Q[kind], max(backend.next_power_of_2(rows), 16))
  bk = block_k or min(_BLOCK_K[kind], max(backend.next_power_of_2(s), floor))
  blocks = backend.cdiv(s, bk)
  if key_chunk is not None:
    chunk = key_chunk
  else:
    # Short caches get one chunk of their own size (no padding up to a full chunk).
    chunk = bk * min(_CHUNK_BLOCKS[kind] or blocks, blocks)
  sp = backend.cdiv(s, chunk) * chunk
  nc, nr = sp // chunk, backend.cdiv(rows, r)
  rp, dp = nr * r, backend.lane_dim(target, d)

  # [B, T, K, G, D] -> [B, K, T*G, D]: row t*G + g is query t of head k*G + g.
  q = jnp.swapaxes(queries.reshape(b, t, k, g, d), 1, 2).reshape(b, k, rows, d)
  q = backend.pad_axis(backend.pad_axis(q, 3, dp), 2, rp)
  kp = backend.pad_axis(backend.pad_axis(keys, 3, dp), 2, sp)
  vp = backend.pad_axis(backend.pad_axis(values, 3, dp), 2, sp)
  kpos = backend.pad_axis(key_positions.astype(jnp.int32), 2, sp, -1)
  qpos = jnp.repeat(query_positions.astype(jnp.int32), g, axis=1)
  qpos = backend.pad_axis(qpos, 1, rp, -1)
  lo, hi = block_ranges(qpos, kpos, r, bk)

  # Scalars the kernel branches on live in SMEM on TPU (vector memory cannot be read as
  # scalars there); Triton loads them as scalars from global memory.
  smem = dict(memory_space=pltpu.SMEM) if target.is_tpu else {}
  # [1, NR] blocks: TPU wants the last two block dims whole (or (8, 128)-aligned), SMEM too.
  range_spec = pl.BlockSpec((None, None, 1, nr), lambda i, j, u, c: (i, j, 0, 0), **smem)
  kv_spec = pl.BlockSpec((None, None, chunk, dp), lambda i, j, u, c: (i, j, c, 0))
  # One chunk: the kernel's output is final, so write it in the queries' dtype.
  out_dtype = queries.dtype if nc == 1 else jnp.float32
  out, lse = pl.pallas_call(
      functools.partial(_flash_kernel, block_k=bk, blocks_per_chunk=chunk // bk,
                        scale=d ** -0.5),
      out_shape=[jax.ShapeDtypeStruct((b, k, nc, rp, dp), out_dtype),
                 jax.ShapeDtypeStruct((b, k, nc, rp, 1), jnp.float32)],
      grid=(b, k, nr, nc),
      in_specs=[range_spec, range_spec,
                pl.BlockSpec((None, None, r, dp), lambda i, j, u, c: (i, j, u, 0)),
                kv_spec, kv_spec,
                pl.BlockSpec((None, None, 1, chunk), lambda i, j, u, c: (i, j, 0, c)),
                pl.BlockSpec((None, r, 1), lambda i, j, u, c: (i, u, 0))],
      out_specs=[
          pl.BlockSpec((None, None, None, r, dp), lambda i, j, u, c: (i, j, c, u, 0)),
          pl.BlockSpec((None, None, None, r, 1), lambda i, j, u, c: (i, j, c, u, 0))],
      interpret=target.interpret,
      compiler_params=backend.compiler_params(
          target, dimension_semantics=("parallel",) * 4, num_warps=_NUM_WARPS,
          num_stages=_NUM_STAGES),
      name="flash_attention",
  )(lo[:, :, None], hi[:, :, None], q, kp, vp, kpos[:, :, None, :], qpos[:, :, None])
  if nc == 1:
    out = out[:, :, 0]
  else:
    out, _ = merge_stacked(out, lse[..., 0], axis=2)
  out = out[:, :, :rows, :d].reshape(b, k, t, g, d)
  return jnp.swapaxes(out, 1, 2).reshape(b, t, h, d).astype(queries.dtype)


def _check(cond, message):
  if not cond:
    raise ValueError(message)


def check_prefill_args(queries, keys, values, query_positions, key_positions) -> None:
  """Refuses prefill attention arguments of mismatched shapes (queries [B, T, H, D],
  keys/values [B, K, S, D] with K dividing H, positions [B, T] and [B, K, S])."""
  _check(queries.ndim == 4 and keys.ndim == 4,
         f"queries must be [B, T, H, D] and keys [B, K, S, D], got {queries.shape} and "
         f"{keys.shape}")
  b, t, h, d = queries.shape
  k, s = keys.shape[1], keys.shape[2]
  _check(keys.shape == (b, k, s, d) and values.shape == keys.shape and h % k == 0,
         f"keys/values must be [B, K, S, D] = [{b}, K, S, {d}] with K dividing H={h}, got "
         f"{keys.shape} and {values.shape}")
  _check(query_positions.shape == (b, t),
         f"query_positions must be {(b, t)}, got {query_positions.shape}")
  _check(key_positions.shape == (b, k, s),
         f"key_positions must be {(b, k, s)}, got {key_positions.shape}")


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "key_chunk",
                                             "interpret"))
def flash_attention(queries, keys, values, query_positions, key_positions, *, block_q=None,
                    block_k=None, key_chunk=None, interpret=None):
  """Causal attention of T queries over a dense per-head slot cache.

  Args:
    queries: [B, T, H, D] post-RoPE; head `k*G + g` reads KV head `k` (H = K*G).
    keys, values: [B, K, S, D] (float32 or bfloat16).
    query_positions: [B, T] int32 (negative: a padding query, output 0).
    key_positions: [B, K, S] int32 original positions, negative = empty slot.
    block_q: rows ((query, head) pairs) per program, a power of two; None picks per platform.
    block_k: keys per inner-loop step, a power of two; None picks per platform.
    key_chunk: keys per grid program, a multiple of block_k; None: the whole cache on
      GPU/CPU, 4 blocks on TPU. Keys are padded with empty slots to a multiple of it.
    interpret: see `backend.dispatch` (None: interpret on CPU, compile on TPU/GPU).
  Returns:
    [B, T, H, D] in the queries' dtype; the same as `reference.attention`.
  """
  check_prefill_args(queries, keys, values, query_positions, key_positions)
  for name, value in (("block_q", block_q), ("block_k", block_k)):
    if value is not None:
      backend.check_block(name, value)
  if key_chunk is not None:
    _check(isinstance(key_chunk, int) and key_chunk > 0 and block_k is not None
           and key_chunk % block_k == 0,
           f"key_chunk={key_chunk!r} must be a positive multiple of an explicit block_k "
           f"(got block_k={block_k!r})")

  def build(target):
    return functools.partial(_impl, target=target, block_q=block_q, block_k=block_k,
                             key_chunk=key_chunk)

  return backend.dispatch(build, queries, keys, values, query_positions, key_positions,
                          interpret=interpret)
