"""Single-needle retrieval prompts in the style of RULER's niah_single, over its essays.

The haystack is RULER's Paul Graham essays file; the needle is one "special magic number"
sentence inserted at a sentence boundary; the question comes last (question-aware: it is part
of the prompt that a compression method sees). The sizing and insertion are
kvjax.evaluation's (tasks.haystack_with_needles), the same as its niah_single_2 task.
"""

from kvjax.evaluation import data, tasks

PREFIX = ("Some special magic numbers are hidden within the following text. Make sure to "
          "memorize it. I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "\nWhat is the special magic number for {key} mentioned in the provided text?"


def load_essays_text() -> str:
  """The essays as one string, whitespace runs collapsed to single spaces."""
  return data.essays_text()


def needle_prompt(tokenizer, essays_text: str, target_tokens: int, depth: float, key: str,
                  value: str) -> tuple[str, str]:
  """Builds a needle-in-a-haystack prompt of about target_tokens tokens.

  Args:
    tokenizer: the model's tokenizer (sizes the haystack; no special tokens counted).
    essays_text: the haystack source, e.g. load_essays_text().
    target_tokens: the prompt's length in tokens, met from below to within 3%.
    depth: where the needle goes, as a fraction of the haystack's length (0..1); it
      goes at the nearest sentence boundary outside quotes.
    key: the needle's key, named in the question.
    value: the needle's value, the expected answer.

  Returns:
    (prompt, answer), answer being value.
  """
  if not 0 <= depth <= 1:
    raise ValueError(f"depth={depth} must be in [0, 1]")
  question = QUESTION.format(key=key)
  context = tasks.haystack_with_needles(tokenizer, essays_text, target_tokens,
                                        [NEEDLE.format(key=key, value=value)], [depth], PREFIX,
                                        question)
  return context + question, value
