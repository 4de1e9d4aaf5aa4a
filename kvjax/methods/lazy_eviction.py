"""LazyEviction: lagged, recurrence-aware eviction for long decoding (arXiv 2506.15969).

Zhang et al., "LazyEviction: Lagged KV Eviction with Attention Pattern Observation for
Efficient Long Reasoning". In long chains of thought many tokens regain attention after long
quiet gaps ("Token Importance Recurrence"). The method tracks, per cached token, when it was
last important and the longest gap it has shown between two important steps (its maximum
recurrence interval, MRI), and evicts lazily, once per observation window, removing first
the tokens that have stayed quiet for longer than their MRI.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.methods import base, registry
from kvjax.methods.window import window_votes


@registry.register
@dataclasses.dataclass(frozen=True)
class LazyEviction(base.Method):
  """Recurrence-interval eviction, decided once per observation window of `window` steps.

  What could be checked against the paper (abstract and introduction of arXiv 2506.15969
  v1/v3): two parts, "recurrence interval tracking" and an "MRI-centric eviction policy",
  inside an observation-window-based lagged eviction. The paper's exact importance
  threshold, priority formula and default window could not be read (neither its method
  section nor the code it links, github.com/Halo-949/LazyEviction, was available), so this
  is one stated reading:

  Clock: positions. `lengths` (tokens seen, the new one included) gives the step; the query
  of a step sits at position t = lengths - 1. Per slot the state is three int32 values:
    last  position of the slot's last activation (0 = none yet),
    mri   its maximum recurrence interval (0 = none yet),
    rank  its eviction rank frozen at the last window boundary, plus 1 (0 = unranked).
  A token's own position counts as its first activation (t_last = max(last, position)), so
  a fresh slot's all-zero state (kvjax's default for new slots) means "born, never attended".

  1. Activation: at each step a slot is activated when its attention, aggregated over the
     KV head's query heads (`gqa`: mean or max), is at least `threshold` / n, n the tokens
     the query sees (threshold=1: above uniform attention, Scissorhands' criterion of
     importance). An activation at step t sets mri = max(mri, t - t_last), then last = t.
  2. Expected recurrence: e = t_last + mri. A token is "finished" when t - t_last > mri,
     i.e. e < t, and it is overdue by t - e. Ranking by e ascending evicts finished tokens
     first, the most overdue first, then tokens still inside their gap, the one closest to
     the end of its gap first. Ties go to the lowest slot.
  3. Lagged eviction: at each window boundary (lengths % window == 0, and at the end of
     prefill) every slot's e is frozen as its rank, except the `recent` newest tokens, which
     are still under observation and stay unranked. Between boundaries the ranking does not
     change: the slots overwritten over the next `window` steps are exactly the `window`
     lowest ranks of that boundary, in order, which is the paper's batch eviction of W
     tokens at the boundary. Tokens that arrive during the window are unranked until the
     next boundary, so each is observed for at least one window before it can go.
     Unranked slots are only overwritten when no ranked slot is left (a budget smaller than
     recent + window); among them the live e decides. Boundaries follow the position clock,
     so the window after the prompt may be shorter than W.

  How it sits in kvjax's decode contract (one slot overwritten per step, the cache at its
  budget B): the paper's cache grows from B' to B' + W within a window and drops back to B'
  at the boundary. Here the budget is the paper's peak, B = B' + W: at a boundary the W
  tokens the paper removes are chosen from the same B tokens on the same statistics, but
  they stay in the cache (and are attended to) until the next W new tokens overwrite them
  one by one, instead of disappearing at once. Peak memory is therefore B = B' + W, the
  paper's peak. The `recent` newest tokens are always kept (kvjax's `protected`).

  Prefill: SnapKV (the notes say LazyEviction composes with SnapKV for the prompt): the last
  `recent` prompt queries vote (`window_votes`, kernel_size and pooling as kvjax's SnapKV
  defaults) and the `recent` newest tokens are kept. The kept slots' state is what those same
  queries show: the activation rule above applied to each of them in order, then a boundary
  ranking, which the first decode window evicts by.

  Defaults (none verifiable from the paper): threshold=1.0 (above uniform), window=32,
  recent=32 (SnapKV's default observation window), kernel_size=7 and pooling="max" (kvjax's
  SnapKV defaults), gqa="mean". Positions are held in float32 priorities exactly up to 2**24,
  so priorities are exact for contexts of up to four million tokens.
  """
  name: ClassVar[str] = "lazy_eviction"
  layerwise_prefill: ClassVar[bool] = True
  decode_time: ClassVar[bool] = True
  threshold: float = 1.0
  window: int = 32
  recent: int = 32
  kernel_size: int = 7
  pooling: str = "max"
  gqa: str = "mean"

  def __post_init__(self):
    base.check_number("threshold", self.threshold, 0,
                      what="the attention, as a multiple of uniform attention, at which a "
                           "token counts as activated")
    base.check_int("window", self.window, 1)
    base.check_int("recent", self.recent, 1)
    base.check_int("kernel_size", self.kernel_size, 1)
    if self.kernel_size % 2 == 0:
      raise base.MethodError(f"kernel_size={self.kernel_size} must be odd (centred pooling)")
    base.check_choice("pooling", self.pooling, ("max", "avg", "none"))
    # A sum over query heads would compare G heads' attention with one head's uniform share.
    base.check_choice("gqa", self.gqa, ("mean", "max"))

  # Protection.
  def protected_tokens(self, keep):
    return self.recent

  def fitted(self, keep):
    """Under a budget of at most `recent`, the recent window shrinks to budget - 1 (at
    least 1), so one slot is left to the scores."""
    shrunk = base.shrink_protection(keep, recent=(self.recent, 1))
    return dataclasses.replace(self, **shrunk) if shrunk else self

  def protected(self, key_positions, lengths, keep):
    return base.window_mask(key_positions, lengths, self.recent)

  # State.
  def init_state(self, shape):
    zero = jnp.zeros(shape, jnp.int32)
    return {"last": zero, "mri": zero, "rank": zero}

  def _activated(self, grouped, seen, count):
    """Attention at least threshold / (tokens seen) marks a seen slot as activated."""
    share = self.threshold / jnp.maximum(count, 1).astype(jnp.float32)
    return seen & (grouped >= share)

  def _ranks(self, last, mri, key_positions, lengths):
    """Boundary ranks: expected next recurrence + 1; the recent window and empty slots 0."""
    expected = jnp.maximum(last, key_positions) + mri
    observing = base.window_mask(key_positions, lengths, self.recent) | (key_positions < 0)
    return jnp.where(observing, 0, expected + 1).astype(jnp.int32)

  # Prefill.
  def score(self, x):
    return window_votes(x, self.recent, self.kernel_size, self.pooling, self.gqa)

  def prefill_state(self, x):
    rows = min(self.recent, x.queries.shape[1])
    probs = base.window_attention(x, rows)                        # [B, H, R, S]
    b, h, r, s = probs.shape
    k = x.keys.shape[1]
    grouped = probs.reshape(b, k, h // k, r, s)
    grouped = grouped.mean(2) if self.gqa == "mean" else grouped.max(2)  # [B, K, R, S]
    kpos = x.key_positions[:, :, None, :]
    qpos = x.query_positions[:, -rows:][:, None, :, None]         # [B, 1, R, 1]
    seen = (kpos >= 0) & (kpos <= qpos)                           # padding rows see nothing
    active = self._activated(grouped, seen, seen.sum(-1, keepdims=True))
    old = x.slot_state if x.slot_state is not None else self.init_state(x.key_positions.shape)
    # The queries in order, vectorised: each activation's gap is measured from the latest
    # earlier one (or from the slot's last activation / birth before this chunk).
    times = jnp.where(active, qpos, -1)
    upto = jax.lax.cummax(times, axis=2)
    before = jnp.concatenate([jnp.full_like(upto[:, :, :1], -1), upto[:, :, :-1]], axis=2)
    previous = jnp.maximum(before, jnp.maximum(old["last"], x.key_positions)[:, :, None])
    gaps = jnp.where(active, qpos - previous, 0)
    mri = jnp.maximum(old["mri"], gaps.max(2))
    last = jnp.maximum(old["last"], upto[:, :, -1])
    # The end of prefill is a window boundary: the first decode window evicts by this ranking.
    return {"last": last, "mri": mri,
            "rank": self._ranks(last, mri, x.key_positions, x.lengths)}

  # Decode.
  def decode_scores(self, state, probs, own_prob, key_positions, lengths):
    k = key_positions.shape[1]
    valid = key_positions >= 0
    t = (lengths - 1)[:, None, None]
    count = valid.sum(-1, keepdims=True) + 1                      # the cache and the new token
    active = self._activated(base.reduce_groups(probs, k, self.gqa), valid, count)
    born_or_last = jnp.maximum(state["last"], key_positions)
    mri = jnp.where(active, jnp.maximum(state["mri"], t - born_or_last), state["mri"])
    last = jnp.where(active, t, state["last"])
    boundary = (lengths % self.window == 0)[:, None, None]
    rank = jnp.where(boundary, self._ranks(last, mri, key_positions, lengths), state["rank"])
    new_shape = key_positions.shape[:2]
    new = {"last": jnp.broadcast_to(t[..., 0], new_shape).astype(jnp.int32),
           "mri": jnp.zeros(new_shape, jnp.int32), "rank": jnp.zeros(new_shape, jnp.int32)}
    return {"last": last.astype(jnp.int32), "mri": mri.astype(jnp.int32), "rank": rank}, new

  def eviction_priority(self, state, probs, key_positions, lengths, budget):
    # Ranked slots by their frozen rank; unranked ones after every ranked one (a rank is at
    # most 2 t, t < lengths), by their live expected recurrence.
    live = jnp.maximum(state["last"], key_positions) + state["mri"]
    after_ranked = 2 * lengths[:, None, None] + 1
    prio = jnp.where(state["rank"] > 0, state["rank"] - 1, after_ranked + live)
    return prio.astype(jnp.float32)
