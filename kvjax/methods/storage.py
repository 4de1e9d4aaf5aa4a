"""What the storage methods share (KIVI, GEAR, ThinK): they keep every token, or what an
optional token-selecting `press` keeps, and change how each kept token is stored."""

from __future__ import annotations

import dataclasses

from kvjax.methods import base, registry


@dataclasses.dataclass(frozen=True)
class PressedStorage(base.Method):
  """Subclasses declare a `press: base.Method | str | None = None` field and call
  `resolve_press()` in __post_init__. Budgets, protection and the statistics needed come
  from the press; without one no compression_ratio or budget applies."""

  def resolve_press(self) -> None:
    if self.press is not None:
      object.__setattr__(self, "press", registry.get(self.press))
      base.check_prefill_press(self.name, self.press)

  @property
  def label(self) -> str:
    return base.spec_label(self)

  @property
  def needs_budget(self):
    return self.press is not None

  @property
  def needs(self):
    return self.press.needs if self.press is not None else frozenset()

  @property
  def layerwise_prefill(self):
    # Storing is the same at every layer; selecting is when the press's is.
    return self.press is None or self.press.layerwise_prefill

  def layer_budgets(self, config, keep, context_length):
    if self.press is None:
      return super().layer_budgets(config, keep, context_length)
    return self.press.layer_budgets(config, keep, context_length)

  def protected_tokens(self, keep):
    return self.press.protected_tokens(keep) if self.press is not None else 0

  def kept(self, cand, x, keep):
    """The dense slots to store: the press's selection, or every candidate (the state a
    press needed while selecting is not stored)."""
    if self.press is not None:
      return self.press.compact(cand, x, keep)
    return cand.replace(state=None)
