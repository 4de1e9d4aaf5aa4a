"""Train a compression method's trainable parts on a frozen model.

  python scripts/train.py --model=smollm2-135m --method=locret --workdir=/tmp/locret \
      --steps=200 --sequence_length=512

Checkpoints go to --workdir every --checkpoint_every steps; killed and run again with the
same command, training continues from the latest one and logs the same losses. The result
loads with kvjax.methods.Locret.from_checkpoint(workdir) or --method=locret
--method_arg=checkpoint=WORKDIR in scripts/generate.py. --method=attention_gate trains
Attention-Gate's gates with in-context eviction toward --target_eviction (loaded with
kvjax.methods.AttentionGate.from_checkpoint(workdir) or attention_gate:checkpoint=WORKDIR).
--method=lococo trains LoCoCo's convolutions and lambdas: each example is read in chunks of
--block_size through a memory of --memory_size slots per layer (loaded with
kvjax.methods.LoCoCo.from_checkpoint(workdir) or lococo:checkpoint=WORKDIR, at
budget=--memory_size). --method=xecomla upcycles the model into latent attention of rank
--kv_rank (+ --rope_dim rotary dimensions) and distils it from the original (the student
loads with kvjax.training.xecomla.student(workdir, model); --export_model writes it as a
kvjax checkpoint that kvjax.load and --model= read). --eval_every evaluates on held-out
essays during training (the method at --eval_ratio against the full cache; the student
against its teacher). --method=distill --student=PATH distils --model into any saved model of
its vocabulary, e.g. fewer KV heads from scripts/convert.py --kv_head_group (the student's
attention trained; --export_model writes it).
"""

import jax
from absl import flags, logging

from checkpoints_conversion import orbax_io
from kvjax import cli, sharding, training
from kvjax.errors import KvjaxError
from kvjax.training import attention_gate as gate_training
from kvjax.training import data as data_lib
from kvjax.training import locret as locret_training
from kvjax.training import distillation, evaluation
from kvjax.training import lococo as lococo_training
from kvjax.training import xecomla

FLAGS = flags.FLAGS
cli.define_model_flags()
flags.DEFINE_enum("method", "locret",
                  ["locret", "attention_gate", "lococo", "xecomla", "distill"],
                  "The trainable method (distill: --model distilled into --student).")
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, history.json).",
                    required=True)
flags.DEFINE_integer("steps", 200, "Optimiser steps.")
flags.DEFINE_integer("batch_size", 1, "Examples per micro-batch.")
flags.DEFINE_integer("accumulation", 1, "Micro-batches whose gradients make one step.")
flags.DEFINE_float("learning_rate", 5e-4, "Peak learning rate (AdamW).")
flags.DEFINE_integer("warmup_steps", None, "Linear warmup steps (default: a tenth of "
                     "--steps).")
flags.DEFINE_enum("schedule", "cosine", ["cosine", "linear", "constant"],
                  "Decay after the warmup.")
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay.")
flags.DEFINE_float("clip_norm", 1.0, "Global-norm gradient clipping (0: off).")
flags.DEFINE_float("clip_value", 0.0, "Element-wise gradient clipping (0: off; the "
                   "official Locret uses 0.5).")
flags.DEFINE_integer("sequence_length", 512, "Tokens per example (context + answer).")
flags.DEFINE_integer("answer_tokens", 64, "Answer tokens of an essay example.")
flags.DEFINE_list("sources", ["essays", "squad"], f"Data sources: {data_lib.SOURCES}.")
flags.DEFINE_integer("hidden", 1024, "Retaining heads' hidden width (locret).")
flags.DEFINE_integer("gate_heads", 4, "MHA' heads of each gate (attention_gate).")
flags.DEFINE_integer("gate_dim", 32, "MHA' head dimension of each gate (attention_gate).")
flags.DEFINE_float("target_eviction", 0.5, "Share of (layer, KV head, token) flags to evict "
                   "(attention_gate).")
flags.DEFINE_float("eviction_weight", 10.0, "Weight of the eviction loss (attention_gate).")
flags.DEFINE_integer("memory_size", 64, "Memory slots per layer and KV head, the budget "
                     "the weights serve (lococo).")
flags.DEFINE_integer("block_size", 128, "Tokens per chunk; --sequence_length holds several "
                     "(lococo).")
flags.DEFINE_float("hh_keep_rate", 0.5, "Share of the memory kept as heavy hitters; the rest "
                   "is fused (lococo).")
flags.DEFINE_integer("kernel_size", 21, "Width of the fusing convolution, odd (lococo).")
flags.DEFINE_integer("local_tokens", 0, "Newest tokens always kept among the heavy hitters "
                     "(lococo).")
flags.DEFINE_integer("kv_rank", 128, "Latent rank r_kv (xecomla).")
flags.DEFINE_integer("rope_dim", 32, "Rotary dimensions of the shared key, d_r (xecomla; 0 "
                     "with --rope=rebuilt).")
flags.DEFINE_enum("rope", "decoupled", ["decoupled", "rebuilt"], "Latent attention's RoPE "
                  "(xecomla; see kvjax.config.LatentAttention).")
flags.DEFINE_integer("query_rank", 0, "Low-rank query projection r_q, 0: full (xecomla).")
flags.DEFINE_enum("trainable", "attention", ["attention", "all"], "Student parameters "
                  "trained (xecomla).")
flags.DEFINE_string("export_model", None, "Write the trained student there as a kvjax "
                    "checkpoint (xecomla, distill).")
flags.DEFINE_string("student", None, "The student to distil --model into: any --model "
                    "source of the same vocabulary, e.g. scripts/convert.py --kv_head_group "
                    "output (distill).")
flags.DEFINE_integer("eval_every", 0, "Steps between held-out evaluations (0: none).")
flags.DEFINE_integer("eval_samples", 4, "Held-out essay windows per evaluation.")
flags.DEFINE_integer("eval_context", 512, "Context tokens of an evaluation window.")
flags.DEFINE_integer("eval_continuation", 64, "Scored continuation tokens of a window.")
flags.DEFINE_float("eval_ratio", 0.5, "Compression ratio of the evaluated method (lococo "
                   "runs at --memory_size in chunks of --block_size).")
flags.DEFINE_integer("checkpoint_every", 50, "Steps between checkpoints.")
flags.DEFINE_integer("keep_checkpoints", 2, "Checkpoints kept.")
flags.DEFINE_integer("log_every", 10, "Steps between log lines.")
flags.DEFINE_integer("seed", 0, "Seed of the data order and the initial weights.")
flags.DEFINE_bool("progress_bar", True, "Show a progress bar.")


def main(argv):
  del argv
  cli.check_output_path("--workdir", FLAGS.workdir, is_dir=True)
  logging.set_verbosity(logging.INFO)
  model = cli.load_model(multiprocess=True)
  if jax.process_count() > 1 and FLAGS.method in ("xecomla", "distill"):
    # Their students are built from host copies of the teacher's weights.
    raise KvjaxError(f"--method={FLAGS.method} trains in one process; multi-process training "
                     f"is for attention_gate, locret and lococo")
  data = data_lib.DataSettings(sequence_length=FLAGS.sequence_length,
                               answer_tokens=FLAGS.answer_tokens, sources=tuple(FLAGS.sources),
                               seed=FLAGS.seed)
  evaluate = None if not FLAGS.eval_every else evaluation.EvalSettings(
      samples=FLAGS.eval_samples, context_tokens=FLAGS.eval_context,
      continuation_tokens=FLAGS.eval_continuation, compression_ratio=FLAGS.eval_ratio)
  if FLAGS.method == "attention_gate":
    task = gate_training.task(model, gate_training.AttentionGateSettings(
        gate_heads=FLAGS.gate_heads, gate_dim=FLAGS.gate_dim,
        target_eviction=FLAGS.target_eviction, eviction_weight=FLAGS.eviction_weight), data,
        evaluate)
  elif FLAGS.method == "distill":
    if not FLAGS.student:
      raise KvjaxError("--method=distill needs --student=PATH (the model to train)")
    task = distillation.saved_student_task(model, FLAGS.student, FLAGS.trainable, data,
                                           evaluate)
  elif FLAGS.method == "xecomla":
    task = xecomla.task(model, xecomla.XEcoMLASettings(
        kv_rank=FLAGS.kv_rank, rope_dim=FLAGS.rope_dim, rope=FLAGS.rope,
        query_rank=FLAGS.query_rank or None, trainable=FLAGS.trainable), data, evaluate)
  elif FLAGS.method == "lococo":
    task = lococo_training.task(model, lococo_training.LoCoCoSettings(
        memory_size=FLAGS.memory_size, block_size=FLAGS.block_size,
        hh_keep_rate=FLAGS.hh_keep_rate, kernel_size=FLAGS.kernel_size,
        local=FLAGS.local_tokens), data, evaluate)
  else:
    task = locret_training.task(model, locret_training.LocretSettings(hidden=FLAGS.hidden),
                                data, evaluate)
  optimizer = training.OptimizerSettings(
      learning_rate=FLAGS.learning_rate,
      warmup_steps=FLAGS.steps // 10 if FLAGS.warmup_steps is None else FLAGS.warmup_steps,
      total_steps=FLAGS.steps, schedule=FLAGS.schedule, weight_decay=FLAGS.weight_decay,
      clip_norm=FLAGS.clip_norm or None, clip_value=FLAGS.clip_value or None,
      accumulation=FLAGS.accumulation)
  loop = training.LoopSettings(batch_size=FLAGS.batch_size,
                               checkpoint_every=FLAGS.checkpoint_every,
                               keep_checkpoints=FLAGS.keep_checkpoints,
                               log_every=FLAGS.log_every, seed=FLAGS.seed,
                               progress_bar=FLAGS.progress_bar, eval_every=FLAGS.eval_every)
  result = training.train(task, FLAGS.workdir, FLAGS.steps, optimizer, loop)
  if sharding.is_primary():   # several processes trained over one mesh: process 0 reports
    _report(result)
  if FLAGS.method in ("xecomla", "distill") and FLAGS.export_model:
    student = (xecomla.student(FLAGS.workdir, model) if FLAGS.method == "xecomla" else
               distillation.saved_student(FLAGS.workdir, model))
    path = orbax_io.save(student, FLAGS.export_model, overwrite=True)   # every process
    if sharding.is_primary():
      print(f"[kvjax] the student ({student.config.name}) is at {path}: --model={path}")


def _report(result) -> None:
  done = result.history[-1] if result.history else {}
  first = result.history[0]["loss"] if result.history else float("nan")
  print(f"[kvjax] {FLAGS.method}: {len(result.history)} steps, {result.examples} examples "
        f"x {FLAGS.sequence_length} tokens; loss {first:.4f} -> {done.get('loss', first):.4f}"
        f"; this process {result.seconds:.1f} s"
        + (f" (resumed from step {result.resumed_from})" if result.resumed_from else "")
        + (f"; eviction rate {done['eviction_rate']:.3f}, LM loss {done['lm_loss']:.4f}"
           if "eviction_rate" in done else "")
        + (f"; held out: perplexity {done['eval_perplexity']:.3f}, KL {done['eval_kl']:.4f}, "
           f"top-1 {done['eval_top1']:.3f}" if "eval_kl" in done else ""))


if __name__ == "__main__":
  cli.run(main)
