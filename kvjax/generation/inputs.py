"""Turning user prompts (text or token ids) into padded, bucketed token batches."""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from kvjax.errors import GenerationError

_MARKER = "\x00kvjax-question\x00"


@dataclasses.dataclass
class EncodedBatch:
  prompts: list[list[int]]           # the compressible context of each row
  questions: list[list[int]] | None  # appended after compression, never compressed


def is_token_ids(x) -> bool:
  return isinstance(x, (list, tuple, np.ndarray)) and len(x) > 0 and all(
      isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in x)


def as_batch(values, what: str) -> tuple[list, bool]:
  """(list of items, was_single). Items are strings or token-id lists."""
  if isinstance(values, str) or is_token_ids(values):
    return [values], True
  if not isinstance(values, (list, tuple)) or not values:
    raise GenerationError(f"{what} must be a non-empty str, a list of str, or token ids; "
                          f"got {type(values).__name__} {values!r:.80}")
  for i, v in enumerate(values):
    if not (isinstance(v, str) or is_token_ids(v)):
      raise GenerationError(f"{what}[{i}] must be a str or a non-empty list of token ids; "
                            f"got {v!r:.80}")
  return list(values), False


def encode(model, prompts: list, questions: list | None, chat_template: bool | None
           ) -> EncodedBatch:
  tokenizer = model.tokenizer
  text_items = [p for p in prompts + (questions or []) if isinstance(p, str)]
  if text_items and tokenizer is None:
    raise GenerationError(f"model {model.name or '(unnamed)'} has no tokenizer: pass prompts "
                          f"as lists of token ids")
  if chat_template is None:
    chat_template = tokenizer is not None and tokenizer.has_chat_template
  if chat_template and (tokenizer is None or not tokenizer.has_chat_template):
    raise GenerationError("chat_template=True but the model's tokenizer has no chat template")
  encoded_prompts, encoded_questions = [], [] if questions is not None else None
  for i, prompt in enumerate(prompts):
    question = questions[i] if questions is not None else None
    if not isinstance(prompt, str):
      if question is not None and isinstance(question, str):
        raise GenerationError(f"prompts[{i}] is token ids but questions[{i}] is text; give both "
                              f"as text or both as token ids")
      encoded_prompts.append([int(t) for t in prompt])
      if question is not None:
        encoded_questions.append([int(t) for t in question])
      continue
    if question is not None and not isinstance(question, str):
      raise GenerationError(f"prompts[{i}] is text but questions[{i}] is token ids")
    context_text, question_text = prompt, question
    if chat_template:
      rendered = tokenizer.apply_chat_template(
          [{"role": "user", "content": prompt + (_MARKER if question is not None else "")}],
          add_generation_prompt=True)
      if question is None:
        context_text = rendered
      else:
        context_text, suffix = rendered.split(_MARKER)
        question_text = question + suffix
    # A rendered template already carries its special tokens (e.g. BOS) as text.
    encoded_prompts.append(tokenizer.encode(context_text, add_special_tokens=not chat_template))
    if question is not None:
      encoded_questions.append(tokenizer.encode(question_text, add_special_tokens=False))
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
