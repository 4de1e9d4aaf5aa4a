"""KV-cache compression methods: registry and argument validation.

A method is a frozen dataclass of hyperparameters (hashable, so static under jit). Only the
uncompressed baseline exists so far; compression methods register here as they land.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar

from kvjax.errors import GenerationError


@dataclasses.dataclass(frozen=True)
class Method:
  """Base of all methods. `compresses` is False only for the full-cache baseline."""
  name: ClassVar[str] = ""
  compresses: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class Full(Method):
  """The uncompressed cache: every token of every layer and head is kept."""
  name: ClassVar[str] = "full"
  compresses: ClassVar[bool] = False


_REGISTRY: dict[str, type[Method]] = {"full": Full}


def available() -> list[str]:
  """Method names accepted by generate(method=...) and the command line."""
  return sorted(_REGISTRY)


def get(method=None, **hyperparameters) -> Method:
  """A method object from None, a registry name, or an existing method object."""
  if method is None:
    method = "full"
  if isinstance(method, Method):
    if hyperparameters:
      raise GenerationError(f"hyperparameters {sorted(hyperparameters)} given together with "
                            f"a method object {method!r}; set them on the object instead")
    return method
  if not isinstance(method, str) or method.lower() not in _REGISTRY:
    raise GenerationError(f"unknown method {method!r}; available: {available()}")
  cls = _REGISTRY[method.lower()]
  allowed = sorted(f.name for f in dataclasses.fields(cls))
  unknown = sorted(set(hyperparameters) - set(allowed))
  if unknown:
    raise GenerationError(f"method {cls.name!r} has no hyperparameters {unknown}; "
                          f"allowed: {allowed}")
  return cls(**hyperparameters)


def validate_compression(method: Method, context_length: int, compression_ratio=None,
                         budget=None) -> int | None:
  """Checks compression_ratio/budget against the method and the context.

  Returns the number of context tokens to keep per layer (None = keep all).
  """
  if compression_ratio is not None and budget is not None:
    raise GenerationError(f"give compression_ratio ({compression_ratio}) or budget ({budget}), "
                          f"not both")
  if compression_ratio is not None:
    if (isinstance(compression_ratio, bool) or not isinstance(compression_ratio, numbers.Real)
        or not math.isfinite(compression_ratio) or not 0 <= compression_ratio < 1):
      raise GenerationError(f"compression_ratio={compression_ratio!r} must be a number in "
                            f"[0, 1): the fraction of the prompt cache removed")
  if budget is not None:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
      raise GenerationError(f"budget={budget!r} must be a positive integer (tokens kept per "
                            f"layer)")
    if budget > context_length:
      raise GenerationError(f"budget={budget} is larger than the context ({context_length} "
                            f"tokens); allowed: 1..{context_length}")
  compressing = bool(compression_ratio) or budget is not None
  if compressing and not method.compresses:
    raise GenerationError(
        f"method {method.name!r} keeps the whole cache, so compression_ratio="
        f"{compression_ratio} / budget={budget} cannot apply; choose a compression method "
        f"from {[m for m in available() if _REGISTRY[m].compresses] or 'those still to land'}")
  if budget is not None:
    return int(budget)
  if compression_ratio:
    return max(1, round(context_length * (1 - compression_ratio)))
  return None
