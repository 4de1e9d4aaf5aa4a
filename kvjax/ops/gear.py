"""GEAR's error recovery as pure float32 jnp functions: sparse outliers and a low-rank fit.

GEAR (Kang et al., 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless
Generative Inference of LLM") stores a block X [n tokens, d channels] of one KV head as
  X ~= put(deq(Q(X')), S) + A B^T
  * S, the outliers: per vector, the ceil(ratio * length / 2) largest and as many smallest
    entries, kept exactly (values + int32 indices). X' is X with those entries replaced by
    the vector's mean, so they do not widen the quantization ranges. Keys are quantized
    per channel, so their vectors are channels (over tokens); values are quantized per
    token, so their vectors are tokens (over channels).
  * Q, the base: KIVI's quantizer (`kvjax.ops.quantization`).
  * A [n, r], B [d, r]: a rank-r fit of the residual D = X - put(deq(Q(X')), S) by power
    iteration (`power_iteration`); D is exactly 0 at the outliers.
Empty slots (valid False) take no part: they are never outliers, do not enter a vector's
mean, and their rows of D (and of A) are zero. Compression is pure jnp: top-k and QR do
not lower inside kernels (TOOLCHAIN.md), and it runs once per prompt or per flushed
group, off the decode hot path. Decode attention over compressed blocks
(`decode_attention`) never rebuilds X: it runs the fused Pallas kernel
`pallas_kernels.gear.gear_decode_attention` on GPU/TPU and its jnp reference on CPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kvjax.ops.dispatch import use_pallas
from kvjax.ops.sharded import per_shard
from pallas_kernels import gear as kernels
from pallas_kernels import reference
from pallas_kernels.gear import GearPart

AXES = ("tokens", "channels")
# The power iteration's start matrix: uniform [0, 1) like GEAR's torch.rand, but drawn from
# a fixed key so that compressing the same block twice gives the same factors.
START_SEED = 0
_HIGHEST = jax.lax.Precision.HIGHEST   # f32 matmuls stay f32 on TPU/GPU (no bf16 passes)


def outlier_count(length: int, ratio: float) -> int:
  """Entries kept on EACH side (largest and smallest) of a vector of `length` entries.

  ceil(ratio * length / 2): never fewer than asked, so a nonzero ratio keeps at least one
  of each even for short vectors (a 64-channel value head at ratio 0.02 keeps 1 + 1, 3%;
  a key channel over 4096 tokens keeps 41 + 41, 2.002%). Capped at half the vector.
  """
  if ratio <= 0 or length <= 0:
    return 0
  # round() first: 0.02 * 100 / 2 must give 1, not ceil(1.0000000000000002) = 2.
  return min(max(length // 2, 1), math.ceil(round(ratio * length / 2, 9)))


def _vectors(x, axis):
  """x [..., n, d] as vectors on the last axis: channels over tokens, or tokens over channels."""
  return jnp.swapaxes(x, -1, -2) if axis == "tokens" else x


def _entry_mask(valid, axis):
  """[..., n] slot validity broadcastable against `_vectors`."""
  return valid[..., None, :] if axis == "tokens" else valid[..., :, None]


def extract_outliers(x, valid, count: int, axis: str):
  """The `count` largest and `count` smallest valid entries of every vector of x.

  Args:
    x: [..., n, d] float (computed in float32).
    valid: [..., n] bool, False for empty slots.
    count: entries per side (`outlier_count`).
    axis: "tokens" (vectors are channels over the n tokens: keys) or "channels" (vectors
      are tokens over the d channels: values).
  Returns:
    (filled [..., n, d] float32: x with the outliers replaced by their vector's mean over
     valid entries (outliers included, as GEAR does);
     values [..., V, 2 * count] float32 (0 where an index points at an empty slot), and
     indices [..., V, 2 * count] int32 into the vector: the top `count` then the bottom
     `count`; V = d for "tokens", n for "channels"). A vector with fewer than 2 * count
    valid entries gets overlapping picks or picks of empty slots; reconstruction puts
    values (not adds them), so repeats are harmless.
  """
  if axis not in AXES:
    raise ValueError(f"axis={axis!r}; allowed: {AXES}")
  v = _vectors(x.astype(jnp.float32), axis)
  mask = jnp.broadcast_to(_entry_mask(valid, axis), v.shape)
  if count == 0:
    empty = v.shape[:-1] + (0,)
    return x.astype(jnp.float32), jnp.zeros(empty, jnp.float32), jnp.zeros(empty, jnp.int32)
  _, top = jax.lax.top_k(jnp.where(mask, v, -jnp.inf), count)
  _, bottom = jax.lax.top_k(jnp.where(mask, -v, -jnp.inf), count)
  index = jnp.concatenate([top, bottom], axis=-1).astype(jnp.int32)
  picked_valid = jnp.take_along_axis(mask, index, axis=-1)
  values = jnp.where(picked_valid, jnp.take_along_axis(v, index, axis=-1), 0.0)
  n_valid = mask.sum(-1, keepdims=True)
  mean = jnp.where(mask, v, 0.0).sum(-1, keepdims=True) / jnp.maximum(n_valid, 1)
  filled = jnp.put_along_axis(v, index, jnp.broadcast_to(mean, index.shape), axis=-1,
                              inplace=False)
  return _vectors(filled, axis), values, index


def put_outliers(x, values, indices, axis: str):
  """x [..., n, d] with the stored outliers put back at their indices (float32)."""
  if indices.shape[-1] == 0:
    return x.astype(jnp.float32)
  v = jnp.put_along_axis(_vectors(x.astype(jnp.float32), axis), indices,
                         values.astype(jnp.float32), axis=-1, inplace=False)
  return _vectors(v, axis)


def power_iteration(residual, rank: int, loops: int):
  """A rank-`rank` fit A B^T of residual [..., n, d] by GEAR's power iteration, in float32.

  Start P ~ U[0, 1)^{d x r} (fixed key START_SEED, shared by all matrices), then `loops`
  times: Qm = D P; P = D^T Qm, orthonormalising P (before the product) and Qm (after it)
  by QR at the last iteration, as GEAR's `fake_poweriteration_group` does. Earlier
  iterations only rescale the columns to unit norm: QR of a positively column-scaled
  matrix has the same orthonormal factor, so the result is GEAR's, and long loops cannot
  overflow. Returns A = Qm [..., n, r] (orthonormal columns) and B = P [..., d, r], so
  A B^T = Qm Qm^T D is D projected on a rank-r subspace of its columns. rank must be
  <= min(n, d); rank 0 gives empty factors.
  """
  d = residual.astype(jnp.float32)
  n, dim = d.shape[-2:]
  lead = d.shape[:-2]
  if rank == 0:
    return jnp.zeros(lead + (n, 0), jnp.float32), jnp.zeros(lead + (dim, 0), jnp.float32)
  if not 0 < rank <= min(n, dim):
    raise ValueError(f"rank={rank} must be in [0, min(n, d)] = [0, {min(n, dim)}] for a "
                     f"[{n}, {dim}] block")
  if loops < 1:
    raise ValueError(f"loops={loops} must be >= 1")
  p = jax.random.uniform(jax.random.key(START_SEED), (dim, rank), jnp.float32)
  p = jnp.broadcast_to(p, lead + (dim, rank))
  dt = jnp.swapaxes(d, -1, -2)
  unit = lambda m: m / jnp.maximum(jnp.linalg.norm(m, axis=-2, keepdims=True), 1e-30)
  q = None
  for i in range(loops):
    last = i == loops - 1
    p = jnp.linalg.qr(p)[0] if last else unit(p)
    q = jnp.matmul(d, p, precision=_HIGHEST)
    q = jnp.linalg.qr(q)[0] if last else unit(q)
    p = jnp.matmul(dt, q, precision=_HIGHEST)
  return q, p


def low_rank(a, b):
  """A B^T of factors a [..., n, r], b [..., d, r] in float32 -> [..., n, d]."""
  return jnp.matmul(a.astype(jnp.float32), jnp.swapaxes(b, -1, -2).astype(jnp.float32),
                    precision=_HIGHEST)


def decode_attention(query, part: GearPart, key_positions, query_positions, *, bits: int,
                     group: int):
  """One query token per row (query [B, 1, H, D]) over one GEAR part of S > 0 slots
  [B, K, S]: (out [B, 1, H, D], lse [B, K, G]) of attention over its reconstruction
  put(deq(Q), S) + A B^T, computed without forming it (the fused kernel on GPU/TPU)."""
  b, _, h, d = query.shape
  k = key_positions.shape[1]
  grouped = query.reshape(b, k, h // k, d)
  qpos = query_positions[:, 0]
  if use_pallas():
    # Every leaf of the part is [B, K, ...] (outlier indices count within their head's
    # block): passed one by one so that each splits by rows and KV heads.
    kernel = lambda q, kpos, qp, *leaves: kernels.gear_decode_attention(
        q, GearPart(*leaves), kpos, qp, bits=bits, group=group)
    out, lse = per_shard(kernel, ("bk", "bk", "b") + ("bk",) * len(part), ("bk", "bk"))(
        grouped, key_positions, qpos, *part)
  else:
    out, lse = reference.gear_decode_attention(grouped, part, key_positions, qpos, bits=bits,
                                               group=group)
  return out.reshape(query.shape).astype(query.dtype), lse
