"""Tokenizer: parity with Hugging Face transformers on the real SmolLM2 GGUF, plus small fakes."""

import json
import pathlib
import types

import pytest

from kvjax.errors import CheckpointError, ConfigError, GenerationError
from kvjax.loading.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def gguf_path(smollm2_gguf) -> pathlib.Path:
  """The real SmolLM2 GGUF, fetched by the project's asset fetcher (conftest)."""
  return smollm2_gguf


# Texts where every pre-tokenizer in play agrees (no whitespace run right before a digit).
TEXTS = [
  "The capital of France is",
  "Hello, world! How's it going? I'm fine; they'll see. DON'T SHOUT.",
  "Numbers: 12345 and 3.14159, -42, 1e-9, 2024-11-22, $1,000,000.",
  "Ünïcödé façade — naïve café; emoji 😀🎉👍🏽 and math ∑∫√≈.",
  "中文测试：你好，世界！日本語のテキスト。한국어 텍스트",
  "tabs\tand\nnewlines\r\nand   multiple    spaces   ",
  "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))\n",
  "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
  "<|endoftext|><repo_name>kvjax<file_sep>x<|im_start|><|im_start|>",
  "   leading spaces and trailing   ",
  "",
  " ",
  "\n\n\n",
]
# Bytes that SmolLM2's vocabulary lacks: Hugging Face drops them (no unk token).
MISSING_BYTE_TEXT = "a\x04b\x13c"
# A space or whitespace run right before a (Unicode) digit: SmolLM2 splits digits off first, plain GPT-2 does not.
DIGIT_AFTER_SPACE_TEXTS = [
  "Total:  12 items",
  "x =\n 3.5",
  "Line 1\n\n  2. second item",
  "a\t\t7",
  "    return 0",
  "fractions ½ ² and Arabic ٣",  # non-ASCII numerals count as digits too
]

# The pre_tokenizer of HuggingFaceTB/SmolLM2's own tokenizer.json (and llama.cpp's "smollm",
# which splits "\p{N}" before the GPT-2 regex). transformers' GGUF loader ignores
# tokenizer.ggml.pre="smollm" and uses plain GPT-2 ByteLevel, so it is patched in here.
SMOLLM2_PRE_TOKENIZER = {
  "type": "Sequence",
  "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
  ],
}

ONE_TURN = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATION = [
  {"role": "system", "content": "You answer in one word."},
  {"role": "user", "content": "Capital of France?"},
  {"role": "assistant", "content": "Paris."},
  {"role": "user", "content": "And of Italy? 😀"},
]


@pytest.fixture(scope="module")
def ours(gguf_path) -> Tokenizer:
  return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def reference(gguf_path):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(
    str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def upstream_reference(reference):
  """transformers' vocabulary, merges and special tokens with SmolLM2's real pre-tokenizer."""
  tokenizers = pytest.importorskip("tokenizers")
  spec = json.loads(reference.backend_tokenizer.to_str())
  spec["pre_tokenizer"] = SMOLLM2_PRE_TOKENIZER
  return tokenizers.Tokenizer.from_str(json.dumps(spec))


# -- parity on the real GGUF ------------------------------------------------------------------


def test_metadata_matches_reference(ours, reference):
  assert ours.vocab_size == len(reference) == 49152
  assert ours.bos_token_id == reference.bos_token_id
  assert ours.eos_token_id == reference.eos_token_id
  assert ours.pad_token_id == reference.pad_token_id
  assert ours.bos_token == reference.bos_token and ours.eos_token == reference.eos_token
  assert ours.add_bos is False
  assert ours.has_chat_template


@pytest.mark.parametrize("text", TEXTS + [MISSING_BYTE_TEXT])
def test_ids_match_transformers_gguf(ours, reference, text):
  assert ours.encode(text) == reference.encode(text)
  assert ours.encode(text, add_special_tokens=False) == reference.encode(
    text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS + DIGIT_AFTER_SPACE_TEXTS)
def test_ids_match_upstream_smollm2_pre_tokenizer(ours, upstream_reference, text):
  assert ours.encode(text) == upstream_reference.encode(text).ids


def test_digits_split_before_whitespace_merges(ours, reference):
  # "  12" is ["  ", "1", "2"]: the two spaces become one token, as in SmolLM2's tokenizer.json.
  tokens = reference.convert_ids_to_tokens(ours.encode("Total:  12"))
  assert tokens[-3:] == ["ĠĠ", "1", "2"]


@pytest.mark.parametrize("text", TEXTS + DIGIT_AFTER_SPACE_TEXTS)
def test_decode_round_trips(ours, reference, text):
  ids = ours.encode(text)
  assert ours.decode(ids, skip_special_tokens=False) == text
  assert ours.decode(ids, skip_special_tokens=False) == reference.decode(
    ids, skip_special_tokens=False)
  assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_decode_accepts_arrays_and_rejects_bad_ids(ours):
  np = pytest.importorskip("numpy")
  ids = ours.encode("Hello world")
  assert ours.decode(np.asarray(ids, np.int32)) == "Hello world"
  assert ours.decode([]) == ""
  with pytest.raises(GenerationError, match="49152"):
    ours.decode([5, 49152])
  with pytest.raises(GenerationError, match="-1"):
    ours.decode([-1])
  with pytest.raises(GenerationError, match="encode expects a str"):
    ours.encode(["not", "text"])


@pytest.mark.parametrize("messages", [ONE_TURN, CONVERSATION], ids=["one_turn", "conversation"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, reference, messages, add_generation_prompt):
  expected = reference.apply_chat_template(
    messages, tokenize=False, add_generation_prompt=add_generation_prompt)
  assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_save_load_round_trip(ours, tmp_path):
  ours.save(tmp_path / "tok")
  assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
    "kvjax_tokenizer.json", "tokenizer.json"]
  loaded = Tokenizer.load(tmp_path / "tok")
  for text in TEXTS + DIGIT_AFTER_SPACE_TEXTS:
    assert loaded.encode(text) == ours.encode(text)
  for name in ("bos_token_id", "eos_token_ids", "pad_token_id", "add_bos", "chat_template",
               "bos_token", "eos_token", "vocab_size"):
    assert getattr(loaded, name) == getattr(ours, name), name
  assert loaded.apply_chat_template(CONVERSATION) == ours.apply_chat_template(CONVERSATION)


def test_from_hf_directory_matches_transformers(reference, tmp_path):
  reference.save_pretrained(tmp_path)
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
  hf = Tokenizer.from_hf_directory(tmp_path)
  for text in TEXTS + DIGIT_AFTER_SPACE_TEXTS:
    assert hf.encode(text) == reference.encode(text), text
  assert hf.bos_token_id == reference.bos_token_id
  assert hf.eos_token_ids == (reference.eos_token_id, 0)
  assert hf.pad_token_id == reference.pad_token_id
  assert hf.add_bos is False
  assert hf.apply_chat_template(CONVERSATION) == reference.apply_chat_template(
    CONVERSATION, tokenize=False, add_generation_prompt=True)


def test_from_hf_directory_without_tokenizer_json(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  assert Tokenizer.from_hf_directory(tmp_path) is None


# -- small synthetic GGUF metadata ------------------------------------------------------------


def _byte_alphabet():
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  return list(bytes_to_unicode().values())


MERGES = ["Ġ t", "h e", "Ġt he", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ", "Ġ 1", "1 2", "' S", "i s", "Ġ is"]
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>"]
SYNTH_TEXTS = [
  "the theme is 12 123  12\n\n  the",
  "IT'S the end's; 'S",
  "<|im_start|>user\n<think>the</think><|im_end|>",
  "  1  12   x\t\t1",
  "Cafe\u0301 and café",  # decomposed é: Qwen2 normalizes to NFC first
]


def _synthetic_vocab():
  tokens = CONTROL + _byte_alphabet()
  tokens += [m.replace(" ", "") for m in MERGES] + USER_DEFINED
  types_ = [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL) - 1) + [4]
  return tokens, types_


def _fake_reader(**overrides):
  tokens, types_ = _synthetic_vocab()
  metadata = {
    "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
    "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types_,
    "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
    "tokenizer.ggml.add_bos_token": False,
  }
  metadata.update(overrides)
  fields = {k: types.SimpleNamespace(contents=lambda v=v: v)
            for k, v in metadata.items() if v is not None}
  return types.SimpleNamespace(fields=fields)


def _transformers_reference(class_name):
  transformers = pytest.importorskip("transformers")
  tokens, _ = _synthetic_vocab()
  reference = getattr(transformers, class_name)(
    vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in MERGES],
    unk_token=None, bos_token=None, eos_token="<|endoftext|>", pad_token=None)
  reference.add_special_tokens({"additional_special_tokens": CONTROL})
  reference.add_tokens(USER_DEFINED)
  return reference


@pytest.mark.parametrize("pre, class_name", [("qwen2", "Qwen2Tokenizer"),
                                             ("gpt2", "GPT2Tokenizer")])
def test_synthetic_pre_tokenizers_match_transformers(pre, class_name):
  ours = Tokenizer.from_gguf(_fake_reader(**{"tokenizer.ggml.pre": pre}))
  reference = _transformers_reference(class_name)
  for text in SYNTH_TEXTS:
    assert ours.encode(text) == reference.encode(text), (pre, text)
    ids = ours.encode(text)
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_qwen2_splits_digits_and_keeps_user_defined_tokens():
  ours = Tokenizer.from_gguf(_fake_reader())
  pieces = [ours.id_to_token(i) for i in ours.encode("12 <think>")]
  assert pieces == ["1", "2", "Ġ", "<think>"]
  # User-defined tokens are ordinary text to decode; control tokens are skipped.
  assert ours.decode(ours.encode("<|im_start|><think>")) == "<think>"


def test_add_bos_prepends_once():
  ours = Tokenizer.from_gguf(_fake_reader(**{"tokenizer.ggml.add_bos_token": True}))
  plain = ours.encode("the", add_special_tokens=False)
  assert ours.encode("the") == [1] + plain
  assert ours.encode("<|im_start|>the") == [1] + plain


def test_missing_pre_defaults_to_gpt2():
  assert (Tokenizer.from_gguf(_fake_reader(**{"tokenizer.ggml.pre": None})).encode("a  12")
          == Tokenizer.from_gguf(_fake_reader(**{"tokenizer.ggml.pre": "gpt2"})).encode("a  12"))


# -- errors -----------------------------------------------------------------------------------


def test_unsupported_model_raises():
  with pytest.raises(ConfigError, match=r"tokenizer\.ggml\.model 'llama'.*'gpt2'"):
    Tokenizer.from_gguf(_fake_reader(**{"tokenizer.ggml.model": "llama"}))


def test_unsupported_pre_raises():
  with pytest.raises(ConfigError, match=r"tokenizer\.ggml\.pre 'falcon'.*'smollm'"):
    Tokenizer.from_gguf(_fake_reader(**{"tokenizer.ggml.pre": "falcon"}))


def test_missing_merges_and_bad_ids_raise():
  with pytest.raises(CheckpointError, match="tokenizer.ggml.merges"):
    Tokenizer.from_gguf(_fake_reader(**{"tokenizer.ggml.merges": None}))
  with pytest.raises(CheckpointError, match="eos_token_id 99999"):
    Tokenizer.from_gguf(_fake_reader(**{"tokenizer.ggml.eos_token_id": 99999}))
  with pytest.raises(CheckpointError, match="does not exist"):
    Tokenizer.from_gguf("/nonexistent/model.gguf")


def test_missing_chat_template_raises():
  ours = Tokenizer.from_gguf(_fake_reader())
  assert not ours.has_chat_template
  with pytest.raises(ConfigError, match="no chat template"):
    ours.apply_chat_template(ONE_TURN)


def test_template_raise_exception_and_bad_messages():
  template = ("{% if messages[0]['role'] != 'user' %}"
              "{{ raise_exception('first message must be from the user') }}{% endif %}ok")
  reader = _fake_reader(**{"tokenizer.chat_template": template})
  ours = Tokenizer.from_gguf(reader)
  assert ours.apply_chat_template(ONE_TURN) == "ok"
  with pytest.raises(GenerationError, match="first message must be from the user"):
    ours.apply_chat_template([{"role": "assistant", "content": "hi"}])
  with pytest.raises(GenerationError, match="message 0"):
    ours.apply_chat_template(["hello"])


def test_load_rejects_foreign_directories(tmp_path):
  with pytest.raises(CheckpointError, match="no tokenizer.json"):
    Tokenizer.load(tmp_path)
  Tokenizer.from_gguf(_fake_reader()).save(tmp_path)
  metadata = json.loads((tmp_path / "kvjax_tokenizer.json").read_text())
  (tmp_path / "kvjax_tokenizer.json").write_text(json.dumps({**metadata, "version": 99}))
  with pytest.raises(CheckpointError, match="version 99"):
    Tokenizer.load(tmp_path)
  (tmp_path / "kvjax_tokenizer.json").unlink()
  with pytest.raises(CheckpointError, match="no kvjax_tokenizer.json"):
    Tokenizer.load(tmp_path)
