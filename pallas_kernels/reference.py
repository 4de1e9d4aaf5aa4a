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

from jax import lax
import jax.numpy as jnp

from pallas_kernels import quantization
from pallas_kernels.decode_attention import EMPTY_LSE

_HI = lax.Precision.HIGHEST
# Long query chunks are processed in blocks of this many queries: O(block * S) memory.
QUERY_BLOCK = 512


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


def grouped_attention(q, keys, values, seen, *, upcast=False):
  """The one attention everything here is made of.

  q [B, K, G, T, D]; keys/values [B, K, S, D] (one set per KV head) or [B, S, D] (one set
  shared by all heads, masked per head by `seen`: the head-wise flat layout); seen
  [B, K, G|1, T, S] bool. Returns (out [B, K, G, T, D] float32, lse [B, K, G, T],
  probs [B, K, G, T, S] float32).
  """
  d = q.shape[-1]
  kv = "bksd" if keys.ndim == 4 else "bsd"
  logits = _products(f"bkgtd,{kv}->bkgts", q, keys, upcast) * d ** -0.5
  probs, lse = _masked_softmax(logits, seen)
  dtype = jnp.float32 if upcast else values.dtype
  out = _products(f"bkgts,{kv}->bkgtd", probs.astype(dtype), values, upcast)
  return out, lse, probs


def group_heads(queries, num_kv_heads):
  """[B, T, H, D] -> [B, K, G, T, D]."""
  b, t, h, d = queries.shape
  return jnp.moveaxis(queries.reshape(b, t, num_kv_heads, h // num_kv_heads, d), 1, 3)


def ungroup_heads(out):
  """[B, K, G, T, D] -> [B, T, H, D]."""
  b, k, g, t, d = out.shape
  return jnp.moveaxis(out, 3, 1).reshape(b, t, k * g, d)


def attention(queries, keys, values, query_positions, key_positions, column_sums=False):
  """Causal attention by original positions (prefill and decode on CPU).

  queries [B, T, H, D]; keys/values [B, K, S, D]; query_positions [B, T];
  key_positions [B, K, S] (negative = empty slot). Long query chunks run in blocks of
  QUERY_BLOCK. With column_sums, also returns [B, H, S] float32: each key's attention
  probability summed over the (non-padding) queries.
  """
  t = queries.shape[1]
  if t <= QUERY_BLOCK or t % QUERY_BLOCK:
    out, sums = _attention_block(queries, keys, values, query_positions, key_positions)
    return (out, sums) if column_sums else out
  blocks = t // QUERY_BLOCK
  split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], blocks, QUERY_BLOCK, *x.shape[2:]), 1, 0)

  def block(carry, qp):
    out, sums = _attention_block(qp[0], keys, values, qp[1], key_positions)
    return carry + sums, out

  zero = jnp.zeros((queries.shape[0], queries.shape[2], keys.shape[2]), jnp.float32)
  sums, out = lax.scan(block, zero, (split(queries), split(query_positions)))
  out = jnp.moveaxis(out, 0, 1).reshape(queries.shape)
  return (out, sums) if column_sums else out


def _attention_block(queries, keys, values, query_positions, key_positions):
  k = keys.shape[1]
  seen = visible(query_positions[:, None, None, :], key_positions[:, :, None, :])
  out, _, probs = grouped_attention(group_heads(queries, k), keys, values, seen)
  b, _, g, t, s = probs.shape
  return (ungroup_heads(out).astype(queries.dtype),
          probs.sum(3).reshape(b, k * g, s))


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


def decode_attention(q, keys, values, key_positions, query_positions, *, upcast=True):
  """Reference of `decode_attention(..., return_probs=True)`: (out, lse, probs).

  q [B, K, G, D] (one query per row); keys/values [B, K, S, D]; positions as above.
  """
  seen = visible(query_positions[:, None, None, None], key_positions[:, :, None, :])
  out, lse, probs = grouped_attention(q[:, :, :, None], keys, values, seen, upcast=upcast)
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
                               upcast=True):
  """Reference of `quantized_decode_attention(..., return_probs=True)`: (out, lse, probs).

  Dequantizes the whole cache (keys grouped over tokens, values over channels) into q's
  dtype, as the kernel feeds its dots, then runs the dense decode attention above.
  """
  keys = quantization.dequantize(key_codes, key_scale, key_zero, bits=bits, group=group,
                                 axis="tokens", dtype=q.dtype)
  values = quantization.dequantize(value_codes, value_scale, value_zero, bits=bits,
                                   group=group, axis="channels", dtype=q.dtype)
  return decode_attention(q, keys, values, key_positions, query_positions, upcast=upcast)


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
