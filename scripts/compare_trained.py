"""A trained method against untrained baselines at the same budget, on held-out essays.

  python scripts/compare_trained.py --methods=lococo:checkpoint=/tmp/lococo,h2o,snapkv \
      --budget=64 --prefill_chunk_size=128 --out=docs/results/trained/lococo.json

Every method compresses the same essay windows' contexts (--context tokens) to --budget
tokens per layer and KV head, reading them in chunks of --prefill_chunk_size; the next
--continuation tokens are scored against the full cache with the evaluation suite's
fidelity metrics (perplexity, KL(full || compressed), top-1 agreement), plus each cache's
bytes. Methods that set their own budget (attention_gate) ignore --budget.
"""

import time

from absl import flags

from kvjax import calibration, cli, fileio
from kvjax.evaluation import fidelity

FLAGS = flags.FLAGS
cli.define_model_flags()
flags.DEFINE_list("methods", None, "Method specs, e.g. locret:checkpoint=RUN,snapkv.",
                  required=True)
flags.DEFINE_integer("budget", 64, "Context tokens kept per layer and KV head.")
flags.DEFINE_integer("prefill_chunk_size", None, "Read the contexts in chunks of this many "
                     "tokens (the trained methods' block size).")
flags.DEFINE_integer("samples", 8, "Held-out essay windows.")
flags.DEFINE_integer("context", 512, "Context tokens per window.")
flags.DEFINE_integer("continuation", 64, "Scored tokens after each context.")
flags.DEFINE_integer("batch_size", 4, "Windows per batch.")
flags.DEFINE_integer("seed", 1000, "The windows' draw (training's evaluation uses 1000).")
flags.DEFINE_string("out", None, "Write the results there as JSON.")


def main(argv):
  del argv
  model = cli.load_model()
  samples = fidelity.essay_samples(model.tokenizer, FLAGS.context, FLAGS.continuation,
                                   FLAGS.samples, seed=FLAGS.seed)
  groups = fidelity.batches(samples, FLAGS.batch_size)
  references = [fidelity.reference(model, group) for group in groups]
  results = {}
  for spec in ["full"] + [m for m in FLAGS.methods if m != "full"]:
    began = time.perf_counter()
    method = None if spec == "full" else calibration.bind(spec, model)
    budget = None if method is None or not method.needs_budget else FLAGS.budget
    prefilled = [fidelity.prefill_batch(model, group, method, budget=budget,
                                        prefill_chunk_size=FLAGS.prefill_chunk_size)
                 for group in groups]
    cache_bytes = sum(p.context_cache_bytes for p in prefilled)
    result = fidelity.evaluate(model, samples, batch_size=FLAGS.batch_size,
                               reference=references, prefilled=prefilled)
    results[spec] = {**result, "context_cache_bytes": int(cache_bytes),
                     "seconds": round(time.perf_counter() - began, 1)}
    print(f"{spec:40s} perplexity {result['perplexity']:.3f}  KL {result['kl']:.4f}  "
          f"top-1 {result['top1']:.3f}  cache {cache_bytes / 2**20:.1f} MiB", flush=True)
  if FLAGS.out:
    fileio.write_json_atomic(FLAGS.out, {
        "model": model.config.name, "budget": FLAGS.budget,
        "prefill_chunk_size": FLAGS.prefill_chunk_size, "samples": FLAGS.samples,
        "context": FLAGS.context, "continuation": FLAGS.continuation, "seed": FLAGS.seed,
        "results": results}, indent=1)


if __name__ == "__main__":
  cli.run(main)
