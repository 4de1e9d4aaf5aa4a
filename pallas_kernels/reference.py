"""Pure-jnp references for the Pallas kernels (readable, materialise everything).

Same conventions as the kernels: scale `D ** -0.5`, float32 softmax, a slot is visible iff
`0 <= key_position <= query_position`, query head `k*G + g` reads KV head `k`, and a query
that sees no slot gets output 0, lse `EMPTY_LSE` and probabilities 0.
"""

from jax import lax
import jax.numpy as jnp

from pallas_kernels.decode_attention import EMPTY_LSE

_HI = lax.Precision.HIGHEST


def _masked_softmax(logits, visible):
  """(probs, lse) of `logits` over the visible entries of the last axis."""
  masked = jnp.where(visible, logits, -jnp.inf)
  m = jnp.max(masked, axis=-1, keepdims=True)
  seen = jnp.isfinite(m)
  m = jnp.where(seen, m, 0.0)
  e = jnp.where(visible, jnp.exp(masked - m), 0.0)
  total = jnp.sum(e, axis=-1, keepdims=True)
  probs = e / jnp.where(seen, total, 1.0)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), EMPTY_LSE)[..., 0]
  return probs, lse


def decode_attention(q, keys, values, key_positions, query_positions):
  """Reference of `decode_attention(..., return_probs=True)`: (out, lse, probs)."""
  d = q.shape[-1]
  logits = jnp.einsum("bkgd,bksd->bkgs", q.astype(jnp.float32), keys.astype(jnp.float32),
                      precision=_HI) * d ** -0.5
  kpos = key_positions[:, :, None, :]
  qpos = query_positions[:, None, None, None]
  visible = (kpos >= 0) & (kpos <= qpos)
  probs, lse = _masked_softmax(logits, visible)
  out = jnp.einsum("bkgs,bksd->bkgd", probs, values.astype(jnp.float32), precision=_HI)
  return out.astype(q.dtype), lse, probs


def decode_attention_flat(q, keys, values, key_positions, key_heads, query_positions):
  """Reference of `decode_attention_flat(..., return_probs=True)`: (out, lse, probs)."""
  d = q.shape[-1]
  k = q.shape[1]
  logits = jnp.einsum("bkgd,bnd->bkgn", q.astype(jnp.float32), keys.astype(jnp.float32),
                      precision=_HI) * d ** -0.5
  kpos = key_positions[:, None, None, :]
  qpos = query_positions[:, None, None, None]
  owner = key_heads[:, None, None, :] == jnp.arange(k)[None, :, None, None]
  visible = owner & (kpos >= 0) & (kpos <= qpos)
  probs, lse = _masked_softmax(logits, visible)
  out = jnp.einsum("bkgn,bnd->bkgd", probs, values.astype(jnp.float32), precision=_HI)
  return out.astype(q.dtype), lse, probs


def window_attention(q, keys, key_positions, query_positions):
  """The [B, H, W, S] observation-window attention matrix the kernel never writes."""
  b, h, w, d = q.shape
  k = keys.shape[1]
  g = h // k
  qg = q.reshape(b, k, g, w, d).astype(jnp.float32)
  logits = jnp.einsum("bkgwd,bksd->bkgws", qg, keys.astype(jnp.float32),
                      precision=_HI) * d ** -0.5
  kpos = key_positions[:, :, None, None, :]
  qpos = query_positions[:, None, None, :, None]
  visible = (kpos >= 0) & (kpos <= qpos)
  probs, _ = _masked_softmax(logits, visible)
  return probs.reshape(b, h, w, -1)


def pool_scores(sums, *, pooling="max", kernel_size=7):
  """1-D pooling of [..., S] along S (stride 1, centred, padding kernel_size // 2)."""
  if pooling == "none":
    return sums
  r = kernel_size // 2
  dims = (1,) * (sums.ndim - 1) + (kernel_size,)
  pads = ((0, 0),) * (sums.ndim - 1) + ((r, r),)
  if pooling == "max":
    return lax.reduce_window(sums, -jnp.inf, lax.max, dims, (1,) * sums.ndim, pads)
  # avg: zero padding counted, like torch avg_pool1d(count_include_pad=True).
  return lax.reduce_window(sums, 0.0, lax.add, dims, (1,) * sums.ndim, pads) / kernel_size


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
