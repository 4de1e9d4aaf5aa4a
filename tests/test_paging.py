"""Paging policies for an offload tier (kvjax/systems/paging.py) against plain, slow
restatements written here, hand-worked traces, and the guarantees of "Paging with
Succinct Predictions" (Antoniadis et al., ICML 2023) and of randomized marking."""

import functools
import math

import numpy as np
import pytest

from kvjax.systems import paging


def _random_trace(rng, length, num_pages):
  return rng.integers(0, num_pages, length).tolist()


def _harmonic(n):
  return sum(1.0 / i for i in range(1, n + 1))


# ------------------------------------------------------------------ slow restatements


def _opt_exhaustive(trace, k):
  """The fewest faults over every possible eviction choice (tiny traces only)."""

  @functools.lru_cache(maxsize=None)
  def best(t, cache):
    if t == len(trace):
      return 0
    page = trace[t]
    if page in cache:
      return best(t + 1, cache)
    if len(cache) < k:
      return 1 + best(t + 1, cache | {page})
    return 1 + min(best(t + 1, (cache - {q}) | {page}) for q in cache)

  return best(0, frozenset())


def _fitf_slow(trace, k):
  """Furthest-in-future, scanning ahead for every resident page. Returns the fault flag
  of every request."""
  cache, faults = [], []
  for t, page in enumerate(trace):
    faults.append(page not in cache)
    if page in cache:
      continue
    if len(cache) == k:
      def next_request(q):
        later = [u for u in range(t + 1, len(trace)) if trace[u] == q]
        return later[0] if later else math.inf
      distances = [next_request(q) for q in cache]
      cache.remove(cache[distances.index(max(distances))])
    cache.append(page)
  return faults


def _true_bits_slow(trace, k):
  """A request's page is safe to evict iff it is never requested again or FitF (which only
  loads on demand) faults on its next request, i.e. evicted it in between."""
  faults = _fitf_slow(trace, k)
  bits = []
  for t, page in enumerate(trace):
    later = [u for u in range(t + 1, len(trace)) if trace[u] == page]
    bits.append(1 if not later or faults[later[0]] else 0)
  return bits


def _errors(bits, true_bits):
  eta0 = sum(1 for b, c in zip(bits, true_bits) if b == 0 and c == 1)
  eta1 = sum(1 for b, c in zip(bits, true_bits) if b == 1 and c == 0)
  return eta0, eta1


def _lru_step(cache, page, k):
  """`cache` lists pages least recently used first. Returns 1 on a fault."""
  if page in cache:
    cache.remove(page)
    cache.append(page)
    return 0
  if len(cache) == k:
    cache.pop(0)
  cache.append(page)
  return 1


def _lru_slow(trace, k):
  cache = []
  return sum(_lru_step(cache, page, k) for page in trace)


def _follow_step(cache, page, bit, k):
  """`cache` lists [page, evictable] least recently used first. On a fault with a full
  cache: evict the least recent evictable page; if none is evictable, make all evictable
  first. Returns (fault, evicted page or None)."""
  for entry in cache:
    if entry[0] == page:
      cache.remove(entry)
      cache.append([page, bit])
      return 0, None
  victim = None
  if len(cache) == k:
    if all(flag == 0 for _, flag in cache):
      for entry in cache:
        entry[1] = 1
    for entry in cache:
      if entry[1] == 1:
        victim = entry[0]
        cache.remove(entry)
        break
  cache.append([page, bit])
  return 1, victim


def _follow_slow(trace, bits, k):
  cache, faults, evictions = [], 0, []
  for t, (page, bit) in enumerate(zip(trace, bits)):
    fault, victim = _follow_step(cache, page, bit, k)
    faults += fault
    if victim is not None:
      evictions.append((t, victim))
  return faults, evictions


def _combined_with_lru_slow(trace, bits, k, margin):
  """Follow the predictions' policy, switch between it and LRU whenever the followed one
  has faulted more than `margin` times more; our own cache evicts, on a fault, its least
  recently used page that the followed policy does not hold."""
  follow_cache, lru_cache, ours = [], [], []
  costs, following, faults = [0, 0], 0, 0
  for page, bit in zip(trace, bits):
    costs[0] += _follow_step(follow_cache, page, bit, k)[0]
    costs[1] += _lru_step(lru_cache, page, k)
    held = [p for p, _ in follow_cache] if following == 0 else list(lru_cache)
    if page in ours:
      ours.remove(page)
    else:
      faults += 1
      if len(ours) == k:
        ours.remove([p for p in ours if p not in held][0])
    ours.append(page)
    if costs[following] - costs[1 - following] > margin:
      following = 1 - following
  return faults


def _hybrid_slow(trace, k, prior, weight, capacity, window):
  device, buffer = [], []           # least recently used first; oldest victim first
  faults = victim_hits = 0
  evictions = []
  for t, page in enumerate(trace):
    if page in device:
      device.remove(page)
      device.append(page)
      continue
    if page in buffer:
      buffer.remove(page)
      victim_hits += 1
    else:
      faults += 1
    if len(device) == k:
      recent = trace[max(0, t - window + 1):t + 1]
      scores = [weight * prior[p] + (1 - weight) * recent.count(p) / window for p in device]
      victim = device[scores.index(min(scores))]
      device.remove(victim)
      evictions.append((t, victim))
      buffer.append(victim)
      if len(buffer) > capacity:
        buffer.pop(0)
    device.append(page)
  return faults, victim_hits, evictions


def _phases(trace, k):
  """The k-phase partition: a phase ends just before the request of its (k+1)-th distinct
  page. Returns a list of (start, end) index ranges."""
  phases, start, seen = [], 0, set()
  for t, page in enumerate(trace):
    if page not in seen and len(seen) == k:
      phases.append((start, t))
      start, seen = t, set()
    seen.add(page)
  if trace:
    phases.append((start, len(trace)))
  return phases


# ------------------------------------------------------------------ Belady


def test_belady_equals_exhaustive_search():
  rng = np.random.default_rng(0)
  for _ in range(400):
    k = int(rng.integers(1, 4))
    trace = _random_trace(rng, int(rng.integers(0, 10)), int(rng.integers(1, 6)))
    assert paging.belady(trace, k).faults == _opt_exhaustive(trace, k), (trace, k)


def test_belady_and_lru_on_hand_worked_traces():
  # The textbook string with 3 frames. FitF: 1,2,3 load (3); 4 evicts 3 (next use
  # furthest); 1,2 hit; 5 evicts 4; 1,2 hit; 3 and 4 evict never-again pages; 5 hits: 7.
  # LRU misses everything except the 1,2 after 5: 12 - 2 = 10.
  classic = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]
  assert paging.belady(classic, 3).faults == 7
  assert paging.lru(classic, 3).faults == 10
  # Cyclic 1,2,3 x3 with 2 frames. FitF faults at t = 0,1,2 (evicts 2), 4 (evicts 1),
  # 6 (evicts 3), 8: 6 faults. LRU always evicts the page requested next: 9.
  cyclic = [1, 2, 3] * 3
  assert paging.belady(cyclic, 2).faults == 6
  assert paging.lru(cyclic, 2).faults == 9
  # One frame: a fault at every change of page.
  assert paging.belady([1, 1, 2, 1], 1).faults == 3
  result = paging.belady(classic, 3)
  assert result.hits == 5 and len(result.evictions) == 4
  assert result.evictions[0] == (3, 3)     # 4 came in and pushed out 3


def test_discard_bits_equal_the_slow_restatement():
  rng = np.random.default_rng(1)
  for _ in range(150):
    k = int(rng.integers(1, 6))
    trace = _random_trace(rng, int(rng.integers(0, 40)), int(rng.integers(1, k + 5)))
    assert list(paging.belady_discard_bits(trace, k)) == _true_bits_slow(trace, k)


def test_discard_bits_hand_worked():
  # k=2, trace 1,2,3,1. FitF loads 1 and 2; at 3 it evicts 2 (never needed again) and keeps
  # 1 (needed at t=3). Bits: 1 kept until reuse -> 0; 2, 3 and the last 1 are never
  # requested again -> 1.
  assert paging.belady_discard_bits([1, 2, 3, 1], 2) == (0, 1, 1, 1)
  # The textbook string, 3 frames: 3 (t=2) and 4 (t=3) are evicted before reuse, the
  # requests at t=0,1,4,5 (pages 1,2 reused at t=4,5,7,8) and 5 at t=6 (reused at t=11)
  # are kept, everything from t=7 on is never requested again.
  classic = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]
  assert paging.belady_discard_bits(classic, 3) == (0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1)


# ------------------------------------------------------------------ LRU and marking


def test_lru_equals_the_slow_restatement():
  rng = np.random.default_rng(2)
  for _ in range(200):
    k = int(rng.integers(1, 6))
    trace = _random_trace(rng, int(rng.integers(0, 50)), int(rng.integers(1, 10)))
    result = paging.lru(trace, k)
    assert result.faults == _lru_slow(trace, k)
    assert result.faults + result.hits == len(trace)


def test_marker_is_a_marking_algorithm():
  """Per k-phase: a page evicted in a phase was not requested earlier in that phase, every
  page faults at most once per phase, and every page new to the phase faults."""
  rng = np.random.default_rng(3)
  for trial in range(60):
    k = int(rng.integers(1, 6))
    trace = _random_trace(rng, 60, int(rng.integers(k + 1, k + 5)))
    result = paging.marker(trace, k, seed=trial)
    fault_at = set()
    cache = set()
    for t, page in enumerate(trace):  # replay the log to find the faults
      if page not in cache:
        fault_at.add(t)
        cache.add(page)
      cache -= {victim for time, victim in result.evictions if time == t}
    assert len(fault_at) == result.faults
    previous = set()
    for start, end in _phases(trace, k):
      phase = trace[start:end]
      for time, victim in result.evictions:
        if start <= time < end:
          assert victim not in phase[:time - start], (trace, k, time, victim)
      faults = [trace[t] for t in range(start, end) if t in fault_at]
      assert len(faults) == len(set(faults)) <= k
      assert set(phase) - previous <= set(faults)
      previous = set(phase)


def test_marker_expected_faults_within_the_marking_bound():
  """Fiat et al. (1991): in a phase with m new pages randomized marking faults at most
  m (1 + H_k - H_m) times in expectation, and OPT >= (sum of m) / 2, so E <= 2 H_k OPT.
  The mean over 200 fixed seeds must stay under the first bound plus 3 standard errors."""
  rng = np.random.default_rng(4)
  for k, trace in [(3, _random_trace(rng, 300, 5)), (6, _random_trace(rng, 300, 8)),
                   (3, [t % 4 for t in range(300)]), (6, [t % 7 for t in range(300)])]:
    bound, previous = 0.0, set()
    for start, end in _phases(trace, k):
      new = len(set(trace[start:end]) - previous)
      bound += new * (1 + _harmonic(k) - _harmonic(new))
      previous = set(trace[start:end])
    costs = np.array([paging.marker(trace, k, seed=s).faults for s in range(200)])
    margin = 3 * costs.std(ddof=1) / math.sqrt(len(costs))
    assert costs.mean() <= bound + margin
    assert costs.mean() <= 2 * _harmonic(k) * paging.belady(trace, k).faults + margin
    if len(set(trace)) == k + 1:
      # The bound has bite: on a cycle over k+1 pages LRU faults every time, far above it.
      assert _lru_slow(trace, k) > bound


def test_marker_is_deterministic_given_a_seed():
  trace = _random_trace(np.random.default_rng(5), 200, 9)
  assert paging.marker(trace, 4, seed=7) == paging.marker(trace, 4, seed=7)
  assert len({paging.marker(trace, 4, seed=s).evictions for s in range(5)}) > 1


# ------------------------------------------------------------------ discard predictions


def test_follow_discard_equals_the_slow_restatement():
  rng = np.random.default_rng(6)
  for _ in range(200):
    k = int(rng.integers(1, 6))
    trace = _random_trace(rng, int(rng.integers(0, 50)), int(rng.integers(1, k + 5)))
    bits = rng.integers(0, 2, len(trace)).tolist()
    result = paging.follow_discard_predictions(trace, bits, k)
    faults, evictions = _follow_slow(trace, bits, k)
    assert (result.faults, list(result.evictions)) == (faults, evictions)


def test_follow_discard_hand_worked():
  # k=2, trace 1,2,3,1, every bit 0 ("keep"). 1, 2 load. 3 faults with nothing evictable:
  # both become evictable and the least recent, 1, goes. The final 1 faults and evicts
  # 2 (evictable since the reset) rather than 3 (bit 0): 4 faults.
  result = paging.follow_discard_predictions([1, 2, 3, 1], [0, 0, 0, 0], 2)
  assert result.faults == 4 and result.evictions == ((2, 1), (3, 2))
  # Perfect bits (0, 1, 1, 1): at 3 the evictable 2 goes, 1 stays: 3 faults = OPT.
  assert paging.follow_discard_predictions([1, 2, 3, 1], [0, 1, 1, 1], 2).faults == 3


def test_consistency_perfect_bits_pay_opt():
  """With bits from the slow FitF the algorithm pays exactly OPT (the paper's consistency,
  alpha = 1): against exhaustive search on tiny traces, against FitF on larger ones."""
  rng = np.random.default_rng(7)
  for _ in range(300):
    k = int(rng.integers(1, 4))
    trace = _random_trace(rng, int(rng.integers(0, 10)), int(rng.integers(1, 6)))
    bits = _true_bits_slow(trace, k)
    assert paging.follow_discard_predictions(trace, bits, k).faults == \
        _opt_exhaustive(trace, k)
  for _ in range(100):
    k = int(rng.integers(2, 7))
    trace = _random_trace(rng, 80, int(rng.integers(k + 1, 2 * k + 3)))
    bits = _true_bits_slow(trace, k)
    assert paging.follow_discard_predictions(trace, bits, k).faults == \
        sum(_fitf_slow(trace, k))


def test_smoothness_flipped_bits_cost_at_most_the_paper_bound():
  """(1, k-1, 1)-competitiveness: faults <= OPT + (k-1) eta0 + eta1, eta0 = wrong 0s
  (FitF does evict), eta1 = wrong 1s (FitF keeps)."""
  rng = np.random.default_rng(8)
  tight = 0
  for _ in range(400):
    k = int(rng.integers(1, 6))
    trace = _random_trace(rng, int(rng.integers(1, 60)), int(rng.integers(1, k + 5)))
    truth = _true_bits_slow(trace, k)
    flip = rng.random(len(trace)) < rng.choice([0.05, 0.2, 0.5, 1.0])
    bits = [b ^ int(f) for b, f in zip(truth, flip)]
    eta0, eta1 = _errors(bits, truth)
    assert paging.prediction_errors(bits, truth) == (eta0, eta1)
    faults = paging.follow_discard_predictions(trace, bits, k).faults
    opt = sum(_fitf_slow(trace, k))
    assert faults <= opt + (k - 1) * eta0 + eta1, (trace, bits, k)
    tight += faults == opt + (k - 1) * eta0 + eta1 and eta0 + eta1 > 0
  assert tight > 0     # the bound is met with equality on some flipped traces


def test_robust_combination_meets_its_switching_bound():
  """faults <= (2 + k/(D+1)) min(A, B) + 2D + k + 1 on every run, A the predictions'
  policy, B randomized marking with the same seed, D the switching margin (derived in
  `robust_discard_predictions`' docstring: lazy following costs the followed policy's
  faults plus k per switch, at most min(A,B)/(D+1) + 1 switches)."""
  rng = np.random.default_rng(9)
  for trial in range(120):
    k = int(rng.integers(1, 7))
    trace = _random_trace(rng, int(rng.integers(0, 120)), int(rng.integers(1, 2 * k + 3)))
    truth = _true_bits_slow(trace, k)
    kind = trial % 3   # random bits, all bits wrong, perfect bits
    bits = (rng.integers(0, 2, len(trace)).tolist() if kind == 0 else
            [1 - b for b in truth] if kind == 1 else truth)
    a = _follow_slow(trace, bits, k)[0]
    for margin in (0, k, 3 * k):
      b = paging.marker(trace, k, seed=trial).faults
      robust = paging.robust_discard_predictions(trace, bits, k, seed=trial, margin=margin)
      assert robust.faults <= (2 + k / (margin + 1)) * min(a, b) + 2 * margin + k + 1
      assert robust.faults + robust.hits == len(trace)


def test_robust_with_lru_fallback_equals_the_slow_restatement():
  rng = np.random.default_rng(10)
  for _ in range(150):
    k = int(rng.integers(1, 6))
    trace = _random_trace(rng, int(rng.integers(0, 80)), int(rng.integers(1, 2 * k + 3)))
    bits = rng.integers(0, 2, len(trace)).tolist()
    margin = int(rng.integers(0, 2 * k + 1))
    result = paging.robust_discard_predictions(trace, bits, k, margin=margin, fallback="lru")
    assert result.faults == _combined_with_lru_slow(trace, bits, k, margin)


def test_robust_is_log_k_competitive_when_every_bit_is_wrong():
  """Working sets of k pages drifting by one page per block, every bit inverted. The
  mean over 20 seeds must satisfy the O(log k) bound that follows from the switching
  bound and E[marker] <= 2 H_k OPT:  (2 + k/(k+1)) 2 H_k OPT + 3k + 1 (margin D = k).
  The plain follower breaks that bound on the same input, so the check has bite."""
  k = 8
  rng = np.random.default_rng(11)
  trace = []
  for block in range(16):
    trace += (block + rng.integers(0, k, 100)).tolist()
  opt = sum(_fitf_slow(trace, k))
  wrong = [1 - b for b in _true_bits_slow(trace, k)]
  bound = (2 + k / (k + 1)) * 2 * _harmonic(k) * opt + 3 * k + 1
  robust = np.mean([paging.robust_discard_predictions(trace, wrong, k, seed=s).faults
                    for s in range(20)])
  assert robust <= bound
  assert _follow_slow(trace, wrong, k)[0] > bound


# ------------------------------------------------------------------ LSM-GNN hybrid


def test_hybrid_equals_the_slow_restatement():
  rng = np.random.default_rng(12)
  levels = [0.0, 0.25, 0.5, 1.0]          # few levels, so ties are common
  for _ in range(150):
    k = int(rng.integers(1, 6))
    num_pages = int(rng.integers(1, 2 * k + 4))
    trace = _random_trace(rng, int(rng.integers(0, 80)), num_pages)
    prior = [levels[i] for i in rng.integers(0, len(levels), num_pages)]
    weight = float(rng.choice([0.0, 0.3, 0.5, 1.0]))
    capacity = int(rng.integers(0, 5))
    window = int(rng.integers(1, 20))
    result = paging.hybrid_lsm(trace, k, prior, weight, capacity, window=window)
    faults, victim_hits, evictions = _hybrid_slow(trace, k, prior, weight, capacity, window)
    assert (result.faults, result.victim_hits, list(result.evictions)) == \
        (faults, victim_hits, evictions)
    # The buffer never changes what the device tier holds: its misses split into victim
    # hits and backing-store faults, and without a buffer every miss is a fault.
    plain = paging.hybrid_lsm(trace, k, prior, weight, 0, window=window)
    assert plain.victim_hits == 0 and plain.evictions == result.evictions
    assert result.faults + result.victim_hits == plain.faults
    assert result.hits + result.misses == len(trace)


def test_hybrid_hand_worked_victim_buffer():
  # k=2, prior: page 0 is a sink (1.0), others 0; weight 1 (static only), buffer of 1.
  # 0 F, 1 F, 2 F evicts 1 (score 0, older than 0's 1.0) -> buffer [1];
  # 1 victim hit, evicts 2 (score 0) -> buffer [2]; 3 F evicts 1 -> buffer [1] (2 falls
  # out); 2 F evicts 3 -> buffer [3]; 0 hit. Faults 5, victim hits 1, hits 1.
  result = paging.hybrid_lsm([0, 1, 2, 1, 3, 2, 0], 2, [1.0, 0.0, 0.0, 0.0], 1.0, 1)
  assert (result.faults, result.victim_hits, result.hits) == (5, 1, 1)
  assert result.evictions == ((2, 1), (3, 2), (4, 1), (5, 3))
  assert result.cost(victim_cost=0.25) == 5.25


def test_hybrid_with_flat_prior_and_static_weight_is_lru():
  # Equal static scores everywhere leave only the least-recently-used tie break.
  rng = np.random.default_rng(13)
  for _ in range(50):
    k = int(rng.integers(1, 6))
    trace = _random_trace(rng, 60, 10)
    result = paging.hybrid_lsm(trace, k, {p: 0.5 for p in range(10)}, 1.0, 0)
    assert result.faults == _lru_slow(trace, k)


# ------------------------------------------------------------------ decode-time predictor


def _persistence_slow(history, num_pages, window, min_unselected):
  recent = history[-window:]
  return [int(sum(1 for s in recent if p not in s) >= min_unselected)
          for p in range(num_pages)]


def test_persistence_bits():
  # Last 3 steps: {1}, {1,2}, {2}. Page 0 and 3 skipped 3 times -> safe; 1 and 2 skipped
  # once -> keep.
  history = [{0, 1}, {1}, {1, 2}, {2}]
  assert paging.persistence_bits(history, 4, window=3, min_unselected=2).tolist() == \
      [1, 0, 0, 1]
  # Short history: only 1 step seen, nobody was skipped twice yet.
  assert paging.persistence_bits([{0}], 3, window=8, min_unselected=2).tolist() == [0, 0, 0]
  rng = np.random.default_rng(14)
  for _ in range(100):
    history = [set(rng.choice(8, int(rng.integers(0, 5)), replace=False).tolist())
               for _ in range(int(rng.integers(0, 12)))]
    window = int(rng.integers(1, 6))
    m = int(rng.integers(1, window + 1))
    assert paging.persistence_bits(history, 8, window, m).tolist() == \
        _persistence_slow(history, 8, window, m)


def test_selection_requests_turn_selector_history_into_a_predicted_trace():
  # window 2, threshold 1. Step 0 reads 0, 2 (never skipped: 0, 0). Step 1 reads 0 (in
  # both recent steps: 0). Step 2 reads 1, skipped at step 1: 1.
  trace, bits = paging.selection_requests([{2, 0}, {0}, {1}], window=2, min_unselected=1)
  assert trace == (0, 2, 0, 1) and bits == (0, 0, 0, 1)
  result = paging.follow_discard_predictions(trace, bits, 2)
  assert result.faults == 3


# ------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("call, message", [
    (lambda: paging.belady([1, 2], 0), "k=0 must be"),
    (lambda: paging.lru([1, 2], -1), "k=-1 must be"),
    (lambda: paging.marker([1, 2], 1.5), "k=1.5 must be"),
    (lambda: paging.belady_discard_bits([1], True), "k=True must be"),
    (lambda: paging.follow_discard_predictions([1, 2, 3, 4], [0, 1, 0], 2),
     "4 requests but 3 bits"),
    (lambda: paging.follow_discard_predictions([1, 2], [0, 2], 2), "got 2 at request 1"),
    (lambda: paging.robust_discard_predictions([1, 2], [0, 1], 2, margin=-1), "margin=-1 must be"),
    (lambda: paging.robust_discard_predictions([1, 2], [0, 1], 2, fallback="fifo"),
     "got 'fifo'"),
    (lambda: paging.prediction_errors([0, 1], [1]), "got 2 and 1"),
    (lambda: paging.hybrid_lsm([0, 1], 1, [0.5, 0.5], -0.5, 0), "weight=-0.5 must be"),
    (lambda: paging.hybrid_lsm([0, 1], 1, [0.5, 0.5], 1.5, 0), "weight=1.5 must be"),
    (lambda: paging.hybrid_lsm([0, 1], 1, [0.5, 0.5], float("nan"), 0), "weight=nan must be"),
    (lambda: paging.hybrid_lsm([0, 1], 1, [0.5, 0.5], 0.5, -1), "victim_capacity=-1 must be"),
    (lambda: paging.hybrid_lsm([0, 1], 1, [0.5, -1.0], 0.5, 0), "got -1.0 for page 1"),
    (lambda: paging.hybrid_lsm([0, 3], 1, [0.5, 0.5], 0.5, 0), "no entry for page 3"),
    (lambda: paging.hybrid_lsm([0, -1], 1, [0.5, 0.5], 0.5, 0), "no entry for page -1"),
    (lambda: paging.hybrid_lsm([0], 1, [0.5], 0.5, 0, window=0), "window=0 must be"),
    (lambda: paging.persistence_bits([{0}], 2, window=3, min_unselected=5), "got 5"),
    (lambda: paging.persistence_bits([{4}], 2, window=3, min_unselected=1), "page 4"),
    (lambda: paging.selection_requests([{0}], window=0, min_unselected=1), "window=0 must be"),
])
def test_bad_inputs_raise_naming_the_value(call, message):
  with pytest.raises(ValueError, match=message):
    call()
