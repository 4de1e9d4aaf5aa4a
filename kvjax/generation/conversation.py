"""Multi-turn conversations over one compressed context, the cache reused between turns.

The context is prefilled and compressed once. Each turn then appends its question to the
cache that the previous turn left (context, earlier questions and answers), generates an
answer, and keeps it in the cache for the next turn: nothing is ever re-prefilled. This is
the long-conversation setting of EpiCache and LoopServe.
"""

from __future__ import annotations

import dataclasses
import time

from kvjax import calibration
from kvjax import methods as methods_lib
from kvjax import validation
from kvjax.cache import cache_nbytes, free_slots
from kvjax.errors import GenerationError
from kvjax.generation import context as context_lib
from kvjax.generation import engine, inputs
from kvjax.generation.generate import (_validate_sampling, check_context_length, complete,
                                       eos_ids)

_USER, _ANSWER, _NEXT = "\x00kvjax-user\x00", "\x00kvjax-answer\x00", "\x00kvjax-next\x00"


@dataclasses.dataclass
class ConversationResult:
  answers: list[list[str]]   # [row][turn]
  stats: dict


@dataclasses.dataclass
class EncodedConversations:
  contexts: list[list[int]]         # per row: the compressible context
  turns: list[list[list[int]]]      # [turn][row]: tokens appended to ask that turn's
                                    # question (later turns start by closing the answer)


def _follow_up_template(tokenizer, chat_template: bool) -> tuple[str, str]:
  """(text between an answer and the next question, text after a question)."""
  if not chat_template:
    return "\n", "\n"
  rendered = tokenizer.apply_chat_template(
      [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ANSWER},
       {"role": "user", "content": _NEXT}], add_generation_prompt=True)
  between, suffix = rendered.split(_ANSWER)[1].split(_NEXT)
  return between, suffix


def conversations(contexts, questions) -> tuple[list[str], list[list[str]]]:
  """(contexts, questions[row][turn]) from what converse accepts: one context (a str) with
  one question (a str) or a list of them, or a list of contexts with one list of questions
  each."""
  malformed = GenerationError(
      f"questions={validation.show(questions)} must be a str or a list of str (one "
      f"conversation), or a list of such lists (one per context)")
  if isinstance(contexts, str):
    contexts = [contexts]
    if isinstance(questions, str):
      questions = [questions]
    if not isinstance(questions, (list, tuple)):
      raise malformed
    questions = [questions]
  elif not isinstance(contexts, (list, tuple)) or not contexts or not all(
      isinstance(c, str) for c in contexts):
    raise GenerationError(f"contexts={validation.show(contexts)} must be a str or a non-empty "
                          f"list of str")
  elif isinstance(questions, str) or (isinstance(questions, (list, tuple)) and questions
                                      and all(isinstance(q, str) for q in questions)):
    raise GenerationError(
        f"questions={validation.show(questions)} is not one list per context for "
        f"{len(contexts)} contexts; give a list of question lists, e.g. [[q] for q in "
        f"questions] (one question each) or [questions] * {len(contexts)} (the same "
        f"conversation on every context)")
  if not isinstance(questions, (list, tuple)) or not all(
      isinstance(row, (list, tuple)) for row in questions):
    raise malformed
  for i, context in enumerate(contexts):
    validation.text(f"contexts[{i}]", context, error=GenerationError)
  return list(contexts), [list(row) for row in questions]


def encode_conversations(model, contexts: list[str], questions: list[list[str]],
                         chat_template: bool | None = None) -> EncodedConversations:
  """Token ids of each row's context and of every turn's question."""
  if len(contexts) != len(questions):
    raise GenerationError(f"got {len(contexts)} contexts and {len(questions)} question lists; "
                          f"give one list of questions per context")
  turns = {len(q) for q in questions}
  if len(turns) != 1 or 0 in turns:
    raise GenerationError(f"every conversation needs the same number (>= 1) of questions; got "
                          f"{sorted(len(q) for q in questions)}")
  for r, row in enumerate(questions):
    for t, q in enumerate(row):
      if not isinstance(q, str):
        raise GenerationError(f"questions must be strings; questions[{r}][{t}] is "
                              f"{validation.show(q)}")
      validation.text(f"questions[{r}][{t}]", q, error=GenerationError)
  first = inputs.encode(model, list(contexts), [q[0] for q in questions], chat_template)
  tokenizer = model.tokenizer
  between, suffix = _follow_up_template(tokenizer, inputs.use_chat_template(model, chat_template))
  later = [[inputs.tokenizer_ids(tokenizer.encode(between + row[t] + suffix,
                                                 add_special_tokens=False),
                                model.config.vocab_size, f"questions[{r}][{t}]")
            for r, row in enumerate(questions)] for t in range(1, turns.pop())]
  return EncodedConversations(first.prompts, [first.questions] + later)


def run_turns(model, prefilled: context_lib.PrefilledContext, turns: list[list[list[int]]],
              max_new_tokens: int, room: int, stop=None, eos_token_ids=None,
              steps=engine.STEPS) -> dict:
  """Asks each turn's questions over a prefilled context, keeping every answer in the cache.

  Every turn needs up to `room` slots per head (its question and answer); the cache is
  grown once, before the first turn, to hold all of them, so every turn runs the same
  compiled steps on the same cache shapes. Returns {"answers":
  [row][turn], "token_ids": [row][turn], "turn_cache_bytes": [...], "decode_seconds",
  "decode_steps"}.
  """
  stops = _validate_sampling(max_new_tokens, 0.0, 1.0, 0, stop)
  eos = eos_ids(model, eos_token_ids)
  rows = len(turns[0])
  pad = inputs.pad_id(model)
  cache, logits, plan = prefilled.cache, prefilled.logits, prefilled.decode_plan
  cache = steps.grow(cache, max(0, len(turns) * room - free_slots(cache)),
                     model.placement)
  answers, token_ids = [[] for _ in range(rows)], [[] for _ in range(rows)]
  turn_cache_bytes, decode_seconds, decode_steps = [], 0.0, 0
  last = None
  for t, questions in enumerate(turns):
    if t > 0:
      # The final sampled token of each answer is not in the cache yet; an end-of-turn
      # token is left out because the template's own text closes the answer.
      questions = [([int(last[r])] if int(last[r]) not in eos else []) + q
                   for r, q in enumerate(questions)]
    tokens, mask = inputs.left_pad(questions, pad)
    if tokens.shape[1] > room:
      raise GenerationError(f"turn {t} needs {tokens.shape[1]} question slots but room is "
                            f"{room}; raise room")
    done = complete(model, logits, cache, plan, tokens, mask, max_new_tokens=max_new_tokens,
                    stops=stops, eos_token_ids=sorted(eos), steps=steps, mask_finished=True)
    cache, last = done.cache, done.last_tokens
    turn_cache_bytes.append(cache_nbytes(cache))
    decode_seconds += done.decode_seconds
    decode_steps += done.decode_steps
    for r in range(rows):
      answers[r].append(done.texts[r])
      token_ids[r].append(done.token_ids[r])
  return {"answers": answers, "token_ids": token_ids, "turn_cache_bytes": turn_cache_bytes,
          "decode_seconds": decode_seconds, "decode_steps": decode_steps}


def turn_room(turns: list[list[list[int]]], max_new_tokens: int) -> int:
  """Empty slots per head that any one turn needs: its widest question (plus the previous
  answer's last token) and its answer, rounded up to 16."""
  widest = max(len(q) for turn in turns for q in turn) + 1
  return -(-(inputs.bucket(widest) + max_new_tokens) // 16) * 16


def converse(model, contexts, questions, method=None, compression_ratio=None, budget=None,
             max_new_tokens: int = 64, stop=None, chat_template: bool | None = None
             ) -> ConversationResult:
  """Answers questions[row][turn] one turn after another over each row's compressed context.

  contexts: a str with questions a str (one question) or a list of str (one conversation);
  or a list of str with questions a list of such lists (one per context, all of the same
  length). Greedy decoding.
  """
  contexts, questions = conversations(contexts, questions)
  _validate_sampling(max_new_tokens, 0.0, 1.0, 0, stop)
  if model.tokenizer is None:
    raise GenerationError("converse needs a model with a tokenizer")
  method_obj = calibration.bind(method, model)
  encoded = encode_conversations(model, contexts, questions, chat_template)
  room = turn_room(encoded.turns, max_new_tokens)
  lengths = [len(c) for c in encoded.contexts]
  for r, length in enumerate(lengths):
    check_context_length(model, length + len(encoded.turns) * room,
                         f"conversation {r} ({length} context tokens, {len(encoded.turns)} "
                         f"turns of up to {room} tokens)")
  keep = methods_lib.validate_compression(method_obj, lengths, compression_ratio, budget)
  tokens, mask = inputs.left_pad(encoded.contexts, inputs.pad_id(model))
  start = time.perf_counter()
  prefilled = context_lib.prefill(model, tokens, mask, method_obj, keep, room)
  out = run_turns(model, prefilled, encoded.turns, max_new_tokens, room, stop)
  stats = {"method": method_obj.label, "compression_ratio": compression_ratio,
           "budget": budget, "context_tokens": lengths, "turns": len(encoded.turns),
           "context_cache_bytes": prefilled.context_cache_bytes,
           "context_cache_allocated_bytes": prefilled.context_cache_allocated_bytes,
           "context_cache_host_bytes": prefilled.context_cache_host_bytes,
           "turn_cache_bytes": out["turn_cache_bytes"],
           "decode_steps": out["decode_steps"], "decode_seconds": out["decode_seconds"],
           "seconds": time.perf_counter() - start}
  return ConversationResult(answers=out["answers"], stats=stats)
