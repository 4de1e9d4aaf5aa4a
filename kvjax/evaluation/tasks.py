"""RULER-style long-context tasks, sized in tokens, plus multi-turn QA over one context.

Single-turn tasks (TASKS) follow RULER's families: needle retrieval (niah_*), variable
tracking (vt), common and frequent words extraction (cwe, fwe) and document QA (qa_*). Each
`Example` splits its prompt into the compressible `context` (instructions and haystack) and the
`question`, so a sweep can compress the context with the question in view (question-aware) or
before it arrives (query-agnostic). `Conversation`s ask several questions about one context, one
per turn.

Lengths: `target_tokens` counts the tokens of context + question (for a conversation: context +
its longest question) with `tokenizer.encode(text, add_special_tokens=False)`; every example
lands in [(1 - TOLERANCE) * target_tokens, target_tokens]. Haystacks grow by small pieces
(words, sentences, list entries, documents) whose token counts are summed from a per-tokenizer
cache; one full encode checks each result.

Examples are deterministic in (task, target_tokens, seed, index): example i is the same whatever
num_examples is.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import math
import re
import uuid
import weakref
from typing import Callable, Sequence

import numpy as np

from kvjax.errors import KvjaxError
from kvjax.evaluation import data

TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3",
    "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery",
    "vt", "cwe", "fwe",
    "qa_squad", "qa_hotpotqa",
)
CONVERSATION_TASKS = ("multiturn_niah", "multiturn_squad")
MIN_TARGET_TOKENS = 256
# Every example's length is in [(1 - TOLERANCE) * target_tokens, target_tokens].
TOLERANCE = 0.03
_FIT_ROUNDS = 6


class TaskError(KvjaxError):
  """Bad task arguments: unknown task, impossible length, bad counts."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One single-turn task instance.

  Attributes:
    task: the task name, one of TASKS.
    index: the example's number.
    context: the compressible part: instructions and haystack or documents.
    question: the query, starting with "\\n"; in query-agnostic mode it is appended after the
      context has been compressed.
    answers: every expected answer.
    metric: "all" (recall over answers) or "part" (any answer), see kvjax.evaluation.scoring.
    target_tokens: the length asked for; context + question has at most this many tokens.
  """
  task: str
  index: int
  context: str
  question: str
  answers: tuple[str, ...]
  metric: str
  target_tokens: int

  @property
  def prompt(self) -> str:
    """The question-aware prompt: context then question."""
    return self.context + self.question


@dataclasses.dataclass(frozen=True)
class Conversation:
  """Several questions about one context, asked one per turn.

  Attributes:
    task: the task name, one of CONVERSATION_TASKS.
    index: the conversation's number.
    context: the compressible part, shared by every turn.
    questions: the turns' questions, in order; each starts with "\\n".
    answers: the expected answers of each turn.
    metric: "all" or "part", for every turn.
    target_tokens: context + the longest question has at most this many tokens.
  """
  task: str
  index: int
  context: str
  questions: tuple[str, ...]
  answers: tuple[tuple[str, ...], ...]
  metric: str
  target_tokens: int


# -- public entry points ------------------------------------------------------------------------


def generate_examples(task: str, tokenizer, target_tokens: int, num_examples: int,
                      seed: int = 0) -> list[Example]:
  """RULER-style examples of one task.

  Args:
    task: one of TASKS.
    tokenizer: anything with `encode(text, add_special_tokens=False) -> list[int]`; it sizes
      the examples.
    target_tokens: the length of context + question in tokens (at least MIN_TARGET_TOKENS).
    num_examples: how many examples (>= 1).
    seed: varies the examples; example i depends only on (task, target_tokens, seed, i).

  Returns:
    num_examples Examples, index 0 .. num_examples - 1.
  """
  _check_name(task, TASKS, "task")
  _check_common(tokenizer, target_tokens, num_examples, seed)
  build = _BUILDERS[task]
  sizer = _Sizer(tokenizer)
  examples = []
  for index in range(num_examples):
    rng = np.random.default_rng(_seed(seed, task, target_tokens, index))
    draft = build(rng, sizer, target_tokens, seed=seed, index=index)
    examples.append(Example(task=task, index=index, context=draft.context,
                            question=draft.questions[0], answers=draft.answers[0],
                            metric=_METRICS[task], target_tokens=target_tokens))
  return examples


def generate_conversations(task: str, tokenizer, target_tokens: int, num_examples: int,
                           turns: int = 3, seed: int = 0) -> list[Conversation]:
  """Multi-turn conversations: one context, `turns` questions asked one after another.

  Args:
    task: one of CONVERSATION_TASKS. "multiturn_niah": needles with distinct keys in an essay
      haystack, one key asked per turn. "multiturn_squad": SQuAD questions whose gold
      paragraphs are all among the documents, one question per turn.
    tokenizer: as for generate_examples.
    target_tokens: the length of context + the longest question, in tokens.
    num_examples: how many conversations (>= 1).
    turns: questions per conversation (>= 1).
    seed: varies the conversations; conversation i depends only on (task, target_tokens,
      turns, seed, i).

  Returns:
    num_examples Conversations.
  """
  _check_name(task, CONVERSATION_TASKS, "conversation task")
  _check_common(tokenizer, target_tokens, num_examples, seed)
  _check_int("turns", turns, 1)
  sizer = _Sizer(tokenizer)
  conversations = []
  for index in range(num_examples):
    rng = np.random.default_rng(_seed(seed, task, target_tokens, turns, index))
    if task == "multiturn_niah":
      draft = _niah(task, _MULTITURN_NIAH, rng, sizer, target_tokens, turns=turns)
    else:
      draft = _qa("squad", rng, sizer, target_tokens, seed=seed, index=index, turns=turns)
    conversations.append(Conversation(task=task, index=index, context=draft.context,
                                      questions=draft.questions, answers=draft.answers,
                                      metric=_METRICS[task], target_tokens=target_tokens))
  return conversations


def haystack_with_needles(tokenizer, text: str, target_tokens: int, needles: Sequence[str],
                          depths: Sequence[float], prefix: str, question: str) -> str:
  """prefix + the first words of `text` with `needles` inserted, sized for target_tokens.

  The building block of the essay needle tasks, for callers with their own needles.

  Args:
    tokenizer: sizes the result (see generate_examples).
    text: the haystack source, single-spaced (e.g. data.essays_text()).
    target_tokens: context + question has at most this many tokens, and at least
      (1 - TOLERANCE) of them.
    needles: sentences to insert.
    depths: where each needle goes, as a fraction (0..1) of the haystack's length; it goes at
      the nearest sentence boundary outside double quotes.
    prefix: text before the haystack (instructions).
    question: text that will follow the context (counted, not returned).

  Returns:
    The context (prefix + haystack with needles).
  """
  _check_int("target_tokens", target_tokens, 1)
  if len(needles) != len(depths):
    raise TaskError(f"{len(needles)} needles but {len(depths)} depths; give one depth each")
  for depth in depths:
    if not 0 <= depth <= 1:
      raise TaskError(f"depth={depth} must be in [0, 1]")
  words = text.split(" ")
  context = _essay_context(words, list(needles), list(depths), prefix)

  def render(n):
    return _Draft(context(n), (question,), ((),))
  return _fit(_Sizer(tokenizer), target_tokens, render, 0, min(len(words), target_tokens),
              "a needle haystack").context


# -- validation and seeding ---------------------------------------------------------------------


def _check_name(name, allowed, what):
  if name not in allowed:
    raise TaskError(f"unknown {what} {name!r}; allowed: {', '.join(allowed)}")


def _check_int(name, value, low):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise TaskError(f"{name}={value!r} must be an integer >= {low}")


def _check_common(tokenizer, target_tokens, num_examples, seed):
  if not callable(getattr(tokenizer, "encode", None)):
    raise TaskError(f"tokenizer must have an encode(text, add_special_tokens=False) method; "
                    f"got {type(tokenizer).__name__}")
  _check_int("target_tokens", target_tokens, MIN_TARGET_TOKENS)
  _check_int("num_examples", num_examples, 1)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TaskError(f"seed={seed!r} must be an integer")


def _seed(*parts) -> int:
  """A 64-bit seed from parts, stable across processes (unlike hash())."""
  digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
  return int.from_bytes(digest[:8], "little")


# -- token counting and fitting -----------------------------------------------------------------

# A chunk is a whitespace run plus the non-space run after it. Byte-level BPE pre-tokenizers
# (GPT-2, SmolLM2, Llama 3) split wherever a space run meets a non-space, so summing the chunks'
# counts gives the text's count; for other tokenizers it is close, and a full encode checks.
_CHUNK = re.compile(r"\s*\S+|\s+")
_CHUNK_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class _Draft:
  """A rendered task instance: context, one question per turn, answers per turn."""
  context: str
  questions: tuple[str, ...]
  answers: tuple[tuple[str, ...], ...]


class _Sizer:
  """Token counts of texts: fast estimates from cached chunk counts, and exact counts."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    try:  # one chunk cache per tokenizer for the process, dropped with the tokenizer
      self._chunks = _CHUNK_CACHES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable or not hashable: a cache for this call only
      self._chunks = {}

  def encode_len(self, text: str) -> int:
    return len(self.tokenizer.encode(text, add_special_tokens=False))

  def estimate(self, text: str) -> int:
    chunks, total = self._chunks, 0
    for chunk in _CHUNK.findall(text):
      n = chunks.get(chunk)
      if n is None:
        n = chunks[chunk] = self.encode_len(chunk)
      total += n
    return total

  def measured_text(self, draft: _Draft) -> str:
    """What target_tokens bounds: context + the longest question."""
    question = max(draft.questions, key=self.estimate)
    return draft.context + question


def _fit(sizer: _Sizer, target: int, render: Callable[[int], _Draft], lo: int, hi: int,
         task: str, budget: bool = False) -> _Draft:
  """render(size) for the largest size in [lo, hi] whose text fits in target tokens.

  With budget=False, size counts pieces and the text grows with it. With budget=True, size is
  a token budget that render fills (never over), starting from the free room.
  Estimates choose the size; the exact count checks it: a text over target tightens the
  limit and searches again, one under the tolerance loosens it (a tokenizer whose pieces
  count more alone than together, as Qwen2's on these texts, would stop short otherwise).
  """
  def measure(size):
    return sizer.estimate(sizer.measured_text(render(size)))

  search = _largest_budget if budget else _largest
  need = math.ceil((1 - TOLERANCE) * target)
  limit, best, best_n = target, None, 0
  for _ in range(_FIT_ROUNDS):
    size = search(measure, lo, hi, limit)
    if size is None:
      if best is not None:
        break
      fixed = sizer.encode_len(sizer.measured_text(render(lo)))
      raise TaskError(f"target_tokens={target} is too small for {task}: its instructions, "
                      f"needles and question alone take {fixed} tokens")
    draft = render(size)
    n = sizer.encode_len(sizer.measured_text(draft))
    if n > target:
      limit -= n - target
      continue
    if n > best_n or best is None:
      best, best_n = draft, n
    if n >= need or size == hi:   # filled, or nothing more to add
      break
    limit += target - n
  if best is None:
    raise TaskError(f"could not fit {task} under target_tokens={target} (the tokenizer's "
                    f"counts of pieces do not add up); try another target_tokens")
  if best_n < need:
    raise TaskError(f"{task} could fill only {best_n} of target_tokens={target} tokens (it must "
                    f"reach {need}): its pieces are too coarse for so short a target, or its "
                    f"source data runs out at so long a one")
  return best


def _largest(measure: Callable[[int], int], lo: int, hi: int, limit: int) -> int | None:
  """The largest s in [lo, hi] with measure(s) <= limit (measure grows with s), or None."""
  if measure(lo) > limit:
    return None
  good, bad = lo, hi + 1  # hi + 1 never fits; hi itself is tried only if needed
  while bad - good > 1:
    mid = (good + bad) // 2
    good, bad = (mid, bad) if measure(mid) <= limit else (good, mid)
  return good


def _largest_budget(measure: Callable[[int], int], lo: int, hi: int, limit: int) -> int | None:
  """A budget in [lo, hi] with measure(budget) <= limit, from the room left at lo."""
  fixed = measure(lo)
  if fixed > limit:
    return None
  size = min(hi, lo + limit - fixed)
  for _ in range(_FIT_ROUNDS):
    over = measure(size) - limit
    if over <= 0:
      return size
    size = max(lo, size - over)
  return lo


def _pack(cost: Callable[[int], int], count: int, budget: int, slack: int,
          max_misses: int = 500) -> list[int]:
  """Candidates out of 0..count-1 whose costs sum to at most budget, and within slack of it.

  First candidates are taken in order while they fit; those over half the budget wait, since
  several small pieces leave more room to adjust than one big one. Then later candidates are
  added or swapped for taken ones while that brings the sum nearer [budget - slack, budget],
  passing over budget if it must (one more piece, then smaller swaps); the best sum found within
  budget wins. Returns the taken indices in placement order.
  """
  taken, gap, misses, end = [], budget, 0, 0
  big = max(budget // 2, slack)
  for end in range(count):
    if gap <= slack or misses >= max_misses:
      break
    c = cost(end)
    if c <= min(gap, big):
      taken.append(end)
      gap -= c
    else:
      misses += 1

  def distance(g):  # how far a gap is from the wanted window [0, slack]
    return -g if g < 0 else max(0, g - slack)

  best_gap, best = gap, list(taken)
  in_use = set(taken)
  for i in range(min(count, end + max_misses)):
    if distance(gap) == 0:
      break
    if i in in_use:
      continue
    c = cost(i)
    moves = [(distance(gap - c), -1)]  # add i
    moves += [(distance(gap + cost(j) - c), at) for at, j in enumerate(taken)]  # swap i in
    d, at = min(moves)
    if d >= distance(gap):
      continue
    if at < 0:
      taken.append(i)
      gap -= c
    else:
      in_use.discard(taken[at])
      gap += cost(taken[at]) - c
      taken[at] = i
    in_use.add(i)
    if 0 <= gap < best_gap:
      best_gap, best = gap, list(taken)
  return best


def _insert_by_position(items: list[str], inserts: Sequence[str],
                        depths: Sequence[float]) -> list[str]:
  """items with inserts[k] placed before item round(depths[k] * len(items)), order kept."""
  spots = [round(d * len(items)) for d in depths]
  return _insert_at(items, inserts, spots)


def _insert_at(items: Sequence[str], inserts: Sequence[str], spots: Sequence[int]) -> list[str]:
  """items with inserts[k] placed before items[spots[k]]; inserts at one spot keep their order."""
  out = list(items)
  # From the back, so the spots still to come stay valid.
  for spot, _, text in sorted(zip(spots, range(len(inserts)), inserts), reverse=True):
    out.insert(spot, text)
  return out


def _insert_at_depths(sentences: list[str], needles: Sequence[str],
                      depths: Sequence[float]) -> list[str]:
  """sentences with each needle at the sentence boundary nearest its depth (outside quotes).

  Depth is a fraction of the text's length in characters (sentences joined by one space).
  """
  starts, quotes = [0], [0]  # character offset of, and '"' count before, each boundary
  for sentence in sentences:
    starts.append(starts[-1] + len(sentence) + 1)
    quotes.append(quotes[-1] + sentence.count('"'))
  outside = [i for i in range(len(starts)) if quotes[i] % 2 == 0]
  offsets = [starts[i] for i in outside]
  spots = [outside[_nearest(offsets, d * starts[-1])] for d in depths]
  return _insert_at(sentences, needles, spots)


def _nearest(sorted_values: list[int], x: float) -> int:
  """Index of the value nearest x (the first one on a tie)."""
  i = bisect.bisect_left(sorted_values, x)
  if i == 0:
    return 0
  if i == len(sorted_values):
    return i - 1
  return i - 1 if x - sorted_values[i - 1] <= sorted_values[i] - x else i


# -- keys and values ----------------------------------------------------------------------------

_ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "brisk", "calm", "clever", "cold",
    "crimson", "curious", "dark", "distant", "dusty", "eager", "early", "faint", "fancy",
    "fierce", "gentle", "giant", "golden", "grand", "green", "hidden", "hollow", "humble", "icy",
    "jolly", "keen", "kind", "lazy", "little", "lively", "lonely", "loud", "lucky", "mellow",
    "merry", "misty", "modest", "narrow", "noble", "odd", "pale", "patient", "plain", "polite",
    "proud", "purple", "quick", "quiet", "rapid", "rare", "rough", "round", "royal", "rusty",
    "sandy", "scarlet", "shiny", "silent", "silver", "simple", "sleepy", "slow", "smooth",
    "snowy", "soft", "solid", "spare", "steady", "stormy", "strange", "sunny", "sweet", "swift",
    "tall", "tender", "tidy", "tiny", "vast", "velvet", "violet", "warm", "wild", "wise",
    "witty", "young",
)
_NOUNS = (
    "anchor", "apple", "arrow", "badge", "basket", "beacon", "bell", "blossom", "bottle",
    "bridge", "brook", "bucket", "butterfly", "cabin", "candle", "canyon", "castle", "cedar",
    "chair", "cloud", "comet", "compass", "cottage", "crystal", "desert", "dolphin", "dragon",
    "eagle", "ember", "falcon", "feather", "fern", "forest", "fountain", "garden", "glacier",
    "harbor", "hammer", "harvest", "island", "jacket", "jungle", "kettle", "kitten", "ladder",
    "lantern", "lemon", "lighthouse", "marble", "meadow", "mirror", "mountain", "ocean",
    "orchard", "otter", "owl", "palace", "pebble", "pepper", "piano", "pillow", "planet", "pond",
    "quarry", "rabbit", "raven", "ribbon", "river", "rocket", "saddle", "shadow", "shell",
    "shore", "sparrow", "star", "stone", "sunset", "thunder", "tiger", "tower", "tulip",
    "valley", "violin", "wagon", "whistle", "willow", "window", "wolf",
)
# Needle keys: adjective-noun pairs such as "quiet-harbor" (RULER draws them with wonderwords).
_WORD_KEYS = tuple(f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS)


def _uuids(rng: np.random.Generator, count: int) -> list[str]:
  return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(count)]


def _numbers(rng: np.random.Generator, count: int, digits: int = 7) -> list[str]:
  """count distinct random numbers of exactly `digits` digits."""
  low = 10 ** (digits - 1)
  return [str(low + int(x)) for x in rng.choice(9 * low, size=count, replace=False)]


def _letters(rng: np.random.Generator, count: int, length: int, alphabet: str) -> list[str]:
  """count distinct random strings of `length` letters from alphabet."""
  out: dict[str, None] = {}
  while len(out) < count:
    for row in rng.integers(0, len(alphabet), size=(count, length)):
      out.setdefault("".join(alphabet[i] for i in row))
      if len(out) == count:
        break
  return list(out)


# -- needle in a haystack -----------------------------------------------------------------------

_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_NOISE_SENTENCES = tuple(data.sentences(_NOISE))
_NIAH_PREFIX = ("Some special magic {kind} are hidden within the following text. Make sure to "
                "memorize it. I will quiz you about the {kind} afterwards.\n")
_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
_QUESTION_ONE = "\nWhat is the special magic {one} for {key} mentioned in the provided text?"
_QUESTION_ALL = "\nWhat are all the special magic {kind} for {keys} mentioned in the provided text?"


@dataclasses.dataclass(frozen=True)
class _NiahSpec:
  """A needle task: the haystack kind, key and value kinds, and needle counts."""
  haystack: str        # "noise" (repeated sentences), "essay", or "needle" (distractor needles)
  keys: str            # "words" or "uuids"
  values: str          # "numbers" or "uuids"
  num_keys: int = 1    # needles with distinct keys
  num_values: int = 1  # values (one needle each) per key
  num_queries: int = 1  # keys asked about, all in one question


_NIAH_SPECS = {
    "niah_single_1": _NiahSpec("noise", "words", "numbers"),
    "niah_single_2": _NiahSpec("essay", "words", "numbers"),
    "niah_single_3": _NiahSpec("essay", "words", "uuids"),
    "niah_multikey_1": _NiahSpec("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": _NiahSpec("needle", "words", "numbers"),
    "niah_multikey_3": _NiahSpec("needle", "uuids", "uuids"),
    "niah_multivalue": _NiahSpec("essay", "words", "numbers", num_values=4),
    "niah_multiquery": _NiahSpec("essay", "words", "numbers", num_keys=4, num_queries=4),
}
_MULTITURN_NIAH = _NiahSpec("essay", "words", "numbers")  # num_keys = turns


def _join_keys(keys: Sequence[str]) -> str:
  """'a', or 'a, b, and c' as RULER lists queried keys."""
  return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _niah(task: str, spec: _NiahSpec, rng, sizer, target, turns: int | None = None) -> _Draft:
  """A needle task; with turns, `turns` keys asked one per turn (multi-turn)."""
  num_keys = turns if turns is not None else spec.num_keys
  kind = spec.values  # "numbers" or "uuids"
  num_needles = num_keys * spec.num_values
  # Distractor needles ("needle" haystacks) are drawn with the needles, so no key or value
  # repeats; keys[num_keys:] and values[num_needles:] are theirs.
  spare = _needle_capacity(spec, target) if spec.haystack == "needle" else 0
  keys = _needle_keys(rng, spec.keys, num_keys + spare)
  draw = _numbers if kind == "numbers" else _uuids
  values = draw(rng, num_needles + spare)
  needles = [_NEEDLE.format(kind=kind, key=keys[k], value=values[k * spec.num_values + v])
             for k in range(num_keys) for v in range(spec.num_values)]
  depths = list(rng.random(num_needles))
  if turns is not None:
    asked = [[int(k)] for k in rng.permutation(num_keys)]  # one key per turn
  else:
    asked = [sorted(int(k) for k in rng.choice(num_keys, size=spec.num_queries, replace=False))]
  questions = tuple(_niah_question(kind, [keys[k] for k in ks], spec.num_values) for ks in asked)
  answers = tuple(tuple(values[k * spec.num_values + v] for k in ks
                        for v in range(spec.num_values)) for ks in asked)

  prefix = _NIAH_PREFIX.format(kind=kind)
  if spec.haystack == "essay":
    words = _essay_words()
    context, hi = _essay_context(words, needles, depths, prefix), min(len(words), target)
  elif spec.haystack == "noise":
    context, hi = _noise_context(needles, depths, prefix), target // 3  # 4+ tokens a sentence
  else:
    lines = [_NEEDLE.format(kind=kind, key=key, value=value)
             for key, value in zip(keys[num_keys:], values[num_needles:])]
    context, hi = _needle_lines_context(lines, needles, depths, prefix, sizer, target), target

  def render(size):
    return _Draft(context(size), questions, answers)
  return _fit(sizer, target, render, 0, hi, task, budget=spec.haystack == "needle")


def _needle_keys(rng, kind: str, count: int) -> list[str]:
  """count distinct keys: adjective-noun words or uuids."""
  if kind == "uuids":
    return _uuids(rng, count)
  if count > len(_WORD_KEYS):
    raise TaskError(f"{count} needle keys needed; only {len(_WORD_KEYS)} word keys exist")
  return [_WORD_KEYS[i] for i in rng.choice(len(_WORD_KEYS), size=count, replace=False)]


def _niah_question(kind: str, keys: Sequence[str], num_values: int) -> str:
  """RULER's question: singular for one expected value, plural ("all") for several."""
  if len(keys) * num_values == 1:
    return _QUESTION_ONE.format(one=kind[:-1], key=keys[0])
  return _QUESTION_ALL.format(kind=kind, keys=_join_keys(keys))


def _noise_context(needles, depths, prefix) -> Callable[[int], str]:
  """n -> prefix + n noise sentences, with the needles at their depths."""
  def context(n):
    noise = [_NOISE_SENTENCES[i % len(_NOISE_SENTENCES)] for i in range(n)]
    return prefix + " ".join(_insert_at_depths(noise, needles, depths))
  return context


def _needle_lines_context(lines, needles, depths, prefix, sizer, target) -> Callable[[int], str]:
  """budget -> prefix + distractor lines filling budget tokens, with the needles among them."""
  cost = _cached_cost(lambda i: sizer.estimate("\n" + lines[i]))

  def context(budget):
    chosen = _pack(cost, len(lines), budget, _slack(target))
    return prefix + "\n".join(_insert_by_position([lines[i] for i in chosen], needles, depths))
  return context


def _needle_capacity(spec: _NiahSpec, target: int) -> int:
  """How many distractor needles to draw: more than fit in target tokens."""
  # A distractor needle takes 20+ tokens; the spares are candidates _pack may pass over.
  wanted = target // 16 + 600
  if spec.keys == "words":  # the word keys run out first (at ~170K tokens)
    return min(wanted, len(_WORD_KEYS) - spec.num_keys)
  return wanted


@functools.cache
def _essay_words() -> tuple[str, ...]:
  return tuple(data.essays_text().split(" "))


def _essay_context(words, needles, depths, prefix) -> Callable[[int], str]:
  """n -> prefix + the first n words, with the needles at their depths."""
  def context(n):
    haystack = data.sentences(" ".join(words[:n]))
    return prefix + " ".join(_insert_at_depths(haystack, needles, depths))
  return context


def _cached_cost(cost: Callable[[int], int]) -> Callable[[int], int]:
  return functools.lru_cache(maxsize=None)(cost)


def _slack(target: int) -> int:
  """How far below its budget a packed haystack may stop (a small part of the tolerance)."""
  return max(1, target // 100)


# -- variable tracking --------------------------------------------------------------------------

_VT_INSTRUCTION = ("Memorize and track the chain(s) of variable assignment hidden in the "
                   "following text.\n\n")
_VT_QUESTION = ("\nQuestion: Find all variables that are assigned the value {value} in the "
                "text above.")
_VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, "
              "{count} variables are assigned the value {value}, they are: {names}")
_VT_HOPS = 4
_VT_DEMO_NOISE = 4 * len(_NOISE_SENTENCES)  # noise sentences in the worked example
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _vt(rng, sizer, target, **_) -> _Draft:
  """One chain of _VT_HOPS hops in noise, after a worked example (RULER's one-shot demo)."""
  names = _letters(rng, _VT_HOPS + 1, 5, _UPPER)
  demo_names = _letters(rng, _VT_HOPS + 1, 3, _UPPER)
  value, demo_value = _numbers(rng, 2, digits=5)
  chain_depths = sorted(rng.random(_VT_HOPS + 1))
  demo_depths = sorted(rng.random(_VT_HOPS + 1))
  demo = (_VT_INSTRUCTION + _vt_lines(demo_names, demo_value, _VT_DEMO_NOISE, demo_depths)
          + _VT_QUESTION.format(value=demo_value)
          + _VT_ANSWER.format(count=_VT_HOPS + 1, value=demo_value, names=" ".join(demo_names))
          + "\n\n")
  question = _VT_QUESTION.format(value=value)

  def render(n):
    context = demo + _VT_INSTRUCTION + _vt_lines(names, value, n, chain_depths)
    return _Draft(context, (question,), (tuple(names),))
  return _fit(sizer, target, render, 0, target // 3, "vt")


def _vt_lines(names, value, num_noise, depths) -> str:
  """Noise passages (the last one possibly cut short) with the chain's lines in order."""
  chain = [f"VAR {names[0]} = {value}"]
  chain += [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(len(names) - 1)]
  per_line = len(_NOISE_SENTENCES)
  noise = [" ".join(_NOISE_SENTENCES[:min(per_line, num_noise - start)])
           for start in range(0, num_noise, per_line)]
  return "\n".join(_insert_by_position(noise, chain, depths))


# -- common words extraction --------------------------------------------------------------------

_CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often "
                    "than others. Memorize the ones that appear most often.\n")
_CWE_QUESTION = "\nQuestion: What are the 10 most common words in the above list?"
_CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"
_CWE_COMMON = 10
_CWE_SHORT = 4096  # below this many tokens, RULER repeats words less often


def _cwe(rng, sizer, target, **_) -> _Draft:
  """A numbered list where 10 words repeat often, after a small worked example."""
  if target < _CWE_SHORT:  # RULER: (words, common repeats, uncommon repeats)
    demo_words, demo_common, demo_uncommon, common, uncommon = 20, 3, 1, 6, 1
  else:
    demo_words, demo_common, demo_uncommon, common, uncommon = 40, 10, 3, 30, 3
  vocabulary = _cwe_vocabulary()
  order = [vocabulary[i] for i in rng.permutation(len(vocabulary))]
  demo_list = _cwe_list(order[:demo_words], demo_common, demo_uncommon, rng)
  demo_answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(order[:_CWE_COMMON]))
  demo = (_CWE_INSTRUCTION + demo_list + _CWE_QUESTION + _CWE_ANSWER + " " + demo_answer + "\n")
  words = order[demo_words:]
  answers = (tuple(words[:_CWE_COMMON]),)
  shuffle_seed = int(rng.integers(2**63))

  def render(n):
    shuffle = np.random.default_rng(shuffle_seed)
    context = demo + _CWE_INSTRUCTION + _cwe_list(words[:n], common, uncommon, shuffle)
    return _Draft(context, (_CWE_QUESTION,), answers)
  hi = min(len(words), _CWE_COMMON + target // (3 * uncommon))  # an entry has 3+ tokens
  return _fit(sizer, target, render, _CWE_COMMON, hi, "cwe")


def _cwe_list(words, common: int, uncommon: int, rng) -> str:
  """'1. w 2. w ...': the first 10 words `common` times each, the rest `uncommon` times."""
  entries = (list(words[:_CWE_COMMON]) * common + list(words[_CWE_COMMON:]) * uncommon)
  entries = [entries[i] for i in rng.permutation(len(entries))]
  return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))


@functools.cache
def _cwe_vocabulary() -> tuple[str, ...]:
  """Essay words, minus those the instructions use (they would look like answers)."""
  used = set(re.findall(r"[a-z]+", (_CWE_INSTRUCTION + _CWE_QUESTION + _CWE_ANSWER).lower()))
  return tuple(w for w in data.essay_vocabulary() if w not in used)


# -- frequent words extraction ------------------------------------------------------------------

_FWE_INSTRUCTION = ("Read the following coded text and track the frequency of each coded word. "
                    "Find the three most frequently appeared coded words. ")
_FWE_QUESTION = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
                 "What are the three most frequently appeared words in the above coded text?")
_FWE_NOISE = "...."  # the most frequent "word", which the question says to ignore
_FWE_ALPHA = 2.0
_FWE_ZETA = math.pi ** 2 / 6  # zeta(2)
_FWE_WORD_LETTERS = 5
_LOWER = "abcdefghijklmnopqrstuvwxyz"


def _fwe(rng, sizer, target, **_) -> _Draft:
  """Coded words with Zipf (zeta(2)) counts; the answer is ranks 2-4 (rank 1 is the dots)."""
  vocab_size = max(10, target // 50)  # RULER: max_seq_length // 50
  vocab = [_FWE_NOISE] + _letters(rng, vocab_size - 1, _FWE_WORD_LETTERS, _LOWER)
  answers = (tuple(vocab[1:4]),)
  shuffle_seed = int(rng.integers(2**63))

  def render(n):
    counts = _fwe_counts(n, vocab_size)
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    words = [words[i] for i in np.random.default_rng(shuffle_seed).permutation(len(words))]
    return _Draft(_FWE_INSTRUCTION + " ".join(words), (_FWE_QUESTION,), answers)
  draft = _fit(sizer, target, render, 1, target, "fwe")
  counts = [draft.context.split(" ").count(w) for w in vocab[1:5]]
  if not counts[0] > counts[1] > counts[2] > counts[3]:
    raise TaskError(f"target_tokens={target} is too small for fwe: the top coded words' "
                    f"counts {counts} do not differ")
  return draft


def _fwe_counts(num_words: int, vocab_size: int) -> list[int]:
  """Rank k's count: floor(num_words * k^-alpha / zeta(alpha)), as RULER samples."""
  ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
  return [int(c) for c in np.floor(num_words * ranks ** -_FWE_ALPHA / _FWE_ZETA)]


# -- question answering -------------------------------------------------------------------------

_QA_INSTRUCTION = ("Answer the question based on the given documents. Only give me the answer "
                   "and do not output any other words.")
_QA_HEAD = _QA_INSTRUCTION + "\n\nThe following are given documents.\n\n"
_QA_QUESTION = "\n\n" + _QA_INSTRUCTION + "\n\nQuestion: {question}"
_QA_SOURCES = {"squad": data.squad, "hotpotqa": data.hotpotqa}


def _qa_task(source: str) -> Callable:
  def build(rng, sizer, target, *, seed, index):
    return _qa(source, rng, sizer, target, seed=seed, index=index)
  return build


def _qa(source: str, rng, sizer, target, *, seed: int, index: int, turns: int | None = None
        ) -> _Draft:
  """Gold documents of the question(s) among distractors, at random positions."""
  count = turns if turns is not None else 1
  chosen, gold = _qa_questions(source, seed, index, count, target, sizer)
  pool = _qa_pool(source)
  gold_set = set(gold)
  candidates = [pool[i] for i in rng.permutation(len(pool)) if pool[i] not in gold_set]
  gold_depths = list(rng.random(len(gold)))
  cost = _cached_cost(lambda i: _document_cost(sizer, candidates[i]))
  questions = tuple(_QA_QUESTION.format(question=item.question) for item in chosen)
  answers = tuple(item.answers for item in chosen)

  def render(budget):
    picked = _pack(cost, len(candidates), budget, _slack(target))
    docs = _insert_by_position([candidates[i] for i in picked], gold, gold_depths)
    body = "\n\n".join(f"Document {i + 1}:\n{doc}" for i, doc in enumerate(docs))
    return _Draft(_QA_HEAD + body, questions, answers)
  name = "multiturn_squad" if turns is not None else f"qa_{source}"
  return _fit(sizer, target, render, 0, target, name, budget=True)


def _qa_questions(source: str, seed: int, index: int, count: int, target: int, sizer
                  ) -> tuple[list[data.QAItem], list[str]]:
  """Example index's `count` questions (distinct) and their gold documents.

  Questions follow a permutation of the dataset seeded by (seed, source) only, so example i
  asks the same questions at every length; one whose documents would take more than half of
  target (with the others') is passed over, so distractors always surround the gold.
  """
  items = _QA_SOURCES[source]()
  order = _qa_order(source, seed)
  chosen, gold, room = [], [], target // 2
  for k in range(index * count, index * count + len(items)):
    item = items[order[k % len(items)]]
    new_docs = [d for d in item.documents if d not in gold]
    cost = sum(_document_cost(sizer, d) for d in new_docs)
    if cost > room or any(item.question == c.question for c in chosen):
      continue
    chosen.append(item)
    gold += new_docs
    room -= cost
    if len(chosen) == count:
      return chosen, gold
  raise TaskError(f"target_tokens={target} is too small for {count} {source} question(s): "
                  f"their documents must fit in {target // 2} tokens")


def _document_cost(sizer: _Sizer, document: str) -> int:
  """A document's tokens with its separator and header (numbered as if 10)."""
  return sizer.estimate(f"\n\nDocument 10:\n{document}")


@functools.cache
def _qa_order(source: str, seed: int) -> np.ndarray:
  return np.random.default_rng(_seed(seed, "qa-order", source)).permutation(
      len(_QA_SOURCES[source]()))


@functools.cache
def _qa_pool(source: str) -> tuple[str, ...]:
  """Every distinct document of the dataset, sorted: the distractors to draw from."""
  return tuple(sorted({d for item in _QA_SOURCES[source]() for d in item.documents}))


# -- registry -----------------------------------------------------------------------------------


def _niah_task(task: str) -> Callable:
  def build(rng, sizer, target, **_):
    return _niah(task, _NIAH_SPECS[task], rng, sizer, target)
  return build


_BUILDERS: dict[str, Callable[..., _Draft]] = {
    **{name: _niah_task(name) for name in _NIAH_SPECS},
    "vt": _vt,
    "cwe": _cwe,
    "fwe": _fwe,
    "qa_squad": _qa_task("squad"),
    "qa_hotpotqa": _qa_task("hotpotqa"),
}
_METRICS = {**{name: "all" for name in TASKS}, "qa_squad": "part", "qa_hotpotqa": "part",
            "multiturn_niah": "all", "multiturn_squad": "part"}
assert set(_BUILDERS) == set(TASKS)
