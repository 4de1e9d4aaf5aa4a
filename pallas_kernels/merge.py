"""Merging evicted tokens into kept ones: cosine assignment and a weighted scatter-mean.

The step merging methods (EMS, D2O, Elastic Cache) share, per row r (a batch row and KV
head): E source slots (tokens leaving the cache) are each assigned to one of M centre slots
(tokens staying), and every centre becomes the weighted mean of itself and its sources:

  target[e]     = argmax_m cos(src_keys[e], centre_keys[m]) over valid centres (lowest m
                  on ties; -1 when no centre is valid), similarity[e] its cosine;
  weight'[m]    = centre_weights[m] + sum_{e: target[e] = m} src_weights[e]
  keys'[m]      = (centre_weights[m] * centre_keys[m]
                   + sum_{e: target[e] = m} src_weights[e] * src_keys[e]) / weight'[m]
  values'[m]    likewise; a centre with weight' = 0 (an empty slot) is returned unchanged.

Weights are token counts for a plain mean (a slot standing for 3 tokens weighs 3), so a
merged slot's weight is the number of tokens it represents; a source with weight 0 (not
merged, or padding) changes nothing.

Two kernels without dynamic indexing, each parallel over its output:
  `assign_to_centres`: grid (R, source blocks, centre chunks); a program loops over the
    centre blocks of its chunk keeping a running max and its lowest index (max, then min
    over the iota where equal: no argmax primitive, which Triton lacks), and the chunks
    update the output's best in turn.
  `scatter_mean`: grid (R, centre blocks, source chunks); a program loops over the source
    blocks of its chunk accumulating `one_hot(target == m) * weight @ sources` in float32
    (the gather kernel of `compaction`, transposed) into float32 sums; XLA divides once.
On TPU the looped axis is split into chunks (bounded VMEM whatever the prompt length); on
GPU it is one chunk (see `_CHUNK_BLOCKS`). Keys are unit-normalised in XLA before the
assignment (one pass over [R, E + M, D]).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend

_BLOCK = {"tpu": 128, "gpu": 64, "cpu": 64}
# Blocks of the looped-over axis per chunk: on TPU that axis is split into chunks over an
# "arbitrary" grid axis (bounded VMEM: 4096 rows, 1 MiB of bf16 keys at D = 128) whose
# programs update the same output block in turn; on GPU it is one chunk, because Triton
# programs run concurrently and must not update a shared output. CPU (interpret) uses
# small chunks so tests cover the chunked path.
_CHUNK_BLOCKS = {"tpu": 32, "gpu": None, "cpu": 2}
_NO_CENTRE = -1e30   # logit of an invalid centre: below any cosine


def _assign_kernel(src_ref, centre_ref, valid_ref, target_ref, sim_ref, *, block_m,
                   num_blocks):
  """Refs: src [Eb, D] (unit rows), centre [C, D] (one chunk of unit rows), valid [1, C]
  int32; out target [Eb, 1] int32, sim [Eb, 1] float32 (the running best over chunks)."""
  c = pl.program_id(2)
  src = src_ref[...].astype(jnp.float32)
  eb = src.shape[0]
  offset = c * (num_blocks * block_m)

  def body(i, carry):
    best, arg = carry
    start = pl.multiple_of(i * block_m, block_m)
    centres = centre_ref[pl.ds(start, block_m), :].astype(jnp.float32)
    valid = valid_ref[:, pl.ds(start, block_m)]
    sims = lax.dot_general(src, centres, (((1,), (1,)), ((), ())),
                           precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)          # [Eb, Mb]
    sims = jnp.where(valid > 0, sims, _NO_CENTRE)
    block_best = jnp.max(sims, axis=1, keepdims=True)                    # [Eb, 1]
    iota = lax.broadcasted_iota(jnp.int32, sims.shape, 1) + start + offset
    block_arg = jnp.min(jnp.where(sims == block_best, iota, jnp.iinfo(jnp.int32).max),
                        axis=1, keepdims=True)
    better = block_best > best                       # strict: an earlier block wins ties
    return jnp.where(better, block_best, best), jnp.where(better, block_arg, arg)

  init = (jnp.full((eb, 1), _NO_CENTRE, jnp.float32), jnp.full((eb, 1), -1, jnp.int32))
  best, arg = lax.fori_loop(0, num_blocks, body, init)

  @pl.when(c == 0)
  def _():
    sim_ref[...] = best
    target_ref[...] = arg

  @pl.when(c > 0)
  def _():
    better = best > sim_ref[...]                     # strict: an earlier chunk wins ties
    sim_ref[...] = jnp.where(better, best, sim_ref[...])
    target_ref[...] = jnp.where(better, arg, target_ref[...])


def _scatter_kernel(sk_ref, sv_ref, sw_ref, target_ref, ok_ref, ov_ref, ow_ref, *, block_e,
                    num_blocks):
  """Refs: sources [C, D] (one chunk), source weights and targets [1, C]; out float32 sums
  of weight * key and weight * value [Mb, D] and of weights [Mb, 1] for a block of
  centres, accumulated over the chunks."""
  mb = ok_ref.shape[0]
  m, c = pl.program_id(1), pl.program_id(2)
  rows = lax.broadcasted_iota(jnp.int32, (mb, block_e), 0) + m * mb
  # Token counts stay float32 (bf16 would round counts above 256); sources are widened.
  dot = lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                     precision=lax.Precision.HIGHEST,
                                     preferred_element_type=jnp.float32)

  def body(i, carry):
    acc_k, acc_v, acc_w = carry
    start = pl.multiple_of(i * block_e, block_e)
    target = target_ref[:, pl.ds(start, block_e)]                        # [1, Eb]
    weight = sw_ref[:, pl.ds(start, block_e)].astype(jnp.float32)        # [1, Eb]
    share = jnp.where(rows == target, weight, 0.0)                       # [Mb, Eb]
    acc_w = acc_w + share.sum(axis=1, keepdims=True)
    acc_k = acc_k + dot(share, sk_ref[pl.ds(start, block_e), :].astype(jnp.float32))
    acc_v = acc_v + dot(share, sv_ref[pl.ds(start, block_e), :].astype(jnp.float32))
    return acc_k, acc_v, acc_w

  init = (jnp.zeros(ok_ref.shape, jnp.float32), jnp.zeros(ov_ref.shape, jnp.float32),
          jnp.zeros((mb, 1), jnp.float32))
  acc_k, acc_v, acc_w = lax.fori_loop(0, num_blocks, body, init)

  @pl.when(c == 0)
  def _():
    ok_ref[...], ov_ref[...], ow_ref[...] = acc_k, acc_v, acc_w

  @pl.when(c > 0)
  def _():
    ok_ref[...] += acc_k
    ov_ref[...] += acc_v
    ow_ref[...] += acc_w


def _tiling(target, n, block, looped: bool):
  """(block, padded n, chunk, chunks) of an axis; `looped`: the axis a program loops over
  (split into chunks on TPU). GPU pads to a power of two (Triton block shapes must be)."""
  kind = target.pick(tpu="tpu", gpu="gpu", cpu="cpu")
  block = block or min(_BLOCK[kind], max(backend.next_power_of_2(n), 8))
  if target.is_tpu:
    block = max(block, 128)     # lane-dim slices of [1, n] refs
  blocks = backend.cdiv(n, block)
  per_chunk = blocks if (not looped or _CHUNK_BLOCKS[kind] is None) else min(
      _CHUNK_BLOCKS[kind], blocks)
  chunk = per_chunk * block
  padded = backend.cdiv(n, chunk) * chunk
  if target.is_gpu:
    padded = max(backend.next_power_of_2(padded), block)
    chunk = padded if looped else chunk
  return block, padded, chunk, padded // chunk


def unit_rows(x):
  """x / ||x|| per row in float32 (zero rows stay zero)."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


def _compiler_params(target):
  return backend.compiler_params(
      target, dimension_semantics=("parallel", "parallel", "arbitrary"), num_warps=4,
      num_stages=2)


def _assign_impl(src_unit, centre_unit, valid, *, target, block_e, block_m):
  r, e, d = src_unit.shape
  m = centre_unit.shape[1]
  block_e, ep, _, _ = _tiling(target, e, block_e, looped=False)
  block_m, mp, chunk, chunks = _tiling(target, m, block_m, looped=True)
  dp = backend.lane_dim(target, d)
  src = backend.pad_axis(backend.pad_axis(src_unit, 2, dp), 1, ep)
  centres = backend.pad_axis(backend.pad_axis(centre_unit, 2, dp), 1, mp)
  valid = backend.pad_axis(valid.astype(jnp.int32), 1, mp)[:, None, :]
  out_spec = pl.BlockSpec((None, block_e, 1), lambda i, j, c: (i, j, 0))
  target_out, sim = pl.pallas_call(
      functools.partial(_assign_kernel, block_m=block_m, num_blocks=chunk // block_m),
      out_shape=(jax.ShapeDtypeStruct((r, ep, 1), jnp.int32),
                 jax.ShapeDtypeStruct((r, ep, 1), jnp.float32)),
      grid=(r, ep // block_e, chunks),
      in_specs=[pl.BlockSpec((None, block_e, dp), lambda i, j, c: (i, j, 0)),
                pl.BlockSpec((None, chunk, dp), lambda i, j, c: (i, c, 0)),
                pl.BlockSpec((None, 1, chunk), lambda i, j, c: (i, 0, c))],
      out_specs=(out_spec, out_spec),
      interpret=target.interpret,
      compiler_params=_compiler_params(target),
      name="assign_to_centres",
  )(src, centres, valid)
  target_out, sim = target_out[:, :e, 0], sim[:, :e, 0]
  found = sim > _NO_CENTRE / 2
  return jnp.where(found, target_out, -1), jnp.where(found, sim, 0.0)


def _check(cond, message):
  if not cond:
    raise ValueError(message)


@functools.partial(jax.jit, static_argnames=("block_e", "block_m", "interpret"))
def assign_to_centres(src_keys, centre_keys, centre_valid, *, block_e=None, block_m=None,
                      interpret=None):
  """Each source's most cosine-similar valid centre.

  Args:
    src_keys: [R, E, D]; centre_keys: [R, M, D]; any float dtype.
    centre_valid: [R, M] bool, the centres a source may join.
    block_e, block_m: rows per block (power of two); None picks per platform.
    interpret: see `backend.dispatch`.
  Returns:
    target [R, E] int32 (-1 where no centre is valid) and similarity [R, E] float32 (the
    cosine, computed in float32; 0 where target is -1).
  """
  _check(src_keys.ndim == 3 and centre_keys.ndim == 3
         and src_keys.shape[0::2] == centre_keys.shape[0::2],
         f"src_keys must be [R, E, D] and centre_keys [R, M, D], got {src_keys.shape} and "
         f"{centre_keys.shape}")
  _check(centre_valid.shape == centre_keys.shape[:2],
         f"centre_valid must be {centre_keys.shape[:2]}, got {centre_valid.shape}")
  for name, block in (("block_e", block_e), ("block_m", block_m)):
    if block is not None:
      backend.check_block(name, block)

  def build(target):
    return functools.partial(_assign_impl, target=target, block_e=block_e, block_m=block_m)

  return backend.dispatch(build, unit_rows(src_keys), unit_rows(centre_keys), centre_valid,
                          interpret=interpret)


def _scatter_impl(centre_keys, centre_values, centre_weights, src_keys, src_values,
                  src_weights, targets, *, target, block_e, block_m):
  r, m, d = centre_keys.shape
  e = src_keys.shape[1]
  block_e, ep, chunk, chunks = _tiling(target, e, block_e, looped=True)
  block_m, mp, _, _ = _tiling(target, m, block_m, looped=False)
  dp = backend.lane_dim(target, d)
  pad = lambda x, n: backend.pad_axis(backend.pad_axis(x, 2, dp), 1, n)
  sw = backend.pad_axis(src_weights.astype(jnp.float32), 1, ep)[:, None, :]
  tg = backend.pad_axis(targets.astype(jnp.int32), 1, ep, -1)[:, None, :]
  sums_spec = pl.BlockSpec((None, block_m, dp), lambda i, j, c: (i, j, 0))
  weight_spec = pl.BlockSpec((None, block_m, 1), lambda i, j, c: (i, j, 0))
  src_spec = pl.BlockSpec((None, chunk, dp), lambda i, j, c: (i, c, 0))
  lane_spec = pl.BlockSpec((None, 1, chunk), lambda i, j, c: (i, 0, c))
  sum_k, sum_v, sum_w = pl.pallas_call(
      functools.partial(_scatter_kernel, block_e=block_e, num_blocks=chunk // block_e),
      out_shape=(jax.ShapeDtypeStruct((r, mp, dp), jnp.float32),
                 jax.ShapeDtypeStruct((r, mp, dp), jnp.float32),
                 jax.ShapeDtypeStruct((r, mp, 1), jnp.float32)),
      grid=(r, mp // block_m, chunks),
      in_specs=[src_spec, src_spec, lane_spec, lane_spec],
      out_specs=(sums_spec, sums_spec, weight_spec),
      interpret=target.interpret,
      compiler_params=_compiler_params(target),
      name="scatter_mean",
  )(pad(src_keys, ep), pad(src_values, ep), sw, tg)
  # The division in XLA: one elementwise pass over the centres.
  own = centre_weights.astype(jnp.float32)
  total = own + sum_w[:, :m, 0]
  keep = (total > 0)[..., None]
  scale = jnp.where(keep, 1.0 / jnp.where(keep, total[..., None], 1.0), 0.0)
  mean = lambda centre, summed: jnp.where(
      keep, (own[..., None] * centre.astype(jnp.float32) + summed[:, :m, :d]) * scale,
      centre).astype(centre.dtype)
  return mean(centre_keys, sum_k), mean(centre_values, sum_v), total


@functools.partial(jax.jit, static_argnames=("block_e", "block_m", "interpret"))
def scatter_mean(centre_keys, centre_values, centre_weights, src_keys, src_values,
                 src_weights, targets, *, block_e=None, block_m=None, interpret=None):
  """Every centre becomes the weighted mean of itself and the sources assigned to it.

  Args:
    centre_keys, centre_values: [R, M, D]; centre_weights: [R, M] (0 = empty slot).
    src_keys, src_values: [R, E, D]; src_weights: [R, E] (0 = not merged).
    targets: [R, E] int32 centre of each source (-1 or >= M: none).
    block_e, block_m, interpret: as in `assign_to_centres`.
  Returns:
    keys, values [R, M, D] in the centres' dtypes (float32 arithmetic) and weights [R, M]
    float32 (the sums: tokens represented when weights are counts).
  """
  r, m, d = centre_keys.shape
  e = src_keys.shape[1]
  _check(centre_keys.ndim == 3 and centre_values.shape == (r, m, d)
         and centre_weights.shape == (r, m),
         f"centres must be [R, M, D] keys and values and [R, M] weights, got "
         f"{centre_keys.shape}, {centre_values.shape}, {centre_weights.shape}")
  _check(src_keys.shape == (r, e, d) and src_values.shape == (r, e, d)
         and src_weights.shape == (r, e) and targets.shape == (r, e),
         f"sources must be [R, E, D] = [{r}, E, {d}] keys and values and [R, E] weights and "
         f"targets, got {src_keys.shape}, {src_values.shape}, {src_weights.shape}, "
         f"{targets.shape}")

  def build(target):
    return functools.partial(_scatter_impl, target=target, block_e=block_e, block_m=block_m)

  return backend.dispatch(build, centre_keys, centre_values, centre_weights, src_keys,
                          src_values, src_weights, targets, interpret=interpret)
