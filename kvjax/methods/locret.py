"""Locret: trained retaining heads score each token once; chunked prefill keeps the top B.

Reading: the official code (huangyuxiang03/Locret), `locret/models/llama/modeling_llama.py`
(`fc1`/`fc2` on the concatenated pre-RoPE q, k, v), `locret/inference/infer.py`
(`generate`: the chunked prefill loop) and `locret/train/` (labels and loss, which live in
`kvjax.training.locret` here).

The retaining head of a layer maps each token's own projections to one score per KV head:
R(x) = W2 silu(W1 [q; k; v]), q, k, v before RoPE and flattened head by head (no biases,
hidden width 1024 in the code). A token is scored once, when its chunk is read, and the
score travels with its slot (per-slot state) and is never refreshed.

The inference loop of `infer.py`, with B = budget - local: the context but its last
`local` tokens is read in chunks; after each chunk every KV head keeps its top B candidates
by stored score, where, unless the chunk is the last, the `stabilizers` most recent
candidates count as +inf (the code sets the last n_s entries of the position-ordered score
array to the float maximum, in a copy: the stored scores stay real); the last `local`
tokens are then read and kept without eviction. Here the budget counts both parts
(budget = B + local slots per KV head, what the cache really holds), chunks are kvjax's
prefill chunks (`prefill_chunk_size`; one chunk without it), and the tail tokens are read
with their chunk and protected (never compacted, not counted in B) instead of being read
after the last eviction. The kept sets are the code's for the same chunk boundaries
(tests/test_locret.py restates the loop): they are the code's own whenever the prompt
length is a multiple of the chunk size and local < chunk (kvjax aligns chunks to the prompt's end, the code
to its start). The tail's own keys and values differ slightly: here its tokens attend to
their whole chunk, in the code to the B kept tokens. Defaults are `infer.py`'s (2500
stabilizers, 100 local tokens, sized for 128K contexts); under a smaller budget both shrink
to leave at least one slot to the scores (`fitted`), so short contexts want smaller
values, e.g. "locret:stabilizers=64:local=16". The code's n_s = 0 would protect every
candidate (a `[-0:]` slice); here 0 protects none. Scores are float32 (the code's bf16).
The weights are a `RetainingHeads` in memory or a training run's checkpoint
(`Locret.from_checkpoint`), refused for another model.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.kv_cache import EMPTY_POSITION
from kvjax.config import ModelConfig
from kvjax.errors import MethodError
from kvjax.methods import base, registry, trained
from kvjax.ops import rope

KIND = "locret"


def feature_size(config: ModelConfig) -> int:
  """Width of a token's retaining-head input: its query, key and value heads side by side."""
  return (config.num_heads + config.num_kv_heads + config.value_heads) * config.head_dim


def retaining_features(config: ModelConfig, raw_queries, keys, values, positions):
  """[B, T, F] float32 retaining-head inputs [q; k; v] of a chunk, all before RoPE.

  raw_queries [B, T, H, D] (pre-RoPE); keys [B, K, T, D] post-RoPE (the cache stores them
  so: rotated back here, exact up to float rounding); values [B, K, T, r D]; positions
  [B, T] (the keys' rotation)."""
  b, t = positions.shape
  pre_rope = rope.apply_rope(jnp.swapaxes(keys, 1, 2).astype(jnp.float32), positions,
                             rope.inverse_frequencies(config), inverse=True)
  parts = (raw_queries.astype(jnp.float32), pre_rope,
           jnp.swapaxes(values, 1, 2).astype(jnp.float32))
  return jnp.concatenate([p.reshape(b, t, -1) for p in parts], axis=-1)


def retaining_scores(w1, w2, features):
  """[B, T, K] scores W2 silu(W1 x) of features [B, T, F] (one layer's head)."""
  hidden = jax.nn.silu(jnp.einsum("btf,fh->bth", features, w1.astype(jnp.float32)))
  return jnp.einsum("bth,hk->btk", hidden, w2.astype(jnp.float32))


def init_heads(config: ModelConfig, hidden: int, key) -> dict:
  """Fresh retaining heads of every layer: {"w1": [L, F, hidden], "w2": [L, hidden, K]},
  normal(0, 0.02) as Hugging Face initialises the code's missing fc1/fc2."""
  base.check_int("hidden", hidden, 1)
  k1, k2 = jax.random.split(key)
  n = config.num_layers
  return {"w1": 0.02 * jax.random.normal(k1, (n, feature_size(config), hidden), jnp.float32),
          "w2": 0.02 * jax.random.normal(k2, (n, hidden, config.num_kv_heads), jnp.float32)}


def check_heads(params, config: ModelConfig) -> None:
  """Refuses retaining-head parameters whose shapes do not fit `config`."""
  if not isinstance(params, dict) or set(params) != {"w1", "w2"}:
    keys = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise MethodError(f"locret parameters must be {{'w1', 'w2'}}; got {keys}")
  w1, w2 = np.shape(params["w1"]), np.shape(params["w2"])
  want_in, k, n = feature_size(config), config.num_kv_heads, config.num_layers
  if len(w1) != 3 or len(w2) != 3 or w1[:2] != (n, want_in) or w2 != (n, w1[2], k):
    raise MethodError(f"locret retaining heads of shapes w1 {w1}, w2 {w2} do not fit this "
                      f"model ({config.name or 'unnamed'}): it needs w1 ({n}, {want_in}, "
                      f"hidden) and w2 ({n}, hidden, {k}) for {n} layers of "
                      f"{config.num_heads} query and {k} KV heads of dim "
                      f"{config.head_dim}; trained for another model?")


class RetainingHeads:
  """Trained retaining-head weights held in memory, hashable by content, so a Locret that
  carries them stays a static (hashable) jit argument. `meta`: the training run's
  metadata (its `model` identity is checked against the model at use), or None."""

  def __init__(self, params: dict, meta: dict | None = None):
    self.params = {name: np.asarray(value, np.float32) for name, value in params.items()}
    self.meta = meta
    digest = hashlib.sha256()
    for name in sorted(self.params):
      digest.update(name.encode() + np.ascontiguousarray(self.params[name]).tobytes())
    self.digest = digest.hexdigest()[:16]

  def __hash__(self):
    return hash(self.digest)

  def __eq__(self, other):
    return isinstance(other, RetainingHeads) and other.digest == self.digest

  def __repr__(self):
    return f"RetainingHeads({self.digest})"


def recent_candidates(key_positions, count: int):
  """[B, K, S] bool: each head's `count` real candidates of highest position (the last
  `count` entries of the code's position-ordered score array)."""
  if count == 0:
    return jnp.zeros(key_positions.shape, bool)
  k = min(count, key_positions.shape[-1])
  threshold = jax.lax.top_k(key_positions, k)[0][..., -1:]
  return (key_positions >= 0) & (key_positions >= threshold)


@registry.register
@dataclasses.dataclass(frozen=True)
class Locret(trained.TrainedWeights, base.Method):
  """Locret (huangyuxiang03/Locret): per layer, trained retaining heads score each token
  once from its own pre-RoPE q, k, v; after every prefill chunk each KV head keeps its top
  budget - `local` candidates by score (the `stabilizers` most recent candidates kept
  first, except after the last chunk), and the context's last `local` tokens are kept.

  checkpoint: a training run directory (or one of its step folders) of
  `scripts/train.py --method=locret`; heads: the weights in memory. Give one; use
  `Locret.from_checkpoint(path)` or method="locret:checkpoint=PATH". See the module
  docstring for what differs from the official loop.
  """
  name: ClassVar[str] = "locret"
  KIND: ClassVar[str] = KIND
  WEIGHTS_FIELD: ClassVar[str] = "heads"
  WEIGHTS_TYPE: ClassVar[type] = RetainingHeads
  MISSING: ClassVar[str] = "trained retaining heads"
  TRAINS_ON_FIRST_USE: ClassVar[bool] = True   # kvjax.training.pretrained's recipe
  check_shapes = staticmethod(check_heads)
  reads_context: ClassVar[bool] = True   # its weights and the context length, as parameters
  wrappable: ClassVar[bool] = False      # its own budget split (B + local) and stabilizers
  stabilizers: int = 2500
  local: int = 100
  checkpoint: str = ""
  heads: Any = None

  def __post_init__(self):
    base.check_int("stabilizers", self.stabilizers, 0)
    base.check_int("local", self.local, 0)
    self.check_weights_source()

  def protected_tokens(self, keep):
    del keep
    return max(self.stabilizers, self.local)

  def fitted(self, keep):
    """The tail leaves at least one slot (local <= keep - 1) and the stabilizers at least
    one of the B = keep - local scored ones, so top-B is never a tie among +inf."""
    local = min(self.local, keep - 1)
    stabilizers = min(self.stabilizers, max(keep - local - 1, 0))
    if (local, stabilizers) == (self.local, self.stabilizers):
      return self
    return dataclasses.replace(self, local=local, stabilizers=stabilizers)

  def layer_budgets(self, config, keep, context_length):
    del context_length
    self.check_model(config)
    return (keep,) * config.num_layers

  def context_params(self, tokenizer, tokens, mask):
    del tokenizer, tokens
    return {"heads": self.weights(),
            "context_lengths": np.asarray(mask).sum(1).astype(np.int32)}

  def _context_lengths(self, x: base.LayerInputs) -> jax.Array:
    """[B] each row's context length (from `context_params`)."""
    if not isinstance(x.params, dict) or not {"heads", "context_lengths"} <= set(x.params):
      raise MethodError("locret reads its weights and the context lengths from its "
                        "parameters (Locret.context_params): prefill through "
                        "kvjax.generate, kvjax.score or context.prefill without "
                        "method_params")
    return x.params["context_lengths"]

  def new_token_scores(self, x: base.LayerInputs):
    """[B, K, T] the retaining head's scores of the chunk's T tokens (the candidates'
    last T slots)."""
    self._context_lengths(x)
    heads = x.params["heads"]
    check_heads(heads, x.config)
    t = x.query_positions.shape[1]
    features = retaining_features(x.config, x.raw_queries, x.keys[:, :, -t:],
                                  x.values[:, :, -t:], x.query_positions)
    scores = retaining_scores(heads["w1"][x.layer], heads["w2"][x.layer], features)
    return jnp.swapaxes(scores, 1, 2)

  def init_state(self, shape):
    return jnp.zeros(shape, jnp.float32)

  def prefill_state(self, x):
    """[B, K, S] every candidate's stored score: the kept slots' from when they were read,
    the chunk's from the heads now."""
    new = self.new_token_scores(x)
    return x.slot_state.at[..., -new.shape[-1]:].set(new)

  def _tail(self, x) -> jax.Array:
    """[B, K, S] candidates among their context's last `local` tokens (never evicted:
    the code reads them after its last eviction)."""
    start = (self._context_lengths(x) - self.local)[:, None, None]
    return (x.key_positions >= 0) & (x.key_positions >= start)

  def _last_chunk(self, x) -> jax.Array:
    """[B] bool: every token before the tail has been read (the code's last chunk)."""
    return x.lengths >= self._context_lengths(x) - self.local

  def score(self, x):
    """Stored scores; +inf for the tail and, before the last chunk, for the
    `stabilizers` most recent other candidates."""
    tail = self._tail(x)
    others = jnp.where(tail, EMPTY_POSITION, x.key_positions)
    stabilizer = (recent_candidates(others, self.stabilizers)
                  & ~self._last_chunk(x)[:, None, None])
    return jnp.where(stabilizer | tail, base.PROTECTED, self.prefill_state(x))

  def compact(self, cand, x, keep):
    """Per KV head, the tail and the top keep - local other candidates (the code's B);
    slots the tail does not fill yet stay empty."""
    prio = base.priorities(self, x, keep)
    tail = self._tail(x)
    cand = cand.replace(state=self.prefill_state(x))
    if keep > cand.capacity:  # room for every candidate: the rest of the slots empty
      pad = [(0, 0), (0, 0), (0, keep - cand.capacity)]
      prio = jnp.pad(prio, pad, constant_values=-jnp.inf)
      tail = jnp.pad(tail, pad)
      cand = cand.grow(keep - cand.capacity)
    _, order = jax.lax.top_k(prio, keep)              # best first: the +inf ones all fit
    tail_first = jnp.take_along_axis(tail, order, axis=-1)
    rank = jnp.cumsum(~tail_first, axis=-1) - 1         # among the non-tail candidates
    live = tail_first | (rank < keep - self.local)
    chosen = jnp.put_along_axis(jnp.zeros(prio.shape, bool), order, live, axis=-1,
                                inplace=False)
    index = jnp.sort(order, axis=-1)
    layer = cand.select(index)
    kept = jnp.take_along_axis(chosen, index, axis=-1)
    return layer.replace(positions=jnp.where(kept, layer.positions, EMPTY_POSITION))

  def finalize(self, cache, config=None):
    """The stored scores only served prefill: decoding starts without them."""
    del config
    return cache.replace(layers=tuple(layer.replace(state=None) for layer in cache.layers))

