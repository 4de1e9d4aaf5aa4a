"""Turning user prompts (text or token ids) into padded, bucketed token batches."""

from __future__ import annotations

import dataclasses

import numpy as np

from kvjax import validation
from kvjax.errors import GenerationError

# Where the prompt ends in a rendered chat template: a private-use character that the
# prompt does not contain (so no prompt text can be mistaken for it).
_MARKER_CODES = range(0xF0000, 0xFFFFE)


@dataclasses.dataclass
class EncodedBatch:
  prompts: list[list[int]]           # the compressible context of each row
  questions: list[list[int]] | None  # appended after compression, never compressed; a row
                                     # whose question is "" has none ([])


def is_token_ids(x) -> bool:
  return isinstance(x, (list, tuple, np.ndarray)) and len(x) > 0 and all(
      validation.is_integer(t) for t in x)


def as_batch(values, what: str) -> tuple[list, bool]:
  """(list of items, was_single). Items are strings or token-id lists."""
  if isinstance(values, str) or is_token_ids(values):
    return [values], True
  if not isinstance(values, (list, tuple)) or not values:
    raise GenerationError(f"{what} must be a non-empty str, a list of str, or token ids; "
                          f"got {type(values).__name__} {validation.show(values)}")
  for i, v in enumerate(values):
    if not (isinstance(v, str) or is_token_ids(v)):
      raise GenerationError(f"{what}[{i}] must be a str or a non-empty list of token ids; "
                            f"got {validation.show(v)}")
  return list(values), False


def use_chat_template(model, chat_template: bool | None) -> bool:
  """Whether to apply the tokenizer's chat template (None: when the model has one)."""
  tokenizer = model.tokenizer
  has_template = tokenizer is not None and tokenizer.has_chat_template
  if chat_template is None:
    return has_template
  chat_template = validation.boolean("chat_template", chat_template, error=GenerationError)
  if chat_template and not has_template:
    raise GenerationError("chat_template=True but the model's tokenizer has no chat template")
  return chat_template


def render_chat(tokenizer, prompt: str) -> tuple[str, str]:
  """(the chat template rendered up to the end of the user's prompt, the rest: what opens
  the assistant's turn). A question goes between the two."""
  marker = next((chr(c) for c in _MARKER_CODES if chr(c) not in prompt), None)
  if marker is None:
    raise GenerationError("the prompt uses every private-use character U+F0000..U+FFFFD; "
                          "kvjax needs one of them free to place a question")
  rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt + marker}],
                                           add_generation_prompt=True)
  if rendered.count(marker) != 1:
    raise GenerationError(f"the chat template renders the prompt {rendered.count(marker)} "
                          f"times, so a question cannot be placed after it; pass "
                          f"chat_template=False and format the prompt yourself")
  before, _, after = rendered.partition(marker)
  return before, after


def tokenizer_ids(ids: list[int], vocab_size: int, what: str) -> list[int]:
  """Token ids a tokenizer produced, checked against the model's embedding table."""
  if ids and not 0 <= max(ids) < vocab_size:
    raise GenerationError(f"the tokenizer gave token id {max(ids)} for {what}, outside the "
                          f"model's vocabulary [0, {vocab_size}): the tokenizer does not "
                          f"match the model")
  return ids


def encode(model, prompts: list, questions: list | None, chat_template: bool | None
           ) -> EncodedBatch:
  """Token ids of each prompt and question; every id checked against the vocabulary.

  An empty question string adds nothing: its row is encoded as if it had no question (with
  a chat template, the whole rendered prompt is then its context), as kvpress's question=""
  does.
  """
  tokenizer = model.tokenizer
  vocab = model.config.vocab_size
  text_items = [p for p in prompts + (questions or []) if isinstance(p, str)]
  if text_items and tokenizer is None:
    raise GenerationError(f"model {model.name or '(unnamed)'} has no tokenizer: pass prompts "
                          f"as lists of token ids")
  chat_template = use_chat_template(model, chat_template)
  encoded_prompts, encoded_questions = [], [] if questions is not None else None
  for i, prompt in enumerate(prompts):
    question = questions[i] if questions is not None else None
    if not isinstance(prompt, str):
      if question is not None and isinstance(question, str):
        raise GenerationError(f"prompts[{i}] is token ids but questions[{i}] is text; give both "
                              f"as text or both as token ids")
      encoded_prompts.append(validation.token_ids(f"prompts[{i}]", prompt, vocab,
                                                  error=GenerationError))
      if question is not None:
        encoded_questions.append(validation.token_ids(f"questions[{i}]", question, vocab,
                                                      error=GenerationError))
      continue
    if question is not None and not isinstance(question, str):
      raise GenerationError(f"prompts[{i}] is text but questions[{i}] is token ids")
    validation.text(f"prompts[{i}]", prompt, error=GenerationError)
    if question is not None:
      validation.text(f"questions[{i}]", question, error=GenerationError)
    asked = bool(question)
    context_text, question_text = prompt, question
    if chat_template and asked:
      context_text, suffix = render_chat(tokenizer, prompt)
      question_text = question + suffix
    elif chat_template:
      context_text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                   add_generation_prompt=True)
    # A rendered template already carries its special tokens (e.g. BOS) as text.
    encoded_prompts.append(tokenizer_ids(
        tokenizer.encode(context_text, add_special_tokens=not chat_template), vocab,
        f"prompts[{i}]"))
    if questions is not None:
      encoded_questions.append(tokenizer_ids(
          tokenizer.encode(question_text, add_special_tokens=False), vocab,
          f"questions[{i}]") if asked else [])
  for i, p in enumerate(encoded_prompts):
    if not p:
      raise GenerationError(f"prompts[{i}] is empty after tokenization")
  return EncodedBatch(encoded_prompts, encoded_questions)


def pad_id(model) -> int:
  """Padding token (its value never matters: padded slots are masked by position)."""
  tok = model.tokenizer
  return tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0


def bucket(length: int) -> int:
  """Pads lengths to a few sizes so each new prompt length does not recompile."""
  if length <= 16:
    return 16
  if length <= 512:
    return 1 << (length - 1).bit_length()
  return -(-length // 512) * 512


def context_width(longest: int, chunk_size: int | None = None) -> int:
  """The padded width of contexts up to `longest` tokens: its bucket, rounded up to a
  multiple of `chunk_size` when prefilled in chunks."""
  width = bucket(longest)
  return width if chunk_size is None else -(-width // chunk_size) * chunk_size


def left_pad(rows: list[list[int]], pad_id: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """[B, length] tokens and mask, real tokens right-aligned so every row ends together."""
  length = length or bucket(max(len(r) for r in rows))
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    if row:
      tokens[i, length - len(row):] = row
      mask[i, length - len(row):] = True
  return tokens, mask


def right_pad(rows: list[list[int]], pad_id: int, length: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
  """[B, length] tokens and mask with row i's tokens first (position j is its j-th token).

  `length` defaults to the bucketed longest row, the width score.continuation_log_probs uses.
  """
  length = length or bucket(max(len(r) for r in rows))
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = True
  return tokens, mask
