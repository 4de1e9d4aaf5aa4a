"""Method names for generate(method=...) and the command line.

Each method module registers its classes with `@register`; `kvjax.methods` imports every
method module, so adding a method is its own file plus one import line there.
"""

from __future__ import annotations

import dataclasses

from kvjax.errors import MethodError
from kvjax.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
  if cls.name in _REGISTRY:
    raise ValueError(f"method name {cls.name!r} is registered twice")
  _REGISTRY[cls.name] = cls
  return cls


def available() -> list[str]:
  """Method names accepted by generate(method=...) and the command line."""
  return sorted(_REGISTRY)


def compressing() -> list[str]:
  return [name for name in available() if _REGISTRY[name].compresses]


def get(method=None, **hyperparameters) -> Method:
  """A method object from None, a registry name, or an existing method object."""
  if method is None:
    method = "full"
  if isinstance(method, Method):
    if hyperparameters:
      raise MethodError(f"hyperparameters {sorted(hyperparameters)} given together with "
                        f"a method object {method!r}; set them on the object instead")
    return method
  if not isinstance(method, str) or method.lower() not in _REGISTRY:
    raise MethodError(f"unknown method {method!r}; available: {available()}")
  cls = _REGISTRY[method.lower()]
  allowed = sorted(f.name for f in dataclasses.fields(cls))
  unknown = sorted(set(hyperparameters) - set(allowed))
  if unknown:
    raise MethodError(f"method {cls.name!r} has no hyperparameters {unknown}; "
                      f"allowed: {allowed}")
  try:
    return cls(**hyperparameters)
  except TypeError as e:  # e.g. a value of the wrong type for a field
    raise MethodError(f"method {cls.name!r}: {e}") from None
