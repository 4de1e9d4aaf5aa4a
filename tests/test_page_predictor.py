"""The offload tier's learned discard predictor (kvjax.cache.page_predictor, the page
buffer's "learned" policy, kvjax.systems.page_predictor): features against a slow numpy
restatement, Belady labels on a recorded trace, training on a learnable synthetic
pattern, decoding through the learned policy equal to on-device Quest, and bad input."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache import page_buffer as pb
from kvjax.cache import page_predictor as pp
from kvjax.errors import MethodError
from kvjax.methods.quest import Quest
from kvjax.systems import paging
from kvjax.systems import page_predictor as train_pp
from tiny import random_prompts, tiny_model

# ------------------------------------------------------------------ features


def _features_slow(bounds, newest, last, freq, step):
  """page_features restated one page at a time."""
  b_, k_, p_ = bounds.shape
  out = np.zeros((b_, k_, p_, pp.NUM_FEATURES), np.float32)
  for b in range(b_):
    for k in range(k_):
      row = bounds[b, k]
      valid = [p for p in range(p_) if np.isfinite(row[p])]
      hi, lo = max(row[p] for p in valid), min(row[p] for p in valid)
      order = sorted(valid, key=lambda p: (-row[p], p))
      for p in range(p_):
        since = step - last[b, k, p] if last[b, k, p] >= 0 else 64
        f = out[b, k, p]
        if p in valid:
          f[0] = (row[p] - lo) / max(hi - lo, 1e-6)
          f[1] = order.index(p) / max(len(valid) - 1, 1)
        else:
          f[0], f[1] = 0.0, 1.0
        f[2] = float(since == 0)
        f[3] = min(math.log1p(since) / math.log1p(64), 1.0)
        f[4] = freq[b, k, p]
        f[5] = float(p == newest)
        f[6] = float(p == 0)
  return out


def test_features_match_a_slow_restatement():
  rng = np.random.default_rng(0)
  b, k, p, r, steps = 2, 2, 9, 3, 12
  last = np.full((b, k, p), -1, np.int32)
  freq = np.zeros((b, k, p), np.float32)
  jlast, jfreq = jnp.asarray(last), jnp.asarray(freq)
  for step in range(steps):
    filled = 5 + step // 4                         # pages with tokens grow while decoding
    bounds = rng.normal(size=(b, k, p)).astype(np.float32)
    bounds[..., filled:] = -np.inf
    bounds[0, 0, 1] = bounds[0, 0, 2]              # a tie: the lower page ranks first
    requests = rng.integers(0, filled, (b, k, r)).astype(np.int32)
    for bi in range(b):                            # the slow history update
      for ki in range(k):
        read = set(requests[bi, ki].tolist())
        for page in range(p):
          freq[bi, ki, page] = pp.EMA_DECAY * freq[bi, ki, page] + (1 - pp.EMA_DECAY) * (
              page in read)
          if page in read:
            last[bi, ki, page] = step
    jlast, jfreq = pp.update_history(jlast, jfreq, jnp.asarray(requests), step)
    np.testing.assert_array_equal(np.asarray(jlast), last)
    np.testing.assert_allclose(np.asarray(jfreq), freq, rtol=1e-6)
    got = pp.page_features(jnp.asarray(bounds), filled - 1, jlast, jfreq, step)
    np.testing.assert_allclose(np.asarray(got), _features_slow(bounds, filled - 1, last, freq,
                                                               step), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ recorded decoding


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=0, num_layers=4)


PROMPTS = random_prompts([150, 120], seed=1)
NEW = 10


@pytest.fixture(scope="module")
def on_device(model):
  return kvjax.generate(model, PROMPTS, method="quest:offload=False", compression_ratio=0.5,
                        max_new_tokens=NEW).token_ids


@pytest.fixture(scope="module")
def recorded(model):
  """One LRU decode with 3 frames, recorded: (traces, result)."""
  return train_pp.collect(model, PROMPTS, device_pages=3, compression_ratio=0.5,
                          max_new_tokens=NEW, policy="lru")


def test_recorded_traces_are_what_the_buffer_served(model, recorded):
  traces, result = recorded
  cfg = model.config
  steps = result.stats["decode_steps"]
  assert len(traces) == (cfg.num_layers - 2) * 2 * cfg.num_kv_heads
  for t in traces:
    assert t.requests.shape[0] == steps - 1 or t.requests.shape[0] == steps
    assert t.features.shape[:2] == (t.requests.shape[0], t.heuristic.shape[1])
    assert not t.learned.any()                  # "lru" records no learned bits
  # The buffer's own LRU counters equal paging.lru on the recorded traces.
  counts = result.stats["decode_method_stats"]
  assert counts["requests"] == sum(len(t.pages()) for t in traces)
  assert counts["faults"] == sum(paging.lru(t.pages(), 3).faults for t in traces)
  report = train_pp.trace_report(traces, 3)
  assert report["requests"] == counts["requests"] and report["lru_faults"] == counts["faults"]
  assert report["belady_faults"] <= report["lru_faults"]
  assert report["step_examples"] == sum(len(train_pp.examples(t, 3)[1]) for t in traces)
  assert report["learned_eta1"] == report["learned_step_eta1"] == 0   # no learned bits


def test_labels_are_belady_discard_bits_of_the_recorded_trace(recorded):
  traces, _ = recorded
  for t in traces[:4]:
    pages = [int(p) for step in t.requests for p in step]
    true = paging.belady_discard_bits(pages, 3)
    assert train_pp.labels(t, 3) == true
    x, y = train_pp.examples(t, 3, horizon=0)
    # Slow: per step, every page read so far, with the bit of its latest read (horizon 0:
    # no censoring; test_censored_labels_... checks the rule).
    r = t.requests.shape[1]
    want_x, want_y = [], []
    for s in range(t.requests.shape[0]):
      seen = {}
      for i, page in enumerate(pages[:(s + 1) * r]):
        seen[page] = i
      for page in sorted(seen, key=lambda q: list(dict.fromkeys(pages)).index(q)):
        want_x.append(t.features[s, page])
        want_y.append(true[seen[page]])
    np.testing.assert_array_equal(x, np.array(want_x))
    np.testing.assert_array_equal(y, np.array(want_y, np.float32))
    assert set(np.unique(y)) <= {0.0, 1.0}


def _synthetic_trace(requests, seed=0):
  requests = np.asarray(requests, np.int32)
  steps, pages = requests.shape[0], int(requests.max()) + 1
  rng = np.random.default_rng(seed)
  features = rng.uniform(size=(steps, pages, pp.NUM_FEATURES)).astype(np.float32)
  bits = np.zeros((steps, pages), bool)
  return train_pp.Trace(requests, features, bits, bits)


def test_censored_labels_at_the_end_of_the_recording_give_no_example():
  # Page 0 is read every step; 1, 2, 3 come and go; 4 is read at the last step only.
  t = _synthetic_trace([[0, 1], [0, 2], [0, 3], [0, 2], [0, 1], [0, 4]])
  true = paging.belady_discard_bits(t.pages(), 2)
  s_all, p_all, r_all = train_pp.example_index(t)          # horizon 0: every pair
  pairs = list(zip(s_all.tolist(), p_all.tolist()))
  assert len(pairs) == 2 + 3 + 4 + 4 + 4 + 5
  for h in range(7):
    s, p, r = train_pp.example_index(t, h)
    # Slow: a pair is left out iff its read is the page's last and < h steps follow.
    want = [(st, pg, rd) for st, pg, rd in zip(s_all, p_all, r_all)
            if not (6 - 1 - st < h and pg not in t.pages()[rd + 1:])]
    assert list(zip(s, p, r)) == want
    x, y = train_pp.examples(t, 2, h)
    np.testing.assert_array_equal(x, t.features[s, p])
    np.testing.assert_array_equal(y, np.array(true, np.float32)[r])
  s, p, _ = train_pp.example_index(t, 2)
  kept = set(zip(s.tolist(), p.tolist()))
  dropped = set(pairs) - kept
  # The last two steps keep only page 0 at step 4 (read again at step 5); everything else
  # there was "safe" only because the recording stops.
  assert dropped == {(4, 1), (4, 2), (4, 3), (5, 0), (5, 1), (5, 2), (5, 3), (5, 4)}
  assert (3, 3) in kept and (3, 1) in kept                # 2 steps left: kept, labelled 1
  for st, pg in dropped:
    r = dict(((a, b), c) for a, b, c in zip(s_all, p_all, r_all))[(st, pg)]
    assert true[r] == 1
  # Default horizon; the training set and the report use it.
  assert len(train_pp.examples(t, 2)[1]) == len(train_pp.example_index(t, train_pp.HORIZON)[0])
  assert train_pp.trace_report([t], 2)["step_examples"] == len(train_pp.examples(t, 2)[1])
  with pytest.raises(pp.PredictorError, match="horizon=-1"):
    train_pp.examples(t, 2, -1)


def test_censoring_errors_compare_cut_labels_with_the_whole_trace():
  # Four pages, k=4: nothing is ever evicted, a read's bit is 1 iff its page is never
  # read again. Cut the last 2 steps (the cut trace is steps 0..3): at step 2 (1 step
  # left) pages 1 and 3 have no later read in the cut trace, yet both are read again in
  # the whole one; at step 3 (0 left) pages 0, 1, 2, 3 have none, and only 2 is never
  # read again in the whole trace.
  t = _synthetic_trace([[0, 1], [0, 2], [0, 3], [0, 2], [0, 1], [0, 3]])
  got = train_pp.censoring_errors([t], 4, cut=2)
  assert got == {1: {"pairs": 2, "not_safe": 2}, 0: {"pairs": 4, "not_safe": 3}}
  assert train_pp.censoring_errors([t], 4, cut=6) == {
      left: {"pairs": 0, "not_safe": 0} for left in range(6)}   # too short to cut


def test_request_bits_keep_a_page_the_step_reads_again():
  t = _synthetic_trace([[0, 1, 0], [2, 2, 1]])
  bits = np.ones((2, 3), bool)
  assert train_pp.request_bits(t, bits) == [0, 1, 1, 0, 1, 1]
  bits[1, 1] = False
  assert train_pp.request_bits(t, bits) == [0, 1, 1, 0, 1, 0]


# ------------------------------------------------------------------ training


def _synthetic(n, seed):
  """A learnable pattern: safe iff the page ranks in the lower half and was not read in
  the last steps (since > 0.3), never the newest page or the sinks; 5% labels flipped."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(n, pp.NUM_FEATURES)).astype(np.float32)
  x[:, 2] = (rng.uniform(size=n) < 0.3).astype(np.float32)
  x[:, 5] = (rng.uniform(size=n) < 0.1).astype(np.float32)
  x[:, 6] = (rng.uniform(size=n) < 0.1).astype(np.float32)
  y = (x[:, 1] > 0.5) & (x[:, 3] > 0.3) & (x[:, 5] == 0) & (x[:, 6] == 0)
  flip = rng.uniform(size=n) < 0.05
  return x, (y ^ flip).astype(np.float32)


@pytest.mark.parametrize("hidden", [0, 3])
def test_training_reduces_the_loss_and_beats_a_constant_predictor(hidden):
  x, y = _synthetic(3000, seed=0)
  predictor, losses = train_pp.train(x, y, hidden=hidden, steps=300, seed=0)
  assert losses[-1] < 0.7 * losses[0]
  base = float(y.mean())
  constant = max(base, 1 - base)
  hx, hy = _synthetic(2000, seed=1)                  # held out
  assert train_pp.accuracy(predictor, hx, hy) > constant + 0.1
  again, _ = train_pp.train(x, y, hidden=hidden, steps=300, seed=0)
  assert again == predictor                          # deterministic
  assert isinstance(hash(predictor), int)            # static config for the jitted step


def test_write_trained_rewrites_only_the_block(tmp_path):
  path = tmp_path / "page_predictor.py"
  source = open(pp.__file__).read()
  path.write_text(source)
  new = pp.PagePredictor(tuple(0.25 * i for i in range(pp.num_weights(0))), 0, 0.4)
  train_pp.write_trained(new, path)
  text = path.read_text()
  namespace = {}
  block = text[text.index("# BEGIN TRAINED"):text.index("# END TRAINED")]
  exec(block, {"PagePredictor": pp.PagePredictor}, namespace)
  assert namespace["TRAINED"] == new
  assert text.replace(block, "") == source.replace(
      source[source.index("# BEGIN TRAINED"):source.index("# END TRAINED")], "")


# ------------------------------------------------------------------ the learned policy


def _constant(logit):
  """A predictor whose bit is the same for every page."""
  return pp.PagePredictor((0.0,) * pp.NUM_FEATURES + (logit,))


@pytest.mark.parametrize("predictor, frames", [
    (None, 2),                  # the shipped, trained weights
    (_constant(5.0), 3)])       # every page predicted safe
def test_learned_decoding_equals_on_device(model, on_device, predictor, frames):
  method = Quest(device_pages=frames, eviction="learned", predictor=predictor)
  out = kvjax.generate(model, PROMPTS, method=method, compression_ratio=0.5,
                       max_new_tokens=NEW)
  assert out.token_ids == on_device
  s = out.stats["decode_method_stats"]
  assert s["requests"] > 0 and s["faults"] > 0
  assert out.stats["method_stats"]["eviction"] == "learned"


def test_all_keep_bits_are_lru_and_the_option_string_works(model, on_device, recorded):
  _, lru = recorded
  out = kvjax.generate(model, PROMPTS, method=Quest(device_pages=3, eviction="learned",
                                                    predictor=_constant(-5.0)),
                       compression_ratio=0.5, max_new_tokens=NEW)
  assert out.token_ids == on_device
  # No page is ever predicted safe: every eviction is LRU's.
  assert out.stats["decode_method_stats"]["faults"] == lru.stats["decode_method_stats"][
      "faults"]
  spec = kvjax.generate(model, PROMPTS, method="quest:device_pages=3:eviction=learned",
                        compression_ratio=0.5, max_new_tokens=NEW)
  assert spec.token_ids == on_device


def test_recording_the_learned_policy_gives_the_models_bits(model, on_device):
  predictor = pp.PagePredictor((0.0, 6.0, -3.0, 2.0, -2.0, -6.0, -6.0, -2.0))
  traces, result = train_pp.collect(model, PROMPTS, device_pages=3, compression_ratio=0.5,
                                    max_new_tokens=NEW, predictor=predictor)
  assert result.token_ids == on_device
  for t in traces[:3]:
    want = np.asarray(predictor.bits(jnp.asarray(t.features)))
    np.testing.assert_array_equal(t.learned, want)
    assert t.learned.any() and not t.learned.all()


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=(1.0, 2.0)), r"weights has 2 values; hidden=0 .* needs 8"),
    (dict(weights=(0.0,) * 8, hidden=2), r"needs 19"),
    (dict(weights=[0.0] * 8), r"must be a tuple of floats"),
    (dict(weights=(0.0,) * 7 + (float("nan"),)), r"weights\[7\]=nan must be a finite"),
    (dict(weights=(0.0,) * 7 + ("1",)), r"weights\[7\]="),
    (dict(weights=(0.0,) * 8, threshold=1.0), r"threshold=1.0 must be a number in \(0, 1\)"),
    (dict(weights=(0.0,) * 8, threshold=0), r"threshold=0"),
    (dict(weights=(0.0,) * 8, hidden=-1), r"hidden=-1 must be an integer in \[0, 256\]")])
def test_bad_weights_and_threshold(kwargs, match):
  with pytest.raises(pp.PredictorError, match=match):
    pp.PagePredictor(**kwargs)


def test_bad_predictor_options():
  good = _constant(0.0)
  with pytest.raises(pb.BufferError, match="policy='learned' only"):
    pb.BufferConfig(device_pages=2, policy="lru", predictor=good)
  with pytest.raises(pb.BufferError, match="must be a page_predictor.PagePredictor"):
    pb.BufferConfig(device_pages=2, policy="learned", predictor=(0.0,) * 8)
  with pytest.raises(pb.BufferError, match="record="):
    pb.BufferConfig(device_pages=2, record="yes")
  with pytest.raises(MethodError, match="eviction='learned' only"):
    Quest(device_pages=2, eviction="predictions", predictor=good)
  with pytest.raises(MethodError, match="PagePredictor"):
    Quest(device_pages=2, eviction="learned", predictor="weights.json")
  with pytest.raises(MethodError, match=r"eviction='learnt'; allowed: .*'learned'"):
    kvjax.methods.get("quest:device_pages=2:eviction=learnt")
  with pytest.raises(pp.PredictorError, match=r"features has shape"):
    train_pp.train(np.zeros((4, 3)), np.zeros(4))
  x = np.zeros((4, pp.NUM_FEATURES))
  with pytest.raises(pp.PredictorError, match=r"targets must be discard bits"):
    train_pp.train(x, np.full(4, 0.5))
  with pytest.raises(pp.PredictorError, match=r"l2=-1"):
    train_pp.train(x, np.zeros(4), l2=-1)
  with pytest.raises(pp.PredictorError, match=r"threshold=1"):
    train_pp.train(x, np.zeros(4), threshold=1)
  with pytest.raises(pp.PredictorError, match=r"no recorded traces"):
    train_pp.dataset([], 3)


def test_the_shipped_predictor_is_valid(recorded):
  assert isinstance(pp.TRAINED, pp.PagePredictor)
  assert pp.TRAINED.hidden == 4 and len(pp.TRAINED.weights) == pp.num_weights(4) == 37
  assert pb.BufferConfig(device_pages=2, policy="learned").model() == pp.TRAINED
  assert pb.BufferConfig(device_pages=2, policy="lru").model() is None
  # It tells pages apart on a real recording: neither "all safe" nor "all keep", and
  # pages read this step are kept more often than the others.
  traces, _ = recorded
  features = np.concatenate([t.features.reshape(-1, pp.NUM_FEATURES) for t in traces])
  bits = np.asarray(pp.TRAINED.bits(jnp.asarray(features)))
  assert 0.05 < bits.mean() < 0.95
  read = features[:, pp.FEATURES.index("requested")] == 1
  assert bits[read].mean() < bits[~read].mean()
