"""Compaction: gather the kept slots (chosen by XLA's `lax.top_k`) into a smaller cache.

`gather_slots` is a Pallas kernel without dynamic indexing: for a block of output rows it
builds the one-hot matrix `indices[:, None] == source_slot[None, :]` and accumulates
`one_hot @ src_block` over source blocks with float32 accumulation. Each output row
picks exactly one source value, so the result is exact (products are `1 * x` or `0 * x`).
Consequence: `src` must be finite, since `0 * inf` and `0 * nan` would leak into
every row of the block.

Grid (R, output blocks, source chunks); a program loops over the source blocks of its
chunk. On TPU the source axis is split into chunks (bounded VMEM) and the output block
accumulates over the last, "arbitrary" grid axis (adding exact zeros, so still exact).
On GPU there is one chunk, because Triton programs run concurrently and must not
accumulate into a shared output.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend

_BLOCK_N = {"tpu": 256, "gpu": 64, "cpu": 64}
_BLOCK_M = {"tpu": 512, "gpu": 64, "cpu": 64}
# Source blocks per chunk (TPU: 4096 rows, 1 MiB at D=128 bf16); None = all in one chunk.
_CHUNK_BLOCKS = {"tpu": 8, "gpu": None, "cpu": 2}


def _gather_kernel(idx_ref, src_ref, out_ref, *, block_m, num_blocks):
  """Refs: idx [Nb, 1] int32, src [C, D] (one source chunk); out [Nb, D]."""
  c = pl.program_id(2)
  idx = idx_ref[...]
  nb = idx.shape[0]
  slot = lax.broadcasted_iota(jnp.int32, (nb, block_m), 1)
  # Relative to this chunk, so the iota is built once.
  idx = jnp.broadcast_to(idx - c * (num_blocks * block_m), (nb, block_m))
  # bf16 feeds the MXU / tensor cores directly; other floats go through exact f32.
  dtype = src_ref.dtype if src_ref.dtype == jnp.bfloat16 else jnp.float32
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None

  def body(i, acc):
    start = pl.multiple_of(i * block_m, block_m)
    one_hot = jnp.where(idx == slot + start, 1.0, 0.0).astype(dtype)
    block = src_ref[pl.ds(start, block_m), :].astype(dtype)
    return acc + lax.dot_general(one_hot, block,
                                 (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, num_blocks, body, jnp.zeros((nb, src_ref.shape[-1]), jnp.float32))

  @pl.when(c == 0)
  def _():
    out_ref[...] = acc.astype(out_ref.dtype)

  # Adds exact zeros to rows found in earlier chunks (f32 add: no bf16 VPU needed).
  @pl.when(c > 0)
  def _():
    out_ref[...] = (out_ref[...].astype(jnp.float32) + acc).astype(out_ref.dtype)


def _impl(src, indices, *, target, block_n):
  r, m, d = src.shape
  n = indices.shape[1]
  kind = target.pick(tpu="tpu", gpu="gpu", cpu="cpu")
  if block_n is None:
    block_n = min(_BLOCK_N[kind], max(backend.next_power_of_2(n), 16))
  else:
    backend.check_block("block_n", block_n)
  block_m = min(_BLOCK_M[kind], max(backend.next_power_of_2(m), 128 if target.is_tpu else 16))
  blocks = backend.cdiv(m, block_m)
  per_chunk = blocks if _CHUNK_BLOCKS[kind] is None else min(_CHUNK_BLOCKS[kind], blocks)
  chunk = per_chunk * block_m
  mp = backend.cdiv(m, chunk) * chunk
  nc = mp // chunk
  np_ = backend.cdiv(n, block_n) * block_n
  dp = backend.lane_dim(target, d)

  srcp = backend.pad_axis(backend.pad_axis(src, 2, dp), 1, mp)
  idx = backend.pad_axis(indices.astype(jnp.int32), 1, np_, -1)[:, :, None]
  out = pl.pallas_call(
      functools.partial(_gather_kernel, block_m=block_m, num_blocks=per_chunk),
      out_shape=jax.ShapeDtypeStruct((r, np_, dp), src.dtype),
      grid=(r, np_ // block_n, nc),
      in_specs=[pl.BlockSpec((None, block_n, 1), lambda i, j, t: (i, j, 0)),
                pl.BlockSpec((None, chunk, dp), lambda i, j, t: (i, t, 0))],
      out_specs=pl.BlockSpec((None, block_n, dp), lambda i, j, t: (i, j, 0)),
      interpret=target.interpret,
      compiler_params=backend.compiler_params(
          target, dimension_semantics=("parallel", "parallel", "arbitrary"),
          num_warps=4, num_stages=2),
      name="gather_slots",
  )(idx, srcp)
  return out[:, :n, :d]


@functools.partial(jax.jit, static_argnames=("block_n", "interpret"))
def gather_slots(src, indices, *, block_n=None, interpret=None):
  """Gathers slots: `out[r, n] = src[r, indices[r, n]]`, zeros where `indices < 0`.

  Args:
    src: [R, M, D], any float dtype, finite (see module docstring).
    indices: [R, N] int32 in [-1, M). Dense layout: R = batch * kv_heads; head-wise
      flat layout: R = batch with indices into the flattened [K * S] slots.
    block_n: output rows per program (power of two); None picks per platform.
    interpret: see `backend.dispatch`.
  Returns:
    [R, N, D] in src.dtype, bit-exact.
  """
  if src.ndim != 3 or indices.ndim != 2 or indices.shape[0] != src.shape[0]:
    raise ValueError(f"src must be [R, M, D] and indices [R, N], got {src.shape} and "
                     f"{indices.shape}.")
  if not jnp.issubdtype(src.dtype, jnp.floating):
    raise ValueError(f"src must be a float array (use gather_slot_values for metadata), "
                     f"got {src.dtype}.")

  def build(target):
    return functools.partial(_impl, target=target, block_n=block_n)

  return backend.dispatch(build, src, indices, interpret=interpret)


def gather_slot_values(values, indices, fill=0):
  """Per-slot metadata gather in plain jnp (XLA): `out[r, n] = values[r, indices[r, n]]`.

  For small [R, M] arrays such as positions (int32) or accumulated scores (float32), a
  kernel buys nothing. Entries with `indices < 0` get `fill` (use -1 for positions, so
  the gathered slot reads as empty).
  """
  taken = jnp.take_along_axis(values, jnp.maximum(indices, 0), axis=1)
  return jnp.where(indices >= 0, taken, jnp.asarray(fill, values.dtype))
