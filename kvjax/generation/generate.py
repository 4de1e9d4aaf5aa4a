"""kvjax.generate: batched text generation over a (possibly compressed) KV cache."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import calibration
from kvjax import methods as methods_lib
from kvjax import sharding
from kvjax import validation
from kvjax.cache import cache_nbytes, full_cache_nbytes, slots_per_head
from kvjax.errors import GenerationError
from kvjax.generation import context, engine, inputs, sampling
from kvjax.sharding.distributed import host_array


@dataclasses.dataclass
class GenerationResult:
  texts: list[str]
  token_ids: list[list[int]]
  stats: dict


# Decode steps per compiled call (one executable per shape serves any max_new_tokens).
DECODE_CHUNK = 16
# The full cache's room for question and generated tokens is rounded up to this, so calls
# with different max_new_tokens (up to 64 apart) reuse the same compiled steps instead of
# compiling new ones (5 s per shape for SmolLM2 on 2 cores), at the price of at most 63
# empty slots that decode attention reads. A compressed dense layer's capacity (kept slots
# plus room) is rounded up to it instead (to a coarser step where layers' capacities
# differ, `kv_cache.capacity_step`), so that contexts of other lengths (other kept
# counts) decode with the same compiled steps too: a new prompt length for SnapKV 0.5 then
# compiles its compressing layer (0.8 s), not the decode loop (2.9 s). Not for methods
# that evict while decoding: they would fill the extra slots first, going over budget.
ROOM_MULTIPLE = 64

_sample_jit = jax.jit(sampling.sample, static_argnames=("greedy",))


def _validate_sampling(max_new_tokens, temperature, top_p, seed, stop) -> list[str]:
  """Checks the sampling arguments; returns the stop strings as a list."""
  validation.integer("max_new_tokens", max_new_tokens, 1, error=GenerationError)
  validation.number("temperature", temperature, 0, error=GenerationError, what="0 = greedy")
  validation.number("top_p", top_p, 0, 1, low_open=True, error=GenerationError)
  # jax.random.key takes a 64-bit signed seed.
  validation.integer("seed", seed, validation.INT64_MIN, validation.INT64_MAX,
                     error=GenerationError)
  return validation.strings("stop", stop, error=GenerationError)


def eos_ids(model, eos_token_ids) -> set[int]:
  """The token ids that end a row: `eos_token_ids` (an id or a list) if given, else the
  tokenizer's."""
  if eos_token_ids is None:
    return set(model.tokenizer.eos_token_ids if model.tokenizer is not None else ())
  return set(validation.token_id_set("eos_token_ids", eos_token_ids, model.config.vocab_size,
                                     error=GenerationError))


def check_context_length(model, total: int, what: str) -> None:
  limit = model.config.max_position_embeddings
  if total > limit:
    raise GenerationError(f"{what} needs {total} positions but the model's context is "
                          f"{limit} tokens; shorten the prompt or max_new_tokens")


class _TextTracker:
  """Incremental detokenization for stop strings and streaming, one row each."""

  def __init__(self, tokenizer, rows: int, stops: list[str], stream: Callable | None):
    self.tokenizer, self.stops, self.stream = tokenizer, stops, stream
    self.emitted = [""] * rows
    self.stopped_text: list[str | None] = [None] * rows

  @property
  def active(self) -> bool:
    return self.tokenizer is not None and bool(self.stops or self.stream)

  def update(self, row: int, ids: list[int], final: bool) -> bool:
    """Returns True if a stop string ended this row."""
    text = self.tokenizer.decode(ids)
    hit = [text.find(s) for s in self.stops if s in text]
    if hit:
      text, final = text[:min(hit)], True
      self.stopped_text[row] = text
    # Hold back a partial UTF-8 character or a possible stop-string prefix until it resolves.
    safe = text if final else text.rstrip("\ufffd")
    if not final:
      for s in self.stops:
        for k in range(min(len(s) - 1, len(safe)), 0, -1):
          if safe.endswith(s[:k]):
            safe = safe[:-k]
            break
    if self.stream is not None and len(safe) > len(self.emitted[row]) and \
        safe.startswith(self.emitted[row]):
      self.stream(row, safe[len(self.emitted[row]):])
      self.emitted[row] = safe
    return bool(hit)


@dataclasses.dataclass
class Completion:
  """What `complete` produced, and the cache it leaves for a following turn."""
  texts: list[str]
  token_ids: list[list[int]]    # generated tokens per row (EOS excluded)
  cache: object                 # the cache after the last decode step
  last_tokens: np.ndarray       # [B] each row's final sampled token, not yet in the cache
  cache_bytes: int              # measured right after the question was prefilled
  first_token_at: float         # perf_counter time when the first token was sampled
  decode_steps: int
  decode_seconds: float         # compile time excluded
  compile_seconds: float        # compile time spent after the first token


def complete(model, logits, cache, plan, question_tokens=None, question_mask=None, *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | Sequence[int] = 0,
             stops: Sequence[str] = (), stream: Callable | None = None,
             eos_token_ids: Sequence[int] | None = None,
             steps: engine.CompiledSteps = engine.STEPS, mask_finished: bool = False
             ) -> Completion:
  """Prefills left-padded question tokens (if any) on top of a prefilled cache, then decodes.

  logits [B, V]: the next-token logits after the cache's last token (ignored when there
  are question tokens). mask_finished: rows that are done feed masked tokens from then on,
  so the returned cache holds exactly each row's text (needed to continue a conversation).
  seed: one for the batch, or one per row (each row then draws what `generate` draws for
  its prompt alone with that seed).
  """
  if question_tokens is not None:
    asked = np.asarray(question_mask).any(axis=1)
    question_logits, cache = steps.prefill(model, jnp.asarray(question_tokens),
                                           jnp.asarray(question_mask), cache, plan=plan)
    # A row without question tokens (its question was "") continues from its context.
    logits = question_logits if asked.all() else jnp.where(
        jnp.asarray(asked)[:, None], question_logits, logits)
  rows = logits.shape[0]
  greedy = temperature == 0
  key = sampling.keys_of(seed)
  next_tokens = _sample_jit(logits, sampling.step_key(key, 0), jnp.float32(temperature or 1),
                            jnp.float32(top_p), greedy=greedy)
  next_host = host_array(next_tokens)
  first_token_at = time.perf_counter()
  cache_bytes = cache_nbytes(cache)
  compile_at_start = steps.compile_seconds

  eos = eos_ids(model, eos_token_ids)
  tracker = _TextTracker(model.tokenizer, rows, list(stops), stream)
  generated = [[] for _ in range(rows)]
  last = np.array(next_host)
  finished = np.zeros(rows, bool)
  decode_steps, decode_seconds = 0, 0.0

  def accept(tokens_host):
    for r in range(rows):
      if finished[r]:
        continue
      token = int(tokens_host[r])
      last[r] = token
      if token in eos:
        finished[r] = True
        continue
      generated[r].append(token)
      stopped = tracker.active and tracker.update(r, generated[r], final=False)
      if stopped or len(generated[r]) >= max_new_tokens:
        finished[r] = True

  accept(next_host)
  # Steps run DECODE_CHUNK at a time in one compiled loop that stops at EOS. Stop strings
  # are found here on the host, so a cache that must end exactly at each row's text
  # (mask_finished) is decoded one step per call when there are any; so is a streamed
  # one, whose text arrives token by token.
  one_by_one = tracker.active and (stream is not None or (mask_finished and bool(stops)))
  while not finished.all() and decode_steps < max_new_tokens - 1:
    limit = 1 if one_by_one else min(DECODE_CHUNK, max_new_tokens - 1 - decode_steps)
    compile_before = steps.compile_seconds
    step_start = time.perf_counter()
    tokens_host, ran, cache, next_tokens, _ = steps.decode_loop(
        model, next_tokens, cache, key, decode_steps + 1, limit, temperature or 1.0, top_p,
        greedy, sorted(eos), DECODE_CHUNK, plan, active=~finished,
        mask_finished=mask_finished)
    decode_seconds += (time.perf_counter() - step_start
                       - (steps.compile_seconds - compile_before))
    decode_steps += ran
    for i in range(ran):
      accept(tokens_host[:, i])

  texts = []
  for r in range(rows):
    if tracker.stopped_text[r] is not None:
      texts.append(tracker.stopped_text[r])
    elif model.tokenizer is not None:
      if tracker.active:
        tracker.update(r, generated[r], final=True)  # flush held-back stream text
      texts.append(model.tokenizer.decode(generated[r]))
    else:
      texts.append("")
  return Completion(texts=texts, token_ids=generated, cache=cache, last_tokens=last,
                    cache_bytes=cache_bytes, first_token_at=first_token_at,
                    decode_steps=decode_steps, decode_seconds=decode_seconds,
                    compile_seconds=steps.compile_seconds - compile_at_start)


def protected_tokens(method, plan, keep: int | None) -> tuple[int | None, int | None]:
  """(configured, used) protected tokens per layer and KV head at the mean budget `keep`:
  the method's own, and its fitted copy's in the decode plan; (None, None) uncompressed."""
  if keep is None or plan is None:
    return None, None
  return method.protected_tokens(keep), plan.method.protected_tokens(keep)


def generate(model, prompts, questions=None, method=None, compression_ratio=None, budget=None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, stop: str | Sequence[str] | None = None,
             stream: Callable[[int, str], None] | None = None,
             chat_template: bool | None = None, eos_token_ids: Sequence[int] | None = None,
             prefill_chunk_size: int | None = None, method_params=None) -> GenerationResult:
  """Generates continuations of a prompt or a batch of prompts.

  prompts: str, list[str], or token ids (list[int] / list[list[int]]).
  questions: optional, one per prompt (or several for a single prompt): appended after the
    prompt's cache is built and compressed, and never compressed (query-agnostic mode). A
    single prompt with several questions is prefilled and compressed once, then its cache
    is shared by every question.
  method / compression_ratio / budget: a registry name or method object; the fraction of
    the prompt cache removed, or the most tokens kept per layer (per KV head): a cap, so a
    prompt not longer than it is kept whole. When the budget is smaller than the tokens
    the method protects (sinks, recent window), those shrink to fit
    (stats["protected_tokens"] against stats["protected_tokens_configured"]).
  prefill_chunk_size: prefill the prompt in chunks of this many tokens, compressing after
    each chunk, so the cache never holds more than budget + chunk tokens.
  stream: called as stream(row_index, new_text) as text becomes final.
  method_params: the parameter pytree of a method with trained parts (traced: new values
    do not recompile).
  chat_template: True or False: apply the tokenizer's chat template (default None: when
    the model has one).
  eos_token_ids: a token id or a list of them that end a row (default: the tokenizer's).
  An empty question ("") adds nothing: that row is generated as if it had no question.
  Every argument is checked before anything runs; bad values raise a GenerationError (a
  kvjax.KvjaxError) naming the argument and what is allowed.
  """
  stops = _validate_sampling(max_new_tokens, temperature, top_p, seed, stop)
  if stream is not None and not callable(stream):
    raise GenerationError(f"stream={validation.show(stream)} must be callable as "
                          f"stream(row, text)")
  eos = sorted(eos_ids(model, eos_token_ids))
  method_obj = calibration.bind(method, model)
  context.check_chunk_size(prefill_chunk_size)
  prompt_list, _ = inputs.as_batch(prompts, "prompts")
  question_list = None
  shared_context = False
  if questions is not None:
    question_list, _ = inputs.as_batch(questions, "questions")
    if len(prompt_list) == 1 and len(question_list) > 1:
      prompt_list = prompt_list * len(question_list)  # encoded per question, prefilled once
      shared_context = True
    if len(question_list) != len(prompt_list):
      raise GenerationError(f"got {len(question_list)} questions for {len(prompt_list)} "
                            f"prompts; give one question per prompt")
  batch = inputs.encode(model, prompt_list, question_list, chat_template)
  rows = len(batch.prompts)
  sharding.check_batch(model, rows, "the batch")
  # An empty question leaves its row's context as if it had none (with a chat template,
  # that context differs from the others'), so the rows may no longer share one.
  shared_context = shared_context and all(p == batch.prompts[0] for p in batch.prompts)
  context_lengths = [len(p) for p in batch.prompts]
  question_lengths = [len(q) for q in batch.questions] if batch.questions else [0] * rows
  for i in range(rows):
    check_context_length(model, context_lengths[i] + question_lengths[i] + max_new_tokens,
                         f"prompt {i} ({context_lengths[i]} prompt + {question_lengths[i]} "
                         f"question tokens) with max_new_tokens={max_new_tokens}")
  keep = methods_lib.validate_compression(method_obj, context_lengths, compression_ratio,
                                          budget)

  pad = inputs.pad_id(model)
  context_rows = batch.prompts[:1] if shared_context else batch.prompts
  width = inputs.context_width(max(context_lengths), prefill_chunk_size)
  prompt_tokens, prompt_mask = inputs.left_pad(context_rows, pad, width)
  question_tokens = question_mask = None
  if batch.questions and any(batch.questions):
    question_tokens, question_mask = inputs.left_pad(batch.questions, pad)
  question_width = 0 if question_tokens is None else question_tokens.shape[1]
  # Decode-time methods stay at their budget while generating, so they need no room for it,
  # except the part of a budget (a cap) that the context did not fill: empty slots are
  # filled before the method evicts, so the cache grows to the budget first.
  evicting = keep is not None and method_obj.decode_time
  generated_room = (max_new_tokens if not evicting else
                    0 if budget is None else min(max_new_tokens, budget - keep))
  needed = question_width + generated_room
  if evicting:   # rounded to 16 only, so that the cache stays near its budget
    room, multiple = context.round_up(needed, 16), 1
  elif method_obj.decode_time:   # the room rounded, not the capacity, as for evicting
    room, multiple = context.round_up(needed, ROOM_MULTIPLE), 1
  else:   # the full cache's room rounded up, a compressed layer's kept slots and room
    room, multiple = needed, ROOM_MULTIPLE
  steps = engine.STEPS
  compile_at_start = compile_before = steps.compile_seconds

  start = time.perf_counter()
  # A budgeted cache's parts whose sizes follow the kept counts (an evicting layer's
  # capacity, a head-wise layer's, ThinK's pruned part, KIVI's quantized part, MiKV's
  # pools) are rounded with reserved slots, so prompts of other lengths share its compiled
  # decode loop. Without a budget most hold the bucketed width, which needs none; a
  # method that `trims_padding` to the real length is rounded as a budgeted one.
  reserving = keep is not None or method_obj.trims_padding
  prefilled = context.prefill(model, prompt_tokens, prompt_mask, method_obj, keep, room,
                              prefill_chunk_size, steps, method_params, multiple,
                              ROOM_MULTIPLE if reserving else 1)
  logits, cache, plan = prefilled.logits, prefilled.cache, prefilled.decode_plan
  if shared_context:
    cache = context.tile_rows(cache, rows)
    logits = jnp.repeat(logits, rows, axis=0)  # rows whose question is "" continue from it
  done = complete(model, logits, cache, plan, question_tokens, question_mask,
                  max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                  stops=stops, stream=stream, eos_token_ids=eos, steps=steps)
  prefill_seconds = (done.first_token_at - start
                     - (steps.compile_seconds - compile_before - done.compile_seconds))
  texts, generated, measured_cache_bytes = done.texts, done.token_ids, done.cache_bytes
  decode_steps, decode_seconds = done.decode_steps, done.decode_seconds
  context_rows_count = len(context_rows)
  protected = protected_tokens(method_obj, plan, keep)
  stats = {
      "method": method_obj.label,
      "compression_ratio": compression_ratio,
      "budget": budget,
      "kept_tokens_per_layer": list(prefilled.budgets) if prefilled.budgets else None,
      # Sinks + recent window per layer and KV head at the mean budget, as configured and
      # as used: a budget smaller than the configured protection shrinks it (Method.fitted).
      "protected_tokens": protected[1],
      "protected_tokens_configured": protected[0],
      "method_stats": prefilled.method_stats,
      "decode_method_stats": method_obj.decode_stats(done.cache),
      "batch_size": rows,
      "prompt_tokens": context_lengths,
      "question_tokens": question_lengths,
      "generated_tokens": [len(g) for g in generated],
      "prefill_chunk_size": prefill_chunk_size,
      "room_tokens": prefilled.room,
      "cache_capacity_tokens": slots_per_head(model.config, cache),
      "prompt_width_tokens": width,
      # The context's cache: what it holds (a compressed one measured from its arrays; the
      # full one the longest context's tokens, its prompt bucket's padding left out), next
      # to what the full cache of that context holds, and what it allocates (padding in).
      "context_cache_bytes": prefilled.context_cache_bytes,
      "full_context_cache_bytes": full_cache_nbytes(model.config, context_rows_count,
                                                    max(context_lengths)),
      "context_cache_allocated_bytes": prefilled.context_cache_allocated_bytes,
      "context_cache_host_bytes": prefilled.context_cache_host_bytes,
      # The whole cache as allocated after prefill, measured (padding, question and room
      # for generated tokens included), next to the full cache's allocation for this call
      # (the same padded width and room): equal for the full method.
      "cache_bytes": measured_cache_bytes,
      "full_cache_bytes": full_cache_nbytes(model.config, rows,
                                            width + context.round_up(room, multiple)),
      "prefill_seconds": prefill_seconds,
      "prefill_tokens_per_second": sum(context_lengths + question_lengths) / prefill_seconds,
      "decode_steps": decode_steps,
      "decode_seconds": decode_seconds,
      "decode_tokens_per_second": (decode_steps * rows / decode_seconds
                                   if decode_seconds > 0 else float("nan")),
      "compile_seconds": steps.compile_seconds - compile_at_start,
  }
  return GenerationResult(texts=texts, token_ids=generated, stats=stats)
