"""A device-resident page buffer for an offloaded paged (Quest) cache: the offload tier.

An offloaded `PagedLayerCache` keeps its keys and values in host memory and copies every
page a decode step selects to the device, every step. `BufferedPagedLayerCache` adds, per
row and KV head, `device_pages` (F) device frames of `page_size` slots that hold copies of
host pages, a page table (page -> frame, -1 when not resident) and per-frame metadata for
an eviction policy. A decode step's selected pages (its "requests") are served in a fixed
order, one at a time, exactly like a paging simulation (`kvjax.systems.paging`):

  request order: for each row and KV head, the pages of `selected_slots`, query head (or
  group, `gqa`) by query head, each one's pages in top_k order (decreasing logit bound,
  the newest page first). Rows and heads are independent.

A resident page is a hit (read from its frame). Otherwise it is a fault: the policy picks
a frame (an empty one first), the page is copied host -> device into it (one dynamic slice:
XLA reads host memory by slice, not by gather) and read. A page the step needs is copied
into the step's working keys and values as it is served, so a frame reused later in the
same step (F smaller than the step's requests) changes nothing that is read: the buffer
changes where bytes come from, never which tokens are attended.

Policies (jnp, inside the jitted step; victims are chosen per request):
- "lru": the frame with the oldest last use (a clock advanced once per request).
- "predictions" (Paging with Succinct Predictions, discard predictions): every step each
  page gets one bit "safe to evict", from a cheap heuristic predictor, NOT a trained one:
  a page is predicted safe when its logit bound for the current query (the max over the
  KV head's query heads) is not among the top `predict_rank` pages (the newest page never
  is). A fault evicts the least recently used frame whose page is predicted safe, and the
  least recently used frame when none is. Same-step rule: while a step is served, a page
  that the step still requests later (after the current request) is never treated as
  safe, whatever its bit: a bit describes the page after its reads of this step (the
  labels are the bit of its latest read up to the end of the step), so evicting it
  between two reads of one step would fault again at once. After the step's last read of
  a page (and during prefetch) its bit applies. Robust fallback: a fault on a page that was
  evicted as predicted-safe at most `regret_window` steps earlier is a regret; while a
  row and head has more than `tolerance` regrets it evicts by plain LRU; its regret count
  is halved every `regret_window` steps, so predictions get another chance. (The paper's
  robustification combines with marking; paging.robust_discard_predictions simulates both
  policies and follows the better; this counter is a cheaper stand-in in that spirit.)
- "learned": as "predictions", with the bits from a trained model instead of the
  heuristic: `kvjax.cache.page_predictor` (features of every page at the step, a tiny
  logistic-regression or one-hidden-layer model whose weights are static config;
  `BufferConfig.predictor`, default `page_predictor.TRAINED`, trained on real SmolLM2
  decodes by `kvjax.systems.page_predictor`). Same LRU fallback and regret counter.
- "hybrid" (LSM-GNN): a frame's score is w * prior[page] + (1 - w) * uses[page] /
  `recency_window`, with uses the page's requests among the last `recency_window` requests
  of its row and head; a fault evicts the lowest score (the least recently used among
  equal scores), as `paging.hybrid_lsm`. The static prior is fixed when the buffer is
  built: the page's bound for the worst-case unit query (the norm over channels of
  max(|key max|, |key min|)), ranked to [0, 1] within its row and head, with page 0 (the
  attention sinks) at 1; pages added during decoding get 0. A heuristic.
- A victim buffer (`victim_pages` V > 0, any policy; LSM-GNN's): V more device frames that
  take every evicted page (empty ones first, else the oldest entry falls out); a fault on
  a page found there is a victim hit, a device-to-device copy instead of a host read, and
  the page leaves the victim buffer, as in `paging.hybrid_lsm`.

Prefetch (`prefetch` P > 0): at the end of a decode step, up to P pages per row and head
that the next step is predicted to read and that are not resident are installed: the page
the next token will be written to, then the best pages by the current query's bounds
(max over query heads) among the top (requests + P), which are mostly those ranked just
after this step's reads; the policy picks their frames (with few frames a prefetch may
evict a page read this step: it is never wrong, only wasted). They are
counted apart from demand faults (`prefetches`), and a later hit on a prefetched page that
was not requested since counts as a `prefetch_hit`. What overlaps: nothing on CPU, where
XLA runs the copies inside the same program, synchronously; the prefetch copies have no
consumer until the next step, so a backend with asynchronous host-to-device transfers
(GPU, TPU) is free to overlap them with the following layers' compute, but this module
does not force or measure that.

Recording (`BufferConfig.record`, off by default: nothing is traced when off): every
buffered decode step hands the host its requests, page features and both kinds of bits
(heuristic, learned; as computed, before the same-step rule) through `jax.debug.callback`;
`recording()` collects them per layer (`kvjax.systems.page_predictor` turns them into
traces, labels and training data).

Consistency: appended tokens are written to host memory (the dense cache) and through to
their page's frame when it is resident; pages in the victim buffer that receive tokens are
dropped from it. Counters (int32, summed over rows and heads): hits, faults (host reads on
demand), victim_hits, prefetches, prefetch_hits, regrets, fallbacks (evictions decided by
the LRU fallback). The frames are device bytes and count in `nbytes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax import validation
from kvjax.cache import page_predictor
from kvjax.cache.kv_cache import NewTokens, Stats
from kvjax.cache.paged import DEVICE, PagedLayerCache, logit_bounds
from kvjax.errors import KvjaxError
from kvjax.ops import attention as attention_ops

POLICIES = ("lru", "predictions", "learned", "hybrid")
PREDICTED = ("predictions", "learned")   # the policies that evict by discard bits
INT_MAX = jnp.iinfo(jnp.int32).max


class BufferError(KvjaxError):
  """Invalid page-buffer settings."""


@dataclasses.dataclass(frozen=True)
class BufferConfig:
  """How a page buffer is sized and evicts (see the module docstring).

  device_pages: frames per row and KV head. policy: "lru", "predictions", "learned" or
  "hybrid".
  prefetch: pages prefetched per row and head at the end of a step. victim_pages: victim
  frames per row and head. predict_rank: "predictions" keeps the top `predict_rank` pages
  by bound predicted not-safe (None: the pages a step reads per query head). tolerance,
  regret_window: the LRU fallback. prior_weight: "hybrid"'s w. recency_window: "hybrid"'s
  requests of recent use (None: four steps' requests). predictor: "learned"'s model (a
  `page_predictor.PagePredictor`; None: the shipped `page_predictor.TRAINED`). record:
  hand every step's requests, features and bits to `recording()` (a debugging and
  data-collection switch; off costs nothing).
  """
  device_pages: int
  policy: str = "lru"
  prefetch: int = 0
  victim_pages: int = 0
  predict_rank: int | None = None
  tolerance: int = 2
  regret_window: int = 8
  prior_weight: float = 0.5
  recency_window: int | None = None
  predictor: page_predictor.PagePredictor | None = None
  record: bool = False

  def __post_init__(self):
    check = lambda name, low, what="": validation.integer(
        name, getattr(self, name), low, validation.INT32_MAX, error=BufferError, what=what)
    check("device_pages", 1, "device frames per row and KV head")
    validation.choice("policy", self.policy, POLICIES, error=BufferError)
    check("prefetch", 0, "pages prefetched per step, row and KV head")
    check("victim_pages", 0, "victim frames per row and KV head")
    if self.predict_rank is not None:
      check("predict_rank", 1, "pages predicted not safe to evict")
    check("tolerance", 0, "regretted evictions before the LRU fallback")
    check("regret_window", 1, "decode steps")
    validation.number("prior_weight", self.prior_weight, 0, 1, error=BufferError,
                      what="the static prior's share of the hybrid score")
    if self.recency_window is not None:
      check("recency_window", 1, "requests")
    if self.predictor is not None:
      if not isinstance(self.predictor, page_predictor.PagePredictor):
        raise BufferError(f"predictor={validation.show(self.predictor)} must be a "
                          "page_predictor.PagePredictor (or None: the trained default)")
      if self.policy != "learned":
        raise BufferError(f"predictor is used by policy='learned' only, got "
                          f"policy={self.policy!r}")
    validation.boolean("record", self.record, error=BufferError)

  def model(self) -> page_predictor.PagePredictor | None:
    """The learned policy's predictor (the trained default when none is given)."""
    if self.policy != "learned":
      return None
    return self.predictor or page_predictor.TRAINED


@struct.dataclass
class PageBuffer:
  """One layer's frames, page table, policy metadata and counters ([B, K, ...] leaves)."""
  keys: jax.Array            # [B, K, F * page_size, D] copies of host pages
  values: jax.Array          # [B, K, F * page_size, Dv]
  page_frame: jax.Array      # [B, K, P] int32 frame holding the page, -1 if none
  frame_page: jax.Array      # [B, K, F] int32 page in the frame, -1 if empty
  last_use: jax.Array        # [B, K, F] int32 clock of the last request (-1: empty)
  prefetched: jax.Array      # [B, K, F] bool installed by prefetch, not requested since
  clock: jax.Array           # int32: requests (and prefetches) served so far
  step: jax.Array            # int32: decode steps served so far
  counts: jax.Array          # int32 [7]: see COUNTERS
  safe: jax.Array | None = None          # [B, K, P] bool: the discard bits (predictions)
  evicted_safe: jax.Array | None = None  # [B, K, P] int32 step evicted as safe, -1 if not
  regrets: jax.Array | None = None       # [B, K] int32
  prior: jax.Array | None = None         # [B, K, P] float32 (hybrid)
  uses: jax.Array | None = None          # [B, K, P] int32 requests in the recency window
  recent: jax.Array | None = None        # [B, K, W] int32 ring of requested pages (-1)
  recent_at: jax.Array | None = None     # int32: the ring's next position
  victim_keys: jax.Array | None = None   # [B, K, V * page_size, D]
  victim_values: jax.Array | None = None
  victim_page: jax.Array | None = None   # [B, K, V] int32, -1 empty
  victim_stamp: jax.Array | None = None  # [B, K, V] int32 clock when it entered
  last_request: jax.Array | None = None  # [B, K, P] int32 step of the last read, -1 never
  frequency: jax.Array | None = None     # [B, K, P] float32 moving average of reads
  page_size: int = struct.field(pytree_node=False, default=16)
  policy: str = struct.field(pytree_node=False, default="lru")
  prefetch: int = struct.field(pytree_node=False, default=0)
  predict_rank: int = struct.field(pytree_node=False, default=1)
  tolerance: int = struct.field(pytree_node=False, default=2)
  regret_window: int = struct.field(pytree_node=False, default=8)
  prior_weight: float = struct.field(pytree_node=False, default=0.5)
  predictor: page_predictor.PagePredictor | None = struct.field(pytree_node=False,
                                                                default=None)
  record: bool = struct.field(pytree_node=False, default=False)
  tag: int = struct.field(pytree_node=False, default=0)   # the layer, for recording

  @property
  def features(self) -> bool:
    """Whether the buffer keeps the predictor's read history."""
    return self.last_request is not None

  @property
  def frames(self) -> int:
    return self.frame_page.shape[-1]

  @property
  def victims(self) -> int:
    return 0 if self.victim_page is None else self.victim_page.shape[-1]


COUNTERS = ("hits", "faults", "victim_hits", "prefetches", "prefetch_hits", "regrets",
            "fallbacks")
_HITS, _FAULTS, _VICTIM_HITS, _PREFETCHES, _PREFETCH_HITS, _REGRETS, _FALLBACKS = range(7)


def init_buffer(batch: int, kv_heads: int, num_pages: int, head_dim: int, value_dim: int,
                dtype, page_size: int, config: BufferConfig, requests_per_step: int,
                prior: jax.Array | None = None, pages_per_query: int | None = None,
                tag: int = 0) -> PageBuffer:
  """An empty buffer for a layer of `num_pages` pages per row and head. The defaults:
  predict_rank = `pages_per_query` (the pages one query head reads; else
  `requests_per_step`), recency_window = 4 * `requests_per_step`. `prior` [B, K, P]
  (hybrid) defaults to zeros. tag: names the layer in recordings (Quest: its index among
  the paged layers)."""
  b, k, p, f, v = batch, kv_heads, num_pages, config.device_pages, config.victim_pages
  zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
  full = lambda *shape: jnp.full(shape, -1, jnp.int32)
  extra = {}
  if config.policy in PREDICTED:
    extra = dict(safe=jnp.zeros((b, k, p), bool), evicted_safe=full(b, k, p),
                 regrets=zeros(b, k))
  if config.policy == "hybrid":
    window = config.recency_window or 4 * requests_per_step
    extra = dict(prior=(jnp.zeros((b, k, p), jnp.float32) if prior is None
                        else prior.astype(jnp.float32)),
                 uses=zeros(b, k, p), recent=full(b, k, window), recent_at=jnp.int32(0))
  if config.policy == "learned" or config.record:
    extra.update(last_request=full(b, k, p), frequency=jnp.zeros((b, k, p), jnp.float32))
  if v:
    extra.update(victim_keys=jnp.zeros((b, k, v * page_size, head_dim), dtype),
                 victim_values=jnp.zeros((b, k, v * page_size, value_dim), dtype),
                 victim_page=full(b, k, v), victim_stamp=full(b, k, v))
  return PageBuffer(
      keys=jnp.zeros((b, k, f * page_size, head_dim), dtype),
      values=jnp.zeros((b, k, f * page_size, value_dim), dtype),
      page_frame=full(b, k, p), frame_page=full(b, k, f), last_use=full(b, k, f),
      prefetched=jnp.zeros((b, k, f), bool), clock=jnp.int32(0), step=jnp.int32(0),
      counts=zeros(len(COUNTERS)), page_size=page_size, policy=config.policy,
      prefetch=config.prefetch,
      predict_rank=config.predict_rank or pages_per_query or requests_per_step, tolerance=config.tolerance,
      regret_window=config.regret_window, prior_weight=config.prior_weight,
      predictor=config.model(), record=config.record, tag=tag, **extra)


def counters(buf: PageBuffer) -> dict:
  """The counters as a dict of ints (host side)."""
  return dict(zip(COUNTERS, (int(c) for c in buf.counts)))


# ------------------------------------------------------------------ the policy


def _lexmin(primary: jax.Array, last_use: jax.Array) -> jax.Array:
  """The index with the smallest primary key, the least recently used among equals (then
  the lowest index)."""
  best = primary.min()
  return jnp.argmin(jnp.where(primary == best, last_use, INT_MAX))


def _victim(buf: PageBuffer, b, k, later=None):
  """(frame [], decided by the prediction [] bool, by the LRU fallback [] bool) the policy
  evicts in row b, head k (an empty frame first). later [R] int32 (-1 = none): the pages
  this step still requests after the current request; they are never safe."""
  pages = buf.frame_page[b, k]                                              # [F]
  last = buf.last_use[b, k]
  empty = pages < 0
  no = jnp.bool_(False)
  if buf.policy == "lru":
    return jnp.argmin(last), no, no
  page = jnp.maximum(pages, 0)
  if buf.policy in PREDICTED:
    fallback = buf.regrets[b, k] > buf.tolerance
    safe = buf.safe[b, k][page] & ~fallback
    if later is not None:   # the same-step rule: a page still to be read is kept
      safe = safe & ~(pages[:, None] == later[None, :]).any(-1)
    frame = _lexmin(jnp.where(empty, -1, jnp.where(safe, 0, 1)), last)
    full = ~empty[frame]
    return frame, full & safe[frame], full & fallback
  score = (buf.prior_weight * buf.prior[b, k][page]
           + (1 - buf.prior_weight) * buf.uses[b, k][page].astype(jnp.float32)
           / buf.recent.shape[-1])
  return _lexmin(jnp.where(empty, -jnp.inf, score), last), no, no


def _read(array, b, k, start, size):
  return jax.lax.dynamic_slice(array, (b, k, start, 0), (1, 1, size, array.shape[-1]))


def _host_read(array, b, k, start, size):
  return jax.device_put(_read(array, b, k, start, size), DEVICE)


def _write(array, piece, b, k, start):
  return jax.lax.dynamic_update_slice(array, piece.astype(array.dtype), (b, k, start, 0))


def _serve(buf: PageBuffer, host_keys, host_values, b, k, page, stamp, demand: bool,
           order=0, later=None):
  """Row b, head k asks for `page`: (buffer, keys, values [1, 1, page_size, D]). demand:
  a decode read (counts hits/faults, recency; `order`: its index in the step); else a
  prefetch install (the caller only asks for pages that are not resident). later [R]: the
  pages the step still requests after this one (-1 elsewhere; the same-step rule)."""
  ps = buf.page_size
  frame = buf.page_frame[b, k, page]
  hit = frame >= 0
  counts = buf.counts
  if demand and buf.policy == "hybrid":   # the request joins the recency window first
    at = (buf.recent_at + order) % buf.recent.shape[-1]
    old = buf.recent[b, k, at]
    uses = buf.uses.at[b, k, jnp.maximum(old, 0)].add(jnp.where(old >= 0, -1, 0))
    buf = buf.replace(uses=uses.at[b, k, page].add(1), recent=buf.recent.at[b, k, at].set(page))
  regret = jnp.bool_(False)
  if buf.policy in PREDICTED:   # a regret counts before this fault's victim is chosen
    since = buf.evicted_safe[b, k, page]
    regret = demand & ~hit & (since >= 0) & (buf.step - since <= buf.regret_window)
    buf = buf.replace(regrets=buf.regrets.at[b, k].add(regret))
  victim, by_prediction, by_fallback = _victim(buf, b, k, later)
  evicted = buf.frame_page[b, k, victim]
  if buf.victims:
    in_victims = buf.victim_page[b, k] == page
    from_victims = ~hit & in_victims.any()
    slot = jnp.argmax(in_victims)
  else:
    from_victims = jnp.bool_(False)
    slot = 0
  source = jnp.where(hit, 0, jnp.where(from_victims, 1, 2))
  branches = [lambda a, va, _: _read(a, b, k, frame * ps, ps),
              lambda a, va, _: _read(va, b, k, slot * ps, ps),
              lambda a, va, h: _host_read(h, b, k, page * ps, ps)]
  vk = buf.victim_keys if buf.victims else buf.keys
  vv = buf.victim_values if buf.victims else buf.values
  keys = jax.lax.switch(source, branches, buf.keys, vk, host_keys)
  values = jax.lax.switch(source, branches, buf.values, vv, host_values)
  fault = ~hit
  target = jnp.where(hit, frame, victim)
  replace = {}
  if buf.victims:   # the evicted page moves to the victim buffer; a victim hit leaves it
    vpage = buf.victim_page.at[b, k, slot].set(
        jnp.where(from_victims, -1, buf.victim_page[b, k, slot]))
    moving = fault & (evicted >= 0)
    into = _lexmin(jnp.where(vpage[b, k] < 0, -1, 0), buf.victim_stamp[b, k])
    old_k, old_v = _read(buf.keys, b, k, victim * ps, ps), _read(buf.values, b, k, victim * ps, ps)
    keep_k, keep_v = _read(buf.victim_keys, b, k, into * ps, ps), _read(
        buf.victim_values, b, k, into * ps, ps)
    replace.update(
        victim_keys=_write(buf.victim_keys, jnp.where(moving, old_k, keep_k), b, k, into * ps),
        victim_values=_write(buf.victim_values, jnp.where(moving, old_v, keep_v), b, k,
                             into * ps),
        victim_page=vpage.at[b, k, into].set(jnp.where(moving, evicted, vpage[b, k, into])),
        victim_stamp=buf.victim_stamp.at[b, k, into].set(
            jnp.where(moving, stamp, buf.victim_stamp[b, k, into])))
  page_frame = buf.page_frame.at[b, k, jnp.maximum(evicted, 0)].set(
      jnp.where(fault & (evicted >= 0), -1, buf.page_frame[b, k, jnp.maximum(evicted, 0)]))
  page_frame = page_frame.at[b, k, page].set(target)
  was_prefetched = buf.prefetched[b, k, target]
  if demand:
    counts = counts.at[_HITS].add(hit).at[_FAULTS].add(source == 2).at[
        _VICTIM_HITS].add(source == 1).at[_PREFETCH_HITS].add(hit & was_prefetched)
  else:
    counts = counts.at[_PREFETCHES].add(1)
  counts = counts.at[_FALLBACKS].add(fault & by_fallback)
  if buf.policy in PREDICTED:
    e = jnp.maximum(evicted, 0)
    evicted_safe = buf.evicted_safe.at[b, k, e].set(
        jnp.where(fault & by_prediction, buf.step, buf.evicted_safe[b, k, e]))
    replace.update(evicted_safe=evicted_safe.at[b, k, page].set(
        jnp.where(fault, -1, evicted_safe[b, k, page])))
    counts = counts.at[_REGRETS].add(regret)
  buf = buf.replace(
      keys=_write(buf.keys, keys, b, k, target * ps),
      values=_write(buf.values, values, b, k, target * ps),
      page_frame=page_frame, frame_page=buf.frame_page.at[b, k, target].set(page),
      last_use=buf.last_use.at[b, k, target].set(stamp),
      prefetched=buf.prefetched.at[b, k, target].set(not demand),
      counts=counts, **replace)
  return buf, keys, values


def _start_step(buf: PageBuffer, safe: jax.Array | None) -> PageBuffer:
  if buf.policy not in PREDICTED:
    return buf
  decay = (buf.step > 0) & (buf.step % buf.regret_window == 0)
  return buf.replace(safe=safe, regrets=jnp.where(decay, buf.regrets // 2, buf.regrets))


def serve_requests(buf: PageBuffer, host_keys, host_values, requests: jax.Array,
                   safe: jax.Array | None = None):
  """One decode step's demand reads: (buffer, keys, values [B, K, R * page_size, D]) for
  the pages requests [B, K, R] of keys/values [B, K, S, D] (host or device memory), served
  in order r = 0 .. R-1 per row and head. safe [B, K, P]: this step's discard bits
  ("predictions", "learned"). The step counter is not advanced (`end_step`)."""
  b, k, r = requests.shape
  ps = buf.page_size
  buf = _start_step(buf, safe)
  out_k = jnp.zeros((b, k, r * ps, host_keys.shape[-1]), host_keys.dtype)
  out_v = jnp.zeros((b, k, r * ps, host_values.shape[-1]), host_values.dtype)

  def body(i, carry):
    buf, out_k, out_v = carry
    row, head, j = i // (k * r), (i // r) % k, i % r
    later = None
    if buf.policy in PREDICTED:   # the pages this step still reads after request j
      later = jnp.where(jnp.arange(r) > j, requests[row, head], -1)
    buf, keys, values = _serve(buf, host_keys, host_values, row, head, requests[row, head, j],
                               buf.clock + j, demand=True, order=j, later=later)
    return buf, _write(out_k, keys, row, head, j * ps), _write(out_v, values, row, head, j * ps)

  buf, out_k, out_v = jax.lax.fori_loop(0, b * k * r, body, (buf, out_k, out_v))
  if buf.policy == "hybrid":
    buf = buf.replace(recent_at=buf.recent_at + r)
  return buf.replace(clock=buf.clock + r), out_k, out_v


def prefetch_pages(buf: PageBuffer, host_keys, host_values, candidates: jax.Array,
                   limit: int) -> PageBuffer:
  """Installs, per row and head, up to `limit` of the candidate pages [B, K, C] (in order;
  -1 = none) that are not resident."""
  if limit <= 0:
    return buf
  b, k, c = candidates.shape

  def body(i, carry):
    buf, done = carry
    row, head, j = i // (k * c), (i // c) % k, i % c
    page = candidates[row, head, j]
    go = (page >= 0) & (buf.page_frame[row, head, jnp.maximum(page, 0)] < 0) & (
        done[row, head] < limit)
    buf = jax.lax.cond(go, lambda buf: _serve(buf, host_keys, host_values, row, head, page,
                                              buf.clock + j, demand=False)[0],
                       lambda buf: buf, buf)
    return buf, done.at[row, head].add(go)

  buf, _ = jax.lax.fori_loop(0, b * k * c, body, (buf, jnp.zeros((b, k), jnp.int32)))
  return buf.replace(clock=buf.clock + c)


def end_step(buf: PageBuffer) -> PageBuffer:
  return buf.replace(step=buf.step + 1)


def write_through(buf: PageBuffer, start, new: NewTokens) -> PageBuffer:
  """Tokens appended at slots start .. start + T - 1 copied into their pages' frames where
  resident; victim-buffer copies of those pages dropped."""
  b, k, t, _ = new.keys.shape
  slots = start + jnp.arange(t)
  pages = slots // buf.page_size                                                # [T]
  frame = buf.page_frame[:, :, pages]                                           # [B, K, T]
  index = jnp.where(frame >= 0, frame * buf.page_size + slots % buf.page_size, buf.keys.shape[2])
  rows, heads = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
  put = lambda a, v: a.at[rows, heads, index].set(v.astype(a.dtype), mode="drop")
  buf = buf.replace(keys=put(buf.keys, new.keys), values=put(buf.values, new.values))
  if buf.victims:
    stale = (buf.victim_page[..., None] == pages).any(-1)
    buf = buf.replace(victim_page=jnp.where(stale, -1, buf.victim_page))
  return buf


def _pad_pages(buf: PageBuffer, more: int) -> PageBuffer:
  """`more` pages added at the end (decode room)."""
  if more == 0:
    return buf
  pad = lambda a, value: None if a is None else jnp.pad(
      a, [(0, 0), (0, 0), (0, more)], constant_values=value)
  return buf.replace(page_frame=pad(buf.page_frame, -1), safe=pad(buf.safe, False),
                     evicted_safe=pad(buf.evicted_safe, -1), prior=pad(buf.prior, 0.0),
                     uses=pad(buf.uses, 0), last_request=pad(buf.last_request, -1),
                     frequency=pad(buf.frequency, 0.0))


# ------------------------------------------------------------------ the layer cache


def static_prior(page_max: jax.Array, page_min: jax.Array) -> jax.Array:
  """[B, K, P] in [0, 1]: each page's bound for the worst-case unit query (norm of
  max(|max|, |min|) over channels) ranked within its row and head (empty pages lowest),
  page 0 (the sinks) at 1."""
  hi = jnp.where(jnp.isfinite(page_max), jnp.abs(page_max), 0.0)
  lo = jnp.where(jnp.isfinite(page_min), jnp.abs(page_min), 0.0)
  norm = jnp.sqrt((jnp.maximum(hi, lo) ** 2).sum(-1))
  p = norm.shape[-1]
  rank = jnp.argsort(jnp.argsort(norm, axis=-1, stable=True), axis=-1, stable=True)
  return (rank / max(p - 1, 1)).astype(jnp.float32).at[..., 0].set(1.0)


@struct.dataclass
class BufferedPagedLayerCache(PagedLayerCache):
  """An offloaded paged layer whose decode reads go through a device page buffer."""
  buffer: PageBuffer = None

  @classmethod
  def from_paged(cls, paged: PagedLayerCache, config: BufferConfig, groups: int = 1,
                 tag: int = 0) -> "BufferedPagedLayerCache":
    """Host side: `paged` (offloaded or not) with an empty buffer. groups: query heads per
    KV head (a step requests groups * pages pages per row and head when gqa="query").
    tag: names the layer in recordings (Quest: its index among the paged layers)."""
    if not isinstance(config, BufferConfig):
      raise BufferError(f"config={config!r:.80} must be a BufferConfig")
    validation.integer("groups", groups, 1, error=BufferError, what="query heads per KV head")
    validation.integer("tag", tag, 0, error=BufferError, what="the layer's name in recordings")
    if paged.reads is not None:   # frames and requests follow `pages`, the real count
      raise BufferError("a paged layer with rounded reads (`rounded_reads`) cannot be "
                        "buffered: buffer the layer before rounding, or not at all")
    d = paged.dense
    b, k, _, dim = d.keys.shape
    groups = groups if paged.gqa == "query" else 1
    prior = static_prior(paged.page_max, paged.page_min) if config.policy == "hybrid" else None
    fields = {f.name: getattr(paged, f.name) for f in dataclasses.fields(PagedLayerCache)}
    return cls(**fields, buffer=init_buffer(
        b, k, paged.page_max.shape[2], dim, d.values.shape[-1], d.keys.dtype,
        paged.page_size, config, paged.pages * groups, prior, paged.pages, tag))

  def logical_axes(self) -> dict:
    rows = ("batch", "kv_heads")
    axes = {name: rows for name in ("keys", "values", "page_frame", "frame_page",
                                    "last_use", "prefetched", "safe", "evicted_safe",
                                    "regrets", "prior", "uses", "recent", "victim_keys",
                                    "victim_values", "victim_page", "victim_stamp",
                                    "last_request", "frequency")}
    return {**super().logical_axes(), "buffer": axes}

  def attend(self, queries, query_positions, pending: NewTokens | None = None,
             want: frozenset = frozenset()):
    """Decode: the selected pages through the buffer; Stats.layer is the layer with its
    buffer stepped, which the policy keeps. Longer chunks: dense."""
    if queries.shape[1] != 1 or pending is not None or want:
      return super().attend(queries, query_positions, pending, want)
    if self.pages * self.page_size >= self.capacity:
      return super().attend(queries, query_positions)
    out, stepped = self.buffered_decode(queries, query_positions)
    return out, Stats(layer=stepped)

  def _page_bounds(self, queries) -> jax.Array:
    """[B, K, P] the current query's bound per page, max over the KV head's query heads
    (-inf for pages without tokens)."""
    return logit_bounds(queries, self.page_max, self.page_min).max(2)

  def buffered_decode(self, queries, query_positions):
    """(out [B, 1, H, D], the layer with its buffer stepped)."""
    d, ps, buf = self.dense, self.page_size, self.buffer
    b, k, _, dim = d.keys.shape
    slots = self.selected_slots(queries)                                      # [B, K, g, n]
    g, n = slots.shape[2], slots.shape[3]
    requests = (slots[..., ::ps] // ps).reshape(b, k, -1)
    scores = heuristic = safe = None
    newest = (d.end - 1) // ps
    if buf.policy in PREDICTED or buf.prefetch or buf.record:
      bounds = self._page_bounds(queries)
      scores = bounds.at[..., newest].set(jnp.inf)   # the newest page first
    if buf.policy == "predictions" or buf.record:
      rank = min(buf.predict_rank, scores.shape[-1])
      _, top = jax.lax.top_k(scores, rank)
      heuristic = jnp.ones(scores.shape, bool).at[
          jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], top].set(False)
      safe = heuristic
    if buf.features:
      last, freq = page_predictor.update_history(buf.last_request, buf.frequency, requests,
                                                 buf.step)
      features = page_predictor.page_features(bounds, newest, last, freq, buf.step)
      buf = buf.replace(last_request=last, frequency=freq)
      if buf.policy == "learned":
        safe = buf.predictor.bits(features)
      if buf.record:
        learned = safe if buf.policy == "learned" else jnp.zeros(scores.shape, bool)
        jax.debug.callback(functools.partial(_record, buf.tag), buf.step, requests,
                           features, heuristic, learned)
    buf, keys, values = serve_requests(buf, d.keys, d.values, requests, safe)
    if buf.prefetch:
      # The best-ranked pages not resident after this step's reads: mostly those ranked
      # just after the ones read (the next query resembles this one).
      limit = min(buf.prefetch, buf.frames)
      _, ranked = jax.lax.top_k(scores, min(requests.shape[-1] + limit, scores.shape[-1]))
      upcoming = d.end // ps
      nxt = jnp.where(upcoming < scores.shape[-1], upcoming, -1)
      candidates = jnp.concatenate(
          [jnp.broadcast_to(nxt, (b, k, 1)).astype(jnp.int32), ranked.astype(jnp.int32)],
          -1)
      buf = prefetch_pages(buf, d.keys, d.values, candidates, limit)
    buf = end_step(buf)
    take = lambda a: jnp.take_along_axis(a, slots.reshape(b, k, g * n), axis=2)
    positions = take(d.positions).reshape(b, k * g, n)
    keys = keys.reshape(b, k * g, n, dim)
    values = values.reshape(b, k * g, n, values.shape[-1])
    out, _ = attention_ops.decode(queries, keys, values, query_positions, positions,
                                  stored=False)
    return out, self.replace(buffer=buf)

  def append(self, new: NewTokens) -> "BufferedPagedLayerCache":
    start = self.dense.end
    appended = super().append(new)
    return appended.replace(buffer=write_through(self.buffer, start, new))

  def _extended(self, slots: int, extend) -> "BufferedPagedLayerCache":
    """Grown or reserved pages get their page-table entries too (not resident)."""
    grown = super()._extended(slots, extend)
    more = grown.page_max.shape[2] - self.page_max.shape[2]
    return grown.replace(buffer=_pad_pages(self.buffer, more))


def buffered(paged: PagedLayerCache, config: BufferConfig, groups: int = 1, tag: int = 0
             ) -> BufferedPagedLayerCache:
  """Host side: `paged` with a device page buffer (see the module docstring)."""
  return BufferedPagedLayerCache.from_paged(paged, config, groups, tag)


# ------------------------------------------------------------------ recording

_SINKS: list = []


def _record(tag, step, requests, features, heuristic, learned):
  if _SINKS:
    _SINKS[-1].setdefault(tag, []).append(
        (int(step), np.array(requests), np.array(features), np.array(heuristic),
         np.array(learned)))


@contextlib.contextmanager
def recording():   # not thread-safe: one recording process-wide at a time
  """Collects what buffers built with `BufferConfig(record=True)` hand over while the
  block runs: {layer tag: [(step, requests [B, K, R], features [B, K, P, F], heuristic
  bits [B, K, P], learned bits [B, K, P] (zeros unless policy "learned")), ...]} in the
  order the host received them (sort by step)."""
  sink: dict = {}
  _SINKS.append(sink)
  try:
    yield sink
  finally:
    jax.effects_barrier()
    _SINKS.remove(sink)


def buffer_counts(cache) -> dict:
  """Host side: every buffered layer's counters summed, plus `requests` (hits + faults +
  victim hits) and `fault_rate` (faults / requests)."""
  total = dict.fromkeys(COUNTERS, 0)
  for layer in getattr(cache, "layers", (cache,)):
    if isinstance(layer, BufferedPagedLayerCache):
      for name, value in counters(layer.buffer).items():
        total[name] += value
  requests = total["hits"] + total["faults"] + total["victim_hits"]
  return {**total, "requests": requests,
          "fault_rate": total["faults"] / requests if requests else 0.0}
