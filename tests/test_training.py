"""The training harness: optimiser, data, loop, lossless kill-and-resume, the script."""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import training
from kvjax.errors import CheckpointError, KvjaxError
from kvjax.methods import trained
from kvjax.training import data as data_lib
from kvjax.training import locret as locret_training
from kvjax.training import optim
from tests.tiny import tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
RANDOM_DATA = data_lib.DataSettings(sequence_length=48, answer_tokens=8, sources=("random",))
QUIET = training.LoopSettings(batch_size=2, checkpoint_every=3, progress_bar=False)


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=1)


@pytest.fixture(scope="module")
def task(model):
  return locret_training.task(model, locret_training.LocretSettings(hidden=32), RANDOM_DATA)


def _params_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


# ----------------------------------------------------------------- optimiser

def test_warmup_then_cosine_schedule():
  settings = optim.OptimizerSettings(learning_rate=1e-3, warmup_steps=10, total_steps=110,
                                     end_factor=0.1)
  lr = optim.learning_rate_schedule(settings)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10, 60, 110)],
                             [0.0, 5e-4, 1e-3, 1e-4 + 0.9e-3 * 0.5, 1e-4], rtol=1e-5)
  linear = optim.learning_rate_schedule(dataclasses.replace(settings, schedule="linear"))
  np.testing.assert_allclose(float(linear(60)), 1e-3 - 0.5 * 0.9e-3, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"learning_rate": 0.0}, r"learning_rate=0.0 must be a finite number > 0"),
    ({"warmup_steps": 2000, "total_steps": 1000}, r"warmup_steps=2000 must be an integer in "
                                                  r"\[0, 1000\]"),
    ({"schedule": "step"}, r"schedule='step'; allowed: \['cosine', 'linear', 'constant'\]"),
    ({"clip_norm": -1.0}, r"clip_norm=-1.0 must be a finite number > 0"),
    ({"accumulation": 0}, r"accumulation=0 must be an integer >= 1"),
])
def test_bad_optimizer_settings(kwargs, match):
  with pytest.raises(KvjaxError, match=match):
    optim.OptimizerSettings(**kwargs)


# ----------------------------------------------------------------- data

def test_examples_are_a_pure_function_of_their_position():
  batch = data_lib.batch(RANDOM_DATA, 3, 4, vocab_size=256)
  assert batch["tokens"].shape == (4, 48) and batch["answer_index"].shape == (4, 8)
  again = data_lib.batch(RANDOM_DATA, 5, 1, vocab_size=256)
  np.testing.assert_array_equal(batch["tokens"][2], again["tokens"][0])
  np.testing.assert_array_equal(batch["context"][0], np.arange(48) < 40)
  np.testing.assert_array_equal(batch["answer_index"][0], np.arange(40, 48))
  other_seed = data_lib.batch(dataclasses.replace(RANDOM_DATA, seed=1), 3, 4, vocab_size=256)
  assert not np.array_equal(batch["tokens"], other_seed["tokens"])


def test_text_examples_from_the_essays_and_squad(smollm2_tokenizer):
  settings = data_lib.DataSettings(sequence_length=256, answer_tokens=16)
  essay, squad = (data_lib.example(settings, i, smollm2_tokenizer) for i in (0, 1))
  assert essay.mask.all() and essay.context.sum() == 240
  np.testing.assert_array_equal(essay.answer_index, np.arange(240, 256))
  assert squad.context.sum() > 150 and squad.mask.sum() <= 256   # packed with distractors
  answer = squad.tokens[squad.answer_index[squad.answer_index >= 0]]
  text = smollm2_tokenizer.decode(squad.tokens[squad.context].tolist())
  assert "\nQuestion: " in text and text.endswith("\nAnswer:")
  assert smollm2_tokenizer.decode(answer.tolist()).strip()
  again = data_lib.example(settings, 1, smollm2_tokenizer)
  np.testing.assert_array_equal(again.tokens, squad.tokens)


@pytest.mark.parametrize("kwargs, match", [
    ({"sources": ("essays", "wiki")}, r"sources=\('essays', 'wiki'\): allowed are"),
    ({"sequence_length": 16, "answer_tokens": 16}, r"answer_tokens=16 must be an integer"),
])
def test_bad_data_settings(kwargs, match):
  with pytest.raises(KvjaxError, match=match):
    data_lib.DataSettings(**kwargs)


def test_text_sources_need_a_tokenizer():
  with pytest.raises(KvjaxError, match="source 'essays' is text: the model has no tokenizer"):
    data_lib.example(data_lib.DataSettings(sequence_length=32, answer_tokens=4), 0)


# ----------------------------------------------------------------- the loop

def test_training_reduces_the_loss_on_a_fixed_batch(task, tmp_path):
  fixed = task.batch(0, 2)
  same_batch = dataclasses.replace(task, batch=lambda position, count: fixed)
  steps = 64
  opt = optim.OptimizerSettings(learning_rate=3e-3, total_steps=steps, schedule="constant")
  result = training.train(same_batch, tmp_path / "run", steps, opt,
                          dataclasses.replace(QUIET, checkpoint_every=steps))
  losses = [h["loss"] for h in result.history]
  assert len(losses) == steps and all(np.isfinite(losses))
  assert losses[-1] < 0.2 * losses[0], losses
  for name in ("smooth_l1", "smoothness", "top_overlap", "grad_norm", "learning_rate"):
    assert name in result.history[-1]
  # The heads' top 10% moves towards the labels' (the official code's printed "acc").
  assert result.history[-1]["top_overlap"] > 2 * result.history[0]["top_overlap"]


def test_kill_and_resume_equals_the_uninterrupted_run(task, tmp_path):
  """9 steps with checkpoints every 3: a run stopped after step 7 (its last checkpoint at
  6) and restarted gives the same losses and parameters, bit for bit."""
  opt = optim.OptimizerSettings(learning_rate=1e-2, warmup_steps=2, total_steps=9,
                                accumulation=2)
  whole = training.train(task, tmp_path / "whole", 9, opt, QUIET)
  stopped = training.train(task, tmp_path / "cut", 9, opt, QUIET, stop_after=7)
  assert len(stopped.history) == 7
  resumed = training.train(task, tmp_path / "cut", 9, opt, QUIET)
  assert resumed.resumed_from == 6 and resumed.examples == whole.examples == 9 * 2 * 2
  assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
  assert resumed.history == whole.history
  assert _params_equal(resumed.params, whole.params)
  saved, meta = trained.read(tmp_path / "cut")
  assert _params_equal(saved, whole.params) and meta["step"] == 9
  # A finished run resumed again has nothing left to do.
  again = training.train(task, tmp_path / "cut", 9, opt, QUIET)
  assert again.resumed_from == 9 and again.history == whole.history


def _noisy_task(width: int = 3):
  """A toy task whose loss draws noise from its key: a resume that lost the RNG state (the
  loop splits it every step) would log other losses."""
  def loss(params, frozen, batch, key):
    del frozen
    noise = jax.random.normal(key, (width,))
    return jnp.mean((params["w"] - batch["x"] + noise) ** 2), {}
  return training.Task(
      init_params=lambda key: {"w": jnp.zeros(width)}, loss=loss, frozen=None,
      batch=lambda position, count: {"x": (np.arange(count * width, dtype=np.float32)
                                           .reshape(count, width) + position) % 5},
      meta={"kind": "toy", "width": width})


def test_resume_restores_the_random_state(tmp_path):
  task = _noisy_task()
  opt = optim.OptimizerSettings(learning_rate=1e-1, total_steps=6)
  whole = training.train(task, tmp_path / "whole", 6, opt, QUIET)
  training.train(task, tmp_path / "cut", 6, opt, QUIET, stop_after=4)
  resumed = training.train(task, tmp_path / "cut", 6, opt, QUIET)
  assert resumed.resumed_from == 3
  assert resumed.history == whole.history
  assert _params_equal(resumed.params, whole.params)


def test_resuming_with_other_settings_is_refused(task, tmp_path):
  opt = optim.OptimizerSettings(learning_rate=1e-2, total_steps=3)
  training.train(task, tmp_path / "run", 3, opt, QUIET)
  with pytest.raises(CheckpointError, match=r"holds a run with other settings \(training: "
                                            r".*learning_rate.*0.01"):
    training.train(task, tmp_path / "run", 3, dataclasses.replace(opt, learning_rate=0.02),
                   QUIET)
  # Other parameter shapes: refused by the settings, before orbax reads arrays that do not fit.
  toy = tmp_path / "toy"
  training.train(_noisy_task(3), toy, 3, opt, QUIET)
  with pytest.raises(CheckpointError, match=r"other settings \(width: stored 3, now 5\)"):
    training.train(_noisy_task(5), toy, 3, opt, QUIET)


def test_a_run_trained_again_in_the_same_directory_is_read_afresh(tmp_path):
  """The reader caches by step folder; a deleted and retrained run writes the same folder
  names with other weights, which must not come back from the cache."""
  opt = optim.OptimizerSettings(learning_rate=1e-1, total_steps=3)
  training.train(_noisy_task(), tmp_path / "run", 3, opt, QUIET)
  first, _ = trained.read(tmp_path / "run")
  assert not first["w"].flags.writeable, "shared cached arrays are read-only"
  shutil.rmtree(tmp_path / "run")
  time.sleep(0.01)
  training.train(_noisy_task(), tmp_path / "run", 3,
                 dataclasses.replace(opt, learning_rate=0.5), QUIET)
  second, meta = trained.read(tmp_path / "run")
  assert meta["training"]["optimizer"]["learning_rate"] == 0.5
  assert not np.array_equal(first["w"], second["w"])


def test_accumulation_averages_micro_batches(task, tmp_path):
  """Two micro-batches of one example give the step one batch of two gives (the loss
  averages rows, the gradients are averaged): the same loss, metrics and gradient norm up
  to float rounding (Adam's normalisation would magnify that rounding in the weights)."""
  one = optim.OptimizerSettings(learning_rate=1e-2, total_steps=1)
  big = training.train(task, tmp_path / "big", 1, one, QUIET)
  micro = training.train(task, tmp_path / "micro", 1, dataclasses.replace(one, accumulation=2),
                         dataclasses.replace(QUIET, batch_size=1))
  assert big.examples == micro.examples == 2
  for name in ("loss", "smooth_l1", "smoothness", "grad_norm"):
    np.testing.assert_allclose(micro.history[0][name], big.history[0][name], rtol=1e-5)


def test_steps_must_match_the_schedule(task, tmp_path):
  with pytest.raises(KvjaxError, match="total_steps=5 must equal steps=3"):
    training.train(task, tmp_path / "run", 3, optim.OptimizerSettings(total_steps=5), QUIET)


# ----------------------------------------------------------------- the script

def _script(workdir, model_dir, steps, *extra):
  return [sys.executable, str(ROOT / "scripts" / "train.py"), f"--model={model_dir}",
          f"--workdir={workdir}", f"--steps={steps}", "--sources=random",
          "--sequence_length=40", "--answer_tokens=8", "--hidden=16", "--batch_size=2",
          "--checkpoint_every=2", "--warmup_steps=1", "--learning_rate=0.01",
          "--noprogress_bar", *extra]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", KVJAX_COMPILATION_CACHE="0")
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def test_train_script_killed_and_restarted_resumes_exactly(model, tmp_path):
  """scripts/train.py killed (SIGKILL) after its first checkpoint and run again with the
  same command ends with the losses and parameters of an uninterrupted run."""
  from checkpoints_conversion import orbax_io
  model_dir = orbax_io.save(model, tmp_path / "model")
  steps = 12
  whole = subprocess.run(_script(tmp_path / "whole", model_dir, steps), env=_env(),
                         capture_output=True, text=True, timeout=300)
  assert whole.returncode == 0, whole.stderr[-2000:]
  assert f"locret: {steps} steps" in whole.stdout
  killed_dir = tmp_path / "killed"
  process = subprocess.Popen(_script(killed_dir, model_dir, steps), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not trained.steps(killed_dir) and time.time() < deadline and process.poll() is None:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  done = trained.steps(killed_dir)
  assert done and done[-1] < steps, f"the kill came too late: {done}"
  again = subprocess.run(_script(killed_dir, model_dir, steps), env=_env(),
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "resumed from step" in again.stdout
  history = lambda d: json.loads((d / "history.json").read_text())["history"]
  assert history(killed_dir) == history(tmp_path / "whole")
  assert _params_equal(trained.read(killed_dir)[0], trained.read(tmp_path / "whole")[0])


def test_train_script_refuses_bad_flags(model, tmp_path):
  out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"),
                        f"--workdir={tmp_path / 'w'}", "--sources=wiki", "--model=nonexistent"],
                       env=_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stderr.startswith("error: "), out.stderr[-500:]
