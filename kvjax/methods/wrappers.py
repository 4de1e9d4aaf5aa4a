"""Composition: sinks + window around any scorer, AdaKV head-wise budgets, layer schedules."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax import validation
from kvjax.cache import FlatLayerCache
from kvjax.methods import base, budgets, registry


@dataclasses.dataclass(frozen=True)
class Wrapper(base.Method):
  """Delegates every hook and capability to `press` unless a subclass overrides it."""
  press: base.Method | str = "snapkv"

  def __post_init__(self):
    # A method object or a registry name (so the CLI can pass press=snapkv).
    object.__setattr__(self, "press", registry.get(self.press))
    if not self.press.compresses:
      raise base.MethodError(f"{self.name} needs a compression method to wrap, got "
                             f"{self.press.name!r}")
    if self.press.family != "eviction":
      raise base.MethodError(
          f"{self.name} wraps token-selecting methods; {self.press.label!r} is a "
          f"{self.press.family} method, whose storage would ignore this wrapper. Wrap its "
          f"press instead, e.g. kivi:press=... with press={self.name}(snapkv)")

    if not self.press.wrappable or self.press.rescores or self.press.compresses_prompt:
      raise base.MethodError(
          f"{self.name} re-budgets a press's per-chunk scores; {self.press.label!r} selects "
          f"otherwise (its own budgets, passes or prompt choice): use it on its own")

  @property
  def label(self) -> str:
    # Its own non-default hyperparameters and its press's: configurations never share one.
    return f"{base.spec_label(self, skip=('press',))}({base.own_label(self.press)})"



def _forward(name):
  def hook(self, *args, **kwargs):
    return getattr(self.press, name)(*args, **kwargs)
  hook.__name__ = name
  return hook


for _hook in ("layer_budgets", "protected_tokens", "protected", "score", "init_state",
              "prefill_state", "accumulate", "cache_step", "between_chunks", "finalize",
              "content_nbytes", "cache_stats", "safeguard",
              "decode_scores", "eviction_priority", "absorb", "traces_budget"):
  setattr(Wrapper, _hook, _forward(_hook))
for _capability in ("decode_time", "needs", "headwise", "needs_budget", "family"):
  setattr(Wrapper, _capability, property(lambda self, _name=_capability: getattr(self.press,
                                                                                  _name)))


def _press_layerwise(self) -> bool:
  # Its own step reads no layer index and no parameters: the same at every layer where the
  # press's is (a wrapper declares it, so that one that may differ by layer does not inherit).
  return self.press.layerwise_prefill


@registry.register
@dataclasses.dataclass(frozen=True)
class SinksWindow(Wrapper):
  """Also keeps the first `sinks` tokens and the last `window` tokens, whatever the scores."""
  name: ClassVar[str] = "sinks_window"
  sinks: int = 4
  window: int = 32
  layerwise_prefill = property(_press_layerwise)

  def __post_init__(self):
    super().__post_init__()
    base.check_int("sinks", self.sinks, 0)
    base.check_int("window", self.window, 0)

  def protected_tokens(self, keep):
    return max(self.press.protected_tokens(keep), self.sinks + self.window)

  def fitted(self, keep):
    """The press fitted, and sinks + window shrunk in proportion to budget - 1."""
    outer = super().fitted(keep)
    shrunk = base.shrink_protection(keep, sinks=(self.sinks, 0), window=(self.window, 0))
    return dataclasses.replace(outer, **shrunk) if shrunk else outer

  def protected(self, key_positions, lengths, keep):
    return (self.press.protected(key_positions, lengths, keep)
            | base.sink_mask(key_positions, self.sinks)
            | base.window_mask(key_positions, lengths, self.window))


@registry.register
@dataclasses.dataclass(frozen=True)
class AdaKV(Wrapper):
  """Head-wise budgets: the heads of a layer share its budget by a top-k over all of them.

  Each head first keeps its best floor(alpha_safeguard x budget) tokens (and its protected
  ones); the remaining layer budget goes to the best scores across all heads (kvpress's
  safeguard form, which makes the layer's total exact). The cache is stored flat per head,
  so heads with smaller budgets really take less memory. Around a decode-time scorer (H2O,
  TOVA, Scissorhands, StreamingLLM) each decode token overwrites the lowest-priority slot
  of its own head's segment, so every head keeps its prefill share; TOVA's layer-wide mean
  then averages each slot's probability over all heads, of which only its own group sees it.
  """
  name: ClassVar[str] = "adakv"
  alpha_safeguard: float = 0.2
  layerwise_prefill = property(_press_layerwise)

  def __post_init__(self):
    super().__post_init__()
    base.check_fraction("alpha_safeguard", self.alpha_safeguard)

  @property
  def headwise(self):
    return True

  def safeguard(self, keep: int) -> int:
    return int(self.alpha_safeguard * keep)

  def compact(self, cand, x, keep):
    """The layer keeps num_kv_heads * keep slots, shared among heads by score: each head
    first keeps its `safeguard` best slots, the rest go to the best priorities over all
    heads. The result is flat: head h's kept slots form segment h, in slot order."""
    b, k, s, _ = cand.keys.shape
    cand = cand.replace(state=self.prefill_state(x))
    prio = base.priorities(self, x, keep)
    if keep >= s:
      cand = cand.grow(keep - s)
      prio = jnp.pad(prio, [(0, 0), (0, 0), (0, keep - s)], constant_values=-jnp.inf)
      s = keep
    safeguard = self.safeguard(keep)
    if safeguard > 0:
      _, best = jax.lax.top_k(prio, safeguard)
      rows, heads = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
      prio = prio.at[rows, heads, best].max(base.PROTECTED)
    return FlatLayerCache.from_priorities(cand, prio, k * keep)


@registry.register
@dataclasses.dataclass(frozen=True)
class PerLayer(Wrapper):
  """A per-layer budget schedule: layer l keeps a share of the total proportional to
  weights[l] (same total memory as the uniform budget). Empty weights = uniform."""
  name: ClassVar[str] = "per_layer"
  weights: tuple = ()
  layerwise_prefill = property(_press_layerwise)

  def __post_init__(self):
    weights = self.weights
    if isinstance(weights, str):  # from the command line: "1,2,3"
      weights = [w.strip() for w in weights.split(",") if w.strip()]
    try:
      weights = tuple(float(w) if isinstance(w, str) or validation.is_number(w) else None
                      for w in weights)
      ok = None not in weights and all(math.isfinite(w) and w >= 0 for w in weights) and (
          not weights or sum(weights) > 0)
    except (TypeError, ValueError):  # not iterable, or a string that is not a number
      ok = False
    if not ok:
      raise base.MethodError(
          f"per_layer weights={validation.show(self.weights)} must be a list of finite "
          f"numbers >= 0 with a positive sum, one per layer (or a string like '1,2,3'); "
          f"empty = uniform")
    object.__setattr__(self, "weights", weights)
    super().__post_init__()

  def layer_budgets(self, config, keep, context_length):
    if not self.weights:
      return self.press.layer_budgets(config, keep, context_length)
    if len(self.weights) != config.num_layers:
      raise base.MethodError(f"per_layer weights has {len(self.weights)} entries; the model "
                             f"has {config.num_layers} layers")
    # A layer must keep more than its window (all its budget when that is all there is).
    low = min(self.press.protected_tokens(keep) + 1, keep)
    return budgets.distribute(keep * config.num_layers, self.weights, low,
                              max(context_length, low))
