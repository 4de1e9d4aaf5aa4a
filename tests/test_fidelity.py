"""Fidelity metrics: numpy restatement, ties to kvjax.score, essay windows, errors, SmolLM2."""

import json
import math

import numpy as np
import pytest

import kvjax
from kvjax.errors import GenerationError
from kvjax.evaluation import fidelity
from kvjax.evaluation.fidelity import Sample
from kvjax.generation.score import continuation_log_probs
from kvjax.methods import SnapKV, StreamingLLM
from tiny import tiny_model


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _random_samples(seed, context_lengths, continuation_lengths):
  rng = np.random.default_rng(seed)
  return [Sample(tuple(rng.integers(1, 256, c).tolist()), tuple(rng.integers(1, 256, t).tolist()))
          for c, t in zip(context_lengths, continuation_lengths)]


# Three samples of uneven lengths: batch_size=2 gives a full and a partial batch, and
# continuations of 9 and 12 tokens in one batch exercise the padding mask.
SAMPLES = _random_samples(0, (60, 45, 52), (9, 12, 7))
SNAPKV = SnapKV(window=8)  # the default 32-token window would not fit half these contexts


# -- token_metrics ----------------------------------------------------------------------------


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _metrics64(full, comp, targets, mask):
  """Straight float64 restatement, one position at a time."""
  out = {k: np.zeros(full.shape[0]) for k in ("nll_sum", "kl_sum", "top1_agree", "tokens")}
  for b in range(full.shape[0]):
    for t in range(full.shape[1]):
      if not mask[b, t]:
        continue
      p = np.exp(full[b, t])
      support = p > 0
      out["kl_sum"][b] += np.sum(p[support] * (full[b, t][support] - comp[b, t][support]))
      out["nll_sum"][b] -= comp[b, t, targets[b, t]]
      out["top1_agree"][b] += np.argmax(full[b, t]) == np.argmax(comp[b, t])
      out["tokens"][b] += 1
  return out


def test_token_metrics_match_a_float64_restatement():
  rng = np.random.default_rng(0)
  shape = (3, 7, 50)
  full = _log_softmax64(rng.normal(size=shape) * 3)
  comp = _log_softmax64(rng.normal(size=shape) * 3 + full)
  # Tokens the full cache rules out (p = 0) must add nothing, not NaN; the compressed side
  # stays finite there. Padded positions hold -inf in q and must be ignored.
  full[0, 1, :10] = -np.inf
  full[0, 1] = _log_softmax64(full[0, 1])
  mask = np.ones(shape[:2], bool)
  mask[1, 5:] = False
  mask[2, 3:] = False
  comp[2, 4, :] = -np.inf
  targets = rng.integers(0, shape[2], shape[:2])
  got = fidelity.token_metrics(full.astype(np.float32), comp.astype(np.float32), targets, mask)
  expected = _metrics64(full, comp, targets, mask)
  for key in ("nll_sum", "kl_sum"):
    assert np.isfinite(np.asarray(got[key])).all(), key
    np.testing.assert_allclose(np.asarray(got[key]), expected[key], rtol=1e-5, atol=1e-5,
                               err_msg=key)
  for key in ("top1_agree", "tokens"):
    np.testing.assert_array_equal(np.asarray(got[key]), expected[key], err_msg=key)
  assert np.asarray(got["tokens"]).tolist() == [7, 5, 3]


def test_token_metrics_by_hand():
  # Position 0: p = (0.6, 0.4), q = (0.25, 0.75); position 1: p = (1, 0), q = (0.5, 0.5).
  full = np.array([[[math.log(0.6), math.log(0.4)], [0.0, -np.inf]]], np.float32)
  comp = np.log(np.array([[[0.25, 0.75], [0.5, 0.5]]], np.float32))
  targets = np.array([[1, 0]])
  got = fidelity.token_metrics(full, comp, targets, np.ones((1, 2), bool))
  kl = 0.6 * math.log(0.6 / 0.25) + 0.4 * math.log(0.4 / 0.75) + 1.0 * math.log(1.0 / 0.5)
  assert float(got["kl_sum"][0]) == pytest.approx(kl, rel=1e-6)
  assert float(got["nll_sum"][0]) == pytest.approx(-math.log(0.75) - math.log(0.5), rel=1e-6)
  assert int(got["top1_agree"][0]) == 1  # argmax 0 vs 1 disagree; 0 vs tie (first: 0) agree
  assert int(got["tokens"][0]) == 2


# -- evaluate on the tiny model ---------------------------------------------------------------


# Independent expectations: Hugging Face transformers runs one uncached forward pass over
# context + continuation; a compressed cache is restated as an attention mask that hides
# the evicted context positions from the continuation's queries (the context itself was
# prefilled in full before compression, so its keys and values are the full forward's).
# Metrics are then computed here in float64 numpy, not with kvjax's code.


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  """(kvjax model, transformers model) with the same tiny random Llama weights, scaled up
  so the next-token distributions are far from uniform and their argmaxes are clear."""
  import torch
  import transformers
  from hf_models import save_tiny
  root = tmp_path_factory.mktemp("fidelity_hf")
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      save_tiny("llama", root / "random", seed=5), dtype=torch.float32,
      attn_implementation="eager").eval()
  with torch.no_grad():
    for p in hf.parameters():
      if p.ndim > 1:
        p.mul_(4)
  hf.save_pretrained(root / "scaled")
  return kvjax.load(root / "scaled"), hf


def _hf_log_probs(hf, sample, visible=None):
  """[T, V] float64 log-probs predicting each continuation token. visible: the context
  positions the continuation's queries may attend to (None: all of them)."""
  import torch
  tokens = list(sample.context_ids) + list(sample.continuation_ids)
  n, c = len(tokens), len(sample.context_ids)
  allowed = np.tril(np.ones((n, n), bool))
  if visible is not None:
    allowed[c:, np.setdiff1d(np.arange(c), visible)] = False
  mask = torch.where(torch.from_numpy(allowed), 0.0, torch.finfo(torch.float32).min)
  with torch.no_grad():
    logits = hf(torch.tensor([tokens]), attention_mask=mask[None, None]).logits[0]
  return _log_softmax64(logits.double().numpy()[c - 1:n - 1])


def _numpy_metrics(pairs, samples):
  """(perplexity, mean KL(full || compressed), top-1 agreement, tokens) over all samples."""
  nll, kl, agree = [], [], []
  for (full, comp), s in zip(pairs, samples):
    targets = np.asarray(s.continuation_ids)
    nll.append(-comp[np.arange(len(targets)), targets])
    kl.append((np.exp(full) * (full - comp)).sum(-1))
    agree.append(full.argmax(-1) == comp.argmax(-1))
    top2 = np.sort(full, -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 1e-3).all(), "near-tie: top-1 comparison unstable"
  nll, kl, agree = map(np.concatenate, (nll, kl, agree))
  return math.exp(nll.mean()), kl.mean(), agree.mean(), len(nll)


def test_full_cache_matches_an_uncached_forward(hf_pair):
  model, hf = hf_pair
  result = fidelity.evaluate(model, SAMPLES, batch_size=2)
  full = [_hf_log_probs(hf, s) for s in SAMPLES]
  perplexity, _, _, tokens = _numpy_metrics([(f, f) for f in full], SAMPLES)
  assert result["tokens"] == tokens == 9 + 12 + 7
  assert result["perplexity"] == pytest.approx(perplexity, rel=1e-5)  # measured 3e-7
  # The reference and the "compressed" side are one computation: exactly equal.
  assert result["kl"] == 0.0
  assert result["top1"] == 1.0


def test_streaming_llm_matches_a_masked_forward(hf_pair):
  """StreamingLLM keeps each row's first `sinks` tokens and its last keep - sinks, with
  keep = int(longest context of the batch * (1 - ratio))."""
  model, hf = hf_pair
  sinks, ratio = 4, 0.5
  result = fidelity.evaluate(model, SAMPLES, StreamingLLM(sinks=sinks),
                             compression_ratio=ratio, batch_size=2)
  pairs = []
  for group in fidelity.batches(SAMPLES, 2):
    keep = int(max(len(s.context_ids) for s in group) * (1 - ratio))
    for s in group:
      c = len(s.context_ids)
      visible = np.r_[0:sinks, c - (keep - sinks):c] if c > keep else None
      pairs.append((_hf_log_probs(hf, s), _hf_log_probs(hf, s, visible)))
  perplexity, kl, top1, tokens = _numpy_metrics(pairs, SAMPLES)
  assert kl > 1e-3, "the evicted tokens should matter"
  assert result["tokens"] == tokens
  assert result["perplexity"] == pytest.approx(perplexity, rel=1e-5)  # measured 2e-7
  assert result["kl"] == pytest.approx(kl, rel=1e-4)                  # measured 4e-7
  assert result["top1"] == pytest.approx(top1, abs=1e-12)


@pytest.mark.parametrize("method", ["streaming_llm", SnapKV(window=8)], ids=str)
def test_compressed_cache_diverges(model, method):
  result = fidelity.evaluate(model, SAMPLES, method, compression_ratio=0.5, batch_size=2)
  full = fidelity.evaluate(model, SAMPLES, batch_size=2)
  assert math.isfinite(result["kl"]) and result["kl"] > 1e-4
  assert 0.0 <= result["top1"] < 1.0
  assert result["perplexity"] != full["perplexity"]


def test_budget_of_the_whole_context_keeps_the_full_distributions(model):
  samples = _random_samples(1, (40, 40), (10, 6))
  result = fidelity.evaluate(model, samples, SNAPKV, budget=40, batch_size=2)
  assert result["kl"] == pytest.approx(0.0, abs=1e-5)
  assert result["top1"] == 1.0


def test_reference_and_prefilled_reuse_give_the_same_result(model):
  direct = fidelity.evaluate(model, SAMPLES, SNAPKV, compression_ratio=0.5, batch_size=2)
  groups = fidelity.batches(SAMPLES, 2)
  refs = [fidelity.reference(model, g) for g in groups]
  for _ in range(2):  # a reference serves several evaluations
    reused = fidelity.evaluate(model, SAMPLES, SNAPKV, compression_ratio=0.5, batch_size=2,
                               reference=refs)
    assert reused == pytest.approx(direct, rel=1e-6, abs=1e-7)
  prefilled = [fidelity.prefill_batch(model, g, SNAPKV, 0.5) for g in groups]
  from_prefilled = fidelity.evaluate(model, SAMPLES, batch_size=2, reference=refs,
                                     prefilled=prefilled)
  assert from_prefilled == pytest.approx(direct, rel=1e-6, abs=1e-7)
  # Per-batch results combine into the whole run's.
  parts = [fidelity.evaluate(model, list(g), SNAPKV, compression_ratio=0.5, batch_size=2,
                             reference=[r]) for g, r in zip(groups, refs)]
  assert fidelity.combine(parts) == pytest.approx(direct, rel=1e-9)


def test_continuation_log_probs_are_distributions_at_each_position(model):
  samples = SAMPLES[:2]
  pre = fidelity.prefill_batch(model, samples)
  log_probs = np.asarray(continuation_log_probs(model, pre, [list(s.continuation_ids)
                                                              for s in samples]))
  assert log_probs.shape == (2, 16, 256) and log_probs.dtype == np.float32
  np.testing.assert_allclose(np.exp(log_probs).sum(-1), 1.0, atol=1e-5)


# -- errors -----------------------------------------------------------------------------------


def test_bad_evaluate_arguments(model):
  groups = fidelity.batches(SAMPLES, 2)
  with pytest.raises(GenerationError, match="batch_size=0"):
    fidelity.evaluate(model, SAMPLES, batch_size=0)
  with pytest.raises(GenerationError, match="non-empty list of Sample"):
    fidelity.evaluate(model, [])
  with pytest.raises(GenerationError, match="compression_ratio=1.5"):
    fidelity.evaluate(model, SAMPLES, "snapkv", compression_ratio=1.5)
  with pytest.raises(GenerationError, match="one reference.* per batch .*2 batches"):
    fidelity.evaluate(model, SAMPLES, batch_size=2,
                      reference=[fidelity.reference(model, groups[0])])
  swapped = [fidelity.reference(model, g) for g in reversed(groups)]
  with pytest.raises(GenerationError, match=r"reference\[0\] is not the reference of batch 0"):
    fidelity.evaluate(model, SAMPLES, batch_size=2, reference=swapped)
  prefilled = [fidelity.prefill_batch(model, g) for g in groups]
  with pytest.raises(GenerationError, match="already carry their compression"):
    fidelity.evaluate(model, SAMPLES, SNAPKV, 0.5, batch_size=2, prefilled=prefilled)
  with pytest.raises(GenerationError, match="needs 520 positions"):
    fidelity.evaluate(model, [Sample(tuple(range(1, 256)) * 2, (1,) * 10)])
  with pytest.raises(GenerationError, match="Sample.continuation_ids is empty"):
    Sample((1, 2), ())


def test_room_must_fit_the_continuation(model):
  samples = SAMPLES[:2]  # continuations of 9 and 12 tokens: bucketed to 16
  with pytest.raises(GenerationError, match="room=8 is too small .* >= 16"):
    fidelity.reference(model, samples, room=8)
  from kvjax.generation import context as context_lib, inputs
  tokens, mask = inputs.left_pad([list(s.context_ids) for s in samples], 0)
  short = context_lib.prefill(model, tokens, mask, kvjax.methods.get("full"), None, room=8)
  with pytest.raises(GenerationError, match="room for 8 more tokens .* need 16"):
    continuation_log_probs(model, short, [list(s.continuation_ids) for s in samples])
  with pytest.raises(GenerationError, match="3 continuations for a prefilled context of 2"):
    continuation_log_probs(model, fidelity.prefill_batch(model, samples),
                           [[1], [2], [3]])


# -- essay samples ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
  return smollm2_tokenizer


@pytest.fixture(scope="module")
def essay_stream(tokenizer):
  from kvjax.loading import assets
  with open(assets.fetch("ruler-data") / "PaulGrahamEssays.json") as f:
    text = " ".join(json.load(f)["text"].split())
  return np.asarray(tokenizer.encode(text, add_special_tokens=False))


def _offset(stream, window):
  """Where `window` occurs in the token stream (the first place)."""
  window = np.asarray(window)
  for start in np.flatnonzero(stream[:len(stream) - len(window) + 1] == window[0]):
    if np.array_equal(stream[start:start + len(window)], window):
      return int(start)
  raise AssertionError("window not found in the essays")


def _assert_disjoint_windows(samples, stream, context_tokens, continuation_tokens):
  spans = []
  for s in samples:
    assert len(s.context_ids) == context_tokens
    assert len(s.continuation_ids) == continuation_tokens
    start = _offset(stream, s.context_ids + s.continuation_ids)
    spans.append((start, start + context_tokens + continuation_tokens))
  spans.sort()
  assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_essay_samples_are_disjoint_exact_windows(tokenizer, essay_stream):
  samples = fidelity.essay_samples(tokenizer, 100, 20, num_samples=12, seed=3)
  assert samples == fidelity.essay_samples(tokenizer, 100, 20, num_samples=12, seed=3)
  assert samples != fidelity.essay_samples(tokenizer, 100, 20, num_samples=12, seed=4)
  assert len(samples) == 12
  assert tokenizer.encode("x", add_special_tokens=True) == tokenizer.encode(
      "x", add_special_tokens=False)  # SmolLM2 adds no BOS, so all 120 tokens are text
  _assert_disjoint_windows(samples, essay_stream, 100, 20)
  # Every window the essays hold: only a tiling of the text keeps them all apart.
  windows = len(essay_stream) // 8192
  dense = fidelity.essay_samples(tokenizer, 8000, 192, num_samples=windows, seed=1)
  assert len(dense) == windows
  _assert_disjoint_windows(dense, essay_stream, 8000, 192)


class _WithBos:
  """SmolLM2's tokenizer, adding BOS (id 1) like a Llama tokenizer does."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def encode(self, text, add_special_tokens=True):
    return [1] * add_special_tokens + self.tokenizer.encode(text, add_special_tokens=False)


def test_essay_contexts_start_with_bos_when_the_tokenizer_adds_it(tokenizer, essay_stream):
  samples = fidelity.essay_samples(_WithBos(tokenizer), 64, 16, num_samples=3, seed=0)
  for s in samples:
    assert len(s.context_ids) == 64 and len(s.continuation_ids) == 16
    assert s.context_ids[0] == 1
    _offset(essay_stream, s.context_ids[1:] + s.continuation_ids)  # 79 text tokens


def test_bad_essay_sample_arguments(tokenizer, essay_stream):
  with pytest.raises(GenerationError, match="context_tokens=0 must be an integer >= 1"):
    fidelity.essay_samples(tokenizer, 0, 16, 1)
  with pytest.raises(GenerationError, match="continuation_tokens=-2"):
    fidelity.essay_samples(tokenizer, 16, -2, 1)
  windows = len(essay_stream) // 1024
  with pytest.raises(GenerationError, match=f"num_samples={windows + 1} must be an integer "
                                            f"in 1..{windows}"):
    fidelity.essay_samples(tokenizer, 1000, 24, windows + 1)
  assert len(fidelity.essay_samples(tokenizer, 1000, 24, windows)) == windows
  with pytest.raises(GenerationError, match="num_samples=0"):
    fidelity.essay_samples(tokenizer, 16, 16, 0)
  with pytest.raises(GenerationError, match="needs a tokenizer"):
    fidelity.essay_samples(None, 16, 16, 1)


# -- SmolLM2 ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_on_the_essays(smollm2):
  samples = fidelity.essay_samples(smollm2.tokenizer, 512, 64, num_samples=2, seed=0)
  ref = [fidelity.reference(smollm2, samples)]
  full = fidelity.evaluate(smollm2, samples, batch_size=2, reference=ref)
  snap = fidelity.evaluate(smollm2, samples, "snapkv", compression_ratio=0.5, batch_size=2,
                           reference=ref)
  print(f"\nfull {full}\nsnapkv 0.5 {snap}")
  assert full["tokens"] == snap["tokens"] == 128
  assert full["kl"] == pytest.approx(0.0, abs=1e-6) and full["top1"] == 1.0
  assert 10 < full["perplexity"] < 40
  assert snap["kl"] > 1e-3 and snap["top1"] < 1.0
