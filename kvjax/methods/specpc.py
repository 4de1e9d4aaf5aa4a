"""SpecPC: prompt compression by a draft model's attention (Galim et al., "Draft-based
Approximate Inference for LLMs", arXiv 2506.08373; official code
furiosa-ai/draft-based-approx-llm, `specpc/specpc.py` and `specpc/specpc_utils.py`).

The draft reads the prompt and writes `lookahead` (1) tokens. From its layer
`starting_layer` (8) on, each layer records the attention of the prompt's last `window` (64)
queries, weighted by linspace(0, 1) over those rows, and of each generated token; a prompt
token scores the most any head, row, layer and step gives it. Scores are max-pooled (kernel
`kernel_size`, 32, centred, zero padding); the top `budget` tokens, in score order, each
bring their `neighbor_tokens` (32) nearest neighbours (nearest first); the last `window`
prompt tokens go first; the list is de-duplicated, cut to the budget and sorted by position.
The target then reads only those tokens, from scratch: positions are renumbered, and its
cache is the full cache of the shorter prompt.

Draft: the target's first `draft_fraction` (0.5) of layers (`kvjax.model.truncated`), as
for SpecKV: no same-tokenizer sibling of the registry models is available offline.
`starting_layer` is clamped to the draft's last layer. Where kvjax differs from the code:
its batch is one row (`assert batch_size == 1`); kvjax scores each row of a batch alike.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from kvjax.cache.kv_cache import Cache
from kvjax.errors import MethodError
from kvjax.methods import base, registry
from kvjax.ops import attention as attention_ops
from kvjax.ops.host import host_array


@dataclasses.dataclass(frozen=True)
class AttentionRecorder:
  """A cache policy for the draft: stores every token (as the full cache) and returns, with
  the cache, each recorded layer's [B, S] largest attention over heads and the chunk's last
  `window` real queries (weighted by linspace(0, 1) over those rows when there are several).
  Layers below `first_layer` return None."""
  window: int
  first_layer: int
  weighted: bool = True
  compress = True   # the engine must not donate the cache it returns inside a tuple

  def prepare(self, layer, layer_cache, new):
    del layer
    return layer_cache.append(new), None, frozenset()

  def update(self, layer, layer_cache, step, stats):
    del stats
    if layer < self.first_layer:
      return layer_cache, None
    w = min(self.window, step.queries.shape[1])
    q = step.queries[:, -w:].astype(jnp.float32)
    probs = attention_ops.probabilities(q, layer_cache.keys.astype(jnp.float32),
                                        step.new.positions[:, -w:], layer_cache.positions)
    b, k, g, rows, s = probs.shape
    if self.weighted and rows > 1:
      probs = probs * jnp.linspace(0.0, 1.0, rows)[:, None]
    return layer_cache, probs.max(axis=(1, 2, 3))

  def finish(self, layers, lengths):
    recorded = [score for _, score in layers if score is not None]
    return Cache(layers=tuple(cache for cache, _ in layers), lengths=lengths), recorded


def select_tokens(scores: np.ndarray, budget: int, window: int, kernel_size: int,
                  neighbor_tokens: int) -> np.ndarray:
  """Sorted indices (into a row of n tokens) that SpecPC keeps, from scores [n]."""
  n = len(scores)
  if budget >= n:
    return np.arange(n)
  left = (kernel_size - 1) // 2
  padded = np.pad(np.asarray(scores, np.float64), (left, kernel_size - 1 - left))
  pooled = np.lib.stride_tricks.sliding_window_view(padded, kernel_size).max(-1)
  ranked = np.lexsort((np.arange(n), -pooled))[:budget]
  if neighbor_tokens > 0:
    offsets = np.arange(-((neighbor_tokens - 1) // 2),
                        neighbor_tokens - 1 - (neighbor_tokens - 1) // 2 + 1)
    offsets = offsets[np.argsort(np.abs(offsets), kind="stable")]
    ranked = np.clip((ranked[:, None] + offsets).reshape(-1), 0, n - 1)
  order = np.concatenate([np.arange(n - min(window, n), n), ranked])
  _, first = np.unique(order, return_index=True)
  return np.sort(order[np.sort(first)][:budget])


@registry.register
@dataclasses.dataclass(frozen=True)
class SpecPC(base.Method):
  """The draft's attention picks the prompt tokens the target reads (see the module
  docstring)."""
  name: ClassVar[str] = "specpc"
  family: ClassVar[str] = "prompt"
  compresses_prompt: ClassVar[bool] = True
  window: int = 64
  lookahead: int = 1
  kernel_size: int = 32
  neighbor_tokens: int = 32
  starting_layer: int = 8
  draft_fraction: float = 0.5
  weighted: bool = True

  def __post_init__(self):
    base.check_int("window", self.window, 0)
    base.check_int("lookahead", self.lookahead, 1)
    base.check_int("kernel_size", self.kernel_size, 1)
    base.check_int("neighbor_tokens", self.neighbor_tokens, 0)
    base.check_int("starting_layer", self.starting_layer, 0)
    base.check_fraction("draft_fraction", self.draft_fraction, low_open=True)

  def protected_tokens(self, keep):
    return min(self.window, keep)

  def fitted(self, keep):
    """Under a budget of at most the window, the window shrinks to budget - 1 tokens (the
    code would keep the window's oldest tokens)."""
    shrunk = base.shrink_protection(keep, window=(self.window, 0))
    return dataclasses.replace(self, **shrunk) if shrunk else self

  def score(self, x):
    raise MethodError("specpc compresses the prompt's tokens before the target reads them; "
                      "it has no per-chunk score")

  def draft_layers(self, num_layers):
    return max(1, int(round(num_layers * self.draft_fraction)))

  def recorder(self, draft_layers: int) -> AttentionRecorder:
    return AttentionRecorder(self.window, min(self.starting_layer, draft_layers - 1),
                             self.weighted)

  @staticmethod
  def prompt_scores(recorded_passes, positions: np.ndarray) -> list[np.ndarray]:
    """Per row, its real tokens' scores: the max over passes and recorded layers of each
    pass's [B, S], read at the prompt's slots (positions [B, S] after the draft's prefill)."""
    best = None
    for recorded in recorded_passes:
      layers = np.stack([host_array(r)[:, :positions.shape[1]] for r in recorded])
      best = layers.max(0) if best is None else np.maximum(best, layers.max(0))
    return [best[row][positions[row] >= 0] for row in range(len(positions))]

  def compressed_rows(self, rows: list[list[int]], scores: np.ndarray, keep: int
                      ) -> list[list[int]]:
    """Each row's kept tokens; scores [B, n_b] per row (its real tokens, in order)."""
    return [[row[i] for i in select_tokens(score, keep, self.window, self.kernel_size,
                                           self.neighbor_tokens)]
            for row, score in zip(rows, scores)]
