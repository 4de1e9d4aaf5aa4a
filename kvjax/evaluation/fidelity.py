"""Fidelity of a compressed cache on real text: perplexity, KL and top-1 against the full cache.

A sample is a window of the Paul Graham essays split into a context (prefilled, then
compressed) and a continuation (read through the cache, uncompressed, as in kvjax.score).
Per continuation token we compare the compressed cache's next-token distribution q with
the full cache's p: the negative log-likelihood of the true token under q (perplexity),
KL(p || q), and whether argmax p == argmax q.

The full-cache distributions are [B, T, V] float32 per batch, so a sweep keeps one batch's
reference at a time and evaluates every method against it before moving on:

    samples = fidelity.essay_samples(model.tokenizer, 2048, 128, num_samples=64)
    results = collections.defaultdict(list)
    for batch in fidelity.batches(samples, batch_size=4):
      ref = fidelity.reference(model, batch)
      for method, ratio in pairs:
        results[method, ratio].append(fidelity.evaluate(
            model, batch, method, ratio, batch_size=len(batch), reference=[ref]))
    summary = {key: fidelity.combine(parts) for key, parts in results.items()}

`evaluate(model, samples, method, ratio)` alone does the same for one method, computing the
reference batch by batch itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import calibration
from kvjax import methods as methods_lib
from kvjax.errors import GenerationError
from kvjax.evaluation import data
from kvjax.generation import context as context_lib
from kvjax.generation import inputs
from kvjax.generation.generate import check_context_length
from kvjax.generation.score import continuation_log_probs



@dataclasses.dataclass(frozen=True)
class Sample:
  """A context (compressed) and the continuation scored after it, as token ids."""
  context_ids: tuple[int, ...]
  continuation_ids: tuple[int, ...]

  def __post_init__(self):
    for name in ("context_ids", "continuation_ids"):
      ids = tuple(int(t) for t in getattr(self, name))
      if not ids:
        raise GenerationError(f"Sample.{name} is empty; it needs at least 1 token")
      object.__setattr__(self, name, ids)  # frozen: normalise to a tuple of ints once


@dataclasses.dataclass(frozen=True, eq=False)
class Reference:
  """Full-cache next-token distributions of one batch of samples (see `reference`)."""
  samples: tuple[Sample, ...]
  log_probs: jax.Array  # [B, T, V] float32, T = inputs.bucket(longest continuation)
  targets: jax.Array    # [B, T] int32: continuation ids, right-padded
  mask: jax.Array       # [B, T] bool: the valid (non-padding) positions


# -- samples ----------------------------------------------------------------------------------


def _positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise GenerationError(f"{name}={value!r} must be an integer >= 1")
  return int(value)


@functools.lru_cache(maxsize=4)
def _essay_tokens(tokenizer) -> np.ndarray:
  # Tokenizing the ~3 MB of essays takes seconds: once per tokenizer.
  ids = np.asarray(tokenizer.encode(data.essays_text(), add_special_tokens=False), np.int32)
  ids.flags.writeable = False
  return ids


def _special_prefix(tokenizer) -> list[int]:
  """The tokens encode(add_special_tokens=True) puts before the text (e.g. BOS), as in score."""
  probe = "The"
  special = tokenizer.encode(probe, add_special_tokens=True)
  plain = tokenizer.encode(probe, add_special_tokens=False)
  for start in range(len(special) - len(plain) + 1):
    if special[start:start + len(plain)] == plain:
      return list(special[:start])
  raise GenerationError(f"tokenizer encodes {probe!r} as {plain} without special tokens but "
                        f"{special} with them; cannot tell which special tokens lead")


def essay_samples(tokenizer, context_tokens: int, continuation_tokens: int, num_samples: int,
                  seed: int = 0) -> list[Sample]:
  """Non-overlapping windows of the Paul Graham essays, chosen at random by `seed`.

  The essays (whitespace collapsed) are tokenized once and cut into consecutive windows;
  `num_samples` distinct windows are drawn and returned in text order. A context starts
  with the special tokens the tokenizer adds to text (BOS if it adds one, as kvjax.score
  does), followed by text; each sample has exactly context_tokens + continuation_tokens
  tokens.

  Args:
    tokenizer: a kvjax Tokenizer (anything with encode(text, add_special_tokens)).
    context_tokens: tokens per context, special tokens included (>= 1).
    continuation_tokens: tokens per continuation (>= 1).
    num_samples: windows to draw (at most as many as the essays hold).
    seed: the draw's seed; the same seed gives the same samples.

  Returns:
    A list of `num_samples` Samples.
  """
  if tokenizer is None:
    raise GenerationError("essay_samples needs a tokenizer; the model has none")
  context_tokens = _positive_int(context_tokens, "context_tokens")
  continuation_tokens = _positive_int(continuation_tokens, "continuation_tokens")
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise GenerationError(f"seed={seed!r} must be a non-negative integer")
  prefix = _special_prefix(tokenizer)
  if context_tokens < len(prefix):
    raise GenerationError(f"context_tokens={context_tokens} is shorter than the "
                          f"{len(prefix)} special tokens every context starts with; allowed: "
                          f">= {len(prefix)}")
  stream = _essay_tokens(tokenizer)
  text_tokens = context_tokens - len(prefix)
  window = text_tokens + continuation_tokens
  windows = len(stream) // window
  if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or not (
      1 <= num_samples <= windows):
    raise GenerationError(f"num_samples={num_samples!r} must be an integer in 1..{windows}: "
                          f"the essays' {len(stream)} tokens hold {windows} non-overlapping "
                          f"windows of {window} text tokens")
  starts = np.sort(np.random.default_rng(seed).choice(windows, num_samples, replace=False))
  samples = []
  for start in starts * window:
    ids = stream[start:start + window].tolist()
    samples.append(Sample(tuple(prefix + ids[:text_tokens]), tuple(ids[text_tokens:])))
  return samples


def batches(samples: Sequence[Sample], batch_size: int) -> list[tuple[Sample, ...]]:
  """Consecutive groups of `batch_size` samples (the last may be smaller), as evaluate uses."""
  samples = _check_samples(samples)
  batch_size = _positive_int(batch_size, "batch_size")
  return [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]


def _check_samples(samples) -> tuple[Sample, ...]:
  if isinstance(samples, Sample) or not isinstance(samples, (list, tuple)) or not samples:
    raise GenerationError(f"samples must be a non-empty list of Sample; got {samples!r:.80}")
  for i, s in enumerate(samples):
    if not isinstance(s, Sample):
      raise GenerationError(f"samples[{i}] must be a Sample, got {type(s).__name__}")
  return tuple(samples)


# -- metrics ----------------------------------------------------------------------------------


def token_metrics(full_log_probs, log_probs, targets, mask) -> dict[str, jax.Array]:
  """Per-row sums of the fidelity metrics over the valid positions.

  Args:
    full_log_probs: [B, T, V] log-probabilities under the full cache (p).
    log_probs: [B, T, V] log-probabilities under the compressed cache (q).
    targets: [B, T] int token ids that follow each position.
    mask: [B, T] bool, True at valid positions.

  Returns:
    A dict of [B] arrays: nll_sum (-sum log q(target)), kl_sum (sum of KL(p || q) in nats),
    top1_agree (positions where argmax p == argmax q) and tokens (valid positions).
  """
  mask = jnp.asarray(mask, bool)
  full_log_probs = jnp.asarray(full_log_probs, jnp.float32)
  log_probs = jnp.asarray(log_probs, jnp.float32)
  p = jnp.exp(full_log_probs)
  # Tokens p rules out (log p = -inf) contribute 0, not 0 * (-inf - log q) = NaN.
  # KL >= 0; rounding can leave a position at -1e-9, which would read as a negative KL.
  kl = jnp.maximum(jnp.where(p > 0, p * (full_log_probs - log_probs), 0.0).sum(-1), 0.0)
  nll = -jnp.take_along_axis(log_probs, jnp.asarray(targets, jnp.int32)[..., None], -1)[..., 0]
  agree = jnp.argmax(full_log_probs, -1) == jnp.argmax(log_probs, -1)
  # where, not multiply: padded positions may hold inf and must not reach the sums.
  return {"nll_sum": jnp.where(mask, nll, 0.0).sum(-1),
          "kl_sum": jnp.where(mask, kl, 0.0).sum(-1),
          "top1_agree": (agree & mask).sum(-1, dtype=jnp.int32),
          "tokens": mask.sum(-1, dtype=jnp.int32)}


_token_metrics = jax.jit(token_metrics)


def _summary(nll: float, kl: float, agree: float, tokens: int) -> dict:
  return {"perplexity": math.exp(float(nll) / tokens), "kl": float(kl) / tokens,
          "top1": float(agree) / tokens, "tokens": int(tokens)}


def combine(results: Sequence[dict]) -> dict:
  """One result from `evaluate` results on disjoint samples, weighted by their tokens."""
  if not results:
    raise GenerationError("combine needs at least one evaluate result")
  tokens = sum(r["tokens"] for r in results)
  # Perplexity is exp(mean nll), so its log times the tokens gives back the nll sum.
  return _summary(sum(math.log(r["perplexity"]) * r["tokens"] for r in results),
                  sum(r["kl"] * r["tokens"] for r in results),
                  sum(r["top1"] * r["tokens"] for r in results), tokens)


# -- caches and distributions -----------------------------------------------------------------


def _width(samples: Sequence[Sample], room: int | None) -> int:
  """Room the continuations need (their bucketed longest length), checked against `room`."""
  width = inputs.bucket(max(len(s.continuation_ids) for s in samples))
  if room is not None and (isinstance(room, bool) or not isinstance(room, numbers.Integral)
                           or room < width):
    raise GenerationError(f"room={room!r} is too small for continuations of up to "
                          f"{max(len(s.continuation_ids) for s in samples)} tokens; allowed: "
                          f"an integer >= {width}")
  return width if room is None else int(room)


def prefill_batch(model, samples: Sequence[Sample], method=None, compression_ratio=None,
                  budget=None, room: int | None = None,
                  prefill_chunk_size: int | None = None) -> context_lib.PrefilledContext:
  """The samples' contexts prefilled (and compressed) as one batch, as kvjax.score does.

  Contexts are left-padded; `compression_ratio` applies to the longest context of the batch
  and `budget` is a cap (methods.validate_compression). `room` defaults to the
  bucketed longest continuation. prefill_chunk_size: read the contexts in chunks of that
  many tokens (compressing after each, for methods that do), as kvjax.generate does. The
  result
  serves one `continuation_log_probs` call.
  """
  samples = _check_samples(samples)
  for i, s in enumerate(samples):
    check_context_length(model, len(s.context_ids) + len(s.continuation_ids),
                         f"sample {i} (context + continuation)")
  method_obj = calibration.bind(method, model)
  contexts = [list(s.context_ids) for s in samples]
  keep = methods_lib.validate_compression(method_obj, [len(c) for c in contexts],
                                          compression_ratio, budget)
  context_lib.check_chunk_size(prefill_chunk_size)
  width = inputs.context_width(max(len(c) for c in contexts), prefill_chunk_size)
  tokens, mask = inputs.left_pad(contexts, inputs.pad_id(model), width)
  return context_lib.prefill(model, tokens, mask, method_obj, keep, room=_width(samples, room),
                             chunk_size=prefill_chunk_size)


def _full_reference(model, samples: tuple[Sample, ...], room: int | None) -> Reference:
  conts = [list(s.continuation_ids) for s in samples]
  prefilled = prefill_batch(model, samples, room=room)
  targets, mask = inputs.right_pad(conts, inputs.pad_id(model))
  return Reference(samples=samples, log_probs=continuation_log_probs(model, prefilled, conts),
                   targets=jnp.asarray(targets), mask=jnp.asarray(mask))


def reference(model, samples: Sequence[Sample], room: int | None = None) -> Reference:
  """Full-cache distributions over the continuations of `samples`, run as one batch.

  Compute it once per batch and pass it (in a one-element list) to `evaluate` for every
  method compared on that batch; it holds len(samples) x T x V float32 on the device.

  Args:
    model: the model.
    samples: one batch of Samples (all of them are run together).
    room: free cache slots for the continuation; defaults to the bucketed longest one.

  Returns:
    A Reference for exactly these samples, in this order.
  """
  return _full_reference(model, _check_samples(samples), room)


def _per_batch(values, groups, name: str, kind: type, builder: str) -> list:
  if values is None:
    return [None] * len(groups)
  if not isinstance(values, (list, tuple)) or len(values) != len(groups) or not all(
      isinstance(v, kind) for v in values):
    raise GenerationError(f"{name} must be a list with one {builder} per batch of batch_size "
                          f"samples ({len(groups)} batches); got {values!r:.80}")
  return list(values)


def evaluate(model, samples: Sequence[Sample], method=None, compression_ratio=None,
             budget=None, batch_size: int = 4, reference: Sequence[Reference] | None = None,
             prefilled: Sequence[context_lib.PrefilledContext] | None = None,
             prefill_chunk_size: int | None = None) -> dict:
  """Perplexity, KL and top-1 agreement of a (compressed) cache against the full cache.

  Samples run in consecutive batches of `batch_size` (see `batches`). Per batch the full
  distributions are taken from `reference` or computed, the contexts are prefilled with the
  method (or taken from `prefilled`), and the metrics are reduced on the device; only [B]
  sums come back to the host. Device memory is bounded by one batch: two [B, T, V] float32
  arrays plus the caches.

  Args:
    model: the model.
    samples: Samples (e.g. from `essay_samples`).
    method, compression_ratio, budget: as in kvjax.score; None/None/None is the full
      cache. prefill_chunk_size: as in kvjax.generate.
    batch_size: samples per batch.
    reference: optional, one `reference(model, batch)` per batch (each must be for exactly
      that batch's samples): lets a sweep compute the full cache once for many methods.
    prefilled: optional, one `prefill_batch(model, batch, ...)` per batch, with room for
      its continuations; then method/compression_ratio/budget must be None, since the
      contexts already carry their compression. Each is consumed (its cache is donated).

  Returns:
    {"perplexity": exp(total nll / tokens), "kl": total KL(full || compressed) / tokens in
    nats, "top1": agreeing positions / tokens, "tokens": valid continuation tokens}.
  """
  samples = _check_samples(samples)
  groups = batches(samples, batch_size)
  references = _per_batch(reference, groups, "reference", Reference,
                          "reference(model, batch)")
  prefilled_contexts = _per_batch(prefilled, groups, "prefilled", context_lib.PrefilledContext,
                                  "prefill_batch(model, batch, ...)")
  if prefilled is not None and (method, compression_ratio, budget) != (None, None, None):
    raise GenerationError(f"prefilled contexts already carry their compression; got also "
                          f"method={method!r}, compression_ratio={compression_ratio!r}, "
                          f"budget={budget!r}: give one or the other")
  if prefilled is None:
    # Validate every batch first so a bad ratio or budget fails before any forward pass.
    method = calibration.bind(method, model)
    for group in groups:
      methods_lib.validate_compression(method, [len(s.context_ids) for s in group],
                                       compression_ratio, budget)
  for k, (group, ref) in enumerate(zip(groups, references)):
    if ref is not None and ref.samples != group:
      raise GenerationError(f"reference[{k}] is not the reference of batch {k} (samples "
                            f"{k * len(groups[0])}..{k * len(groups[0]) + len(group) - 1}); "
                            f"build it with reference(model, batch) for each batch")
  totals = np.zeros(4, np.float64)
  for group, ref, pre in zip(groups, references, prefilled_contexts):
    if ref is None:
      ref = _full_reference(model, group, None)
    if pre is None:
      pre = prefill_batch(model, group, method, compression_ratio, budget,
                          prefill_chunk_size=prefill_chunk_size)
    log_probs = continuation_log_probs(model, pre, [list(s.continuation_ids) for s in group])
    sums = _token_metrics(ref.log_probs, log_probs, ref.targets, ref.mask)
    totals += [np.asarray(sums[k], np.float64).sum()
               for k in ("nll_sum", "kl_sum", "top1_agree", "tokens")]
    # Drop this batch's arrays now, or the next batch's two [B, T, V] would join them.
    del ref, pre, log_probs, sums
  return _summary(*totals[:3], int(totals[3]))
