"""Flags and helpers shared by the absl scripts, so each script stays a thin main()."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

from absl import flags

FLAGS = flags.FLAGS


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
                            "Method hyperparameter as name=value (repeatable), e.g. window=32.")


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
      raise flags.ValidationError(f"--method_arg={item!r} must look like name=value")
    hyperparameters[name.strip()] = parse_value(value)
  return kvjax.methods.get(FLAGS.method, **hyperparameters)


def run_config() -> dict:
  """Every flag this program defined, for reproducibility in JSON outputs."""
  main_module = FLAGS.find_module_defining_flag("model") or ""
  names = [f.name for f in FLAGS.get_flags_for_module(main_module)] if main_module else []
  names += [f.name for f in FLAGS.get_key_flags_for_module(__name__)]
  return {name: FLAGS[name].value for name in sorted(set(names)) if name in FLAGS}


def write_json(path, data) -> None:
  """Writes JSON atomically (temp file + rename): a crash never leaves half a file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(data, f, indent=2, default=_jsonable)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def _jsonable(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  return str(x)


def format_stats(stats: dict) -> str:
  mib = 1 << 20
  return (f"[kvjax] method={stats['method']} batch={stats['batch_size']} "
          f"prompt_tokens={stats['prompt_tokens']} generated={stats['generated_tokens']}\n"
          f"[kvjax] cache {stats['cache_bytes'] / mib:.2f} MiB "
          f"(full {stats['full_cache_bytes'] / mib:.2f} MiB, "
          f"{stats['cache_capacity_tokens']} slots/layer) | prefill "
          f"{stats['prefill_seconds']:.3f} s ({stats['prefill_tokens_per_second']:.0f} tok/s) | "
          f"decode {stats['decode_tokens_per_second']:.1f} tok/s | "
          f"compile {stats['compile_seconds']:.1f} s")
