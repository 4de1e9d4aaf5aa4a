"""EpiCache: episodic KV caches for long conversations under a fixed budget (Kim et al., 2025,
arXiv 2509.17396; official code apple/ml-epicache).

The conversation is clustered into E episodes; each episode gets its own compressed cache,
built by block-wise prefill: after every block of the context is appended, an uncached
forward pass of the episode's "patched prompt" (an instruction to extract the facts, the
chat template's opening of the assistant turn, then P_e: the episode's most central windows)
reads the cache, and every cached slot scores the largest softmax probability any patched
query of its KV group gives it (softmax over the cached slots only, as the official
`_get_score_flatten`). Each layer then keeps its budget of the best slots per KV head; the
chat template's system prefix is never evicted. At question time the question goes to the
episode whose centroid is nearest (`kvjax.generation.episodes`). This module holds the
method's hyperparameters, the scoring pass, the eviction step and the sensitivity-based
layer allocation; the episode clustering and the block loop live in
`kvjax.generation.episodes`.

Reading of the official code, and where kvjax differs:
- Eviction level: `level="uniform"` keeps the top-M_l slots of each KV head (a dense
  layer). `level="pair"`, the official default, keeps one top-(M_l * H_kv) over all the
  layer's heads, so heads hold different numbers of slots: between blocks the layer stays
  dense, its capacity the fullest head rounded up to a multiple of M_l (at most M_l *
  H_kv: few shapes to compile; peak memory can exceed the uniform level's), and the
  finished cache is stored head-wise (the flat
  layout: exactly M_l * H_kv slots per layer, as the official varlen storage). kvjax's
  default stays "uniform" so that the committed results keep their meaning.
- The system prefix counts inside the layer budget here (the official keeps it on top of it),
  so a cache never holds more than its budget per head.
- The patched prompt's positions continue the cache (`lengths` onward); the official starts
  them one earlier (at the block's last position).
- Layer budgets: `sensitivity` holds the offline per-layer key similarities s_l (official
  `layer_profile.py`: full causal vs block-masked prefill); budgets then follow the official
  `allocate_layer_budget` (M_l = int(L*M*w_l/sum w), w_l = (1 - minmax(s)_l)^alpha, floored
  at max(1, M // 4); uniform when all s_l are equal). Compute it once per model with
  `kvjax.generation.episodes.layer_sensitivity` (official defaults: 4096-token blocks, 128
  sinks, 50% overlap, 100-token windows) on a long text; kvjax stores no profile (the paper's
  comes from a 16K BookSum sample), so the default empty `sensitivity` gives every layer M.
- Episodes are embedded with the served model's own mean-pooled final hidden states (no
  sentence encoder offline; the official uses MiniLM or Qwen3-Embedding), and K-means starts
  deterministically (see kvjax/generation/episodes.py).
- The method runs through `kvjax.generation.episodes` (it needs the conversation's windows
  and an extra pass per block); it has no per-chunk score, so generate/converse refuse it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.kv_cache import EMPTY_POSITION, LayerCache
from kvjax.errors import MethodError
from kvjax.methods import base, registry
from kvjax.methods.kvzip import ScoringProbe, max_probabilities

LEVELS = ("uniform", "pair")   # top-M_l per KV head; one top-(M_l * H_kv) per layer

# The official "clustering" scorer's instruction (model/wrapper.py, token_scoring).
INSTRUCTION = ("\n\nExtract essential information from this conversation segment. Identify "
               "speaker names, personas, key events with dates/times, personal details, "
               "commitments, opinions, relationships, emotional moments, and unique "
               "experiences.")


def patched_scores(queries, keys, key_positions, query_positions, block: int = 256):
  """[B, K, S] float32: the largest probability any real patched query of a KV head's group
  gives each cached slot, each query's softmax running over the real cached slots only (the
  patched tokens' own keys are not candidates). queries [B, T, H, D] post-RoPE, keys
  [B, K, S, D], key_positions [B, K, S] (negative = empty, scores 0), query_positions [B, T]
  (negative = padding). Queries are taken `block` at a time (memory O(block * S))."""
  return max_probabilities(queries, keys, key_positions >= 0, None, query_positions, block)


@dataclasses.dataclass(frozen=True)
class PatchedPromptProbe(ScoringProbe):
  """The scoring pass: the patched prompt attends over the cache (and itself) without being
  stored; each layer returns its `patched_scores` in place of its cache."""
  label = "epicache"

  def scores(self, layer_cache, step):
    return patched_scores(step.queries, layer_cache.keys, layer_cache.positions,
                          step.new.positions)


def evicted(layer: LayerCache, scores: jax.Array, keep: int, system_tokens: int) -> LayerCache:
  """The layer keeping each KV head's `keep` best slots by `scores` [B, K, S] (slots at
  positions below system_tokens always, empty slots last), in slot order; unchanged when it
  holds no more than `keep` slots."""
  if layer.capacity <= keep:
    return layer
  prio = jnp.where(layer.positions < system_tokens, base.PROTECTED, scores)
  prio = jnp.where(layer.positions >= 0, prio, -jnp.inf)
  _, index = jax.lax.top_k(prio, keep)
  return layer.select(jnp.sort(index, axis=-1))


def evicted_pair(layer: LayerCache, scores: jax.Array, keep: int,
                 system_tokens: int) -> LayerCache:
  """The "pair" level: the layer keeping its `keep * K` best slots over all KV heads by
  `scores` [B, K, S] (ties to the lower head, then slot; positions below system_tokens
  always). Shapes stay [B, K, S] (jit): evicted slots are emptied, and the caller compacts
  (`episodes.block_prefill`: between blocks to the fullest head rounded up to a multiple of
  `keep`, at the end into the head-wise layout). Unchanged when it holds no more than
  `keep` per head."""
  if layer.capacity <= keep:
    return layer
  b, k, s = scores.shape
  prio = jnp.where(layer.positions < system_tokens, base.PROTECTED, scores)
  prio = jnp.where(layer.positions >= 0, prio, -jnp.inf).reshape(b, k * s)
  _, index = jax.lax.top_k(prio, keep * k)
  chosen = jnp.zeros((b, k * s), bool).at[jnp.arange(b)[:, None], index].set(True)
  chosen = chosen.reshape(b, k, s) & (layer.positions >= 0)
  return layer.replace(positions=jnp.where(chosen, layer.positions, EMPTY_POSITION))


def allocate_layer_budgets(sensitivity, keep: int, alpha: float) -> tuple[int, ...]:
  """Per-layer budgets from key similarities s_l (official `allocate_layer_budget`): layers
  whose keys change most under block-wise prefill (low s_l) get more. M_l = int(L*keep*w_l /
  sum(w)) with w_l = (1 - minmax(s)_l)^alpha, each at least max(1, keep // 4); the floor can
  push the total above L*keep (as in the official code). Uniform when all s_l are equal."""
  s = np.asarray(sensitivity, np.float64)
  if s.max() == s.min():
    return (keep,) * len(s)
  weights = (1.0 - (s - s.min()) / (s.max() - s.min())) ** alpha
  budgets = (weights * (keep * len(s)) / weights.sum()).astype(np.int64)
  return tuple(int(b) for b in np.maximum(budgets, max(1, keep // 4)))


@registry.register
@dataclasses.dataclass(frozen=True)
class EpiCache(base.Method):
  """Episodic caches (see the module docstring). Defaults as the official scripts: E=4
  episodes, M_med=8 medoid windows per episode, windows of c=4 utterances (sentences for
  plain text), 2048-token prefill blocks, alpha=1.1, no sensitivity profile (uniform);
  the eviction level is kvjax's "uniform" (the official "pair": `level="pair"`)."""
  name: ClassVar[str] = "epicache"
  family: ClassVar[str] = "episodes"
  wrappable: ClassVar[bool] = False
  episodes: int = 4
  medoids: int = 8
  window: int = 4
  block_size: int = 2048
  alpha: float = 1.1
  sensitivity: tuple = ()
  level: str = "uniform"

  def __post_init__(self):
    base.check_int("episodes", self.episodes, 1)
    base.check_int("medoids", self.medoids, 1)
    base.check_int("window", self.window, 1)
    base.check_int("block_size", self.block_size, 1)
    base.check_number("alpha", self.alpha, 0, what="the allocation's exponent (0 = uniform)")
    if not isinstance(self.sensitivity, tuple):
      raise MethodError(f"sensitivity={self.sensitivity!r} must be a tuple of per-layer key "
                        f"similarities in [-1, 1] (empty for uniform budgets)")
    base.check_choice("level", self.level, LEVELS)
    for i, s in enumerate(self.sensitivity):
      base.check_number(f"sensitivity[{i}]", s, -1, 1, what="a cosine similarity")

  @property
  def label(self) -> str:
    """'epicache' with every hyperparameter that differs from its default, so sweeps over
    them keep their results apart."""
    return base.spec_label(self)

  def layer_budgets(self, config, keep, context_length):
    del context_length
    if not self.sensitivity or self.alpha == 0:
      return (keep,) * config.num_layers
    if len(self.sensitivity) != config.num_layers:
      raise MethodError(f"epicache sensitivity has {len(self.sensitivity)} values; the model "
                        f"has {config.num_layers} layers")
    return allocate_layer_budgets(self.sensitivity, keep, self.alpha)

  def score(self, x):
    raise MethodError("epicache builds one cache per episode of a conversation; run it with "
                      "kvjax.generation.episodes (prefill_episodes, then answer), not as a "
                      "per-chunk scorer in generate or converse")
