"""Training examples for trained selectors: a context, and an answer that reads it.

Each example is one token row of exactly `sequence_length` slots (right-padded): a context
whose tokens get labels, then an answer whose attention over the context makes them (e.g.
Locret's causal importance scores). Sources, from the asset registry's RULER data
(`kvjax.evaluation.data`):
  essays: a window of the Paul Graham essays' token stream; the answer is its last
    `answer_tokens` tokens (the continuation the context has to serve).
  squad:  SQuAD v2 paragraphs (the gold one among distractors, in a seeded order) with a
    question ("...\\n\\nQuestion: ...\\nAnswer:"); the answer is " " + its first answer.
  random: uniform random token ids, the answer the last `answer_tokens` (models without a
    tokenizer: tests).
Example i is a pure function of (settings, i): its source is sources[i % len(sources)] and
its random choices come from a generator seeded by (seed, i). A run's data position is
therefore one integer, the number of examples consumed, and a resumed run reads exactly
what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from kvjax import validation
from kvjax.errors import KvjaxError
from kvjax.evaluation import data as ruler

SOURCES = ("essays", "squad", "random")


@dataclasses.dataclass(frozen=True)
class DataSettings:
  sequence_length: int = 1024   # token slots per example (context + answer + padding)
  answer_tokens: int = 64       # essays and random: the answer's length
  sources: tuple = ("essays", "squad")
  seed: int = 0

  def __post_init__(self):
    validation.integer("sequence_length", self.sequence_length, 8, error=KvjaxError)
    validation.integer("answer_tokens", self.answer_tokens, 1, self.sequence_length - 4,
                       error=KvjaxError, what="tokens of the answer; the context needs 4 "
                       "tokens at least")
    sources = self.sources
    if isinstance(sources, str):
      sources = tuple(s.strip() for s in sources.split(",") if s.strip())
    if not sources or any(s not in SOURCES for s in sources):
      raise KvjaxError(f"sources={self.sources!r}: allowed are one or more of {SOURCES}")
    object.__setattr__(self, "sources", tuple(sources))
    validation.integer("seed", self.seed, 0, error=KvjaxError)


@dataclasses.dataclass(frozen=True)
class Example:
  tokens: np.ndarray          # [T] int32, 0 after the last real token
  mask: np.ndarray            # [T] bool: real tokens
  context: np.ndarray         # [T] bool: tokens that get labels
  answer_index: np.ndarray    # [A] int32: the answer's positions, -1 padded


def _rng(settings: DataSettings, index: int) -> np.random.Generator:
  return np.random.default_rng([settings.seed, index])


@functools.lru_cache(maxsize=2)
def essay_tokens(tokenizer) -> np.ndarray:
  """The essays' whole token stream (one tokenizer call per process, a few seconds)."""
  return np.asarray(tokenizer.encode(ruler.essays_text(), add_special_tokens=False), np.int32)


def _row(context: np.ndarray, answer: np.ndarray, settings: DataSettings,
         answer_slots: int) -> Example:
  """A padded row of context then answer tokens."""
  t, n, a = settings.sequence_length, len(context), len(answer)
  tokens = np.zeros(t, np.int32)
  tokens[:n], tokens[n:n + a] = context, answer
  mask = np.arange(t) < n + a
  index = np.full(answer_slots, -1, np.int32)
  index[:a] = np.arange(n, n + a)
  return Example(tokens=tokens, mask=mask, context=np.arange(t) < n, answer_index=index)


def _stream_window(stream: np.ndarray, settings: DataSettings, rng) -> Example:
  t, a = settings.sequence_length, settings.answer_tokens
  if len(stream) < t:
    raise KvjaxError(f"the token stream has {len(stream)} tokens, fewer than "
                     f"sequence_length={t}")
  start = int(rng.integers(0, len(stream) - t + 1))
  window = stream[start:start + t]
  return _row(window[:t - a], window[t - a:], settings, answer_slots(settings))


def _squad(tokenizer, settings: DataSettings, rng) -> Example:
  items = ruler.squad()
  target = items[int(rng.integers(len(items)))]
  encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
  question = encode(f"\n\nQuestion: {target.question}\nAnswer:")
  answer = encode(" " + target.answers[0])[:answer_slots(settings)]
  room = settings.sequence_length - len(question) - len(answer)
  if room < 8:
    raise KvjaxError(f"sequence_length={settings.sequence_length} leaves {room} context "
                     f"tokens to a SQuAD example ({len(question)} question and "
                     f"{len(answer)} answer tokens): raise it (256 or more)")
  separator = encode("\n\n")
  documents = [encode(d) for d in target.documents]
  used = sum(len(d) + len(separator) for d in documents)
  # Distractor paragraphs until the context is full (drawn with the same generator).
  for _ in range(64):
    other = items[int(rng.integers(len(items)))].documents[0]
    if other in target.documents:
      continue
    ids = encode(other)
    if used + len(ids) + len(separator) > room:
      break
    documents.append(ids)
    used += len(ids) + len(separator)
  context = []
  for i in rng.permutation(len(documents)):
    context += documents[i] + separator
  # An overlong gold paragraph loses its start; the question always fits.
  context = (context[:-len(separator)] + question)[-(room + len(question)):]
  return _row(np.asarray(context, np.int32), np.asarray(answer, np.int32), settings,
              answer_slots(settings))


def answer_slots(settings: DataSettings) -> int:
  """Width of `Example.answer_index`: the longest answer any source makes."""
  return settings.answer_tokens


def example(settings: DataSettings, index: int, tokenizer=None,
            vocab_size: int | None = None) -> Example:
  """Example `index` (a pure function of the settings and the index)."""
  source = settings.sources[index % len(settings.sources)]
  rng = _rng(settings, index)
  if source == "random":
    if vocab_size is None:
      raise KvjaxError("the random source needs the model's vocab_size")
    return _stream_window(rng.integers(0, vocab_size, settings.sequence_length,
                                       dtype=np.int32), settings, rng)
  if tokenizer is None:
    raise KvjaxError(f"source {source!r} is text: the model has no tokenizer (use "
                     f"sources=('random',) for token-id models)")
  if source == "essays":
    return _stream_window(essay_tokens(tokenizer), settings, rng)
  return _squad(tokenizer, settings, rng)


def batch(settings: DataSettings, start: int, count: int, tokenizer=None,
          vocab_size: int | None = None) -> dict[str, np.ndarray]:
  """Examples start .. start + count - 1 stacked: tokens, mask, context [count, T],
  answer_index [count, A]."""
  rows = [example(settings, start + i, tokenizer, vocab_size) for i in range(count)]
  return {field.name: np.stack([getattr(r, field.name) for r in rows])
          for field in dataclasses.fields(Example)}
