"""Single-needle retrieval prompts in the style of RULER's niah_single, over its essays.

The haystack is RULER's Paul Graham essays file; the needle is one "special magic number"
sentence inserted at a sentence boundary; the question comes last (question-aware: it is part
of the prompt that a compression method sees).
"""

import json
import re

PREFIX = ("Some special magic numbers are hidden within the following text. Make sure to "
          "memorize it. I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "\nWhat is the special magic number for {key} mentioned in the provided text?"

# A sentence ends at . ! or ? (optionally closed by a quote or bracket) before a space and a
# capital, or right before a capital: the file lost the space between paragraphs ("low.Next").
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?(?= [\"']?[A-Z])|(?<=[a-z]{2}[.!?])(?=[A-Z])")


def load_essays_text() -> str:
  """The essays as one string, whitespace runs collapsed to single spaces."""
  from kvjax.loading import assets
  with open(assets.fetch("ruler-data") / "PaulGrahamEssays.json", encoding="utf-8") as f:
    text = json.load(f)["text"]
  return re.sub(r"\s+", " ", text).strip()


def _sentences(text: str) -> list[str]:
  """Splits text into sentences (each keeps its closing punctuation)."""
  ends = [m.end() for m in _SENTENCE_END.finditer(text)]
  bounds = [0] + ends + [len(text)]
  parts = (text[a:b].strip() for a, b in zip(bounds, bounds[1:]))
  return [p for p in parts if p]


def _build(words: list[str], n_words: int, depth: float, key: str, value: str) -> str:
  sentences = _sentences(" ".join(words[:n_words]))
  starts, quotes = [0], [0]  # character offset of, and '"' count before, each boundary
  for sentence in sentences:
    starts.append(starts[-1] + len(sentence) + 1)
    quotes.append(quotes[-1] + sentence.count('"'))
  outside_quotes = [i for i in range(len(starts)) if quotes[i] % 2 == 0]
  at = min(outside_quotes, key=lambda i: abs(starts[i] - depth * starts[-1]))
  body = sentences[:at] + [NEEDLE.format(key=key, value=value)] + sentences[at:]
  return PREFIX + " ".join(body) + QUESTION.format(key=key)


def needle_prompt(tokenizer, essays_text: str, target_tokens: int, depth: float, key: str,
                  value: str) -> tuple[str, str]:
  """Builds a needle-in-a-haystack prompt of about target_tokens tokens.

  Args:
    tokenizer: the model's tokenizer (sizes the haystack; no special tokens counted).
    essays_text: the haystack source, e.g. load_essays_text().
    target_tokens: the prompt's length in tokens, met from below to within a few tokens.
    depth: where the needle goes, as a fraction of the haystack's length (0..1); it
      goes at the nearest sentence boundary.
    key: the needle's key, named in the question.
    value: the needle's value, the expected answer.

  Returns:
    (prompt, answer), answer being value.
  """
  if not 0 <= depth <= 1:
    raise ValueError(f"depth={depth} must be in [0, 1]")
  words = essays_text.split(" ")

  def length(n):
    return len(tokenizer.encode(_build(words, n, depth, key, value), add_special_tokens=False))

  lo, hi = 0, min(len(words), 2 * target_tokens)  # a word is at least one token
  if length(hi) <= target_tokens:
    raise ValueError(f"essays_text is too short for {target_tokens} tokens")
  while hi - lo > 1:  # largest word count whose prompt fits in target_tokens
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if length(mid) <= target_tokens else (lo, mid)
  return _build(words, lo, depth, key, value), value
