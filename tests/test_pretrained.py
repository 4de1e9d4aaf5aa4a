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
from kvjax.methods import LoCoCo, Locret
from kvjax.methods import trained
from kvjax.training import data as data_lib
from kvjax.training import lococo as lococo_training
from kvjax.training import locret as locret_training
from kvjax.training import loop, pretrained
from tests.tiny import random_prompts, tiny_model

TINY = pretrained.Recipe(
    locret_training.task, locret_training.LocretSettings(hidden=16),
    data_lib.DataSettings(sequence_length=48, answer_tokens=8, sources=("random",)),
    steps=4, learning_rate=3e-3)
QUIET = TINY.loop_settings(progress_bar=False)


@pytest.fixture
def first_uses(monkeypatch, tmp_path):
  """The tiny recipe in place of Locret's, trained into a fresh cache directory, and every
  first use's `loop.train` call recorded."""
  monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setitem(pretrained.RECIPES, "locret", TINY)
  runs, train = [], pretrained.loop.train

  def recorded(task, workdir, steps, optimizer, settings, **kwargs):
    result = train(task, workdir, steps, optimizer,
                   dataclasses.replace(settings, progress_bar=False), **kwargs)
    runs.append(result)
    return result
  monkeypatch.setattr(pretrained.loop, "train", recorded)
  return runs


def _direct_run(model, path):
  """The recipe trained by hand, the way scripts/train.py would."""
  training.train(TINY.task(model, TINY.settings, TINY.data), path, TINY.steps,
                 TINY.optimizer(), QUIET)
  return Locret.from_checkpoint(path)


def test_first_use_trains_the_recipe_once_then_reads_it(first_uses, tmp_path):
  model = tiny_model(seed=1)
  prompts = random_prompts([48, 40], seed=3)
  args = dict(budget=16, max_new_tokens=4, prefill_chunk_size=16)
  out = kvjax.generate(model, prompts, method="locret:checkpoint=trained:stabilizers=8:local=4",
                       **args)
  root = pretrained.run_dir(model, "locret")
  assert root.parent == tmp_path / "cache" / "trained"
  assert trained.steps(root)[-1] == TINY.steps and pretrained.is_trained(root, TINY)
  assert len(first_uses) == 1 and first_uses[0].resumed_from is None
  # The weights are the recipe's run: the same parameters as training it by hand.
  by_hand = _direct_run(model, tmp_path / "by_hand")
  for name, value in by_hand.weights().items():
    np.testing.assert_array_equal(Locret.from_checkpoint(root).weights()[name], value)
  same = kvjax.generate(model, prompts, method=dataclasses.replace(by_hand, stabilizers=8,
                                                                   local=4), **args)
  assert out.token_ids == same.token_ids
  # A second use reads the run: nothing is trained again.
  again = kvjax.generate(model, prompts, method="locret:checkpoint=trained:stabilizers=8:"
                         "local=4", **args)
  assert again.token_ids == out.token_ids and len(first_uses) == 1
  # Other weights (same architecture and name), or another recipe, get their own run.
  assert pretrained.run_dir(tiny_model(seed=2), "locret") != root
  for change in (dict(steps=5), dict(learning_rate=1e-3), dict(seed=1), dict(batch_size=2),
                 dict(settings=locret_training.LocretSettings(hidden=8))):
    assert pretrained.run_dir(model, "locret", dataclasses.replace(TINY, **change)) != root


def test_an_interrupted_first_use_finishes_the_same_run(first_uses, tmp_path):
  model = tiny_model(seed=1)
  root = pretrained.run_dir(model, "locret")
  training.train(TINY.task(model, TINY.settings, TINY.data), root, TINY.steps,
                 TINY.optimizer(), QUIET, stop_after=2)
  assert trained.steps(root)[-1] == 2 and not pretrained.is_trained(root, TINY)
  bound = training.load_method("trained", model)
  assert bound.checkpoint == str(root / str(TINY.steps))
  assert [r.resumed_from for r in first_uses] == [2]   # continued, not started again
  history = (root / loop.HISTORY_FILE).read_text()
  by_hand = _direct_run(model, tmp_path / "by_hand")
  assert history == (tmp_path / "by_hand" / loop.HISTORY_FILE).read_text()
  for name, value in by_hand.weights().items():
    np.testing.assert_array_equal(bound.weights()[name], value)


def test_what_cannot_be_trained_on_first_use_is_refused(first_uses, tmp_path, monkeypatch):
  with monkeypatch.context() as patched:   # a trained method without a recipe
    patched.setattr(LoCoCo, "TRAINS_ON_FIRST_USE", False)
    with pytest.raises(MethodError, match="lococo checkpoint='trained': kvjax has no recipe"):
      kvjax.methods.get("lococo:checkpoint=trained")
  method = kvjax.methods.get("locret:checkpoint=trained")
  with pytest.raises(MethodError, match="has its weights once it meets a model"):
    method.weights()
  with monkeypatch.context() as patched:
    patched.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(KvjaxError, match="not trained yet .* train it in one process first"):
      calibration.bind(method, tiny_model(seed=1))
  # A directory named like the keyword: the user says which one is meant.
  monkeypatch.chdir(tmp_path)
  (tmp_path / "trained").mkdir()
  with pytest.raises(MethodError, match=r"\./trained exists too: .* checkpoint=\./trained"):
    kvjax.methods.get("locret:checkpoint=trained")
  with pytest.raises(KvjaxError, match="no training recipe for 'h2o'"):
    pretrained.ensure(tiny_model(seed=1), "h2o")
  assert first_uses == []   # nothing was trained


def test_lococos_recipe_serves_its_memory_size_and_refuses_other_budgets(
    first_uses, tmp_path, monkeypatch):
  """LoCoCo's recipe weights fuse into the slots of the recipe's memory size: at that
  budget they are the recipe's run (the tokens of training it by hand), and another
  budget is refused naming the one that works."""
  memory, block = 12, 16
  recipe = pretrained.Recipe(
      lococo_training.task, lococo_training.LoCoCoSettings(memory_size=memory,
                                                           block_size=block, kernel_size=3),
      data_lib.DataSettings(sequence_length=48, answer_tokens=8, sources=("random",)),
      steps=3, learning_rate=1e-2)
  monkeypatch.setitem(pretrained.RECIPES, "lococo", recipe)
  model = tiny_model(seed=1)
  prompts = random_prompts([48, 40], seed=3)
  args = dict(max_new_tokens=4, prefill_chunk_size=block)
  out = kvjax.generate(model, prompts, method="lococo:checkpoint=trained", budget=memory,
                       **args)
  assert len(first_uses) == 1
  root = pretrained.run_dir(model, "lococo")
  training.train(recipe.task(model, recipe.settings, recipe.data), tmp_path / "by_hand",
                 recipe.steps, recipe.optimizer(), recipe.loop_settings(progress_bar=False))
  by_hand = LoCoCo.from_checkpoint(tmp_path / "by_hand")
  for name, value in by_hand.weights().items():
    np.testing.assert_array_equal(LoCoCo.from_checkpoint(root).weights()[name], value)
  assert out.token_ids == kvjax.generate(model, prompts, method=by_hand, budget=memory,
                                         **args).token_ids
  with pytest.raises(MethodError, match=f"use budget={memory}"):
    kvjax.generate(model, prompts, method="lococo:checkpoint=trained", budget=memory + 4,
                   **args)
  assert len(first_uses) == 1   # read, not trained again


def test_the_xecomla_student_is_distilled_on_first_use(first_uses, tmp_path, monkeypatch):
  """The X-EcoMLA student of a model: the recipe's run, distilled once (the parameters of
  distilling it by hand), then read."""
  from kvjax.config import LatentAttention
  from kvjax.model import to_flat_params
  from kvjax.training import xecomla
  recipe = pretrained.Recipe(
      xecomla.task, xecomla.XEcoMLASettings(kv_rank=16, rope_dim=4),
      data_lib.DataSettings(sequence_length=24, answer_tokens=4, sources=("random",)),
      steps=2, learning_rate=1e-3)
  monkeypatch.setitem(pretrained.STUDENT_RECIPES, "xecomla", recipe)
  model = tiny_model(seed=2)
  student = pretrained.student(model, progress_bar=False)
  assert student.config.latent == LatentAttention(kv_rank=16, rope_dim=4)
  assert len(first_uses) == 1
  training.train(recipe.task(model, recipe.settings, recipe.data), tmp_path / "by_hand",
                 recipe.steps, recipe.optimizer(), recipe.loop_settings(progress_bar=False))
  got = to_flat_params(student)
  for name, value in to_flat_params(xecomla.student(tmp_path / "by_hand", model)).items():
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(value))
  assert pretrained.run_dir(model, "xecomla").parent == tmp_path / "cache" / "trained"
  assert first_uses[0].resumed_from is None
  pretrained.student(model, progress_bar=False)
  assert len(first_uses) == 1   # read, not distilled again
  # Another recipe: its own run, distilled now and loaded instead of the first.
  other = dataclasses.replace(recipe, learning_rate=3e-3)
  monkeypatch.setitem(pretrained.STUDENT_RECIPES, "xecomla", other)
  changed = to_flat_params(pretrained.student(model, progress_bar=False))
  assert len(first_uses) == 2
  for name, value in first_uses[1].params.items():   # the distilled (attention) ones
    np.testing.assert_array_equal(np.asarray(changed[name]), np.asarray(value))
    assert not np.array_equal(np.asarray(changed[name]), np.asarray(got[name])), name
  with pytest.raises(KvjaxError, match="no student recipe 'locret'"):
    pretrained.student(model, "locret")


@pytest.mark.parametrize("method", sorted(pretrained.RECIPES))
def test_each_recipe_builds_its_methods_task(method):
  """Every shipped recipe's task trains that method (its checkpoints' kind), on the shipped
  settings; built for the tiny model on random data instead of the essays."""
  recipe = pretrained.RECIPES[method]
  task = recipe.task(tiny_model(seed=1), recipe.settings,
                     dataclasses.replace(recipe.data, sources=("random",)))
  assert task.meta["kind"] == method == kvjax.methods.get(method).KIND
  assert kvjax.methods.get(method).TRAINS_ON_FIRST_USE


def test_a_sweep_keys_recipe_records_by_the_weights_they_were_made_with(
    first_uses, tmp_path, monkeypatch, smollm2_tokenizer):
  """A sweep's checkpoint=trained records name the run they were bound to; resumed after
  the recipe changed (other weights under the same label), the sweep recomputes them and
  keeps the other methods' records."""
  from kvjax.evaluation import sweep
  from tests.tiny import tiny_chat_model
  model = tiny_chat_model(smollm2_tokenizer, max_position_embeddings=2048)
  label = "locret:stabilizers=8:local=4:checkpoint=trained"   # as the sweep names it
  # vt: no essays to fetch into the fixture's fresh cache directory.
  config = sweep.SweepConfig(methods=("full", label), ratios=(0.5,), tasks=("vt",),
                             lengths=(384,), num_examples=1, batch_size=1, max_new_tokens=3)
  out = tmp_path / "sweep"
  sweep.run_sweep(model, "tiny", config, out)
  run = pretrained.run_dir(model, "locret").name
  records = sweep.read_records(out / "examples.jsonl")
  assert {r["method"]: r.get("weights") for r in records} == {"full": None,
                                                              label: f"{run}/{TINY.steps}"}
  # The same recipe again: everything is reused.
  sweep.run_sweep(model, "tiny", config, out)
  assert len(sweep.read_records(out / "examples.jsonl")) == 2 and len(first_uses) == 1
  # Another recipe: its weights are trained and only the trained method's example re-run.
  monkeypatch.setitem(pretrained.RECIPES, "locret", dataclasses.replace(TINY, steps=5))
  summary = sweep.run_sweep(model, "tiny", config, out)
  new = sweep.read_records(out / "examples.jsonl")[2:]
  assert len(first_uses) == 2 and [r["method"] for r in new] == [label]
  assert new[0]["weights"] == f"{pretrained.run_dir(model, 'locret').name}/5" != records[1][
      "weights"]
  assert {c["method"]: c["examples"] for c in summary["cells"]} == {"full": 1, label: 1}
  assert summary["weights"] == {label: new[0]["weights"]}
  # The old weights' record alone makes no cell under the new weights.
  assert [c["method"] for c in sweep.summarize(records, config, "tiny", summary["weights"])[
      "cells"]] == ["full"]
  # Processes that bound other weights (another kvjax or cache) would key other batches.
  bound = summary["weights"]
  monkeypatch.setattr(sweep.distributed, "broadcast_from_primary",
                      lambda value: {label: "other/1"} if value == bound else value)
  with pytest.raises(sweep.SweepError, match="process 0 others"):
    sweep.run_sweep(model, "tiny", config, out)
