"""The GPU roofline check (kvjax.roofline): kernels and decode step against the hardware.

  PYTHONPATH=. python3 scripts/roofline.py --json_out=gpu_check.json      # on a GPU
  scripts/gpu_check.sh                                                    # the same

Measures the copy bandwidth, the Pallas decode-attention kernel's fraction of it at
--kernel_contexts x --kernel_batches (goal >= 0.85), the prefill flash kernel's TFLOP/s at
--flash_length, the vertical-slash sparse prefill kernel against it (--sparse_lines), and
the decode step and prefill of the full cache vs --methods on random
weights at --shape (compression overhead goal <= 0.05). Prints each goal with PASS/FAIL and
writes the JSON after every section. Without a GPU it says so and exits with status 3,
unless --allow_cpu (interpret mode; for tests at tiny shapes).
"""

import sys

from absl import flags

from kvjax import benchmarking, cli, roofline

FLAGS = flags.FLAGS
_PLAN = roofline.Plan()
flags.DEFINE_string("shape", "llama-3.1-8b", f"Model shape: {benchmarking.available_shapes()} "
                    f"or a JSON ModelConfig file (random weights).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Default bfloat16 for named shapes.")
flags.DEFINE_integer("num_layers", None, "Override the shape's layer count (less compile time "
                     "for the model section; weights and cache per step shrink alike).")
flags.DEFINE_list("kernel_contexts", [str(c) for c in _PLAN.kernel_contexts],
                  "Decode-kernel cache lengths.")
flags.DEFINE_list("kernel_batches", [str(b) for b in _PLAN.kernel_batches],
                  "Decode-kernel batch sizes.")
flags.DEFINE_integer("model_context", _PLAN.model_context, "Prompt length of the model run.")
flags.DEFINE_integer("model_batch", _PLAN.model_batch, "Batch size of the model run.")
flags.DEFINE_list("methods", list(_PLAN.methods), "Methods compared with the full cache.")
flags.DEFINE_float("compression_ratio", _PLAN.compression_ratio,
                   "Ratio for the token-selecting methods.")
flags.DEFINE_integer("decode_steps", _PLAN.decode_steps, "Decode steps timed per run.")
flags.DEFINE_integer("repeats", _PLAN.repeats, "Timed model runs (median reported).")
flags.DEFINE_integer("warmup", _PLAN.warmup, "Untimed model runs first.")
flags.DEFINE_integer("flash_length", _PLAN.flash_length, "Prefill length of the flash kernel.")
flags.DEFINE_integer("flash_batch", _PLAN.flash_batch, "Batch of the flash kernel.")
flags.DEFINE_list("flash_blocks", ["default", "64x64", "128x64"],
                  "Flash block sizes to time, block_q x block_k ('default': the platform's).")
flags.DEFINE_integer("sparse_lines", _PLAN.sparse_lines, "Vertical and slash lines per head "
                     "of the sparse prefill kernel (each kind), at --flash_length.")
flags.DEFINE_list("kernel_bits", [str(b) for b in _PLAN.kernel_bits],
                  "Bit widths of the quantized (KIVI) decode kernel timed too ('' for none).")
flags.DEFINE_list("decode_tilings", [], "Extra decode-kernel tilings to time next to the "
                  "default, block_k x key_chunk (e.g. 64x256,128x512): tuning rows.")
flags.DEFINE_integer("iterations", _PLAN.iterations, "Kernel calls per timing round.")
flags.DEFINE_integer("copy_bandwidth_mib", _PLAN.copy_bandwidth_bytes >> 20,
                     "Array size of the copy-bandwidth measurement.")
flags.DEFINE_list("sections", list(roofline.SECTIONS), "Sections to run (copy always runs).")
flags.DEFINE_integer("seed", 0, "Seed of the random data and weights.")
flags.DEFINE_string("json_out", "gpu_check.json", "Where the report goes (rewritten after "
                    "every section).")
flags.DEFINE_bool("allow_cpu", False, "Run without a GPU (interpret mode; tiny shapes only).")


def _blocks(text):
  if text == "default":
    return (None, None)
  q, sep, k = text.partition("x")
  try:
    return (int(q), int(k)) if sep else None
  except ValueError:
    return None


def main(argv):
  del argv
  missing = roofline.accelerator_missing()
  if missing:
    print(f"[kvjax] {missing}", flush=True)
    if not FLAGS.allow_cpu:
      sys.exit(3)
  blocks = [_blocks(b) for b in FLAGS.flash_blocks]
  if None in blocks:
    raise benchmarking.BenchmarkError(f"--flash_blocks={FLAGS.flash_blocks}: each entry must "
                                      f"be 'default' or QxK, e.g. 128x64")
  tilings = [_blocks(t) for t in FLAGS.decode_tilings]
  if None in tilings or (None, None) in tilings:
    raise benchmarking.BenchmarkError(f"--decode_tilings={FLAGS.decode_tilings}: each entry "
                                      f"must be BLOCKxCHUNK, e.g. 64x256")
  plan = roofline.Plan(
      kernel_contexts=benchmarking.parse_sizes(FLAGS.kernel_contexts, "--kernel_contexts"),
      kernel_batches=benchmarking.parse_sizes(FLAGS.kernel_batches, "--kernel_batches"),
      model_context=FLAGS.model_context, model_batch=FLAGS.model_batch,
      methods=tuple(FLAGS.methods), compression_ratio=FLAGS.compression_ratio,
      decode_steps=FLAGS.decode_steps, repeats=FLAGS.repeats, warmup=FLAGS.warmup,
      flash_length=FLAGS.flash_length, flash_batch=FLAGS.flash_batch,
      flash_blocks=tuple(blocks), sparse_lines=FLAGS.sparse_lines,
      decode_tilings=tuple(tilings), iterations=FLAGS.iterations,
      kernel_bits=tuple(benchmarking.parse_sizes(FLAGS.kernel_bits, "--kernel_bits")
                        if FLAGS.kernel_bits else ()),
      copy_bandwidth_bytes=FLAGS.copy_bandwidth_mib << 20, sections=tuple(FLAGS.sections))
  config = benchmarking.named_shape(FLAGS.shape, FLAGS.dtype)
  if FLAGS.num_layers is not None:
    if FLAGS.num_layers < 1:
      raise benchmarking.BenchmarkError(f"--num_layers={FLAGS.num_layers} must be >= 1")
    config = config.replace(num_layers=FLAGS.num_layers)
  save = lambda report: cli.write_json(FLAGS.json_out, {**report, "config": cli.run_config()})
  report = roofline.run(config, plan, seed=FLAGS.seed, save=save,
                        log=lambda line: print(f"[kvjax] {line}", flush=True))
  print(roofline.format_report(report))
  print(f"[kvjax] wrote {FLAGS.json_out}")


if __name__ == "__main__":
  cli.run(main)
