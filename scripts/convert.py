"""Convert a Hugging Face directory or a GGUF file into a kvjax (orbax) checkpoint.

  python scripts/convert.py --src=/path/to/hf_dir_or_file.gguf --dst=/abs/or/rel/out_dir
"""

import pathlib

from absl import flags

import kvjax
from kvjax import cli
from kvjax.errors import OutputPathError
from checkpoints_conversion import orbax_io

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "Hugging Face directory, .gguf file, or registry name.",
                    required=True)
flags.DEFINE_string("dst", None, "Output checkpoint directory.", required=True)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Stored parameter dtype.")
flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint at --dst.")


def main(argv):
  del argv
  if pathlib.Path(FLAGS.dst).expanduser().exists() and not FLAGS.overwrite:
    # Before the (slow) conversion, not after it.
    raise OutputPathError(f"--dst={FLAGS.dst!r} already exists; pass --overwrite to replace "
                          f"it")
  model = kvjax.load(FLAGS.src, dtype=FLAGS.dtype)
  path = orbax_io.save(model, FLAGS.dst, overwrite=FLAGS.overwrite)
  print(f"wrote {path}: {model.config.architecture}, {model.num_params():,} parameters, "
        f"{model.config.dtype}, tokenizer={'yes' if model.tokenizer else 'no'}")


if __name__ == "__main__":
  cli.run(main)
