"""SpecKV: a draft model's lookahead as the observation window (Galim et al., "Draft-based
Approximate Inference for LLMs", arXiv 2506.08373; official code
furiosa-ai/draft-based-approx-llm, `speckv/util.py` `compress_kv`).

A draft model writes `lookahead` greedy tokens after the prompt; the target reads the
prompt's last `window` tokens followed by the draft tokens (that is SpecKV's observation
window w' = w + lookahead), and each earlier prompt key scores the largest attention any of
those queries of its KV group gives it, max-pooled along the keys (kernel 7, as the code).
Each KV head keeps the budget's top scores plus the `window` newest prompt tokens, so the
selection anticipates what the answer will need rather than what the prompt's tail asks.

Draft: a truncated-layer draft of the target (its first `draft_fraction` of the layers with
the embedding, final norm and head), since no same-tokenizer sibling of kvjax's registry
models is available offline; it is cheap and shares the tokenizer, but it is a weaker drafter
than a separately trained small model (the paper's Qwen2.5-0.5B for Qwen2.5-14B).

How kvjax runs it (a rescoring method, like KVzip): the prompt is prefilled uncompressed; the
draft continues it; one more target pass re-reads the window and the draft tokens at their
positions over that cache (which forgets its own window for the pass, so the attention is
exactly the target's prefill of prompt + draft for those rows) and returns the scores; the cache is
compressed once. The draft tokens never enter the cache: kvjax keeps `budget` prompt
tokens, where the code keeps budget - lookahead - 1 and crops the draft tokens' slots.
`lookahead` is bounded (32; the code's default writes the whole answer, max_new_tokens).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.errors import MethodError
from kvjax.methods import base, registry
from kvjax.methods.kvzip import ScoringProbe, max_probabilities


@dataclasses.dataclass(frozen=True)
class LookaheadProbe(ScoringProbe):
  """The lookahead pass over the cache (which has forgotten the window,
  `kvjax.generation.context.rewound`) plus its own tokens (window then draft): each layer's
  `max_probabilities`."""
  label = "speckv"

  def scores(self, layer_cache, step):
    return max_probabilities(step.queries, layer_cache.keys, layer_cache.positions >= 0,
                             step.new.keys, step.new.positions)


@registry.register
@dataclasses.dataclass(frozen=True)
class SpecKV(base.RecentWindow, base.Method):
  """The draft's lookahead votes for the prompt tokens each KV head keeps (see the module
  docstring); defaults: window 32 (the paper's configs), max-pool 7, lookahead 32, a draft
  of the target's first half."""
  name: ClassVar[str] = "speckv"
  rescores: ClassVar[bool] = True
  window: int = 32
  lookahead: int = 32
  kernel_size: int = 7
  draft_fraction: float = 0.5

  def __post_init__(self):
    base.check_int("window", self.window, 1)
    base.check_int("lookahead", self.lookahead, 1)
    base.check_int("kernel_size", self.kernel_size, 1)
    if self.kernel_size % 2 == 0:
      raise MethodError(f"kernel_size={self.kernel_size} must be odd (centred pooling)")
    base.check_fraction("draft_fraction", self.draft_fraction, low_open=True)

  def score(self, x):
    raise MethodError("speckv scores the prefilled prompt with a draft's lookahead; it has "
                      "no per-chunk score (use it as the method itself, not as a press)")

  def draft_layers(self, num_layers):
    return max(1, int(round(num_layers * self.draft_fraction)))

  def rescoring_policy(self) -> LookaheadProbe:
    return LookaheadProbe()

  def rescoring_passes(self, tokenizer, tokens, mask, draft=None):
    """One pass: each row's last `window` prompt tokens and the draft's `lookahead` tokens,
    re-read from the window's first position ("rewind")."""
    del tokenizer
    if draft is None:
      raise MethodError("speckv needs its draft model (kvjax builds it from the target)")
    contexts = [np.asarray(t)[np.asarray(m, bool)].tolist() for t, m in zip(tokens, mask)]
    drafted = draft(contexts, self.lookahead)
    window = [min(self.window, len(row)) for row in contexts]
    rows = [row[len(row) - w:] + list(extra) for row, w, extra in zip(contexts, window, drafted)]
    return [(rows, {"rewind": np.asarray(window, np.int32)})]

  def rescored(self, cache, scores, budgets):
    """Each layer keeps, per KV head, the window plus the top pooled scores."""
    (layer_scores,) = scores
    out = []
    for layer, score, keep in zip(cache.layers, layer_scores, budgets):
      window = base.window_mask(layer.positions, cache.lengths, self.window)
      pooled = base.pool1d(jnp.where(window, 0.0, score), self.kernel_size, "max")
      prio = jnp.where(window & (layer.positions >= 0), base.PROTECTED, pooled)
      prio = jnp.where(layer.positions >= 0, prio, -jnp.inf)
      if keep >= layer.capacity:
        out.append(layer.trimmed())
        continue
      _, index = jax.lax.top_k(prio, keep)
      out.append(layer.select(jnp.sort(index, axis=-1)))
    return cache.replace(layers=tuple(out))
