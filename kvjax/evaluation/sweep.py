"""Evaluation sweeps: model x methods x compression ratios x tasks x lengths x modes.

Each batch of examples is prefilled once and compressed every way the sweep asks for
(`context.prefill_many`: compression never changes a one-chunk prefill's hidden states), then
each (method, ratio) generates its answers from its own cache. Every finished batch is
appended to `examples.jsonl` at once, so an interrupted run loses only the batch it was in,
and a rerun skips every (cell, example) already there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Callable

import jax
import numpy as np
from absl import logging

from kvjax import calibration
from kvjax import methods as methods_lib
from kvjax.cache import full_cache_nbytes
from kvjax.errors import KvjaxError, MethodError
from kvjax.evaluation import scoring, tasks as tasks_lib
from kvjax.fileio import write_json_atomic
from kvjax.generation import context, conversation, episodes, inputs, map_limit
from kvjax.generation.generate import complete
from kvjax.methods.base import own_label
from kvjax.methods.trained import TRAINED
from kvjax.sharding import distributed, placement_of

MODES = ("query_agnostic", "question_aware")
FIDELITY = "fidelity"
# Answer lengths, as RULER sizes them per task family but shorter: SmolLM2-sized models
# answer in a sentence, and every generated token costs a decode step per method and ratio.
MAX_NEW_TOKENS = {"niah_multivalue": 64, "niah_multiquery": 64, "vt": 48, "cwe": 96,
                  "fwe": 40}
DEFAULT_MAX_NEW_TOKENS = 32


class SweepError(KvjaxError):
  """A sweep was asked for something it cannot run."""


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  methods: tuple[str, ...]          # registry names, optionally with hyperparameters
                                    # ("kivi:bits=4"); "full" is the uncompressed baseline
  ratios: tuple[float, ...]         # compression ratios for every compressing method
  tasks: tuple[str, ...]            # tasks.TASKS, tasks.CONVERSATION_TASKS and/or "fidelity"
  lengths: tuple[int, ...]          # context lengths in model tokens
  modes: tuple[str, ...] = ("query_agnostic",)
  num_examples: int = 10
  batch_size: int = 4
  seed: int = 0
  turns: int = 3                    # questions per multi-turn conversation
  max_new_tokens: int | None = None  # None: per task (MAX_NEW_TOKENS)
  continuation_tokens: int = 128    # fidelity: tokens scored after each context

  def validate(self) -> None:
    known = set(tasks_lib.TASKS) | set(tasks_lib.CONVERSATION_TASKS) | {FIDELITY}
    for task in self.tasks:
      if task not in known:
        raise SweepError(f"unknown task {task!r}; available: {sorted(known)}")
    for mode in self.modes:
      if mode not in MODES:
        raise SweepError(f"unknown mode {mode!r}; available: {list(MODES)}")
    for name in self.methods:
      methods_lib.get(name)
    for ratio in self.ratios:
      if not 0 < ratio < 1:
        raise SweepError(f"compression ratio {ratio!r} must be in (0, 1); the full cache is "
                         f"the method 'full'")
    for what, value, low in (("num_examples", self.num_examples, 1),
                             ("batch_size", self.batch_size, 1), ("turns", self.turns, 1),
                             ("continuation_tokens", self.continuation_tokens, 1)):
      if not isinstance(value, int) or value < low:
        raise SweepError(f"{what}={value!r} must be an integer >= {low}")
    if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int)
                                            or self.max_new_tokens < 1):
      raise SweepError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1 "
                       f"(answer length), or None for each task's own")
    if not self.tasks or not self.methods or not self.lengths or not self.modes:
      raise SweepError("a sweep needs at least one task, method, length and mode")
    for length in self.lengths:
      if not isinstance(length, int) or length < 1:
        raise SweepError(f"length {length!r} must be a positive number of tokens")

  def room_answer_tokens(self) -> int:
    """Answer slots reserved in every single-turn cache (the longest answer of the sweep)."""
    return max(self.answer_tokens(t) for t in self.tasks)

  def answer_tokens(self, task: str) -> int:
    if self.max_new_tokens is not None:
      return self.max_new_tokens
    return MAX_NEW_TOKENS.get(task, DEFAULT_MAX_NEW_TOKENS)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One (method, ratio) column of a sweep; ratio 0.0 for the full cache. `label` names
  the configured method (set by `variants`, kept when the method is bound to a model);
  `weights` names what the label does not: the recipe run a checkpoint=trained method was
  bound to (set in `run_sweep`), so records of other weights are not reused."""
  name: str
  method: methods_lib.Method
  ratio: float
  label: str
  weights: str | None = None


def variants(config: SweepConfig) -> list[Variant]:
  out = []
  for name in config.methods:
    method = methods_lib.get(name)
    # Named before calibration fills a method's per-model fields (bound below, in run).
    label = own_label(method)
    if not method.needs_budget:  # the full cache, or a method that keeps every token
      out.append(Variant(name, method, 0.0, label))
      continue
    out.extend(Variant(name, method, float(r), label) for r in config.ratios)
  return out


def cell_key(model: str, task: str, length: int, mode: str, method: str, ratio: float
             ) -> tuple:
  return (model, task, int(length), mode, method, round(float(ratio), 6))


def recipe_weights(configured, bound) -> str | None:
  """"<run>/<step>" of the weights a checkpoint=trained method (or the press it wraps) was
  bound to, None for every other method: its label names the recipe, not the run (a
  RECIPE_VERSION bump trains other weights under the same label)."""
  while configured is not None:
    if getattr(configured, "checkpoint", None) == TRAINED:
      path = pathlib.PurePath(bound.checkpoint)
      return f"{path.parent.name}/{path.name}"
    configured, bound = getattr(configured, "press", None), getattr(bound, "press", None)
  return None


def _fingerprint(config: SweepConfig, task: str, weights: str | None = None) -> str:
  """What an example's result depends on beyond its cell: a record made under other
  settings (or, for checkpoint=trained, other weights) is not reused."""
  settings = {"seed": config.seed, "max_new_tokens": config.answer_tokens(task)}
  if weights is not None:
    settings["weights"] = weights
  if task in tasks_lib.CONVERSATION_TASKS:
    settings["turns"] = config.turns
  if task == FIDELITY:
    settings["continuation_tokens"] = config.continuation_tokens
    # The essay windows are drawn as a set of num_examples (fidelity.essay_samples):
    # example i of 8 is another text than example i of 12.
    settings["num_examples"] = config.num_examples
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def read_records(path: pathlib.Path) -> list[dict]:
  """Records of examples.jsonl; a torn last line (an interrupted write) is ignored."""
  if not path.exists():
    return []
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def _append_records(path: pathlib.Path, records: list[dict]) -> None:
  with open(path, "a", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _record_key(record: dict) -> tuple:
  return cell_key(record["model"], record["task"], record["length"], record["mode"],
                  record["method"], record["compression_ratio"]) + (
                      record["example"], record["fingerprint"])


def _keep(variant: Variant, nominal_length: int) -> int | None:
  """Tokens kept per layer: the ratio applies to the cell's nominal context length.

  Every example of a cell is generated to at most that length, so one budget (and so one
  set of compiled cache shapes) serves every task and batch at that length; the fraction
  really removed from each example is recorded beside it.
  """
  if not variant.method.compresses:
    return None
  return methods_lib.validate_compression(variant.method, [nominal_length], variant.ratio, None)


# Question slots reserved in every cache: a fixed room keeps cache shapes (and compiled
# steps) the same across tasks; wider questions get more.
_QUESTION_ROOM = 64


def _room(question_width: int, answer_tokens: int) -> int:
  return -(-(max(question_width, _QUESTION_ROOM) + answer_tokens) // 16) * 16


def _encode_single(model, examples, mode):
  """Token ids of each example's compressed part and (query-agnostic) its question."""
  if mode == "question_aware":
    return inputs.encode(model, [e.prompt for e in examples], None, None)
  return inputs.encode(model, [e.context for e in examples], [e.question for e in examples],
                       None)


def _run_variants(model, context_ids, runnable, nominal: int, room: int, answer) -> dict:
  """Prefills the contexts once, then answer(prefilled) -> [row] predictions per variant."""
  lengths = [len(p) for p in context_ids]
  tokens, mask = inputs.left_pad(context_ids, inputs.pad_id(model))
  # Each variant's cache is answered from and dropped before the next one is taken, so
  # memory holds one group of caches at a time (see context.iter_prefill_many).
  prefilled = context.iter_prefill_many(model, tokens, mask,
                                        [(v.method, _keep(v, nominal)) for v in runnable],
                                        room)
  prefill_seconds, answered = 0.0, []
  for variant in runnable:
    start = time.perf_counter()
    pre = next(prefilled)
    prefill_seconds += time.perf_counter() - start
    start = time.perf_counter()
    predictions = answer(pre)
    answered.append((variant, dict(
        predictions=predictions, context_tokens=lengths, kept_tokens=_kept_tokens(pre),
        context_cache_bytes=pre.context_cache_bytes / len(lengths),
        context_cache_host_bytes=pre.context_cache_host_bytes / len(lengths)),
        time.perf_counter() - start))
    del pre
  # The shared prefill's time is split evenly over the variants, as before.
  shared = prefill_seconds / len(runnable)
  return {variant: dict(record, seconds=(shared + seconds) / len(lengths))
          for variant, record, seconds in answered}


def _single_turn(model, encoded, runnable, answer_tokens, nominal, room_answer):
  """Every runnable variant's answers to one batch of encoded examples."""
  question_tokens = question_mask = None
  width = 0
  if encoded.questions is not None:
    question_tokens, question_mask = inputs.left_pad(encoded.questions, inputs.pad_id(model))
    width = question_tokens.shape[1]

  def answer(pre):
    done = complete(model, pre.logits, pre.cache, pre.decode_plan, question_tokens,
                    question_mask, max_new_tokens=answer_tokens)
    return [[t] for t in done.texts]
  return _run_variants(model, encoded.prompts, runnable, nominal, _room(width, room_answer),
                       answer)


def _multi_turn(model, encoded, runnable, answer_tokens, nominal, batch):
  """Every runnable variant's answers to each turn of one batch of conversations."""
  room = conversation.turn_room(encoded.turns, answer_tokens)
  shared = [v for v in runnable if not _episodic(v)]

  def answer(pre):
    return conversation.run_turns(model, pre, encoded.turns, answer_tokens, room)["answers"]
  results = (_run_variants(model, encoded.contexts, shared, nominal, room, answer)
             if shared else {})
  for variant in runnable:
    if _episodic(variant):
      results[variant] = _episode_variant(model, variant, batch, encoded, answer_tokens,
                                          nominal)
  return results


def _episodic(variant: Variant) -> bool:
  """EpiCache: one cache per episode of each conversation, each question routed to one."""
  return isinstance(variant.method, methods_lib.EpiCache)


def _episode_variant(model, variant: Variant, batch, encoded, answer_tokens, nominal) -> dict:
  """EpiCache's answers to a batch of conversations, one conversation at a time: each
  question is answered from its routed episode's cache on its own (EpiCache's protocol;
  earlier answers are not in the cache). Bytes: the device holds one episode's cache at a
  time, the host all of them."""
  keep = _keep(variant, nominal)
  start = time.perf_counter()
  predictions, device_bytes, host_bytes, kept = [], 0.0, 0.0, []
  for item in batch:
    ep = episodes.prefill_episodes(model, item.context, variant.method, budget=keep)
    predictions.append([episodes.answer(model, ep, q, answer_tokens).text
                        for q in item.questions])
    device_bytes += ep.device_bytes
    host_bytes += ep.host_bytes
    kept.append(float(np.mean(ep.budgets)))
  rows = len(batch)
  return dict(predictions=predictions, context_tokens=[len(c) for c in encoded.contexts],
              kept_tokens=float(np.mean(kept)), context_cache_bytes=device_bytes / rows,
              context_cache_host_bytes=host_bytes / rows,
              seconds=(time.perf_counter() - start) / rows)


def _cache_fields(model, variant: Variant, kept_tokens: float | None, row_bytes: float,
                  context_tokens: int) -> dict:
  """An example's context size, the fraction removed from it and its cache bytes: the
  compressed cache's share of its batch, or the full cache without the prefill bucket's
  padding (what it needs)."""
  full_bytes = full_cache_nbytes(model.config, 1, context_tokens)
  removed = 0.0 if kept_tokens is None else max(0.0, 1.0 - kept_tokens / context_tokens)
  return dict(context_tokens=context_tokens, removed_fraction=removed,
              context_cache_bytes=row_bytes if variant.method.compresses else full_bytes,
              full_context_cache_bytes=full_bytes)


def _kept_tokens(prefilled) -> float | None:
  """Mean kept slots per layer (per head on average), None for the full cache."""
  return float(np.mean(prefilled.budgets)) if prefilled.budgets else None


def _score_predictions(item, predictions: list[str]) -> float:
  if isinstance(item, tasks_lib.Conversation):
    return float(np.mean([scoring.score(item.metric, p, a)
                          for p, a in zip(predictions, item.answers)]))
  return scoring.score(item.metric, predictions[0], item.answers)


def _runnable(all_variants, nominal: int, lengths: list[int], skipped: dict, model,
              where: str):
  """Variants whose budget is valid for these contexts; the rest are reported as skipped."""
  out = []
  for v in all_variants:
    try:
      keep = _keep(v, nominal)
      if keep is not None:
        methods_lib.validate_compression(v.method, lengths, None, keep)
        context.layer_budgets(model, v.method, keep, max(lengths))
      out.append(v)
    except MethodError as e:
      skipped.setdefault(f"{v.label}@{v.ratio} {where}", str(e))
  return out


def run_sweep(model, model_name: str, config: SweepConfig, out_dir,
              progress: Callable[[int, str], None] | None = None) -> dict:
  """Runs (or resumes) a sweep; returns the summary written to out_dir/summary.json.

  progress(done_units, description) is called after each unit of work (one batch of one
  task/length/mode across every method and ratio); `units(config)` gives their number.
  """
  config.validate()
  check_lengths(model, config)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / "examples.jsonl"
  # Several processes (kvjax.sharding.distributed): process 0's files say what is done,
  # and only it writes. On one mesh they run every batch together; each on its own
  # devices, they take turns at the batches still to run (each its own examples) and
  # after every round share their records (and errors: all stop together).
  primary = distributed.is_primary()
  processes, index = jax.process_count(), jax.process_index()
  split = processes > 1 and distributed.holds_its_own_devices(placement_of(model))
  done = {tuple(key) for key in distributed.broadcast_from_primary(
      [list(_record_key(r)) for r in read_records(path)] if primary else None)}
  # Methods with per-model parts (calibrated heads) are made ready for this model once.
  all_variants = []
  for v in variants(config):
    bound = calibration.bind(v.method, model)
    all_variants.append(dataclasses.replace(v, method=bound,
                                            weights=recipe_weights(v.method, bound)))
  weights = {v.label: v.weights for v in all_variants if v.weights is not None}
  if distributed.broadcast_from_primary(weights) != weights:
    # Each process keys its records (and so its share of the batches) by them.
    raise SweepError(f"process {index} bound checkpoint=trained weights {weights}, process "
                     f"0 others: run every process with the same kvjax and cache directory")

  def missing(task, length, mode, indices):
    fingerprints = {w: _fingerprint(config, task, w) for w in {v.weights for v in all_variants}}
    return [v for v in all_variants if any(
        cell_key(model_name, task, length, mode, v.label, v.ratio) + (
            i, fingerprints[v.weights]) not in done for i in indices)]

  batches = [(task, length, mode, range(first, min(first + config.batch_size,
                                                     config.num_examples)))
             for task, length, mode in _task_grid(config)
             for first in range(0, config.num_examples, config.batch_size)]
  todo = [(batch, variants_left) for batch in batches
          if (variants_left := missing(*batch))]
  unit = len(batches) - len(todo)   # progress counts the batches already done first
  if progress is not None and unit:
    progress(unit, "resumed")
  skipped: dict[str, str] = {}
  items = {}
  # Each turn: one batch per process (split), or the next batch for all (one mesh).
  share, mine = (processes, index) if split else (1, 0)
  for first in range(0, len(todo), share):
    turn = todo[first:first + share]
    records, error = [], None
    if mine < len(turn):
      (task, length, mode, indices), variants_left = turn[mine]
      if split:
        logging.info("process %d of %d: %s %d %s, examples %d-%d", index, processes, task,
                     length, mode, indices[0], indices[-1])
      try:
        if (task, length) not in items:
          items = {(task, length): _items(model, task, length, config)}  # one task's alive
        batch = [items[task, length][i] for i in indices]
        records = _with_weights(
            _run_batch(model, model_name, task, length, mode, indices, batch, variants_left,
                       config.answer_tokens(task), _fingerprint(config, task), config,
                       skipped), weights, config)
      except Exception as e:   # noqa: BLE001 (raised below, on every process together)
        if not split:
          raise
        error = f"process {index}: {task} {length} {mode}: {type(e).__name__}: {e}"
    if split:   # the turn's records and errors, from every process
      shared = distributed.all_gather([records, error])
      records = [r for part, _ in shared for r in part]
      errors = [e for _, e in shared if e is not None]
    if primary and records:
      _append_records(path, records)
    done.update(_record_key(r) for r in records)
    if split and errors:
      raise SweepError("; ".join(errors) + " (the other processes' records of this turn "
                       "are saved; run again to resume)")
    map_limit.release_if_near_limit()
    unit += len(turn)
    if progress is not None:
      (task, length, mode, _), _ = turn[-1]
      progress(unit, f"{task} {length} {mode}")
  if split:
    for part in distributed.all_gather(skipped):
      for key, why in part.items():
        skipped.setdefault(key, why)
  summary = None
  if primary:
    summary = summarize(read_records(path), config, model_name, weights)
    summary["skipped"] = skipped
    write_json_atomic(out_dir / "summary.json", summary, indent=1)
  return distributed.broadcast_from_primary(summary)


def _task_grid(config: SweepConfig):
  for task in config.tasks:
    for length in config.lengths:
      # Fidelity and conversations only exist query-agnostic: the text read after the
      # context (continuation, later questions) is never compressed with it.
      task_modes = (config.modes if task in tasks_lib.TASKS else
                    (("query_agnostic",) if "query_agnostic" in config.modes else ()))
      for mode in task_modes:
        yield task, length, mode


def units(config: SweepConfig) -> int:
  per = -(-config.num_examples // config.batch_size)
  return per * sum(1 for _ in _task_grid(config))


def template_tokens(model) -> int:
  """Tokens the chat template adds around a prompt: generators get length minus these, so
  the prompt the model sees is `length` tokens long (and stays in its prefill bucket)."""
  tokenizer = model.tokenizer
  if not tokenizer.has_chat_template:
    return 0
  bare = len(tokenizer.encode("x", add_special_tokens=False))
  return len(inputs.encode(model, ["x"], None, None).prompts[0]) - bare


def check_lengths(model, config: SweepConfig) -> None:
  """Refuses, before any work, a length that leaves the tasks fewer than their minimum
  tokens once the chat template's are taken (the generators get length minus those)."""
  if all(task == FIDELITY for task in config.tasks):
    return
  template = template_tokens(model)
  least = tasks_lib.MIN_TARGET_TOKENS + template
  for length in config.lengths:
    if length < least:
      raise SweepError(
          f"length {length} leaves {length - template} tokens for the tasks after the chat "
          f"template's {template}; they need at least {tasks_lib.MIN_TARGET_TOKENS}: use "
          f"lengths >= {least}")


def _items(model, task: str, length: int, config: SweepConfig):
  if task == FIDELITY:
    from kvjax.evaluation import fidelity
    return fidelity.essay_samples(model.tokenizer, length, config.continuation_tokens,
                                  config.num_examples, config.seed)
  if task in tasks_lib.CONVERSATION_TASKS:
    return tasks_lib.generate_conversations(task, model.tokenizer, length - template_tokens(model),
                                            config.num_examples, config.turns, config.seed)
  return tasks_lib.generate_examples(task, model.tokenizer, length - template_tokens(model),
                                     config.num_examples, config.seed)


def _run_batch(model, model_name, task, length, mode, indices, batch, missing, answer_tokens,
               fingerprint, config, skipped) -> list[dict]:
  base = dict(model=model_name, task=task, length=length, mode=mode, fingerprint=fingerprint)
  if task == FIDELITY:
    return _fidelity_batch(model, base, indices[0], batch, missing, skipped)
  if task in tasks_lib.CONVERSATION_TASKS:
    encoded = conversation.encode_conversations(
        model, [c.context for c in batch], [list(c.questions) for c in batch])
    lengths = [len(p) for p in encoded.contexts]
  else:
    encoded = _encode_single(model, batch, mode)
    lengths = [len(p) for p in encoded.prompts]
  runnable = _runnable(missing, length, lengths, skipped, model, f"{task} {length} {mode}")
  if not runnable:
    return []
  if task in tasks_lib.CONVERSATION_TASKS:
    results = _multi_turn(model, encoded, runnable, answer_tokens, length, batch)
  else:
    for v in [v for v in runnable if _episodic(v)]:
      runnable.remove(v)
      skipped.setdefault(f"{v.label}@{v.ratio} {task} {length} {mode}",
                         f"{v.label} answers conversations (its episodes need the "
                         f"conversation's turns); it runs on {tasks_lib.CONVERSATION_TASKS}")
    if not runnable:
      return []
    results = _single_turn(model, encoded, runnable, answer_tokens, length,
                           config.room_answer_tokens())
  records = []
  for variant, result in results.items():
    for row, item in enumerate(batch):
      predictions = result["predictions"][row]
      answers = (item.answers if isinstance(item, tasks_lib.Conversation)
                 else [item.answers])
      records.append(dict(
          base, method=variant.label, compression_ratio=variant.ratio, example=item.index,
          score=100.0 * _score_predictions(item, predictions), predictions=predictions,
          answers=[list(a) for a in answers], seconds=result["seconds"],
          context_cache_host_bytes=result.get("context_cache_host_bytes", 0.0),
          **_cache_fields(model, variant, result["kept_tokens"],
                          result["context_cache_bytes"], result["context_tokens"][row])))
  return records


def _fidelity_batch(model, base, first: int, samples, missing, skipped) -> list[dict]:
  """Perplexity, KL and top-1 against the full cache of one batch of essay samples."""
  from kvjax.evaluation import fidelity
  from kvjax.generation.score import continuation_log_probs
  lengths = [len(s.context_ids) for s in samples]
  runnable = _runnable(missing, base["length"], lengths, skipped, model,
                       f"{base['task']} {base['length']}")
  if not runnable:
    return []
  start = time.perf_counter()
  ref = fidelity.reference(model, samples)
  continuations = [list(s.continuation_ids) for s in samples]
  tokens, mask = inputs.left_pad([list(s.context_ids) for s in samples], inputs.pad_id(model))
  prefilled = context.iter_prefill_many(
      model, tokens, mask, [(v.method, _keep(v, base["length"])) for v in runnable],
      ref.targets.shape[1])
  per_variant = []
  for pre in prefilled:  # each cache is scored and dropped before the next one
    metrics = fidelity.token_metrics(ref.log_probs,
                                     continuation_log_probs(model, pre, continuations),
                                     ref.targets, ref.mask)
    per_variant.append((_kept_tokens(pre), pre.context_cache_bytes,
                        {k: distributed.host_array(v).tolist() for k, v in metrics.items()}))
    del pre
  seconds = (time.perf_counter() - start) / len(runnable) / len(samples)
  records = []
  for variant, (kept, cache_bytes, metrics) in zip(runnable, per_variant):
    for row in range(len(samples)):
      records.append(dict(
          base, method=variant.label, compression_ratio=variant.ratio, example=first + row,
          seconds=seconds, **{k: v[row] for k, v in metrics.items()},
          **_cache_fields(model, variant, kept, cache_bytes / len(samples), lengths[row])))
  return records


def _with_weights(records: list[dict], weights: dict[str, str], config: SweepConfig
                  ) -> list[dict]:
  """Records of checkpoint=trained methods, named by (and keyed on) their bound weights."""
  return [dict(r, weights=weights[r["method"]],
               fingerprint=_fingerprint(config, r["task"], weights[r["method"]]))
          if r["method"] in weights else r for r in records]


def summarize(records: list[dict], config: SweepConfig, model_name: str,
              weights: dict[str, str]) -> dict:
  """One cell per (model, task, length, mode, method, ratio) of the current config.
  weights: each checkpoint=trained label's bound weights (`Variant.weights`; {} when
  there are none); their records of other weights are left out."""
  wanted = {v.label: v for v in variants(config)}
  grouped: dict[tuple, list[dict]] = {}
  for r in records:
    if (r["model"] != model_name or r["task"] not in config.tasks
        or r["length"] not in config.lengths or r["mode"] not in config.modes
        or r["method"] not in wanted or r["example"] >= config.num_examples
        or r["fingerprint"] != _fingerprint(config, r["task"], weights.get(r["method"]))):
      continue
    if wanted[r["method"]].method.needs_budget and not any(
        abs(r["compression_ratio"] - x) < 1e-9 for x in config.ratios):
      continue
    key = cell_key(r["model"], r["task"], r["length"], r["mode"], r["method"],
                   r["compression_ratio"])
    grouped.setdefault(key, {})[r["example"]] = r  # a rerun's duplicate replaces, never adds
  cells = []
  for key, by_example in grouped.items():
    rs = list(by_example.values())
    model_, task, length, mode, method, ratio = key
    if task == FIDELITY:
      tokens = sum(r["tokens"] for r in rs)
      metrics = {"perplexity": float(np.exp(sum(r["nll_sum"] for r in rs) / tokens)),
                 "kl": sum(r["kl_sum"] for r in rs) / tokens,
                 "top1": sum(r["top1_agree"] for r in rs) / tokens}
    else:
      metrics = {"score": float(np.mean([r["score"] for r in rs]))}
    cells.append(dict(
        model=model_, task=task, length=length, mode=mode, method=method,
        compression_ratio=ratio, examples=len(rs), metrics=metrics,
        context_cache_bytes=float(np.mean([r["context_cache_bytes"] for r in rs])),
        full_context_cache_bytes=float(np.mean([r["full_context_cache_bytes"] for r in rs])),
        context_tokens=float(np.mean([r["context_tokens"] for r in rs])),
        removed_fraction=float(np.mean([r["removed_fraction"] for r in rs])),
        seconds=float(sum(r["seconds"] for r in rs))))
  method_order = {v.label: i for i, v in enumerate(variants(config))}
  cells.sort(key=lambda c: (config.tasks.index(c["task"]), c["length"],
                            config.modes.index(c["mode"]), method_order[c["method"]],
                            c["compression_ratio"]))
  summary = {"model": model_name, "config": dataclasses.asdict(config), "cells": cells,
             "complete": all(c["examples"] == config.num_examples for c in cells)}
  if weights:   # which runs the checkpoint=trained cells came from
    summary["weights"] = weights
  return summary
