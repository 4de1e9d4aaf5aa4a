"""Pure-jnp attention: the reference of every attention kernel and kvjax's CPU path.

One implementation serves both: `kvjax.ops` runs these functions where no kernel runs (CPU),
and the kernel tests compare each Pallas kernel with them. Conventions: scale `D ** -0.5`,
float32 softmax, a slot is visible iff `0 <= key_position <= query_position`, query head
`k*G + g` reads KV head `k`, and a query that sees no slot gets output 0, lse `EMPTY_LSE`
and probabilities 0.

Products run in the input dtype with float32 softmax, as Hugging Face does (XLA:CPU has no
bf16 x bf16 -> f32 dot); `upcast=True` computes them in float32 at the highest precision,
which is how the kernels' results are checked.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels import backend, cross_layer, gear, merge, quantization
from pallas_kernels.decode_attention import EMPTY_LSE

_HI = lax.Precision.HIGHEST
# The channel-pruned attention (kvjax.ops.channel_pruned) processes long query chunks in
# blocks of this many queries: O(block * S) memory.
QUERY_BLOCK = 512
# `attention` runs chunks of more queries than this blockwise. Block sizes, measured on 2
# CPU cores (SmolLM2's 9 heads): at 512-1024 queries 256 x 128 blocks (logits that fit in
# L2) were up to 2.5x faster than 512 x 512; from 2K on 512 x 512 was as fast or faster
# (1.2x at 4K), and 3x faster than the unblocked attention at 2K.
BLOCKED_MIN_QUERIES = 64
BLOCK_Q, BLOCK_K = 512, 512
SHORT_CHUNK, SHORT_BLOCK_Q, SHORT_BLOCK_K = 1024, 256, 128
# Blocks shrink until one block's float32 logits over the heads (of one row: on CPU
# `attention` runs a batch row by row) fit this: 38 MB of logits per block (4 rows of 512 x 512)
# spilled every cache level and ran 1.3x slower than 256 x 256.
BLOCK_LOGITS_BYTES = 10 << 20


def _block_sizes(heads: int, t: int) -> tuple[int, int]:
  block_q, block_k = (SHORT_BLOCK_Q, SHORT_BLOCK_K) if t <= SHORT_CHUNK else (BLOCK_Q, BLOCK_K)
  while heads * block_q * block_k * 4 > BLOCK_LOGITS_BYTES and block_k > 64:
    if block_q >= block_k:
      block_q //= 2
    else:
      block_k //= 2
  return block_q, block_k


def visible(query_positions, key_positions):
  """[..., T, S] a slot at key position k is seen by a query at position q iff 0 <= k <= q."""
  kpos = key_positions[..., None, :]
  return (kpos >= 0) & (kpos <= query_positions[..., :, None])


def _masked_softmax(logits, seen):
  """(probs, lse) of `logits` over the visible entries of the last axis."""
  masked = jnp.where(seen, logits, -jnp.inf)
  m = jnp.max(masked, axis=-1, keepdims=True)
  any_seen = jnp.isfinite(m)
  m = jnp.where(any_seen, m, 0.0)
  e = jnp.where(seen, jnp.exp(masked - m), 0.0)
  total = jnp.sum(e, axis=-1, keepdims=True)
  probs = e / jnp.where(any_seen, total, 1.0)
  lse = jnp.where(any_seen, m + jnp.log(jnp.where(any_seen, total, 1.0)), EMPTY_LSE)[..., 0]
  return probs, lse


def _products(equation, a, b, upcast):
  if upcast:
    return jnp.einsum(equation, a.astype(jnp.float32), b.astype(jnp.float32), precision=_HI)
  precision = _HI if a.dtype == jnp.float32 else None
  return jnp.einsum(equation, a, b, precision=precision).astype(jnp.float32)


def _fused_one_query(q, stored: bool) -> bool:
  return stored and q.shape[0] == 1 and jax.default_backend() == "cpu"


def _one_query_logits(q, keys, stored: bool = True):
  """Logits [B, K, G, 1, S] of one query per head (decode), float32 whatever the cache
  dtype. XLA:CPU (jax 0.10.2, 2 cores, SmolLM2's 30 layers, 16-step decode loop) is
  fastest with a product summed over D at batch 1 (49 vs 54 ms per step at 2K slots) and
  with dots from batch 2 on, keys times queries ([S, G] per head) then swapped, as
  `union_decode_attention` (2K x 8: 129 vs 214 ms; 512 x 4: 53 vs 68; 2K x 2: 56 vs 68).
  Accelerators always take the dots (their matrix units). stored=False: keys computed in
  the same program (dequantized, gathered), which XLA:CPU would fuse into the product
  summed over D (computing them again for every query of a group): the dots then, at any
  batch (at batch 1, 700 / 2K tokens: KIVI-2 38 / 50 instead of 59 / 83 ms per step, GEAR
  44 / 52 instead of 49 / 59, Quest 0.75 36 / 45 instead of 55 / 113)."""
  if _fused_one_query(q, stored):
    kv = keys[:, :, None, None] if keys.ndim == 4 else keys[:, None, None, None]
    return jnp.sum(q[..., None, :].astype(jnp.float32) * kv.astype(jnp.float32), axis=-1)
  kv = "bksd" if keys.ndim == 4 else "bsd"
  logits = _products(f"{kv},bkgd->bksg", keys, q[:, :, :, 0], True)
  return jnp.swapaxes(logits, 2, 3)[:, :, :, None]


def _one_query_output(probs, values, stored: bool = True):
  """sum_s probs[..., s] * values[s] for probs [B, K, G, 1, S] (decode), float32: a
  product summed over S at batch 1 for stored values, else a dot (`_one_query_logits`)."""
  if _fused_one_query(probs, stored):
    v = values[:, :, None, None] if values.ndim == 4 else values[:, None, None, None]
    return jnp.sum(probs[..., None] * v.astype(jnp.float32), axis=-2)
  kv = "bksd" if values.ndim == 4 else "bsd"
  return _products(f"bkgs,{kv}->bkgd", probs[:, :, :, 0], values, True)[:, :, :, None]


def value_groups(values, head_dim: int) -> int:
  """r: value heads stored side by side in each slot (values [..., r * head_dim]), more
  than one only for DiffQKV models (fewer key heads than value heads)."""
  if values.shape[-1] % head_dim:
    raise ValueError(f"values of width {values.shape[-1]} are not whole heads of "
                     f"head_dim={head_dim}")
  return values.shape[-1] // head_dim


def _split_value_heads(probs, values, head_dim):
  """probs [B, K, G, ..., S] -> [B, K * r, G / r, ..., S] and values [B, K, S, r * D] (or
  flat [B, S, r * D]) -> [B, K * r, S, D]: query head g of key head k reads value head
  g // (G / r) of its r (Sigma's group sharing)."""
  r = value_groups(values, head_dim)
  b, k, g = probs.shape[:3]
  probs = probs.reshape((b, k * r, g // r) + probs.shape[3:])
  s = values.shape[-2]
  values = jnp.moveaxis(values.reshape(values.shape[:-1] + (r, head_dim)), -2, -3)
  if values.ndim == 4:   # flat [B, r, S, D]: every key head's slots hold r value heads
    values = jnp.broadcast_to(values[:, None], (b, k, r, s, head_dim))
  return probs, values.reshape(b, k * r, s, head_dim)


def weighted_values(probs, values, head_dim, combine):
  """combine(probs, values) -> [B, K, G, ..., D] for values one head wide; for DiffQKV
  values (r heads per slot) each query group reads its own value head."""
  r = value_groups(values, head_dim)
  if r == 1:
    return combine(probs, values)
  b, k, g = probs.shape[:3]
  out = combine(*_split_value_heads(probs, values, head_dim))
  return out.reshape((b, k, g) + out.shape[3:])


def grouped_attention(q, keys, values, seen, *, upcast=False, stored=True):
  """The one attention everything here is made of.

  q [B, K, G, T, D]; keys/values [B, K, S, D] (one set per KV head) or [B, S, D] (one set
  shared by all heads, masked per head by `seen`: the head-wise flat layout); seen
  [B, K, G|1, T, S] bool; stored: keys and values are read from memory, not computed
  in the same program (`_one_query_logits`). Returns (out [B, K, G, T, D] float32,
  lse [B, K, G, T], probs [B, K, G, T, S] float32).
  """
  d = q.shape[-1]
  kv = "bksd" if keys.ndim == 4 else "bsd"
  # One query per head on CPU: the forms XLA:CPU runs fastest (`_one_query_logits`).
  one_query = q.shape[3] == 1 and jax.default_backend() == "cpu"
  if one_query:
    logits = _one_query_logits(q, keys, stored) * d ** -0.5
  else:
    logits = _products(f"bkgtd,{kv}->bkgts", q, keys, upcast) * d ** -0.5
  probs, lse = _masked_softmax(logits, seen)
  if one_query:
    output = lambda p, v: _one_query_output(p, v, stored)
    return weighted_values(probs, values, d, output), lse, probs
  dtype = jnp.float32 if upcast else values.dtype
  out = weighted_values(probs.astype(dtype), values, d, lambda p, v: _products(
      f"bkgts,{'bksd' if v.ndim == 4 else 'bsd'}->bkgtd", p, v, upcast))
  return out, lse, probs


def _visit(active, body, carry):
  """body(j, carry) for each j where `active[j]` (traced): a loop of static length whose
  skipped iterations do nothing, so reverse-mode differentiation (training through the
  model's attention) works where a loop of traced length would not."""
  return lax.fori_loop(0, active.shape[0],
                       lambda j, c: lax.cond(active[j], body, lambda _, c: c, j, c), carry)


def blocked_attention(q, keys, values, query_positions, key_positions, *,
                      column_sums=False, block_q=BLOCK_Q, block_k=BLOCK_K):
  """Causal attention in blocks with an online softmax (flash attention in jnp).

  q [B, K, G, T, D]; keys/values [B, K, S, D]; query_positions [B, T]; key_positions
  [B, K, S]. Returns (out [B, K, G, T, D] float32, lse [B, K, G, T] (EMPTY_LSE for a
  query that sees nothing), column sums [B, K, G, S] float32 or None). Memory is
  O(block_q * block_k) per head instead of O(T * S), and a query block visits only the key
  blocks holding a slot it can see: in a prefill, the new chunk's future tokens and empty
  slots are skipped (about half the work of a causal prompt), and a block whose every
  slot every query of the block sees is not masked. Column sums take a second
  pass over the same blocks, normalised by each query's final log-sum-exp.
  """
  b, k, g, t, d = q.shape
  s = keys.shape[2]
  block_q, block_k = min(block_q, t), min(block_k, s)
  nq, nk = -(-t // block_q), -(-s // block_k)
  q = backend.pad_axis(q, 3, nq * block_q, 0)
  int_max = jnp.iinfo(jnp.int32).max
  # [nq] each query block's earliest position over the batch; rows past t (cut from the
  # output) do not count, a left-padding query (-1) does.
  earliest_query = backend.pad_axis(query_positions, 1, nq * block_q, int_max).reshape(
      b, nq, block_q).min(axis=(0, 2))
  query_positions = backend.pad_axis(query_positions, 1, nq * block_q, -1)
  # Keys and values are not padded (a copy per layer, and XLA:CPU took ~0.45 s to compile
  # that pad): a ragged last key block starts at s - block_k instead, overlapping the block
  # before it, and masks the slots that block already covered.
  padded_positions = backend.pad_axis(key_positions, 2, nk * block_k, -1)
  # Key block j holds a slot that query block i sees only if its smallest position is at
  # most the block's largest query position (over the batch: one loop serves all rows).
  # Other blocks are skipped: the chunk's future, the empty room after it, and the empty
  # slots before it when a compressing prefill attends over the cache and the new chunk.
  blocks = padded_positions.reshape(b, k, nk, block_k)
  first = jnp.where(blocks >= 0, blocks, int_max).min(axis=(0, 1, 3))     # [nk]
  last_query = query_positions.reshape(b, nq, block_q).max(axis=(0, 2))   # [nq]
  reach = first[None, :] <= last_query[:, None]                            # [nq, nk]
  # A block every query of which sees every slot (no empty slot, none newer than the query
  # block's earliest position: most blocks of a long prompt) skips building and applying
  # the mask. A ragged last block is never whole (its padding is -1), so its overlap with
  # the block before stays masked; nor is any block for a query block holding padding.
  whole = ((earliest_query[:, None] >= blocks.max(axis=(0, 1, 3))[None, :])
           & (blocks.min(axis=(0, 1, 3)) >= 0)[None, :])                  # [nq, nk]
  scale = d ** -0.5
  if q.dtype == jnp.float32:
    # Scaled once per query rather than once per (query, slot) logit.
    q, scale = q * scale, 1.0

  def block_start(j):
    return jnp.minimum(j * block_k, s - block_k)  # the ragged last block ends at s

  def own_slots(j):
    # [block_k] the slots of block j's window that are its own (not the block before's).
    return block_start(j) + jnp.arange(block_k) >= j * block_k

  def block_logits(j, qi):
    kj = lax.dynamic_slice_in_dim(keys, block_start(j), block_k, axis=2)
    logits = _products("bkgtd,bksd->bkgts", qi, kj, False)
    return logits * scale if scale != 1.0 else logits

  def key_block(j, qi, qpos):
    kpos = lax.dynamic_slice_in_dim(key_positions, block_start(j), block_k, axis=2)
    if s % block_k:
      kpos = jnp.where(own_slots(j), kpos, -1)
    seen = visible(qpos[:, None, None, :], kpos[:, :, None, :])
    return jnp.where(seen, block_logits(j, qi), -jnp.inf), seen

  def online_softmax_step(carry, logits, vj):
    m, l, acc = carry
    m_new = jnp.maximum(m, logits.max(-1))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(logits - shift[..., None])
    rescale = jnp.exp(m - shift)
    pv = weighted_values(p.astype(values.dtype), vj, d,
                         lambda p, v: _products("bkgts,bksd->bkgtd", p, v, False))
    return m_new, l * rescale + p.sum(-1), acc * rescale[..., None] + pv

  def query_block(sums, i):
    qi = lax.dynamic_slice_in_dim(q, i * block_q, block_q, axis=3)
    qpos = lax.dynamic_slice_in_dim(query_positions, i * block_q, block_q, axis=1)

    def whole_block(j, carry):
      # No mask to build and apply: attention 8-9% faster at 2K-4K tokens.
      vj = lax.dynamic_slice_in_dim(values, block_start(j), block_k, axis=2)
      return online_softmax_step(carry, block_logits(j, qi), vj)

    def masked_block(j, carry):
      logits, _ = key_block(j, qi, qpos)
      vj = lax.dynamic_slice_in_dim(values, block_start(j), block_k, axis=2)
      if s % block_k:
        # The overlap may be a block the loop skipped (NaN there would poison p . v).
        vj = jnp.where(own_slots(j)[:, None], vj, 0)
      return online_softmax_step(carry, logits, vj)

    def accumulate(j, carry):
      return lax.cond(whole[i, j], whole_block, masked_block, j, carry)

    rows = qi.shape[:-1]
    m, l, acc = _visit(reach[i], accumulate,
                       (jnp.full(rows, -jnp.inf), jnp.zeros(rows),
                        jnp.zeros(qi.shape, jnp.float32)))
    any_seen = l > 0  # the largest visible logit contributes exp(0) = 1
    out = acc / jnp.where(any_seen, l, 1.0)[..., None]
    lse = jnp.where(any_seen, m + jnp.log(jnp.where(any_seen, l, 1.0)), EMPTY_LSE)
    if sums is None:
      return None, (out, lse)

    def add_column_sums(j, sums):
      logits, seen = key_block(j, qi, qpos)
      p = jnp.where(seen, jnp.exp(logits - lse[..., None]), 0.0).sum(3)   # [B, K, G, bk]
      start = (0, 0, 0, block_start(j))
      return lax.dynamic_update_slice(
          sums, lax.dynamic_slice(sums, start, p.shape) + p, start)

    return _visit(reach[i], add_column_sums, sums), (out, lse)

  sums = jnp.zeros((b, k, g, s), jnp.float32) if column_sums else None
  sums, (out, lse) = lax.scan(query_block, sums, jnp.arange(nq))
  out = jnp.moveaxis(out, 0, 3).reshape(b, k, g, nq * block_q, d)[:, :, :, :t]
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, k, g, nq * block_q)[..., :t]
  return out, lse, sums


def group_heads(queries, num_kv_heads):
  """[B, T, H, D] -> [B, K, G, T, D]."""
  b, t, h, d = queries.shape
  return jnp.moveaxis(queries.reshape(b, t, num_kv_heads, h // num_kv_heads, d), 1, 3)


def ungroup_heads(out):
  """[B, K, G, T, D] -> [B, T, H, D]."""
  b, k, g, t, d = out.shape
  return jnp.moveaxis(out, 3, 1).reshape(b, t, k * g, d)


# Jitted so that a model's layers (same shapes) trace and lower it once, not once per layer:
# SmolLM2's 30 unrolled layers spent ~1.3 s of a 512-token prefill's compile tracing it.
@functools.partial(jax.jit, static_argnames="column_sums")
def attention(queries, keys, values, query_positions, key_positions, column_sums=False):
  """Causal attention by original positions (prefill and decode on CPU).

  queries [B, T, H, D]; keys/values [B, K, S, D]; query_positions [B, T];
  key_positions [B, K, S] (negative = empty slot). Chunks of more than BLOCKED_MIN_QUERIES
  queries run `blocked_attention`. With column_sums, also returns [B, H, S] float32: each
  key's attention probability summed over the (non-padding) queries.
  """
  b, t, h, _ = queries.shape
  k = keys.shape[1]
  grouped = group_heads(queries, k)
  if t > BLOCKED_MIN_QUERIES:
    block_q, block_k = _block_sizes(h, t)
    blocks = dict(column_sums=column_sums, block_q=block_q, block_k=block_k)
    args = (grouped, keys, values, query_positions, key_positions)
    if jax.default_backend() == "cpu":
      # One row at a time on CPU: a row's blocks stay small enough for the caches at any
      # batch (8 x 512 tokens ran 1.2x faster than all 8 rows at once, 4 x 2K 1.07x;
      # 4 x 512 the same within noise), and each row skips exactly its own blocks.
      def one_row(row):
        out, _, sums = blocked_attention(*(x[None] for x in row), **blocks)
        return out[0], None if sums is None else sums[0]

      out, sums = lax.map(one_row, args)
    else:
      # Accelerators (column sums, DiffQKV values: what the flash kernel does not serve)
      # keep the batch whole: rows run in parallel, and rows split over devices stay so.
      out, _, sums = blocked_attention(*args, **blocks)
  else:
    seen = visible(query_positions[:, None, None, :], key_positions[:, :, None, :])
    out, _, probs = grouped_attention(grouped, keys, values, seen)
    sums = probs.sum(3) if column_sums else None
  out = ungroup_heads(out).astype(queries.dtype)
  return (out, sums.reshape(b, h, -1)) if column_sums else out


def probabilities(queries, keys, query_positions, key_positions, *, upcast=False):
  """[B, K, G, T, S] float32 causal softmax of queries [B, T, H, D] over keys [B, K, S, D]."""
  k = keys.shape[1]
  seen = visible(query_positions[:, None, None, :], key_positions[:, :, None, :])
  d = queries.shape[-1]
  logits = _products("bkgtd,bksd->bkgts", group_heads(queries, k), keys, upcast) * d ** -0.5
  return _masked_softmax(logits, seen)[0]


def _flat_seen(query_positions, key_positions, key_heads, num_kv_heads):
  """[B, K, 1, T, N]: query group k sees the visible slots its KV head owns."""
  own = key_heads[:, :, None] == jnp.arange(num_kv_heads, dtype=key_heads.dtype)
  own = jnp.moveaxis(own, 2, 1)                                         # [B, K, N]
  seen = visible(query_positions[:, None, :], key_positions[:, None, :])  # [B, 1, T, N]
  return (seen & own[:, :, None, :])[:, :, None]


def attention_flat(queries, keys, values, query_positions, key_positions, key_heads,
                   num_kv_heads, column_sums=False):
  """Attention over a head-wise (flat) cache: keys/values [B, N, D], key_positions and
  key_heads [B, N]. Query head group k sees only the slots its KV head owns. With
  column_sums, also [B, H, N] float32: each slot's probability summed over the queries."""
  k = num_kv_heads
  seen = _flat_seen(query_positions, key_positions, key_heads, k)
  out, _, probs = grouped_attention(group_heads(queries, k), keys, values, seen)
  out = ungroup_heads(out).astype(queries.dtype)
  if not column_sums:
    return out
  b, _, g, _, n = probs.shape
  return out, probs.sum(3).reshape(b, k * g, n)


def decode_attention(q, keys, values, key_positions, query_positions, *, upcast=True,
                     stored=True):
  """Reference of `decode_attention(..., return_probs=True)`: (out, lse, probs).

  q [B, K, G, D] (one query per row); keys/values [B, K, S, D]; positions as above;
  stored as in `grouped_attention`.
  """
  seen = visible(query_positions[:, None, None, None], key_positions[:, :, None, :])
  out, lse, probs = grouped_attention(q[:, :, :, None], keys, values, seen, upcast=upcast,
                                      stored=stored)
  return out[:, :, :, 0].astype(q.dtype), lse[..., 0], probs[:, :, :, 0]


def decode_attention_flat(q, keys, values, key_positions, key_heads, query_positions, *,
                          upcast=True):
  """Reference of `decode_attention_flat(..., return_probs=True)`: (out, lse, probs)."""
  seen = _flat_seen(query_positions[:, None], key_positions, key_heads, q.shape[1])
  out, lse, probs = grouped_attention(q[:, :, :, None], keys, values, seen, upcast=upcast)
  return out[:, :, :, 0].astype(q.dtype), lse[..., 0], probs[:, :, :, 0]


def window_attention(q, keys, key_positions, query_positions):
  """The [B, H, W, S] observation-window attention matrix the kernel never writes.

  q [B, H, W, D] (head-major, as the window kernel takes it).
  """
  b, h, w, _ = q.shape
  probs = probabilities(jnp.swapaxes(q, 1, 2), keys, query_positions, key_positions,
                        upcast=True)
  return probs.reshape(b, h, w, -1)


def pool_scores(sums, *, pooling="max", kernel_size=7):
  """1-D pooling of [..., S] along S (stride 1, centred, padding kernel_size // 2).

  "avg" counts the zero padding (torch avg_pool1d's default), "max" ignores it.
  """
  if pooling == "none" or kernel_size == 1:
    return sums
  r = kernel_size // 2
  dims = (1,) * (sums.ndim - 1) + (kernel_size,)
  pads = ((0, 0),) * (sums.ndim - 1) + ((r, r),)
  if pooling == "max":
    return lax.reduce_window(sums, -jnp.inf, lax.max, dims, (1,) * sums.ndim, pads)
  if pooling == "avg":
    return lax.reduce_window(sums, 0.0, lax.add, dims, (1,) * sums.ndim, pads) / kernel_size
  raise ValueError(f"pooling={pooling!r}; allowed: 'max', 'avg', 'none'")


def window_scores(q, keys, key_positions, query_positions, *, pooling="max",
                  kernel_size=7, gqa="mean"):
  """Reference of `window_scores`: (sums [B, H, S], variances [B, H, S], scores [B, K, S])."""
  attn = window_attention(q, keys, key_positions, query_positions)
  valid = (query_positions >= 0)[:, None, :, None]
  n = jnp.sum(valid, axis=2).astype(jnp.float32)  # [B, 1, 1]
  attn = jnp.where(valid, attn, 0.0)
  sums = jnp.sum(attn, axis=2)
  mean = sums / jnp.maximum(n, 1.0)
  variances = jnp.sum(jnp.where(valid, (attn - mean[:, :, None, :]) ** 2, 0.0), axis=2)
  variances = jnp.where(n > 0, variances / jnp.maximum(n, 1.0), 0.0)
  pooled = pool_scores(sums, pooling=pooling, kernel_size=kernel_size)
  b, h, s = sums.shape
  k = keys.shape[1]
  grouped = pooled.reshape(b, k, h // k, s)
  reduce = {"mean": jnp.mean, "max": jnp.max, "sum": jnp.sum}[gqa]
  return sums, variances, reduce(grouped, axis=2)


def gather_slots(src, indices):
  """Reference of `gather_slots`: out[r, n] = src[r, indices[r, n]], zeros where < 0."""
  taken = jnp.take_along_axis(src, jnp.maximum(indices, 0)[..., None], axis=1)
  return jnp.where((indices >= 0)[..., None], taken, jnp.zeros((), src.dtype))


def quantized_decode_attention(q, key_codes, key_scale, key_zero, value_codes, value_scale,
                               value_zero, key_positions, query_positions, *, bits, group,
                               key_axis="tokens", upcast=True):
  """Reference of `quantized_decode_attention(..., return_probs=True)`: (out, lse, probs).

  Dequantizes the whole cache (keys grouped along `key_axis`, values over channels) into
  q's dtype, as the kernel feeds its dots, then runs the dense decode attention above.
  """
  keys = quantization.dequantize(key_codes, key_scale, key_zero, bits=bits, group=group,
                                 axis=key_axis, dtype=q.dtype)
  values = quantization.dequantize(value_codes, value_scale, value_zero, bits=bits,
                                   group=group, axis="channels", dtype=q.dtype)
  return decode_attention(q, keys, values, key_positions, query_positions, upcast=upcast,
                          stored=False)


def union_decode_attention(qs, keys, values, key_positions, query_positions):
  """One query per row over the union of several dense slot sets, as one softmax.

  kvjax's CPU decode over a cache kept in parts (the mixed-precision pools, dequantized,
  and their full-precision recent tokens): part i is read with its own query qs[i]
  [B, K, G, D] (a pool of balanced keys with the query divided by the balance), keys[i]
  and values[i] [B, K, S_i, D], key_positions[i] [B, K, S_i]; query_positions [B].
  Products are float32 dots at the highest precision, keys times queries ([S, G] per
  head, then swapped): on 2 CPU cores (jax 0.10.2; 1024 slots, 3 KV heads x 3 queries,
  D = 64) the logits took 24 us this way, 46 us as a [G, S] dot (XLA:CPU copies the keys
  transposed first) and 245 us as a product summed over D. Returns (out [B, K, G, D]
  float32, lse [B, K, G]);
  a query that sees no slot gets 0 and `EMPTY_LSE`.
  """
  d = qs[0].shape[-1]
  logits = jnp.swapaxes(jnp.concatenate([_products("bksd,bkgd->bksg", k, q, True)
                                         for q, k in zip(qs, keys)], axis=2), 2, 3)
  logits = logits * d ** -0.5
  positions = jnp.concatenate(key_positions, axis=-1)
  seen = visible(query_positions[:, None, None, None], positions[:, :, None, :])[..., 0, :]
  probs, lse = _masked_softmax(logits, seen)
  out, start = 0.0, 0
  for v in values:
    n = v.shape[2]
    out = out + _products("bkgs,bksd->bkgd", probs[..., start:start + n], v, True)
    start += n
  return out, lse


def channel_pruned_attention(q, channels, keys, values, seen, *, upcast=False):
  """Attention over channel-pruned slots (ThinK): each KV head keeps the key channels
  `channels [B, K, D']` (keys [B, K, S, D']) and full values [B, K, S, D].

  q [B, K, G, T, D] full width; seen [B, K, G|1, T, S]. The query is gathered at the
  kept channels and the logits scaled by the FULL head dim, D ** -0.5, so they equal the
  logits of keys zero-filled back to D channels. Returns (out [B, K, G, T, D] float32,
  lse [B, K, G, T], probs [B, K, G, T, S] float32), as `grouped_attention`.
  """
  index = channels[:, :, None, None, :].astype(jnp.int32)
  kept = jnp.take_along_axis(q, index, axis=-1)
  logits = _products("bkgtc,bksc->bkgts", kept, keys, upcast) * q.shape[-1] ** -0.5
  probs, lse = _masked_softmax(logits, seen)
  dtype = jnp.float32 if upcast else values.dtype
  out = _products("bkgts,bksd->bkgtd", probs.astype(dtype), values, upcast)
  return out, lse, probs


def channel_pruned_decode_attention(q, channels, keys, values, key_positions,
                                    query_positions, *, upcast=True):
  """Reference of `channel_pruned_decode_attention(..., return_probs=True)`:
  (out, lse, probs). q [B, K, G, D]; channels [B, K, D']; keys [B, K, S, D']."""
  seen = visible(query_positions[:, None, None, None], key_positions[:, :, None, :])
  out, lse, probs = channel_pruned_attention(q[:, :, :, None], channels, keys, values, seen,
                                             upcast=upcast)
  return out[:, :, :, 0].astype(q.dtype), lse[..., 0], probs[:, :, :, 0]


def _put_picks(x, values, indices):
  """x [..., D] float32 with x[..., indices[..., j]] = values[..., j] for every pick j
  (a select per pick, so XLA fuses it into whatever reads x)."""
  channel = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  for j in range(indices.shape[-1]):
    x = jnp.where(channel == indices[..., j:j + 1],
                  values[..., j:j + 1].astype(jnp.float32), x)
  return x


def gear_decode_attention(q, part, key_positions, query_positions, *, bits, group):
  """Reference of `gear.gear_decode_attention` and kvjax's CPU path: (out, lse).

  q [B, K, G, D] (one query per row) over a `gear.GearPart` of S slots in blocks of n:
    logits = q . deq(Qk) + the key outliers' correction (`gear.key_outlier_logits`)
             + (q Bk) Ak^T per block,
    out = p . put(deq(Qv), Sv) + (p Av) Bv^T per block,
  all in float32 at the highest precision. The keys' reconstruction is never formed, and
  of the values' only the base with its outliers put in: the dequantization and the
  outliers' selects are elementwise producers of the two products (dots on CPU, as
  KIVI's path: `_one_query_logits`); the low-rank terms are small products through the
  rank.
  """
  gear.check_args(q, part, key_positions, query_positions, bits, group)
  b, k, g, d = q.shape
  s, nb = part.slots, part.blocks
  if s == 0:
    return jnp.zeros(q.shape, q.dtype), jnp.full((b, k, g), EMPTY_LSE, jnp.float32)
  n = s // nb
  f32 = lambda x: x.astype(jnp.float32)
  q32 = f32(q)
  keys = quantization.dequantize(part.key_codes, part.key_scale, part.key_zero, bits=bits,
                                 group=group, axis="tokens", dtype=jnp.float32)
  values = _put_picks(
      quantization.dequantize(part.value_codes, part.value_scale, part.value_zero,
                              bits=bits, group=group, axis="channels", dtype=jnp.float32),
      part.value_outlier_values, part.value_outlier_indices)
  logits = _one_query_logits(q32[:, :, :, None], keys, stored=False)[:, :, :, 0]
  by_block = lambda a: f32(a).reshape(b, k, nb, n, a.shape[-1])
  q_b = jnp.einsum("bkgd,bkjdr->bkgjr", q32, f32(part.key_b), precision=_HI)
  low_rank = jnp.einsum("bkgjr,bkjnr->bkgjn", q_b, by_block(part.key_a), precision=_HI)
  logits = logits + low_rank.reshape(b, k, g, s)
  logits = (logits + gear.key_outlier_logits(q, part, bits=bits, group=group)) * d ** -0.5
  seen = visible(query_positions[:, None, None, None], key_positions[:, :, None, :])
  probs, lse = _masked_softmax(logits[:, :, :, None], seen)
  out = _one_query_output(probs, values, stored=False)[:, :, :, 0]
  p_a = jnp.einsum("bkgjn,bkjnr->bkgjr", probs.reshape(b, k, g, nb, n),
                   by_block(part.value_a), precision=_HI)
  out = out + jnp.einsum("bkgjr,bkjdr->bkgd", p_a, f32(part.value_b), precision=_HI)
  return out.astype(q.dtype), lse[..., 0]


def assign_to_centres(src_keys, centre_keys, centre_valid):
  """Reference of `merge.assign_to_centres`: (target [R, E] int32, similarity [R, E])."""
  sims = jnp.einsum("red,rmd->rem", merge.unit_rows(src_keys), merge.unit_rows(centre_keys),
                    precision=_HI)
  sims = jnp.where(centre_valid[:, None, :], sims, -jnp.inf)
  target = jnp.argmax(sims, axis=-1).astype(jnp.int32)   # lowest index on ties
  found = centre_valid.any(-1, keepdims=True)
  best = jnp.take_along_axis(sims, target[..., None], axis=-1)[..., 0]
  return jnp.where(found, target, -1), jnp.where(found, best, 0.0)


def scatter_mean(centre_keys, centre_values, centre_weights, src_keys, src_values,
                 src_weights, targets):
  """Reference of `merge.scatter_mean`: (keys, values, weights) of the merged centres."""
  m = centre_keys.shape[1]
  share = jnp.where(targets[..., None] == jnp.arange(m), src_weights[..., None], 0.0)
  share = share.astype(jnp.float32)                                       # [R, E, M]
  own = centre_weights.astype(jnp.float32)
  total = own + share.sum(1)

  def mean(centre, src):
    summed = own[..., None] * centre.astype(jnp.float32) + jnp.einsum(
        "rem,red->rmd", share, src.astype(jnp.float32), precision=_HI)
    merged = summed / jnp.where(total > 0, total, 1.0)[..., None]
    return jnp.where((total > 0)[..., None], merged, centre).astype(centre.dtype)

  return mean(centre_keys, src_keys), mean(centre_values, src_values), total


def lowrank_decode_attention(q, slots, key_positions, inv_freq, query_positions):
  """Reference of `cross_layer.lowrank_decode_attention` and kvjax's CPU path: (out, lse).

  q [B, K, G, D] (one query per row) over an xKV layer's `cross_layer.LowRankSlots`: the
  keys rebuilt as Uk Ck [B, S, K, D] and rotated to key_positions [B, S] (rotate-half
  RoPE, the slot's position times inv_freq [D // 2]); the values never rebuilt, their
  coefficients absorbed: out = (p Uv) Cv. float32 at the highest precision.
  """
  cross_layer.check_lowrank_args(q, slots, key_positions, inv_freq, query_positions)
  b, k, g, d = q.shape
  s = slots.key_basis.shape[1]
  f32 = lambda x: x.astype(jnp.float32)
  keys = jnp.einsum("bsr,brc->bsc", f32(slots.key_basis), f32(slots.key_coefficients),
                    precision=_HI).reshape(b, s, k, d)
  angles = f32(jnp.maximum(key_positions, 0))[..., None] * f32(inv_freq)   # [B, S, D/2]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = keys[..., :d // 2], keys[..., d // 2:]
  keys = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  logits = jnp.einsum("bkgd,bskd->bkgs", f32(q), keys, precision=_HI) * d ** -0.5
  seen = visible(query_positions[:, None, None, None], key_positions[:, None, None, :])
  probs, lse = _masked_softmax(logits[:, :, :, None], seen)
  absorbed = jnp.einsum("bkgs,bsr->bkgr", probs[:, :, :, 0], f32(slots.value_basis),
                        precision=_HI)
  rv = slots.value_basis.shape[-1]
  out = jnp.einsum("bkgr,brkd->bkgd", absorbed,
                   f32(slots.value_coefficients).reshape(b, rv, k, d), precision=_HI)
  return out.astype(q.dtype), lse[..., 0]


def merged_decode_attention(q, slots, key_positions, query_positions):
  """Reference of `cross_layer.merged_decode_attention` and kvjax's CPU path: (out, lse).

  q [B, K, G, D] (one query per row) over a MiniCache layer's `cross_layer.MergedSlots`,
  without forming its keys or values: logits |k_t| (q . dir_k[t]) (the norm scales the
  logit), the logits of retained key slots SET to q . k_t of the stored key; output
  sum_t p_t |v_t| dir_v[t] plus, at each retained value slot, p_t (v_t - |v_t| dir_v[t]).
  float32 at the highest precision.
  """
  cross_layer.check_merged_args(q, slots, key_positions, query_positions)
  b, k, g, d = q.shape
  s = key_positions.shape[-1]
  f32 = lambda x: x.astype(jnp.float32)
  q32 = f32(q)
  logits = _one_query_logits(q32[:, :, :, None], slots.key_directions)[:, :, :, 0]
  logits = logits * f32(slots.key_norms)[:, :, None, :]
  own = _products("bkgd,bkrd->bkgr", q32, slots.key_vectors, True)
  index = slots.key_index
  slot = jnp.where(index >= 0, index, s)[:, :, None, :]        # -1: dropped
  rows, heads = jnp.arange(b)[:, None, None, None], jnp.arange(k)[None, :, None, None]
  logits = logits.at[rows, heads, jnp.arange(g)[None, None, :, None], slot].set(
      own, mode="drop") * d ** -0.5
  seen = visible(query_positions[:, None, None, None], key_positions[:, :, None, :])
  probs, lse = _masked_softmax(logits[:, :, :, None], seen)   # [B, K, G, 1, S]
  weighted = probs * f32(slots.value_norms)[:, :, None, None, :]
  out = _one_query_output(weighted, slots.value_directions)[:, :, :, 0]
  index = slots.value_index
  at = jnp.maximum(index, 0)
  p_at = jnp.where((index >= 0)[:, :, None, :],
                   jnp.take_along_axis(probs[:, :, :, 0], at[:, :, None, :], axis=3), 0.0)
  rebuilt = (jnp.take_along_axis(f32(slots.value_norms), at, axis=2)[..., None]
             * jnp.take_along_axis(f32(slots.value_directions), at[..., None], axis=2))
  out = out + _products("bkgr,bkrd->bkgd", p_at, f32(slots.value_vectors) - rebuilt, True)
  return out.astype(q.dtype), lse[..., 0]


def vertical_slash_attention(queries, keys, values, query_positions, key_positions,
                             vertical, slash, max_vertical: int, max_slash: int):
  """[B, T, H, D] causal attention of every query over its head's chosen lines only: the
  keys at the chosen positions (vertical [B, H, S] by key position, positions < S: one
  prompt) and at the chosen offsets from the query (slash [B, H, S] by offset), each key
  once; at most max_vertical and max_slash lines per head (the first chosen ones by
  index). Reads T x (max_vertical + max_slash) keys per head, not T x S, through gathers
  that hold as many x D floats per head (callers split long chunks). The kernel is
  `vertical_slash.vertical_slash_attention`."""
  b, t, h, d = queries.shape
  k, s = keys.shape[1], keys.shape[2]
  g = h // k
  # The slot of every key position (per row and KV head), -1 where none.
  rows, kvs = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
  slot_of = jnp.full((b, k, s + 1), -1, jnp.int32).at[
      rows, kvs, jnp.where(key_positions >= 0, key_positions, s)].set(
          jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), key_positions.shape))[..., :s]
  slot_of = jnp.repeat(slot_of, g, axis=1)                                 # [B, H, S]
  head_keys = jnp.repeat(keys, g, axis=1).astype(jnp.float32)             # [B, H, S, D]
  head_values = jnp.repeat(values, g, axis=1).astype(jnp.float32)
  q = queries.astype(jnp.float32).transpose(0, 2, 1, 3)                    # [B, H, T, D]
  qpos = query_positions[:, None, :, None]                                 # [B, 1, T, 1]

  # Vertical lines: the same keys for every query.
  vchosen, vpos = lax.top_k(vertical.astype(jnp.float32), max_vertical)   # [B, H, nv]
  vslot = jnp.take_along_axis(slot_of, vpos, -1)
  vkeys = jnp.take_along_axis(head_keys, jnp.maximum(vslot, 0)[..., None], 2)
  vvals = jnp.take_along_axis(head_values, jnp.maximum(vslot, 0)[..., None], 2)
  vlogits = jnp.einsum("bhtd,bhnd->bhtn", q, vkeys, precision=_HI)
  vseen = ((vchosen > 0) & (vslot >= 0))[:, :, None, :] & (vpos[:, :, None, :] <= qpos)

  # Slash lines: key position = query position - offset, unless a vertical line has it.
  schosen, offset = lax.top_k(slash.astype(jnp.float32), max_slash)       # [B, H, ns]
  spos = qpos - offset[:, :, None, :]                                       # [B, H, T, ns]
  inside = (spos >= 0) & (qpos >= 0)
  spos = jnp.where(inside, spos, 0)
  sslot = jnp.take_along_axis(slot_of, spos.reshape(b, h, -1), -1).reshape(spos.shape)
  on_vertical = jnp.take_along_axis(vertical, spos.reshape(b, h, -1), -1).reshape(spos.shape)
  sseen = (schosen > 0)[:, :, None, :] & inside & (sslot >= 0) & ~on_vertical
  gather = lambda a: jnp.take_along_axis(
      a, jnp.maximum(sslot, 0).reshape(b, h, -1, 1), 2).reshape(b, h, t, -1, d)
  skeys, svals = gather(head_keys), gather(head_values)
  slogits = jnp.einsum("bhtd,bhtnd->bhtn", q, skeys, precision=_HI)

  logits = jnp.concatenate([vlogits, slogits], -1) * d ** -0.5
  seen = jnp.concatenate([jnp.broadcast_to(vseen, vlogits.shape), sseen], -1)
  logits = jnp.where(seen, logits, -jnp.inf)
  top = jnp.max(logits, -1, keepdims=True)
  weights = jnp.where(seen, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
  out = (jnp.einsum("bhtn,bhnd->bhtd", weights[..., :max_vertical], vvals,
                    precision=_HI)
         + jnp.einsum("bhtn,bhtnd->bhtd", weights[..., max_vertical:], svals,
                      precision=_HI))
  return out.transpose(0, 2, 1, 3).astype(queries.dtype)
