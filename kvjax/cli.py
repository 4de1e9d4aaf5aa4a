"""Flags and helpers shared by the absl scripts, so each script stays a thin main()."""

from __future__ import annotations

import sys

from absl import app, flags

from kvjax import fileio
from kvjax.errors import GenerationError, KvjaxError

FLAGS = flags.FLAGS


def run(main) -> None:
  """app.run, but bad input ends with one readable line and exit code 2, not a traceback."""
  def guarded(argv):
    try:
      return main(argv)
    except KvjaxError as e:
      sys.stderr.write(f"error: {e}\n")
      sys.exit(2)
  app.run(guarded)


def define_model_flags():
  flags.DEFINE_string("model", "smollm2-135m",
                      "Registry name, Hugging Face directory, .gguf file or kvjax checkpoint.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter dtype (default float32).")


def define_method_flags():
  import kvjax
  flags.DEFINE_string("method", "full", f"Compression method: {kvjax.methods.available()}.")
  flags.DEFINE_float("compression_ratio", None, "Fraction of the prompt cache removed, [0, 1).")
  flags.DEFINE_integer("budget", None, "Or: prompt tokens kept per layer.")
  flags.DEFINE_multi_string("method_arg", None,
                            "Method hyperparameter as name=value (repeatable), e.g. window=32; "
                            "wrappers take press=<method name>, e.g. --method=adakv "
                            "--method_arg=press=expected_attention.")
  flags.DEFINE_integer("prefill_chunk_size", None, "Prefill the prompt in chunks of this many "
                       "tokens, compressing after each (peak cache = budget + chunk).")


def load_model():
  import kvjax
  return kvjax.load(FLAGS.model, dtype=FLAGS.dtype)


def parse_value(text: str):
  """'32' -> 32, '0.5' -> 0.5, 'true' -> True, anything else stays a string."""
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def method_from_flags():
  import kvjax
  hyperparameters = {}
  for item in FLAGS.method_arg or []:
    name, sep, value = item.partition("=")
    if not sep or not name:
      raise GenerationError(f"--method_arg={item!r} must look like name=value")
    hyperparameters[name.strip()] = parse_value(value)
  return kvjax.methods.get(FLAGS.method, **hyperparameters)


def run_config() -> dict:
  """Values of the flags kvjax's scripts define (theirs and these shared ones)."""
  by_module = FLAGS.flags_by_module_dict()
  modules = [m for m in (__name__, sys.argv[0]) if m in by_module]  # absl keys __main__ by argv[0]
  return {f.name: f.value for m in modules for f in by_module[m]}


def write_json(path, data) -> None:
  """Writes JSON atomically (temp file + rename): a crash never leaves half a file."""
  fileio.write_json_atomic(path, data, indent=2, default=_jsonable)


def _jsonable(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  return str(x)


def format_stats(stats: dict) -> str:
  mib = 1 << 20
  context = (f"[kvjax] compressed context {stats['context_cache_bytes'] / mib:.2f} MiB of "
             f"{stats['full_context_cache_bytes'] / mib:.2f} MiB full "
             f"({stats['context_cache_bytes'] / stats['full_context_cache_bytes']:.1%})\n"
             if stats["method"] != "full" else "")
  return (f"[kvjax] method={stats['method']} batch={stats['batch_size']} "
          f"prompt_tokens={stats['prompt_tokens']} generated={stats['generated_tokens']}\n"
          f"{context}[kvjax] cache {stats['cache_bytes'] / mib:.2f} MiB "
          f"(full {stats['full_cache_bytes'] / mib:.2f} MiB, "
          f"{stats['cache_capacity_tokens']} slots/layer) | prefill "
          f"{stats['prefill_seconds']:.3f} s ({stats['prefill_tokens_per_second']:.0f} tok/s) | "
          f"decode {stats['decode_tokens_per_second']:.1f} tok/s | "
          f"compile {stats['compile_seconds']:.1f} s")
