"""Trained weights on first use: method="locret:checkpoint=trained".

A trainable method whose checkpoint is `kvjax.methods.trained.TRAINED` takes the weights of
kvjax's recipe for the model it meets: the CPU-sized run the README measures (RECIPES),
trained the first time with a progress bar (minutes on 2 cores) into kvjax's cache
directory (`trained/<method>-<model>-<weights fingerprint>-<recipe hash>/` under
$KVJAX_CACHE, default ~/.cache/kvjax) and read from there afterwards. That folder is an
ordinary training run directory: a first use that is killed resumes where it stopped, with
the same losses. Weights too large to ship (for SmolLM2, Locret's retaining heads are 30M
parameters, Attention-Gate's gates 11M, LoCoCo's convolutions 2.6M) are thus reproduced
from the recipe. LoCoCo's convolution fixes its fused slots, so its recipe's weights serve
its memory size only (budget=64, read in prefill chunks of 128; other budgets are refused
naming it). `student(model)` does the same for a model a recipe turns `model` into
(STUDENT_RECIPES: X-EcoMLA's latent-attention student). Importing this module (done by
`import kvjax`) registers one calibration per method recipe.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
from typing import Any, Callable

import jax
from absl import logging

from kvjax import calibration, fileio
from kvjax.errors import KvjaxError
from kvjax.loading import assets
from kvjax.methods import trained
from kvjax.training import attention_gate as gate_training
from kvjax.training import data as data_lib
from kvjax.training import lococo as lococo_training
from kvjax.training import locret as locret_training
from kvjax.training import loop, optim, xecomla


# Bumped whenever a recipe's training code changes what it learns (labels, losses, data):
# runs trained by older code are then not reused.
RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One training run: `task(model, settings, data)` for `steps` AdamW steps (warmup a
  tenth, cosine decay, clipping at norm 1) of `batch_size` examples, from `seed`."""
  task: Callable
  settings: Any
  data: data_lib.DataSettings
  steps: int
  learning_rate: float
  batch_size: int = 1
  seed: int = 0

  def optimizer(self) -> optim.OptimizerSettings:
    return optim.OptimizerSettings(learning_rate=self.learning_rate,
                                   warmup_steps=self.steps // 10, total_steps=self.steps)

  def loop_settings(self, progress_bar: bool = True) -> loop.LoopSettings:
    """Everything else the loop is given: what shapes the weights comes from the recipe;
    two full checkpoints per run (a killed first use loses at most half of it)."""
    return loop.LoopSettings(batch_size=self.batch_size, seed=self.seed,
                             checkpoint_every=max(1, self.steps // 2), keep_checkpoints=1,
                             progress_bar=progress_bar)

  def digest(self) -> str:
    """A short hash of everything that shapes the weights (the code by RECIPE_VERSION)."""
    text = json.dumps({"version": RECIPE_VERSION, "kind": self.task.__module__,
                       "settings": dataclasses.asdict(self.settings),
                       "data": dataclasses.asdict(self.data), "steps": self.steps,
                       "batch_size": self.batch_size, "seed": self.seed,
                       "optimizer": dataclasses.asdict(self.optimizer())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# The runs the README measures on SmolLM2-135M (2 CPU cores): Locret 5.5 minutes,
# Attention-Gate 4.9 minutes, LoCoCo 18 minutes (memory 64, chunks of 128).
RECIPES = {
    "locret": Recipe(locret_training.task, locret_training.LocretSettings(),
                     data_lib.DataSettings(sequence_length=512), steps=150,
                     learning_rate=5e-4),
    "attention_gate": Recipe(gate_training.task, gate_training.AttentionGateSettings(),
                             data_lib.DataSettings(sequence_length=256), steps=100,
                             learning_rate=2e-4),
    "lococo": Recipe(lococo_training.task, lococo_training.LoCoCoSettings(),
                     data_lib.DataSettings(sequence_length=512), steps=100,
                     learning_rate=0.05),
}

# Recipes that turn the model they meet into another one (`student`), not a method's
# weights: X-EcoMLA's latent-attention student, 150 steps distilled from the model (the
# README's run, docs/results/trained/xecomla_smollm2.json: 14 minutes on 2 CPU cores).
STUDENT_RECIPES = {
    "xecomla": Recipe(xecomla.task, xecomla.XEcoMLASettings(),
                      data_lib.DataSettings(sequence_length=256, answer_tokens=32),
                      steps=150, learning_rate=1e-4),
}
_STUDENT_LOADERS = {"xecomla": xecomla.student}   # (run directory, model) -> the student
assert not RECIPES.keys() & STUDENT_RECIPES.keys(), "a recipe name must say what it trains"


def _recipe(kind: str) -> Recipe:
  recipe = RECIPES.get(kind) or STUDENT_RECIPES.get(kind)
  if recipe is None:
    raise KvjaxError(f"no training recipe for {kind!r}; recipes: "
                     f"{sorted(RECIPES) + sorted(STUDENT_RECIPES)}")
  return recipe


def run_dir(model, method: str, recipe: Recipe | None = None) -> pathlib.Path:
  """Where `method`'s recipe run for `model` lives (it may not exist yet)."""
  recipe = recipe or _recipe(method)
  name = (model.config.name or "model").replace("/", "_")
  return (assets.cache_dir() / "trained" /
          f"{method}-{name}-{calibration.model_fingerprint(model)}-{recipe.digest()}")


def is_trained(root: pathlib.Path, recipe: Recipe) -> bool:
  done = trained.steps(root)
  return bool(done) and done[-1] == recipe.steps


def ensure(model, method: str, recipe: Recipe | None = None,
           progress_bar: bool = True) -> pathlib.Path:
  """`method`'s recipe run directory for `model`, trained (or finished, when an earlier
  first use was interrupted) now if it is not complete. Processes on one machine that
  need the same run take turns: one trains, the others then read it."""
  recipe = recipe or _recipe(method)
  root = run_dir(model, method, recipe)
  if is_trained(root, recipe):
    return root
  if jax.process_count() > 1:
    # Each process would train its own copy into a directory the others may share.
    use = (f"pretrained.student(model, {method!r})" if method in STUDENT_RECIPES else
           f"{method}:checkpoint={trained.TRAINED}")
    raise KvjaxError(f"{method}'s recipe ({use}) is not trained yet for "
                     f"{model.config.name or 'this model'} ({root}); train it in one process "
                     f"first, e.g. kvjax.training.pretrained.ensure(model, {method!r})")
  with fileio.locked(root.parent / f".{root.name}.lock"):
    if is_trained(root, recipe):   # another process trained it while this one waited
      return root
    logging.warning("training %s's weights for %s on first use (%d steps of %d tokens) "
                    "into %s", method, model.config.name or "this model", recipe.steps,
                    recipe.data.sequence_length, root)
    loop.train(recipe.task(model, recipe.settings, recipe.data), root, recipe.steps,
               recipe.optimizer(), recipe.loop_settings(progress_bar))
  return root


def student(model, kind: str = "xecomla", progress_bar: bool = True):
  """`model` turned into `kind`'s student by kvjax's recipe (STUDENT_RECIPES), distilled
  from it on first use (`ensure`) and read from the run afterwards: for X-EcoMLA, the
  latent-attention model (`kvjax.training.xecomla.student`)."""
  if kind not in STUDENT_RECIPES:
    raise KvjaxError(f"no student recipe {kind!r}; students: {sorted(STUDENT_RECIPES)}")
  run = ensure(model, kind, STUDENT_RECIPES[kind], progress_bar=progress_bar)
  return _STUDENT_LOADERS[kind](run, model)


def _calibration(model, method: str):
  """What `trained.TrainedWeights.calibrated` takes for checkpoint=TRAINED."""
  return ensure(model, method), model.config, calibration.model_fingerprint(model)


for _method in RECIPES:
  calibration.CALIBRATIONS[trained.trained_calibration(_method)] = functools.partial(
      _calibration, method=_method)
