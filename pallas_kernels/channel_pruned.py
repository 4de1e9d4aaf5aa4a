"""Decode attention over channel-pruned keys (ThinK): keys keep D' of D channels per head.

A KV head stores its keys at the channels `channels [B, K, D']` only ([B, K, S, D']),
its values at full width ([B, K, S, D]). The logit of a slot is the full-width dot
product with the pruned channels' contributions dropped:
  logit = q[channels] . k_pruned * D ** -0.5     (D the FULL head dim, not D')
which equals q . k_zero_filled * D ** -0.5, the attention ThinK's code computes after
zero-filling the keys back (`recover_cache`), without reading or storing the zeros.

What runs where: the query gather (`take_along_axis` of q at each KV head's channels,
B * H * D' elements) runs in XLA; the kernel is `decode_attention`'s dense kernel body
(`decode_attention._attend_kernel`, online softmax over key blocks per grid program,
chunks merged by log-sum-exp in the shared XLA epilogue) fed keys of width D' and values
of width D: its q-k dot contracts over D' and its p-v dot produces D, so the body needs
no change, only this wrapper, which pads each width separately and passes the D scale.
The public `decode_attention` could not be reused as is: it requires keys and values of
one width and derives the scale from q's width. Positions and masking are as there: a
slot is visible iff `0 <= key_position <= query_position`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend
from pallas_kernels import decode_attention as da


def gather_channels(q, channels):
  """q [B, K, G, ..., D] at each KV head's channels [B, K, D'] -> [B, K, G, ..., D']."""
  index = channels.reshape(channels.shape[:2] + (1,) * (q.ndim - 3) + channels.shape[2:])
  return jnp.take_along_axis(q, index.astype(jnp.int32), axis=-1)


def _pruned_impl(q, channels, keys, values, key_positions, query_positions, *, target,
                 return_probs, block_k):
  b, k, g, d = q.shape
  s, dk = keys.shape[2:]
  tiling = backend.tile_keys(target, s, block_k, default_block=da._DEFAULT_BLOCK,
                             chunk_blocks=da._CHUNK_BLOCKS)
  rows = da._query_rows(g)
  dkp, dvp = backend.lane_dim(target, dk), backend.lane_dim(target, d)
  sp, c, nc = tiling.padded, tiling.chunk, tiling.num_chunks
  # Zero query columns beyond D' meet zero key columns: no change to any dot product.
  qp = backend.pad_axis(backend.pad_axis(gather_channels(q, channels), 3, dkp), 2, rows)
  kp = backend.pad_axis(backend.pad_axis(keys, 3, dkp), 2, sp)
  vp = backend.pad_axis(backend.pad_axis(values, 3, dvp), 2, sp)
  kpos = backend.pad_axis(key_positions.astype(jnp.int32), 2, sp, -1)[:, :, None, :]
  qpos = query_positions.astype(jnp.int32).reshape(b, 1, 1)

  out_shape, out_specs = da.chunk_outputs(b, k, nc, rows, dvp, sp, c, return_probs)
  results = pl.pallas_call(
      functools.partial(da._attend_kernel, flat=False, return_logits=return_probs,
                        block_k=tiling.block, num_blocks=tiling.blocks_per_chunk,
                        scale=d ** -0.5),
      out_shape=out_shape,
      grid=(b, k, nc),
      in_specs=[pl.BlockSpec((None, None, rows, dkp), lambda i, j, t: (i, j, 0, 0)),
                pl.BlockSpec((None, None, c, dkp), lambda i, j, t: (i, j, t, 0)),
                pl.BlockSpec((None, None, c, dvp), lambda i, j, t: (i, j, t, 0)),
                pl.BlockSpec((None, None, 1, c), lambda i, j, t: (i, j, 0, t)),
                pl.BlockSpec((None, 1, 1), lambda i, j, t: (i, 0, 0))],
      out_specs=out_specs,
      interpret=target.interpret,
      compiler_params=backend.compiler_params(
          target, dimension_semantics=("parallel",) * 3, num_warps=4, num_stages=2),
      name="channel_pruned_decode_attention",
  )(qp, kp, vp, kpos, qpos)
  logits = results[2] if return_probs else None
  return da._finish(results[0], results[1], logits, rows=g, dim=d, length=s, chunk_axis=2,
                    dtype=q.dtype)


def _check(cond, message):
  if not cond:
    raise ValueError(message)


@functools.partial(jax.jit, static_argnames=("return_probs", "block_k", "interpret"))
def channel_pruned_decode_attention(q, channels, keys, values, key_positions,
                                    query_positions, *, return_probs=False, block_k=None,
                                    interpret=None):
  """Attention of one query token per row over channel-pruned slots.

  Args:
    q: [B, K, G, D] full-width queries, query head `k*G + g` reads KV head `k`.
    channels: [B, K, D'] int32, the key channels each KV head kept (in [0, D)).
    keys: [B, K, S, D'] the keys at those channels. values: [B, K, S, D].
    key_positions: [B, K, S] int32 (negative = empty slot). query_positions: [B] int32.
    return_probs, block_k, interpret: as in `decode_attention.decode_attention`.
  Returns:
    out [B, K, G, D] in q.dtype, lse [B, K, G] float32 (scale D ** -0.5; `EMPTY_LSE` and
    out 0 for a query that sees nothing), and with `return_probs` probs [B, K, G, S].
  """
  _check(q.ndim == 4 and keys.ndim == 4, f"q and keys must be 4-D [B, K, G|S, D|D'], got "
         f"{q.shape} and {keys.shape}")
  b, k, _, d = q.shape
  s, dk = keys.shape[2:]
  _check(1 <= dk <= d, f"keys keep D' channels with 1 <= D' <= D={d}, got D'={dk}")
  _check(keys.shape[:2] == (b, k) and values.shape == (b, k, s, d),
         f"keys must be [B, K, S, D'] = [{b}, {k}, S, D'] and values [B, K, S, D] = "
         f"[{b}, {k}, {s}, {d}], got {keys.shape} and {values.shape}")
  _check(channels.shape == (b, k, dk),
         f"channels must be [B, K, D'] = {(b, k, dk)}, got {channels.shape}")
  _check(key_positions.shape == (b, k, s),
         f"key_positions must be {(b, k, s)}, got {key_positions.shape}")
  _check(query_positions.shape == (b,),
         f"query_positions must be {(b,)}, got {query_positions.shape}")

  def build(target):
    return functools.partial(_pruned_impl, target=target, return_probs=return_probs,
                             block_k=block_k)

  return backend.dispatch(build, q, channels, keys, values, key_positions, query_positions,
                          interpret=interpret)
