"""Flags and helpers shared by the absl scripts, so each script stays a thin main()."""

from __future__ import annotations

import os
import pathlib
import re
import sys

from absl import app, flags

from kvjax import fileio
from kvjax.errors import GenerationError, KvjaxError, OutputPathError

FLAGS = flags.FLAGS

# Flags that name something a script writes, checked before any work is done (a bad path
# found after an hour's sweep, or after loading a model, wastes all of it).
OUTPUT_FILE_FLAGS = ("json_out", "plot_out")
OUTPUT_DIR_FLAGS = ("out_dir", "dst")
USAGE_ERROR = 2


def fail(message: str) -> None:
  """Ends the program with one `error:` line on stderr and exit status 2."""
  sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
  sys.exit(USAGE_ERROR)


def _parse_flags(argv):
  """absl's flag parsing, but a bad flag ends like any other bad input: one line, exit 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (--helpfull lists every flag)")


def run(main) -> None:
  """app.run, but bad input ends with one readable line and exit code 2, not a traceback:
  unparsable flags, stray positional arguments, output paths that cannot be written
  (checked before main runs) and every KvjaxError main raises."""
  def guarded(argv):
    try:
      if len(argv) > 1:
        raise KvjaxError(f"unexpected argument(s) {argv[1:]}; every input is a --flag "
                         f"(quote values with spaces, e.g. --prompt=\"...\")")
      check_output_flags()
      return main(argv)
    except KvjaxError as e:
      fail(str(e))
  app.run(guarded, flags_parser=_parse_flags)


def check_output_flags() -> None:
  """Every output flag a script defines (OUTPUT_FILE_FLAGS, OUTPUT_DIR_FLAGS) that is set
  names a path that can be written."""
  for names, is_dir in ((OUTPUT_FILE_FLAGS, False), (OUTPUT_DIR_FLAGS, True)):
    for name in names:
      if name in FLAGS and FLAGS[name].value is not None:
        check_output_path(f"--{name}", FLAGS[name].value, is_dir)


def check_output_path(what: str, path, is_dir: bool) -> None:
  """Raises OutputPathError unless `path` can be created or written: a file's parent
  folders (made on the way) and a folder itself must not be files, and the nearest
  existing folder must be writable."""
  if str(path).strip() == "":
    raise OutputPathError(f"{what}={str(path)!r} is empty; give a path")
  path = pathlib.Path(path).expanduser().absolute()
  if path.exists():
    if not is_dir and path.is_dir():
      raise OutputPathError(f"{what}={str(path)!r} is a directory; give a file path")
    if is_dir and not path.is_dir():
      raise OutputPathError(f"{what}={str(path)!r} is a file; give a directory")
  folder = path if is_dir else path.parent
  existing = folder
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise OutputPathError(f"{what}={str(path)!r} cannot be created: {str(existing)!r} is a "
                          f"file, not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise OutputPathError(f"{what}={str(path)!r} cannot be written: no write permission in "
                          f"{str(existing)!r}")


_ESCAPE = re.compile(r"\\(\\|n|t|r|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4})")
_SIMPLE_ESCAPES = {"\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


def unescape(text: str) -> str:
  """Backslash escapes typed on a command line: \\n, \\t, \\r, \\\\, \\xHH, \\uXXXX (so
  --stop="\\n" is a newline, as in Python). Other backslashes stay as they are."""
  def one(match):
    code = match.group(1)
    return _SIMPLE_ESCAPES.get(code) or chr(int(code[1:], 16))
  return _ESCAPE.sub(one, text)


def define_model_flags():
  flags.DEFINE_string("model", "smollm2-135m",
                      "Registry name, Hugging Face directory, .gguf file or kvjax checkpoint.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter dtype (default float32).")
  flags.DEFINE_string("mesh", None, "Shard the model over a device mesh, e.g. data:2,model:4 "
                      "(axes data, model, fsdp; the sizes' product divides the device count; "
                      "default: one device). See kvjax.sharding.")
  flags.DEFINE_string("coordinator_address", None,
                      "Run as one of several processes sharing one mesh: host:port of process "
                      "0 (or 'auto' on Cloud TPU / SLURM / Open MPI, which say it). Default: "
                      "$KVJAX_COORDINATOR_ADDRESS, else one process. Every process runs the "
                      "same command; only process 0 writes --json_out.")
  flags.DEFINE_integer("num_processes", None, "With --coordinator_address: how many processes "
                       "(default $KVJAX_NUM_PROCESSES).")
  flags.DEFINE_integer("process_id", None, "With --coordinator_address: this process's index, "
                       "0 to num_processes - 1 (default $KVJAX_PROCESS_ID).")


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


def _flag(name):
  return FLAGS[name].value if name in FLAGS else None


# The scripts whose work runs the same on every process of a multi-process run.
MULTIPROCESS_SCRIPTS = ("scripts/generate.py", "scripts/evaluate.py", "scripts/train.py")


def check_single_process() -> None:
  """Refuses --coordinator_address (or KVJAX_COORDINATOR_ADDRESS) in a script that runs in
  one process only (a server, training, benchmarks would each do their own thing)."""
  from kvjax.sharding import ShardingError, distributed
  if distributed.asked_to_join(_flag("coordinator_address")):
    raise ShardingError(f"this script runs in one process; multi-process runs "
                        f"(--coordinator_address or ${distributed.ENV_COORDINATOR}) are for "
                        f"{', '.join(MULTIPROCESS_SCRIPTS)}")


def join_processes_from_flags(shared_mesh: bool = True) -> bool:
  """Joins the multi-process run the flags (or KVJAX_* variables) name; False when there is
  none. Before anything touches a device: the mesh then spans every process's devices
  (shared_mesh; else each process works alone on its own devices)."""
  from kvjax.sharding import ShardingError, distributed
  if (shared_mesh and distributed.asked_to_join(_flag("coordinator_address"))
      and _flag("mesh") is None):
    # Checked before joining, which waits for every other process.
    raise ShardingError("a multi-process run (--coordinator_address) shares one mesh: give "
                        "--mesh over all processes' devices, e.g. data:2,model:4")
  return distributed.initialize(_flag("coordinator_address"), _flag("num_processes"),
                                _flag("process_id"))


def mesh_from_flags(local: bool = False):
  """The mesh --mesh asks for (None when not set); a bad spec raises a ShardingError.
  local: over this process's devices only (else over every process's)."""
  import jax
  from kvjax import sharding
  spec = FLAGS.mesh if "mesh" in FLAGS else None
  devices = jax.local_devices() if local else None
  return None if spec is None else sharding.make_mesh(spec, devices)


def load_model(multiprocess: bool = False, local: bool = False):
  """The --model on --mesh. multiprocess: first join the run the flags name (scripts in
  MULTIPROCESS_SCRIPTS); other scripts refuse those flags. local: each process holds the
  whole model on its own devices (the mesh is over those)."""
  import kvjax
  if multiprocess:
    join_processes_from_flags(shared_mesh=not local)
  else:
    check_single_process()
  return kvjax.load(FLAGS.model, dtype=FLAGS.dtype, mesh=mesh_from_flags(local))


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
  """Writes JSON atomically (temp file + rename): a crash never leaves half a file. In a
  multi-process run only process 0 writes (every process holds the same results)."""
  from kvjax.sharding.distributed import is_primary
  if not is_primary():
    return
  fileio.write_json_atomic(path, data, indent=2, default=_jsonable)


def _jsonable(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  return str(x)


def format_stats(stats: dict) -> str:
  """What a generate call cost: tokens; cache bytes (the context's cache against the full
  cache of that context, then the whole allocation: prompt padding, question and room for
  the answer included); a line when protected tokens shrank to fit; times."""
  mib = 1 << 20
  context, full_context = stats["context_cache_bytes"], stats["full_context_cache_bytes"]
  lines = [f"[kvjax] method={stats['method']} batch={stats['batch_size']} "
           f"prompt_tokens={stats['prompt_tokens']} generated={stats['generated_tokens']}",
           f"[kvjax] context cache {context / mib:.2f} MiB of {full_context / mib:.2f} MiB "
           f"full ({context / full_context:.1%}) | allocated {stats['cache_bytes'] / mib:.2f} "
           f"MiB (full {stats['full_cache_bytes'] / mib:.2f} MiB): "
           f"{stats['cache_capacity_tokens']} slots/layer, padding and room included",
           f"[kvjax] prefill {stats['prefill_seconds']:.3f} s "
           f"({stats['prefill_tokens_per_second']:.0f} tok/s) | decode "
           f"{stats['decode_tokens_per_second']:.1f} tok/s | compile "
           f"{stats['compile_seconds']:.1f} s"]
  configured, used = stats.get("protected_tokens_configured"), stats.get("protected_tokens")
  if configured is not None and used != configured:
    kept = stats["kept_tokens_per_layer"]
    lines.insert(2, f"[kvjax] the method's {configured} protected tokens (sinks + recent "
                    f"window) shrank to {used} to fit a budget of "
                    f"{sum(kept) // len(kept)} tokens per layer")
  return "\n".join(lines)
