"""One process of tests/test_multiprocess.py's two-process run: joins the run, shards a
tiny model over the mesh of both processes' devices and writes what generate and score
give, then runs the evaluation sweep on a tiny chat model (argv: coordinator address,
number of processes, this process's index, output file, tokenizer folder, sweep folder),
then again with each process holding the model on its own devices and running its own
examples."""

import json
import pathlib
import sys

from kvjax import sharding


def main(address: str, processes: int, index: int, out: str, tokenizer_dir: str,
         sweep_dir: str) -> None:
  sharding.initialize(address, processes, index)   # before anything touches a device
  import jax
  import kvjax
  from kvjax.evaluation import sweep
  from kvjax.loading.tokenizer import Tokenizer
  from multiprocess_cases import (CONTINUATIONS, MESH, PROMPTS, SWEEP, TEXT_CASE,
                                   TEXT_PROMPTS, cases, sweep_model)
  from tiny import tiny_model
  sharded = sharding.shard_model(tiny_model(), MESH)
  got = {"process_count": jax.process_count(), "device_count": jax.device_count(),
         "local_device_count": jax.local_device_count(), "primary": sharding.is_primary()}
  try:
    sharding.make_mesh("data:2")   # process 0's devices only
    got["small_mesh_error"] = None
  except sharding.ShardingError as error:
    got["small_mesh_error"] = str(error)
  for name, (method, kwargs) in cases().items():
    got[name] = kvjax.generate(sharded, PROMPTS, method=method, max_new_tokens=6,
                               **kwargs).token_ids
  got["score"] = [x.tolist() for x in kvjax.score(sharded, PROMPTS, CONTINUATIONS)]
  # Both processes save the sharded model into one folder beside the sweeps (one disk).
  from checkpoints_conversion import orbax_io
  saved = pathlib.Path(sweep_dir).parent / "saved_model"
  got["saved"] = str(orbax_io.save(sharded, saved))
  got["saved_again"] = str(orbax_io.save(sharded, saved, overwrite=True))
  try:
    orbax_io.save(sharded, saved)
    got["exists_error"] = None
  except kvjax.KvjaxError as error:
    got["exists_error"] = str(error)
  chat = sharding.shard_model(sweep_model(Tokenizer.load(tokenizer_dir)), MESH)
  got["text_case"] = kvjax.generate(chat, TEXT_PROMPTS, method=TEXT_CASE[0], max_new_tokens=4,
                                    **TEXT_CASE[1]).token_ids
  got["sweep"] = sweep.run_sweep(chat, "tiny", SWEEP, sweep_dir)["cells"]
  # Resumed: process 0's records say everything is done, also to process 1, whose own
  # folder holds nothing (were it to run a batch alone, the other would wait forever).
  calls = []
  real = sweep._run_batch
  sweep._run_batch = lambda *args: calls.append(1) or real(*args)
  got["resumed"] = sweep.run_sweep(chat, "tiny", SWEEP, sweep_dir)["cells"]
  got["resumed_batches"] = len(calls)
  # Examples per process: each holds the whole model on its own 2 devices and runs its
  # share of the batches (of the 3, process 0 the 1st and 3rd, process 1 the 2nd); process
  # 0 gathers every record and writes, into its folder.
  local = sharding.shard_model(sweep_model(Tokenizer.load(tokenizer_dir)),
                               sharding.make_mesh("model:2", jax.local_devices()))
  split_dir = pathlib.Path(sweep_dir + "_per_process")
  ran = []
  sweep._run_batch = lambda *args: ran.append(args[2]) or real(*args)
  got["per_process_sweep"] = sweep.run_sweep(local, "tiny", SWEEP, split_dir)["cells"]
  got["per_process_tasks"] = ran
  got["per_process_resumed"] = sweep.run_sweep(local, "tiny", SWEEP, split_dir)["cells"]
  got["per_process_resumed_tasks"] = ran[len(got["per_process_tasks"]):]
  got["per_process_records"] = (len((split_dir / "examples.jsonl").read_text().splitlines())
                                if (split_dir / "examples.jsonl").exists() else 0)
  # A batch failing on process 1 stops both processes after the turn, process 0's
  # records of it saved.
  failing = pathlib.Path(sweep_dir + "_failing")

  def fails_on_process_1(*args):
    if index == 1:
      raise kvjax.KvjaxError("boom")
    return real(*args)
  sweep._run_batch = fails_on_process_1
  try:
    sweep.run_sweep(local, "tiny", SWEEP, failing)
    got["failure"] = None
  except kvjax.KvjaxError as error:
    got["failure"] = str(error)
  got["failure_records"] = (len((failing / "examples.jsonl").read_text().splitlines())
                            if (failing / "examples.jsonl").exists() else 0)
  sweep._run_batch = real
  # Training over the mesh of both processes, killed after step 2 and resumed from its
  # checkpoint (one run folder on the shared disk).
  from multiprocess_cases import training_run
  trained = sharding.shard_model(tiny_model(seed=4), MESH)
  run = pathlib.Path(sweep_dir).parent / "training_run"
  got["training_first"] = training_run(trained, run, stop_after=2)
  got["training"] = training_run(trained, run)
  pathlib.Path(out).write_text(json.dumps(got))


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:7])
