"""Argument checks shared by every public entry (generate, score, converse, methods, configs).

Each check raises the kvjax error class its caller passes (a `KvjaxError` subclass), with a
message that names the argument, shows the bad value and says what is allowed. They run on
the host before anything is traced, so bad input never reaches JAX, numpy or tokenizers.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from kvjax.errors import KvjaxError

INT32_MAX = 2**31 - 1   # token ids, positions and counts are int32 on the device
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def show(value, limit: int = 80) -> str:
  """repr(value), shortened so an error about a long prompt stays readable."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def is_integer(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


_NAMED = {INT32_MAX: "2**31 - 1", -INT32_MAX: "-(2**31 - 1)", INT64_MIN: "-2**63",
          INT64_MAX: "2**63 - 1"}


def _range(low, high, low_open=False, high_open=False) -> str:
  low, high = _NAMED.get(low, low), _NAMED.get(high, high)
  if low is not None and high is not None:
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  if low is not None:
    return f"{'>' if low_open else '>='} {low}"
  if high is not None:
    return f"{'<' if high_open else '<='} {high}"
  return ""


def integer(name: str, value, low: int | None = None, high: int | None = None, *,
            error: type[KvjaxError] = KvjaxError, what: str = "") -> int:
  """int(value), or `error` when it is not an integer (bools and floats are not) in
  [low, high]. `what` says what the number means, after the allowed range."""
  ok = is_integer(value) and (low is None or value >= low) and (high is None or value <= high)
  if not ok:
    bound = _range(low, high)
    raise error(f"{name}={show(value)} must be an integer{' ' + bound if bound else ''}"
                f"{': ' + what if what else ''}")
  return int(value)


def number(name: str, value, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False,
           error: type[KvjaxError] = KvjaxError, what: str = "") -> float:
  """float(value), or `error` unless it is a finite real number (not a bool) in the range.
  NaN and infinities are never allowed."""
  ok = is_number(value) and math.isfinite(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    bound = _range(low, high, low_open, high_open)
    kind = "a number" if low is not None and high is not None else "a finite number"
    raise error(f"{name}={show(value)} must be {kind}{' ' + bound if bound else ''}"
                f"{': ' + what if what else ''}")
  return float(value)


def boolean(name: str, value, *, error: type[KvjaxError] = KvjaxError) -> bool:
  """The value if it is True or False; a string such as "no" is an error, not truthy."""
  if not isinstance(value, (bool, np.bool_)):
    raise error(f"{name}={show(value)} must be True or False")
  return bool(value)


def choice(name: str, value, allowed, *, error: type[KvjaxError] = KvjaxError):
  if isinstance(value, (list, dict, set)) or value not in allowed:
    raise error(f"{name}={show(value)}; allowed: {list(allowed)}")
  return value


def text(name: str, value, *, error: type[KvjaxError] = KvjaxError) -> str:
  """A str that can be encoded as UTF-8 (a lone surrogate such as '\\ud800' cannot)."""
  if not isinstance(value, str):
    raise error(f"{name} must be a str; got {type(value).__name__} {show(value)}")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise error(f"{name} has an unpaired surrogate {value[e.start]!r} at character {e.start} "
                f"(near {show(value[max(0, e.start - 20):e.start + 20])}); text must be valid "
                f"Unicode (decode bytes with errors='replace' to drop such characters)"
                ) from None
  return value


def strings(name: str, value, *, error: type[KvjaxError] = KvjaxError) -> list[str]:
  """None -> [], a str -> [it], or a list/tuple of non-empty strs (e.g. stop strings)."""
  if value is None:
    return []
  items = [value] if isinstance(value, str) else value
  if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
    raise error(f"{name}={show(value)} must be a non-empty string or a list of them")
  return [text(f"{name}", s, error=error) for s in items]


def token_ids(name: str, ids, vocab_size: int, *, error: type[KvjaxError] = KvjaxError
              ) -> list[int]:
  """ids as a list of ints, each a token of the model's vocabulary [0, vocab_size)."""
  if isinstance(ids, np.ndarray) and ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer) \
      and (ids.size == 0 or (ids.min() >= 0 and ids.max() < vocab_size)):
    return ids.tolist()  # the common case for arrays, without a Python loop
  ids = list(ids)
  for j, t in enumerate(ids):
    if not is_integer(t) or not 0 <= t < vocab_size:
      shown = show(int(t) if is_integer(t) else t)  # 5, not np.int64(5)
      raise error(f"{name}[{j}]={shown} is not a token id of the model: allowed are the "
                  f"integers in [0, {vocab_size}) (its vocabulary)")
  return [int(t) for t in ids]


def token_id_set(name: str, value, vocab_size: int, *, error: type[KvjaxError] = KvjaxError
                 ) -> list[int]:
  """One token id or a list of them (e.g. eos_token_ids), each in [0, vocab_size)."""
  items = [value] if is_integer(value) else value
  if not isinstance(items, (list, tuple, np.ndarray)):
    raise error(f"{name}={show(value)} must be a token id or a list of token ids in "
                f"[0, {vocab_size})")
  return token_ids(name, items, vocab_size, error=error)
