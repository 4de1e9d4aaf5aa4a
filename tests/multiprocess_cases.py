"""What tests/test_multiprocess.py runs in one process and in two (shared by the test and
its worker processes)."""

import jax
import numpy as np

import kvjax
from kvjax.evaluation import sweep
from kvjax.methods.attention_gate import AttentionGate, GateWeights, init_gates
from tiny import random_prompts, tiny_chat_model, tiny_config

MESH = "data:2,model:2"      # 4 devices: 2 per process in the two-process run
PROMPTS = random_prompts([30, 41, 12, 25], seed=3)
CONTINUATIONS = random_prompts([5, 3, 4, 2], seed=5)
HALF = dict(compression_ratio=0.5)


def cases() -> dict:
  """{name: (method, generate kwargs)}; built when called (random gates touch a device,
  which a worker may only do after joining its run)."""
  gates = init_gates(tiny_config(), 2, 8, 0.0, jax.random.key(1))
  return {"full": (None, {}), "snapkv": ("snapkv", HALF), "adakv": ("adakv", HALF),
          "kivi": (kvjax.methods.get("kivi", bits=2, group_size=16, residual=16), {}),
          # Methods that read the cache back on the host after prefill (gathered from both
          # processes' shards): budgets, merges, pools, a draft's scores, trained gates.
          "d2o": ("d2o", HALF), "cake": ("cake", HALF), "mikv": ("mikv", HALF),
          "specpc": ("specpc", HALF),
          "attention_gate": (AttentionGate(gates=GateWeights(
              {name: np.asarray(value) for name, value in gates.items()})), {})}
# With a tokenizer: KVzip's repeat prompt rescoring the cache on the host.
TEXT_PROMPTS = [" ".join(f"Fact {i}: item {i} is word{i}." for i in range(n)) for n in (20, 9)]
TEXT_CASE = ("kvzip", HALF)
# A small sweep: a single-turn task, a conversation and fidelity, two variants.
SWEEP = sweep.SweepConfig(methods=("full", "streaming_llm"), ratios=(0.5,),
                          tasks=("niah_single_2", "multiturn_niah", "fidelity"),
                          lengths=(384,), num_examples=2, batch_size=2, max_new_tokens=4,
                          turns=2, continuation_tokens=16)


def sweep_model(tokenizer):
  return tiny_chat_model(tokenizer, max_position_embeddings=2048)


def training_run(model, workdir, stop_after=None):
  """Three steps of Locret's retaining heads on `model` (2 rows per step); the losses."""
  from kvjax import training
  from kvjax.training import data as data_lib
  from kvjax.training import locret as locret_training
  data = data_lib.DataSettings(sequence_length=32, answer_tokens=4, sources=("random",))
  optimizer = training.OptimizerSettings(learning_rate=1e-3, warmup_steps=0, total_steps=3,
                                         schedule="constant")
  task = locret_training.task(model, locret_training.LocretSettings(hidden=8), data)
  result = training.train(task, workdir, 3, optimizer,
                          training.LoopSettings(batch_size=2, checkpoint_every=2,
                                                progress_bar=False), stop_after=stop_after)
  return [h["loss"] for h in result.history]
