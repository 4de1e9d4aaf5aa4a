"""The method interface: frozen dataclasses of hyperparameters plus pure scoring hooks.

A method is hashable (static under jit). For each layer, at the end of a prefill chunk, the
model hands the method a `LayerInputs` (the chunk's queries, every candidate slot's key,
value and position, attention statistics) and the method returns a priority per slot; kvjax
keeps the top `budget` slots per KV head (or per layer across heads, for head-wise methods)
and compacts them into a smaller cache. Decode-time methods also score every decode step
and overwrite their lowest-priority slot with the new token, so the cache stays at budget.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import validation
from kvjax.cache.kv_cache import EMPTY_POSITION, LayerCache, cache_nbytes, shape_padding_nbytes
from kvjax.config import ModelConfig
from kvjax.errors import MethodError
from kvjax.methods import budgets
from kvjax.ops import attention as attention_ops

PROTECTED = jnp.inf   # priority of slots that must be kept (sinks, recent window)


@dataclasses.dataclass(frozen=True)
class LayerInputs:
  """What a scorer sees for one layer at the end of a prefill chunk (arrays, not static)."""
  config: ModelConfig
  layer: int
  queries: jax.Array          # [B, T, H, D] the chunk's queries after RoPE
  raw_queries: jax.Array      # [B, T, H, D] the same before RoPE
  query_positions: jax.Array  # [B, T] int32, negative for padding
  keys: jax.Array             # [B, K, S, D] candidates: kept slots then the chunk, post-RoPE
  values: jax.Array           # [B, K, S, D]
  key_positions: jax.Array    # [B, K, S] int32, negative for empty slots
  lengths: jax.Array          # [B] tokens seen after this chunk
  column_sums: jax.Array | None = None  # [B, H, S] chunk attention summed over queries
  slot_state: Any = None      # the method's per-slot state of the candidates (None: all new)
  params: Any = None          # the method's parameters (a traced pytree), if it has any
  keep: int | None = None     # the budget being compacted to (set by `priorities`)


@dataclasses.dataclass(frozen=True)
class Method:
  """Base of all methods: a frozen, hashable dataclass of hyperparameters plus pure hooks.

  Class attributes say what the method needs and does:
    compresses: False only for the full cache.
    needs_budget: a compression_ratio or budget is required (token-selecting methods).
    headwise: budgets are shared by the KV heads of a layer (flat per-head cache layout).
    decode_time: keeps evicting during decode so the cache never grows past its budget.
    needs: the attention statistics the method reads ("column_sums").
    family: what it does to the cache: "eviction" (drops tokens), "quantization" (fewer
      bits per value), "channels" (fewer key channels), "mixed" (precision per token),
      "merging" (averages leaving tokens into kept ones), "cross_layer" (layers share
      storage).
    calibration: what the method needs computed once from the model (a name known to
      `kvjax.calibration`, e.g. RazorAttention's "echo_induction"), or None; trained
      methods make it a property of their checkpoint (`kvjax.methods.trained`).
    rescores: the context is prefilled uncompressed, then scored by more forward passes over
      that cache (`rescoring_passes` with the cache policy `rescoring_policy`, e.g. KVzip's
      context reconstruction) and compressed once from their scores (`rescored`).
    compresses_prompt: the prompt's tokens are chosen before the target reads them (SpecPC:
      `recorder` scores them on a draft, `compressed_rows` keeps the budget); the target's
      cache is then the full cache of the shorter prompt, positions renumbered.
    reads_context: its prefill reads the context's token ids (SentenceKV's sentence
      boundaries), handed to the policy as traced parameters by `context_params`.
    pads_shapes: its data-dependent slot counts are rounded up to shared sizes with
      reserved slots (`kv_cache.shared_capacities`: CAKE, D2O, KVzip), which
      `content_nbytes` leaves out.
    trims_padding: its `finalize` cuts its layout to the context's real length, not the
      padded width the full cache holds (RazorAttention's retrieval heads, AttentionGate's
      heads, the shared slots of MiniCache and xKV), so `generate` rounds it with reserved
      slots (`kv_cache.reserve_rooms`) even without a budget: prompts whose lengths
      round alike share one compiled decode loop.
  A method whose `attends_prefill` is true replaces a compressing prefill chunk's
  attention by its own `prefill_attention` (LoopServe's sparse prefill).
  Per-slot state is the method's own pytree (`init_state`); kvjax moves it with the slots.
  """
  name: ClassVar[str] = ""
  compresses: ClassVar[bool] = True
  needs_budget: ClassVar[bool] = True
  headwise: ClassVar[bool] = False
  decode_time: ClassVar[bool] = False
  needs: ClassVar[frozenset] = frozenset()
  family: ClassVar[str] = "eviction"
  calibration: ClassVar[str | None] = None
  rescores: ClassVar[bool] = False
  compresses_prompt: ClassVar[bool] = False
  reads_context: ClassVar[bool] = False
  pads_shapes: ClassVar[bool] = False
  trims_padding: ClassVar[bool] = False
  wrappable: ClassVar[bool] = True   # False: its selection is not a per-chunk score that
                                     # AdaKV, PerLayer or SinksWindow could re-budget
  # True: its compressing prefill does the same work at every layer (reads no layer index,
  # and of its parameters only what is the same at every layer, as SentenceKV's sentence
  # ids; a `cache_step` still runs after the last layer), so the prefill compiles one
  # layer and runs it for each (kvjax.generation.engine). Where
  # `compacts_ranked` (the default `compact`, or KIVI over one), that layer reads the
  # budget traced (`compact_ranked`) wherever `traces_budget` allows, so budgets that
  # differ by layer or by prompt length share it.
  # A True is not inherited: a subclass that may differ by layer, or read its budget
  # otherwise, must not run so unchecked. A property (an instance's answer, as the
  # storage methods' from their press) is.
  layerwise_prefill: ClassVar[bool] = False

  def __post_init__(self):
    check_fields(self)

  def __init_subclass__(cls, **kwargs):
    """A subclass's own __post_init__ (its specific checks and conversions) is followed by
    `check_fields`, so no method or wrapper accepts a NaN, an infinity or a wrongly typed
    hyperparameter even where its own checks forget one."""
    super().__init_subclass__(**kwargs)
    declared = cls.__dict__.get("layerwise_prefill", getattr(cls, "layerwise_prefill"))
    if not isinstance(declared, property):   # a property (an instance's answer) is inherited
      cls.layerwise_prefill = cls.__dict__.get("layerwise_prefill", False)
    if "budget_free_prefill" not in cls.__dict__:
      cls.budget_free_prefill = Method.budget_free_prefill
    own = cls.__dict__.get("__post_init__")
    if own is None:
      return

    def __post_init__(self):
      own(self)
      check_fields(self)

    cls.__post_init__ = __post_init__

  def layer_budgets(self, config: ModelConfig, keep: int, context_length: int
                    ) -> tuple[int, ...]:
    """Kept slots per layer (per KV head on average) for a mean budget of `keep`."""
    del context_length
    return (keep,) * config.num_layers

  def protected_tokens(self, keep: int) -> int:
    """How many slots per head the method always keeps (sinks + window); must be <= keep."""
    del keep
    return 0

  def fitted(self, keep: int) -> "Method":
    """The method as it runs with a budget of `keep` slots per layer and KV head.

    A budget is honoured even when it is smaller than the tokens the method protects
    (sinks, recent window; e.g. SnapKV's 32-token window under a short prompt's ratio): the
    protected counts shrink, in proportion, until they leave at least one slot to the
    method's scores (`shrink_protection`). Methods whose protection fits are returned
    unchanged (the same object), so nothing that worked before changes or recompiles.
    Default: a `press` the method wraps is fitted; otherwise unchanged.
    """
    press = getattr(self, "press", None)
    if not isinstance(press, Method):
      return self
    fitted_press = press.fitted(keep)
    return self if fitted_press is press else dataclasses.replace(self, press=fitted_press)

  def needs_calibration(self) -> bool:
    """Whether `calibrated` still has to be called (a `calibration` is declared and its
    result not yet given)."""
    return self.calibration is not None

  def calibrated(self, result) -> "Method":
    """The method with its calibration's result (computed from the model, outside jit,
    by `kvjax.calibration`) filled in."""
    del result
    return self

  def protected(self, key_positions: jax.Array, lengths: jax.Array, keep: int) -> jax.Array:
    """[B, K, S] bool: slots kept regardless of score."""
    del lengths, keep
    return jnp.zeros(key_positions.shape, bool)

  def score(self, x: LayerInputs) -> jax.Array:
    """[B, K, S] float32 priority: higher is kept. Empty slots are masked by the caller."""
    raise NotImplementedError(f"{type(self).__name__} does not score prefill slots")

  # Per-slot state.
  def init_state(self, shape: tuple[int, ...]):
    """The state of `shape` ([B, K, S]) new slots, or None when the method keeps none."""
    del shape
    return None

  def prefill_state(self, x: LayerInputs):
    """The candidates' state after this chunk (default: what they had)."""
    return x.slot_state

  def accumulate(self, state, column_sums):
    """Per-slot state after more queries attended without compressing (question prefill)."""
    del column_sums
    return state

  @property
  def attends_prefill(self) -> bool:
    """Whether `prefill_attention` replaces the dense attention of a compressing prefill
    chunk (such a method's prefill cannot be shared with other variants)."""
    return False

  def prefill_attention(self, layer, queries, query_positions, pending, want):
    """A compressing prefill chunk's attention when `attends_prefill`: queries [B, T, H, D]
    at positions [B, T] over the layer cache `layer` plus the chunk `pending` (NewTokens),
    asked for the statistics `want` -> (out [B, T, H, D], Stats)."""
    return layer.attend(queries, query_positions, pending, want)

  def observe_queries(self, state, queries, query_positions):
    """Methods that need QUERIES: per-slot state after queries [B, T, H, D] at positions
    [B, T] were appended without compressing (LoopServe keeps the latest ones)."""
    del queries, query_positions
    return state

  # Compaction.
  def compact(self, cand, x: LayerInputs, keep: int):
    """The layer cache that keeps `keep` slots per KV head of the candidates `cand`
    (a dense LayerCache whose state is already this chunk's). Default: top-k of
    `priorities` and a gather. Override to merge, quantize or project instead."""
    from_index = cand.replace(state=self.prefill_state(x))
    s = cand.capacity
    if keep >= s:  # everything fits: keep it all, with empty slots up to the budget
      return from_index.grow(keep - s).replace(end=jnp.int32(keep))
    _, index = jax.lax.top_k(priorities(self, x, keep), keep)
    return from_index.select(jnp.sort(index, axis=-1))

  @property
  def compacts_ranked(self) -> bool:
    """Whether `compact_ranked` does what `compact` does: the default top-k's does; a
    method that overrides `compact` says so only where it overrides both."""
    return type(self).compact is Method.compact

  def compact_ranked(self, cand, x: LayerInputs, largest: int, keep: jax.Array):
    """`compact(cand, x, keep)` for a traced `keep` <= `largest` < cand.capacity, at the
    shapes of a budget of `largest` (a method whose `traces_budget(keep)` holds): the
    first `keep` slots of the result, in slot order, are the ones `compact` keeps (the
    priorities are the same, and lax.top_k breaks ties by the lower index, so the best
    `keep` of the top `largest` are the top `keep`); the slots from `keep` on read as
    empty, and the caller cuts them off (`ranked_cut`)."""
    from_index = cand.replace(state=self.prefill_state(x))
    s = cand.capacity
    _, index = jax.lax.top_k(priorities(self, x, keep), largest)
    kept = jnp.arange(largest) < keep
    index = jnp.where(kept, index, s)   # the rest sorts after them
    out = from_index.select(jnp.minimum(jnp.sort(index, axis=-1), s - 1))
    return out.replace(positions=jnp.where(kept, out.positions, EMPTY_POSITION), end=keep)

  def ranked_cut(self, layer, keep: int):
    """The layer `compact(cand, x, keep)` gives, from the one `compact_ranked(cand, x,
    largest, keep)` gave, host side with `keep` static (kvjax.generation.engine cuts every
    layer so after a ranked prefill): default, its first `keep` slots."""
    return layer.first_slots(keep)

  def cache_step(self, layers: tuple, lengths: jax.Array) -> tuple:
    """A cache-wide step after the forward pass (cross-layer methods); default: none."""
    del lengths
    return layers

  def between_chunks(self, cache):
    """Host side, after each prefill chunk but the last, outside jit: like `finalize`, may
    re-pack to data-dependent shapes so that worst-case capacities chosen under jit do not
    compound from chunk to chunk; must keep what the next chunk reads (per-slot state).
    Default: unchanged."""
    return cache

  def finalize(self, cache, config: ModelConfig | None = None):
    """Host side, once after the last prefill chunk and outside jit: the cache decoding
    starts from. May read array values and return other shapes (data-dependent sizes:
    re-packing pools to what they hold, dropping state only prefill needed; cross-layer
    storage). `config`: the model's (xKV needs its RoPE). Default: unchanged."""
    del config
    return cache

  def content_nbytes(self, cache) -> int:
    """Host side, after `finalize`: the bytes of what the cache holds, reported as the
    context's cache bytes (its allocation, `cache_nbytes`, is reported beside it): the
    allocation, less the reserved slots of a method that `pads_shapes`."""
    if self.pads_shapes:
      return cache_nbytes(cache) - shape_padding_nbytes(cache)
    return cache_nbytes(cache)

  def kept_budgets(self, cache, budgets: tuple[int, ...]) -> tuple[int, ...]:
    """Host side, after `finalize`: the slots per KV head each layer really keeps, reported
    as the run's budgets (methods that settle budgets in `finalize`, e.g. CAKE). Default:
    the plan's budgets."""
    del cache
    return budgets

  def cache_stats(self, cache) -> dict:
    """Host side: method-specific facts about a finalized prefill cache, reported as
    result.stats["method_stats"] (e.g. a per-layer chosen ratio). Default: none."""
    del cache
    return {}

  def decode_stats(self, cache) -> dict:
    """Host side: method-specific facts about the cache after decoding, reported as
    result.stats["decode_method_stats"] (e.g. an offload tier's hit and fault counters).
    Default: none."""
    del cache
    return {}

  def safeguard(self, keep: int) -> int:
    """Head-wise methods: slots every head keeps before the layer's shared top-k."""
    del keep
    return 0

  @property
  def label(self) -> str:
    """Name shown in results, e.g. adakv(snapkv)."""
    return self.name

  def context_params(self, tokenizer, tokens, mask):
    """Methods with `reads_context`: the traced parameters (`LayerInputs.params`) its prefill
    reads, from the left-padded context token ids `tokens` and `mask` [B, T] (numpy) and
    the model's tokenizer (None for a model without one)."""
    raise NotImplementedError(f"{type(self).__name__} reads no context token ids")

  # Rescoring hooks (methods with `rescores` only; see kvjax/methods/kvzip.py).
  def rescoring_passes(self, tokenizer, tokens, mask, draft=None):
    """[(token id rows, traced parameters)]: the forward passes that score the context.
    Their parameters may hold "rewind" [B]: the pass then re-reads each row's last rewind
    tokens, which the cache forgets for it, at their positions. `draft(rows, n)`: the greedy
    continuations (n tokens) of token rows by the method's draft model, for methods whose
    `draft_layers` is set."""
    raise NotImplementedError(f"{type(self).__name__} declares no rescoring passes")

  def draft_layers(self, num_layers: int) -> int | None:
    """Layers of the target a rescoring method's draft model keeps (a truncated-layer
    draft), or None for no draft."""
    del num_layers
    return None

  def rescoring_policy(self):
    """The cache policy of those passes: returns per-layer scores, not a cache."""
    raise NotImplementedError(f"{type(self).__name__} declares no rescoring policy")

  def rescored(self, cache, scores, budgets):
    """The context's full cache compressed from the passes' scores."""
    raise NotImplementedError(f"{type(self).__name__} declares no rescored cache")

  # Decode-time hooks (decode_time methods only).
  def decode_scores(self, state, probs, own_prob, key_positions, lengths):
    """(state of the cached slots, state of the new token) after one decode step.

    probs [B, H, S]: the new query's attention over the cache slots; own_prob [B, H]: its
    attention to itself. Either may be None when the method keeps no state.
    """
    raise NotImplementedError

  def eviction_priority(self, state, probs, key_positions, lengths, budget):
    """[B, K, S] priority of the cached slots for this step (lowest is overwritten)."""
    raise NotImplementedError

  def decoding(self) -> "Method":
    """The method as its decode plan holds it: fields that only the prefill and `finalize`
    read (a budget recorded by `fitted`) reset, so that contexts of every budget share one
    compiled decode loop. Default: itself."""
    return self

  def budget_free_prefill(self) -> "Method | None":
    """The method as its compressing prefill compiles where that prefill keeps every
    candidate and reads no budget, which only host-side steps read (`finalize`, CAKE's
    `between_chunks`): D2O, CAKE, Quest. The engine compiles it so, with budgets of 0, and
    prompts of every length in a bucket share one executable (where `fitted` shrank no
    protection). Its `compact` must ignore the budget, and it must not be
    `compacts_ranked`. None (default): the prefill reads the budget it was fitted to. Not
    inherited, as `layerwise_prefill`: a subclass declares it again."""
    return None

  def traces_budget(self, keep: int) -> bool:
    """Whether a step may read a layer's budget `keep` traced, as an int32 scalar, and
    still do what it does with `keep` static: a decode step (it reaches `protected` and
    `eviction_priority`), and a compacting prefill layer that compacts by the default
    top-k (it reaches `priorities`: `protected` and the scorer's `x.keep`). Then one
    compiled decode loop serves every prompt length, and one compiled prefill layer every
    budget that rounds alike (kvjax.generation.engine). Default True: the hooks read it
    with jnp ops or not at all; one that derives a count from it through floats says
    where float32 agrees (`budgets.shares_alike`), one that needs it on the host says
    False."""
    del keep
    return True

  def absorb(self, layer, victim, valid, new_state):
    """Before slot victim [B, K] is overwritten by the new token (rows where valid [B]):
    merging methods fold the victim into the slots that stay. Returns (layer, the new
    token's state). Default: nothing kept of the victim."""
    del victim, valid
    return layer, new_state


class RecentWindow:
  """Hooks of methods that always keep each row's last `window` tokens (a field of theirs)."""
  window: int

  def protected_tokens(self, keep):
    return self.window

  def fitted(self, keep):
    """Under a budget of at most the window, the window (its votes and its protection)
    shrinks to budget - 1 tokens, so one slot still goes to the scores (1 at a budget of 1)."""
    shrunk = shrink_protection(keep, window=(self.window, 1))
    return dataclasses.replace(self, **shrunk) if shrunk else self

  def protected(self, key_positions, lengths, keep):
    return window_mask(key_positions, lengths, self.window)


class CrossLayer(Method):
  """Methods that keep every token through prefill and restructure the dense layers once
  the context is in (`finalize`): MiniCache, xKV. Under chunked prefill the budget is the
  padded width, which holds every real token (only empty slots lose)."""
  family: ClassVar[str] = "cross_layer"
  needs_budget: ClassVar[bool] = False
  trims_padding: ClassVar[bool] = True   # `dense_layers`: the bucket padding cut

  def score(self, x: LayerInputs) -> jax.Array:
    return jnp.zeros(x.key_positions.shape, jnp.float32)

  def dense_layers(self, cache) -> list:
    """The cache's layers, each a dense full layer with the prompt's bucket padding cut
    (every layer holds the same tokens in the same slots)."""
    layers = []
    for index, layer in enumerate(cache.layers):
      if not isinstance(layer, LayerCache):
        raise MethodError(f"{self.name} restructures dense full caches; layer {index} is "
                          f"{type(layer).__name__}")
      layers.append(layer.trimmed())
    return layers


# Families whose storage is the dense or head-wise layout, whose values may hold several
# value heads per key head (DiffQKV models); the others pack one value head per slot.
WIDE_VALUE_FAMILIES = frozenset({"eviction", "merging", "prompt"})


def check_model(method: Method, config: ModelConfig) -> None:
  """Refuses a method whose cache layout cannot store `config`'s heads."""
  if config.latent is not None and method.compresses:
    raise MethodError(f"{method.label} compresses per-head key/value caches; this model "
                      f"({config.name or 'unnamed'}) caches one latent per token (latent "
                      f"attention, an X-EcoMLA student): use its full cache (method=None)")
  if config.values_per_key_head > 1 and method.family not in WIDE_VALUE_FAMILIES:
    raise MethodError(f"{method.label} ({method.family}) stores one value head per key head; "
                      f"this model has num_value_heads={config.num_value_heads} over "
                      f"num_kv_heads={config.num_kv_heads} (DiffQKV): use the full cache or "
                      f"a method of the families {sorted(WIDE_VALUE_FAMILIES)}")


def check_prefill_press(owner: str, press: Method) -> None:
  """A press a storage method (quantizer, channel pruner) applies first must select tokens
  once at prefill: an eviction method, not decode-time, not head-wise."""
  kind = ("the full cache" if not press.compresses else
          f"a {press.family} method" if press.family != "eviction" else
          "a decode-time method" if press.decode_time else
          "a head-wise method" if press.headwise else None)
  if kind is not None:
    raise MethodError(f"{owner}(press={press.label!r}): the press must select tokens once at "
                      f"prefill, not {kind}; e.g. snapkv, knorm, expected_attention, "
                      f"pyramidkv, or sinks_window around one of them")


def shrink_protection(keep: int, **counts: tuple[int, int]) -> dict[str, int]:
  """Protected-token hyperparameters scaled down to fit a budget of `keep` slots.

  counts: name -> (count, minimum), e.g. sinks=(4, 0), window=(32, 1). Returns {} when
  their sum already leaves a slot to the scores (sum < keep); otherwise new counts, in
  proportion to the old ones (largest remainder), summing to keep - 1, or to the minimums'
  sum where that is larger (a SnapKV window never goes below 1 query).
  """
  names = list(counts)
  total = sum(counts[n][0] for n in names)
  minimums = {n: counts[n][1] for n in names}
  room = max(keep - 1, sum(minimums.values()))
  if total <= room:
    return {}
  shares = dict(zip(names, budgets.distribute(room, [counts[n][0] for n in names], 0,
                                              max(counts[n][0] for n in names))))
  for name in names:
    while shares[name] < minimums[name]:  # lend from the largest count above its minimum
      donor = max((n for n in names if shares[n] > minimums[n]), key=shares.get)
      shares[donor] -= 1
      shares[name] += 1
  return shares


def spec_label(method: Method, skip: tuple[str, ...] = ()) -> str:
  """'name:key=value:...' with every hyperparameter that differs from its default (the
  form `methods.get` accepts; fields in `skip` left out), so different configurations
  never share a label."""
  parts = [method.name]
  for field in dataclasses.fields(method):
    if field.name in skip:
      continue
    value = getattr(method, field.name)
    if field.default is not dataclasses.MISSING and value == field.default:
      continue
    shown = own_label(value) if isinstance(value, Method) else value
    if isinstance(field.default, str) and isinstance(value, Method) and shown == field.default:
      continue
    parts.append(f"{field.name}={shown}")
  return ":".join(parts)


def own_label(method: Method) -> str:
  """The method's label; for a method without a label of its own, its spec label (so
  snapkv:window=4 is not shown as snapkv)."""
  label = method.label
  return spec_label(method) if label == method.name else label


def priorities(method: Method, x: LayerInputs, keep: int) -> jax.Array:
  """[B, K, S] float32: method scores, protected slots +inf, empty slots -inf. The
  scorer sees the budget as `x.keep` (KVCrush's tiers depend on it)."""
  if x.keep is not keep:   # (`keep` may be traced: compared by identity)
    x = dataclasses.replace(x, keep=keep)
  prio = method.score(x).astype(jnp.float32)
  prio = jnp.where(method.protected(x.key_positions, x.lengths, keep), PROTECTED, prio)
  return jnp.where(x.key_positions >= 0, prio, -jnp.inf)


def window_mask(key_positions: jax.Array, lengths: jax.Array, window: int) -> jax.Array:
  """Slots among the last `window` positions of each row."""
  return (key_positions >= 0) & (key_positions >= lengths[:, None, None] - window)


def sink_mask(key_positions: jax.Array, sinks: int) -> jax.Array:
  """Slots holding the first `sinks` positions."""
  return (key_positions >= 0) & (key_positions < sinks)


def reduce_groups(x: jax.Array, num_kv_heads: int, how: str = "mean") -> jax.Array:
  """[B, H, S] per query head -> [B, K, S] per KV head."""
  b, h, s = x.shape
  grouped = x.reshape(b, num_kv_heads, h // num_kv_heads, s)
  if how == "mean":
    return grouped.mean(2)
  if how == "max":
    return grouped.max(2)
  if how == "sum":
    return grouped.sum(2)
  raise ValueError(f"gqa={how!r}; allowed: 'mean', 'max', 'sum'")


def pool1d(x: jax.Array, kernel_size: int, pooling: str) -> jax.Array:
  """Centred 1-D pooling along the last axis, stride 1, padding kernel_size // 2.

  "avg" counts the zero padding (torch avg_pool1d's default), "max" ignores it.
  """
  if pooling == "none" or kernel_size == 1:
    return x
  pad = kernel_size // 2
  if pooling == "max":
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) * (x.ndim - 1) + (kernel_size,),
                                 (1,) * x.ndim, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
  if pooling == "avg":
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1,) * (x.ndim - 1) + (kernel_size,),
                                   (1,) * x.ndim, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
    return summed / kernel_size
  raise ValueError(f"pooling={pooling!r}; allowed: 'max', 'avg', 'none'")


def window_attention(x: LayerInputs, window: int) -> jax.Array:
  """[B, H, W, S] softmax of the chunk's last `window` queries over all candidate slots.

  Only W x S, not T x S, in float32. Padding queries give all-zero rows.
  """
  q = x.queries[:, -window:].astype(jnp.float32)
  probs = attention_ops.probabilities(q, x.keys.astype(jnp.float32),
                                      x.query_positions[:, -window:], x.key_positions)
  b, k, g, w, s = probs.shape
  return probs.reshape(b, k * g, w, s)


def check_choice(name: str, value, allowed) -> None:
  validation.choice(name, value, allowed, error=MethodError)


def check_fraction(name: str, value, low_open: bool = False) -> None:
  validation.number(name, value, 0, 1, low_open=low_open, error=MethodError)


def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
                 high_open: bool = False, what: str = "") -> None:
  validation.number(name, value, low, high, high_open=high_open, error=MethodError, what=what)


def check_int(name: str, value, low: int, high: int | None = None) -> None:
  validation.integer(name, value, low, high, error=MethodError)


def check_fields(method: Method) -> None:
  """What every hyperparameter must satisfy, whatever the method: a field whose default is
  a float holds a finite number, one whose default is an int an integer that fits int32,
  one whose default is a bool True or False; numbers inside a tuple field are finite.
  Runs after each method's own __post_init__ (see Method.__init_subclass__)."""
  for field in dataclasses.fields(method):
    name, value, default = field.name, getattr(method, field.name), field.default
    if isinstance(default, bool):
      validation.boolean(name, value, error=MethodError)
    elif isinstance(default, float) or isinstance(value, (float, np.floating)):
      validation.number(name, value, error=MethodError)
    elif isinstance(default, int):
      validation.integer(name, value, -validation.INT32_MAX, validation.INT32_MAX,
                         error=MethodError)
    elif isinstance(value, tuple):
      for i, item in enumerate(value):
        if validation.is_number(item):
          validation.number(f"{name}[{i}]", item, error=MethodError)
