"""Decode attention: one new query token per row against a cache of position-tagged slots.

Two layouts:
  * dense: `keys [B, K, S, D]`, each KV head has its own S slots;
  * flat (head-wise budgets): `keys [B, N, D]`, all heads' slots in one axis, each slot
    tagged with the KV head that owns it.

What runs where: the kernel streams the keys of its grid program's chunk through an online
softmax (block by block in a `fori_loop`) and writes that chunk's normalised output and
log-sum-exp; with `return_probs` it also writes the masked logits of every slot. XLA then
merges the chunks by their log-sum-exp (a [.., chunks, rows, D] reduction) and turns the
logits into probabilities with one elementwise `exp(logit - lse)`. Splitting the keys over
grid programs gives GPUs enough programs at small batch and bounds TPU VMEM for long caches.
The wrapper pads the slot axis with empty slots to a multiple of the chunk (a copy of the
cache unless its capacity already is a multiple: allocate capacities of 2048 to avoid it).

Merging partial attentions (e.g. the cache here and the new token's own key held outside
it): with `m = max(lse_a, lse_b)`, `w_a = exp(lse_a - m)`, `w_b = exp(lse_b - m)`,
  out = (w_a * out_a + w_b * out_b) / (w_a + w_b),   lse = m + log(w_a + w_b).
`merge_partials` implements it; a side with no visible key has `lse == EMPTY_LSE` and
weight zero.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend

# Log-sum-exp reported for a query that sees no key. Finite (not -inf) so that merges
# and `exp(logit - lse)` never compute inf - inf.
EMPTY_LSE = -1e30

# Running-max start and masked logit inside the kernel (finite for the same reason).
_NEG = -1e30

_DEFAULT_BLOCK = {"tpu": 512, "gpu": 64, "cpu": 128}
# Blocks per grid program: TPU 2048 keys (K+V double-buffered: 2 MiB at D=128 bf16),
# GPU 512 keys (8 programs per (batch, head) at S=4096 keeps an H100 busy).
_CHUNK_BLOCKS = {"tpu": 4, "gpu": 8, "cpu": 4}


def _precision(dtype):
  # f32 inputs: full f32 products (Triton would otherwise use TF32).
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _query_rows(rows: int) -> int:
  # Triton dots need M >= 16 and power-of-two tiles; 16 rows is also one bf16 TPU tile.
  return max(16, backend.next_power_of_2(rows))


def _attend_kernel(*refs, flat, return_logits, block_k, num_blocks, scale):
  """Online softmax over one chunk of keys for a tile of query rows.

  Refs (2-D after squeezing): q [R, D], k/v [C, D], kpos [1, C], (flat: kheads [1, C],
  row_heads [R, 1]), qpos [1, 1]; outputs out [R, D] f32, lse [R, 1] f32, (logits [R, C]).
  """
  if flat:
    q_ref, k_ref, v_ref, kpos_ref, khead_ref, rowhead_ref, qpos_ref, *out_refs = refs
  else:
    q_ref, k_ref, v_ref, kpos_ref, qpos_ref, *out_refs = refs
  o_ref, lse_ref = out_refs[:2]
  q = q_ref[...]
  rows = q.shape[0]
  qpos = qpos_ref[...]
  precision = _precision(q.dtype)

  def body(i, carry):
    start = pl.multiple_of(i * block_k, block_k)
    s, kpos, vals = key_block(q, k_ref, v_ref, kpos_ref, start, block_k, scale, precision)
    visible = (kpos >= 0) & (kpos <= qpos)
    if flat:
      khead = jnp.broadcast_to(khead_ref[:, pl.ds(start, block_k)], s.shape)
      visible = visible & (khead == rowhead_ref[...])
    if return_logits:
      out_refs[2][:, pl.ds(start, block_k)] = jnp.where(visible, s, -jnp.inf)
    return online_softmax_step(carry, s, visible, vals, precision)

  m, l, acc = lax.fori_loop(0, num_blocks, body, online_softmax_start(rows, v_ref.shape[-1]))
  out, lse = online_softmax_result(m, l, acc)
  o_ref[...] = out
  lse_ref[...] = lse


def key_block(q, k_ref, v_ref, kpos_ref, start, block_k: int, scale: float, precision):
  """A kernel's key block at slot `start`: (logits [R, C] float32 of q [R, D], the key
  positions broadcast to [R, C], values [C, D]). The int positions are broadcast first so
  every mask is built at full tile shape (Mosaic and Triton want same-shape operands)."""
  keys = k_ref[pl.ds(start, block_k), :]
  vals = v_ref[pl.ds(start, block_k), :]
  s = lax.dot_general(q, keys, (((1,), (1,)), ((), ())), precision=precision,
                      preferred_element_type=jnp.float32) * scale
  return s, jnp.broadcast_to(kpos_ref[:, pl.ds(start, block_k)], s.shape), vals


def online_softmax_start(rows: int, dim: int):
  """(running max, running sum, output accumulator) before any key block (in a kernel)."""
  return (jnp.full((rows, 1), _NEG, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, dim), jnp.float32))


def online_softmax_step(carry, s, visible, vals, precision):
  """One key block of a kernel's online softmax: logits s [R, C] f32 (visible [R, C] bool)
  and values vals [C, D] folded into (max [R, 1], sum [R, 1], acc [R, D])."""
  m, l, acc = carry
  s = jnp.where(visible, s, _NEG)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
  alpha = jnp.exp(m - m_new)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + lax.dot_general(
      p.astype(vals.dtype), vals, (((1,), (0,)), ((), ())), precision=precision,
      preferred_element_type=jnp.float32)
  return m_new, l, acc


def online_softmax_result(m, l, acc):
  """(normalised output [R, D] f32, lse [R, 1]) of a finished online softmax; rows that
  saw no key get 0 and EMPTY_LSE."""
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  return (jnp.where(seen, acc / l_safe, 0.0),
          jnp.where(seen, m + jnp.log(l_safe), EMPTY_LSE))


def merge_stacked(outs, lses, axis):
  """Exact merge of partials stacked along `axis` of lses [.., n, ..]; outs add a last D."""
  m = jnp.max(lses, axis=axis, keepdims=True)
  w = jnp.exp(lses - m)
  total = jnp.sum(w, axis=axis)
  out = jnp.sum(w[..., None] * outs.astype(jnp.float32), axis=axis) / total[..., None]
  m = jnp.squeeze(m, axis)
  empty = m <= EMPTY_LSE / 2
  lse = jnp.where(empty, EMPTY_LSE, m + jnp.log(total))
  return jnp.where(empty[..., None], 0.0, out), lse


def merge_partials(out_a, lse_a, out_b, lse_b):
  """Combines two attentions of the same queries over disjoint key sets (pure jnp).

  Args:
    out_a, out_b: [..., D] normalised outputs.
    lse_a, lse_b: [...] their log-sum-exps (`EMPTY_LSE` for "no visible key").
  Returns:
    (out [..., D] in out_a's dtype, lse [...] float32): the attention over the union.
    Exact up to rounding; keep partial outputs in float32 for full precision.
  """
  outs = jnp.stack([out_a.astype(jnp.float32), out_b.astype(jnp.float32)], axis=-2)
  lses = jnp.stack([lse_a, lse_b], axis=-1).astype(jnp.float32)
  out, lse = merge_stacked(outs, lses, axis=lses.ndim - 1)
  return out.astype(out_a.dtype), lse


def _finish(out_c, lse_c, logits, *, rows, dim, length, chunk_axis, dtype):
  """XLA epilogue: merge chunks, slice padding off, probabilities from logits."""
  out, lse = merge_stacked(out_c, lse_c[..., 0], axis=chunk_axis)
  out = out[..., :rows, :dim].astype(dtype)
  lse = lse[..., :rows]
  if logits is None:
    return out, lse
  probs = jnp.exp(logits[..., :rows, :length] - lse[..., None])
  return out, lse, probs


def chunk_outputs(b, k, nc, rows, dim, padded, chunk, return_probs):
  """(out_shape, out_specs) of a dense decode kernel on grid (B, K, chunks): per chunk the
  normalised output [rows, dim] and lse [rows, 1], and with return_probs the masked logits
  of the chunk's slots [rows, chunk] (float32)."""
  out_shape = [jax.ShapeDtypeStruct((b, k, nc, rows, dim), jnp.float32),
               jax.ShapeDtypeStruct((b, k, nc, rows, 1), jnp.float32)]
  out_specs = [pl.BlockSpec((None, None, None, rows, dim), lambda i, j, t: (i, j, t, 0, 0)),
               pl.BlockSpec((None, None, None, rows, 1), lambda i, j, t: (i, j, t, 0, 0))]
  if return_probs:
    out_shape.append(jax.ShapeDtypeStruct((b, k, rows, padded), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, rows, chunk), lambda i, j, t: (i, j, 0, t)))
  return out_shape, out_specs


def _shared_values_kernel(q_ref, k_ref, *refs, **kwargs):
  """`_attend_kernel` whose values are its keys (one tile read serves both)."""
  _attend_kernel(q_ref, k_ref, k_ref, *refs, **kwargs)


def _dense_impl(q, keys, values, key_positions, query_positions, *, target, return_probs,
                block_k, key_chunk=None):
  """values None: the keys are the values too (one input, read once)."""
  b, k, g, d = q.shape
  s = keys.shape[2]
  tiling = backend.tile_keys(target, s, block_k, default_block=_DEFAULT_BLOCK,
                             chunk_blocks=_CHUNK_BLOCKS, chunk=key_chunk)
  rows, dp = _query_rows(g), backend.lane_dim(target, d)
  sp, c, nc = tiling.padded, tiling.chunk, tiling.num_chunks
  qp = backend.pad_axis(backend.pad_axis(q, 3, dp), 2, rows)
  kp = backend.pad_axis(backend.pad_axis(keys, 3, dp), 2, sp)
  slabs = [kp] if values is None else [
      kp, backend.pad_axis(backend.pad_axis(values, 3, dp), 2, sp)]
  kpos = backend.pad_axis(key_positions.astype(jnp.int32), 2, sp, -1)[:, :, None, :]
  qpos = query_positions.astype(jnp.int32).reshape(b, 1, 1)

  out_shape, out_specs = chunk_outputs(b, k, nc, rows, dp, sp, c, return_probs)
  kv_spec = pl.BlockSpec((None, None, c, dp), lambda i, j, t: (i, j, t, 0))
  results = pl.pallas_call(
      functools.partial(_attend_kernel if values is not None else _shared_values_kernel,
                        flat=False, return_logits=return_probs,
                        block_k=tiling.block, num_blocks=tiling.blocks_per_chunk,
                        scale=d ** -0.5),
      out_shape=out_shape,
      grid=(b, k, nc),
      in_specs=[pl.BlockSpec((None, None, rows, dp), lambda i, j, t: (i, j, 0, 0))]
               + [kv_spec] * len(slabs)
               + [pl.BlockSpec((None, None, 1, c), lambda i, j, t: (i, j, 0, t)),
                  pl.BlockSpec((None, 1, 1), lambda i, j, t: (i, 0, 0))],
      out_specs=out_specs,
      interpret=target.interpret,
      compiler_params=backend.compiler_params(
          target, dimension_semantics=("parallel",) * 3, num_warps=4, num_stages=2),
      name="decode_attention" if values is not None else "decode_attention_shared",
  )(qp, *slabs, kpos, qpos)
  logits = results[2] if return_probs else None
  return _finish(results[0], results[1], logits, rows=g, dim=d, length=s, chunk_axis=2,
                 dtype=q.dtype)


def _flat_impl(q, keys, values, key_positions, key_heads, query_positions, *, target,
               return_probs, block_k):
  b, k, g, d = q.shape
  n = keys.shape[1]
  h = k * g
  tiling = backend.tile_keys(target, n, block_k, default_block=_DEFAULT_BLOCK,
                             chunk_blocks=_CHUNK_BLOCKS)
  rows, dp = _query_rows(h), backend.lane_dim(target, d)
  np_, c, nc = tiling.padded, tiling.chunk, tiling.num_chunks
  # All K*G query rows of a batch row share one program: each key is read once and
  # matched to its head's rows by the head mask (extra MXU rows are cheap in decode).
  qp = backend.pad_axis(backend.pad_axis(q.reshape(b, h, d), 2, dp), 1, rows)
  kp = backend.pad_axis(backend.pad_axis(keys, 2, dp), 1, np_)
  vp = backend.pad_axis(backend.pad_axis(values, 2, dp), 1, np_)
  kpos = backend.pad_axis(key_positions.astype(jnp.int32), 1, np_, -1)[:, None, :]
  khead = backend.pad_axis(key_heads.astype(jnp.int32), 1, np_, -1)[:, None, :]
  # Padding rows own head -2, which no slot has (-1 marks an unowned slot).
  row_heads = backend.pad_axis(jnp.arange(h, dtype=jnp.int32) // g, 0, rows, -2)[:, None]
  qpos = query_positions.astype(jnp.int32).reshape(b, 1, 1)

  out_shape = [jax.ShapeDtypeStruct((b, nc, rows, dp), jnp.float32),
               jax.ShapeDtypeStruct((b, nc, rows, 1), jnp.float32)]
  out_specs = [pl.BlockSpec((None, None, rows, dp), lambda i, t: (i, t, 0, 0)),
               pl.BlockSpec((None, None, rows, 1), lambda i, t: (i, t, 0, 0))]
  if return_probs:
    out_shape.append(jax.ShapeDtypeStruct((b, rows, np_), jnp.float32))
    out_specs.append(pl.BlockSpec((None, rows, c), lambda i, t: (i, 0, t)))
  kv_spec = pl.BlockSpec((None, c, dp), lambda i, t: (i, t, 0))
  slot_spec = pl.BlockSpec((None, 1, c), lambda i, t: (i, 0, t))
  results = pl.pallas_call(
      functools.partial(_attend_kernel, flat=True, return_logits=return_probs,
                        block_k=tiling.block, num_blocks=tiling.blocks_per_chunk,
                        scale=d ** -0.5),
      out_shape=out_shape,
      grid=(b, nc),
      in_specs=[pl.BlockSpec((None, rows, dp), lambda i, t: (i, 0, 0)),
                kv_spec, kv_spec, slot_spec, slot_spec,
                pl.BlockSpec((rows, 1), lambda i, t: (0, 0)),
                pl.BlockSpec((None, 1, 1), lambda i, t: (i, 0, 0))],
      out_specs=out_specs,
      interpret=target.interpret,
      compiler_params=backend.compiler_params(
          target, dimension_semantics=("parallel",) * 2, num_warps=4, num_stages=2),
      name="decode_attention_flat",
  )(qp, kp, vp, kpos, khead, row_heads, qpos)
  logits = results[2] if return_probs else None
  out = _finish(results[0], results[1], logits, rows=h, dim=d, length=n, chunk_axis=1,
                dtype=q.dtype)
  out = (out[0].reshape(b, k, g, d), out[1].reshape(b, k, g)) + tuple(
      p.reshape(b, k, g, n) for p in out[2:])
  return out


def _check(cond, message):
  if not cond:
    raise ValueError(message)


@functools.partial(jax.jit, static_argnames=("return_probs", "block_k", "key_chunk",
                                             "interpret"))
def decode_attention(q, keys, values, key_positions, query_positions, *,
                     return_probs=False, block_k=None, key_chunk=None, interpret=None):
  """Attention of one query token per row over a dense per-head slot cache.

  A slot is visible iff `0 <= key_position <= query_position`. Scale `D ** -0.5`,
  softmax in float32.

  Args:
    q: [B, K, G, D] queries, query head `k*G + g` reads KV head `k`.
    keys, values: [B, K, S, D] (float32 or bfloat16).
    key_positions: [B, K, S] int32 original token positions, negative = empty slot.
    query_positions: [B] int32 position of each row's query (negative: sees nothing).
    return_probs: also return each slot's softmax probability.
    block_k: keys per inner-loop step (power of two); None picks per platform.
      Keys are padded to a multiple of the per-program chunk (a copy unless S already is).
    key_chunk: keys per grid program, a multiple of an explicit block_k; None picks per
      platform (GPU 512 keys: tuning rows of the H200 roofline check found nothing
      consistently faster at batch 1 or 8, 8K or 32K).
    interpret: see `backend.dispatch` (None: interpret on CPU, compile on TPU/GPU).
  Returns:
    out [B, K, G, D] in q.dtype, lse [B, K, G] float32 (natural-log log-sum-exp of the
    scaled logits; `EMPTY_LSE` and out = 0 for a query that sees no slot), and with
    `return_probs` probs [B, K, G, S] float32 (0 for invisible slots).
  """
  _check(q.ndim == 4 and keys.ndim == 4, f"q and keys must be 4-D [B, K, G|S, D], got "
         f"{q.shape} and {keys.shape}")
  b, k, _, d = q.shape
  s = keys.shape[2]
  _check(keys.shape == (b, k, s, d) and values.shape == keys.shape,
         f"keys/values must be [B, K, S, D] = [{b}, {k}, S, {d}], got {keys.shape} and "
         f"{values.shape}")
  _check(key_positions.shape == (b, k, s),
         f"key_positions must be {(b, k, s)}, got {key_positions.shape}")
  _check(query_positions.shape == (b,),
         f"query_positions must be {(b,)}, got {query_positions.shape}")

  _check(key_chunk is None or block_k is not None,
         f"key_chunk={key_chunk!r} needs an explicit block_k (got block_k=None)")

  def build(target):
    return functools.partial(_dense_impl, target=target, return_probs=return_probs,
                             block_k=block_k, key_chunk=key_chunk)

  return backend.dispatch(build, q, keys, values, key_positions, query_positions,
                          interpret=interpret)


@functools.partial(jax.jit, static_argnames=("return_probs", "block_k", "interpret"))
def decode_attention_shared(q, keys, key_positions, query_positions, *, return_probs=False,
                            block_k=None, interpret=None):
  """`decode_attention` whose keys are also its values: a multi-head latent attention
  (MLA) cache, where every query head reads one latent per slot [c; k_rope] both to score
  the slot (the key up-projection folded into the query) and as its value (the value
  up-projection applied to the output afterwards). Each tile of the cache is read once.

  Args: q [B, K, G, D]; keys [B, K, S, D] (K = 1 for MLA: G = all query heads);
  key_positions, query_positions, return_probs, block_k, interpret as in
  `decode_attention`. Returns as `decode_attention` (out [B, K, G, D]: the probability-
  weighted latents; the caller keeps the columns its value up-projection reads).
  """
  _check(q.ndim == 4 and keys.ndim == 4, f"q and keys must be 4-D [B, K, G|S, D], got "
         f"{q.shape} and {keys.shape}")
  b, k, _, d = q.shape
  s = keys.shape[2]
  _check(keys.shape == (b, k, s, d), f"keys must be [B, K, S, D] = [{b}, {k}, S, {d}], got "
         f"{keys.shape}")
  _check(key_positions.shape == (b, k, s),
         f"key_positions must be {(b, k, s)}, got {key_positions.shape}")
  _check(query_positions.shape == (b,),
         f"query_positions must be {(b,)}, got {query_positions.shape}")

  def build(target):
    return lambda q, keys, kpos, qpos: _dense_impl(
        q, keys, None, kpos, qpos, target=target, return_probs=return_probs, block_k=block_k)

  return backend.dispatch(build, q, keys, key_positions, query_positions,
                          interpret=interpret)


@functools.partial(jax.jit, static_argnames=("return_probs", "block_k", "interpret"))
def decode_attention_flat(q, keys, values, key_positions, key_heads, query_positions, *,
                          return_probs=False, block_k=None, interpret=None):
  """Decode attention over a flat (head-wise budget) cache: all heads' slots in one axis.

  Slot n is visible to KV head k's queries iff `key_heads[b, n] == k` and
  `0 <= key_positions[b, n] <= query_positions[b]`. Each program reads a chunk of slots
  once for all heads (no per-head segment bookkeeping needed).

  Args:
    q: [B, K, G, D].
    keys, values: [B, N, D].
    key_positions: [B, N] int32 (negative = empty).
    key_heads: [B, N] int32 owning KV head of each slot, -1 = none.
    query_positions: [B] int32.
    return_probs, block_k, interpret: as in `decode_attention`.
  Returns:
    out [B, K, G, D], lse [B, K, G], and with `return_probs` probs [B, K, G, N]
    (0 for invisible slots and for other heads' slots).
  """
  _check(q.ndim == 4 and keys.ndim == 3, f"q must be [B, K, G, D] and keys [B, N, D], got "
         f"{q.shape} and {keys.shape}")
  b, _, _, d = q.shape
  n = keys.shape[1]
  _check(keys.shape == (b, n, d) and values.shape == keys.shape,
         f"keys/values must be [B, N, D] = [{b}, N, {d}], got {keys.shape} and "
         f"{values.shape}")
  _check(key_positions.shape == (b, n) and key_heads.shape == (b, n),
         f"key_positions and key_heads must be {(b, n)}, got {key_positions.shape} and "
         f"{key_heads.shape}")
  _check(query_positions.shape == (b,),
         f"query_positions must be {(b,)}, got {query_positions.shape}")

  def build(target):
    return functools.partial(_flat_impl, target=target, return_probs=return_probs,
                             block_k=block_k)

  return backend.dispatch(build, q, keys, values, key_positions, key_heads,
                          query_positions, interpret=interpret)
