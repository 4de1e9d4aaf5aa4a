"""Generate text with kvjax from the command line.

  python scripts/generate.py --model=smollm2-135m --prompt="The capital of France is"
"""

import sys

from absl import flags

import kvjax
from kvjax import cli

FLAGS = flags.FLAGS
cli.define_model_flags()
cli.define_method_flags()
flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat the flag for a batch.",
                          required=True)
flags.DEFINE_multi_string("question", None, "Question(s) appended after the (compressed) "
                          "prompt, never compressed; one per prompt.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_multi_string("stop", None, "Stop string(s), repeatable. Backslash escapes are "
                          "read as in Python: --stop=\"\\n\" stops at a newline (\\t a tab, "
                          "\\\\ a backslash, \\xHH and \\uXXXX a character).")
flags.DEFINE_enum("chat_template", "auto", ["auto", "on", "off"],
                  "Apply the model's chat template (auto: when it has one).")
flags.DEFINE_bool("stream", True, "Print text as it is generated (single prompt only).")
flags.DEFINE_string("json_out", None, "Write {texts, token_ids, stats, method, config} here.")


def main(argv):
  del argv
  model = cli.load_model(multiprocess=True)
  prompts, questions = FLAGS.prompt, FLAGS.question
  single = len(prompts) == 1 and len(questions or [None]) == 1
  stream = None
  if FLAGS.stream and single:
    stream = lambda row, text: (sys.stdout.write(text), sys.stdout.flush())
  result = kvjax.generate(
      model, prompts[0] if len(prompts) == 1 else prompts,
      questions=questions[0] if questions and len(questions) == 1 else questions,
      method=cli.method_from_flags(), compression_ratio=FLAGS.compression_ratio,
      budget=FLAGS.budget, prefill_chunk_size=FLAGS.prefill_chunk_size,
      max_new_tokens=FLAGS.max_new_tokens,
      temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed,
      stop=[cli.unescape(s) for s in FLAGS.stop] if FLAGS.stop else None,
      stream=stream, chat_template={"auto": None, "on": True, "off": False}[FLAGS.chat_template])
  if stream is not None:
    print()
  else:
    for i, text in enumerate(result.texts):
      print(f"[{i}] {text}")
  print(cli.format_stats(result.stats))
  if FLAGS.json_out:
    cli.write_json(FLAGS.json_out, {
        "texts": result.texts, "token_ids": result.token_ids, "stats": result.stats,
        "method": result.stats["method"], "config": cli.run_config()})


if __name__ == "__main__":
  cli.run(main)
