"""RULER's scorers: case-insensitive substring matching of expected answers in a prediction.

string_match_all (recall over the answers) scores the synthetic tasks, string_match_part (any
answer) the QA tasks. Scores are fractions in [0, 1] for one prediction; RULER reports their
mean times 100.
"""

from __future__ import annotations

import re
from typing import Iterable

from kvjax.errors import KvjaxError

METRICS = ("all", "part")
# ASCII control characters (newline and tab included), as RULER's postprocessing replaces.
_CONTROL = re.compile(r"[\x00-\x1f]")


class ScoringError(KvjaxError):
  """An unknown metric or malformed answers."""


def normalize(text: str) -> str:
  """RULER's postprocessing: control characters become newlines; outer whitespace goes.

  Case is kept; the matchers compare case-insensitively.
  """
  if not isinstance(text, str):
    raise ScoringError(f"prediction must be a str, got {type(text).__name__}: {text!r:.80}")
  return _CONTROL.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, answers: Iterable[str]) -> float:
  """The fraction of answers that occur in the prediction (0..1), ignoring case."""
  found = _found(prediction, answers)
  return sum(found) / len(found)


def string_match_part(prediction: str, answers: Iterable[str]) -> float:
  """1.0 if any answer occurs in the prediction (ignoring case), else 0.0."""
  return 1.0 if any(_found(prediction, answers)) else 0.0


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[^\w\s]")


def word_f1(prediction: str, reference: str) -> float:
  """SQuAD's F1 of two texts' word multisets (lowercase, punctuation and articles removed);
  1.0 when both have no words."""
  words = lambda text: _ARTICLES.sub(" ", _PUNCTUATION.sub(" ", normalize(text).lower())).split()
  got, want = words(prediction), words(reference)
  if not got or not want:
    return float(got == want)
  common = sum(min(got.count(w), want.count(w)) for w in set(got))
  if common == 0:
    return 0.0
  precision, recall = common / len(got), common / len(want)
  return 2 * precision * recall / (precision + recall)


def score(metric: str, prediction: str, answers: Iterable[str]) -> float:
  """Scores one prediction with `metric`: "all" (string_match_all) or "part"."""
  if metric == "all":
    return string_match_all(prediction, answers)
  if metric == "part":
    return string_match_part(prediction, answers)
  raise ScoringError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")


def _found(prediction: str, answers: Iterable[str]) -> list[bool]:
  """For each answer, whether it occurs in the normalized prediction."""
  # A bare string would be scored character by character: almost surely a caller's bug.
  if isinstance(answers, str):
    raise ScoringError(f"answers must be a sequence of strings, not one string: {answers!r:.80}")
  answers = list(answers)
  if not answers:
    raise ScoringError("answers is empty; a prediction needs at least one expected answer")
  for answer in answers:
    if not isinstance(answer, str) or not answer.strip():
      raise ScoringError(f"every answer must be a non-empty str, got {answer!r:.80}")
  text = normalize(prediction).casefold()
  return [answer.strip().casefold() in text for answer in answers]
