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
  `assign_to_centres`: grid (R, source blocks); a program loops over centre blocks keeping
    a running max and its lowest index (max, then min over the iota where equal: no
    argmax primitive, which Triton lacks).
  `scatter_mean`: grid (R, centre blocks); a program loops over source blocks and
    accumulates `one_hot(target == m) * weight @ sources` in float32 (the gather kernel of
    `compaction`, transposed), then divides once.
Keys are unit-normalised in XLA before the assignment (one pass over [R, E + M, D]).

Limitation: each program holds a row's whole centre set (assignment) or source set
(scatter) in its block; on TPU that must fit VMEM (about E * D * 2 * 2 bytes for bf16 keys
and values: fine for prefill chunks of thousands of tokens, not for an unchunked 32K
prompt). Tiling those axes over the grid, as `compaction` does, is left to do.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend

_BLOCK = {"tpu": 128, "gpu": 64, "cpu": 64}
_NO_CENTRE = -1e30   # logit of an invalid centre: below any cosine


def _assign_kernel(src_ref, centre_ref, valid_ref, target_ref, sim_ref, *, block_m,
                   num_blocks):
  """Refs: src [Eb, D] (unit rows), centre [Mp, D] (unit rows), valid [1, Mp] int32;
  out target [Eb, 1] int32, sim [Eb, 1] float32."""
  src = src_ref[...].astype(jnp.float32)
  eb = src.shape[0]

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
    iota = lax.broadcasted_iota(jnp.int32, sims.shape, 1) + start
    block_arg = jnp.min(jnp.where(sims == block_best, iota, jnp.iinfo(jnp.int32).max),
                        axis=1, keepdims=True)
    better = block_best > best                       # strict: an earlier block wins ties
    return jnp.where(better, block_best, best), jnp.where(better, block_arg, arg)

  init = (jnp.full((eb, 1), _NO_CENTRE, jnp.float32), jnp.full((eb, 1), -1, jnp.int32))
  best, arg = lax.fori_loop(0, num_blocks, body, init)
  found = best > _NO_CENTRE / 2
  target_ref[...] = jnp.where(found, arg, -1)
  sim_ref[...] = jnp.where(found, best, 0.0)


def _scatter_kernel(ck_ref, cv_ref, cw_ref, sk_ref, sv_ref, sw_ref, target_ref, ok_ref,
                    ov_ref, ow_ref, *, block_e, num_blocks):
  """Refs: centre keys/values [Mb, D], centre weights [Mb, 1]; sources [Ep, D], source
  weights and targets [1, Ep]; out keys/values [Mb, D], weights [Mb, 1]."""
  mb = ck_ref.shape[0]
  m = pl.program_id(1)
  rows = lax.broadcasted_iota(jnp.int32, (mb, block_e), 0) + m * mb
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
    # Token counts stay float32 (a bf16 share would round counts above 256 in the sums
    # but not in acc_w); the sources are widened to meet them.
    acc_k = acc_k + dot(share, sk_ref[pl.ds(start, block_e), :].astype(jnp.float32))
    acc_v = acc_v + dot(share, sv_ref[pl.ds(start, block_e), :].astype(jnp.float32))
    return acc_k, acc_v, acc_w

  init = (jnp.zeros(ck_ref.shape, jnp.float32), jnp.zeros(cv_ref.shape, jnp.float32),
          jnp.zeros((mb, 1), jnp.float32))
  acc_k, acc_v, acc_w = lax.fori_loop(0, num_blocks, body, init)
  own = cw_ref[...].astype(jnp.float32)
  total = own + acc_w
  keep = total > 0
  scale = jnp.where(keep, 1.0 / jnp.where(keep, total, 1.0), 0.0)
  ck, cv = ck_ref[...].astype(jnp.float32), cv_ref[...].astype(jnp.float32)
  ok_ref[...] = jnp.where(keep, (own * ck + acc_k) * scale, ck).astype(ok_ref.dtype)
  ov_ref[...] = jnp.where(keep, (own * cv + acc_v) * scale, cv).astype(ov_ref.dtype)
  ow_ref[...] = total


def _blocks(target, n, block):
  """(block, padded n): GPU pads to a power of two (Triton block shapes must be)."""
  kind = target.pick(tpu="tpu", gpu="gpu", cpu="cpu")
  block = block or min(_BLOCK[kind], max(backend.next_power_of_2(n), 8))
  if target.is_tpu:
    block = max(block, 128)     # lane-dim slices of [1, n] refs
  padded = backend.cdiv(n, block) * block
  if target.is_gpu:
    padded = max(backend.next_power_of_2(padded), block)
  return block, padded


def unit_rows(x):
  """x / ||x|| per row in float32 (zero rows stay zero)."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


def _assign_impl(src_unit, centre_unit, valid, *, target, block_e, block_m):
  r, e, d = src_unit.shape
  m = centre_unit.shape[1]
  block_e, ep = _blocks(target, e, block_e)
  block_m, mp = _blocks(target, m, block_m)
  dp = backend.lane_dim(target, d)
  src = backend.pad_axis(backend.pad_axis(src_unit, 2, dp), 1, ep)
  centres = backend.pad_axis(backend.pad_axis(centre_unit, 2, dp), 1, mp)
  valid = backend.pad_axis(valid.astype(jnp.int32), 1, mp)[:, None, :]
  out_spec = pl.BlockSpec((None, block_e, 1), lambda i, j: (i, j, 0))
  target_out, sim = pl.pallas_call(
      functools.partial(_assign_kernel, block_m=block_m, num_blocks=mp // block_m),
      out_shape=(jax.ShapeDtypeStruct((r, ep, 1), jnp.int32),
                 jax.ShapeDtypeStruct((r, ep, 1), jnp.float32)),
      grid=(r, ep // block_e),
      in_specs=[pl.BlockSpec((None, block_e, dp), lambda i, j: (i, j, 0)),
                pl.BlockSpec((None, mp, dp), lambda i, j: (i, 0, 0)),
                pl.BlockSpec((None, 1, mp), lambda i, j: (i, 0, 0))],
      out_specs=(out_spec, out_spec),
      interpret=target.interpret,
      compiler_params=backend.compiler_params(
          target, dimension_semantics=("parallel", "parallel"), num_warps=4, num_stages=2),
      name="assign_to_centres",
  )(src, centres, valid)
  return target_out[:, :e, 0], sim[:, :e, 0]


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
  block_e, ep = _blocks(target, e, block_e)
  block_m, mp = _blocks(target, m, block_m)
  dp = backend.lane_dim(target, d)
  pad = lambda x, n: backend.pad_axis(backend.pad_axis(x, 2, dp), 1, n)
  cw = backend.pad_axis(centre_weights.astype(jnp.float32), 1, mp)[:, :, None]
  sw = backend.pad_axis(src_weights.astype(jnp.float32), 1, ep)[:, None, :]
  tg = backend.pad_axis(targets.astype(jnp.int32), 1, ep, -1)[:, None, :]
  centre_spec = pl.BlockSpec((None, block_m, dp), lambda i, j: (i, j, 0))
  weight_spec = pl.BlockSpec((None, block_m, 1), lambda i, j: (i, j, 0))
  src_spec = pl.BlockSpec((None, ep, dp), lambda i, j: (i, 0, 0))
  lane_spec = pl.BlockSpec((None, 1, ep), lambda i, j: (i, 0, 0))
  keys, values, weights = pl.pallas_call(
      functools.partial(_scatter_kernel, block_e=block_e, num_blocks=ep // block_e),
      out_shape=(jax.ShapeDtypeStruct((r, mp, dp), centre_keys.dtype),
                 jax.ShapeDtypeStruct((r, mp, dp), centre_values.dtype),
                 jax.ShapeDtypeStruct((r, mp, 1), jnp.float32)),
      grid=(r, mp // block_m),
      in_specs=[centre_spec, centre_spec, weight_spec, src_spec, src_spec, lane_spec,
                lane_spec],
      out_specs=(centre_spec, centre_spec, weight_spec),
      interpret=target.interpret,
      compiler_params=backend.compiler_params(
          target, dimension_semantics=("parallel", "parallel"), num_warps=4, num_stages=2),
      name="scatter_mean",
  )(pad(centre_keys, mp), pad(centre_values, mp), cw, pad(src_keys.astype(centre_keys.dtype),
                                                          ep),
    pad(src_values.astype(centre_values.dtype), ep), sw, tg)
  return keys[:, :m, :d], values[:, :m, :d], weights[:, :m, 0]


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
