"""Several processes, one mesh (kvjax.sharding.distributed): two local processes with two
CPU devices each, talking over localhost, give the tokens and scores of one process; the
CLIs join such a run from flags, and only process 0 writes; bad settings are refused by
name before anything is started."""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

import kvjax
from kvjax import sharding
from kvjax.evaluation import sweep
from kvjax.model import to_flat_params
from kvjax.sharding import distributed
from multiprocess_cases import (CONTINUATIONS, PROMPTS, SWEEP, TEXT_CASE, TEXT_PROMPTS, cases,
                                 sweep_model, training_run)
from tiny import tiny_model

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
ENV_NAMES = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
             distributed.ENV_PROCESS_ID)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _other_xla_flags() -> list[str]:
  """The run's XLA flags (conftest's) but the device count."""
  return [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]


def _env(devices_per_process: int = 2) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
  env.update(JAX_PLATFORMS="cpu", KVJAX_COMPILATION_CACHE="0",
             XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices_per_process}",
                                 *_other_xla_flags()]),
             PYTHONPATH=os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")]))
  return env


def _run_processes(commands, timeout=420):
  """Starts every command at once (they wait for each other at the coordinator) and
  returns their CompletedProcess-like (returncode, stderr) pairs."""
  procs = [subprocess.Popen(c, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for c in commands]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, err) for p, (_, err) in zip(procs, outs)]


def _same_cells(got, want, process, count=6):
  assert len(got) == len(want) == count
  for a, b in zip(want, got):
    timing = ("seconds", "metrics")
    assert {k: v for k, v in b.items() if k not in timing} == pytest.approx(
        {k: v for k, v in a.items() if k not in timing}), (process, a["task"], a["method"])
    assert b["metrics"] == pytest.approx(a["metrics"], rel=1e-4, abs=1e-5)


def test_two_processes_generate_score_and_sweep_like_one(smollm2_tokenizer, tmp_path):
  model = tiny_model()
  want = {name: kvjax.generate(model, PROMPTS, method=method, max_new_tokens=6,
                               **kwargs).token_ids for name, (method, kwargs) in cases().items()}
  want_scores = kvjax.score(model, PROMPTS, CONTINUATIONS)
  want_text = kvjax.generate(sweep_model(smollm2_tokenizer), TEXT_PROMPTS, method=TEXT_CASE[0],
                             max_new_tokens=4, **TEXT_CASE[1]).token_ids
  want_losses = training_run(tiny_model(seed=4), tmp_path / "one_process_training")
  want_cells = sweep.run_sweep(sweep_model(smollm2_tokenizer), "tiny", SWEEP,
                               tmp_path / "one_process")["cells"]
  smollm2_tokenizer.save(tmp_path / "tokenizer")
  address = f"localhost:{_free_port()}"
  outs = [tmp_path / f"process_{i}.json" for i in range(2)]
  # Each process gets its own sweep folder (as on hosts without a shared disk).
  sweeps = [tmp_path / f"sweep_{i}" for i in range(2)]
  runs = _run_processes([[sys.executable, os.path.join(TESTS, "multiprocess_worker.py"),
                          address, "2", str(i), str(outs[i]), str(tmp_path / "tokenizer"),
                          str(sweeps[i])] for i in range(2)])
  for code, err in runs:
    assert code == 0, err[-3000:]
  for i, out in enumerate(outs):
    got = json.loads(out.read_text())
    # The mesh really spans both processes: 4 devices, 2 of them this process's.
    assert (got["process_count"], got["device_count"], got["local_device_count"]) == (2, 4, 2)
    assert got["primary"] == (i == 0)
    assert "covers 2 of the 4 devices of a 2-process run" in got["small_mesh_error"]
    for name in want:
      assert got[name] == want[name], (i, name)
    assert got["text_case"] == want_text, i
    for a, b in zip(want_scores, got["score"]):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    # The sweep: both processes return process 0's cells, equal to one process's.
    _same_cells(got["sweep"], want_cells, i)
    assert got["resumed"] == got["sweep"] and got["resumed_batches"] == 0
    # Examples per process: the same cells, each process having run its share alone.
    assert got["per_process_tasks"] == ([["niah_single_2", "fidelity"], ["multiturn_niah"]][i])
    _same_cells(got["per_process_sweep"], want_cells, i)
    assert got["per_process_resumed"] == got["per_process_sweep"]
    assert got["per_process_resumed_tasks"] == []
    assert got["per_process_records"] == (12 if i == 0 else 0)
    assert got["failure"].startswith("process 1: multiturn_niah 384 query_agnostic: "
                                     "KvjaxError: boom"), got["failure"]
    assert got["failure_records"] == (4 if i == 0 else 0)
    # Training: the one-process losses, also across the restart.
    np.testing.assert_allclose(got["training_first"], want_losses[:2], rtol=1e-5)
    np.testing.assert_allclose(got["training"], want_losses, rtol=1e-5)
  # One checkpoint from both processes' shards, loadable in one process, nothing left over.
  saved = tmp_path / "saved_model"
  for i, out in enumerate(outs):
    got = json.loads(out.read_text())
    assert got["saved"] == got["saved_again"] == str(saved)
    assert "already exists" in got["exists_error"]
  loaded = kvjax.load(saved)
  for name, value in to_flat_params(model).items():
    np.testing.assert_array_equal(np.asarray(to_flat_params(loaded)[name]), np.asarray(value))
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".saved_model")) == []
  # Only process 0 wrote results.
  assert len((sweeps[0] / "examples.jsonl").read_text().splitlines()) == 12
  assert (sweeps[0] / "summary.json").is_file()
  assert not (sweeps[1] / "examples.jsonl").exists()
  assert not (sweeps[1] / "summary.json").exists()


def test_generate_script_joins_from_flags_and_only_process_0_writes(smollm2_tokenizer,
                                                                     tmp_path):
  from checkpoints_conversion import orbax_io
  from tiny import tiny_chat_model
  chat = tiny_chat_model(smollm2_tokenizer)
  path = orbax_io.save(chat, tmp_path / "tiny")
  prompts = ["Hello there", "Second prompt"]
  want = kvjax.generate(chat, prompts, max_new_tokens=4, chat_template=False).token_ids
  address = f"localhost:{_free_port()}"
  outs = [tmp_path / f"result_{i}.json" for i in range(2)]
  runs = _run_processes([[
      sys.executable, os.path.join(ROOT, "scripts", "generate.py"), f"--model={path}",
      *[f"--prompt={p}" for p in prompts], "--max_new_tokens=4", "--chat_template=off",
      "--mesh=data:2,model:2", f"--coordinator_address={address}", "--num_processes=2",
      f"--process_id={i}", f"--json_out={outs[i]}"] for i in range(2)])
  for code, err in runs:
    assert code == 0, err[-3000:]
  assert json.loads(outs[0].read_text())["token_ids"] == want
  assert not outs[1].exists()


def test_evaluate_script_splits_examples_between_processes(smollm2_tokenizer, tmp_path):
  """`scripts/evaluate.py --examples_per_process`: each process on its own two devices
  (--mesh=model:2 of them, no mesh over both), process 0 writing every record."""
  from checkpoints_conversion import orbax_io
  chat = sweep_model(smollm2_tokenizer)
  config = sweep.SweepConfig(methods=("full", "streaming_llm"), ratios=(0.5,),
                             tasks=("niah_single_2",), lengths=(384,), num_examples=2,
                             batch_size=1, max_new_tokens=4)
  path = orbax_io.save(chat, tmp_path / "tiny")
  want = sweep.run_sweep(chat, str(path), config, tmp_path / "one_process")["cells"]
  address = f"localhost:{_free_port()}"
  out_dirs = [tmp_path / f"sweep_{i}" for i in range(2)]
  runs = _run_processes([[
      sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), f"--model={path}",
      "--methods=full,streaming_llm", "--ratios=0.5", "--tasks=niah_single_2",
      "--lengths=384", "--num_examples=2", "--batch_size=1", "--max_new_tokens=4",
      "--mesh=model:2", "--examples_per_process", f"--out_dir={out_dirs[i]}",
      f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"]
      for i in range(2)])
  for code, err in runs:
    assert code == 0, err[-3000:]
  # Each process ran one of the two batches (one example each) alone.
  for i, (_, err) in enumerate(runs):
    ran = re.findall(r"process (\d) of 2: niah_single_2 384 query_agnostic, examples (\d)-", err)
    assert ran == [(str(i), str(i))], err[-3000:]
  got = json.loads((out_dirs[0] / "summary.json").read_text())["cells"]
  _same_cells(got, want, 0, count=2)
  records = [json.loads(line) for line in
             (out_dirs[0] / "examples.jsonl").read_text().splitlines()]
  assert sorted(r["example"] for r in records) == [0, 0, 1, 1]
  assert not (out_dirs[1] / "examples.jsonl").exists()


@pytest.fixture
def no_env(monkeypatch):
  for name in ENV_NAMES:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_no_coordinator_is_one_process(no_env):
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1, process_id=0) is False
  assert sharding.is_primary()


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_processes=2, process_id=0), "need a coordinator address"),
    (dict(coordinator_address="localhost"), "'localhost' must be host:port"),
    (dict(coordinator_address="localhost:0", num_processes=2, process_id=0), "port in"),
    (dict(coordinator_address="localhost:70000", num_processes=2, process_id=0), "port in"),
    (dict(coordinator_address=":1234", num_processes=2, process_id=0), "host:port"),
    (dict(coordinator_address="localhost:1234"), "needs num_processes and process_id"),
    (dict(coordinator_address="localhost:1234", num_processes=2), "got 2 and None"),
    (dict(coordinator_address="localhost:1234", num_processes=0, process_id=0),
     "num_processes=0 must be an integer >= 1"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2),
     r"process_id=2 must be an integer in \[0, 1\]"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=-1),
     r"process_id=-1 must be an integer in \[0, 1\]"),
    (dict(coordinator_address="localhost:1234", num_processes="2", process_id=0),
     "num_processes='2' must be an integer"),
])
def test_bad_settings_are_refused_by_name(no_env, kwargs, words):
  with pytest.raises(sharding.ShardingError, match=words):
    distributed.initialize(**kwargs)


def test_settings_come_from_the_environment(no_env):
  no_env.setenv(distributed.ENV_COORDINATOR, "example.org:99999")
  with pytest.raises(sharding.ShardingError, match="'example.org:99999' must be host:port"):
    distributed.initialize()
  no_env.setenv(distributed.ENV_COORDINATOR, "example.org:1234")
  no_env.setenv(distributed.ENV_NUM_PROCESSES, "two")
  with pytest.raises(sharding.ShardingError, match="KVJAX_NUM_PROCESSES='two' must be an "
                                                   "integer"):
    distributed.initialize()
  no_env.setenv(distributed.ENV_NUM_PROCESSES, "2")
  no_env.setenv(distributed.ENV_PROCESS_ID, "5")
  with pytest.raises(sharding.ShardingError,
                     match=r"process_id=5 must be an integer in \[0, 1\]"):
    distributed.initialize()


def test_host_array_reads_local_arrays_as_they_are():
  x = np.arange(6).reshape(2, 3)
  np.testing.assert_array_equal(distributed.host_array(x), x)
  placed = sharding.shard_model(tiny_model(), "data:2,model:4").placement.put_rows(x)
  np.testing.assert_array_equal(distributed.host_array(placed), x)


def test_script_refuses_a_bad_coordinator_before_loading(tmp_path):
  run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"),
                        "--model=/does/not/exist", "--prompt=hi",
                        "--mesh=data:2", "--coordinator_address=localhost",
                        "--num_processes=2", "--process_id=0"], env=_env(),
                       capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 2, run.stderr[-2000:]
  assert "error: coordinator address 'localhost' must be host:port" in run.stderr
  assert "Traceback" not in run.stderr
  # A run of one process joined through a coordinator still needs the mesh it shares.
  alone = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"),
                          "--model=/does/not/exist", "--prompt=hi",
                          f"--coordinator_address=localhost:{_free_port()}",
                          "--num_processes=1", "--process_id=0"], env=_env(),
                         capture_output=True, text=True, timeout=300)
  assert alone.returncode == 2, alone.stderr[-2000:]
  assert "error: a multi-process run (--coordinator_address) shares one mesh: give --mesh" in (
      alone.stderr)
  # Scripts that run in one process refuse the flags (and the variable) outright.
  for script, extra, env in (("benchmark.py", ["--coordinator_address=localhost:1234"], {}),
                             ("serve.py", [], {distributed.ENV_COORDINATOR: "localhost:1234"})):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script),
                          "--model=/does/not/exist", *extra], env={**_env(), **env},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, (script, run.stderr[-2000:])
    assert "error: this script runs in one process" in run.stderr, script
