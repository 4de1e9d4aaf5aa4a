"""kvjax.score: log-probabilities of a continuation read through the cache of a context."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import calibration
from kvjax import methods as methods_lib
from kvjax import sharding
from kvjax import validation
from kvjax.cache import free_slots
from kvjax.errors import GenerationError
from kvjax.generation import context as context_lib
from kvjax.generation import engine, inputs
from kvjax.generation.generate import check_context_length
from kvjax.sharding.distributed import host_array


def _tokens(model, item, add_special: bool, what: str) -> list[int]:
  vocab = model.config.vocab_size
  if isinstance(item, str):
    if model.tokenizer is None:
      raise GenerationError(f"model has no tokenizer: pass {what} as token ids")
    validation.text(what, item, error=GenerationError)
    ids = inputs.tokenizer_ids(model.tokenizer.encode(item, add_special_tokens=add_special),
                               vocab, what)
  else:
    ids = validation.token_ids(what, item, vocab, error=GenerationError)
  if not ids:
    raise GenerationError(f"{what} is empty after tokenization")
  return ids


@jax.jit
def _predicting_log_probs(last_logits, cont_logits):
  # Logits predicting continuation token j: the context's last for j = 0, else position j - 1.
  predicting = jnp.concatenate([last_logits[:, None], cont_logits[:, :-1]], axis=1)
  return jax.nn.log_softmax(predicting.astype(jnp.float32), axis=-1)


def continuation_log_probs(model, prefilled: context_lib.PrefilledContext,
                           continuation_ids: list[list[int]]) -> jax.Array:
  """Next-token distributions over each continuation, read through a prefilled context.

  The continuation is prefilled on top of `prefilled.cache` uncompressed (as a question or
  generated text would be), with `prefilled.decode_plan`.

  Args:
    model: the model the context was prefilled with.
    prefilled: the context, from `context.prefill(..., room=room)` with one row per
      continuation and room >= T (below). Its cache is consumed: the forward step donates
      its buffers, so prefill again to read another continuation.
    continuation_ids: one non-empty list of token ids per row.

  Returns:
    [B, T, V] float32 log-softmax distributions; [i, j] predicts continuation_ids[i][j].
    T = inputs.bucket(longest continuation) and rows are right-padded to it: only the first
    len(continuation_ids[i]) positions of row i are meaningful.

  Raises:
    GenerationError: the rows do not match the cache's batch, a row is empty, or the cache
      has fewer than T free slots.
  """
  rows = prefilled.cache.batch_size
  if len(continuation_ids) != rows:
    raise GenerationError(f"got {len(continuation_ids)} continuations for a prefilled "
                          f"context of {rows} rows; they must pair up")
  for i, row in enumerate(continuation_ids):
    if len(row) == 0:
      raise GenerationError(f"continuation_ids[{i}] is empty; each row needs >= 1 token")
  tokens, mask = inputs.right_pad([list(r) for r in continuation_ids], inputs.pad_id(model))
  width = tokens.shape[1]
  room = free_slots(prefilled.cache)
  if room < width:
    # A full cache would silently clamp the write (dynamic_update_slice), so check here.
    raise GenerationError(f"the prefilled cache has room for {room} more tokens but the "
                          f"continuations need {width} (longest row "
                          f"{max(len(r) for r in continuation_ids)}, bucketed); prefill with "
                          f"room >= {width}")
  cont_logits, _ = engine.STEPS.prefill(model, jnp.asarray(tokens), jnp.asarray(mask),
                                        prefilled.cache, logits="all",
                                        plan=prefilled.decode_plan)
  return _predicting_log_probs(prefilled.logits, cont_logits)


def score(model, context, continuation, method=None, compression_ratio=None, budget=None):
  """Per-token log-probs of `continuation` given `context`.

  The context is prefilled and compressed first, then the continuation is prefilled on top
  of the compressed cache (uncompressed, as a question or generated text would be). Returns a
  float32 array [len(continuation tokens)] for single inputs, or a list of them for a batch.
  """
  method_obj = calibration.bind(method, model)
  contexts, single = inputs.as_batch(context, "context")
  continuations, _ = inputs.as_batch(continuation, "continuation")
  if len(contexts) != len(continuations):
    raise GenerationError(f"got {len(contexts)} contexts and {len(continuations)} "
                          f"continuations; they must pair up")
  ctx_ids = [_tokens(model, c, True, f"context[{i}]") for i, c in enumerate(contexts)]
  cont_ids = [_tokens(model, c, False, f"continuation[{i}]") for i, c in enumerate(continuations)]
  sharding.check_batch(model, len(ctx_ids), "the batch")
  for i, (a, b) in enumerate(zip(ctx_ids, cont_ids)):
    check_context_length(model, len(a) + len(b), f"context {i} + continuation")
  keep = methods_lib.validate_compression(method_obj, [len(c) for c in ctx_ids],
                                          compression_ratio, budget)

  pad = inputs.pad_id(model)
  ctx_tokens, ctx_mask = inputs.left_pad(ctx_ids, pad)
  cont_tokens, _ = inputs.right_pad(cont_ids, pad)
  prefilled = context_lib.prefill(model, ctx_tokens, ctx_mask, method_obj, keep,
                                  room=cont_tokens.shape[1])
  logprobs = continuation_log_probs(model, prefilled, cont_ids)
  picked = host_array(jnp.take_along_axis(logprobs, jnp.asarray(cont_tokens)[..., None],
                                          axis=-1)[..., 0])
  out = [picked[i, :len(row)].astype(np.float32) for i, row in enumerate(cont_ids)]
  return out[0] if single else out
