"""Optimisers for trainable components: optax AdamW with a warmup schedule and clipping.

Gradient accumulation is not an optax wrapper here: the train step averages the gradients
of `accumulation` micro-batches in one scan before a single update (`kvjax.training.loop`),
so one logged step is one update whatever the accumulation.
"""

from __future__ import annotations

import dataclasses

import optax

from kvjax import validation
from kvjax.errors import KvjaxError

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """AdamW with a linear warmup to `learning_rate`, then `schedule` down to
  end_factor x learning_rate at `total_steps`. clip_norm: global-norm gradient clipping;
  clip_value: element-wise clipping (the official Locret clips values at 0.5); None: off.
  accumulation: micro-batches averaged per update."""
  learning_rate: float = 5e-4
  warmup_steps: int = 0
  total_steps: int = 1000
  schedule: str = "cosine"
  end_factor: float = 0.0
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float | None = 1.0
  clip_value: float | None = None
  accumulation: int = 1

  def __post_init__(self):
    validation.number("learning_rate", self.learning_rate, 0, low_open=True,
                      error=KvjaxError)
    validation.integer("total_steps", self.total_steps, 1, error=KvjaxError)
    validation.integer("warmup_steps", self.warmup_steps, 0, self.total_steps,
                       error=KvjaxError, what="steps of the linear warmup, at most "
                       "total_steps")
    validation.choice("schedule", self.schedule, SCHEDULES, error=KvjaxError)
    validation.number("end_factor", self.end_factor, 0, 1, error=KvjaxError,
                      what="the final learning rate as a fraction of the peak")
    validation.number("weight_decay", self.weight_decay, 0, error=KvjaxError)
    validation.number("b1", self.b1, 0, 1, high_open=True, error=KvjaxError)
    validation.number("b2", self.b2, 0, 1, high_open=True, error=KvjaxError)
    validation.number("eps", self.eps, 0, low_open=True, error=KvjaxError)
    for name in ("clip_norm", "clip_value"):
      if getattr(self, name) is not None:
        validation.number(name, getattr(self, name), 0, low_open=True, error=KvjaxError,
                          what="or None for no clipping")
    validation.integer("accumulation", self.accumulation, 1, error=KvjaxError)


def learning_rate_schedule(settings: OptimizerSettings) -> optax.Schedule:
  """Linear warmup from 0, then the decay `settings.schedule` names."""
  peak, warmup = settings.learning_rate, settings.warmup_steps
  decay_steps = max(settings.total_steps - warmup, 1)
  end = peak * settings.end_factor
  if settings.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=settings.end_factor)
  elif settings.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(settings: OptimizerSettings) -> optax.GradientTransformation:
  """Clipping (value, then global norm, where set), then AdamW on the schedule."""
  parts = []
  if settings.clip_value is not None:
    parts.append(optax.clip(settings.clip_value))
  if settings.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(settings.clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(settings), b1=settings.b1, b2=settings.b2,
                           eps=settings.eps, weight_decay=settings.weight_decay))
  return optax.chain(*parts)
