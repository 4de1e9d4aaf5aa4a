"""Convert a Hugging Face directory or a GGUF file into a kvjax (orbax) checkpoint.

  python scripts/convert.py --src=/path/to/hf_dir_or_file.gguf --dst=/abs/or/rel/out_dir

With --kv_head_group=N every N adjacent KV heads are merged into one by PCA of calibration
caches (Yu et al.; `kvjax.calibration.kv_heads`): the checkpoint is an ordinary GQA model
with N times fewer KV heads, hence an N times smaller cache. Calibration reads the first
--calibration_tokens tokens of RULER's essays; the perplexity of both models on later
essay windows is printed. Adding --key_heads_only merges the key heads alone and keeps every
value head (Sigma's DiffQKV, adapted training-free): the cache stores N times fewer keys and
all the values.
"""

import pathlib

import numpy as np
from absl import flags

import kvjax
from kvjax import cli
from kvjax.calibration import kv_heads
from kvjax.errors import OutputPathError
from kvjax.evaluation import data
from checkpoints_conversion import orbax_io

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "Hugging Face directory, .gguf file, or registry name.",
                    required=True)
flags.DEFINE_string("dst", None, "Output checkpoint directory.", required=True)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Stored parameter dtype.")
flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint at --dst.")
flags.DEFINE_integer("kv_head_group", None, "Merge every N adjacent KV heads into one (PCA "
                     "of calibration caches); N must divide the model's KV heads.",
                     lower_bound=1)
flags.DEFINE_bool("key_heads_only", False, "With --kv_head_group: merge the key heads only "
                  "and keep every value head (DiffQKV).")
flags.DEFINE_integer("calibration_tokens", 8192, "Essay tokens the KV-head PCA reads.",
                     lower_bound=512)
flags.DEFINE_integer("eval_windows", 8, "Held-out 512-token essay windows for the "
                     "perplexity report.", lower_bound=0)
flags.register_multi_flags_validator(
    ["key_heads_only", "kv_head_group"],
    lambda f: not f["key_heads_only"] or f["kv_head_group"] is not None,
    "--key_heads_only says which heads --kv_head_group merges; pass --kv_head_group too")

CHUNK = 512


def essay_chunks(tokenizer, start: int, count: int) -> np.ndarray:
  """[count, CHUNK] token ids of the essays from token `start` on."""
  ids = tokenizer.encode(data.essays_text())
  if start + count * CHUNK > len(ids):
    raise ValueError(f"the essays have {len(ids)} tokens; {count} chunks of {CHUNK} from "
                     f"{start} need more")
  return np.asarray(ids[start:start + count * CHUNK], np.int32).reshape(count, CHUNK)


def perplexity(model, windows: np.ndarray) -> float:
  """exp(mean NLL) of each window's second half read after its first half."""
  half = windows.shape[1] // 2
  logprobs = kvjax.score(model, [w[:half].tolist() for w in windows],
                         [w[half:].tolist() for w in windows])
  return float(np.exp(-np.mean(np.concatenate(logprobs))))


def merged_heads(model):
  count = FLAGS.calibration_tokens // CHUNK
  chunks = essay_chunks(model.tokenizer, 0, count)
  batches = [(chunks[i:i + 4], np.ones_like(chunks[i:i + 4], bool)) for i in range(0, count, 4)]
  merged = kv_heads.compress_kv_heads(model, batches, FLAGS.kv_head_group,
                                      values=not FLAGS.key_heads_only)
  if FLAGS.eval_windows:
    held_out = essay_chunks(model.tokenizer, count * CHUNK, FLAGS.eval_windows)
    heads = lambda cfg: f"{cfg.num_kv_heads} key / {cfg.value_heads} value heads"
    print(f"perplexity on {FLAGS.eval_windows} held-out essay windows: "
          f"{perplexity(model, held_out):.3f} with {heads(model.config)}, "
          f"{perplexity(merged, held_out):.3f} with {heads(merged.config)}")
  return merged


def main(argv):
  del argv
  if pathlib.Path(FLAGS.dst).expanduser().exists() and not FLAGS.overwrite:
    # Before the (slow) conversion, not after it.
    raise OutputPathError(f"--dst={FLAGS.dst!r} already exists; pass --overwrite to replace "
                          f"it")
  model = kvjax.load(FLAGS.src, dtype=FLAGS.dtype)
  if FLAGS.kv_head_group is not None:
    if model.tokenizer is None:
      raise ValueError("--kv_head_group calibrates on text: the model needs a tokenizer")
    model = merged_heads(model)
  path = orbax_io.save(model, FLAGS.dst, overwrite=FLAGS.overwrite)
  print(f"wrote {path}: {model.config.architecture}, {model.num_params():,} parameters, "
        f"{model.config.dtype}, tokenizer={'yes' if model.tokenizer else 'no'}")


if __name__ == "__main__":
  cli.run(main)
