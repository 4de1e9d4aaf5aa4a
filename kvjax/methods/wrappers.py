"""Composition: sinks + window around any scorer, AdaKV head-wise budgets, layer schedules."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from kvjax.methods import base, budgets


def _resolve(method):
  """Wrappers accept a method object or a registry name (so the CLI can pass press=snapkv)."""
  from kvjax import methods as registry
  return registry.get(method)


@dataclasses.dataclass(frozen=True)
class Wrapper(base.Method):
  """Delegates everything to `press` unless overridden."""
  press: base.Method | str = "snapkv"

  def __post_init__(self):
    object.__setattr__(self, "press", _resolve(self.press))
    if not self.press.compresses:
      raise base.MethodError(f"{self.name} needs a compression method to wrap, got "
                             f"{self.press.name!r}")

  @property
  def decode_time(self):
    return self.press.decode_time

  @property
  def needs_column_sums(self):
    return self.press.needs_column_sums

  @property
  def state(self):
    return self.press.state

  @property
  def headwise(self):
    return self.press.headwise

  @property
  def label(self) -> str:
    return f"{self.name}({getattr(self.press, 'label', self.press.name)})"

  def layer_budgets(self, config, keep, context_length):
    return self.press.layer_budgets(config, keep, context_length)

  def protected_tokens(self, keep):
    return self.press.protected_tokens(keep)

  def protected(self, key_positions, lengths, keep):
    return self.press.protected(key_positions, lengths, keep)

  def score(self, x):
    return self.press.score(x)

  def prefill_state(self, x):
    return self.press.prefill_state(x)

  def accumulate(self, slot_scores, column_sums):
    return self.press.accumulate(slot_scores, column_sums)

  def safeguard(self, keep):
    return self.press.safeguard(keep)

  def decode_scores(self, *args):
    return self.press.decode_scores(*args)

  def eviction_priority(self, *args):
    return self.press.eviction_priority(*args)


@dataclasses.dataclass(frozen=True)
class SinksWindow(Wrapper):
  """Also keeps the first `sinks` tokens and the last `window` tokens, whatever the scores."""
  name: ClassVar[str] = "sinks_window"
  sinks: int = 4
  window: int = 32

  def __post_init__(self):
    super().__post_init__()
    base.check_int("sinks", self.sinks, 0)
    base.check_int("window", self.window, 0)

  def protected_tokens(self, keep):
    return max(self.press.protected_tokens(keep), self.sinks + self.window)

  def protected(self, key_positions, lengths, keep):
    return (self.press.protected(key_positions, lengths, keep)
            | base.sink_mask(key_positions, self.sinks)
            | base.window_mask(key_positions, lengths, self.window))


@dataclasses.dataclass(frozen=True)
class AdaKV(Wrapper):
  """Head-wise budgets: the heads of a layer share its budget by a top-k over all of them.

  Each head first keeps its best floor(alpha_safeguard x budget) tokens (and its protected
  ones); the remaining layer budget goes to the best scores across all heads (kvpress's
  safeguard form, which makes the layer's total exact). The cache is stored flat per head,
  so heads with smaller budgets really take less memory.
  """
  name: ClassVar[str] = "adakv"
  alpha_safeguard: float = 0.2

  def __post_init__(self):
    super().__post_init__()
    base.check_fraction("alpha_safeguard", self.alpha_safeguard)
    if self.press.decode_time:
      raise base.MethodError(f"adakv wraps prefill scorers; {self.press.name!r} evicts during "
                             f"decode, which the head-wise layout does not support yet")

  @property
  def headwise(self):
    return True

  @property
  def decode_time(self):
    return False

  def safeguard(self, keep: int) -> int:
    return int(self.alpha_safeguard * keep)


@dataclasses.dataclass(frozen=True)
class PerLayer(Wrapper):
  """A per-layer budget schedule: layer l keeps a share of the total proportional to
  weights[l] (same total memory as the uniform budget). Empty weights = uniform."""
  name: ClassVar[str] = "per_layer"
  weights: tuple = ()

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.weights, str):  # from the command line: "1,2,3"
      object.__setattr__(self, "weights",
                         tuple(float(w) for w in self.weights.split(",") if w.strip()))
    object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

  def layer_budgets(self, config, keep, context_length):
    if not self.weights:
      return self.press.layer_budgets(config, keep, context_length)
    if len(self.weights) != config.num_layers:
      raise base.MethodError(f"per_layer weights has {len(self.weights)} entries; the model "
                             f"has {config.num_layers} layers")
    low = self.press.protected_tokens(keep) + 1  # a layer must keep more than its window
    return budgets.distribute(keep * config.num_layers, self.weights, low,
                              max(context_length, low))
