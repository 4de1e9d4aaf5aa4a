"""Text <-> token ids and chat templates, over the Hugging Face `tokenizers` library.

A `Tokenizer` comes from one of three places:
  * a GGUF file's metadata (`from_gguf`): the byte-level BPE is rebuilt from the vocabulary,
    merges and token types llama.cpp stores there;
  * a Hugging Face directory (`from_hf_directory`): tokenizer.json plus tokenizer_config.json
    and generation_config.json;
  * a kvjax directory written by `save` (`load`).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from kvjax.errors import CheckpointError, ConfigError, GenerationError

TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "kvjax_tokenizer.json"
_METADATA_FORMAT = "kvjax-tokenizer"
_METADATA_VERSION = 1

# llama.cpp token types (tokenizer.ggml.token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Qwen2's split (from its tokenizer.json): case-insensitive contractions, one digit at a time,
# letters with at most one leading non-letter, and newlines kept with the whitespace before them.
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre_tokenizer():
  return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_gpt2_pre_tokenizer():
  # SmolLM/StarCoder: every digit is its own piece BEFORE the GPT-2 split, so "  12" is
  # ["  ", "1", "2"] (the spaces merge to one token) and not [" ", " 1", "2"]. This is the
  # original tokenizer.json and llama.cpp's "\p{N}" first pass.
  return None, pre_tokenizers.Sequence([
    pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])


def _qwen2_pre_tokenizer():
  # Qwen2's tokenizer.json also NFC-normalizes before splitting.
  return normalizers.NFC(), pre_tokenizers.Sequence([
    pre_tokenizers.Split(tokenizers.Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])


# tokenizer.ggml.pre -> (normalizer, pre-tokenizer). Aliases share llama.cpp's exact regexes.
_GGUF_PRE_TOKENIZERS = {
  "default": _gpt2_pre_tokenizer,
  "gpt2": _gpt2_pre_tokenizer,
  "smollm": _digits_gpt2_pre_tokenizer,
  "starcoder": _digits_gpt2_pre_tokenizer,
  "qwen2": _qwen2_pre_tokenizer,
}
_GGUF_MODELS = ("gpt2",)


class Tokenizer:
  """A `tokenizers.Tokenizer` plus the special-token facts generation needs."""

  def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None,
               eos_token_ids: Sequence[int], pad_token_id: int | None, add_bos: bool,
               chat_template: str | None, bos_token: str | None, eos_token: str | None):
    self.backend = backend
    self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
    self.bos_token_id = _check_id("bos_token_id", bos_token_id, self._vocab_size)
    self.eos_token_ids = tuple(_check_id("eos_token_ids", i, self._vocab_size)
                               for i in eos_token_ids)
    self.pad_token_id = _check_id("pad_token_id", pad_token_id, self._vocab_size)
    self.add_bos = bool(add_bos)
    if self.add_bos and self.bos_token_id is None:
      raise ConfigError("add_bos is True but the tokenizer has no bos_token_id")
    self.chat_template = chat_template
    self.bos_token = bos_token
    self.eos_token = eos_token

  def __repr__(self):
    return (f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
            f"eos_token_ids={self.eos_token_ids}, add_bos={self.add_bos}, "
            f"has_chat_template={self.has_chat_template})")

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def has_chat_template(self) -> bool:
    return self.chat_template is not None

  @property
  def eos_token_id(self) -> int | None:
    """The first end-of-sequence id (the one a chat template writes), or None."""
    return self.eos_token_ids[0] if self.eos_token_ids else None

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self.backend.id_to_token(int(token_id))

  # -- text <-> ids ---------------------------------------------------------------------------

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`. Special tokens written in the text (e.g. <|im_start|>) are matched."""
    if not isinstance(text, str):
      raise GenerationError(f"encode expects a str, got {type(text).__name__}: {text!r:.80}")
    ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
    # A tokenizer.json post-processor may already have added BOS; never add it twice.
    if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
      ids = [self.bos_token_id] + ids
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    array = np.asarray(list(ids) if not hasattr(ids, "shape") else ids)
    if array.size == 0:
      return ""
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
      raise GenerationError(
        f"decode expects a 1-D sequence of ints, got shape {array.shape} dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= self.vocab_size:
      bad = low if low < 0 else high
      raise GenerationError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
    return self.backend.decode(array.tolist(), skip_special_tokens=skip_special_tokens)

  # -- chat -----------------------------------------------------------------------------------

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = True, **variables) -> str:
    """Renders `messages` with the model's Jinja chat template, as Hugging Face does.

    Extra keyword arguments (tools=..., documents=...) become template variables.
    """
    if self.chat_template is None:
      raise ConfigError("this tokenizer has no chat template; pass plain text prompts instead")
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
      raise GenerationError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
      if not isinstance(message, Mapping) or "role" not in message:
        raise GenerationError(f"message {i} must be a dict with a 'role', got {message!r:.80}")
    context = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token))
               if v is not None}
    context.update(variables)
    template = _compile_chat_template(self.chat_template)
    return template.render(messages=[dict(m) for m in messages],
                           add_generation_prompt=add_generation_prompt, **context)

  # -- persistence ----------------------------------------------------------------------------

  def save(self, directory) -> None:
    """Writes tokenizer.json and kvjax_tokenizer.json (the special-token metadata)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.backend.save(str(directory / TOKENIZER_FILE))
    metadata = {
      "format": _METADATA_FORMAT, "version": _METADATA_VERSION,
      "bos_token_id": self.bos_token_id, "eos_token_ids": list(self.eos_token_ids),
      "pad_token_id": self.pad_token_id, "add_bos": self.add_bos,
      "chat_template": self.chat_template, "bos_token": self.bos_token,
      "eos_token": self.eos_token,
    }
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False))

  @classmethod
  def load(cls, directory) -> "Tokenizer":
    """Reads a directory written by `save`."""
    directory = pathlib.Path(directory)
    for name in (TOKENIZER_FILE, METADATA_FILE):
      if not (directory / name).is_file():
        raise CheckpointError(f"{directory} has no {name}; it was not written by Tokenizer.save")
    metadata = _read_json(directory / METADATA_FILE)
    if metadata.get("format") != _METADATA_FORMAT or metadata.get("version") != _METADATA_VERSION:
      raise CheckpointError(
        f"{directory / METADATA_FILE} has format {metadata.get('format')!r} version "
        f"{metadata.get('version')!r}; expected {_METADATA_FORMAT!r} version {_METADATA_VERSION}")
    keys = ("bos_token_id", "eos_token_ids", "pad_token_id", "add_bos", "chat_template",
            "bos_token", "eos_token")
    missing = [k for k in keys if k not in metadata]
    if missing:
      raise CheckpointError(f"{directory / METADATA_FILE} lacks {missing}")
    return cls(_read_backend(directory / TOKENIZER_FILE), **{k: metadata[k] for k in keys})

  @classmethod
  def from_hf_directory(cls, directory) -> "Tokenizer | None":
    """A Hugging Face model directory's tokenizer, or None when it has no tokenizer.json."""
    directory = pathlib.Path(directory)
    if not (directory / TOKENIZER_FILE).is_file():
      return None
    backend = _read_backend(directory / TOKENIZER_FILE)
    config = _read_optional_json(directory / "tokenizer_config.json")
    generation = _read_optional_json(directory / "generation_config.json")

    def token_id(name):
      token = _token_content(config.get(name), name)
      if token is None:
        return None, None
      found = backend.token_to_id(token)
      if found is None:
        raise CheckpointError(f"{directory}: {name} {token!r} is not in the vocabulary")
      return token, found

    bos_token, bos_id = token_id("bos_token")
    eos_token, eos_id = token_id("eos_token")
    _, pad_id = token_id("pad_token")
    if bos_id is None:
      bos_id = generation.get("bos_token_id")
      bos_token = None if bos_id is None else backend.id_to_token(bos_id)
    if pad_id is None:
      pad_id = generation.get("pad_token_id")
    # generation_config's eos may be a list (e.g. <|im_end|> and <|endoftext|>): stop on all.
    eos_ids = _dedupe(([eos_id] if eos_id is not None else []) + _as_id_list(
      generation.get("eos_token_id"), directory / "generation_config.json"))
    if eos_token is None and eos_ids:
      eos_token = backend.id_to_token(eos_ids[0])
    return cls(backend, bos_token_id=bos_id, eos_token_ids=eos_ids, pad_token_id=pad_id,
               add_bos=bool(config.get("add_bos_token", False)) and bos_id is not None,
               chat_template=_hf_chat_template(directory, config), bos_token=bos_token,
               eos_token=eos_token)

  @classmethod
  def from_gguf(cls, reader_or_path) -> "Tokenizer":
    """Rebuilds the byte-level BPE tokenizer a GGUF file describes in its metadata.

    Accepts a path or an already open `gguf.GGUFReader` (anything with `.fields`).
    """
    reader = _open_gguf(reader_or_path)
    read = functools.partial(_gguf_field, reader)
    model = read("tokenizer.ggml.model")
    if model not in _GGUF_MODELS:
      raise ConfigError(f"GGUF tokenizer.ggml.model {model!r} is not supported; "
                        f"kvjax supports {list(_GGUF_MODELS)}")
    pre = read("tokenizer.ggml.pre", "default")
    if pre not in _GGUF_PRE_TOKENIZERS:
      raise ConfigError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported; "
                        f"kvjax supports {sorted(_GGUF_PRE_TOKENIZERS)}")
    tokens = list(_required(read, "tokenizer.ggml.tokens"))
    merges = list(_required(read, "tokenizer.ggml.merges"))
    token_types = list(read("tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(token_types) != len(tokens):
      raise CheckpointError(f"GGUF has {len(tokens)} tokens but {len(token_types)} token types")

    backend = tokenizers.Tokenizer(models.BPE(
      vocab={token: i for i, token in enumerate(tokens)}, merges=_split_merges(merges),
      unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer, backend.pre_tokenizer = _GGUF_PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) and user-defined ones (<think>) are matched whole in text;
    # only control tokens are dropped by decode(skip_special_tokens=True).
    backend.add_special_tokens([
      tokenizers.AddedToken(t, special=True, normalized=False)
      for t, kind in zip(tokens, token_types) if kind == _TOKEN_CONTROL])
    backend.add_tokens([
      tokenizers.AddedToken(t, special=False, normalized=False)
      for t, kind in zip(tokens, token_types) if kind == _TOKEN_USER_DEFINED])

    def special(key):
      value = read(key, None)
      if value is not None and not 0 <= int(value) < len(tokens):
        raise CheckpointError(f"GGUF {key} {value} is outside the {len(tokens)}-token vocabulary")
      return None if value is None else int(value)

    bos_id = special("tokenizer.ggml.bos_token_id")
    eos_id = special("tokenizer.ggml.eos_token_id")
    # End-of-turn/message ids also end generation (llama.cpp stops on all of them).
    eog = [special(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                "tokenizer.ggml.eom_token_id")]
    return cls(backend, bos_token_id=bos_id, eos_token_ids=_dedupe(i for i in eog if i is not None),
               pad_token_id=special("tokenizer.ggml.padding_token_id"),
               add_bos=bool(read("tokenizer.ggml.add_bos_token", False)) and bos_id is not None,
               chat_template=read("tokenizer.chat_template", None),
               bos_token=None if bos_id is None else tokens[bos_id],
               eos_token=None if eos_id is None else tokens[eos_id])


# -- helpers ------------------------------------------------------------------------------------


def _check_id(name, value, vocab_size):
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ConfigError(f"{name} must be an int or None, got {value!r}")
  if not 0 <= value < vocab_size:
    raise ConfigError(f"{name} {value} is outside the vocabulary [0, {vocab_size})")
  return int(value)


def _dedupe(ids) -> list[int]:
  return list(dict.fromkeys(int(i) for i in ids))


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> jinja2.Template:
  # Hugging Face's environment: sandboxed (templates come from model files), blocks trimmed,
  # loop controls, a tojson that keeps non-ASCII and "<", and raise_exception/strftime_now.
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_from_template
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise ConfigError(f"chat template does not parse (line {e.lineno}): {e.message}") from e


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _raise_from_template(message):
  raise GenerationError(f"chat template rejected the messages: {message}")


def _read_json(path: pathlib.Path) -> dict:
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from e
  if not isinstance(data, dict):
    raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
  return data


def _read_optional_json(path: pathlib.Path) -> dict:
  return _read_json(path) if path.is_file() else {}


def _read_backend(path: pathlib.Path) -> tokenizers.Tokenizer:
  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # the Rust side raises plain Exception on malformed files
    raise CheckpointError(f"cannot read tokenizer {path}: {e}") from e


def _token_content(value, name):
  # tokenizer_config.json writes tokens as "<s>" or as {"content": "<s>", ...}.
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  raise CheckpointError(f"tokenizer_config.json {name} must be a string or "
                        f"{{'content': ...}}, got {value!r}")


def _as_id_list(value, source) -> list[int]:
  if value is None:
    return []
  values = value if isinstance(value, (list, tuple)) else [value]
  if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
    raise CheckpointError(f"{source}: eos_token_id must be an int or a list of ints, got {value!r}")
  return list(values)


def _hf_chat_template(directory: pathlib.Path, config: dict) -> str | None:
  # Newer transformers write the template to chat_template.jinja; older ones inline it in
  # tokenizer_config.json, either as a string or as a list of named templates.
  jinja_file = directory / "chat_template.jinja"
  if jinja_file.is_file():
    return jinja_file.read_text(encoding="utf-8")
  template = config.get("chat_template")
  if template is None and (directory / "chat_template.json").is_file():
    template = _read_json(directory / "chat_template.json").get("chat_template")
  if template is None or isinstance(template, str):
    return template
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    if "default" in named:
      return named["default"]
    raise CheckpointError(f"{directory}: chat_template lists {sorted(map(str, named))} "
                          "but no 'default' template")
  raise CheckpointError(f"{directory}: chat_template must be a string, got {type(template).__name__}")


def _open_gguf(reader_or_path):
  if not isinstance(reader_or_path, (str, os.PathLike)):
    if not hasattr(reader_or_path, "fields"):
      raise CheckpointError(f"expected a GGUF path or gguf.GGUFReader, got {reader_or_path!r:.80}")
    return reader_or_path
  path = pathlib.Path(reader_or_path)
  if not path.is_file():
    raise CheckpointError(f"GGUF file {path} does not exist")
  import gguf  # only needed for GGUF inputs
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # gguf raises ValueError/struct errors on corrupt files
    raise CheckpointError(f"cannot read GGUF file {path}: {e}") from e


_MISSING = object()


def _gguf_field(reader, key, default=_MISSING):
  field = reader.fields.get(key)
  if field is None:
    if default is _MISSING:
      raise ConfigError(f"GGUF metadata has no {key}; cannot build its tokenizer")
    return default
  return field.contents()


def _required(read, key):
  try:
    return read(key)
  except ConfigError as e:
    raise CheckpointError(str(e)) from e


def _split_merges(merges) -> list[tuple[str, str]]:
  # Byte-level tokens never contain a real space (it is spelled "Ġ"), so one space separates.
  pairs = []
  for rank, merge in enumerate(merges):
    parts = merge.split(" ")
    if len(parts) != 2 or not all(parts):
      raise CheckpointError(f"GGUF merge {rank} {merge!r} is not two tokens separated by a space")
    pairs.append((parts[0], parts[1]))
  return pairs
