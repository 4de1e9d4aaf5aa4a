"""Jitted prefill and decode steps, compiled ahead of time once per shape.

Compiling explicitly (lower().compile()) keeps compile time out of the measured prefill and
decode times, and the per-shape executables are reused across calls. The uncompressed
prefill runs one decoder layer per call, all layers through one executable (compiling 30
unrolled layers took longer than running them for prompts up to ~1K tokens on CPU; it
runs so on every backend); so does the compressing prefill of a method whose layers all
do the same work (`_layer_plan`). Other compressing prefills and decode loops are one
program each.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import pathlib
import time

import jax
from jax import lax
import jax.numpy as jnp

from kvjax.cache import kv_cache
from kvjax.generation import sampling
from kvjax.loading import assets
from kvjax.methods.plan import CompressionPlan, RankedLayer
from kvjax.model import transformer
from kvjax.ops.sharded import kernels_on
from kvjax.sharding.distributed import host_array
from kvjax.ops.dispatch import use_pallas


def _constrained(cache, placement):
  # A sharded model's steps return the cache in its rules' layout (kvjax.sharding).
  return cache if placement is None else placement.constrain_cache(cache)


def _traced_budgets(plan):
  """(the plan a step compiles with, its layers' budgets as an int32 array or None).

  A decode-time method's plan that does not compress carries its layers' budgets only for
  the decode steps that evict; where the method allows (`Method.traces_budget`) they are
  passed as data and the compiled plan holds none, so one executable serves every prompt
  length whose cache shapes match (H2O, SmolLM2, 520 to 640 tokens: a 5.4 s decode-loop
  compile per length before)."""
  if (type(plan) is not CompressionPlan or plan.compress or not plan.budgets
      or not plan.method.decode_time
      or not all(plan.method.traces_budget(b) for b in set(plan.budgets))):
    return plan, None
  return dataclasses.replace(plan, budgets=()), jnp.asarray(plan.budgets, jnp.int32)


def _budget_free(plan):
  """The plan a compressing prefill compiles with: where the method's prefill reads no
  budget (`Method.budget_free_prefill`), that form of the method and budgets of 0 (its
  `compact` ignores them), so prompts of every length in a bucket share one executable."""
  if type(plan) is not CompressionPlan or not plan.compress:
    return plan
  method = plan.method.budget_free_prefill()
  if method is None:
    return plan
  if method.compacts_ranked:   # it would rank at a budget of 0 (`_one_layer_plan`)
    raise TypeError(f"{type(method).__name__}.budget_free_prefill() must not compact by "
                    f"the default ranking")
  return dataclasses.replace(plan, method=method, budgets=(0,) * len(plan.budgets))


def traces_budgets(plan) -> bool:
  """Whether the steps pass `plan`'s budgets as data (`_traced_budgets`)."""
  return _traced_budgets(plan)[1] is not None


def _with_budgets(plan, budgets):
  """Inside a step: the plan with the budgets `_traced_budgets` passed as data."""
  if budgets is None:
    return plan
  return dataclasses.replace(plan, budgets=tuple(budgets[i] for i in range(budgets.shape[0])))


def _prefill(params, tokens, token_mask, cache, method_params, budgets=None, *, graphdef,
             logits, plan, placement=None):
  plan = _with_budgets(plan, budgets)
  with kernels_on(placement):
    logits, cache = transformer.forward(graphdef, params, tokens, token_mask, cache, logits,
                                        plan, method_params)
  return logits, _constrained(cache, placement)


def _decode(params, tokens, active, cache, key, temperature, top_p, method_params, budgets=None,
            *, graphdef, greedy, plan, placement=None):
  # Inactive rows (finished ones, in a multi-turn conversation) write nothing a later token
  # could see: their token is masked like padding.
  plan = _with_budgets(plan, budgets)
  with kernels_on(placement):
    logits, cache = transformer.forward(graphdef, params, tokens[:, None], active[:, None],
                                        cache, "last", plan, method_params)
  next_tokens = sampling.sample(logits, key, temperature, top_p, greedy)
  return next_tokens, logits, _constrained(cache, placement)


def _decode_loop(params, tokens, active, cache, key, first_step, limit, temperature, top_p,
                 eos, method_params, budgets=None, *, graphdef, greedy, plan, chunk,
                 mask_finished, placement=None):
  """Up to `limit` (<= chunk) decode steps in one call, stopping once every row is done.

  A row is done when it samples a token of `eos` [E] (or was inactive on entry). With
  mask_finished, done rows feed masked tokens, exactly as step-by-step decoding with
  `active` does; otherwise every row keeps decoding, as the step-by-step loop without
  `active`. Step i samples with `fold_in(key, first_step + i)`, the key the step-by-step
  loop uses, so both give the same tokens; with [B] keys and [B] first steps, row by row
  (`sampling.step_key`). Returns (tokens [B, chunk] (-1 after the steps
  run), steps run, cache, each row's last sampled token, active).
  """
  rows = tokens.shape[0]
  plan = _with_budgets(plan, budgets)

  def running(carry):
    i, _, _, active, _ = carry
    return (i < limit) & jnp.any(active)

  def step(carry):
    i, tokens, cache, active, out = carry
    fed = active if mask_finished else jnp.ones_like(active)
    with kernels_on(placement):
      logits, cache = transformer.forward(graphdef, params, tokens[:, None], fed[:, None],
                                          cache, "last", plan, method_params)
    cache = _constrained(cache, placement)
    next_tokens = sampling.sample(logits, sampling.step_key(key, first_step + i),
                                  temperature, top_p, greedy)
    # A done row's token is only a placeholder: keep its last real one.
    next_tokens = jnp.where(active | ~mask_finished, next_tokens, tokens)
    out = lax.dynamic_update_slice(out, next_tokens[:, None], (0, i))
    active = active & ~jnp.any(next_tokens[:, None] == eos[None, :], axis=1)
    return i + 1, next_tokens, cache, active, out

  out = jnp.full((rows, chunk), -1, jnp.int32)
  i, tokens, cache, active, out = lax.while_loop(
      running, step, (jnp.int32(0), tokens.astype(jnp.int32), cache, active, out))
  return out, i, cache, tokens, active


_prefill_jit = jax.jit(_prefill, static_argnames=("graphdef", "logits", "plan", "placement"),
                      donate_argnames=("cache",))
# Compressing changes the cache's shapes, so its input buffers could not be reused anyway.
_compress_jit = jax.jit(_prefill, static_argnames=("graphdef", "logits", "plan", "placement"))
_decode_jit = jax.jit(_decode, static_argnames=("graphdef", "greedy", "plan", "placement"),
                     donate_argnames=("cache",))
_decode_loop_jit = jax.jit(_decode_loop, static_argnames=("graphdef", "greedy", "plan", "chunk",
                                                       "mask_finished", "placement"),
                           donate_argnames=("cache",))


# The uncompressed prefill one layer per call: every layer whose weights and cache have the
# same shapes runs one executable (a new prompt length compiles one layer, not 30 unrolled).
def _prefill_embed(params, tokens, token_mask, cache_lengths, *, graphdef):
  return transformer.embed_chunk(graphdef, params, tokens, token_mask, cache_lengths)


def _prefill_layer(params, x, positions, layer_cache, lengths, tokens, method_params=None,
                   keep=None, *, graphdef, plan=None):
  # keep: the layer's budget, traced, for a plan that ranks (`_ranked`).
  if keep is not None:
    plan = dataclasses.replace(plan, keep=keep)
  return transformer.layer_forward(graphdef, params, x, positions, layer_cache, lengths,
                                   tokens, plan, method_params)


def _first_slots(layers, *, sizes, method):
  return tuple(method.ranked_cut(layer, n) for layer, n in zip(layers, sizes))


def _prefill_logits(params, x, token_mask, *, graphdef, logits):
  return transformer.chunk_logits(graphdef, params, x, token_mask, logits)


_prefill_embed_jit = jax.jit(_prefill_embed, static_argnames=("graphdef",))
_prefill_layer_jit = jax.jit(_prefill_layer, static_argnames=("graphdef", "plan"),
                             donate_argnames=("layer_cache",))
# A compressing layer returns a cache of other shapes: nothing to donate to.
_compress_layer_jit = jax.jit(_prefill_layer, static_argnames=("graphdef", "plan"))
_prefill_logits_jit = jax.jit(_prefill_logits, static_argnames=("graphdef", "logits"))
_first_slots_jit = jax.jit(_first_slots, static_argnames=("sizes", "method"))


def _layer_graphdef(model):
  """The graph definition the model's layers share, derived once per graph definition
  object (kept with its static key)."""
  derived = _static(model.graphdef).derived
  if "layer" not in derived:
    derived["layer"] = transformer.layer_graphdef(model.graphdef, model.params)
  return derived["layer"]


def _runs_by_layer(model, cache, plan, tokens: int = 0) -> bool:
  """Whether a prefill of `tokens` tokens runs one layer per call: on one device over
  layers that each hold their own storage with one shape, storing uncompressed or
  compressing by a plan whose every layer does the same work (`_layer_plan`); else one
  program for all layers."""
  candidates = cache.layers[0].capacity + tokens
  if plan is not None and _layer_plan(plan, candidates) is None:
    return False
  if getattr(model, "placement", None) is not None:
    return False
  layers = cache.layers
  if any(getattr(layer, "borrow", None) is not None for layer in layers):
    return False
  first = _signature(layers[0])
  return all(_signature(layer) == first for layer in layers[1:])


# A compacting layer that ranks (`_layer_plan`) does so at its largest budget rounded up
# to a multiple of this: prompts whose budgets round alike (SmolLM2 at ratio 0.5: 520 to
# 640 tokens) share one compiled layer.
RANK_MULTIPLE = 64


def _layer_plan(plan, candidates: int):
  """The one-layer plan every layer of a compressing prefill runs by, or None: only for
  a method whose prefill work reads no layer index, and parameters (if any) that are the
  same at every layer (`Method.layerwise_prefill`; a cross-layer `cache_step` still runs
  after the last layer). Its layers then share one compiled layer instead of compiling all of them
  unrolled (SnapKV 0.5 on SmolLM2: a new prompt length compiled in 7.0-7.5 s, then
  4.0-4.4 s).

  Where the method ranks as the default top-k does (`Method.compacts_ranked`: that top-k,
  or KIVI quantizing one's selection) and may read its budget traced
  (`Method.traces_budget`), and a layer's `candidates` (the slots it ranks) outnumber
  the largest budget, the plan holds the largest budget rounded up to `RANK_MULTIPLE` (below
  `candidates`), and each layer's own budget is passed traced (`_ranked`,
  `Method.compact_ranked`): layers whose budgets differ (PyramidKV), and prompt lengths
  whose budgets round alike, share one compiled layer. Otherwise every layer must have
  one budget, compiled in."""
  return _one_layer_plan(plan, candidates, RANK_MULTIPLE)


def _ranked(layer_plan) -> bool:
  """Whether a compressing prefill run layer by layer by `layer_plan` passes each layer's
  budget traced."""
  return isinstance(layer_plan, RankedLayer)


@functools.lru_cache(maxsize=64)
def _one_layer_plan(plan, candidates: int, multiple: int):
  # Memoized: the same plan object each call keeps the executable key's hash table small.
  method = getattr(plan, "method", None)   # a PlanSet (several methods) has none
  if method is None or not plan.compress or not getattr(method, "layerwise_prefill", False):
    return None
  largest = max(plan.budgets)
  # Filler slots past a layer's budget are cut after the last layer: no room before them.
  if (largest < candidates and plan.room == 0 and method.compacts_ranked
      and all(method.traces_budget(b) for b in set(plan.budgets))):
    rounded = min(-(-largest // multiple) * multiple, candidates - 1)
    return RankedLayer(plan.method, (rounded,), plan.room, plan.compress)
  if len(set(plan.budgets)) == 1:
    return dataclasses.replace(plan, budgets=plan.budgets[:1])
  return None


def _grow(cache, *, rooms, reserves=None, placement=None):
  return _constrained(kv_cache.grow_by(cache, rooms, reserves), placement)


# Growing copies every layer into a bigger buffer: on CPU, LLVM's default optimization
# level spent 2.1 s compiling the 90 copy kernels of a cache whose 30 layers differ in size
# (PyramidKV) against 0.5 s at level 1, which ran them 7% slower (57.5 against 53.5 ms at
# 4K tokens x 4 rows), once per context.
_COPY_OPTIONS = {"xla_backend_optimization_level": 1}
# Keyed by each layer's room, not the room asked for: calls whose caches come out the same
# (another max_new_tokens within the rounding) share one executable.
_grow_jit = jax.jit(_grow, static_argnames=("rooms", "reserves", "placement"))
# Unsharded layers of a few kinds (shapes, room and reserve) grow one layer per call, an
# executable per kind: a new prompt length compiled AdaKV's 30 alike head-wise layers' copies
# in 3 s as one program, 0.4 s as one layer's. Layers that all differ (PyramidKV) compile
# faster as one program, and would fill the executable cache one entry per layer.
_grow_layer_jit = jax.jit(kv_cache.grow_layer, static_argnames=("room", "reserve"))
GROW_KINDS_BY_LAYER = 4


def _on_cpu(tree) -> bool:
  """Whether the first array of `tree` lives on CPU devices only."""
  leaf = next((x for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array)), None)
  return leaf is not None and all(d.platform == "cpu" for d in leaf.devices())


def _placed(model, args, rows=(), cache=None):
  """A sharded model's step arguments on its mesh (kvjax.sharding): `rows` (indices of
  batch-first arrays) over the batch axis, the cache at index `cache` by its layout's
  logical axes, any other array not yet there replicated. Unsharded: as they are."""
  placement = getattr(model, "placement", None)
  if placement is None:
    return args
  placed = list(placement.put_replicated(
      tuple(None if i in rows or i == cache else a for i, a in enumerate(args))))
  for i in rows:
    placed[i] = placement.put_rows(args[i])
  if cache is not None:
    placed[cache] = placement.put_cache(args[cache])
  return tuple(placed)


class _Static:
  """A static argument in an executable's key, hashed once: an NNX graph definition hashes
  its whole graph each time (~1 ms for SmolLM2, three times per step before this).
  `derived` holds what is computed once per value (a model's layer graph definition)."""
  __slots__ = ("value", "hash", "derived")

  def __init__(self, value):
    self.value, self.hash, self.derived = value, hash(value), {}

  def __hash__(self):
    return self.hash

  def __eq__(self, other):
    return isinstance(other, _Static) and (
        self.value is other.value or (self.hash == other.hash and self.value == other.value))


_STATICS: dict[int, _Static] = {}


def _plain(value) -> bool:
  return value is None or isinstance(value, (bool, int, float, str))


def _static(value):
  """`value`'s _Static, made once per object (the table holds the object, so its id is not
  reused while it is there); numbers, strings, None and tuples of them (each grow's rooms
  and reserves, made anew per call) stand for themselves."""
  if _plain(value) or (isinstance(value, tuple) and all(map(_plain, value))):
    return value
  known = _STATICS.get(id(value))
  if known is None or known.value is not value:
    if len(_STATICS) >= 256:
      _STATICS.clear()
    known = _STATICS[id(value)] = _Static(value)
  return known


def _signature(tree):
  return tuple((x.shape, x.dtype) if hasattr(x, "shape") else x
               for x in jax.tree_util.tree_leaves(tree)), jax.tree_util.tree_structure(tree)


_CACHE_ENV = "KVJAX_COMPILATION_CACHE"
COMPILATION_CACHE_BYTES = 2 << 30  # least recently used entries go first beyond this


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache under the kvjax cache directory.

  A second process then loads each step's executable from disk instead of compiling it
  again (seconds per shape). Left alone when the user already set
  `jax_compilation_cache_dir`; $KVJAX_COMPILATION_CACHE=0 turns it off, any other value
  is the directory to use. Returns the directory in use (None when off).
  """
  configured = jax.config.jax_compilation_cache_dir
  if configured:
    return configured
  choice = os.environ.get(_CACHE_ENV, "")
  if choice.strip().lower() in ("0", "false", "no", "off"):
    return None
  directory = pathlib.Path(choice).expanduser() if choice else assets.cache_dir() / "xla"
  jax.config.update("jax_compilation_cache_dir", str(directory))
  # Only JAX's own defaults are changed, never a value the user set: kvjax's steps take
  # 0.3-5 s to compile (JAX keeps only those over 1 s), and the directory is bounded.
  if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  if jax.config.jax_compilation_cache_max_size == -1:
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
  if jax.config.jax_compilation_cache_max_size > 0:
    _restore_access_times(directory)
  return str(directory)


def _restore_access_times(directory: pathlib.Path) -> None:
  """Gives every entry of a bounded JAX cache its access-time file.

  JAX's bounded cache writes an entry, then its `-atime` file, and reads every entry's
  access time before each write; an entry left without one (a process killed between the
  two writes) makes every later write fail in every process. Marking such entries used
  now is safe against concurrent writers (they write the same kind of file).
  """
  if not directory.is_dir():
    return
  now = time.time_ns().to_bytes(8, "little")
  for entry in directory.glob("*-cache"):
    atime = entry.with_name(entry.name[:-len("-cache")] + "-atime")
    if not atime.exists():
      try:
        atime.write_bytes(now)
      except OSError:   # a read-only cache is used as it is
        pass


class CompiledSteps:
  """Caches compiled executables by argument shapes; records compile seconds.

  At most `max_executables` are kept, least recently used first out: a long sweep or
  test session compiles hundreds of (method, shape) steps, and each executable holds its
  machine code in memory for as long as it is cached.
  """

  def __init__(self, max_executables: int = 96):
    self._executables = collections.OrderedDict()
    self.max_executables = max_executables
    self.compile_seconds = 0.0
    self._disk_cache_checked = False

  def _get(self, name, jitted, static, args, compiler_options=None):
    # Whether kernels are used is read while tracing, so it is part of the key.
    key = (name, tuple((k, _static(v)) for k, v in sorted(static.items(), key=lambda kv: kv[0])),
           _signature(args), use_pallas())
    if key in self._executables:
      self._executables.move_to_end(key)
    else:
      if not self._disk_cache_checked:
        enable_compilation_cache()
        self._disk_cache_checked = True
      start = time.perf_counter()
      self._executables[key] = jitted.lower(*args, **static).compile(compiler_options)
      self.compile_seconds += time.perf_counter() - start
      while len(self._executables) > self.max_executables:
        self._executables.popitem(last=False)
    return self._executables[key]

  def clear(self) -> None:
    """Drops every cached executable (compile seconds keep counting)."""
    self._executables.clear()

  def prefill(self, model, tokens, token_mask, cache, logits="last", plan=None,
              method_params=None):
    # Checked before anything runs: the layer-by-layer path donates layers as it goes.
    transformer.check_logits(logits)
    plan = _budget_free(plan)
    if _runs_by_layer(model, cache, plan, tokens.shape[1]):
      return self._prefill_by_layer(model, tokens, token_mask, cache, logits, plan,
                                    method_params)
    plan, budgets = _traced_budgets(plan)
    args = _placed(model, (model.params, tokens, token_mask, cache, method_params, budgets),
                   rows=(1, 2), cache=3)
    jitted = _compress_jit if plan is not None and plan.compress else _prefill_jit
    static = dict(graphdef=model.graphdef, logits=logits, plan=plan,
                  placement=getattr(model, "placement", None))
    return self._get("prefill", jitted, static, args)(*args)

  def _prefill_by_layer(self, model, tokens, token_mask, cache, logits, plan=None,
                        method_params=None):
    whole = dict(graphdef=model.graphdef)
    args = (model.params, tokens, token_mask, cache.lengths)
    x, positions, lengths = self._get("prefill_embed", _prefill_embed_jit, whole, args)(*args)
    layer_params = model.params["layers"]
    # A ranking plan's budgets are passed traced; every layer is compacted to the plan's
    # (rounded) budget's shapes, then cut to its own.
    layer_plan = (None if plan is None
                  else _layer_plan(plan, cache.layers[0].capacity + tokens.shape[1]))
    ranked = _ranked(layer_plan)
    keeps = [(jnp.int32(b),) for b in plan.budgets] if ranked else [()] * len(cache.layers)
    # Every layer's weights and cache have layer 0's shapes (_runs_by_layer). An
    # uncompressed layer reads no method parameters; a compressing one reads the same at
    # every layer (a layerwise method's, such as SentenceKV's sentence ids).
    if layer_plan is None:
      method_params = None
    args = (layer_params[0], x, positions, cache.layers[0], lengths, tokens,
            method_params) + keeps[0]
    name, jitted = (("prefill_layer", _prefill_layer_jit) if layer_plan is None
                    else ("compress_layer", _compress_layer_jit))
    run_layer = self._get(name, jitted, dict(graphdef=_layer_graphdef(model), plan=layer_plan),
                          args)
    layers = []
    for index, layer_cache in enumerate(cache.layers):
      x, layer_cache = run_layer(layer_params[index], x, positions, layer_cache, lengths,
                                 tokens, method_params, *keeps[index])
      layers.append(layer_cache)
    layers = tuple(layers)
    if ranked:
      layers = self._get("first_slots", _first_slots_jit,
                         dict(sizes=plan.budgets, method=plan.method), (layers,),
                         _COPY_OPTIONS if _on_cpu(layers) else None)(layers)
    args = (model.params, x, token_mask)
    out = self._get("prefill_logits", _prefill_logits_jit, dict(whole, logits=logits), args)(*args)
    if plan is None:
      return out, kv_cache.Cache(layers=layers, lengths=lengths)
    return out, plan.finish(layers, lengths)   # a cross-layer step, if any

  def decode(self, model, tokens, cache, key, temperature, top_p, greedy, plan=None,
             active=None, method_params=None):
    """One token per row; `active` [B] bool (default all) masks rows that are done."""
    active = jnp.ones(tokens.shape, bool) if active is None else jnp.asarray(active, bool)
    plan, budgets = _traced_budgets(plan)
    args = _placed(model, (model.params, tokens, active, cache, key, jnp.float32(temperature),
                           jnp.float32(top_p), method_params, budgets), rows=(1, 2), cache=3)
    static = dict(graphdef=model.graphdef, greedy=greedy, plan=plan,
                  placement=getattr(model, "placement", None))
    return self._get("decode", _decode_jit, static, args)(*args)

  def decode_loop(self, model, tokens, cache, key, first_step: int, limit: int, temperature,
                  top_p, greedy, eos, chunk: int, plan=None, active=None,
                  mask_finished: bool = False, method_params=None):
    """Up to `limit` decode steps in one compiled call (see `_decode_loop`): returns
    (tokens [B, chunk] as a host array, steps run, cache, last tokens, active). `key` is
    one key, or [B] keys (each row its own stream) with one `first_step` or [B]."""
    if not 1 <= limit <= chunk:
      raise ValueError(f"limit={limit} must be in [1, chunk={chunk}]")
    active = jnp.ones(tokens.shape, bool) if active is None else jnp.asarray(active, bool)
    eos = jnp.asarray(list(eos) or [-1], jnp.int32)
    plan, budgets = _traced_budgets(plan)
    args = _placed(model, (model.params, tokens, active, cache, key,
                           jnp.asarray(first_step, jnp.int32),
                           jnp.int32(limit), jnp.float32(temperature), jnp.float32(top_p), eos,
                           method_params, budgets), rows=(1, 2), cache=3)
    static = dict(graphdef=model.graphdef, greedy=greedy, plan=plan, chunk=chunk,
                  mask_finished=mask_finished, placement=getattr(model, "placement", None))
    out, steps_run, cache, last, active = self._get("decode_loop", _decode_loop_jit, static,
                                                    args)(*args)
    return host_array(out), int(steps_run), cache, last, active

  def grow(self, cache, room: int, placement=None, multiple: int = 1,
           reserve_multiple: int = 1):
    """The cache with `room` more empty slots per head (for question and generated tokens),
    a dense layer's capacity rounded up to a multiple of `multiple`, or of a coarser step
    where the layers' capacities differ (`kv_cache.grow_rooms`), then up to a multiple of
    `reserve_multiple` (so rounded) with reserved slots (`kv_cache.reserve_rooms`);
    on a sharded model's mesh when `placement` (kvjax.sharding.Placement) is given, room 0
    included (a method's host-side finalize may leave leaves where XLA put them)."""
    if placement is not None:
      cache = placement.put_cache(cache)
    rooms = kv_cache.grow_rooms(cache, room, multiple)
    reserves = kv_cache.reserve_rooms(cache, rooms, reserve_multiple)
    if not any(rooms) and not any(reserves):
      return cache
    options = _COPY_OPTIONS if _on_cpu(cache) else None
    growing = [(layer, r, v) for layer, r, v in zip(cache.layers, rooms, reserves, strict=True)]
    kinds = {(_signature(layer), r, v) for layer, r, v in growing if r or v}
    if placement is None and len(kinds) <= GROW_KINDS_BY_LAYER:
      return cache.replace(layers=tuple(
          self._get("grow_layer", _grow_layer_jit, dict(room=r, reserve=v), (layer,),
                    options)(layer) if r or v else layer
          for layer, r, v in growing))
    static = dict(rooms=rooms, reserves=reserves if any(reserves) else None,
                  placement=placement)
    return self._get("grow", _grow_jit, static, (cache,), options)(cache)


# One process-wide cache of executables; keys include the model's graph definition.
STEPS = CompiledSteps()
