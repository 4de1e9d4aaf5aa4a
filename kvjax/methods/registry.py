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


def _value(text: str):
  """A hyperparameter from text: int, float, true/false, none, or the string itself."""
  for parse in (int, float):
    try:
      return parse(text)
    except ValueError:
      pass
  lowered = text.lower()
  return {"true": True, "false": False, "none": None}.get(lowered, text)


def parse_spec(spec: str) -> tuple[str, dict]:
  """'kivi:bits=4:press=snapkv' -> ('kivi', {'bits': 4, 'press': 'snapkv'}).

  The form the command line and sweeps use to name a configured method in one word.
  """
  name, *items = spec.split(":")
  hyperparameters = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise MethodError(f"method spec {spec!r}: {item!r} must look like name=value "
                        f"(e.g. 'kivi:bits=4:press=snapkv')")
    hyperparameters[key] = _value(text)
  return name, hyperparameters


def get(method=None, **hyperparameters) -> Method:
  """A method object from None, a registry name (optionally with ':name=value'
  hyperparameters, e.g. 'kivi:bits=4'), or an existing method object."""
  if method is None:
    method = "full"
  if isinstance(method, str) and ":" in method:
    method, parsed = parse_spec(method)
    duplicated = sorted(set(parsed) & set(hyperparameters))
    if duplicated:
      raise MethodError(f"hyperparameters {duplicated} given twice")
    hyperparameters = {**parsed, **hyperparameters}
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

