"""Train a compression method's trainable parts on a frozen model.

  python scripts/train.py --model=smollm2-135m --method=locret --workdir=/tmp/locret \
      --steps=200 --sequence_length=512

Checkpoints go to --workdir every --checkpoint_every steps; killed and run again with the
same command, training continues from the latest one and logs the same losses. The result
loads with kvjax.methods.Locret.from_checkpoint(workdir) or --method=locret
--method_arg=checkpoint=WORKDIR in scripts/generate.py. --method=attention_gate trains
Attention-Gate's gates with in-context eviction toward --target_eviction (loaded with
kvjax.methods.AttentionGate.from_checkpoint(workdir) or attention_gate:checkpoint=WORKDIR).
"""

from absl import flags, logging

from kvjax import cli, training
from kvjax.training import attention_gate as gate_training
from kvjax.training import data as data_lib
from kvjax.training import locret as locret_training

FLAGS = flags.FLAGS
cli.define_model_flags()
flags.DEFINE_enum("method", "locret", ["locret", "attention_gate"], "The trainable method.")
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
flags.DEFINE_integer("checkpoint_every", 50, "Steps between checkpoints.")
flags.DEFINE_integer("keep_checkpoints", 2, "Checkpoints kept.")
flags.DEFINE_integer("log_every", 10, "Steps between log lines.")
flags.DEFINE_integer("seed", 0, "Seed of the data order and the initial weights.")
flags.DEFINE_bool("progress_bar", True, "Show a progress bar.")


def main(argv):
  del argv
  cli.check_output_path("--workdir", FLAGS.workdir, is_dir=True)
  logging.set_verbosity(logging.INFO)
  model = cli.load_model()
  data = data_lib.DataSettings(sequence_length=FLAGS.sequence_length,
                               answer_tokens=FLAGS.answer_tokens, sources=tuple(FLAGS.sources),
                               seed=FLAGS.seed)
  if FLAGS.method == "attention_gate":
    task = gate_training.task(model, gate_training.AttentionGateSettings(
        gate_heads=FLAGS.gate_heads, gate_dim=FLAGS.gate_dim,
        target_eviction=FLAGS.target_eviction, eviction_weight=FLAGS.eviction_weight), data)
  else:
    task = locret_training.task(model, locret_training.LocretSettings(hidden=FLAGS.hidden),
                                data)
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
                               progress_bar=FLAGS.progress_bar)
  result = training.train(task, FLAGS.workdir, FLAGS.steps, optimizer, loop)
  done = result.history[-1] if result.history else {}
  first = result.history[0]["loss"] if result.history else float("nan")
  print(f"[kvjax] {FLAGS.method}: {len(result.history)} steps, {result.examples} examples "
        f"x {FLAGS.sequence_length} tokens; loss {first:.4f} -> {done.get('loss', first):.4f}"
        f"; this process {result.seconds:.1f} s"
        + (f" (resumed from step {result.resumed_from})" if result.resumed_from else "")
        + (f"; eviction rate {done['eviction_rate']:.3f}, LM loss {done['lm_loss']:.4f}"
           if "eviction_rate" in done else ""))


if __name__ == "__main__":
  cli.run(main)
