"""Eviction policies for an offload tier of KV-cache pages, simulated on request traces.

A trace is the sequence of pages a decode loop reads (for page-sparse attention: the pages
the selector picks at each step, flattened). The fast tier (device memory) holds `k`
pages; a request for a page that is not there is a miss and the page is fetched. Every
policy here is a function of the trace (and a seed where it draws) returning a
`PagingResult`; nothing is kept between calls.

Policies:
- `belady`: the offline optimum (evict the page requested furthest in the future, FitF).
- `lru`, `marker`: the classical online policies (LRU is k-competitive, Sleator and
  Tarjan 1985; randomized marking 2H_k-competitive in expectation, Fiat et al. 1991).
- `follow_discard_predictions`, `robust_discard_predictions`: learning-augmented paging
  with one predicted bit per request, "discard predictions" of Antoniadis, Boyar, Eliáš,
  Favrholdt, Hoeksma, Larsen, Polak and Simon, "Paging with Succinct Predictions",
  ICML 2023 (arXiv 2210.02775).
- `hybrid_lsm`: LSM-GNN's hybrid eviction (a static importance prior mixed with recent
  use) with a victim buffer that serves recently evicted pages cheaply.
- `persistence_bits`, `selection_requests`: a cheap decode-time predictor of the discard
  bit (Scissorhands-style persistence: a page the selector has skipped often lately is
  safe to evict) and the trace-plus-bits it yields.

Prediction errors are counted per kind of wrong bit, as the paper's (alpha, beta, gamma)
bounds (cost <= alpha OPT + beta eta0 + gamma eta1) need: eta0 counts requests predicted
0 ("keep") whose page FitF does evict before its next request, eta1 counts requests
predicted 1 ("safe to evict") whose page FitF keeps.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Hashable, Mapping, Sequence

import numpy as np

from kvjax import validation
from kvjax.errors import KvjaxError


class PagingError(KvjaxError):
  """Invalid arguments to a paging policy (capacity, bits, weights, windows)."""


@dataclasses.dataclass(frozen=True)
class PagingResult:
  """What a policy did on one trace.

  faults: misses served from the backing store. hits: requests found in the fast tier.
  evictions: (request index, page) for every page pushed out of the fast tier, in order.
  victim_hits: misses served from the victim buffer instead (only `hybrid_lsm` has one).
  """
  faults: int
  hits: int
  evictions: tuple = ()
  victim_hits: int = 0

  @property
  def misses(self) -> int:
    """Requests the fast tier could not serve."""
    return self.faults + self.victim_hits

  def cost(self, victim_cost: float = 0.0) -> float:
    """Transfer cost with a backing-store fetch costing 1 and a victim-buffer fetch
    `victim_cost` (host-to-device copies are much cheaper than storage reads)."""
    return self.faults + victim_cost * self.victim_hits


# ------------------------------------------------------------------ validation


def _check_capacity(k) -> int:
  return validation.integer("k", k, 1, error=PagingError, what="pages the fast tier holds")


def _check_bits(bits, trace: Sequence) -> tuple:
  bits = tuple(bits)
  if len(bits) != len(trace):
    raise PagingError(
        f"need one predicted bit per request: {len(trace)} requests but {len(bits)} bits")
  for t, b in enumerate(bits):
    if isinstance(b, (bool, np.bool_)) or b in (0, 1):
      continue
    raise PagingError(f"predicted bits must be 0 or 1, got {b!r} at request {t}")
  return tuple(int(b) for b in bits)


def _check_count(name: str, value, low: int) -> int:
  return validation.integer(name, value, low, error=PagingError)


# ------------------------------------------------------------------ the offline optimum


def next_uses(trace: Sequence) -> list:
  """For each request, the index of the same page's next request (len(trace) if none)."""
  upcoming: dict = {}
  out = [0] * len(trace)
  for t in range(len(trace) - 1, -1, -1):
    out[t] = upcoming.get(trace[t], len(trace))
    upcoming[trace[t]] = t
  return out


def _furthest_in_future(trace: Sequence, k: int):
  """Runs FitF; yields (t, fault, evicted page or None) per request."""
  next_use = next_uses(trace)
  cache: dict = {}                   # page -> index of its next request
  for t, page in enumerate(trace):
    fault, victim = page not in cache, None
    if fault and len(cache) == k:
      victim = max(cache, key=cache.__getitem__)   # ties only among never-again pages
      del cache[victim]
    cache[page] = next_use[t]
    yield t, fault, victim


def belady(trace: Sequence[Hashable], k: int) -> PagingResult:
  """Belady's offline optimum: on a fault evict the page whose next request is furthest
  away (never-again pages first). Its fault count is OPT for a cache of `k` pages."""
  k = _check_capacity(k)
  faults, evictions = 0, []
  for t, fault, victim in _furthest_in_future(trace, k):
    faults += fault
    if victim is not None:
      evictions.append((t, victim))
  return PagingResult(faults=faults, hits=len(trace) - faults, evictions=tuple(evictions))


def belady_discard_bits(trace: Sequence[Hashable], k: int) -> tuple:
  """The perfect discard prediction per request: 1 iff FitF evicts this page before it is
  requested again, or the page is never requested again.

  Never-again pages get 1 (nothing is lost by evicting them). With that convention the
  bits do not depend on how FitF breaks ties: it only ties among never-again pages, and
  which of those it drops changes nothing for the pages still to be requested.
  """
  k = _check_capacity(k)
  next_use = next_uses(trace)
  bits = [int(nu == len(trace)) for nu in next_use]
  last_request: dict = {}
  for t, _, victim in _furthest_in_future(trace, k):
    last_request[trace[t]] = t
    if victim is not None:
      bits[last_request[victim]] = 1
  return tuple(bits)


def prediction_errors(bits: Sequence[int], true_bits: Sequence[int]) -> tuple:
  """(eta0, eta1): requests predicted 0 whose true bit is 1, and predicted 1 whose true
  bit is 0 (the two error counts of the paper's (alpha, beta, gamma)-competitiveness)."""
  if len(bits) != len(true_bits):
    raise PagingError(f"bits and true_bits must have the same length, got {len(bits)} "
                      f"and {len(true_bits)}")
  bits, true_bits = _check_bits(bits, true_bits), _check_bits(true_bits, bits)
  eta0 = sum(b == 0 and c == 1 for b, c in zip(bits, true_bits))
  eta1 = sum(b == 1 and c == 0 for b, c in zip(bits, true_bits))
  return eta0, eta1


# ------------------------------------------------------------------ online policies
# Each policy is a small state machine stepped one request at a time, so the robust
# combination can run two of them side by side and read their caches. `request` returns
# (fault, evicted page or None); `cache` is the set of resident pages.


class _Lru:

  def __init__(self, k: int):
    self.k, self.cache = k, collections.OrderedDict()   # least recently used first

  def request(self, page, bit):
    del bit
    if page in self.cache:
      self.cache.move_to_end(page)
      return False, None
    victim = None
    if len(self.cache) == self.k:
      victim, _ = self.cache.popitem(last=False)
    self.cache[page] = None
    return True, victim


class _Marker:
  """Randomized marking: a page is marked when requested; a fault evicts a uniformly
  random unmarked page; when every resident page is marked a new phase unmarks them."""

  def __init__(self, k: int, seed: int):
    self.k, self.cache, self.marked = k, {}, set()
    self.rng = np.random.default_rng(seed)

  def request(self, page, bit):
    del bit
    if page in self.cache:
      self.marked.add(page)
      return False, None
    victim = None
    if len(self.cache) == self.k:
      unmarked = [p for p in self.cache if p not in self.marked]
      if not unmarked:                 # phase over
        self.marked.clear()
        unmarked = list(self.cache)
      victim = unmarked[int(self.rng.integers(len(unmarked)))]
      del self.cache[victim]
    self.cache[page] = None
    self.marked.add(page)
    return True, victim


class _DiscardFollower:
  """Follows discard predictions (see `follow_discard_predictions`)."""

  def __init__(self, k: int):
    self.k = k
    self.cache = collections.OrderedDict()   # page -> evictable flag, least recent first

  def request(self, page, bit):
    if page in self.cache:
      self.cache[page] = bit
      self.cache.move_to_end(page)
      return False, None
    victim = None
    if len(self.cache) == self.k:
      if not any(self.cache.values()):
        # Every resident page is predicted "keep", yet one must go: at least one of those
        # predictions is wrong, so all of them stop being trusted.
        for p in self.cache:
          self.cache[p] = 1
      victim = next(p for p, evictable in self.cache.items() if evictable)
      del self.cache[victim]
    self.cache[page] = bit
    return True, victim


class _Combined:
  """Follows one of two simulated policies lazily and switches with hysteresis.

  Our cache only changes on our own faults, evicting a page the followed policy does not
  hold (least recently used first), so while following X we fault at most as often as X
  plus the pages we hold and X does not (at most k, paid only after a switch). We switch
  when the followed policy's total faults exceed the other's by more than `margin`.
  """

  def __init__(self, first, second, k: int, margin: int):
    self.policies, self.k, self.margin = (first, second), k, margin
    self.costs, self.following = [0, 0], 0
    self.cache = collections.OrderedDict()

  def request(self, page, bit):
    for i, policy in enumerate(self.policies):
      self.costs[i] += policy.request(page, bit)[0]
    fault, victim = page not in self.cache, None
    if not fault:
      self.cache.move_to_end(page)
    else:
      if len(self.cache) == self.k:
        followed = self.policies[self.following].cache
        victim = next(p for p in self.cache if p not in followed)
        del self.cache[victim]
      self.cache[page] = None
    other = 1 - self.following
    if self.costs[self.following] - self.costs[other] > self.margin:
      self.following = other
    return fault, victim


def _run(policy, trace: Sequence, bits: Sequence) -> PagingResult:
  faults, evictions = 0, []
  for t, (page, bit) in enumerate(zip(trace, bits)):
    fault, victim = policy.request(page, bit)
    faults += fault
    if victim is not None:
      evictions.append((t, victim))
  return PagingResult(faults=faults, hits=len(trace) - faults, evictions=tuple(evictions))


def lru(trace: Sequence[Hashable], k: int) -> PagingResult:
  """Least recently used."""
  return _run(_Lru(_check_capacity(k)), trace, [0] * len(trace))


def marker(trace: Sequence[Hashable], k: int, seed: int = 0) -> PagingResult:
  """Randomized marking (Fiat et al. 1991): E[faults] <= 2 H_k OPT. Deterministic given
  `seed`."""
  return _run(_Marker(_check_capacity(k), seed), trace, [0] * len(trace))


def follow_discard_predictions(trace: Sequence[Hashable], bits: Sequence[int],
                               k: int) -> PagingResult:
  """An algorithm for the discard predictions of Paging with Succinct Predictions.

  Reconstructed from the paper's stated guarantee (its text was not at hand): the bound
  below is proved here and tested, but the rule may differ from the paper's algorithm.

  `bits[t]` predicts whether request t's page is safe to evict: whether FitF evicts it
  before its next request (`belady_discard_bits` gives the perfect bits). Each resident
  page carries the bit of its latest request. On a fault with a full cache we evict a page
  whose bit is 1; when every resident page says 0 (some prediction must be wrong, since
  FitF's cache would then hold all of them and the requested page), every resident bit is
  reset to 1 first. Among evictable pages the least recently used goes (the guarantee
  holds for any choice).

  Guarantee, (1, k-1, 1)-competitiveness: faults <= OPT + (k-1) eta0 + eta1, with
  (eta0, eta1) = `prediction_errors(bits, belady_discard_bits(trace, k))`. With perfect
  bits it pays exactly OPT. Why: every fault on a page evicted with a true 1 is also a
  FitF fault, every wrong 1 costs at most one fault, and each reset is charged to a
  distinct wrong 0 and frees at most k-1 pages FitF would have kept. Not robust alone:
  bad bits can make it fault on nearly every request (`robust_discard_predictions`).
  """
  k = _check_capacity(k)
  return _run(_DiscardFollower(k), trace, _check_bits(bits, trace))


def robust_discard_predictions(trace: Sequence[Hashable], bits: Sequence[int], k: int,
                               seed: int = 0, margin: int | None = None,
                               fallback: str = "marker") -> PagingResult:
  """`follow_discard_predictions` made robust by combination with randomized marking.

  The combiner is ours (a lazy follow-the-better switch), not the paper's robustification,
  which keeps its consistency at 1; this one's is a constant factor.

  Both policies are simulated on the trace; we follow the predictions first and switch
  to the other policy whenever the followed one's fault count exceeds the other's by more
  than `margin` (default k). With A, B the two policies' fault counts:

      faults <= (2 + k / (margin + 1)) * min(A, B) + 2 * margin + k + 1

  (following X lazily costs X's faults plus at most k per switch; the final policy is at
  most `margin` behind the better one; each switch comes after one of them fell 2(margin+1)
  behind, so there are at most min(A, B)/(margin + 1) + 1 switches). With
  E[marker] <= 2 H_k OPT this is O(log k)-competitive whatever the bits, and with
  A <= OPT + (k-1) eta0 + eta1 it keeps the paper's consistency and smoothness up to the
  constant factor. `fallback="lru"` combines with LRU instead (deterministic, k-competitive).
  """
  k = _check_capacity(k)
  bits = _check_bits(bits, trace)
  margin = k if margin is None else _check_count("margin", margin, 0)
  if fallback == "marker":
    other = _Marker(k, seed)
  elif fallback == "lru":
    other = _Lru(k)
  else:
    raise PagingError(f"fallback must be 'marker' or 'lru', got {fallback!r}")
  return _run(_Combined(_DiscardFollower(k), other, k, margin), trace, bits)


# ------------------------------------------------------------------ LSM-GNN hybrid


def hybrid_lsm(trace: Sequence[int], k: int, static_importance, weight: float,
               victim_capacity: int, window: int = 64) -> PagingResult:
  """LSM-GNN-style hybrid eviction with a victim buffer.

  A page's score mixes a static prior fixed at prefill (sink pages, high-score pages)
  with its recent use: weight * static_importance[page] + (1 - weight) * (requests of the
  page among the last `window` requests) / window. Both terms lie in [0, 1] when the prior
  does. A fault evicts the resident page with the lowest score (the least recently used
  among equals). Evicted pages go to a host-side ring buffer of `victim_capacity` pages
  (the oldest falls out); a miss on a page still there is a victim hit, a cheap
  host-to-device copy instead of a backing-store fetch, and the page leaves the buffer.
  With `victim_capacity=0` this is the plain hybrid policy.
  """
  k = _check_capacity(k)
  victim_capacity = _check_count("victim_capacity", victim_capacity, 0)
  window = _check_count("window", window, 1)
  weight = validation.number("weight", weight, 0, 1, error=PagingError,
                             what="the static prior's share of the score")
  prior = _check_importance(static_importance, trace)

  device = collections.OrderedDict()          # least recently used first
  victims = collections.deque(maxlen=victim_capacity)
  recent, counts = collections.deque(), collections.Counter()
  faults = victim_hits = 0
  evictions = []
  score = lambda p: weight * prior[p] + (1.0 - weight) * counts[p] / window
  for t, page in enumerate(trace):
    recent.append(page)
    counts[page] += 1
    if len(recent) > window:
      counts[recent.popleft()] -= 1
    if page in device:
      device.move_to_end(page)
      continue
    if page in victims:
      victims.remove(page)
      victim_hits += 1
    else:
      faults += 1
    if len(device) == k:
      victim = min(device, key=score)
      del device[victim]
      evictions.append((t, victim))
      victims.append(victim)
    device[page] = None
  return PagingResult(faults=faults, hits=len(trace) - faults - victim_hits,
                      evictions=tuple(evictions), victim_hits=victim_hits)


def _check_importance(static_importance, trace: Sequence) -> dict:
  """The prior of every page in the trace (a mapping, or a sequence indexed by page id),
  checked finite and >= 0."""
  is_mapping = isinstance(static_importance, Mapping)
  prior = {}
  for page in dict.fromkeys(trace):
    if is_mapping:
      known = page in static_importance
    else:   # a negative id would silently read from the end of a list
      known = (not isinstance(page, bool) and isinstance(page, (int, np.integer))
               and 0 <= page < len(static_importance))
    if not known:
      raise PagingError(f"static_importance has no entry for page {page!r}")
    value = static_importance[page]
    try:
      value = float(value)
    except (TypeError, ValueError):
      raise PagingError(
          f"static_importance must be numbers, got {value!r} for page {page!r}") from None
    if not math.isfinite(value) or value < 0:
      raise PagingError(
          f"static_importance must be finite and >= 0, got {value!r} for page {page!r}")
    prior[page] = value
  return prior


# ------------------------------------------------------------------ decode-time predictor


def persistence_bits(history: Sequence[set], num_pages: int, window: int,
                     min_unselected: int) -> np.ndarray:
  """The 1-bit "safe to evict" prediction per page from the selector's recent choices.

  `history[s]` is the set of pages the sparse-attention selector read at decode step s.
  A page is predicted safe (1) when it was left out of at least `min_unselected` of the
  last `window` steps: importance persists (Scissorhands), so a page skipped often lately
  will likely be skipped again. Fewer than `window` steps of history count as they are.
  """
  num_pages = _check_count("num_pages", num_pages, 0)
  window = _check_count("window", window, 1)
  min_unselected = _check_count("min_unselected", min_unselected, 1)
  if min_unselected > window:
    raise PagingError(
        f"min_unselected must be <= window ({window}), got {min_unselected}")
  selected = np.zeros(num_pages, np.int64)
  recent = history[max(0, len(history) - window):]
  for step in recent:
    for page in step:
      if not 0 <= page < num_pages:
        raise PagingError(f"selected page {page!r} is outside [0, {num_pages})")
      selected[page] += 1
  return ((len(recent) - selected) >= min_unselected).astype(np.int8)


def selection_requests(history: Sequence[set], window: int,
                       min_unselected: int) -> tuple:
  """(trace, bits): the selector's reads as a paging trace (each step's pages in
  ascending order) with every request's bit from `persistence_bits` over the history up
  to and including that step, i.e. what is known when the page is read. A page read at
  step s was selected at s, so a 1 needs `min_unselected <= window - 1`."""
  window = _check_count("window", window, 1)
  min_unselected = _check_count("min_unselected", min_unselected, 1)
  if min_unselected > window:
    raise PagingError(
        f"min_unselected must be <= window ({window}), got {min_unselected}")
  trace, bits = [], []
  for s, step in enumerate(history):
    recent = history[max(0, s + 1 - window):s + 1]
    for page in sorted(step):
      unselected = sum(page not in other for other in recent)
      trace.append(page)
      bits.append(int(unselected >= min_unselected))
  return tuple(trace), tuple(bits)
