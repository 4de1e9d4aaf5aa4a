"""Random layer inputs and slow numpy restatements of the compression methods.

Everything here is float64 numpy written from the algorithms' descriptions (DESIGN.md,
shared/reference/methods_*.md); only the inputs are handed to kvjax.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from tiny import tiny_config

H, K, D = 4, 2, 16
G = H // K


@dataclasses.dataclass
class Prefill:
  """One layer's one-shot prefill: S == T, rows left-padded to S."""
  raw_q: np.ndarray   # [B, T, H, D] float64 (values exactly representable in float32)
  q: np.ndarray       # [B, T, H, D]
  qpos: np.ndarray    # [B, T] int32, -1 for padding
  k: np.ndarray       # [B, K, S, D]
  v: np.ndarray       # [B, K, S, D]
  kpos: np.ndarray    # [B, K, S] int32
  lengths: np.ndarray  # [B] int32


def f32(x: np.ndarray) -> np.ndarray:
  """Rounds to float32 and back, so numpy and kvjax see the same numbers."""
  return np.asarray(x, np.float32).astype(np.float64)


def rope_np(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
  """Rotate-half RoPE of x [B, T, heads, D] at positions [B, T] (padding at 0)."""
  angles = np.maximum(positions, 0)[..., None] * inv_freq.astype(np.float64)
  cos = np.concatenate([np.cos(angles)] * 2, -1)[:, :, None, :]
  sin = np.concatenate([np.sin(angles)] * 2, -1)[:, :, None, :]
  half = x.shape[-1] // 2
  rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
  return x * cos + rotated * sin


def random_prefill(seed: int, lengths=(48, 33), s: int = 48, q_scale: float = 1.5,
                   q_mean: float = 0.0) -> Prefill:
  """Random queries, keys and values; row b has lengths[b] real tokens, right-aligned."""
  rng = np.random.default_rng(seed)
  b = len(lengths)
  qpos = np.full((b, s), -1, np.int32)
  for row, n in enumerate(lengths):
    qpos[row, s - n:] = np.arange(n)
  raw_q = f32(rng.normal(size=(b, s, H, D)) * q_scale + q_mean)
  inv_freq = np.asarray(1.0 / (10000.0 ** (np.arange(0, D, 2) / D)), np.float64)
  q = f32(rope_np(raw_q, qpos, inv_freq))
  k = f32(rng.normal(size=(b, K, s, D)))
  v = f32(rng.normal(size=(b, K, s, D)))
  kpos = np.broadcast_to(qpos[:, None, :], (b, K, s)).astype(np.int32)
  return Prefill(raw_q=raw_q, q=q, qpos=qpos, k=k, v=v, kpos=kpos,
                 lengths=np.asarray(lengths, np.int32))


def config(**overrides):
  return tiny_config(num_heads=H, num_kv_heads=K, head_dim=D, **overrides)


def layer_arrays(data: Prefill, column_sums=None, slot_state=None) -> dict:
  """The array fields of a `kvjax.methods.base.LayerInputs` (float32, int32, uint32).

  slot_state: a method's per-slot state of the candidates (float -> float32, integer
  history -> uint32), or None for new slots.
  """
  as32 = lambda a: jnp.asarray(np.asarray(a, np.float32))
  if slot_state is not None:
    slot_state = (jnp.asarray(np.asarray(slot_state, np.uint32))
                  if np.issubdtype(np.asarray(slot_state).dtype, np.integer) else as32(slot_state))
  return dict(
      queries=as32(data.q), raw_queries=as32(data.raw_q), query_positions=jnp.asarray(data.qpos),
      keys=as32(data.k), values=as32(data.v), key_positions=jnp.asarray(data.kpos),
      lengths=jnp.asarray(data.lengths),
      column_sums=None if column_sums is None else as32(column_sums),
      slot_state=slot_state)


# ----------------------------------------------------------------------------- attention


def attention(q, k, qpos, kpos) -> np.ndarray:
  """[B, H, T, S] causal softmax probabilities, scale D**-0.5; padding queries give zeros.

  q [B, T, H, D]; k [B, K, S, D]; qpos [B, T]; kpos [B, K, S]. A key is visible to a query
  iff 0 <= key position <= query position. Query head h reads KV head h // G.
  """
  b, t, h, d = q.shape
  s = k.shape[2]
  out = np.zeros((b, h, t, s))
  for row in range(b):
    for head in range(h):
      kv = head // (h // k.shape[1])
      for i in range(t):
        seen = (kpos[row, kv] >= 0) & (kpos[row, kv] <= qpos[row, i])
        if not seen.any():
          continue
        logits = k[row, kv] @ q[row, i, head] / np.sqrt(d)
        logits = np.where(seen, logits, -np.inf)
        p = np.exp(logits - logits[seen].max())
        out[row, head, i] = p / p.sum()
  return out


def column_sums(data: Prefill) -> np.ndarray:
  """[B, H, S] H2O statistic: attention summed over the chunk's (non-padding) queries."""
  return attention(data.q, data.k, data.qpos, data.kpos).sum(2)


def group(x: np.ndarray, how: str) -> np.ndarray:
  """[B, H, S] -> [B, K, S] over each KV head's query heads."""
  grouped = x.reshape(x.shape[0], K, G, *x.shape[2:])
  return {"mean": grouped.mean, "max": grouped.max, "sum": grouped.sum}[how](2)


# ----------------------------------------------------------------------------- selection


def priorities(score, protected, kpos) -> np.ndarray:
  prio = np.where(protected, np.inf, np.asarray(score, np.float64))
  return np.where(kpos >= 0, prio, -np.inf)


def top(values: np.ndarray, n: int) -> np.ndarray:
  """Indices of the n largest values, ties to the lower index (as lax.top_k)."""
  order = np.lexsort((np.arange(len(values)), -values))
  return order[:n]


def select(prio: np.ndarray, keep: int) -> np.ndarray:
  """[B, K, keep] kept slot indices per head, in slot order."""
  b, k, s = prio.shape
  return np.stack([np.stack([np.sort(top(prio[r, h], keep)) for h in range(k)])
                   for r in range(b)])


def assert_separated(prio: np.ndarray, keep: int, rtol: float = 1e-5) -> None:
  """Precondition: the last kept and the first dropped finite priorities are not a near-tie.

  Guards against float32-vs-float64 flips so a failure means a real difference. Exact ties
  (max pooling repeats one value over neighbours) are fine: both sides break them by index.
  """
  for row in prio.reshape(-1, prio.shape[-1]):
    ordered = row[top(row, len(row))]
    if keep < len(row) and np.isfinite(ordered[keep - 1]) and np.isfinite(ordered[keep]):
      scale = np.abs(ordered[np.isfinite(ordered)]).max()
      gap = ordered[keep - 1] - ordered[keep]
      assert gap == 0 or gap > rtol * scale, f"near-tie at the budget ({gap}); change the seed"


def popcount(x) -> np.ndarray:
  x = np.asarray(x, np.uint64)
  return np.vectorize(lambda v: bin(int(v)).count("1"), otypes=[np.int64])(x)


# ----------------------------------------------------------------------------- methods


def window_protected(data: Prefill, window: int) -> np.ndarray:
  return (data.kpos >= 0) & (data.kpos >= data.lengths[:, None, None] - window)


def sinks_protected(kpos: np.ndarray, sinks: int) -> np.ndarray:
  return (kpos >= 0) & (kpos < sinks)


def streaming_llm(data: Prefill, keep: int, sinks: int) -> np.ndarray:
  del keep
  return priorities(data.kpos.astype(np.float64), sinks_protected(data.kpos, sinks), data.kpos)


def h2o(data: Prefill, keep: int, recent_ratio: float, sums: np.ndarray,
        slot_scores=None) -> np.ndarray:
  score = group(sums, "sum") + (0 if slot_scores is None else slot_scores)
  recent = int(round(keep * recent_ratio))
  return priorities(score, window_protected(data, recent), data.kpos)


def tova(data: Prefill) -> np.ndarray:
  last = attention(data.q[:, -1:], data.k, data.qpos[:, -1:], data.kpos)[:, :, 0]  # [B, H, S]
  score = np.broadcast_to(last.mean(1, keepdims=True), data.kpos.shape)
  return priorities(score, window_protected(data, 1), data.kpos)


def knorm(data: Prefill) -> np.ndarray:
  score = -np.sqrt((data.k ** 2).sum(-1))
  return priorities(score, np.zeros(data.kpos.shape, bool), data.kpos)


def pool(x: np.ndarray, kernel_size: int, pooling: str) -> np.ndarray:
  """Centred stride-1 pooling along the last axis ("avg" divides by kernel_size)."""
  if pooling == "none" or kernel_size == 1:
    return x
  pad = kernel_size // 2
  out = np.empty_like(x)
  n = x.shape[-1]
  for j in range(n):
    piece = x[..., max(0, j - pad):min(n, j + pad + 1)]
    out[..., j] = piece.max(-1) if pooling == "max" else piece.sum(-1) / kernel_size
  return out


def snapkv_scores(data: Prefill, window: int, kernel_size: int, pooling: str,
                  gqa: str) -> np.ndarray:
  """[B, K, S] SnapKV votes (before protection)."""
  w = min(window, data.q.shape[1])
  probs = attention(data.q[:, -w:], data.k, data.qpos[:, -w:], data.kpos)  # [B, H, w, S]
  votes = probs.sum(2)
  in_window = np.repeat(window_protected(data, window), G, axis=1)
  votes = np.where(in_window, 0.0, votes)
  return group(pool(votes, kernel_size, pooling), gqa)


def snapkv(data: Prefill, keep: int, window: int, kernel_size: int, pooling: str,
           gqa: str) -> np.ndarray:
  del keep
  return priorities(snapkv_scores(data, window, kernel_size, pooling, gqa),
                    window_protected(data, window), data.kpos)


def average_rotation(inv_freq: np.ndarray, start: int, count: int) -> np.ndarray:
  """[D, D] mean over p in [start, start + count) of diag(cos_p) + diag(sin_p) P."""
  half = len(inv_freq)
  p_mat = np.zeros((2 * half, 2 * half))
  p_mat[:half, half:] = -np.eye(half)
  p_mat[half:, :half] = np.eye(half)
  total = np.zeros((2 * half, 2 * half))
  for p in range(start, start + count):
    angles = p * inv_freq.astype(np.float64)
    cos = np.concatenate([np.cos(angles)] * 2)
    sin = np.concatenate([np.sin(angles)] * 2)
    total += np.diag(cos) + np.diag(sin) @ p_mat
  return total / count


def expected_attention(data: Prefill, keep: int, inv_freq: np.ndarray, n_future: int,
                       n_sink: int, use_covariance: bool, use_vnorm: bool,
                       epsilon: float) -> np.ndarray:
  del keep
  b, t, h, d = data.raw_q.shape
  s = data.k.shape[2]
  score = np.zeros((b, K, s))
  for row in range(b):
    rot = average_rotation(inv_freq, int(data.lengths[row]), n_future)
    rows = data.qpos[row] >= n_sink
    per_head = np.zeros((h, s))
    for head in range(h):
      kv = head // G
      queries = data.raw_q[row, rows, head]                     # [n, D]
      mu = queries.mean(0)
      centred = queries - mu
      sigma = centred.T @ centred / len(queries)
      mu_r = rot @ mu
      sigma_r = rot @ sigma @ rot.T
      keys = data.k[row, kv]
      z = keys @ mu_r / np.sqrt(d)
      if use_covariance:
        z = z + np.einsum("si,ij,sj->s", keys, sigma_r, keys) / (2 * d)
      cand = data.kpos[row, kv] >= n_sink
      e = np.where(cand, np.exp(z - z[cand].max()), 0.0)
      per_head[head] = e / e.sum()
    for kv in range(K):
      score[row, kv] = per_head[kv * G:(kv + 1) * G].mean(0)
  if use_vnorm:
    score = (score + epsilon) * np.sqrt((data.v ** 2).sum(-1))
  return priorities(score, sinks_protected(data.kpos, n_sink), data.kpos)


def scissorhands_history(data: Prefill, history_window: int) -> np.ndarray:
  """[B, K, S] uint32 history bits from the last min(w, T) query rows, oldest = highest."""
  b, t = data.qpos.shape
  s = data.k.shape[2]
  rows = min(history_window, t)
  probs = attention(data.q[:, -rows:], data.k, data.qpos[:, -rows:], data.kpos)
  history = np.zeros((b, K, s), np.uint64)
  for row in range(b):
    for kv in range(K):
      for i in range(rows):
        qp = data.qpos[row, t - rows + i]
        seen = (data.kpos[row, kv] >= 0) & (data.kpos[row, kv] <= qp)
        if not seen.any():
          continue
        mean = probs[row, kv * G:(kv + 1) * G, i].mean(0)
        low = seen & (mean < 1.0 / seen.sum())
        history[row, kv] |= low.astype(np.uint64) << np.uint64(rows - 1 - i)
  return (history & np.uint64((1 << history_window) - 1)).astype(np.uint32)


def scissorhands(data: Prefill, keep: int, history_window: int, recent: int,
                 sinks: int) -> np.ndarray:
  del keep
  score = -popcount(scissorhands_history(data, history_window)).astype(np.float64)
  protected = window_protected(data, recent) | sinks_protected(data.kpos, sinks)
  return priorities(score, protected, data.kpos)


def adakv_select(prio: np.ndarray, keep: int, safeguard: int) -> list[list[np.ndarray]]:
  """Per row and head, the kept slot indices (slot order) of AdaKV's layer-wide top-k."""
  b, k, s = prio.shape
  out = []
  for row in range(b):
    p = prio[row].copy()
    for head in range(k):
      if safeguard:
        p[head, top(p[head], safeguard)] = np.inf
    chosen = top(p.reshape(-1), k * keep)
    out.append([np.sort(chosen[chosen // s == head] % s) for head in range(k)])
  return out


def pyramid_formula(num_layers: int, keep: int, window: int, context_length: int,
                    beta: float) -> np.ndarray | None:
  """PyramidKV (methods_B.md section 15) layer budgets as real numbers, window included.

  None where the reference uses a uniform budget (context shorter than 2 b).
  """
  b = keep - window
  if context_length < 2 * b:
    return None
  low = b / beta
  high = 2 * b - low
  if high >= context_length - window:
    high = context_length - window
    low = 2 * b - high
  return high - np.arange(num_layers) * (high - low) / (num_layers - 1) + window


# ----------------------------------------------------------------------------- decode


def decode_probs(q_new, keys, kpos, new_key, new_pos):
  """The new query's attention over the cache slots and itself.

  q_new [B, H, D]; keys [B, K, C, D]; kpos [B, K, C]; new_key [B, K, D]; new_pos [B].
  Returns (probs [B, H, C], own [B, H]).
  """
  b, h, d = q_new.shape
  c = keys.shape[2]
  probs = np.zeros((b, h, c))
  own = np.zeros((b, h))
  for row in range(b):
    for head in range(h):
      kv = head // G
      seen = (kpos[row, kv] >= 0) & (kpos[row, kv] <= new_pos[row])
      logits = np.where(seen, keys[row, kv] @ q_new[row, head] / np.sqrt(d), -np.inf)
      mine = new_key[row, kv] @ q_new[row, head] / np.sqrt(d)
      top_logit = max(logits.max(), mine)
      e = np.where(seen, np.exp(logits - top_logit), 0.0)
      e_own = np.exp(mine - top_logit)
      probs[row, head] = e / (e.sum() + e_own)
      own[row, head] = e_own / (e.sum() + e_own)
  return probs, own


def kvcrush(data: Prefill, keep: int, share: float, anchor, press_prio: np.ndarray,
            press_scores: np.ndarray, press_protected: int) -> np.ndarray:
  """KVCrush priorities: +inf where the press protects, 2 for the press's top
  (keep - representatives), 1 for one representative per bucket of the other tokens sorted
  by (Hamming distance of their signature to `anchor`, slot), 0 otherwise, -inf if empty.
  Signature bit k of a token: it is in the top half of KV head k's press scores.
  anchor: [K] bool, or "mean" (per head the majority bit over the tokens some head drops)."""
  crushed = max(0, min(int(share * keep), keep - press_protected - 1))
  b, k, s = press_prio.shape
  bits = np.zeros((b, s, k), bool)
  for row in range(b):
    for kv in range(k):
      valid = np.flatnonzero(data.kpos[row, kv] >= 0)
      ranked = valid[np.lexsort((valid, -press_scores[row, kv, valid]))]
      bits[row, ranked[:len(valid) // 2], kv] = True
  tiers = np.zeros((b, k, s))
  for row in range(b):
    important = [set(top(press_prio[row, kv], keep - crushed).tolist()) for kv in range(k)]
    if isinstance(anchor, str):   # "mean": per head, the majority over dropped tokens
      dropped = [t for t in range(s) if any(data.kpos[row, kv, t] >= 0 and t not in important[kv]
                                            for kv in range(k))]
      a = np.array([2 * sum(bits[row, t, kv] for t in dropped) >= max(len(dropped), 1)
                    for kv in range(k)])
    else:
      a = np.asarray(anchor)
    distance = (bits[row] != a).sum(-1)
    for kv in range(k):
      important_kv = important[kv]
      cands = [i for i in range(s) if data.kpos[row, kv, i] >= 0 and i not in important_kv]
      cands.sort(key=lambda i: (distance[i], i))
      n = len(cands)
      reps = {cands[(i * n) // crushed] for i in range(crushed) if (i * n) // crushed < n}
      tiers[row, kv, list(important_kv)] = 2
      tiers[row, kv, list(reps)] = 1
  tiers = np.where(np.isposinf(press_prio), np.inf, tiers)
  return np.where(data.kpos >= 0, tiers, -np.inf)
