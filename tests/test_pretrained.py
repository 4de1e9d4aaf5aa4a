"""Weights trained on first use (checkpoint=trained, kvjax.training.pretrained), with a tiny
recipe on the tiny model: what is trained is exactly the recipe's run, it is trained once,
an interrupted first use finishes the same run, and what cannot work is refused."""

import dataclasses

import jax
import numpy as np
import pytest

import kvjax
from kvjax import calibration, training
from kvjax.errors import KvjaxError, MethodError
from kvjax.methods import Locret
from kvjax.methods import trained
from kvjax.training import data as data_lib
from kvjax.training import locret as locret_training
from kvjax.training import loop, pretrained
from tests.tiny import random_prompts, tiny_model

TINY = pretrained.Recipe(
    locret_training.task, locret_training.LocretSettings(hidden=16),
    data_lib.DataSettings(sequence_length=48, answer_tokens=8, sources=("random",)),
    steps=4, learning_rate=3e-3)
QUIET = loop.LoopSettings(checkpoint_every=1, progress_bar=False)


@pytest.fixture
def recipe(monkeypatch, tmp_path):
  """The tiny recipe in place of Locret's, trained into a fresh cache directory."""
  monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setitem(pretrained.RECIPES, "locret", TINY)
  monkeypatch.setattr(pretrained.loop, "LoopSettings",
                      lambda **kwargs: dataclasses.replace(QUIET, **kwargs))
  return TINY


def _direct_run(model, path):
  """The recipe trained by hand, the way scripts/train.py would."""
  training.train(TINY.task(model, TINY.settings, TINY.data), path, TINY.steps,
                 TINY.optimizer(), QUIET)
  return Locret.from_checkpoint(path)


def test_first_use_trains_the_recipe_once_then_reads_it(recipe, tmp_path, monkeypatch):
  model = tiny_model(seed=1)
  prompts = random_prompts([48, 40], seed=3)
  args = dict(budget=16, max_new_tokens=4, prefill_chunk_size=16)
  out = kvjax.generate(model, prompts, method="locret:checkpoint=trained:stabilizers=8:local=4",
                       **args)
  root = pretrained.run_dir(model, "locret")
  assert root.parent == tmp_path / "cache" / "trained"
  assert trained.steps(root)[-1] == recipe.steps and pretrained.is_trained(root, recipe)
  # The weights are the recipe's run: the same parameters as training it by hand.
  by_hand = _direct_run(model, tmp_path / "by_hand")
  for name, value in by_hand.weights().items():
    np.testing.assert_array_equal(Locret.from_checkpoint(root).weights()[name], value)
  same = kvjax.generate(model, prompts, method=dataclasses.replace(by_hand, stabilizers=8,
                                                                   local=4), **args)
  assert out.token_ids == same.token_ids
  # A second use reads the run: nothing is trained again.
  monkeypatch.setattr(pretrained.loop, "train", lambda *a, **k: pytest.fail("trained again"))
  again = kvjax.generate(model, prompts, method="locret:checkpoint=trained:stabilizers=8:"
                         "local=4", **args)
  assert again.token_ids == out.token_ids
  # Other weights (same architecture and name) get their own run.
  assert pretrained.run_dir(tiny_model(seed=2), "locret") != root


def test_an_interrupted_first_use_finishes_the_same_run(recipe, tmp_path):
  model = tiny_model(seed=1)
  root = pretrained.run_dir(model, "locret")
  training.train(recipe.task(model, recipe.settings, recipe.data), root, recipe.steps,
                 recipe.optimizer(), QUIET, stop_after=2)
  assert trained.steps(root)[-1] == 2 and not pretrained.is_trained(root, recipe)
  bound = calibration.bind("locret:checkpoint=trained", model)
  assert bound.checkpoint == str(root / str(recipe.steps))
  history = (root / loop.HISTORY_FILE).read_text()
  by_hand = _direct_run(model, tmp_path / "by_hand")
  assert history == (tmp_path / "by_hand" / loop.HISTORY_FILE).read_text()
  for name, value in by_hand.weights().items():
    np.testing.assert_array_equal(bound.weights()[name], value)


def test_what_cannot_be_trained_on_first_use_is_refused(recipe, tmp_path, monkeypatch):
  with pytest.raises(MethodError, match="lococo checkpoint='trained': kvjax has no recipe"):
    kvjax.methods.get("lococo:checkpoint=trained")
  method = kvjax.methods.get("locret:checkpoint=trained")
  with pytest.raises(MethodError, match="has its weights once it meets a model"):
    method.weights()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(KvjaxError, match="not trained yet .* train it in one process first"):
    calibration.bind(method, tiny_model(seed=1))
  monkeypatch.undo()
  # A directory named like the keyword: the user says which one is meant.
  monkeypatch.chdir(tmp_path)
  (tmp_path / "trained").mkdir()
  with pytest.raises(MethodError, match=r"\./trained exists too: .* checkpoint=\./trained"):
    kvjax.methods.get("locret:checkpoint=trained")
  with pytest.raises(KvjaxError, match="no training recipe for 'lococo'"):
    pretrained.ensure(tiny_model(seed=1), "lococo")
