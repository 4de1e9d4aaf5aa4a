"""kvjax.score: log-probabilities of a continuation read through the cache of a context."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import methods as methods_lib
from kvjax.errors import GenerationError
from kvjax.generation import context as context_lib
from kvjax.generation import engine, inputs
from kvjax.generation.generate import check_context_length


def _tokens(model, item, add_special: bool, what: str) -> list[int]:
  if isinstance(item, str):
    if model.tokenizer is None:
      raise GenerationError(f"model has no tokenizer: pass {what} as token ids")
    ids = model.tokenizer.encode(item, add_special_tokens=add_special)
  else:
    ids = [int(t) for t in item]
  if not ids:
    raise GenerationError(f"{what} is empty after tokenization")
  return ids


def score(model, context, continuation, method=None, compression_ratio=None, budget=None):
  """Per-token log-probs of `continuation` given `context`.

  The context is prefilled and compressed first, then the continuation is prefilled on top
  of the compressed cache (uncompressed, as a question or generated text would be). Returns a
  float32 array [len(continuation tokens)] for single inputs, or a list of them for a batch.
  """
  method_obj = methods_lib.get(method)
  contexts, single = inputs.as_batch(context, "context")
  continuations, _ = inputs.as_batch(continuation, "continuation")
  if len(contexts) != len(continuations):
    raise GenerationError(f"got {len(contexts)} contexts and {len(continuations)} "
                          f"continuations; they must pair up")
  ctx_ids = [_tokens(model, c, True, f"context[{i}]") for i, c in enumerate(contexts)]
  cont_ids = [_tokens(model, c, False, f"continuation[{i}]") for i, c in enumerate(continuations)]
  for i, (a, b) in enumerate(zip(ctx_ids, cont_ids)):
    check_context_length(model, len(a) + len(b), f"context {i} + continuation")
  keep = methods_lib.validate_compression(method_obj, [len(c) for c in ctx_ids],
                                          compression_ratio, budget)

  pad = inputs.pad_id(model)
  ctx_tokens, ctx_mask = inputs.left_pad(ctx_ids, pad)
  # The continuation is right-padded so position j of every row is its j-th token.
  width = inputs.bucket(max(len(c) for c in cont_ids))
  cont_tokens = np.full((len(cont_ids), width), pad, np.int32)
  cont_mask = np.zeros_like(cont_tokens, bool)
  for i, row in enumerate(cont_ids):
    cont_tokens[i, :len(row)] = row
    cont_mask[i, :len(row)] = True
  prefilled = context_lib.prefill(model, ctx_tokens, ctx_mask, method_obj, keep, room=width)
  last_logits = prefilled.logits
  cont_logits, _ = engine.STEPS.prefill(model, jnp.asarray(cont_tokens), jnp.asarray(cont_mask),
                                        prefilled.cache, logits="all",
                                        plan=prefilled.decode_plan)
  # Logits predicting continuation token j: the context's last for j = 0, else position j - 1.
  predicting = jnp.concatenate([last_logits[:, None], cont_logits[:, :-1]], axis=1)
  logprobs = jax.nn.log_softmax(predicting.astype(jnp.float32), axis=-1)
  picked = np.asarray(jnp.take_along_axis(logprobs, jnp.asarray(cont_tokens)[..., None],
                                          axis=-1)[..., 0])
  out = [picked[i, :len(row)].astype(np.float32) for i, row in enumerate(cont_ids)]
  return out[0] if single else out
