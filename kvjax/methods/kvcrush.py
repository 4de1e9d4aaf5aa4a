"""KVCrush: representatives of the tokens an eviction method drops, chosen by a binary
head-behaviour signature, kept beside the important tokens."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.methods import base, registry
from kvjax.methods.wrappers import Wrapper

ANCHORS = ("random", "zeros", "ones", "alternate", "mean")


def signature_bits(scores: jax.Array, valid: jax.Array) -> jax.Array:
  """[B, K, S] scores of every KV head -> [B, S, K] bool: token t is in the top half of
  head k's scores (among its valid slots; ties to the lower slot)."""
  ranked = jnp.where(valid, scores, -jnp.inf)
  order = jnp.argsort(-ranked, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)                          # [B, K, S]
  half = valid.sum(-1, keepdims=True) // 2
  return jnp.moveaxis((rank < half) & valid, 1, 2)


def anchor_bits(mode: str, bits: jax.Array, seed: int, candidates: jax.Array) -> jax.Array:
  """[B, K] bool anchor signature for [B, S, K] token signatures; "mean" takes each head's
  majority bit over the row's candidate tokens (candidates [B, S]: tokens some head would
  drop)."""
  b, _, k = bits.shape
  if mode == "random":
    return jnp.broadcast_to(jax.random.bernoulli(jax.random.key(seed), 0.5, (k,)), (b, k))
  if mode == "zeros":
    return jnp.zeros((b, k), bool)
  if mode == "ones":
    return jnp.ones((b, k), bool)
  if mode == "alternate":
    return jnp.broadcast_to(jnp.arange(k) % 2 == 0, (b, k))
  count = jnp.maximum(candidates.sum(1, keepdims=True), 1)
  return (bits & candidates[..., None]).sum(1) * 2 >= count    # "mean": the majority


def representatives(distance: jax.Array, candidate: jax.Array, count: int) -> jax.Array:
  """[B, K, S] bool: of each head's candidate slots sorted by (distance, slot), the ones at
  ranks floor(i * n / count), i < count (n candidates): one per bucket, uniform stride."""
  s = distance.shape[-1]
  key = jnp.where(candidate, distance * s + jnp.arange(s), jnp.iinfo(jnp.int32).max)
  order = jnp.argsort(key, axis=-1)
  n = candidate.sum(-1, keepdims=True)                                     # [B, K, 1]
  picks = (jnp.arange(count) * n) // count                                 # [B, K, count]
  picked = jnp.take_along_axis(order, jnp.minimum(picks, s - 1), axis=-1)
  ok = picks < n        # fewer candidates than buckets: each candidate once
  b, k = distance.shape[:2]
  rows, heads = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
  return jnp.zeros(distance.shape, bool).at[rows, heads, jnp.where(ok, picked, s)].set(
      True, mode="drop")


@registry.register
@dataclasses.dataclass(frozen=True)
class KVCrush(Wrapper):
  """KVCrush (Jha et al., 2025): the press keeps the best (1 - `share`) of each KV head's
  budget; the rest of the budget goes to representatives of the tokens it would drop. Each
  token's signature has one bit per KV head (1 = in the top half of that head's press
  scores, OpenVINO's rule); the dropped tokens of a head are sorted by the Hamming distance
  of their signature to an anchor signature and cut into `share x budget` buckets, one
  representative per bucket (uniform stride), so the kept set spans different attention
  patterns, not only the top scores.

  The paper's representatives come on top of the base budget; here they are carved out of
  it (`share`, kvjax's default 0.1) so the cache stays at the budget like every method.
  GQA: scores per KV head, signature bits over KV heads (the paper's token-level form).
  anchor: "random" (seeded by `seed`, OpenVINO's default), "zeros", "ones", "alternate",
  "mean" (per head the majority bit over the tokens some head would drop). The press selects once at prefill: decode-time and
  head-wise presses are refused.
  """
  name: ClassVar[str] = "kvcrush"
  share: float = 0.1
  anchor: str = "random"
  seed: int = 0

  def __post_init__(self):
    super().__post_init__()
    base.check_prefill_press("kvcrush", self.press)
    base.check_number("share", self.share, 0, 1, high_open=True,
                      what="the fraction of the budget given to representatives")
    base.check_choice("anchor", self.anchor, ANCHORS)
    base.check_int("seed", self.seed, 0)

  def traces_budget(self, keep):
    return False   # its tiers are cut on the host (`crushed`)

  def crushed(self, keep: int) -> int:
    """Slots per head given to representatives (the press keeps at least its protected
    tokens plus one)."""
    room = keep - self.press.protected_tokens(keep) - 1
    return max(0, min(int(self.share * keep), room))

  def score(self, x):
    """Tiers of the budget `x.keep`: 2 for the press's top (budget - representatives),
    1 for the representatives, 0 for the rest (the press's protected slots are +inf
    through `protected`, empty slots -inf through `base.priorities`)."""
    keep = x.keep
    if keep is None:
      raise base.MethodError("kvcrush scores a budget: call it through base.priorities")
    press_prio = base.priorities(self.press, x, keep)
    crushed = self.crushed(keep)
    _, top = jax.lax.top_k(press_prio, keep - crushed)
    b, k, s = press_prio.shape
    rows, heads = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
    important = jnp.zeros((b, k, s), bool).at[rows, heads, top].set(True)
    valid = x.key_positions >= 0
    bits = signature_bits(self.press.score(x), valid)                     # [B, S, K]
    anchor = anchor_bits(self.anchor, bits, self.seed,
                         (valid & ~important).any(1))                     # [B, K]
    distance = (bits != anchor[:, None, :]).sum(-1).astype(jnp.int32)    # [B, S]
    distance = jnp.broadcast_to(distance[:, None, :], (b, k, s))
    reps = representatives(distance, valid & ~important, crushed)
    return jnp.where(important, 2.0, jnp.where(reps, 1.0, 0.0))
