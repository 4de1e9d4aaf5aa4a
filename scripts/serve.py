"""Serve a model over an OpenAI-compatible HTTP API (continuous batching under a cache bound).

  python scripts/serve.py --model=smollm2-135m --method=snapkv --budget=128 \
      --max_prompt_tokens=1024 --max_new_tokens=128 --memory_budget_mib=256 --port=8000
  curl localhost:8000/v1/completions -d '{"prompt": "The capital of France is",
                                          "max_tokens": 8}'
"""

import time

from absl import flags, logging

from kvjax import cli, systems

FLAGS = flags.FLAGS
cli.define_model_flags()
cli.define_method_flags()
flags.DEFINE_string("host", "127.0.0.1", "Address to bind (localhost by default: no auth).")
flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).")
flags.DEFINE_integer("max_prompt_tokens", 1024, "Longest prompt admitted, in tokens.")
flags.DEFINE_integer("max_new_tokens", 128, "Most tokens a request may ask for.")
flags.DEFINE_integer("memory_budget_mib", None, "Bound on the batch cache, in MiB.")
flags.DEFINE_integer("max_rows", None, "Or: rows decoded together.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature of every request; 0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass of every request.")
flags.DEFINE_integer("seed", 0, "A request without a `seed` samples with this plus its id.")
flags.DEFINE_integer("prefix_cache_mib", None, "Share prompt prefixes (a system prompt, "
                     "few-shot examples): keep up to this many MiB of prefilled prefixes "
                     "(full cache only; default: off).")
flags.DEFINE_integer("min_prefix_tokens", 16, "With --prefix_cache_mib: the shortest prefix "
                     "shared.")


def main(argv):
  del argv
  model = cli.load_model()
  server = systems.Server(
      model, max_prompt_tokens=FLAGS.max_prompt_tokens, max_new_tokens=FLAGS.max_new_tokens,
      memory_budget_bytes=None if FLAGS.memory_budget_mib is None
      else FLAGS.memory_budget_mib << 20,
      max_rows=FLAGS.max_rows, method=cli.method_from_flags(), budget=FLAGS.budget,
      temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed,
      prefix_cache_bytes=None if FLAGS.prefix_cache_mib is None
      else FLAGS.prefix_cache_mib << 20, min_prefix_tokens=FLAGS.min_prefix_tokens)
  with systems.serve_http(server, FLAGS.host, FLAGS.port) as endpoint:
    logging.info("serving %s (%d rows, %s) at %s/v1", FLAGS.model, server.rows,
                 server.method.label, endpoint.url)
    try:
      while True:
        time.sleep(3600)
    except KeyboardInterrupt:
      pass


if __name__ == "__main__":
  cli.run(main)
