"""Evaluation sweep: model x methods x compression ratios x tasks x lengths x modes.

  python scripts/evaluate.py --out_dir=/tmp/eval --methods=full,snapkv,knorm \
      --ratios=0.5,0.75,0.9 --tasks=niah_single_2,vt --lengths=1024,2048 --num_examples=10
  python scripts/evaluate.py --out_dir=/tmp/eval --tasks=fidelity --lengths=1024

Writes out_dir/examples.jsonl (one record per example, appended batch by batch),
summary.json (one cell per model/task/length/mode/method/ratio), results.md (tables) and
PNG plots. Rerunning with the same out_dir resumes: finished examples are not recomputed.
"""

import time

import jax
from absl import flags, logging

from kvjax import benchmarking, cli, sharding
from kvjax.evaluation import report, stall, sweep, tasks

FLAGS = flags.FLAGS
cli.define_model_flags()
flags.DEFINE_string("out_dir", None, "Directory for examples.jsonl, summary.json, results.md "
                    "and plots; an existing one is resumed.", required=True)
flags.DEFINE_list("methods", ["full", "streaming_llm", "snapkv"],
                  "Methods to evaluate ('full' is the uncompressed baseline).")
flags.DEFINE_list("ratios", ["0.5", "0.75", "0.9"], "Compression ratios of every method.")
flags.DEFINE_list("tasks", ["niah_single_2"],
                  f"Tasks: {list(tasks.TASKS)}, conversations {list(tasks.CONVERSATION_TASKS)}"
                  f" and '{sweep.FIDELITY}' (perplexity/KL/top-1 on the essays).")
flags.DEFINE_list("lengths", ["1024"], "Context lengths in model tokens.")
flags.DEFINE_list("modes", ["query_agnostic"], f"Of {list(sweep.MODES)}: query_agnostic "
                  f"compresses the context before the question is seen.")
flags.DEFINE_integer("num_examples", 10, "Examples per task and length.")
flags.DEFINE_integer("batch_size", 4, "Examples prefilled together.")
flags.DEFINE_integer("seed", 0, "Seed of the task generators.")
flags.DEFINE_integer("turns", 3, "Questions per multi-turn conversation.")
flags.DEFINE_integer("max_new_tokens", None, "Answer length (default: per task).")
flags.DEFINE_integer("continuation_tokens", 128, "Fidelity: tokens scored after the context.")
flags.DEFINE_string("title", None, "Heading of results.md.")
flags.DEFINE_bool("examples_per_process", False,
                  "In a multi-process run: each process holds the whole model on its own "
                  "devices (--mesh is then a mesh of one process's devices) and evaluates "
                  "its share of the batches; process 0 gathers the records and writes. "
                  "Off: one mesh over every process's devices runs each batch together.")
flags.DEFINE_integer("restart_on_stall_seconds", 300,
                     "Re-execute this command (resuming from the finished batches) when the "
                     "process has used no CPU for this long: a workaround for XLA:CPU stalls "
                     "(kvjax.evaluation.stall). 0: off.", lower_bound=0)


def _ratios(values):
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise sweep.SweepError(f"--ratios={','.join(values)!r}: expected numbers") from None


def main(argv):
  del argv
  config = sweep.SweepConfig(
      methods=tuple(FLAGS.methods), ratios=_ratios(FLAGS.ratios), tasks=tuple(FLAGS.tasks),
      lengths=tuple(benchmarking.parse_sizes(FLAGS.lengths, "--lengths")),
      modes=tuple(FLAGS.modes), num_examples=FLAGS.num_examples, batch_size=FLAGS.batch_size,
      seed=FLAGS.seed, turns=FLAGS.turns, max_new_tokens=FLAGS.max_new_tokens,
      continuation_tokens=FLAGS.continuation_tokens)
  config.validate()  # before the model loads
  model = cli.load_model(multiprocess=True, local=FLAGS.examples_per_process)
  from tqdm import tqdm
  if stall.restarts():
    logging.warning("restarted %d times after stalls; resuming", stall.restarts())
  if jax.process_count() > 1:
    # A process restarting alone would leave the others waiting in a collective.
    logging.warning("--restart_on_stall_seconds is off in a multi-process run")
  else:
    stall.restart_on_stall(FLAGS.restart_on_stall_seconds)
  start = time.perf_counter()
  with tqdm(total=sweep.units(config), unit="batch", dynamic_ncols=True) as bar:
    def progress(done, description):
      bar.set_description(description)
      bar.update(done - bar.n)
    summary = sweep.run_sweep(model, FLAGS.model, config, FLAGS.out_dir, progress)
  logging.info("sweep took %.0f s this run", time.perf_counter() - start)
  if not sharding.is_primary():
    return   # several processes ran the sweep; process 0 writes the report
  paths = report.write_report(summary["cells"], FLAGS.out_dir,
                              title=FLAGS.title or f"kvjax evaluation: {FLAGS.model}")
  for name, path in paths.items():
    print(f"{name}: {path}")
  for what, why in summary["skipped"].items():
    print(f"skipped {what}: {why}")


if __name__ == "__main__":
  cli.run(main)
