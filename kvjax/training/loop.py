"""The training loop: a frozen backbone, trainable parameters, a jitted step, checkpoints.

What is trained is a `Task`: pure functions of pytrees (initial parameters, a loss with its
metrics) plus a deterministic batch source addressed by position. The loop owns the rest:
the optax optimiser, gradient accumulation, logging, a progress bar and lossless
checkpoints. A run killed at any step and restarted with the same settings continues from
its latest checkpoint and logs the same losses, bit for bit on CPU, as an uninterrupted run:
parameters, optimiser state and RNG are restored exactly and batch i is a pure function of
its position.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging

from kvjax import fileio, validation
from kvjax.errors import CheckpointError, KvjaxError
from kvjax.sharding import Placement, check_rows, is_primary
from kvjax.training import checkpoint as checkpoint_lib
from kvjax.training import optim

HISTORY_FILE = "history.json"


@dataclasses.dataclass(frozen=True)
class Task:
  """What to train.

  init_params(key) -> the trainable pytree.
  loss(params, frozen, batch, key) -> (scalar loss, {name: scalar metric}); pure and
    jittable; gradients are taken for `params` only (the frozen backbone is an argument
    the loss must not differentiate, e.g. behind stop_gradient).
  frozen: the backbone's pytree (never updated).
  batch(position, count) -> {name: numpy array [count, ...]}: examples position ..
    position + count - 1, a pure function of its arguments.
  meta: JSON-ready description saved with every checkpoint (kind, hyperparameters, model
    identity and fingerprint); a run directory refuses to resume under another one.
  evaluate(params) -> {name: float}: held-out metrics (kvjax.training.evaluation), run
    every `LoopSettings.eval_every` steps and logged as "eval_<name>"; None: none.
  """
  init_params: Callable[[jax.Array], Any]
  loss: Callable[..., tuple[jax.Array, dict]]
  frozen: Any
  batch: Callable[[int, int], dict]
  meta: dict
  evaluate: Callable[[Any], dict] | None = None
  # The frozen backbone's kvjax.sharding.Placement (None: one device): each micro-batch's
  # rows are split over its data axis (data parallel; the gradients' mean is XLA's
  # all-reduce); trained state and frozen leaves not yet on its mesh are replicated there.
  placement: "Placement | None" = None


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  batch_size: int = 1            # examples per micro-batch
  checkpoint_every: int = 100    # steps between checkpoints (and at the last step)
  keep_checkpoints: int = 2
  log_every: int = 10
  seed: int = 0
  progress_bar: bool = True
  eval_every: int = 0            # steps between evaluations (and at the last step); 0: none

  def __post_init__(self):
    validation.integer("batch_size", self.batch_size, 1, error=KvjaxError)
    validation.integer("eval_every", self.eval_every, 0, error=KvjaxError)
    validation.integer("checkpoint_every", self.checkpoint_every, 1, error=KvjaxError)
    validation.integer("keep_checkpoints", self.keep_checkpoints, 1, error=KvjaxError)
    validation.integer("log_every", self.log_every, 1, error=KvjaxError)
    validation.integer("seed", self.seed, 0, error=KvjaxError)
    validation.boolean("progress_bar", self.progress_bar, error=KvjaxError)


@dataclasses.dataclass
class RunResult:
  params: Any
  history: list[dict]       # one record per step: {"step", "loss", metrics...}
  resumed_from: int | None  # the checkpoint step the run continued from
  seconds: float            # wall time of this process's steps (compilation included)
  examples: int             # examples consumed by the whole run


def make_train_step(loss: Callable, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule):
  """A jitted step (params, opt_state, rng, step, frozen, batch) -> (params, opt_state,
  rng, loss, metrics): the batch's leading axis holds the micro-batches, whose gradients
  are averaged in a scan before one optimiser update."""

  @jax.jit
  def step_fn(params, opt_state, rng, step, frozen, batch):
    rng, step_key = jax.random.split(rng)
    micro = jax.tree_util.tree_leaves(batch)[0].shape[0]
    keys = jax.random.split(step_key, micro)
    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def accumulate(grads, inputs):
      micro_batch, key = inputs
      (value, metrics), g = grad_fn(params, frozen, micro_batch, key)
      return jax.tree_util.tree_map(jnp.add, grads, g), (value, metrics)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    grads, (values, metrics) = jax.lax.scan(accumulate, zeros, (batch, keys))
    grads = jax.tree_util.tree_map(lambda g: g / micro, grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {name: value.mean() for name, value in metrics.items()}
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = schedule(step)
    return params, opt_state, rng, values.mean(), metrics

  return step_fn


def _evaluation_due(task: Task, settings: LoopSettings, step: int, steps: int) -> bool:
  if task.evaluate is None or not settings.eval_every:
    return False
  return step % settings.eval_every == 0 or step == steps


def _micro_batches(batch: dict, accumulation: int) -> dict:
  """[accumulation * n, ...] arrays -> [accumulation, n, ...]."""
  return {name: value.reshape((accumulation, -1) + value.shape[1:])
          for name, value in batch.items()}


def place_batch(placement, batch: dict) -> dict:
  """[accumulation, rows, ...] micro-batches with their rows split over the placement's
  data axis (as it is without a placement)."""
  if placement is None:
    return batch
  return {name: placement.put_axes(value, (None, "batch")) for name, value in batch.items()}


def _check_resumable(stored: dict, meta: dict, directory) -> None:
  """A run directory continues only the run it holds (same task, model and settings)."""
  differ = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
  if differ:
    shown = "; ".join(f"{k}: stored {json.dumps(stored.get(k))[:200]}, now "
                      f"{json.dumps(meta.get(k))[:200]}" for k in differ)
    raise CheckpointError(f"{directory} holds a run with other settings ({shown}); resume it "
                          f"with the same command, or give a new --workdir")


def train(task: Task, workdir, steps: int, optimizer_settings: optim.OptimizerSettings,
          settings: LoopSettings = LoopSettings(), stop_after: int | None = None
          ) -> RunResult:
  """Trains `task` for `steps` optimiser steps in `workdir`, resuming from its latest
  checkpoint if it has one. stop_after: return after that step, as a process killed right
  after it would (the checkpoints due until then are saved; tests)."""
  validation.integer("steps", steps, 1, error=KvjaxError)
  if optimizer_settings.total_steps != steps:
    raise KvjaxError(f"optimizer total_steps={optimizer_settings.total_steps} must equal "
                     f"steps={steps} (the schedule decays over the run)")
  meta = {**task.meta, "training": {
      "steps": steps, "optimizer": dataclasses.asdict(optimizer_settings),
      "batch_size": settings.batch_size, "seed": settings.seed}}
  meta = json.loads(json.dumps(meta))   # as it reads back from disk (tuples become lists)
  # Each micro-batch's rows are split over the data axis.
  check_rows(task.placement, settings.batch_size, f"batch_size={settings.batch_size}")
  optimizer = optim.make_optimizer(optimizer_settings)
  schedule = optim.learning_rate_schedule(optimizer_settings)
  # On a mesh, everything trained is replicated over it, restored state too (orbax gives
  # back arrays on one device, which jit refuses beside the mesh's).
  place = (lambda tree: tree) if task.placement is None else task.placement.put_replicated
  params = place(task.init_params(jax.random.key(settings.seed)))
  opt_state = place(optimizer.init(params))
  rng = place(jax.random.fold_in(jax.random.key(settings.seed), 1))
  frozen = place(task.frozen)
  checkpoints = checkpoint_lib.RunCheckpoints(workdir, settings.checkpoint_every,
                                              settings.keep_checkpoints)
  start, examples, history = 0, 0, []
  resumed_from = checkpoints.latest_step()
  if resumed_from is not None:
    # Settings first: another model's or width's arrays would fail inside orbax.
    stored = checkpoints.meta(resumed_from)
    _check_resumable({k: v for k, v in stored.items() if k != "step"}, meta, workdir)
    params, opt_state, rng, progress, _ = checkpoints.restore(resumed_from, params,
                                                              opt_state, rng)
    params, opt_state, rng = place((params, opt_state, rng))
    start, examples, history = progress["step"], progress["examples"], progress["history"]
    logging.info("resuming %s from step %d (%d examples seen)", workdir, start, examples)
  per_step = settings.batch_size * optimizer_settings.accumulation
  step_fn = make_train_step(task.loss, optimizer, schedule)
  last = steps if stop_after is None else min(stop_after, steps)
  began = time.perf_counter()
  bar = tqdm.tqdm(total=steps, initial=start, desc="train", unit="step",
                  disable=not settings.progress_bar, dynamic_ncols=True)
  try:
    for step in range(start, last):
      batch = place_batch(task.placement, _micro_batches(task.batch(examples, per_step),
                                                         optimizer_settings.accumulation))
      params, opt_state, rng, loss, metrics = step_fn(
          params, opt_state, rng, jnp.int32(step), frozen, batch)
      examples += per_step
      record = {"step": step + 1, "loss": float(loss),
                **{name: float(value) for name, value in metrics.items()}}
      history.append(record)
      if not np.isfinite(record["loss"]):
        raise KvjaxError(f"the loss is {record['loss']} at step {step + 1}; lower the "
                         f"learning rate or clip harder")
      if _evaluation_due(task, settings, step + 1, steps):
        record.update({f"eval_{name}": float(value)
                       for name, value in task.evaluate(params).items()})
      bar.update(1)
      bar.set_postfix(loss=f"{record['loss']:.4f}")
      if (step + 1) % settings.log_every == 0 or step + 1 == steps:
        logging.info("step %d: %s", step + 1,
                     ", ".join(f"{k}={v:.5g}" for k, v in record.items() if k != "step"))
      if checkpoints.due(step + 1, steps):
        checkpoints.save(step + 1, params, opt_state, rng,
                         {"step": step + 1, "examples": examples, "history": history},
                         {**meta, "step": step + 1})
        if is_primary():   # processes sharing a mesh: the primary writes
          fileio.write_json_atomic(pathlib.Path(checkpoints.directory) / HISTORY_FILE,
                                   {"history": history}, indent=1)
  finally:
    bar.close()
    checkpoints.close()
  return RunResult(params=params, history=history, resumed_from=resumed_from,
                   seconds=time.perf_counter() - began, examples=examples)
