"""Periodic evaluation during training: when it runs, and that it measures the method or
student being trained (kvjax.training.evaluation)."""

import dataclasses
import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from checkpoints_conversion import orbax_io
from kvjax import training
from kvjax.errors import KvjaxError
from kvjax.training import attention_gate as gate_training
from kvjax.training import data as data_lib
from kvjax.training import evaluation
from kvjax.training import locret as locret_training
from kvjax.training import lococo as lococo_training
from kvjax.training import xecomla
from tests.test_training import ROOT, _env
from tests.tiny import tiny_chat_model

EVAL = evaluation.EvalSettings(samples=2, context_tokens=48, continuation_tokens=12,
                               compression_ratio=0.5, batch_size=2)
DATA = data_lib.DataSettings(sequence_length=32, answer_tokens=4, sources=("random",))


@pytest.fixture(scope="module")
def model(smollm2_tokenizer):
  return tiny_chat_model(smollm2_tokenizer)


def _train(task, workdir, steps, eval_every):
  optimizer = training.OptimizerSettings(learning_rate=1e-3, warmup_steps=0,
                                         total_steps=steps, schedule="constant")
  return training.train(task, workdir, steps, optimizer,
                        training.LoopSettings(checkpoint_every=steps, eval_every=eval_every,
                                              progress_bar=False))


def test_evaluation_runs_every_n_steps_and_at_the_last(model, tmp_path):
  task = locret_training.task(model, locret_training.LocretSettings(hidden=8), DATA, EVAL)
  result = _train(task, tmp_path / "run", 5, eval_every=2)
  evaluated = [h["step"] for h in result.history if "eval_kl" in h]
  assert evaluated == [2, 4, 5]
  for record in result.history:
    if "eval_kl" in record:
      assert record["eval_kl"] > 0 and 0 <= record["eval_top1"] <= 1
      assert math.isfinite(record["eval_perplexity"])
  quiet = _train(dataclasses.replace(task, evaluate=None), tmp_path / "quiet", 2, eval_every=1)
  assert not any("eval_kl" in h for h in quiet.history)


def test_method_evaluation_measures_the_compression(model):
  """Keeping every token costs nothing; keeping a tenth costs KL."""
  task = locret_training.task(model, locret_training.LocretSettings(hidden=8), DATA, EVAL)
  heads = task.init_params(jax.random.key(0))
  lossless = locret_training.task(model, locret_training.LocretSettings(hidden=8), DATA,
                                  dataclasses.replace(EVAL, compression_ratio=0.0))
  full = lossless.evaluate(heads)
  assert full["kl"] == pytest.approx(0.0, abs=1e-6) and full["top1"] == 1.0
  harsh = locret_training.task(model, locret_training.LocretSettings(hidden=8), DATA,
                               dataclasses.replace(EVAL, compression_ratio=0.9)).evaluate(heads)
  assert harsh["kl"] > 1e-3 and harsh["perplexity"] != full["perplexity"]


def test_gates_are_evaluated_without_a_ratio(model):
  settings = gate_training.AttentionGateSettings(gate_heads=2, gate_dim=8)
  task = gate_training.task(model, settings, DATA, EVAL)
  gates = task.init_params(jax.random.key(0))
  metrics = task.evaluate(gates)   # gates that keep everything at first
  assert metrics["kl"] == pytest.approx(0.0, abs=1e-6) and metrics["top1"] == 1.0


def test_student_evaluation_against_the_teacher(model):
  cfg = model.config
  exact = xecomla.task(model, xecomla.XEcoMLASettings(
      kv_rank=2 * cfg.num_kv_heads * cfg.head_dim, rope_dim=0, rope="rebuilt"), DATA, EVAL)
  same = exact.evaluate(exact.init_params(None))
  assert same["kl"] == pytest.approx(0.0, abs=1e-5) and same["top1"] == 1.0
  low = xecomla.task(model, xecomla.XEcoMLASettings(kv_rank=8, rope_dim=4), DATA, EVAL)
  worse = low.evaluate(low.init_params(None))
  assert worse["kl"] > 1e-3 and np.isfinite(worse["perplexity"])


def test_bad_evaluation_settings():
  with pytest.raises(KvjaxError, match=r"eval_every"):
    training.LoopSettings(eval_every=-1)
  with pytest.raises(KvjaxError, match=r"eval compression_ratio"):
    evaluation.EvalSettings(compression_ratio=1.0)


def test_lococo_is_evaluated_at_its_memory_size_in_chunks(model):
  """The weights fix LoCoCo's budget: a memory larger than the windows' contexts keeps
  them whole (KL 0); a smaller one, read in chunks of the block size, costs KL."""
  roomy = lococo_training.task(model, lococo_training.LoCoCoSettings(
      memory_size=64, block_size=16, kernel_size=3), DATA, EVAL)
  whole = roomy.evaluate(roomy.init_params(jax.random.key(0)))
  assert whole["kl"] == pytest.approx(0.0, abs=1e-6) and whole["top1"] == 1.0
  tight = lococo_training.task(model, lococo_training.LoCoCoSettings(
      memory_size=16, block_size=16, kernel_size=3), DATA, EVAL)
  fused = tight.evaluate(tight.init_params(jax.random.key(0)))
  assert fused["kl"] > 1e-3


def test_compare_trained_script(model, tmp_path):
  """scripts/compare_trained.py: every method at one budget on the same windows, the full
  cache first (KL 0), JSON written."""
  model_dir = orbax_io.save(model, tmp_path / "model")
  out = subprocess.run(
      [sys.executable, str(ROOT / "scripts" / "compare_trained.py"), f"--model={model_dir}",
       "--methods=streaming_llm,snapkv", "--budget=16", "--prefill_chunk_size=16",
       "--samples=2", "--context=48", "--continuation=8", "--batch_size=2",
       f"--out={tmp_path / 'out.json'}"],
      env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  results = json.loads((tmp_path / "out.json").read_text())["results"]
  assert list(results) == ["full", "streaming_llm", "snapkv"]
  assert results["full"]["kl"] == pytest.approx(0.0, abs=1e-6)
  assert results["snapkv"]["kl"] > 0 and results["streaming_llm"]["kl"] > 0
  assert results["snapkv"]["context_cache_bytes"] < results["full"]["context_cache_bytes"]
