"""Periodic evaluation during training (`LoopSettings.eval_every`).

A trained selector is evaluated as inference will use it: the method built from the
current parameters compresses held-out essay contexts at `compression_ratio`, and the
evaluation suite's fidelity metrics (`kvjax.evaluation.fidelity`: perplexity of the
continuation, KL to the full cache and top-1 agreement) say how much the compression
costs. A student model (X-EcoMLA) is evaluated against its teacher on the same windows:
its perplexity and KL(teacher || student), both with full caches. The essay windows
are drawn once per run (fixed by `seed`) and the full-cache reference is computed once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import validation
from kvjax.errors import KvjaxError
from kvjax.evaluation import fidelity


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  samples: int = 4                 # held-out essay windows
  context_tokens: int = 512        # per window: the context that is compressed ...
  continuation_tokens: int = 64    # ... and the continuation that is scored
  compression_ratio: float = 0.5   # of the context (trained selectors)
  batch_size: int = 2
  seed: int = 1000                 # the windows' draw

  def __post_init__(self):
    validation.integer("eval samples", self.samples, 1, error=KvjaxError)
    validation.integer("eval context_tokens", self.context_tokens, 2, error=KvjaxError)
    validation.integer("eval continuation_tokens", self.continuation_tokens, 1,
                       error=KvjaxError)
    validation.number("eval compression_ratio", self.compression_ratio, 0, 1,
                      high_open=True, error=KvjaxError)
    validation.integer("eval batch_size", self.batch_size, 1, error=KvjaxError)
    validation.integer("eval seed", self.seed, 0, error=KvjaxError)

  def draw(self, tokenizer):
    return fidelity.essay_samples(tokenizer, self.context_tokens, self.continuation_tokens,
                                  self.samples, seed=self.seed)


def _metrics(result: dict) -> dict:
  return {"perplexity": result["perplexity"], "kl": result["kl"], "top1": result["top1"]}


def method_evaluator(model, method_of: Callable[[Any], Any],
                     settings: EvalSettings = EvalSettings(), with_ratio: bool = True,
                     budget: int | None = None,
                     prefill_chunk_size: int | None = None) -> Callable[[Any], dict]:
  """evaluate(params) -> {"perplexity", "kl", "top1"} of the method `method_of(params)`
  against the full cache, on held-out essay windows, compressing at the settings' ratio,
  or at `budget` when given (weights that fix their budget: LoCoCo), or as the method
  decides (with_ratio=False: gates); contexts read in chunks of `prefill_chunk_size`."""
  ratio = settings.compression_ratio if with_ratio and budget is None else None
  samples = settings.draw(model.tokenizer)
  references = []

  def evaluate(params) -> dict:
    if not references:   # once per run, at the first evaluation
      references.extend(fidelity.reference(model, batch)
                        for batch in fidelity.batches(samples, settings.batch_size))
    return _metrics(fidelity.evaluate(model, samples, method_of(params), ratio, budget,
                                      batch_size=settings.batch_size, reference=references,
                                      prefill_chunk_size=prefill_chunk_size))

  return evaluate


def student_evaluator(teacher, student_of: Callable[[Any], Any], logits_of: Callable,
                      settings: EvalSettings = EvalSettings()) -> Callable[[Any], dict]:
  """evaluate(params) -> the student `student_of(params)`'s {"perplexity", "kl", "top1"}
  on the continuations of held-out essay windows against `teacher` (full caches both);
  logits_of(model, tokens, mask) -> [B, T, V] reads whole rows."""
  samples = settings.draw(teacher.tokenizer)
  if len({len(s.context_ids) for s in samples}) != 1:   # essay windows all have one length
    raise KvjaxError("student evaluation reads windows of one context length; got "
                     f"{sorted({len(s.context_ids) for s in samples})}")
  rows = [list(s.context_ids) + list(s.continuation_ids) for s in samples]
  tokens = jnp.asarray(np.array(rows, np.int32))
  mask = jnp.ones(tokens.shape, bool)
  start = len(samples[0].context_ids)
  cached = {}

  def log_probs(model, batch):
    logits = logits_of(model, tokens[batch], mask[batch])[:, start - 1:-1]
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  def evaluate(params) -> dict:
    student = student_of(params)
    nll = kl = agree = count = 0.0
    for first in range(0, len(rows), settings.batch_size):
      batch = slice(first, first + settings.batch_size)
      if first not in cached:
        cached[first] = log_probs(teacher, batch)
      p, q = cached[first], log_probs(student, batch)
      targets = tokens[batch, start:]
      nll -= float(jnp.take_along_axis(q, targets[..., None], -1).sum())
      kl += float((jnp.exp(p) * (p - q)).sum())
      agree += float((p.argmax(-1) == q.argmax(-1)).sum())
      count += targets.size
    return {"perplexity": math.exp(nll / count), "kl": kl / count, "top1": agree / count}

  return evaluate

